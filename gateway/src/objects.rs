//! The data path (spec/gateway.md, "Data path"): a PUT streams plaintext
//! through MD5, chunked encryption and erasure coding, pushes each
//! segment's fragments in parallel to the nodes placement picks, signs the
//! manifest and commits it with the version row in one quorum write. A GET
//! resolves the version, fetches any `k` fragments of each segment it
//! touches, rebuilds, decrypts and streams. Memory is a few segments per
//! request, whatever the object's size.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cairn_model::fragment_locks;
use cairn_model::heads::{CommitRules, NewLock, ObjectIndex, WriteCondition, read_manifest};
use cairn_model::kms::{DataKeys, Kms};
use cairn_model::rows::{degraded_row, register, upload_row};
use cairn_model::uploads::Uploads;
use cairn_node::clock::now_unix_ms;
use cairn_node::clock::random_bytes;
use cairn_node::swarm::NodeHandle;
use cairn_protocol::encryption::{RangePlan, SecretKey, part_stream_key};
use cairn_protocol::erasure::{EncodedSegment, Scheme, SegmentLayout, reconstruct};
use cairn_protocol::ids::{FragmentId, NodeId, UploadId};
use cairn_protocol::manifest::{Manifest, Part, PartKeys, SegmentRef};
use cairn_protocol::membership::SignedMap;
use cairn_protocol::meta::RowKey;
use cairn_protocol::pipeline::PutPipeline;
use cairn_protocol::placement::{Placer, segment_placement_key};
use cairn_protocol::records::{DegradedRecord, UploadRecord, Versioning};
use cairn_protocol::version::{ObjectVersion, RetentionMode, StoredHeaders, VersionBody};
use cairn_protocol::wire::{Hold, ObjectKeyDigest};
use futures::stream::{FuturesUnordered, StreamExt};
use md5::Digest;
use s3s::checksum::ChecksumHasher;
use tokio::sync::mpsc;

use crate::checksum::{Algorithm, ChecksumRequest};
use crate::error::{GatewayError, GatewayResult};

/// Objects up to this size are stored as `1 + m` copies rather than
/// erasure-coded: one fragment per segment is cheaper to write and read.
pub const SMALL_OBJECT_BYTES: u64 = 256 << 10;
/// The largest single PUT (and part), as in S3.
pub const MAX_PUT_BYTES: u64 = 5 << 30;
/// Plaintext handed to the encoder at once (one hop to a blocking thread).
const BATCH_BYTES: usize = 1 << 20;
/// Segments being pushed at once by one PUT.
const SEGMENTS_IN_FLIGHT: usize = 2;
/// Segments fetched ahead of the one being sent by one GET.
const SEGMENTS_AHEAD: usize = 2;
/// When a fragment fetch takes longer than this, one more is started.
const SPARE_AFTER: Duration = Duration::from_millis(1500);
/// How long a read waits before asking the placed nodes that failed again.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Spare nodes asked for a fragment its placed node does not give, before
/// the DHT is.
const MAX_SPARES_ASKED: usize = 3;

/// What a PUT writes.
pub struct NewObject {
    pub bucket: String,
    pub bucket_key_id: String,
    pub key: String,
    pub headers: StoredHeaders,
    /// The body's length as announced (Content-Length or the decoded length).
    pub length: u64,
    pub content_md5: Option<[u8; 16]>,
    pub checksum: Option<ChecksumRequest>,
    pub condition: WriteCondition,
    /// How the object is versioned and locked.
    pub rules: WriteRules,
}

/// How a new object is versioned and locked (spec/versioning.md): known
/// when the write starts, or still being read from the bucket's settings
/// while the body is stored (one round trip off a small PUT's time). A
/// write that asks for a lock reads them first, so that a refusal stores
/// nothing; without one, what is read cannot refuse.
pub enum WriteRules {
    Known(Versioning, NewLock),
    Reading(SettingsRead),
}

/// The read of a bucket's settings under way, stopped if the write that
/// started it ends first.
pub struct SettingsRead(pub tokio::task::JoinHandle<GatewayResult<(Versioning, NewLock)>>);

impl Drop for SettingsRead {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl WriteRules {
    async fn settle(self) -> GatewayResult<(Versioning, NewLock)> {
        match self {
            WriteRules::Known(versioning, lock) => Ok((versioning, lock)),
            WriteRules::Reading(mut reading) => (&mut reading.0).await.map_err(|e| {
                GatewayError::Internal(format!("reading the bucket's settings: {e}"))
            })?,
        }
    }
}

/// A body to store: where it goes, how it is sealed and what it must match.
pub(crate) struct BodyWrite<'a> {
    pub(crate) bucket: &'a str,
    pub(crate) key: &'a str,
    pub(crate) bucket_key_id: &'a str,
    pub(crate) scheme: Scheme,
    /// The key each attempt's stream key derives from: the object's data
    /// key, or the multipart upload's.
    pub(crate) data_key: &'a SecretKey,
    /// 0 for an object's body, the part number for a part.
    pub(crate) stream_id: u32,
    /// As announced (Content-Length or the decoded length).
    pub(crate) length: u64,
    pub(crate) content_md5: Option<[u8; 16]>,
    pub(crate) checksum: Option<&'a ChecksumRequest>,
}

