//! The cluster harness: starts real Cairn nodes on 127.0.0.1 over QUIC,
//! spread over sites, each with its own data directory, and stops and
//! restarts them. End-to-end tests and the simulations build on it.

use std::path::PathBuf;
use std::time::Duration;

use cairn_node::clock::now_unix_ms;
use cairn_node::identity::Identity;
use cairn_node::swarm::{Node, NodeConfig, NodeError, StreamLimits};
use cairn_protocol::ed25519_dalek::SigningKey;
use cairn_protocol::erasure::Scheme;
use cairn_protocol::ids::{NodeId, SiteId};
use cairn_protocol::membership::{Certificate, ClusterId, SignedMap};
use cairn_protocol::placement::{ClusterMap, MapNode, NodeState, Tolerance};

pub mod s3;

/// Repair passes back to back, nothing throttled, nobody waited for.
pub const QUICK_REPAIR: cairn_model::repair::RepairSettings = cairn_model::repair::RepairSettings {
    every: Duration::from_millis(100),
    segments_at_once: 4,
    bytes_per_second: 0,
    away_grace: Duration::from_secs(3600),
    forget_records_after: Duration::from_secs(3600),
};

pub use cairn_gateway as gateway;
pub use cairn_node as node;
pub use cairn_protocol as protocol;

const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;

/// One member of the cluster: running or stopped, its identity and data kept.
pub struct Member {
    pub identity: Identity,
    pub site: SiteId,
    pub data_dir: PathBuf,
    pub certificate: Certificate,
    pub node: Option<Node>,
}

pub struct Cluster {
    pub cluster_key: SigningKey,
    pub cluster: ClusterId,
    pub members: Vec<Member>,
    pub capacity_bytes: u64,
    /// Applied to nodes started (or restarted) from now on.
    pub limits: StreamLimits,
    /// Applied to nodes started (or restarted) from now on.
    pub anti_entropy_every: Duration,
    /// Applied to nodes started (or restarted) from now on.
    pub scrub: cairn_node::scrub::ScrubSettings,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `nodes_per_site[s]` nodes in site `s`, fully connected.
    pub async fn start(nodes_per_site: &[usize]) -> Result<Self, NodeError> {
        // Node logs (warnings and up, or RUST_LOG) go to the test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into())
                    // s3s logs every client mistake as an error.
                    .add_directive("s3s=off".parse().expect("a valid directive")),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().map_err(|e| NodeError::Swarm(e.to_string()))?;
        let cluster_key = SigningKey::from_bytes(&random_secret());
        let cluster = ClusterId::of(&cluster_key);
        let mut members = Vec::new();
        for (site_index, &count) in nodes_per_site.iter().enumerate() {
            let site = SiteId::new(&format!("site-{site_index}")).expect("valid site name");
            for _ in 0..count {
                let index = members.len();
                let identity = Identity::generate();
                let now = now_unix_ms();
                let certificate = Certificate::issue(
                    &cluster_key,
                    identity.node_id(),
                    site.clone(),
                    now,
                    now + YEAR_MS,
                );
                members.push(Member {
                    identity,
                    site: site.clone(),
                    data_dir: dir.path().join(format!("node-{index}")),
                    certificate,
                    node: None,
                });
            }
        }
        let mut cluster = Self {
            cluster_key,
            cluster,
            members,
            capacity_bytes: 1 << 34,
            limits: StreamLimits::default(),
            anti_entropy_every: cairn_node::swarm::DEFAULT_ANTI_ENTROPY_EVERY,
            scrub: Default::default(),
            _dir: dir,
        };
        for index in 0..cluster.members.len() {
            cluster.start_member(index).await?;
        }
        cluster
            .wait_until_connected(Duration::from_secs(20))
            .await?;
        Ok(cluster)
    }

    fn config(&self, index: usize) -> NodeConfig {
        let bootstrap = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .filter_map(|(_, m)| m.node.as_ref())
            .flat_map(|n| n.listen_addrs())
            .collect();
        let member = &self.members[index];
        NodeConfig {
            data_dir: member.data_dir.clone(),
            cluster: self.cluster,
            certificate: member.certificate.clone(),
            listen: "/ip4/127.0.0.1/udp/0/quic-v1"
                .parse()
                .expect("valid multiaddr"),
            bootstrap,
            capacity_bytes: self.capacity_bytes,
            limits: self.limits,
            anti_entropy_every: self.anti_entropy_every,
            scrub: self.scrub,
            store: Default::default(),
        }
    }

    async fn start_member(&mut self, index: usize) -> Result<(), NodeError> {
        let config = self.config(index);
        let node = Node::start(config, self.members[index].identity.clone()).await?;
        self.members[index].node = Some(node);
        Ok(())
    }

