//! The swarm's event loop: libp2p over QUIC with identify, ping and
//! Kademlia behind the membership gate, and the commands the rest of the
//! node sends it (dial, block, announce, look up).
//!
//! Only members enter the routing table, and records and provider records
//! are kept only from members.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cairn_protocol::ids::UploadId;
use futures::StreamExt;
use libp2p::kad::store::RecordStore;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, allow_block_list, connection_limits, identify, kad, ping,
};
use tokio::sync::{mpsc, oneshot};

use crate::blocklist::BlockList;
use crate::clock::now_unix_ms;
use crate::dht::RedbRecordStore;
use crate::gate::Gated;
use crate::hello::Handshake;
use crate::identity::Identity;
use crate::members::{Members, refusal};
use crate::swarm::{NodeError, StreamLimits};

pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/cairn/kad/1.0.0");
/// How long a connected peer may go without passing the handshake before
/// it is disconnected: the dialer's retries fit in it.
pub(crate) const UNVERIFIED_GRACE: Duration = Duration::from_secs(15);
/// Time enough for a member's handshake on a connection it opened: a
/// connection waiting longer may make room for a newer one.
const HANDSHAKE_TIME: Duration = Duration::from_secs(2);
/// How often members' certificates are checked again, new maps aside.
const MEMBERS_CHECK_EVERY: Duration = Duration::from_secs(30);
/// How often the DHT store's writes are made durable.
const DHT_FLUSH_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn upload_provider_key(upload: &UploadId) -> kad::RecordKey {
    kad::RecordKey::new(&cairn_protocol::dht::upload_provider_key(upload))
}

/// The protocols libp2p brings, answered to members only.
#[derive(NetworkBehaviour)]
pub(crate) struct OpenProtocols {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<RedbRecordStore>,
}

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    limits: connection_limits::Behaviour,
    open: Gated<OpenProtocols>,
    pub(crate) streams: libp2p_stream::Behaviour,
}

impl Behaviour {
    fn kad(&mut self) -> &mut kad::Behaviour<RedbRecordStore> {
        &mut self.open.inner_mut().kad
    }

    /// Refuses `peer` from now on: no connection, no routing entry.
    fn block(&mut self, blocked: &mut BlockList, peer: PeerId) {
        for evicted in blocked.block(peer, std::time::Instant::now()) {
            self.blocked.unblock_peer(evicted);
        }
        self.blocked.block_peer(peer);
        self.open.revoke(&peer);
        self.kad().remove_peer(&peer);
    }
}

/// Builds the swarm and starts listening; returns it with the address it
/// listens on.
pub(crate) async fn build(
    identity: &Identity,
    dht_store: RedbRecordStore,
    limits: StreamLimits,
    listen: Multiaddr,
) -> Result<(libp2p::Swarm<Behaviour>, Multiaddr), NodeError> {
    let peer_id = identity.peer_id();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity.keypair().clone())
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| {
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            // What members store and who enters the routing table are
            // decided here, against the membership (see run).
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
                open: Gated::new(OpenProtocols {
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/cairn/id/1".into(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::default(),
                    kad,
                }),
                streams: libp2p_stream::Behaviour::new(),
            }
        })
        .map_err(|e| NodeError::Swarm(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    swarm
        .listen_on(listen)
        .map_err(|e| NodeError::Swarm(e.to_string()))?;
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { address, .. } => return Ok((swarm, address)),
            SwarmEvent::ListenerError { error, .. } => {
                return Err(NodeError::Swarm(error.to_string()));
            }
            _ => {}
        }
    }
}

