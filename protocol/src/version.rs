//! The object-version entry of the replicated metadata and its CRDT merge
//! (spec/metadata.md).
//!
//! Every field is a join-semilattice, so replicas that saw the same writes
//! in any order, any number of times, hold the same entry: the version's
//! content is immutable, a compliance retention only grows while any other
//! follows the lock guard's last decision, legal hold is last-writer-wins,
//! and a permanent delete is a tombstone that wins.
//! Deciding whether a delete may be applied through a lock is not a merge
//! question; the metadata layer decides it before writing the tombstone.

use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::hlc::{Timestamp, put_timestamp, read_timestamp};
use crate::ids::{ManifestId, VersionId};
use crate::manifest::{MAX_BUCKET_BYTES, MAX_ETAG_BYTES, MAX_KEY_BYTES};

/// Format 4 added the retention's stamp and is written for every version
/// whose retention a lock-guard decision set (a stamp other than zero);
/// format 3 added flags and is written for versions with an id of their
/// own; format 2 added the head sequence (format 1 entries read as sequence
/// 0). Entries of formats 1 and 2 are null versions.
const FORMAT_WITH_RETENTION_STAMP: u8 = 4;
const FORMAT_WITH_FLAGS: u8 = 3;
const FORMAT_VERSION: u8 = 2;
const FORMAT_WITHOUT_SEQ: u8 = 1;
/// Flag of format 3: the version has an id of its own (written while the
/// bucket's versioning was Enabled). Other bits are reserved, zero.
const FLAG_OWN_ID: u8 = 1;

/// Bytes of all stored header names and values of one version together.
pub const MAX_STORED_HEADER_BYTES: usize = 8 << 10;

/// The headers an object answers GET and HEAD with, fixed when it is
/// written (content type, user metadata, checksums, encryption): lower-case
/// names, sorted, unique, so that one set has one encoding.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredHeaders(Vec<(String, String)>);

impl StoredHeaders {
    /// Sorts `headers` by name; refuses upper-case or repeated names and
    /// sets over [`MAX_STORED_HEADER_BYTES`].
    pub fn new(mut headers: Vec<(String, String)>) -> Result<Self, VersionError> {
        headers.sort();
        let total: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        if total > MAX_STORED_HEADER_BYTES {
            return Err(VersionError::HeadersTooLarge { bytes: total });
        }
        for (index, (name, _)) in headers.iter().enumerate() {
            if name.is_empty() || name.bytes().any(|c| c.is_ascii_uppercase()) {
                return Err(VersionError::BadHeaderName(name.clone()));
            }
            if index > 0 && headers[index - 1].0 == *name {
                return Err(VersionError::BadHeaderName(name.clone()));
            }
        }
        Ok(Self(headers))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.put_u32(self.0.len() as u32);
        for (name, value) in &self.0 {
            out.put_bytes16(name.as_bytes());
            out.put_bytes16(value.as_bytes());
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, VersionError> {
        // A header takes at least 5 bytes (two lengths and a name byte).
        let count = r.count("stored headers", MAX_STORED_HEADER_BYTES, 5)?;
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let name = r.str16("header name", MAX_STORED_HEADER_BYTES)?.to_owned();
            let value = r.str16("header value", MAX_STORED_HEADER_BYTES)?.to_owned();
            headers.push((name, value));
        }
        let canonical = Self::new(headers.clone())?;
        if canonical.0 != headers {
            return Err(VersionError::BadHeaderName("(not in order)".into()));
        }
        Ok(canonical)
    }
}

/// What a version is: data, or a delete marker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum VersionBody {
    DeleteMarker,
    Data {
        manifest: ManifestId,
        size_bytes: u64,
        etag: String,
        headers: StoredHeaders,
    },
}

/// Object Lock retention; the order is the order of strength.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum RetentionMode {
    #[default]
    None,
    Governance,
    Compliance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub mode: RetentionMode,
    pub retain_until_unix_ms: u64,
    /// The stamp of the lock-guard decision that set it; zero for the
    /// retention a version was written with.
    pub at: Timestamp,
}

impl Default for Retention {
    fn default() -> Self {
        Self::new(RetentionMode::None, 0)
    }
}

impl Retention {
    /// A retention as a version is written with (no decision's stamp).
    pub fn new(mode: RetentionMode, retain_until_unix_ms: u64) -> Self {
        Self {
            mode,
            retain_until_unix_ms,
            at: Timestamp::ZERO,
        }
    }

