//! The internal KMS (spec/gateway.md, "Keys"). Its root key is handed to
//! gateway nodes by the operator, by file or environment, and never enters
//! the swarm: storage nodes and metadata replicas only ever see keys wrapped
//! under it. Bucket keys (which wrap SSE-S3 data keys) and access-key
//! secrets are kept in the metadata tables, wrapped with a label that binds
//! each to its name.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cairn_node::meta::Metadata;
use cairn_node::swarm::now_unix_ms;
use cairn_protocol::encryption::SecretKey;
use cairn_protocol::keywrap::{SALT_BYTES, unwrap_labelled_key, wrap_labelled_key};
use cairn_protocol::meta::{Partition, Register, RowKey, RowValue, Table};
use cairn_protocol::records::KmsKeyRecord;

use crate::error::{GatewayError, GatewayResult};

/// The environment variable that may carry the root key (64 hex digits).
pub const ROOT_KEY_ENV: &str = "CAIRN_ROOT_KEY";

/// Fresh random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    bytes
}

/// The root key of the internal KMS.
pub struct RootKey(SecretKey);

impl RootKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(SecretKey::from_bytes(bytes))
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> GatewayResult<Self> {
        cairn_protocol::from_hex::<32>(text.trim())
            .map(Self::from_bytes)
            .ok_or_else(|| {
                GatewayError::InvalidArgument("a root key is 64 hexadecimal digits".into())
            })
    }

    /// Reads a key file written by [`RootKey::create`]; refuses one that
    /// others can read.
    pub fn load(path: &Path) -> GatewayResult<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| GatewayError::Internal(format!("root key {}: {e}", path.display())))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(GatewayError::InvalidArgument(format!(
                    "root key {} is readable by others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                )));
            }
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| GatewayError::Internal(format!("root key {}: {e}", path.display())))?;
        Self::from_hex(&text)
    }

    /// Writes a fresh root key to `path` (mode 0600) and returns it.
    pub fn create(path: &Path) -> GatewayResult<Self> {
        let bytes = random_bytes::<32>();
        let io = |e: std::io::Error| GatewayError::Internal(format!("{}: {e}", path.display()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io)?;
        use std::io::Write;
        file.write_all(cairn_protocol::to_hex(&bytes).as_bytes())
            .and_then(|_| file.sync_all())
            .map_err(io)?;
        Ok(Self::from_bytes(bytes))
    }

    /// The root key from `CAIRN_ROOT_KEY`, else from `path`.
    pub fn from_env_or_file(path: Option<&Path>) -> GatewayResult<Self> {
        if let Ok(text) = std::env::var(ROOT_KEY_ENV) {
            return Self::from_hex(&text);
        }
        match path {
            Some(path) => Self::load(path),
            None => Err(GatewayError::InvalidArgument(format!(
                "the gateway needs the KMS root key: set {ROOT_KEY_ENV} or `root_key_file` under [s3]"
            ))),
        }
    }

    pub(crate) fn secret(&self) -> &SecretKey {
        &self.0
    }
}

/// The internal KMS of one gateway. Cheap to clone.
#[derive(Clone)]
pub struct Kms {
    root: Arc<RootKey>,
    metadata: Metadata,
    /// Unwrapped keys by id: a key never changes once created.
    cache: Arc<Mutex<HashMap<String, Arc<SecretKey>>>>,
}

impl Kms {
    pub fn new(root: RootKey, metadata: Metadata) -> Self {
        Self {
            root: Arc::new(root),
            metadata,
            cache: Arc::default(),
        }
    }

    pub fn root(&self) -> &RootKey {
        &self.root
    }

    fn row(id: &str) -> RowKey {
        RowKey::new(Partition::cluster(), Table::KmsKeys, id.as_bytes().to_vec())
    }

    fn label(id: &str) -> String {
        format!("kms/{id}")
    }

    /// Creates key `id` with fresh random bytes. Ids are chosen unique by
    /// the caller (they carry random bits), so a plain write is enough.
    pub async fn create_key(&self, id: &str) -> GatewayResult<Arc<SecretKey>> {
        let key = SecretKey::from_bytes(random_bytes::<32>());
        let wrapped = wrap_labelled_key(
            self.root.secret(),
            &key,
            &Self::label(id),
            random_bytes::<SALT_BYTES>(),
        );
        let record = KmsKeyRecord {
            created_unix_ms: now_unix_ms(),
            wrapped_key: wrapped.to_vec(),
        };
        self.metadata
            .write(vec![(
                Self::row(id),
                RowValue::Register(Register {
                    at: self.metadata.timestamp(),
                    value: Some(record.encode()),
                }),
            )])
            .await?;
        Ok(self.remember(id, key))
    }

    fn remember(&self, id: &str, key: SecretKey) -> Arc<SecretKey> {
        let key = Arc::new(key);
        self.cache
            .lock()
            .expect("kms cache")
            .insert(id.to_owned(), key.clone());
        key
    }

    /// Key `id`, unwrapped.
    pub async fn key(&self, id: &str) -> GatewayResult<Arc<SecretKey>> {
        if let Some(key) = self.cache.lock().expect("kms cache").get(id) {
            return Ok(key.clone());
        }
        let value = self.metadata.read(vec![Self::row(id)]).await?.remove(0);
        let Some(RowValue::Register(Register {
            value: Some(bytes), ..
        })) = value
        else {
            return Err(GatewayError::Corrupt(format!("KMS key {id:?} is missing")));
        };
        let record = KmsKeyRecord::decode(&bytes)
            .map_err(|e| GatewayError::Corrupt(format!("KMS key {id:?}: {e}")))?;
        let key = unwrap_labelled_key(self.root.secret(), &record.wrapped_key, &Self::label(id))
            .map_err(|e| {
                GatewayError::Corrupt(format!(
                    "KMS key {id:?} does not unwrap under this gateway's root key: {e}"
                ))
            })?;
        Ok(self.remember(id, key))
    }
}
