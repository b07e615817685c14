//! The cluster map as this node knows it, kept on disk and spread to every
//! member over `/cairn/map/1` (spec/membership.md). Only maps signed by the
//! cluster key are taken, and only when newer than the one held.

use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use cairn_protocol::membership::{ClusterId, MembershipError, SignedMap};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::Notify;

use crate::outbound::{self, Retries};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/cairn/map/1");
/// A map of 65 536 nodes is about 7 MiB.
const MAX_MAP_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("cluster map file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster map file {path} does not verify: {source}")]
    Invalid {
        path: PathBuf,
        source: MembershipError,
    },
    #[error("refusing cluster map version {version}: {source}")]
    Refused {
        version: u64,
        source: MembershipError,
    },
    #[error("could not prepare for cluster map version {version}: {reason}")]
    Prepare { version: u64, reason: String },
}

/// What a node does to its own state before it adopts a newer map (held,
/// newer); an error keeps the held map.
pub type BeforeAdopt =
    Box<dyn Fn(Option<&SignedMap>, &SignedMap) -> Result<(), String> + Send + Sync>;

fn previous_path(path: &std::path::Path) -> PathBuf {
    path.with_extension("previous")
}

pub struct MapKeeper {
    cluster: ClusterId,
    path: PathBuf,
    current: RwLock<Option<SignedMap>>,
    /// The map held before the current one: metadata partitions that moved
    /// are served by both replica sets until the new one has filled.
    previous: RwLock<Option<SignedMap>>,
    changed: Notify,
    before_adopt: OnceLock<BeforeAdopt>,
}

fn read_map(cluster: &ClusterId, path: &PathBuf) -> Result<Option<SignedMap>, MapError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(SignedMap::decode(&bytes, cluster).map_err(
            |source| MapError::Invalid {
                path: path.clone(),
                source,
            },
        )?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(MapError::Io {
            path: path.clone(),
            source,
        }),
    }
}

/// Writes a map file durably: temporary file, fsync, rename, directory fsync.
fn write_map(path: &PathBuf, map: &SignedMap) -> Result<(), MapError> {
    let io = |source| MapError::Io {
        path: path.clone(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let mut file = File::create(&temporary).map_err(io)?;
    file.write_all(&map.encode()).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&temporary, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

impl MapKeeper {
    /// Loads the map kept at `path`, if any; a file that does not verify is
    /// an error rather than silently replaced.
    pub fn load(cluster: ClusterId, path: PathBuf) -> Result<Self, MapError> {
        let current = read_map(&cluster, &path)?;
        let previous = read_map(&cluster, &previous_path(&path))?
            // A crash between the two writes of `offer` leaves them equal.
            .filter(|p| {
                current
                    .as_ref()
                    .is_some_and(|c| p.map.version < c.map.version)
            });
        Ok(Self {
            cluster,
            path,
            current: RwLock::new(current),
            previous: RwLock::new(previous),
            changed: Notify::new(),
            before_adopt: OnceLock::new(),
        })
    }

    pub fn cluster(&self) -> ClusterId {
        self.cluster
    }

    pub fn current(&self) -> Option<SignedMap> {
        self.current.read().expect("map lock").clone()
    }

    /// The map held before the current one, if any.
    pub fn previous(&self) -> Option<SignedMap> {
        self.previous.read().expect("map lock").clone()
    }

    pub fn version(&self) -> Option<u64> {
        self.current
            .read()
            .expect("map lock")
            .as_ref()
            .map(|m| m.map.version)
    }

    /// Sets what runs before each newer map is adopted (once, at start).
    pub fn set_before_adopt(&self, before: BeforeAdopt) {
        if self.before_adopt.set(before).is_err() {
            tracing::error!("the map keeper's before-adopt step was set twice; the first stays");
        }
    }

    /// Takes `map` if it is newer than the one held and its nodes' `since`
    /// follows from the held map's: prepared for, written durably, then
    /// adopted. Returns whether it was taken.
    pub fn offer(&self, map: &SignedMap) -> Result<bool, MapError> {
        let mut current = self.current.write().expect("map lock");
        if current
            .as_ref()
            .is_some_and(|held| !held.is_superseded_by(map))
        {
            return Ok(false);
        }
        let version = map.map.version;
        if let Some(held) = current.as_ref() {
            held.check_since(map)
                .map_err(|source| MapError::Refused { version, source })?;
        }
        if let Some(before) = self.before_adopt.get() {
            before(current.as_ref(), map)
                .map_err(|reason| MapError::Prepare { version, reason })?;
        }
        if let Some(held) = current.as_ref() {
            write_map(&previous_path(&self.path), held)?;
        }
        write_map(&self.path, map)?;
        *self.previous.write().expect("map lock") = current.take();
        *current = Some(map.clone());
        drop(current);
        self.changed.notify_waiters();
        Ok(true)
    }

    /// Waits until the held map reaches `version`, up to `timeout`.
    pub async fn wait_for_version(&self, version: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.version().is_some_and(|v| v >= version) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.version().is_some_and(|v| v >= version);
            }
        }
    }

    /// Reads one pushed map from `stream`, decides on it and answers with
    /// the version now held. Returns the map when it was newer and taken,
    /// for the caller to pass on.
    pub async fn receive(&self, peer: &PeerId, stream: &mut libp2p::Stream) -> Option<SignedMap> {
        let taken = self.decide(peer, stream).await;
        let held = self.version().unwrap_or(0);
        let answer = async {
            stream.write_all(&held.to_be_bytes()).await?;
            stream.close().await
        };
        if let Err(error) = answer.await {
            tracing::debug!(%peer, %error, "could not answer a cluster map push");
        }
        taken
    }

    async fn decide(&self, peer: &PeerId, stream: &mut libp2p::Stream) -> Option<SignedMap> {
        let mut len = [0u8; 4];
        let read = async {
            stream.read_exact(&mut len).await?;
            let len = u32::from_be_bytes(len) as usize;
            if len > MAX_MAP_BYTES {
                return Err(std::io::Error::other(format!(
                    "a {len}-byte map is above the {MAX_MAP_BYTES}-byte limit"
                )));
            }
            // Grows as bytes arrive: a declared length alone allocates
            // nothing.
            let mut bytes = Vec::new();
            (&mut *stream)
                .take(len as u64)
                .read_to_end(&mut bytes)
                .await?;
            if bytes.len() != len {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            Ok(bytes)
        };
        let bytes = match tokio::time::timeout(Duration::from_secs(30), read).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(error)) => {
                tracing::warn!(%peer, %error, "cluster map push failed");
                return None;
            }
            Err(_) => {
                tracing::warn!(%peer, "cluster map push timed out");
                return None;
            }
        };
        let map = match SignedMap::decode(&bytes, &self.cluster) {
            Ok(map) => map,
            Err(error) => {
                tracing::warn!(%peer, %error, "ignoring a cluster map that does not verify");
                return None;
            }
        };
        match self.offer(&map) {
            Ok(true) => {
                tracing::info!(%peer, version = map.map.version, "adopted a newer cluster map");
                Some(map)
            }
            Ok(false) => {
                tracing::debug!(%peer, offered = map.map.version, held = ?self.version(), "ignoring a stale cluster map");
                None
            }
            Err(error @ MapError::Refused { .. }) => {
                tracing::warn!(%peer, %error, "ignoring a cluster map");
                None
            }
            Err(error) => {
                tracing::error!(%error, "could not keep a newer cluster map");
                None
            }
        }
    }
}

