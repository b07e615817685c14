//! The data path (spec/gateway.md, "Data path"): a PUT streams plaintext
//! through MD5, chunked encryption and erasure coding, pushes each
//! segment's fragments in parallel to the nodes placement picks, signs the
//! manifest and commits it with the version row in one quorum write. A GET
//! resolves the version, fetches any `k` fragments of each segment it
//! touches, rebuilds, decrypts and streams. Memory is a few segments per
//! request, whatever the object's size.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cairn_node::meta::Metadata;
use cairn_node::swarm::{NodeHandle, now_unix_ms};
use cairn_protocol::encryption::{RangePlan, SecretKey, part_stream_key};
use cairn_protocol::erasure::{EncodedSegment, Scheme, SegmentLayout, reconstruct};
use cairn_protocol::ids::{
    FragmentId, ManifestId, NodeId, UploadId, VersionId, VersionIdGenerator,
};
use cairn_protocol::keywrap::{SALT_BYTES, WrapContext, unwrap_data_key, wrap_data_key};
use cairn_protocol::manifest::{
    KeyEnvelope, KeyKind, Manifest, Part, PartKeys, SegmentRef, SignedManifest,
};
use cairn_protocol::membership::SignedMap;
use cairn_protocol::meta::{
    Partition, Register, RowKey, RowValue, Table, degraded_sort_key, upload_sort_key,
    version_sort_key,
};
use cairn_protocol::metarpc::RegisterKey;
use cairn_protocol::pipeline::PutPipeline;
use cairn_protocol::placement::{Placer, segment_placement_key};
use cairn_protocol::records::{DegradedRecord, ReleaseRecord, ReleaseTarget, UploadRecord};
use cairn_protocol::version::{Lww, ObjectVersion, Retention, StoredHeaders, VersionBody};
use cairn_protocol::wire::Hold;
use futures::stream::{FuturesUnordered, StreamExt};
use md5::Digest;
use s3s::checksum::ChecksumHasher;
use tokio::sync::mpsc;

use crate::checksum::{Algorithm, ChecksumRequest};
use crate::collector::Collection;
use crate::error::{GatewayError, GatewayResult};
use crate::kms::{Kms, random_bytes};

/// Objects up to this size are stored as `1 + m` copies rather than
/// erasure-coded: one fragment per segment is cheaper to write and read.
pub const SMALL_OBJECT_BYTES: u64 = 256 << 10;
/// The largest single PUT (and part), as in S3.
pub const MAX_PUT_BYTES: u64 = 5 << 30;
/// Plaintext handed to the encoder at once (one hop to a blocking thread).
const BATCH_BYTES: usize = 1 << 20;
/// Segments being pushed at once by one PUT.
const SEGMENTS_IN_FLIGHT: usize = 2;
/// Segments fetched ahead of the one being sent by one GET.
const SEGMENTS_AHEAD: usize = 2;
/// When a fragment fetch takes longer than this, one more is started.
const SPARE_AFTER: Duration = Duration::from_millis(1500);
/// How long a read waits before asking the placed nodes that failed again.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Spare nodes asked for a fragment its placed node does not give, before
/// the DHT is.
const MAX_SPARES_ASKED: usize = 3;

/// The precondition of a write, decided by the key's head register.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum WriteCondition {
    #[default]
    Always,
    /// If-None-Match: * — only when the key has no current object.
    IfAbsent,
    /// If-Match — only when the current object has this ETag (unquoted).
    IfMatch(String),
    /// If-Match: * — only when the key has a current object.
    IfPresent,
    /// A DELETE's preconditions.
    Deleting(DeleteCondition),
}

/// The register that orders the writes of one key (spec/gateway.md,
/// "Heads"): its name is the object key, which never holds a zero byte,
/// so it never meets a lock guard's register (key, zero, version).
fn head_register(bucket: &str, key: &str) -> RegisterKey {
    RegisterKey {
        partition: Partition::bucket(bucket),
        name: key.as_bytes().to_vec(),
    }
}

/// The existing versions of `key`, newest first, `limit` at most.
pub(crate) async fn existing_versions(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    limit: Option<usize>,
) -> GatewayResult<Vec<ObjectVersion>> {
    let partition = Partition::bucket(bucket);
    let mut start = key.as_bytes().to_vec();
    start.push(0);
    let mut end = key.as_bytes().to_vec();
    end.push(1);
    let now = now_unix_ms();
    let mut versions = Vec::new();
    loop {
        let page = metadata
            .range(
                &partition,
                Table::Versions,
                &start,
                Some(&end),
                limit.map_or(1000, |l| l.max(64)),
            )
            .await?;
        for (_, value) in &page.rows {
            if let RowValue::Version(version) = value
                && version.exists(now)
            {
                versions.push((**version).clone());
                if limit.is_some_and(|l| versions.len() >= l) {
                    return Ok(versions);
                }
            }
        }
        match page.rows.last() {
            Some((last, _)) if page.more => {
                start = last.clone();
                start.push(0);
            }
            _ => return Ok(versions),
        }
    }
}

/// The signed manifest `id` of `bucket`, checked against its id; `None`
/// when no replica has it.
pub(crate) async fn read_manifest(
    metadata: &Metadata,
    bucket: &str,
    id: &ManifestId,
) -> GatewayResult<Option<Manifest>> {
    let value = metadata
        .read(vec![manifest_row(bucket, id)])
        .await?
        .remove(0);
    let Some(RowValue::Immutable(bytes)) = value else {
        return Ok(None);
    };
    let signed = SignedManifest::decode(&bytes)
        .map_err(|e| GatewayError::Corrupt(format!("manifest {id}: {e}")))?;
    if signed.id != *id {
        return Err(GatewayError::Corrupt(format!(
            "manifest {id} has another id"
        )));
    }
    Ok(Some(signed.manifest))
}

/// The key's head (spec/gateway.md, "Heads"): the version its last
/// decided write names, whether or not that writer wrote the version row
/// out — a data version, or a purged delete marker once the key was
/// deleted; `None` for a key never written. A linearizable read.
pub(crate) async fn read_head(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
) -> GatewayResult<Option<ObjectVersion>> {
    let value = metadata.read_register(head_register(bucket, key)).await?;
    value
        .map(|bytes| ObjectVersion::decode(&bytes))
        .transpose()
        .map_err(|e| GatewayError::Corrupt(format!("head of {key}: {e}")))
}

/// Whether `head` names an object a GET returns (not a delete marker).
fn is_current_object(head: &ObjectVersion) -> bool {
    matches!(head.body, VersionBody::Data { .. }) && head.purged.is_none()
}

