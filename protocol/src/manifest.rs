//! The manifest: an object version's "torrent" (spec/manifest.md).
//!
//! It names every fragment of every segment, the coding scheme, the wrapped
//! data key, sizes and the ETag. The encoding is canonical (one manifest,
//! one byte string), so its BLAKE3 is its id; the writing node signs it with
//! ed25519. Decoding never trusts a length it has not checked against the
//! bytes actually present, and refuses any manifest whose parts disagree
//! with its own layout.

use ed25519_dalek::{Signature, Signer, SigningKey};
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::encryption::{ChunkSize, SecretKey, part_stream_key};
use crate::erasure::{Scheme, SegmentLayout};
use crate::ids::{FragmentId, ManifestId, NodeId, UploadId, VersionId};

const MAGIC: &[u8; 4] = b"CRNM";
/// The manifest format this code writes; it reads this one and format 1.
pub const FORMAT_VERSION: u16 = 2;
pub const SIGNATURE_BYTES: usize = 64;

pub const MAX_BUCKET_BYTES: usize = 63;
pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_KEY_ID_BYTES: usize = 2048;
pub const MAX_WRAPPED_KEY_BYTES: usize = 4096;
pub const MAX_ETAG_BYTES: usize = 64;
pub const MAX_PARTS: usize = 10_000;
/// The longest object (S3's limit, 5 TiB): a manifest claiming more is
/// refused, which keeps every length computed from it within 64 bits.
pub const MAX_OBJECT_BYTES: u64 = 5 << 40;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ManifestError {
    #[error("not a manifest (bad magic bytes)")]
    BadMagic,
    #[error(
        "manifest format {found} is not supported (this node reads formats 1 and {FORMAT_VERSION})"
    )]
    UnsupportedFormat { found: u16 },
    #[error("malformed manifest: {0}")]
    Decode(#[from] DecodeError),
    #[error("manifest is inconsistent: {0}")]
    Inconsistent(String),
    #[error("the manifest's signature does not verify against its writer's key")]
    BadSignature,
    #[error("the signing key does not belong to the manifest's writer")]
    WrongSigner,
    #[error("{field} is {len} bytes, more than the limit of {max}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// Which key-encryption key wraps the data key (the S3 SSE mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// SSE-S3: a bucket key of the internal KMS.
    SseS3 = 1,
    /// SSE-KMS: a key of the internal or an external KMS, named by key id.
    SseKms = 2,
    /// SSE-C: the customer's own key, never stored.
    SseC = 3,
}

impl KeyKind {
    fn from_byte(byte: u8) -> Result<Self, DecodeError> {
        match byte {
            1 => Ok(Self::SseS3),
            2 => Ok(Self::SseKms),
            3 => Ok(Self::SseC),
            other => Err(DecodeError::InvalidValue {
                field: "key kind",
                value: u64::from(other),
            }),
        }
    }
}

/// The wrapped data key and the name of the key that wraps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEnvelope {
    pub kind: KeyKind,
    pub key_id: String,
    pub wrapped: Vec<u8>,
}

/// One segment: its ciphertext length and its `k + m` fragments in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRef {
    pub ciphertext_len: u32,
    pub fragments: Vec<FragmentId>,
}

/// One encryption stream: the whole object for a single PUT (number 0), one
/// part of a multipart upload otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub number: u32,
    /// The upload the holds of this part's fragments name: the object's
    /// upload for a single PUT, its own for each part attempt of a
    /// multipart upload (so that parts can be released one by one).
    pub upload: UploadId,
    pub plaintext_len: u64,
    pub segments: Vec<SegmentRef>,
}

/// Which key seals each part's stream; the manifest's format says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKeys {
    /// Format 1: every part under the data key itself. Two attempts at one
    /// part number could seal under one (key, nonce): read, never written.
    Shared,
    /// Format 2: each part under the data key derived with the part's
    /// upload id ([`part_stream_key`]), unique to the attempt.
    PerAttempt,
}

