//! Identifiers: what names a fragment, a manifest, a node, a site and an
//! object version (spec/ids.md).
//!
//! Content identifiers are BLAKE3 hashes, so anyone holding the bytes can
//! check the name. Nothing here reads a clock or a random source: callers
//! pass both in, which keeps every identifier reproducible in tests.

use std::fmt;

use thiserror::Error;

use crate::codec::{from_hex, to_hex};

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub const LEN: usize = 32;

            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            pub fn to_hex(&self) -> String {
                to_hex(&self.0)
            }

            pub fn from_hex(text: &str) -> Option<Self> {
                from_hex::<32>(text).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Eight bytes are plenty to tell ids apart in logs.
                write!(f, concat!(stringify!($name), "({}…)"), to_hex(&self.0[..8]))
            }
        }
    };
}

hash_id!(
    /// BLAKE3 of a fragment's bytes: fragments are immutable and self-verifying.
    FragmentId
);
hash_id!(
    /// BLAKE3 of a manifest's canonical (unsigned) encoding.
    ManifestId
);
hash_id!(
    /// A node's ed25519 public key; the libp2p PeerId is derived from it at the edge.
    NodeId
);

impl FragmentId {
    /// The id of a fragment held whole in memory.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

/// Hashes a fragment that arrives in pieces (a streamed put).
#[derive(Default, Clone)]
pub struct FragmentHasher(blake3::Hasher);

impl FragmentHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finalize(&self) -> FragmentId {
        FragmentId(*self.0.finalize().as_bytes())
    }
}

impl ManifestId {
    pub fn of(canonical_body: &[u8]) -> Self {
        Self(*blake3::hash(canonical_body).as_bytes())
    }
}

impl NodeId {
    /// The ed25519 key this id names; fails for bytes that are not a curve point.
    pub fn verifying_key(&self) -> Result<ed25519_dalek::VerifyingKey, IdError> {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|_| IdError::NotAPublicKey)
    }

    pub fn from_verifying_key(key: &ed25519_dalek::VerifyingKey) -> Self {
        Self(key.to_bytes())
    }
}

/// Why an identifier could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    #[error("site id must be 1 to {max} bytes of a-z, 0-9, '-', '_' or '.', got {given:?}", max = SiteId::MAX_LEN)]
    InvalidSite { given: String },
    #[error("version id must be 32 lower-case hex digits, got {given:?}")]
    InvalidVersion { given: String },
    #[error("upload id must be 32 lower-case hex digits, got {given:?}")]
    InvalidUpload { given: String },
    #[error("node id is not a valid ed25519 public key")]
    NotAPublicKey,
}

/// The name of a failure domain: a site loses power, network or floods as one.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SiteId(String);

impl SiteId {
    pub const MAX_LEN: usize = 63;

    pub fn new(name: &str) -> Result<Self, IdError> {
        let valid = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name.bytes().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
            });
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(IdError::InvalidSite {
                given: name.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An object version: 48 bits of Unix milliseconds then 80 random bits,
/// big-endian, so byte order is creation order and two writers never collide.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VersionId(pub [u8; 16]);

impl VersionId {
    pub const LEN: usize = 16;
    const MAX_MS: u64 = (1 << 48) - 1;

    pub fn new(unix_ms: u64, random: [u8; 10]) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&unix_ms.min(Self::MAX_MS).to_be_bytes()[2..]);
        bytes[6..].copy_from_slice(&random);
        Self(bytes)
    }

    pub fn unix_ms(&self) -> u64 {
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&self.0[..6]);
        u64::from_be_bytes(ms)
    }

    /// The text form used in S3 (`x-amz-version-id`): 32 lower-case hex digits.
    pub fn to_text(&self) -> String {
        to_hex(&self.0)
    }

    pub fn parse(text: &str) -> Result<Self, IdError> {
        // Only the lower-case form, so that one version has one spelling.
        if text.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(IdError::InvalidVersion {
                given: text.to_owned(),
            });
        }
        from_hex::<16>(text)
            .map(Self)
            .ok_or_else(|| IdError::InvalidVersion {
                given: text.to_owned(),
            })
    }

    fn successor(&self) -> Self {
        Self((u128::from_be_bytes(self.0).wrapping_add(1)).to_be_bytes())
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl fmt::Debug for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VersionId({})", self.to_text())
    }
}

/// An upload: one PUT, or one multipart upload. Chosen at random by the
/// gateway before the first fragment is pushed, so that every fragment's hold
/// can name what it belongs to before the manifest (whose id hashes the
/// fragment ids) exists. Its text form is the S3 multipart `UploadId`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UploadId(pub [u8; 16]);

impl UploadId {
    pub const LEN: usize = 16;

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// 32 lower-case hex digits.
    pub fn to_text(&self) -> String {
        to_hex(&self.0)
    }

    pub fn parse(text: &str) -> Result<Self, IdError> {
        if text.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(IdError::InvalidUpload {
                given: text.to_owned(),
            });
        }
        from_hex::<16>(text)
            .map(Self)
            .ok_or_else(|| IdError::InvalidUpload {
                given: text.to_owned(),
            })
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl fmt::Debug for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UploadId({})", self.to_text())
    }
}

/// Issues strictly increasing version ids on one gateway, even when the
/// wall clock steps back or two versions land in the same millisecond.
#[derive(Debug, Default)]
pub struct VersionIdGenerator {
    last: Option<VersionId>,
}

impl VersionIdGenerator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn next(&mut self, unix_ms: u64, random: [u8; 10]) -> VersionId {
        let fresh = VersionId::new(unix_ms, random);
        let id = match self.last {
            Some(last) if fresh <= last => last.successor(),
            _ => fresh,
        };
        self.last = Some(id);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ids_sort_by_time_and_stay_monotonic_when_the_clock_steps_back() {
        let mut generator = VersionIdGenerator::new();
        let a = generator.next(1_000, [0xff; 10]);
        let b = generator.next(1_000, [0x00; 10]);
        let c = generator.next(999, [0x55; 10]);
        let d = generator.next(2_000, [0x00; 10]);
        assert!(a < b && b < c && c < d, "{a:?} {b:?} {c:?} {d:?}");
        assert_eq!(d.unix_ms(), 2_000);
        assert_eq!(VersionId::parse(&d.to_text()), Ok(d));
        assert!(VersionId::parse(&d.to_text().to_uppercase()).is_err());
        assert!(VersionId::parse("null").is_err());
    }

    #[test]
    fn site_ids_are_validated() {
        assert!(SiteId::new("paris-1").is_ok());
        assert!(SiteId::new("").is_err());
        assert!(SiteId::new("Paris").is_err());
        assert!(SiteId::new(&"a".repeat(64)).is_err());
    }

    #[test]
    fn streamed_hash_equals_whole_hash() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut hasher = FragmentHasher::new();
        for piece in data.chunks(4093) {
            hasher.update(piece);
        }
        assert_eq!(hasher.finalize(), FragmentId::of(&data));
    }
}
