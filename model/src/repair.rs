//! Repair (spec/repair.md): every committed segment back to `k + m`
//! fragments on the nodes its placement names, without an operator.
//!
//! Each node audits the bucket partitions it is responsible for: those
//! whose replica set names it first among the replicas it can reach (so
//! that when it is down the next replica takes over). A pass walks the
//! partition's versions in this node's replica, asks the placed nodes
//! which fragments they hold (batched `have` queries), and then repairs
//! the degraded segments, fewest spares first: a fragment held only by a
//! node off its placement (a write's hand-off) is copied to its place; a
//! fragment held nowhere is rebuilt, with every other missing fragment of
//! its segment, from one read of `k` fragments. Once a fragment is at its
//! place, the nodes holding copies of it off placement are asked to drop
//! them (each checks that itself). Repair is throttled by a
//! byte rate and a number of segments at once so that clients keep their
//! latency.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_node::clock::now_unix_ms;
use cairn_node::meta::Metadata;
use cairn_node::release::SegmentPlaces;
use cairn_node::swarm::NodeHandle;
use cairn_protocol::erasure::{Scheme, SegmentEncoder, reconstruct};
use cairn_protocol::ids::{FragmentId, NodeId, UploadId, VersionId};
use cairn_protocol::manifest::{Manifest, SegmentRef, SignedManifest};
use cairn_protocol::membership::SignedMap;
use cairn_protocol::meta::{Partition, RowKey, RowValue, Table};
use cairn_protocol::placement::{NodeState, Placer, segment_placement_key};
use cairn_protocol::records::DegradedRecord;
use cairn_protocol::status::RepairSummary;
use cairn_protocol::version::{ObjectVersion, VersionBody};
use cairn_protocol::wire::{FragmentLock, Hold, MAX_HAVE_IDS, ObjectKeyDigest};
use futures::StreamExt;
use tokio::sync::watch;

use crate::error::{ModelError, ModelResult};
use crate::fragment_locks;
use crate::heads::{existing_versions, is_current_object, read_head, read_manifest};
use crate::rows::{manifest_row, register, versions_row};

/// How repair runs on a node. All nodes may differ.
#[derive(Debug, Clone, Copy)]
pub struct RepairSettings {
    /// Pause between the end of one pass and the start of the next.
    pub every: Duration,
    /// Segments repaired at once.
    pub segments_at_once: usize,
    /// Fragment bytes read and written by repair per second (0: no limit).
    pub bytes_per_second: u64,
    /// How long a placed node must have been unreachable before its
    /// fragments are rebuilt on another node: a restart moves nothing.
    pub away_grace: Duration,
    /// A degraded-segment record that matches no segment of an existing
    /// version (its write never committed, or the version is gone) is
    /// forgotten this long after it was written.
    pub forget_records_after: Duration,
}

impl Default for RepairSettings {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(600),
            segments_at_once: 4,
            // Fragment bytes read plus written: at this rate a client on
            // the same two cores kept GET within 20% of idle and PUT near it
            // (−15% to −23%; BENCHMARKS.md, "Repair").
            bytes_per_second: 16 << 20,
            away_grace: Duration::from_secs(15 * 60),
            // Past the writers' deadline and clock margin (the collector's
            // defaults): a write that has not committed by then never will.
            forget_records_after: Duration::from_secs(8 * 3600),
        }
    }
}

/// `[repair]` in a node's configuration file (every field optional).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepairSection {
    pub every_seconds: u64,
    pub segments_at_once: usize,
    /// 0: no limit.
    pub bytes_per_second: u64,
    pub away_grace_seconds: u64,
}

impl Default for RepairSection {
    fn default() -> Self {
        let settings = RepairSettings::default();
        Self {
            every_seconds: settings.every.as_secs(),
            segments_at_once: settings.segments_at_once,
            bytes_per_second: settings.bytes_per_second,
            away_grace_seconds: settings.away_grace.as_secs(),
        }
    }
}

impl RepairSection {
    pub fn settings(&self) -> RepairSettings {
        RepairSettings {
            every: Duration::from_secs(self.every_seconds.max(1)),
            segments_at_once: self.segments_at_once.max(1),
            bytes_per_second: self.bytes_per_second,
            away_grace: Duration::from_secs(self.away_grace_seconds),
            ..RepairSettings::default()
        }
    }
}

/// What one pass found and did, over the partitions this node was
/// responsible for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
    /// Bucket partitions audited.
    pub partitions: u64,
    /// Segments of existing versions checked.
    pub segments: u64,
    /// Segments found with every fragment on its placed node.
    pub whole: u64,
    /// Segments found degraded, by how many more fragments each could
    /// lose and stay readable (its spares): 0 is one loss from unreadable.
    pub degraded_by_spares: BTreeMap<usize, u64>,
    /// Segments with fewer than `k` fragments found: nothing rebuilds them.
    pub unreadable: u64,
    /// Degraded segments left for a later pass: a placed node is away for
    /// less than the grace, or a repair failed.
    pub pending: u64,
    /// Fragments rebuilt by decoding, and copied from a node off placement.
    pub rebuilt: u64,
    pub copied: u64,
    /// Copies left off placement that their holders moved to their trash
    /// once the fragment was at its place.
    pub dropped: u64,
    /// Fragment bytes repair read and wrote.
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl PassReport {
    /// Whether the pass found every segment whole.
    pub fn all_whole(&self) -> bool {
        self.whole == self.segments
    }
}

/// What a node's repair has done so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepairStatus {
    /// Passes finished since the node started.
    pub passes: u64,
    /// The last pass finished.
    pub last: Option<PassReport>,
    /// Since the node started: fragments rebuilt and copied, and the
    /// fragment bytes read and written for them.
    pub rebuilt: u64,
    pub copied: u64,
    /// Copies left off placement dropped by their holders.
    pub dropped: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl RepairStatus {
    /// What a status query of the node answers (`cairn admin status`).
    pub fn summary(&self) -> RepairSummary {
        let last = self.last.clone().unwrap_or_default();
        RepairSummary {
            passes: self.passes,
            last_finished_unix_ms: last.finished_unix_ms,
            pass_progress_unix_ms: 0,
            partitions: last.partitions,
            segments: last.segments,
            whole: last.whole,
            degraded_by_spares: last
                .degraded_by_spares
                .iter()
                .map(|(spares, segments)| ((*spares).min(255) as u8, *segments))
                .collect(),
            unreadable: last.unreadable,
            pending: last.pending,
            rebuilt: self.rebuilt,
            copied: self.copied,
            bytes_read: self.bytes_read,
            bytes_written: self.bytes_written,
        }
    }
}