impl PartKeys {
    fn format(self) -> u16 {
        match self {
            Self::Shared => 1,
            Self::PerAttempt => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The format: how parts' stream keys come from the data key.
    pub part_keys: PartKeys,
    pub writer: NodeId,
    pub created_unix_ms: u64,
    pub bucket: String,
    pub key: String,
    pub version: VersionId,
    /// The upload whose fragments these are: every fragment's hold names it.
    pub upload: UploadId,
    pub layout: SegmentLayout,
    pub encryption: KeyEnvelope,
    pub etag: String,
    pub parts: Vec<Part>,
}

impl Manifest {
    /// Every fragment of every segment of every part, in order.
    pub fn fragment_ids(&self) -> impl Iterator<Item = FragmentId> + '_ {
        self.parts
            .iter()
            .flat_map(|p| p.segments.iter().flat_map(|s| s.fragments.iter().copied()))
    }

    pub fn plaintext_len(&self) -> u64 {
        self.parts.iter().map(|p| p.plaintext_len).sum()
    }

    /// The key that sealed `part`'s stream (its stream id is its number).
    pub fn stream_key(&self, data_key: &SecretKey, part: &Part) -> SecretKey {
        match self.part_keys {
            PartKeys::Shared => SecretKey::from_bytes(*data_key.as_bytes()),
            PartKeys::PerAttempt => part_stream_key(data_key, &part.upload),
        }
    }

    /// The canonical body: what the id hashes and the writer signs.
    pub fn encode_body(&self) -> Result<Vec<u8>, ManifestError> {
        self.check()?;
        let scheme = self.layout.scheme;
        let fragments: usize = self
            .parts
            .iter()
            .map(|p| p.segments.len() * scheme.total())
            .sum();
        let mut out = Vec::with_capacity(
            256 + self.key.len() + self.encryption.wrapped.len() + fragments * 32,
        );
        out.extend_from_slice(MAGIC);
        out.put_u16(self.part_keys.format());
        out.extend_from_slice(self.writer.as_bytes());
        out.put_u64(self.created_unix_ms);
        out.put_bytes16(self.bucket.as_bytes());
        out.put_bytes16(self.key.as_bytes());
        out.extend_from_slice(&self.version.0);
        out.extend_from_slice(self.upload.as_bytes());
        out.put_u8(scheme.data() as u8);
        out.put_u8(scheme.parity() as u8);
        out.put_u32(self.layout.chunk_size.get());
        out.put_u32(self.layout.chunks_per_segment());
        out.put_u8(self.encryption.kind as u8);
        out.put_bytes16(self.encryption.key_id.as_bytes());
        out.put_bytes16(&self.encryption.wrapped);
        out.put_bytes16(self.etag.as_bytes());
        out.put_u32(self.parts.len() as u32);
        for part in &self.parts {
            out.put_u32(part.number);
            out.extend_from_slice(part.upload.as_bytes());
            out.put_u64(part.plaintext_len);
            out.put_u32(part.segments.len() as u32);
            for segment in &part.segments {
                out.put_u32(segment.ciphertext_len);
                for id in &segment.fragments {
                    out.extend_from_slice(id.as_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Signs the manifest with the writer's key.
    pub fn sign(self, key: &SigningKey) -> Result<SignedManifest, ManifestError> {
        if NodeId::from_verifying_key(&key.verifying_key()) != self.writer {
            return Err(ManifestError::WrongSigner);
        }
        let mut encoded = self.encode_body()?;
        let id = ManifestId::of(&encoded);
        let signature = key.sign(&encoded).to_bytes();
        encoded.extend_from_slice(&signature);
        Ok(SignedManifest {
            manifest: self,
            id,
            encoded,
        })
    }

    /// Checks field bounds and that the parts agree with the layout.
    fn check(&self) -> Result<(), ManifestError> {
        let bounded = [
            ("bucket", self.bucket.len(), MAX_BUCKET_BYTES),
            ("key", self.key.len(), MAX_KEY_BYTES),
            ("key id", self.encryption.key_id.len(), MAX_KEY_ID_BYTES),
            (
                "wrapped key",
                self.encryption.wrapped.len(),
                MAX_WRAPPED_KEY_BYTES,
            ),
            ("etag", self.etag.len(), MAX_ETAG_BYTES),
            ("parts", self.parts.len(), MAX_PARTS),
        ];
        for (field, len, max) in bounded {
            if len > max {
                return Err(ManifestError::FieldTooLong { field, len, max });
            }
        }
        if self.parts.is_empty() {
            return Err(ManifestError::Inconsistent(
                "a manifest has at least one part".into(),
            ));
        }
        let scheme = self.layout.scheme;
        let mut total: u64 = 0;
        let mut previous: Option<u32> = None;
        for part in &self.parts {
            if previous.is_some_and(|p| part.number <= p) {
                return Err(ManifestError::Inconsistent(format!(
                    "part {} is out of order",
                    part.number
                )));
            }
            previous = Some(part.number);
            // Format 1 predates the bound: its objects are read whatever
            // their size, with checked arithmetic.
            total = total
                .checked_add(part.plaintext_len)
                .filter(|total| self.part_keys == PartKeys::Shared || *total <= MAX_OBJECT_BYTES)
                .ok_or_else(|| {
                    ManifestError::Inconsistent(format!(
                        "the object is longer than {MAX_OBJECT_BYTES} bytes"
                    ))
                })?;
            let mut expected = self
                .layout
                .segment_lens(part.plaintext_len)
                .ok_or_else(|| ManifestError::Inconsistent("part length overflows".into()))?;
            for (index, segment) in part.segments.iter().enumerate() {
                if expected.next() != Some(segment.ciphertext_len as usize) {
                    return Err(ManifestError::Inconsistent(format!(
                        "part {} segment {index} has length {}, which its layout does not give",
                        part.number, segment.ciphertext_len
                    )));
                }
                if segment.fragments.len() != scheme.total() {
                    return Err(ManifestError::Inconsistent(format!(
                        "part {} segment {index} lists {} fragments, scheme {scheme} has {}",
                        part.number,
                        segment.fragments.len(),
                        scheme.total()
                    )));
                }
                if scheme.is_replication()
                    && segment
                        .fragments
                        .iter()
                        .any(|id| *id != segment.fragments[0])
                {
                    return Err(ManifestError::Inconsistent(format!(
                        "part {} segment {index}: replicas must share one fragment id",
                        part.number
                    )));
                }
            }
            if expected.next().is_some() {
                return Err(ManifestError::Inconsistent(format!(
                    "part {} has too few segments for {} bytes",
                    part.number, part.plaintext_len
                )));
            }
        }
        Ok(())
    }
}

/// A manifest with its id and signed encoding (body then 64-byte signature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    pub manifest: Manifest,
    pub id: ManifestId,
    pub encoded: Vec<u8>,
}

impl SignedManifest {
    /// Decodes untrusted bytes and verifies the writer's signature. Whether
    /// the writer is a member of the cluster is for the caller to decide.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let body_len = bytes
            .len()
            .checked_sub(SIGNATURE_BYTES)
            .ok_or(DecodeError::Truncated { field: "signature" })?;
        let (body, signature) = bytes.split_at(body_len);
        // The signature is checked before anything else of the body is
        // read: only a member's own bytes reach the decoder's arithmetic.
        let writer = {
            let mut r = Reader::new(body);
            r.take(4 + 2, "magic and format")?;
            NodeId(r.array("writer")?)
        };
        let key = writer
            .verifying_key()
            .map_err(|_| ManifestError::BadSignature)?;
        let signature =
            Signature::from_slice(signature).map_err(|_| ManifestError::BadSignature)?;
        key.verify_strict(body, &signature)
            .map_err(|_| ManifestError::BadSignature)?;
        let manifest = decode_body(body)?;
        Ok(Self {
            manifest,
            id: ManifestId::of(body),
            encoded: bytes.to_vec(),
        })
    }
}

fn decode_body(body: &[u8]) -> Result<Manifest, ManifestError> {
    let mut r = Reader::new(body);
    if r.take(4, "magic")? != MAGIC {
        return Err(ManifestError::BadMagic);
    }
    let part_keys = match r.u16("format")? {
        1 => PartKeys::Shared,
        2 => PartKeys::PerAttempt,
        found => return Err(ManifestError::UnsupportedFormat { found }),
    };
    let writer = NodeId(r.array("writer")?);
    let created_unix_ms = r.u64("created")?;
    let bucket = r.str16("bucket", MAX_BUCKET_BYTES)?.to_owned();
    let key = r.str16("key", MAX_KEY_BYTES)?.to_owned();
    let version = VersionId(r.array("version")?);
    let upload = UploadId(r.array("upload")?);
    let k = r.u8("k")?;
    let m = r.u8("m")?;
    let scheme = Scheme::new(k, m).map_err(|e| ManifestError::Inconsistent(e.to_string()))?;
    let chunk_size = ChunkSize::new(r.u32("chunk size")?)
        .map_err(|e| ManifestError::Inconsistent(e.to_string()))?;
    let layout = SegmentLayout::new(scheme, chunk_size, r.u32("chunks per segment")?)
        .map_err(|e| ManifestError::Inconsistent(e.to_string()))?;
    let kind = KeyKind::from_byte(r.u8("key kind")?)?;
    let key_id = r.str16("key id", MAX_KEY_ID_BYTES)?.to_owned();
    let wrapped = r.bytes16("wrapped key", MAX_WRAPPED_KEY_BYTES)?.to_vec();
    let etag = r.str16("etag", MAX_ETAG_BYTES)?.to_owned();
    // A part needs at least 32 bytes (number, upload, length, segment count).
    let part_count = r.count("parts", MAX_PARTS, 32)?;
    let mut parts = Vec::with_capacity(part_count);
    let segment_bytes = 4 + 32 * scheme.total();
    for _ in 0..part_count {
        let number = r.u32("part number")?;
        let upload = UploadId(r.array("part upload id")?);
        let plaintext_len = r.u64("part length")?;
        let segment_count = r.count("segments", usize::MAX, segment_bytes)?;
        let mut segments = Vec::with_capacity(segment_count);
        for _ in 0..segment_count {
            let ciphertext_len = r.u32("segment length")?;
            let fragments = (0..scheme.total())
                .map(|_| r.array("fragment id").map(FragmentId))
                .collect::<Result<Vec<_>, _>>()?;
            segments.push(SegmentRef {
                ciphertext_len,
                fragments,
            });
        }
        parts.push(Part {
            number,
            upload,
            plaintext_len,
            segments,
        });
    }
    r.finish("manifest")?;
    let manifest = Manifest {
        part_keys,
        writer,
        created_unix_ms,
        bucket,
        key,
        version,
        upload,
        layout,
        encryption: KeyEnvelope {
            kind,
            key_id,
            wrapped,
        },
        etag,
        parts,
    };
    manifest.check()?;
    Ok(manifest)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(key: &SigningKey) -> Manifest {
        let scheme = Scheme::new(2, 1).unwrap();
        let layout = SegmentLayout::new(scheme, ChunkSize::new(4096).unwrap(), 16).unwrap();
        let plaintext_len = 16 * 4096 + 5;
        let segments = layout
            .segment_lens(plaintext_len)
            .unwrap()
            .enumerate()
            .map(|(s, len)| SegmentRef {
                ciphertext_len: len as u32,
                fragments: (0..3)
                    .map(|f| FragmentId([(s * 3 + f) as u8; 32]))
                    .collect(),
            })
            .collect();
        Manifest {
            part_keys: PartKeys::PerAttempt,
            writer: NodeId::from_verifying_key(&key.verifying_key()),
            created_unix_ms: 1_764_000_000_000,
            bucket: "photos".into(),
            key: "2026/cat.jpg".into(),
            version: VersionId::new(1_764_000_000_000, [1; 10]),
            upload: UploadId([2; 16]),
            layout,
            encryption: KeyEnvelope {
                kind: KeyKind::SseS3,
                key_id: "bucket-key-1".into(),
                wrapped: vec![9; 73],
            },
            etag: "\"0123456789abcdef0123456789abcdef\"".into(),
            parts: vec![Part {
                number: 0,
                upload: UploadId([2; 16]),
                plaintext_len,
                segments,
            }],
        }
    }

    #[test]
    fn round_trips_and_is_canonical() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let signed = sample(&key).sign(&key).unwrap();
        let decoded = SignedManifest::decode(&signed.encoded).unwrap();
        assert_eq!(decoded, signed);
        assert_eq!(decoded.manifest.sign(&key).unwrap().encoded, signed.encoded);
    }

    #[test]
    fn a_tampered_byte_or_foreign_signer_is_refused() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let signed = sample(&key).sign(&key).unwrap();
        let mut tampered = signed.encoded.clone();
        let at = tampered.len() - 100;
        tampered[at] ^= 1;
        assert_eq!(
            SignedManifest::decode(&tampered),
            Err(ManifestError::BadSignature)
        );
        let other = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(sample(&key).sign(&other), Err(ManifestError::WrongSigner));
    }

    #[test]
    fn an_unknown_format_is_a_typed_error() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut bytes = sample(&key).sign(&key).unwrap().encoded;
        bytes[5] = 3;
        let bytes = sign_raw(bytes[..bytes.len() - SIGNATURE_BYTES].to_vec(), &key);
        assert_eq!(
            SignedManifest::decode(&bytes),
            Err(ManifestError::UnsupportedFormat { found: 3 })
        );
        let mut body = bytes[..bytes.len() - SIGNATURE_BYTES].to_vec();
        body[0] = b'X';
        assert_eq!(
            SignedManifest::decode(&sign_raw(body, &key)),
            Err(ManifestError::BadMagic)
        );
    }

    #[test]
    fn parts_that_disagree_with_the_layout_are_refused() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut m = sample(&key);
        m.parts[0].plaintext_len += 1;
        assert!(matches!(m.sign(&key), Err(ManifestError::Inconsistent(_))));
        let mut m = sample(&key);
        m.parts[0].segments[0].fragments.pop();
        assert!(matches!(m.sign(&key), Err(ManifestError::Inconsistent(_))));
        let mut m = sample(&key);
        m.parts.clear();
        assert!(matches!(m.sign(&key), Err(ManifestError::Inconsistent(_))));
    }

