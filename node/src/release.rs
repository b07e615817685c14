//! Who decides that an upload's fragments may go to the trash: the rules
//! of the metadata above the node (the orphan collector's), installed by
//! whoever runs the node. The node asks them before it trashes anything,
//! for a peer's release and its own alike, so that no member can have a
//! live object's fragments trashed on its word alone.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use cairn_protocol::ids::UploadId;

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

    /// How long after a fragment is stored here a release may trash it:
    /// the longest a write may take to commit, plus a margin. Measured by
    /// this node's own clock, which no peer can set, it keeps the
    /// fragments of a write still on its way whatever the metadata says.
    fn settle_ms(&self) -> u64;
}

/// The rules a node holds, once installed.
pub(crate) type ReleaseRules = Arc<RwLock<Option<Arc<dyn ReleaseCheck>>>>;

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
    let installed = rules.read().expect("release rules lock").clone();
    match installed {
        Some(rules) => {
            rules.check(metadata, bucket, key, upload).await?;
            Ok(rules.settle_ms())
        }
        None => Err("this node has no metadata rules to check a release against".into()),
    }
}