/// A body stored durably under its own upload id, its digests checked.
pub(crate) struct StoredBody {
    pub(crate) upload: UploadId,
    /// The intent row, cleared by whatever commits the body.
    pub(crate) intent: RowKey,
    pub(crate) segments: Vec<SegmentRef>,
    /// The body's MD5, quoted, as S3 ETags are.
    pub(crate) etag: String,
    /// The checksum the client asked for, verified.
    pub(crate) checksum: Option<(Algorithm, String)>,
    /// When the write must have committed.
    pub(crate) deadline_unix_ms: u64,
}

/// An object to commit: its parts, how they were sealed, its headers and
/// the condition its head write must meet.
pub(crate) struct ObjectCommit<'a> {
    pub(crate) bucket: &'a str,
    pub(crate) key: &'a str,
    /// The upload the object's manifest names (a PUT's attempt, or the
    /// multipart upload).
    pub(crate) upload: UploadId,
    pub(crate) scheme: Scheme,
    pub(crate) keys: &'a DataKeys,
    pub(crate) etag: String,
    pub(crate) parts: Vec<Part>,
    pub(crate) part_keys: PartKeys,
    pub(crate) headers: StoredHeaders,
    /// The intent row the commit clears.
    pub(crate) intent: RowKey,
    pub(crate) condition: &'a WriteCondition,
    pub(crate) deadline_unix_ms: u64,
    pub(crate) versioning: Versioning,
    pub(crate) lock: NewLock,
}

/// An object opened for reading: its manifest and data key.
pub struct OpenObject {
    pub manifest: Manifest,
    data_key: Arc<SecretKey>,
}

/// The data path of one gateway. Cheap to clone.
#[derive(Clone)]
pub struct ObjectStore {
    node: NodeHandle,
    kms: Kms,
    index: ObjectIndex,
}

impl ObjectStore {
    pub fn new(node: NodeHandle, kms: Kms, index: ObjectIndex) -> Self {
        Self { node, kms, index }
    }

    /// The heads, versions and manifests the data path commits to.
    pub fn index(&self) -> &ObjectIndex {
        &self.index
    }