    /// The merge. A compliance retention is never shortened or weakened:
    /// if either side has one, the result is compliance until the later
    /// of their compliance dates. Otherwise the later decision wins, so
    /// that a governance retention shortened or removed through the bypass
    /// stays so (equal stamps fall back to the stronger value).
    pub fn join(self, other: Self) -> Self {
        let compliance =
            |r: &Self| (r.mode == RetentionMode::Compliance).then_some(r.retain_until_unix_ms);
        let at = self.at.max(other.at);
        match compliance(&self).max(compliance(&other)) {
            Some(until) => Self {
                mode: RetentionMode::Compliance,
                retain_until_unix_ms: until,
                at,
            },
            None => {
                let order = |r: &Self| (r.at, r.mode, r.retain_until_unix_ms);
                if order(&other) > order(&self) {
                    other
                } else {
                    self
                }
            }
        }
    }
}

/// A last-writer-wins register; equal timestamps fall back to the value's
/// order so that the merge stays commutative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lww<T> {
    pub value: T,
    pub at: Timestamp,
}

impl<T: Ord + Copy> Lww<T> {
    /// The merge: the later write.
    pub fn join(self, other: Self) -> Self {
        if (other.at, other.value) > (self.at, self.value) {
            other
        } else {
            self
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    pub bucket: String,
    pub key: String,
    pub version: VersionId,
    /// When the version was committed; immutable.
    pub created: Timestamp,
    /// The version's place in its key's head order (spec/gateway.md,
    /// "Heads"): one more than the head it replaced, decided by the head
    /// register's compare-and-set. Of a key's versions, the one with the
    /// highest sequence is the one its head names; immutable.
    pub seq: u64,
    /// S3's null version: written while the bucket's versioning was not
    /// Enabled (never enabled, or suspended). A client names it `null`,
    /// and the next write of a null version replaces it. Immutable.
    pub null: bool,
    pub body: VersionBody,
    pub retention: Retention,
    pub legal_hold: Lww<bool>,
    /// Set when the version is permanently deleted.
    pub purged: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VersionError {
    #[error("cannot merge entries of different versions")]
    DifferentVersions,
    #[error("object version entry format {0} is not supported")]
    UnsupportedFormat(u8),
    #[error("stored headers take {bytes} bytes, more than {max}", max = MAX_STORED_HEADER_BYTES)]
    HeadersTooLarge { bytes: usize },
    #[error("stored header name {0:?} is empty, not lower-case or repeated")]
    BadHeaderName(String),
    #[error("malformed object version entry: {0}")]
    Decode(#[from] DecodeError),
}

impl ObjectVersion {
    /// Whether a lock forbids deleting or overwriting this version at `now`.
    pub fn is_locked(&self, now_unix_ms: u64) -> bool {
        self.legal_hold.value
            || (self.retention.mode != RetentionMode::None
                && self.retention.retain_until_unix_ms > now_unix_ms)
    }

    /// Whether a lock nobody may pass holds the version at `now`: a legal
    /// hold, or a compliance retention.
    pub fn is_locked_for_everyone(&self, now_unix_ms: u64) -> bool {
        self.legal_hold.value
            || (self.retention.mode == RetentionMode::Compliance
                && self.retention.retain_until_unix_ms > now_unix_ms)
    }

    /// Whether the version still exists at `now`: not purged, or purged
    /// while a lock nobody may pass holds (a permanent delete takes effect
    /// only where no such lock holds, whatever order the replicas learnt
    /// of them in). A governance retention does not keep a purged version:
    /// its guard let the purge through only with the bypass.
    pub fn exists(&self, now_unix_ms: u64) -> bool {
        self.purged.is_none() || self.is_locked_for_everyone(now_unix_ms)
    }

    /// The CRDT join of two replicas' views of one version.
    pub fn merge(&self, other: &Self) -> Result<Self, VersionError> {
        if (&self.bucket, &self.key, self.version) != (&other.bucket, &other.key, other.version) {
            return Err(VersionError::DifferentVersions);
        }
        // Content is write-once; if two replicas ever disagree, both pick the
        // same one so that they still converge.
        let (created, seq, null, body) = (self.created, self.seq, self.null, &self.body).min((
            other.created,
            other.seq,
            other.null,
            &other.body,
        ));
        Ok(Self {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            version: self.version,
            created,
            seq,
            null,
            body: body.clone(),
            retention: self.retention.join(other.retention),
            legal_hold: self.legal_hold.join(other.legal_hold),
            purged: self.purged.max(other.purged),
        })
    }

    /// The canonical encoding, so that one entry has one byte string: a
    /// version with an id of its own in format 3 (sequence and flags); a
    /// null version in format 2 with its sequence, or format 1 when the
    /// sequence is 0 (an entry that no head decided).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(200 + self.key.len());
        let format = match (self.retention.at != Timestamp::ZERO, self.null, self.seq) {
            (true, _, _) => FORMAT_WITH_RETENTION_STAMP,
            (false, false, _) => FORMAT_WITH_FLAGS,
            (false, true, 0) => FORMAT_WITHOUT_SEQ,
            (false, true, _) => FORMAT_VERSION,
        };
        out.put_u8(format);
        out.put_bytes16(self.bucket.as_bytes());
        out.put_bytes16(self.key.as_bytes());
        out.extend_from_slice(&self.version.0);
        put_timestamp(&mut out, &self.created);
        if format != FORMAT_WITHOUT_SEQ {
            out.put_u64(self.seq);
        }
        if format >= FORMAT_WITH_FLAGS {
            out.put_u8(if self.null { 0 } else { FLAG_OWN_ID });
        }
        match &self.body {
            VersionBody::DeleteMarker => out.put_u8(0),
            VersionBody::Data {
                manifest,
                size_bytes,
                etag,
                headers,
            } => {
                out.put_u8(1);
                out.extend_from_slice(manifest.as_bytes());
                out.put_u64(*size_bytes);
                out.put_bytes16(etag.as_bytes());
                headers.put(&mut out);
            }
        }
        out.put_u8(self.retention.mode as u8);
        out.put_u64(self.retention.retain_until_unix_ms);
        if format == FORMAT_WITH_RETENTION_STAMP {
            put_timestamp(&mut out, &self.retention.at);
        }
        out.put_bool(self.legal_hold.value);
        put_timestamp(&mut out, &self.legal_hold.at);
        match &self.purged {
            None => out.put_u8(0),
            Some(at) => {
                out.put_u8(1);
                put_timestamp(&mut out, at);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, VersionError> {
        let mut r = Reader::new(bytes);
        let format = r.u8("format")?;
        if ![
            FORMAT_WITH_RETENTION_STAMP,
            FORMAT_WITH_FLAGS,
            FORMAT_VERSION,
            FORMAT_WITHOUT_SEQ,
        ]
        .contains(&format)
        {
            return Err(VersionError::UnsupportedFormat(format));
        }
        let bucket = r.str16("bucket", MAX_BUCKET_BYTES)?.to_owned();
        let key = r.str16("key", MAX_KEY_BYTES)?.to_owned();
        let version = VersionId(r.array("version")?);
        let created = read_timestamp(&mut r)?;
        let seq = match format {
            FORMAT_WITHOUT_SEQ => 0,
            FORMAT_WITH_FLAGS | FORMAT_WITH_RETENTION_STAMP => r.u64("head sequence")?,
            _ => match r.u64("head sequence")? {
                // Sequence 0 is written in format 1 only (canonical).
                0 => {
                    return Err(DecodeError::InvalidValue {
                        field: "head sequence",
                        value: 0,
                    }
                    .into());
                }
                seq => seq,
            },
        };
        let null = match format {
            // Null versions are written in formats 1 and 2 only (canonical).
            FORMAT_WITH_FLAGS => match r.u8("flags")? {
                FLAG_OWN_ID => false,
                other => {
                    return Err(DecodeError::InvalidValue {
                        field: "flags",
                        value: u64::from(other),
                    }
                    .into());
                }
            },
            FORMAT_WITH_RETENTION_STAMP => match r.u8("flags")? {
                0 => true,
                FLAG_OWN_ID => false,
                other => {
                    return Err(DecodeError::InvalidValue {
                        field: "flags",
                        value: u64::from(other),
                    }
                    .into());
                }
            },
            _ => true,
        };
        let body = match r.u8("body kind")? {
            0 => VersionBody::DeleteMarker,
            1 => VersionBody::Data {
                manifest: ManifestId(r.array("manifest id")?),
                size_bytes: r.u64("size")?,
                etag: r.str16("etag", MAX_ETAG_BYTES)?.to_owned(),
                headers: StoredHeaders::read(&mut r)?,
            },
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "body kind",
                    value: u64::from(other),
                }
                .into());
            }
        };
        let mode = match r.u8("retention mode")? {
            0 => RetentionMode::None,
            1 => RetentionMode::Governance,
            2 => RetentionMode::Compliance,
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "retention mode",
                    value: u64::from(other),
                }
                .into());
            }
        };
        let retain_until_unix_ms = r.u64("retain until")?;
        let retention_at = match format {
            FORMAT_WITH_RETENTION_STAMP => match read_timestamp(&mut r)? {
                // Written in format 4 only with a stamp (canonical).
                Timestamp::ZERO => {
                    return Err(DecodeError::InvalidValue {
                        field: "retention stamp",
                        value: 0,
                    }
                    .into());
                }
                at => at,
            },
            _ => Timestamp::ZERO,
        };
        let legal_hold = Lww {
            value: r.bool("legal hold")?,
            at: read_timestamp(&mut r)?,
        };
        let purged = match r.bool("purged")? {
            false => None,
            true => Some(read_timestamp(&mut r)?),
        };
        r.finish("object version entry")?;
        Ok(Self {
            bucket,
            key,
            version,
            created,
            seq,
            null,
            body,
            retention: Retention {
                mode,
                retain_until_unix_ms,
                at: retention_at,
            },
            legal_hold,
            purged,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::ids::NodeId;

    fn at(ms: u64, node: u8) -> Timestamp {
        Timestamp {
            hlc: Hlc::new(ms, 0),
            node: NodeId([node; 32]),
        }
    }

    pub(crate) fn entry() -> ObjectVersion {
        ObjectVersion {
            bucket: "b".into(),
            key: "k".into(),
            version: VersionId::new(1, [0; 10]),
            created: at(1, 1),
            seq: 3,
            null: true,
            body: VersionBody::Data {
                manifest: ManifestId([5; 32]),
                size_bytes: 10,
                etag: "\"e\"".into(),
                headers: StoredHeaders::new(vec![
                    ("content-type".into(), "text/plain".into()),
                    ("x-amz-meta-colour".into(), "blue".into()),
                ])
                .unwrap(),
            },
            retention: Retention::default(),
            legal_hold: Lww {
                value: false,
                at: at(1, 1),
            },
            purged: None,
        }
    }

    #[test]
    fn compliance_retention_cannot_be_shortened_by_a_later_write() {
        let mut locked = entry();
        locked.retention = Retention::new(RetentionMode::Compliance, 2_000);
        let mut shorter = entry();
        shorter.retention = Retention::new(RetentionMode::Governance, 1_000);
        let merged = shorter.merge(&locked).unwrap();
        assert_eq!(merged.retention, locked.retention);
        assert!(merged.is_locked(1_999) && !merged.is_locked(2_000));
    }

    #[test]
    fn legal_hold_is_last_writer_wins() {
        let mut on = entry();
        on.legal_hold = Lww {
            value: true,
            at: at(5, 1),
        };
        let mut off = entry();
        off.legal_hold = Lww {
            value: false,
            at: at(6, 2),
        };
        assert!(!on.merge(&off).unwrap().legal_hold.value);
        assert!(!off.merge(&on).unwrap().legal_hold.value);
    }

    #[test]
    fn entries_of_different_versions_do_not_merge() {
        let mut other = entry();
        other.key = "other".into();
        assert_eq!(entry().merge(&other), Err(VersionError::DifferentVersions));
    }

    #[test]
    fn format_1_entries_read_with_sequence_0() {
        let mut e = entry();
        let mut bytes = e.encode();
        // Format 1 is format 2 without the sequence after `created`.
        let at = 1 + 2 + e.bucket.len() + 2 + e.key.len() + 16 + 40;
        bytes.drain(at..at + 8);
        bytes[0] = FORMAT_WITHOUT_SEQ;
        e.seq = 0;
        assert_eq!(ObjectVersion::decode(&bytes).unwrap(), e);
        // One entry, one byte string: sequence 0 is written as format 1,
        // and format 2 with sequence 0 is refused.
        assert_eq!(e.encode(), bytes);
        let mut zero = entry();
        zero.seq = 1;
        let mut bytes = zero.encode();
        bytes[at..at + 8].copy_from_slice(&0u64.to_be_bytes());
        assert!(ObjectVersion::decode(&bytes).is_err());
    }

    #[test]
    fn encoding_round_trips_and_truncations_fail() {
        let mut e = entry();
        e.purged = Some(at(9, 3));
        for (null, seq) in [(true, 3), (true, 0), (false, 3), (false, 0)] {
            e.null = null;
            e.seq = seq;
            let bytes = e.encode();
            assert_eq!(ObjectVersion::decode(&bytes).unwrap(), e);
            for len in 0..bytes.len() {
                assert!(ObjectVersion::decode(&bytes[..len]).is_err());
            }
        }
    }

    #[test]
    fn format_3_carries_the_own_id_flag_and_only_it() {
        let mut e = entry();
        e.null = false;
        let bytes = e.encode();
        assert_eq!(bytes[0], FORMAT_WITH_FLAGS);
        let flags = 1 + 2 + e.bucket.len() + 2 + e.key.len() + 16 + 40 + 8;
        assert_eq!(bytes[flags], FLAG_OWN_ID);
        for bad in [0u8, 2, 3, 0x80] {
            let mut changed = bytes.clone();
            changed[flags] = bad;
            assert!(ObjectVersion::decode(&changed).is_err(), "flags {bad}");
        }
        // Entries of formats 1 and 2 are null versions.
        e.null = true;
        assert_eq!(e.encode()[0], FORMAT_VERSION);
    }
}
