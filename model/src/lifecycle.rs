//! The lifecycle worker (spec/versioning.md, "Lifecycle"): on each node, a
//! pass over the buckets whose partitions it is the first reachable
//! replica of, applying their lifecycle rules. Every action is a
//! compare-and-set or a lock-guarded delete of one named version, so that
//! a rule acts at most once per object version whoever runs it, and never
//! through an Object Lock.

use std::collections::HashMap;
use std::time::Duration;

use cairn_node::clock::now_unix_ms;
use cairn_node::swarm::NodeHandle;
use cairn_protocol::ids::NodeId;
use cairn_protocol::meta::{Partition, RowValue};
use cairn_protocol::records::{Expiration, LifecycleRule, Versioning};
use cairn_protocol::status::LifecycleSummary;
use cairn_protocol::version::{ObjectVersion, VersionBody};
use tokio::sync::watch;

use crate::buckets::lifecycle_of;
use crate::error::{ModelError, ModelResult};
use crate::heads::{DeleteCondition, ObjectIndex, VersionRef, latest_version};
use crate::listing::{ListRequest, ListStart, MAX_PAGE_ENTRIES, list_versions};
use crate::rows::versions_row;
use crate::uploads::Uploads;

/// How the lifecycle worker runs on a node.
#[derive(Debug, Clone, Copy)]
pub struct LifecycleSettings {
    /// Pause between the end of one pass and the start of the next.
    pub every: Duration,
    /// How long a lifecycle day lasts: a day, except in tests, which set a
    /// shorter one to see rules act.
    pub day: Duration,
    /// How much later than due an action waits: what clocks of the nodes
    /// may differ by (a node ahead would act early otherwise).
    pub clock_margin: Duration,
    /// Versions one listing page of the walk reads (what it holds in
    /// memory at once, besides one key's versions).
    pub page_entries: usize,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(3600),
            day: Duration::from_secs(86_400),
            clock_margin: Duration::from_secs(300),
            page_entries: MAX_PAGE_ENTRIES,
        }
    }
}

/// `[lifecycle]` in a node's file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleSection {
    pub every_seconds: u64,
    /// The length of a lifecycle day: 86400, except to try rules out.
    pub day_seconds: u64,
    pub clock_margin_seconds: u64,
}

impl Default for LifecycleSection {
    fn default() -> Self {
        let settings = LifecycleSettings::default();
        Self {
            every_seconds: settings.every.as_secs(),
            day_seconds: settings.day.as_secs(),
            clock_margin_seconds: settings.clock_margin.as_secs(),
        }
    }
}

impl LifecycleSection {
    pub fn settings(&self) -> LifecycleSettings {
        LifecycleSettings {
            every: Duration::from_secs(self.every_seconds.max(1)),
            day: Duration::from_secs(self.day_seconds.max(1)),
            clock_margin: Duration::from_secs(self.clock_margin_seconds),
            ..LifecycleSettings::default()
        }
    }
}

/// How long a delete the worker makes may take to commit.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);

/// The lifecycle worker of one node; stops when dropped.
pub struct LifecycleWorker {
    task: tokio::task::JoinHandle<()>,
    status: watch::Receiver<LifecycleSummary>,
}

impl LifecycleWorker {
    pub fn start(node: NodeHandle, settings: LifecycleSettings) -> Self {
        let (publish, status) = watch::channel(LifecycleSummary::default());
        let task = tokio::spawn(async move {
            let pass = Pass {
                index: ObjectIndex::new(node.clone(), WRITE_DEADLINE, 0),
                node,
                settings,
            };
            loop {
                // Not at once: a node just started has not met its peers.
                tokio::time::sleep(settings.every).await;
                let mut report = LifecycleSummary::default();
                if let Err(error) = pass.run(&mut report).await {
                    tracing::warn!(%error, "lifecycle pass failed");
                    report.failed += 1;
                }
                let acted = report.expired
                    + report.noncurrent_expired
                    + report.markers_removed
                    + report.uploads_aborted
                    + report.kept_by_lock
                    + report.failed;
                if acted > 0 {
                    tracing::info!(?report, "lifecycle pass");
                }
                publish.send_modify(|status| {
                    status.passes += 1;
                    status.last_finished_unix_ms = now_unix_ms();
                    status.buckets = report.buckets;
                    status.expired += report.expired;
                    status.noncurrent_expired += report.noncurrent_expired;
                    status.markers_removed += report.markers_removed;
                    status.uploads_aborted += report.uploads_aborted;
                    status.kept_by_lock += report.kept_by_lock;
                    status.failed += report.failed;
                });
                pass.node.publish_lifecycle(*publish.borrow());
            }
        });
        Self { task, status }
    }

