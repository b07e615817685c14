//! The swarm: libp2p over QUIC with identify, ping and Kademlia, the
//! membership handshake, and the piece-exchange protocol on streams.
//!
//! No Cairn protocol is served to a peer before it has shown an enrolment
//! certificate of this cluster for its own key; a peer that fails the
//! handshake is disconnected and blocked.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_protocol::ids::{FragmentId, NodeId, UploadId};
use cairn_protocol::membership::{Certificate, ClusterId, MembershipError, SignedMap};
use cairn_protocol::wire::{self, Hold};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
pub use libp2p::Multiaddr;
use libp2p::kad::store::RecordStore;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{PeerId, StreamProtocol, allow_block_list, connection_limits, identify, kad, ping};
use thiserror::Error;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::blocklist::BlockList;
use crate::clock::now_unix_ms;
use crate::dht::{DhtStoreLimits, RedbRecordStore};
use crate::identity::{Identity, IdentityError, node_id_of, peer_id_of};
use crate::inbound::Admission;
use crate::mapsync::{self, MAP_PROTOCOL, MapError, MapKeeper};
use crate::members::{MEMBERSHIP_WAIT, Members, refusal};
use crate::meta::replica::MetaReplica;
use crate::meta::{META_PROTOCOL, Metadata, rpc as meta_rpc};
use crate::outbound::{self, Retries};
use crate::pieces::{self, PieceError};
use crate::release::{ReleaseCheck, ReleaseRules, may_release};
use crate::store::{FragmentStore, StoreConfig, StoreError, VerifiedFragment};

pub const HELLO_PROTOCOL: StreamProtocol = StreamProtocol::new("/cairn/hello/1");
pub const PIECES_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::PROTOCOL_NAME);
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/cairn/kad/1.0.0");
const MAX_CERTIFICATE_BYTES: usize = 1024;
/// How long a connected peer may go without passing the handshake before
/// it is disconnected: the dialer's retries fit in it.
const UNVERIFIED_GRACE: Duration = Duration::from_secs(15);
/// How long a node serves one stream of each protocol in all (a piece
/// exchange carries a few MiB; a metadata request is one frame each way;
/// a map push up to 8 MiB).
const PIECE_STREAM_DEADLINE: Duration = Duration::from_secs(120);
const META_STREAM_DEADLINE: Duration = Duration::from_secs(60);
const MAP_STREAM_DEADLINE: Duration = Duration::from_secs(60);
/// How long one attempt at the membership handshake may take.
const HELLO_DEADLINE: Duration = Duration::from_secs(15);
/// How long one piece exchange may take in all (a fragment is at most a
/// few MiB; the peer is given up on past this).
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(120);
/// How often members' certificates are checked again, new maps aside.
const MEMBERS_CHECK_EVERY: Duration = Duration::from_secs(30);
/// Cluster map pushes taken at once (each up to 8 MiB).
const MAP_STREAMS: usize = 4;
/// How often the DHT store's writes are made durable.
const DHT_FLUSH_EVERY: Duration = Duration::from_secs(1);

fn upload_provider_key(upload: &UploadId) -> kad::RecordKey {
    kad::RecordKey::new(&cairn_protocol::dht::upload_provider_key(upload))
}

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("the cluster map does not verify against this cluster: {0}")]
    ForeignMap(MembershipError),
    #[error("this node's own certificate is not valid: {0}")]
    OwnCertificate(MembershipError),
    #[error("swarm: {0}")]
    Swarm(String),
    #[error("node {0} is not a verified member reachable from here")]
    NotAMember(NodeId),
    #[error("could not open a stream to {node}: {reason}")]
    Stream { node: NodeId, reason: String },
    #[error(transparent)]
    Piece(#[from] PieceError),
    #[error("the node is shut down")]
    ShutDown,
    #[error("DHT store {path}: {reason}")]
    Dht { path: PathBuf, reason: String },
    #[error("DHT: {0}")]
    Query(String),
    #[error("cannot open the metadata replica at {path}: {reason}")]
    Metadata { path: PathBuf, reason: String },
}

/// How often the trash is purged of fragments whose trash period is over.
const TRASH_PURGE_EVERY: Duration = Duration::from_secs(3600);

pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub cluster: ClusterId,
    pub certificate: Certificate,
    pub listen: Multiaddr,
    pub bootstrap: Vec<Multiaddr>,
    pub capacity_bytes: u64,
    pub limits: StreamLimits,
    /// How often the metadata replicas compare digests with each other.
    pub anti_entropy_every: Duration,
}

/// Anti-entropy period unless configured otherwise.
pub const DEFAULT_ANTI_ENTROPY_EVERY: Duration = Duration::from_secs(60);

/// What peers may hold open on this node; past these, `busy`.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Piece exchanges served at once, from all peers together.
    pub inbound_streams: usize,
    /// Piece exchanges served at once for any one peer.
    pub streams_per_peer: usize,
    /// Bytes of incoming puts held in memory at once (at least one
    /// fragment's worth); a put waits up to 30 s for room, then gets `busy`.
    pub bytes_in_flight: u64,
    /// Connections accepted and not yet established (QUIC handshakes).
    pub pending_connections: u32,
    /// Connections established from other peers, all together.
    pub incoming_connections: u32,
    /// Connections established with any one peer, both ways.
    pub connections_per_peer: u32,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            inbound_streams: 256,
            streams_per_peer: 32,
            bytes_in_flight: 512 << 20,
            pending_connections: 64,
            incoming_connections: 1024,
            connections_per_peer: 4,
        }
    }
}

