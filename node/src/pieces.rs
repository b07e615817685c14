//! The piece-exchange protocol `/cairn/pieces/2` (spec/wire.md) over one
//! stream: the serving side answers from the fragment store; the client
//! side puts and gets fragments.
//!
//! A peer that breaks the protocol gets a reject with the reason and its
//! stream closed; nothing it sends is allocated beyond one frame, or beyond
//! the store's fragment limit for a declared put.

use cairn_protocol::ids::{FragmentHasher, FragmentId, NodeId, UploadId, VersionId};
use cairn_protocol::wire::{
    self, FragmentLock, FrameDecoder, Hold, Message, ObjectKeyDigest, RejectCode, WireError,
};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::PeerId;
use thiserror::Error;
use tokio::sync::mpsc;

use cairn_protocol::status::{
    LifecycleSummary, NodeStatus, RepairSummary, ScrubStatus, StoreStatus,
};
use tokio::sync::watch;

use crate::budget::{ByteBudget, Taken};

use crate::meta::Metadata;
use crate::release::{
    ReleaseRules, SegmentPlaces, may_drop, may_keep, may_lock, may_release, may_restore,
};
use crate::store::{
    FragmentState, FragmentStore, Locked, PutOutcome, Released, ScrubState, StoreError,
    VerifiedFragment,
};

pub const PROTOCOL: libp2p::StreamProtocol = libp2p::StreamProtocol::new(wire::PROTOCOL_NAME);

/// Bytes read from the stream at a time.
const READ_BYTES: usize = 256 << 10;

#[derive(Debug, Error)]
pub enum PieceError {
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Wire(#[from] WireError),
    #[error("peer closed the stream before answering")]
    Closed,
    #[error("peer refused ({code:?}): {message}")]
    Rejected { code: RejectCode, message: String },
    #[error("unexpected message from peer: {0}")]
    Unexpected(String),
    #[error("fragment bytes from the peer do not hash to {0}")]
    HashMismatch(FragmentId),
    #[error("the peer sent nothing for {0:?}")]
    TimedOut(Duration),
}

/// Reads whole messages from a stream through the sans-IO decoder.
pub struct MessageReader<R> {
    io: R,
    decoder: FrameDecoder,
    buffer: Vec<u8>,
    /// How long the peer may send nothing before the exchange is given up.
    silence: Duration,
}

/// How long a serving node waits for the next bytes of an exchange: a
/// peer that stalls mid-put gives its budget back after this.
pub const SERVER_SILENCE: Duration = Duration::from_secs(10);
/// How long a calling node waits for the next bytes of an answer (a put's
/// ack waits for the holder's fsync).
pub const CLIENT_SILENCE: Duration = Duration::from_secs(30);

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub fn new(io: R, silence: Duration) -> Self {
        Self {
            io,
            decoder: FrameDecoder::default(),
            buffer: vec![0; READ_BYTES],
            silence,
        }
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Message>, PieceError> {
        loop {
            if let Some(message) = self.decoder.next_message()? {
                return Ok(Some(message));
            }
            let read = tokio::time::timeout(self.silence, self.io.read(&mut self.buffer))
                .await
                .map_err(|_| PieceError::TimedOut(self.silence))??;
            if read == 0 {
                return if self.decoder.buffered() == 0 {
                    Ok(None)
                } else {
                    Err(PieceError::Closed)
                };
            }
            self.decoder.feed(&self.buffer[..read]);
        }
    }

    async fn expect(&mut self) -> Result<Message, PieceError> {
        self.next().await?.ok_or(PieceError::Closed)
    }
}

pub async fn send<W: AsyncWrite + Unpin>(io: &mut W, message: &Message) -> Result<(), PieceError> {
    let mut frame = Vec::new();
    message.encode(&mut frame)?;
    io.write_all(&frame).await?;
    Ok(())
}

/// Sends `bytes` as data frames, each written from where it lies.
async fn send_data<W: AsyncWrite + Unpin>(io: &mut W, bytes: &[u8]) -> Result<(), PieceError> {
    for piece in bytes.chunks(wire::MAX_DATA_BYTES) {
        let mut header = Vec::with_capacity(5);
        wire::encode_data_header(piece.len(), &mut header)?;
        io.write_all(&header).await?;
        io.write_all(piece).await?;
    }
    Ok(())
}

fn hello() -> Message {
    Message::Hello {
        version: wire::PROTOCOL_VERSION,
        capabilities: wire::capability::RANGE_GET | wire::capability::INVENTORY,
        max_frame_bytes: wire::MAX_FRAME_BYTES as u32,
    }
}

fn reject(code: RejectCode, message: impl Into<String>) -> Message {
    Message::Reject {
        code,
        message: message.into(),
    }
}

/// What this node lets a writer ask in a hold, whoever stores through it
/// (a peer, or this node's own gateway): a signed hold, and no retention.
/// A put comes before its version is committed, so nothing could check a
/// retention it asked (a member could pin fragments forever); Object Lock
/// reaches the fragments by lock-fragments, checked against the version.
pub(crate) fn admit_hold(id: &FragmentId, hold: &Hold) -> Result<(), StoreError> {
    if !hold.verify(id) {
        return Err(StoreError::BadHold(*id));
    }
    if hold.retain_until_unix_ms != 0 {
        return Err(StoreError::RetentionRefused {
            id: *id,
            retain_until_unix_ms: hold.retain_until_unix_ms,
        });
    }
    Ok(())
}

fn reject_for(error: &StoreError) -> Message {
    let code = match error {
        StoreError::HashMismatch { .. } => RejectCode::HashMismatch,
        StoreError::TooLarge { .. } => RejectCode::TooLarge,
        StoreError::BadHold(_) => RejectCode::BadHold,
        StoreError::RetentionRefused { .. } => RejectCode::RetentionRefused,
        StoreError::DiskFull { .. } => RejectCode::DiskFull,
        StoreError::NotFound(_) | StoreError::NotInTrash(_) => RejectCode::NotFound,
        StoreError::Corrupt(_) => RejectCode::Corrupt,
        _ => RejectCode::Internal,
    };
    reject(code, error.to_string())
}

/// What the serving side needs.
#[derive(Clone)]
pub struct Server {
    pub store: FragmentStore,
    pub max_fragment_bytes: u64,
    pub now_unix_ms: fn() -> u64,
    /// Bytes of puts and gets held in memory at once, in all and per peer.
    pub(crate) budget: Arc<ByteBudget>,
    /// Told the upload of each fragment stored, for the node to announce
    /// itself as one of the upload's providers.
    pub stored: Option<mpsc::Sender<UploadId>>,
    /// What a release is checked against.
    pub(crate) metadata: Metadata,
    pub(crate) release_rules: ReleaseRules,
    /// Where this node's scrub is, and its repair's last report.
    pub(crate) scrub: watch::Receiver<ScrubState>,
    pub(crate) repair: Arc<std::sync::Mutex<RepairSummary>>,
    pub(crate) lifecycle: Arc<std::sync::Mutex<LifecycleSummary>>,
    /// The store's part of the last status, and when it was taken.
    pub(crate) store_status: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, StoreStatus)>>>,
}