    /// The multipart uploads' records.
    pub fn uploads(&self) -> Uploads<'_> {
        self.index.uploads()
    }

    pub(crate) fn kms(&self) -> &Kms {
        &self.kms
    }

    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    pub(crate) fn map(&self) -> GatewayResult<SignedMap> {
        self.node.cluster_map().ok_or(GatewayError::NoMap)
    }

    /// The scheme an object of `length` bytes is stored with: the map's, or
    /// copies with the same tolerance for small objects.
    fn scheme_for(map: &SignedMap, length: u64) -> GatewayResult<Scheme> {
        if length <= SMALL_OBJECT_BYTES && map.scheme.parity() > 0 {
            return Scheme::new(1, map.scheme.parity() as u8)
                .map_err(|e| GatewayError::Internal(e.to_string()));
        }
        Ok(map.scheme)
    }

    pub(crate) fn placer(map: &SignedMap, scheme: Scheme) -> GatewayResult<Placer> {
        Placer::new(&map.map, scheme, map.tolerance)
            .map_err(|e| GatewayError::Unavailable(format!("placement: {e}")))
    }

    /// Stores an object from `body` and commits it. Nothing is visible
    /// unless every byte arrived, matched its digests and is durable.
    /// Stores and commits a new object; the answer says how the bucket
    /// versioned it.
    pub async fn put<S, E>(
        &self,
        object: NewObject,
        body: S,
    ) -> GatewayResult<(ObjectVersion, Versioning)>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        check_body_length(object.length)?;
        let map = self.map()?;
        let scheme = Self::scheme_for(&map, object.length)?;
        let keys = DataKeys {
            bucket_key_id: object.bucket_key_id.clone(),
            bucket_key: self.kms.key(&object.bucket_key_id).await?,
            data_key: SecretKey::from_bytes(random_bytes()),
        };
        let stored = self
            .store_body(
                BodyWrite {
                    bucket: &object.bucket,
                    key: &object.key,
                    bucket_key_id: &object.bucket_key_id,
                    scheme,
                    data_key: &keys.data_key,
                    stream_id: 0,
                    length: object.length,
                    content_md5: object.content_md5,
                    checksum: object.checksum.as_ref(),
                },
                body,
            )
            .await?;
        let mut headers = object.headers;
        if let Some((algorithm, value)) = &stored.checksum {
            headers = with_checksum(headers, *algorithm, value.clone(), "FULL_OBJECT")?;
        }
        let (versioning, lock) = object.rules.settle().await?;
        let committed = self
            .commit_object(ObjectCommit {
                bucket: &object.bucket,
                key: &object.key,
                upload: stored.upload,
                scheme,
                keys: &keys,
                etag: stored.etag,
                parts: vec![Part {
                    number: 0,
                    upload: stored.upload,
                    plaintext_len: object.length,
                    segments: stored.segments,
                }],
                part_keys: PartKeys::PerAttempt,
                headers,
                intent: stored.intent,
                condition: &object.condition,
                deadline_unix_ms: stored.deadline_unix_ms,
                versioning,
                lock,
            })
            .await?;
        Ok((committed, versioning))
    }

    /// The write path every body takes, an object's or a part's: its
    /// intent recorded under a fresh upload id before any fragment exists
    /// (so that fragments of a write that never commits can be found and
    /// collected), then streamed through MD5, the checksum asked for,
    /// encryption under that attempt's own stream key and erasure coding,
    /// each segment pushed where placement says; then the digests are
    /// checked. What it returns is durable but invisible until committed.
    pub(crate) async fn store_body<S, E>(
        &self,
        write: BodyWrite<'_>,
        body: S,
    ) -> GatewayResult<StoredBody>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        check_body_length(write.length)?;
        let map = self.map()?;
        let placer = Arc::new(Self::placer(&map, write.scheme)?);
        let layout = SegmentLayout::with_defaults(write.scheme);
        let metadata = self.node.metadata();
        let upload = UploadId(random_bytes());
        let started = now_unix_ms();
        let intent = UploadRecord {
            upload,
            started_unix_ms: started,
            multipart: false,
            scheme: write.scheme,
            bucket_key_id: write.bucket_key_id.to_owned(),
            wrapped_key: Vec::new(),
            headers: StoredHeaders::default(),
        };
        let intent_row = upload_row(write.bucket, write.key, &upload);
        metadata
            .write(vec![(
                intent_row.clone(),
                register(Some(intent.encode()), metadata.timestamp()),
            )])
            .await?;
        let deadline = self.index.write_deadline(started);
        let stream = StreamPut {
            store: self,
            placer,
            target: PushTarget {
                bucket: write.bucket,
                key: write.key,
                upload,
            },
            deadline_unix_ms: deadline,
        };
        // No two attempts share a stream key: each derives its own from
        // its upload id (spec/encryption.md, "Nonces").
        let streamed = stream
            .run(
                PutPipeline::new(
                    &part_stream_key(write.data_key, &upload),
                    write.stream_id,
                    layout,
                ),
                write.length,
                write.checksum.map(ChecksumRequest::hasher),
                body,
            )
            .await?;
        if write
            .content_md5
            .is_some_and(|expected| expected != streamed.md5)
        {
            return Err(GatewayError::BadDigest);
        }
        let checksum = match (write.checksum, streamed.checksum) {
            (Some(request), Some(hasher)) => Some((request.algorithm, request.verify(hasher)?)),
            _ => None,
        };
        if now_unix_ms() > deadline {
            return Err(self.index.deadline_error().into());
        }
        Ok(StoredBody {
            upload,
            intent: intent_row,
            segments: streamed.segments,
            etag: format!("\"{}\"", cairn_protocol::to_hex(&streamed.md5)),
            checksum,
            deadline_unix_ms: deadline,
        })
    }

    /// Signs the manifest of an object made of `parts` and commits it
    /// (ObjectIndex::commit): the last step of a PUT, a copy and a
    /// multipart completion alike.
    pub(crate) async fn commit_object(
        &self,
        object: ObjectCommit<'_>,
    ) -> GatewayResult<ObjectVersion> {
        let version = self.index.new_version();
        let manifest = Manifest {
            part_keys: object.part_keys,
            writer: self.node.node_id(),
            created_unix_ms: now_unix_ms(),
            bucket: object.bucket.to_owned(),
            key: object.key.to_owned(),
            version,
            upload: object.upload,
            layout: SegmentLayout::with_defaults(object.scheme),
            encryption: object.keys.envelope(object.bucket, object.key, version),
            etag: object.etag,
            parts: object.parts,
        };
        let lock = object.lock;
        let on_nodes = (lock.retention.mode == RetentionMode::Compliance
            && lock.retention.retain_until_unix_ms > now_unix_ms()
            || lock.legal_hold)
            .then(|| manifest.clone());
        let committed = self
            .index
            .commit(
                manifest,
                object.keys,
                object.headers,
                object.intent,
                CommitRules {
                    condition: object.condition,
                    deadline_unix_ms: object.deadline_unix_ms,
                    created: None,
                    versioning: object.versioning,
                    lock,
                },
            )
            .await?;
        if let Some(manifest) = on_nodes {
            self.lock_on_nodes(&committed, Some(&manifest)).await;
        }
        Ok(committed)
    }

    /// Locks the fragments of `version` on the nodes placement takes for
    /// them, as it states (model fragment_locks). The version is committed
    /// and its lock decided: a node that does not confirm within a few
    /// seconds is logged, and repair locks it on its next pass.
    pub async fn lock_on_nodes(&self, version: &ObjectVersion, manifest: Option<&Manifest>) {
        let (bucket, key) = (&version.bucket, &version.key);
        let read;
        let manifest = match (manifest, &version.body) {
            (Some(manifest), _) => manifest,
            (None, VersionBody::Data { manifest: id, .. }) => {
                match read_manifest(self.node.metadata(), bucket, id).await {
                    Ok(Some(manifest)) => {
                        read = manifest;
                        &read
                    }
                    Ok(None) => {
                        tracing::warn!(bucket, key, %id, "a locked version's manifest is missing; its fragments are not locked on the nodes");
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(bucket, key, %error, "a locked version's manifest could not be read; repair locks its fragments");
                        return;
                    }
                }
            }
            (None, VersionBody::DeleteMarker) => return,
        };
        let wait = fragment_locks::GATEWAY_LOCK_WAIT;
        match fragment_locks::spread(&self.node, version, manifest, wait).await {
            Ok(spread) if spread.not_confirmed.is_empty() => {
                tracing::debug!(
                    bucket,
                    key,
                    fragments = spread.fragments,
                    "locked a version's fragments on the nodes"
                );
            }
            Ok(spread) => {
                tracing::warn!(bucket, key, not_confirmed = ?spread.not_confirmed, "some nodes did not lock a version's fragments; repair asks them again");
            }
            Err(error) => {
                tracing::warn!(bucket, key, %error, "a version's fragments were not locked on the nodes; repair asks them again");
            }
        }
    }

    /// Pushes one segment's fragments to the nodes placement picks for it.
    /// A node that fails is replaced by the next of the ranking whose site
    /// still has room under the per-site cap, so that replacements keep
    /// the placement's promise. The segment is kept only if the fragments
    /// stored survive what the map promises (the loss of any one site plus
    /// `extra_nodes` nodes); then, if some are missing, it is recorded for
    /// repair before this returns. Otherwise the write fails, 503, and the
    /// collector releases what was stored with the rest of the upload.
    async fn push_segment(
        &self,
        placer: &Placer,
        target: &PushTarget<'_>,
        segment: Arc<EncodedSegment>,
    ) -> GatewayResult<SegmentRef> {
        let ids = segment.fragment_ids().to_vec();
        let key = segment_placement_key(&ids);
        let placed = placer.place(&key);
        let ranking = placer.rank(&key);
        // Spares in ranking order; one skipped now (its site full) may fit
        // a later replacement, so only the one taken leaves the list.
        let mut spares: Vec<NodeId> = ranking
            .into_iter()
            .filter(|n| !placed.contains(n))
            .collect();
        // Fragments per site that are stored or on their way.
        let mut per_site: HashMap<usize, usize> = HashMap::new();
        for node in &placed {
            if let Some(site) = placer.site_of(node) {
                *per_site.entry(site).or_default() += 1;
            }
        }
        let signing = self.node.identity().signing_key();
        let put = |index: usize, to: NodeId| {
            let segment = segment.clone();
            let id = ids[index];
            let hold = Hold::sign(
                signing,
                &id,
                target.upload,
                ObjectKeyDigest::of(target.bucket, target.key),
                // A put's hold asks no retention: Object Lock reaches the
                // fragments once the version is committed (lock_on_nodes).
                0,
            );
            async move {
                let result = self
                    .node
                    .put_fragment(&to, id, segment.fragment(index), hold)
                    .await;
                (index, to, result)
            }
        };
        let mut pending: FuturesUnordered<_> =
            placed.iter().enumerate().map(|(i, n)| put(i, *n)).collect();
        let mut holders: Vec<Option<NodeId>> = vec![None; ids.len()];
        let mut failures = Vec::new();
        while let Some((index, to, result)) = pending.next().await {
            match result {
                Ok(()) => holders[index] = Some(to),
                Err(error) => {
                    tracing::debug!(%to, %error, index, "fragment push failed; trying another node");
                    failures.push(format!("{to}: {error}"));
                    if let Some(site) = placer.site_of(&to) {
                        *per_site.entry(site).or_default() -= 1;
                    }
                    let room = |node: &NodeId| {
                        placer.site_of(node).is_some_and(|site| {
                            per_site.get(&site).copied().unwrap_or(0) < placer.site_cap()
                        })
                    };
                    if let Some(position) = spares.iter().position(room) {
                        let next = spares.remove(position);
                        if let Some(site) = placer.site_of(&next) {
                            *per_site.entry(site).or_default() += 1;
                        }
                        pending.push(put(index, next));
                    }
                }
            }
        }
        let stored: Vec<NodeId> = holders.iter().flatten().copied().collect();
        let scheme = placer.scheme();
        if !placer.survives(&stored) {
            return Err(GatewayError::Unavailable(format!(
                "{} of {} fragments of a segment stored, which would not survive the loss of a site: {}",
                stored.len(),
                scheme.total(),
                failures.join("; ")
            )));
        }
        if stored.len() < scheme.total() {
            let missing: Vec<u8> = holders
                .iter()
                .enumerate()
                .filter(|(_, holder)| holder.is_none())
                .map(|(index, _)| index as u8)
                .collect();
            tracing::warn!(
                stored = stored.len(),
                total = scheme.total(),
                "segment stored with reduced redundancy; recorded for repair"
            );
            let metadata = self.node.metadata();
            let record = DegradedRecord {
                since_unix_ms: now_unix_ms(),
                fragments: ids.clone(),
                missing,
            };
            metadata
                .write(vec![(
                    degraded_row(target.bucket, target.key, &target.upload, &key),
                    register(Some(record.encode()), metadata.timestamp()),
                )])
                .await?;
        }
        Ok(SegmentRef {
            ciphertext_len: segment.segment_len() as u32,
            fragments: ids,
        })
    }

    /// Reads and checks the manifest of `version` and unwraps its data key.
    pub async fn open(&self, version: &ObjectVersion) -> GatewayResult<OpenObject> {
        let VersionBody::Data { manifest: id, .. } = &version.body else {
            return Err(GatewayError::NoSuchKey);
        };
        let manifest = read_manifest(self.node.metadata(), &version.bucket, id)
            .await?
            .ok_or_else(|| GatewayError::Corrupt(format!("manifest {id} is missing")))?;
        if (&manifest.bucket, &manifest.key, manifest.version)
            != (&version.bucket, &version.key, version.version)
        {
            return Err(GatewayError::Corrupt(format!(
                "manifest {id} belongs to another object"
            )));
        }
        let data_key = DataKeys::of_manifest(&self.kms, &manifest).await?.data_key;
        Ok(OpenObject {
            manifest,
            data_key: Arc::new(data_key),
        })
    }

    /// Streams plaintext bytes `range` of an opened object. Segments are
    /// fetched a few ahead of the one being sent; the stream ends with an
    /// error (and the client sees a cut body) if a segment cannot be read.
    pub fn read(
        &self,
        object: OpenObject,
        range: Range<u64>,
    ) -> mpsc::Receiver<Result<Bytes, std::io::Error>> {
        let (sender, receiver) = mpsc::channel(2);
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(error) = store.send_range(&object, range, &sender).await {
                tracing::warn!(
                    bucket = %object.manifest.bucket,
                    key = %object.manifest.key,
                    %error,
                    "object read failed"
                );
                let _ = sender
                    .send(Err(std::io::Error::other(error.to_string())))
                    .await;
            }
        });
        receiver
    }

    async fn send_range(
        &self,
        object: &OpenObject,
        range: Range<u64>,
        sender: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> GatewayResult<()> {
        let manifest = &object.manifest;
        let layout = manifest.layout;
        let map = self.map()?;
        let placer = Arc::new(Self::placer(&map, layout.scheme)?);
        let own = self.node.node_id();
        let own_site = map.map.nodes.iter().find(|n| n.id == own).map(|n| &n.site);
        let same_site: HashSet<NodeId> = map
            .map
            .nodes
            .iter()
            .filter(|n| Some(&n.site) == own_site)
            .map(|n| n.id)
            .collect();
        // Asked once per read: deriving a peer id from a node id costs a
        // curve-point decompression.
        let reachable: HashSet<NodeId> = map
            .map
            .nodes
            .iter()
            .filter(|n| n.id == own || self.node.is_member(&n.id))
            .map(|n| n.id)
            .collect();
        let peers = ReadPeers {
            same_site,
            reachable,
            slow: Mutex::new(HashSet::new()),
        };
        let segment_bytes = layout.segment_bytes() as u64;
        let mut part_start = 0u64;
        for part in &manifest.parts {
            let part_end = part_start + part.plaintext_len;
            let start = range.start.max(part_start);
            let end = range.end.min(part_end);
            if start >= end {
                part_start = part_end;
                continue;
            }
            let plan = RangePlan::new(
                layout.chunk_size,
                part.plaintext_len,
                start - part_start..end - part_start,
            )
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
            let part_key = manifest.stream_key(&object.data_key, part);
            let mut decryptor = plan.decryptor(&part_key, part.number, layout.chunk_size);
            let cipher = plan.ciphertext.clone();
            let first = (cipher.start / segment_bytes) as usize;
            let last = cipher.end.div_ceil(segment_bytes) as usize;
            let fetches = futures::stream::iter(first..last)
                .map(|index| {
                    let placer = placer.clone();
                    let segment = &part.segments[index];
                    let peers = &peers;
                    async move {
                        self.fetch_segment(&placer, peers, part.upload, segment)
                            .await
                            .map(|bytes| (index, bytes))
                    }
                })
                .buffered(SEGMENTS_AHEAD);
            futures::pin_mut!(fetches);
            while let Some(fetched) = fetches.next().await {
                let (index, bytes) = fetched?;
                let segment_start = index as u64 * segment_bytes;
                let from = cipher.start.max(segment_start) - segment_start;
                let to = cipher.end.min(segment_start + bytes.len() as u64) - segment_start;
                let mut plaintext = Vec::with_capacity((to - from) as usize);
                decryptor
                    .update(&bytes[from as usize..to as usize], &mut plaintext)
                    .map_err(|e| GatewayError::Corrupt(format!("segment {index}: {e}")))?;
                if !plaintext.is_empty() && sender.send(Ok(Bytes::from(plaintext))).await.is_err() {
                    return Ok(()); // The client went away.
                }
            }
            let mut tail = Vec::new();
            decryptor
                .finish(&mut tail)
                .map_err(|e| GatewayError::Corrupt(e.to_string()))?;
            if !tail.is_empty() && sender.send(Ok(Bytes::from(tail))).await.is_err() {
                return Ok(());
            }
            part_start = part_end;
        }
        Ok(())
    }

    /// Reads the `k` fragments a segment needs and decodes it. A fragment
    /// belongs on any node placement takes for the segment (spec/
    /// placement.md, "Fragment indexes": a map change moves only what
    /// nodes leaving the set held), so each node is asked for whichever
    /// of the segment's fragments it holds (get-any). Placed nodes first
    /// (connected ones, this node, then its site, those written a data
    /// fragment first), a spare request when one is slow, the placed nodes
    /// that failed once more, then spare nodes of the ranking (where a
    /// write's hand-off goes), then the upload's providers in the DHT.
    async fn fetch_segment(
        &self,
        placer: &Placer,
        peers: &ReadPeers,
        upload: UploadId,
        segment: &SegmentRef,
    ) -> GatewayResult<Vec<u8>> {
        let ReadPeers {
            same_site,
            reachable,
            slow,
        } = peers;
        let was_slow = slow.lock().expect("slow peers lock").clone();
        let scheme = placer.scheme();
        let segment_len = segment.ciphertext_len as usize;
        let fragment_len = scheme.fragment_len(segment_len) as u64;
        let placement_key = segment_placement_key(&segment.fragments);
        let placed = placer.place(&placement_key);
        let own = self.node.node_id();
        let mut order: Vec<usize> = (0..placed.len()).collect();
        // Nodes this one is connected to first: asking a stopped node costs
        // a membership wait before it fails.
        order.sort_by_key(|&i| {
            let node = &placed[i];
            (
                !reachable.contains(node),
                was_slow.contains(node),
                *node != own,
                !same_site.contains(node),
                i >= scheme.data(),
                i,
            )
        });
        let mut queue: std::collections::VecDeque<NodeId> =
            order.into_iter().map(|i| placed[i]).collect();
        let mut spares = placer
            .rank(&placement_key)
            .into_iter()
            .filter(|n| !placed.contains(n) && reachable.contains(n))
            .take(MAX_SPARES_ASKED * scheme.parity().max(1))
            .collect::<Vec<_>>()
            .into_iter();
        let mut asked: HashSet<NodeId> = HashSet::new();
        // Nodes asked and not answered yet: those still silent when a
        // spare is asked are asked last for the rest of the read.
        let waiting: Mutex<HashSet<NodeId>> = Mutex::new(HashSet::new());
        let ids = segment.fragments.as_slice();
        // What to ask `node` for: the fragments not read yet, the one it
        // was written first (a node holding a stray copy of another one
        // still answers with its own), each id once (padding fragments
        // can share one).
        let wanted_for = |node: &NodeId, got: &[(usize, Vec<u8>)]| -> Vec<FragmentId> {
            let unread = |i: &usize| !got.iter().any(|(g, _)| g == i);
            let written = placed.iter().position(|p| p == node).filter(unread);
            let mut wanted: Vec<FragmentId> = Vec::with_capacity(ids.len());
            for index in written.into_iter().chain((0..ids.len()).filter(unread)) {
                if !wanted.contains(&ids[index]) {
                    wanted.push(ids[index]);
                }
            }
            wanted
        };
        let fetch = |node: NodeId, wanted: Vec<FragmentId>| {
            waiting.lock().expect("waiting lock").insert(node);
            let waiting = &waiting;
            async move {
                let result = self
                    .node
                    .get_any_fragment(&node, &wanted, 0, fragment_len)
                    .await;
                waiting.lock().expect("waiting lock").remove(&node);
                (node, result)
            }
        };
        let mut running = FuturesUnordered::new();
        let mut got: Vec<(usize, Vec<u8>)> = Vec::with_capacity(scheme.data());
        let mut ask =
            |node: NodeId, got: &[(usize, Vec<u8>)], running: &mut FuturesUnordered<_>| {
                if asked.insert(node) {
                    running.push(fetch(node, wanted_for(&node, got)));
                }
            };
        for _ in 0..scheme.data() {
            if let Some(node) = queue.pop_front() {
                ask(node, &got, &mut running);
            }
        }
        let mut failed: Vec<NodeId> = Vec::new();
        // Asks of one node again, each for fewer fragments (those still
        // unread): at most one per fragment.
        let mut asked_again: HashMap<NodeId, usize> = HashMap::new();
        let mut located_from: HashSet<NodeId> = HashSet::new();
        let mut errors: Vec<String> = Vec::new();
        let mut retried = false;
        let mut located = false;
        while got.len() < scheme.data() {
            let next = tokio::time::timeout(SPARE_AFTER, running.next()).await;
            match next {
                Err(_) => {
                    // Endgame: a slow peer gets company.
                    slow.lock()
                        .expect("slow peers lock")
                        .extend(waiting.lock().expect("waiting lock").iter().copied());
                    if let Some(node) = queue.pop_front().or_else(|| spares.next()) {
                        ask(node, &got, &mut running);
                    }
                }
                Ok(Some((node, Ok((id, bytes))))) => {
                    // Hashed here whatever the peer said of its length: a
                    // range read is not hashed by the transfer.
                    if FragmentId::of(&bytes) != id {
                        errors.push(format!("{node} sent a corrupt fragment"));
                        failed.push(node);
                        if let Some(next) = queue.pop_front().or_else(|| spares.next()) {
                            ask(next, &got, &mut running);
                        }
                        continue;
                    }
                    // Copies of a padding fragment share an id: the first
                    // index not yet read.
                    match (0..ids.len())
                        .find(|&i| ids[i] == id && !got.iter().any(|(g, _)| *g == i))
                    {
                        Some(index) => got.push((index, bytes)),
                        None => {
                            // Read meanwhile from another node: this one
                            // is asked once more for what is still unread.
                            let again = asked_again.entry(node).or_default();
                            if *again < ids.len() {
                                *again += 1;
                                running.push(fetch(node, wanted_for(&node, &got)));
                            } else if let Some(next) = queue.pop_front().or_else(|| spares.next()) {
                                ask(next, &got, &mut running);
                            }
                        }
                    }
                }
                Ok(Some((node, Err(error)))) => {
                    errors.push(format!("{node}: {error}"));
                    failed.push(node);
                    if let Some(next) = queue.pop_front().or_else(|| spares.next()) {
                        ask(next, &got, &mut running);
                    }
                }
                Ok(None) if !queue.is_empty() => {
                    let node = queue.pop_front().expect("not empty");
                    ask(node, &got, &mut running);
                }
                Ok(None) if !retried && !failed.is_empty() => {
                    // Placement is exhausted: a node that was busy or
                    // briefly unreachable gets one more chance.
                    retried = true;
                    tokio::time::sleep(RETRY_AFTER).await;
                    for node in std::mem::take(&mut failed) {
                        running.push(fetch(node, wanted_for(&node, &got)));
                    }
                }
                Ok(None) => {
                    if let Some(spare) = spares.next() {
                        ask(spare, &got, &mut running);
                        continue;
                    }
                    if located {
                        break;
                    }
                    // Still short: look for fragments that moved.
                    located = true;
                    for index in (0..ids.len()).filter(|i| !got.iter().any(|(g, _)| g == i)) {
                        if let Ok(holders) = self.node.locate_fragment(&upload, &ids[index]).await {
                            for holder in holders {
                                if located_from.insert(holder) {
                                    running.push(fetch(holder, vec![ids[index]]));
                                }
                            }
                        }
                    }
                }
            }
        }
        if got.len() < scheme.data() {
            return Err(GatewayError::Unavailable(format!(
                "{} of the {} fragments a segment needs could be read: {}",
                got.len(),
                scheme.data(),
                errors.join("; ")
            )));
        }
        let scheme_copy = scheme;
        tokio::task::spawn_blocking(move || {
            let fragments: Vec<(usize, &[u8])> =
                got.iter().map(|(i, b)| (*i, b.as_slice())).collect();
            reconstruct(scheme_copy, segment_len, &fragments)
        })
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?
        .map_err(|e| GatewayError::Corrupt(format!("segment: {e}")))
    }
}

