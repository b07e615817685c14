//! The gateway's rows in the replicated metadata (spec/gateway.md,
//! "Records"): buckets, access keys and the internal KMS's keys. Each is the
//! value of a register row; secrets are stored only wrapped under a key that
//! never enters the swarm.

use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::erasure::Scheme;
use crate::ids::{FragmentId, ManifestId, UploadId};
use crate::keywrap::WRAPPED_KEY_BYTES;
use crate::manifest::{MAX_ETAG_BYTES, PartKeys, SegmentRef};
use crate::version::{RetentionMode, StoredHeaders, VersionError};

const FORMAT_VERSION: u8 = 1;
/// Bytes of an access key id: 16 to 128, S3's own bounds.
pub const MAX_ACCESS_KEY_ID_BYTES: usize = 128;
/// Bytes of a KMS key id.
pub const MAX_KMS_KEY_ID_BYTES: usize = 256;
/// Bytes of a free-text name given to an access key.
pub const MAX_KEY_NAME_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    #[error("record format {0} is not supported")]
    UnsupportedFormat(u8),
    #[error("malformed record: {0}")]
    Decode(#[from] DecodeError),
    #[error("invalid record: {0}")]
    Invalid(String),
}

fn read_format(r: &mut Reader<'_>) -> Result<(), RecordError> {
    match r.u8("format")? {
        FORMAT_VERSION => Ok(()),
        other => Err(RecordError::UnsupportedFormat(other)),
    }
}

/// A bucket (Buckets table, cluster partition; sort key: the bucket name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketRecord {
    pub created_unix_ms: u64,
    /// The access key that created it.
    pub owner: String,
    /// The internal KMS key that wraps the data keys of its SSE-S3 objects.
    pub bucket_key_id: String,
}

impl BucketRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.owner.len() + self.bucket_key_id.len());
        out.put_u8(FORMAT_VERSION);
        out.put_u64(self.created_unix_ms);
        out.put_bytes16(self.owner.as_bytes());
        out.put_bytes16(self.bucket_key_id.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader::new(bytes);
        read_format(&mut r)?;
        let record = Self {
            created_unix_ms: r.u64("created")?,
            owner: r.str16("owner", MAX_ACCESS_KEY_ID_BYTES)?.to_owned(),
            bucket_key_id: r.str16("bucket key id", MAX_KMS_KEY_ID_BYTES)?.to_owned(),
        };
        r.finish("bucket record")?;
        Ok(record)
    }
}

/// A bucket's versioning state (S3's): once Enabled, never back to
/// Unversioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Versioning {
    #[default]
    Unversioned,
    Enabled,
    Suspended,
}

/// Format 2 of bucket settings added the claim; format 1 values read with
/// claim 0 and are written again in format 2.
const SETTINGS_FORMAT_WITH_CLAIM: u8 = 2;

/// S3's bounds on a default retention period.
pub const MAX_DEFAULT_DAYS: u32 = 36_500;
pub const MAX_DEFAULT_YEARS: u32 = 100;

/// How long a new version is retained when its write names no retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionPeriod {
    Days(u32),
    Years(u32),
}

/// Object Lock's default retention of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultRetention {
    /// Governance or Compliance, never None.
    pub mode: RetentionMode,
    pub period: RetentionPeriod,
}

/// The protections of one bucket that change after it is created
/// (spec/versioning.md, "Bucket settings"): kept in a compare-and-set
/// register of the bucket's partition, so that changes racing on them are
/// put in one order and the rules between them (versioning never back to
/// Unversioned, Object Lock never off, no suspending under Object Lock)
/// hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSettings {
    /// The bucket's KMS key id, unique to one creation of the bucket:
    /// settings of an earlier bucket of the same name are not this one's.
    pub generation: String,
    /// When the creation that wrote this generation claimed the name: a
    /// young claim without a bucket record is a creation under way.
    pub claimed_unix_ms: u64,
    pub versioning: Versioning,
    pub object_lock: bool,
    /// Only with Object Lock.
    pub default_retention: Option<DefaultRetention>,
}

