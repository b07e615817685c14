//! Object Lock down to the storage nodes (spec/versioning.md, "Locks on the
//! nodes"): the fragments of a version under a compliance retention or a
//! legal hold are locked on the nodes that hold them, which then refuse to
//! trash them whatever they are asked. A node takes a lock only as far as
//! the version it names states it in the replicated metadata, and a lock
//! only ever moves later: a compliance date is kept until it passes, a
//! legal hold is a lease that repair renews while the hold is on and that
//! runs out once it is lifted.

use std::collections::BTreeSet;
use std::time::Duration;

use cairn_node::clock::now_unix_ms;
use cairn_node::meta::Metadata;
use cairn_node::release::VersionLock;
use cairn_node::swarm::NodeHandle;
use cairn_protocol::ids::{NodeId, UploadId, VersionId};
use cairn_protocol::manifest::Manifest;
use cairn_protocol::meta::RowValue;
use cairn_protocol::placement::{Placer, segment_placement_key};
use cairn_protocol::version::{ObjectVersion, RetentionMode, VersionBody};
use cairn_protocol::wire::{FragmentLock, MAX_LOCK_UPLOADS};
use futures::StreamExt;

use crate::error::{ModelError, ModelResult};
use crate::heads::{read_head, read_manifest};
use crate::rows::versions_row;

/// How long a gateway waits for a node to lock a version's fragments
/// before it answers (a node that does not is locked by repair).
pub const GATEWAY_LOCK_WAIT: Duration = Duration::from_secs(5);
/// Lock exchanges one caller has in flight at once.
const LOCKS_AT_ONCE: usize = 16;

/// The lock `version` puts on its fragments at `now_unix_ms`: its
/// compliance date, and a legal hold's lease from now.
pub fn lock_of(version: &ObjectVersion, now_unix_ms: u64) -> FragmentLock {
    FragmentLock {
        compliance_until_unix_ms: match version.retention.mode {
            RetentionMode::Compliance => version.retention.retain_until_unix_ms,
            _ => 0,
        },
        legal_hold_until_unix_ms: if version.legal_hold.value {
            FragmentLock::legal_hold_lease_end(now_unix_ms)
        } else {
            0
        },
    }
}

/// Whether `version` has a lock its fragments' holders keep at `now`.
pub fn has_node_lock(version: &ObjectVersion, now_unix_ms: u64) -> bool {
    lock_of(version, now_unix_ms).holds(now_unix_ms)
}

/// Every upload whose fragments `manifest` uses.
pub fn uploads_of(manifest: &Manifest) -> BTreeSet<UploadId> {
    std::iter::once(manifest.upload)
        .chain(manifest.parts.iter().map(|p| p.upload))
        .collect()
}

/// What the replicated metadata says `version` of `bucket`/`key` locks
/// of `uploads`: its compliance date (0 without one) and whether it is
/// under a legal hold, if it exists and its manifest uses every one of
/// them; else why not. What a node checks a lock against.
pub async fn check_version_lock(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    version: VersionId,
    uploads: &[UploadId],
) -> Result<VersionLock, String> {
    let unreadable = |error: ModelError| format!("the metadata could not be checked: {error}");
    let row = match metadata
        .read(vec![versions_row(bucket, key, &version)])
        .await
        .map_err(|e| unreadable(e.into()))?
        .remove(0)
    {
        Some(RowValue::Version(row)) => Some(*row),
        _ => None,
    };
    // A head whose writer has not written its row out yet is committed.
    let row = match row {
        Some(row) => row,
        None => read_head(metadata, bucket, key)
            .await
            .map_err(unreadable)?
            .filter(|head| head.version == version)
            .ok_or_else(|| format!("version {version} of {bucket}/{key} does not exist"))?,
    };
    if (&row.bucket, &row.key) != (&bucket.to_owned(), &key.to_owned())
        || !row.exists(now_unix_ms())
    {
        return Err(format!(
            "version {version} of {bucket}/{key} does not exist"
        ));
    }
    let VersionBody::Data { manifest, .. } = &row.body else {
        return Err(format!("version {version} of {bucket}/{key} holds no data"));
    };
    let manifest = read_manifest(metadata, bucket, manifest)
        .await
        .map_err(unreadable)?
        .ok_or_else(|| format!("the manifest of version {version} of {bucket}/{key} is missing"))?;
    let used = uploads_of(&manifest);
    if (manifest.key.as_str(), manifest.version) != (key, version)
        || uploads.iter().any(|u| !used.contains(u))
    {
        return Err(format!(
            "version {version} of {bucket}/{key} does not use every upload named"
        ));
    }
    let compliance = match row.retention.mode {
        RetentionMode::Compliance => row.retention.retain_until_unix_ms,
        _ => 0,
    };
    Ok(VersionLock {
        compliance_until_unix_ms: compliance,
        legal_hold: row.legal_hold.value,
    })
}