async fn answer_busy(stream: libp2p::Stream, why: &'static str) {
    let (_, mut write) = stream.split();
    let busy = wire::Message::Reject {
        code: wire::RejectCode::Busy,
        message: format!("{why}; retry"),
    };
    let _ = pieces::send(&mut write, &busy).await;
    let _ = write.close().await;
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<RedbRecordStore>,
    streams: libp2p_stream::Behaviour,
}

enum Command {
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    /// Dial and answer with the peer once connected.
    Connect(Multiaddr, oneshot::Sender<Result<PeerId, String>>),
    Block(PeerId),
    /// Passed the handshake: may enter the routing table.
    Verified(PeerId),
    /// Connected for a while and still not verified.
    DropIfUnverified(PeerId),
    /// Announce this node as a provider of the key, unless it already is;
    /// the reply (if any) comes once the announcement has been sent.
    Provide(kad::RecordKey, Option<oneshot::Sender<Result<(), String>>>),
    FindProviders(
        kad::RecordKey,
        oneshot::Sender<Result<HashSet<PeerId>, String>>,
    ),
}

/// A running node. It derefs to its [`NodeHandle`], which does the work.
pub struct Node {
    handle: NodeHandle,
    listen_addrs: Vec<Multiaddr>,
    tasks: Vec<JoinHandle<()>>,
}

/// What a node's users call: cheap to clone. Clones must be dropped before
/// [`Node::shutdown`] returns, or they keep the node's databases open.
#[derive(Clone)]
pub struct NodeHandle {
    identity: Identity,
    store: FragmentStore,
    metadata: Metadata,
    control: libp2p_stream::Control,
    members: Arc<Members>,
    maps: Arc<MapKeeper>,
    commands: mpsc::Sender<Command>,
    /// Uploads of fragments stored here, for the event loop to announce.
    stored: mpsc::Sender<UploadId>,
    /// What a release is checked against (installed after start).
    release_rules: ReleaseRules,
}

/// Sends the map we hold to a peer that just became a member.
fn share_map(control: &libp2p_stream::Control, maps: &Arc<MapKeeper>, peer: PeerId) {
    if let Some(map) = maps.current() {
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(error) = mapsync::push_with_retries(control, peer, &map).await {
                tracing::debug!(%peer, %error, "could not send the cluster map");
            }
        });
    }
}

/// Passes a newly adopted map on to every member but `except`.
fn spread_map(
    control: &libp2p_stream::Control,
    members: &Members,
    map: &SignedMap,
    except: Option<PeerId>,
) {
    for peer in members.peers().into_iter().filter(|p| Some(*p) != except) {
        let (control, map) = (control.clone(), map.clone());
        tokio::spawn(async move {
            if let Err(error) = mapsync::push_with_retries(control, peer, &map).await {
                tracing::debug!(%peer, %error, "could not pass the cluster map on");
            }
        });
    }
}

impl Node {
    /// Starts a node: opens its store, listens, dials the bootstrap peers.
    pub async fn start(config: NodeConfig, identity: Identity) -> Result<Self, NodeError> {
        config
            .certificate
            .verify(&config.cluster, &identity.node_id(), now_unix_ms())
            .map_err(NodeError::OwnCertificate)?;
        let mut store_config =
            StoreConfig::new(config.data_dir.join("fragments"), config.capacity_bytes);
        store_config.trash_ms = 7 * 24 * 3600 * 1000;
        let max_fragment_bytes = store_config.max_fragment_bytes;
        let store = FragmentStore::open(store_config)?;
        let maps = Arc::new(MapKeeper::load(
            config.cluster,
            config.data_dir.join("cluster-map.bin"),
        )?);

        let peer_id = identity.peer_id();
        let dht_path = config.data_dir.join("dht.redb");
        let dht_store = RedbRecordStore::open(&dht_path, peer_id, DhtStoreLimits::default())
            .map_err(|e| NodeError::Dht {
                path: dht_path,
                reason: e.to_string(),
            })?;
        let limits = config.limits;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity.keypair().clone())
            .with_tokio()
            .with_quic()
            .with_behaviour(|key| {
                let mut kad_config = kad::Config::new(KAD_PROTOCOL);
                // What members store and who enters the routing table are
                // decided here, against the membership (see run_swarm).
                kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
                kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
                kad_config.set_query_timeout(Duration::from_secs(10));
                let mut kad = kad::Behaviour::with_config(peer_id, dht_store, kad_config);
                kad.set_mode(Some(kad::Mode::Server));
                Behaviour {
                    blocked: allow_block_list::Behaviour::default(),
                    limits: connection_limits::Behaviour::new(
                        connection_limits::ConnectionLimits::default()
                            .with_max_pending_incoming(Some(limits.pending_connections))
                            .with_max_established_incoming(Some(limits.incoming_connections))
                            .with_max_established_per_peer(Some(limits.connections_per_peer)),
                    ),
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/cairn/id/1".into(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::default(),
                    kad,
                    streams: libp2p_stream::Behaviour::new(),
                }
            })
            .map_err(|e| NodeError::Swarm(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        swarm
            .listen_on(config.listen.clone())
            .map_err(|e| NodeError::Swarm(e.to_string()))?;
        let listen_addrs = loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => break vec![address],
                SwarmEvent::ListenerError { error, .. } => {
                    return Err(NodeError::Swarm(error.to_string()));
                }
                _ => {}
            }
        };

