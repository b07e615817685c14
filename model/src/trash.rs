//! The recoverable trash of object versions (spec/trash.md): a version
//! deleted or overwritten keeps its row (purged) and its manifest, and its
//! fragments wait in each node's trash; for the trash period it can be
//! brought back as the key's current object, with the same bytes, ETag,
//! headers and time.
//!
//! A purge is final in the metadata (a version's purge stamp only grows),
//! so a restore commits a copy of the version under a new version id: a
//! new manifest over the same fragments, its data key wrapped again for
//! the new id. Then every node brings the fragments back from its trash,
//! after checking that a version that exists uses them.

use std::collections::HashSet;
use std::time::Duration;

use cairn_node::clock::now_unix_ms;
use cairn_node::meta::Metadata;
use cairn_node::swarm::NodeHandle;
use cairn_protocol::hlc::Timestamp;
use cairn_protocol::ids::{FragmentId, NodeId, UploadId, VersionId};
use cairn_protocol::manifest::Manifest;
use cairn_protocol::meta::{Partition, RowValue, Table};
use cairn_protocol::version::{ObjectVersion, VersionBody};

use crate::error::{ModelError, ModelResult};
use crate::heads::{CommitRules, NewLock, ObjectIndex, WriteCondition, read_manifest};
use crate::kms::{DataKeys, Kms};
use crate::rows::{upload_row, versions_row};

/// A version in the trash: purged, and restorable until `purged_unix_ms`
/// plus the trash period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashedVersion {
    pub bucket: String,
    pub key: String,
    pub version: VersionId,
    pub purged_unix_ms: u64,
    pub created: Timestamp,
    pub size_bytes: u64,
    pub etag: String,
}

impl TrashedVersion {
    fn of(version: &ObjectVersion, period_ms: u64, now_unix_ms: u64) -> Option<Self> {
        let purged = version.purged?.hlc.unix_ms();
        let VersionBody::Data {
            size_bytes, etag, ..
        } = &version.body
        else {
            return None;
        };
        (purged.saturating_add(period_ms) > now_unix_ms).then(|| Self {
            bucket: version.bucket.clone(),
            key: version.key.clone(),
            version: version.version,
            purged_unix_ms: purged,
            created: version.created,
            size_bytes: *size_bytes,
            etag: etag.clone(),
        })
    }
}

