//! The peers that passed the membership handshake (a certificate of this
//! cluster), which every protocol of the node admits, and a wait for one.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use cairn_protocol::membership::Certificate;
use libp2p::PeerId;
use tokio::sync::Notify;

/// How long a stream from a connected peer may wait for its handshake.
pub(crate) const MEMBERSHIP_WAIT: Duration = Duration::from_secs(5);

/// Peers that have passed the membership handshake.
#[derive(Default)]
pub(crate) struct Members {
    verified: RwLock<HashMap<PeerId, Certificate>>,
    changed: Notify,
}

impl Members {
    pub(crate) fn insert(&self, peer: PeerId, certificate: Certificate) {
        tracing::info!(%peer, node = %certificate.node, site = %certificate.site, "member verified");
        self.verified
            .write()
            .expect("members lock")
            .insert(peer, certificate);
        self.changed.notify_waiters();
    }

    pub(crate) fn remove(&self, peer: &PeerId) {
        self.verified.write().expect("members lock").remove(peer);
    }

    pub(crate) fn peers(&self) -> Vec<PeerId> {
        self.verified
            .read()
            .expect("members lock")
            .keys()
            .copied()
            .collect()
    }

    pub(crate) fn contains(&self, peer: &PeerId) -> bool {
        self.verified
            .read()
            .expect("members lock")
            .contains_key(peer)
    }

    /// Waits until `peer` is verified, up to `timeout`.
    pub(crate) async fn wait_for(&self, peer: &PeerId, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.contains(peer) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.contains(peer);
            }
        }
    }
}