        let control = swarm.behaviour().streams.new_control();
        let members = Arc::new(Members::default());
        let (commands, command_rx) = mpsc::channel(256);
        let (stored, stored_rx) = mpsc::channel(1024);
        let own_certificate = config.certificate.encode();
        let mut tasks = Vec::new();

        let mut hello_in = control
            .clone()
            .accept(HELLO_PROTOCOL)
            .map_err(|e| NodeError::Swarm(e.to_string()))?;
        let pieces_in = control
            .clone()
            .accept(PIECES_PROTOCOL)
            .map_err(|e| NodeError::Swarm(e.to_string()))?;
        let maps_in = control
            .clone()
            .accept(MAP_PROTOCOL)
            .map_err(|e| NodeError::Swarm(e.to_string()))?;
        let meta_in = control
            .clone()
            .accept(META_PROTOCOL)
            .map_err(|e| NodeError::Swarm(e.to_string()))?;
        let meta_path = config.data_dir.join("meta.redb");
        let replica = MetaReplica::open(&meta_path).map_err(|e| NodeError::Metadata {
            path: meta_path,
            reason: e.to_string(),
        })?;
        let release_rules = ReleaseRules::default();
        let metadata = Metadata::new(
            identity.node_id(),
            control.clone(),
            members.clone(),
            maps.clone(),
            replica.clone(),
        );
        metadata.start_anti_entropy(config.anti_entropy_every);

        // Fragments whose trash period is over leave the index.
        {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut every = tokio::time::interval(TRASH_PURGE_EVERY);
                loop {
                    every.tick().await;
                    let store = store.clone();
                    match tokio::task::spawn_blocking(move || store.purge_trash(now_unix_ms()))
                        .await
                    {
                        Ok(Ok(0)) => {}
                        Ok(Ok(purged)) => tracing::info!(purged, "purged fragments from the trash"),
                        Ok(Err(error)) => tracing::warn!(%error, "trash purge failed"),
                        Err(error) => tracing::warn!(%error, "trash purge task failed"),
                    }
                }
            }));
        }

        // Whoever opens a stream of a protocol but is no member is blocked.
        let block: Arc<dyn Fn(PeerId) + Send + Sync> = {
            let commands = commands.clone();
            Arc::new(move |peer| {
                // Waits for room in the event loop's queue rather than
                // skip the block when it is full.
                let commands = commands.clone();
                tokio::spawn(async move {
                    let _ = commands.send(Command::Block(peer)).await;
                });
            })
        };

        // Metadata requests from members, answered from the local replica.
        // Past the limits a stream is dropped unanswered: the caller counts
        // it as a failed replica.
        {
            let metadata = metadata.clone();
            let admission = Admission {
                protocol: "meta",
                members: members.clone(),
                block: block.clone(),
                total: config.limits.inbound_streams,
                per_peer: config.limits.streams_per_peer,
                deadline: META_STREAM_DEADLINE,
            };
            tasks.push(admission.run(
                meta_in,
                move |peer, stream| {
                    let metadata = metadata.clone();
                    async move {
                        if let Err(error) = meta_rpc::serve(stream, &metadata).await {
                            tracing::info!(%peer, %error, "metadata request ended with an error");
                        }
                    }
                },
                |_, _| async {},
            ));
        }

        // Cluster maps pushed by members: keep the newest, pass it on. A
        // map is up to 8 MiB: few are taken at once.
        {
            let (members_, maps, control) = (members.clone(), maps.clone(), control.clone());
            let admission = Admission {
                protocol: "map",
                members: members.clone(),
                block: block.clone(),
                total: MAP_STREAMS,
                per_peer: 1,
                deadline: MAP_STREAM_DEADLINE,
            };
            tasks.push(admission.run(
                maps_in,
                move |peer, mut stream| {
                    let (members, maps, control) =
                        (members_.clone(), maps.clone(), control.clone());
                    async move {
                        if let Some(map) = maps.receive(&peer, &mut stream).await {
                            spread_map(&control, &members, &map, Some(peer));
                        }
                    }
                },
                |_, _| async {},
            ));
        }

        // The listening half of the handshake: verify theirs, then send ours.
        {
            let (members, commands, cluster, own) = (
                members.clone(),
                commands.clone(),
                config.cluster,
                own_certificate.clone(),
            );
            let (maps, control) = (maps.clone(), control.clone());
            tasks.push(tokio::spawn(async move {
                while let Some((peer, mut stream)) = hello_in.next().await {
                    let (members, commands, own) = (members.clone(), commands.clone(), own.clone());
                    let (maps, control) = (maps.clone(), control.clone());
                    tokio::spawn(async move {
                        let read = read_certificate(&mut stream, &cluster, &peer).await;
                        match read.and_then(|c| admissible(c, &cluster, &maps)) {
                            Ok(certificate) => {
                                members.insert(peer, certificate);
                                let _ = commands.send(Command::Verified(peer)).await;
                                let _ = write_certificate(&mut stream, &own).await;
                                let _ = stream.close().await;
                                share_map(&control, &maps, peer);
                            }
                            Err(HandshakeError::Refused(reason)) => {
                                tracing::warn!(%peer, %reason, "peer failed the membership handshake: blocked");
                                let _ = commands.send(Command::Block(peer)).await;
                            }
                            Err(HandshakeError::Transport(reason)) => {
                                tracing::info!(%peer, %reason, "membership handshake interrupted; the dialer retries");
                            }
                        }
                    });
                }
            }));
        }

        // Piece exchange, within the node's stream limits.
        {
            let limits = config.limits;
            let server = pieces::Server {
                store: store.clone(),
                max_fragment_bytes,
                now_unix_ms,
                put_budget: Arc::new(Semaphore::new(
                    limits.bytes_in_flight.max(max_fragment_bytes) as usize,
                )),
                stored: Some(stored.clone()),
                metadata: metadata.clone(),
                release_rules: release_rules.clone(),
            };
            let admission = Admission {
                protocol: "pieces",
                members: members.clone(),
                block: block.clone(),
                total: limits.inbound_streams,
                per_peer: limits.streams_per_peer,
                deadline: PIECE_STREAM_DEADLINE,
            };
            tasks.push(admission.run(
                pieces_in,
                move |peer, stream| {
                    let server = server.clone();
                    async move {
                        if let Err(error) = server.serve(stream).await {
                            tracing::info!(%peer, %error, "piece exchange ended with an error");
                        }
                    }
                },
                answer_busy,
            ));
        }

        // The swarm's event loop.
        {
            let dialing = Dialing {
                members: members.clone(),
                maps: maps.clone(),
                control: control.clone(),
                commands: commands.clone(),
                cluster: config.cluster,
                own_certificate,
            };
            tasks.push(tokio::spawn(run_swarm(
                swarm, command_rx, stored_rx, dialing,
            )));
        }

        let node = Self {
            handle: NodeHandle {
                identity,
                store,
                metadata,
                control,
                members,
                maps,
                commands,
                stored,
                release_rules,
            },
            listen_addrs,
            tasks,
        };
        for address in config.bootstrap {
            if let Err(error) = node.dial(address.clone()).await {
                tracing::warn!(%address, %error, "bootstrap peer unreachable for now");
            }
        }
        Ok(node)
    }

    /// A cheap handle on this node for users that outlive a borrow (the
    /// gateway); stop them before [`Node::shutdown`].
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Addresses this node listens on, with its peer id.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        let peer = self.peer_id();
        self.listen_addrs
            .iter()
            .map(|a| a.clone().with_p2p(peer).unwrap_or_else(|a| a))
            .collect()
    }

    /// Stops the node: the swarm, its tasks and then its store.
    pub async fn shutdown(self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
        let NodeHandle {
            metadata, store, ..
        } = self.handle;
        metadata.shutdown().await;
        // Dropping the last store handle waits for the writer thread.
        let _ = tokio::task::spawn_blocking(move || drop(store)).await;
    }
}