/// What one read knows of the nodes it asks: its own site's, those it is
/// connected to, and those that were slow to answer in an earlier segment.
struct ReadPeers {
    same_site: HashSet<NodeId>,
    reachable: HashSet<NodeId>,
    slow: Mutex<HashSet<NodeId>>,
}

/// What streaming a body produced.
pub(crate) struct StreamedBody {
    pub(crate) segments: Vec<SegmentRef>,
    pub(crate) md5: [u8; 16],
    pub(crate) checksum: Option<ChecksumHasher>,
}

/// One PUT's streaming state: batches of plaintext go through MD5 and the
/// encoder on a blocking thread; each finished segment is pushed while the
/// next is being encoded, at most [`SEGMENTS_IN_FLIGHT`] at a time.
/// Where a segment's fragments go: what their holds name.
pub(crate) struct PushTarget<'a> {
    pub(crate) bucket: &'a str,
    pub(crate) key: &'a str,
    pub(crate) upload: UploadId,
}

pub(crate) struct StreamPut<'a> {
    pub(crate) store: &'a ObjectStore,
    pub(crate) placer: Arc<Placer>,
    pub(crate) target: PushTarget<'a>,
    /// No segment is pushed after this: the collector may be releasing
    /// the upload.
    pub(crate) deadline_unix_ms: u64,
}

