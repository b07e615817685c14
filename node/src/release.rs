//! Who decides that an upload's fragments may go to the trash: the rules
//! of the metadata above the node (the orphan collector's), installed by
//! whoever runs the node. The node asks them before it trashes anything,
//! for a peer's release and its own alike, so that no member can have a
//! live object's fragments trashed on its word alone.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use cairn_protocol::ids::{FragmentId, NodeId, UploadId, VersionId};
use cairn_protocol::wire::{
    FragmentLock, LEGAL_HOLD_LEASE_MS, LEGAL_HOLD_LEASE_STEP_MS, ObjectKeyDigest,
};

use crate::meta::Metadata;

/// The check a release must pass: `Ok` when the replicated metadata shows
/// that the fragments of `upload`, written under `key` of `bucket`, are
/// no longer needed; else why not.
pub trait ReleaseCheck: Send + Sync {
    fn check<'a>(
        &'a self,
        metadata: &'a Metadata,
        bucket: &'a str,
        key: &'a str,
        upload: UploadId,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

    /// The check a restore must pass: `Ok` when a version of `key` that
    /// exists uses `upload`, so that its fragments are needed again.
    fn check_restore<'a>(
        &'a self,
        metadata: &'a Metadata,
        bucket: &'a str,
        key: &'a str,
        upload: UploadId,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

    /// The check a drop of this node's copy of `fragment` must pass: `Ok`
    /// when `fragment` is in `version` of `bucket`/`key` as written by
    /// `upload`, and placement under this node's map names `keeper` for it
    /// and not this node.
    /// On `Ok`, every segment the fragment is used in, with the nodes
    /// placement takes for it: the holder checks each is whole on them
    /// before it drops.
    #[allow(clippy::too_many_arguments)]
    fn check_drop<'a>(
        &'a self,
        metadata: &'a Metadata,
        bucket: &'a str,
        key: &'a str,
        version: VersionId,
        fragment: FragmentId,
        upload: UploadId,
        keeper: NodeId,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<SegmentPlaces>, String>> + Send + 'a>>;

    /// The check a keeper named in a drop must pass before it shows the
    /// fragment: `Ok` when `fragment` is in `version` of `bucket`/`key` as
    /// written by `upload` and placement under this node's map names this
    /// node for it wherever that upload uses it.
    fn check_keep<'a>(
        &'a self,
        metadata: &'a Metadata,
        bucket: &'a str,
        key: &'a str,
        version: VersionId,
        fragment: FragmentId,
        upload: UploadId,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

    /// The lock `version` of `bucket`/`key` puts on the fragments of
    /// `uploads` by the replicated metadata: `Ok` only if the version
    /// exists and its manifest uses every one of them; its compliance date
    /// (0 without one), and whether it is under a legal hold.
    fn check_lock<'a>(
        &'a self,
        metadata: &'a Metadata,
        bucket: &'a str,
        key: &'a str,
        version: VersionId,
        uploads: &'a [UploadId],
    ) -> Pin<Box<dyn Future<Output = Result<VersionLock, String>> + Send + 'a>>;

    /// How long after a fragment is stored here a release may trash it:
    /// the longest a write may take to commit, plus a margin. Measured by
    /// this node's own clock, which no peer can set, it keeps the
    /// fragments of a write still on its way whatever the metadata says.
    fn settle_ms(&self) -> u64;
}

/// The lock a version states in the replicated metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VersionLock {
    /// Its compliance retention's date (0 without one).
    pub compliance_until_unix_ms: u64,
    pub legal_hold: bool,
}

/// The rules a node holds, once installed, and the locks that put its
/// releases, restores and drops of one upload's fragments in one order: a
/// release checked before a version was restored trashes before the
/// restore brings back.
#[derive(Clone, Default)]
pub(crate) struct ReleaseRules {
    installed: Arc<RwLock<Option<Arc<dyn ReleaseCheck>>>>,
    pub(crate) order: Arc<KeyedOrder>,
}

/// One async lock per (upload, object) in use. The guard is owned: the
/// blocking step that changes the store takes it along, so that a request
/// dropped mid-way (a deadline) cannot let the next one in before its
/// change is committed.
#[derive(Default)]
pub(crate) struct KeyedOrder {
    locks: std::sync::Mutex<HashMap<OrderKey, Arc<tokio::sync::Mutex<()>>>>,
}

type OrderKey = (UploadId, ObjectKeyDigest);

impl KeyedOrder {
    pub(crate) async fn lock(
        &self,
        upload: UploadId,
        object: ObjectKeyDigest,
    ) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().expect("order locks");
            // Locks nobody holds or waits for go.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            locks.entry((upload, object)).or_default().clone()
        };
        lock.lock_owned().await
    }
}

impl ReleaseRules {
    pub(crate) fn install(&self, rules: Arc<dyn ReleaseCheck>) {
        *self.installed.write().expect("release rules lock") = Some(rules);
    }

    fn get(&self) -> Option<Arc<dyn ReleaseCheck>> {
        self.installed.read().expect("release rules lock").clone()
    }

    /// The installed rules' grace, if any are installed.
    pub(crate) fn settle_ms(&self) -> Option<u64> {
        self.get().map(|rules| rules.settle_ms())
    }
}

/// Whether the installed rules let `upload` go, and then how long its
/// fragments must have been stored here to go; a node without rules lets
/// nothing go.
pub(crate) async fn may_release(
    rules: &ReleaseRules,
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    upload: UploadId,
) -> Result<u64, String> {
    match rules.get() {
        Some(rules) => {
            rules.check(metadata, bucket, key, upload).await?;
            Ok(rules.settle_ms())
        }
        None => Err("this node has no metadata rules to check a release against".into()),
    }
}

