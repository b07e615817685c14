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

const FORMAT_VERSION: u8 = 1;

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
    /// Set a retention: a stronger mode or a later date only.
    Retain(Retention),
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
    #[error("a retention can be extended, never shortened or weakened")]
    Weakening,
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
            retention: Retention {
                mode: self.retention.mode.max(row.retention.mode),
                retain_until_unix_ms: self
                    .retention
                    .retain_until_unix_ms
                    .max(row.retention.retain_until_unix_ms),
            },
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
            GuardChange::Retain(retention) => {
                if retention.mode < self.retention.mode
                    || retention.retain_until_unix_ms < self.retention.retain_until_unix_ms
                {
                    return Err(GuardRefusal::Weakening);
                }
                next.retention = retention;
            }
            GuardChange::LegalHold { on, at } => {
                // Decided in the register's order, stamped after the last
                // change so that the row's last-writer-wins agrees.
                next.legal_hold = Lww {
                    value: on,
                    at: if at > self.legal_hold.at {
                        at
                    } else {
                        Timestamp {
                            hlc: crate::hlc::Hlc::from_u64(self.legal_hold.at.hlc.as_u64() + 1),
                            node: at.node,
                        }
                    },
                };
            }
        }
        Ok(next)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION, self.retention.mode as u8];
        out.put_u64(self.retention.retain_until_unix_ms);
        out.put_bool(self.legal_hold.value);
        put_timestamp(&mut out, &self.legal_hold.at);
        out.put_bool(self.purged);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let format = r.u8("guard format")?;
        if format != FORMAT_VERSION {
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
        let guard = Self {
            retention: Retention {
                mode,
                retain_until_unix_ms: r.u64("retain until")?,
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
                GuardChange::Retain(Retention {
                    mode: RetentionMode::Compliance,
                    retain_until_unix_ms: 100,
                }),
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
                GuardChange::Retain(Retention {
                    mode: RetentionMode::Governance,
                    retain_until_unix_ms: 200,
                }),
                10
            ),
            Err(GuardRefusal::Weakening)
        );
    }

    #[test]
    fn governance_is_bypassed_on_request_compliance_and_holds_never() {
        let purge = |bypass_governance| GuardChange::Purge { bypass_governance };
        let governed = open()
            .apply(
                GuardChange::Retain(Retention {
                    mode: RetentionMode::Governance,
                    retain_until_unix_ms: 100,
                }),
                10,
            )
            .unwrap();
        assert!(governed.apply(purge(false), 50).is_err());
        assert!(governed.apply(purge(true), 50).unwrap().purged);
        let compliant = governed
            .apply(
                GuardChange::Retain(Retention {
                    mode: RetentionMode::Compliance,
                    retain_until_unix_ms: 100,
                }),
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
    }
}
