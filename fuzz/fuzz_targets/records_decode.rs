//! The gateway's records (bucket, access key, KMS key, upload, part,
//! release, degraded segment): no
//! panic; what decodes re-encodes to the same bytes. The first byte picks
//! the decoder.
#![no_main]

use cairn_protocol::records::{
    AccessKeyRecord, BucketRecord, DegradedRecord, KmsKeyRecord, PartRecord, ReleaseRecord,
    UploadRecord,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => {
            if let Ok(record) = BucketRecord::decode(body) {
                assert_eq!(record.encode(), body);
            }
        }
        1 => {
            if let Ok(record) = AccessKeyRecord::decode(body) {
                assert_eq!(record.encode(), body);
            }
        }
        2 => {
            if let Ok(record) = KmsKeyRecord::decode(body) {
                assert_eq!(record.encode(), body);
            }
        }
        3 => {
            if let Ok(record) = UploadRecord::decode(body) {
                assert_eq!(record.encode(), body);
            }
        }
        4 => {
            if let Ok(record) = PartRecord::decode(body) {
                assert_eq!(record.encode(), body);
            }
        }
        5 => {
            if let Ok(record) = DegradedRecord::decode(body) {
                assert_eq!(record.encode(), body);
            }
        }
        _ => {
            if let Ok(record) = ReleaseRecord::decode(body) {
                assert_eq!(record.encode(), body);
            }
        }
    }
});
