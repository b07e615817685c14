//! The node's identity: an ed25519 key in a file only its owner can read.
//! The same key is the node's NodeId, its libp2p PeerId and its QUIC/TLS
//! identity, and it signs holds and manifests.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cairn_protocol::ed25519_dalek::SigningKey;
use cairn_protocol::ids::NodeId;
use libp2p::identity::{Keypair, PeerId, PublicKey, ed25519};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("key file {path} can be read by other users (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a 32-byte ed25519 secret key ({len} bytes)")]
    Malformed { path: PathBuf, len: usize },
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node id {0} is not an ed25519 public key")]
    NotAKey(NodeId),
}

/// A node's key pair, in the forms the protocol crate and libp2p need.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    keypair: Keypair,
}

impl Identity {
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(&secret);
        let mut bytes = secret;
        let keypair = Keypair::from(ed25519::Keypair::from(
            ed25519::SecretKey::try_from_bytes(&mut bytes)
                .expect("32 bytes are a valid ed25519 secret"),
        ));
        Self { signing, keypair }
    }

    /// A fresh random identity.
    pub fn generate() -> Self {
        let keypair = ed25519::Keypair::generate();
        let secret: [u8; 32] = keypair
            .secret()
            .as_ref()
            .try_into()
            .expect("32-byte secret");
        Self::from_secret(secret)
    }

    /// Loads the key at `path`, or creates it (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        match fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(IdentityError::TooOpen {
                        path: path.to_owned(),
                        mode,
                    });
                }
                let bytes = fs::read(path).map_err(io)?;
                let secret: [u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| IdentityError::Malformed {
                            path: path.to_owned(),
                            len: bytes.len(),
                        })?;
                Ok(Self::from_secret(secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Self::generate();
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(io)?;
                }
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                file.write_all(&identity.signing.to_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok(identity)
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    pub fn node_id(&self) -> NodeId {
        NodeId::from_verifying_key(&self.signing.verifying_key())
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }
}

/// The PeerId of a node, from its NodeId.
pub fn peer_id_of(node: &NodeId) -> Result<PeerId, IdentityError> {
    let key = ed25519::PublicKey::try_from_bytes(node.as_bytes())
        .map_err(|_| IdentityError::NotAKey(*node))?;
    Ok(PublicKey::from(key).to_peer_id())
}

/// The NodeId of a peer, when its PeerId embeds an ed25519 key.
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let key = PublicKey::try_decode_protobuf(&peer.to_bytes()[2..]).ok()?;
    Some(NodeId(key.try_into_ed25519().ok()?.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_0600_and_reloaded_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/node.key");
        let first = Identity::load_or_create(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = Identity::load_or_create(&path).unwrap();
        assert_eq!(first.node_id(), again.node_id());
        assert_eq!(first.peer_id(), again.peer_id());
        assert_eq!(peer_id_of(&first.node_id()).unwrap(), first.peer_id());
        assert_eq!(node_id_of(&first.peer_id()), Some(first.node_id()));
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        Identity::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = Identity::load_or_create(&path).err().unwrap().to_string();
        assert!(error.contains("chmod 600"), "{error}");
    }
}