impl BucketSettings {
    /// What a bucket without a settings register has.
    pub fn unversioned(generation: &str) -> Self {
        Self {
            generation: generation.to_owned(),
            claimed_unix_ms: 0,
            versioning: Versioning::Unversioned,
            object_lock: false,
            default_retention: None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.generation.len());
        out.put_u8(SETTINGS_FORMAT_WITH_CLAIM);
        out.put_bytes16(self.generation.as_bytes());
        out.put_u64(self.claimed_unix_ms);
        out.put_u8(self.versioning as u8);
        out.put_bool(self.object_lock);
        match &self.default_retention {
            None => out.put_u8(0),
            Some(default) => {
                out.put_u8(default.mode as u8);
                match default.period {
                    RetentionPeriod::Days(n) => {
                        out.put_u8(0);
                        out.put_u32(n);
                    }
                    RetentionPeriod::Years(n) => {
                        out.put_u8(1);
                        out.put_u32(n);
                    }
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader::new(bytes);
        let format = r.u8("format")?;
        let generation = r.str16("generation", MAX_KMS_KEY_ID_BYTES)?.to_owned();
        let claimed_unix_ms = match format {
            SETTINGS_FORMAT_WITH_CLAIM => r.u64("claimed")?,
            // Format 1 had no claim: an old one, taken over at once.
            FORMAT_VERSION => 0,
            other => return Err(RecordError::UnsupportedFormat(other)),
        };
        let versioning = match r.u8("versioning")? {
            0 => Versioning::Unversioned,
            1 => Versioning::Enabled,
            2 => Versioning::Suspended,
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "versioning",
                    value: u64::from(other),
                }
                .into());
            }
        };
        let object_lock = r.bool("object lock")?;
        let mode = match r.u8("default retention mode")? {
            0 => None,
            1 => Some(RetentionMode::Governance),
            2 => Some(RetentionMode::Compliance),
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "default retention mode",
                    value: u64::from(other),
                }
                .into());
            }
        };
        let default_retention = match mode {
            None => None,
            Some(mode) => {
                let unit = r.u8("retention unit")?;
                let count = r.u32("retention period")?;
                let period = match unit {
                    0 => RetentionPeriod::Days(count),
                    1 => RetentionPeriod::Years(count),
                    other => {
                        return Err(DecodeError::InvalidValue {
                            field: "retention unit",
                            value: u64::from(other),
                        }
                        .into());
                    }
                };
                Some(DefaultRetention { mode, period })
            }
        };
        r.finish("bucket settings")?;
        let settings = Self {
            generation,
            claimed_unix_ms,
            versioning,
            object_lock,
            default_retention,
        };
        settings.check().map_err(RecordError::Invalid)?;
        Ok(settings)
    }

    /// The rules one settings value keeps by itself.
    pub fn check(&self) -> Result<(), String> {
        if self.object_lock && self.versioning != Versioning::Enabled {
            return Err("Object Lock needs versioning Enabled".into());
        }
        if self.default_retention.is_some() && !self.object_lock {
            return Err("a default retention needs Object Lock".into());
        }
        if let Some(default) = &self.default_retention {
            if default.mode == RetentionMode::None {
                return Err("a default retention has a mode".into());
            }
            let (count, max) = match default.period {
                RetentionPeriod::Days(n) => (n, MAX_DEFAULT_DAYS),
                RetentionPeriod::Years(n) => (n, MAX_DEFAULT_YEARS),
            };
            if count == 0 || count > max {
                return Err(format!(
                    "a default retention period is 1 to {MAX_DEFAULT_DAYS} days or 1 to {MAX_DEFAULT_YEARS} years"
                ));
            }
        }
        Ok(())
    }
}

/// An S3 access key (AccessKeys table, cluster partition; sort key: the
/// access key id). The secret is wrapped under the gateway's root key
/// (label `access-key/<id>`), because SigV4 needs the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessKeyRecord {
    pub created_unix_ms: u64,
    pub name: String,
    /// The wrapped 32-byte seed of the secret: the secret access key is
    /// the standard base64 of the seed's first 30 bytes (40 characters).
    pub wrapped_secret: Vec<u8>,
    /// What the key may do beyond reading and writing objects: bits of
    /// [`permission`]; `None` for a key made before permissions existed
    /// (format 1), which may do what every key could then: bypass
    /// governance.
    pub permissions: Option<u64>,
}

/// Permission bits of an access key.
pub mod permission {
    /// `x-amz-bypass-governance-retention` is honoured (S3's
    /// s3:BypassGovernanceRetention).
    pub const BYPASS_GOVERNANCE: u64 = 1;
}

/// Format 2 of an access key record added its permissions; a format 1
/// record is a key made before permissions existed.
const ACCESS_KEY_FORMAT: u8 = 2;