/// What a write sets a key's head to.
pub(crate) enum HeadWrite<'a> {
    /// This data version; its sequence is decided with the head.
    Put(&'a ObjectVersion),
    /// A purged delete marker: the key has no current object.
    Delete(&'a ObjectVersion),
}

/// The keys that seal an object: its data key, and the bucket key that
/// wraps it for one version (a commit that needs a new version wraps it
/// again).
pub(crate) struct DataKeys {
    pub(crate) bucket_key_id: String,
    pub(crate) bucket_key: Arc<SecretKey>,
    pub(crate) data_key: SecretKey,
}

impl DataKeys {
    /// The data key wrapped for `version` of `key`, as the manifest keeps it.
    pub(crate) fn envelope(&self, bucket: &str, key: &str, version: VersionId) -> KeyEnvelope {
        let wrapped = wrap_data_key(
            &self.bucket_key,
            &self.data_key,
            &WrapContext {
                bucket,
                key,
                version,
            },
            random_bytes::<SALT_BYTES>(),
        );
        KeyEnvelope {
            kind: KeyKind::SseS3,
            key_id: self.bucket_key_id.clone(),
            wrapped: wrapped.to_vec(),
        }
    }
}

/// Why a head write's change refuses the current head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadRefusal {
    Condition,
    NoCurrentObject,
    Deadline,
    SequenceExhausted,
    /// A PUT judged again after it proposed once: see [`judge_head`].
    JudgedAgain,
}

/// The head a write proposes over `current`, or why it refuses.
///
/// A PUT that already proposed once in this compare-and-set, and is asked
/// to judge again, refuses: its earlier proposal may have been chosen and
/// then replaced by another writer, who purged it as a version below its
/// own. Proposed again, the same version would hold two places in the
/// key's history and the first one's purge would hide the second from
/// listings. The caller commits the write again as a new version instead.
/// A DELETE's marker is never a version row, so it is proposed again.
pub(crate) fn judge_head(
    condition: &WriteCondition,
    write: &HeadWrite<'_>,
    current: Option<&ObjectVersion>,
    proposed_before: bool,
    past_deadline: bool,
) -> Result<ObjectVersion, HeadRefusal> {
    let current_object = current.filter(|h| is_current_object(h));
    let holds = match (condition, current_object) {
        (WriteCondition::Always, _) => Ok(()),
        (WriteCondition::IfAbsent, None) => Ok(()),
        (WriteCondition::IfAbsent, Some(_)) => Err(HeadRefusal::Condition),
        (WriteCondition::IfMatch(etag), Some(object)) => match &object.body {
            VersionBody::Data { etag: ours, .. } if ours.trim_matches('"') == etag => Ok(()),
            _ => Err(HeadRefusal::Condition),
        },
        (WriteCondition::IfPresent, Some(_)) => Ok(()),
        (WriteCondition::IfMatch(_) | WriteCondition::IfPresent, None) => {
            Err(HeadRefusal::NoCurrentObject)
        }
        (WriteCondition::Deleting(delete), object) => match object {
            Some(object) if delete.version.is_some_and(|v| v != object.version) => {
                Err(HeadRefusal::NoCurrentObject)
            }
            Some(object) if delete.holds_for(object) => Ok(()),
            Some(_) => Err(HeadRefusal::Condition),
            None if delete.is_unconditional() => Ok(()),
            None => Err(HeadRefusal::NoCurrentObject),
        },
    };
    if past_deadline {
        return Err(HeadRefusal::Deadline);
    }
    holds?;
    let template = match write {
        HeadWrite::Put(version) => {
            if proposed_before {
                return Err(HeadRefusal::JudgedAgain);
            }
            version
        }
        HeadWrite::Delete(marker) => marker,
    };
    let mut new = (*template).clone();
    new.seq = match current.map_or(Some(1), |h| h.seq.checked_add(1)) {
        Some(seq) => seq,
        None => return Err(HeadRefusal::SequenceExhausted),
    };
    Ok(new)
}

/// The outcome of a decided head write.
pub(crate) struct HeadSwap {
    /// The head the write replaced.
    pub(crate) replaced: Option<ObjectVersion>,
    /// The head as decided, with its sequence.
    pub(crate) head: ObjectVersion,
}

/// The preconditions of a DELETE (If-Match, x-amz-if-match-size,
/// x-amz-if-match-last-modified-time): each given one must hold for the
/// current object. A key with no current object is deleted successfully
/// and nothing changes, as in S3.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteCondition {
    /// If-Match: * — only if the key has a current object.
    pub if_present: bool,
    /// Unquoted ETag.
    pub etag: Option<String>,
    pub size_bytes: Option<u64>,
    /// Last-Modified in whole seconds since the epoch.
    pub last_modified_unix_s: Option<i64>,
    /// A DELETE of one version (`versionId`): only if it is the current
    /// object; another version does not exist, and deleting it is a
    /// success that changes nothing, as in S3.
    pub version: Option<VersionId>,
}

impl DeleteCondition {
    fn is_unconditional(&self) -> bool {
        *self == Self::default()
    }

    fn holds_for(&self, head: &ObjectVersion) -> bool {
        let VersionBody::Data {
            etag, size_bytes, ..
        } = &head.body
        else {
            return false;
        };
        let modified_s = (head.created.hlc.unix_ms() / 1000) as i64;
        self.etag
            .as_ref()
            .is_none_or(|wanted| etag.trim_matches('"') == wanted)
            && self.size_bytes.is_none_or(|wanted| *size_bytes == wanted)
            && self
                .last_modified_unix_s
                .is_none_or(|wanted| modified_s == wanted)
    }
}

/// What a PUT writes.
pub struct NewObject {
    pub bucket: String,
    pub bucket_key_id: String,
    pub key: String,
    pub headers: StoredHeaders,
    /// The body's length as announced (Content-Length or the decoded length).
    pub length: u64,
    pub content_md5: Option<[u8; 16]>,
    pub checksum: Option<ChecksumRequest>,
    pub condition: WriteCondition,
}

/// An object opened for reading: its manifest and data key.
pub struct OpenObject {
    pub manifest: Manifest,
    data_key: Arc<SecretKey>,
}

/// The data path of one gateway. Cheap to clone.
#[derive(Clone)]
pub struct ObjectStore {
    node: NodeHandle,
    kms: Kms,
    versions: Arc<Mutex<VersionIdGenerator>>,
    /// Added to the wall clock for version ids (GatewayConfig::clock_skew_ms).
    clock_skew_ms: i64,
    collection: Collection,
}

pub(crate) fn versions_row(bucket: &str, key: &str, version: &VersionId) -> RowKey {
    RowKey::new(
        Partition::bucket(bucket),
        Table::Versions,
        version_sort_key(key, version),
    )
}