/// Runs a store call on a blocking thread: store reads touch the disk and
/// redb, which must not hold up the async workers.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PieceError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| PieceError::Io(std::io::Error::other(e.to_string())))
}

/// How long the store's part of a status answers again without a walk.
const STORE_STATUS_KEPT: Duration = Duration::from_secs(5);
/// How long the keeper named in a drop is given to send the fragment
/// (within the caller's patience for the answer).
const KEEPER_SHOWS_WITHIN: Duration = Duration::from_secs(15);

/// How long an exchange waits for room in the bytes-in-flight budget:
/// less than a caller waits for an answer, so that it hears `busy`.
const BUDGET_WAIT: Duration = Duration::from_secs(20);

impl Server {
    /// Serves one exchange on `stream`. A protocol violation is answered
    /// with a reject and returned as an error, for the caller to log.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        peer: PeerId,
        stream: S,
    ) -> Result<(), PieceError> {
        let (read, mut write) = stream.split();
        let mut reader = MessageReader::new(read, SERVER_SILENCE);
        let result = self.exchange(peer, &mut reader, &mut write).await;
        if let Err(PieceError::Wire(error)) = &result {
            let _ = send(
                &mut write,
                &reject(RejectCode::Malformed, error.to_string()),
            )
            .await;
        }
        let _ = write.close().await;
        result
    }

    async fn exchange<R, W>(
        &self,
        peer: PeerId,
        reader: &mut MessageReader<R>,
        write: &mut W,
    ) -> Result<(), PieceError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        match reader.expect().await? {
            Message::Hello { version, .. } if version >= 1 => {}
            Message::Hello { version, .. } => {
                send(
                    write,
                    &reject(
                        RejectCode::UnsupportedVersion,
                        format!("version {version} unsupported"),
                    ),
                )
                .await?;
                return Ok(());
            }
            other => return Err(unexpected(&other)),
        }
        send(write, &hello()).await?;
        match reader.expect().await? {
            Message::PutFragment { id, length, hold } => {
                self.receive_put(peer, reader, write, id, length, hold)
                    .await
            }
            Message::GetFragment { id, offset, length } => {
                self.send_fragment(write, peer, id, offset, length).await
            }
            Message::GetAny {
                ids,
                offset,
                length,
            } => match self.first_live(ids).await? {
                Some(id) => self.send_fragment(write, peer, id, offset, length).await,
                None => {
                    let none = reject(
                        RejectCode::NotFound,
                        "none of the fragments asked for is held here",
                    );
                    send(write, &none).await
                }
            },
            Message::KeepCheck {
                fragment,
                bucket,
                key,
                version,
                upload,
            } => {
                // No order lock here: several fragments of one upload are
                // repaired at once, and a keeper busy dropping another of
                // them would refuse every honest drop. Two maps cannot drop
                // both copies: the holder refuses when its map changed
                // during the check, and this node vouches only under its
                // own map.
                let object = ObjectKeyDigest::of(&bucket, &key);
                // Only a copy written for that object and upload vouches.
                let store = self.store.clone();
                let held = blocking(move || store.entry(&fragment)).await?;
                if !matches!(&held, Ok(Some(e)) if e.state == FragmentState::Live
                    && e.hold.upload == upload
                    && e.hold.object == object)
                {
                    let refusal = reject(
                        RejectCode::Unauthorized,
                        format!(
                            "keep refused: no live copy of {fragment} written for {bucket}/{key} by upload {upload} here"
                        ),
                    );
                    return send(write, &refusal).await;
                }
                let keeps = may_keep(
                    &self.release_rules,
                    &self.metadata,
                    &bucket,
                    &key,
                    version,
                    fragment,
                    upload,
                )
                .await;
                if let Err(why) = keeps {
                    tracing::info!(%fragment, bucket, key, %why, "refused to show a fragment as its keeper");
                    let refusal = reject(RejectCode::Unauthorized, format!("keep refused: {why}"));
                    return send(write, &refusal).await;
                }
                self.send_fragment(write, peer, fragment, 0, u64::MAX).await
            }
            Message::HaveQuery { ids } => {
                let count = ids.len() as u32;
                let live = self.live(ids).await?;
                send(write, &have_reply(count, &live)).await
            }
            Message::HaveHeld {
                upload,
                object,
                ids,
            } => {
                let count = ids.len() as u32;
                let store = self.store.clone();
                let held = blocking(move || {
                    ids.iter()
                        .map(|id| {
                            matches!(store.entry(id), Ok(Some(e)) if e.state == FragmentState::Live
                                && e.hold.upload == upload
                                && e.hold.object == object)
                        })
                        .collect::<Vec<bool>>()
                })
                .await?;
                send(write, &have_reply(count, &held)).await
            }
            Message::InventoryQuery { start, end } => {
                let store = self.store.clone();
                let digest = blocking(move || store.digest(&start, &end)).await?;
                match digest {
                    Ok((count, digest)) => {
                        send(
                            write,
                            &Message::InventoryDigest {
                                start,
                                end,
                                count,
                                digest,
                            },
                        )
                        .await
                    }
                    Err(error) => send(write, &reject_for(&error)).await,
                }
            }
            Message::InventoryList { start, end, limit } => {
                let limit = (limit as usize).min(wire::MAX_HAVE_IDS);
                let store = self.store.clone();
                match blocking(move || store.list(&start, &end, limit + 1)).await? {
                    Ok(mut ids) => {
                        let more = ids.len() > limit;
                        ids.truncate(limit);
                        send(write, &Message::InventoryPage { ids, more }).await
                    }
                    Err(error) => send(write, &reject_for(&error)).await,
                }
            }
            Message::Release {
                upload,
                bucket,
                key,
            } => match self.release(upload, &bucket, &key).await? {
                Ok(Released { trashed, held }) => {
                    send(write, &Message::Released { trashed, held }).await
                }
                Err(refusal) => send(write, &refusal).await,
            },
            Message::Restore {
                upload,
                bucket,
                key,
            } => match self.restore(upload, &bucket, &key).await? {
                Ok(restored) => send(write, &Message::Restored { restored }).await,
                Err(refusal) => send(write, &refusal).await,
            },
            Message::LockFragments {
                uploads,
                bucket,
                key,
                version,
                lock,
            } => match self
                .lock_fragments(uploads, &bucket, &key, version, lock)
                .await?
            {
                Ok(fragments) => send(write, &Message::FragmentsLocked { fragments }).await,
                Err(refusal) => send(write, &refusal).await,
            },
            Message::DropCopy {
                fragment,
                bucket,
                key,
                version,
                keeper,
            } => match self
                .drop_copy(fragment, &bucket, &key, version, keeper)
                .await?
            {
                Ok(()) => send(write, &Message::Dropped).await,
                Err(refusal) => send(write, &refusal).await,
            },
            Message::StatusQuery { store } => match self.status(store).await? {
                Ok(status) => send(write, &Message::StatusReply(Box::new(status))).await,
                Err(error) => send(write, &reject_for(&error)).await,
            },
            Message::Cancel => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Answers a read of `length` bytes from `offset` of fragment `id`:
    /// fragment-header and data frames, or the refusal.
    async fn send_fragment<W: AsyncWrite + Unpin>(
        &self,
        write: &mut W,
        peer: PeerId,
        id: FragmentId,
        offset: u64,
        length: u64,
    ) -> Result<(), PieceError> {
        match self.read(Some(peer), id, offset, length).await? {
            Ok((total_len, bytes, _budget)) => {
                let header = Message::FragmentHeader {
                    id,
                    total_len,
                    offset,
                    length: bytes.len() as u64,
                };
                send(write, &header).await?;
                send_data(write, &bytes).await
            }
            Err(refusal) => send(write, &refusal).await,
        }
    }

    /// This node's status: its store if asked (an index walk, off the
    /// runtime), its scrub and its repair.
    async fn status(&self, with_store: bool) -> Result<Result<NodeStatus, StoreError>, PieceError> {
        let summary = if with_store {
            // One index walk at a time, its answer kept for a few seconds:
            // members asking in a loop cost one walk per period.
            let mut cached = self.store_status.lock().await;
            match *cached {
                Some((at, summary)) if at.elapsed() < STORE_STATUS_KEPT => summary,
                _ => {
                    let store = self.store.clone();
                    match blocking(move || store.status()).await? {
                        Ok(summary) => {
                            *cached = Some((tokio::time::Instant::now(), summary));
                            summary
                        }
                        Err(error) => return Ok(Err(error)),
                    }
                }
            }
        } else {
            Default::default()
        };
        let summary = StoreStatus {
            trash_period_ms: self.store.trash_period_ms(),
            release_grace_ms: self.release_rules.settle_ms().unwrap_or(0),
            ..summary
        };
        let scrub = *self.scrub.borrow();
        let pass = scrub.pass.unwrap_or_default();
        Ok(Ok(NodeStatus {
            store: summary,
            scrub: ScrubStatus {
                passes: scrub.passes,
                last_finished_unix_ms: scrub.last_finished_unix_ms,
                pass_started_unix_ms: scrub.pass.map_or(0, |p| p.started_unix_ms),
                pass_checked: pass.checked,
                pass_bytes: pass.bytes,
                corrupt_found: scrub.corrupt_found,
            },
            repair: self.repair.lock().expect("repair summary lock").clone(),
            lifecycle: *self.lifecycle.lock().expect("lifecycle summary lock"),
        }))
    }

    pub(crate) async fn status_local(&self, with_store: bool) -> Result<NodeStatus, PieceError> {
        self.status(with_store)
            .await?
            .map_err(|e| refused(&reject_for(&e)))
    }

    async fn receive_put<R, W>(
        &self,
        peer: PeerId,
        reader: &mut MessageReader<R>,
        write: &mut W,
        id: FragmentId,
        length: u64,
        hold: Hold,
    ) -> Result<(), PieceError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if let Err(refusal) = self.admit_put(&id, length, &hold) {
            return send(write, &reject_for(&refusal)).await;
        }
        // Room in the node-wide budget first, then a buffer of the declared
        // size, which the check above bounds by the fragment limit.
        let Some(_budget) = self
            .budget
            .take(Some(peer), length as u32, BUDGET_WAIT)
            .await
        else {
            return send(
                write,
                &reject(RejectCode::Busy, "too many bytes in flight; retry"),
            )
            .await;
        };
        let mut bytes = Vec::with_capacity(length as usize);
        let mut hasher = FragmentHasher::new();
        while (bytes.len() as u64) < length {
            match reader.expect().await? {
                Message::Data(data) => {
                    if bytes.len() as u64 + data.len() as u64 > length {
                        send(
                            write,
                            &reject(RejectCode::Malformed, "data beyond the declared length"),
                        )
                        .await?;
                        return Err(PieceError::Unexpected(
                            "data beyond the declared length".into(),
                        ));
                    }
                    hasher.update(&data);
                    bytes.extend_from_slice(&data);
                }
                Message::Cancel => return Ok(()),
                other => return Err(unexpected(&other)),
            }
        }
        let outcome = match VerifiedFragment::from_hasher(id, bytes, &hasher) {
            Ok(fragment) => self.keep(fragment, hold).await,
            Err(error) => Err(error),
        };
        match outcome {
            Ok(()) => send(write, &Message::Ack { id }).await,
            Err(error) => send(write, &reject_for(&error)).await,
        }
    }

    /// Whether a put of `length` bytes under `hold` may be taken at all:
    /// asked before any of its bytes are read.
    fn admit_put(&self, id: &FragmentId, length: u64, hold: &Hold) -> Result<(), StoreError> {
        if length > self.max_fragment_bytes {
            return Err(StoreError::TooLarge {
                len: length,
                max: self.max_fragment_bytes,
            });
        }
        admit_hold(id, hold)
    }

    /// Stores a verified fragment durably and has its upload announced.
    async fn keep(&self, fragment: VerifiedFragment, hold: Hold) -> Result<(), StoreError> {
        let upload = hold.upload;
        match self.store.put(fragment, hold, (self.now_unix_ms)()).await? {
            PutOutcome::Stored | PutOutcome::AlreadyStored => {}
        }
        if let Some(stored) = &self.stored {
            let _ = stored.send(upload).await;
        }
        Ok(())
    }

    /// Reads bytes of a fragment for an answer, within the node's byte
    /// budget (the bytes are held until sent); the budget's permit comes
    /// back with them. A refusal is the answer to send instead.
    async fn read(
        &self,
        peer: Option<PeerId>,
        id: FragmentId,
        offset: u64,
        length: u64,
    ) -> Result<Result<(u64, Vec<u8>, Taken), Message>, PieceError> {
        let store = self.store.clone();
        let total_len = match blocking(move || store.entry(&id)).await? {
            Ok(Some(entry)) => entry.len,
            Ok(None) => return Ok(Err(reject_for(&StoreError::NotFound(id)))),
            Err(error) => return Ok(Err(reject_for(&error))),
        };
        let wanted = total_len
            .saturating_sub(offset)
            .min(length)
            .clamp(1, u64::from(u32::MAX));
        let Some(budget) = self.budget.take(peer, wanted as u32, BUDGET_WAIT).await else {
            return Ok(Err(reject(
                RejectCode::Busy,
                "too many bytes in flight; retry",
            )));
        };
        let store = self.store.clone();
        Ok(blocking(move || store.read(&id, offset, length))
            .await?
            .map(|bytes| (total_len, bytes, budget))
            .map_err(|error| reject_for(&error)))
    }

    /// Which of `ids` this node holds live, in `ids` order.
    /// The first of `ids` held live here, if any.
    async fn first_live(&self, ids: Vec<FragmentId>) -> Result<Option<FragmentId>, PieceError> {
        let held = self.live(ids.clone()).await?;
        Ok(ids
            .into_iter()
            .zip(held)
            .find_map(|(id, held)| held.then_some(id)))
    }

    async fn live(&self, ids: Vec<FragmentId>) -> Result<Vec<bool>, PieceError> {
        let store = self.store.clone();
        blocking(move || {
            ids.iter()
                .map(|id| matches!(store.entry(id), Ok(Some(e)) if e.state == FragmentState::Live))
                .collect()
        })
        .await
    }

    /// Moves an upload's fragments to the trash if the replicated metadata
    /// says the upload is released and nothing committed uses it.
    async fn release(
        &self,
        upload: UploadId,
        bucket: &str,
        key: &str,
    ) -> Result<Result<Released, Message>, PieceError> {
        let object = ObjectKeyDigest::of(bucket, key);
        let in_order = self.release_rules.order.lock(upload, object).await;
        let settle_ms =
            match may_release(&self.release_rules, &self.metadata, bucket, key, upload).await {
                Ok(settle_ms) => settle_ms,
                Err(why) => {
                    tracing::warn!(%upload, bucket, key, %why, "refused a release");
                    return Ok(Err(reject(
                        RejectCode::Unauthorized,
                        format!("release refused: {why}"),
                    )));
                }
            };
        let store = self.store.clone();
        let now = (self.now_unix_ms)();
        let stored_before = now.saturating_sub(settle_ms);
        let released = blocking(move || {
            let _in_order = in_order;
            store.release(&upload, &object, stored_before, now)
        })
        .await?;
        if let Ok(Released { trashed, held }) = &released
            && *trashed > 0
        {
            tracing::info!(%upload, trashed, held, "released an upload's fragments to the trash");
        }
        Ok(released.map_err(|error| reject_for(&error)))
    }

    /// Moves this node's copy of `fragment` to the trash once it has
    /// checked that it is a copy left off placement: the replicated
    /// metadata shows the fragment in `version`, written by the upload its
    /// hold names, placement under this node's map names `keeper` for it
    /// and not this node, and `keeper` shows it holds the fragment by
    /// sending its bytes.
    async fn drop_copy(
        &self,
        fragment: FragmentId,
        bucket: &str,
        key: &str,
        version: VersionId,
        keeper: NodeId,
    ) -> Result<Result<(), Message>, PieceError> {
        let refuse = |why: String| {
            tracing::warn!(%fragment, bucket, key, %why, "refused to drop a copy");
            Ok(Err(reject(
                RejectCode::Unauthorized,
                format!("drop refused: {why}"),
            )))
        };
        let store = self.store.clone();
        let entry = match blocking(move || store.entry(&fragment)).await? {
            Ok(Some(entry)) if entry.state == FragmentState::Live => entry,
            Ok(_) => return Ok(Err(reject_for(&StoreError::NotFound(fragment)))),
            Err(error) => return Ok(Err(reject_for(&error))),
        };
        let object = ObjectKeyDigest::of(bucket, key);
        if entry.hold.object != object {
            return refuse(format!(
                "the copy here was written for another object than {bucket}/{key}"
            ));
        }
        if keeper == self.metadata.node_id() {
            return refuse("this node cannot keep what it drops".into());
        }
        let upload = entry.hold.upload;
        let map_version = self.metadata.cluster_map().map(|m| m.map.version);
        let check_metadata = || {
            may_drop(
                &self.release_rules,
                &self.metadata,
                bucket,
                key,
                version,
                fragment,
                upload,
                keeper,
            )
        };
        // The network checks first, outside the upload's order lock: a slow
        // keeper or placed node holds up no release or restore of it.
        let places = match check_metadata().await {
            Ok(places) => places,
            Err(why) => return refuse(why),
        };
        // The keeper shows it holds the fragment whole, now, and that its
        // own map places it there (two nodes whose maps differ cannot each
        // drop on the other's word): its bytes, checked against the id.
        let expected_len = entry.len;
        let shown = tokio::time::timeout(KEEPER_SHOWS_WITHIN, async {
            let stream = self.metadata.open_member_stream(&keeper, PROTOCOL).await?;
            let bytes = keep_check(stream, fragment, bucket, key, version, upload, expected_len)
                .await
                .map_err(|e| e.to_string())?;
            // All of it, hashing to the id: an answer that announces a
            // shorter fragment proves nothing.
            if bytes.len() as u64 != expected_len || FragmentId::of(&bytes) != fragment {
                return Err(format!(
                    "it sent {} bytes that are not the fragment",
                    bytes.len()
                ));
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {KEEPER_SHOWS_WITHIN:?}")));
        if let Err(why) = shown {
            return refuse(format!(
                "the keeper {keeper} did not show the fragment: {why}"
            ));
        }
        // Any node of a segment's set may keep any of its fragments, so
        // the keeper's copy alone proves little (a member of the set could
        // copy fragments to itself, vouch, then delete them): every
        // segment must be whole on its placed nodes, each counted once.
        if let Err(why) = whole_on_placed(&self.metadata, upload, object, &places).await {
            return refuse(why);
        }
        // Under the lock, the metadata again: a release or restore of the
        // upload ordered before this drop is seen.
        let in_order = self.release_rules.order.lock(upload, object).await;
        if let Err(why) = check_metadata().await {
            return refuse(why);
        }
        // Judged under one map from start to end: a map adopted meanwhile
        // may place the fragment here, and its keeper be asked to drop.
        if self.metadata.cluster_map().map(|m| m.map.version) != map_version {
            return refuse("the cluster map changed during the check; asked again later".into());
        }
        let store = self.store.clone();
        let now = (self.now_unix_ms)();
        let dropped = blocking(move || {
            let _in_order = in_order;
            store.drop_copy(&fragment, &upload, &object, now)
        });
        match dropped.await? {
            Ok(true) => {
                tracing::info!(%fragment, bucket, key, %keeper, "dropped a copy left off placement to the trash");
                Ok(Ok(()))
            }
            Ok(false) => Ok(Err(reject_for(&StoreError::NotFound(fragment)))),
            Err(error) => Ok(Err(reject_for(&error))),
        }
    }

    /// Brings an upload's fragments back from the trash if the replicated
    /// metadata shows a version that uses them.
    async fn restore(
        &self,
        upload: UploadId,
        bucket: &str,
        key: &str,
    ) -> Result<Result<u64, Message>, PieceError> {
        let object = ObjectKeyDigest::of(bucket, key);
        let in_order = self.release_rules.order.lock(upload, object).await;
        if let Err(why) =
            may_restore(&self.release_rules, &self.metadata, bucket, key, upload).await
        {
            tracing::warn!(%upload, bucket, key, %why, "refused a restore");
            return Ok(Err(reject(
                RejectCode::Unauthorized,
                format!("restore refused: {why}"),
            )));
        }
        let store = self.store.clone();
        let now = (self.now_unix_ms)();
        let restored = blocking(move || {
            let _in_order = in_order;
            store.restore_upload(&upload, &object, now)
        })
        .await?;
        if let Ok(restored) = &restored
            && *restored > 0
        {
            tracing::info!(%upload, restored, "brought an upload's fragments back from the trash");
        }
        Ok(restored.map_err(|error| reject_for(&error)))
    }
}

impl Server {
    /// Locks the fragments of `uploads` written for `bucket`/`key` at least
    /// until the dates of `lock`, if `version` of the object states them in
    /// the replicated metadata; answers how many fragments of theirs are
    /// here. A lock that changes nothing here is answered without a look at
    /// the metadata (repair asks again on every pass).
    async fn lock_fragments(
        &self,
        mut uploads: Vec<UploadId>,
        bucket: &str,
        key: &str,
        version: VersionId,
        lock: FragmentLock,
    ) -> Result<Result<u64, Message>, PieceError> {
        uploads.sort_unstable();
        uploads.dedup();
        let object = ObjectKeyDigest::of(bucket, key);
        // In the order of the upload ids: two locks naming the same
        // uploads never wait on each other.
        let mut in_order = Vec::with_capacity(uploads.len());
        for upload in &uploads {
            in_order.push(self.release_rules.order.lock(*upload, object).await);
        }
        let store = self.store.clone();
        let asked = uploads.clone();
        let counted = blocking(move || {
            asked.iter().try_fold(Locked::default(), |total, upload| {
                let more = store.lock_changes(upload, &object, lock)?;
                Ok::<_, StoreError>(Locked {
                    changed: total.changed + more.changed,
                    fragments: total.fragments + more.fragments,
                })
            })
        });
        match counted.await? {
            Ok(Locked {
                changed: 0,
                fragments,
            }) => return Ok(Ok(fragments)),
            Ok(_) => {}
            Err(error) => return Ok(Err(reject_for(&error))),
        }
        let now = (self.now_unix_ms)();
        let checked = may_lock(
            &self.release_rules,
            &self.metadata,
            bucket,
            key,
            version,
            &uploads,
            lock,
            now,
        );
        if let Err(why) = checked.await {
            tracing::warn!(bucket, key, %version, %why, "refused a lock");
            return Ok(Err(reject(
                RejectCode::Unauthorized,
                format!("lock refused: {why}"),
            )));
        }
        let store = self.store.clone();
        let locked = blocking(move || {
            let _in_order = in_order;
            uploads.iter().try_fold(Locked::default(), |total, upload| {
                // A fragment a version under a lock uses is not left in
                // the trash (the check above found that version).
                if lock.holds(now) {
                    store.restore_upload(upload, &object, now)?;
                }
                let more = store.lock_upload(upload, &object, lock)?;
                Ok::<_, StoreError>(Locked {
                    changed: total.changed + more.changed,
                    fragments: total.fragments + more.fragments,
                })
            })
        })
        .await?;
        if let Ok(locked) = &locked {
            tracing::info!(bucket, key, %version, changed = locked.changed, compliance_until_unix_ms = lock.compliance_until_unix_ms, legal_hold_until_unix_ms = lock.legal_hold_until_unix_ms, "locked a version's fragments");
        }
        Ok(locked
            .map(|locked| locked.fragments)
            .map_err(|error| reject_for(&error)))
    }
}

/// This node's own store as one more peer: the gateway's exchanges with it
/// take the same checks and limits as a peer's, without a stream.
impl Server {
    pub(crate) async fn put_local(
        &self,
        id: FragmentId,
        bytes: &[u8],
        hold: Hold,
    ) -> Result<(), PieceError> {
        self.admit_put(&id, bytes.len() as u64, &hold)
            .map_err(|e| refused(&reject_for(&e)))?;
        let fragment =
            VerifiedFragment::new(id, bytes.to_vec()).map_err(|e| refused(&reject_for(&e)))?;
        self.keep(fragment, hold)
            .await
            .map_err(|e| refused(&reject_for(&e)))
    }

    pub(crate) async fn get_local(
        &self,
        id: FragmentId,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, PieceError> {
        // The store hashes every fragment it reads (and quarantines one
        // that does not match); a peer's answer is hashed again by `get`
        // because it crossed the network.
        let (_, bytes, _budget) = self
            .read(None, id, offset, length)
            .await?
            .map_err(|r| refused(&r))?;
        Ok(bytes)
    }

    pub(crate) async fn get_any_local(
        &self,
        ids: Vec<FragmentId>,
        offset: u64,
        length: u64,
    ) -> Result<(FragmentId, Vec<u8>), PieceError> {
        match self.first_live(ids).await? {
            Some(id) => Ok((id, self.get_local(id, offset, length).await?)),
            None => Err(PieceError::Rejected {
                code: RejectCode::NotFound,
                message: "none of the fragments asked for is held here".into(),
            }),
        }
    }

    pub(crate) async fn have_local(&self, ids: Vec<FragmentId>) -> Result<Vec<bool>, PieceError> {
        self.live(ids).await
    }

    pub(crate) async fn release_local(
        &self,
        upload: UploadId,
        bucket: &str,
        key: &str,
    ) -> Result<Released, PieceError> {
        self.release(upload, bucket, key)
            .await?
            .map_err(|r| refused(&r))
    }

    pub(crate) async fn drop_copy_local(
        &self,
        fragment: FragmentId,
        bucket: &str,
        key: &str,
        version: VersionId,
        keeper: NodeId,
    ) -> Result<(), PieceError> {
        self.drop_copy(fragment, bucket, key, version, keeper)
            .await?
            .map_err(|r| refused(&r))
    }

    pub(crate) async fn lock_local(
        &self,
        uploads: Vec<UploadId>,
        bucket: &str,
        key: &str,
        version: VersionId,
        lock: FragmentLock,
    ) -> Result<u64, PieceError> {
        self.lock_fragments(uploads, bucket, key, version, lock)
            .await?
            .map_err(|r| refused(&r))
    }

    pub(crate) async fn restore_local(
        &self,
        upload: UploadId,
        bucket: &str,
        key: &str,
    ) -> Result<u64, PieceError> {
        self.restore(upload, bucket, key)
            .await?
            .map_err(|r| refused(&r))
    }
}

/// Whether each segment is whole on the nodes placement takes for it, as
/// their have-answers say: one fragment per node, every fragment.
async fn whole_on_placed(
    metadata: &Metadata,
    upload: UploadId,
    object: ObjectKeyDigest,
    places: &[SegmentPlaces],
) -> Result<(), String> {
    // Every (segment, node) at once, under one deadline: a slow node costs
    // the check its deadline once, not once per segment.
    let asks = places.iter().enumerate().flat_map(|(s, segment)| {
        segment.placed.iter().map(move |node| async move {
            let stream = metadata.open_member_stream(node, PROTOCOL).await?;
            have_held(stream, upload, object, segment.fragments.clone())
                .await
                .map(|held| (s, held))
                .map_err(|e| format!("placed node {node} did not say what it holds: {e}"))
        })
    });
    let answers = tokio::time::timeout(KEEPER_SHOWS_WITHIN, futures::future::try_join_all(asks))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the placed nodes did not all say what they hold within {KEEPER_SHOWS_WITHIN:?}"
            ))
        })?;
    let mut held: Vec<Vec<Vec<bool>>> = vec![Vec::new(); places.len()];
    for (s, answer) in answers {
        held[s].push(answer);
    }
    for (segment, held) in places.iter().zip(&held) {
        if !segment.whole_on(held) {
            return Err(format!(
                "a segment of the fragment is not whole on the {} nodes placement takes for it",
                segment.placed.len()
            ));
        }
    }
    Ok(())
}