impl AccessKeyRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.name.len() + self.wrapped_secret.len());
        out.put_u8(match self.permissions {
            Some(_) => ACCESS_KEY_FORMAT,
            None => FORMAT_VERSION,
        });
        out.put_u64(self.created_unix_ms);
        out.put_bytes16(self.name.as_bytes());
        out.put_bytes16(&self.wrapped_secret);
        if let Some(permissions) = self.permissions {
            out.put_u64(permissions);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader::new(bytes);
        let format = r.u8("format")?;
        if format != FORMAT_VERSION && format != ACCESS_KEY_FORMAT {
            return Err(RecordError::UnsupportedFormat(format));
        }
        let created_unix_ms = r.u64("created")?;
        let name = r.str16("name", MAX_KEY_NAME_BYTES)?.to_owned();
        let wrapped_secret = r.bytes16("wrapped secret", WRAPPED_KEY_BYTES)?.to_vec();
        let permissions = match format {
            ACCESS_KEY_FORMAT => Some(r.u64("permissions")?),
            _ => None,
        };
        r.finish("access key record")?;
        Ok(Self {
            created_unix_ms,
            name,
            wrapped_secret,
            permissions,
        })
    }

    /// Whether the key has every bit of `permission`.
    pub fn may(&self, permission: u64) -> bool {
        self.permissions_or_legacy() & permission == permission
    }

    /// Its permissions; for a key made before they existed, what every
    /// key could do then.
    pub fn permissions_or_legacy(&self) -> u64 {
        self.permissions.unwrap_or(permission::BYPASS_GOVERNANCE)
    }
}

/// A key of the internal KMS (KmsKeys table, cluster partition; sort key:
/// the key id), wrapped under the root key with label `kms/<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsKeyRecord {
    pub created_unix_ms: u64,
    pub wrapped_key: Vec<u8>,
}

impl KmsKeyRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(11 + self.wrapped_key.len());
        out.put_u8(FORMAT_VERSION);
        out.put_u64(self.created_unix_ms);
        out.put_bytes16(&self.wrapped_key);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader::new(bytes);
        read_format(&mut r)?;
        let record = Self {
            created_unix_ms: r.u64("created")?,
            wrapped_key: r.bytes16("wrapped key", WRAPPED_KEY_BYTES)?.to_vec(),
        };
        r.finish("kms key record")?;
        Ok(record)
    }
}

/// An upload in progress (Uploads table, bucket partition; sort key:
/// `upload_sort_key(key, upload)`): written before the first fragment is
/// pushed and removed when the upload commits or is aborted, so that the
/// fragments of one that never ends can be found and collected. A
/// multipart upload also keeps what its parts share: the scheme, the data
/// key (wrapped under the bucket key with label `upload/<bucket>/<upload>`)
/// and the headers the object will have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub upload: UploadId,
    pub started_unix_ms: u64,
    /// A multipart upload (else a single PUT).
    pub multipart: bool,
    pub scheme: Scheme,
    pub bucket_key_id: String,
    /// Empty for a single PUT.
    pub wrapped_key: Vec<u8>,
    pub headers: StoredHeaders,
}

impl UploadRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.bucket_key_id.len());
        out.put_u8(FORMAT_VERSION);
        out.extend_from_slice(self.upload.as_bytes());
        out.put_u64(self.started_unix_ms);
        out.put_bool(self.multipart);
        out.put_u8(self.scheme.data() as u8);
        out.put_u8(self.scheme.parity() as u8);
        out.put_bytes16(self.bucket_key_id.as_bytes());
        out.put_bytes16(&self.wrapped_key);
        self.headers.put(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader::new(bytes);
        read_format(&mut r)?;
        let upload = UploadId(r.array("upload")?);
        let started_unix_ms = r.u64("started")?;
        let multipart = r.bool("multipart")?;
        let scheme = read_scheme(&mut r)?;
        let record = Self {
            upload,
            started_unix_ms,
            multipart,
            scheme,
            bucket_key_id: r.str16("bucket key id", MAX_KMS_KEY_ID_BYTES)?.to_owned(),
            wrapped_key: r.bytes16("wrapped key", WRAPPED_KEY_BYTES)?.to_vec(),
            headers: StoredHeaders::read(&mut r).map_err(|e| match e {
                VersionError::Decode(d) => RecordError::Decode(d),
                other => RecordError::Invalid(other.to_string()),
            })?,
        };
        r.finish("upload record")?;
        Ok(record)
    }
}

fn read_scheme(r: &mut Reader<'_>) -> Result<Scheme, RecordError> {
    let k = r.u8("k")?;
    let m = r.u8("m")?;
    Scheme::new(k, m).map_err(|e| RecordError::Invalid(e.to_string()))
}

