//! The peers that passed the membership handshake (a certificate of this
//! cluster), which every protocol of the node admits, and a wait for one.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use cairn_protocol::membership::{Certificate, ClusterId};
use cairn_protocol::placement::{ClusterMap, NodeState};
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
        self.changed.notify_waiters();
    }

    /// Every member with the certificate it was admitted with.
    pub(crate) fn certificates(&self) -> Vec<(PeerId, Certificate)> {
        self.verified
            .read()
            .expect("members lock")
            .iter()
            .map(|(peer, certificate)| (*peer, certificate.clone()))
            .collect()
    }

    /// Waits until `peer` is no member, up to `timeout`.
    pub(crate) async fn wait_for_absence(&self, peer: &PeerId, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if !self.contains(peer) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return !self.contains(peer);
            }
        }
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

/// Why `certificate` does not (or no longer) admit its node, if it does
/// not: it fails verification at `now_unix_ms` (expired, say), or the
/// newest map marks its node `out` (revocation by map). A node the map
/// does not list at all, such as a gateway that stores nothing, stays.
pub(crate) fn refusal(
    certificate: &Certificate,
    cluster: &ClusterId,
    map: Option<&ClusterMap>,
    now_unix_ms: u64,
) -> Option<String> {
    if let Err(error) = certificate.verify(cluster, &certificate.node, now_unix_ms) {
        return Some(error.to_string());
    }
    let out = map.is_some_and(|map| {
        map.nodes
            .iter()
            .any(|n| n.id == certificate.node && n.state == NodeState::Out)
    });
    out.then(|| {
        format!(
            "node {} is out in cluster map version {}",
            certificate.node,
            map.map_or(0, |m| m.version)
        )
    })
}

#[cfg(test)]
mod tests {
    use cairn_protocol::ed25519_dalek::SigningKey;
    use cairn_protocol::ids::{NodeId, SiteId};
    use cairn_protocol::placement::MapNode;

    use super::*;

    #[test]
    fn an_expired_certificate_or_a_node_out_in_the_map_is_refused() {
        let cluster_key = SigningKey::from_bytes(&[7; 32]);
        let cluster = ClusterId::of(&cluster_key);
        let node = NodeId([9; 32]);
        let site = SiteId::new("a").unwrap();
        let certificate = Certificate::issue(&cluster_key, node, site.clone(), 1_000, 2_000);
        let mut map = ClusterMap {
            version: 3,
            nodes: vec![MapNode {
                id: node,
                site,
                capacity_bytes: 1,
                state: NodeState::Up,
                since: 1,
            }],
        };
        assert_eq!(refusal(&certificate, &cluster, Some(&map), 1_500), None);
        assert_eq!(refusal(&certificate, &cluster, None, 1_500), None);
        assert!(
            refusal(&certificate, &cluster, Some(&map), 2_001).is_some(),
            "expired"
        );
        map.nodes[0].state = NodeState::Draining;
        assert_eq!(refusal(&certificate, &cluster, Some(&map), 1_500), None);
        map.nodes[0].state = NodeState::Out;
        assert!(
            refusal(&certificate, &cluster, Some(&map), 1_500).is_some(),
            "out"
        );
        map.nodes.clear();
        assert_eq!(
            refusal(&certificate, &cluster, Some(&map), 1_500),
            None,
            "a node the map does not list (a gateway) stays"
        );
    }
}
