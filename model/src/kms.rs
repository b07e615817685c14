//! The internal KMS (spec/gateway.md, "Keys"). Its root key is handed to
//! gateway nodes by the operator, by file or environment, and never enters
//! the swarm: storage nodes and metadata replicas only ever see keys wrapped
//! under it. Bucket keys (which wrap SSE-S3 data keys) and access-key
//! secrets are kept in the metadata tables, wrapped with a label that binds
//! each to its name.

use std::path::Path;
use std::sync::Arc;

use cairn_node::clock::now_unix_ms;
use cairn_node::clock::random_bytes;
use cairn_node::meta::Metadata;
use cairn_protocol::encryption::SecretKey;
use cairn_protocol::ids::VersionId;
use cairn_protocol::keywrap::{SALT_BYTES, unwrap_labelled_key, wrap_labelled_key};
use cairn_protocol::keywrap::{WrapContext, unwrap_data_key, wrap_data_key};
use cairn_protocol::manifest::{KeyEnvelope, KeyKind, Manifest};
use cairn_protocol::records::KmsKeyRecord;

use crate::error::{ModelError, ModelResult};
use crate::registers::{Caching, RegisterTable};

/// The environment variable that may carry the root key (64 hex digits).
pub const ROOT_KEY_ENV: &str = "CAIRN_ROOT_KEY";

/// The root key of the internal KMS.
pub struct RootKey(SecretKey);

impl RootKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(SecretKey::from_bytes(bytes))
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> ModelResult<Self> {
        cairn_protocol::from_hex::<32>(text.trim())
            .map(Self::from_bytes)
            .ok_or_else(|| {
                ModelError::InvalidArgument("a root key is 64 hexadecimal digits".into())
            })
    }

    /// Reads a key file written by [`RootKey::create`]; refuses one that
    /// others can read.
    pub fn load(path: &Path) -> ModelResult<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| ModelError::Internal(format!("root key {}: {e}", path.display())))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(ModelError::InvalidArgument(format!(
                    "root key {} is readable by others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                )));
            }
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Internal(format!("root key {}: {e}", path.display())))?;
        Self::from_hex(&text)
    }

    /// Writes a fresh root key to `path` (mode 0600) and returns it.
    pub fn create(path: &Path) -> ModelResult<Self> {
        let bytes = random_bytes::<32>();
        let io = |e: std::io::Error| ModelError::Internal(format!("{}: {e}", path.display()));
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
    pub fn from_env_or_file(path: Option<&Path>) -> ModelResult<Self> {
        if let Ok(text) = std::env::var(ROOT_KEY_ENV) {
            return Self::from_hex(&text);
        }
        match path {
            Some(path) => Self::load(path),
            None => Err(ModelError::InvalidArgument(format!(
                "the gateway needs the KMS root key: set {ROOT_KEY_ENV} or `root_key_file` under [s3]"
            ))),
        }
    }

    pub fn secret(&self) -> &SecretKey {
        &self.0
    }
}

/// The internal KMS of one gateway. Cheap to clone.
#[derive(Clone)]
pub struct Kms {
    root: Arc<RootKey>,
    /// A key never changes once created, so its record is cached for good.
    table: RegisterTable<KmsKeyRecord>,
}

impl Kms {
    pub fn new(root: RootKey, metadata: Metadata) -> Self {
        Self {
            root: Arc::new(root),
            table: RegisterTable::new(metadata, Caching::WriteOnce),
        }
    }

    pub fn root(&self) -> &RootKey {
        &self.root
    }

    fn label(id: &str) -> String {
        format!("kms/{id}")
    }

    /// Creates key `id` with fresh random bytes. Ids are chosen unique by
    /// the caller (they carry random bits), so a plain write is enough.
    pub async fn create_key(&self, id: &str) -> ModelResult<Arc<SecretKey>> {
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
        self.table.put(id, &record).await?;
        Ok(Arc::new(key))
    }

    /// Key `id`, unwrapped.
    pub async fn key(&self, id: &str) -> ModelResult<Arc<SecretKey>> {
        let record = self
            .table
            .get(id)
            .await?
            .ok_or_else(|| ModelError::Corrupt(format!("KMS key {id:?} is missing")))?;
        let key = unwrap_labelled_key(self.root.secret(), &record.wrapped_key, &Self::label(id))
            .map_err(|e| {
                // Read again next time: the row may be repaired.
                self.table.forget(id);
                ModelError::Corrupt(format!(
                    "KMS key {id:?} does not unwrap under this gateway's root key: {e}"
                ))
            })?;
        Ok(Arc::new(key))
    }
}

/// The keys that seal an object: its data key, and the bucket key that
/// wraps it for one version (a commit that needs a new version wraps it
/// again).
pub struct DataKeys {
    pub bucket_key_id: String,
    pub bucket_key: Arc<SecretKey>,
    pub data_key: SecretKey,
}

impl DataKeys {
    /// The keys of a stored object: its manifest's data key, unwrapped with
    /// its bucket key for the version the manifest names. Only SSE-S3
    /// manifests are opened by this build.
    pub async fn of_manifest(kms: &Kms, manifest: &Manifest) -> ModelResult<Self> {
        if manifest.encryption.kind != KeyKind::SseS3 {
            return Err(ModelError::Internal(format!(
                "objects encrypted with {:?} cannot be opened by this build",
                manifest.encryption.kind
            )));
        }
        let bucket_key = kms.key(&manifest.encryption.key_id).await?;
        let data_key = unwrap_data_key(
            &bucket_key,
            &manifest.encryption.wrapped,
            &WrapContext {
                bucket: &manifest.bucket,
                key: &manifest.key,
                version: manifest.version,
            },
        )
        .map_err(|e| ModelError::Corrupt(format!("the data key does not unwrap: {e}")))?;
        Ok(Self {
            bucket_key_id: manifest.encryption.key_id.clone(),
            bucket_key,
            data_key,
        })
    }

    /// The data key wrapped for `version` of `key`, as the manifest keeps it.
    pub fn envelope(&self, bucket: &str, key: &str, version: VersionId) -> KeyEnvelope {
        let wrapped = wrap_data_key(
            &self.bucket_key,
            &self.data_key,
            &WrapContext {
                bucket,
                key,
                version,
            },
            random_bytes::<SALT_BYTES>(),
        );
        KeyEnvelope {
            kind: KeyKind::SseS3,
            key_id: self.bucket_key_id.clone(),
            wrapped: wrapped.to_vec(),
        }
    }
}