impl std::ops::Deref for Node {
    type Target = NodeHandle;

    fn deref(&self) -> &NodeHandle {
        &self.handle
    }
}

impl NodeHandle {
    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
    }

    pub fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The metadata coordinator of this node.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub fn store(&self) -> &FragmentStore {
        &self.store
    }

    pub async fn dial(&self, address: Multiaddr) -> Result<(), NodeError> {
        let (reply, done) = oneshot::channel();
        self.commands
            .send(Command::Dial(address, reply))
            .await
            .map_err(|_| NodeError::ShutDown)?;
        done.await
            .map_err(|_| NodeError::ShutDown)?
            .map_err(NodeError::Swarm)
    }

    /// Connects to the node at `address` and waits until it has passed the
    /// membership handshake; returns its id.
    pub async fn connect(&self, address: Multiaddr) -> Result<NodeId, NodeError> {
        let shown = address.to_string();
        let peer = match self
            .ask_swarm(|reply| Command::Connect(address, reply))
            .await
        {
            Err(NodeError::Query(reason)) => {
                return Err(NodeError::Swarm(format!(
                    "could not connect to {shown}: {reason}"
                )));
            }
            other => other?,
        };
        let node = node_id_of(&peer)
            .ok_or_else(|| NodeError::Swarm(format!("peer {peer} has no ed25519 identity")))?;
        if self.members.wait_for(&peer, UNVERIFIED_GRACE).await {
            Ok(node)
        } else {
            Err(NodeError::NotAMember(node))
        }
    }

    /// Pushes `map` to `node` and returns the map version it holds after.
    pub async fn push_map(&self, node: &NodeId, map: &SignedMap) -> Result<u64, NodeError> {
        let peer = peer_id_of(node)?;
        if !self.members.wait_for(&peer, MEMBERSHIP_WAIT).await {
            return Err(NodeError::NotAMember(*node));
        }
        mapsync::push(self.control.clone(), peer, map)
            .await
            .map_err(|e| NodeError::Stream {
                node: *node,
                reason: e.to_string(),
            })
    }

    /// Waits until `node` has passed the membership handshake with us.
    pub async fn wait_for_member(&self, node: &NodeId, timeout: Duration) -> bool {
        match peer_id_of(node) {
            Ok(peer) => self.members.wait_for(&peer, timeout).await,
            Err(_) => false,
        }
    }

    /// The newest valid cluster map this node holds.
    pub fn cluster_map(&self) -> Option<SignedMap> {
        self.maps.current()
    }

    /// Takes a map signed by the cluster key (from `cairn admin`) and, if
    /// it is newer than the one held, keeps it and sends it to every member.
    pub fn install_map(&self, map: &SignedMap) -> Result<bool, NodeError> {
        let checked = SignedMap::decode(&map.encode(), &self.maps.cluster())
            .map_err(NodeError::ForeignMap)?;
        let adopted = self.maps.offer(&checked)?;
        if adopted {
            spread_map(&self.control, &self.members, &checked, None);
        }
        Ok(adopted)
    }

    /// Waits until this node holds a map of at least `version`.
    pub async fn wait_for_map_version(&self, version: u64, timeout: Duration) -> bool {
        self.maps.wait_for_version(version, timeout).await
    }

    /// Installs the rules a release is checked against (the model's, by
    /// whoever starts the node's collector), in place of any before;
    /// until then this node refuses every release.
    pub fn install_release_rules(&self, rules: Arc<dyn ReleaseCheck>) {
        *self.release_rules.write().expect("release rules lock") = Some(rules);
    }

    pub fn is_member(&self, node: &NodeId) -> bool {
        peer_id_of(node).is_ok_and(|peer| self.members.contains(&peer))
    }

    /// Waits until `node` is no member of this node's, up to `timeout`.
    pub async fn wait_for_non_member(&self, node: &NodeId, timeout: Duration) -> bool {
        match peer_id_of(node) {
            Ok(peer) => self.members.wait_for_absence(&peer, timeout).await,
            Err(_) => true,
        }
    }

    async fn open(&self, node: &NodeId) -> Result<libp2p::Stream, NodeError> {
        let peer = peer_id_of(node)?;
        if !self.members.wait_for(&peer, MEMBERSHIP_WAIT).await {
            return Err(NodeError::NotAMember(*node));
        }
        self.open_raw_piece_stream(node).await
    }

    /// Puts a fragment on `node` (this node itself included); returns once
    /// it is durable there.
    pub async fn put_fragment(
        &self,
        node: &NodeId,
        id: FragmentId,
        bytes: &[u8],
        hold: Hold,
    ) -> Result<(), NodeError> {
        if *node == self.node_id() {
            pieces::admit_hold(&id, &hold)?;
            let fragment = VerifiedFragment::new(id, bytes.to_vec())?;
            let upload = hold.upload;
            self.store.put(fragment, hold, now_unix_ms()).await?;
            let _ = self.stored.send(upload).await;
            return Ok(());
        }
        self.with_retries(node, |stream| pieces::put(stream, id, bytes, hold.clone()))
            .await
    }

    /// Gets a fragment (or a range of it) from `node`.
    pub async fn get_fragment(
        &self,
        node: &NodeId,
        id: FragmentId,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, NodeError> {
        if *node == self.node_id() {
            let store = self.store.clone();
            let read = tokio::task::spawn_blocking(move || store.read(&id, offset, length))
                .await
                .map_err(|e| NodeError::Swarm(e.to_string()))?;
            return Ok(read?);
        }
        self.with_retries(node, |stream| pieces::get(stream, id, offset, length))
            .await
    }

    async fn ask_swarm<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
    ) -> Result<T, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| NodeError::ShutDown)?;
        answer
            .await
            .map_err(|_| NodeError::ShutDown)?
            .map_err(NodeError::Query)
    }

    /// Announces in the DHT that this node holds fragments of `upload`;
    /// returns once the announcement has gone out. (A fragment put here
    /// announces its upload by itself.)
    pub async fn provide_upload(&self, upload: &UploadId) -> Result<(), NodeError> {
        let key = upload_provider_key(upload);
        self.ask_swarm(|reply| Command::Provide(key, Some(reply)))
            .await
    }

    /// The nodes that announced they hold fragments of `upload`.
    pub async fn upload_providers(&self, upload: &UploadId) -> Result<Vec<NodeId>, NodeError> {
        let key = upload_provider_key(upload);
        let peers = self
            .ask_swarm(|reply| Command::FindProviders(key, reply))
            .await?;
        let mut nodes: Vec<NodeId> = peers.iter().filter_map(node_id_of).collect();
        nodes.sort();
        Ok(nodes)
    }

    /// Asks `node` (this node itself included) to move the fragments of
    /// `upload` to its trash.
    pub async fn release_upload(
        &self,
        node: &NodeId,
        upload: UploadId,
        bucket: &str,
        key: &str,
    ) -> Result<crate::store::Released, NodeError> {
        if *node == self.node_id() {
            if let Err(why) =
                may_release(&self.release_rules, &self.metadata, bucket, key, upload).await
            {
                return Err(NodeError::Piece(PieceError::Rejected {
                    code: wire::RejectCode::Unauthorized,
                    message: format!("release refused: {why}"),
                }));
            }
            let store = self.store.clone();
            let released =
                tokio::task::spawn_blocking(move || store.release(&upload, now_unix_ms()))
                    .await
                    .map_err(|e| NodeError::Swarm(e.to_string()))?;
            return Ok(released?);
        }
        self.with_retries(node, |stream| pieces::release(stream, upload, bucket, key))
            .await
    }

    /// Which of `ids` `node` holds, in `ids` order.
    pub async fn have(&self, node: &NodeId, ids: &[FragmentId]) -> Result<Vec<bool>, NodeError> {
        if *node == self.node_id() {
            return ids
                .iter()
                .map(|id| {
                    Ok(matches!(self.store.entry(id)?, Some(e) if e.state == crate::store::FragmentState::Live))
                })
                .collect();
        }
        self.with_retries(node, |stream| pieces::have(stream, ids.to_vec()))
            .await
    }

    /// Finds the nodes holding fragment `id` of `upload` wherever it is,
    /// moved or repaired: the upload's providers, each asked whether it
    /// holds the fragment. A provider that cannot be asked is skipped.
    pub async fn locate_fragment(
        &self,
        upload: &UploadId,
        id: &FragmentId,
    ) -> Result<Vec<NodeId>, NodeError> {
        let providers = self.upload_providers(upload).await?;
        let asks = providers.iter().map(|node| async move {
            match self.have(node, std::slice::from_ref(id)).await {
                Ok(held) => held.first().copied().unwrap_or(false).then_some(*node),
                Err(error) => {
                    tracing::debug!(%node, %error, "provider could not be asked for a fragment");
                    None
                }
            }
        });
        Ok(futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect())
    }

    /// Runs one exchange on a fresh stream, again on a transport failure.
    /// libp2p-stream drops an inbound stream unread when another is still
    /// waiting to be accepted, so a burst of opens can lose some; puts are
    /// idempotent and gets read-only, so trying again is safe.
    async fn with_retries<T, F, Fut>(&self, node: &NodeId, exchange: F) -> Result<T, NodeError>
    where
        F: Fn(libp2p::Stream) -> Fut,
        Fut: std::future::Future<Output = Result<T, PieceError>>,
    {
        // A peer that stops reading what it is sent (QUIC flow control
        // then blocks the writer) is given up on as one that stops
        // answering is.
        let retries = Retries {
            attempts: 6,
            first_pause: Duration::from_millis(10),
            deadline: EXCHANGE_DEADLINE,
        };
        outbound::call(
            retries,
            |_| async {
                let stream = self.open(node).await?;
                Ok(exchange(stream).await?)
            },
            |error| {
                matches!(
                    error,
                    NodeError::Piece(PieceError::Io(_) | PieceError::Closed)
                )
            },
            || NodeError::Piece(PieceError::TimedOut(EXCHANGE_DEADLINE)),
        )
        .await
    }

    /// Opens a piece-exchange stream without waiting for the membership
    /// handshake: the exchanges above use it, and so do tests of peers that
    /// misbehave.
    pub async fn open_raw_piece_stream(&self, node: &NodeId) -> Result<libp2p::Stream, NodeError> {
        self.open_raw_stream(node, PIECES_PROTOCOL).await
    }

    /// Opens a stream of any of the node's protocols, for tests of peers
    /// that misbehave.
    pub async fn open_raw_stream(
        &self,
        node: &NodeId,
        protocol: StreamProtocol,
    ) -> Result<libp2p::Stream, NodeError> {
        let peer = peer_id_of(node)?;
        self.control
            .clone()
            .open_stream(peer, protocol)
            .await
            .map_err(|e| NodeError::Stream {
                node: *node,
                reason: e.to_string(),
            })
    }
}

