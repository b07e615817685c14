//! Multipart uploads in the metadata (spec/gateway.md, "Multipart
//! uploads"): the upload records, one row per attempt at each part, the
//! listings of both, and what an abort or a completion leaves for the
//! orphan collector.

use cairn_node::meta::Metadata;
use cairn_protocol::ids::UploadId;
use cairn_protocol::meta::{
    Partition, Register, RowKey, RowValue, Table, part_number_of, part_number_start, prefix_end,
    split_key_sort,
};
use cairn_protocol::records::{PartRecord, ReleaseTarget, UploadRecord};

use crate::error::{ModelError, ModelResult};
use crate::rows::{part_row, register, release_entry, upload_row};

/// One stored attempt at a part, with its row's sort key.
#[derive(Debug, Clone)]
pub struct PartAttempt {
    pub number: u32,
    pub sort: Vec<u8>,
    pub record: PartRecord,
}

/// Whether `a` is a later attempt than `b`: what ListParts shows of a part
/// number with several.
pub fn later(a: &PartRecord, b: &PartRecord) -> bool {
    (a.uploaded_unix_ms, a.upload) > (b.uploaded_unix_ms, b.upload)
}

/// Pages through the part attempts of one upload, in sort key order.
struct PartAttempts {
    partition: Partition,
    cursor: Option<Vec<u8>>,
    end: Option<Vec<u8>>,
}

impl PartAttempts {
    async fn next_page(&mut self, metadata: &Metadata) -> ModelResult<Option<Vec<PartAttempt>>> {
        let Some(cursor) = self.cursor.take() else {
            return Ok(None);
        };
        let page = metadata
            .range(
                &self.partition,
                Table::Parts,
                &cursor,
                self.end.as_deref(),
                1000,
            )
            .await?;
        let mut attempts = Vec::with_capacity(page.rows.len());
        for (sort, value) in &page.rows {
            let Some(number) = part_number_of(sort) else {
                continue;
            };
            let Some(record) = decode_register(Some(value.clone()), PartRecord::decode)? else {
                continue;
            };
            attempts.push(PartAttempt {
                number: u32::from(number),
                sort: sort.clone(),
                record,
            });
        }
        if page.more
            && let Some((last, _)) = page.rows.last()
        {
            let mut next = last.clone();
            next.push(0);
            self.cursor = Some(next);
        }
        Ok(Some(attempts))
    }
}

/// An upload in progress, as ListMultipartUploads shows it.
#[derive(Debug, Clone)]
pub struct UploadInfo {
    pub key: String,
    pub record: UploadRecord,
}

/// A page of ListParts.
pub struct PartsPage {
    pub parts: Vec<(u32, PartRecord)>,
    pub truncated: bool,
}

fn decode_register<T>(
    value: Option<RowValue>,
    decode: impl Fn(&[u8]) -> Result<T, cairn_protocol::records::RecordError>,
) -> ModelResult<Option<T>> {
    match value {
        Some(RowValue::Register(Register {
            value: Some(bytes), ..
        })) => decode(&bytes)
            .map(Some)
            .map_err(|e| ModelError::Corrupt(e.to_string())),
        _ => Ok(None),
    }
}

/// The multipart uploads of the cluster, over its metadata.
#[derive(Clone, Copy)]
pub struct Uploads<'a> {
    metadata: &'a Metadata,
}

impl<'a> Uploads<'a> {
    pub fn new(metadata: &'a Metadata) -> Self {
        Self { metadata }
    }

    /// Records a new upload under `key`.
    pub async fn create(&self, bucket: &str, key: &str, record: &UploadRecord) -> ModelResult<()> {
        self.metadata
            .write(vec![(
                upload_row(bucket, key, &record.upload),
                register(Some(record.encode()), self.metadata.timestamp()),
            )])
            .await?;
        Ok(())
    }

