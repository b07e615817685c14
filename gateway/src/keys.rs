//! S3 access keys, kept in the replicated metadata (AccessKeys table) with
//! their secrets wrapped under the KMS root key, and the SigV4 lookup s3s
//! calls for every signed request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use cairn_node::meta::Metadata;
use cairn_node::swarm::now_unix_ms;
use cairn_protocol::encryption::SecretKey;
use cairn_protocol::keywrap::{SALT_BYTES, unwrap_labelled_key, wrap_labelled_key};
use cairn_protocol::meta::{Partition, Register, RowKey, RowValue, Table};
use cairn_protocol::records::{AccessKeyRecord, MAX_KEY_NAME_BYTES};
use s3s::S3Result;
use s3s::auth::{S3Auth, SecretKey as S3SecretKey};

use crate::error::{GatewayError, GatewayResult};
use crate::kms::{Kms, random_bytes};

/// How long a looked-up secret is trusted before it is read again, by
/// default: a deleted key stops working within this time on every gateway.
pub const DEFAULT_CACHE_FOR: Duration = Duration::from_secs(10);

/// An access key as `cairn admin key list` shows it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessKeyInfo {
    pub id: String,
    pub name: String,
    pub created_unix_ms: u64,
}

/// A new key: the only time its secret is shown.
#[derive(Debug, Clone)]
pub struct NewAccessKey {
    pub id: String,
    pub secret: String,
}

fn row(id: &str) -> RowKey {
    RowKey::new(
        Partition::cluster(),
        Table::AccessKeys,
        id.as_bytes().to_vec(),
    )
}

fn label(id: &str) -> String {
    format!("access-key/{id}")
}

fn secret_of(seed: &SecretKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(&seed.as_bytes()[..30])
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

/// The access keys of the cluster. Cheap to clone.
/// A secret read at a time (`None`: no such key).
type CachedSecret = (Instant, Option<String>);

#[derive(Clone)]
pub struct AccessKeys {
    kms: Kms,
    metadata: Metadata,
    cache: Arc<Mutex<HashMap<String, CachedSecret>>>,
    cache_for: Duration,
}

impl AccessKeys {
    /// `cache_for`: how long a looked-up secret is trusted before it is
    /// read again.
    pub fn new(kms: Kms, metadata: Metadata, cache_for: Duration) -> Self {
        Self {
            kms,
            metadata,
            cache_for,
            cache: Arc::default(),
        }
    }

    /// Creates a key with a fresh secret.
    pub async fn create(&self, name: &str) -> GatewayResult<NewAccessKey> {
        self.create_with_id(&new_key_id(), name, SecretKey::from_bytes(random_bytes()))
            .await
    }

    /// Creates a key with the given id and secret seed (`cairn dev` keeps
    /// its key across restarts this way).
    pub async fn create_with_id(
        &self,
        id: &str,
        name: &str,
        seed: SecretKey,
    ) -> GatewayResult<NewAccessKey> {
        if name.len() > MAX_KEY_NAME_BYTES {
            return Err(GatewayError::InvalidArgument(format!(
                "a key name has at most {MAX_KEY_NAME_BYTES} bytes"
            )));
        }
        if !(16..=128).contains(&id.len()) || !id.bytes().all(|c| c.is_ascii_alphanumeric()) {
            return Err(GatewayError::InvalidArgument(
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
        };
        self.metadata
            .write(vec![(
                row(id),
                RowValue::Register(Register {
                    at: self.metadata.timestamp(),
                    value: Some(record.encode()),
                }),
            )])
            .await?;
        self.cache.lock().expect("key cache").remove(id);
        Ok(NewAccessKey {
            id: id.to_owned(),
            secret: secret_of(&seed),
        })
    }

    /// Deletes a key; false when there was none.
    pub async fn delete(&self, id: &str) -> GatewayResult<bool> {
        let existed = self.record(id).await?.is_some();
        if existed {
            self.metadata
                .write(vec![(
                    row(id),
                    RowValue::Register(Register {
                        at: self.metadata.timestamp(),
                        value: None,
                    }),
                )])
                .await?;
        }
        self.cache.lock().expect("key cache").remove(id);
        Ok(existed)
    }

    pub async fn list(&self) -> GatewayResult<Vec<AccessKeyInfo>> {
        let mut keys = Vec::new();
        let mut start = Vec::new();
        loop {
            let page = self
                .metadata
                .range(&Partition::cluster(), Table::AccessKeys, &start, None, 1000)
                .await?;
            for (sort, value) in &page.rows {
                let RowValue::Register(Register {
                    value: Some(bytes), ..
                }) = value
                else {
                    continue;
                };
                let record = AccessKeyRecord::decode(bytes)
                    .map_err(|e| GatewayError::Corrupt(format!("access key record: {e}")))?;
                keys.push(AccessKeyInfo {
                    id: String::from_utf8_lossy(sort).into_owned(),
                    name: record.name,
                    created_unix_ms: record.created_unix_ms,
                });
            }
            match page.rows.last() {
                Some((last, _)) if page.more => {
                    start = last.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        Ok(keys)
    }

    async fn record(&self, id: &str) -> GatewayResult<Option<AccessKeyRecord>> {
        let value = self.metadata.read(vec![row(id)]).await?.remove(0);
        match value {
            Some(RowValue::Register(Register {
                value: Some(bytes), ..
            })) => AccessKeyRecord::decode(&bytes)
                .map(Some)
                .map_err(|e| GatewayError::Corrupt(format!("access key {id}: {e}"))),
            _ => Ok(None),
        }
    }

    /// The secret of key `id`, or `None` when there is no such key.
    pub async fn secret(&self, id: &str) -> GatewayResult<Option<String>> {
        if let Some((at, secret)) = self.cache.lock().expect("key cache").get(id)
            && at.elapsed() < self.cache_for
        {
            return Ok(secret.clone());
        }
        let secret = match self.record(id).await? {
            None => None,
            Some(record) => {
                let seed = unwrap_labelled_key(
                    self.kms.root().secret(),
                    &record.wrapped_secret,
                    &label(id),
                )
                .map_err(|e| {
                    GatewayError::Corrupt(format!(
                        "access key {id} does not unwrap under this gateway's root key: {e}"
                    ))
                })?;
                Some(secret_of(&seed))
            }
        };
        self.cache
            .lock()
            .expect("key cache")
            .insert(id.to_owned(), (Instant::now(), secret.clone()));
        Ok(secret)
    }
}

#[async_trait::async_trait]
impl S3Auth for AccessKeys {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<S3SecretKey> {
        match self.secret(access_key).await {
            Ok(Some(secret)) => Ok(S3SecretKey::from(secret)),
            Ok(None) => Err(s3s::s3_error!(
                InvalidAccessKeyId,
                "The AWS access key Id you provided does not exist in our records."
            )),
            Err(error) => {
                tracing::warn!(%error, "access key lookup failed");
                Err(s3s::s3_error!(
                    ServiceUnavailable,
                    "the access keys cannot be read right now"
                ))
            }
        }
    }
}
