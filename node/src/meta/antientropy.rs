//! Anti-entropy (spec/metadata.md, "Anti-entropy"): a replica compares
//! digests with every other replica of each partition they share and pulls
//! the rows it lacks or holds older. Pull only: every replica runs it, so a
//! row one side lacks reaches it from the side that has it. A replica that
//! was down converges this way without any read touching its data.

use std::time::Duration;

use cairn_protocol::ids::NodeId;
use cairn_protocol::meta::{Partition, RowKey, Table, replica_set};
use cairn_protocol::metarpc::{MAX_ITEMS, Request, Response};

use super::replica::{ReplicaError, UNFENCED};
use super::{MAX_CLOCK_DRIFT_MS, MetaError, Metadata};
use crate::clock::now_unix_ms;

/// Rows asked for in one read while pulling.
const PULL_BATCH: usize = 256;

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    /// Partitions compared with a peer.
    pub compared: usize,
    /// Partitions whose roots differed.
    pub differing: usize,
    /// Rows pulled and merged here.
    pub pulled: usize,
    /// Partitions dropped here: they moved away and settled on their new
    /// replicas.
    pub forgotten: usize,
}

impl Metadata {
    /// Runs anti-entropy every `every` until the node stops.
    pub(crate) fn start_anti_entropy(&self, every: Duration) {
        self.spawn_every(every, |this| async move {
            match this.anti_entropy_round().await {
                Ok(stats) if stats.pulled > 0 => {
                    tracing::info!(?stats, "anti-entropy pulled rows");
                }
                Ok(stats) => tracing::debug!(?stats, "anti-entropy round"),
                Err(error) => tracing::info!(%error, "anti-entropy round failed"),
            }
        });
    }

    /// One round against every other node of the map.
    pub async fn anti_entropy_round(&self) -> Result<SyncStats, MetaError> {
        let map = self.inner.maps.current().ok_or(MetaError::NoMap)?;
        let previous = self.inner.maps.previous();
        let own = self.inner.own;
        let mut stats = SyncStats::default();
        // Members of the previous map too: they hold partitions that moved.
        let mut peers: Vec<NodeId> = map
            .map
            .nodes
            .iter()
            .chain(previous.iter().flat_map(|p| p.map.nodes.iter()))
            .filter(|n| n.state.is_placed() && n.id != own)
            .map(|n| n.id)
            // Peers not connected now are skipped, not waited for: the
            // next round finds them if they are back.
            .filter(|id| self.is_connected(id))
            .collect();
        peers.sort();
        peers.dedup();
        for peer in peers {
            if let Err(error) = self.sync_with(peer, &mut stats).await {
                tracing::debug!(%peer, %error, "anti-entropy with this peer failed");
            }
        }
        stats.forgotten = self.forget_moved_away().await?;
        Ok(stats)
    }

    /// Drops the partitions this node replicated under the previous map but
    /// not under the current one, once they have settled on their new
    /// replicas (which hold every row and register). Partitions held from
    /// further back are kept: nothing says they were carried.
    async fn forget_moved_away(&self) -> Result<usize, MetaError> {
        let Some(previous) = self.inner.maps.previous() else {
            return Ok(0);
        };
        let own = self.inner.own;
        let mut forgotten = 0;
        let mut after: Option<Partition> = None;
        loop {
            let (replica, cursor) = (self.inner.replica.clone(), after.clone());
            let (held, more) =
                tokio::task::spawn_blocking(move || replica.partitions(cursor.as_ref(), MAX_ITEMS))
                    .await
                    .map_err(|e| ReplicaError::Database(e.to_string()))??;
            for (partition, _) in &held {
                let was_replica = replica_set(
                    &previous.map,
                    partition,
                    usize::from(previous.metadata_replicas),
                )
                .contains(&own);
                let sets = self.quorum_sets_of(partition)?;
                if was_replica && !sets.current().contains(&own) && sets.previous().is_none() {
                    tracing::info!(
                        partition = partition.as_str(),
                        "forgetting a partition that moved to other replicas"
                    );
                    self.inner.replica.forget(partition.clone()).await?;
                    forgotten += 1;
                }
            }
            if !more {
                return Ok(forgotten);
            }
            after = held.last().map(|(p, _)| p.clone());
        }
    }

