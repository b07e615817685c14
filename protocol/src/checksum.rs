//! The additional checksums S3 clients send (CRC32, CRC32C, CRC64NVME,
//! SHA-1, SHA-256), read from untrusted text (spec/gateway.md,
//! "Checksums"): algorithm names, the headers and trailers that carry a
//! value, values, and the composite form of a multipart object. The
//! gateway computes the checksums; this module only says what a client's
//! text means.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use thiserror::Error;

/// The longest digest: SHA-256's.
pub const MAX_DIGEST_BYTES: usize = 32;
/// The most parts a composite checksum covers: S3's limit on the parts of
/// one upload.
pub const MAX_COMPOSITE_PARTS: u32 = 10_000;

/// Padded base64 of `bytes` bytes is this many characters.
const fn encoded_len(bytes: usize) -> usize {
    bytes.div_ceil(3) * 4
}

const MAX_ENCODED_LEN: usize = encoded_len(MAX_DIGEST_BYTES);
/// What the decoder may write for the longest text it is given: it sizes
/// its output by the text's length, padding included.
const DECODE_BUFFER_BYTES: usize = MAX_ENCODED_LEN / 4 * 3;

/// An additional checksum algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Crc32,
    Crc32c,
    Crc64Nvme,
    Sha1,
    Sha256,
}

impl Algorithm {
    pub const ALL: [Algorithm; 5] = [
        Algorithm::Crc32,
        Algorithm::Crc32c,
        Algorithm::Crc64Nvme,
        Algorithm::Sha1,
        Algorithm::Sha256,
    ];

    /// The name S3 uses in `x-amz-checksum-algorithm`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "CRC32",
            Algorithm::Crc32c => "CRC32C",
            Algorithm::Crc64Nvme => "CRC64NVME",
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
        }
    }

    /// The header (and trailer) that carries the value.
    pub fn header(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "x-amz-checksum-crc32",
            Algorithm::Crc32c => "x-amz-checksum-crc32c",
            Algorithm::Crc64Nvme => "x-amz-checksum-crc64nvme",
            Algorithm::Sha1 => "x-amz-checksum-sha1",
            Algorithm::Sha256 => "x-amz-checksum-sha256",
        }
    }

    /// The length of a digest in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Crc32 | Algorithm::Crc32c => 4,
            Algorithm::Crc64Nvme => 8,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
        }
    }

    /// Whether S3 gives a multipart object a composite checksum of this
    /// algorithm: CRC64NVME is kept only as a full-object value.
    pub fn has_composite(self) -> bool {
        self != Algorithm::Crc64Nvme
    }

    /// The algorithm a client names (`x-amz-checksum-algorithm`,
    /// `x-amz-sdk-checksum-algorithm`): case and surrounding whitespace
    /// ignored.
    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name.trim()))
    }

    /// The algorithm whose header a client names (`x-amz-trailer`): case
    /// and surrounding whitespace ignored.
    pub fn by_header(header: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.header().eq_ignore_ascii_case(header.trim()))
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChecksumError {
    #[error("a {algorithm} checksum is {expected} characters of base64, not {got}")]
    Length {
        algorithm: Algorithm,
        expected: usize,
        got: usize,
    },
    #[error("a {0} checksum is not the padded base64 of its {len} bytes", len = .0.digest_len())]
    NotBase64(Algorithm),
    #[error("a composite checksum is a value, a dash and the count of parts")]
    NotComposite,
    #[error("a composite checksum covers 1 to {MAX_COMPOSITE_PARTS} parts")]
    PartCount,
    #[error("{0} has no composite checksum")]
    NoComposite(Algorithm),
}

/// A checksum's value: exactly its algorithm's digest length. Its text
/// (`Display`) is the canonical padded base64, the only text `parse`
/// accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    algorithm: Algorithm,
    bytes: [u8; MAX_DIGEST_BYTES],
}

impl Digest {
    /// `bytes` as a digest of `algorithm`; `None` when the length is not
    /// the algorithm's.
    pub fn from_bytes(algorithm: Algorithm, bytes: &[u8]) -> Option<Self> {
        if bytes.len() != algorithm.digest_len() {
            return None;
        }
        let mut digest = Self {
            algorithm,
            bytes: [0; MAX_DIGEST_BYTES],
        };
        digest.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(digest)
    }

