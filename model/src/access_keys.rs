//! S3 access keys, kept in the replicated metadata (AccessKeys table) with
//! their secrets wrapped under the KMS root key.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use cairn_node::clock::now_unix_ms;
use cairn_node::meta::Metadata;
use cairn_protocol::encryption::SecretKey;
use cairn_protocol::keywrap::{SALT_BYTES, unwrap_labelled_key, wrap_labelled_key};
use cairn_protocol::records::{AccessKeyRecord, MAX_KEY_NAME_BYTES};

use crate::error::{ModelError, ModelResult};
use crate::kms::Kms;
use crate::registers::{Caching, RegisterTable};
use cairn_node::clock::random_bytes;

/// How long a looked-up secret is trusted before it is read again, by
/// default: a deleted key stops working within this time on every gateway.
pub const DEFAULT_CACHE_FOR: Duration = Duration::from_secs(10);

/// An access key as `cairn admin key list` shows it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessKeyInfo {
    pub id: String,
    pub name: String,
    pub created_unix_ms: u64,
    /// Bits of `cairn_protocol::records::permission`.
    pub permissions: u64,
}

/// A new key: the only time its secret is shown.
#[derive(Debug, Clone)]
pub struct NewAccessKey {
    pub id: String,
    pub secret: String,
}

fn label(id: &str) -> String {
    format!("access-key/{id}")
}

fn secret_of(seed: &SecretKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(&seed.as_bytes()[..30])
}

/// Whether `id` has the shape of an access key id: 16 to 128 letters and
/// digits.
fn is_key_id(id: &str) -> bool {
    (16..=128).contains(&id.len()) && id.bytes().all(|c| c.is_ascii_alphanumeric())
}

/// An access key id: "CK" then 18 characters of RFC 4648 base32 (the
/// shape of AWS's ids, so that every client accepts it).
fn new_key_id() -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let random = random_bytes::<18>();
    let mut id = String::from("CK");
    id.extend(random.iter().map(|b| ALPHABET[(b & 31) as usize] as char));
    id
}

/// How long a listing of every key id answers for ids not in it: keys
/// created through another gateway work here within this time.
const KNOWN_IDS_FOR: Duration = Duration::from_secs(1);

/// Every key id as last listed, and when; or when the last listing failed
/// (lookups then read the id itself until the next try).
enum KnownIds {
    Unlisted,
    Listed(Instant, Arc<HashSet<String>>),
    Failed(Instant),
}

/// The access keys of the cluster. Cheap to clone.
#[derive(Clone)]
pub struct AccessKeys {
    kms: Kms,
    table: RegisterTable<AccessKeyRecord>,
    /// Unknown ids, which any client can send before its signature is
    /// checked, are answered from this listing: they cost one listing per
    /// [`KNOWN_IDS_FOR`] at most, not one read each. The lock makes
    /// concurrent misses share one listing.
    known: Arc<tokio::sync::Mutex<KnownIds>>,
}

impl AccessKeys {
    /// `cache_for`: how long a looked-up key is trusted before it is read
    /// again (a deleted key authenticates here for at most this long).
    pub fn new(kms: Kms, metadata: Metadata, cache_for: Duration) -> Self {
        Self {
            kms,
            table: RegisterTable::new(metadata, Caching::For(cache_for)),
            known: Arc::new(tokio::sync::Mutex::new(KnownIds::Unlisted)),
        }
    }

    /// Quorum reads the key lookups have made so far.
    pub fn metadata_reads(&self) -> u64 {
        self.table.reads()
    }

    /// Whether key `id` may exist: it is in a listing of every id made
    /// less than [`KNOWN_IDS_FOR`] ago (made now if there is none). When
    /// listing fails, every id may exist for a while: lookups read it.
    async fn may_exist(&self, id: &str) -> bool {
        let mut known = self.known.lock().await;
        match &*known {
            KnownIds::Listed(at, ids) if at.elapsed() < KNOWN_IDS_FOR => return ids.contains(id),
            KnownIds::Failed(at) if at.elapsed() < KNOWN_IDS_FOR => return true,
            _ => {}
        }
        let listed = self.table.names().await;
        // A listing ages from when it ended: one that takes longer than
        // its lifetime must still answer the misses queued behind it.
        let at = Instant::now();
        match listed {
            Ok(names) => {
                let ids: HashSet<String> = names.into_iter().collect();
                let exists = ids.contains(id);
                *known = KnownIds::Listed(at, Arc::new(ids));
                exists
            }
            Err(error) => {
                tracing::warn!(%error, "access key ids could not be listed; looking ids up one by one");
                *known = KnownIds::Failed(at);
                true
            }
        }
    }

