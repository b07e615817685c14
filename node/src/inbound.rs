//! The one inbound path of the node's stream protocols (pieces, map,
//! meta): a stream is served only for a verified member (a stream from any
//! other peer is dropped unanswered), and only within the
//! protocol's limits — streams served at once from all peers, and from one
//! peer. Past a limit the protocol's own busy answer is sent.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::{PeerId, Stream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::members::{MEMBERSHIP_WAIT, Members};

/// Who may open streams of one protocol, and how many.
pub(crate) struct Admission {
    /// The protocol, for logs.
    pub(crate) protocol: &'static str,
    pub(crate) members: Arc<Members>,
    /// Streams served at once, from all peers together.
    pub(crate) total: usize,
    /// Streams served at once for any one peer.
    pub(crate) per_peer: usize,
    /// How long one stream may be served in all: a peer that trickles its
    /// request, or stops reading the answer, gives its place back then.
    pub(crate) deadline: Duration,
}

/// How long a busy answer may take to send: a peer that does not read it
/// holds nothing longer.
const BUSY_DEADLINE: Duration = Duration::from_secs(5);

impl Admission {
    /// Serves `incoming` with `serve`, admitted streams only; a stream past
    /// a limit goes to `busy` with the reason.
    pub(crate) fn run<S, SF, B, BF>(
        self,
        mut incoming: libp2p_stream::IncomingStreams,
        serve: S,
        busy: B,
    ) -> JoinHandle<()>
    where
        S: Fn(PeerId, Stream) -> SF + Clone + Send + Sync + 'static,
        SF: Future<Output = ()> + Send + 'static,
        B: Fn(Stream, &'static str) -> BF + Clone + Send + Sync + 'static,
        BF: Future<Output = ()> + Send + 'static,
    {
        let permits = Arc::new(Semaphore::new(self.total));
        let slots = Arc::new(PeerSlots::default());
        let admission = Arc::new(self);
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let (admission, permits, slots) =
                    (admission.clone(), permits.clone(), slots.clone());
                let (serve, busy) = (serve.clone(), busy.clone());
                tokio::spawn(async move {
                    let protocol = admission.protocol;
                    // The peer's own limit first, before any wait: a peer
                    // past it takes no place from the others, and streams
                    // from one that is no member wait no more than it.
                    let Some(_slot) = slots.try_take(peer, admission.per_peer) else {
                        tracing::debug!(%peer, protocol, "too many streams from this peer: busy");
                        if admission.members.contains(&peer) {
                            let told = busy(stream, "too many exchanges open from your node");
                            let _ = tokio::time::timeout(BUSY_DEADLINE, told).await;
                        }
                        return;
                    };
                    // A member's stream can arrive before its handshake is
                    // done on this side. One from a peer that is still no
                    // member after the wait is dropped unanswered; the peer
                    // is not blocked for it (only a refused certificate
                    // blocks: a member whose handshake is slow must not be
                    // shut out), and is disconnected if it never passes.
                    if !admission.members.wait_for(&peer, MEMBERSHIP_WAIT).await {
                        tracing::warn!(%peer, protocol, "stream from a peer that is not a verified member: dropped");
                        return;
                    }
                    let Ok(_permit) = permits.try_acquire() else {
                        tracing::debug!(%peer, protocol, "too many streams in flight: busy");
                        let told = busy(stream, "too many exchanges in flight");
                        let _ = tokio::time::timeout(BUSY_DEADLINE, told).await;
                        return;
                    };
                    if tokio::time::timeout(admission.deadline, serve(peer, stream))
                        .await
                        .is_err()
                    {
                        tracing::info!(%peer, protocol, "stream served past its deadline: dropped");
                    }
                });
            }
        })
    }
}

/// Counts the streams each peer has open.
#[derive(Default)]
struct PeerSlots {
    open: Mutex<HashMap<PeerId, usize>>,
}

/// One stream's place in [`PeerSlots`], given back when dropped.
struct PeerSlot {
    slots: Arc<PeerSlots>,
    peer: PeerId,
}

impl PeerSlots {
    fn try_take(self: &Arc<Self>, peer: PeerId, limit: usize) -> Option<PeerSlot> {
        let mut open = self.open.lock().expect("peer slots lock");
        let count = open.entry(peer).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("peer slots lock");
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_takes_at_most_its_slots_and_gets_them_back() {
        let slots = Arc::new(PeerSlots::default());
        let (a, b) = (PeerId::random(), PeerId::random());
        let first = slots.try_take(a, 2).unwrap();
        let _second = slots.try_take(a, 2).unwrap();
        assert!(slots.try_take(a, 2).is_none());
        assert!(slots.try_take(b, 2).is_some(), "another peer has its own");
        drop(first);
        assert!(slots.try_take(a, 2).is_some());
    }
}