impl StreamPut<'_> {
    pub(crate) async fn run<S, E>(
        &self,
        pipeline: PutPipeline,
        length: u64,
        checksum: Option<ChecksumHasher>,
        mut body: S,
    ) -> GatewayResult<StreamedBody>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut state = Some((pipeline, md5::Md5::new(), checksum));
        let mut received: u64 = 0;
        let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
        let mut pushes = FuturesUnordered::new();
        let mut segments: Vec<Option<SegmentRef>> = Vec::new();
        let mut finished = false;
        loop {
            // Segments in flight make progress while the body is awaited:
            // a FuturesUnordered only runs when it is polled.
            let next = loop {
                tokio::select! {
                    biased;
                    Some(done) = pushes.next(), if !pushes.is_empty() => {
                        record(&mut segments, Some(done))?;
                    }
                    next = body.next() => break next,
                }
            };
            match next {
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if received > length {
                        return Err(GatewayError::BodyTooLong { expected: length });
                    }
                    batch.extend_from_slice(&chunk);
                    if batch.len() < BATCH_BYTES {
                        continue;
                    }
                }
                Some(Err(error)) => return Err(body_error(error)),
                None => {
                    if received < length {
                        return Err(GatewayError::IncompleteBody {
                            expected: length,
                            got: received,
                        });
                    }
                    finished = true;
                }
            }
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_BYTES));
            let (pipeline, mut md5, mut checksum) = state.take().expect("encoder state");
            let (pipeline, md5, checksum, encoded) = tokio::task::spawn_blocking(move || {
                md5.update(&full);
                if let Some(checksum) = &mut checksum {
                    checksum.update(&full);
                }
                let mut encoded = Vec::new();
                let mut pipeline = pipeline;
                let outcome = pipeline.push(&full, &mut encoded);
                let pipeline = match (outcome, finished) {
                    (Err(e), _) => return Err(e),
                    (Ok(()), true) => {
                        encoded.push(pipeline.finish()?);
                        None
                    }
                    (Ok(()), false) => Some(pipeline),
                };
                Ok((pipeline, md5, checksum, encoded))
            })
            .await
            .map_err(|e| GatewayError::Internal(e.to_string()))?
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
            for segment in encoded {
                while pushes.len() >= SEGMENTS_IN_FLIGHT {
                    record(&mut segments, pushes.next().await)?;
                }
                if now_unix_ms() > self.deadline_unix_ms {
                    return Err(self.store.index.deadline_error().into());
                }
                let index = segments.len();
                segments.push(None);
                let placer = self.placer.clone();
                pushes.push(async move {
                    let pushed = self
                        .store
                        .push_segment(&placer, &self.target, Arc::new(segment))
                        .await;
                    (index, pushed)
                });
            }
            match pipeline {
                Some(pipeline) => state = Some((pipeline, md5, checksum)),
                None => {
                    while let Some(done) = pushes.next().await {
                        record(&mut segments, Some(done))?;
                    }
                    let segments = segments
                        .into_iter()
                        .map(|s| s.expect("every push recorded"))
                        .collect();
                    return Ok(StreamedBody {
                        segments,
                        md5: md5.finalize().into(),
                        checksum,
                    });
                }
            }
        }
    }
}

