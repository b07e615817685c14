//! Peers refused at the connection level for a while: those that failed
//! the membership handshake or opened a stream without passing it. The
//! list is bounded (the oldest entry leaves first) and each entry expires,
//! so peers that keep failing cannot grow it without end, and a peer that
//! was only misconfigured can come back once fixed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// Peers blocked at once at most.
pub(crate) const MAX_BLOCKED: usize = 4096;
/// How long a peer stays blocked.
pub(crate) const BLOCK_FOR: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
pub(crate) struct BlockList {
    /// When each blocked peer was blocked (its latest block).
    since: HashMap<PeerId, Instant>,
    /// Blocks in the order they were made; entries of peers blocked again
    /// since are skipped when they come up.
    order: VecDeque<(Instant, PeerId)>,
}

impl BlockList {
    /// Blocks `peer` from `now`; returns the peers that leave the list to
    /// make room, to unblock.
    pub(crate) fn block(&mut self, peer: PeerId, now: Instant) -> Vec<PeerId> {
        self.since.insert(peer, now);
        self.order.push_back((now, peer));
        let mut evicted = Vec::new();
        while self.since.len() > MAX_BLOCKED {
            let Some((at, oldest)) = self.order.pop_front() else {
                break;
            };
            if self.since.get(&oldest) == Some(&at) {
                self.since.remove(&oldest);
                evicted.push(oldest);
            }
        }
        self.compact();
        evicted
    }

    /// The peers whose block is over at `now`, to unblock.
    pub(crate) fn contains(&self, peer: &PeerId) -> bool {
        self.since.contains_key(peer)
    }

    pub(crate) fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let mut expired = Vec::new();
        while let Some(&(at, peer)) = self.order.front() {
            if now.saturating_duration_since(at) < BLOCK_FOR {
                break;
            }
            self.order.pop_front();
            if self.since.get(&peer) == Some(&at) {
                self.since.remove(&peer);
                expired.push(peer);
            }
        }
        expired
    }

    /// Drops stale order entries (peers blocked again) once they dominate.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.since.len() + 64 {
            let since = &self.since;
            self.order.retain(|(at, peer)| since.get(peer) == Some(at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_expire_after_their_time() {
        let mut list = BlockList::default();
        let start = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        list.block(a, start);
        list.block(b, start + Duration::from_secs(5));
        assert!(
            list.expire(start + BLOCK_FOR - Duration::from_secs(1))
                .is_empty()
        );
        assert_eq!(list.expire(start + BLOCK_FOR), vec![a]);
        assert!(list.contains(&b) && !list.contains(&a));
        assert_eq!(
            list.expire(start + BLOCK_FOR + Duration::from_secs(5)),
            vec![b]
        );
    }

    #[test]
    fn a_peer_blocked_again_stays_blocked_from_its_latest_block() {
        let mut list = BlockList::default();
        let start = Instant::now();
        let a = PeerId::random();
        list.block(a, start);
        list.block(a, start + Duration::from_secs(300));
        assert!(list.expire(start + BLOCK_FOR).is_empty());
        assert!(list.contains(&a));
        assert_eq!(
            list.expire(start + Duration::from_secs(300) + BLOCK_FOR),
            vec![a]
        );
    }

    #[test]
    fn the_list_is_bounded_and_the_oldest_leave_first() {
        let mut list = BlockList::default();
        let start = Instant::now();
        let first = PeerId::random();
        assert!(list.block(first, start).is_empty());
        let mut evicted = Vec::new();
        for n in 0..MAX_BLOCKED + 10 {
            let peer = PeerId::random();
            evicted.extend(list.block(peer, start + Duration::from_millis(n as u64 + 1)));
            // One peer blocked over and over does not grow the queue.
            list.block(first, start + Duration::from_millis(n as u64 + 1));
        }
        assert!(list.since.len() <= MAX_BLOCKED);
        assert!(list.order.len() <= 2 * MAX_BLOCKED + 64);
        assert_eq!(evicted.len(), 11);
        assert!(
            list.contains(&first),
            "the peer blocked most recently stays"
        );
    }
}
