//! Multipart uploads (spec/gateway.md, "Multipart uploads"): each part is
//! its own encryption stream (stream id = part number) under the upload's
//! one data key, stored like an object's body; completing the upload writes
//! one manifest listing the chosen parts, so no byte moves at completion.

use bytes::Bytes;
use cairn_model::ModelError;
use cairn_model::heads::{WriteCondition, read_manifest};
use cairn_model::kms::DataKeys;
use cairn_model::rows::upload_row;
use cairn_model::uploads::{PartAttempt, later};
use cairn_node::clock::{now_unix_ms, random_bytes};
use cairn_protocol::encryption::SecretKey;
use cairn_protocol::ids::UploadId;
use cairn_protocol::keywrap::{SALT_BYTES, unwrap_labelled_key, wrap_labelled_key};
use cairn_protocol::manifest::{MAX_OBJECT_BYTES, MAX_PARTS, Part, PartKeys};
use cairn_protocol::records::{BucketSettings, PartRecord, UploadRecord};
use cairn_protocol::version::{ObjectVersion, StoredHeaders, VersionBody};
use md5::Digest;

use crate::checksum::{Algorithm, ChecksumRequest, composite, sent_matches};
use crate::error::{GatewayError, GatewayResult};
use crate::objects::{BodyWrite, ObjectCommit, ObjectStore, check_body_length, with_checksum};
use crate::s3::locks::{new_lock, take_upload_lock};

/// Every part but the last is at least this long, as in S3.
pub const MIN_PART_BYTES: u64 = 5 << 20;
/// Part numbers run from 1 to this.
pub const MAX_PART_NUMBER: u32 = 10_000;

fn label(bucket: &str, upload: &UploadId) -> String {
    format!("upload/{bucket}/{upload}")
}

/// A part CompleteMultipartUpload names: its number, its ETag and the
/// checksum the client holds for it, if any.
#[derive(Debug, Clone)]
pub struct ChosenPart {
    pub number: u32,
    pub etag: String,
    pub checksum: Option<(Algorithm, String)>,
}

pub fn check_part_number(number: i32) -> GatewayResult<u32> {
    if !(1..=MAX_PART_NUMBER as i32).contains(&number) {
        return Err(GatewayError::InvalidArgument(format!(
            "Part number must be an integer between 1 and {MAX_PART_NUMBER}, inclusive; got {number}"
        )));
    }
    Ok(number as u32)
}

/// S3's ETag of a multipart object made of parts with these ETags: the
/// MD5 of their MD5s, a dash and their count (quoted); `None` when an
/// ETag is not an MD5.
fn multipart_etag(chosen: &[ChosenPart]) -> Option<String> {
    let mut md5_of_md5s = md5::Md5::new();
    for part in chosen {
        md5_of_md5s.update(cairn_protocol::from_hex::<16>(part.etag.trim_matches('"'))?);
    }
    Some(format!(
        "\"{}-{}\"",
        cairn_protocol::to_hex(&md5_of_md5s.finalize()),
        chosen.len()
    ))
}

/// The checks of a completion's part list that need no stored state:
/// at least one part, at most [`MAX_PARTS`], in ascending order.
fn check_part_list(chosen: &[ChosenPart]) -> GatewayResult<()> {
    if chosen.is_empty() {
        return Err(GatewayError::InvalidArgument(
            "You must specify at least one part".into(),
        ));
    }
    if chosen.len() > MAX_PARTS {
        return Err(GatewayError::InvalidArgument(format!(
            "at most {MAX_PARTS} parts"
        )));
    }
    if chosen.windows(2).any(|w| w[0].number >= w[1].number) {
        return Err(GatewayError::InvalidPartOrder);
    }
    Ok(())
}

/// An object assembled from the parts a completion names.
#[derive(Debug)]
struct Assembled {
    parts: Vec<Part>,
    part_keys: PartKeys,
    /// S3's multipart ETag: the MD5 of the parts' MD5s, a dash, the count.
    etag: String,
    /// S3's COMPOSITE checksum, when every part carries one algorithm's.
    checksum: Option<(Algorithm, String)>,
}