fn manifest_row(bucket: &str, manifest: &ManifestId) -> RowKey {
    RowKey::new(
        Partition::bucket(bucket),
        Table::Manifests,
        manifest.as_bytes().to_vec(),
    )
}

pub(crate) fn upload_row(bucket: &str, key: &str, upload: &UploadId) -> RowKey {
    RowKey::new(
        Partition::bucket(bucket),
        Table::Uploads,
        upload_sort_key(key, upload.as_bytes()),
    )
}

/// A release row for `target` under `key`, ripening from now (the
/// collector's work list, spec/gateway.md "Collecting orphan fragments").
pub(crate) fn release_entry(
    bucket: &str,
    key: &str,
    target: ReleaseTarget,
    at: cairn_protocol::hlc::Timestamp,
) -> (RowKey, RowValue) {
    let record = ReleaseRecord {
        since_unix_ms: now_unix_ms(),
        target,
    };
    (
        RowKey::new(
            Partition::bucket(bucket),
            Table::Releases,
            target.sort_key(key),
        ),
        register(Some(record.encode()), at),
    )
}

/// The rows that permanently delete `versions`: their tombstones, and a
/// release row for each manifest so that the collector frees its
/// fragments.
pub(crate) fn purge_rows(
    versions: Vec<ObjectVersion>,
    at: cairn_protocol::hlc::Timestamp,
) -> Vec<(RowKey, RowValue)> {
    let mut rows = Vec::with_capacity(versions.len() * 2);
    for mut version in versions {
        version.purged = Some(at);
        if let VersionBody::Data { manifest, .. } = &version.body {
            rows.push(release_entry(
                &version.bucket,
                &version.key,
                ReleaseTarget::Manifest(*manifest),
                at,
            ));
        }
        rows.push((
            versions_row(&version.bucket, &version.key, &version.version),
            RowValue::Version(Box::new(version)),
        ));
    }
    rows
}

pub(crate) fn register(value: Option<Vec<u8>>, at: cairn_protocol::hlc::Timestamp) -> RowValue {
    RowValue::Register(Register { at, value })
}

impl ObjectStore {
    pub fn new(node: NodeHandle, kms: Kms, collection: Collection, clock_skew_ms: i64) -> Self {
        Self {
            node,
            kms,
            versions: Arc::default(),
            clock_skew_ms,
            collection,
        }
    }

    /// When a write starting now must have committed (spec/gateway.md,
    /// "Collecting orphan fragments").
    pub(crate) fn write_deadline(&self, started_unix_ms: u64) -> u64 {
        started_unix_ms.saturating_add(self.collection.write_deadline.as_millis() as u64)
    }

    pub(crate) fn deadline_error(&self) -> GatewayError {
        GatewayError::WriteDeadline {
            minutes: self.collection.write_deadline.as_secs() / 60,
        }
    }

    pub(crate) fn kms(&self) -> &Kms {
        &self.kms
    }

    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    pub(crate) fn map(&self) -> GatewayResult<SignedMap> {
        self.node.cluster_map().ok_or(GatewayError::NoMap)
    }

    pub(crate) fn new_version(&self) -> VersionId {
        self.versions.lock().expect("version generator").next(
            now_unix_ms().saturating_add_signed(self.clock_skew_ms),
            random_bytes(),
        )
    }

    /// The scheme an object of `length` bytes is stored with: the map's, or
    /// copies with the same tolerance for small objects.
    fn scheme_for(map: &SignedMap, length: u64) -> GatewayResult<Scheme> {
        if length <= SMALL_OBJECT_BYTES && map.scheme.parity() > 0 {
            return Scheme::new(1, map.scheme.parity() as u8)
                .map_err(|e| GatewayError::Internal(e.to_string()));
        }
        Ok(map.scheme)
    }

    pub(crate) fn placer(map: &SignedMap, scheme: Scheme) -> GatewayResult<Placer> {
        Placer::new(&map.map, scheme, map.tolerance)
            .map_err(|e| GatewayError::Unavailable(format!("placement: {e}")))
    }

    /// Stores an object from `body` and commits it. Nothing is visible
    /// unless every byte arrived, matched its digests and is durable.
    pub async fn put<S, E>(&self, object: NewObject, body: S) -> GatewayResult<ObjectVersion>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if object.length > MAX_PUT_BYTES {
            return Err(GatewayError::EntityTooLarge { max: MAX_PUT_BYTES });
        }
        let map = self.map()?;
        let scheme = Self::scheme_for(&map, object.length)?;
        let placer = Arc::new(Self::placer(&map, scheme)?);
        let layout = SegmentLayout::with_defaults(scheme);
        let metadata = self.node.metadata();
        let version = self.new_version();
        let upload = UploadId(random_bytes());
        let started = now_unix_ms();

        // The upload is recorded before any fragment exists, so that the
        // fragments of a PUT that never commits can be found and collected.
        let record = UploadRecord {
            upload,
            started_unix_ms: started,
            multipart: false,
            scheme,
            bucket_key_id: object.bucket_key_id.clone(),
            wrapped_key: Vec::new(),
            headers: StoredHeaders::default(),
        };
        let upload_key = upload_row(&object.bucket, &object.key, &upload);
        metadata
            .write(vec![(
                upload_key.clone(),
                register(Some(record.encode()), metadata.timestamp()),
            )])
            .await?;

        let keys = DataKeys {
            bucket_key_id: object.bucket_key_id.clone(),
            bucket_key: self.kms.key(&object.bucket_key_id).await?,
            data_key: SecretKey::from_bytes(random_bytes()),
        };