async fn write_certificate(stream: &mut libp2p::Stream, certificate: &[u8]) -> std::io::Result<()> {
    stream
        .write_all(&(certificate.len() as u16).to_be_bytes())
        .await?;
    stream.write_all(certificate).await?;
    stream.flush().await
}

/// Why a handshake failed: only a refused certificate blocks the peer; a
/// transport failure is retried, so one stall never partitions two members.
#[derive(Debug)]
enum HandshakeError {
    Refused(String),
    Transport(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(reason) => write!(f, "certificate refused: {reason}"),
            Self::Transport(reason) => write!(f, "handshake interrupted: {reason}"),
        }
    }
}

/// A verified certificate, unless the newest map marks its node `out`.
fn admissible(
    certificate: Certificate,
    cluster: &ClusterId,
    maps: &MapKeeper,
) -> Result<Certificate, HandshakeError> {
    let map = maps.current();
    match refusal(
        &certificate,
        cluster,
        map.as_ref().map(|m| &m.map),
        now_unix_ms(),
    ) {
        Some(reason) => Err(HandshakeError::Refused(reason)),
        None => Ok(certificate),
    }
}

async fn read_certificate(
    stream: &mut libp2p::Stream,
    cluster: &ClusterId,
    peer: &PeerId,
) -> Result<Certificate, HandshakeError> {
    let mut len = [0u8; 2];
    let read = async {
        stream.read_exact(&mut len).await?;
        let len = usize::from(u16::from_be_bytes(len));
        if len > MAX_CERTIFICATE_BYTES {
            return Err(std::io::Error::other(format!(
                "certificate of {len} bytes is too long"
            )));
        }
        let mut bytes = vec![0u8; len];
        stream.read_exact(&mut bytes).await?;
        Ok(bytes)
    };
    let bytes = tokio::time::timeout(MEMBERSHIP_WAIT, read)
        .await
        .map_err(|_| HandshakeError::Transport("no certificate in time".into()))?
        .map_err(|e| HandshakeError::Transport(e.to_string()))?;
    let refused = |e: String| HandshakeError::Refused(e);
    let certificate = Certificate::decode(&bytes).map_err(|e| refused(e.to_string()))?;
    let node = node_id_of(peer).ok_or_else(|| refused("peer id carries no ed25519 key".into()))?;
    certificate
        .verify(cluster, &node, now_unix_ms())
        .map_err(|e| refused(e.to_string()))?;
    Ok(certificate)
}