/// A have-reply: bit `i` (most significant first) set when `held[i]`.
fn have_reply(count: u32, held: &[bool]) -> Message {
    let mut bitmap = vec![0u8; held.len().div_ceil(8)];
    for (i, _) in held.iter().enumerate().filter(|(_, held)| **held) {
        bitmap[i / 8] |= 0x80 >> (i % 8);
    }
    Message::HaveReply { count, bitmap }
}

/// The error a caller sees for a reject message.
fn refused(answer: &Message) -> PieceError {
    match answer {
        Message::Reject { code, message } => PieceError::Rejected {
            code: *code,
            message: message.clone(),
        },
        other => unexpected(other),
    }
}

/// A whole fragment read is checked against its id, wherever it came from.
fn checked_read(
    id: FragmentId,
    offset: u64,
    total_len: u64,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, PieceError> {
    if offset == 0 && bytes.len() as u64 == total_len && FragmentId::of(&bytes) != id {
        return Err(PieceError::HashMismatch(id));
    }
    Ok(bytes)
}

/// The answer to a stream past the node's limits.
pub(crate) async fn answer_busy(stream: libp2p::Stream, why: &'static str) {
    let (_, mut write) = stream.split();
    let busy = Message::Reject {
        code: RejectCode::Busy,
        message: format!("{why}; retry"),
    };
    let _ = send(&mut write, &busy).await;
    let _ = write.close().await;
}

fn unexpected(message: &Message) -> PieceError {
    let name = match message {
        Message::Data(data) => format!("data ({} bytes)", data.len()),
        other => format!("{other:?}").chars().take(80).collect(),
    };
    PieceError::Unexpected(name)
}

async fn open_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    request: &Message,
) -> Result<
    (
        MessageReader<futures::io::ReadHalf<S>>,
        futures::io::WriteHalf<S>,
    ),
    PieceError,
