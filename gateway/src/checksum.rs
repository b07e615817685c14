//! The additional checksums S3 clients send (CRC32, CRC32C, CRC64NVME,
//! SHA-1, SHA-256): in a header, or as a trailer after an aws-chunked body,
//! or only named so that the gateway computes and keeps one. s3s checks
//! none of them, so the gateway computes the one named while the body
//! streams and refuses the upload, before anything commits, when it
//! differs. What a client's text means (names, values, the composite
//! form) is `cairn_protocol::checksum`.

use http::HeaderMap;
use s3s::TrailingHeaders;
use s3s::checksum::ChecksumHasher;
use s3s::crypto::{Checksum as _, Crc32, Crc32c, Crc64Nvme, Sha1, Sha256};

pub use cairn_protocol::checksum::Algorithm;
use cairn_protocol::checksum::Digest;

use crate::error::{GatewayError, GatewayResult};

/// Where the client's value comes from.
#[derive(Debug, Clone)]
enum Expected {
    Header(String),
    Trailer(Option<TrailingHeaders>),
    /// Named only: the gateway computes and keeps the value.
    Computed,
}

/// The checksum one upload asked for.
#[derive(Debug, Clone)]
pub struct ChecksumRequest {
    pub algorithm: Algorithm,
    expected: Expected,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl ChecksumRequest {
    /// What the request's headers ask for; two different checksums are
    /// refused, as S3 does.
    pub fn from_headers(
        headers: &HeaderMap,
        trailers: Option<&TrailingHeaders>,
    ) -> GatewayResult<Option<Self>> {
        let in_headers: Vec<Algorithm> = Algorithm::ALL
            .into_iter()
            .filter(|a| headers.contains_key(a.header()))
            .collect();
        if in_headers.len() > 1 {
            return Err(GatewayError::InvalidArgument(
                "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed."
                    .into(),
            ));
        }
        if let Some(algorithm) = in_headers.first() {
            let value = header(headers, algorithm.header()).unwrap_or_default();
            return Ok(Some(Self {
                algorithm: *algorithm,
                expected: Expected::Header(value.trim().to_owned()),
            }));
        }
        if let Some(trailer) = header(headers, "x-amz-trailer") {
            let algorithm = Algorithm::by_header(trailer).ok_or_else(|| {
                GatewayError::InvalidArgument(format!(
                    "the trailer {trailer:?} is not a checksum this gateway knows"
                ))
            })?;
            return Ok(Some(Self {
                algorithm,
                expected: Expected::Trailer(trailers.cloned()),
            }));
        }
        let named = header(headers, "x-amz-sdk-checksum-algorithm")
            .or_else(|| header(headers, "x-amz-checksum-algorithm"));
        if let Some(name) = named {
            let algorithm = Algorithm::by_name(name).ok_or_else(|| {
                GatewayError::InvalidArgument(format!(
                    "checksum algorithm {name:?} is not supported"
                ))
            })?;
            return Ok(Some(Self {
                algorithm,
                expected: Expected::Computed,
            }));
        }
        Ok(None)
    }

    pub fn hasher(&self) -> ChecksumHasher {
        let mut hasher = ChecksumHasher::default();
        match self.algorithm {
            Algorithm::Crc32 => hasher.crc32 = Some(Crc32::new()),
            Algorithm::Crc32c => hasher.crc32c = Some(Crc32c::new()),
            Algorithm::Crc64Nvme => hasher.crc64nvme = Some(Crc64Nvme::new()),
            Algorithm::Sha1 => hasher.sha1 = Some(Sha1::new()),
            Algorithm::Sha256 => hasher.sha256 = Some(Sha256::new()),
        }
        hasher
    }

    /// Compares the value computed over the body with the client's; the
    /// trailer is read now, once the body has ended. Returns the value.
    pub fn verify(&self, hasher: ChecksumHasher) -> GatewayResult<String> {
        let sums = hasher.finalize();
        let computed = match self.algorithm {
            Algorithm::Crc32 => sums.checksum_crc32,
            Algorithm::Crc32c => sums.checksum_crc32c,
            Algorithm::Crc64Nvme => sums.checksum_crc64nvme,
            Algorithm::Sha1 => sums.checksum_sha1,
            Algorithm::Sha256 => sums.checksum_sha256,
        }
        .unwrap_or_default();
        let expected = match &self.expected {
            Expected::Header(value) => Some(value.clone()),
            Expected::Trailer(trailers) => {
                let value = trailers.as_ref().and_then(|t| {
                    t.read(|h| header(h, self.algorithm.header()).map(|v| v.trim().to_owned()))
                        .flatten()
                });
                if value.is_none() {
                    return Err(GatewayError::InvalidArgument(format!(
                        "the body announced a {} trailer and did not send it",
                        self.algorithm.header()
                    )));
                }
                value
            }
            Expected::Computed => None,
        };
        if let Some(expected) = expected
            && !sent_matches(self.algorithm, &expected, &computed)
        {
            return Err(GatewayError::ChecksumMismatch {
                algorithm: self.algorithm.name(),
            });
        }
        Ok(computed)
    }
}

/// Whether `sent`, a client's text for an `algorithm` checksum, is the
/// value `kept` (canonical base64, as computed here): only the canonical
/// text of a digest of the algorithm's length can be.
pub fn sent_matches(algorithm: Algorithm, sent: &str, kept: &str) -> bool {
    match Digest::parse(algorithm, sent) {
        Ok(digest) => digest.to_string() == kept,
        Err(error) => {
            tracing::debug!(%error, "checksum value refused");
            false
        }
    }
}

/// The checksum of a multipart object from its parts' (S3's COMPOSITE
/// type): the algorithm over the parts' binary checksums in order, in
/// base64, then `-N`. `None` for CRC64NVME, which S3 keeps only as a
/// full-object value.
pub fn composite(algorithm: Algorithm, parts: &[&str]) -> GatewayResult<Option<String>> {
    if !algorithm.has_composite() {
        return Ok(None);
    }
    let mut hasher = ChecksumRequest {
        algorithm,
        expected: Expected::Computed,
    }
    .hasher();
    for part in parts {
        let digest = Digest::parse(algorithm, part)
            .map_err(|_| GatewayError::Corrupt(format!("stored part checksum {part:?}")))?;
        hasher.update(digest.as_bytes());
    }
    let sums = hasher.finalize();
    let value = match algorithm {
        Algorithm::Crc32 => sums.checksum_crc32,
        Algorithm::Crc32c => sums.checksum_crc32c,
        Algorithm::Crc64Nvme => sums.checksum_crc64nvme,
        Algorithm::Sha1 => sums.checksum_sha1,
        Algorithm::Sha256 => sums.checksum_sha256,
    };
    Ok(value.map(|v| format!("{v}-{}", parts.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn a_header_value_is_verified_and_a_wrong_one_refused() {
        // CRC32 of "hello" is 0x3610a686.
        let right = headers(&[("x-amz-checksum-crc32", "NhCmhg==")]);
        let request = ChecksumRequest::from_headers(&right, None)
            .unwrap()
            .unwrap();
        let mut hasher = request.hasher();
        hasher.update(b"hello");
        assert_eq!(request.verify(hasher).unwrap(), "NhCmhg==");

        let wrong = headers(&[("x-amz-checksum-crc32", "AAAAAA==")]);
        let request = ChecksumRequest::from_headers(&wrong, None)
            .unwrap()
            .unwrap();
        let mut hasher = request.hasher();
        hasher.update(b"hello");
        assert!(matches!(
            request.verify(hasher),
            Err(GatewayError::ChecksumMismatch { algorithm: "CRC32" })
        ));
    }

    #[test]
    fn two_checksums_are_refused_and_a_named_one_is_computed() {
        let two = headers(&[
            ("x-amz-checksum-crc32", "NhCmhg=="),
            ("x-amz-checksum-sha1", "qvTGHdzF6KLavt4PO0gs2a6pQ00="),
        ]);
        assert!(ChecksumRequest::from_headers(&two, None).is_err());
        let named = headers(&[("x-amz-sdk-checksum-algorithm", "SHA256")]);
        let request = ChecksumRequest::from_headers(&named, None)
            .unwrap()
            .unwrap();
        assert_eq!(request.algorithm, Algorithm::Sha256);
        let missing_trailer = headers(&[("x-amz-trailer", "x-amz-checksum-crc32c")]);
        let request = ChecksumRequest::from_headers(&missing_trailer, None)
            .unwrap()
            .unwrap();
        assert!(request.verify(request.hasher()).is_err());
    }

    #[test]
    fn only_the_canonical_text_of_the_value_kept_matches() {
        assert!(sent_matches(Algorithm::Crc32, "NhCmhg==", "NhCmhg=="));
        assert!(sent_matches(Algorithm::Crc32, " NhCmhg==\t", "NhCmhg=="));
        for sent in ["NhCmhg", "NhCmhh==", "nhcmhg==", "NhCmhg==-1", ""] {
            assert!(
                !sent_matches(Algorithm::Crc32, sent, "NhCmhg=="),
                "{sent:?}"
            );
        }
        // Same length, another algorithm's name: the value still decides.
        assert!(sent_matches(Algorithm::Crc32c, "NhCmhg==", "NhCmhg=="));
        assert!(!sent_matches(Algorithm::Crc64Nvme, "NhCmhg==", "NhCmhg=="));
    }

    #[test]
    fn a_composite_reads_back_as_one() {
        use cairn_protocol::checksum::CompositeChecksum;
        let value = composite(Algorithm::Crc32, &["emyG8Q==", "EcqKZg=="])
            .unwrap()
            .unwrap();
        let parsed = CompositeChecksum::parse(Algorithm::Crc32, &value).unwrap();
        assert_eq!(parsed.parts(), 2);
        assert_eq!(parsed.to_string(), value);
        assert_eq!(
            composite(Algorithm::Crc64Nvme, &["AAAAAAAAAAA="]).unwrap(),
            None
        );
        assert!(matches!(
            composite(Algorithm::Sha1, &["emyG8Q=="]),
            Err(GatewayError::Corrupt(_))
        ));
    }
}