/// S3's rules for completing an upload from its stored part attempts: each
/// named part must exist with the ETag (and checksum) named; of several
/// attempts so named the latest is taken (attempts that raced finish in
/// any order); every part but the last holds at least [`MIN_PART_BYTES`];
/// the whole is at most [`MAX_OBJECT_BYTES`]; and parts sealed by an older
/// Cairn complete only together.
fn assemble_parts(stored: &[PartAttempt], chosen: &[ChosenPart]) -> GatewayResult<Assembled> {
    let mut parts = Vec::with_capacity(chosen.len());
    let mut part_keys = Vec::with_capacity(chosen.len());
    let mut part_checksums: Vec<Option<&(String, String)>> = Vec::with_capacity(chosen.len());
    for (index, choice) in chosen.iter().enumerate() {
        let (number, etag) = (&choice.number, &choice.etag);
        // Of the attempts at this number, the latest whose ETag the
        // client names: attempts that raced finish in any order.
        let attempts: Vec<&PartRecord> = stored
            .iter()
            .filter(|a| a.number == *number)
            .map(|a| &a.record)
            .collect();
        let named = attempts
            .iter()
            .copied()
            .filter(|part| part.etag.trim_matches('"') == etag.trim_matches('"'))
            .reduce(|a, b| if later(b, a) { b } else { a });
        let part = match (
            named,
            attempts
                .iter()
                .copied()
                .reduce(|a, b| if later(b, a) { b } else { a }),
        ) {
            (Some(part), _) => part,
            (None, Some(latest)) => {
                return Err(GatewayError::InvalidPart(format!(
                    "part {number} has ETag {}, not {etag}",
                    latest.etag
                )));
            }
            (None, None) => {
                return Err(GatewayError::InvalidPart(format!(
                    "part {number} has not been uploaded"
                )));
            }
        };
        if index + 1 < chosen.len() && part.plaintext_len < MIN_PART_BYTES {
            return Err(GatewayError::EntityTooSmall);
        }
        if let Some((algorithm, value)) = &choice.checksum
            && !part.checksum.as_ref().is_some_and(|(name, kept)| {
                name == algorithm.name() && sent_matches(*algorithm, value, kept)
            })
        {
            return Err(GatewayError::InvalidPart(format!(
                "part {number} was not uploaded with the {} checksum {value}",
                algorithm.name()
            )));
        }
        part_checksums.push(part.checksum.as_ref());
        part_keys.push(part.part_keys);
        parts.push(Part {
            number: *number,
            upload: part.upload,
            plaintext_len: part.plaintext_len,
            segments: part.segments.clone(),
        });
    }
    // One manifest says how every part was sealed: parts uploaded
    // before per-attempt keys (format-1 part records) complete only
    // together.
    let part_keys = match part_keys.as_slice() {
        [first, rest @ ..] if rest.iter().all(|k| k == first) => *first,
        _ => {
            return Err(GatewayError::InvalidPart(
                "some parts were uploaded by an older version of Cairn, sealed another way: upload them again".into(),
            ));
        }
    };
    let total: u64 = parts.iter().map(|p: &Part| p.plaintext_len).sum();
    if total > MAX_OBJECT_BYTES {
        return Err(GatewayError::EntityTooLarge {
            max: MAX_OBJECT_BYTES,
        });
    }
    // The ETags named are the stored ones, so each is an MD5 in hex.
    let etag = multipart_etag(chosen)
        .ok_or_else(|| GatewayError::Corrupt("a stored part's ETag is not an MD5".into()))?;
    // Parts that all carry one algorithm's checksum give the object
    // S3's composite checksum of them.
    let mut checksum = None;
    if let Some(Some((name, _))) = part_checksums.first()
        && part_checksums
            .iter()
            .all(|c| c.is_some_and(|(other, _)| other == name))
        && let Some(algorithm) = Algorithm::by_name(name)
    {
        let values: Vec<&str> = part_checksums
            .iter()
            .flatten()
            .map(|(_, value)| value.as_str())
            .collect();
        checksum = composite(algorithm, &values)?.map(|value| (algorithm, value));
    }
    Ok(Assembled {
        parts,
        part_keys,
        etag,
        checksum,
    })
}

