//! Buckets: records in the cluster partition, each with its own key in the
//! internal KMS. One cluster is one S3 account: every access key owns every
//! bucket.

use std::time::Duration;

use cairn_node::clock::now_unix_ms;
use cairn_node::meta::Metadata;
use cairn_protocol::meta::Partition;
use cairn_protocol::metarpc::RegisterKey;
use cairn_protocol::records::{
    BucketRecord, BucketSettings, LifecycleConfiguration, LifecycleRule, Versioning,
};

use crate::error::{ModelError, ModelResult};
use crate::kms::Kms;
use crate::listing::{ListRequest, ListStart, list_versions};
use crate::registers::{Caching, RegisterTable};
use cairn_node::clock::random_bytes;

/// How old a claim on a bucket name without a bucket record must be
/// before another creation takes it over (the creation that made it
/// stopped before writing its record).
const CLAIM_TAKEOVER: Duration = Duration::from_secs(120);

/// Whether a claim stamped `claimed_unix_ms` is a creation under way at
/// `now`: younger than [`CLAIM_TAKEOVER`]. A stamp in the future by more
/// than that (a clock far ahead) is not trusted either way: it is stale.
fn is_young(claimed_unix_ms: u64, now_unix_ms: u64) -> bool {
    let takeover = CLAIM_TAKEOVER.as_millis() as i128;
    let age = i128::from(now_unix_ms) - i128::from(claimed_unix_ms);
    (-takeover..takeover).contains(&age)
}

fn creation_under_way(name: &str) -> ModelError {
    ModelError::OperationAborted(format!(
        "another creation of the bucket {name:?} is under way; try again"
    ))
}

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

/// The register of a bucket's settings (spec/versioning.md, "Bucket
/// settings"): its name begins with a zero byte, which no object key (a
/// head register's name) and no lock guard's name (an object key first)
/// does.
fn settings_register(bucket: &str) -> RegisterKey {
    RegisterKey {
        partition: Partition::bucket(bucket),
        name: b"\0settings".to_vec(),
    }
}

/// The register of a bucket's lifecycle configuration (spec/versioning.md,
/// "Lifecycle"), named like the settings register.
fn lifecycle_register(bucket: &str) -> RegisterKey {
    RegisterKey {
        partition: Partition::bucket(bucket),
        name: b"\0lifecycle".to_vec(),
    }
}

/// The most bytes a stored lifecycle configuration takes: a register's
/// value, with room to spare.
pub const MAX_LIFECYCLE_BYTES: usize = cairn_protocol::metarpc::MAX_REGISTER_BYTES - 1024;

/// The lifecycle configuration a register value gives the bucket of
/// `record`: one of an earlier bucket of the same name is none.
fn stored_lifecycle(
    record: &BucketRecord,
    value: Option<&[u8]>,
) -> ModelResult<Option<LifecycleConfiguration>> {
    let Some(bytes) = value else {
        return Ok(None);
    };
    let configuration = LifecycleConfiguration::decode(bytes)
        .map_err(|e| ModelError::Corrupt(format!("lifecycle configuration: {e}")))?;
    Ok((configuration.generation == record.bucket_key_id).then_some(configuration))
}

/// The settings a register value gives the bucket of `record`: a value of
/// an earlier bucket of the same name, or none, is an unversioned bucket.
fn current_settings(
    name: &str,
    record: &BucketRecord,
    value: Option<&[u8]>,
) -> ModelResult<BucketSettings> {
    let Some(bytes) = value else {
        return Ok(BucketSettings::unversioned(&record.bucket_key_id));
    };
    let settings = BucketSettings::decode(bytes)
        .map_err(|e| ModelError::Corrupt(format!("settings of bucket {name}: {e}")))?;
    if settings.generation != record.bucket_key_id {
        return Ok(BucketSettings::unversioned(&record.bucket_key_id));
    }
    Ok(settings)
}

/// The versioning of `bucket`, read without a gateway's cache (for the
/// model's own writes: trash restores).
pub async fn versioning_of(metadata: &Metadata, bucket: &str) -> ModelResult<Versioning> {
    let table = RegisterTable::<BucketRecord>::new(metadata.clone(), Caching::WriteOnce);
    let record = table
        .get_fresh(bucket)
        .await?
        .ok_or_else(|| ModelError::NoSuchBucket(bucket.to_owned()))?;
    let value = metadata.read_register(settings_register(bucket)).await?;
    Ok(current_settings(bucket, &record, value.as_deref())?.versioning)
}