    /// What the worker has done so far.
    pub fn status(&self) -> LifecycleSummary {
        *self.status.borrow()
    }

    /// Waits for the next pass to finish; what the worker has done then.
    pub async fn next_pass(&mut self) -> Option<LifecycleSummary> {
        let seen = self.status.borrow_and_update().passes;
        loop {
            self.status.changed().await.ok()?;
            let status = *self.status.borrow_and_update();
            if status.passes > seen {
                return Some(status);
            }
        }
    }
}

impl Drop for LifecycleWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// When something `days` lifecycle days after `from_unix_ms` is due: S3
/// rounds up to the next midnight UTC, here the next day boundary.
fn due_after(from_unix_ms: u64, days: u32, day_ms: u64) -> u64 {
    let at = from_unix_ms.saturating_add(u64::from(days).saturating_mul(day_ms));
    at.div_ceil(day_ms).saturating_mul(day_ms)
}

/// Whether `rule` applies to `version` (its prefix and sizes; a delete
/// marker counts as size 0).
fn applies(rule: &LifecycleRule, version: &ObjectVersion) -> bool {
    let size = match &version.body {
        VersionBody::Data { size_bytes, .. } => *size_bytes,
        VersionBody::DeleteMarker => 0,
    };
    rule.enabled
        && version.key.starts_with(&rule.prefix)
        && rule.size_greater_than.is_none_or(|min| size > min)
        && rule.size_less_than.is_none_or(|max| size < max)
}

/// When `version` was written, as far as lifecycle counts: its creation,
/// or its commit if later (a version restored from the trash keeps its
/// creation, and was written again at its restore). The legal hold's stamp
/// is at least the commit's (a later hold change only moves it later,
/// which only delays an action).
fn written_at(version: &ObjectVersion) -> u64 {
    version
        .created
        .hlc
        .unix_ms()
        .max(version.legal_hold.at.hlc.unix_ms())
}

/// The counter of a report an action adds to.
type Counter = fn(&mut LifecycleSummary) -> &mut u64;

fn expired(report: &mut LifecycleSummary) -> &mut u64 {
    &mut report.expired
}

fn markers_removed(report: &mut LifecycleSummary) -> &mut u64 {
    &mut report.markers_removed
}

fn noncurrent_expired(report: &mut LifecycleSummary) -> &mut u64 {
    &mut report.noncurrent_expired
}

struct Pass {
    node: NodeHandle,
    index: ObjectIndex,
    settings: LifecycleSettings,
}

/// What a pass acts on in one bucket, read again after every page of its
/// walk: a configuration removed (or of another bucket since) stops it.
struct BucketRules {
    generation: String,
    rules: Vec<LifecycleRule>,
    versioning: Versioning,
}

impl Pass {
    fn day_ms(&self) -> u64 {
        (self.settings.day.as_millis() as u64).max(1)
    }

    /// Whether something due at `due_unix_ms` is due now, clocks allowing.
    fn is_due(&self, due_unix_ms: u64, now_unix_ms: u64) -> bool {
        due_unix_ms.saturating_add(self.settings.clock_margin.as_millis() as u64) <= now_unix_ms
    }

