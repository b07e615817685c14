//! Membership: who may join the swarm (spec/membership.md).
//!
//! A cluster key (ed25519) signs each node's enrolment certificate (peer,
//! site, validity) and every version of the cluster map. A node trusts a
//! peer only with a valid certificate, and a map only with the cluster's
//! signature; among valid maps the highest version wins.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::erasure::Scheme;
use crate::ids::{NodeId, SiteId};
use crate::placement::{ClusterMap, MapNode, NodeState, Tolerance};

const CERT_MAGIC: &[u8; 4] = b"CRNE";
const MAP_MAGIC: &[u8; 4] = b"CRNP";
const FORMAT: u16 = 1;
/// Maps are written in format 3 (format 1 lacked the metadata replica
/// count, read as the default; formats 1 and 2 lacked each node's
/// `since`, read as 0, unknown).
const MAP_FORMAT: u16 = 3;
/// Metadata replicas per partition unless the map says otherwise.
pub const DEFAULT_METADATA_REPLICAS: u8 = 3;
/// The most metadata replicas a map may ask for.
pub const MAX_METADATA_REPLICAS: u8 = 15;
pub const MAX_MAP_NODES: usize = 65_536;

/// The public half of the cluster key: names the cluster.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ClusterId(pub [u8; 32]);

impl ClusterId {
    pub fn of(key: &SigningKey) -> Self {
        Self(key.verifying_key().to_bytes())
    }

    fn key(&self) -> Result<VerifyingKey, MembershipError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| MembershipError::BadSignature)
    }

    pub fn to_hex(&self) -> String {
        crate::to_hex(&self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        crate::from_hex::<32>(text).map(Self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MembershipError {
    #[error("malformed: {0}")]
    Decode(#[from] DecodeError),
    #[error("not a {0} (bad magic bytes)")]
    BadMagic(&'static str),
    #[error("{what} format {found} is not supported by this node")]
    UnsupportedFormat { what: &'static str, found: u16 },
    #[error("a map asks for {0} metadata replicas; 1 to 15 are possible")]
    MetadataReplicas(u8),
    #[error("signed by another cluster ({found}), not this one ({expected})")]
    WrongCluster { expected: String, found: String },
    #[error("the cluster key's signature does not verify")]
    BadSignature,
    #[error("certificate is for node {certified}, but the peer is {peer}")]
    WrongNode { certified: NodeId, peer: NodeId },
    #[error("certificate expired at {expires_unix_ms} (Unix ms); enrol the node again")]
    Expired { expires_unix_ms: u64 },
    #[error("certificate is not valid before {issued_unix_ms} (Unix ms): check the clocks")]
    NotYetValid { issued_unix_ms: u64 },
    #[error("the map lists {0} nodes, above the limit of {MAX_MAP_NODES}")]
    TooManyNodes(usize),
    #[error("node {node} is a member since version {since}, after the map's own version {version}")]
    SinceAfterVersion {
        node: NodeId,
        since: u64,
        version: u64,
    },
    #[error(
        "node {node} is not in map version {held} (or is out there), so map version {version} must give it a `since` above {held} (it says {since}); sign it with --previous"
    )]
    SinceNotAfterAbsence {
        node: NodeId,
        since: u64,
        held: u64,
        version: u64,
    },
    #[error(
        "node {node} is a member of map version {held}, which does not say since when; map version {version} says since {since}, after it, which would have it forget its metadata: give it a since of {held} or below"
    )]
    SinceUnknownBefore {
        node: NodeId,
        since: u64,
        held: u64,
        version: u64,
    },
    #[error(
        "node {node} has been a member since version {held_since} in map version {held}; map version {version} says since {since}, neither that nor a return after version {held}"
    )]
    SinceRewritten {
        node: NodeId,
        since: u64,
        held_since: u64,
        held: u64,
        version: u64,
    },
}

