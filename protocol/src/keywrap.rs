//! Wrapping a data key under a key-encryption key (spec/encryption.md).
//!
//! The wrap is bound to the object it protects: bucket, key and version are
//! authenticated data, so a wrapped key copied onto another object does not
//! unwrap. A fresh 24-byte salt derives a one-time AES-256-GCM key with
//! BLAKE3, which removes the birthday bound of random 96-bit nonces.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::aead::{Nonce, Tag};
use thiserror::Error;

use crate::encryption::SecretKey;
use crate::ids::VersionId;

/// Bytes of a wrapped data key: format byte, salt, sealed key, tag.
pub const WRAPPED_KEY_BYTES: usize = 1 + SALT_BYTES + 32 + 16;
pub const SALT_BYTES: usize = 24;
const FORMAT_V1: u8 = 1;
const DERIVE_CONTEXT: &str = "cairn 2026-11 data key wrap v1";

/// What a wrapped data key is bound to.
#[derive(Debug, Clone, Copy)]
pub struct WrapContext<'a> {
    pub bucket: &'a str,
    pub key: &'a str,
    pub version: VersionId,
}

impl WrapContext<'_> {
    fn associated_data(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(8 + self.bucket.len() + self.key.len() + 16);
        aad.extend_from_slice(&(self.bucket.len() as u32).to_be_bytes());
        aad.extend_from_slice(self.bucket.as_bytes());
        aad.extend_from_slice(&(self.key.len() as u32).to_be_bytes());
        aad.extend_from_slice(self.key.as_bytes());
        aad.extend_from_slice(&self.version.0);
        aad
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyWrapError {
    #[error("wrapped key has {len} bytes, expected {WRAPPED_KEY_BYTES}")]
    BadLength { len: usize },
    #[error("wrapped key format {format} is not supported")]
    UnknownFormat { format: u8 },
    #[error(
        "the data key does not unwrap: wrong key-encryption key, or the key belongs to another object"
    )]
    WrongKeyOrObject,
}

fn one_time_cipher(kek: &SecretKey, salt: &[u8; SALT_BYTES]) -> Aes256Gcm {
    let mut material = [0u8; 32 + SALT_BYTES];
    material[..32].copy_from_slice(kek.as_bytes());
    material[32..].copy_from_slice(salt);
    let derived = SecretKey::from_bytes(blake3::derive_key(DERIVE_CONTEXT, &material));
    material.fill(0);
    Aes256Gcm::new(derived.as_bytes().into())
}

/// Wraps `data_key` under `kek` for the object `context` names. `salt` must
/// be fresh random bytes.
pub fn wrap_data_key(
    kek: &SecretKey,
    data_key: &SecretKey,
    context: &WrapContext<'_>,
    salt: [u8; SALT_BYTES],
) -> [u8; WRAPPED_KEY_BYTES] {
    wrap(kek, data_key, &context.associated_data(), salt)
}

pub fn unwrap_data_key(
    kek: &SecretKey,
    wrapped: &[u8],
    context: &WrapContext<'_>,
) -> Result<SecretKey, KeyWrapError> {
    unwrap(kek, wrapped, &context.associated_data())
}

/// The associated data of a key bound to a name rather than to an object
/// (a KMS key, an access key's secret). It starts with a byte no object's
/// associated data starts with (theirs is a bucket length below 2^24), so
/// a key wrapped for one use never unwraps for the other.
fn label_associated_data(label: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(LABEL_PREFIX.len() + label.len());
    aad.extend_from_slice(LABEL_PREFIX);
    aad.extend_from_slice(label.as_bytes());
    aad
}

const LABEL_PREFIX: &[u8] = b"cairn key label v1\0";

/// Wraps a 32-byte key under `kek`, bound to `label` (e.g. `kms/<key id>`).
pub fn wrap_labelled_key(
    kek: &SecretKey,
    key: &SecretKey,
    label: &str,
    salt: [u8; SALT_BYTES],
) -> [u8; WRAPPED_KEY_BYTES] {
    wrap(kek, key, &label_associated_data(label), salt)
}

pub fn unwrap_labelled_key(
    kek: &SecretKey,
    wrapped: &[u8],
    label: &str,
) -> Result<SecretKey, KeyWrapError> {
    unwrap(kek, wrapped, &label_associated_data(label))
}

