//! The replicated metadata's data model (spec/metadata.md, "Tables"):
//! where a row lives (partition, table, sort key), what its value is, how two
//! replicas' values of one row merge, which nodes replicate a partition, and
//! the digests that anti-entropy compares.
//!
//! Everything a replica stores is a join: merging is commutative,
//! associative and idempotent, so replicas that saw the same writes in any
//! order hold byte-identical rows and therefore equal digests.

use std::collections::BTreeSet;

use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::hlc::{Timestamp, put_timestamp, read_timestamp};
use crate::ids::{NodeId, VersionId};
use crate::manifest::{MAX_BUCKET_BYTES, MAX_KEY_BYTES, SignedManifest};
use crate::placement::ClusterMap;
use crate::version::{ObjectVersion, VersionError};

/// Bytes of a sort key: an object key, a separator and a 16-byte id fit.
pub const MAX_SORT_BYTES: usize = MAX_KEY_BYTES + 1 + 16;
/// Bytes of one row value (a manifest of a large object is the largest).
pub const MAX_VALUE_BYTES: usize = 16 << 20;
/// Leaves of a partition's digest.
pub const LEAVES: usize = 256;

/// The unit of replication: the object tables of one bucket, or the
/// cluster-wide tables (the empty name, which no bucket can have).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition(String);

impl Partition {
    pub fn cluster() -> Self {
        Self(String::new())
    }

    /// The caller has validated the bucket name (1 to 63 bytes).
    pub fn bucket(name: &str) -> Self {
        debug_assert!(!name.is_empty() && name.len() <= MAX_BUCKET_BYTES);
        Self(name.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_cluster(&self) -> bool {
        self.0.is_empty()
    }

    /// The id that placement ranks nodes by.
    pub fn placement_key(&self) -> [u8; 32] {
        *blake3::Hasher::new_derive_key("cairn 2026-11 metadata partition v1")
            .update(self.0.as_bytes())
            .finalize()
            .as_bytes()
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.put_bytes16(self.0.as_bytes());
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self(r.str16("partition", MAX_BUCKET_BYTES)?.to_owned()))
    }
}

/// How a table's rows merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Register,
    Version,
    Immutable,
}

/// The metadata tables; the byte is the table's wire and storage code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Cluster partition; sort key: bucket name.
    Buckets = 1,
    /// Bucket partition; sort key: [`version_sort_key`].
    Versions = 2,
    /// Bucket partition; sort key: [`upload_sort_key`].
    Uploads = 3,
    /// Bucket partition; sort key: [`part_sort_key`] (one row per attempt).
    Parts = 4,
    /// Bucket partition; sort key: the ManifestId.
    Manifests = 5,
    /// Cluster partition; sort key: the access key id.
    AccessKeys = 6,
    /// Cluster partition; sort key: the KMS key id.
    KmsKeys = 7,
    /// Bucket partition; sort key: object key ‖ 0 ‖ the release's target
    /// (the orphan collector's work list).
    Releases = 8,
    /// Bucket partition; sort key: [`degraded_sort_key`] (segments stored
    /// with fewer than `k + m` fragments: repair's work list).
    Degraded = 9,
}

impl Table {
    pub const ALL: [Table; 9] = [
        Table::Buckets,
        Table::Versions,
        Table::Uploads,
        Table::Parts,
        Table::Manifests,
        Table::AccessKeys,
        Table::KmsKeys,
        Table::Releases,
        Table::Degraded,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }

    pub fn kind(self) -> ValueKind {
        match self {
            Table::Versions => ValueKind::Version,
            Table::Manifests => ValueKind::Immutable,
            _ => ValueKind::Register,
        }
    }

    /// Whether the table lives in bucket partitions (else in the cluster one).
    pub fn in_bucket_partition(self) -> bool {
        matches!(
            self,
            Table::Versions
                | Table::Uploads
                | Table::Parts
                | Table::Manifests
                | Table::Releases
                | Table::Degraded
        )
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let code = r.u8("table")?;
        Self::from_code(code).ok_or(DecodeError::InvalidValue {
            field: "table",
            value: u64::from(code),
        })
    }
}