        let deadline = self.write_deadline(started);
        let stream = StreamPut {
            store: self,
            placer,
            target: PushTarget {
                bucket: &object.bucket,
                key: &object.key,
                upload,
                retain_until_unix_ms: 0,
            },
            deadline_unix_ms: deadline,
        };
        let streamed = stream
            .run(
                PutPipeline::new(&part_stream_key(&keys.data_key, &upload), 0, layout),
                object.length,
                object.checksum.as_ref().map(ChecksumRequest::hasher),
                body,
            )
            .await?;
        let (segments, digest) = (streamed.segments, streamed.md5);
        if object
            .content_md5
            .is_some_and(|expected| expected != digest)
        {
            return Err(GatewayError::BadDigest);
        }
        let mut headers = object.headers;
        if let (Some(request), Some(hasher)) = (&object.checksum, streamed.checksum) {
            let value = request.verify(hasher)?;
            headers = with_checksum(headers, request.algorithm, value, "FULL_OBJECT")?;
        }
        let etag = format!("\"{}\"", cairn_protocol::to_hex(&digest));
        let manifest = Manifest {
            part_keys: PartKeys::PerAttempt,
            writer: self.node.node_id(),
            created_unix_ms: now_unix_ms(),
            bucket: object.bucket.clone(),
            key: object.key.clone(),
            version,
            upload,
            layout,
            encryption: keys.envelope(&object.bucket, &object.key, version),
            etag: etag.clone(),
            parts: vec![Part {
                number: 0,
                upload,
                plaintext_len: object.length,
                segments,
            }],
        };
        self.commit(
            manifest,
            &keys,
            headers,
            upload_key,
            &object.condition,
            deadline,
        )
        .await
    }

    /// Commits an object whose fragments are durable: the signed manifest
    /// first (invisible alone), then the key's head register by
    /// compare-and-set (where the condition is decided, and which orders
    /// every write of the key: the version's sequence is decided there),
    /// then the version row with the end of the upload and the retirement
    /// of the versions it replaced (the bucket keeps no history). Past
    /// `deadline_unix_ms` the head refuses it: the collector may by then
    /// be releasing the upload's fragments.
    pub(crate) async fn commit(
        &self,
        mut manifest: Manifest,
        keys: &DataKeys,
        headers: StoredHeaders,
        upload_key: RowKey,
        condition: &WriteCondition,
        deadline_unix_ms: u64,
    ) -> GatewayResult<ObjectVersion> {
        const IDENTITIES: usize = 8;
        let metadata = self.node.metadata();
        for _ in 0..IDENTITIES {
            let signed = manifest
                .clone()
                .sign(self.node.identity().signing_key())
                .map_err(|e| GatewayError::Internal(format!("manifest: {e}")))?;
            let at = metadata.timestamp();
            let row = ObjectVersion {
                bucket: manifest.bucket.clone(),
                key: manifest.key.clone(),
                version: manifest.version,
                created: at,
                seq: 0,
                body: VersionBody::Data {
                    manifest: signed.id,
                    size_bytes: manifest.plaintext_len(),
                    etag: manifest.etag.clone(),
                    headers: headers.clone(),
                },
                retention: Retention::default(),
                legal_hold: Lww { value: false, at },
                purged: None,
            };
            metadata
                .write(vec![(
                    manifest_row(&manifest.bucket, &signed.id),
                    RowValue::Immutable(signed.encoded.clone()),
                )])
                .await?;
            let Some(swap) = self
                .swap_head(
                    &manifest.bucket,
                    &manifest.key,
                    condition,
                    HeadWrite::Put(&row),
                    Some(deadline_unix_ms),
                )
                .await?
            else {
                // Judged again after proposing (judge_head): the same
                // fragments are committed again as a new version, its data
                // key wrapped for that version.
                manifest.version = self.new_version();
                manifest.created_unix_ms = now_unix_ms();
                manifest.encryption =
                    keys.envelope(&manifest.bucket, &manifest.key, manifest.version);
                continue;
            };
            let mut rows = vec![
                (
                    versions_row(&manifest.bucket, &manifest.key, &manifest.version),
                    RowValue::Version(Box::new(swap.head.clone())),
                ),
                (upload_key, register(None, at)),
            ];
            rows.extend(self.retirements(&swap).await?);
            for chunk in rows.chunks(1000) {
                metadata.write(chunk.to_vec()).await?;
            }
            return Ok(swap.head);
        }
        Err(GatewayError::Unavailable(format!(
            "the head of {}/{} changed under this write {IDENTITIES} times; nothing was committed",
            manifest.bucket, manifest.key
        )))
    }

    /// Deletes the current object of `key` if `condition` holds: the head
    /// becomes a purged delete marker, and every version it replaced is
    /// purged (their fragments go to the collector). A key with no current
    /// object is a success that changes nothing when the delete is
    /// conditional, except that versions a crashed writer left below the
    /// head are purged then too.
    pub async fn delete(
        &self,
        bucket: &str,
        key: &str,
        condition: &DeleteCondition,
    ) -> GatewayResult<()> {
        let at = self.node.metadata().timestamp();
        let marker = ObjectVersion {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            version: self.new_version(),
            created: at,
            seq: 0,
            body: VersionBody::DeleteMarker,
            retention: Retention::default(),
            legal_hold: Lww { value: false, at },
            purged: Some(at),
        };
        let write_condition = WriteCondition::Deleting(condition.clone());
        let swap = match self
            .swap_head(
                bucket,
                key,
                &write_condition,
                HeadWrite::Delete(&marker),
                None,
            )
            .await
        {
            Ok(None) => {
                return Err(GatewayError::Internal(
                    "a delete was judged as a new version".into(),
                ));
            }
            Err(GatewayError::NoSuchKey) => {
                match read_head(self.node.metadata(), bucket, key).await? {
                    Some(head) => HeadSwap {
                        replaced: None,
                        head,
                    },
                    None => return Ok(()),
                }
            }
            Ok(Some(swap)) => swap,
            Err(error) => return Err(error),
        };
        let rows = self.retirements(&swap).await?;
        let metadata = self.node.metadata();
        for chunk in rows.chunks(1000) {
            metadata.write(chunk.to_vec()).await?;
        }
        Ok(())
    }

    /// The rows that purge every version a decided head write replaced:
    /// the versions of the key with a lower sequence (the one the head
    /// named before, and any a crashed writer left), never the new head.
    /// Safe whatever else races: a head's sequence only grows, so a version
    /// below this one's can never again be what the head names.
    async fn retirements(&self, swap: &HeadSwap) -> GatewayResult<Vec<(RowKey, RowValue)>> {
        let head = &swap.head;
        let mut older: Vec<ObjectVersion> = self
            .existing_versions(&head.bucket, &head.key, None)
            .await?
            .into_iter()
            .filter(|v| v.seq < head.seq && v.version != head.version)
            .collect();
        // A head its writer never wrote out goes too.
        if let Some(replaced) = &swap.replaced
            && is_current_object(replaced)
            && replaced.version != head.version
            && !older.iter().any(|v| v.version == replaced.version)
        {
            older.push(replaced.clone());
        }
        let at = self.node.metadata().timestamp();
        Ok(purge_rows(older, at))
    }

    /// Sets the head of `key` to what `write` says if `condition` holds
    /// for the current head; the new head's sequence is one more than the
    /// current one's. Linearizable: of two writers racing on one
    /// condition, exactly one wins. The deadline is checked where the
    /// value is decided, so no commit lands after it. `None`: a PUT was
    /// judged again after proposing once, and must be committed again as
    /// a new version ([`judge_head`]).
    pub(crate) async fn swap_head(
        &self,
        bucket: &str,
        key: &str,
        condition: &WriteCondition,
        write: HeadWrite<'_>,
        deadline_unix_ms: Option<u64>,
    ) -> GatewayResult<Option<HeadSwap>> {
        // What each run of the change saw and proposed: the one whose
        // proposal was chosen is the answer (an earlier run's proposal can
        // be chosen after a later run judged another current head).
        let proposals: Mutex<Vec<HeadSwap>> = Mutex::new(Vec::new());
        let outcome = self
            .node
            .metadata()
            .compare_and_set(head_register(bucket, key), |current| {
                let head = current.and_then(|bytes| ObjectVersion::decode(bytes).ok());
                let mut proposals = proposals.lock().expect("head proposals");
                let new = judge_head(
                    condition,
                    &write,
                    head.as_ref(),
                    !proposals.is_empty(),
                    deadline_unix_ms.is_some_and(|deadline| now_unix_ms() > deadline),
                )?;
                let encoded = new.encode();
                proposals.push(HeadSwap {
                    replaced: head,
                    head: new,
                });
                Ok(Some(encoded))
            })
            .await?;
        match outcome {
            Ok(chosen) => {
                let chosen = chosen.unwrap_or_default();
                proposals
                    .into_inner()
                    .expect("head proposals")
                    .into_iter()
                    .rev()
                    .find(|swap| swap.head.encode() == chosen)
                    .map(Some)
                    .ok_or_else(|| {
                        GatewayError::Internal(
                            "the chosen head is none of this write's proposals".into(),
                        )
                    })
            }
            Err(HeadRefusal::JudgedAgain) => Ok(None),
            Err(HeadRefusal::SequenceExhausted) => Err(GatewayError::Internal(format!(
                "the head of {bucket}/{key} has the highest sequence there is"
            ))),
            Err(HeadRefusal::Condition) => Err(GatewayError::PreconditionFailed),
            Err(HeadRefusal::NoCurrentObject) => Err(GatewayError::NoSuchKey),
            Err(HeadRefusal::Deadline) => Err(self.deadline_error()),
        }
    }

    /// Pushes one segment's fragments to the nodes placement picks for it.
    /// A node that fails is replaced by the next of the ranking whose site
    /// still has room under the per-site cap, so that replacements keep
    /// the placement's promise. The segment is kept only if the fragments
    /// stored survive what the map promises (the loss of any one site plus
    /// `extra_nodes` nodes); then, if some are missing, it is recorded for
    /// repair before this returns. Otherwise the write fails, 503, and the
    /// collector releases what was stored with the rest of the upload.
    async fn push_segment(
        &self,
        placer: &Placer,
        target: &PushTarget<'_>,
        segment: Arc<EncodedSegment>,
    ) -> GatewayResult<SegmentRef> {
        let ids = segment.fragment_ids().to_vec();
        let key = segment_placement_key(&ids);
        let placed = placer.place(&key);
        let ranking = placer.rank(&key);
        // Spares in ranking order; one skipped now (its site full) may fit
        // a later replacement, so only the one taken leaves the list.
        let mut spares: Vec<NodeId> = ranking
            .into_iter()
            .filter(|n| !placed.contains(n))
            .collect();
        // Fragments per site that are stored or on their way.
        let mut per_site: HashMap<usize, usize> = HashMap::new();
        for node in &placed {
            if let Some(site) = placer.site_of(node) {
                *per_site.entry(site).or_default() += 1;
            }
        }
        let signing = self.node.identity().signing_key();
        let put = |index: usize, to: NodeId| {
            let segment = segment.clone();
            let id = ids[index];
            let hold = Hold::sign(signing, &id, target.upload, target.retain_until_unix_ms);
            async move {
                let result = self
                    .node
                    .put_fragment(&to, id, segment.fragment(index), hold)
                    .await;
                (index, to, result)
            }
        };
        let mut pending: FuturesUnordered<_> =
            placed.iter().enumerate().map(|(i, n)| put(i, *n)).collect();
        let mut holders: Vec<Option<NodeId>> = vec![None; ids.len()];
        let mut failures = Vec::new();
        while let Some((index, to, result)) = pending.next().await {
            match result {
                Ok(()) => holders[index] = Some(to),
                Err(error) => {
                    tracing::debug!(%to, %error, index, "fragment push failed; trying another node");
                    failures.push(format!("{to}: {error}"));
                    if let Some(site) = placer.site_of(&to) {
                        *per_site.entry(site).or_default() -= 1;
                    }
                    let room = |node: &NodeId| {
                        placer.site_of(node).is_some_and(|site| {
                            per_site.get(&site).copied().unwrap_or(0) < placer.site_cap()
                        })
                    };
                    if let Some(position) = spares.iter().position(room) {
                        let next = spares.remove(position);
                        if let Some(site) = placer.site_of(&next) {
                            *per_site.entry(site).or_default() += 1;
                        }
                        pending.push(put(index, next));
                    }
                }
            }
        }
        let stored: Vec<NodeId> = holders.iter().flatten().copied().collect();
        let scheme = placer.scheme();
        if !placer.survives(&stored) {
            return Err(GatewayError::Unavailable(format!(
                "{} of {} fragments of a segment stored, which would not survive the loss of a site: {}",
                stored.len(),
                scheme.total(),
                failures.join("; ")
            )));
        }
        if stored.len() < scheme.total() {
            let missing: Vec<u8> = holders
                .iter()
                .enumerate()
                .filter(|(_, holder)| holder.is_none())
                .map(|(index, _)| index as u8)
                .collect();
            tracing::warn!(
                stored = stored.len(),
                total = scheme.total(),
                "segment stored with reduced redundancy; recorded for repair"
            );
            let metadata = self.node.metadata();
            let record = DegradedRecord {
                since_unix_ms: now_unix_ms(),
                fragments: ids.clone(),
                missing,
            };
            metadata
                .write(vec![(
                    RowKey::new(
                        Partition::bucket(target.bucket),
                        Table::Degraded,
                        degraded_sort_key(target.key, target.upload.as_bytes(), &key),
                    ),
                    register(Some(record.encode()), metadata.timestamp()),
                )])
                .await?;
        }
        Ok(SegmentRef {
            ciphertext_len: segment.segment_len() as u32,
            fragments: ids,
        })
    }

    /// The version a GET without a version id reads: the one the key's
    /// head names, unless the key was deleted.
    pub async fn current(&self, bucket: &str, key: &str) -> GatewayResult<Option<ObjectVersion>> {
        Ok(read_head(self.node.metadata(), bucket, key)
            .await?
            .filter(is_current_object))
    }

    async fn existing_versions(
        &self,
        bucket: &str,
        key: &str,
        limit: Option<usize>,
    ) -> GatewayResult<Vec<ObjectVersion>> {
        existing_versions(self.node.metadata(), bucket, key, limit).await
    }

    /// Reads and checks the manifest of `version` and unwraps its data key.
    pub async fn open(&self, version: &ObjectVersion) -> GatewayResult<OpenObject> {
        let VersionBody::Data { manifest: id, .. } = &version.body else {
            return Err(GatewayError::NoSuchKey);
        };
        let manifest = read_manifest(self.node.metadata(), &version.bucket, id)
            .await?
            .ok_or_else(|| GatewayError::Corrupt(format!("manifest {id} is missing")))?;
        if (&manifest.bucket, &manifest.key, manifest.version)
            != (&version.bucket, &version.key, version.version)
        {
            return Err(GatewayError::Corrupt(format!(
                "manifest {id} belongs to another object"
            )));
        }
        let data_key = match manifest.encryption.kind {
            KeyKind::SseS3 => {
                let bucket_key = self.kms.key(&manifest.encryption.key_id).await?;
                unwrap_data_key(
                    &bucket_key,
                    &manifest.encryption.wrapped,
                    &WrapContext {
                        bucket: &manifest.bucket,
                        key: &manifest.key,
                        version: manifest.version,
                    },
                )
                .map_err(|e| GatewayError::Corrupt(format!("manifest {id}: {e}")))?
            }
            other => {
                return Err(GatewayError::Internal(format!(
                    "objects encrypted with {other:?} cannot be read by this gateway yet"
                )));
            }
        };
        Ok(OpenObject {
            manifest,
            data_key: Arc::new(data_key),
        })
    }

    /// Streams plaintext bytes `range` of an opened object. Segments are
    /// fetched a few ahead of the one being sent; the stream ends with an
    /// error (and the client sees a cut body) if a segment cannot be read.
    pub fn read(
        &self,
        object: OpenObject,
        range: Range<u64>,
    ) -> mpsc::Receiver<Result<Bytes, std::io::Error>> {
        let (sender, receiver) = mpsc::channel(2);
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(error) = store.send_range(&object, range, &sender).await {
                tracing::warn!(
                    bucket = %object.manifest.bucket,
                    key = %object.manifest.key,
                    %error,
                    "object read failed"
                );
                let _ = sender
                    .send(Err(std::io::Error::other(error.to_string())))
                    .await;
            }
        });
        receiver
    }

    async fn send_range(
        &self,
        object: &OpenObject,
        range: Range<u64>,
        sender: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> GatewayResult<()> {
        let manifest = &object.manifest;
        let layout = manifest.layout;
        let map = self.map()?;
        let placer = Arc::new(Self::placer(&map, layout.scheme)?);
        let own = self.node.node_id();
        let own_site = map.map.nodes.iter().find(|n| n.id == own).map(|n| &n.site);
        let same_site: HashSet<NodeId> = map
            .map
            .nodes
            .iter()
            .filter(|n| Some(&n.site) == own_site)
            .map(|n| n.id)
            .collect();
        // Asked once per read: deriving a peer id from a node id costs a
        // curve-point decompression.
        let reachable: HashSet<NodeId> = map
            .map
            .nodes
            .iter()
            .filter(|n| n.id == own || self.node.is_member(&n.id))
            .map(|n| n.id)
            .collect();
        let segment_bytes = layout.segment_bytes() as u64;
        let mut part_start = 0u64;
        for part in &manifest.parts {
            let part_end = part_start + part.plaintext_len;
            let start = range.start.max(part_start);
            let end = range.end.min(part_end);
            if start >= end {
                part_start = part_end;
                continue;
            }
            let plan = RangePlan::new(
                layout.chunk_size,
                part.plaintext_len,
                start - part_start..end - part_start,
            )
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
            let part_key = manifest.stream_key(&object.data_key, part);
            let mut decryptor = plan.decryptor(&part_key, part.number, layout.chunk_size);
            let cipher = plan.ciphertext.clone();
            let first = (cipher.start / segment_bytes) as usize;
            let last = cipher.end.div_ceil(segment_bytes) as usize;
            let fetches = futures::stream::iter(first..last)
                .map(|index| {
                    let placer = placer.clone();
                    let segment = &part.segments[index];
                    let (same_site, reachable) = (&same_site, &reachable);
                    async move {
                        self.fetch_segment(&placer, same_site, reachable, part.upload, segment)
                            .await
                            .map(|bytes| (index, bytes))
                    }
                })
                .buffered(SEGMENTS_AHEAD);
            futures::pin_mut!(fetches);
            while let Some(fetched) = fetches.next().await {
                let (index, bytes) = fetched?;
                let segment_start = index as u64 * segment_bytes;
                let from = cipher.start.max(segment_start) - segment_start;
                let to = cipher.end.min(segment_start + bytes.len() as u64) - segment_start;
                let mut plaintext = Vec::with_capacity((to - from) as usize);
                decryptor
                    .update(&bytes[from as usize..to as usize], &mut plaintext)
                    .map_err(|e| GatewayError::Corrupt(format!("segment {index}: {e}")))?;
                if !plaintext.is_empty() && sender.send(Ok(Bytes::from(plaintext))).await.is_err() {
                    return Ok(()); // The client went away.
                }
            }
            let mut tail = Vec::new();
            decryptor
                .finish(&mut tail)
                .map_err(|e| GatewayError::Corrupt(e.to_string()))?;
            if !tail.is_empty() && sender.send(Ok(Bytes::from(tail))).await.is_err() {
                return Ok(());
            }
            part_start = part_end;
        }
        Ok(())
    }

    /// Rebuilds one segment from any `k` of its fragments: the placed nodes
    /// first (connected ones, this node, then its site, data fragments
    /// before parity), a spare request when one is slow, the placed nodes
    /// that failed once more, then the upload's providers in the DHT for
    /// fragments that moved.
    async fn fetch_segment(
        &self,
        placer: &Placer,
        same_site: &HashSet<NodeId>,
        reachable: &HashSet<NodeId>,
        upload: UploadId,
        segment: &SegmentRef,
    ) -> GatewayResult<Vec<u8>> {
        let scheme = placer.scheme();
        let segment_len = segment.ciphertext_len as usize;
        let fragment_len = scheme.fragment_len(segment_len) as u64;
        let placement_key = segment_placement_key(&segment.fragments);
        let placed = placer.place(&placement_key);
        // Where a fragment went when its placed node failed during the
        // write: a spare node of the ranking, first in the site the failed
        // node left room in (push_segment's rule). Tried before the DHT.
        let spares: Vec<NodeId> = placer
            .rank(&placement_key)
            .into_iter()
            .filter(|n| !placed.contains(n) && reachable.contains(n))
            .collect();
        let mut elsewhere: HashMap<usize, std::vec::IntoIter<NodeId>> = HashMap::new();
        let mut next_elsewhere = |index: usize| -> Option<NodeId> {
            elsewhere
                .entry(index)
                .or_insert_with(|| {
                    let site = placer.site_of(&placed[index]);
                    let mut candidates = spares.clone();
                    candidates.sort_by_key(|n| placer.site_of(n) != site);
                    candidates.truncate(MAX_SPARES_ASKED);
                    candidates.into_iter()
                })
                .next()
        };
        let own = self.node.node_id();
        let mut order: Vec<usize> = (0..scheme.total()).collect();
        // Nodes this one is connected to first: asking a stopped node costs
        // a membership wait before it fails.
        order.sort_by_key(|&i| {
            let node = placed.get(i);
            (
                !node.is_some_and(|n| reachable.contains(n)),
                node != Some(&own),
                !node.is_some_and(|n| same_site.contains(n)),
                i >= scheme.data(),
                i,
            )
        });
        let mut queue = order.into_iter();
        let fetch = |index: usize, node: NodeId| {
            let id = segment.fragments[index];
            async move {
                let result = self.node.get_fragment(&node, id, 0, fragment_len).await;
                (index, node, result)
            }
        };
        let mut running = FuturesUnordered::new();
        for _ in 0..scheme.data() {
            if let Some(index) = queue.next() {
                running.push(fetch(index, placed[index]));
            }
        }
        let mut got: Vec<(usize, Vec<u8>)> = Vec::with_capacity(scheme.data());
        let mut failed: Vec<usize> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        let mut retried = false;
        while got.len() < scheme.data() {
            let next = tokio::time::timeout(SPARE_AFTER, running.next()).await;
            match next {
                Err(_) => {
                    // Endgame: a slow peer gets company.
                    if let Some(index) = queue.next() {
                        running.push(fetch(index, placed[index]));
                    }
                }
                Ok(Some((index, node, Ok(bytes)))) => {
                    if FragmentId::of(&bytes) == segment.fragments[index]
                        && !got.iter().any(|(i, _)| *i == index)
                    {
                        got.push((index, bytes));
                    } else if FragmentId::of(&bytes) != segment.fragments[index] {
                        errors.push(format!("{node} sent a corrupt fragment"));
                        failed.push(index);
                    }
                }
                Ok(Some((index, node, Err(error)))) => {
                    errors.push(format!("{node}: {error}"));
                    failed.push(index);
                    if let Some(index) = queue.next() {
                        running.push(fetch(index, placed[index]));
                    }
                    if let Some(spare) = next_elsewhere(index) {
                        running.push(fetch(index, spare));
                    }
                }
                Ok(None) if !retried && !failed.is_empty() => {
                    // Placement is exhausted: a node that was busy or
                    // briefly unreachable gets one more chance.
                    retried = true;
                    tokio::time::sleep(RETRY_AFTER).await;
                    failed.sort_unstable();
                    failed.dedup();
                    for index in failed.drain(..) {
                        running.push(fetch(index, placed[index]));
                    }
                }
                Ok(None) => {
                    // Still short: look for fragments that moved.
                    let Some(index) = failed.pop() else {
                        break;
                    };
                    let id = segment.fragments[index];
                    if let Ok(holders) = self.node.locate_fragment(&upload, &id).await {
                        for holder in holders.into_iter().filter(|h| *h != placed[index]) {
                            running.push(fetch(index, holder));
                        }
                    }
                }
            }
        }
        if got.len() < scheme.data() {
            return Err(GatewayError::Unavailable(format!(
                "{} of the {} fragments a segment needs could be read: {}",
                got.len(),
                scheme.data(),
                errors.join("; ")
            )));
        }
        let scheme_copy = scheme;
        tokio::task::spawn_blocking(move || {
            let fragments: Vec<(usize, &[u8])> =
                got.iter().map(|(i, b)| (*i, b.as_slice())).collect();
            reconstruct(scheme_copy, segment_len, &fragments)
        })
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?
        .map_err(|e| GatewayError::Corrupt(format!("segment: {e}")))
    }
}

