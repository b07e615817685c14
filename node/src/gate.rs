//! Admission at the connection level: the libp2p protocols that are not
//! Cairn's own (Kademlia, identify, ping) answer a peer only once it has
//! passed the membership handshake.
//!
//! [`Gated`] wraps a behaviour. Its connection handler takes the inbound
//! streams the wrapped handler would answer and holds them, unanswered,
//! until the node admits the peer; then it hands them over in order. An
//! outsider's Kademlia query, identify request or ping therefore learns
//! nothing (no addresses, no providers, not even liveness) before the node
//! drops its connection. Holding rather than refusing the streams matters
//! between members: each side admits the other at a slightly different
//! moment, and a refused identify or ping would not be asked again on that
//! connection.
//!
//! Outbound streams are not gated: the node asks only peers it chose.

use std::collections::{HashMap, HashSet, VecDeque};
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Inbound streams one connection of a peer not yet admitted may have held;
/// past this, new ones are dropped (the peer sees them reset).
const HELD_PER_CONNECTION: usize = 8;

/// A behaviour whose inbound streams wait for the peer's admission.
pub(crate) struct Gated<B> {
    inner: B,
    admitted: HashSet<PeerId>,
    connections: HashMap<ConnectionId, PeerId>,
    notices: VecDeque<(PeerId, ConnectionId)>,
}

impl<B> Gated<B> {
    pub(crate) fn new(inner: B) -> Self {
        Self {
            inner,
            admitted: HashSet::new(),
            connections: HashMap::new(),
            notices: VecDeque::new(),
        }
    }

    pub(crate) fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// Lets `peer`'s streams through, on its open connections and on those
    /// it opens later.
    pub(crate) fn admit(&mut self, peer: PeerId) {
        if !self.admitted.insert(peer) {
            return;
        }
        for (connection, owner) in &self.connections {
            if *owner == peer {
                self.notices.push_back((peer, *connection));
            }
        }
    }

    /// Holds `peer`'s streams again on connections it opens from now on
    /// (the node closes the ones it has).
    pub(crate) fn revoke(&mut self, peer: &PeerId) {
        self.admitted.remove(peer);
    }

    fn handler(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        inner: THandler<B>,
    ) -> GatedHandler<THandler<B>>
    where
        B: NetworkBehaviour,
    {
        self.connections.insert(connection, peer);
        GatedHandler {
            inner,
            admitted: self.admitted.contains(&peer),
            held: Vec::new(),
        }
    }
}

/// What the gate tells a connection's handler.
#[derive(Debug)]
pub(crate) enum GateNotice<T> {
    /// For the wrapped handler.
    Inner(T),
    /// The peer passed the handshake: release what is held.
    Admitted,
}

type HeldStream<H> = FullyNegotiatedInbound<
    <H as ConnectionHandler>::InboundProtocol,
    <H as ConnectionHandler>::InboundOpenInfo,
>;

pub(crate) struct GatedHandler<H: ConnectionHandler> {
    inner: H,
    admitted: bool,
    held: Vec<HeldStream<H>>,
}

impl<H: ConnectionHandler> ConnectionHandler for GatedHandler<H> {
    type FromBehaviour = GateNotice<H::FromBehaviour>;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        self.inner.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {
            GateNotice::Inner(event) => self.inner.on_behaviour_event(event),
            GateNotice::Admitted => {
                self.admitted = true;
                for stream in std::mem::take(&mut self.held) {
                    self.inner
                        .on_connection_event(ConnectionEvent::FullyNegotiatedInbound(stream));
                }
            }
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(stream) if !self.admitted => {
                if self.held.len() < HELD_PER_CONNECTION {
                    self.held.push(stream);
                } else {
                    tracing::debug!("inbound stream from a peer not admitted dropped");
                }
            }
            event => self.inner.on_connection_event(event),
        }
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for Gated<B> {
    type ConnectionHandler = GatedHandler<THandler<B>>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        Ok(self.handler(connection_id, peer, inner))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        Ok(self.handler(connection_id, peer, inner))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match &event {
            FromSwarm::ConnectionClosed(closed) => {
                self.connections.remove(&closed.connection_id);
                if closed.remaining_established == 0 {
                    self.admitted.remove(&closed.peer_id);
                }
            }
            // A connection another behaviour refused after this one made
            // its handler.
            FromSwarm::ListenFailure(failure) => {
                self.connections.remove(&failure.connection_id);
            }
            FromSwarm::DialFailure(failure) => {
                self.connections.remove(&failure.connection_id);
            }
            _ => {}
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        if let Some((peer_id, connection)) = self.notices.pop_front() {
            return Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(connection),
                event: GateNotice::Admitted,
            });
        }
        self.inner
            .poll(cx)
            .map(|event| event.map_in(GateNotice::Inner))
    }
}