/// Sort key of a degraded segment: the object key, a zero byte, the upload
/// id whose holds its fragments carry, then the segment's placement key
/// (which names the segment: its fragment ids hashed).
pub fn degraded_sort_key(key: &str, upload: &[u8; 16], segment: &[u8; 32]) -> Vec<u8> {
    let mut sort = Vec::with_capacity(key.len() + 1 + 16 + 32);
    sort.extend_from_slice(key.as_bytes());
    sort.push(0);
    sort.extend_from_slice(upload);
    sort.extend_from_slice(segment);
    sort
}

/// Sort key of an object version: the key, a zero byte, then the version id
/// with every bit inverted, so that a key's versions list newest first and
/// every version of `a` sorts before any of `a/b`.
pub fn version_sort_key(key: &str, version: &VersionId) -> Vec<u8> {
    let mut sort = Vec::with_capacity(key.len() + 17);
    sort.extend_from_slice(key.as_bytes());
    sort.push(0);
    sort.extend(version.0.iter().map(|b| !b));
    sort
}

/// The inverse of [`version_sort_key`] and [`upload_sort_key`]: the object
/// key and the 16-byte id (as stored: inverted for versions).
pub fn split_key_sort(sort: &[u8]) -> Option<(&str, [u8; 16])> {
    let split = sort.len().checked_sub(17)?;
    if sort[split] != 0 {
        return None;
    }
    let key = std::str::from_utf8(&sort[..split]).ok()?;
    let mut id = [0u8; 16];
    id.copy_from_slice(&sort[split + 1..]);
    Some((key, id))
}

/// The version id stored in a version sort key.
pub fn version_of_sort_key(sort: &[u8]) -> Option<(&str, VersionId)> {
    let (key, inverted) = split_key_sort(sort)?;
    Some((key, VersionId(inverted.map(|b| !b))))
}

/// Sort key of a multipart upload: the key, a zero byte, the upload id.
pub fn upload_sort_key(key: &str, upload: &[u8; 16]) -> Vec<u8> {
    let mut sort = Vec::with_capacity(key.len() + 17);
    sort.extend_from_slice(key.as_bytes());
    sort.push(0);
    sort.extend_from_slice(upload);
    sort
}

/// Sort key of an uploaded part: the upload id then the part number.
pub fn part_sort_key(upload: &[u8; 16], part_number: u16, attempt: &[u8; 16]) -> Vec<u8> {
    let mut sort = upload.to_vec();
    sort.extend_from_slice(&part_number.to_be_bytes());
    sort.extend_from_slice(attempt);
    sort
}

/// The start of a part number's rows in [`part_sort_key`] order.
pub fn part_number_start(upload: &[u8; 16], part_number: u16) -> Vec<u8> {
    let mut sort = upload.to_vec();
    sort.extend_from_slice(&part_number.to_be_bytes());
    sort
}

/// The part number in a part row's sort key: bytes 16 and 17, in rows of
/// one attempt each and in the rows of one part number each that came
/// before them.
pub fn part_number_of(sort: &[u8]) -> Option<u16> {
    match sort.get(16..18) {
        Some(&[high, low]) if sort.len() == 18 || sort.len() == 34 => {
            Some(u16::from_be_bytes([high, low]))
        }
        _ => None,
    }
}

/// The smallest byte string above every string that starts with `prefix`,
/// or `None` when no string is (the prefix is all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Where a row lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowKey {
    pub partition: Partition,
    pub table: Table,
    pub sort: Vec<u8>,
}

impl RowKey {
    pub fn new(partition: Partition, table: Table, sort: Vec<u8>) -> Self {
        Self {
            partition,
            table,
            sort,
        }
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        self.partition.put(out);
        out.put_u8(self.table.code());
        out.put_bytes16(&self.sort);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let partition = Partition::read(r)?;
        let table = Table::read(r)?;
        let sort = r.bytes16("sort key", MAX_SORT_BYTES)?.to_vec();
        Ok(Self {
            partition,
            table,
            sort,
        })
    }
}

/// A last-writer-wins register; `None` is a deletion (a tombstone that
/// still takes part in the merge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub at: Timestamp,
    pub value: Option<Vec<u8>>,
}