/// Pushes `map` to `peer` on a fresh stream; returns the version the peer
/// holds afterwards (0: none).
pub async fn push(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    map: &SignedMap,
) -> std::io::Result<u64> {
    let mut stream = control
        .open_stream(peer, PROTOCOL)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let bytes = map.encode();
    stream
        .write_all(&(bytes.len() as u32).to_be_bytes())
        .await?;
    stream.write_all(&bytes).await?;
    stream.close().await?;
    let mut held = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut held))
        .await
        .map_err(|_| std::io::Error::other("no answer to the map push in 30 s"))??;
    Ok(u64::from_be_bytes(held))
}

/// Pushes `map` to `peer` until it answers, a few times over about half a
/// minute: a stream opened on a connection that died with its peer (one
/// that restarted, say) fails only when QUIC's idle timeout closes it.
pub async fn push_with_retries(
    control: libp2p_stream::Control,
    peer: PeerId,
    map: &SignedMap,
) -> std::io::Result<u64> {
    let retries = Retries {
        attempts: 5,
        first_pause: Duration::from_secs(1),
        deadline: Duration::from_secs(60),
    };
    outbound::call(
        retries,
        |_| push(control.clone(), peer, map),
        |_| true,
        || std::io::Error::other("the map push took over 60 s"),
    )
    .await
}

/// Sends the map this node holds to a peer that just became a member.
pub(crate) fn share(control: &libp2p_stream::Control, maps: &MapKeeper, peer: PeerId) {
    if let Some(map) = maps.current() {
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(error) = push_with_retries(control, peer, &map).await {
                tracing::debug!(%peer, %error, "could not send the cluster map");
            }
        });
    }
}

/// Passes a newly adopted map on to every member but `except`.
pub(crate) fn spread(
    control: &libp2p_stream::Control,
    members: &crate::members::Members,
    map: &SignedMap,
    except: Option<PeerId>,
) {
    for peer in members.peers().into_iter().filter(|p| Some(*p) != except) {
        let (control, map) = (control.clone(), map.clone());
        tokio::spawn(async move {
            if let Err(error) = push_with_retries(control, peer, &map).await {
                tracing::debug!(%peer, %error, "could not pass the cluster map on");
            }
        });
    }
}
