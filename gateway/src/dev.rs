//! `cairn dev`: a whole cluster in one process, nothing to set up — sites
//! of nodes on loopback QUIC, a signed map, and the S3 gateway on the first
//! node. Everything it creates (cluster key, node keys, root key, access
//! key, data) lives under one directory, so a restart finds its objects.

use cairn_model::lifecycle::{LifecycleSettings, LifecycleWorker};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_node::clock::now_unix_ms;
use cairn_node::identity::Identity;
use cairn_node::swarm::{DEFAULT_ANTI_ENTROPY_EVERY, Node, NodeConfig, StreamLimits};
use cairn_protocol::encryption::SecretKey;
use cairn_protocol::erasure::Scheme;
use cairn_protocol::ids::SiteId;
use cairn_protocol::membership::{Certificate, ClusterId, SignedMap};
use cairn_protocol::placement::{ClusterMap, MapNode, NodeState, Tolerance};
use tokio::net::TcpListener;

use cairn_model::collector::{Collection, Collector};
use cairn_model::kms::RootKey;
use cairn_model::repair::{RepairSettings, Repairer};
use cairn_node::clock::random_bytes;

use crate::error::{GatewayError, GatewayResult};
use crate::{Gateway, GatewayConfig};

/// The access key id `cairn dev` always uses (its secret is random, kept
/// in the data directory).
pub const DEV_ACCESS_KEY: &str = "CAIRNDEVACCESSKEY000";

pub struct DevOptions {
    pub data_dir: PathBuf,
    /// The S3 port to try first; the next free one is taken if it is busy.
    pub port: u16,
    pub sites: usize,
    pub nodes_per_site: usize,
    pub scheme: Scheme,
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("cairn-dev-data"),
            port: 9000,
            sites: 3,
            nodes_per_site: 2,
            scheme: Scheme::new(4, 2).expect("4+2 is a valid scheme"),
        }
    }
}

/// A running dev cluster.
pub struct DevCluster {
    nodes: Vec<Node>,
    collectors: Vec<Collector>,
    repairers: Vec<Repairer>,
    lifecycle: Vec<LifecycleWorker>,
    gateway: Gateway,
    pub access_key: String,
    pub secret_key: String,
}

fn internal(context: &str) -> impl Fn(String) -> GatewayError + '_ {
    move |e| GatewayError::Internal(format!("{context}: {e}"))
}

/// The secret seed of the dev access key, created on first start.
fn dev_key_seed(path: &Path) -> GatewayResult<SecretKey> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let bytes = cairn_protocol::from_hex::<32>(text.trim()).ok_or_else(|| {
            GatewayError::Internal(format!("{} is not 64 hex digits", path.display()))
        })?;
        return Ok(SecretKey::from_bytes(bytes));
    }
    let bytes = random_bytes::<32>();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    options
        .open(path)
        .and_then(|mut f| f.write_all(cairn_protocol::to_hex(&bytes).as_bytes()))
        .map_err(|e| GatewayError::Internal(format!("{}: {e}", path.display())))?;
    Ok(SecretKey::from_bytes(bytes))
}

/// Binds the first free port from `first` on 127.0.0.1.
async fn bind_from(first: u16) -> GatewayResult<TcpListener> {
    for port in first..first.saturating_add(100) {
        if let Ok(listener) = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await {
            return Ok(listener);
        }
    }
    Err(GatewayError::Internal(format!(
        "no free port in {first}..{}",
        first.saturating_add(100)
    )))
}

