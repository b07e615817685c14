//! aws-chunked framing, followed as the bytes of a body pass (spec/
//! gateway.md, "Request checks"): chunk headers are bounded, so that a
//! declared size alone can make no one buffer without end. The gateway
//! wraps request bodies in it; s3s decodes and checks signatures after.

use thiserror::Error;

/// The largest chunk accepted (clients send 64 KiB to 1 MiB).
pub const MAX_CHUNK_BYTES: u64 = 16 << 20;
/// The longest chunk header line (a size and a 64-digit signature fit).
const MAX_HEADER_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FramingError {
    #[error("an aws-chunked chunk declares {0} bytes; at most {MAX_CHUNK_BYTES} are accepted")]
    TooLarge(u64),
    #[error("malformed aws-chunked framing: {0}")]
    Malformed(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Reading a chunk header line up to CRLF.
    Header(Vec<u8>),
    /// Inside a chunk's data.
    Data(u64),
    /// The CRLF after a chunk's data: how many of its two bytes were seen.
    DataEnd(u8),
    /// After the last (empty) chunk: trailers, passed through.
    Trailers,
}

/// Follows aws-chunked framing; `feed` fails on the first violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkFraming {
    state: State,
}

impl Default for ChunkFraming {
    fn default() -> Self {
        Self {
            state: State::Header(Vec::new()),
        }
    }
}

impl ChunkFraming {
    /// Whether the last (empty) chunk has been seen: what follows are
    /// trailers, passed through.
    pub fn at_trailers(&self) -> bool {
        self.state == State::Trailers
    }

    /// Follows `bytes`, the next bytes of the body in order.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), FramingError> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Trailers => return Ok(()),
                State::Data(remaining) => {
                    let take = (*remaining).min(bytes.len() as u64);
                    *remaining -= take;
                    bytes = &bytes[take as usize..];
                    if *remaining == 0 {
                        self.state = State::DataEnd(0);
                    }
                }
                State::DataEnd(seen) => {
                    let expected = b"\r\n"[*seen as usize];
                    if bytes[0] != expected {
                        return Err(FramingError::Malformed(
                            "chunk data is not followed by CRLF",
                        ));
                    }
                    bytes = &bytes[1..];
                    *seen += 1;
                    if *seen == 2 {
                        self.state = State::Header(Vec::new());
                    }
                }
                State::Header(line) => {
                    let end = bytes.iter().position(|&b| b == b'\n');
                    let take = end.map_or(bytes.len(), |i| i + 1);
                    line.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if line.len() > MAX_HEADER_BYTES {
                        return Err(FramingError::Malformed("chunk header too long"));
                    }
                    if end.is_none() {
                        continue;
                    }
                    let text = line
                        .strip_suffix(b"\r\n")
                        .ok_or(FramingError::Malformed("chunk header does not end in CRLF"))?;
                    let size_text = text.split(|&b| b == b';').next().unwrap_or_default();
                    let size_text = std::str::from_utf8(size_text)
                        .map_err(|_| FramingError::Malformed("chunk size is not text"))?;
                    if size_text.is_empty() || size_text.len() > 16 {
                        return Err(FramingError::Malformed(
                            "chunk size is not 1 to 16 hex digits",
                        ));
                    }
                    let size = u64::from_str_radix(size_text, 16)
                        .map_err(|_| FramingError::Malformed("chunk size is not hexadecimal"))?;
                    if size > MAX_CHUNK_BYTES {
                        return Err(FramingError::TooLarge(size));
                    }
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(
                format!("{:x};chunk-signature={}\r\n", chunk.len(), "0".repeat(64)).as_bytes(),
            );
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0;chunk-signature=00\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n");
        out
    }

    #[test]
    fn valid_framing_passes_in_any_split() {
        let body = framed(&[&[7u8; 100_000], b"tail"]);
        for step in [1, 2, 3, 7, 64, 4096, body.len()] {
            let mut framing = ChunkFraming::default();
            for piece in body.chunks(step) {
                framing.feed(piece).unwrap();
            }
            assert!(matches!(framing.state, State::Trailers), "step {step}");
        }
        // The unsigned variant has no extension.
        let mut framing = ChunkFraming::default();
        framing.feed(b"5\r\nhello\r\n0\r\n\r\n").unwrap();
    }

    #[test]
    fn huge_or_malformed_chunks_are_refused_before_their_data() {
        let mut framing = ChunkFraming::default();
        assert!(matches!(
            framing.feed(b"100000000;chunk-signature=00\r\n"),
            Err(FramingError::TooLarge(0x1_0000_0000))
        ));
        for bad in [
            &b"zz;chunk-signature=00\r\n"[..],
            b"5\r\nhelloXX",
            b"12345678901234567\r\n",
            b"5\nhello",
        ] {
            assert!(ChunkFraming::default().feed(bad).is_err(), "{bad:?}");
        }
        let endless = vec![b'1'; MAX_HEADER_BYTES + 1];
        assert!(ChunkFraming::default().feed(&endless).is_err());
    }
}
