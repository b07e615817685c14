//! Scrub (spec/repair.md, "Scrub"): every live fragment of this node is
//! re-hashed at a set rate, one pass at least every period. A fragment
//! whose bytes no longer match its id is quarantined: the node no longer
//! serves it or says it has it, so the repair of its segment rebuilds it
//! here. Where the pass is lives in the store's index, so a restart
//! resumes it.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::now_unix_ms;
use crate::store::{FragmentStore, ScrubPass, ScrubState, StoreError};

/// How fast and how often a node scrubs.
#[derive(Debug, Clone, Copy)]
pub struct ScrubSettings {
    /// Fragment bytes re-hashed per second (0: no limit).
    pub bytes_per_second: u64,
    /// From the end of one pass to the start of the next.
    pub every: Duration,
}

impl Default for ScrubSettings {
    fn default() -> Self {
        // Ceph deep-scrubs weekly; at 16 MiB/s a node reads 9.7 TiB a week.
        Self {
            bytes_per_second: 16 << 20,
            every: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Bytes re-hashed between two saves of the pass's place.
const STEP_BYTES: u64 = 8 << 20;
/// Longest sleep while waiting for the next pass (a clock set forward is
/// noticed within it).
const LONGEST_WAIT: Duration = Duration::from_secs(3600);

pub(crate) fn start(
    store: FragmentStore,
    settings: ScrubSettings,
    progress: watch::Sender<ScrubState>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(error) = step(&store, &settings, &progress).await {
                tracing::warn!(%error, "scrub step failed; trying again in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    })
}

async fn step(
    store: &FragmentStore,
    settings: &ScrubSettings,
    progress: &watch::Sender<ScrubState>,
) -> Result<(), StoreError> {
    let mut state = blocking(store, |store| store.scrub_state()).await?;
    progress.send_replace(state);
    let now = now_unix_ms();
    let mut pass = match state.pass {
        Some(pass) => pass,
        None => {
            // A finish stamped while the clock ran ahead counts from now.
            let due = state
                .last_finished_unix_ms
                .min(now)
                .saturating_add(settings.every.as_millis() as u64);
            if state.passes > 0 && now < due {
                let wait = Duration::from_millis(due - now).min(LONGEST_WAIT);
                tokio::time::sleep(wait).await;
                return Ok(());
            }
            ScrubPass {
                started_unix_ms: now,
                ..ScrubPass::default()
            }
        }
    };
    let began = tokio::time::Instant::now();
    let after = pass.after;
    let done = blocking(store, move |store| {
        store.scrub_step(after.as_ref(), STEP_BYTES)
    })
    .await?;
    for id in &done.corrupt {
        tracing::error!(fragment = %id, "scrub found a corrupt fragment: quarantined, for repair to rebuild");
    }
    pass.after = done.last.or(pass.after);
    pass.checked += done.checked;
    pass.bytes += done.bytes;
    state.corrupt_found += done.corrupt.len() as u64;
    if done.reached_end {
        state.pass = None;
        state.passes += 1;
        state.last_finished_unix_ms = now_unix_ms();
        tracing::info!(
            checked = pass.checked,
            bytes = pass.bytes,
            corrupt_found = state.corrupt_found,
            "scrub pass finished"
        );
    } else {
        state.pass = Some(pass);
    }
    blocking(store, move |store| store.set_scrub_state(&state)).await?;
    progress.send_replace(state);
    if settings.bytes_per_second > 0 {
        let share = Duration::from_secs_f64(done.bytes as f64 / settings.bytes_per_second as f64);
        tokio::time::sleep_until(began + share).await;
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    store: &FragmentStore,
    call: impl FnOnce(&FragmentStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || call(&store))
        .await
        .map_err(|e| StoreError::Index(format!("scrub task: {e}")))?
}