/// One uploaded part of a multipart upload (Parts table, bucket partition;
/// sort key: `part_sort_key(upload, number, attempt)`): its own encryption stream
/// (stream id = part number) cut into segments like any object's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRecord {
    /// Which key sealed the part's stream; the record's format says it (1:
    /// the upload's data key, written before per-attempt keys; 2: the part
    /// stream key of this attempt).
    pub part_keys: PartKeys,
    /// The upload id this part attempt's fragment holds name.
    pub upload: UploadId,
    pub uploaded_unix_ms: u64,
    pub plaintext_len: u64,
    /// The part's S3 ETag, quotes included.
    pub etag: String,
    /// The additional checksum the part was uploaded with, verified: the
    /// algorithm's S3 name and the base64 value.
    pub checksum: Option<(String, String)>,
    pub scheme: Scheme,
    pub segments: Vec<SegmentRef>,
}

/// Bytes of a checksum algorithm's name and of a base64 checksum value.
pub const MAX_CHECKSUM_NAME_BYTES: usize = 16;
pub const MAX_CHECKSUM_VALUE_BYTES: usize = 64;

impl PartRecord {
    pub fn encode(&self) -> Vec<u8> {
        let per_segment = 4 + 32 * self.scheme.total();
        let mut out = Vec::with_capacity(64 + self.segments.len() * per_segment);
        out.put_u8(match self.part_keys {
            PartKeys::Shared => 1,
            PartKeys::PerAttempt => 2,
        });
        out.extend_from_slice(self.upload.as_bytes());
        out.put_u64(self.uploaded_unix_ms);
        out.put_u64(self.plaintext_len);
        out.put_bytes16(self.etag.as_bytes());
        let (algorithm, value) = self
            .checksum
            .as_ref()
            .map_or(("", ""), |(a, v)| (a.as_str(), v.as_str()));
        out.put_bytes16(algorithm.as_bytes());
        out.put_bytes16(value.as_bytes());
        out.put_u8(self.scheme.data() as u8);
        out.put_u8(self.scheme.parity() as u8);
        out.put_u32(self.segments.len() as u32);
        for segment in &self.segments {
            out.put_u32(segment.ciphertext_len);
            for id in &segment.fragments {
                out.extend_from_slice(id.as_bytes());
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader::new(bytes);
        let part_keys = match r.u8("format")? {
            1 => PartKeys::Shared,
            2 => PartKeys::PerAttempt,
            other => return Err(RecordError::UnsupportedFormat(other)),
        };
        let upload = UploadId(r.array("upload id")?);
        let uploaded_unix_ms = r.u64("uploaded")?;
        let plaintext_len = r.u64("length")?;
        let etag = r.str16("etag", MAX_ETAG_BYTES)?.to_owned();
        let algorithm = r.str16("checksum algorithm", MAX_CHECKSUM_NAME_BYTES)?;
        let value = r.str16("checksum", MAX_CHECKSUM_VALUE_BYTES)?;
        let checksum = match (algorithm.is_empty(), value.is_empty()) {
            (true, true) => None,
            (false, false) => Some((algorithm.to_owned(), value.to_owned())),
            _ => {
                return Err(RecordError::Invalid(
                    "a checksum needs both its algorithm and its value".into(),
                ));
            }
        };
        let scheme = read_scheme(&mut r)?;
        let count = r.count("segments", usize::MAX, 4 + 32 * scheme.total())?;
        let mut segments = Vec::with_capacity(count);
        for _ in 0..count {
            let ciphertext_len = r.u32("segment length")?;
            let fragments = (0..scheme.total())
                .map(|_| r.array("fragment id").map(FragmentId))
                .collect::<Result<Vec<_>, _>>()?;
            segments.push(SegmentRef {
                ciphertext_len,
                fragments,
            });
        }
        r.finish("part record")?;
        Ok(Self {
            part_keys,
            upload,
            uploaded_unix_ms,
            plaintext_len,
            etag,
            checksum,
            scheme,
            segments,
        })
    }
}

/// What a release frees: the fragments of an upload, or those of the
/// uploads a manifest names (its own and its parts').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseTarget {
    Upload(UploadId),
    Manifest(ManifestId),
}

impl ReleaseTarget {
    fn id_bytes(&self) -> &[u8] {
        match self {
            ReleaseTarget::Upload(upload) => upload.as_bytes(),
            ReleaseTarget::Manifest(manifest) => manifest.as_bytes(),
        }
    }

    /// Sort key of the release row: `key ‖ 0 ‖ the target's id`.
    pub fn sort_key(&self, key: &str) -> Vec<u8> {
        let id = self.id_bytes();
        let mut sort = Vec::with_capacity(key.len() + 1 + id.len());
        sort.extend_from_slice(key.as_bytes());
        sort.push(0);
        sort.extend_from_slice(id);
        sort
    }

