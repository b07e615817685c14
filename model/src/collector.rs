//! The orphan collector (spec/gateway.md, "Collecting orphan fragments"):
//! fragments that no committed version will ever need — those of a PUT cut
//! off before it committed, of an aborted multipart upload, of a purged
//! version — are released to every node's trash once no write still in
//! flight can commit them.
//!
//! Every node runs one, for the bucket partitions it replicates. It finds
//! its work in its own replica (upload records of single PUTs, release
//! rows) and decides with quorum reads, so that replicas running it at
//! once only repeat idempotent steps.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use cairn_node::clock::now_unix_ms;
use cairn_node::meta::Metadata;
use cairn_node::release::{ReleaseCheck, SegmentPlaces, VersionLock};
use cairn_node::swarm::NodeHandle;
use cairn_protocol::ids::{FragmentId, NodeId, UploadId, VersionId};
use cairn_protocol::meta::{Partition, Register, RowKey, RowValue, Table, split_key_sort};
use cairn_protocol::records::{ReleaseRecord, ReleaseTarget, UploadRecord};
use cairn_protocol::version::{ObjectVersion, VersionBody};

use crate::buckets::check_bucket_name;
use crate::error::{ModelError, ModelResult};
use crate::heads::{existing_versions, read_head, read_manifest};
use crate::rows::{register, upload_row, versions_row};
use crate::uploads::Uploads;

/// The times the collector and every writer agree on. All nodes of a
/// cluster must use the same.
#[derive(Debug, Clone, Copy)]
pub struct Collection {
    /// A PUT, part or completion not committed this long after it began
    /// is refused, and pushes no more fragments.
    pub write_deadline: Duration,
    /// Allowance for clocks that differ between nodes and for messages
    /// delayed in the network.
    pub clock_margin: Duration,
    /// How often each node looks for work.
    pub every: Duration,
}

impl Default for Collection {
    fn default() -> Self {
        Self {
            // A 5 GiB PUT at 1 MB/s takes under 90 minutes.
            write_deadline: Duration::from_secs(6 * 3600),
            clock_margin: Duration::from_secs(3600),
            every: Duration::from_secs(600),
        }
    }
}

/// `[collection]` in a node's configuration file (every field optional);
/// every node of a cluster must use the same times.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectionSection {
    pub write_deadline_seconds: u64,
    pub clock_margin_seconds: u64,
    pub every_seconds: u64,
}

impl Default for CollectionSection {
    fn default() -> Self {
        let collection = Collection::default();
        Self {
            write_deadline_seconds: collection.write_deadline.as_secs(),
            clock_margin_seconds: collection.clock_margin.as_secs(),
            every_seconds: collection.every.as_secs(),
        }
    }
}

impl CollectionSection {
    pub fn collection(&self) -> Collection {
        Collection {
            write_deadline: Duration::from_secs(self.write_deadline_seconds.max(1)),
            clock_margin: Duration::from_secs(self.clock_margin_seconds),
            every: Duration::from_secs(self.every_seconds.max(1)),
        }
    }
}

impl Collection {
    /// How long after it became garbage (or its write began) a release
    /// waits: past every deadline a write in flight could still meet.
    fn grace_ms(&self) -> u64 {
        (self.write_deadline + self.clock_margin).as_millis() as u64
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Uploads whose fragments every node of the map moved to its trash.
    pub released: u64,
    /// Candidates found still in use by a committed version: nothing released.
    pub kept: u64,
    /// Releases some node did not confirm; tried again next pass.
    pub pending: u64,
}

/// The collector of one node; stops when dropped.
pub struct Collector {
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Starts the collector of `node`, and installs on the node the rule
    /// every release it is asked for must pass, with the same times.
    pub fn start(node: NodeHandle, collection: Collection) -> Self {
        node.install_release_rules(std::sync::Arc::new(ReleaseRule::new(collection)));
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(collection.every);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                match collect_once(&node, &collection).await {
                    Ok(collected) if collected == Collected::default() => {}
                    Ok(collected) => tracing::info!(?collected, "orphan collection pass"),
                    Err(error) => tracing::warn!(%error, "orphan collection pass failed"),
                }
            }
        });
        Self { task }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One pass over the bucket partitions this node replicates.