> {
    let (read, mut write) = stream.split();
    send(&mut write, &hello()).await?;
    send(&mut write, request).await?;
    let mut reader = MessageReader::new(read, CLIENT_SILENCE);
    match reader.expect().await? {
        Message::Hello { .. } => Ok((reader, write)),
        Message::Reject { code, message } => Err(PieceError::Rejected { code, message }),
        other => Err(unexpected(&other)),
    }
}

/// How long a put whose body the holder stopped reading waits for the
/// holder's reason.
const REFUSAL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Puts a fragment on the peer at the other end of `stream`; returns once
/// the peer has acknowledged it durable.
pub async fn put<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    id: FragmentId,
    bytes: &[u8],
    hold: Hold,
) -> Result<(), PieceError> {
    let request = Message::PutFragment {
        id,
        length: bytes.len() as u64,
        hold,
    };
    let (mut reader, mut write) = open_exchange(stream, &request).await?;
    // A holder may refuse from the request alone (a bad hold, a length
    // above its limit) and stop reading: its answer then says why, better
    // than the write's error.
    let sent = async {
        send_data(&mut write, bytes).await?;
        write.flush().await.map_err(PieceError::from)
    }
    .await;
    let answer = match sent {
        Ok(()) => reader.expect().await?,
        Err(error) => match tokio::time::timeout(REFUSAL_WAIT, reader.expect()).await {
            Ok(Ok(refusal @ Message::Reject { .. })) => refusal,
            _ => return Err(error),
        },
    };
    let _ = write.close().await;
    match answer {
        Message::Ack { id: acked } if acked == id => Ok(()),
        Message::Reject { code, message } => Err(PieceError::Rejected { code, message }),
        other => Err(unexpected(&other)),
    }
}