/// A PUT's or a part's body is at most 5 GiB: checked before anything is
/// read or written.
pub(crate) fn check_body_length(length: u64) -> GatewayResult<()> {
    if length > MAX_PUT_BYTES {
        return Err(GatewayError::EntityTooLarge { max: MAX_PUT_BYTES });
    }
    Ok(())
}

/// What a failed body means. s3s checks a signed payload's SHA-256 as the
/// body passes and reports a mismatch only through its error's text.
fn body_error(error: impl std::fmt::Display) -> GatewayError {
    let text = error.to_string();
    if text.contains("Sha256Mismatch") {
        GatewayError::ContentSha256Mismatch
    } else {
        GatewayError::ClientBody(text)
    }
}

fn record(
    segments: &mut [Option<SegmentRef>],
    done: Option<(usize, GatewayResult<SegmentRef>)>,
) -> GatewayResult<()> {
    if let Some((index, pushed)) = done {
        segments[index] = Some(pushed?);
    }
    Ok(())
}

/// `headers` with the object's checksum added, of S3's `kind`
/// (FULL_OBJECT or COMPOSITE).
pub(crate) fn with_checksum(
    headers: StoredHeaders,
    algorithm: Algorithm,
    value: String,
    kind: &str,
) -> GatewayResult<StoredHeaders> {
    let mut pairs: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    pairs.push((algorithm.header().to_owned(), value));
    pairs.push(("x-amz-checksum-type".to_owned(), kind.to_owned()));
    StoredHeaders::new(pairs).map_err(|e| GatewayError::MetadataTooLarge(e.to_string()))
}