/// The dialing half of the handshake: send ours, verify theirs.
async fn hello_as_dialer(
    control: libp2p_stream::Control,
    peer: PeerId,
    cluster: ClusterId,
    own: Vec<u8>,
) -> Result<Certificate, HandshakeError> {
    let retries = Retries {
        attempts: 4,
        first_pause: Duration::from_millis(400),
        deadline: HELLO_DEADLINE,
    };
    outbound::call(
        retries,
        |_| {
            let (mut control, own) = (control.clone(), own.clone());
            async move {
                let mut stream = control
                    .open_stream(peer, HELLO_PROTOCOL)
                    .await
                    .map_err(|e| HandshakeError::Transport(e.to_string()))?;
                write_certificate(&mut stream, &own)
                    .await
                    .map_err(|e| HandshakeError::Transport(e.to_string()))?;
                read_certificate(&mut stream, &cluster, &peer).await
            }
        },
        |error| matches!(error, HandshakeError::Transport(_)),
        || HandshakeError::Transport("no answer in time".into()),
    )
    .await
}

/// What the event loop needs to run the dialing half of the handshake.
#[derive(Clone)]
struct Dialing {
    members: Arc<Members>,
    maps: Arc<MapKeeper>,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    cluster: ClusterId,
    own_certificate: Vec<u8>,
}

