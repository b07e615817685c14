//! The manifest decoder on arbitrary bytes: it must not panic, and a
//! manifest it accepts must re-encode to exactly the same bytes.
#![no_main]

use cairn_protocol::manifest::SignedManifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = SignedManifest::decode(data) {
        let body = signed.manifest.encode_body().expect("a decoded manifest re-encodes");
        assert_eq!(&data[..data.len() - 64], &body[..]);
    }
});
