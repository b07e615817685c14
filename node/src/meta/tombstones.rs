//! Compacting tombstones (spec/metadata.md, "Compacting tombstones"): a
//! row that only says "gone" — a register cleared, a version purged — is
//! removed from this replica once it is older than the trash period and
//! every node of the map holds the same row or none, so that no node still
//! holds what it replaced; a node out of the map meanwhile forgets its
//! replica when it comes back (spec/membership.md, "Membership since").

use std::time::Duration;

use cairn_protocol::ids::NodeId;
use cairn_protocol::meta::{Partition, Register, RowKey, RowValue, Table};
use cairn_protocol::metarpc::{Request, Response};

use super::replica::ReplicaError;
use super::{MetaError, Metadata};
use crate::clock::now_unix_ms;

/// Rows checked with the other nodes at once.
const CHECK_BATCH: usize = 256;
/// The youngest a tombstone is compacted at, whatever the trash period:
/// far above how long a metadata call of an older value can be in flight
/// (four attempts of 10 s, a stream served at most 60 s) plus the clock
/// skew between the node that stamped it and this one.
pub(crate) const MIN_TOMBSTONE_AGE: Duration = Duration::from_secs(3600);

/// Whether `value` is a tombstone older than `ripe_before`: a cleared
/// register, or a purged version no lock holds.
fn is_ripe_tombstone(value: &RowValue, ripe_before: u64, now_unix_ms: u64) -> bool {
    match value {
        RowValue::Register(Register { value: None, at }) => at.hlc.unix_ms() < ripe_before,
        RowValue::Version(version) => {
            version
                .purged
                .is_some_and(|purged| purged.hlc.unix_ms() < ripe_before)
                && !version.is_locked(now_unix_ms)
        }
        _ => false,
    }
}