/// What streaming a body produced.
pub(crate) struct StreamedBody {
    pub(crate) segments: Vec<SegmentRef>,
    pub(crate) md5: [u8; 16],
    pub(crate) checksum: Option<ChecksumHasher>,
}

/// One PUT's streaming state: batches of plaintext go through MD5 and the
/// encoder on a blocking thread; each finished segment is pushed while the
/// next is being encoded, at most [`SEGMENTS_IN_FLIGHT`] at a time.
/// Where a segment's fragments go and what their holds say.
pub(crate) struct PushTarget<'a> {
    pub(crate) bucket: &'a str,
    pub(crate) key: &'a str,
    pub(crate) upload: UploadId,
    pub(crate) retain_until_unix_ms: u64,
}

pub(crate) struct StreamPut<'a> {
    pub(crate) store: &'a ObjectStore,
    pub(crate) placer: Arc<Placer>,
    pub(crate) target: PushTarget<'a>,
    /// No segment is pushed after this: the collector may be releasing
    /// the upload.
    pub(crate) deadline_unix_ms: u64,
}

impl StreamPut<'_> {
    pub(crate) async fn run<S, E>(
        &self,
        pipeline: PutPipeline,
        length: u64,
        checksum: Option<ChecksumHasher>,
        mut body: S,
    ) -> GatewayResult<StreamedBody>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut state = Some((pipeline, md5::Md5::new(), checksum));
        let mut received: u64 = 0;
        let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
        let mut pushes = FuturesUnordered::new();
        let mut segments: Vec<Option<SegmentRef>> = Vec::new();
        let mut finished = false;
        loop {
            // Segments in flight make progress while the body is awaited:
            // a FuturesUnordered only runs when it is polled.
            let next = loop {
                tokio::select! {
                    biased;
                    Some(done) = pushes.next(), if !pushes.is_empty() => {
                        record(&mut segments, Some(done))?;
                    }
                    next = body.next() => break next,
                }
            };
            match next {
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if received > length {
                        return Err(GatewayError::BodyTooLong { expected: length });
                    }
                    batch.extend_from_slice(&chunk);
                    if batch.len() < BATCH_BYTES {
                        continue;
                    }
                }
                Some(Err(error)) => return Err(body_error(error)),
                None => {
                    if received < length {
                        return Err(GatewayError::IncompleteBody {
                            expected: length,
                            got: received,
                        });
                    }
                    finished = true;
                }
            }
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_BYTES));
            let (pipeline, mut md5, mut checksum) = state.take().expect("encoder state");
            let (pipeline, md5, checksum, encoded) = tokio::task::spawn_blocking(move || {
                md5.update(&full);
                if let Some(checksum) = &mut checksum {
                    checksum.update(&full);
                }
                let mut encoded = Vec::new();
                let mut pipeline = pipeline;
                let outcome = pipeline.push(&full, &mut encoded);
                let pipeline = match (outcome, finished) {
                    (Err(e), _) => return Err(e),
                    (Ok(()), true) => {
                        encoded.push(pipeline.finish()?);
                        None
                    }
                    (Ok(()), false) => Some(pipeline),
                };
                Ok((pipeline, md5, checksum, encoded))
            })
            .await
            .map_err(|e| GatewayError::Internal(e.to_string()))?
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
            for segment in encoded {
                while pushes.len() >= SEGMENTS_IN_FLIGHT {
                    record(&mut segments, pushes.next().await)?;
                }
                if now_unix_ms() > self.deadline_unix_ms {
                    return Err(self.store.deadline_error());
                }
                let index = segments.len();
                segments.push(None);
                let placer = self.placer.clone();
                pushes.push(async move {
                    let pushed = self
                        .store
                        .push_segment(&placer, &self.target, Arc::new(segment))
                        .await;
                    (index, pushed)
                });
            }
            match pipeline {
                Some(pipeline) => state = Some((pipeline, md5, checksum)),
                None => {
                    while let Some(done) = pushes.next().await {
                        record(&mut segments, Some(done))?;
                    }
                    let segments = segments
                        .into_iter()
                        .map(|s| s.expect("every push recorded"))
                        .collect();
                    return Ok(StreamedBody {
                        segments,
                        md5: md5.finalize().into(),
                        checksum,
                    });
                }
            }
        }
    }
}

