//! The lock guard of one object version (spec/metadata.md, "Locks and
//! permanent deletes"): what the version's compare-and-set register holds,
//! so that a permanent delete and a new lock on the same version are
//! decided in one order by every node. The rules are here; the node runs
//! them inside a compare-and-set and then writes their effect to the
//! version's row.

use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::hlc::{Timestamp, put_timestamp, read_timestamp};
use crate::version::{Lww, ObjectVersion, Retention, RetentionMode};

/// Format 2 added the retention's stamp; format 1 guards read with none.
const FORMAT_VERSION: u8 = 2;
const FORMAT_WITHOUT_RETENTION_STAMP: u8 = 1;

/// The lock state and whether the version was permanently deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionGuard {
    pub retention: Retention,
    pub legal_hold: Lww<bool>,
    pub purged: bool,
}

/// A change asked of the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardChange {
    /// Delete the version permanently; with `bypass_governance`, through
    /// a governance retention (never through compliance or a legal hold).
    Purge { bypass_governance: bool },
    /// Set a retention (its stamp is taken from `at`): a stronger mode or
    /// a later date; with `bypass_governance`, a governance retention may
    /// also be shortened, or removed (mode none), never a compliance one.
    Retain {
        retention: Retention,
        at: Timestamp,
        bypass_governance: bool,
    },
    /// Set or clear the legal hold, stamped `at`.
    LegalHold { on: bool, at: Timestamp },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GuardRefusal {
    #[error(
        "the version is locked until {retain_until_unix_ms} ms ({mode:?}) or held: it cannot be deleted"
    )]
    Locked {
        mode: RetentionMode,
        retain_until_unix_ms: u64,
        legal_hold: bool,
    },
    #[error("the version was permanently deleted")]
    Purged,
    #[error(
        "a retention can be extended, never shortened or weakened (a governance one only with x-amz-bypass-governance-retention)"
    )]
    Weakening,
}

/// `at`, or just after `last` if `at` is not later: a decision is stamped
/// after the one before it, so that the row's last-writer-wins agrees with
/// the register's order.
fn after(last: Timestamp, at: Timestamp) -> Timestamp {
    if at > last {
        at
    } else {
        // Saturating: a stamp at the end of time (no honest clock's)
        // cannot be passed, and is not wrapped to its start.
        Timestamp {
            hlc: crate::hlc::Hlc::from_u64(last.hlc.as_u64().saturating_add(1)),
            node: at.node,
        }
    }
}

impl VersionGuard {
    /// The guard as the version's row states it (before any decision).
    pub fn of(version: &ObjectVersion) -> Self {
        Self {
            retention: version.retention,
            legal_hold: version.legal_hold,
            purged: version.purged.is_some(),
        }
    }

    /// What the register says, joined with what the row says: a row written
    /// with a default retention at creation has it before any decision.
    pub fn join(self, row: &ObjectVersion) -> Self {
        let row = Self::of(row);
        Self {
            retention: self.retention.join(row.retention),
            legal_hold: if (row.legal_hold.at, row.legal_hold.value)
                > (self.legal_hold.at, self.legal_hold.value)
            {
                row.legal_hold
            } else {
                self.legal_hold
            },
            purged: self.purged || row.purged,
        }
    }

    pub fn is_locked(&self, now_unix_ms: u64) -> bool {
        self.legal_hold.value
            || (self.retention.mode != RetentionMode::None
                && self.retention.retain_until_unix_ms > now_unix_ms)
    }

    /// Applies `change` at `now`, or says why it cannot be.
    pub fn apply(&self, change: GuardChange, now_unix_ms: u64) -> Result<Self, GuardRefusal> {
        if self.purged {
            return Err(GuardRefusal::Purged);
        }
        let mut next = *self;
        match change {
            GuardChange::Purge { bypass_governance } => {
                let retained = self.retention.mode != RetentionMode::None
                    && self.retention.retain_until_unix_ms > now_unix_ms;
                let bypassed =
                    bypass_governance && self.retention.mode == RetentionMode::Governance;
                if self.legal_hold.value || (retained && !bypassed) {
                    return Err(GuardRefusal::Locked {
                        mode: self.retention.mode,
                        retain_until_unix_ms: self.retention.retain_until_unix_ms,
                        legal_hold: self.legal_hold.value,
                    });
                }
                next.purged = true;
            }
            GuardChange::Retain {
                retention,
                at,
                bypass_governance,
            } => {
                let weaker = retention.mode < self.retention.mode
                    || retention.retain_until_unix_ms < self.retention.retain_until_unix_ms;
                // Only a governance retention yields, and only to the
                // bypass; compliance never does, even once expired (the
                // row's merge keeps a compliance date for good).
                let yields = bypass_governance && self.retention.mode == RetentionMode::Governance;
                if weaker && !yields {
                    return Err(GuardRefusal::Weakening);
                }
                next.retention = Retention {
                    mode: retention.mode,
                    retain_until_unix_ms: retention.retain_until_unix_ms,
                    at: after(self.retention.at, at),
                };
            }
            GuardChange::LegalHold { on, at } => {
                // Decided in the register's order, stamped after the last
                // change so that the row's last-writer-wins agrees.
                next.legal_hold = Lww {
                    value: on,
                    at: after(self.legal_hold.at, at),
                };
            }
        }
        Ok(next)
    }