/// A segment's fragments and the nodes placement takes for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentPlaces {
    pub placed: Vec<NodeId>,
    pub fragments: Vec<FragmentId>,
}

impl SegmentPlaces {
    /// Whether the fragments can be matched one to one with distinct nodes
    /// of the set holding them (`held[n]`: which fragments `placed[n]`
    /// says it holds): the segment is whole on its placed nodes, counting
    /// any node once whatever it holds.
    pub fn whole_on(&self, held: &[Vec<bool>]) -> bool {
        let fragments = self.fragments.len();
        // Kuhn's augmenting paths: at most 32 fragments and nodes.
        let mut node_of: Vec<Option<usize>> = vec![None; fragments];
        fn augment(
            node: usize,
            held: &[Vec<bool>],
            node_of: &mut [Option<usize>],
            seen: &mut [bool],
        ) -> bool {
            for fragment in 0..node_of.len() {
                if held[node].get(fragment).copied().unwrap_or(false) && !seen[fragment] {
                    seen[fragment] = true;
                    let free = match node_of[fragment] {
                        None => true,
                        Some(other) => augment(other, held, node_of, seen),
                    };
                    if free {
                        node_of[fragment] = Some(node);
                        return true;
                    }
                }
            }
            false
        }
        let mut matched = 0;
        for node in 0..held.len().min(self.placed.len()) {
            let mut seen = vec![false; fragments];
            if augment(node, held, &mut node_of, &mut seen) {
                matched += 1;
            }
        }
        matched == fragments
    }
}

/// Whether the installed rules let this node drop its copy of `fragment`;
/// the segments to find whole on their placed nodes first.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn may_drop(
    rules: &ReleaseRules,
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    version: VersionId,
    fragment: FragmentId,
    upload: UploadId,
    keeper: NodeId,
) -> Result<Vec<SegmentPlaces>, String> {
    match rules.get() {
        Some(rules) => {
            rules
                .check_drop(metadata, bucket, key, version, fragment, upload, keeper)
                .await
        }
        None => Err("this node has no metadata rules to check a drop against".into()),
    }
}

/// Whether the installed rules say this node keeps `fragment` at its place.
pub(crate) async fn may_keep(
    rules: &ReleaseRules,
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    version: VersionId,
    fragment: FragmentId,
    upload: UploadId,
) -> Result<(), String> {
    match rules.get() {
        Some(rules) => {
            rules
                .check_keep(metadata, bucket, key, version, fragment, upload)
                .await
        }
        None => Err("this node has no metadata rules to check a keep against".into()),
    }
}

/// Whether the installed rules justify `asked` on the fragments of
/// `uploads`: `version` uses them, and states a compliance date no earlier
/// than the one asked, and a legal hold if a lease is asked (no longer than
/// a lease from now, by this node's clock, plus a step and a margin).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn may_lock(
    rules: &ReleaseRules,
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    version: VersionId,
    uploads: &[UploadId],
    asked: FragmentLock,
    now_unix_ms: u64,
) -> Result<(), String> {
    /// Clocks of the asking node and this one may differ by this much.
    const CLOCK_MARGIN_MS: u64 = 3600 * 1000;
    let Some(rules) = rules.get() else {
        return Err("this node has no metadata rules to check a lock against".into());
    };
    let VersionLock {
        compliance_until_unix_ms: compliance_until,
        legal_hold,
    } = rules
        .check_lock(metadata, bucket, key, version, uploads)
        .await?;
    if asked.compliance_until_unix_ms > compliance_until {
        return Err(format!(
            "a compliance retention until {} (Unix ms) was asked, and version {version} of {bucket}/{key} states {}",
            asked.compliance_until_unix_ms,
            if compliance_until == 0 {
                "none".to_owned()
            } else {
                format!("{compliance_until}")
            }
        ));
    }
    let longest_lease = now_unix_ms
        .saturating_add(LEGAL_HOLD_LEASE_MS + LEGAL_HOLD_LEASE_STEP_MS + CLOCK_MARGIN_MS);
    if asked.legal_hold_until_unix_ms > 0 && !legal_hold {
        return Err(format!(
            "a legal hold was asked, and version {version} of {bucket}/{key} is under none"
        ));
    }
    if asked.legal_hold_until_unix_ms > longest_lease {
        return Err(format!(
            "a legal hold's lease until {} (Unix ms) was asked, longer than a lease from now",
            asked.legal_hold_until_unix_ms
        ));
    }
    Ok(())
}

/// Whether the installed rules let the fragments of `upload` come back.
pub(crate) async fn may_restore(
    rules: &ReleaseRules,
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    upload: UploadId,
) -> Result<(), String> {
    match rules.get() {
        Some(rules) => rules.check_restore(metadata, bucket, key, upload).await,
        None => Err("this node has no metadata rules to check a restore against".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_is_whole_only_with_one_distinct_fragment_per_node() {
        let segment = SegmentPlaces {
            placed: (0..3u8).map(|i| NodeId([i; 32])).collect(),
            fragments: (0..3u8).map(|i| FragmentId([i; 32])).collect(),
        };
        let held = |rows: &[[bool; 3]]| rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>();
        // Node 0 holds two, node 1 one of them: still one each.
        assert!(segment.whole_on(&held(&[
            [true, true, false],
            [true, false, false],
            [false, false, true]
        ])));
        // Node 0 holds two and node 1 none: a node counts once.
        assert!(!segment.whole_on(&held(&[
            [true, true, false],
            [false, false, false],
            [false, false, true]
        ])));
        // Every node holds the same one.
        assert!(!segment.whole_on(&held(&[[true, false, false]; 3])));
        // Fewer answers than nodes.
        assert!(!segment.whole_on(&held(&[[true, true, true]])));
    }
}