/// The repair worker of one node; stops when dropped.
pub struct Repairer {
    task: tokio::task::JoinHandle<()>,
    status: watch::Receiver<RepairStatus>,
    /// To say, once stopped, that no pass is under way.
    node: NodeHandle,
}

impl Repairer {
    pub fn start(node: NodeHandle, settings: RepairSettings) -> Self {
        let (publish, status) = watch::channel(RepairStatus::default());
        let handle = node.clone();
        let task = tokio::spawn(async move {
            let mut repair = Repair::new(node, settings);
            loop {
                // Not at once: a node just started has not met its peers.
                tokio::time::sleep(settings.every).await;
                repair.node.repair_heartbeat();
                match repair.pass().await {
                    Ok(report) => {
                        if !report.all_whole()
                            || report.rebuilt + report.copied + report.dropped > 0
                        {
                            tracing::info!(?report, "repair pass");
                        }
                        publish.send_modify(|status| {
                            status.passes += 1;
                            status.rebuilt += report.rebuilt;
                            status.copied += report.copied;
                            status.dropped += report.dropped;
                            status.bytes_read += report.bytes_read;
                            status.bytes_written += report.bytes_written;
                            status.last = Some(report);
                        });
                        repair.node.publish_repair(publish.borrow().summary());
                    }
                    Err(error) => {
                        tracing::warn!(%error, "repair pass failed");
                        repair.node.publish_repair(publish.borrow().summary());
                    }
                }
            }
        });
        Self {
            task,
            status,
            node: handle,
        }
    }

    /// What repair has done so far.
    pub fn status(&self) -> RepairStatus {
        self.status.borrow().clone()
    }

    /// Waits for the next pass to finish and returns its report.
    pub async fn next_pass(&mut self) -> Option<PassReport> {
        let seen = self.status.borrow_and_update().passes;
        loop {
            self.status.changed().await.ok()?;
            let status = self.status.borrow_and_update();
            if status.passes > seen {
                return status.last.clone();
            }
        }
    }
}

impl Drop for Repairer {
    fn drop(&mut self) {
        self.task.abort();
        self.node.publish_repair(self.status.borrow().summary());
    }
}

/// How many nodes off placement, down the ranking, beyond the segment's
/// fragment count, are asked for a fragment its placed node lacks: where
/// a write hands fragments off, and where a map change left them.
const EXTRA_SPARES_ASKED: usize = 2;
/// Segments checked together (their `have` queries share messages).
const CHECK_BATCH: usize = 256;
/// Degraded segments kept in memory before they are repaired mid-pass.
const MAX_QUEUED: usize = 16 * 1024;
/// Degraded-segment records read per partition and pass (the rest wait
/// for later passes, as these are forgotten).
const MAX_RECORDS: usize = 64 * 1024;
/// How long one have-query, read or put of repair may take: a slow
/// or hung node holds up one call, not the pass.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// How long a node not connected is given to answer a dial at the start
/// of a pass.
const REACH_WAIT: Duration = Duration::from_secs(3);

/// One segment of an existing version, and where it should be.
#[derive(Clone)]
struct SegmentWork {
    bucket: String,
    key: Arc<str>,
    object: ObjectKeyDigest,
    version: VersionId,
    upload: UploadId,
    scheme: Scheme,
    segment: SegmentRef,
    placer: Arc<Placer>,
    placed: Vec<NodeId>,
    /// Nodes off placement that may hold hand-offs, best first.
    spares: Vec<NodeId>,
    /// Nodes being drained: placement gives them nothing, and what they
    /// hold moves to its placed nodes.
    draining: Arc<Vec<NodeId>>,
    /// The lock the version's fragments' holders keep, if it holds
    /// (fragment_locks): they are asked to, every pass, which renews a
    /// legal hold's lease.
    locked: Option<(Arc<ObjectVersion>, FragmentLock)>,
}

impl SegmentWork {
    fn placement_key(&self) -> [u8; 32] {
        segment_placement_key(&self.segment.fragments)
    }
}

/// Why this node (the one `metadata` belongs to) may not drop its copy of
/// `fragment`, written by `upload` for `bucket`/`key`, on the word that
/// `keeper` holds it at its place; when it may, every segment the fragment
/// is used in with its placed nodes, to be found whole there (spec/repair.md,
/// "Copies left behind"). Every existing version of the key (and its head)
/// whose manifest has the fragment in a part written by `upload` counts,
/// `version` among them: for each such segment placement under this node's
/// map takes `keeper` and never this node. A version row
/// or manifest a member forged can only add segments to satisfy, never
/// take the real version's away.
/// With `keeper` `None`, the check of the keeper itself: placement under
/// this node's map takes this node for every such segment.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn why_not_drop(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    version: VersionId,
    fragment: FragmentId,
    upload: UploadId,
    keeper: Option<NodeId>,
) -> ModelResult<Result<Vec<SegmentPlaces>, String>> {
    let mut versions = existing_versions(metadata, bucket, key, None).await?;
    if let Some(head) = read_head(metadata, bucket, key).await?
        && is_current_object(&head)
        && !versions.iter().any(|v| v.version == head.version)
    {
        versions.push(head);
    }
    if !versions.iter().any(|v| v.version == version) {
        return Ok(Err(format!(
            "{bucket}/{key} has no version {version} that exists"
        )));
    }
    // (scheme, segment) of every place the fragment is used by `upload`.
    let mut uses: Vec<(cairn_protocol::erasure::Scheme, SegmentRef)> = Vec::new();
    let mut in_named = false;
    for found in &versions {
        let VersionBody::Data { manifest: id, .. } = &found.body else {
            continue;
        };
        let Some(manifest) = read_manifest(metadata, bucket, id).await? else {
            if found.version == version {
                return Ok(Err(format!("manifest {id} is missing")));
            }
            continue;
        };
        // A row naming another object's manifest makes no claim here.
        if (
            manifest.bucket.as_str(),
            manifest.key.as_str(),
            manifest.version,
        ) != (bucket, key, found.version)
        {
            continue;
        }
        for segment in manifest
            .parts
            .iter()
            .filter(|part| part.upload == upload)
            .flat_map(|part| part.segments.iter())
            .filter(|segment| segment.fragments.contains(&fragment))
        {
            in_named |= found.version == version;
            uses.push((manifest.layout.scheme, segment.clone()));
        }
    }
    if !in_named {
        return Ok(Err(format!(
            "version {version} of {bucket}/{key} has no fragment {fragment} written by upload {upload}"
        )));
    }
    let Some(map) = metadata.cluster_map() else {
        return Ok(Err("this node has no cluster map".into()));
    };
    let own = metadata.node_id();
    blocking(move || {
        let mut placers: HashMap<cairn_protocol::erasure::Scheme, Placer> = HashMap::new();
        let mut places = Vec::with_capacity(uses.len());
        for (scheme, segment) in &uses {
            if !placers.contains_key(scheme) {
                let placer = Placer::new(&map.map, *scheme, map.tolerance)
                    .map_err(|e| ModelError::Internal(format!("placement: {e}")))?;
                placers.insert(*scheme, placer);
            }
            // Set, not index: a fragment belongs on any node placement
            // takes for its segment (Placer::arrange).
            let placed = placers[scheme].place(&segment_placement_key(&segment.fragments));
            match keeper {
                Some(keeper) => {
                    if placed.contains(&own) {
                        return Ok(Err(format!(
                            "placement under map version {} takes this node for a segment of fragment {fragment}",
                            map.map.version
                        )));
                    }
                    if !placed.contains(&keeper) {
                        return Ok(Err(format!(
                            "placement under map version {} does not take {keeper} for a segment of fragment {fragment}",
                            map.map.version
                        )));
                    }
                }
                None if !placed.contains(&own) => {
                    return Ok(Err(format!(
                        "placement under map version {} does not take this node for a segment of fragment {fragment}",
                        map.map.version
                    )));
                }
                None => {}
            }
            places.push(SegmentPlaces {
                placed,
                fragments: segment.fragments.clone(),
            });
        }
        Ok(Ok(places))
    })
    .await
}