/// Gets `length` bytes from `offset` of a fragment (`wire::WHOLE` for all);
/// a whole fragment is verified against its id.
pub async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    id: FragmentId,
    offset: u64,
    length: u64,
) -> Result<Vec<u8>, PieceError> {
    let request = Message::GetFragment { id, offset, length };
    let (reader, mut write) = open_exchange(stream, &request).await?;
    write.close().await?;
    read_fragment_answer(reader, &[id], offset, length)
        .await
        .map(|(_, bytes)| bytes)
}

/// Gets `length` bytes from `offset` of whichever of `ids` (fragments of
/// one segment) the peer holds; returns which, and the bytes (a whole
/// fragment verified against its id).
pub async fn get_any<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    ids: &[FragmentId],
    offset: u64,
    length: u64,
) -> Result<(FragmentId, Vec<u8>), PieceError> {
    let request = Message::GetAny {
        ids: ids.to_vec(),
        offset,
        length,
    };
    let (reader, mut write) = open_exchange(stream, &request).await?;
    write.close().await?;
    read_fragment_answer(reader, ids, offset, length).await
}

/// Reads a fragment-header naming one of `ids` and its data frames:
/// exactly what the request covers, a whole fragment hashed against its
/// id.
async fn read_fragment_answer<R: AsyncRead + Unpin>(
    mut reader: MessageReader<R>,
    ids: &[FragmentId],
    offset: u64,
    length: u64,
) -> Result<(FragmentId, Vec<u8>), PieceError> {
    let (id, total_len, declared) = match reader.expect().await? {
        Message::FragmentHeader {
            id: answered,
            total_len,
            length,
            ..
        } if ids.contains(&answered) => (answered, total_len, length),
        Message::Reject { code, message } => return Err(PieceError::Rejected { code, message }),
        other => return Err(unexpected(&other)),
    };
    // Exactly what the request covers: a peer that announces fewer bytes
    // (or a shorter fragment than it sends) would pass a whole read off
    // as a range, unhashed.
    if declared != length.min(total_len.saturating_sub(offset)) {
        return Err(PieceError::Unexpected(format!(
            "{declared} bytes announced for {length} bytes from {offset} of a {total_len}-byte fragment"
        )));
    }
    // Grown as the data arrives: the announced length is the peer's word.
    let mut bytes = Vec::with_capacity(declared.min(1 << 20) as usize);
    while (bytes.len() as u64) < declared {
        match reader.expect().await? {
            Message::Data(data) if bytes.len() as u64 + data.len() as u64 <= declared => {
                bytes.extend_from_slice(&data)
            }
            other => return Err(unexpected(&other)),
        }
    }
    checked_read(id, offset, total_len, bytes).map(|bytes| (id, bytes))
}

