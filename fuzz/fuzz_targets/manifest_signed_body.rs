//! The manifest body decoder behind a valid signature: arbitrary bytes are
//! signed as a fixed member would sign them, so the fuzzer reaches every
//! length and layout check a member's own manifest goes through. It must
//! not panic, and a manifest it accepts must re-encode to the same bytes.
#![no_main]

use cairn_protocol::ids::NodeId;
use cairn_protocol::manifest::SignedManifest;
use cairn_protocol::ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 38 {
        return;
    }
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut body = data.to_vec();
    body[6..38].copy_from_slice(&NodeId::from_verifying_key(&key.verifying_key()).0);
    let mut signed = body.clone();
    signed.extend_from_slice(&key.sign(&body).to_bytes());
    if let Ok(decoded) = SignedManifest::decode(&signed) {
        let reencoded = decoded.manifest.encode_body().expect("a decoded manifest re-encodes");
        assert_eq!(body, reencoded);
    }
});
