//! Object Lock down to the storage nodes (spec/versioning.md, "Locks on the
//! nodes"): the fragments of a version under a compliance retention or a
//! legal hold are locked on the nodes that hold them, which then refuse to
//! trash them whatever they are asked. A node takes a lock only as far as
//! the replicated metadata states it, so the lock asked for an upload is
//! always the one its versions state together.

use std::collections::BTreeSet;
use std::time::Duration;

use cairn_node::meta::Metadata;
use cairn_node::swarm::NodeHandle;
use cairn_protocol::ids::{NodeId, UploadId};
use cairn_protocol::manifest::Manifest;
use cairn_protocol::placement::{Placer, segment_placement_key};
use cairn_protocol::version::{ObjectVersion, RetentionMode, VersionBody};
use cairn_protocol::wire::FragmentLock;

use crate::error::{ModelError, ModelResult};
use crate::heads::{existing_versions, read_head, read_manifest};

/// How long one node is given to answer a lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `version` has, or ever had, a lock the nodes keep: a
/// compliance retention (expired or not), or a legal hold, set now or
/// changed since the version was written. Repair spreads the locks of such
/// versions again on every pass, so a node that missed a change catches
/// up, a cleared legal hold included.
pub fn has_node_lock(version: &ObjectVersion) -> bool {
    version.retention.mode == RetentionMode::Compliance
        || version.legal_hold.value
        || version.legal_hold.at > version.created
}

/// The lock `version` alone puts on its fragments.
fn lock_of(version: &ObjectVersion) -> FragmentLock {
    FragmentLock {
        compliance_until_unix_ms: match version.retention.mode {
            RetentionMode::Compliance => version.retention.retain_until_unix_ms,
            _ => 0,
        },
        legal_hold: version.legal_hold.value,
    }
}

/// The lock the versions of `bucket`/`key` that exist (and its head, if
/// its row was never written out) put together on the fragments of
/// `upload`: the latest compliance date of those that use it, and whether
/// any of them is under a legal hold. What a node checks a lock against.
pub async fn lock_of_upload(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    upload: UploadId,
) -> ModelResult<FragmentLock> {
    let mut versions = existing_versions(metadata, bucket, key, None).await?;
    if let Some(head) = read_head(metadata, bucket, key).await?
        && head.purged.is_none()
        && !versions.iter().any(|v| v.version == head.version)
    {
        versions.push(head);
    }
    let mut lock = FragmentLock::default();
    for version in versions.iter().filter(|v| has_node_lock(v)) {
        let VersionBody::Data { manifest, .. } = &version.body else {
            continue;
        };
        let uses = read_manifest(metadata, bucket, manifest)
            .await?
            .is_some_and(|m| m.key == key && uploads_of(&m).contains(&upload));
        if uses {
            let own = lock_of(version);
            lock.compliance_until_unix_ms = lock
                .compliance_until_unix_ms
                .max(own.compliance_until_unix_ms);
            lock.legal_hold |= own.legal_hold;
        }
    }
    Ok(lock)
}

/// Every upload whose fragments `manifest` uses.
pub fn uploads_of(manifest: &Manifest) -> BTreeSet<UploadId> {
    std::iter::once(manifest.upload)
        .chain(manifest.parts.iter().map(|p| p.upload))
        .collect()
}

/// What spreading a version's locks did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Spread {
    /// Fragments the nodes asked said they hold under the lock.
    pub fragments: u64,
    /// Nodes that did not confirm (down, or refused); repair asks again.
    pub not_confirmed: Vec<NodeId>,
}

/// Asks the nodes placement takes for the segments of `manifest` (the
/// version of `bucket`/`key` it belongs to) to lock its uploads'
/// fragments as the key's versions state together. Copies elsewhere
/// (a write that fell back to a spare) are locked by repair, which asks
/// every node it finds holding a fragment.
pub async fn spread(
    node: &NodeHandle,
    bucket: &str,
    key: &str,
    manifest: &Manifest,
) -> ModelResult<Spread> {
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
    // A node not connected now is not waited for (a write would take its
    // whole deadline): repair locks its fragments once it is back.
    let (reachable, away): (Vec<NodeId>, Vec<NodeId>) = nodes
        .into_iter()
        .partition(|n| *n == node.node_id() || node.is_member(n));
    let mut asks = Vec::new();
    for upload in uploads_of(manifest) {
        let lock = lock_of_upload(node.metadata(), bucket, key, upload).await?;
        asks.extend(reachable.iter().map(move |n| (*n, upload, lock)));
    }
    let mut spread = ask(node, bucket, key, asks).await;
    spread.not_confirmed.extend(away);
    Ok(spread)
}

/// Sends each (node, upload, lock) of `asks` at once.
pub(crate) async fn ask(
    node: &NodeHandle,
    bucket: &str,
    key: &str,
    asks: Vec<(NodeId, UploadId, FragmentLock)>,
) -> Spread {
    let answers = asks.into_iter().map(|(to, upload, lock)| async move {
        let asked = tokio::time::timeout(
            LOCK_TIMEOUT,
            node.lock_fragments(&to, upload, bucket, key, lock),
        );
        match asked.await {
            Ok(Ok(fragments)) => (to, Some(fragments)),
            Ok(Err(error)) => {
                tracing::warn!(node = %to, bucket, key, %upload, %error, "a node did not lock a version's fragments");
                (to, None)
            }
            Err(_) => {
                tracing::warn!(node = %to, bucket, key, %upload, "a node did not answer a lock in time");
                (to, None)
            }
        }
    });
    let mut spread = Spread::default();
    for (to, answer) in futures::future::join_all(answers).await {
        match answer {
            Some(fragments) => spread.fragments = spread.fragments.saturating_add(fragments),
            None if !spread.not_confirmed.contains(&to) => spread.not_confirmed.push(to),
            None => {}
        }
    }
    spread
}
