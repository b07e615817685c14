//! The frame decoder on arbitrary bytes fed in arbitrary pieces: it must not
//! panic, and whatever it accepts must re-encode to a frame that decodes to
//! the same message.
#![no_main]

use cairn_protocol::wire::FrameDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else { return };
    let step = usize::from(split).max(1);
    let mut decoder = FrameDecoder::default();
    for piece in stream.chunks(step) {
        decoder.feed(piece);
        loop {
            match decoder.next_message() {
                Ok(Some(message)) => {
                    let mut frame = Vec::new();
                    message.encode(&mut frame).expect("a decoded message re-encodes");
                    let mut again = FrameDecoder::default();
                    again.feed(&frame);
                    assert_eq!(again.next_message().expect("re-decodes"), Some(message));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
