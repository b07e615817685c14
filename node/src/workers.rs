//! The node's background work that needs no peer: today the trash purge.

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::clock::now_unix_ms;
use crate::store::FragmentStore;

/// How often the trash is purged of fragments whose trash period is over.
const TRASH_PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Removes fragments whose trash period is over from the index, now and
/// then, on a blocking thread.
pub(crate) fn purge_trash(store: FragmentStore) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TRASH_PURGE_EVERY);
        loop {
            every.tick().await;
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.purge_trash(now_unix_ms())).await {
                Ok(Ok(0)) => {}
                Ok(Ok(purged)) => tracing::info!(purged, "purged fragments from the trash"),
                Ok(Err(error)) => tracing::warn!(%error, "trash purge failed"),
                Err(error) => tracing::warn!(%error, "trash purge task failed"),
            }
        }
    })
}