impl DevCluster {
    pub async fn start(options: DevOptions) -> GatewayResult<Self> {
        let dir = &options.data_dir;
        std::fs::create_dir_all(dir).map_err(|e| internal("data directory")(e.to_string()))?;
        let cluster_key = Identity::load_or_create(&dir.join("cluster.key"))
            .map_err(|e| internal("cluster key")(e.to_string()))?
            .signing_key()
            .clone();
        let cluster = ClusterId::of(&cluster_key);
        let root_path = dir.join("root.key");
        let root = if root_path.exists() {
            RootKey::load(&root_path)?
        } else {
            RootKey::create(&root_path)?
        };

        let mut nodes: Vec<Node> = Vec::new();
        let mut map_nodes = Vec::new();
        for site_index in 0..options.sites {
            let site = SiteId::new(&format!("site-{}", site_index + 1))
                .map_err(|e| internal("site")(e.to_string()))?;
            for node_index in 0..options.nodes_per_site {
                let data_dir = dir.join(format!("{site}-node-{}", node_index + 1));
                std::fs::create_dir_all(&data_dir)
                    .map_err(|e| internal("node directory")(e.to_string()))?;
                let identity = Identity::load_or_create(&data_dir.join("node.key"))
                    .map_err(|e| internal("node key")(e.to_string()))?;
                let now = now_unix_ms();
                let certificate = Certificate::issue(
                    &cluster_key,
                    identity.node_id(),
                    site.clone(),
                    now,
                    now + 10 * 365 * 24 * 3600 * 1000,
                );
                map_nodes.push(MapNode {
                    id: identity.node_id(),
                    site: site.clone(),
                    capacity_bytes: 1 << 40,
                    state: NodeState::Up,
                    since: 1,
                });
                let config = NodeConfig {
                    data_dir,
                    cluster,
                    certificate,
                    listen: "/ip4/127.0.0.1/udp/0/quic-v1"
                        .parse()
                        .expect("a valid multiaddr"),
                    bootstrap: nodes.iter().flat_map(|n| n.listen_addrs()).collect(),
                    capacity_bytes: 1 << 40,
                    limits: StreamLimits::default(),
                    anti_entropy_every: DEFAULT_ANTI_ENTROPY_EVERY,
                    scrub: Default::default(),
                    store: Default::default(),
                };
                let node = Node::start(config, identity)
                    .await
                    .map_err(|e| internal("node")(e.to_string()))?;
                nodes.push(node);
            }
        }
        let map = SignedMap::sign(
            &cluster_key,
            ClusterMap {
                version: 1,
                nodes: map_nodes,
            },
            options.scheme,
            Tolerance::default(),
        )
        .map_err(|e| internal("cluster map")(e.to_string()))?;
        for node in &nodes {
            node.install_map(&map)
                .map_err(|e| internal("cluster map")(e.to_string()))?;
        }
        for a in &nodes {
            for b in &nodes {
                if a.node_id() != b.node_id()
                    && !a
                        .wait_for_member(&b.node_id(), Duration::from_secs(30))
                        .await
                {
                    return Err(GatewayError::Internal(format!(
                        "node {} never reached node {}",
                        a.node_id(),
                        b.node_id()
                    )));
                }
            }
        }

        let listener = bind_from(options.port).await?;
        let gateway = Gateway::start_on(
            nodes[0].handle(),
            root,
            GatewayConfig {
                listen: listener
                    .local_addr()
                    .map_err(|e| internal("listener")(e.to_string()))?,
                domains: vec!["localhost".into()],
                ..GatewayConfig::default()
            },
            listener,
        )?;
        let collectors = nodes
            .iter()
            .map(|node| Collector::start(node.handle(), Collection::default()))
            .collect();
        let repairers = nodes
            .iter()
            .map(|node| Repairer::start(node.handle(), RepairSettings::default()))
            .collect();
        let lifecycle = nodes
            .iter()
            .map(|node| LifecycleWorker::start(node.handle(), LifecycleSettings::default()))
            .collect();
        let seed = dev_key_seed(&dir.join("access-key.seed"))?;
        let key = gateway
            .keys()
            .create_with_id(
                DEV_ACCESS_KEY,
                "cairn dev",
                seed,
                cairn_protocol::records::permission::BYPASS_GOVERNANCE,
            )
            .await?;
        Ok(Self {
            nodes,
            collectors,
            repairers,
            lifecycle,
            gateway,
            access_key: key.id,
            secret_key: key.secret,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.gateway.address())
    }

    pub async fn shutdown(self) {
        drop(self.collectors);
        drop(self.repairers);
        drop(self.lifecycle);
        self.gateway.stop().await;
        for node in self.nodes {
            node.shutdown().await;
        }
    }
}