    /// Signs arbitrary body bytes as `key`'s node, writer field included.
    pub(crate) fn sign_raw(mut body: Vec<u8>, key: &SigningKey) -> Vec<u8> {
        use ed25519_dalek::Signer;
        let writer = NodeId::from_verifying_key(&key.verifying_key());
        body[6..38].copy_from_slice(&writer.0);
        let signature = key.sign(&body);
        body.extend_from_slice(&signature.to_bytes());
        body
    }

    #[test]
    fn lengths_that_overflow_are_refused_by_a_signed_manifest_not_a_panic() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let body = sample(&key).encode_body().unwrap();
        let len = (16u64 * 4096 + 5).to_be_bytes();
        let at = body
            .windows(8)
            .position(|w| w == len)
            .expect("the part length");
        for claimed in [u64::MAX, u64::MAX - 16, MAX_OBJECT_BYTES + 1] {
            let mut body = body.clone();
            body[at..at + 8].copy_from_slice(&claimed.to_be_bytes());
            let decoded = SignedManifest::decode(&sign_raw(body, &key));
            assert!(
                matches!(decoded, Err(ManifestError::Inconsistent(_))),
                "{claimed}: {decoded:?}"
            );
        }
    }

    #[test]
    fn format_1_reads_with_shared_part_keys_and_re_encodes_as_itself() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut old = sample(&key);
        old.part_keys = PartKeys::Shared;
        let signed = old.sign(&key).unwrap();
        assert_eq!(&signed.encoded[4..6], &[0, 1]);
        let decoded = SignedManifest::decode(&signed.encoded).unwrap();
        assert_eq!(decoded.manifest.part_keys, PartKeys::Shared);
        let data_key = SecretKey::from_bytes([9; 32]);
        let part = &decoded.manifest.parts[0];
        assert_eq!(
            decoded.manifest.stream_key(&data_key, part).as_bytes(),
            data_key.as_bytes()
        );
        let new = sample(&key);
        assert_ne!(
            new.stream_key(&data_key, part).as_bytes(),
            data_key.as_bytes()
        );
    }

    #[test]
    fn an_unsigned_body_is_refused_before_it_is_read() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut bytes = sample(&key).sign(&key).unwrap().encoded;
        // A bad magic under a bad signature is a bad signature: nothing
        // after the writer was looked at.
        bytes[0] = b'X';
        assert_eq!(
            SignedManifest::decode(&bytes),
            Err(ManifestError::BadSignature)
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let bytes = sample(&key).sign(&key).unwrap().encoded;
        for len in 0..bytes.len() {
            assert!(
                SignedManifest::decode(&bytes[..len]).is_err(),
                "prefix {len} accepted"
            );
        }
    }
}