/// What a failed body means. s3s checks a signed payload's SHA-256 as the
/// body passes and reports a mismatch only through its error's text.
fn body_error(error: impl std::fmt::Display) -> GatewayError {
    let text = error.to_string();
    if text.contains("Sha256Mismatch") {
        GatewayError::ContentSha256Mismatch
    } else {
        GatewayError::ClientBody(text)
    }
}

fn record(
    segments: &mut [Option<SegmentRef>],
    done: Option<(usize, GatewayResult<SegmentRef>)>,
) -> GatewayResult<()> {
    if let Some((index, pushed)) = done {
        segments[index] = Some(pushed?);
    }
    Ok(())
}

/// `headers` with the object's checksum added, of S3's `kind`
/// (FULL_OBJECT or COMPOSITE).
pub(crate) fn with_checksum(
    headers: StoredHeaders,
    algorithm: Algorithm,
    value: String,
    kind: &str,
) -> GatewayResult<StoredHeaders> {
    let mut pairs: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    pairs.push((algorithm.header().to_owned(), value));
    pairs.push(("x-amz-checksum-type".to_owned(), kind.to_owned()));
    StoredHeaders::new(pairs).map_err(|e| GatewayError::MetadataTooLarge(e.to_string()))
}

#[cfg(test)]
mod tests {
    use cairn_protocol::hlc::{Hlc, Timestamp};
    use cairn_protocol::ids::{ManifestId, NodeId};

