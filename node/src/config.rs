//! `cairn serve` configuration: a TOML file, overridden by environment
//! variables (`CAIRN_*`) and then by command-line flags.

use std::path::{Path, PathBuf};

use cairn_protocol::erasure::Scheme;
use cairn_protocol::ids::{NodeId, SiteId};
use cairn_protocol::membership::{
    Certificate, ClusterId, DEFAULT_METADATA_REPLICAS, MAX_METADATA_REPLICAS,
};
use cairn_protocol::placement::{ClusterMap, MapNode, NodeState, Placer, Tolerance};
use serde::Deserialize;
use thiserror::Error;

use crate::identity::{Identity, IdentityError};
use crate::scrub::ScrubSettings;
use crate::swarm::{DEFAULT_ANTI_ENTROPY_EVERY, Multiaddr, NodeConfig, StreamLimits};
use crate::workers::StoreSettings;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// The settings of one node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Where the node keeps its key, fragments and cluster map.
    pub data_dir: PathBuf,
    /// The cluster's id (hex), as `cairn admin cluster init` printed it.
    pub cluster: String,
    /// This node's enrolment certificate (`cairn admin node enroll`).
    pub certificate: PathBuf,
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub bootstrap: Vec<String>,
    pub capacity_bytes: u64,
    #[serde(default = "default_inbound_streams")]
    pub max_inbound_streams: usize,
    #[serde(default = "default_streams_per_peer")]
    pub max_streams_per_peer: usize,
    #[serde(default = "default_bytes_in_flight")]
    pub max_bytes_in_flight: u64,
    /// Connections accepted and still in their QUIC handshake.
    #[serde(default = "default_pending_connections")]
    pub max_pending_connections: u32,
    /// Connections established from other peers, all together.
    #[serde(default = "default_incoming_connections")]
    pub max_incoming_connections: u32,
    /// Connections established with any one peer.
    #[serde(default = "default_connections_per_peer")]
    pub max_connections_per_peer: u32,
    #[serde(default)]
    pub scrub: ScrubSection,
    #[serde(default)]
    pub store: StoreSection,
}

/// `[store]`: the trash period, the volumes and their compaction.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// How long a deleted fragment stays restorable; every node of a
    /// cluster should use the same.
    pub trash_period_seconds: u64,
    /// A new volume is started when the active one would pass this size.
    pub volume_bytes: u64,
    /// How often the trash is purged and volumes are compacted.
    pub housekeeping_every_seconds: u64,
    /// Bytes compaction copies per second (0: no limit).
    pub compaction_bytes_per_second: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        let settings = StoreSettings::default();
        Self {
            trash_period_seconds: settings.trash_period.as_secs(),
            volume_bytes: settings.volume_bytes,
            housekeeping_every_seconds: settings.housekeeping_every.as_secs(),
            compaction_bytes_per_second: settings.compaction_bytes_per_second,
        }
    }
}

impl StoreSection {
    pub fn settings(&self) -> Result<StoreSettings, ConfigError> {
        // Smaller volumes would mean a file for every few fragments.
        const SMALLEST_VOLUME: u64 = 1 << 20;
        if self.volume_bytes < SMALLEST_VOLUME {
            return Err(invalid(
                "store.volume_bytes",
                format!(
                    "{} is below the smallest, {SMALLEST_VOLUME}",
                    self.volume_bytes
                ),
            ));
        }
        Ok(StoreSettings {
            trash_period: std::time::Duration::from_secs(self.trash_period_seconds),
            volume_bytes: self.volume_bytes,
            housekeeping_every: std::time::Duration::from_secs(
                self.housekeeping_every_seconds.max(1),
            ),
            compaction_bytes_per_second: self.compaction_bytes_per_second,
        })
    }
}

/// `[scrub]`: how fast and how often the node re-hashes its fragments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubSection {
    /// 0: no limit.
    pub bytes_per_second: u64,
    /// From the end of one pass to the start of the next.
    pub every_seconds: u64,
}

