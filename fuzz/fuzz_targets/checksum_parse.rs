//! S3 checksum text (names, header names, values, composite values): no
//! panic; a value accepted for an algorithm is exactly its digest length
//! and re-encodes to the same text, and is accepted for exactly the
//! algorithms of that length; a composite value covers 1 to
//! MAX_COMPOSITE_PARTS parts and re-encodes to the same text. The bytes
//! are also taken as digests, whose text (and composite text) must parse
//! back to them.
#![no_main]

use cairn_protocol::checksum::{Algorithm, CompositeChecksum, Digest, MAX_COMPOSITE_PARTS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();
    if let Some(algorithm) = Algorithm::by_name(text) {
        assert!(algorithm.name().eq_ignore_ascii_case(text.trim()));
    }
    if let Some(algorithm) = Algorithm::by_header(text) {
        assert!(algorithm.header().eq_ignore_ascii_case(text.trim()));
    }
    for algorithm in Algorithm::ALL {
        if let Ok(digest) = Digest::parse(algorithm, text) {
            assert_eq!(digest.algorithm(), algorithm);
            assert_eq!(digest.as_bytes().len(), algorithm.digest_len());
            assert_eq!(digest.to_string(), text.trim());
            for other in Algorithm::ALL {
                assert_eq!(
                    Digest::parse(other, text).is_ok(),
                    other.digest_len() == algorithm.digest_len(),
                );
            }
        }
        if let Ok(composite) = CompositeChecksum::parse(algorithm, text) {
            assert!(algorithm.has_composite());
            assert!((1..=MAX_COMPOSITE_PARTS).contains(&composite.parts()));
            assert_eq!(composite.digest().algorithm(), algorithm);
            assert_eq!(composite.digest().as_bytes().len(), algorithm.digest_len());
            assert_eq!(composite.to_string(), text.trim());
        }
        if let Some(bytes) = data.get(..algorithm.digest_len()) {
            let digest = Digest::from_bytes(algorithm, bytes).expect("the digest's length");
            assert_eq!(digest.as_bytes(), bytes);
            assert_eq!(Digest::parse(algorithm, &digest.to_string()), Ok(digest));
            let parts = u32::try_from(data.len()).unwrap_or(u32::MAX);
            if let Ok(composite) = CompositeChecksum::new(digest, parts) {
                let text = composite.to_string();
                assert_eq!(CompositeChecksum::parse(algorithm, &text), Ok(composite));
            }
        }
    }
});