    /// The object key in a release row's sort key, given its target.
    pub fn key_of<'a>(&self, sort: &'a [u8]) -> Option<&'a str> {
        let split = sort.len().checked_sub(1 + self.id_bytes().len())?;
        if sort[split] != 0 || &sort[split + 1..] != self.id_bytes() {
            return None;
        }
        std::str::from_utf8(&sort[..split]).ok()
    }
}

/// Fragments to release once no write in flight can still commit them
/// (Releases table, bucket partition; sort key: [`ReleaseTarget::sort_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRecord {
    /// When the fragments became garbage (an abort, a purge) or, for a
    /// PUT cut off, when it started.
    pub since_unix_ms: u64,
    pub target: ReleaseTarget,
}

impl ReleaseRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(42);
        out.put_u8(FORMAT_VERSION);
        out.put_u64(self.since_unix_ms);
        match &self.target {
            ReleaseTarget::Upload(upload) => {
                out.put_u8(1);
                out.extend_from_slice(upload.as_bytes());
            }
            ReleaseTarget::Manifest(manifest) => {
                out.put_u8(2);
                out.extend_from_slice(manifest.as_bytes());
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader::new(bytes);
        read_format(&mut r)?;
        let since_unix_ms = r.u64("since")?;
        let target = match r.u8("target kind")? {
            1 => ReleaseTarget::Upload(UploadId(r.array("upload id")?)),
            2 => ReleaseTarget::Manifest(ManifestId(r.array("manifest id")?)),
            other => {
                return Err(RecordError::Invalid(format!("release target kind {other}")));
            }
        };
        r.finish("release record")?;
        Ok(Self {
            since_unix_ms,
            target,
        })
    }
}

/// A segment committed with fewer than `k + m` fragments stored, recorded
/// when it was pushed so that repair finds it without a scan (Degraded
/// table, bucket partition; sort key: [`crate::meta::degraded_sort_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DegradedRecord {
    pub since_unix_ms: u64,
    /// The segment's fragment ids, in fragment order.
    pub fragments: Vec<FragmentId>,
    /// Indices (into `fragments`) of those no node stored, ascending.
    pub missing: Vec<u8>,
}

/// Fragments of one segment: `k + m` is at most 64 ([`Scheme`]).
const MAX_SEGMENT_FRAGMENTS: usize = 64;

impl DegradedRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(11 + 32 * self.fragments.len() + self.missing.len());
        out.put_u8(FORMAT_VERSION);
        out.put_u64(self.since_unix_ms);
        out.put_u8(self.fragments.len() as u8);
        for id in &self.fragments {
            out.extend_from_slice(id.as_bytes());
        }
        out.put_u8(self.missing.len() as u8);
        out.extend_from_slice(&self.missing);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader::new(bytes);
        read_format(&mut r)?;
        let since_unix_ms = r.u64("since")?;
        let count = usize::from(r.u8("fragment count")?);
        let mut fragments = Vec::with_capacity(count.min(MAX_SEGMENT_FRAGMENTS));
        for _ in 0..count {
            fragments.push(FragmentId(r.array("fragment id")?));
        }
        let missing_count = usize::from(r.u8("missing count")?);
        let missing = r.take(missing_count, "missing fragments")?.to_vec();
        if missing.windows(2).any(|w| w[0] >= w[1])
            || missing.iter().any(|&i| usize::from(i) >= count)
        {
            return Err(RecordError::Invalid(
                "missing fragment indices must ascend and name fragments of the segment".into(),
            ));
        }
        r.finish("degraded record")?;
        Ok(Self {
            since_unix_ms,
            fragments,
            missing,
        })
    }
}

/// Rules of a lifecycle configuration at most (S3's limit).
pub const MAX_LIFECYCLE_RULES: usize = 1000;
/// Bytes of a lifecycle rule's id at most (S3's limit).
pub const MAX_LIFECYCLE_RULE_ID_BYTES: usize = 255;
const LIFECYCLE_FORMAT: u8 = 1;

/// A bucket's lifecycle configuration (spec/versioning.md, "Lifecycle"),
/// kept in a register of the bucket's partition; `generation` is the
/// bucket's KMS key id, as for its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleConfiguration {
    pub generation: String,
    pub rules: Vec<LifecycleRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleRule {
    pub id: String,
    pub enabled: bool,
    /// Keys the rule applies to begin with it ("" for every key).
    pub prefix: String,
    /// Sizes the rule applies to are strictly between these, when set.
    pub size_greater_than: Option<u64>,
    pub size_less_than: Option<u64>,
    pub expiration: Option<Expiration>,
    pub noncurrent: Option<NoncurrentExpiration>,
    /// Multipart uploads started this many days ago are aborted.
    pub abort_incomplete_days: Option<u32>,
}

