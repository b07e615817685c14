//! The PUT pipeline: plaintext in, encoded segments out (spec/erasure.md).
//!
//! Plaintext is copied once, into the segment buffer where it is sealed in
//! place chunk by chunk; a full segment is erasure-coded and its fragments
//! hashed. Memory is one segment plus its parity, whatever the object size.
//!
//! The two stages are separate types so that a caller with two cores can
//! seal segment n+1 while segment n is encoded and hashed elsewhere.

use crate::encryption::{ChunkCipher, SecretKey, StreamError};
use crate::erasure::{EncodedSegment, ErasureError, SegmentEncoder, SegmentLayout};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Erasure(#[from] ErasureError),
}

/// First stage: plaintext in, sealed ciphertext segments out.
pub struct SegmentSealer {
    layout: SegmentLayout,
    cipher: ChunkCipher,
    segment: Vec<u8>,
    /// Where the current (unsealed) chunk starts in `segment`.
    chunk_start: usize,
    chunks_sealed_in_segment: u32,
    next_chunk: u64,
    spare: Vec<Vec<u8>>,
}

impl SegmentSealer {
    /// `stream_id` is the part number (0 for a single PUT).
    pub fn new(key: &SecretKey, stream_id: u32, layout: SegmentLayout) -> Self {
        Self {
            layout,
            cipher: ChunkCipher::new(key, stream_id),
            segment: Self::buffer(layout),
            chunk_start: 0,
            chunks_sealed_in_segment: 0,
            next_chunk: 0,
            spare: Vec::new(),
        }
    }

    fn buffer(layout: SegmentLayout) -> Vec<u8> {
        // Room for the padding the encoder adds: no reallocation per segment.
        Vec::with_capacity(layout.segment_bytes() + 2 * layout.scheme.data())
    }

    /// Gives a segment buffer back (see [`SegmentEncoder::recycle`]),
    /// to avoid a fresh allocation per segment.
    pub fn recycle(&mut self, mut buffer: Vec<u8>) {
        buffer.clear();
        self.spare.push(buffer);
    }

    /// Feeds plaintext; every sealed segment it completes is pushed to `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), StreamError> {
        let chunk = self.layout.chunk_size.bytes();
        while !input.is_empty() {
            let filled = self.segment.len() - self.chunk_start;
            if filled == chunk {
                // More data follows, so this full chunk is not the last.
                self.seal_current(false)?;
                if self.chunks_sealed_in_segment == self.layout.chunks_per_segment() {
                    out.push(self.take_segment());
                }
                continue;
            }
            let take = (chunk - filled).min(input.len());
            self.segment.extend_from_slice(&input[..take]);
            input = &input[take..];
        }
        Ok(())
    }

    /// Seals the final chunk and returns the last segment.
    pub fn finish(mut self) -> Result<Vec<u8>, StreamError> {
        self.seal_current(true)?;
        Ok(self.take_segment())
    }

    fn seal_current(&mut self, last: bool) -> Result<(), StreamError> {
        let tag = self
            .cipher
            .seal(self.next_chunk, last, &mut self.segment[self.chunk_start..])?;
        self.segment.extend_from_slice(&tag);
        self.chunk_start = self.segment.len();
        self.chunks_sealed_in_segment += 1;
        self.next_chunk += 1;
        Ok(())
    }

    fn take_segment(&mut self) -> Vec<u8> {
        let fresh = self
            .spare
            .pop()
            .unwrap_or_else(|| Self::buffer(self.layout));
        self.chunk_start = 0;
        self.chunks_sealed_in_segment = 0;
        std::mem::replace(&mut self.segment, fresh)
    }
}

/// Both stages on the caller's thread: seal, then encode and hash.
pub struct PutPipeline {
    sealer: SegmentSealer,
    encoder: SegmentEncoder,
    sealed: Vec<Vec<u8>>,
}

impl PutPipeline {
    pub fn new(key: &SecretKey, stream_id: u32, layout: SegmentLayout) -> Self {
        Self {
            sealer: SegmentSealer::new(key, stream_id, layout),
            encoder: SegmentEncoder::new(layout.scheme),
            sealed: Vec::new(),
        }
    }

    /// Gives a finished segment's buffer back for reuse.
    pub fn recycle(&mut self, segment: EncodedSegment) {
        let buffer = self.encoder.recycle(segment);
        self.sealer.recycle(buffer);
    }

    /// Feeds plaintext; every segment it completes is pushed to `out`.
    pub fn push(
        &mut self,
        input: &[u8],
        out: &mut Vec<EncodedSegment>,
    ) -> Result<(), PipelineError> {
        self.sealer.push(input, &mut self.sealed)?;
        for segment in self.sealed.drain(..) {
            out.push(self.encoder.encode(segment)?);
        }
        Ok(())
    }

    /// Seals the final chunk and returns the last segment.
    pub fn finish(mut self) -> Result<EncodedSegment, PipelineError> {
        let last = self.sealer.finish()?;
        Ok(self.encoder.encode(last)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encryption::{ChunkSize, StreamDecryptor, StreamEncryptor};
    use crate::erasure::{Scheme, reconstruct};

    #[test]
    fn segments_concatenate_to_the_stream_ciphertext_and_rebuild_from_parity() {
        let key = SecretKey::from_bytes([4; 32]);
        let layout = SegmentLayout::new(
            Scheme::new(4, 2).unwrap(),
            ChunkSize::new(4096).unwrap(),
            16,
        )
        .unwrap();
        for len in [0usize, 1, 4096, 16 * 4096, 16 * 4096 + 1, 40 * 4096 + 77] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut pipeline = PutPipeline::new(&key, 3, layout);
            let mut segments = Vec::new();
            for piece in plaintext.chunks(5000) {
                pipeline.push(piece, &mut segments).unwrap();
            }
            segments.push(pipeline.finish().unwrap());
            let lens: Vec<usize> = segments.iter().map(EncodedSegment::segment_len).collect();
            assert_eq!(
                lens,
                layout.segment_lens(len as u64).unwrap().collect::<Vec<_>>(),
                "len {len}"
            );

            // Rebuild each segment from parity plus the last data fragments.
            let mut ciphertext = Vec::new();
            for s in &segments {
                let chosen: Vec<(usize, &[u8])> = (2..6).map(|i| (i, s.fragment(i))).collect();
                ciphertext.extend(reconstruct(layout.scheme, s.segment_len(), &chosen).unwrap());
            }
            let mut reference = Vec::new();
            let mut enc = StreamEncryptor::new(&key, 3, layout.chunk_size);
            enc.update(&plaintext, &mut reference).unwrap();
            enc.finish(&mut reference).unwrap();
            assert_eq!(ciphertext, reference, "len {len}");

            let mut dec = StreamDecryptor::new(&key, 3, layout.chunk_size);
            let mut back = Vec::new();
            dec.update(&ciphertext, &mut back).unwrap();
            dec.finish(&mut back).unwrap();
            assert_eq!(back, plaintext);
        }
    }
}
