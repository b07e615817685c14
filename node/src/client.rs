//! The fragment client: what the gateway and the collector ask of the
//! nodes holding fragments. This node's own store is one more peer: the
//! same checks and limits apply to it (see `pieces::Server`), only the
//! stream is missing.

use std::time::Duration;

use cairn_protocol::ids::{FragmentId, NodeId, UploadId, VersionId};
use cairn_protocol::status::NodeStatus;
use cairn_protocol::wire::{FragmentLock, Hold};

use crate::event_loop::{Command, upload_provider_key};
use crate::identity::{node_id_of, peer_id_of};
use crate::members::MEMBERSHIP_WAIT;
use crate::outbound::{self, Retries};
use crate::pieces::{self, PieceError};
use crate::store::Released;
use crate::swarm::{NodeError, NodeHandle};

/// How long one piece exchange may take in all, attempts included (a
/// fragment is at most a few MiB; the peer is given up on past this).
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(120);

impl NodeHandle {
    /// Puts a fragment on `node` (this node itself included); returns once
    /// it is durable there.
    pub async fn put_fragment(
        &self,
        node: &NodeId,
        id: FragmentId,
        bytes: &[u8],
        hold: Hold,
    ) -> Result<(), NodeError> {
        if *node == self.node_id() {
            return Ok(self.local.put_local(id, bytes, hold).await?);
        }
        self.with_retries(node, |stream| pieces::put(stream, id, bytes, hold.clone()))
            .await
    }

