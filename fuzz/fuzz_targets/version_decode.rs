//! The object-version entry decoder: no panic, and canonical round trips.
#![no_main]

use cairn_protocol::version::ObjectVersion;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = ObjectVersion::decode(data) {
        assert_eq!(entry.encode(), data);
    }
});