    use super::*;

    fn version(n: u8, seq: u64, body: VersionBody) -> ObjectVersion {
        let at = Timestamp {
            hlc: Hlc::new(1_000 + u64::from(n), 0),
            node: NodeId([1; 32]),
        };
        ObjectVersion {
            bucket: "b".into(),
            key: "k".into(),
            version: VersionId::new(1_000 + u64::from(n), [n; 10]),
            created: at,
            seq,
            body,
            retention: Retention::default(),
            legal_hold: Lww { value: false, at },
            purged: None,
        }
    }

    fn data(n: u8, seq: u64) -> ObjectVersion {
        version(
            n,
            seq,
            VersionBody::Data {
                manifest: ManifestId([n; 32]),
                size_bytes: 1,
                etag: format!("\"e{n}\""),
                headers: StoredHeaders::default(),
            },
        )
    }

    #[test]
    fn a_head_write_takes_the_next_sequence_when_its_condition_holds() {
        let current = data(1, 7);
        let mine = data(2, 0);
        let put = HeadWrite::Put(&mine);
        let head = judge_head(&WriteCondition::Always, &put, Some(&current), false, false);
        assert_eq!(head.map(|h| (h.version, h.seq)), Ok((mine.version, 8)));
        assert_eq!(
            judge_head(&WriteCondition::Always, &put, None, false, false).map(|h| h.seq),
            Ok(1)
        );
        let refusals = [
            (
                WriteCondition::IfAbsent,
                Some(&current),
                HeadRefusal::Condition,
            ),
            (
                WriteCondition::IfMatch("other".into()),
                Some(&current),
                HeadRefusal::Condition,
            ),
            (
                WriteCondition::IfMatch("e1".into()),
                None,
                HeadRefusal::NoCurrentObject,
            ),
            (
                WriteCondition::IfPresent,
                None,
                HeadRefusal::NoCurrentObject,
            ),
        ];
        for (condition, current, refusal) in refusals {
            assert_eq!(
                judge_head(&condition, &put, current, false, false),
                Err(refusal),
                "{condition:?}"
            );
        }
        assert_eq!(
            judge_head(
                &WriteCondition::IfMatch("e1".into()),
                &put,
                Some(&current),
                false,
                false
            )
            .map(|h| h.seq),
            Ok(8)
        );
        assert_eq!(
            judge_head(&WriteCondition::Always, &put, Some(&current), false, true),
            Err(HeadRefusal::Deadline)
        );
        assert_eq!(
            judge_head(
                &WriteCondition::Always,
                &put,
                Some(&data(1, u64::MAX)),
                false,
                false
            ),
            Err(HeadRefusal::SequenceExhausted)
        );
    }