    /// Canonical: format 1 while the retention has no decision's stamp
    /// (zero), format 2 otherwise.
    pub fn encode(&self) -> Vec<u8> {
        let stamped = self.retention.at != Timestamp::ZERO;
        let format = if stamped {
            FORMAT_VERSION
        } else {
            FORMAT_WITHOUT_RETENTION_STAMP
        };
        let mut out = vec![format, self.retention.mode as u8];
        out.put_u64(self.retention.retain_until_unix_ms);
        if stamped {
            put_timestamp(&mut out, &self.retention.at);
        }
        out.put_bool(self.legal_hold.value);
        put_timestamp(&mut out, &self.legal_hold.at);
        out.put_bool(self.purged);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let format = r.u8("guard format")?;
        if format != FORMAT_VERSION && format != FORMAT_WITHOUT_RETENTION_STAMP {
            return Err(DecodeError::InvalidValue {
                field: "guard format",
                value: u64::from(format),
            });
        }
        let mode = match r.u8("retention mode")? {
            0 => RetentionMode::None,
            1 => RetentionMode::Governance,
            2 => RetentionMode::Compliance,
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "retention mode",
                    value: u64::from(other),
                });
            }
        };
        let retain_until_unix_ms = r.u64("retain until")?;
        let at = match format {
            // Written in format 2 only with a stamp (canonical).
            FORMAT_VERSION => match read_timestamp(&mut r)? {
                Timestamp::ZERO => {
                    return Err(DecodeError::InvalidValue {
                        field: "retention stamp",
                        value: 0,
                    });
                }
                at => at,
            },
            _ => Timestamp::ZERO,
        };
        let guard = Self {
            retention: Retention {
                mode,
                retain_until_unix_ms,
                at,
            },
            legal_hold: Lww {
                value: r.bool("legal hold")?,
                at: read_timestamp(&mut r)?,
            },
            purged: r.bool("purged")?,
        };
        r.finish("version guard")?;
        Ok(guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::ids::NodeId;

    fn at(ms: u64) -> Timestamp {
        Timestamp {
            hlc: Hlc::new(ms, 0),
            node: NodeId([1; 32]),
        }
    }

    fn open() -> VersionGuard {
        VersionGuard {
            retention: Retention::default(),
            legal_hold: Lww {
                value: false,
                at: at(1),
            },
            purged: false,
        }
    }

    #[test]
    fn a_purge_is_refused_under_a_lock_and_a_lock_after_a_purge() {
        let held = open()
            .apply(
                GuardChange::LegalHold {
                    on: true,
                    at: at(2),
                },
                10,
            )
            .unwrap();
        assert!(matches!(
            held.apply(
                GuardChange::Purge {
                    bypass_governance: false
                },
                10
            ),
            Err(GuardRefusal::Locked { .. })
        ));
        let purged = open()
            .apply(
                GuardChange::Purge {
                    bypass_governance: false,
                },
                10,
            )
            .unwrap();
        assert_eq!(
            purged.apply(
                GuardChange::LegalHold {
                    on: true,
                    at: at(3)
                },
                10
            ),
            Err(GuardRefusal::Purged)
        );
        let retained = open()
            .apply(
                GuardChange::Retain {
                    retention: Retention::new(RetentionMode::Compliance, 100),
                    at: at(5),
                    bypass_governance: false,
                },
                10,
            )
            .unwrap();
        assert!(
            retained
                .apply(
                    GuardChange::Purge {
                        bypass_governance: false
                    },
                    99
                )
                .is_err()
        );
        assert!(
            retained
                .apply(
                    GuardChange::Purge {
                        bypass_governance: false
                    },
                    100
                )
                .is_ok()
        );
        assert_eq!(
            retained.apply(
                GuardChange::Retain {
                    retention: Retention::new(RetentionMode::Governance, 200),
                    at: at(5),
                    bypass_governance: false
                },
                10
            ),
            Err(GuardRefusal::Weakening)
        );
    }

    #[test]
    fn the_bypass_shortens_a_governance_retention_and_the_row_keeps_the_later_decision() {
        let retain = |mode, until, stamp, bypass_governance| GuardChange::Retain {
            retention: Retention::new(mode, until),
            at: at(stamp),
            bypass_governance,
        };
        let governed = open()
            .apply(retain(RetentionMode::Governance, 100, 5, false), 10)
            .unwrap();
        assert_eq!(
            governed.apply(retain(RetentionMode::Governance, 50, 6, false), 10),
            Err(GuardRefusal::Weakening)
        );
        let shortened = governed
            .apply(retain(RetentionMode::Governance, 50, 6, true), 10)
            .unwrap();
        assert_eq!(shortened.retention.retain_until_unix_ms, 50);
        // A decision stamped before the last is stamped after it.
        let removed = shortened
            .apply(retain(RetentionMode::None, 0, 1, true), 10)
            .unwrap();
        assert!(removed.retention.at > shortened.retention.at);
        assert!(!removed.is_locked(10));
        // The rows written by each decision merge to the last one.
        let row = |guard: &VersionGuard| {
            let mut row = crate::version::tests::entry();
            row.retention = guard.retention;
            row
        };
        let merged = row(&governed)
            .merge(&row(&removed))
            .unwrap()
            .merge(&row(&shortened))
            .unwrap();
        assert_eq!(merged.retention, removed.retention);
        // Compliance yields to nothing, bypass or not.
        let compliant = open()
            .apply(retain(RetentionMode::Compliance, 100, 5, false), 10)
            .unwrap();
        for (mode, until) in [
            (RetentionMode::Compliance, 50),
            (RetentionMode::Governance, 200),
            (RetentionMode::None, 0),
        ] {
            assert_eq!(
                compliant.apply(retain(mode, until, 6, true), 10),
                Err(GuardRefusal::Weakening)
            );
        }
        // And a row that says governance later does not weaken it.
        let forged = row(&shortened);
        let kept = row(&compliant).merge(&forged).unwrap();
        assert_eq!(
            (kept.retention.mode, kept.retention.retain_until_unix_ms),
            (RetentionMode::Compliance, 100)
        );
    }

    #[test]
    fn governance_is_bypassed_on_request_compliance_and_holds_never() {
        let purge = |bypass_governance| GuardChange::Purge { bypass_governance };
        let governed = open()
            .apply(
                GuardChange::Retain {
                    retention: Retention::new(RetentionMode::Governance, 100),
                    at: at(5),
                    bypass_governance: false,
                },
                10,
            )
            .unwrap();
        assert!(governed.apply(purge(false), 50).is_err());
        assert!(governed.apply(purge(true), 50).unwrap().purged);
        let compliant = governed
            .apply(
                GuardChange::Retain {
                    retention: Retention::new(RetentionMode::Compliance, 100),
                    at: at(5),
                    bypass_governance: false,
                },
                10,
            )
            .unwrap();
        assert!(compliant.apply(purge(true), 99).is_err());
        assert!(compliant.apply(purge(true), 100).is_ok());
        let held = governed
            .apply(
                GuardChange::LegalHold {
                    on: true,
                    at: at(2),
                },
                10,
            )
            .unwrap();
        assert!(held.apply(purge(true), 500).is_err());
    }

    #[test]
    fn legal_hold_stamps_follow_the_register_order() {
        let on = open()
            .apply(
                GuardChange::LegalHold {
                    on: true,
                    at: at(50),
                },
                0,
            )
            .unwrap();
        // A later decision from a node whose clock is behind.
        let off = on
            .apply(
                GuardChange::LegalHold {
                    on: false,
                    at: at(40),
                },
                0,
            )
            .unwrap();
        assert!(off.legal_hold.at > on.legal_hold.at && !off.legal_hold.value);
    }

    #[test]
    fn guards_round_trip_and_truncations_fail() {
        let guard = open()
            .apply(
                GuardChange::Purge {
                    bypass_governance: false,
                },
                0,
            )
            .unwrap();
        let bytes = guard.encode();
        assert_eq!(VersionGuard::decode(&bytes).unwrap(), guard);
        for len in 0..bytes.len() {
            assert!(VersionGuard::decode(&bytes[..len]).is_err());
        }
        // One encoding per guard: format 1 without a retention stamp,
        // format 2 with one; format 2 with a zero stamp is refused.
        assert_eq!(bytes[0], 1);
        let stamped = open()
            .apply(
                GuardChange::Retain {
                    retention: Retention::new(RetentionMode::Governance, 100),
                    at: at(5),
                    bypass_governance: false,
                },
                0,
            )
            .unwrap();
        let bytes = stamped.encode();
        assert_eq!(bytes[0], 2);
        assert_eq!(VersionGuard::decode(&bytes).unwrap(), stamped);
        let mut zero = bytes.clone();
        zero[10..50].fill(0);
        assert!(VersionGuard::decode(&zero).is_err());
        // A stamp at the end of time is not wrapped to its start.
        let mut last = stamped;
        last.retention.at = Timestamp {
            hlc: crate::hlc::Hlc::from_u64(u64::MAX),
            node: crate::ids::NodeId([1; 32]),
        };
        let next = last
            .apply(
                GuardChange::Retain {
                    retention: Retention::new(RetentionMode::Governance, 200),
                    at: at(6),
                    bypass_governance: false,
                },
                0,
            )
            .unwrap();
        assert_eq!(next.retention.at.hlc.as_u64(), u64::MAX);
    }
}