    async fn run(&self, report: &mut LifecycleSummary) -> ModelResult<()> {
        let metadata = self.node.metadata().clone();
        let mut active: HashMap<NodeId, bool> = HashMap::new();
        let mut after: Option<Partition> = None;
        loop {
            let from = after.clone();
            let replica = metadata.clone();
            let (partitions, more) = tokio::task::spawn_blocking(move || {
                replica
                    .replica()
                    .partitions(from.as_ref(), 64)
                    .map_err(|e| ModelError::Internal(format!("replica: {e}")))
            })
            .await
            .map_err(|e| ModelError::Internal(e.to_string()))??;
            for (partition, _) in &partitions {
                if partition.is_cluster() {
                    continue;
                }
                let bucket = partition.as_str();
                match self.responsible_for(partition, &mut active).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(error) => {
                        tracing::warn!(bucket, %error, "a bucket's replicas could not be told; next pass");
                        report.failed += 1;
                        continue;
                    }
                }
                match self.rules_of(bucket).await {
                    Ok(Some(rules)) => {
                        report.buckets += 1;
                        self.bucket(bucket, rules, report).await;
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(bucket, %error, "a bucket's lifecycle could not be read; next pass");
                        report.failed += 1;
                    }
                }
            }
            match partitions.last() {
                Some((last, _)) if more => after = Some(last.clone()),
                _ => return Ok(()),
            }
        }
    }

    async fn rules_of(&self, bucket: &str) -> ModelResult<Option<BucketRules>> {
        Ok(lifecycle_of(self.node.metadata(), bucket)
            .await?
            .map(|(configuration, versioning)| BucketRules {
                generation: configuration.generation,
                rules: configuration.rules,
                versioning,
            }))
    }

    /// Whether this node is the first replica of `partition` it can reach
    /// whose lifecycle worker runs: a replica before it that answers but
    /// shows no recent pass (an older binary, a stuck worker) is passed
    /// over. Two nodes that both think so only repeat each other's work:
    /// every action is decided by a compare-and-set. `active` caches the
    /// answers for the pass.
    async fn responsible_for(
        &self,
        partition: &Partition,
        active: &mut HashMap<NodeId, bool>,
    ) -> ModelResult<bool> {
        let own = self.node.node_id();
        for replica in self.node.metadata().replicas_of(partition)? {
            if replica == own {
                return Ok(true);
            }
            if !self.node.is_member(&replica) {
                continue;
            }
            let runs = match active.get(&replica) {
                Some(runs) => *runs,
                None => {
                    let runs = self.runs_lifecycle(&replica).await;
                    active.insert(replica, runs);
                    runs
                }
            };
            if runs {
                return Ok(false);
            }
        }
        Ok(false)
    }

    /// Whether `node` says its lifecycle worker finished a pass lately, by
    /// this node's period and clock.
    async fn runs_lifecycle(&self, node: &NodeId) -> bool {
        let lately = (self.settings.every * 3 + Duration::from_secs(60)).as_millis() as u64;
        let asked = tokio::time::timeout(Duration::from_secs(10), self.node.status(node, false));
        match asked.await {
            Ok(Ok(status)) => {
                let now = now_unix_ms();
                let finished = status.lifecycle.last_finished_unix_ms;
                status.lifecycle.passes > 0
                    && finished <= now + 60_000
                    && now.saturating_sub(finished) <= lately
            }
            _ => false,
        }
    }

    /// Applies a bucket's rules: its versions, then its uploads; a part
    /// that fails is counted and the other still runs.
    async fn bucket(&self, bucket: &str, rules: BucketRules, report: &mut LifecycleSummary) {
        let any =
            |wanted: fn(&LifecycleRule) -> bool| rules.rules.iter().any(|r| r.enabled && wanted(r));
        let versions = any(|r| r.expiration.is_some() || r.noncurrent.is_some());
        let uploads = any(|r| r.abort_incomplete_days.is_some());
        if versions
            && let Err(error) = self
                .versions(bucket, rules.generation.clone(), report)
                .await
        {
            tracing::warn!(bucket, %error, "lifecycle of a bucket's versions failed; next pass");
            report.failed += 1;
        }
        if uploads && let Err(error) = self.uploads(bucket, &rules.rules, report).await {
            tracing::warn!(bucket, %error, "lifecycle of a bucket's uploads failed; next pass");
            report.failed += 1;
        }
    }

    /// Walks every key's versions, newest first, one key at a time; the
    /// rules are read again after each page.
    async fn versions(
        &self,
        bucket: &str,
        generation: String,
        report: &mut LifecycleSummary,
    ) -> ModelResult<()> {
        let metadata = self.node.metadata();
        let mut request = ListRequest {
            prefix: String::new(),
            delimiter: None,
            start: ListStart::Beginning,
            max_keys: self.settings.page_entries.clamp(1, MAX_PAGE_ENTRIES),
        };
        let mut key_versions: Vec<ObjectVersion> = Vec::new();
        loop {
            let Some(rules) = self
                .rules_of(bucket)
                .await?
                .filter(|r| r.generation == generation)
            else {
                return Ok(());
            };
            let page = list_versions(metadata, bucket, &request).await?;
            for version in page.entries {
                if key_versions.first().is_some_and(|v| v.key != version.key) {
                    let versions = std::mem::take(&mut key_versions);
                    self.key(&rules, &versions, report).await;
                }
                // Each version once, whatever a page boundary did.
                if !key_versions.iter().any(|v| v.version == version.version) {
                    key_versions.push(version);
                }
            }
            // A page that ends inside a key resumes after its last version
            // (by its own id, null or not), as ListObjectVersions does.
            match (page.resume, key_versions.last()) {
                (Some(_), Some(last)) => {
                    request.start =
                        ListStart::AfterVersion(last.key.clone(), VersionRef::Id(last.version));
                }
                (Some(resume), None) => request.start = ListStart::Resume(resume),
                (None, _) => {
                    if !key_versions.is_empty() {
                        self.key(&rules, &key_versions, report).await;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Applies the rules to one key's versions, newest first (the first is
    /// its latest).
    async fn key(
        &self,
        rules: &BucketRules,
        versions: &[ObjectVersion],
        report: &mut LifecycleSummary,
    ) {
        let now = now_unix_ms();
        let day_ms = self.day_ms();
        let Some(latest) = versions.first() else {
            return;
        };
        let (bucket, key) = (&latest.bucket, &latest.key);
        let lone_marker = latest.body == VersionBody::DeleteMarker && versions.len() == 1;
        // The current version: expired once, by the first rule due.
        for rule in rules.rules.iter().filter(|r| applies(r, latest)) {
            let due = match (rule.expiration, &latest.body) {
                (Some(Expiration::Days(days)), VersionBody::Data { .. }) => {
                    self.is_due(due_after(written_at(latest), days, day_ms), now)
                }
                (Some(Expiration::Date(date)), VersionBody::Data { .. }) => self.is_due(date, now),
                // A delete marker with no version left below is removed by
                // ExpiredObjectDeleteMarker, and by an Expiration in days
                // (as S3 does).
                (
                    Some(Expiration::ExpiredDeleteMarkers | Expiration::Days(_)),
                    VersionBody::DeleteMarker,
                ) => lone_marker,
                _ => false,
            };
            if !due {
                continue;
            }
            let outcome = match latest.body {
                // Only while it is still the current object: the head's
                // compare-and-set decides it once.
                VersionBody::Data { .. } => {
                    let condition = DeleteCondition {
                        version: Some(latest.version),
                        ..DeleteCondition::default()
                    };
                    self.expire(latest, &condition, rules.versioning).await
                }
                VersionBody::DeleteMarker => self
                    .delete_exact(latest, true)
                    .await
                    .map(|deleted| deleted.then_some(markers_removed as Counter)),
            };
            self.count(outcome, bucket, key, report);
            break;
        }
        // Noncurrent versions: each became noncurrent when the version
        // above it was written.
        for (newer, (above, version)) in versions.iter().zip(versions.iter().skip(1)).enumerate() {
            let due = rules
                .rules
                .iter()
                .filter(|r| applies(r, version))
                .filter_map(|r| r.noncurrent)
                .any(|noncurrent| {
                    newer >= noncurrent.newer_versions as usize
                        && self.is_due(due_after(written_at(above), noncurrent.days, day_ms), now)
                });
            if !due {
                continue;
            }
            let outcome = self
                .delete_exact(version, false)
                .await
                .map(|deleted| deleted.then_some(noncurrent_expired as Counter));
            self.count(outcome, bucket, key, report);
        }
    }

    /// Deletes `latest` as a DELETE without a version id would, only
    /// while it is the current object; counted if this delete did it.
    async fn expire(
        &self,
        latest: &ObjectVersion,
        condition: &DeleteCondition,
        versioning: Versioning,
    ) -> ModelResult<Option<Counter>> {
        let (bucket, key) = (&latest.bucket, &latest.key);
        let deletion = self
            .index
            .delete(bucket, key, condition, versioning)
            .await?;
        Ok(deletion.changed.then_some(expired as Counter))
    }

    /// Deletes exactly the version the walk read (by its own id, null or
    /// not, so that a version written since is never the one deleted), if
    /// it still exists and is the current version when `current`, or not
    /// when not; through its lock guard, without the governance bypass.
    /// Whether it deleted it.
    async fn delete_exact(&self, seen: &ObjectVersion, current: bool) -> ModelResult<bool> {
        let (bucket, key) = (&seen.bucket, &seen.key);
        let metadata = self.node.metadata();
        let Some(RowValue::Version(row)) = metadata
            .read(vec![versions_row(bucket, key, &seen.version)])
            .await?
            .remove(0)
        else {
            return Ok(false);
        };
        if !row.exists(now_unix_ms()) {
            return Ok(false);
        }
        // The key's latest existing version (a head deleted by id has the
        // version below it latest again).
        let is_current = latest_version(metadata, bucket, key)
            .await?
            .is_some_and(|latest| latest.version == seen.version);
        if is_current != current {
            return Ok(false);
        }
        Ok(self
            .index
            .purge(*row, false)
            .await?
            .is_some_and(|(_, decided)| decided))
    }

    /// Counts what an action did: into its own counter (none when it found
    /// nothing to do), or as kept by a lock, or as failed.
    fn count(
        &self,
        outcome: ModelResult<Option<Counter>>,
        bucket: &str,
        key: &str,
        report: &mut LifecycleSummary,
    ) {
        match outcome {
            Ok(Some(counter)) => *counter(report) += 1,
            Ok(None) => {}
            Err(ModelError::AccessDenied(why)) => {
                tracing::debug!(bucket, key, %why, "lifecycle kept a locked version");
                report.kept_by_lock += 1;
            }
            Err(error) => {
                tracing::warn!(bucket, key, %error, "a lifecycle action failed; next pass");
                report.failed += 1;
            }
        }
    }

    /// Aborts the multipart uploads a rule says are too old.
    async fn uploads(
        &self,
        bucket: &str,
        rules: &[LifecycleRule],
        report: &mut LifecycleSummary,
    ) -> ModelResult<()> {
        let uploads = Uploads::new(self.node.metadata());
        let day_ms = self.day_ms();
        let mut marker: Option<(String, cairn_protocol::ids::UploadId)> = None;
        loop {
            let (page, more) = uploads
                .list_uploads(
                    bucket,
                    "",
                    marker.as_ref().map(|(k, _)| k.as_str()),
                    marker.as_ref().map(|(_, u)| u),
                    1000,
                )
                .await?;
            let now = now_unix_ms();
            for upload in &page {
                let due = rules
                    .iter()
                    .filter(|r| r.enabled && upload.key.starts_with(&r.prefix))
                    .filter_map(|r| r.abort_incomplete_days)
                    .any(|days| {
                        self.is_due(due_after(upload.record.started_unix_ms, days, day_ms), now)
                    });
                if !due {
                    continue;
                }
                match uploads
                    .abort(bucket, &upload.key, &upload.record.upload)
                    .await
                {
                    Ok(()) => report.uploads_aborted += 1,
                    // Completed or aborted meanwhile.
                    Err(ModelError::NoSuchUpload) => {}
                    Err(error) => {
                        tracing::warn!(bucket, key = upload.key, %error, "aborting an incomplete upload failed; next pass");
                        report.failed += 1;
                    }
                }
            }
            match page.last() {
                Some(last) if more => marker = Some((last.key.clone(), last.record.upload)),
                _ => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_counted_to_the_next_day_boundary() {
        let day = 86_400_000;
        // Created at 10:00 on day 0: one day later is midnight of day 2.
        assert_eq!(due_after(10 * 3_600_000, 1, day), 2 * day);
        // Created at midnight exactly: one day later, no rounding.
        assert_eq!(due_after(day, 1, day), 2 * day);
        // A test's day of 100 ms.
        assert_eq!(due_after(1_050, 3, 100), 1_400);
        // Far dates saturate: never due.
        assert_eq!(due_after(u64::MAX - 5, 10, day), u64::MAX);
    }
}