/// Asks `fragment` of the keeper a drop names: the whole fragment, if its
/// own map places it there (wire.md, "Drop").
pub async fn keep_check<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    fragment: FragmentId,
    bucket: &str,
    key: &str,
    version: VersionId,
    upload: UploadId,
    len: u64,
) -> Result<Vec<u8>, PieceError> {
    let request = Message::KeepCheck {
        fragment,
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        version,
        upload,
    };
    let (reader, mut write) = open_exchange(stream, &request).await?;
    write.close().await?;
    read_fragment_answer(reader, &[fragment], 0, len)
        .await
        .map(|(_, bytes)| bytes)
}

/// Asks which of `ids` the peer holds live; the answer is in `ids` order.
pub async fn have<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    ids: Vec<FragmentId>,
) -> Result<Vec<bool>, PieceError> {
    have_answer(stream, Message::HaveQuery { ids }).await
}

/// Asks which of `ids` the peer holds live for `upload` and `object`; the
/// answer is in `ids` order.
pub async fn have_held<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    upload: UploadId,
    object: ObjectKeyDigest,
    ids: Vec<FragmentId>,
) -> Result<Vec<bool>, PieceError> {
    have_answer(
        stream,
        Message::HaveHeld {
            upload,
            object,
            ids,
        },
    )
    .await
}