    /// Records an attempt at part `number` whose body is stored, and ends
    /// the attempt's intent row. Other attempts at the number stay: the
    /// completion takes the one whose ETag it names and releases the rest.
    /// An upload completed or aborted while the part was on its way did
    /// not see it: the part releases itself, and `NoSuchUpload`.
    pub async fn record_part(
        &self,
        bucket: &str,
        key: &str,
        upload: &UploadId,
        number: u32,
        part: &PartRecord,
        intent: RowKey,
    ) -> ModelResult<()> {
        let at = self.metadata.timestamp();
        self.metadata
            .write(vec![
                (
                    part_row(bucket, upload, number, &part.upload),
                    register(Some(part.encode()), at),
                ),
                (intent, register(None, at)),
            ])
            .await?;
        match self.get(bucket, key, upload).await {
            Ok(_) => Ok(()),
            Err(ModelError::NoSuchUpload) => {
                let at = self.metadata.timestamp();
                self.metadata
                    .write(vec![release_entry(
                        bucket,
                        key,
                        ReleaseTarget::Upload(part.upload),
                        at,
                    )])
                    .await?;
                Err(ModelError::NoSuchUpload)
            }
            // Not knowing is an error too: the client asks again rather
            // than count on a part of an upload that may be gone.
            Err(other) => Err(other),
        }
    }

    /// The upload's record, or `NoSuchUpload`.
    pub async fn get(
        &self,
        bucket: &str,
        key: &str,
        upload: &UploadId,
    ) -> ModelResult<UploadRecord> {
        let value = self
            .metadata
            .read(vec![upload_row(bucket, key, upload)])
            .await?
            .remove(0);
        match decode_register(value, UploadRecord::decode)? {
            Some(record) if record.multipart => Ok(record),
            _ => Err(ModelError::NoSuchUpload),
        }
    }

    /// The upload's parts from `after` on, at most `max`: for each part
    /// number, its latest attempt.
    pub async fn list_parts(
        &self,
        bucket: &str,
        upload: &UploadId,
        after: u32,
        max: usize,
    ) -> ModelResult<PartsPage> {
        let mut parts: Vec<(u32, PartRecord)> = Vec::new();
        let mut attempts = self.part_attempts(bucket, upload, after);
        loop {
            let Some(page) = attempts.next_page(self.metadata).await? else {
                return Ok(PartsPage {
                    parts,
                    truncated: false,
                });
            };
            for attempt in page {
                let full = parts.len() == max;
                match parts.last_mut() {
                    Some((number, latest)) if *number == attempt.number => {
                        if later(&attempt.record, latest) {
                            *latest = attempt.record;
                        }
                    }
                    _ if full => {
                        return Ok(PartsPage {
                            parts,
                            truncated: true,
                        });
                    }
                    _ => parts.push((attempt.number, attempt.record)),
                }
            }
        }
    }

    /// Every stored attempt at every part of `upload`, by part number.
    pub async fn all_part_attempts(
        &self,
        bucket: &str,
        upload: &UploadId,
    ) -> ModelResult<Vec<PartAttempt>> {
        let mut all = Vec::new();
        let mut attempts = self.part_attempts(bucket, upload, 0);
        while let Some(page) = attempts.next_page(self.metadata).await? {
            all.extend(page);
        }
        Ok(all)
    }

    fn part_attempts(&self, bucket: &str, upload: &UploadId, after: u32) -> PartAttempts {
        let first = (after + 1).min(u32::from(u16::MAX)) as u16;
        PartAttempts {
            partition: Partition::bucket(bucket),
            cursor: Some(part_number_start(upload.as_bytes(), first)),
            end: prefix_end(upload.as_bytes()),
        }
    }