impl Default for ScrubSection {
    fn default() -> Self {
        let settings = ScrubSettings::default();
        Self {
            bytes_per_second: settings.bytes_per_second,
            every_seconds: settings.every.as_secs(),
        }
    }
}

impl ScrubSection {
    pub fn settings(&self) -> ScrubSettings {
        ScrubSettings {
            bytes_per_second: self.bytes_per_second,
            every: std::time::Duration::from_secs(self.every_seconds.max(1)),
        }
    }
}

fn default_listen() -> String {
    "/ip4/0.0.0.0/udp/7400/quic-v1".into()
}

fn default_inbound_streams() -> usize {
    StreamLimits::default().inbound_streams
}

fn default_streams_per_peer() -> usize {
    StreamLimits::default().streams_per_peer
}

fn default_bytes_in_flight() -> u64 {
    StreamLimits::default().bytes_in_flight
}

fn default_pending_connections() -> u32 {
    StreamLimits::default().pending_connections
}

fn default_incoming_connections() -> u32 {
    StreamLimits::default().incoming_connections
}

fn default_connections_per_peer() -> u32 {
    StreamLimits::default().connections_per_peer
}

/// A TOML file's top-level table: the node's settings, and the sections
/// other parts of a process read (the binary takes `[s3]` out for the
/// gateway before the rest becomes a [`ServeConfig`]).
pub fn read_toml(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

impl ServeConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_table(path, read_toml(path)?)
    }

    /// The node's settings from a file's table once other parts took
    /// their sections out; any key left that the node does not know is
    /// an error that names it.
    pub fn from_table(path: &Path, table: toml::Table) -> Result<Self, ConfigError> {
        table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })
    }

    /// Applies `CAIRN_DATA_DIR`, `CAIRN_LISTEN`, `CAIRN_BOOTSTRAP`
    /// (comma-separated) and `CAIRN_CAPACITY_BYTES` when set.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(dir) = env("CAIRN_DATA_DIR") {
            self.data_dir = dir.into();
        }
        if let Some(listen) = env("CAIRN_LISTEN") {
            self.listen = listen;
        }
        if let Some(peers) = env("CAIRN_BOOTSTRAP") {
            self.bootstrap = peers
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect();
        }
        if let Some(capacity) = env("CAIRN_CAPACITY_BYTES") {
            self.capacity_bytes = capacity.parse().map_err(|_| {
                invalid(
                    "CAIRN_CAPACITY_BYTES",
                    format!("{capacity:?} is not a number of bytes"),
                )
            })?;
        }
        Ok(())
    }

    /// The node's key path inside its data directory.
    pub fn key_path(&self) -> PathBuf {
        self.data_dir.join("node.key")
    }

    /// Loads the identity (creating it on first start) and the certificate.
    pub fn into_node_config(self) -> Result<(NodeConfig, Identity), ConfigError> {
        let identity = Identity::load_or_create(&self.key_path())?;
        let cluster = ClusterId::from_hex(&self.cluster)
            .ok_or_else(|| invalid("cluster", "expected the 64-hex-digit cluster id"))?;
        let bytes = std::fs::read(&self.certificate).map_err(|source| ConfigError::Read {
            path: self.certificate.clone(),
            source,
        })?;
        let certificate =
            Certificate::decode(&bytes).map_err(|e| invalid("certificate", e.to_string()))?;
        let listen: Multiaddr = self
            .listen
            .parse()
            .map_err(|e| invalid("listen", format!("{:?}: {e}", self.listen)))?;
        let bootstrap = self
            .bootstrap
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|e| invalid("bootstrap", format!("{a:?}: {e}")))
            })
            .collect::<Result<Vec<Multiaddr>, _>>()?;
        if self.capacity_bytes == 0 {
            return Err(invalid("capacity_bytes", "must be above zero"));
        }
        let config = NodeConfig {
            data_dir: self.data_dir,
            cluster,
            certificate,
            listen,
            bootstrap,
            capacity_bytes: self.capacity_bytes,
            limits: StreamLimits {
                inbound_streams: self.max_inbound_streams,
                streams_per_peer: self.max_streams_per_peer,
                bytes_in_flight: self.max_bytes_in_flight,
                pending_connections: self.max_pending_connections,
                incoming_connections: self.max_incoming_connections,
                connections_per_peer: self.max_connections_per_peer,
            },
            anti_entropy_every: DEFAULT_ANTI_ENTROPY_EVERY,
            scrub: self.scrub.settings(),
            store: self.store.settings()?,
        };
        Ok((config, identity))
    }
}

