//! `cairn`: the command line. It parses arguments, sets up logging and hands
//! over to the node and gateway crates; nothing else lives here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use cairn_model::collector::Collector;
use cairn_model::repair::Repairer;
use cairn_node::clock::now_unix_ms;
use cairn_node::config::MapConfig;
use cairn_node::config::ServeConfig;
use cairn_node::identity::Identity;
use cairn_node::swarm::Node;
use cairn_node::swarm::{DEFAULT_ANTI_ENTROPY_EVERY, NodeConfig, StreamLimits};
use cairn_protocol::ids::{NodeId, SiteId};
use cairn_protocol::membership::{Certificate, ClusterId, SignedMap};
use clap::{Parser, Subcommand};

mod status;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Indestructible, multi-site, encrypted object storage"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A local cluster (3 sites x 2 nodes, 4+2) with an S3 endpoint, in one
    /// process, nothing to set up.
    Dev {
        /// Where everything is kept; a restart finds its objects there.
        #[arg(long, default_value = "cairn-dev-data")]
        data_dir: PathBuf,
        /// The S3 port to try first (the next free one is taken if busy).
        #[arg(long, default_value_t = 9000)]
        port: u16,
    },
    /// Run one node of a cluster.
    Serve {
        /// The node's TOML configuration.
        #[arg(short, long)]
        config: PathBuf,
        /// Overrides `data_dir` (and CAIRN_DATA_DIR).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `listen` (and CAIRN_LISTEN), a QUIC multiaddr.
        #[arg(long)]
        listen: Option<String>,
        /// Overrides `bootstrap` (and CAIRN_BOOTSTRAP); repeat for several peers.
        #[arg(long)]
        bootstrap: Vec<String>,
    },
    /// Administer the cluster: keys and enrolment.
    Admin {
        #[command(subcommand)]
        command: Admin,
    },
    /// Print the version and the formats this build speaks.
    Version,
}

#[derive(Subcommand)]
enum Admin {
    /// Cluster key commands.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Node identity and enrolment.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// The signed cluster map: sites, nodes, capacities, states.
    Map {
        #[command(subcommand)]
        command: MapCommand,
    },
    /// S3 access keys, kept in the cluster's replicated metadata.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Every node of the map: up or down, what it holds, its last scrub
    /// and repair, and the segments at full strength, degraded or
    /// unreadable.
    Status {
        /// The cluster key.
        #[arg(long)]
        cluster_key: PathBuf,
        /// A node's QUIC address, e.g. /ip4/10.0.0.5/udp/7400/quic-v1.
        #[arg(long)]
        peer: String,
        /// Wait until every node has passed over its buckets since now and
        /// every segment is at full strength, showing progress (a bar on a
        /// terminal, a line per change otherwise); fails if a segment is
        /// unreadable.
        #[arg(long)]
        wait: bool,
    },
    /// Object versions deleted or overwritten within the trash period:
    /// list them, or bring one back.
    Trash {
        #[command(subcommand)]
        command: TrashCommand,
    },
    /// Create a KMS root key file for the gateways (mode 0600).
    RootKey {
        /// Where to write it; refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
    },
}

/// How a key command reaches the cluster: it joins for a moment under a
/// ten-minute certificate of its own.
#[derive(clap::Args)]
struct ClusterAccess {
    /// The cluster key.
    #[arg(long)]
    cluster_key: PathBuf,
    /// A node's QUIC address, e.g. /ip4/10.0.0.5/udp/7400/quic-v1.
    #[arg(long)]
    peer: String,
    /// The gateways' KMS root key file (or CAIRN_ROOT_KEY), which wraps
    /// the secrets.
    #[arg(long)]
    root_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create an access key and print its id and secret (shown only once).
    Create {
        #[command(flatten)]
        access: ClusterAccess,
        /// A name to remember the key by.
        #[arg(long, default_value = "")]
        name: String,
        /// Let requests signed with the key bypass a governance retention
        /// (x-amz-bypass-governance-retention); without it they are 403.
        #[arg(long)]
        bypass_governance: bool,
    },
    /// List the access keys (never their secrets).
    List {
        #[command(flatten)]
        access: ClusterAccess,
    },
    /// Delete an access key; requests signed with it are refused within
    /// seconds on every gateway.
    Delete {
        #[command(flatten)]
        access: ClusterAccess,
        /// The access key id.
        id: String,
    },
}

