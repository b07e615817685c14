//! aws-chunked framing: no panic on any bytes, and the same verdict and
//! state however the bytes are split.
#![no_main]

use cairn_protocol::chunked::ChunkFraming;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let mut whole = ChunkFraming::default();
    let whole_verdict = whole.feed(body);
    let at = usize::from(split).min(body.len());
    let mut pieces = ChunkFraming::default();
    let pieces_verdict = pieces
        .feed(&body[..at])
        .and_then(|()| pieces.feed(&body[at..]));
    assert_eq!(whole_verdict.is_ok(), pieces_verdict.is_ok());
    if whole_verdict.is_ok() {
        assert_eq!(whole, pieces);
    }
});