pub async fn collect_once(node: &NodeHandle, collection: &Collection) -> ModelResult<Collected> {
    let mut collected = Collected::default();
    let own = node.node_id();
    let mut after: Option<Partition> = None;
    loop {
        let (partitions, more) = node
            .metadata()
            .replica()
            .partitions(after.as_ref(), 64)
            .map_err(|e| ModelError::Internal(format!("replica: {e}")))?;
        for (partition, _) in &partitions {
            // A partition that moved away is the new replicas' to collect.
            if partition.is_cluster() || !node.metadata().replicas_of(partition)?.contains(&own) {
                continue;
            }
            if let Err(error) = collect_bucket(node, collection, partition, &mut collected).await {
                tracing::warn!(bucket = partition.as_str(), %error, "orphan collection of a bucket failed");
            }
        }
        match partitions.last() {
            Some((last, _)) if more => after = Some(last.clone()),
            _ => return Ok(collected),
        }
    }
}

/// A candidate: the fragments of `target` under `key`, and the row that
/// stands for the work until it is done.
struct Candidate {
    key: String,
    target: ReleaseTarget,
    row: RowKey,
}

async fn collect_bucket(
    node: &NodeHandle,
    collection: &Collection,
    partition: &Partition,
    collected: &mut Collected,
) -> ModelResult<()> {
    let bucket = partition.as_str();
    let ripe_before = now_unix_ms().saturating_sub(collection.grace_ms());
    let mut candidates = Vec::new();
    // Single PUTs whose upload record outlived every deadline: cut off.
    for (sort, record) in local_registers(node, partition, Table::Uploads)? {
        let Ok(record) = UploadRecord::decode(&record) else {
            continue;
        };
        let Some((key, _)) = split_key_sort(&sort) else {
            continue;
        };
        if !record.multipart && record.started_unix_ms < ripe_before {
            candidates.push(Candidate {
                key: key.to_owned(),
                target: ReleaseTarget::Upload(record.upload),
                row: upload_row(bucket, key, &record.upload),
            });
        }
    }
    // Aborted uploads and purged versions.
    for (sort, record) in local_registers(node, partition, Table::Releases)? {
        let Ok(record) = ReleaseRecord::decode(&record) else {
            continue;
        };
        let Some(key) = record.target.key_of(&sort) else {
            continue;
        };
        if record.since_unix_ms < ripe_before {
            candidates.push(Candidate {
                key: key.to_owned(),
                target: record.target,
                row: RowKey::new(partition.clone(), Table::Releases, sort.clone()),
            });
        }
    }
    for candidate in candidates {
        collect(node, bucket, candidate, collected).await?;
    }
    Ok(())
}

/// The live registers of one table of a partition in this node's replica.
fn local_registers(
    node: &NodeHandle,
    partition: &Partition,
    table: Table,
) -> ModelResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut registers = Vec::new();
    let mut start = Vec::new();
    loop {
        let page = node
            .metadata()
            .replica()
            .range(partition, table, &start, None, 1000)
            .map_err(|e| ModelError::Internal(format!("replica: {e}")))?;
        for (sort, value) in &page.rows {
            if let RowValue::Register(Register {
                value: Some(bytes), ..
            }) = value
            {
                registers.push((sort.clone(), bytes.clone()));
            }
        }
        match page.rows.last() {
            Some((last, _)) if page.more => {
                start = last.clone();
                start.push(0);
            }
            _ => return Ok(registers),
        }
    }
}

