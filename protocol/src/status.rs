//! A node's status as `cairn admin status` shows it (spec/wire.md,
//! "Status"): its store, its scrub and its repair, answered to a
//! status-query on the piece-exchange protocol.

use std::collections::BTreeMap;

use crate::codec::{DecodeError, Reader, Writer};

/// Entries of the degraded-by-spares table a status may carry: a segment
/// has at most 64 fragments, so at most 64 spares.
pub const MAX_SPARE_COUNTS: usize = 65;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub store: StoreStatus,
    pub scrub: ScrubStatus,
    pub repair: RepairSummary,
    pub lifecycle: LifecycleSummary,
}

/// What the node's lifecycle worker has done since it started
/// (spec/versioning.md, "Lifecycle").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LifecycleSummary {
    pub passes: u64,
    pub last_finished_unix_ms: u64,
    /// Buckets with a lifecycle configuration its last pass applied.
    pub buckets: u64,
    /// Current versions expired (deleted, or given a delete marker).
    pub expired: u64,
    /// Noncurrent versions deleted permanently.
    pub noncurrent_expired: u64,
    /// Expired delete markers removed.
    pub markers_removed: u64,
    pub uploads_aborted: u64,
    /// Deletes an Object Lock refused.
    pub kept_by_lock: u64,
    /// Actions that failed (tried again on a later pass).
    pub failed: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStatus {
    pub capacity_bytes: u64,
    /// Bytes of the volumes, live or not (what compaction would reclaim
    /// is `used_bytes - live_bytes`).
    pub used_bytes: u64,
    pub live_bytes: u64,
    pub live: u64,
    pub trash: u64,
    pub quarantined: u64,
    /// How long a fragment (and an object version) stays restorable in the
    /// trash on this node; sent also when the rest of the store part is not.
    pub trash_period_ms: u64,
    /// How long after it was stored this node lets a release trash a
    /// fragment (the write deadline plus the clock margin of its
    /// collector's rule; 0 without one). Sent as the trash period is.
    pub release_grace_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubStatus {
    pub passes: u64,
    /// 0: never.
    pub last_finished_unix_ms: u64,
    /// 0: no pass under way.
    pub pass_started_unix_ms: u64,
    pub pass_checked: u64,
    pub pass_bytes: u64,
    pub corrupt_found: u64,
}

/// The last repair pass of the node (over the partitions it was
/// responsible for) and its totals since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairSummary {
    pub passes: u64,
    /// 0: no pass finished yet.
    pub last_finished_unix_ms: u64,
    /// When the pass under way last made progress (0: no pass under way).
    pub pass_progress_unix_ms: u64,
    pub partitions: u64,
    pub segments: u64,
    pub whole: u64,
    /// Degraded segments by their spares (losses left before unreadable).
    pub degraded_by_spares: BTreeMap<u8, u64>,
    pub unreadable: u64,
    pub pending: u64,
    pub rebuilt: u64,
    pub copied: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl NodeStatus {
    pub fn put(&self, out: &mut Vec<u8>) {
        let s = &self.store;
        for n in [
            s.capacity_bytes,
            s.used_bytes,
            s.live_bytes,
            s.live,
            s.trash,
            s.quarantined,
            s.trash_period_ms,
            s.release_grace_ms,
        ] {
            out.put_u64(n);
        }
        let c = &self.scrub;
        for n in [
            c.passes,
            c.last_finished_unix_ms,
            c.pass_started_unix_ms,
            c.pass_checked,
            c.pass_bytes,
            c.corrupt_found,
        ] {
            out.put_u64(n);
        }
        let r = &self.repair;
        for n in [
            r.passes,
            r.last_finished_unix_ms,
            r.pass_progress_unix_ms,
            r.partitions,
            r.segments,
            r.whole,
            r.unreadable,
            r.pending,
            r.rebuilt,
            r.copied,
            r.bytes_read,
            r.bytes_written,
        ] {
            out.put_u64(n);
        }
        // Callers keep the table within MAX_SPARE_COUNTS (spares < 256).
        let entries: Vec<_> = r.degraded_by_spares.iter().take(MAX_SPARE_COUNTS).collect();
        out.put_u32(entries.len() as u32);
        for (spares, segments) in entries {
            out.put_u8(*spares);
            out.put_u64(*segments);
        }
        let l = &self.lifecycle;
        for n in [
            l.passes,
            l.last_finished_unix_ms,
            l.buckets,
            l.expired,
            l.noncurrent_expired,
            l.markers_removed,
            l.uploads_aborted,
            l.kept_by_lock,
            l.failed,
        ] {
            out.put_u64(n);
        }
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut n = |field| r.u64(field);
        let store = StoreStatus {
            capacity_bytes: n("capacity")?,
            used_bytes: n("used bytes")?,
            live_bytes: n("live bytes")?,
            live: n("live")?,
            trash: n("trash")?,
            quarantined: n("quarantined")?,
            trash_period_ms: n("trash period")?,
            release_grace_ms: n("release grace")?,
        };
        let scrub = ScrubStatus {
            passes: n("scrub passes")?,
            last_finished_unix_ms: n("scrub finished")?,
            pass_started_unix_ms: n("scrub started")?,
            pass_checked: n("scrub checked")?,
            pass_bytes: n("scrub bytes")?,
            corrupt_found: n("corrupt found")?,
        };
        let mut repair = RepairSummary {
            passes: n("repair passes")?,
            last_finished_unix_ms: n("repair finished")?,
            pass_progress_unix_ms: n("repair pass progress")?,
            partitions: n("partitions")?,
            segments: n("segments")?,
            whole: n("whole")?,
            unreadable: n("unreadable")?,
            pending: n("pending")?,
            rebuilt: n("rebuilt")?,
            copied: n("copied")?,
            bytes_read: n("bytes read")?,
            bytes_written: n("bytes written")?,
            degraded_by_spares: BTreeMap::new(),
        };
        let count = r.count("degraded by spares", MAX_SPARE_COUNTS, 9)?;
        let mut previous = None;
        for _ in 0..count {
            let spares = r.u8("spares")?;
            // Ascending and distinct: one encoding per table.
            if previous.is_some_and(|p| spares <= p) {
                return Err(DecodeError::InvalidValue {
                    field: "spares order",
                    value: u64::from(spares),
                });
            }
            previous = Some(spares);
            repair.degraded_by_spares.insert(spares, r.u64("segments")?);
        }
        // A node of an earlier release answers without the lifecycle part.
        if r.remaining() == 0 {
            return Ok(Self {
                store,
                scrub,
                repair,
                lifecycle: LifecycleSummary::default(),
            });
        }
        let mut n = |field| r.u64(field);
        let lifecycle = LifecycleSummary {
            passes: n("lifecycle passes")?,
            last_finished_unix_ms: n("lifecycle finished")?,
            buckets: n("lifecycle buckets")?,
            expired: n("expired")?,
            noncurrent_expired: n("noncurrent expired")?,
            markers_removed: n("markers removed")?,
            uploads_aborted: n("uploads aborted")?,
            kept_by_lock: n("kept by a lock")?,
            failed: n("lifecycle failed")?,
        };
        Ok(Self {
            store,
            scrub,
            repair,
            lifecycle,
        })
    }
}