    /// Gets a fragment (or a range of it) from `node`; a whole fragment is
    /// checked against its id.
    pub async fn get_fragment(
        &self,
        node: &NodeId,
        id: FragmentId,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, NodeError> {
        if *node == self.node_id() {
            return Ok(self.local.get_local(id, offset, length).await?);
        }
        self.with_retries(node, |stream| pieces::get(stream, id, offset, length))
            .await
    }

    /// Gets a range of whichever of `ids` (the fragments of one segment)
    /// `node` holds: which, and the bytes (a whole fragment is checked
    /// against its id).
    pub async fn get_any_fragment(
        &self,
        node: &NodeId,
        ids: &[FragmentId],
        offset: u64,
        length: u64,
    ) -> Result<(FragmentId, Vec<u8>), NodeError> {
        if *node == self.node_id() {
            return Ok(self
                .local
                .get_any_local(ids.to_vec(), offset, length)
                .await?);
        }
        self.with_retries(node, |stream| pieces::get_any(stream, ids, offset, length))
            .await
    }

    /// Asks `node` (this node itself included) to move the fragments of
    /// `upload` to its trash; it does so only if the replicated metadata
    /// says the upload is released.
    pub async fn release_upload(
        &self,
        node: &NodeId,
        upload: UploadId,
        bucket: &str,
        key: &str,
    ) -> Result<Released, NodeError> {
        if *node == self.node_id() {
            return Ok(self.local.release_local(upload, bucket, key).await?);
        }
        self.with_retries(node, |stream| pieces::release(stream, upload, bucket, key))
            .await
    }

    /// Asks `node` to bring the fragments of `upload`, written for
    /// `bucket`/`key`, back from its trash; it checks the metadata first.
    pub async fn restore_upload(
        &self,
        node: &NodeId,
        upload: UploadId,
        bucket: &str,
        key: &str,
    ) -> Result<u64, NodeError> {
        if *node == self.node_id() {
            return Ok(self.local.restore_local(upload, bucket, key).await?);
        }
        self.with_retries(node, |stream| pieces::restore(stream, upload, bucket, key))
            .await
    }

    /// Asks `node` to keep the fragments of `uploads`, written for
    /// `bucket`/`key`, locked at least until the dates of `lock`, which
    /// `version` states; it checks the metadata first. Answers how many
    /// fragments of theirs it holds.
    pub async fn lock_fragments(
        &self,
        node: &NodeId,
        uploads: &[UploadId],
        bucket: &str,
        key: &str,
        version: VersionId,
        lock: FragmentLock,
    ) -> Result<u64, NodeError> {
        if *node == self.node_id() {
            return Ok(self
                .local
                .lock_local(uploads.to_vec(), bucket, key, version, lock)
                .await?);
        }
        self.with_retries(node, |stream| {
            pieces::lock_fragments(stream, uploads, bucket, key, version, lock)
        })
        .await
    }

    /// Asks `node` to move its copy of `fragment` (a copy left off
    /// placement) to its trash; it checks the metadata, its own map and
    /// that `keeper` holds the fragment first.
    pub async fn drop_copy(
        &self,
        node: &NodeId,
        fragment: FragmentId,
        bucket: &str,
        key: &str,
        version: VersionId,
        keeper: NodeId,
    ) -> Result<(), NodeError> {
        if *node == self.node_id() {
            return Ok(self
                .local
                .drop_copy_local(fragment, bucket, key, version, keeper)
                .await?);
        }
        self.with_retries(node, |stream| {
            pieces::drop_copy(stream, fragment, bucket, key, version, keeper)
        })
        .await
    }

    /// Whether `node` is a member connected to this one, dialing it first
    /// if it is not (idle connections close; a node not heard from is not
    /// a node gone). Gives up after `timeout`.
    pub async fn reach(&self, node: &NodeId, timeout: Duration) -> bool {
        if *node == self.node_id() || self.is_member(node) {
            return true;
        }
        let reached = async {
            if let Ok(mut stream) = self.open_raw_piece_stream(node).await {
                use futures::AsyncWriteExt;
                let _ = stream.close().await;
            }
            self.wait_for_member(node, timeout).await
        };
        tokio::time::timeout(timeout, reached)
            .await
            .unwrap_or(false)
    }

    /// `node`'s status (this node's own included); its store's part only
    /// `with_store` (answering it walks the node's whole index).
    pub async fn status(&self, node: &NodeId, with_store: bool) -> Result<NodeStatus, NodeError> {
        if *node == self.node_id() {
            return Ok(self.local.status_local(with_store).await?);
        }
        self.with_retries(node, |stream| pieces::status(stream, with_store))
            .await
    }

    /// Which of `ids` `node` holds, in `ids` order.
    pub async fn have(&self, node: &NodeId, ids: &[FragmentId]) -> Result<Vec<bool>, NodeError> {
        if *node == self.node_id() {
            return Ok(self.local.have_local(ids.to_vec()).await?);
        }
        self.with_retries(node, |stream| pieces::have(stream, ids.to_vec()))
            .await
    }

    /// Announces in the DHT that this node holds fragments of `upload`;
    /// returns once the announcement has gone out. (A fragment put here
    /// announces its upload by itself.)
    pub async fn provide_upload(&self, upload: &UploadId) -> Result<(), NodeError> {
        let key = upload_provider_key(upload);
        self.ask_swarm(|reply| Command::Provide(key, Some(reply)))
            .await
    }

    /// The nodes that announced they hold fragments of `upload`.
    pub async fn upload_providers(&self, upload: &UploadId) -> Result<Vec<NodeId>, NodeError> {
        let key = upload_provider_key(upload);
        let peers = self
            .ask_swarm(|reply| Command::FindProviders(key, reply))
            .await?;
        let mut nodes: Vec<NodeId> = peers.iter().filter_map(node_id_of).collect();
        nodes.sort();
        Ok(nodes)
    }

    /// Finds the nodes holding fragment `id` of `upload` wherever it is,
    /// moved or repaired: the upload's providers, each asked whether it
    /// holds the fragment. A provider that cannot be asked is skipped.
    pub async fn locate_fragment(
        &self,
        upload: &UploadId,
        id: &FragmentId,
    ) -> Result<Vec<NodeId>, NodeError> {
        let providers = self.upload_providers(upload).await?;
        let asks = providers.iter().map(|node| async move {
            match self.have(node, std::slice::from_ref(id)).await {
                Ok(held) => held.first().copied().unwrap_or(false).then_some(*node),
                Err(error) => {
                    tracing::debug!(%node, %error, "provider could not be asked for a fragment");
                    None
                }
            }
        });
        Ok(futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect())
    }

    /// Runs one exchange on a fresh stream, again on a transport failure.
    /// libp2p-stream drops an inbound stream unread when another is still
    /// waiting to be accepted, so a burst of opens can lose some; puts are
    /// idempotent and gets read-only, so trying again is safe.
    async fn with_retries<T, F, Fut>(&self, node: &NodeId, exchange: F) -> Result<T, NodeError>
    where
        F: Fn(libp2p::Stream) -> Fut,
        Fut: std::future::Future<Output = Result<T, PieceError>>,
    {
        // A peer that stops reading what it is sent (QUIC flow control
        // then blocks the writer) is given up on as one that stops
        // answering is.
        let retries = Retries {
            attempts: 6,
            first_pause: Duration::from_millis(10),
            deadline: EXCHANGE_DEADLINE,
        };
        outbound::call(
            retries,
            |_| async {
                let peer = peer_id_of(node)?;
                if !self.members.wait_for(&peer, MEMBERSHIP_WAIT).await {
                    return Err(NodeError::NotAMember(*node));
                }
                let stream = self.open_raw_piece_stream(node).await?;
                Ok(exchange(stream).await?)
            },
            |error| {
                matches!(
                    error,
                    NodeError::Piece(PieceError::Io(_) | PieceError::Closed)
                )
            },
            || NodeError::Piece(PieceError::TimedOut(EXCHANGE_DEADLINE)),
        )
        .await
    }
}