async fn collect(
    node: &NodeHandle,
    bucket: &str,
    candidate: Candidate,
    collected: &mut Collected,
) -> ModelResult<()> {
    let metadata = node.metadata();
    let uploads = match candidate.target {
        ReleaseTarget::Upload(upload) => vec![upload],
        ReleaseTarget::Manifest(id) => match read_manifest(metadata, bucket, &id).await? {
            Some(manifest) => {
                let mut uploads: Vec<UploadId> = std::iter::once(manifest.upload)
                    .chain(manifest.parts.iter().map(|p| p.upload))
                    .collect();
                uploads.sort_unstable();
                uploads.dedup();
                uploads
            }
            // Never written: its PUT failed before committing, and that
            // PUT's own upload record leads to its fragments.
            None => return forget(node, candidate.row).await,
        },
    };
    let Some(map) = node.cluster_map() else {
        return Err(ModelError::NoMap);
    };
    let mut confirmed = true;
    for upload in uploads {
        if in_use(metadata, bucket, &candidate.key, upload).await? {
            collected.kept += 1;
            continue;
        }
        let key = candidate.key.as_str();
        let releases = map.map.nodes.iter().map(|member| async move {
            let asked = tokio::time::timeout(
                RELEASE_TIMEOUT,
                node.release_upload(&member.id, upload, bucket, key),
            );
            match asked.await {
                // Fragments kept (a retention, or stored too recently for
                // the node to trust the release) are asked again later.
                Ok(Ok(released)) => released.held == 0,
                Ok(Err(error)) => {
                    tracing::debug!(node = %member.id, %upload, %error, "release not confirmed");
                    false
                }
                Err(_) => false,
            }
        });
        if futures::future::join_all(releases)
            .await
            .into_iter()
            .all(|done| done)
        {
            tracing::info!(bucket, key = candidate.key, %upload, "released the fragments of an upload no version uses");
            collected.released += 1;
        } else {
            collected.pending += 1;
            confirmed = false;
        }
    }
    if confirmed {
        forget(node, candidate.row).await?;
    }
    Ok(())
}

/// How long one node is given to answer a release.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a version of `key` that exists, or the key's head, was written
/// by `upload` (as the object's upload or one of its parts'). A head whose writer never wrote its version row out is
/// written out here: it is committed, and a GET should see it.
async fn in_use(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    upload: UploadId,
) -> ModelResult<bool> {
    let versions = existing_versions(metadata, bucket, key, None).await?;
    let head = read_head(metadata, bucket, key).await?;
    for version in &versions {
        if written_by(metadata, version, upload).await? {
            return Ok(true);
        }
    }
    // A purged head's version was deleted: it is no use.
    let Some(head) = head.filter(|h| h.purged.is_none()) else {
        return Ok(false);
    };
    if versions.iter().any(|v| v.version == head.version)
        || !written_by(metadata, &head, upload).await?
    {
        return Ok(false);
    }
    let already = metadata
        .read(vec![versions_row(bucket, key, &head.version)])
        .await?
        .remove(0);
    if already.is_none() {
        tracing::info!(bucket, key, version = %head.version, "writing out a committed head its writer left");
        metadata
            .write(vec![(
                versions_row(bucket, key, &head.version),
                RowValue::Version(Box::new(head)),
            )])
            .await?;
    }
    Ok(true)
}

async fn written_by(
    metadata: &Metadata,
    version: &ObjectVersion,
    upload: UploadId,
) -> ModelResult<bool> {
    let VersionBody::Data { manifest, .. } = &version.body else {
        return Ok(false);
    };
    Ok(read_manifest(metadata, &version.bucket, manifest)
        .await?
        .is_some_and(|m| m.upload == upload || m.parts.iter().any(|p| p.upload == upload)))
}