    /// An earlier proposal of this PUT may have been chosen, then replaced
    /// and purged by another writer: proposing the same version again
    /// would hide it from listings once acknowledged.
    #[test]
    fn a_put_judged_again_after_proposing_asks_for_a_new_version() {
        let current = data(1, 7);
        let mine = data(2, 0);
        assert_eq!(
            judge_head(
                &WriteCondition::Always,
                &HeadWrite::Put(&mine),
                Some(&current),
                true,
                false
            ),
            Err(HeadRefusal::JudgedAgain)
        );
        // A delete marker is no version row: it is simply proposed again.
        let marker = version(3, 0, VersionBody::DeleteMarker);
        let deleting = WriteCondition::Deleting(DeleteCondition::default());
        assert_eq!(
            judge_head(
                &deleting,
                &HeadWrite::Delete(&marker),
                Some(&current),
                true,
                false
            )
            .map(|h| h.seq),
            Ok(8)
        );
        // A DELETE naming another version than the current one deletes
        // nothing.
        let named = WriteCondition::Deleting(DeleteCondition {
            version: Some(data(9, 0).version),
            ..DeleteCondition::default()
        });
        assert_eq!(
            judge_head(
                &named,
                &HeadWrite::Delete(&marker),
                Some(&current),
                false,
                false
            ),
            Err(HeadRefusal::NoCurrentObject)
        );
    }
}