    /// A client's value for `algorithm`, surrounding whitespace ignored:
    /// the canonical padded standard base64 of exactly the digest's bytes.
    /// The length is checked before any byte is decoded.
    pub fn parse(algorithm: Algorithm, text: &str) -> Result<Self, ChecksumError> {
        let text = text.trim();
        let expected = encoded_len(algorithm.digest_len());
        if text.len() != expected {
            return Err(ChecksumError::Length {
                algorithm,
                expected,
                got: text.len(),
            });
        }
        let mut decoded = [0u8; DECODE_BUFFER_BYTES];
        // The engine refuses missing or extra padding and stray bits in the
        // last character, so each digest has exactly one text.
        let len = STANDARD
            .decode_slice(text, &mut decoded)
            .map_err(|_| ChecksumError::NotBase64(algorithm))?;
        Self::from_bytes(algorithm, &decoded[..len]).ok_or(ChecksumError::NotBase64(algorithm))
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.algorithm.digest_len()]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; MAX_ENCODED_LEN];
        let len = STANDARD
            .encode_slice(self.as_bytes(), &mut text)
            .map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&text[..len]).map_err(|_| fmt::Error)?)
    }
}

/// S3's COMPOSITE checksum of a multipart object: the algorithm over its
/// parts' digests in order, then the count of parts. Its text
/// (`Display`) is `<value>-<parts>`, the only text `parse` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompositeChecksum {
    digest: Digest,
    parts: u32,
}

impl CompositeChecksum {
    /// The composite value of `parts` parts; refused for an algorithm
    /// without one and for a count out of 1 to [`MAX_COMPOSITE_PARTS`].
    pub fn new(digest: Digest, parts: u32) -> Result<Self, ChecksumError> {
        if !digest.algorithm.has_composite() {
            return Err(ChecksumError::NoComposite(digest.algorithm));
        }
        if !(1..=MAX_COMPOSITE_PARTS).contains(&parts) {
            return Err(ChecksumError::PartCount);
        }
        Ok(Self { digest, parts })
    }

    /// A client's composite value for `algorithm`, surrounding whitespace
    /// ignored: a value as [`Digest::parse`] takes it, `-`, and the count
    /// in decimal without sign or leading zero.
    pub fn parse(algorithm: Algorithm, text: &str) -> Result<Self, ChecksumError> {
        if !algorithm.has_composite() {
            return Err(ChecksumError::NoComposite(algorithm));
        }
        // Base64 has no `-`: the last one ends the value.
        let (value, count) = text
            .trim()
            .rsplit_once('-')
            .ok_or(ChecksumError::NotComposite)?;
        if value.trim() != value {
            return Err(ChecksumError::NotComposite);
        }
        let digest = Digest::parse(algorithm, value)?;
        let canonical_decimal = !count.is_empty()
            && count.len() <= 5
            && count.bytes().all(|b| b.is_ascii_digit())
            && !count.starts_with('0');
        if !canonical_decimal {
            return Err(ChecksumError::PartCount);
        }
        let parts = count.parse().map_err(|_| ChecksumError::PartCount)?;
        Self::new(digest, parts)
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn parts(&self) -> u32 {
        self.parts
    }
}

impl fmt::Display for CompositeChecksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.digest, self.parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // CRC32 of "hello" is 0x3610a686.
    const CRC32_HELLO: &str = "NhCmhg==";
    // SHA-1 of "hello".
    const SHA1_HELLO: &str = "qvTGHdzF6KLavt4PO0gs2a6pQ00=";

