//! Certificate and cluster-map decoders: no panic; what decodes re-encodes
//! to the same bytes.
#![no_main]

use cairn_protocol::ed25519_dalek::SigningKey;
use cairn_protocol::membership::{Certificate, ClusterId, SignedMap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(certificate) = Certificate::decode(data) {
        assert_eq!(certificate.encode(), data);
    }
    // The vector's cluster key, so that seeded maps get past the signature.
    let cluster = ClusterId::of(&SigningKey::from_bytes(&[0x0c; 32]));
    if let Ok(map) = SignedMap::decode(data, &cluster) {
        assert_eq!(map.encode(), data);
    }
});