#[derive(Subcommand)]
enum TrashCommand {
    /// The versions in the trash, with how long each stays restorable.
    List {
        #[command(flatten)]
        access: ClusterAccess,
        /// Only this bucket's (all buckets' otherwise).
        #[arg(long)]
        bucket: Option<String>,
    },
    /// Bring a version back as its key's current object: the same bytes,
    /// ETag, headers and Last-Modified (under a new version id). The
    /// object it replaces goes to the trash.
    Restore {
        #[command(flatten)]
        access: ClusterAccess,
        #[arg(long)]
        bucket: String,
        #[arg(long)]
        key: String,
        /// The version id `cairn admin trash list` shows.
        #[arg(long)]
        version: String,
    },
}

#[derive(Subcommand)]
enum MapCommand {
    /// Sign a map written in TOML, after checking that placement on it
    /// survives the loss of a site.
    Sign {
        #[arg(long)]
        cluster_key: PathBuf,
        /// The map in TOML (see the README).
        #[arg(long)]
        map: PathBuf,
        /// Where to write the signed map.
        #[arg(long)]
        out: PathBuf,
        /// The signed map in force: each node's `since` (the version from
        /// which it has been a member) is carried from it, or set to this
        /// version for a node it lacks.
        #[arg(long)]
        previous: Option<PathBuf>,
    },
    /// Hand a signed map to a running node, which passes it to every
    /// member; reports the version the node holds afterwards.
    Push {
        /// The cluster key: the command joins the cluster for a moment
        /// under a ten-minute certificate of its own.
        #[arg(long)]
        cluster_key: PathBuf,
        /// The signed map from `cairn admin map sign`.
        #[arg(long)]
        map: PathBuf,
        /// A node's QUIC address, e.g. /ip4/10.0.0.5/udp/7400/quic-v1.
        #[arg(long)]
        peer: String,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Create a cluster key (keep it offline) and print the cluster id.
    Init {
        /// Where to write the new key (mode 0600); refuses to overwrite.
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Print a node's id, creating its key in the data directory if needed.
    Id {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Sign an enrolment certificate for a node.
    Enroll {
        /// The cluster key from `cairn admin cluster init`.
        #[arg(long)]
        cluster_key: PathBuf,
        /// The node id (hex) from `cairn admin node id`.
        #[arg(long)]
        node: String,
        /// The node's site (failure domain).
        #[arg(long)]
        site: String,
        /// How long the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Where to write the certificate.
        #[arg(long)]
        out: PathBuf,
    },
}

fn load_cluster_key(path: &Path) -> Result<Identity> {
    if !path.exists() {
        bail!(
            "cluster key {} does not exist; create one with `cairn admin cluster init`",
            path.display()
        );
    }
    Ok(Identity::load_or_create(path)?)
}

fn admin(command: Admin) -> Result<()> {
    match command {
        Admin::Cluster {
            command: ClusterCommand::Init { key },
        } => {
            if key.exists() {
                bail!(
                    "{} already exists: a cluster key is never overwritten",
                    key.display()
                );
            }
            let cluster_key = Identity::load_or_create(&key)?;
            let cluster = ClusterId::of(cluster_key.signing_key());
            println!("cluster id: {}", cluster.to_hex());
            println!(
                "cluster key written to {} (mode 0600); keep it offline",
                key.display()
            );
        }
        Admin::Node {
            command: NodeCommand::Id { data_dir },
        } => {
            let identity = Identity::load_or_create(&data_dir.join("node.key"))?;
            println!("node id: {}", identity.node_id().to_hex());
        }
        Admin::Node {
            command:
                NodeCommand::Enroll {
                    cluster_key,
                    node,
                    site,
                    days,
                    out,
                },
        } => {
            let cluster_key = load_cluster_key(&cluster_key)?;
            let node =
                NodeId::from_hex(&node).context("--node: expected the 64-hex-digit node id")?;
            node.verifying_key().context("--node")?;
            let site = SiteId::new(&site)?;
            let now = now_unix_ms();
            let expires = now.saturating_add(days.saturating_mul(24 * 3600 * 1000));
            let certificate =
                Certificate::issue(cluster_key.signing_key(), node, site.clone(), now, expires);
            std::fs::write(&out, certificate.encode())
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "enrolled node {} in site {site} for {days} days: {}",
                node.to_hex(),
                out.display()
            );
        }
        Admin::Map {
            command:
                MapCommand::Sign {
                    cluster_key,
                    map,
                    out,
                    previous,
                },
        } => {
            let cluster_key = load_cluster_key(&cluster_key)?;
            let cluster = ClusterId::of(cluster_key.signing_key());
            let previous = previous
                .map(|path| -> Result<SignedMap> {
                    let bytes = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    SignedMap::decode(&bytes, &cluster).with_context(|| {
                        format!("{} is not a map signed by this cluster key", path.display())
                    })
                })
                .transpose()?;
            let parts =
                MapConfig::from_file(&map)?.into_parts(previous.as_ref().map(|p| &p.map))?;
            let (version, nodes, scheme) = (parts.map.version, parts.map.nodes.len(), parts.scheme);
            let signed = SignedMap::sign_with_replicas(
                cluster_key.signing_key(),
                parts.map,
                parts.scheme,
                parts.tolerance,
                parts.metadata_replicas,
            )?;
            if let Some(previous) = &previous {
                if previous.map.version >= version {
                    bail!(
                        "the map's version {version} must be above the previous map's {}",
                        previous.map.version
                    );
                }
                previous.check_since(&signed)?;
            }
            if !signed.since_known() {
                eprintln!(
                    "warning: some nodes' `since` is unknown; metadata tombstones are kept until a map gives every node one (sign with --previous <the map in force>)"
                );
            }
            std::fs::write(&out, signed.encode())
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "signed cluster map version {version}: {nodes} nodes, scheme {scheme}: {}",
                out.display()
            );
        }
        Admin::RootKey { out } => {
            cairn_model::kms::RootKey::create(&out)?;
            println!(
                "KMS root key written to {} (mode 0600); give it to every gateway node, and keep a copy offline: without it no object can be read",
                out.display()
            );
        }
        Admin::Key { command } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(key_command(command))?;
        }
        Admin::Trash { command } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(trash_command(command))?;
        }
        Admin::Status {
            cluster_key,
            peer,
            wait,
        } => {
            let cluster_key = load_cluster_key(&cluster_key)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(status_command(cluster_key, peer, wait))?;
        }
        Admin::Map {
            command:
                MapCommand::Push {
                    cluster_key,
                    map,
                    peer,
                },
        } => {
            let cluster_key = load_cluster_key(&cluster_key)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(push_map(cluster_key, map, peer))?;
        }
    }
    Ok(())
}