impl Metadata {
    pub(crate) fn start_tombstone_compaction(&self, every: Duration, age: Duration) {
        let age = age.max(MIN_TOMBSTONE_AGE);
        self.spawn_every(every, move |this| async move {
            match this.compact_tombstones(age).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "compacted metadata tombstones"),
                Err(error) => tracing::info!(%error, "tombstone compaction failed"),
            }
        });
    }

    /// One pass over the partitions this node replicates under the current
    /// map (not those moving): removes here every tombstone older than
    /// `age` that each other node of the map holds the same or not at all.
    /// A node that does not answer keeps every tombstone for a later pass;
    /// nothing is removed while a node's `since` is unknown. Returns how
    /// many rows were removed here.
    pub async fn compact_tombstones(&self, age: Duration) -> Result<u64, MetaError> {
        let map = self.inner.maps.current().ok_or(MetaError::NoMap)?;
        if !map.since_known() {
            return Ok(0);
        }
        // Out nodes answer nothing and serve nothing (rpc::answer); one
        // brought back gets a new `since` and forgets first.
        let others: Vec<NodeId> = map
            .map
            .nodes
            .iter()
            .filter(|n| n.state != cairn_protocol::placement::NodeState::Out)
            .map(|n| n.id)
            .filter(|id| *id != self.inner.own)
            .collect();
        // Every other node must answer: with one away, a pass would only
        // wait out its calls.
        if others.iter().any(|node| !self.is_connected(node)) {
            return Ok(0);
        }
        let now = now_unix_ms();
        let ripe_before = now.saturating_sub(age.as_millis() as u64);
        let own = self.inner.own;
        let mut removed = 0;
        let mut after: Option<Partition> = None;
        loop {
            let replica = self.inner.replica.clone();
            let (partitions, more) =
                tokio::task::spawn_blocking(move || replica.partitions(after.as_ref(), 64))
                    .await
                    .map_err(|e| ReplicaError::Database(e.to_string()))??;
            for (partition, _) in &partitions {
                let replicas = self.replicas_of(partition)?;
                if !replicas.contains(&own) || self.is_moving(partition)? {
                    continue;
                }
                for table in Table::ALL {
                    removed += self
                        .compact_table(partition, table, &others, ripe_before, now)
                        .await?;
                }
            }
            match partitions.last() {
                Some((last, _)) if more => after = Some(last.clone()),
                _ => return Ok(removed),
            }
        }
    }

    async fn compact_table(
        &self,
        partition: &Partition,
        table: Table,
        others: &[NodeId],
        ripe_before: u64,
        now: u64,
    ) -> Result<u64, MetaError> {
        let mut removed = 0;
        let mut start = Vec::new();
        loop {
            let (replica, page_partition, page_start) =
                (self.inner.replica.clone(), partition.clone(), start.clone());
            let page = tokio::task::spawn_blocking(move || {
                replica.range(&page_partition, table, &page_start, None, CHECK_BATCH)
            })
            .await
            .map_err(|e| ReplicaError::Database(e.to_string()))??;
            let candidates: Vec<(RowKey, Vec<u8>)> = page
                .rows
                .iter()
                .filter(|(_, value)| is_ripe_tombstone(value, ripe_before, now))
                .map(|(sort, value)| {
                    (
                        RowKey::new(partition.clone(), table, sort.clone()),
                        value.encode(),
                    )
                })
                .collect();
            if !candidates.is_empty() {
                removed += self
                    .remove_where_every_node_agrees(others, candidates)
                    .await?;
            }
            match page.rows.last() {
                Some((last, _)) if page.more => {
                    start = last.clone();
                    start.push(0);
                }
                _ => return Ok(removed),
            }
        }
    }

    /// Removes from this replica each candidate (key, encoded tombstone)
    /// that every other node of the map holds the same or not at all. A
    /// node holding something else is sent the tombstone (a merge, as
    /// anti-entropy would), so that a later pass can agree.
    async fn remove_where_every_node_agrees(
        &self,
        others: &[NodeId],
        candidates: Vec<(RowKey, Vec<u8>)>,
    ) -> Result<u64, MetaError> {
        let keys: Vec<RowKey> = candidates.iter().map(|(key, _)| key.clone()).collect();
        let mut agreed = vec![true; candidates.len()];
        for node in others {
            let values = match self.call(*node, Request::Read { keys: keys.clone() }).await {
                Ok(Response::Rows(values)) if values.len() == keys.len() => values,
                // No answer is no agreement: nothing goes this time.
                _ => return Ok(0),
            };
            let mut behind = Vec::new();
            for (index, value) in values.into_iter().enumerate() {
                if value.is_some_and(|v| v.encode() != candidates[index].1) {
                    agreed[index] = false;
                    let tombstone = RowValue::decode(&candidates[index].1)
                        .map_err(|e| ReplicaError::Corrupt(e.to_string()))?;
                    behind.push((keys[index].clone(), tombstone));
                }
            }
            if !behind.is_empty()
                && let Err(error) = self.call(*node, Request::Write { rows: behind }).await
            {
                tracing::debug!(%node, %error, "could not hand a tombstone to a node holding an older value");
            }
        }
        let rows: Vec<(RowKey, Vec<u8>)> = candidates
            .into_iter()
            .zip(agreed)
            .filter_map(|(candidate, agreed)| agreed.then_some(candidate))
            .collect();
        let count = rows.len() as u64;
        if count > 0 {
            self.inner.replica.remove_unchanged(rows).await?;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_protocol::hlc::{Hlc, Timestamp};

    fn at(unix_ms: u64) -> Timestamp {
        Timestamp {
            hlc: Hlc::new(unix_ms, 0),
            node: NodeId([1; 32]),
        }
    }

    #[test]
    fn only_old_cleared_registers_are_ripe() {
        let cleared = |ms| {
            RowValue::Register(Register {
                at: at(ms),
                value: None,
            })
        };
        assert!(is_ripe_tombstone(&cleared(100), 200, 1000));
        assert!(!is_ripe_tombstone(&cleared(300), 200, 1000));
        let live = RowValue::Register(Register {
            at: at(100),
            value: Some(b"x".to_vec()),
        });
        assert!(!is_ripe_tombstone(&live, 200, 1000));
        assert!(!is_ripe_tombstone(&RowValue::Immutable(vec![1]), 200, 1000));
    }
}