/// A degraded-segment record of the partition, by segment placement key.
struct Record {
    row: RowKey,
    since: u64,
    /// The pass met a segment of an existing version with this key.
    seen: bool,
}

/// A segment found degraded: who holds each fragment.
struct Degraded {
    work: SegmentWork,
    /// Per fragment index: the nodes found holding it (placed node first).
    holders: Vec<Vec<NodeId>>,
    /// Per fragment index: where it belongs now, arranged from `holders`
    /// (`Placer::arrange`).
    place: Vec<NodeId>,
}

impl Degraded {
    /// Distinct fragments held: indexes with a holder, but no more than
    /// the distinct nodes holding them (a node serves one fragment of a
    /// segment; copies share one id, and so can padding fragments).
    fn present(&self) -> usize {
        let indexes = self.holders.iter().filter(|h| !h.is_empty()).count();
        let nodes: HashSet<&NodeId> = self.holders.iter().flatten().collect();
        indexes.min(nodes.len())
    }

    /// Whether fragment `index` is held by a node the arrangement does not
    /// name for a fragment with the same bytes (a hand-off or a left copy).
    fn copies_off_placement(&self, index: usize) -> bool {
        let id = self.work.segment.fragments[index];
        self.holders[index].iter().any(|holder| {
            !self
                .place
                .iter()
                .zip(&self.work.segment.fragments)
                .any(|(placed, fragment)| placed == holder && *fragment == id)
        })
    }

    fn spares(&self) -> isize {
        self.present() as isize - self.work.scheme.data() as isize
    }
}

struct Repair {
    node: NodeHandle,
    settings: RepairSettings,
    throttle: Throttle,
    /// When each node of the map was first seen unreachable.
    away_since: HashMap<NodeId, Instant>,
}

impl Repair {
    fn new(node: NodeHandle, settings: RepairSettings) -> Self {
        Self {
            node,
            settings,
            throttle: Throttle::new(settings.bytes_per_second),
            away_since: HashMap::new(),
        }
    }

    fn reachable(&self, node: &NodeId) -> bool {
        *node == self.node.node_id() || self.node.is_member(node)
    }