/// The lifecycle configuration of `bucket` and its versioning, read
/// linearizably (what the lifecycle worker acts on); `None` without a
/// configuration or without the bucket.
pub async fn lifecycle_of(
    metadata: &Metadata,
    bucket: &str,
) -> ModelResult<Option<(LifecycleConfiguration, Versioning)>> {
    let table = RegisterTable::<BucketRecord>::new(metadata.clone(), Caching::WriteOnce);
    let Some(record) = table.get_fresh(bucket).await? else {
        return Ok(None);
    };
    let value = metadata.read_register(lifecycle_register(bucket)).await?;
    let Some(configuration) = stored_lifecycle(&record, value.as_deref())? else {
        return Ok(None);
    };
    let value = metadata.read_register(settings_register(bucket)).await?;
    let versioning = current_settings(bucket, &record, value.as_deref())?.versioning;
    Ok(Some((configuration, versioning)))
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

    /// The bucket's settings, read linearizably: a write decides what it
    /// does to older versions from them, so a change made through any
    /// gateway and acknowledged is seen by every write that starts after.
    pub async fn settings(&self, name: &str) -> ModelResult<BucketSettings> {
        let record = self.get(name).await?;
        self.settings_of(name, &record).await
    }

    /// The settings of the bucket whose record is `record` (perhaps read
    /// from this gateway's cache): settings of another generation send
    /// the record to be read again, so that a bucket deleted and created
    /// again elsewhere is not taken for the one cached.
    pub async fn settings_of(
        &self,
        name: &str,
        record: &BucketRecord,
    ) -> ModelResult<BucketSettings> {
        let value = self
            .table
            .metadata()
            .read_register(settings_register(name))
            .await?;
        let stored_generation = value
            .as_deref()
            .and_then(|bytes| BucketSettings::decode(bytes).ok())
            .map(|settings| settings.generation);
        if stored_generation.is_some_and(|g| g != record.bucket_key_id) {
            let fresh = self
                .table
                .get_fresh(name)
                .await?
                .ok_or_else(|| ModelError::NoSuchBucket(name.to_owned()))?;
            return current_settings(name, &fresh, value.as_deref());
        }
        current_settings(name, record, value.as_deref())
    }

    /// Changes the bucket's settings by compare-and-set: `change` sees the
    /// current settings and returns the new ones, or refuses.
    pub async fn change_settings(
        &self,
        name: &str,
        change: impl Fn(&BucketSettings) -> ModelResult<BucketSettings>,
    ) -> ModelResult<BucketSettings> {
        // Never the cache: settings are written for the bucket that is.
        if check_bucket_name(name).is_err() {
            return Err(ModelError::NoSuchBucket(name.to_owned()));
        }
        let record = self
            .table
            .get_fresh(name)
            .await?
            .ok_or_else(|| ModelError::NoSuchBucket(name.to_owned()))?;
        let decided = self
            .table
            .metadata()
            .compare_and_set(settings_register(name), |current| {
                // A young claim of another generation is a bucket created
                // since the record was read: its settings are not ours to
                // change.
                if let Some(held) = current.and_then(|bytes| BucketSettings::decode(bytes).ok())
                    && held.generation != record.bucket_key_id
                    && is_young(held.claimed_unix_ms, now_unix_ms())
                {
                    return Err(ModelError::OperationAborted(format!(
                        "the bucket {name:?} was deleted and created again meanwhile; try again"
                    )));
                }
                let settings = current_settings(name, &record, current)?;
                let next = change(&settings)?;
                next.check().map_err(ModelError::InvalidArgument)?;
                if next.generation != record.bucket_key_id {
                    return Err(ModelError::Internal(
                        "settings changed to another bucket's".into(),
                    ));
                }
                Ok(Some(next.encode()))
            })
            .await??;
        current_settings(name, &record, decided.as_deref())
    }

    /// The bucket's lifecycle configuration, read linearizably; `None`
    /// without one (or with one of an earlier bucket of the same name).
    pub async fn lifecycle(&self, name: &str) -> ModelResult<Option<LifecycleConfiguration>> {
        let record = self.get(name).await?;
        let value = self
            .table
            .metadata()
            .read_register(lifecycle_register(name))
            .await?;
        // A configuration of another generation may be a bucket created
        // since this gateway cached its record: the record is read again.
        let generation = value
            .as_deref()
            .and_then(|bytes| LifecycleConfiguration::decode(bytes).ok())
            .map(|c| c.generation);
        let record = match generation {
            Some(generation) if generation != record.bucket_key_id => self
                .table
                .get_fresh(name)
                .await?
                .ok_or_else(|| ModelError::NoSuchBucket(name.to_owned()))?,
            _ => record,
        };
        stored_lifecycle(&record, value.as_deref())
    }

    /// Sets (or with `None` removes) the bucket's lifecycle rules.
    pub async fn set_lifecycle(
        &self,
        name: &str,
        rules: Option<Vec<LifecycleRule>>,
    ) -> ModelResult<()> {
        if check_bucket_name(name).is_err() {
            return Err(ModelError::NoSuchBucket(name.to_owned()));
        }
        let record = self
            .table
            .get_fresh(name)
            .await?
            .ok_or_else(|| ModelError::NoSuchBucket(name.to_owned()))?;
        let value = rules.map(|rules| {
            LifecycleConfiguration {
                generation: record.bucket_key_id.clone(),
                rules,
            }
            .encode()
        });
        if value
            .as_ref()
            .is_some_and(|v| v.len() > MAX_LIFECYCLE_BYTES)
        {
            return Err(ModelError::InvalidArgument(format!(
                "the lifecycle configuration takes more than {MAX_LIFECYCLE_BYTES} bytes stored; use fewer or shorter rules"
            )));
        }
        self.table
            .metadata()
            .compare_and_set(lifecycle_register(name), |_| {
                Ok::<_, ModelError>(value.clone())
            })
            .await??;
        Ok(())
    }

    /// Creates a bucket with a fresh KMS key; with Object Lock (which
    /// turns versioning on) when `object_lock`.
    pub async fn create(
        &self,
        name: &str,
        owner: &str,
        object_lock: bool,
    ) -> ModelResult<BucketRecord> {
        check_bucket_name(name)?;
        let metadata = self.table.metadata();
        // What the settings register held before the record was found
        // absent: the claim below takes the name only if it still does.
        let seen = metadata.read_register(settings_register(name)).await?;
        if self.table.get_fresh(name).await?.is_some() {
            return Err(ModelError::BucketAlreadyOwnedByYou(name.to_owned()));
        }
        let key_id = format!(
            "bucket/{name}/{}",
            cairn_protocol::to_hex(&random_bytes::<8>())
        );
        // The claim, before the record (spec/versioning.md, "Creating a
        // bucket"): of creations racing on one name exactly one claims
        // it, and a bucket is never seen without the lock it was created
        // with. A claim of a creation that stopped belongs to no bucket
        // (its generation is this key id) and is taken over once old.
        let now = now_unix_ms();
        let settings = BucketSettings {
            generation: key_id.clone(),
            claimed_unix_ms: now,
            versioning: if object_lock {
                Versioning::Enabled
            } else {
                Versioning::Unversioned
            },
            object_lock,
            default_retention: None,
        };
        metadata
            .compare_and_set(settings_register(name), |current| {
                if current != seen.as_deref() {
                    return Err(creation_under_way(name));
                }
                let young = current
                    .and_then(|bytes| BucketSettings::decode(bytes).ok())
                    .is_some_and(|held| is_young(held.claimed_unix_ms, now));
                if young {
                    return Err(creation_under_way(name));
                }
                Ok(Some(settings.encode()))
            })
            .await??;
        // After the claim: a creation refused leaves no key behind.
        self.kms.create_key(&key_id).await?;
        let record = BucketRecord {
            created_unix_ms: now_unix_ms(),
            owner: owner.to_owned(),
            bucket_key_id: key_id,
        };
        self.table.put(name, &record).await?;
        Ok(record)
    }

    /// Deletes an empty bucket: no version of any key exists, delete
    /// markers and versions a lock keeps included.
    pub async fn delete(&self, name: &str) -> ModelResult<()> {
        let record = match check_bucket_name(name) {
            Ok(()) => self.table.get_fresh(name).await?,
            Err(_) => None,
        };
        let Some(record) = record else {
            return Err(ModelError::NoSuchBucket(name.to_owned()));
        };
        let listing = list_versions(
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
        self.table.delete(name).await?;
        // The name is free again at once: the deleted bucket's settings
        // go, and only them (a creation may have claimed the name since).
        let deleted = record.bucket_key_id;
        self.table
            .metadata()
            .compare_and_set(settings_register(name), |current| {
                let ours = current
                    .and_then(|bytes| BucketSettings::decode(bytes).ok())
                    .is_some_and(|held| held.generation == deleted);
                Ok::<_, ModelError>(if ours {
                    None
                } else {
                    current.map(<[u8]>::to_vec)
                })
            })
            .await??;
        Ok(())
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
    fn claims_are_young_for_two_minutes_and_never_from_far_ahead() {
        let now = 1_800_000_000_000;
        assert!(is_young(now, now));
        assert!(is_young(now - 119_000, now));
        assert!(!is_young(now - 121_000, now));
        // A stamp slightly ahead (clock skew) is young; far ahead, stale.
        assert!(is_young(now + 1_000, now));
        assert!(!is_young(now + 3_600_000, now));
        assert!(!is_young(0, now));
    }

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