/// A node's admission to the cluster, signed by the cluster key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub cluster: ClusterId,
    pub node: NodeId,
    pub site: SiteId,
    pub issued_unix_ms: u64,
    pub expires_unix_ms: u64,
    pub signature: [u8; 64],
}

fn body_start(out: &mut Vec<u8>, magic: &[u8; 4], format: u16, cluster: &ClusterId) {
    out.extend_from_slice(magic);
    out.put_u16(format);
    out.extend_from_slice(&cluster.0);
}

/// Reads the magic, a format among `formats`, and the cluster id.
fn read_start(
    r: &mut Reader<'_>,
    magic: &[u8; 4],
    formats: &[u16],
    what: &'static str,
) -> Result<(ClusterId, u16), MembershipError> {
    if r.take(4, "magic")? != magic {
        return Err(MembershipError::BadMagic(what));
    }
    let found = r.u16("format")?;
    if !formats.contains(&found) {
        return Err(MembershipError::UnsupportedFormat { what, found });
    }
    Ok((ClusterId(r.array("cluster")?), found))
}

fn check_cluster(expected: &ClusterId, found: &ClusterId) -> Result<(), MembershipError> {
    if expected != found {
        return Err(MembershipError::WrongCluster {
            expected: expected.to_hex(),
            found: found.to_hex(),
        });
    }
    Ok(())
}

fn verify(cluster: &ClusterId, body: &[u8], signature: &[u8; 64]) -> Result<(), MembershipError> {
    cluster
        .key()?
        .verify_strict(body, &Signature::from_bytes(signature))
        .map_err(|_| MembershipError::BadSignature)
}