impl ObjectStore {
    /// Starts a multipart upload: its scheme, data key and headers are
    /// fixed now.
    pub async fn create_upload(
        &self,
        bucket: &str,
        bucket_key_id: &str,
        key: &str,
        headers: StoredHeaders,
    ) -> GatewayResult<UploadId> {
        let map = self.map()?;
        let upload = UploadId(random_bytes());
        let bucket_key = self.kms().key(bucket_key_id).await?;
        let data_key = SecretKey::from_bytes(random_bytes());
        let wrapped = wrap_labelled_key(
            &bucket_key,
            &data_key,
            &label(bucket, &upload),
            random_bytes::<SALT_BYTES>(),
        );
        let record = UploadRecord {
            upload,
            started_unix_ms: now_unix_ms(),
            multipart: true,
            scheme: map.scheme,
            bucket_key_id: bucket_key_id.to_owned(),
            wrapped_key: wrapped.to_vec(),
            headers,
        };
        self.uploads().create(bucket, key, &record).await?;
        Ok(upload)
    }

    async fn upload_key(&self, bucket: &str, record: &UploadRecord) -> GatewayResult<SecretKey> {
        let bucket_key = self.kms().key(&record.bucket_key_id).await?;
        unwrap_labelled_key(
            &bucket_key,
            &record.wrapped_key,
            &label(bucket, &record.upload),
        )
        .map_err(|e| GatewayError::Corrupt(format!("upload {}: {e}", record.upload)))
    }

    /// Stores one part; a part uploaded again under the same number
    /// replaces the earlier one. Returns the part's ETag.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_part<S, E>(
        &self,
        bucket: &str,
        key: &str,
        upload: &UploadId,
        number: u32,
        length: u64,
        content_md5: Option<[u8; 16]>,
        checksum: Option<ChecksumRequest>,
        body: S,
    ) -> GatewayResult<(String, Option<String>)>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        check_body_length(length)?;
        let record = self.uploads().get(bucket, key, upload).await?;
        let data_key = self.upload_key(bucket, &record).await?;
        // Each attempt at a part is stored under its own upload id, so
        // that a part cut off, replaced or not chosen can be released
        // alone (spec/gateway.md, "Collecting orphan fragments").
        let stored = self
            .store_body(
                BodyWrite {
                    bucket,
                    key,
                    bucket_key_id: &record.bucket_key_id,
                    scheme: record.scheme,
                    data_key: &data_key,
                    stream_id: number,
                    length,
                    content_md5,
                    checksum: checksum.as_ref(),
                },
                body,
            )
            .await?;
        let (etag, checksum_value) = (stored.etag, stored.checksum);
        let part = PartRecord {
            part_keys: PartKeys::PerAttempt,
            upload: stored.upload,
            uploaded_unix_ms: now_unix_ms(),
            plaintext_len: length,
            etag: etag.clone(),
            checksum: checksum_value
                .as_ref()
                .map(|(algorithm, value)| (algorithm.name().to_owned(), value.clone())),
            scheme: record.scheme,
            segments: stored.segments,
        };
        self.uploads()
            .record_part(bucket, key, upload, number, &part, stored.intent)
            .await?;
        Ok((etag, checksum_value.map(|(_, value)| value)))
    }

    /// The key's current object if a completion of `upload` with these
    /// parts committed it: a completion retried after it succeeded (its
    /// answer was lost) gets the same answer.
    async fn completed_by(
        &self,
        bucket: &str,
        key: &str,
        upload: &UploadId,
        chosen: &[ChosenPart],
    ) -> GatewayResult<Option<(ObjectVersion, Vec<UploadId>)>> {
        let Some(current) = self.index().current(bucket, key).await? else {
            return Ok(None);
        };
        let VersionBody::Data {
            manifest: id, etag, ..
        } = &current.body
        else {
            return Ok(None);
        };
        if multipart_etag(chosen).as_ref() != Some(etag) {
            return Ok(None);
        }
        let Some(manifest) = read_manifest(self.node().metadata(), bucket, id).await? else {
            return Ok(None);
        };
        let same = manifest.upload == *upload
            && manifest
                .parts
                .iter()
                .map(|p| p.number)
                .eq(chosen.iter().map(|c| c.number));
        let kept = manifest.parts.iter().map(|p| p.upload).collect();
        Ok(same.then_some((current, kept)))
    }

    /// Completes the upload with the parts the client chose, in order.
    pub async fn complete_upload(
        &self,
        bucket: &str,
        key: &str,
        upload: &UploadId,
        chosen: &[ChosenPart],
        condition: &WriteCondition,
        settings: &BucketSettings,
    ) -> GatewayResult<ObjectVersion> {
        check_part_list(chosen)?;
        let deadline = self.index().write_deadline(now_unix_ms());
        let record = match self.uploads().get(bucket, key, upload).await {
            Err(ModelError::NoSuchUpload) => {
                let (committed, kept) = self
                    .completed_by(bucket, key, upload, chosen)
                    .await?
                    .ok_or(GatewayError::NoSuchUpload)?;
                // The first completion may have stopped before it forgot
                // the part rows: finished here, as it would have.
                self.uploads()
                    .forget_unchosen_parts(bucket, key, upload, &kept)
                    .await?;
                return Ok(committed);
            }
            other => other?,
        };
        let stored = self.uploads().all_part_attempts(bucket, upload).await?;
        let Assembled {
            parts,
            part_keys,
            etag,
            checksum,
        } = assemble_parts(&stored, chosen)?;
        // The lock the upload's creation asked for, else the bucket's
        // default retention now.
        let (requested, mut headers) = take_upload_lock(&record.headers)?;
        let lock = new_lock(requested, settings, now_unix_ms())?;
        if let Some((algorithm, value)) = checksum {
            headers = with_checksum(headers, algorithm, value, "COMPOSITE")?;
        }
        // The data key was wrapped for the upload; the object's copy is
        // bound to its final version like any object's.
        let keys = DataKeys {
            bucket_key_id: record.bucket_key_id.clone(),
            bucket_key: self.kms().key(&record.bucket_key_id).await?,
            data_key: self.upload_key(bucket, &record).await?,
        };
        let kept: Vec<UploadId> = parts.iter().map(|p| p.upload).collect();
        let committed = self
            .commit_object(ObjectCommit {
                bucket,
                key,
                upload: *upload,
                scheme: record.scheme,
                keys: &keys,
                etag,
                parts,
                part_keys,
                headers,
                intent: upload_row(bucket, key, upload),
                condition,
                deadline_unix_ms: deadline,
                versioning: settings.versioning,
                lock,
            })
            .await?;
        self.uploads()
            .forget_unchosen_parts(bucket, key, upload, &kept)
            .await?;
        Ok(committed)
    }
}

