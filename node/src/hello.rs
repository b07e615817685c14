//! The membership handshake `/cairn/hello/1` (spec/membership.md). Each
//! side sends its enrolment certificate and checks the other's: signed by
//! this cluster's key, for the peer's own key, not expired, and its node
//! not `out` in the newest map. A peer that passes becomes a member, which
//! every other protocol of the node requires (the stream protocols through
//! [`crate::inbound`], Kademlia, identify and ping through [`crate::gate`]);
//! a peer whose certificate is refused is disconnected and blocked.
//!
//! The dialer calls ([`Handshake::call_and_admit`]); the listener serves
//! ([`Handshake::serve`]).

use std::sync::Arc;
use std::time::Duration;

use cairn_protocol::membership::{Certificate, ClusterId};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;

use crate::clock::now_unix_ms;
use crate::event_loop::Command;
use crate::identity::node_id_of;
use crate::mapsync::{self, MapKeeper};
use crate::members::{MEMBERSHIP_WAIT, Members, refusal};
use crate::outbound::{self, Retries};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/cairn/hello/1");
/// A certificate is about 150 bytes; anything past this is refused unread.
const MAX_CERTIFICATE_BYTES: usize = 1024;
/// How long the dialer's handshake may take, attempts included.
const DEADLINE: Duration = Duration::from_secs(15);

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

/// What both halves of the handshake need, and what they tell the event
/// loop.
#[derive(Clone)]
pub(crate) struct Handshake {
    pub(crate) members: Arc<Members>,
    pub(crate) maps: Arc<MapKeeper>,
    pub(crate) control: libp2p_stream::Control,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) cluster: ClusterId,
    pub(crate) own_certificate: Vec<u8>,
}

impl Handshake {
    /// The listening half: verify theirs, then send ours.
    pub(crate) async fn serve(self, peer: PeerId, mut stream: libp2p::Stream) {
        let read = read_certificate(&mut stream, &self.cluster, &peer).await;
        match read.and_then(|c| self.admissible(c)) {
            Ok(certificate) => {
                self.admit(peer, certificate).await;
                let _ = write_certificate(&mut stream, &self.own_certificate).await;
                let _ = stream.close().await;
            }
            Err(HandshakeError::Refused(reason)) => self.refuse(peer, &reason).await,
            Err(HandshakeError::Transport(reason)) => {
                tracing::info!(%peer, %reason, "membership handshake interrupted; the dialer retries");
            }
        }
    }

    /// The dialing half: send ours, verify theirs; then admit the peer.
    pub(crate) async fn call_and_admit(self, peer: PeerId) {
        match self.call(peer).await.and_then(|c| self.admissible(c)) {
            Ok(certificate) => self.admit(peer, certificate).await,
            Err(HandshakeError::Refused(reason)) => self.refuse(peer, &reason).await,
            Err(HandshakeError::Transport(reason)) => {
                tracing::warn!(%peer, %reason, "membership handshake failed after retries");
            }
        }
    }

    async fn call(&self, peer: PeerId) -> Result<Certificate, HandshakeError> {
        let retries = Retries {
            attempts: 4,
            first_pause: Duration::from_millis(400),
            deadline: DEADLINE,
        };
        outbound::call(
            retries,
            |_| {
                let (mut control, own) = (self.control.clone(), &self.own_certificate);
                async move {
                    let mut stream = control
                        .open_stream(peer, PROTOCOL)
                        .await
                        .map_err(|e| HandshakeError::Transport(e.to_string()))?;
                    write_certificate(&mut stream, own)
                        .await
                        .map_err(|e| HandshakeError::Transport(e.to_string()))?;
                    read_certificate(&mut stream, &self.cluster, &peer).await
                }
            },
            |error| matches!(error, HandshakeError::Transport(_)),
            || HandshakeError::Transport("no answer in time".into()),
        )
        .await
    }

    /// A verified certificate, unless the newest map marks its node `out`.
    fn admissible(&self, certificate: Certificate) -> Result<Certificate, HandshakeError> {
        let map = self.maps.current();
        match refusal(
            &certificate,
            &self.cluster,
            map.as_ref().map(|m| &m.map),
            now_unix_ms(),
        ) {
            Some(reason) => Err(HandshakeError::Refused(reason)),
            None => Ok(certificate),
        }
    }

    async fn admit(&self, peer: PeerId, certificate: Certificate) {
        self.members.insert(peer, certificate);
        let _ = self.commands.send(Command::Verified(peer)).await;
        mapsync::share(&self.control, &self.maps, peer);
    }

    async fn refuse(&self, peer: PeerId, reason: &str) {
        tracing::warn!(%peer, %reason, "peer failed the membership handshake: blocked");
        let _ = self.commands.send(Command::Block(peer)).await;
    }
}

async fn write_certificate(stream: &mut libp2p::Stream, certificate: &[u8]) -> std::io::Result<()> {
    stream
        .write_all(&(certificate.len() as u16).to_be_bytes())
        .await?;
    stream.write_all(certificate).await?;
    stream.flush().await
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