async fn have_answer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    query: Message,
) -> Result<Vec<bool>, PieceError> {
    let asked = match &query {
        Message::HaveQuery { ids } | Message::HaveHeld { ids, .. } => ids.len(),
        other => return Err(unexpected(other)),
    };
    let (mut reader, mut write) = open_exchange(stream, &query).await?;
    write.close().await?;
    match reader.expect().await? {
        Message::HaveReply { count, bitmap }
            if count as usize == asked && bitmap.len() == asked.div_ceil(8) =>
        {
            Ok((0..asked)
                .map(|i| bitmap[i / 8] & (0x80 >> (i % 8)) != 0)
                .collect())
        }
        Message::Reject { code, message } => Err(PieceError::Rejected { code, message }),
        other => Err(unexpected(&other)),
    }
}

/// Asks the peer to move the fragments of `upload` to its trash.
pub async fn release<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    upload: UploadId,
    bucket: &str,
    key: &str,
) -> Result<Released, PieceError> {
    let request = Message::Release {
        upload,
        bucket: bucket.to_owned(),
        key: key.to_owned(),
    };
    ask_once(stream, &request, |answer| match answer {
        Message::Released { trashed, held } => Some(Released {
            trashed: *trashed,
            held: *held,
        }),
        _ => None,
    })
    .await
}