impl Certificate {
    /// Enrols `node` in `site` until `expires_unix_ms`.
    pub fn issue(
        cluster_key: &SigningKey,
        node: NodeId,
        site: SiteId,
        issued_unix_ms: u64,
        expires_unix_ms: u64,
    ) -> Self {
        let mut certificate = Self {
            cluster: ClusterId::of(cluster_key),
            node,
            site,
            issued_unix_ms,
            expires_unix_ms,
            signature: [0; 64],
        };
        certificate.signature = cluster_key.sign(&certificate.body()).to_bytes();
        certificate
    }

    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        body_start(&mut out, CERT_MAGIC, FORMAT, &self.cluster);
        out.extend_from_slice(self.node.as_bytes());
        out.put_bytes16(self.site.as_str().as_bytes());
        out.put_u64(self.issued_unix_ms);
        out.put_u64(self.expires_unix_ms);
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.body();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes untrusted bytes; does not verify (see [`Certificate::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, MembershipError> {
        let mut r = Reader::new(bytes);
        let (cluster, _) = read_start(&mut r, CERT_MAGIC, &[FORMAT], "certificate")?;
        let node = NodeId(r.array("node")?);
        let site_text = r.str16("site", SiteId::MAX_LEN)?;
        let site = SiteId::new(site_text).map_err(|_| DecodeError::InvalidValue {
            field: "site",
            value: site_text.len() as u64,
        })?;
        let issued_unix_ms = r.u64("issued")?;
        let expires_unix_ms = r.u64("expires")?;
        let signature = r.array("signature")?;
        r.finish("certificate")?;
        Ok(Self {
            cluster,
            node,
            site,
            issued_unix_ms,
            expires_unix_ms,
            signature,
        })
    }

    /// Checks that this certificate admits `peer` to `cluster` at `now`.
    pub fn verify(
        &self,
        cluster: &ClusterId,
        peer: &NodeId,
        now_unix_ms: u64,
    ) -> Result<(), MembershipError> {
        check_cluster(cluster, &self.cluster)?;
        verify(cluster, &self.body(), &self.signature)?;
        if self.node != *peer {
            return Err(MembershipError::WrongNode {
                certified: self.node,
                peer: *peer,
            });
        }
        if now_unix_ms >= self.expires_unix_ms {
            return Err(MembershipError::Expired {
                expires_unix_ms: self.expires_unix_ms,
            });
        }
        // A little slack for clock skew between the enrolling host and us.
        if now_unix_ms + 5 * 60 * 1000 < self.issued_unix_ms {
            return Err(MembershipError::NotYetValid {
                issued_unix_ms: self.issued_unix_ms,
            });
        }
        Ok(())
    }
}

/// A cluster map with its default scheme, signed by the cluster key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedMap {
    pub cluster: ClusterId,
    pub map: ClusterMap,
    pub scheme: Scheme,
    pub tolerance: Tolerance,
    /// Metadata replicas per partition (spec/metadata.md).
    pub metadata_replicas: u8,
    pub signature: [u8; 64],
}

fn state_byte(state: NodeState) -> u8 {
    match state {
        NodeState::Up => 0,
        NodeState::Down => 1,
        NodeState::Draining => 2,
        NodeState::Out => 3,
    }
}

impl SignedMap {
    /// Signs a map with the default metadata replica count.
    pub fn sign(
        cluster_key: &SigningKey,
        map: ClusterMap,
        scheme: Scheme,
        tolerance: Tolerance,
    ) -> Result<Self, MembershipError> {
        Self::sign_with_replicas(
            cluster_key,
            map,
            scheme,
            tolerance,
            DEFAULT_METADATA_REPLICAS,
        )
    }

    pub fn sign_with_replicas(
        cluster_key: &SigningKey,
        map: ClusterMap,
        scheme: Scheme,
        tolerance: Tolerance,
        metadata_replicas: u8,
    ) -> Result<Self, MembershipError> {
        if map.nodes.len() > MAX_MAP_NODES {
            return Err(MembershipError::TooManyNodes(map.nodes.len()));
        }
        if !(1..=MAX_METADATA_REPLICAS).contains(&metadata_replicas) {
            return Err(MembershipError::MetadataReplicas(metadata_replicas));
        }
        if let Some(node) = map.nodes.iter().find(|n| n.since > map.version) {
            return Err(MembershipError::SinceAfterVersion {
                node: node.id,
                since: node.since,
                version: map.version,
            });
        }
        let mut signed = Self {
            cluster: ClusterId::of(cluster_key),
            map,
            scheme,
            tolerance,
            metadata_replicas,
            signature: [0; 64],
        };
        signed.signature = cluster_key.sign(&signed.body()).to_bytes();
        Ok(signed)
    }

    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.map.nodes.len() * 64);
        body_start(&mut out, MAP_MAGIC, MAP_FORMAT, &self.cluster);
        out.put_u64(self.map.version);
        out.put_u8(self.scheme.data() as u8);
        out.put_u8(self.scheme.parity() as u8);
        out.put_u8(self.tolerance.extra_nodes);
        out.put_u8(self.metadata_replicas);
        out.put_u32(self.map.nodes.len() as u32);
        for node in &self.map.nodes {
            out.extend_from_slice(node.id.as_bytes());
            out.put_bytes16(node.site.as_str().as_bytes());
            out.put_u64(node.capacity_bytes);
            out.put_u8(state_byte(node.state));
            out.put_u64(node.since);
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.body();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes untrusted bytes and verifies them against `cluster`.
    pub fn decode(bytes: &[u8], cluster: &ClusterId) -> Result<Self, MembershipError> {
        let body_len = bytes
            .len()
            .checked_sub(64)
            .ok_or(DecodeError::Truncated { field: "signature" })?;
        let mut r = Reader::new(&bytes[..body_len]);
        let (found, format) = read_start(&mut r, MAP_MAGIC, &[1, 2, MAP_FORMAT], "cluster map")?;
        check_cluster(cluster, &found)?;
        let version = r.u64("version")?;
        let (k, m) = (r.u8("k")?, r.u8("m")?);
        let scheme = Scheme::new(k, m).map_err(|_| DecodeError::InvalidValue {
            field: "scheme",
            value: u64::from(k) << 8 | u64::from(m),
        })?;
        let tolerance = Tolerance {
            extra_nodes: r.u8("extra nodes")?,
        };
        let metadata_replicas = match format {
            1 => DEFAULT_METADATA_REPLICAS,
            _ => match r.u8("metadata replicas")? {
                n @ 1..=MAX_METADATA_REPLICAS => n,
                other => {
                    return Err(DecodeError::InvalidValue {
                        field: "metadata replicas",
                        value: u64::from(other),
                    }
                    .into());
                }
            },
        };
        // A node entry is at least 32 + 2 + 1 + 8 + 1 bytes.
        let count = r.count("nodes", MAX_MAP_NODES, 44)?;
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let id = NodeId(r.array("node id")?);
            let site_text = r.str16("site", SiteId::MAX_LEN)?;
            let site = SiteId::new(site_text).map_err(|_| DecodeError::InvalidValue {
                field: "site",
                value: site_text.len() as u64,
            })?;
            let capacity_bytes = r.u64("capacity")?;
            let state = match r.u8("state")? {
                0 => NodeState::Up,
                1 => NodeState::Down,
                2 => NodeState::Draining,
                3 => NodeState::Out,
                other => {
                    return Err(DecodeError::InvalidValue {
                        field: "state",
                        value: u64::from(other),
                    }
                    .into());
                }
            };
            let since = match format {
                1 | 2 => 0,
                _ => match r.u64("since")? {
                    since if since <= version => since,
                    since => {
                        return Err(DecodeError::InvalidValue {
                            field: "since",
                            value: since,
                        }
                        .into());
                    }
                },
            };
            nodes.push(MapNode {
                id,
                site,
                capacity_bytes,
                state,
                since,
            });
        }
        r.finish("cluster map")?;
        let signature: [u8; 64] = bytes[body_len..].try_into().expect("64 bytes");
        verify(cluster, &bytes[..body_len], &signature)?;
        Ok(Self {
            cluster: found,
            map: ClusterMap { version, nodes },
            scheme,
            tolerance,
            metadata_replicas,
            signature,
        })
    }

    /// Whether `newer` may follow this map as far as membership goes
    /// (spec/membership.md, "Membership since"): a node absent here, or
    /// `out` here and no longer out, must come back with a `since` above
    /// this version; a node present here keeps its `since` unless it left
    /// and came back after this version. A `since` unknown here (0, an
    /// older format) may become any value up to this version, never above:
    /// nothing here says the node left.
    pub fn check_since(&self, newer: &SignedMap) -> Result<(), MembershipError> {
        let held = self.map.version;
        for node in &newer.map.nodes {
            let back =
                |before: &MapNode| before.state == NodeState::Out && node.state != NodeState::Out;
            match self.map.nodes.iter().find(|n| n.id == node.id) {
                None if node.since <= held => {
                    return Err(MembershipError::SinceNotAfterAbsence {
                        node: node.id,
                        since: node.since,
                        held,
                        version: newer.map.version,
                    });
                }
                Some(before) if back(before) && node.since <= held => {
                    return Err(MembershipError::SinceNotAfterAbsence {
                        node: node.id,
                        since: node.since,
                        held,
                        version: newer.map.version,
                    });
                }
                Some(before) if before.since == 0 && node.since > held && !back(before) => {
                    return Err(MembershipError::SinceUnknownBefore {
                        node: node.id,
                        since: node.since,
                        held,
                        version: newer.map.version,
                    });
                }
                Some(before)
                    if before.since != 0 && node.since != before.since && node.since <= held =>
                {
                    return Err(MembershipError::SinceRewritten {
                        node: node.id,
                        since: node.since,
                        held_since: before.since,
                        held,
                        version: newer.map.version,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether every node's `since` is known (no map of an older format
    /// left it 0): what compacting metadata tombstones needs.
    pub fn since_known(&self) -> bool {
        self.map.nodes.iter().all(|n| n.since > 0)
    }

    /// Whether `other` should replace this map: only a higher version does.
    pub fn is_superseded_by(&self, other: &SignedMap) -> bool {
        other.map.version > self.map.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster_key() -> SigningKey {
        SigningKey::from_bytes(&[0x33; 32])
    }

    fn node(i: u8) -> NodeId {
        NodeId::from_verifying_key(&SigningKey::from_bytes(&[i; 32]).verifying_key())
    }

    #[test]
    fn certificates_admit_only_their_node_in_their_cluster_while_valid() {
        let key = cluster_key();
        let cluster = ClusterId::of(&key);
        let cert = Certificate::issue(&key, node(1), SiteId::new("paris").unwrap(), 1_000, 10_000);
        let decoded = Certificate::decode(&cert.encode()).unwrap();
        assert_eq!(decoded, cert);
        decoded.verify(&cluster, &node(1), 5_000).unwrap();
        assert!(matches!(
            decoded.verify(&cluster, &node(2), 5_000),
            Err(MembershipError::WrongNode { .. })
        ));
        assert!(matches!(
            decoded.verify(&cluster, &node(1), 10_000),
            Err(MembershipError::Expired { .. })
        ));
        let other = ClusterId::of(&SigningKey::from_bytes(&[0x44; 32]));
        assert!(matches!(
            decoded.verify(&other, &node(1), 5_000),
            Err(MembershipError::WrongCluster { .. })
        ));
        let mut forged = cert.clone();
        forged.expires_unix_ms = u64::MAX;
        assert_eq!(
            forged.verify(&cluster, &node(1), 5_000),
            Err(MembershipError::BadSignature)
        );
    }

    #[test]
    fn maps_verify_and_higher_versions_win() {
        let key = cluster_key();
        let cluster = ClusterId::of(&key);
        let nodes = (0..6)
            .map(|i| MapNode {
                id: node(i),
                site: SiteId::new(&format!("site-{}", i / 2)).unwrap(),
                capacity_bytes: 1 << 40,
                state: NodeState::Up,
                since: 1,
            })
            .collect();
        let scheme = Scheme::new(4, 2).unwrap();
        let v1 = SignedMap::sign(
            &key,
            ClusterMap { version: 1, nodes },
            scheme,
            Tolerance::default(),
        )
        .unwrap();
        let decoded = SignedMap::decode(&v1.encode(), &cluster).unwrap();
        assert_eq!(decoded, v1);
        let mut v2 = v1.map.clone();
        v2.version = 2;
        v2.nodes[0].state = NodeState::Draining;
        let v2 = SignedMap::sign(&key, v2, scheme, Tolerance::default()).unwrap();
        assert!(v1.is_superseded_by(&v2) && !v2.is_superseded_by(&v1));
        let mut tampered = v2.encode();
        tampered[50] ^= 1;
        assert!(SignedMap::decode(&tampered, &cluster).is_err());
        let stranger = SigningKey::from_bytes(&[0x55; 32]);
        let foreign =
            SignedMap::sign(&stranger, v2.map.clone(), scheme, Tolerance::default()).unwrap();
        assert!(matches!(
            SignedMap::decode(&foreign.encode(), &cluster),
            Err(MembershipError::WrongCluster { .. })
        ));
        for len in 0..v1.encode().len() {
            assert!(SignedMap::decode(&v1.encode()[..len], &cluster).is_err());
        }
    }

    #[test]
    fn since_must_follow_an_absence_and_stay_put_otherwise() {
        let key = cluster_key();
        let scheme = Scheme::new(1, 0).unwrap();
        let map = |version: u64, nodes: &[(u8, u64)]| {
            let nodes = nodes
                .iter()
                .map(|&(i, since)| MapNode {
                    id: node(i),
                    site: SiteId::new("site-0").unwrap(),
                    capacity_bytes: 1 << 40,
                    state: NodeState::Up,
                    since,
                })
                .collect();
            SignedMap::sign(
                &key,
                ClusterMap { version, nodes },
                scheme,
                Tolerance::default(),
            )
            .unwrap()
        };
        let v3 = map(3, &[(0, 1), (1, 2)]);
        // Kept, added after 3, or back after an absence that began after 3.
        assert!(v3.check_since(&map(5, &[(0, 1), (1, 2), (2, 4)])).is_ok());
        assert!(v3.check_since(&map(5, &[(0, 1), (1, 5)])).is_ok());
        // Added with a since this node's map says it was absent at.
        assert!(matches!(
            v3.check_since(&map(5, &[(0, 1), (1, 2), (2, 3)])),
            Err(MembershipError::SinceNotAfterAbsence { held: 3, .. })
        ));
        // A since moved without an absence after 3.
        assert!(matches!(
            v3.check_since(&map(5, &[(0, 2), (1, 2)])),
            Err(MembershipError::SinceRewritten { held_since: 1, .. })
        ));
        // Unknown before: any value up to the version held, never after
        // (an upgrade must not have every node forget its metadata).
        let unknown = map(3, &[(0, 0)]);
        assert!(unknown.check_since(&map(4, &[(0, 2)])).is_ok());
        assert!(matches!(
            unknown.check_since(&map(4, &[(0, 4)])),
            Err(MembershipError::SinceUnknownBefore { held: 3, .. })
        ));
        assert!(!unknown.since_known() && v3.since_known());
        // Out, then back: a return, with a since after the version held.
        let mut out = map(3, &[(0, 1), (1, 2)]);
        out.map.nodes[1].state = NodeState::Out;
        assert!(matches!(
            out.check_since(&map(4, &[(0, 1), (1, 2)])),
            Err(MembershipError::SinceNotAfterAbsence { held: 3, .. })
        ));
        assert!(out.check_since(&map(4, &[(0, 1), (1, 4)])).is_ok());
        // A since after the map's own version is never signed or read.
        assert!(matches!(
            SignedMap::sign(
                &key,
                ClusterMap {
                    version: 2,
                    nodes: map(3, &[(0, 3)]).map.nodes
                },
                scheme,
                Tolerance::default()
            ),
            Err(MembershipError::SinceAfterVersion { since: 3, .. })
        ));
        let mut bytes = v3.body();
        let at = bytes.len() - 8;
        bytes[at..].copy_from_slice(&9u64.to_be_bytes());
        let signature = key.sign(&bytes).to_bytes();
        bytes.extend_from_slice(&signature);
        assert!(SignedMap::decode(&bytes, &ClusterId::of(&key)).is_err());
    }

    #[test]
    fn a_format_1_map_reads_with_the_default_metadata_replicas() {
        let key = SigningKey::from_bytes(&[0x42; 32]);
        let cluster = ClusterId::of(&key);
        let scheme = Scheme::new(1, 0).unwrap();
        let signed = SignedMap::sign_with_replicas(
            &key,
            ClusterMap::default(),
            scheme,
            Tolerance::default(),
            5,
        )
        .unwrap();
        assert_eq!(
            SignedMap::decode(&signed.encode(), &cluster)
                .unwrap()
                .metadata_replicas,
            5
        );
        // Format 1: no replica byte after the tolerance.
        let mut body = signed.body();
        body[4..6].copy_from_slice(&1u16.to_be_bytes());
        body.remove(4 + 2 + 32 + 8 + 3);
        let signature = key.sign(&body).to_bytes();
        body.extend_from_slice(&signature);
        let old = SignedMap::decode(&body, &cluster).unwrap();
        assert_eq!(old.metadata_replicas, DEFAULT_METADATA_REPLICAS);
        assert_eq!(old.map, signed.map);
        assert!(matches!(
            SignedMap::sign_with_replicas(
                &key,
                ClusterMap::default(),
                scheme,
                Tolerance::default(),
                0
            ),
            Err(MembershipError::MetadataReplicas(0))
        ));
    }
}
