//! Buckets: records in the cluster partition, each with its own key in the
//! internal KMS. One cluster is one S3 account: every access key owns every
//! bucket.

use std::time::Duration;

use cairn_node::clock::now_unix_ms;
use cairn_node::meta::Metadata;
use cairn_protocol::records::BucketRecord;

use crate::error::{ModelError, ModelResult};
use crate::kms::Kms;
use crate::listing::{ListRequest, ListStart, list_objects};
use crate::registers::{Caching, RegisterTable};
use cairn_node::clock::random_bytes;

/// How long a bucket record read is trusted on this gateway.
const CACHE_FOR: Duration = Duration::from_secs(2);

/// Checks S3's bucket naming rules; the message says which one failed.
pub fn check_bucket_name(name: &str) -> ModelResult<()> {
    let fail = |why: &str| {
        Err(ModelError::InvalidBucketName(format!(
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
#[derive(Clone)]
pub struct Buckets {
    table: RegisterTable<BucketRecord>,
    kms: Kms,
}

impl Buckets {
    pub fn new(metadata: Metadata, kms: Kms) -> Self {
        Self {
            table: RegisterTable::new(metadata, Caching::For(CACHE_FOR)),
            kms,
        }
    }

    /// The bucket's record, or `NoSuchBucket`.
    pub async fn get(&self, name: &str) -> ModelResult<BucketRecord> {
        if check_bucket_name(name).is_err() {
            return Err(ModelError::NoSuchBucket(name.to_owned()));
        }
        self.table
            .get(name)
            .await?
            .ok_or_else(|| ModelError::NoSuchBucket(name.to_owned()))
    }

    /// Creates a bucket with a fresh KMS key.
    pub async fn create(&self, name: &str, owner: &str) -> ModelResult<BucketRecord> {
        check_bucket_name(name)?;
        if self.table.get_fresh(name).await?.is_some() {
            return Err(ModelError::BucketAlreadyOwnedByYou(name.to_owned()));
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
        self.table.put(name, &record).await?;
        Ok(record)
    }

    /// Deletes an empty bucket.
    pub async fn delete(&self, name: &str) -> ModelResult<()> {
        if check_bucket_name(name).is_err() || self.table.get_fresh(name).await?.is_none() {
            return Err(ModelError::NoSuchBucket(name.to_owned()));
        }
        let listing = list_objects(
            self.table.metadata(),
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
            return Err(ModelError::BucketNotEmpty(name.to_owned()));
        }
        self.table.delete(name).await
    }

    /// Every bucket, by name.
    pub async fn list(&self) -> ModelResult<Vec<(String, BucketRecord)>> {
        self.table.list().await
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