/// What expires a key's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiration {
    /// Days after its creation, rounded up to the next day boundary.
    Days(u32),
    /// From this date (Unix ms) on.
    Date(u64),
    /// A delete marker with no noncurrent version left is removed.
    ExpiredDeleteMarkers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoncurrentExpiration {
    /// Days after a version became noncurrent, rounded up to the next day
    /// boundary.
    pub days: u32,
    /// How many of the newest noncurrent versions are kept whatever their
    /// age (0: none).
    pub newer_versions: u32,
}

/// The most noncurrent versions a rule may keep (S3's bound).
pub const MAX_NEWER_NONCURRENT_VERSIONS: u32 = 100;

impl LifecycleRule {
    /// What every stored rule holds to, whoever wrote it: counts of days
    /// above zero, at most 100 noncurrent versions kept, sizes in order.
    pub fn check(&self) -> Result<(), String> {
        let zero_days = matches!(self.expiration, Some(Expiration::Days(0)))
            || self.noncurrent.is_some_and(|n| n.days == 0)
            || self.abort_incomplete_days == Some(0);
        if zero_days {
            return Err(format!("lifecycle rule {:?} counts 0 days", self.id));
        }
        if self
            .noncurrent
            .is_some_and(|n| n.newer_versions > MAX_NEWER_NONCURRENT_VERSIONS)
        {
            return Err(format!(
                "lifecycle rule {:?} keeps more than {MAX_NEWER_NONCURRENT_VERSIONS} noncurrent versions",
                self.id
            ));
        }
        if let (Some(min), Some(max)) = (self.size_greater_than, self.size_less_than)
            && min >= max
        {
            return Err(format!(
                "lifecycle rule {:?} has no size between its bounds",
                self.id
            ));
        }
        Ok(())
    }
}