    /// Creates a key with a fresh secret and no permission beyond reading
    /// and writing objects.
    pub async fn create(&self, name: &str) -> ModelResult<NewAccessKey> {
        self.create_with(name, 0).await
    }

    /// Creates a key with a fresh secret and `permissions` (bits of
    /// `cairn_protocol::records::permission`).
    pub async fn create_with(&self, name: &str, permissions: u64) -> ModelResult<NewAccessKey> {
        let seed = SecretKey::from_bytes(random_bytes());
        self.create_with_id(&new_key_id(), name, seed, permissions)
            .await
    }

    /// Creates a key with the given id and secret seed (`cairn dev` keeps
    /// its key across restarts this way).
    pub async fn create_with_id(
        &self,
        id: &str,
        name: &str,
        seed: SecretKey,
        permissions: u64,
    ) -> ModelResult<NewAccessKey> {
        if name.len() > MAX_KEY_NAME_BYTES {
            return Err(ModelError::InvalidArgument(format!(
                "a key name has at most {MAX_KEY_NAME_BYTES} bytes"
            )));
        }
        if !is_key_id(id) {
            return Err(ModelError::InvalidArgument(
                "an access key id is 16 to 128 letters and digits".into(),
            ));
        }
        let wrapped = wrap_labelled_key(
            self.kms.root().secret(),
            &seed,
            &label(id),
            random_bytes::<SALT_BYTES>(),
        );
        let record = AccessKeyRecord {
            created_unix_ms: now_unix_ms(),
            name: name.to_owned(),
            wrapped_secret: wrapped.to_vec(),
            permissions: Some(permissions),
        };
        self.table.put(id, &record).await?;
        // Listed again at the next lookup, with the new key in it.
        *self.known.lock().await = KnownIds::Unlisted;
        Ok(NewAccessKey {
            id: id.to_owned(),
            secret: secret_of(&seed),
        })
    }

    /// Deletes a key; false when there was none.
    pub async fn delete(&self, id: &str) -> ModelResult<bool> {
        let existed = self.table.get_fresh(id).await?.is_some();
        if existed {
            self.table.delete(id).await?;
        }
        Ok(existed)
    }

    pub async fn list(&self) -> ModelResult<Vec<AccessKeyInfo>> {
        Ok(self
            .table
            .list()
            .await?
            .into_iter()
            .map(|(id, record)| AccessKeyInfo {
                id,
                permissions: record.permissions_or_legacy(),
                name: record.name,
                created_unix_ms: record.created_unix_ms,
            })
            .collect())
    }

    /// Whether key `id` (one that signed a request: it exists) has every
    /// bit of `permission`; read as its secret is (cached as long).
    pub async fn may(&self, id: &str, permission: u64) -> ModelResult<bool> {
        if !is_key_id(id) {
            return Ok(false);
        }
        let record = match self.table.cached(id) {
            Some(record) => record,
            None => self.table.get_fresh(id).await?,
        };
        Ok(record.is_some_and(|r| r.may(permission)))
    }

    /// The secret of key `id`, or `None` when there is no such key.
    pub async fn secret(&self, id: &str) -> ModelResult<Option<String>> {
        // Any client names ids: one no key can have is answered unread.
        if !is_key_id(id) {
            return Ok(None);
        }
        let record = match self.table.cached(id) {
            Some(record) => record,
            None if !self.may_exist(id).await => return Ok(None),
            None => self.table.get_fresh(id).await?,
        };
        let Some(record) = record else {
            return Ok(None);
        };
        let seed =
            unwrap_labelled_key(self.kms.root().secret(), &record.wrapped_secret, &label(id))
                .map_err(|e| {
                    // Read again next time: the row may be repaired.
                    self.table.forget(id);
                    ModelError::Corrupt(format!(
                        "access key {id} does not unwrap under this gateway's root key: {e}"
                    ))
                })?;
        Ok(Some(secret_of(&seed)))
    }
}