/// What spreading a version's lock did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Spread {
    /// Fragments the nodes asked said they hold under the lock.
    pub fragments: u64,
    /// Nodes that did not confirm (away, slow, or refused); repair asks
    /// again.
    pub not_confirmed: Vec<NodeId>,
}

/// Asks the connected nodes placement takes for the segments of
/// `manifest` (of `version`) to lock its fragments as `version` states,
/// waiting `wait` at most for each. Copies elsewhere (a write that fell
/// back to a spare) are locked by repair, which asks every node it finds
/// holding a fragment.
pub async fn spread(
    node: &NodeHandle,
    version: &ObjectVersion,
    manifest: &Manifest,
    wait: Duration,
) -> ModelResult<Spread> {
    let now = now_unix_ms();
    let lock = lock_of(version, now);
    if !lock.holds(now) {
        return Ok(Spread::default());
    }
    let signed = node.cluster_map().ok_or(ModelError::NoMap)?;
    let (map, tolerance, scheme) = (signed.map.clone(), signed.tolerance, manifest.layout.scheme);
    let keys: Vec<_> = manifest
        .parts
        .iter()
        .flat_map(|p| p.segments.iter())
        .map(|s| segment_placement_key(&s.fragments))
        .collect();
    // Placement over many segments is CPU work: off the runtime.
    let nodes = tokio::task::spawn_blocking(move || {
        let placer = Placer::new(&map, scheme, tolerance)
            .map_err(|e| ModelError::Internal(format!("placement: {e}")))?;
        Ok::<_, ModelError>(
            keys.iter()
                .flat_map(|k| placer.place(k))
                .collect::<BTreeSet<NodeId>>(),
        )
    })
    .await
    .map_err(|e| ModelError::Internal(e.to_string()))??;
    // A node not connected now is not waited for: repair locks its
    // fragments once it is back.
    let (reachable, away): (Vec<NodeId>, Vec<NodeId>) = nodes
        .into_iter()
        .partition(|n| *n == node.node_id() || node.is_member(n));
    let uploads: Vec<UploadId> = uploads_of(manifest).into_iter().collect();
    let mut spread = ask(
        node,
        version,
        lock,
        reachable
            .into_iter()
            .map(|n| (n, uploads.clone()))
            .collect(),
        wait,
    )
    .await;
    spread.not_confirmed.extend(away);
    Ok(spread)
}

/// Asks each node of `asks` to lock its uploads of `version` under `lock`
/// (in messages of at most [`MAX_LOCK_UPLOADS`] uploads), a few at once,
/// each waited for `wait` at most.
pub(crate) async fn ask(
    node: &NodeHandle,
    version: &ObjectVersion,
    lock: FragmentLock,
    asks: Vec<(NodeId, Vec<UploadId>)>,
    wait: Duration,
) -> Spread {
    let (bucket, key, id) = (&version.bucket, &version.key, version.version);
    let messages = asks.into_iter().flat_map(|(to, uploads)| {
        uploads
            .chunks(MAX_LOCK_UPLOADS)
            .map(|chunk| (to, chunk.to_vec()))
            .collect::<Vec<_>>()
    });
    let answers: Vec<(NodeId, Option<u64>)> = futures::stream::iter(messages)
        .map(|(to, uploads)| async move {
            let asked = tokio::time::timeout(
                wait,
                node.lock_fragments(&to, &uploads, bucket, key, id, lock),
            );
            match asked.await {
                Ok(Ok(fragments)) => (to, Some(fragments)),
                Ok(Err(error)) => {
                    tracing::warn!(node = %to, bucket, key, version = %id, %error, "a node did not lock a version's fragments");
                    (to, None)
                }
                Err(_) => {
                    tracing::warn!(node = %to, bucket, key, version = %id, "a node did not answer a lock in time");
                    (to, None)
                }
            }
        })
        .buffer_unordered(LOCKS_AT_ONCE)
        .collect()
        .await;
    let mut spread = Spread::default();
    for (to, answer) in answers {
        match answer {
            Some(fragments) => spread.fragments = spread.fragments.saturating_add(fragments),
            None if !spread.not_confirmed.contains(&to) => spread.not_confirmed.push(to),
            None => {}
        }
    }
    spread
}