impl LifecycleConfiguration {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u8(LIFECYCLE_FORMAT);
        out.put_bytes16(self.generation.as_bytes());
        out.put_u32(self.rules.len() as u32);
        let put_optional = |out: &mut Vec<u8>, value: Option<u64>| match value {
            None => out.put_u8(0),
            Some(v) => {
                out.put_u8(1);
                out.put_u64(v);
            }
        };
        for rule in &self.rules {
            out.put_bytes16(rule.id.as_bytes());
            out.put_bool(rule.enabled);
            out.put_bytes16(rule.prefix.as_bytes());
            put_optional(&mut out, rule.size_greater_than);
            put_optional(&mut out, rule.size_less_than);
            match rule.expiration {
                None => out.put_u8(0),
                Some(Expiration::Days(days)) => {
                    out.put_u8(1);
                    out.put_u32(days);
                }
                Some(Expiration::Date(unix_ms)) => {
                    out.put_u8(2);
                    out.put_u64(unix_ms);
                }
                Some(Expiration::ExpiredDeleteMarkers) => out.put_u8(3),
            }
            match rule.noncurrent {
                None => out.put_u8(0),
                Some(noncurrent) => {
                    out.put_u8(1);
                    out.put_u32(noncurrent.days);
                    out.put_u32(noncurrent.newer_versions);
                }
            }
            match rule.abort_incomplete_days {
                None => out.put_u8(0),
                Some(days) => {
                    out.put_u8(1);
                    out.put_u32(days);
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader::new(bytes);
        match r.u8("format")? {
            LIFECYCLE_FORMAT => {}
            other => return Err(RecordError::UnsupportedFormat(other)),
        }
        let generation = r.str16("generation", MAX_KMS_KEY_ID_BYTES)?.to_owned();
        // A rule is at least 10 bytes: no allocation beyond the input.
        let count = r.count("lifecycle rules", MAX_LIFECYCLE_RULES, 10)?;
        let mut rules = Vec::with_capacity(count);
        fn flag(r: &mut Reader<'_>, field: &'static str, max: u8) -> Result<u8, DecodeError> {
            let value = r.u8(field)?;
            if value > max {
                return Err(DecodeError::InvalidValue {
                    field,
                    value: u64::from(value),
                });
            }
            Ok(value)
        }
        for _ in 0..count {
            let id = r.str16("rule id", MAX_LIFECYCLE_RULE_ID_BYTES)?.to_owned();
            let enabled = r.bool("rule enabled")?;
            let prefix = r
                .str16("rule prefix", crate::manifest::MAX_KEY_BYTES)?
                .to_owned();
            let size_greater_than = match flag(&mut r, "size greater than", 1)? {
                0 => None,
                _ => Some(r.u64("size greater than")?),
            };
            let size_less_than = match flag(&mut r, "size less than", 1)? {
                0 => None,
                _ => Some(r.u64("size less than")?),
            };
            let expiration = match flag(&mut r, "expiration", 3)? {
                0 => None,
                1 => Some(Expiration::Days(r.u32("expiration days")?)),
                2 => Some(Expiration::Date(r.u64("expiration date")?)),
                _ => Some(Expiration::ExpiredDeleteMarkers),
            };
            let noncurrent = match flag(&mut r, "noncurrent expiration", 1)? {
                0 => None,
                _ => Some(NoncurrentExpiration {
                    days: r.u32("noncurrent days")?,
                    newer_versions: r.u32("newer noncurrent versions")?,
                }),
            };
            let abort_incomplete_days = match flag(&mut r, "abort incomplete", 1)? {
                0 => None,
                _ => Some(r.u32("abort incomplete days")?),
            };
            let rule = LifecycleRule {
                id,
                enabled,
                prefix,
                size_greater_than,
                size_less_than,
                expiration,
                noncurrent,
                abort_incomplete_days,
            };
            rule.check().map_err(RecordError::Invalid)?;
            rules.push(rule);
        }
        r.finish("lifecycle configuration")?;
        Ok(Self { generation, rules })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn lifecycle_configurations_round_trip_and_every_cut_is_refused() {
        let configuration = LifecycleConfiguration {
            generation: "bucket/b/00".into(),
            rules: vec![
                LifecycleRule {
                    id: "logs".into(),
                    enabled: true,
                    prefix: "logs/".into(),
                    size_greater_than: Some(10),
                    size_less_than: None,
                    expiration: Some(Expiration::Days(30)),
                    noncurrent: Some(NoncurrentExpiration {
                        days: 7,
                        newer_versions: 2,
                    }),
                    abort_incomplete_days: Some(1),
                },
                LifecycleRule {
                    id: "markers".into(),
                    enabled: false,
                    prefix: String::new(),
                    size_greater_than: None,
                    size_less_than: Some(1 << 20),
                    expiration: Some(Expiration::ExpiredDeleteMarkers),
                    noncurrent: None,
                    abort_incomplete_days: None,
                },
                LifecycleRule {
                    id: "date".into(),
                    enabled: true,
                    prefix: "tmp/".into(),
                    size_greater_than: None,
                    size_less_than: None,
                    expiration: Some(Expiration::Date(1_767_225_600_000)),
                    noncurrent: None,
                    abort_incomplete_days: None,
                },
            ],
        };
        let bytes = configuration.encode();
        assert_eq!(LifecycleConfiguration::decode(&bytes), Ok(configuration));
        for cut in 0..bytes.len() {
            assert!(LifecycleConfiguration::decode(&bytes[..cut]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(LifecycleConfiguration::decode(&longer).is_err());
        // A count far above the input is refused before any allocation.
        let mut lying = bytes[..1 + 2 + 11].to_vec();
        lying.extend_from_slice(&999u32.to_be_bytes());
        assert!(LifecycleConfiguration::decode(&lying).is_err());
    }

    #[test]
    fn bucket_settings_of_format_1_read_with_no_claim() {
        let settings = BucketSettings {
            generation: "bucket/b/00".into(),
            claimed_unix_ms: 7,
            versioning: Versioning::Enabled,
            object_lock: true,
            default_retention: None,
        };
        let mut bytes = settings.encode();
        assert_eq!(BucketSettings::decode(&bytes), Ok(settings.clone()));
        let at = 1 + 2 + settings.generation.len();
        bytes.drain(at..at + 8);
        bytes[0] = 1;
        let old = BucketSettings::decode(&bytes).unwrap();
        assert_eq!(old.claimed_unix_ms, 0);
        assert_eq!(old.generation, settings.generation);
        bytes[0] = 3;
        assert!(BucketSettings::decode(&bytes).is_err());
    }

    use super::*;

    #[test]
    fn records_round_trip_and_refuse_every_truncation() {
        let bucket = BucketRecord {
            created_unix_ms: 1_764_000_000_000,
            owner: "CAIRNDEVEXAMPLEKEY01".into(),
            bucket_key_id: "bucket/photos/1".into(),
        };
        let access = AccessKeyRecord {
            created_unix_ms: 7,
            name: "ci".into(),
            wrapped_secret: vec![1; WRAPPED_KEY_BYTES],
            permissions: Some(0),
        };
        // A format 1 record (no permissions) reads as a key of before
        // permissions, which may bypass, as every key could then; it
        // encodes back to the same bytes.
        let mut old = access.encode();
        old.truncate(old.len() - 8);
        old[0] = 1;
        let legacy = AccessKeyRecord::decode(&old).unwrap();
        assert_eq!(legacy.permissions, None);
        assert!(legacy.may(permission::BYPASS_GOVERNANCE));
        assert!(!access.may(permission::BYPASS_GOVERNANCE));
        assert_eq!(legacy.encode(), old);
        let kms = KmsKeyRecord {
            created_unix_ms: 9,
            wrapped_key: vec![2; WRAPPED_KEY_BYTES],
        };
        let upload = UploadRecord {
            upload: UploadId([3; 16]),
            started_unix_ms: 11,
            multipart: true,
            scheme: Scheme::new(4, 2).unwrap(),
            bucket_key_id: "bucket/b/1".into(),
            wrapped_key: vec![4; WRAPPED_KEY_BYTES],
            headers: StoredHeaders::new(vec![("content-type".into(), "text/plain".into())])
                .unwrap(),
        };
        let part = PartRecord {
            part_keys: PartKeys::PerAttempt,
            upload: UploadId([8; 16]),
            uploaded_unix_ms: 12,
            plaintext_len: 5 << 20,
            etag: "\"00\"".into(),
            checksum: Some(("CRC32".into(), "AAAAAA==".into())),
            scheme: Scheme::new(2, 1).unwrap(),
            segments: vec![SegmentRef {
                ciphertext_len: 100,
                fragments: vec![FragmentId([5; 32]); 3],
            }],
        };
        let degraded = DegradedRecord {
            since_unix_ms: 13,
            fragments: (0..6).map(|i| FragmentId([i; 32])).collect(),
            missing: vec![1, 4],
        };
        let bytes = degraded.encode();
        assert_eq!(DegradedRecord::decode(&bytes), Ok(degraded));
        for cut in 0..bytes.len() {
            assert!(DegradedRecord::decode(&bytes[..cut]).is_err());
        }
        let mut unordered = bytes.clone();
        let at = unordered.len() - 2;
        unordered.swap(at, at + 1);
        assert!(matches!(
            DegradedRecord::decode(&unordered),
            Err(RecordError::Invalid(_))
        ));
        let mut beyond = bytes;
        *beyond.last_mut().unwrap() = 6;
        assert!(matches!(
            DegradedRecord::decode(&beyond),
            Err(RecordError::Invalid(_))
        ));
        let encoded = [
            bucket.encode(),
            access.encode(),
            kms.encode(),
            upload.encode(),
            part.encode(),
        ];
        assert_eq!(BucketRecord::decode(&encoded[0]), Ok(bucket));
        assert_eq!(AccessKeyRecord::decode(&encoded[1]), Ok(access));
        assert_eq!(KmsKeyRecord::decode(&encoded[2]), Ok(kms));
        assert_eq!(UploadRecord::decode(&encoded[3]), Ok(upload));
        assert_eq!(PartRecord::decode(&encoded[4]), Ok(part));
        for cut in 0..encoded[4].len() {
            assert!(PartRecord::decode(&encoded[4][..cut]).is_err());
        }
        for cut in 0..encoded[0].len() {
            assert!(BucketRecord::decode(&encoded[0][..cut]).is_err());
        }
        for cut in 0..encoded[1].len() {
            assert!(AccessKeyRecord::decode(&encoded[1][..cut]).is_err());
        }
        for cut in 0..encoded[2].len() {
            assert!(KmsKeyRecord::decode(&encoded[2][..cut]).is_err());
        }
        for cut in 0..encoded[3].len() {
            assert!(UploadRecord::decode(&encoded[3][..cut]).is_err());
        }
        assert_eq!(
            BucketRecord::decode(&[2]),
            Err(RecordError::UnsupportedFormat(2))
        );
    }

    #[test]
    fn release_records_round_trip_and_name_their_key() {
        for target in [
            ReleaseTarget::Upload(UploadId([6; 16])),
            ReleaseTarget::Manifest(ManifestId([7; 32])),
        ] {
            let record = ReleaseRecord {
                since_unix_ms: 13,
                target,
            };
            let encoded = record.encode();
            assert_eq!(ReleaseRecord::decode(&encoded), Ok(record));
            for cut in 0..encoded.len() {
                assert!(ReleaseRecord::decode(&encoded[..cut]).is_err());
            }
            let sort = target.sort_key("dir/a\0b");
            assert_eq!(target.key_of(&sort), Some("dir/a\0b"));
            assert_eq!(target.key_of(&sort[1..]), Some("ir/a\0b"));
            assert_eq!(target.key_of(&sort[..sort.len() - 1]), None);
        }
        let mut bad = ReleaseRecord {
            since_unix_ms: 1,
            target: ReleaseTarget::Upload(UploadId([0; 16])),
        }
        .encode();
        bad[9] = 3;
        assert!(ReleaseRecord::decode(&bad).is_err());
    }
}