/// A member of the cluster for ten minutes at most, with a scratch data
/// directory, under a certificate the cluster key signs for it.
async fn temporary_member(
    cluster_key: &Identity,
    bootstrap: Vec<cairn_node::swarm::Multiaddr>,
) -> Result<(tempfile::TempDir, Node)> {
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let identity = Identity::generate();
    let now = now_unix_ms();
    let certificate = Certificate::issue(
        cluster_key.signing_key(),
        identity.node_id(),
        SiteId::new("admin")?,
        now,
        now + 10 * 60 * 1000,
    );
    let config = NodeConfig {
        data_dir: scratch.path().to_owned(),
        cluster: ClusterId::of(cluster_key.signing_key()),
        certificate,
        listen: "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
        bootstrap,
        capacity_bytes: 1 << 20,
        limits: StreamLimits::default(),
        anti_entropy_every: DEFAULT_ANTI_ENTROPY_EVERY,
        scrub: Default::default(),
        store: Default::default(),
    };
    let node = Node::start(config, identity).await?;
    Ok((scratch, node))
}

/// Joins the cluster as a short-lived member through `peer` and waits
/// until it holds the map and reaches the nodes in it.
async fn join_for_a_moment(
    cluster_key: &Identity,
    peer: &str,
) -> Result<(tempfile::TempDir, Node)> {
    let address = peer
        .parse()
        .with_context(|| format!("--peer {peer:?} is not a multiaddr"))?;
    let (scratch, node) = temporary_member(cluster_key, vec![address]).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while node.cluster_map().is_none() {
        if tokio::time::Instant::now() > deadline {
            node.shutdown().await;
            bail!("{peer} did not hand over the cluster map within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let map = node.cluster_map().expect("checked above");
    for member in &map.map.nodes {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !node.wait_for_member(&member.id, left).await {
            eprintln!(
                "node {} not reached yet; the metadata quorum may still answer",
                member.id
            );
        }
    }
    Ok((scratch, node))
}

async fn key_command(command: KeyCommand) -> Result<()> {
    use cairn_model::access_keys::AccessKeys;
    use cairn_model::kms::{Kms, RootKey};
    let access = match &command {
        KeyCommand::Create { access, .. }
        | KeyCommand::List { access }
        | KeyCommand::Delete { access, .. } => access,
    };
    let cluster_key = load_cluster_key(&access.cluster_key)?;
    let root = RootKey::from_env_or_file(access.root_key.as_deref())?;
    let (_scratch, node) = join_for_a_moment(&cluster_key, &access.peer).await?;
    let metadata = node.metadata().clone();
    let keys = AccessKeys::new(
        Kms::new(root, metadata.clone()),
        metadata,
        cairn_model::access_keys::DEFAULT_CACHE_FOR,
    );
    let outcome = async {
        match &command {
            KeyCommand::Create {
                name,
                bypass_governance,
                ..
            } => {
                let permissions = if *bypass_governance {
                    cairn_protocol::records::permission::BYPASS_GOVERNANCE
                } else {
                    0
                };
                let key = keys.create_with(name, permissions).await?;
                println!("access key: {}", key.id);
                println!("secret key: {}", key.secret);
                println!("(the secret is shown only now)");
            }
            KeyCommand::List { .. } => {
                for key in keys.list().await? {
                    let may_bypass = key.permissions
                        & cairn_protocol::records::permission::BYPASS_GOVERNANCE
                        != 0;
                    println!(
                        "{}  created {}  {}{}",
                        key.id,
                        key.created_unix_ms,
                        key.name,
                        if may_bypass {
                            "  (may bypass governance retention)"
                        } else {
                            ""
                        }
                    );
                }
            }
            KeyCommand::Delete { id, .. } => {
                if !keys.delete(id).await? {
                    bail!("there is no access key {id}");
                }
                println!("deleted access key {id}");
            }
        }
        anyhow::Ok(())
    }
    .await;
    drop(keys);
    node.shutdown().await;
    outcome
}

/// `text` as it prints safely on one line: as it is when it holds no
/// control character, quoted and escaped otherwise.
fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        format!("{text:?}")
    } else {
        text.to_owned()
    }
}

async fn trash_command(command: TrashCommand) -> Result<()> {
    use cairn_model::buckets::Buckets;
    use cairn_model::kms::{Kms, RootKey};
    use cairn_model::trash;
    let (TrashCommand::List { access, .. } | TrashCommand::Restore { access, .. }) = &command;
    let cluster_key = load_cluster_key(&access.cluster_key)?;
    let root = RootKey::from_env_or_file(access.root_key.as_deref())?;
    let (_scratch, node) = join_for_a_moment(&cluster_key, &access.peer).await?;
    let metadata = node.metadata().clone();
    let kms = Kms::new(root, metadata.clone());
    let outcome = async {
        let period = trash_period(&node).await?;
        match &command {
            TrashCommand::List { bucket, .. } => {
                let buckets = match bucket {
                    Some(bucket) => vec![bucket.clone()],
                    None => Buckets::new(metadata.clone(), kms.clone())
                        .list()
                        .await?
                        .into_iter()
                        .map(|(name, _)| name)
                        .collect(),
                };
                let now = now_unix_ms();
                let mut count = 0;
                for bucket in buckets {
                    for entry in trash::list(&metadata, &bucket, period).await? {
                        let left = entry
                            .purged_unix_ms
                            .saturating_add(period.as_millis() as u64)
                            .saturating_sub(now);
                        // Keys are any UTF-8 a client chose: escaped, so
                        // that none can forge a line or steer a terminal.
                        println!(
                            "{}/{} version {}: {} bytes, ETag {}, deleted {} s ago, restorable for {} s more",
                            entry.bucket,
                            printable(&entry.key),
                            entry.version,
                            entry.size_bytes,
                            entry.etag,
                            now.saturating_sub(entry.purged_unix_ms) / 1000,
                            left / 1000
                        );
                        count += 1;
                    }
                }
                println!(
                    "{count} versions in the trash (trash period {} s)",
                    period.as_secs()
                );
            }
            TrashCommand::Restore {
                bucket,
                key,
                version,
                ..
            } => {
                let version = cairn_protocol::ids::VersionId::parse(version)
                    .map_err(|e| anyhow!("--version: {e}"))?;
                let restored =
                    trash::restore(&node.handle(), &kms, bucket, key, version, period).await?;
                println!(
                    "restored {bucket}/{} version {version} as version {}: {} fragments back from the trash; segments whole {}, degraded {} (repair rebuilds them), unreadable {}",
                    printable(key),
                    restored.version.version,
                    restored.fragments_restored,
                    restored.segments_whole,
                    restored.segments_degraded,
                    restored.segments_unreadable
                );
                for node in &restored.nodes_not_confirmed {
                    eprintln!("node {node} did not confirm; repair rebuilds what it lacks");
                }
                if restored.segments_unreadable > 0 {
                    bail!(
                        "{} segments of the restored version have too few fragments out of the trash to be read; it is the key's current version now, and repair asks the nodes again on its next pass (watch `cairn admin status`)",
                        restored.segments_unreadable
                    );
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    node.shutdown().await;
    outcome
}

/// The trash period of the cluster's nodes (the shortest, if they
/// disagree): what the trash commands count from.
async fn trash_period(node: &Node) -> Result<Duration> {
    let map = node
        .cluster_map()
        .expect("join_for_a_moment waits for the map");
    let answers = ask_statuses(node, &map.map.nodes, false).await;
    let periods: std::collections::BTreeSet<u64> = answers
        .values()
        .filter_map(|answer| answer.as_ref().ok())
        .map(|status| status.store.trash_period_ms)
        .collect();
    if periods.len() > 1 {
        eprintln!("the nodes disagree on the trash period ({periods:?} ms); using the shortest");
    }
    let shortest = periods
        .first()
        .ok_or_else(|| anyhow!("no node of the map answered; the trash period is unknown"))?;
    Ok(Duration::from_millis(*shortest))
}

/// Asks every node of the map for its status and prints the report.
async fn status_command(cluster_key: Identity, peer: String, wait: bool) -> Result<()> {
    let (_scratch, node) = join_for_a_moment(&cluster_key, &peer).await?;
    let outcome = async {
        if wait {
            wait_for_full_strength(&node).await?;
        }
        let map = node
            .cluster_map()
            .expect("join_for_a_moment waits for the map");
        let answers = ask_statuses(&node, &map.map.nodes, true).await;
        print!(
            "cluster map version {}, scheme {}\n{}",
            map.map.version,
            map.scheme,
            status::render(&map.map.nodes, &answers, now_unix_ms())
        );
        anyhow::Ok(())
    }
    .await;
    node.shutdown().await;
    outcome
}

/// Every node's status (its store's part only `with_store`), or why not.
async fn ask_statuses(
    node: &Node,
    nodes: &[cairn_protocol::placement::MapNode],
    with_store: bool,
) -> std::collections::BTreeMap<
    NodeId,
    std::result::Result<cairn_protocol::status::NodeStatus, String>,
> {
    let asks = nodes.iter().map(|member| async move {
        let asked =
            tokio::time::timeout(Duration::from_secs(10), node.status(&member.id, with_store));
        let answer = match asked.await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("no answer within 10 s".to_owned()),
        };
        (member.id, answer)
    });
    futures::future::join_all(asks).await.into_iter().collect()
}

/// Polls every node until each has finished a repair pass since the wait
/// began and no segment is degraded or pending; shows progress.
async fn wait_for_full_strength(node: &Node) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let since = now_unix_ms();
    let terminal = std::io::stdout().is_terminal();
    let mut progress = status::Progress::new(since);
    let mut last_line = String::new();
    loop {
        let map = node
            .cluster_map()
            .expect("join_for_a_moment waits for the map");
        let answers = ask_statuses(node, &map.map.nodes, false).await;
        let strength = status::Strength::of(&answers, since);
        let line = progress.line(&strength, now_unix_ms());
        if terminal {
            print!("\r{line}\x1b[K");
            std::io::stdout().flush()?;
        } else if line != last_line {
            println!("{line}");
        }
        last_line = line;
        if strength.unreadable > 0 {
            if terminal {
                println!();
            }
            bail!(
                "{} segments are unreadable: too few fragments are left to rebuild them",
                strength.unreadable
            );
        }
        if strength.settled() {
            if terminal {
                println!();
            }
            println!("every segment is at full strength");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Joins the cluster as a short-lived member, pushes the map to one node
/// and reports what that node holds afterwards.
async fn push_map(cluster_key: Identity, map: PathBuf, peer: String) -> Result<()> {
    let cluster = ClusterId::of(cluster_key.signing_key());
    let bytes = std::fs::read(&map).with_context(|| format!("reading {}", map.display()))?;
    let signed = SignedMap::decode(&bytes, &cluster)
        .with_context(|| format!("{} is not a map signed by this cluster key", map.display()))?;
    let address = peer
        .parse()
        .with_context(|| format!("--peer {peer:?} is not a multiaddr"))?;
    let (_scratch, node) = temporary_member(&cluster_key, Vec::new()).await?;
    let outcome = async {
        let target = node.connect(address).await?;
        let held = node.push_map(&target, &signed).await?;
        anyhow::Ok((target, held))
    }
    .await;
    node.shutdown().await;
    let (target, held) = outcome?;
    let version = signed.map.version;
    if held < version {
        bail!("node {target} did not take map version {version}: it holds version {held}");
    }
    if held > version {
        bail!(
            "node {target} already holds map version {held}, newer than version {version}: sign the change as version {}",
            held + 1
        );
    }
    println!("node {target} holds cluster map version {held}; members receive it from there");
    Ok(())
}

/// The S3 listener's TLS from `[s3]`: the operator's PEM files, or a
/// self-signed certificate kept in the data directory, or none.
fn s3_tls(
    section: &cairn_gateway::config::S3Section,
    data_dir: &Path,
    listen: std::net::SocketAddr,
) -> Result<Option<std::sync::Arc<cairn_gateway::tls::ServerConfig>>> {
    let (cert, key) = match (&section.tls_cert_file, &section.tls_key_file) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        (None, None) if section.tls_self_signed => {
            let mut names = vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                "::1".to_owned(),
            ];
            if !listen.ip().is_unspecified() {
                names.push(listen.ip().to_string());
            }
            for domain in &section.domains {
                names.push(domain.clone());
                names.push(format!("*.{domain}"));
            }
            cairn_gateway::tls::self_signed(data_dir, &names)?
        }
        (None, None) => return Ok(None),
        _ => bail!("[s3] needs both tls_cert_file and tls_key_file, or neither"),
    };
    Ok(Some(cairn_gateway::tls::server_config(&cert, &key)?))
}

async fn serve(
    config: PathBuf,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    bootstrap: Vec<String>,
) -> Result<()> {
    // `[s3]` is the gateway's; the rest of the file is the node's.
    let mut file = cairn_node::config::read_toml(&config)?;
    let s3: Option<cairn_gateway::config::S3Section> = file
        .remove("s3")
        .map(|section| section.try_into())
        .transpose()
        .with_context(|| format!("{}: [s3]", config.display()))?;
    let repair: cairn_model::repair::RepairSection = file
        .remove("repair")
        .map(|section| section.try_into())
        .transpose()
        .with_context(|| format!("{}: [repair]", config.display()))?
        .unwrap_or_default();
    let collection: cairn_model::collector::CollectionSection = file
        .remove("collection")
        .map(|section| section.try_into())
        .transpose()
        .with_context(|| format!("{}: [collection]", config.display()))?
        .unwrap_or_default();
    let collection = collection.collection();
    let lifecycle: cairn_model::lifecycle::LifecycleSection = file
        .remove("lifecycle")
        .map(|section| section.try_into())
        .transpose()
        .with_context(|| format!("{}: [lifecycle]", config.display()))?
        .unwrap_or_default();
    let mut settings = ServeConfig::from_table(&config, file)?;
    settings.apply_env(|name| std::env::var(name).ok())?;
    if let Some(dir) = data_dir {
        settings.data_dir = dir;
    }
    if let Some(listen) = listen {
        settings.listen = listen;
    }
    if !bootstrap.is_empty() {
        settings.bootstrap = bootstrap;
    }
    let data_dir = settings.data_dir.clone();
    let (node_config, identity) = settings.into_node_config()?;
    // The root key is checked before the node starts, so that a gateway
    // that cannot decrypt anything never comes up.
    let root = match &s3 {
        Some(section) => Some(cairn_model::kms::RootKey::from_env_or_file(
            section.root_key_file.as_deref(),
        )?),
        None => None,
    };
    let node = Node::start(node_config, identity).await?;
    for address in node.listen_addrs() {
        tracing::info!(%address, node = %node.node_id(), "listening");
    }
    // Every node collects orphan fragments for the buckets it replicates.
    let collector = Collector::start(node.handle(), collection);
    // And repairs the segments of the buckets it is first replica of.
    let repairer = Repairer::start(node.handle(), repair.settings());
    // And applies the lifecycle rules of the same buckets.
    let lifecycle =
        cairn_model::lifecycle::LifecycleWorker::start(node.handle(), lifecycle.settings());
    let gateway = match (s3, root) {
        (Some(section), Some(root)) => {
            let listen: std::net::SocketAddr = section.listen.parse().with_context(|| {
                format!("[s3] listen {:?} is not an address:port", section.listen)
            })?;
            let tls = s3_tls(&section, &data_dir, listen)?;
            Some(
                cairn_gateway::Gateway::start(
                    node.handle(),
                    root,
                    cairn_gateway::GatewayConfig {
                        listen,
                        region: section.region,
                        domains: section.domains,
                        tls,
                        access_key_cache: Duration::from_secs(section.access_key_cache_seconds),
                        max_connections: section.max_connections,
                        header_read_timeout: Duration::from_secs(
                            section.header_read_timeout_seconds.max(1),
                        ),
                        idle_timeout: Duration::from_secs(section.idle_timeout_seconds.max(1)),
                        collection,
                        ..Default::default()
                    },
                )
                .await?,
            )
        }
        _ => None,
    };
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    tracing::info!("shutting down");
    drop(collector);
    drop(repairer);
    drop(lifecycle);
    if let Some(gateway) = gateway {
        gateway.stop().await;
    }
    tokio::time::timeout(Duration::from_secs(30), node.shutdown())
        .await
        .context("shutdown took over 30 s")?;
    Ok(())
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default.into())
        // s3s logs whole requests at debug (SSE-C keys included) and every
        // client mistake as an error: the gateway logs failures itself.
        .add_directive("s3s=off".parse().expect("a valid directive"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person watching, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn dev(data_dir: PathBuf, port: u16) -> Result<()> {
    use cairn_gateway::dev::{DevCluster, DevOptions};
    eprintln!(
        "starting 6 nodes in 3 sites (4+2) under {} ...",
        data_dir.display()
    );
    let cluster = DevCluster::start(DevOptions {
        data_dir: data_dir.clone(),
        port,
        ..DevOptions::default()
    })
    .await
    .context("the dev cluster did not start")?;
    let endpoint = cluster.endpoint();
    println!(
        "Cairn dev cluster: 3 sites x 2 nodes, 4+2 erasure coding, data in {}",
        data_dir.display()
    );
    println!();
    println!("  S3 endpoint:  {endpoint}");
    println!("  access key:   {}", cluster.access_key);
    println!("  secret key:   {}", cluster.secret_key);
    println!("  region:       us-east-1");
    println!();
    println!("Try it:");
    println!(
        "  export AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={} AWS_DEFAULT_REGION=us-east-1",
        cluster.access_key, cluster.secret_key
    );
    println!("  aws --endpoint-url {endpoint} s3 mb s3://demo");
    println!("  aws --endpoint-url {endpoint} s3 cp ./README.md s3://demo/");
    println!("  aws --endpoint-url {endpoint} s3 ls s3://demo/");
    println!();
    println!("Ctrl-C stops it.");
    tokio::signal::ctrl_c().await?;
    eprintln!("stopping ...");
    tokio::time::timeout(Duration::from_secs(30), cluster.shutdown())
        .await
        .context("shutdown took over 30 s")?;
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            let protocol = cairn_protocol::wire::PROTOCOL_NAME;
            let manifest = cairn_protocol::manifest::FORMAT_VERSION;
            println!("cairn {}", env!("CARGO_PKG_VERSION"));
            println!("piece exchange: {protocol}; manifest format: {manifest}");
            Ok(())
        }
        Command::Admin { command } => admin(command),
        Command::Dev { data_dir, port } => {
            init_logging("warn");
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(dev(data_dir, port))
        }
        Command::Serve {
            config,
            data_dir,
            listen,
            bootstrap,
        } => {
            init_logging("info");
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(serve(config, data_dir, listen, bootstrap))
        }
    }
}