    /// Deletes the part rows of a completed upload; the part attempts the
    /// object does not keep go to the collector with them.
    pub async fn forget_unchosen_parts(
        &self,
        bucket: &str,
        key: &str,
        upload: &UploadId,
        kept: &[UploadId],
    ) -> ModelResult<()> {
        let stored = self.all_part_attempts(bucket, upload).await?;
        let unchosen: Vec<UploadId> = stored
            .iter()
            .map(|a| a.record.upload)
            .filter(|attempt| !kept.contains(attempt))
            .collect();
        self.forget_parts(bucket, key, &stored, &unchosen).await
    }

    /// Aborts the upload; its fragments are left for the collector, which
    /// releases them once no part in flight can still be stored.
    pub async fn abort(&self, bucket: &str, key: &str, upload: &UploadId) -> ModelResult<()> {
        self.get(bucket, key, upload).await?;
        // The record goes first: a part recorded after this finds no
        // upload and releases itself.
        let metadata = self.metadata;
        metadata
            .write(vec![(
                upload_row(bucket, key, upload),
                register(None, metadata.timestamp()),
            )])
            .await?;
        let stored = self.all_part_attempts(bucket, upload).await?;
        let every: Vec<UploadId> = stored.iter().map(|a| a.record.upload).collect();
        self.forget_parts(bucket, key, &stored, &every).await
    }

    /// Deletes the part rows of a finished upload, after writing a release
    /// row for each of `released`: cut off between two writes, it has
    /// deleted no part row whose attempt it was to release and did not.
    async fn forget_parts(
        &self,
        bucket: &str,
        key: &str,
        stored: &[PartAttempt],
        released: &[UploadId],
    ) -> ModelResult<()> {
        let metadata = self.metadata;
        let at = metadata.timestamp();
        let partition = Partition::bucket(bucket);
        let rows: Vec<(RowKey, RowValue)> = released
            .iter()
            .map(|r| release_entry(bucket, key, ReleaseTarget::Upload(*r), at))
            .chain(stored.iter().map(|a| {
                (
                    RowKey::new(partition.clone(), Table::Parts, a.sort.clone()),
                    register(None, at),
                )
            }))
            .collect();
        for chunk in rows.chunks(1000) {
            metadata.write(chunk.to_vec()).await?;
        }
        Ok(())
    }

    /// Multipart uploads in progress, by key then upload id, from the
    /// markers on; at most `max`, and whether more remain.
    pub async fn list_uploads(
        &self,
        bucket: &str,
        prefix: &str,
        key_marker: Option<&str>,
        upload_marker: Option<&UploadId>,
        max: usize,
    ) -> ModelResult<(Vec<UploadInfo>, bool)> {
        let partition = Partition::bucket(bucket);
        let mut cursor = match (key_marker, upload_marker) {
            (Some(key), Some(upload)) => {
                let mut sort = key.as_bytes().to_vec();
                sort.push(0);
                sort.extend_from_slice(upload.as_bytes());
                sort.push(0);
                sort
            }
            (Some(key), None) => {
                let mut sort = key.as_bytes().to_vec();
                sort.push(1);
                sort
            }
            _ => prefix.as_bytes().to_vec(),
        };
        if cursor.as_slice() < prefix.as_bytes() {
            cursor = prefix.as_bytes().to_vec();
        }
        let end = prefix_end(prefix.as_bytes());
        let mut uploads = Vec::new();
        loop {
            let page = self
                .metadata
                .range(&partition, Table::Uploads, &cursor, end.as_deref(), 1000)
                .await?;
            for (sort, value) in &page.rows {
                let Some(record) = decode_register(Some(value.clone()), UploadRecord::decode)?
                else {
                    continue;
                };
                let Some((key, _)) = split_key_sort(sort) else {
                    continue;
                };
                if !record.multipart {
                    continue;
                }
                if uploads.len() == max {
                    return Ok((uploads, true));
                }
                uploads.push(UploadInfo {
                    key: key.to_owned(),
                    record,
                });
            }
            match page.rows.last() {
                Some((last, _)) if page.more => {
                    cursor = last.clone();
                    cursor.push(0);
                }
                _ => return Ok((uploads, false)),
            }
        }
    }
}