type ProvidersReply = oneshot::Sender<Result<HashSet<PeerId>, String>>;

/// Queries the event loop is waiting on, with whom to answer.
#[derive(Default)]
struct PendingQueries {
    provides: HashMap<kad::QueryId, oneshot::Sender<Result<(), String>>>,
    /// Providers found so far for each lookup.
    finds: HashMap<kad::QueryId, (HashSet<PeerId>, ProvidersReply)>,
    connects: HashMap<libp2p::swarm::ConnectionId, oneshot::Sender<Result<PeerId, String>>>,
}

async fn run_swarm(
    mut swarm: libp2p::Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    mut stored: mpsc::Receiver<UploadId>,
    dialing: Dialing,
) {
    let members = dialing.members.clone();
    let local = *swarm.local_peer_id();
    let mut pending = PendingQueries::default();
    // What identify told us of each connected peer, for when it is verified.
    let mut identified: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
    let mut flush = tokio::time::interval(DHT_FLUSH_EVERY);
    let mut blocked = BlockList::default();
    // The map version members were last checked against, and when.
    let mut checked: (Option<u64>, std::time::Instant) = (None, std::time::Instant::now());
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Dial(address, reply)) => {
                    let _ = reply.send(swarm.dial(address).map_err(|e| e.to_string()));
                }
                Some(Command::Connect(address, reply)) => {
                    let dial = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id().address(address).build();
                    let connection = dial.connection_id();
                    match swarm.dial(dial) {
                        Ok(()) => {
                            pending.connects.insert(connection, reply);
                        }
                        Err(error) => {
                            let _ = reply.send(Err(error.to_string()));
                        }
                    }
                }
                Some(Command::Block(peer)) => {
                    members.remove(&peer);
                    for evicted in blocked.block(peer, std::time::Instant::now()) {
                        swarm.behaviour_mut().blocked.unblock_peer(evicted);
                    }
                    swarm.behaviour_mut().blocked.block_peer(peer);
                    swarm.behaviour_mut().kad.remove_peer(&peer);
                }
                Some(Command::Verified(peer)) => {
                    for address in identified.get(&peer).into_iter().flatten() {
                        swarm.behaviour_mut().kad.add_address(&peer, address.clone());
                    }
                }
                Some(Command::DropIfUnverified(peer)) => {
                    if !members.contains(&peer) && swarm.is_connected(&peer) {
                        tracing::warn!(%peer, "connected peer never passed the membership handshake: disconnected");
                        let _ = swarm.disconnect_peer_id(peer);
                    }
                }
                Some(Command::Provide(key, reply)) => provide(&mut swarm, &mut pending, local, key, reply),
                Some(Command::FindProviders(key, reply)) => {
                    let query = swarm.behaviour_mut().kad.get_providers(key);
                    pending.finds.insert(query, (HashSet::new(), reply));
                }
                None => break,
            },
            Some(upload) = stored.recv() => {
                provide(&mut swarm, &mut pending, local, upload_provider_key(&upload), None);
            }
            _ = flush.tick() => {
                if let Err(error) = swarm.behaviour_mut().kad.store_mut().flush() {
                    tracing::error!(%error, "DHT store: flush failed");
                }
                let now = std::time::Instant::now();
                for peer in blocked.expire(now) {
                    tracing::info!(%peer, "block expired");
                    swarm.behaviour_mut().blocked.unblock_peer(peer);
                }
                // Members are checked again on every new map and now and
                // then: a node marked out, or whose certificate expired,
                // is disconnected and refused.
                let version = dialing.maps.version();
                if version != checked.0 || now.duration_since(checked.1) >= MEMBERS_CHECK_EVERY {
                    checked = (version, now);
                    let map = dialing.maps.current();
                    for (peer, certificate) in members.certificates() {
                        let Some(reason) = refusal(&certificate, &dialing.cluster, map.as_ref().map(|m| &m.map), now_unix_ms()) else {
                            continue;
                        };
                        tracing::warn!(%peer, %reason, "member no longer admitted: disconnected and blocked");
                        members.remove(&peer);
                        for evicted in blocked.block(peer, now) {
                            swarm.behaviour_mut().blocked.unblock_peer(evicted);
                        }
                        swarm.behaviour_mut().blocked.block_peer(peer);
                        swarm.behaviour_mut().kad.remove_peer(&peer);
                        let _ = swarm.disconnect_peer_id(peer);
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                    if let Some(reply) = pending.connects.remove(&connection_id) {
                        let _ = reply.send(Err(error.to_string()));
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                    if let Some(reply) = pending.connects.remove(&connection_id) {
                        let _ = reply.send(Ok(peer_id));
                    }
                    if num_established.get() == 1 {
                        let commands = dialing.commands.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(UNVERIFIED_GRACE).await;
                            let _ = commands.send(Command::DropIfUnverified(peer_id)).await;
                        });
                    }
                    if endpoint.is_dialer() {
                        tokio::spawn(hello_and_admit(dialing.clone(), peer_id));
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    members.remove(&peer_id);
                    identified.remove(&peer_id);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    // Only members enter the routing table.
                    if members.contains(&peer_id) {
                        for address in &info.listen_addrs {
                            swarm.behaviour_mut().kad.add_address(&peer_id, address.clone());
                        }
                    }
                    identified.insert(peer_id, info.listen_addrs);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => on_kad_event(&mut swarm, &mut pending, &members, event),
                _ => {}
            },
        }
    }
}