/// The open multipart upload of `key` that has `upload` among its part
/// attempts, if any: its completion may still choose that part.
async fn open_upload_with_part(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    upload: UploadId,
) -> ModelResult<Option<UploadId>> {
    let partition = Partition::bucket(bucket);
    let mut start = key.as_bytes().to_vec();
    start.push(0);
    let mut end = key.as_bytes().to_vec();
    end.push(1);
    loop {
        let page = metadata
            .range(&partition, Table::Uploads, &start, Some(&end), 256)
            .await?;
        for (_, value) in &page.rows {
            let RowValue::Register(Register {
                value: Some(bytes), ..
            }) = value
            else {
                continue;
            };
            let Ok(record) = UploadRecord::decode(bytes) else {
                continue;
            };
            if !record.multipart {
                continue;
            }
            let attempts = Uploads::new(metadata)
                .all_part_attempts(bucket, &record.upload)
                .await?;
            if attempts.iter().any(|a| a.record.upload == upload) {
                return Ok(Some(record.upload));
            }
        }
        match page.rows.last() {
            Some((last, _)) if page.more => {
                start = last.clone();
                start.push(0);
            }
            _ => return Ok(None),
        }
    }
}

/// Ends the work a row stood for.
async fn forget(node: &NodeHandle, row: RowKey) -> ModelResult<()> {
    let metadata = node.metadata();
    metadata
        .write(vec![(row, register(None, metadata.timestamp()))])
        .await?;
    Ok(())
}

/// The collector's rule, as every node checks it before it trashes an
/// upload's fragments on anyone's request (its own collector's included):
/// a ripe reason in the replicated metadata of the key — a release row of
/// the upload, or of a manifest that names it, or the intent record of a
/// single write that never committed, older than the grace period — and
/// no version or head of the key that uses the upload.
pub struct ReleaseRule {
    collection: Collection,
}

impl ReleaseRule {
    pub fn new(collection: Collection) -> Self {
        Self { collection }
    }

    async fn why_not(
        &self,
        metadata: &Metadata,
        bucket: &str,
        key: &str,
        upload: UploadId,
    ) -> ModelResult<Option<String>> {
        if let Err(why) = names_an_object(bucket, key) {
            return Ok(Some(why));
        }
        let ripe_before = now_unix_ms().saturating_sub(self.collection.grace_ms());
        if !self
            .ripe(metadata, bucket, key, upload, ripe_before)
            .await?
        {
            return Ok(Some(format!(
                "no release of upload {upload} under {bucket}/{key} is older than the grace period"
            )));
        }
        if in_use(metadata, bucket, key, upload).await? {
            return Ok(Some(format!(
                "a version of {bucket}/{key} uses upload {upload}"
            )));
        }
        if let Some(open) = open_upload_with_part(metadata, bucket, key, upload).await? {
            return Ok(Some(format!(
                "upload {upload} is a part of multipart upload {open} of {bucket}/{key}, which is still open"
            )));
        }
        Ok(None)
    }

    /// Whether the metadata holds a reason to release `upload`, ripe
    /// before `ripe_before`.
    async fn ripe(
        &self,
        metadata: &Metadata,
        bucket: &str,
        key: &str,
        upload: UploadId,
        ripe_before: u64,
    ) -> ModelResult<bool> {
        let partition = Partition::bucket(bucket);
        let intent = metadata
            .read(vec![upload_row(bucket, key, &upload)])
            .await?
            .remove(0);
        if let Some(RowValue::Register(Register {
            value: Some(bytes), ..
        })) = intent
            && let Ok(record) = UploadRecord::decode(&bytes)
            && !record.multipart
            && record.started_unix_ms < ripe_before
        {
            return Ok(true);
        }
        // The release rows under the key: of the upload itself, or of a
        // manifest (a purged version) that names it.
        let mut start = key.as_bytes().to_vec();
        start.push(0);
        let mut end = key.as_bytes().to_vec();
        end.push(1);
        loop {
            let page = metadata
                .range(&partition, Table::Releases, &start, Some(&end), 256)
                .await?;
            for (_, value) in &page.rows {
                let RowValue::Register(Register {
                    value: Some(bytes), ..
                }) = value
                else {
                    continue;
                };
                let Ok(record) = ReleaseRecord::decode(bytes) else {
                    continue;
                };
                if record.since_unix_ms >= ripe_before {
                    continue;
                }
                let names = match record.target {
                    ReleaseTarget::Upload(released) => released == upload,
                    ReleaseTarget::Manifest(id) => read_manifest(metadata, bucket, &id)
                        .await?
                        .is_some_and(|m| {
                            m.key == key
                                && (m.upload == upload
                                    || m.parts.iter().any(|p| p.upload == upload))
                        }),
                };
                if names {
                    return Ok(true);
                }
            }
            match page.rows.last() {
                Some((last, _)) if page.more => {
                    start = last.clone();
                    start.push(0);
                }
                _ => return Ok(false),
            }
        }
    }
}