#[cfg(test)]
mod tests {
    use cairn_protocol::erasure::Scheme;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn attempt(number: u32, etag: &str, at: u64, len: u64) -> PartAttempt {
        PartAttempt {
            number,
            sort: Vec::new(),
            record: PartRecord {
                part_keys: PartKeys::PerAttempt,
                upload: UploadId([at as u8; 16]),
                uploaded_unix_ms: at,
                plaintext_len: len,
                etag: format!("\"{etag}\""),
                checksum: None,
                scheme: Scheme::new(4, 2).unwrap(),
                segments: Vec::new(),
            },
        }
    }

    fn choose(number: u32, etag: &str) -> ChosenPart {
        ChosenPart {
            number,
            etag: etag.to_owned(),
            checksum: None,
        }
    }

    const MD5_A: &str = "0cc175b9c0f1b6a831c399e269772661";
    const MD5_B: &str = "92eb5ffee6ae2fec3ad71c777531578f";

    #[test]
    fn a_part_list_has_1_to_10000_parts_in_ascending_order() {
        assert!(check_part_list(&[choose(1, MD5_A), choose(3, MD5_B)]).is_ok());
        assert!(matches!(
            check_part_list(&[]),
            Err(GatewayError::InvalidArgument(_))
        ));
        for unordered in [
            vec![choose(2, MD5_A), choose(1, MD5_B)],
            vec![choose(1, MD5_A), choose(1, MD5_A)],
        ] {
            assert!(matches!(
                check_part_list(&unordered),
                Err(GatewayError::InvalidPartOrder)
            ));
        }
        let too_many: Vec<ChosenPart> = (1..=MAX_PARTS as u32 + 1)
            .map(|n| choose(n, MD5_A))
            .collect();
        assert!(matches!(
            check_part_list(&too_many),
            Err(GatewayError::InvalidArgument(_))
        ));
    }