/// The value of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowValue {
    Register(Register),
    Version(Box<ObjectVersion>),
    /// Content-addressed bytes (manifests): every replica holds the same.
    Immutable(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetaError {
    #[error("a {found:?} value cannot be stored in table {table:?}")]
    WrongKind { table: Table, found: ValueKind },
    #[error("{table:?} rows belong in {expected} partitions")]
    WrongPartition {
        table: Table,
        expected: &'static str,
    },
    #[error("the row's value does not match its sort key: {0}")]
    KeyMismatch(&'static str),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("malformed metadata row: {0}")]
    Decode(#[from] DecodeError),
    #[error("not a manifest its writer signed: {0}")]
    BadManifest(String),
    #[error(
        "the row is stamped {ahead_ms} ms ahead of this replica's clock, beyond the {max_ms} ms tolerated: check NTP on the writing node"
    )]
    StampAhead { ahead_ms: u64, max_ms: u64 },
}

impl RowValue {
    pub fn kind(&self) -> ValueKind {
        match self {
            RowValue::Register(_) => ValueKind::Register,
            RowValue::Version(_) => ValueKind::Version,
            RowValue::Immutable(_) => ValueKind::Immutable,
        }
    }

    /// Checks that this value may live at `key`: the table's kind and
    /// partition, and for versions and manifests that the content names
    /// the same row.
    pub fn check_fits(&self, key: &RowKey) -> Result<(), MetaError> {
        if self.kind() != key.table.kind() {
            return Err(MetaError::WrongKind {
                table: key.table,
                found: self.kind(),
            });
        }
        if key.table.in_bucket_partition() == key.partition.is_cluster() {
            return Err(MetaError::WrongPartition {
                table: key.table,
                expected: if key.table.in_bucket_partition() {
                    "bucket"
                } else {
                    "the cluster"
                },
            });
        }
        match self {
            RowValue::Version(v) => {
                if v.bucket != key.partition.as_str()
                    || version_sort_key(&v.key, &v.version) != key.sort
                {
                    return Err(MetaError::KeyMismatch("bucket, key or version"));
                }
            }
            RowValue::Immutable(signed) => {
                // A signed manifest: its id names the body, and its writer
                // signed it. Without the signature check a body with any
                // signature would merge as the same row, and the smaller
                // bytes win the merge: a forged one would replace the real
                // one on every replica.
                let manifest = SignedManifest::decode(signed)
                    .map_err(|e| MetaError::BadManifest(e.to_string()))?;
                if manifest.id.as_bytes().as_slice() != key.sort.as_slice() {
                    return Err(MetaError::KeyMismatch("manifest id"));
                }
                if manifest.manifest.bucket != key.partition.as_str() {
                    return Err(MetaError::KeyMismatch("manifest bucket"));
                }
            }
            RowValue::Register(_) => {}
        }
        Ok(())
    }

    /// The latest last-writer-wins stamp the value carries: what decides
    /// merges against it.
    pub fn latest_stamp(&self) -> Option<Timestamp> {
        match self {
            RowValue::Register(register) => Some(register.at),
            RowValue::Version(version) => [
                Some(version.created),
                Some(version.legal_hold.at),
                Some(version.retention.at),
                version.purged,
            ]
            .into_iter()
            .flatten()
            .max(),
            RowValue::Immutable(_) => None,
        }
    }

    /// Refuses a value stamped more than `max_ms` ahead of `now_unix_ms`:
    /// last writer wins, so a row stamped far in the future would win
    /// every later write of its row (an access key deleted would keep
    /// authenticating until then).
    pub fn check_stamp(&self, now_unix_ms: u64, max_ms: u64) -> Result<(), MetaError> {
        let Some(stamp) = self.latest_stamp() else {
            return Ok(());
        };
        let ahead_ms = stamp.hlc.unix_ms().saturating_sub(now_unix_ms);
        if ahead_ms > max_ms {
            return Err(MetaError::StampAhead { ahead_ms, max_ms });
        }
        Ok(())
    }

    /// The join of two replicas' values of the same row.
    pub fn merge(&self, other: &Self) -> Result<Self, MetaError> {
        match (self, other) {
            (RowValue::Register(a), RowValue::Register(b)) => Ok(RowValue::Register(
                if (&b.at, &b.value) > (&a.at, &a.value) {
                    b.clone()
                } else {
                    a.clone()
                },
            )),
            (RowValue::Version(a), RowValue::Version(b)) => {
                Ok(RowValue::Version(Box::new(a.merge(b)?)))
            }
            (RowValue::Immutable(a), RowValue::Immutable(b)) => {
                Ok(RowValue::Immutable(a.min(b).clone()))
            }
            (a, b) => Err(MetaError::WrongKind {
                table: match a {
                    RowValue::Version(_) => Table::Versions,
                    RowValue::Immutable(_) => Table::Manifests,
                    RowValue::Register(_) => Table::Buckets,
                },
                found: b.kind(),
            }),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.put(&mut out);
        out
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        match self {
            RowValue::Register(register) => {
                out.put_u8(1);
                put_timestamp(out, &register.at);
                match &register.value {
                    None => out.put_u8(0),
                    Some(bytes) => {
                        out.put_u8(1);
                        out.put_bytes32(bytes);
                    }
                }
            }
            RowValue::Version(version) => {
                out.put_u8(2);
                out.put_bytes32(&version.encode());
            }
            RowValue::Immutable(bytes) => {
                out.put_u8(3);
                out.put_bytes32(bytes);
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MetaError> {
        let mut r = Reader::new(bytes);
        let value = Self::read(&mut r)?;
        r.finish("row value")?;
        Ok(value)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8("value kind")? {
            1 => RowValue::Register(Register {
                at: read_timestamp(r)?,
                value: match r.bool("register present")? {
                    false => None,
                    true => Some(r.bytes32("register value", MAX_VALUE_BYTES)?.to_vec()),
                },
            }),
            2 => RowValue::Version(Box::new(
                ObjectVersion::decode(r.bytes32("version entry", MAX_VALUE_BYTES)?).map_err(
                    |e| match e {
                        VersionError::Decode(d) => d,
                        VersionError::UnsupportedFormat(format) => DecodeError::InvalidValue {
                            field: "version entry format",
                            value: u64::from(format),
                        },
                        VersionError::DifferentVersions
                        | VersionError::HeadersTooLarge { .. }
                        | VersionError::BadHeaderName(_) => DecodeError::InvalidValue {
                            field: "version entry",
                            value: 0,
                        },
                    },
                )?,
            )),
            3 => RowValue::Immutable(r.bytes32("immutable value", MAX_VALUE_BYTES)?.to_vec()),
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "value kind",
                    value: u64::from(other),
                });
            }
        })
    }
}

/// Which of a partition's digest leaves a row counts in.
pub fn leaf_of(table: Table, sort: &[u8]) -> u8 {
    blake3::Hasher::new_derive_key("cairn 2026-11 metadata leaf v1")
        .update(&[table.code()])
        .update(sort)
        .finalize()
        .as_bytes()[0]
}

/// A row's contribution to its leaf: a hash of its table, sort key and
/// encoded value.
pub fn row_digest(table: Table, sort: &[u8], encoded_value: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("cairn 2026-11 metadata row v1");
    hasher.update(&[table.code()]);
    hasher.update(&(sort.len() as u16).to_be_bytes());
    hasher.update(sort);
    hasher.update(encoded_value);
    *hasher.finalize().as_bytes()
}

/// XOR of two digests: a leaf is the XOR of its rows' digests, so a replica
/// updates it in place when a row changes (remove the old, add the new).
pub fn xor_into(leaf: &mut [u8; 32], row: &[u8; 32]) {
    for (a, b) in leaf.iter_mut().zip(row) {
        *a ^= b;
    }
}

/// A partition's digest: 256 leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDigest {
    pub leaves: Box<[[u8; 32]; LEAVES]>,
}

