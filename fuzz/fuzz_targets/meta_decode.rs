//! Metadata RPC messages, row values, acceptor states, register values and
//! version guards:
//! no panic; what decodes re-encodes to the same bytes (every encoding is
//! canonical). The first byte picks the decoder.
#![no_main]

use cairn_protocol::cas::{AcceptorState, TaggedValue};
use cairn_protocol::guard::VersionGuard;
use cairn_protocol::meta::RowValue;
use cairn_protocol::metarpc::{Call, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which {
        0 => {
            if let Ok(call) = Call::decode(body) {
                assert_eq!(call.encode(), body);
            }
        }
        1 => {
            if let Ok(response) = Response::decode(body) {
                assert_eq!(response.encode(), body);
            }
        }
        2 => {
            if let Ok(value) = RowValue::decode(body) {
                assert_eq!(value.encode(), body);
            }
        }
        3 => {
            if let Ok(state) = AcceptorState::decode(body) {
                assert_eq!(state.encode(), body);
            }
        }
        4 => {
            if let Ok(value) = TaggedValue::decode(body) {
                assert_eq!(value.encode(), body);
            }
        }
        5 => {
            if let Ok(guard) = VersionGuard::decode(body) {
                assert_eq!(guard.encode(), body);
            }
        }
        _ => {}
    }
});
