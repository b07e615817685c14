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
use crate::encryption::ChunkSize;
use crate::erasure::{Scheme, SegmentLayout};
use crate::ids::{FragmentId, ManifestId, NodeId, UploadId, VersionId};

const MAGIC: &[u8; 4] = b"CRNM";
/// The only manifest format this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
pub const SIGNATURE_BYTES: usize = 64;

pub const MAX_BUCKET_BYTES: usize = 63;
pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_KEY_ID_BYTES: usize = 2048;
pub const MAX_WRAPPED_KEY_BYTES: usize = 4096;
pub const MAX_ETAG_BYTES: usize = 64;
pub const MAX_PARTS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ManifestError {
    #[error("not a manifest (bad magic bytes)")]
    BadMagic,
    #[error("manifest format {found} is not supported (this node reads format {FORMAT_VERSION})")]
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
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
    pub fn plaintext_len(&self) -> u64 {
        self.parts.iter().map(|p| p.plaintext_len).sum()
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
        out.put_u16(FORMAT_VERSION);
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
            total = total
                .checked_add(part.plaintext_len)
                .ok_or_else(|| ManifestError::Inconsistent("object length overflows".into()))?;
            let mut expected = self.layout.segment_lens(part.plaintext_len);
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
        let manifest = decode_body(body)?;
        let key = manifest
            .writer
            .verifying_key()
            .map_err(|_| ManifestError::BadSignature)?;
        let signature =
            Signature::from_slice(signature).map_err(|_| ManifestError::BadSignature)?;
        key.verify_strict(body, &signature)
            .map_err(|_| ManifestError::BadSignature)?;
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
    let format = r.u16("format")?;
    if format != FORMAT_VERSION {
        return Err(ManifestError::UnsupportedFormat { found: format });
    }
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
mod tests {
    use super::*;

    pub(crate) fn sample(key: &SigningKey) -> Manifest {
        let scheme = Scheme::new(2, 1).unwrap();
        let layout = SegmentLayout::new(scheme, ChunkSize::new(4096).unwrap(), 16).unwrap();
        let plaintext_len = 16 * 4096 + 5;
        let segments = layout
            .segment_lens(plaintext_len)
            .enumerate()
            .map(|(s, len)| SegmentRef {
                ciphertext_len: len as u32,
                fragments: (0..3)
                    .map(|f| FragmentId([(s * 3 + f) as u8; 32]))
                    .collect(),
            })
            .collect();
        Manifest {
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
        bytes[5] = 2;
        assert_eq!(
            SignedManifest::decode(&bytes),
            Err(ManifestError::UnsupportedFormat { found: 2 })
        );
        bytes[0] = b'X';
        assert_eq!(SignedManifest::decode(&bytes), Err(ManifestError::BadMagic));
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