/// The dialing half of the handshake, then admission as a member.
async fn hello_and_admit(dialing: Dialing, peer: PeerId) {
    let Dialing {
        members,
        maps,
        control,
        commands,
        cluster,
        own_certificate,
    } = dialing;
    let hello = hello_as_dialer(control.clone(), peer, cluster, own_certificate).await;
    match hello.and_then(|c| admissible(c, &cluster, &maps)) {
        Ok(certificate) => {
            members.insert(peer, certificate);
            let _ = commands.send(Command::Verified(peer)).await;
            share_map(&control, &maps, peer);
        }
        Err(HandshakeError::Refused(reason)) => {
            tracing::warn!(%peer, %reason, "peer failed the membership handshake: blocked");
            let _ = commands.send(Command::Block(peer)).await;
        }
        Err(HandshakeError::Transport(reason)) => {
            tracing::warn!(%peer, %reason, "membership handshake failed after retries");
        }
    }
}

/// Starts announcing `key`. Without a reply to send, a key this node
/// already provides is left alone: kad republishes it on its own.
fn provide(
    swarm: &mut libp2p::Swarm<Behaviour>,
    pending: &mut PendingQueries,
    local: PeerId,
    key: kad::RecordKey,
    reply: Option<oneshot::Sender<Result<(), String>>>,
) {
    let kad = &mut swarm.behaviour_mut().kad;
    if reply.is_none()
        && kad
            .store_mut()
            .providers(&key)
            .iter()
            .any(|p| p.provider == local)
    {
        return;
    }
    match (kad.start_providing(key), reply) {
        (Ok(query), Some(reply)) => {
            pending.provides.insert(query, reply);
        }
        (Ok(_), None) => {}
        (Err(error), Some(reply)) => {
            let _ = reply.send(Err(error.to_string()));
        }
        (Err(error), None) => tracing::error!(%error, "could not announce an upload"),
    }
}

fn on_kad_event(
    swarm: &mut libp2p::Swarm<Behaviour>,
    pending: &mut PendingQueries,
    members: &Members,
    event: kad::Event,
) {
    use kad::{GetProvidersOk, InboundRequest, QueryResult};
    match event {
        kad::Event::OutboundQueryProgressed {
            id,
            result: QueryResult::StartProviding(result),
            ..
        } => {
            if let Some(reply) = pending.provides.remove(&id) {
                let _ = reply.send(result.map(|_| ()).map_err(|e| e.to_string()));
            }
        }
        kad::Event::OutboundQueryProgressed {
            id,
            result: QueryResult::GetProviders(result),
            step,
            ..
        } => {
            let Some((found, _)) = pending.finds.get_mut(&id) else {
                return;
            };
            let failure = match result {
                Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                    found.extend(providers);
                    None
                }
                Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => None,
                Err(error) => Some(error.to_string()),
            };
            if step.last || failure.is_some() {
                let (found, reply) = pending.finds.remove(&id).expect("present above");
                let answer = match failure {
                    Some(error) if found.is_empty() => Err(error),
                    _ => Ok(found),
                };
                let _ = reply.send(answer);
            }
        }
        // Records and provider records are kept only when a member sent them.
        kad::Event::InboundRequest {
            request:
                InboundRequest::PutRecord {
                    source,
                    record: Some(record),
                    ..
                },
        } => {
            if !members.contains(&source) {
                tracing::warn!(peer = %source, "DHT record from a peer that is not a member: ignored");
            } else if let Err(error) = swarm.behaviour_mut().kad.store_mut().put(record) {
                tracing::warn!(peer = %source, %error, "DHT record not kept");
            }
        }
        kad::Event::InboundRequest {
            request:
                InboundRequest::AddProvider {
                    record: Some(record),
                },
        } => {
            if !members.contains(&record.provider) {
                tracing::warn!(peer = %record.provider, "provider record from a peer that is not a member: ignored");
            } else if let Err(error) = swarm.behaviour_mut().kad.store_mut().add_provider(record) {
                tracing::warn!(%error, "provider record not kept");
            }
        }
        _ => {}
    }
}
