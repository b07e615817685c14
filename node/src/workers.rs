//! The node's background work that needs no peer: the trash purge, then
//! the compaction of volumes that are mostly dead bytes (spec/store.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::clock::now_unix_ms;
use crate::store::{FragmentStore, StoreError, VolumeUse};

/// How a node keeps its store: trash period, volumes, compaction.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    /// How long a deleted fragment stays restorable in the trash.
    pub trash_period: Duration,
    /// A new volume is started when the active one would pass this size.
    pub volume_bytes: u64,
    /// How often the trash is purged and volumes are compacted.
    pub housekeeping_every: Duration,
    /// Bytes compaction copies per second (0: no limit).
    pub compaction_bytes_per_second: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            trash_period: Duration::from_secs(7 * 24 * 3600),
            volume_bytes: 1 << 30,
            housekeeping_every: Duration::from_secs(3600),
            compaction_bytes_per_second: 32 << 20,
        }
    }
}

/// Bytes compaction moves per index transaction, at most.
const COMPACTION_CHUNK_BYTES: u64 = 4 << 20;

/// A volume is compacted once at least half of it is dead bytes (the
/// copy then costs at most as much as it frees); the active one is sealed
/// first.
pub fn worth_compacting(volume: &VolumeUse) -> bool {
    volume.bytes > 0 && volume.dead_bytes() * 2 >= volume.bytes
}

/// Purges the trash and compacts volumes, every `housekeeping_every`, on
/// a blocking thread that stops within a chunk once the task is dropped
/// (the node shuts down).
pub(crate) fn housekeeping(store: FragmentStore, settings: StoreSettings) -> JoinHandle<()> {
    tokio::spawn(async move {
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let mut every = tokio::time::interval(settings.housekeeping_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let (store, stopped) = (store.clone(), stop.0.clone());
            match tokio::task::spawn_blocking(move || keep_house(&store, &settings, &stopped)).await
            {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "store housekeeping failed"),
                Err(error) => tracing::warn!(%error, "store housekeeping task failed"),
            }
        }
    })
}

/// Tells the blocking side to stop when the task that owns it is dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Longest sleep of the compaction throttle between two looks at the stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

fn keep_house(
    store: &FragmentStore,
    settings: &StoreSettings,
    stopped: &AtomicBool,
) -> Result<(), StoreError> {
    let purged = store.purge_trash(now_unix_ms())?;
    if purged > 0 {
        tracing::info!(purged, "purged fragments from the trash");
    }
    for volume in store.volume_use()? {
        if stopped.load(Ordering::Relaxed) {
            return Ok(());
        }
        if !worth_compacting(&volume) {
            continue;
        }
        // One volume's failure (a disk error, no room) leaves the others
        // to be compacted.
        if let Err(error) = compact(store, settings, &volume, stopped) {
            tracing::warn!(volume = volume.number, %error, "compaction of a volume failed; tried again at the next housekeeping");
        }
    }
    Ok(())
}

fn compact(
    store: &FragmentStore,
    settings: &StoreSettings,
    volume: &VolumeUse,
    stopped: &AtomicBool,
) -> Result<(), StoreError> {
    tracing::info!(
        volume = volume.number,
        bytes = volume.bytes,
        referenced = volume.referenced_bytes,
        "compacting a volume"
    );
    if volume.active {
        store.seal_volume(volume.number)?;
    }
    let mut moved = 0u64;
    let rate = settings.compaction_bytes_per_second;
    let chunk = if rate == 0 {
        COMPACTION_CHUNK_BYTES
    } else {
        COMPACTION_CHUNK_BYTES.min(rate)
    };
    let compacted = store.compact_volume(volume.number, chunk, |bytes| {
        moved += bytes;
        tracing::info!(
            volume = volume.number,
            moved,
            of = volume.referenced_bytes,
            "compaction moved a chunk"
        );
        if rate > 0 {
            let mut pause = Duration::from_secs_f64(bytes as f64 / rate as f64);
            while !pause.is_zero() && !stopped.load(Ordering::Relaxed) {
                let step = pause.min(STOP_CHECK);
                std::thread::sleep(step);
                pause -= step;
            }
        }
        !stopped.load(Ordering::Relaxed)
    })?;
    if compacted.reclaimed_bytes == 0 {
        tracing::info!(volume = volume.number, "compaction stopped with the node");
    } else {
        tracing::info!(
            volume = volume.number,
            moved = compacted.moved,
            moved_bytes = compacted.moved_bytes,
            quarantined = compacted.quarantined,
            reclaimed_bytes = compacted.reclaimed_bytes,
            "volume compacted"
        );
    }
    Ok(())
}
