//! The head register of each key (spec/gateway.md, "Heads") and the
//! policy of what a write or a delete does to a key's versions
//! (spec/versioning.md): the head is decided by compare-and-set, so of two
//! writers racing on one condition exactly one wins; a null version
//! purges the null versions below it, a version with its own id keeps
//! everything.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_node::clock::now_unix_ms;
use cairn_node::meta::Metadata;
use cairn_node::swarm::NodeHandle;
use cairn_protocol::guard::{GuardChange, GuardRefusal};
use cairn_protocol::hlc::Timestamp;
use cairn_protocol::ids::{ManifestId, VersionId, VersionIdGenerator};
use cairn_protocol::manifest::{Manifest, SignedManifest};
use cairn_protocol::meta::{Partition, RowKey, RowValue, Table};
use cairn_protocol::metarpc::RegisterKey;
use cairn_protocol::records::Versioning;
use cairn_protocol::version::{Lww, ObjectVersion, Retention, StoredHeaders, VersionBody};

use crate::error::{ModelError, ModelResult};
use crate::kms::DataKeys;
use crate::locks::{LockError, decide_version_change};
use crate::rows::{manifest_row, purge_rows, register, versions_row};
use crate::uploads::Uploads;
use cairn_node::clock::random_bytes;

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
pub(crate) fn head_register(bucket: &str, key: &str) -> RegisterKey {
    RegisterKey {
        partition: Partition::bucket(bucket),
        name: key.as_bytes().to_vec(),
    }
}

/// The existing versions of `key`, newest first, `limit` at most.
pub async fn existing_versions(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
    limit: Option<usize>,
) -> ModelResult<Vec<ObjectVersion>> {
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
pub async fn read_manifest(
    metadata: &Metadata,
    bucket: &str,
    id: &ManifestId,
) -> ModelResult<Option<Manifest>> {
    let value = metadata
        .read(vec![manifest_row(bucket, id)])
        .await?
        .remove(0);
    let Some(RowValue::Immutable(bytes)) = value else {
        return Ok(None);
    };
    let signed = SignedManifest::decode(&bytes)
        .map_err(|e| ModelError::Corrupt(format!("manifest {id}: {e}")))?;
    if signed.id != *id {
        return Err(ModelError::Corrupt(format!("manifest {id} has another id")));
    }
    Ok(Some(signed.manifest))
}

/// The key's head (spec/gateway.md, "Heads"): the version its last
/// decided write names, whether or not that writer wrote the version row
/// out — a data version, or a purged delete marker once the key was
/// deleted; `None` for a key never written. A linearizable read.
pub async fn read_head(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
) -> ModelResult<Option<ObjectVersion>> {
    let value = metadata.read_register(head_register(bucket, key)).await?;
    value
        .map(|bytes| ObjectVersion::decode(&bytes))
        .transpose()
        .map_err(|e| ModelError::Corrupt(format!("head of {key}: {e}")))
}

/// Whether `head` names an object a GET returns (not a delete marker).
pub fn is_current_object(head: &ObjectVersion) -> bool {
    matches!(head.body, VersionBody::Data { .. }) && head.purged.is_none()
}

/// The key's latest version, data or delete marker, as a GET without a
/// version id sees it: the version the head names while it exists; once
/// the head's version was deleted by id (a purged head whose version has
/// a row), the existing version with the highest sequence — what
/// ListObjects takes too. A purged head without a row is the DELETE of a
/// bucket that keeps no history: nothing is current.
pub async fn latest_version(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
) -> ModelResult<Option<ObjectVersion>> {
    match read_head(metadata, bucket, key).await? {
        None => Ok(None),
        Some(head) if head.purged.is_none() => Ok(Some(head)),
        Some(head) => below_purged_head(metadata, &head).await,
    }
}

/// What is latest under a purged head ([`latest_version`]).
async fn below_purged_head(
    metadata: &Metadata,
    head: &ObjectVersion,
) -> ModelResult<Option<ObjectVersion>> {
    let row = versions_row(&head.bucket, &head.key, &head.version);
    if metadata.read(vec![row]).await?[0].is_none() {
        return Ok(None);
    }
    newest_existing(metadata, &head.bucket, &head.key).await
}

/// The existing version of `key` with the highest sequence.
async fn newest_existing(
    metadata: &Metadata,
    bucket: &str,
    key: &str,
) -> ModelResult<Option<ObjectVersion>> {
    Ok(existing_versions(metadata, bucket, key, None)
        .await?
        .into_iter()
        .max_by_key(|v| v.seq))
}

/// A version as a client names it: `null`, or an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    Null,
    Id(VersionId),
}

