//! A node: its store, its metadata replica, its swarm and the protocols it
//! serves, wired together. What each part does lives in its own module:
//! the event loop ([`crate::event_loop`]), the handshake ([`crate::hello`]),
//! the stream protocols ([`crate::pieces`], [`crate::mapsync`],
//! [`crate::meta::rpc`]) behind one inbound path ([`crate::inbound`]), the
//! fragment client ([`crate::client`]) and the background work
//! ([`crate::workers`]).
//!
//! No protocol is served to a peer before it has shown an enrolment
//! certificate of this cluster for its own key; a peer that fails the
//! handshake is disconnected and blocked.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_protocol::ids::NodeId;
use cairn_protocol::membership::{Certificate, ClusterId, MembershipError, SignedMap};
use futures::StreamExt;
pub use libp2p::Multiaddr;
use libp2p::{PeerId, StreamProtocol};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::budget::ByteBudget;
use crate::clock::now_unix_ms;
use crate::dht::{DhtStoreLimits, RedbRecordStore};
use crate::event_loop::{self, Command, UNVERIFIED_GRACE};
use crate::hello::{self, Handshake};
use crate::identity::{Identity, IdentityError, node_id_of, peer_id_of};
use crate::inbound::Admission;
use crate::mapsync::{self, MapError, MapKeeper};
use crate::members::{MEMBERSHIP_WAIT, Members};
use crate::meta::replica::MetaReplica;
use crate::meta::{META_PROTOCOL, Metadata, rpc as meta_rpc};
use crate::pieces::{self, PieceError};
use crate::release::{ReleaseCheck, ReleaseRules};
use cairn_protocol::status::{LifecycleSummary, RepairSummary};

use crate::scrub::{self, ScrubSettings};
use crate::store::{FragmentStore, ScrubState, StoreConfig, StoreError};
use crate::workers;
use crate::workers::StoreSettings;

/// How long a node serves one stream of each protocol in all (a piece
/// exchange carries a few MiB; a metadata request is one frame each way;
/// a map push up to 8 MiB).
const PIECE_STREAM_DEADLINE: Duration = Duration::from_secs(120);
const META_STREAM_DEADLINE: Duration = Duration::from_secs(60);
const MAP_STREAM_DEADLINE: Duration = Duration::from_secs(60);
/// One peer may hold this fraction of the node's byte budget (at least one
/// fragment's worth).
const PEER_SHARE_OF_BUDGET: u64 = 4;
/// Peers waiting for the handshake may hold this fraction of the incoming
/// connections (at least 8); past it the oldest is disconnected.
const UNVERIFIED_SHARE_OF_INCOMING: usize = 8;
/// Cluster map pushes taken at once (each up to 8 MiB).
const MAP_STREAMS: usize = 4;

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
    pub scrub: ScrubSettings,
    pub store: StoreSettings,
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
    metadata: Metadata,
    control: libp2p_stream::Control,
    pub(crate) members: Arc<Members>,
    maps: Arc<MapKeeper>,
    commands: mpsc::Sender<Command>,
    /// This node's store, served to its own users as to a peer.
    pub(crate) local: pieces::Server,
    scrub: watch::Receiver<ScrubState>,
}