/// The versions of `bucket` purged less than `period` ago, in key order.
pub async fn list(
    metadata: &Metadata,
    bucket: &str,
    period: Duration,
) -> ModelResult<Vec<TrashedVersion>> {
    let (period_ms, now) = (period.as_millis() as u64, now_unix_ms());
    let partition = Partition::bucket(bucket);
    let mut trashed = Vec::new();
    let mut start = Vec::new();
    loop {
        let page = metadata
            .range(&partition, Table::Versions, &start, None, 256)
            .await?;
        for (_, value) in &page.rows {
            if let RowValue::Version(version) = value
                && let Some(entry) = TrashedVersion::of(version, period_ms, now)
            {
                trashed.push(entry);
            }
        }
        match page.rows.last() {
            Some((last, _)) if page.more => {
                start = last.clone();
                start.push(0);
            }
            _ => return Ok(trashed),
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The key's current object now: a copy of the trashed version.
    pub version: ObjectVersion,
    /// Fragments the nodes brought back from their trash.
    pub fragments_restored: u64,
    /// Nodes of the map that did not confirm (their fragments, if any,
    /// are rebuilt by repair while enough others are whole).
    pub nodes_not_confirmed: Vec<NodeId>,
    /// The version's segments by fragments found live afterwards: whole,
    /// short of some (repair rebuilds them), unreadable (fewer than k).
    pub segments_whole: u64,
    pub segments_degraded: u64,
    pub segments_unreadable: u64,
}

/// How long a node is given to bring an upload's fragments back.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Brings `version` of `bucket`/`key` back from the trash as the key's
/// current object (the object it replaces goes to the trash in turn).
/// Refused unless the version was purged less than `period` ago and holds
/// data.
pub async fn restore(
    node: &NodeHandle,
    kms: &Kms,
    bucket: &str,
    key: &str,
    version: VersionId,
    period: Duration,
) -> ModelResult<Restored> {
    let metadata = node.metadata();
    let row = metadata
        .read(vec![versions_row(bucket, key, &version)])
        .await?
        .remove(0);
    let Some(RowValue::Version(trashed)) = row else {
        return Err(ModelError::InvalidArgument(format!(
            "{bucket}/{key} has no version {version} in the trash: it never existed, or its trash period is over and it is purged"
        )));
    };
    let Some(purged) = trashed.purged else {
        return Err(ModelError::InvalidArgument(format!(
            "version {version} of {bucket}/{key} is not in the trash: it was never deleted"
        )));
    };
    let VersionBody::Data {
        manifest, headers, ..
    } = &trashed.body
    else {
        return Err(ModelError::InvalidArgument(format!(
            "version {version} of {bucket}/{key} is a delete marker: there is nothing to restore"
        )));
    };
    if TrashedVersion::of(&trashed, period.as_millis() as u64, now_unix_ms()).is_none() {
        return Err(ModelError::InvalidArgument(format!(
            "version {version} of {bucket}/{key} was deleted at {} (Unix ms), more than the trash period of {} s ago: it is purged",
            purged.hlc.unix_ms(),
            period.as_secs()
        )));
    }
    let old = read_manifest(metadata, bucket, manifest)
        .await?
        .ok_or_else(|| ModelError::Corrupt(format!("manifest {manifest} is missing")))?;
    if (&old.bucket, &old.key, old.version) != (&trashed.bucket, &trashed.key, trashed.version) {
        return Err(ModelError::Corrupt(format!(
            "manifest {manifest} belongs to another object"
        )));
    }
    let keys = DataKeys::of_manifest(kms, &old).await?;
    let index = ObjectIndex::new(node.clone(), RESTORE_TIMEOUT, 0);
    let mut copy = old.clone();
    copy.version = index.new_version();
    copy.writer = node.node_id();
    copy.encryption = keys.envelope(bucket, key, copy.version);
    let upload = copy.upload;
    let versioning = crate::buckets::versioning_of(metadata, bucket).await?;
    let restored = index
        .commit(
            copy.clone(),
            &keys,
            headers.clone(),
            upload_row(bucket, key, &upload),
            CommitRules {
                condition: &WriteCondition::Always,
                deadline_unix_ms: index.write_deadline(now_unix_ms()),
                created: Some(trashed.created),
                versioning,
                // A version comes back from the trash without a lock: a
                // locked version never reaches it.
                lock: NewLock::default(),
            },
        )
        .await?;
    tracing::info!(bucket, key, from = %version, to = %restored.version, "restored a version from the trash");
    let (fragments_restored, nodes_not_confirmed) = bring_back(node, bucket, key, &old).await?;
    let (whole, degraded, unreadable) = count_segments(node, &old).await?;
    Ok(Restored {
        version: restored,
        fragments_restored,
        nodes_not_confirmed,
        segments_whole: whole,
        segments_degraded: degraded,
        segments_unreadable: unreadable,
    })
}

/// Asks every node of the map to bring the manifest's uploads back from
/// its trash; returns how many fragments came back and who did not answer.
async fn bring_back(
    node: &NodeHandle,
    bucket: &str,
    key: &str,
    manifest: &Manifest,
) -> ModelResult<(u64, Vec<NodeId>)> {
    let map = node.cluster_map().ok_or(ModelError::NoMap)?;
    let mut uploads: Vec<UploadId> = std::iter::once(manifest.upload)
        .chain(manifest.parts.iter().map(|p| p.upload))
        .collect();
    uploads.sort_unstable();
    uploads.dedup();
    let asks = map.map.nodes.iter().map(|member| {
        let uploads = &uploads;
        async move {
            let mut restored = 0u64;
            for upload in uploads {
                let asked = tokio::time::timeout(
                    RESTORE_TIMEOUT,
                    node.restore_upload(&member.id, *upload, bucket, key),
                );
                match asked.await {
                    Ok(Ok(n)) => restored = u64::saturating_add(restored, n),
                    Ok(Err(error)) => {
                        tracing::warn!(node = %member.id, %upload, %error, "restore not confirmed");
                        return (restored, Some(member.id));
                    }
                    Err(_) => return (restored, Some(member.id)),
                }
            }
            (restored, None)
        }
    });
    let mut total = 0u64;
    let mut not_confirmed = Vec::new();
    for (restored, failed) in futures::future::join_all(asks).await {
        total = u64::saturating_add(total, restored);
        not_confirmed.extend(failed);
    }
    Ok((total, not_confirmed))
}

/// The manifest's segments by the fragments the nodes of the map hold
/// live: (whole, degraded, unreadable).
async fn count_segments(node: &NodeHandle, manifest: &Manifest) -> ModelResult<(u64, u64, u64)> {
    let map = node.cluster_map().ok_or(ModelError::NoMap)?;
    let ids: Vec<FragmentId> = manifest.fragment_ids().collect();
    let mut live: HashSet<FragmentId> = HashSet::new();
    for member in &map.map.nodes {
        for chunk in ids.chunks(cairn_protocol::wire::MAX_HAVE_IDS) {
            let asked = tokio::time::timeout(RESTORE_TIMEOUT, node.have(&member.id, chunk));
            if let Ok(Ok(held)) = asked.await {
                live.extend(
                    chunk
                        .iter()
                        .zip(held)
                        .filter(|(_, h)| *h)
                        .map(|(id, _)| *id),
                );
            }
        }
    }
    let k = manifest.layout.scheme.data();
    let (mut whole, mut degraded, mut unreadable) = (0, 0, 0);
    for segment in manifest.parts.iter().flat_map(|p| p.segments.iter()) {
        let held = segment
            .fragments
            .iter()
            .filter(|id| live.contains(id))
            .count();
        if held == segment.fragments.len() {
            whole += 1;
        } else if held >= k {
            degraded += 1;
        } else {
            unreadable += 1;
        }
    }
    Ok((whole, degraded, unreadable))
}