/// A cluster map as an operator writes it, for `cairn admin map sign`:
///
/// ```toml
/// version = 2
/// data_fragments = 4
/// parity_fragments = 2
/// extra_nodes = 0      # nodes lost beyond a whole site
/// metadata_replicas = 3 # replicas of each metadata partition (1 to 15)
///
/// [[node]]
/// id = "<64 hex digits from cairn admin node id>"
/// site = "lyon-1"
/// capacity_bytes = 4000000000000
/// state = "up"         # up, down, draining or out
/// since = 1            # the version from which it has been a member;
///                      # filled from the map in force by --previous
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapConfig {
    pub version: u64,
    pub data_fragments: u8,
    pub parity_fragments: u8,
    #[serde(default)]
    pub extra_nodes: u8,
    #[serde(default = "default_metadata_replicas")]
    pub metadata_replicas: u8,
    #[serde(rename = "node")]
    pub nodes: Vec<MapNodeConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapNodeConfig {
    pub id: String,
    pub site: String,
    pub capacity_bytes: u64,
    #[serde(default = "default_state")]
    pub state: String,
    #[serde(default)]
    pub since: Option<u64>,
}

fn default_metadata_replicas() -> u8 {
    DEFAULT_METADATA_REPLICAS
}

/// A checked map and the policy signed with it.
#[derive(Debug, Clone)]
pub struct MapParts {
    pub map: ClusterMap,
    pub scheme: Scheme,
    pub tolerance: Tolerance,
    pub metadata_replicas: u8,
}

fn default_state() -> String {
    "up".into()
}

impl MapConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The map and its policy, refused unless placement can keep every
    /// object readable through the loss of a site on it.
    ///
    /// A node's `since` is the one written, else the one `previous` (the
    /// map in force) gives it (1 where it gives none), else this version
    /// for a node `previous` lacks or has out; without `previous`, 1 in a
    /// first map and 0 (unknown) after.
    pub fn into_parts(self, previous: Option<&ClusterMap>) -> Result<MapParts, ConfigError> {
        if self.version == 0 {
            return Err(invalid(
                "version",
                "must be 1 or more, and above the map in force",
            ));
        }
        let scheme = Scheme::new(self.data_fragments, self.parity_fragments)
            .map_err(|e| invalid("data_fragments/parity_fragments", e.to_string()))?;
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for node in self.nodes {
            let id = NodeId::from_hex(&node.id)
                .filter(|id| id.verifying_key().is_ok())
                .ok_or_else(|| invalid("node.id", format!("{:?} is not a node id", node.id)))?;
            let site = SiteId::new(&node.site).map_err(|e| invalid("node.site", e.to_string()))?;
            let state = match node.state.as_str() {
                "up" => NodeState::Up,
                "down" => NodeState::Down,
                "draining" => NodeState::Draining,
                "out" => NodeState::Out,
                other => {
                    return Err(invalid(
                        "node.state",
                        format!("{other:?}: expected up, down, draining or out"),
                    ));
                }
            };
            let since = match (node.since, previous) {
                (Some(since), _) => since,
                (None, Some(previous)) => match previous.nodes.iter().find(|n| n.id == id) {
                    // Absent, or out and back: a membership begins.
                    None => self.version,
                    Some(before) if before.state == NodeState::Out && state != NodeState::Out => {
                        self.version
                    }
                    // Unknown (a map of an older format): a member from
                    // the first map, as the nodes of that format assumed.
                    Some(before) if before.since == 0 => 1,
                    Some(before) => before.since,
                },
                (None, None) if self.version == 1 => 1,
                (None, None) => 0,
            };
            if since > self.version {
                return Err(invalid(
                    "node.since",
                    format!("{since} is after the map's version {}", self.version),
                ));
            }
            nodes.push(MapNode {
                id,
                site,
                capacity_bytes: node.capacity_bytes,
                state,
                since,
            });
        }
        let map = ClusterMap {
            version: self.version,
            nodes,
        };
        let tolerance = Tolerance {
            extra_nodes: self.extra_nodes,
        };
        Placer::new(&map, scheme, tolerance).map_err(|e| invalid("node", e.to_string()))?;
        if !(1..=MAX_METADATA_REPLICAS).contains(&self.metadata_replicas) {
            return Err(invalid(
                "metadata_replicas",
                format!("{} (1 to {MAX_METADATA_REPLICAS})", self.metadata_replicas),
            ));
        }
        Ok(MapParts {
            map,
            scheme,
            tolerance,
            metadata_replicas: self.metadata_replicas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_bad_values_are_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cairn.toml");
        std::fs::write(&path, "data_dir = \"d\"\ncluster = \"00\"\ncertificate = \"c\"\ncapacity_bytes = 1\nlisten_on = \"x\"\n").unwrap();
        let error = ServeConfig::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("listen_on"), "{error}");
        std::fs::write(
            &path,
            "data_dir = \"d\"\ncluster = \"00\"\ncertificate = \"c\"\ncapacity_bytes = 1\n",
        )
        .unwrap();
        let mut config = ServeConfig::from_file(&path).unwrap();
        let env = |name: &str| match name {
            "CAIRN_BOOTSTRAP" => {
                Some("/ip4/127.0.0.1/udp/1/quic-v1, /ip4/127.0.0.1/udp/2/quic-v1".to_owned())
            }
            "CAIRN_CAPACITY_BYTES" => Some("12".to_owned()),
            _ => None,
        };
        config.apply_env(env).unwrap();
        assert_eq!(config.bootstrap.len(), 2);
        assert_eq!(config.capacity_bytes, 12);
        config.data_dir = dir.path().to_owned();
        let error = config.into_node_config().err().unwrap().to_string();
        assert!(error.contains("cluster"), "{error}");
    }

    #[test]
    fn the_scrub_section_is_read_and_its_unknown_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cairn.toml");
        let base = "data_dir = \"d\"\ncluster = \"00\"\ncertificate = \"c\"\ncapacity_bytes = 1\n";
        std::fs::write(&path, base).unwrap();
        let defaults = ServeConfig::from_file(&path).unwrap().scrub.settings();
        assert_eq!(defaults.every, ScrubSettings::default().every);
        std::fs::write(&path, format!("{base}[scrub]\nbytes_per_second = 5\n")).unwrap();
        let settings = ServeConfig::from_file(&path).unwrap().scrub.settings();
        assert_eq!(settings.bytes_per_second, 5);
        assert_eq!(settings.every, ScrubSettings::default().every);
        std::fs::write(&path, format!("{base}[scrub]\nrate = 5\n")).unwrap();
        let error = ServeConfig::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("rate"), "{error}");
    }

    #[test]
    fn a_map_that_cannot_survive_a_site_loss_is_refused_with_the_reason() {
        let node = |seed: u8, site: &str| {
            let key = cairn_protocol::ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
            format!(
                "[[node]]\nid = \"{}\"\nsite = \"{site}\"\ncapacity_bytes = 1000\n",
                NodeId::from_verifying_key(&key.verifying_key()).to_hex()
            )
        };
        let text = |k: u8, m: u8, nodes: &str| {
            format!("version = 3\ndata_fragments = {k}\nparity_fragments = {m}\n{nodes}")
        };
        let three_sites = [node(1, "a"), node(2, "b"), node(3, "c")].concat();
        let config: MapConfig = toml::from_str(&text(2, 1, &three_sites)).unwrap();
        let parts = config.into_parts(None).unwrap();
        assert_eq!(
            (
                parts.map.version,
                parts.map.nodes.len(),
                parts.scheme.data(),
                parts.metadata_replicas
            ),
            (3, 3, 2, 3)
        );
        let five = text(2, 1, &three_sites)
            .replace("version = 3\n", "version = 3\nmetadata_replicas = 16\n");
        let error = toml::from_str::<MapConfig>(&five)
            .unwrap()
            .into_parts(None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("metadata_replicas"), "{error}");
        // 4+2 wants a node per fragment, two per site: three nodes are too few.
        let config: MapConfig = toml::from_str(&text(4, 2, &three_sites)).unwrap();
        let error = config.into_parts(None).unwrap_err().to_string();
        assert!(
            error.contains("cannot survive the loss of a site"),
            "{error}"
        );
        let bad_state = text(2, 1, &three_sites).replace(
            "capacity_bytes = 1000\n",
            "capacity_bytes = 1000\nstate = \"gone\"\n",
        );
        let error = toml::from_str::<MapConfig>(&bad_state)
            .unwrap()
            .into_parts(None)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("expected up, down, draining or out"),
            "{error}"
        );
    }

    #[test]
    fn since_is_carried_from_the_previous_map_or_set_for_a_node_it_lacks() {
        let id = |seed: u8| {
            let key = cairn_protocol::ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
            NodeId::from_verifying_key(&key.verifying_key())
        };
        let entry = |seed: u8, site: &str, since: &str| {
            format!(
                "[[node]]\nid = \"{}\"\nsite = \"{site}\"\ncapacity_bytes = 1000\n{since}",
                id(seed).to_hex()
            )
        };
        let parts = |version: u64, nodes: &[String], previous: Option<&ClusterMap>| {
            let text = format!(
                "version = {version}\ndata_fragments = 2\nparity_fragments = 1\n{}",
                nodes.concat()
            );
            toml::from_str::<MapConfig>(&text)
                .unwrap()
                .into_parts(previous)
        };
        let since =
            |map: &ClusterMap, seed: u8| map.nodes.iter().find(|n| n.id == id(seed)).unwrap().since;
        let three = [entry(1, "a", ""), entry(2, "b", ""), entry(3, "c", "")];
        let first = parts(1, &three, None).unwrap().map;
        assert!((1..=3).all(|n| since(&first, n) == 1));
        // Without the map in force, a later map cannot know.
        assert_eq!(since(&parts(2, &three, None).unwrap().map, 1), 0);
        let mut four = three.to_vec();
        four.push(entry(4, "a", ""));
        let second = parts(2, &four, Some(&first)).unwrap().map;
        assert_eq!((since(&second, 1), since(&second, 4)), (1, 2));
        // Written wins; after the version is refused.
        four[0] = entry(1, "a", "since = 2\n");
        assert_eq!(since(&parts(2, &four, Some(&first)).unwrap().map, 1), 2);
        four[0] = entry(1, "a", "since = 3\n");
        let error = parts(2, &four, Some(&first)).unwrap_err().to_string();
        assert!(error.contains("since"), "{error}");
        // After a map that did not say (an older format): 1, not a return.
        let mut unknown = first.clone();
        unknown.nodes.iter_mut().for_each(|n| n.since = 0);
        four[0] = entry(1, "a", "");
        assert_eq!(since(&parts(2, &four, Some(&unknown)).unwrap().map, 1), 1);
        // Out in the map in force and up now: a return.
        let mut out = first.clone();
        out.nodes[0].state = NodeState::Out;
        assert_eq!(since(&parts(2, &four, Some(&out)).unwrap().map, 1), 2);
    }
}