    async fn sync_with(&self, peer: NodeId, stats: &mut SyncStats) -> Result<(), MetaError> {
        let mut after = None;
        loop {
            let request = Request::Partitions {
                after: after.clone(),
                limit: MAX_ITEMS as u32,
            };
            let Response::Partitions { items, more } = self.ask(peer, request).await? else {
                return Err(unexpected(peer));
            };
            for (partition, root) in &items {
                // Pull what we replicate now from every node that holds it
                // now or held it under the previous map.
                let sets = self.quorum_sets_of(partition)?;
                let shared =
                    sets.current().contains(&self.inner.own) && sets.nodes().contains(&peer);
                if !shared {
                    continue;
                }
                stats.compared += 1;
                let ours = self.local_digest(partition).await?;
                if ours.root() != *root {
                    stats.differing += 1;
                    // A partition with rows not taken now does not hold up
                    // the others; a peer that fails does.
                    match self.pull_partition(peer, partition, &ours).await {
                        Ok(pulled) => stats.pulled += pulled,
                        Err(error @ MetaError::Refused { .. }) => {
                            tracing::info!(%peer, %error, partition = partition.as_str(), "anti-entropy: partition not settled this pass");
                        }
                        Err(error) => return Err(error),
                    }
                }
            }
            if !more {
                return Ok(());
            }
            after = items.last().map(|(p, _)| p.clone());
        }
    }

    pub(crate) async fn pull_partition(
        &self,
        peer: NodeId,
        partition: &Partition,
        ours: &cairn_protocol::meta::PartitionDigest,
    ) -> Result<usize, MetaError> {
        let Response::Digest(theirs) = self
            .ask(
                peer,
                Request::Digest {
                    partition: partition.clone(),
                },
            )
            .await?
        else {
            return Err(unexpected(peer));
        };
        let leaves = ours.differing(&theirs);
        if leaves.is_empty() {
            return Ok(0);
        }
        let mut pulled = 0;
        // Rows not taken now: the pull is not complete (a fill must not
        // count it, or the rows are gone once the old replicas forget).
        let mut skipped = 0;
        let mut cursor: Option<(Table, Vec<u8>)> = None;
        loop {
            let request = Request::LeafRows {
                partition: partition.clone(),
                leaves,
                after: cursor.clone(),
                limit: MAX_ITEMS as u32,
            };
            let Response::LeafRows { items, more } = self.ask(peer, request).await? else {
                return Err(unexpected(peer));
            };
            let keys: Vec<(Table, Vec<u8>)> =
                items.iter().map(|(t, s, _)| (*t, s.clone())).collect();
            let local = {
                let (replica, partition, keys) =
                    (self.inner.replica.clone(), partition.clone(), keys.clone());
                tokio::task::spawn_blocking(move || replica.row_digests(&partition, &keys))
                    .await
                    .map_err(|e| ReplicaError::Database(e.to_string()))??
            };
            let wanted: Vec<RowKey> = items
                .iter()
                .zip(local)
                .filter(|((_, _, theirs), ours)| ours.as_ref() != Some(theirs))
                .map(|((table, sort, _), _)| RowKey::new(partition.clone(), *table, sort.clone()))
                .collect();
            for chunk in wanted.chunks(PULL_BATCH) {
                let Response::Rows(values) = self
                    .ask(
                        peer,
                        Request::Read {
                            keys: chunk.to_vec(),
                        },
                    )
                    .await?
                else {
                    return Err(unexpected(peer));
                };
                let mut rows = Vec::with_capacity(chunk.len());
                for (key, value) in chunk.iter().zip(values).filter_map(|(k, v)| Some((k, v?))) {
                    // A peer's row is checked like any write before it is
                    // merged; one stamped ahead is taken once the clock
                    // has caught up with it, in a later pass.
                    match value
                        .check_fits(key)
                        .and_then(|()| value.check_stamp(now_unix_ms(), MAX_CLOCK_DRIFT_MS))
                    {
                        Ok(()) => rows.push((key.clone(), value)),
                        Err(error) => {
                            skipped += 1;
                            tracing::warn!(%peer, %error, "anti-entropy: peer sent a row this replica does not take");
                        }
                    }
                }
                pulled += rows.len();
                self.inner.replica.merge(rows, UNFENCED).await?;
            }
            if !more {
                if skipped > 0 {
                    return Err(MetaError::Refused {
                        node: peer,
                        message: format!(
                            "{skipped} rows were not taken (stamped ahead of this node's clock, or not fitting their keys); {pulled} were"
                        ),
                    });
                }
                return Ok(pulled);
            }
            cursor = keys.last().cloned();
        }
    }

    pub(crate) async fn local_digest(
        &self,
        partition: &Partition,
    ) -> Result<cairn_protocol::meta::PartitionDigest, MetaError> {
        let (replica, partition) = (self.inner.replica.clone(), partition.clone());
        Ok(
            tokio::task::spawn_blocking(move || replica.digest(&partition))
                .await
                .map_err(|e| ReplicaError::Database(e.to_string()))??,
        )
    }

    async fn ask(&self, peer: NodeId, request: Request) -> Result<Response, MetaError> {
        match self.call(peer, request).await {
            Ok(Response::Error { message, .. }) => Err(MetaError::Refused {
                node: peer,
                message,
            }),
            Ok(response) => Ok(response),
            Err(error) => Err(MetaError::Unreachable { node: peer, error }),
        }
    }
}

fn unexpected(peer: NodeId) -> MetaError {
    MetaError::Refused {
        node: peer,
        message: "answered with an unexpected message".into(),
    }
}