    /// The running node `index`.
    pub fn node(&self, index: usize) -> &Node {
        self.members[index].node.as_ref().expect("node is running")
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        self.members.iter().map(|m| m.identity.node_id()).collect()
    }

    /// The cluster map of every member, all up.
    pub fn map(&self) -> ClusterMap {
        let nodes = self
            .members
            .iter()
            .map(|m| MapNode {
                id: m.identity.node_id(),
                site: m.site.clone(),
                capacity_bytes: self.capacity_bytes,
                state: NodeState::Up,
                since: 1,
            })
            .collect();
        ClusterMap { version: 1, nodes }
    }

    /// Signs `map` and installs it on every running node. Each node's
    /// `since` is carried from the map the running nodes hold, or set to
    /// this version for a node that map lacks (as `cairn admin map sign
    /// --previous` does).
    pub async fn install_map(
        &self,
        mut map: ClusterMap,
        scheme: Scheme,
    ) -> Result<SignedMap, NodeError> {
        let held = self
            .members
            .iter()
            .filter_map(|m| m.node.as_ref())
            .filter_map(|node| node.cluster_map())
            .max_by_key(|held| held.map.version);
        if let Some(held) = held {
            for node in &mut map.nodes {
                node.since = held
                    .map
                    .nodes
                    .iter()
                    .find(|n| n.id == node.id)
                    .map_or(map.version, |n| n.since);
            }
        }
        let signed = SignedMap::sign(&self.cluster_key, map, scheme, Tolerance::default())
            .map_err(|e| NodeError::Swarm(e.to_string()))?;
        self.install_signed(signed).await
    }

    /// Signs this cluster's map with `scheme`, `tolerance` and `replicas`
    /// metadata replicas per partition, and installs it.
    pub async fn install_map_with(
        &self,
        scheme: Scheme,
        tolerance: Tolerance,
        replicas: u8,
    ) -> Result<SignedMap, NodeError> {
        let signed = SignedMap::sign_with_replicas(
            &self.cluster_key,
            self.map(),
            scheme,
            tolerance,
            replicas,
        )
        .map_err(|e| NodeError::Swarm(e.to_string()))?;
        self.install_signed(signed).await
    }

    /// Installs a signed map on every running node.
    pub async fn install_signed(&self, signed: SignedMap) -> Result<SignedMap, NodeError> {
        let version = signed.map.version;
        for member in self.members.iter().filter_map(|m| m.node.as_ref()) {
            member.install_map(&signed)?;
            if !member
                .wait_for_map_version(version, Duration::from_secs(5))
                .await
            {
                return Err(NodeError::Swarm(format!(
                    "node {} did not take map version {version}",
                    member.node_id()
                )));
            }
        }
        Ok(signed)
    }

    /// The index of the member with this id.
    pub fn index_of(&self, node: &NodeId) -> usize {
        self.members
            .iter()
            .position(|m| m.identity.node_id() == *node)
            .expect("a member of this cluster")
    }

    /// Stops node `index` gracefully; its identity and data stay.
    pub async fn stop(&mut self, index: usize) {
        if let Some(node) = self.members[index].node.take() {
            node.shutdown().await;
        }
    }

    /// Starts node `index` again with the same identity and data, and
    /// reconnects it to the running nodes.
    pub async fn restart(&mut self, index: usize) -> Result<(), NodeError> {
        self.stop(index).await;
        self.start_member(index).await?;
        self.wait_until_connected(Duration::from_secs(20)).await
    }

    /// Waits until every running node has verified every other running node.
    pub async fn wait_until_connected(&self, timeout: Duration) -> Result<(), NodeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let running: Vec<&Node> = self
            .members
            .iter()
            .filter_map(|m| m.node.as_ref())
            .collect();
        for a in &running {
            for b in &running {
                if a.node_id() == b.node_id() {
                    continue;
                }
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if !a.wait_for_member(&b.node_id(), left).await {
                    return Err(NodeError::Swarm(format!(
                        "node {} never verified node {}",
                        a.node_id(),
                        b.node_id()
                    )));
                }
            }
        }
        Ok(())
    }

    pub async fn shutdown(mut self) {
        for index in 0..self.members.len() {
            self.stop(index).await;
        }
    }
}

/// Deterministic bytes that do not compress, from a seed (xorshift64).
/// xorshift64*: reproducible from the printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (not 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A seed for a randomized test: `CAIRN_SEED` if set, else a fresh one,
/// printed with `test` so that a failure can be replayed.
pub fn test_seed(test: &str) -> u64 {
    let seed = std::env::var("CAIRN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_unix_ms() | 1);
    eprintln!("{test}: CAIRN_SEED={seed}");
    seed
}

pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// 32 random bytes from a fresh libp2p key (the OS random source).
pub fn random_secret() -> [u8; 32] {
    let identity = Identity::generate();
    identity.signing_key().to_bytes()
}
