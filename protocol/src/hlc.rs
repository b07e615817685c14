//! Hybrid logical clocks (spec/metadata.md): timestamps that follow wall
//! time, never go backwards on one node, and order causally related events
//! across nodes. The caller supplies the physical time.

use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::ids::NodeId;

/// 48 bits of Unix milliseconds and a 16-bit logical counter, packed so
/// that integer order is clock order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Hlc(u64);

impl Hlc {
    const MAX_MS: u64 = (1 << 48) - 1;

    pub fn new(unix_ms: u64, logical: u16) -> Self {
        Self((unix_ms.min(Self::MAX_MS) << 16) | u64::from(logical))
    }

    pub fn from_u64(raw: u64) -> Self {
        Self(raw)
    }

    pub fn as_u64(self) -> u64 {
        self.0
    }

    pub fn unix_ms(self) -> u64 {
        self.0 >> 16
    }

    pub fn logical(self) -> u16 {
        self.0 as u16
    }

    /// The next tick after this one, carrying into the milliseconds when the
    /// logical counter is exhausted.
    fn tick(self) -> Self {
        Self(self.0 + 1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HlcError {
    #[error(
        "remote clock is {ahead_ms} ms ahead of ours, beyond the {max_ms} ms tolerated: check NTP on both nodes"
    )]
    TooFarAhead { ahead_ms: u64, max_ms: u64 },
}

/// One node's clock.
#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
    max_drift_ms: u64,
}

impl HlcClock {
    /// `max_drift_ms`: how far ahead of our wall clock a remote timestamp may
    /// be before it is refused rather than adopted.
    pub fn new(max_drift_ms: u64) -> Self {
        Self {
            last: Hlc::default(),
            max_drift_ms,
        }
    }

    /// A timestamp for a local event.
    pub fn now(&mut self, physical_unix_ms: u64) -> Hlc {
        let physical = Hlc::new(physical_unix_ms, 0);
        self.last = if physical > self.last {
            physical
        } else {
            self.last.tick()
        };
        self.last
    }

    /// Takes a remote timestamp into account; the result is later than both
    /// it and everything this clock issued before.
    pub fn observe(&mut self, remote: Hlc, physical_unix_ms: u64) -> Result<Hlc, HlcError> {
        let ahead_ms = remote.unix_ms().saturating_sub(physical_unix_ms);
        if ahead_ms > self.max_drift_ms {
            return Err(HlcError::TooFarAhead {
                ahead_ms,
                max_ms: self.max_drift_ms,
            });
        }
        let physical = Hlc::new(physical_unix_ms, 0);
        let latest = self.last.max(remote);
        self.last = if physical > latest {
            physical
        } else {
            latest.tick()
        };
        Ok(self.last)
    }
}

/// A clock reading with the node that made it: a total order for
/// last-writer-wins, ties between nodes broken by node id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Timestamp {
    pub hlc: Hlc,
    pub node: NodeId,
}

impl Timestamp {
    /// Before every reading: what a value never set by a write carries.
    pub const ZERO: Self = Self {
        hlc: Hlc(0),
        node: NodeId([0; 32]),
    };
}

pub(crate) fn put_timestamp(out: &mut Vec<u8>, at: &Timestamp) {
    out.put_u64(at.hlc.as_u64());
    out.extend_from_slice(at.node.as_bytes());
}

pub(crate) fn read_timestamp(r: &mut Reader<'_>) -> Result<Timestamp, DecodeError> {
    Ok(Timestamp {
        hlc: Hlc::from_u64(r.u64("hlc")?),
        node: NodeId(r.array("node")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards_and_follows_remote_clocks() {
        let mut clock = HlcClock::new(60_000);
        let a = clock.now(1_000);
        let b = clock.now(999);
        let c = clock.now(999);
        assert!(a < b && b < c);
        let remote = Hlc::new(5_000, 7);
        let d = clock.observe(remote, 1_000).unwrap();
        assert!(d > remote && d > c);
        assert!(clock.now(1_001) > d);
        assert_eq!(clock.now(10_000), Hlc::new(10_000, 0));
    }

    #[test]
    fn a_remote_clock_far_ahead_is_refused() {
        let mut clock = HlcClock::new(60_000);
        assert!(matches!(
            clock.observe(Hlc::new(200_000, 0), 100_000),
            Err(HlcError::TooFarAhead { .. })
        ));
    }

    #[test]
    fn logical_overflow_carries_into_milliseconds() {
        let mut clock = HlcClock::new(0);
        let next = clock.observe(Hlc::new(7, u16::MAX), 7).unwrap();
        assert_eq!((next.unix_ms(), next.logical()), (8, 0));
    }
}