impl VersionRef {
    /// Whether `version` is the one named.
    pub fn names(&self, version: &ObjectVersion) -> bool {
        match self {
            VersionRef::Null => version.null,
            VersionRef::Id(id) => !version.null && version.version == *id,
        }
    }
}

/// The id a client sees for `version`: `null` for a null version.
pub fn version_id_text(version: &ObjectVersion) -> String {
    if version.null {
        "null".to_owned()
    } else {
        version.version.to_text()
    }
}

/// What a write sets a key's head to.
pub enum HeadWrite<'a> {
    /// This data version; its sequence is decided with the head.
    Put(&'a ObjectVersion),
    /// A delete marker: purged in a bucket that keeps no history (the
    /// key has no current object), a version of its own otherwise.
    Delete(&'a ObjectVersion),
    /// The permanent delete of this version: if the head names it, the
    /// head becomes it purged, stamped `at`, and what is latest is found
    /// below ([`latest_version`]); otherwise the head stays.
    Remove { version: VersionId, at: Timestamp },
    /// A lock decided by this version's guard, shown by the head too if
    /// it names the version (merged, so that changes landing in any order
    /// leave the latest); the sequence stays.
    Relock {
        version: VersionId,
        retention: Retention,
        legal_hold: Lww<bool>,
    },
}

/// Why a head write's change refuses the current head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadRefusal {
    Condition,
    NoCurrentObject,
    Deadline,
    SequenceExhausted,
    /// A PUT judged again after it proposed once: see [`judge_head`].
    JudgedAgain,
    /// A permanent delete of a version the head does not name.
    NotHead,
}

/// The head a write proposes over `current`, or why it refuses.
///
/// A PUT that already proposed once in this compare-and-set, and is asked
/// to judge again, refuses: its earlier proposal may have been chosen and
/// then replaced by another writer, who purged it as a version below its
/// own. Proposed again, the same version would hold two places in the
/// key's history and the first one's purge would hide the second from
/// listings. The caller commits the write again as a new version instead.
/// A DELETE's marker is written out only after its head is decided, so it
/// is proposed again.
///
/// `current_object` is what the conditions are judged against: the
/// current head's object, or the version below a purged head.
pub fn judge_head(
    condition: &WriteCondition,
    write: &HeadWrite<'_>,
    current: Option<&ObjectVersion>,
    current_object: Option<&ObjectVersion>,
    proposed_before: bool,
    past_deadline: bool,
) -> Result<ObjectVersion, HeadRefusal> {
    let current_object = current_object.filter(|h| is_current_object(h));
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
    let mut new = match write {
        HeadWrite::Put(version) => {
            if proposed_before {
                return Err(HeadRefusal::JudgedAgain);
            }
            (*version).clone()
        }
        // A marker that becomes a row is a version like a PUT's: proposed
        // once (its first proposal may stand below the head already).
        HeadWrite::Delete(marker) if proposed_before && marker.purged.is_none() => {
            return Err(HeadRefusal::JudgedAgain);
        }
        HeadWrite::Delete(marker) => (*marker).clone(),
        HeadWrite::Remove { version, at } => match current {
            Some(head) if head.purged.is_none() && head.version == *version => {
                let mut removed = head.clone();
                removed.purged = Some(*at);
                removed
            }
            _ => return Err(HeadRefusal::NotHead),
        },
        HeadWrite::Relock {
            version,
            retention,
            legal_hold,
        } => {
            return match current {
                Some(head) if head.purged.is_none() && head.version == *version => {
                    let mut relocked = head.clone();
                    relocked.retention = head.retention.join(*retention);
                    relocked.legal_hold = head.legal_hold.join(*legal_hold);
                    Ok(relocked)
                }
                _ => Err(HeadRefusal::NotHead),
            };
        }
    };
    new.seq = match current.map_or(Some(1), |h| h.seq.checked_add(1)) {
        Some(seq) => seq,
        None => return Err(HeadRefusal::SequenceExhausted),
    };
    Ok(new)
}