    #[test]
    fn the_latest_attempt_with_the_named_etag_is_taken() {
        let stored = [
            attempt(1, MD5_A, 1, 5 * MIB),
            attempt(1, MD5_B, 2, 5 * MIB),
            attempt(1, MD5_A, 3, 5 * MIB),
            attempt(2, MD5_B, 4, 1),
        ];
        let assembled = assemble_parts(&stored, &[choose(1, MD5_A), choose(2, MD5_B)]).unwrap();
        assert_eq!(assembled.parts[0].upload, UploadId([3; 16]));
        assert_eq!(assembled.parts[1].upload, UploadId([4; 16]));
        assert_eq!(
            assembled.etag, "\"96e024ba2074fe77e8e965ba43a704be-2\"",
            "the MD5 of the parts' MD5s, a dash and the count"
        );
        let named_b = assemble_parts(&stored, &[choose(1, MD5_B)]).unwrap();
        assert_eq!(named_b.parts[0].upload, UploadId([2; 16]));
    }

    #[test]
    fn a_part_not_uploaded_or_with_another_etag_is_invalid() {
        let stored = [attempt(1, MD5_A, 1, 5 * MIB)];
        for chosen in [
            vec![choose(1, MD5_B)],
            vec![choose(1, MD5_A), choose(2, MD5_B)],
        ] {
            assert!(matches!(
                assemble_parts(&stored, &chosen),
                Err(GatewayError::InvalidPart(_))
            ));
        }
    }

    #[test]
    fn every_part_but_the_last_holds_5_mib() {
        let stored = [attempt(1, MD5_A, 1, 5 * MIB - 1), attempt(2, MD5_B, 2, 1)];
        assert!(matches!(
            assemble_parts(&stored, &[choose(1, MD5_A), choose(2, MD5_B)]),
            Err(GatewayError::EntityTooSmall)
        ));
        assert!(assemble_parts(&stored, &[choose(1, MD5_A)]).is_ok());
    }

    #[test]
    fn an_object_of_more_than_5_tib_is_too_large() {
        let stored = [
            attempt(1, MD5_A, 1, MAX_OBJECT_BYTES / 2 + 1),
            attempt(2, MD5_B, 2, MAX_OBJECT_BYTES / 2),
        ];
        assert!(matches!(
            assemble_parts(&stored, &[choose(1, MD5_A), choose(2, MD5_B)]),
            Err(GatewayError::EntityTooLarge { .. })
        ));
    }

    #[test]
    fn parts_sealed_two_ways_do_not_complete_together() {
        let mut old = attempt(1, MD5_A, 1, 5 * MIB);
        old.record.part_keys = PartKeys::Shared;
        let stored = [old, attempt(2, MD5_B, 2, 1)];
        assert!(matches!(
            assemble_parts(&stored, &[choose(1, MD5_A), choose(2, MD5_B)]),
            Err(GatewayError::InvalidPart(_))
        ));
    }

    #[test]
    fn named_checksums_must_match_and_one_algorithm_gives_a_composite() {
        // CRC32 of "one" and of "two", and the CRC32 of the two together.
        let mut one = attempt(1, MD5_A, 1, 5 * MIB);
        one.record.checksum = Some(("CRC32".into(), "emyG8Q==".into()));
        let mut two = attempt(2, MD5_B, 2, 1);
        two.record.checksum = Some(("CRC32".into(), "EcqKZg==".into()));
        let stored = [one, two.clone()];
        let both = [choose(1, MD5_A), choose(2, MD5_B)];
        assert_eq!(
            assemble_parts(&stored, &both).unwrap().checksum,
            Some((Algorithm::Crc32, "uDltSA==-2".to_owned()))
        );
        let mut wrong = both.clone();
        wrong[1].checksum = Some((Algorithm::Crc32, "emyG8Q==".into()));
        assert!(matches!(
            assemble_parts(&stored, &wrong),
            Err(GatewayError::InvalidPart(_))
        ));
        let mut right = both.clone();
        right[1].checksum = Some((Algorithm::Crc32, "EcqKZg==".into()));
        assert!(assemble_parts(&stored, &right).is_ok());
        // A part without a checksum: the object gets none.
        let mixed = [attempt(1, MD5_A, 1, 5 * MIB), two];
        assert_eq!(assemble_parts(&mixed, &both).unwrap().checksum, None);
    }
}