    async fn pass(&mut self) -> ModelResult<PassReport> {
        let map = self.node.cluster_map().ok_or(ModelError::NoMap)?;
        // Nodes not connected now are dialed before anything is judged.
        let reaches = map
            .map
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Out)
            .map(|n| self.node.reach(&n.id, REACH_WAIT));
        futures::future::join_all(reaches).await;
        let now = Instant::now();
        for member in &map.map.nodes {
            if self.reachable(&member.id) {
                self.away_since.remove(&member.id);
            } else {
                self.away_since.entry(member.id).or_insert(now);
            }
        }
        let mut report = PassReport {
            started_unix_ms: now_unix_ms(),
            ..PassReport::default()
        };
        let metadata = self.node.metadata().clone();
        let mut repairing = HashMap::new();
        let mut after: Option<Partition> = None;
        loop {
            let from = after.clone();
            let replica = metadata.clone();
            let (partitions, more) = blocking(move || {
                replica
                    .replica()
                    .partitions(from.as_ref(), 64)
                    .map_err(|e| ModelError::Internal(format!("replica: {e}")))
            })
            .await?;
            for (partition, _) in &partitions {
                if partition.is_cluster()
                    || !self.responsible_for(partition, &mut repairing).await?
                {
                    continue;
                }
                report.partitions += 1;
                self.node.repair_heartbeat();
                if let Err(error) = self.audit_partition(&map, partition, &mut report).await {
                    tracing::warn!(bucket = partition.as_str(), %error, "repair of a bucket failed");
                }
            }
            match partitions.last() {
                Some((last, _)) if more => after = Some(last.clone()),
                _ => break,
            }
        }
        report.finished_unix_ms = now_unix_ms();
        Ok(report)
    }

    /// Whether this node is the first replica of `partition` it can reach
    /// that repairs: a replica before it that answers but shows no recent
    /// pass (an old binary, a stuck task) is passed over. `repairing`
    /// caches the answers for the pass.
    async fn responsible_for(
        &self,
        partition: &Partition,
        repairing: &mut HashMap<NodeId, bool>,
    ) -> ModelResult<bool> {
        let own = self.node.node_id();
        for replica in self.node.metadata().replicas_of(partition)? {
            if replica == own {
                return Ok(true);
            }
            if !self.reachable(&replica) {
                continue;
            }
            let active = match repairing.get(&replica) {
                Some(active) => *active,
                None => {
                    let active = self.is_repairing(&replica).await;
                    repairing.insert(replica, active);
                    active
                }
            };
            if active {
                return Ok(false);
            }
        }
        Ok(false)
    }

    /// Whether `node` says it finished a repair pass lately or runs one
    /// that made progress lately (a pass reports progress after every
    /// batch of segments). Judged by this node's own period and clock: a
    /// replica set to pass much less often than this one, or whose clock
    /// is behind by more than that, is repeated, not missed.
    async fn is_repairing(&self, node: &NodeId) -> bool {
        let now = now_unix_ms();
        let lately = (self.settings.every * 3 + Duration::from_secs(60)).as_millis() as u64;
        match tokio::time::timeout(CALL_DEADLINE, self.node.status(node, false)).await {
            Ok(Ok(status)) => {
                // A stamp ahead of this clock by more than a minute (a
                // clock set wrong, or a lie) proves nothing.
                let recent =
                    |at: u64| at != 0 && at <= now + 60_000 && now.saturating_sub(at) <= lately;
                let repair = status.repair;
                (repair.passes > 0 && recent(repair.last_finished_unix_ms))
                    || recent(repair.pass_progress_unix_ms)
            }
            _ => {
                tracing::debug!(%node, "a replica before this one did not say it repairs; repairing its buckets here");
                false
            }
        }
    }

    async fn audit_partition(
        &self,
        map: &SignedMap,
        partition: &Partition,
        report: &mut PassReport,
    ) -> ModelResult<()> {
        let bucket = partition.as_str().to_owned();
        let mut records = degraded_records(self.node.metadata(), partition).await?;
        // A scheme this map cannot place is reported once per pass.
        let mut placers: HashMap<Scheme, Option<Arc<Placer>>> = HashMap::new();
        let draining: Arc<Vec<NodeId>> = Arc::new(
            map.map
                .nodes
                .iter()
                .filter(|n| n.state == NodeState::Draining)
                .map(|n| n.id)
                .collect(),
        );
        let mut batch: Vec<SegmentWork> = Vec::new();
        let mut queue: Vec<Degraded> = Vec::new();
        let mut start = Vec::new();
        loop {
            let page = {
                let metadata = self.node.metadata().clone();
                let partition = partition.clone();
                let from = start.clone();
                blocking(move || {
                    metadata
                        .replica()
                        .range(&partition, Table::Versions, &from, None, 256)
                        .map_err(|e| ModelError::Internal(format!("replica: {e}")))
                })
                .await?
            };
            let now = now_unix_ms();
            for (_, value) in &page.rows {
                let RowValue::Version(version) = value else {
                    continue;
                };
                let VersionBody::Data { manifest: id, .. } = &version.body else {
                    continue;
                };
                if !version.exists(now) {
                    continue;
                }
                // One version that cannot be checked costs only itself.
                let manifest = match self.manifest(&bucket, id).await {
                    Ok(Some(manifest)) => manifest,
                    Ok(None) => {
                        tracing::warn!(bucket, key = version.key, %id, "a version's manifest is missing; nothing to repair from");
                        report.pending += 1;
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(bucket, key = version.key, %id, %error, "a version's manifest could not be read; next pass");
                        report.pending += 1;
                        continue;
                    }
                };
                // A manifest counts only for the version it was written
                // for (as a read checks): a row naming another object's
                // manifest makes no work.
                if (&manifest.key, manifest.version) != (&version.key, version.version) {
                    tracing::warn!(bucket, key = version.key, %id, "a version names a manifest of another object; skipped");
                    continue;
                }
                let scheme = manifest.layout.scheme;
                if let std::collections::hash_map::Entry::Vacant(entry) = placers.entry(scheme) {
                    let (map, tolerance) = (map.map.clone(), map.tolerance);
                    let placer = blocking(move || Ok(Placer::new(&map, scheme, tolerance))).await?;
                    entry.insert(match placer {
                        Ok(placer) => Some(Arc::new(placer)),
                        Err(error) => {
                            tracing::warn!(bucket, %scheme, %error, "objects of a scheme this map cannot place are not repaired");
                            None
                        }
                    });
                }
                let Some(placer) = placers[&scheme].clone() else {
                    report.pending += 1;
                    continue;
                };
                let (key, object) = (
                    Arc::<str>::from(manifest.key.as_str()),
                    ObjectKeyDigest::of(&bucket, &manifest.key),
                );
                let now = now_unix_ms();
                let lock = fragment_locks::lock_of(version, now);
                let locked = lock
                    .holds(now)
                    .then(|| (Arc::new((**version).clone()), lock));
                for part in &manifest.parts {
                    for segment in &part.segments {
                        let placement_key = segment_placement_key(&segment.fragments);
                        let placed = placer.place(&placement_key);
                        let spares = placer
                            .rank(&placement_key)
                            .into_iter()
                            .filter(|n| !placed.contains(n))
                            .take(scheme.total() + EXTRA_SPARES_ASKED)
                            .collect();
                        batch.push(SegmentWork {
                            bucket: bucket.clone(),
                            key: key.clone(),
                            object,
                            version: manifest.version,
                            upload: part.upload,
                            scheme,
                            segment: segment.clone(),
                            placer: placer.clone(),
                            placed,
                            spares,
                            draining: draining.clone(),
                            locked: locked.clone(),
                        });
                        if batch.len() >= CHECK_BATCH {
                            let checked = std::mem::take(&mut batch);
                            self.check(checked, report, &mut records, &mut queue).await;
                        }
                        if queue.len() >= MAX_QUEUED {
                            self.repair_queue(std::mem::take(&mut queue), report).await;
                        }
                    }
                }
            }
            match page.rows.last() {
                Some((last, _)) if page.more => {
                    start = last.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        self.check(batch, report, &mut records, &mut queue).await;
        self.repair_queue(queue, report).await;
        // Records of writes that never committed, or of versions gone.
        let stale_before =
            now_unix_ms().saturating_sub(self.settings.forget_records_after.as_millis() as u64);
        for record in records.into_values() {
            if record.since < stale_before && !record.seen {
                self.forget_record(record.row).await;
            }
        }
        Ok(())
    }

    /// The manifest `id` from this node's replica, or from a quorum when
    /// the replica has not received it yet.
    async fn manifest(
        &self,
        bucket: &str,
        id: &cairn_protocol::ids::ManifestId,
    ) -> ModelResult<Option<Manifest>> {
        let row = manifest_row(bucket, id);
        let metadata = self.node.metadata().clone();
        let wanted = *id;
        // Decoding verifies a signature over up to 16 MiB: off the runtime.
        let local = blocking(move || {
            let value = metadata
                .replica()
                .get(std::slice::from_ref(&row))
                .map_err(|e| ModelError::Internal(format!("replica: {e}")))?
                .into_iter()
                .next()
                .flatten();
            let Some(RowValue::Immutable(bytes)) = value else {
                return Ok(None);
            };
            let signed = SignedManifest::decode(&bytes)
                .map_err(|e| ModelError::Corrupt(format!("manifest {wanted}: {e}")))?;
            if signed.id != wanted {
                return Err(ModelError::Corrupt(format!(
                    "manifest {wanted} has another id"
                )));
            }
            Ok(Some(signed.manifest))
        })
        .await?;
        match local {
            Some(manifest) => Ok(Some(manifest)),
            None => read_manifest(self.node.metadata(), bucket, id).await,
        }
    }

    /// Asks the placed nodes, then the others that may hold copies, which
    /// fragments of `batch` they hold; whole segments are counted, degraded
    /// ones queued. A segment a node could not answer for is left for the
    /// next pass: an unanswered query is no evidence of loss.
    async fn check(
        &self,
        batch: Vec<SegmentWork>,
        report: &mut PassReport,
        records: &mut HashMap<[u8; 32], Record>,
        queue: &mut Vec<Degraded>,
    ) {
        if batch.is_empty() {
            return;
        }
        self.node.repair_heartbeat();
        // Round one: each fragment's placed node.
        let mut asks: Vec<(usize, usize, NodeId)> = Vec::new();
        for (s, work) in batch.iter().enumerate() {
            for (index, node) in work.placed.iter().enumerate() {
                asks.push((s, index, *node));
            }
        }
        let mut holders: Vec<Vec<Vec<NodeId>>> = batch
            .iter()
            .map(|w| vec![Vec::new(); w.segment.fragments.len()])
            .collect();
        let (held, mut unanswered) = self.ask_have(&batch, asks).await;
        for (s, index, node) in held {
            holders[s][index].push(node);
        }
        // Round two, for fragments their placed node lacks: the segment's
        // other placed nodes (a map change moves a fragment's index to
        // another node of the segment), the spares and the draining nodes.
        let mut asks = Vec::new();
        for (s, work) in batch.iter().enumerate() {
            for (index, found) in holders[s].iter().enumerate() {
                if found.is_empty() {
                    asks.extend(
                        work.placed
                            .iter()
                            .enumerate()
                            .filter(|(other, _)| *other != index)
                            .map(|(_, n)| n)
                            .chain(work.spares.iter())
                            .chain(work.draining.iter())
                            .map(|n| (s, index, *n)),
                    );
                }
            }
        }
        let (held, failed) = self.ask_have(&batch, asks).await;
        unanswered.extend(failed);
        let mut unreadable = Vec::new();
        for (s, index, node) in held {
            if !holders[s][index].contains(&node) {
                holders[s][index].push(node);
            }
        }
        self.lock_on_holders(&batch, &holders).await;
        for (s, (work, holders)) in batch.into_iter().zip(holders).enumerate() {
            report.segments += 1;
            let placement_key = work.placement_key();
            if let Some(record) = records.get_mut(&placement_key) {
                record.seen = true;
            }
            let place = Placer::arrange(&work.placed, &holders);
            let at_place = place.len() == work.segment.fragments.len()
                && place
                    .iter()
                    .enumerate()
                    .all(|(index, node)| holders[index].contains(node));
            if at_place {
                report.whole += 1;
                if let Some(record) = records.remove(&placement_key) {
                    self.forget_record(record.row).await;
                }
                continue;
            }
            if unanswered.contains(&s) {
                report.pending += 1;
                continue;
            }
            let degraded = Degraded {
                work,
                holders,
                place,
            };
            if degraded.spares() < 0 {
                unreadable.push(degraded);
                continue;
            }
            *report
                .degraded_by_spares
                .entry(degraded.spares() as usize)
                .or_default() += 1;
            queue.push(degraded);
        }
        let mut asked = HashMap::new();
        for degraded in unreadable {
            if self.bring_back_from_trash(&degraded, &mut asked).await {
                // Found again where it was trashed: counted next pass.
                report.pending += 1;
                continue;
            }
            report.unreadable += 1;
            tracing::error!(
                bucket = degraded.work.bucket,
                key = &*degraded.work.key,
                found = degraded.present(),
                needed = degraded.work.scheme.data(),
                "a segment has too few fragments left to be read or rebuilt"
            );
        }
    }

    /// Asks every node found holding a fragment of a locked version to
    /// lock that version's uploads it holds (a node that missed a lock, a
    /// copy written on a spare or rebuilt since, and every legal hold's
    /// lease, are brought up to date); a node with nothing to change
    /// answers from its index.
    async fn lock_on_holders(&self, batch: &[SegmentWork], holders: &[Vec<Vec<NodeId>>]) {
        type Asks = BTreeMap<NodeId, BTreeSet<UploadId>>;
        type Named = (String, Arc<str>, VersionId);
        let mut by_version: BTreeMap<Named, (Arc<ObjectVersion>, FragmentLock, Asks)> =
            BTreeMap::new();
        for (work, holders) in batch.iter().zip(holders) {
            let Some((version, lock)) = &work.locked else {
                continue;
            };
            let (_, _, asks) = by_version
                .entry((work.bucket.clone(), work.key.clone(), work.version))
                .or_insert_with(|| (version.clone(), *lock, BTreeMap::new()));
            for node in holders.iter().flatten() {
                asks.entry(*node).or_default().insert(work.upload);
            }
        }
        let locks = by_version
            .into_values()
            .map(|(version, lock, asks)| async move {
                let asks = asks
                    .into_iter()
                    .map(|(node, uploads)| (node, uploads.into_iter().collect()))
                    .collect();
                fragment_locks::ask(&self.node, &version, lock, asks, CALL_DEADLINE).await
            });
        futures::stream::iter(locks)
            .buffer_unordered(4)
            .collect::<Vec<_>>()
            .await;
    }

    /// Asks the nodes that may hold a fragment of a segment too short to
    /// be read (its placed nodes, its spares and the nodes being drained)
    /// to bring the segment's upload back from their trash (a restore cut
    /// off between its commit and its requests to the nodes leaves it
    /// there; each node checks that the version exists), at once, each
    /// (node, upload) once per batch (`asked` keeps what they answered);
    /// whether any fragment of the upload came back.
    async fn bring_back_from_trash(
        &self,
        degraded: &Degraded,
        asked: &mut HashMap<(NodeId, UploadId), u64>,
    ) -> bool {
        let work = &degraded.work;
        let mut nodes: Vec<NodeId> = Vec::new();
        for node in work
            .placed
            .iter()
            .chain(work.spares.iter())
            .chain(work.draining.iter())
        {
            if self.reachable(node)
                && !nodes.contains(node)
                && !asked.contains_key(&(*node, work.upload))
            {
                nodes.push(*node);
            }
        }
        let asks = nodes.iter().map(|node| async move {
            let ask = self
                .node
                .restore_upload(node, work.upload, &work.bucket, &work.key);
            match tokio::time::timeout(CALL_DEADLINE, ask).await {
                Ok(Ok(n)) => n,
                Ok(Err(error)) => {
                    tracing::debug!(%node, %error, "a node did not bring fragments back from its trash");
                    0
                }
                Err(_) => {
                    tracing::debug!(%node, "a node did not answer a restore in time");
                    0
                }
            }
        });
        for (node, restored) in nodes.iter().zip(futures::future::join_all(asks).await) {
            asked.insert((*node, work.upload), restored);
        }
        let restored: u64 = asked
            .iter()
            .filter(|((_, upload), _)| *upload == work.upload)
            .map(|(_, n)| *n)
            .fold(0, u64::saturating_add);
        if restored > 0 {
            tracing::warn!(
                bucket = work.bucket,
                key = &*work.key,
                restored,
                "brought fragments of an existing version back from the trash"
            );
        }
        restored > 0
    }

    /// Sends the `have` queries of `asks` (segment, index, node), one
    /// message per node and 1024 ids; returns the asks answered yes, and
    /// the segments of queries that failed. Unreachable nodes are not
    /// asked: they hold nothing for now.
    async fn ask_have(
        &self,
        batch: &[SegmentWork],
        asks: Vec<(usize, usize, NodeId)>,
    ) -> (Vec<(usize, usize, NodeId)>, HashSet<usize>) {
        let mut by_node: BTreeMap<NodeId, Vec<(usize, usize)>> = BTreeMap::new();
        for (s, index, node) in asks {
            if self.reachable(&node) {
                by_node.entry(node).or_default().push((s, index));
            }
        }
        let queries = by_node.into_iter().flat_map(|(node, asks)| {
            asks.chunks(MAX_HAVE_IDS)
                .map(|chunk| (node, chunk.to_vec()))
                .collect::<Vec<_>>()
        });
        let answers = futures::stream::iter(queries)
            .map(|(node, asks)| async move {
                let ids: Vec<FragmentId> = asks
                    .iter()
                    .map(|&(s, index)| batch[s].segment.fragments[index])
                    .collect();
                let answer = tokio::time::timeout(CALL_DEADLINE, self.node.have(&node, &ids)).await;
                match answer {
                    Ok(Ok(held)) => Ok(asks
                        .into_iter()
                        .zip(held)
                        .filter(|(_, held)| *held)
                        .map(|((s, index), _)| (s, index, node))
                        .collect::<Vec<_>>()),
                    Ok(Err(error)) => {
                        tracing::debug!(%node, %error, "a node could not say which fragments it holds");
                        Err(asks)
                    }
                    Err(_) => {
                        tracing::debug!(%node, "a node did not say in time which fragments it holds");
                        Err(asks)
                    }
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
        let mut held = Vec::new();
        let mut unanswered = HashSet::new();
        for answer in answers {
            match answer {
                Ok(yes) => held.extend(yes),
                Err(asks) => unanswered.extend(asks.into_iter().map(|(s, _)| s)),
            }
        }
        (held, unanswered)
    }

    /// Repairs `queue`, fewest spares first, a few segments at once. A
    /// segment repaired now is found whole by the next pass, which then
    /// forgets its record.
    async fn repair_queue(&self, mut queue: Vec<Degraded>, report: &mut PassReport) {
        queue.sort_by_key(Degraded::spares);
        let shared = Mutex::new(std::mem::take(report));
        futures::stream::iter(queue)
            .for_each_concurrent(self.settings.segments_at_once.max(1), |degraded| {
                let shared = &shared;
                async move {
                    let outcome = self.repair_segment(&degraded).await;
                    let mut report = shared.lock().expect("report lock");
                    match outcome {
                        Ok(done) => {
                            report.rebuilt += done.rebuilt;
                            report.copied += done.copied;
                            report.dropped += done.dropped;
                            report.bytes_read += done.bytes_read;
                            report.bytes_written += done.bytes_written;
                            if !done.whole {
                                report.pending += 1;
                            }
                        }
                        Err(error) => {
                            report.pending += 1;
                            tracing::warn!(
                                bucket = degraded.work.bucket,
                                key = &*degraded.work.key,
                                %error,
                                "a segment could not be repaired; tried again next pass"
                            );
                        }
                    }
                }
            })
            .await;
        *report = shared.into_inner().expect("report lock");
    }

    /// Brings one segment's fragments to their placed nodes.
    async fn repair_segment(&self, degraded: &Degraded) -> ModelResult<SegmentRepair> {
        let work = &degraded.work;
        let mut done = SegmentRepair::default();
        // Which fragments go where: to the placed node, unless it has been
        // away past the grace, then to a spare with room in its site.
        let mut targets: Vec<(usize, NodeId)> = Vec::new();
        let mut waiting = false;
        let mut taken: HashSet<NodeId> = degraded.holders.iter().flatten().copied().collect();
        // Fragments per site once this repair is done: each fragment's
        // first holder, then every placed node that gets one.
        let mut per_site: HashMap<usize, usize> = HashMap::new();
        let count = |node: &NodeId, per_site: &mut HashMap<usize, usize>| {
            if let Some(site) = work.placer.site_of(node) {
                *per_site.entry(site).or_default() += 1;
            }
        };
        for holders in &degraded.holders {
            if let Some(holder) = holders.first() {
                count(holder, &mut per_site);
            }
        }
        let mut away = Vec::new();
        for (index, node) in degraded.place.iter().enumerate() {
            if degraded.holders[index].contains(node) {
                continue;
            }
            if self.reachable(node) {
                targets.push((index, *node));
                taken.insert(*node);
                if degraded.holders[index].is_empty() {
                    count(node, &mut per_site);
                }
            } else if degraded.copies_off_placement(index) {
                // A copy off placement (a hand-off) keeps the fragment's
                // redundancy; it moves when its node is back.
                waiting = true;
            } else if self
                .away_since
                .get(node)
                .is_some_and(|since| since.elapsed() >= self.settings.away_grace)
            {
                away.push(index);
            } else {
                waiting = true;
            }
        }
        // Spares last, once every placed target is counted: in a site
        // with room under the cap, as a write's hand-off, so that a site
        // loss still leaves k.
        for index in away {
            let room = |n: &NodeId, per_site: &HashMap<usize, usize>| {
                work.placer.site_of(n).is_some_and(|site| {
                    per_site.get(&site).copied().unwrap_or(0) < work.placer.site_cap()
                })
            };
            match work
                .spares
                .iter()
                .find(|n| self.reachable(n) && !taken.contains(n) && room(n, &per_site))
            {
                Some(spare) => {
                    targets.push((index, *spare));
                    taken.insert(*spare);
                    count(spare, &mut per_site);
                }
                None => waiting = true,
            }
        }
        if targets.is_empty() {
            done.whole = !waiting;
            return Ok(done);
        }
        // The version may have gone since the audit: nothing to keep then.
        let row = versions_row(&work.bucket, &work.key, &work.version);
        let current = self.node.metadata().read(vec![row]).await?.remove(0);
        match current {
            Some(RowValue::Version(version)) if version.exists(now_unix_ms()) => {}
            _ => {
                done.whole = true;
                return Ok(done);
            }
        }
        let fragment_len = work
            .scheme
            .fragment_len(work.segment.ciphertext_len as usize);
        let held_nowhere = targets
            .iter()
            .any(|(index, _)| degraded.holders[*index].is_empty());
        let mut fragments: Vec<(usize, Vec<u8>)> = Vec::new();
        if !held_nowhere {
            for (index, _) in &targets {
                let id = work.segment.fragments[*index];
                match self
                    .read_one(&degraded.holders[*index], id, fragment_len, &mut done)
                    .await
                {
                    Ok(bytes) => fragments.push((*index, bytes)),
                    Err(error) => {
                        // A holder that said yes and then could not give
                        // it: rebuild instead.
                        tracing::debug!(%error, "a copy could not be read; rebuilding the segment");
                        fragments.clear();
                        break;
                    }
                }
            }
            done.copied += fragments.len() as u64;
        }
        if fragments.len() < targets.len() {
            let segment = self
                .read_and_decode(degraded, fragment_len, &mut done)
                .await?;
            let scheme = work.scheme;
            let expected = work.segment.fragments.clone();
            let wanted: Vec<usize> = targets.iter().map(|(index, _)| *index).collect();
            fragments = blocking(move || {
                let encoded = SegmentEncoder::new(scheme)
                    .encode(segment)
                    .map_err(|e| ModelError::Internal(format!("erasure: {e}")))?;
                if encoded.fragment_ids() != expected.as_slice() {
                    return Err(ModelError::Corrupt(
                        "the rebuilt segment does not give the manifest's fragments".into(),
                    ));
                }
                Ok(wanted
                    .into_iter()
                    .map(|index| (index, encoded.fragment(index).to_vec()))
                    .collect())
            })
            .await?;
            done.copied = 0;
            done.rebuilt += targets.len() as u64;
        }
        let signing = self.node.identity().signing_key();
        let puts = targets.iter().map(|(index, node)| {
            let bytes = &fragments
                .iter()
                .find(|(i, _)| i == index)
                .expect("a fragment for each target")
                .1;
            let id = work.segment.fragments[*index];
            // Retention holds arrive with Object Lock; until then none.
            let hold = Hold::sign(signing, &id, work.upload, work.object, 0);
            async move {
                self.throttle.take(bytes.len() as u64).await;
                match tokio::time::timeout(
                    CALL_DEADLINE,
                    self.node.put_fragment(node, id, bytes, hold),
                )
                .await
                {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {CALL_DEADLINE:?}")),
                }
            }
        });
        let results = futures::future::join_all(puts).await;
        let mut all_stored = true;
        let mut at_place = Vec::new();
        for ((index, node), result) in targets.iter().zip(results) {
            match result {
                Ok(()) => {
                    done.bytes_written += fragment_len as u64;
                    if degraded.place.get(*index) == Some(node) {
                        at_place.push((*index, *node));
                    }
                }
                Err(error) => {
                    all_stored = false;
                    tracing::warn!(%node, index, %error, "a repaired fragment could not be stored");
                }
            }
        }
        done.dropped = self.drop_copies_left(degraded, &at_place).await;
        done.whole = all_stored
            && !waiting
            && targets
                .iter()
                .all(|(i, n)| degraded.place.get(*i) == Some(n));
        Ok(done)
    }

    /// Asks each node that holds a copy of a fragment now at its place
    /// (`at_place`: index, arranged node) and that is not among the nodes
    /// placement takes for the segment to move its copy to its trash
    /// (spec/repair.md, "Copies left behind"); each checks it all itself.
    /// Returns how many did.
    async fn drop_copies_left(&self, degraded: &Degraded, at_place: &[(usize, NodeId)]) -> u64 {
        let work = &degraded.work;
        let mut drops = Vec::new();
        for (index, keeper) in at_place {
            let id = work.segment.fragments[*index];
            for holder in &degraded.holders[*index] {
                if holder != keeper && !work.placed.contains(holder) && self.reachable(holder) {
                    drops.push((*holder, id, *keeper));
                }
            }
        }
        // At once: a holder that does not answer costs one deadline, not
        // one per copy.
        let asks = drops.iter().map(|(holder, id, keeper)| async move {
            let asked = tokio::time::timeout(
                CALL_DEADLINE,
                self.node
                    .drop_copy(holder, *id, &work.bucket, &work.key, work.version, *keeper),
            );
            match asked.await {
                Ok(Ok(())) => 1,
                Ok(Err(error)) => {
                    tracing::debug!(%holder, fragment = %id, %error, "a copy left off placement was not dropped");
                    0
                }
                Err(_) => {
                    tracing::debug!(%holder, fragment = %id, "a drop was not answered in time");
                    0
                }
            }
        });
        futures::future::join_all(asks).await.into_iter().sum()
    }

    /// Reads `k` fragments of the segment from their holders (this node,
    /// then placed holders, data fragments first) and decodes it.
    async fn read_and_decode(
        &self,
        degraded: &Degraded,
        fragment_len: usize,
        done: &mut SegmentRepair,
    ) -> ModelResult<Vec<u8>> {
        let work = &degraded.work;
        let own = self.node.node_id();
        let mut order: Vec<usize> = (0..degraded.holders.len())
            .filter(|&i| !degraded.holders[i].is_empty())
            .collect();
        order.sort_by_key(|&i| (!degraded.holders[i].contains(&own), i));
        let mut got: Vec<(usize, Vec<u8>)> = Vec::with_capacity(work.scheme.data());
        let mut next = order.into_iter();
        let mut errors = Vec::new();
        while got.len() < work.scheme.data() {
            let wanted = work.scheme.data() - got.len();
            let round: Vec<usize> = next.by_ref().take(wanted).collect();
            if round.is_empty() {
                return Err(ModelError::Unavailable(format!(
                    "{} of the {} fragments a rebuild needs could be read: {}",
                    got.len(),
                    work.scheme.data(),
                    errors.join("; ")
                )));
            }
            let reads = round.iter().map(|&index| async move {
                let id = work.segment.fragments[index];
                let mut scratch = SegmentRepair::default();
                let result = self
                    .read_one(&degraded.holders[index], id, fragment_len, &mut scratch)
                    .await;
                (index, result, scratch.bytes_read)
            });
            for (index, result, read) in futures::future::join_all(reads).await {
                done.bytes_read += read;
                match result {
                    Ok(bytes) => got.push((index, bytes)),
                    Err(error) => errors.push(error.to_string()),
                }
            }
        }
        let scheme = work.scheme;
        let segment_len = work.segment.ciphertext_len as usize;
        blocking(move || {
            let fragments: Vec<(usize, &[u8])> =
                got.iter().map(|(i, b)| (*i, b.as_slice())).collect();
            reconstruct(scheme, segment_len, &fragments)
                .map_err(|e| ModelError::Corrupt(format!("segment: {e}")))
        })
        .await
    }

    /// Reads fragment `id` from the first of `holders` that gives it.
    async fn read_one(
        &self,
        holders: &[NodeId],
        id: FragmentId,
        fragment_len: usize,
        done: &mut SegmentRepair,
    ) -> ModelResult<Vec<u8>> {
        let mut errors = Vec::new();
        for holder in holders {
            self.throttle.take(fragment_len as u64).await;
            let read = self.node.get_fragment(holder, id, 0, fragment_len as u64);
            match tokio::time::timeout(CALL_DEADLINE, read)
                .await
                .unwrap_or_else(|_| {
                    Err(cairn_node::swarm::NodeError::Swarm(format!(
                        "no answer within {CALL_DEADLINE:?}"
                    )))
                }) {
                Ok(bytes) if FragmentId::of(&bytes) == id => {
                    done.bytes_read += bytes.len() as u64;
                    return Ok(bytes);
                }
                Ok(_) => errors.push(format!("{holder} sent a corrupt fragment")),
                Err(error) => errors.push(format!("{holder}: {error}")),
            }
        }
        Err(ModelError::Unavailable(format!(
            "fragment {id} could not be read: {}",
            errors.join("; ")
        )))
    }

    async fn forget_record(&self, row: RowKey) {
        let metadata = self.node.metadata();
        if let Err(error) = metadata
            .write(vec![(row, register(None, metadata.timestamp()))])
            .await
        {
            tracing::debug!(%error, "a degraded-segment record could not be forgotten; next pass");
        }
    }
}

/// What repairing one segment did.
#[derive(Debug, Default)]
struct SegmentRepair {
    /// Every fragment is on its placed node now.
    whole: bool,
    rebuilt: u64,
    copied: u64,
    dropped: u64,
    bytes_read: u64,
    bytes_written: u64,
}

/// The degraded-segment records of a partition in this node's replica,
/// at most [`MAX_RECORDS`], by segment placement key.
async fn degraded_records(
    metadata: &Metadata,
    partition: &Partition,
) -> ModelResult<HashMap<[u8; 32], Record>> {
    let metadata = metadata.clone();
    let partition = partition.clone();
    blocking(move || {
        let mut records = HashMap::new();
        let mut start = Vec::new();
        loop {
            let page = metadata
                .replica()
                .range(&partition, Table::Degraded, &start, None, 1000)
                .map_err(|e| ModelError::Internal(format!("replica: {e}")))?;
            for (sort, value) in &page.rows {
                let RowValue::Register(register) = value else {
                    continue;
                };
                let Some(bytes) = &register.value else {
                    continue;
                };
                let Ok(record) = DegradedRecord::decode(bytes) else {
                    continue;
                };
                let Some(tail) = sort.len().checked_sub(32).map(|at| &sort[at..]) else {
                    continue;
                };
                let key: [u8; 32] = tail.try_into().expect("32 bytes");
                records.insert(
                    key,
                    Record {
                        row: RowKey::new(partition.clone(), Table::Degraded, sort.clone()),
                        since: record.since_unix_ms,
                        seen: false,
                    },
                );
                if records.len() >= MAX_RECORDS {
                    return Ok(records);
                }
            }
            match page.rows.last() {
                Some((last, _)) if page.more => {
                    start = last.clone();
                    start.push(0);
                }
                _ => return Ok(records),
            }
        }
    })
    .await
}

/// Runs a blocking replica or codec call off the async runtime.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> ModelResult<T> + Send + 'static,
) -> ModelResult<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| ModelError::Internal(e.to_string()))?
}

/// Paces repair's bytes: each transfer starts once the ones before it
/// have had their share of the rate.
struct Throttle {
    bytes_per_second: u64,
    next: Mutex<tokio::time::Instant>,
}

impl Throttle {
    fn new(bytes_per_second: u64) -> Self {
        Self {
            bytes_per_second,
            next: Mutex::new(tokio::time::Instant::now()),
        }
    }

    async fn take(&self, bytes: u64) {
        if self.bytes_per_second == 0 {
            return;
        }
        let start = {
            let mut next = self.next.lock().expect("throttle lock");
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}