    #[test]
    fn names_and_headers_ignore_case_and_surrounding_whitespace() {
        for algorithm in Algorithm::ALL {
            assert_eq!(Algorithm::by_name(algorithm.name()), Some(algorithm));
            let lower = format!(" {} ", algorithm.name().to_ascii_lowercase());
            assert_eq!(Algorithm::by_name(&lower), Some(algorithm));
            let upper = format!("\t{}", algorithm.header().to_ascii_uppercase());
            assert_eq!(Algorithm::by_header(&upper), Some(algorithm));
        }
        for unknown in ["", "MD5", "CRC", "SHA-256", "x-amz-checksum-md5", "CRC32 C"] {
            assert_eq!(Algorithm::by_name(unknown), None, "{unknown:?}");
            assert_eq!(Algorithm::by_header(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn a_value_is_canonical_base64_of_the_digest_length() {
        let crc = Digest::parse(Algorithm::Crc32, CRC32_HELLO).unwrap();
        assert_eq!(crc.as_bytes(), [0x36, 0x10, 0xa6, 0x86]);
        assert_eq!(crc.to_string(), CRC32_HELLO);
        assert_eq!(
            Digest::parse(Algorithm::Crc32, &format!(" {CRC32_HELLO}\t")),
            Ok(crc)
        );
        let sha1 = Digest::parse(Algorithm::Sha1, SHA1_HELLO).unwrap();
        assert_eq!(sha1.as_bytes().len(), 20);
        assert_eq!(sha1.to_string(), SHA1_HELLO);
        for algorithm in Algorithm::ALL {
            let zeros =
                Digest::from_bytes(algorithm, &[0; MAX_DIGEST_BYTES][..algorithm.digest_len()])
                    .unwrap();
            assert_eq!(Digest::parse(algorithm, &zeros.to_string()), Ok(zeros));
        }
    }

    #[test]
    fn other_texts_are_refused() {
        for (algorithm, bad) in [
            (Algorithm::Crc32, ""),
            (Algorithm::Crc32, "NhCmhg"),
            (Algorithm::Crc32, "NhCmhg="),
            (Algorithm::Crc32, "NhCmhg==="),
            // Stray bits in the last character.
            (Algorithm::Crc32, "NhCmhh=="),
            // Six bytes, not four.
            (Algorithm::Crc32, "NhCmhgAA"),
            (Algorithm::Crc32, "Nh Cmhg="),
            (Algorithm::Crc32, "NhC-hg=="),
            (Algorithm::Crc32, "NhC_hg=="),
            (Algorithm::Crc64Nvme, CRC32_HELLO),
            (Algorithm::Sha256, SHA1_HELLO),
            (Algorithm::Sha1, "qvTGHdzF6KLavt4PO0gs2a6pQ00A"),
        ] {
            assert!(
                Digest::parse(algorithm, bad).is_err(),
                "{algorithm} {bad:?}"
            );
        }
        assert_eq!(
            Digest::parse(Algorithm::Sha256, &"A".repeat(1 << 20)),
            Err(ChecksumError::Length {
                algorithm: Algorithm::Sha256,
                expected: 44,
                got: 1 << 20
            })
        );
        assert_eq!(Digest::from_bytes(Algorithm::Crc32, &[0; 5]), None);
    }

    #[test]
    fn a_composite_is_a_value_a_dash_and_a_part_count() {
        let text = format!("{CRC32_HELLO}-3");
        let composite = CompositeChecksum::parse(Algorithm::Crc32, &text).unwrap();
        assert_eq!(composite.parts(), 3);
        assert_eq!(composite.digest().to_string(), CRC32_HELLO);
        assert_eq!(composite.to_string(), text);
        let most = format!("{CRC32_HELLO}-{MAX_COMPOSITE_PARTS}");
        assert_eq!(
            CompositeChecksum::parse(Algorithm::Crc32, &most).map(|c| c.parts()),
            Ok(MAX_COMPOSITE_PARTS)
        );
        for bad in [
            CRC32_HELLO.to_owned(),
            format!("{CRC32_HELLO}-"),
            format!("{CRC32_HELLO}-0"),
            format!("{CRC32_HELLO}-03"),
            format!("{CRC32_HELLO}-+3"),
            format!("{CRC32_HELLO}--3"),
            format!("{CRC32_HELLO} -3"),
            format!("{CRC32_HELLO}-3 3"),
            format!("{CRC32_HELLO}-10001"),
            format!("{CRC32_HELLO}-99999999999999999999"),
            "-3".to_owned(),
        ] {
            assert!(
                CompositeChecksum::parse(Algorithm::Crc32, &bad).is_err(),
                "{bad:?}"
            );
        }
        let crc64 = Digest::from_bytes(Algorithm::Crc64Nvme, &[0; 8]).unwrap();
        assert_eq!(
            CompositeChecksum::parse(Algorithm::Crc64Nvme, &format!("{crc64}-2")),
            Err(ChecksumError::NoComposite(Algorithm::Crc64Nvme))
        );
        assert_eq!(
            CompositeChecksum::new(crc64, 2),
            Err(ChecksumError::NoComposite(Algorithm::Crc64Nvme))
        );
        let crc = Digest::parse(Algorithm::Crc32, CRC32_HELLO).unwrap();
        assert_eq!(
            CompositeChecksum::new(crc, 0),
            Err(ChecksumError::PartCount)
        );
    }
}