pub(crate) enum Command {
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

type ProvidersReply = oneshot::Sender<Result<HashSet<PeerId>, String>>;

/// Queries the event loop is waiting on, with whom to answer.
#[derive(Default)]
struct PendingQueries {
    provides: HashMap<kad::QueryId, oneshot::Sender<Result<(), String>>>,
    /// Providers found so far for each lookup.
    finds: HashMap<kad::QueryId, (HashSet<PeerId>, ProvidersReply)>,
    connects: HashMap<libp2p::swarm::ConnectionId, oneshot::Sender<Result<PeerId, String>>>,
}

/// Runs the swarm until every command sender is gone. `stored` names the
/// uploads of fragments stored here, to announce.
pub(crate) async fn run(
    mut swarm: libp2p::Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    mut stored: mpsc::Receiver<UploadId>,
    handshake: Handshake,
    unverified_cap: usize,
) {
    let members = handshake.members.clone();
    // Connections taken in from peers that are not (yet) members, oldest
    // first (see shed_unverified).
    let mut unverified: std::collections::VecDeque<(PeerId, ConnectionId, std::time::Instant)> =
        std::collections::VecDeque::new();
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
                    swarm.behaviour_mut().block(&mut blocked, peer);
                }
                Some(Command::Verified(peer)) => {
                    // A handshake that ended after its connection closed, or
                    // after the peer was blocked, admits nobody.
                    if !swarm.is_connected(&peer) || blocked.contains(&peer) {
                        members.remove(&peer);
                        continue;
                    }
                    unverified.retain(|(p, _, _)| *p != peer);
                    swarm.behaviour_mut().open.admit(peer);
                    for address in identified.get(&peer).into_iter().flatten() {
                        swarm.behaviour_mut().kad().add_address(&peer, address.clone());
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
                    let query = swarm.behaviour_mut().kad().get_providers(key);
                    pending.finds.insert(query, (HashSet::new(), reply));
                }
                None => break,
            },
            Some(upload) = stored.recv() => {
                provide(&mut swarm, &mut pending, local, upload_provider_key(&upload), None);
            }
            _ = flush.tick() => {
                if let Err(error) = swarm.behaviour_mut().kad().store_mut().flush() {
                    tracing::error!(%error, "DHT store: flush failed");
                }
                shed_unverified(&mut swarm, &mut unverified, unverified_cap, &members);
                let now = std::time::Instant::now();
                for peer in blocked.expire(now) {
                    tracing::info!(%peer, "block expired");
                    swarm.behaviour_mut().blocked.unblock_peer(peer);
                }
                // Members are checked again on every new map and now and
                // then: a node marked out, or whose certificate expired,
                // is disconnected and refused.
                let version = handshake.maps.version();
                if version != checked.0 || now.duration_since(checked.1) >= MEMBERS_CHECK_EVERY {
                    checked = (version, now);
                    let map = handshake.maps.current();
                    for (peer, certificate) in members.certificates() {
                        let Some(reason) = refusal(&certificate, &handshake.cluster, map.as_ref().map(|m| &m.map), now_unix_ms()) else {
                            continue;
                        };
                        tracing::warn!(%peer, %reason, "member no longer admitted: disconnected and blocked");
                        members.remove(&peer);
                        swarm.behaviour_mut().block(&mut blocked, peer);
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
                        let commands = handshake.commands.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(UNVERIFIED_GRACE).await;
                            let _ = commands.send(Command::DropIfUnverified(peer_id)).await;
                        });
                    }
                    if endpoint.is_dialer() {
                        tokio::spawn(handshake.clone().call_and_admit(peer_id));
                    } else if !members.contains(&peer_id) {
                        unverified.push_back((peer_id, connection_id, std::time::Instant::now()));
                        shed_unverified(&mut swarm, &mut unverified, unverified_cap, &members);
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, .. } => {
                    unverified.retain(|(_, c, _)| *c != connection_id);
                    if num_established == 0 {
                        members.remove(&peer_id);
                        identified.remove(&peer_id);
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Open(OpenProtocolsEvent::Identify(identify::Event::Received { peer_id, info, .. }))) => {
                    // Only members enter the routing table.
                    if members.contains(&peer_id) {
                        for address in &info.listen_addrs {
                            swarm.behaviour_mut().kad().add_address(&peer_id, address.clone());
                        }
                    }
                    identified.insert(peer_id, info.listen_addrs);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Open(OpenProtocolsEvent::Kad(event))) => on_kad_event(&mut swarm, local, &mut pending, &members, event),
                _ => {}
            },
        }
    }
}

/// Keeps the connections taken in from peers that are not (yet) members
/// to `cap`, so that outsiders holding connections open until their grace
/// runs out cannot fill the connection limit members need: past the cap,
/// the oldest are closed, but only once they have had time for a
/// handshake, so that a member mid-handshake is never pushed out by a
/// burst (the cap is exceeded for that long at most).
fn shed_unverified(
    swarm: &mut libp2p::Swarm<Behaviour>,
    unverified: &mut std::collections::VecDeque<(PeerId, ConnectionId, std::time::Instant)>,
    cap: usize,
    members: &Members,
) {
    let now = std::time::Instant::now();
    while unverified.len() > cap
        && unverified
            .front()
            .is_some_and(|(_, _, at)| now.duration_since(*at) >= HANDSHAKE_TIME)
    {
        let Some((peer, connection, _)) = unverified.pop_front() else {
            break;
        };
        if !members.contains(&peer) {
            tracing::info!(%peer, "too many connections waiting for the handshake: the oldest closed");
            swarm.close_connection(connection);
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
    let kad = swarm.behaviour_mut().kad();
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
    local: PeerId,
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
                    // Only members are believed: a member's answer could
                    // name any peer.
                    found.extend(
                        providers
                            .into_iter()
                            .filter(|p| *p == local || members.contains(p)),
                    );
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
            } else if let Err(error) = swarm.behaviour_mut().kad().store_mut().put(record) {
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
            } else if let Err(error) = swarm.behaviour_mut().kad().store_mut().add_provider(record)
            {
                tracing::warn!(%error, "provider record not kept");
            }
        }
        _ => {}
    }
}
