//! DHT store records: no panic; what decodes re-encodes to the same bytes.
#![no_main]

use cairn_protocol::dht::{StoredProvider, StoredRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = StoredRecord::decode(data) {
        assert_eq!(record.encode(), data);
    }
    if let Ok(provider) = StoredProvider::decode(data) {
        assert_eq!(provider.encode(), data);
    }
});