/// Asks the peer to bring the fragments of `upload` back from its trash.
pub async fn restore<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    upload: UploadId,
    bucket: &str,
    key: &str,
) -> Result<u64, PieceError> {
    let request = Message::Restore {
        upload,
        bucket: bucket.to_owned(),
        key: key.to_owned(),
    };
    ask_once(stream, &request, |answer| match answer {
        Message::Restored { restored } => Some(*restored),
        _ => None,
    })
    .await
}

/// Asks the peer to lock the fragments of `uploads` as `version` states.
pub async fn lock_fragments<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    uploads: &[UploadId],
    bucket: &str,
    key: &str,
    version: VersionId,
    lock: FragmentLock,
) -> Result<u64, PieceError> {
    let request = Message::LockFragments {
        uploads: uploads.to_vec(),
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        version,
        lock,
    };
    ask_once(stream, &request, |answer| match answer {
        Message::FragmentsLocked { fragments } => Some(*fragments),
        _ => None,
    })
    .await
}

/// Asks the peer to move its copy of `fragment`, left off placement, to
/// its trash; `keeper` holds the placed one.
pub async fn drop_copy<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    fragment: FragmentId,
    bucket: &str,
    key: &str,
    version: VersionId,
    keeper: NodeId,
) -> Result<(), PieceError> {
    let request = Message::DropCopy {
        fragment,
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        version,
        keeper,
    };
    ask_once(stream, &request, |answer| match answer {
        Message::Dropped => Some(()),
        _ => None,
    })
    .await
}

/// Sends `request`, closes the sending side, and takes the one answer:
/// what `expected` makes of it, a reject as an error, anything else as
/// unexpected.
async fn ask_once<S: AsyncRead + AsyncWrite + Unpin, T>(
    stream: S,
    request: &Message,
    expected: impl FnOnce(&Message) -> Option<T>,
) -> Result<T, PieceError> {
    let (mut reader, mut write) = open_exchange(stream, request).await?;
    write.close().await?;
    let answer = reader.expect().await?;
    if let Some(value) = expected(&answer) {
        return Ok(value);
    }
    match answer {
        Message::Reject { code, message } => Err(PieceError::Rejected { code, message }),
        other => Err(unexpected(&other)),
    }
}

/// Asks the peer for its status (its store's part only `with_store`).
pub async fn status<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    with_store: bool,
) -> Result<NodeStatus, PieceError> {
    let query = Message::StatusQuery { store: with_store };
    let (mut reader, mut write) = open_exchange(stream, &query).await?;
    write.close().await?;
    match reader.expect().await? {
        Message::StatusReply(status) => Ok(*status),
        Message::Reject { code, message } => Err(PieceError::Rejected { code, message }),
        other => Err(unexpected(&other)),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A peer that answers with bytes written beforehand and takes
    /// whatever it is sent.
    struct Scripted(futures::io::Cursor<Vec<u8>>);

    impl AsyncRead for Scripted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Scripted {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn answering(header: Message, data: &[u8]) -> Scripted {
        let mut out = Vec::new();
        hello().encode(&mut out).unwrap();
        header.encode(&mut out).unwrap();
        if !data.is_empty() {
            wire::encode_data_header(data.len(), &mut out).unwrap();
            out.extend_from_slice(data);
        }
        Scripted(futures::io::Cursor::new(out))
    }

    /// A whole read asked of a peer that claims a longer fragment than it
    /// sends is refused: it would otherwise be taken unhashed (a drop's
    /// keeper "showing" a fragment it does not hold).
    #[tokio::test]
    async fn a_whole_read_answered_short_is_refused_and_a_true_one_is_hashed() {
        let bytes = b"the fragment the keeper should hold".to_vec();
        let id = FragmentId::of(&bytes);
        let short = answering(
            Message::FragmentHeader {
                id,
                total_len: bytes.len() as u64,
                offset: 0,
                length: 0,
            },
            &[],
        );
        let refusal = get(short, id, 0, bytes.len() as u64).await.unwrap_err();
        assert!(matches!(refusal, PieceError::Unexpected(_)), "{refusal}");
        let whole = answering(
            Message::FragmentHeader {
                id,
                total_len: bytes.len() as u64,
                offset: 0,
                length: bytes.len() as u64,
            },
            &bytes,
        );
        assert_eq!(get(whole, id, 0, u64::MAX).await.unwrap(), bytes);
        let forged = answering(
            Message::FragmentHeader {
                id,
                total_len: 4,
                offset: 0,
                length: 4,
            },
            b"fake",
        );
        assert!(matches!(
            get(forged, id, 0, u64::MAX).await,
            Err(PieceError::HashMismatch(_))
        ));
    }
}