fn wrap(
    kek: &SecretKey,
    data_key: &SecretKey,
    associated_data: &[u8],
    salt: [u8; SALT_BYTES],
) -> [u8; WRAPPED_KEY_BYTES] {
    let mut out = [0u8; WRAPPED_KEY_BYTES];
    out[0] = FORMAT_V1;
    out[1..1 + SALT_BYTES].copy_from_slice(&salt);
    let body = &mut out[1 + SALT_BYTES..1 + SALT_BYTES + 32];
    body.copy_from_slice(data_key.as_bytes());
    // The derived key is used exactly once, so a zero nonce is safe.
    let tag = one_time_cipher(kek, &salt)
        .encrypt_inout_detached(&Nonce::<Aes256Gcm>::default(), associated_data, body.into())
        .expect("32 bytes are far below the GCM length limit");
    out[1 + SALT_BYTES + 32..].copy_from_slice(&tag);
    out
}

fn unwrap(
    kek: &SecretKey,
    wrapped: &[u8],
    associated_data: &[u8],
) -> Result<SecretKey, KeyWrapError> {
    if wrapped.len() != WRAPPED_KEY_BYTES {
        return Err(KeyWrapError::BadLength { len: wrapped.len() });
    }
    if wrapped[0] != FORMAT_V1 {
        return Err(KeyWrapError::UnknownFormat { format: wrapped[0] });
    }
    let mut salt = [0u8; SALT_BYTES];
    salt.copy_from_slice(&wrapped[1..1 + SALT_BYTES]);
    let mut body = [0u8; 32];
    body.copy_from_slice(&wrapped[1 + SALT_BYTES..1 + SALT_BYTES + 32]);
    let tag = Tag::<Aes256Gcm>::try_from(&wrapped[1 + SALT_BYTES + 32..])
        .map_err(|_| KeyWrapError::BadLength { len: wrapped.len() })?;
    one_time_cipher(kek, &salt)
        .decrypt_inout_detached(
            &Nonce::<Aes256Gcm>::default(),
            associated_data,
            body.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| KeyWrapError::WrongKeyOrObject)?;
    Ok(SecretKey::from_bytes(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(key: &str) -> WrapContext<'_> {
        WrapContext {
            bucket: "photos",
            key,
            version: VersionId::new(1_700_000_000_000, [7; 10]),
        }
    }

    #[test]
    fn labelled_keys_unwrap_only_under_their_label() {
        let kek = SecretKey::from_bytes([1; 32]);
        let key = SecretKey::from_bytes([2; 32]);
        let wrapped = wrap_labelled_key(&kek, &key, "kms/bucket-1", [3; 24]);
        let back = unwrap_labelled_key(&kek, &wrapped, "kms/bucket-1").unwrap();
        assert_eq!(back.as_bytes(), key.as_bytes());
        assert!(unwrap_labelled_key(&kek, &wrapped, "kms/bucket-2").is_err());
        assert!(unwrap_data_key(&kek, &wrapped, &context("kms/bucket-1")).is_err());
        let object = wrap_data_key(&kek, &key, &context("a"), [3; 24]);
        assert!(unwrap_labelled_key(&kek, &object, "a").is_err());
    }

    #[test]
    fn unwraps_only_for_the_same_kek_and_object() {
        let kek = SecretKey::from_bytes([1; 32]);
        let dek = SecretKey::from_bytes([2; 32]);
        let wrapped = wrap_data_key(&kek, &dek, &context("a.jpg"), [3; 24]);
        assert_eq!(
            unwrap_data_key(&kek, &wrapped, &context("a.jpg"))
                .unwrap()
                .as_bytes(),
            dek.as_bytes()
        );
        let other_kek = SecretKey::from_bytes([9; 32]);
        assert_eq!(
            unwrap_data_key(&other_kek, &wrapped, &context("a.jpg")).unwrap_err(),
            KeyWrapError::WrongKeyOrObject
        );
        assert_eq!(
            unwrap_data_key(&kek, &wrapped, &context("b.jpg")).unwrap_err(),
            KeyWrapError::WrongKeyOrObject
        );
        let mut other_version = context("a.jpg");
        other_version.version = VersionId::new(1_700_000_000_001, [7; 10]);
        assert!(unwrap_data_key(&kek, &wrapped, &other_version).is_err());
        assert!(unwrap_data_key(&kek, &wrapped[1..], &context("a.jpg")).is_err());
    }

    #[test]
    fn bucket_and_key_boundaries_cannot_be_shifted() {
        let kek = SecretKey::from_bytes([1; 32]);
        let dek = SecretKey::from_bytes([2; 32]);
        let version = VersionId::new(5, [0; 10]);
        let a = WrapContext {
            bucket: "ab",
            key: "c",
            version,
        };
        let b = WrapContext {
            bucket: "a",
            key: "bc",
            version,
        };
        let wrapped = wrap_data_key(&kek, &dek, &a, [3; 24]);
        assert!(unwrap_data_key(&kek, &wrapped, &b).is_err());
    }
}
