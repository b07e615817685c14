//! The bytes a node holds in memory for piece exchanges (a put's body
//! until it is durable, a get's answer until it is sent), one permit a
//! byte: the node's budget, and within it each peer's share, so that one
//! member trickling its exchanges cannot hold what every other member
//! needs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Peers whose shares are remembered while unused; past this, unused
/// shares are forgotten (they are full again, so nothing is lost).
const REMEMBERED_PEERS: usize = 1024;

pub(crate) struct ByteBudget {
    node: Arc<Semaphore>,
    per_peer: usize,
    peers: Mutex<HashMap<PeerId, Arc<Semaphore>>>,
}

/// Bytes taken from the budget, given back when dropped.
pub(crate) struct Taken {
    _peer: Option<OwnedSemaphorePermit>,
    _node: OwnedSemaphorePermit,
}

impl ByteBudget {
    /// A budget of `node_bytes` in all, of which one peer may hold
    /// `per_peer_bytes` (both at least `at_least`, one exchange's worth).
    pub(crate) fn new(node_bytes: u64, per_peer_bytes: u64, at_least: u64) -> Self {
        // Exchanges take their bytes as a u32 count of permits.
        assert!(
            at_least <= u64::from(u32::MAX),
            "an exchange of {at_least} bytes cannot be budgeted"
        );
        let bytes = |n: u64| n.max(at_least).min(Semaphore::MAX_PERMITS as u64) as usize;
        Self {
            node: Arc::new(Semaphore::new(bytes(node_bytes))),
            per_peer: bytes(per_peer_bytes),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `bytes` for `peer` (`None`: this node's own users, bounded by
    /// the node's budget only), waiting up to `wait` in all. The peer's
    /// share is taken first, so a peer past it takes no place from others.
    pub(crate) async fn take(
        &self,
        peer: Option<PeerId>,
        bytes: u32,
        wait: Duration,
    ) -> Option<Taken> {
        let deadline = tokio::time::Instant::now() + wait;
        let peer_permit = match peer {
            Some(peer) => {
                let share = self.share(peer);
                let permit = share.acquire_many_owned(bytes);
                Some(tokio::time::timeout_at(deadline, permit).await.ok()?.ok()?)
            }
            None => None,
        };
        let node = self.node.clone().acquire_many_owned(bytes);
        let node_permit = tokio::time::timeout_at(deadline, node).await.ok()?.ok()?;
        Some(Taken {
            _peer: peer_permit,
            _node: node_permit,
        })
    }

    fn share(&self, peer: PeerId) -> Arc<Semaphore> {
        let mut peers = self.peers.lock().expect("budget lock");
        if peers.len() >= REMEMBERED_PEERS {
            // A share nobody holds a clone of is unused and full: forgetting
            // it loses nothing. One just handed out is kept.
            peers.retain(|_, share| Arc::strong_count(share) > 1);
        }
        peers
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_peer)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_past_its_share_waits_while_others_are_served() {
        let budget = ByteBudget::new(400, 100, 10);
        let (greedy, other) = (PeerId::random(), PeerId::random());
        let wait = Duration::from_millis(50);
        let held = budget
            .take(Some(greedy), 100, wait)
            .await
            .expect("its share");
        assert!(
            budget.take(Some(greedy), 1, wait).await.is_none(),
            "past its share"
        );
        assert!(budget.take(Some(other), 100, wait).await.is_some());
        assert!(budget.take(None, 300, wait).await.is_some());
        drop(held);
        assert!(budget.take(Some(greedy), 100, wait).await.is_some());
    }
}