/// A check's answer as a node takes it: a reason not to, or the metadata
/// that could not be read.
fn verdict<T>(why_not: ModelResult<Result<T, String>>) -> Result<T, String> {
    match why_not {
        Ok(answer) => answer,
        Err(error) => Err(format!("the metadata could not be checked: {error}")),
    }
}

/// Refuses a bucket and key no object can have.
fn names_an_object(bucket: &str, key: &str) -> Result<(), String> {
    if check_bucket_name(bucket).is_err() || key.is_empty() || key.contains('\0') {
        return Err(format!("{bucket:?}/{key:?} names no object"));
    }
    Ok(())
}

impl ReleaseCheck for ReleaseRule {
    fn check<'a>(
        &'a self,
        metadata: &'a Metadata,
        bucket: &'a str,
        key: &'a str,
        upload: UploadId,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let why_not = self.why_not(metadata, bucket, key, upload).await;
            verdict(why_not.map(|why| why.map_or(Ok(()), Err)))
        })
    }

    fn check_restore<'a>(
        &'a self,
        metadata: &'a Metadata,
        bucket: &'a str,
        key: &'a str,
        upload: UploadId,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            names_an_object(bucket, key)?;
            match in_use(metadata, bucket, key, upload).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!(
                    "no version of {bucket}/{key} that exists uses upload {upload}"
                )),
                Err(error) => Err(format!("the metadata could not be checked: {error}")),
            }
        })
    }

    fn check_drop<'a>(
        &'a self,
        metadata: &'a Metadata,
        bucket: &'a str,
        key: &'a str,
        version: VersionId,
        fragment: FragmentId,
        upload: UploadId,
        keeper: NodeId,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<SegmentPlaces>, String>> + Send + 'a>> {
        Box::pin(async move {
            names_an_object(bucket, key)?;
            let why_not = crate::repair::why_not_drop(
                metadata,
                bucket,
                key,
                version,
                fragment,
                upload,
                Some(keeper),
            );
            verdict(why_not.await)
        })
    }

    fn check_keep<'a>(
        &'a self,
        metadata: &'a Metadata,
        bucket: &'a str,
        key: &'a str,
        version: VersionId,
        fragment: FragmentId,
        upload: UploadId,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            names_an_object(bucket, key)?;
            let why_not =
                crate::repair::why_not_drop(metadata, bucket, key, version, fragment, upload, None);
            verdict(why_not.await).map(|_| ())
        })
    }

    fn check_lock<'a>(
        &'a self,
        metadata: &'a Metadata,
        bucket: &'a str,
        key: &'a str,
        version: VersionId,
        uploads: &'a [UploadId],
    ) -> Pin<Box<dyn Future<Output = Result<VersionLock, String>> + Send + 'a>> {
        Box::pin(async move {
            names_an_object(bucket, key)?;
            crate::fragment_locks::check_version_lock(metadata, bucket, key, version, uploads).await
        })
    }

    fn settle_ms(&self) -> u64 {
        self.collection.grace_ms()
    }
}