impl Default for PartitionDigest {
    fn default() -> Self {
        Self {
            leaves: Box::new([[0; 32]; LEAVES]),
        }
    }
}

impl PartitionDigest {
    /// One hash for the whole partition, compared first.
    pub fn root(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key("cairn 2026-11 metadata root v1");
        for leaf in self.leaves.iter() {
            hasher.update(leaf);
        }
        *hasher.finalize().as_bytes()
    }

    /// The leaves where `other` differs, as a 256-bit set.
    pub fn differing(&self, other: &Self) -> LeafSet {
        let mut set = LeafSet::default();
        for (index, (a, b)) in self.leaves.iter().zip(other.leaves.iter()).enumerate() {
            if a != b {
                set.insert(index as u8);
            }
        }
        set
    }
}

/// A set of leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeafSet(pub [u8; 32]);

impl LeafSet {
    pub fn insert(&mut self, leaf: u8) {
        self.0[usize::from(leaf / 8)] |= 1 << (leaf % 8);
    }

    pub fn contains(&self, leaf: u8) -> bool {
        self.0[usize::from(leaf / 8)] & (1 << (leaf % 8)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }
}

/// The nodes that replicate `partition`: the best-ranked placed node of each
/// site in turn (rendezvous hashing, unweighted: metadata load does not
/// follow disk capacity), so that `replicas` copies land in distinct sites
/// where the map has enough; then the next best nodes of any site.
pub fn replica_set(map: &ClusterMap, partition: &Partition, replicas: usize) -> Vec<NodeId> {
    let key = partition.placement_key();
    let mut ranked: Vec<([u8; 32], &NodeId, &str)> = map
        .nodes
        .iter()
        .filter(|n| n.state.is_placed())
        .map(|n| {
            let score = *blake3::Hasher::new_derive_key("cairn 2026-11 metadata replicas v1")
                .update(&key)
                .update(n.id.as_bytes())
                .finalize()
                .as_bytes();
            (score, &n.id, n.site.as_str())
        })
        .collect();
    ranked.sort();
    let mut chosen: Vec<NodeId> = Vec::with_capacity(replicas);
    let mut sites_used = BTreeSet::new();
    for (_, id, site) in &ranked {
        if chosen.len() < replicas && sites_used.insert(*site) {
            chosen.push(**id);
        }
    }
    for (_, id, _) in &ranked {
        if chosen.len() < replicas && !chosen.contains(id) {
            chosen.push(**id);
        }
    }
    chosen
}

/// A name for a set of replicas, whatever their order.
pub fn replica_set_id(nodes: &[NodeId]) -> [u8; 32] {
    let mut sorted = nodes.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut hasher = blake3::Hasher::new_derive_key("cairn 2026-11 metadata replica set v1");
    for node in &sorted {
        hasher.update(node.as_bytes());
    }
    *hasher.finalize().as_bytes()
}

/// A majority of `replicas`.
pub fn quorum(replicas: usize) -> usize {
    replicas / 2 + 1
}

/// The replica sets a request needs a majority of: the current map's and,
/// while a partition moves, the previous map's as well (joint majorities:
/// whatever either configuration acknowledged is seen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumSets {
    sets: Vec<Vec<NodeId>>,
}

