//! Where each record of the S3 schema lives: the row keys of the bucket
//! partitions' tables, and the rows that writes, deletes and purges leave.

use cairn_node::clock::now_unix_ms;
use cairn_protocol::hlc::Timestamp;
use cairn_protocol::ids::{ManifestId, UploadId, VersionId};
use cairn_protocol::meta::{
    Partition, Register, RowKey, RowValue, Table, degraded_sort_key, part_sort_key,
    upload_sort_key, version_sort_key,
};
use cairn_protocol::records::{ReleaseRecord, ReleaseTarget};
use cairn_protocol::version::{ObjectVersion, VersionBody};

pub fn versions_row(bucket: &str, key: &str, version: &VersionId) -> RowKey {
    RowKey::new(
        Partition::bucket(bucket),
        Table::Versions,
        version_sort_key(key, version),
    )
}

pub fn manifest_row(bucket: &str, manifest: &ManifestId) -> RowKey {
    RowKey::new(
        Partition::bucket(bucket),
        Table::Manifests,
        manifest.as_bytes().to_vec(),
    )
}

pub fn upload_row(bucket: &str, key: &str, upload: &UploadId) -> RowKey {
    RowKey::new(
        Partition::bucket(bucket),
        Table::Uploads,
        upload_sort_key(key, upload.as_bytes()),
    )
}

/// A release row for `target` under `key`, ripening from now (the
/// collector's work list, spec/gateway.md "Collecting orphan fragments").
pub fn release_entry(
    bucket: &str,
    key: &str,
    target: ReleaseTarget,
    at: Timestamp,
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
pub fn purge_rows(versions: Vec<ObjectVersion>, at: Timestamp) -> Vec<(RowKey, RowValue)> {
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

pub fn register(value: Option<Vec<u8>>, at: Timestamp) -> RowValue {
    RowValue::Register(Register { at, value })
}

/// The row of one attempt at part `number`: attempts do not replace each
/// other, so a completion can take the one whose ETag it names.
pub fn part_row(bucket: &str, upload: &UploadId, number: u32, attempt: &UploadId) -> RowKey {
    RowKey::new(
        Partition::bucket(bucket),
        Table::Parts,
        part_sort_key(upload.as_bytes(), number as u16, attempt.as_bytes()),
    )
}

/// The row that records a segment of `key` stored with fewer fragments
/// than its scheme's (repair's work list).
pub fn degraded_row(bucket: &str, key: &str, upload: &UploadId, segment: &[u8; 32]) -> RowKey {
    RowKey::new(
        Partition::bucket(bucket),
        Table::Degraded,
        degraded_sort_key(key, upload.as_bytes(), segment),
    )
}
