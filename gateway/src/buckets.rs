//! Buckets: records in the cluster partition, each with its own key in the
//! internal KMS. One cluster is one S3 account: every access key owns every
//! bucket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_node::meta::Metadata;
use cairn_node::meta::listing::{ListRequest, ListStart};
use cairn_node::swarm::now_unix_ms;
use cairn_protocol::meta::{Partition, Register, RowKey, RowValue, Table};
use cairn_protocol::records::BucketRecord;

use crate::error::{GatewayError, GatewayResult};
use crate::kms::{Kms, random_bytes};

/// How long a bucket record read is trusted on this gateway.
const CACHE_FOR: Duration = Duration::from_secs(2);

fn row(name: &str) -> RowKey {
    RowKey::new(
        Partition::cluster(),
        Table::Buckets,
        name.as_bytes().to_vec(),
    )
}

/// Checks S3's bucket naming rules; the message says which one failed.
pub fn check_bucket_name(name: &str) -> GatewayResult<()> {
    let fail = |why: &str| {
        Err(GatewayError::InvalidBucketName(format!(
            "bucket name {name:?}: {why}"
        )))
    };
    if !(3..=63).contains(&name.len()) {
        return fail("must be 3 to 63 characters long");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
    {
        return fail("may contain only lower-case letters, digits, dots and hyphens");
    }
    let first = name.as_bytes()[0];
    let last = name.as_bytes()[name.len() - 1];
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return fail("must begin and end with a letter or a digit");
    }
    if name.contains("..") || name.contains(".-") || name.contains("-.") {
        return fail("must not have two adjacent dots, or a dot next to a hyphen");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return fail("must not be formatted as an IP address");
    }
    if name.starts_with("xn--") || name.starts_with("sthree-") || name.ends_with("-s3alias") {
        return fail("uses a reserved prefix or suffix");
    }
    Ok(())
}

/// The buckets of the cluster. Cheap to clone.
/// A bucket record read at a time (`None`: no such bucket).
type CachedBucket = (Instant, Option<BucketRecord>);

#[derive(Clone)]
pub struct Buckets {
    metadata: Metadata,
    kms: Kms,
    cache: Arc<Mutex<HashMap<String, CachedBucket>>>,
}

impl Buckets {
    pub fn new(metadata: Metadata, kms: Kms) -> Self {
        Self {
            metadata,
            kms,
            cache: Arc::default(),
        }
    }

    fn decode(name: &str, value: Option<RowValue>) -> GatewayResult<Option<BucketRecord>> {
        match value {
            Some(RowValue::Register(Register {
                value: Some(bytes), ..
            })) => BucketRecord::decode(&bytes)
                .map(Some)
                .map_err(|e| GatewayError::Corrupt(format!("bucket {name:?}: {e}"))),
            _ => Ok(None),
        }
    }

    /// The bucket's record, or `NoSuchBucket`.
    pub async fn get(&self, name: &str) -> GatewayResult<BucketRecord> {
        if check_bucket_name(name).is_err() {
            return Err(GatewayError::NoSuchBucket(name.to_owned()));
        }
        if let Some((at, record)) = self.cache.lock().expect("bucket cache").get(name)
            && at.elapsed() < CACHE_FOR
        {
            return record
                .clone()
                .ok_or_else(|| GatewayError::NoSuchBucket(name.to_owned()));
        }
        let value = self.metadata.read(vec![row(name)]).await?.remove(0);
        let record = Self::decode(name, value)?;
        self.cache
            .lock()
            .expect("bucket cache")
            .insert(name.to_owned(), (Instant::now(), record.clone()));
        record.ok_or_else(|| GatewayError::NoSuchBucket(name.to_owned()))
    }

    /// Creates a bucket with a fresh KMS key.
    pub async fn create(&self, name: &str, owner: &str) -> GatewayResult<BucketRecord> {
        check_bucket_name(name)?;
        let existing = self.metadata.read(vec![row(name)]).await?.remove(0);
        if Self::decode(name, existing)?.is_some() {
            return Err(GatewayError::BucketAlreadyOwnedByYou(name.to_owned()));
        }
        let key_id = format!(
            "bucket/{name}/{}",
            cairn_protocol::to_hex(&random_bytes::<8>())
        );
        self.kms.create_key(&key_id).await?;
        let record = BucketRecord {
            created_unix_ms: now_unix_ms(),
            owner: owner.to_owned(),
            bucket_key_id: key_id,
        };
        self.metadata
            .write(vec![(
                row(name),
                RowValue::Register(Register {
                    at: self.metadata.timestamp(),
                    value: Some(record.encode()),
                }),
            )])
            .await?;
        self.cache.lock().expect("bucket cache").remove(name);
        Ok(record)
    }

    /// Deletes an empty bucket.
    pub async fn delete(&self, name: &str) -> GatewayResult<()> {
        self.get_fresh(name).await?;
        let listing = self
            .metadata
            .list_objects(
                name,
                &ListRequest {
                    prefix: String::new(),
                    delimiter: None,
                    start: ListStart::Beginning,
                    max_keys: 1,
                },
            )
            .await?;
        if !listing.entries.is_empty() {
            return Err(GatewayError::BucketNotEmpty(name.to_owned()));
        }
        self.metadata
            .write(vec![(
                row(name),
                RowValue::Register(Register {
                    at: self.metadata.timestamp(),
                    value: None,
                }),
            )])
            .await?;
        self.cache.lock().expect("bucket cache").remove(name);
        Ok(())
    }

    async fn get_fresh(&self, name: &str) -> GatewayResult<BucketRecord> {
        self.cache.lock().expect("bucket cache").remove(name);
        self.get(name).await
    }

    /// Every bucket, by name.
    pub async fn list(&self) -> GatewayResult<Vec<(String, BucketRecord)>> {
        let mut buckets = Vec::new();
        let mut start = Vec::new();
        loop {
            let page = self
                .metadata
                .range(&Partition::cluster(), Table::Buckets, &start, None, 1000)
                .await?;
            for (sort, value) in &page.rows {
                let name = String::from_utf8_lossy(sort).into_owned();
                if let Some(record) = Self::decode(&name, Some(value.clone()))? {
                    buckets.push((name, record));
                }
            }
            match page.rows.last() {
                Some((last, _)) if page.more => {
                    start = last.clone();
                    start.push(0);
                }
                _ => return Ok(buckets),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_s3_rules() {
        for good in ["abc", "my-bucket.2026", "a1b", &"a".repeat(63)] {
            assert!(check_bucket_name(good).is_ok(), "{good}");
        }
        for bad in [
            "ab",
            "Abc",
            "a_b",
            "-abc",
            "abc.",
            "a..b",
            "a.-b",
            "192.168.1.1",
            "xn--abc",
            &"a".repeat(64),
        ] {
            assert!(check_bucket_name(bad).is_err(), "{bad}");
        }
    }
}