impl QuorumSets {
    /// `previous` is dropped when it holds the same nodes as `current`.
    pub fn new(current: Vec<NodeId>, previous: Option<Vec<NodeId>>) -> Self {
        let same = |a: &[NodeId], b: &[NodeId]| {
            a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
        };
        let mut sets = vec![current];
        if let Some(previous) = previous.filter(|p| !p.is_empty() && !same(p, &sets[0])) {
            sets.push(previous);
        }
        Self { sets }
    }

    pub fn current(&self) -> &[NodeId] {
        &self.sets[0]
    }

    /// The previous map's set, while the partition moves.
    pub fn previous(&self) -> Option<&[NodeId]> {
        self.sets.get(1).map(Vec::as_slice)
    }

    /// Every node of every set, each once, the current set first.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = Vec::new();
        for node in self.sets.iter().flatten() {
            if !nodes.contains(node) {
                nodes.push(*node);
            }
        }
        nodes
    }

    /// Whether the nodes in `granted` hold a majority of every set.
    pub fn reached(&self, granted: &BTreeSet<NodeId>) -> bool {
        self.sets
            .iter()
            .all(|set| set.iter().filter(|n| granted.contains(n)).count() >= quorum(set.len()))
    }

    /// Whether some set can no longer reach a majority once `failed` failed.
    pub fn lost(&self, failed: &BTreeSet<NodeId>) -> bool {
        self.sets
            .iter()
            .any(|set| set.iter().filter(|n| !failed.contains(n)).count() < quorum(set.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::ids::ManifestId;
    use crate::ids::SiteId;
    use crate::placement::{MapNode, NodeState};
    use crate::version::{Lww, Retention, VersionBody};

    fn at(ms: u64, node: u8) -> Timestamp {
        Timestamp {
            hlc: Hlc::new(ms, 0),
            node: NodeId([node; 32]),
        }
    }

    #[test]
    fn versions_sort_by_key_then_newest_first() {
        let old = VersionId::new(1, [0; 10]);
        let new = VersionId::new(2, [0; 10]);
        let mut keys = [
            version_sort_key("a/b", &old),
            version_sort_key("a", &old),
            version_sort_key("a", &new),
            version_sort_key("a!", &new),
        ];
        keys.sort();
        assert_eq!(version_of_sort_key(&keys[0]), Some(("a", new)));
        assert_eq!(version_of_sort_key(&keys[1]), Some(("a", old)));
        assert_eq!(version_of_sort_key(&keys[2]).unwrap().0, "a!");
        assert_eq!(version_of_sort_key(&keys[3]).unwrap().0, "a/b");
    }

    #[test]
    fn prefix_end_is_the_first_string_past_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }

    #[test]
    fn registers_merge_to_the_latest_write_whatever_the_order() {
        let a = RowValue::Register(Register {
            at: at(5, 1),
            value: Some(b"a".to_vec()),
        });
        let deleted = RowValue::Register(Register {
            at: at(6, 2),
            value: None,
        });
        assert_eq!(a.merge(&deleted).unwrap(), deleted);
        assert_eq!(deleted.merge(&a).unwrap(), deleted);
        assert_eq!(a.merge(&a).unwrap(), a);
    }

    #[test]
    fn a_value_must_fit_its_row() {
        let version = ObjectVersion {
            bucket: "photos".into(),
            key: "cat.jpg".into(),
            version: VersionId::new(7, [1; 10]),
            created: at(7, 1),
            seq: 1,
            null: true,
            body: VersionBody::DeleteMarker,
            retention: Retention::default(),
            legal_hold: Lww {
                value: false,
                at: at(7, 1),
            },
            purged: None,
        };
        let value = RowValue::Version(Box::new(version.clone()));
        let right = RowKey::new(
            Partition::bucket("photos"),
            Table::Versions,
            version_sort_key("cat.jpg", &version.version),
        );
        assert_eq!(value.check_fits(&right), Ok(()));
        let mut elsewhere = right.clone();
        elsewhere.partition = Partition::bucket("other");
        assert!(matches!(
            value.check_fits(&elsewhere),
            Err(MetaError::KeyMismatch(_))
        ));
        let mut cluster = right.clone();
        cluster.partition = Partition::cluster();
        assert!(matches!(
            value.check_fits(&cluster),
            Err(MetaError::WrongPartition { .. })
        ));
        let manifest = RowValue::Immutable(b"not the named manifest".to_vec());
        let named = RowKey::new(
            Partition::bucket("photos"),
            Table::Manifests,
            ManifestId([3; 32]).as_bytes().to_vec(),
        );
        assert!(matches!(
            manifest.check_fits(&named),
            Err(MetaError::BadManifest(_))
        ));
        let mut in_versions = named.clone();
        in_versions.table = Table::Versions;
        assert!(matches!(
            manifest.check_fits(&in_versions),
            Err(MetaError::WrongKind { .. })
        ));
    }

    #[test]
    fn a_manifest_row_holds_its_writers_signed_manifest_only() {
        use crate::manifest::SIGNATURE_BYTES;
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let signed = crate::manifest::tests::sample(&key).sign(&key).unwrap();
        let row = RowKey::new(
            Partition::bucket(&signed.manifest.bucket),
            Table::Manifests,
            signed.id.as_bytes().to_vec(),
        );
        let genuine = RowValue::Immutable(signed.encoded.clone());
        assert_eq!(genuine.check_fits(&row), Ok(()));
        // The same body (so the same id) with a signature nobody made: it
        // would sort first and win every merge.
        let mut forged = signed.encoded.clone();
        let at = forged.len() - SIGNATURE_BYTES;
        forged[at..].fill(0);
        assert!(forged < signed.encoded);
        assert!(matches!(
            RowValue::Immutable(forged).check_fits(&row),
            Err(MetaError::BadManifest(_))
        ));
        let mut elsewhere = row.clone();
        elsewhere.partition = Partition::bucket("other");
        assert_eq!(
            genuine.check_fits(&elsewhere),
            Err(MetaError::KeyMismatch("manifest bucket"))
        );
    }

    #[test]
    fn values_stamped_far_ahead_are_refused() {
        let ahead = |ms: u64| {
            RowValue::Register(Register {
                at: at(ms, 1),
                value: None,
            })
        };
        assert_eq!(
            ahead(1_000_000 + 60_000).check_stamp(1_000_000, 60_000),
            Ok(())
        );
        assert_eq!(
            ahead(1_000_000 + 60_001).check_stamp(1_000_000, 60_000),
            Err(MetaError::StampAhead {
                ahead_ms: 60_001,
                max_ms: 60_000
            })
        );
        assert_eq!(ahead(5).check_stamp(1_000_000, 60_000), Ok(()));
        // A version row whose retention a decision stamped far ahead: it
        // would win every later governance decision.
        let mut version = crate::version::tests::entry();
        version.retention.at = at(u64::MAX >> 20, 1);
        assert!(matches!(
            RowValue::Version(Box::new(version)).check_stamp(1_000_000, 60_000),
            Err(MetaError::StampAhead { .. })
        ));
    }

    #[test]
    fn values_round_trip_and_every_truncation_fails() {
        for value in [
            RowValue::Register(Register {
                at: at(1, 1),
                value: Some(vec![1, 2, 3]),
            }),
            RowValue::Register(Register {
                at: at(1, 1),
                value: None,
            }),
            RowValue::Immutable(vec![9; 40]),
        ] {
            let bytes = value.encode();
            assert_eq!(RowValue::decode(&bytes).unwrap(), value);
            for len in 0..bytes.len() {
                assert!(RowValue::decode(&bytes[..len]).is_err());
            }
        }
    }

    #[test]
    fn replicas_land_in_distinct_sites_when_there_are_enough() {
        let node = |i: u8, site: &str| MapNode {
            id: NodeId([i; 32]),
            site: SiteId::new(site).unwrap(),
            capacity_bytes: 1,
            state: NodeState::Up,
            since: 1,
        };
        let map = ClusterMap {
            version: 1,
            nodes: (0..9)
                .map(|i| node(i, ["a", "b", "c"][usize::from(i % 3)]))
                .collect(),
        };
        for bucket in ["b1", "b2", "photos", "logs"] {
            let set = replica_set(&map, &Partition::bucket(bucket), 3);
            let sites: BTreeSet<u8> = set.iter().map(|id| id.0[0] % 3).collect();
            assert_eq!((set.len(), sites.len()), (3, 3), "{bucket}");
            assert_eq!(set, replica_set(&map, &Partition::bucket(bucket), 3));
        }
        let two_sites = ClusterMap {
            version: 1,
            nodes: vec![node(0, "a"), node(1, "a"), node(2, "b")],
        };
        let set = replica_set(&two_sites, &Partition::cluster(), 3);
        assert_eq!(set.len(), 3);
        assert_eq!(replica_set(&two_sites, &Partition::cluster(), 5).len(), 3);
    }

    #[test]
    fn joint_sets_need_a_majority_of_each() {
        let n = |i: u8| NodeId([i; 32]);
        let sets = QuorumSets::new(vec![n(1), n(2), n(3)], Some(vec![n(3), n(4), n(5)]));
        assert_eq!(sets.nodes(), vec![n(1), n(2), n(3), n(4), n(5)]);
        let granted = |ids: &[u8]| ids.iter().map(|&i| n(i)).collect::<BTreeSet<_>>();
        assert!(!sets.reached(&granted(&[1, 2])));
        assert!(sets.reached(&granted(&[1, 3, 4])));
        assert!(!sets.lost(&granted(&[1, 4])));
        assert!(sets.lost(&granted(&[4, 5])));
        let unmoved = QuorumSets::new(vec![n(1), n(2), n(3)], Some(vec![n(3), n(2), n(1)]));
        assert_eq!(unmoved.previous(), None);
    }

    #[test]
    fn leaf_sets_hold_every_leaf() {
        let mut set = LeafSet::default();
        assert!(set.is_empty());
        for leaf in [0u8, 7, 8, 255] {
            set.insert(leaf);
            assert!(set.contains(leaf));
        }
        assert!(!set.contains(1));
    }
}