impl Node {
    /// Starts a node: opens its store and metadata replica, listens, serves
    /// its protocols to members and dials the bootstrap peers.
    pub async fn start(config: NodeConfig, identity: Identity) -> Result<Self, NodeError> {
        config
            .certificate
            .verify(&config.cluster, &identity.node_id(), now_unix_ms())
            .map_err(NodeError::OwnCertificate)?;
        let mut store_config =
            StoreConfig::new(config.data_dir.join("fragments"), config.capacity_bytes);
        store_config.trash_ms = config.store.trash_period.as_millis() as u64;
        store_config.volume_bytes = config.store.volume_bytes;
        let max_fragment_bytes = store_config.max_fragment_bytes;
        let store = FragmentStore::open(store_config)?;
        let maps = Arc::new(MapKeeper::load(
            config.cluster,
            config.data_dir.join("cluster-map.bin"),
        )?);
        let dht_path = config.data_dir.join("dht.redb");
        let dht_store =
            RedbRecordStore::open(&dht_path, identity.peer_id(), DhtStoreLimits::default())
                .map_err(|e| NodeError::Dht {
                    path: dht_path,
                    reason: e.to_string(),
                })?;
        let meta_path = config.data_dir.join("meta.redb");
        let replica = MetaReplica::open(&meta_path).map_err(|e| NodeError::Metadata {
            path: meta_path,
            reason: e.to_string(),
        })?;
        let limits = config.limits;
        let (swarm, listen_addr) =
            event_loop::build(&identity, dht_store, limits, config.listen.clone()).await?;

        let control = swarm.behaviour().streams.new_control();
        let accept = |protocol| {
            control
                .clone()
                .accept(protocol)
                .map_err(|e| NodeError::Swarm(e.to_string()))
        };
        let (mut hello_in, pieces_in, maps_in, meta_in) = (
            accept(hello::PROTOCOL)?,
            accept(pieces::PROTOCOL)?,
            accept(mapsync::PROTOCOL)?,
            accept(META_PROTOCOL)?,
        );
        {
            let (own, replica) = (identity.node_id(), replica.clone());
            maps.set_before_adopt(Box::new(move |held, newer| {
                crate::meta::forget_if_membership_broke(own, &replica, held, newer)
            }));
        }
        let members = Arc::new(Members::default());
        let (commands, command_rx) = mpsc::channel(256);
        let (stored, stored_rx) = mpsc::channel(1024);
        let metadata = Metadata::new(
            identity.node_id(),
            control.clone(),
            members.clone(),
            maps.clone(),
            replica,
        );
        metadata.start_anti_entropy(config.anti_entropy_every);
        metadata
            .start_tombstone_compaction(config.store.housekeeping_every, config.store.trash_period);
        let (scrub_progress, scrub) = watch::channel(ScrubState::default());
        let local = pieces::Server {
            store: store.clone(),
            max_fragment_bytes,
            now_unix_ms,
            budget: Arc::new(ByteBudget::new(
                limits.bytes_in_flight,
                limits.bytes_in_flight / PEER_SHARE_OF_BUDGET,
                max_fragment_bytes,
            )),
            stored: Some(stored),
            metadata: metadata.clone(),
            release_rules: ReleaseRules::default(),
            scrub: scrub.clone(),
            repair: Arc::default(),
            lifecycle: Arc::default(),
            store_status: Arc::default(),
        };
        let mut tasks = vec![
            workers::housekeeping(store.clone(), config.store),
            scrub::start(store, config.scrub, scrub_progress),
        ];

        let admission = |protocol, total, per_peer, deadline| Admission {
            protocol,
            members: members.clone(),
            total,
            per_peer,
            deadline,
        };

        // Metadata requests, answered from the local replica. Past the
        // limits a stream is dropped unanswered: the caller counts it as a
        // failed replica.
        let serving = metadata.clone();
        tasks.push(
            admission(
                "meta",
                limits.inbound_streams,
                limits.streams_per_peer,
                META_STREAM_DEADLINE,
            )
            .run(
                meta_in,
                move |peer, stream| {
                    let metadata = serving.clone();
                    async move {
                        if let Err(error) = meta_rpc::serve(stream, &metadata).await {
                            tracing::info!(%peer, %error, "metadata request ended with an error");
                        }
                    }
                },
                |_, _| async {},
            ),
        );

        // Cluster maps pushed by members: keep the newest, pass it on. A
        // map is up to 8 MiB: few are taken at once.
        let (spread_to, keeper, pusher) = (members.clone(), maps.clone(), control.clone());
        tasks.push(admission("map", MAP_STREAMS, 1, MAP_STREAM_DEADLINE).run(
            maps_in,
            move |peer, mut stream| {
                let (members, maps, control) = (spread_to.clone(), keeper.clone(), pusher.clone());
                async move {
                    if let Some(map) = maps.receive(&peer, &mut stream).await {
                        mapsync::spread(&control, &members, &map, Some(peer));
                    }
                }
            },
            |_, _| async {},
        ));

        // Piece exchange, within the node's stream limits.
        let server = local.clone();
        tasks.push(
            admission(
                "pieces",
                limits.inbound_streams,
                limits.streams_per_peer,
                PIECE_STREAM_DEADLINE,
            )
            .run(
                pieces_in,
                move |peer, stream| {
                    let server = server.clone();
                    async move {
                        if let Err(error) = server.serve(peer, stream).await {
                            tracing::info!(%peer, %error, "piece exchange ended with an error");
                        }
                    }
                },
                pieces::answer_busy,
            ),
        );

        // The handshake: its listening half for every stream; the dialing
        // half is started by the event loop for each connection it dials.
        let handshake = Handshake {
            members: members.clone(),
            maps: maps.clone(),
            control: control.clone(),
            commands: commands.clone(),
            cluster: config.cluster,
            own_certificate: config.certificate.encode(),
        };
        let listening = handshake.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((peer, stream)) = hello_in.next().await {
                tokio::spawn(listening.clone().serve(peer, stream));
            }
        }));
        tasks.push(tokio::spawn(event_loop::run(
            swarm,
            command_rx,
            stored_rx,
            handshake,
            (limits.incoming_connections as usize / UNVERIFIED_SHARE_OF_INCOMING).max(8),
        )));

        let node = Self {
            handle: NodeHandle {
                identity,
                metadata,
                control,
                members,
                maps,
                commands,
                local,
                scrub,
            },
            listen_addrs: vec![listen_addr],
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
            metadata, local, ..
        } = self.handle;
        let store = local.store;
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
        &self.local.store
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
            mapsync::spread(&self.control, &self.members, &checked, None);
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
        self.local.release_rules.install(rules);
    }

    /// Marks the repair pass under way as making progress now.
    pub fn repair_heartbeat(&self) {
        self.local
            .repair
            .lock()
            .expect("repair summary lock")
            .pass_progress_unix_ms = now_unix_ms();
    }

    /// Publishes this node's last repair report, for status queries.
    pub fn publish_repair(&self, summary: RepairSummary) {
        *self.local.repair.lock().expect("repair summary lock") = summary;
    }

    /// Publishes what this node's lifecycle worker has done, for status
    /// queries.
    pub fn publish_lifecycle(&self, summary: LifecycleSummary) {
        *self.local.lifecycle.lock().expect("lifecycle summary lock") = summary;
    }

    /// Where this node's scrub is; changes after every step.
    pub fn scrub_progress(&self) -> watch::Receiver<ScrubState> {
        self.scrub.clone()
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

    pub(crate) async fn ask_swarm<T>(
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

    /// Opens a piece-exchange stream without waiting for the membership
    /// handshake: the exchanges above use it, and so do tests of peers that
    /// misbehave.
    pub async fn open_raw_piece_stream(&self, node: &NodeId) -> Result<libp2p::Stream, NodeError> {
        self.open_raw_stream(node, pieces::PROTOCOL).await
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