/// The Object Lock a new version is written with (spec/versioning.md,
/// "Object Lock"): its retention and legal hold, decided before the
/// commit; later changes go through the version's lock guard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NewLock {
    pub retention: Retention,
    pub legal_hold: bool,
}

/// How a commit decides its head and what it writes (ObjectIndex::commit).
#[derive(Debug, Clone, Copy)]
pub struct CommitRules<'a> {
    pub condition: &'a WriteCondition,
    /// Past this the head refuses the write.
    pub deadline_unix_ms: u64,
    /// The version's time when it is not now (a trash restore).
    pub created: Option<Timestamp>,
    /// The bucket's versioning when the write began.
    pub versioning: Versioning,
    pub lock: NewLock,
}

/// The outcome of a decided head write.
pub struct HeadSwap {
    /// The head the write replaced.
    pub replaced: Option<ObjectVersion>,
    /// The head as decided, with its sequence.
    pub head: ObjectVersion,
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
    pub fn is_unconditional(&self) -> bool {
        *self == Self::default()
    }

    /// Whether every precondition holds for `head` (a delete marker meets
    /// none).
    pub fn holds_for(&self, head: &ObjectVersion) -> bool {
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

/// What a DELETE without a version id did.
#[derive(Debug, Default)]
pub struct Deletion {
    /// The delete marker it wrote, in a bucket that keeps history.
    pub marker: Option<ObjectVersion>,
    /// Whether this delete moved the head (else its condition found no
    /// current object to delete).
    pub changed: bool,
}

/// The object index of one gateway: heads, versions and manifests, and
/// the version ids it hands out. Cheap to clone.
#[derive(Clone)]
pub struct ObjectIndex {
    node: NodeHandle,
    versions: Arc<Mutex<VersionIdGenerator>>,
    /// Added to the wall clock for version ids (tests reproduce gateways
    /// whose clocks disagree with it).
    clock_skew_ms: i64,
    /// How long a write may take from its start to its commit.
    write_deadline: Duration,
}

impl ObjectIndex {
    pub fn new(node: NodeHandle, write_deadline: Duration, clock_skew_ms: i64) -> Self {
        Self {
            node,
            versions: Arc::default(),
            clock_skew_ms,
            write_deadline,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        self.node.metadata()
    }

    /// The multipart uploads.
    pub fn uploads(&self) -> Uploads<'_> {
        Uploads::new(self.node.metadata())
    }

    /// When a write starting at `started_unix_ms` must have committed
    /// (spec/gateway.md, "Collecting orphan fragments").
    pub fn write_deadline(&self, started_unix_ms: u64) -> u64 {
        started_unix_ms.saturating_add(self.write_deadline.as_millis() as u64)
    }

    pub fn deadline_error(&self) -> ModelError {
        ModelError::WriteDeadline {
            minutes: self.write_deadline.as_secs() / 60,
        }
    }

    /// A fresh version id, later than any this gateway handed out.
    pub fn new_version(&self) -> VersionId {
        self.versions.lock().expect("version generator").next(
            now_unix_ms().saturating_add_signed(self.clock_skew_ms),
            random_bytes(),
        )
    }

    /// The object a GET without a version id reads: the latest version,
    /// unless it is a delete marker.
    pub async fn current(&self, bucket: &str, key: &str) -> ModelResult<Option<ObjectVersion>> {
        Ok(self
            .latest(bucket, key)
            .await?
            .filter(|v| matches!(v.body, VersionBody::Data { .. })))
    }

    /// The latest version of `key`, data or delete marker
    /// ([`latest_version`]).
    pub async fn latest(&self, bucket: &str, key: &str) -> ModelResult<Option<ObjectVersion>> {
        latest_version(self.node.metadata(), bucket, key).await
    }

    /// The existing version `wanted` names, data or delete marker.
    pub async fn version(
        &self,
        bucket: &str,
        key: &str,
        wanted: VersionRef,
    ) -> ModelResult<Option<ObjectVersion>> {
        let metadata = self.node.metadata();
        let now = now_unix_ms();
        match wanted {
            VersionRef::Id(id) => {
                let row = metadata
                    .read(vec![versions_row(bucket, key, &id)])
                    .await?
                    .remove(0);
                Ok(match row {
                    Some(RowValue::Version(version))
                        if version.exists(now) && wanted.names(&version) =>
                    {
                        Some(*version)
                    }
                    _ => None,
                })
            }
            // The head first: its row may not be written yet. Otherwise a
            // crash can leave two null versions for a moment (the newer
            // one's write purges the older): the newer is the one.
            VersionRef::Null => {
                if let Some(head) = read_head(metadata, bucket, key).await?
                    && head.null
                    && head.purged.is_none()
                {
                    return Ok(Some(head));
                }
                Ok(self
                    .existing_versions(bucket, key, None)
                    .await?
                    .into_iter()
                    .filter(|v| v.null)
                    .max_by_key(|v| v.seq))
            }
        }
    }

    pub async fn existing_versions(
        &self,
        bucket: &str,
        key: &str,
        limit: Option<usize>,
    ) -> ModelResult<Vec<ObjectVersion>> {
        existing_versions(self.node.metadata(), bucket, key, limit).await
    }

    /// Commits an object whose fragments are durable: the signed manifest
    /// first (invisible alone), then the key's head register by
    /// compare-and-set (where the condition is decided, and which orders
    /// every write of the key: the version's sequence is decided there),
    /// then the version row with the end of the upload and what the
    /// bucket's `versioning` does below it ([`Self::settle_below`]). Past
    /// `deadline_unix_ms` the head refuses it: the collector may by then
    /// be releasing the upload's fragments. `created` is the version's
    /// time when it is not now: a version restored from the trash keeps
    /// the time it was first committed.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit(
        &self,
        mut manifest: Manifest,
        keys: &DataKeys,
        headers: StoredHeaders,
        upload_key: RowKey,
        rules: CommitRules<'_>,
    ) -> ModelResult<ObjectVersion> {
        let CommitRules {
            condition,
            deadline_unix_ms,
            created,
            versioning,
            lock,
        } = rules;
        const IDENTITIES: usize = 8;
        let metadata = self.node.metadata();
        for _ in 0..IDENTITIES {
            let signed = manifest
                .clone()
                .sign(self.node.identity().signing_key())
                .map_err(|e| ModelError::Internal(format!("manifest: {e}")))?;
            let at = metadata.timestamp();
            let row = ObjectVersion {
                bucket: manifest.bucket.clone(),
                key: manifest.key.clone(),
                version: manifest.version,
                created: created.unwrap_or(at),
                seq: 0,
                null: versioning != Versioning::Enabled,
                body: VersionBody::Data {
                    manifest: signed.id,
                    size_bytes: manifest.plaintext_len(),
                    etag: manifest.etag.clone(),
                    headers: headers.clone(),
                },
                retention: lock.retention,
                legal_hold: Lww {
                    value: lock.legal_hold,
                    at,
                },
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
                if created.is_none() {
                    manifest.created_unix_ms = now_unix_ms();
                }
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
            rows.extend(self.settle_below(&swap).await?);
            for chunk in rows.chunks(1000) {
                metadata.write(chunk.to_vec()).await?;
            }
            return Ok(swap.head);
        }
        Err(ModelError::Unavailable(format!(
            "the head of {}/{} changed under this write {IDENTITIES} times; nothing was committed",
            manifest.bucket, manifest.key
        )))
    }

    /// Deletes the current object of `key` if `condition` holds. In a
    /// bucket that keeps no history (`versioning` Unversioned) the head
    /// becomes a purged delete marker and every version it replaced is
    /// purged (their fragments go to the collector); no marker is
    /// answered. Otherwise the head becomes a delete marker of its own,
    /// written out as a version (a null one while versioning is Suspended,
    /// which replaces the null version), and the answer is that marker. A
    /// key with no current object is a success that changes nothing when
    /// the delete is conditional, except that versions a crashed writer
    /// left below the head are settled then too.
    pub async fn delete(
        &self,
        bucket: &str,
        key: &str,
        condition: &DeleteCondition,
        versioning: Versioning,
    ) -> ModelResult<Deletion> {
        const IDENTITIES: usize = 8;
        let keeps_history = versioning != Versioning::Unversioned;
        let write_condition = WriteCondition::Deleting(condition.clone());
        let mut decided = None;
        for _ in 0..IDENTITIES {
            let at = self.node.metadata().timestamp();
            let marker = ObjectVersion {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                version: self.new_version(),
                created: at,
                seq: 0,
                null: versioning != Versioning::Enabled,
                body: VersionBody::DeleteMarker,
                retention: Retention::default(),
                legal_hold: Lww { value: false, at },
                purged: (!keeps_history).then_some(at),
            };
            let outcome = self
                .swap_head(
                    bucket,
                    key,
                    &write_condition,
                    HeadWrite::Delete(&marker),
                    None,
                )
                .await;
            // Judged again after proposing: a new marker, as for a PUT.
            if !matches!(outcome, Ok(None)) {
                decided = Some((marker, outcome));
                break;
            }
        }
        let Some((marker, outcome)) = decided else {
            return Err(ModelError::Unavailable(format!(
                "the head of {bucket}/{key} changed under this delete {IDENTITIES} times; nothing was deleted"
            )));
        };
        let swap = match outcome {
            Ok(None) => unreachable!("judged again is retried above"),
            Err(ModelError::NoSuchKey) => {
                match read_head(self.node.metadata(), bucket, key).await? {
                    Some(head) => HeadSwap {
                        replaced: None,
                        head,
                    },
                    None => return Ok(Deletion::default()),
                }
            }
            Ok(Some(swap)) => swap,
            Err(error) => return Err(error),
        };
        let mut rows = self.settle_below(&swap).await?;
        let changed = swap.head.version == marker.version;
        let written = keeps_history && changed;
        if written {
            rows.push((
                versions_row(bucket, key, &swap.head.version),
                RowValue::Version(Box::new(swap.head.clone())),
            ));
        }
        let metadata = self.node.metadata();
        for chunk in rows.chunks(1000) {
            metadata.write(chunk.to_vec()).await?;
        }
        Ok(Deletion {
            marker: written.then_some(swap.head),
            changed,
        })
    }

    /// Deletes the version `wanted` names permanently, if no lock holds it
    /// (decided by its lock guard, spec/metadata.md "Locks and permanent
    /// deletes"). If the head names it, the head becomes it purged, so
    /// that the version below is latest again. The answer is the version
    /// deleted; `None` when no such version exists (a success that
    /// changes nothing, as in S3).
    /// The preconditions of `condition` are judged against the version
    /// itself, whose content never changes.
    pub async fn delete_version(
        &self,
        bucket: &str,
        key: &str,
        wanted: VersionRef,
        condition: &DeleteCondition,
        bypass_governance: bool,
    ) -> ModelResult<Option<ObjectVersion>> {
        let Some(target) = self.version(bucket, key, wanted).await? else {
            // A purge decided earlier may have stopped before the head
            // moved off the version or its release was written.
            if let VersionRef::Id(id) = wanted {
                self.finish_purge(bucket, key, id).await?;
            }
            return Ok(None);
        };
        if !condition.is_unconditional() && !condition.holds_for(&target) {
            return Err(ModelError::PreconditionFailed);
        }
        Ok(self
            .purge(target, bypass_governance)
            .await?
            .map(|(deleted, _)| deleted))
    }

    /// Deletes `target` (a version read from its row) permanently if its
    /// lock guard lets it (`AccessDenied` otherwise): the rest of
    /// [`Self::delete_version`], for a caller that found the version
    /// itself. `None` when it no longer exists; else the version, and
    /// whether this call decided the purge (not one before it).
    pub async fn purge(
        &self,
        target: ObjectVersion,
        bypass_governance: bool,
    ) -> ModelResult<Option<(ObjectVersion, bool)>> {
        let (bucket, key) = (target.bucket.as_str(), target.key.as_str());
        let metadata = self.node.metadata();
        let row = versions_row(bucket, key, &target.version);
        let purge = GuardChange::Purge { bypass_governance };
        let decided = match decide_version_change(metadata, &row, purge).await {
            Ok(_) => true,
            // Decided before by a delete that stopped: it is finished here.
            Err(LockError::Refused(GuardRefusal::Purged)) => false,
            Err(LockError::NoSuchVersion) => return Ok(None),
            Err(LockError::Refused(refusal)) => {
                return Err(ModelError::AccessDenied(format!(
                    "version {} of {key} cannot be deleted: {refusal}",
                    version_id_text(&target)
                )));
            }
            Err(LockError::Corrupt(why)) => return Err(ModelError::Corrupt(why)),
            Err(LockError::Meta(error)) => return Err(error.into()),
        };
        let at = metadata.timestamp();
        let removal = HeadWrite::Remove {
            version: target.version,
            at,
        };
        match self
            .swap_head(bucket, key, &WriteCondition::Always, removal, None)
            .await
        {
            Ok(_) | Err(ModelError::NoSuchVersion) => {}
            Err(error) => return Err(error),
        }
        let rows = purge_rows(vec![target.clone()], at);
        metadata.write(rows).await?;
        Ok(Some((target, decided)))
    }

    /// Finishes the permanent delete of version `id` if its row says it
    /// was purged (a delete, or a lock change refused as purged, stopped
    /// after deciding it): the head moves off it and its release row is
    /// written. Idempotent; nothing for a version that exists.
    pub async fn finish_purge(&self, bucket: &str, key: &str, id: VersionId) -> ModelResult<()> {
        let metadata = self.node.metadata();
        let Some(RowValue::Version(row)) = metadata
            .read(vec![versions_row(bucket, key, &id)])
            .await?
            .remove(0)
        else {
            return Ok(());
        };
        if row.purged.is_none() || row.exists(now_unix_ms()) {
            return Ok(());
        }
        let at = metadata.timestamp();
        let removal = HeadWrite::Remove { version: id, at };
        match self
            .swap_head(bucket, key, &WriteCondition::Always, removal, None)
            .await
        {
            Ok(_) | Err(ModelError::NoSuchVersion) => {}
            Err(error) => return Err(error),
        }
        metadata.write(purge_rows(vec![*row], at)).await?;
        Ok(())
    }

    /// What a decided head write does below it: a null head purges the
    /// null versions below it (S3's null version is replaced; in a bucket
    /// that never kept history every version is null); a head with its own
    /// id purges nothing. The head it replaced may be one whose writer
    /// stopped before doing this: its part is done too (the null versions
    /// below a null one are purged), and it is written out if it has no
    /// row (purged when the new head replaces it).
    /// Safe whatever else races: a head's sequence only grows, so a
    /// version below this one's can never again be what the head names.
    async fn settle_below(&self, swap: &HeadSwap) -> ModelResult<Vec<(RowKey, RowValue)>> {
        let head = &swap.head;
        let at = self.node.metadata().timestamp();
        let replaced = swap.replaced.as_ref().filter(|r| r.version != head.version);
        // Null versions below this sequence are replaced.
        let floor = [
            head.null.then_some(head.seq),
            replaced.filter(|r| r.null).map(|r| r.seq),
        ]
        .into_iter()
        .flatten()
        .max();
        let mut rows = Vec::new();
        let mut older = Vec::new();
        let mut existing = None;
        if let Some(floor) = floor {
            let found = self
                .existing_versions(&head.bucket, &head.key, None)
                .await?;
            older.extend(
                found
                    .iter()
                    .filter(|v| {
                        v.null
                            && v.seq < floor
                            && v.version != head.version
                            && replaced.is_none_or(|r| r.version != v.version)
                    })
                    .cloned(),
            );
            existing = Some(found);
        }
        if let Some(replaced) = replaced.filter(|r| r.purged.is_none()) {
            let retired = head.null && replaced.null;
            let listed = existing
                .as_ref()
                .is_some_and(|e| e.iter().any(|v| v.version == replaced.version));
            if retired {
                // Idempotent: its row purged whether written or not.
                older.push(replaced.clone());
            } else if !listed {
                let row = versions_row(&replaced.bucket, &replaced.key, &replaced.version);
                if self.metadata().read(vec![row.clone()]).await?[0].is_none() {
                    rows.push((row, RowValue::Version(Box::new(replaced.clone()))));
                }
            }
        }
        rows.extend(purge_rows(older, at));
        Ok(rows)
    }

    /// Sets the head of `key` to what `write` says if `condition` holds
    /// for the current head; the new head's sequence is one more than the
    /// current one's. Linearizable: of two writers racing on one
    /// condition, exactly one wins. The deadline is checked where the
    /// value is decided, so no commit lands after it. `None`: a PUT was
    /// judged again after proposing once, and must be committed again as
    /// a new version ([`judge_head`]).
    pub async fn swap_head(
        &self,
        bucket: &str,
        key: &str,
        condition: &WriteCondition,
        write: HeadWrite<'_>,
        deadline_unix_ms: Option<u64>,
    ) -> ModelResult<Option<HeadSwap>> {
        // A condition on a key whose head's version was deleted is judged
        // against the version below, found before the compare-and-set and
        // used while the head is the purged one it was found under.
        let below_purged_head = match condition {
            WriteCondition::Always => None,
            _ => match read_head(self.metadata(), bucket, key).await? {
                Some(head) if head.purged.is_some() => Some((
                    head.encode(),
                    below_purged_head(self.metadata(), &head).await?,
                )),
                _ => None,
            },
        };
        // What each run of the change saw and proposed: the one whose
        // proposal was chosen is the answer (an earlier run's proposal can
        // be chosen after a later run judged another current head).
        let proposals: Mutex<Vec<HeadSwap>> = Mutex::new(Vec::new());
        let outcome = self
            .node
            .metadata()
            .compare_and_set(head_register(bucket, key), |current| {
                let head = current.and_then(|bytes| ObjectVersion::decode(bytes).ok());
                let current_object = match &below_purged_head {
                    Some((under, below)) if current == Some(under.as_slice()) => below.as_ref(),
                    _ => head.as_ref(),
                };
                let mut proposals = proposals.lock().expect("head proposals");
                let new = judge_head(
                    condition,
                    &write,
                    head.as_ref(),
                    current_object,
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
                        ModelError::Internal(
                            "the chosen head is none of this write's proposals".into(),
                        )
                    })
            }
            Err(HeadRefusal::JudgedAgain) => Ok(None),
            Err(HeadRefusal::SequenceExhausted) => Err(ModelError::Internal(format!(
                "the head of {bucket}/{key} has the highest sequence there is"
            ))),
            Err(HeadRefusal::Condition) => Err(ModelError::PreconditionFailed),
            Err(HeadRefusal::NoCurrentObject) => Err(ModelError::NoSuchKey),
            Err(HeadRefusal::Deadline) => Err(self.deadline_error()),
            Err(HeadRefusal::NotHead) => Err(ModelError::NoSuchVersion),
        }
    }
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
            null: true,
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
        let head = judge_head(
            &WriteCondition::Always,
            &put,
            Some(&current),
            Some(&current),
            false,
            false,
        );
        assert_eq!(head.map(|h| (h.version, h.seq)), Ok((mine.version, 8)));
        assert_eq!(
            judge_head(&WriteCondition::Always, &put, None, None, false, false).map(|h| h.seq),
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
                judge_head(&condition, &put, current, current, false, false),
                Err(refusal),
                "{condition:?}"
            );
        }
        assert_eq!(
            judge_head(
                &WriteCondition::IfMatch("e1".into()),
                &put,
                Some(&current),
                Some(&current),
                false,
                false
            )
            .map(|h| h.seq),
            Ok(8)
        );
        assert_eq!(
            judge_head(
                &WriteCondition::Always,
                &put,
                Some(&current),
                Some(&current),
                false,
                true
            ),
            Err(HeadRefusal::Deadline)
        );
        assert_eq!(
            judge_head(
                &WriteCondition::Always,
                &put,
                Some(&data(1, u64::MAX)),
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
                Some(&current),
                true,
                false
            ),
            Err(HeadRefusal::JudgedAgain)
        );
        // A marker that becomes a row is a version too: a new one is asked
        // for. A purged marker (a bucket that keeps no history) is no row,
        // and is simply proposed again.
        let live_marker = version(3, 0, VersionBody::DeleteMarker);
        assert_eq!(
            judge_head(
                &WriteCondition::Deleting(DeleteCondition::default()),
                &HeadWrite::Delete(&live_marker),
                Some(&current),
                Some(&current),
                true,
                false
            ),
            Err(HeadRefusal::JudgedAgain)
        );
        let mut marker = live_marker.clone();
        marker.purged = Some(marker.created);
        let deleting = WriteCondition::Deleting(DeleteCondition::default());
        assert_eq!(
            judge_head(
                &deleting,
                &HeadWrite::Delete(&marker),
                Some(&current),
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
                Some(&current),
                false,
                false
            ),
            Err(HeadRefusal::NoCurrentObject)
        );
    }
}
