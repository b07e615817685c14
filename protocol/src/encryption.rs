//! Object encryption: chunked AES-256-GCM in the STREAM construction
//! (spec/encryption.md), and the wrapping of data keys.
//!
//! Each chunk is sealed under a nonce of (stream id, chunk index, last flag),
//! so reordering, truncation, extension and splicing between streams or
//! objects all fail authentication. Ranges decrypt alone: chunk `i` sits at a
//! fixed ciphertext offset. This module never sees where bytes come from.

use std::ops::Range;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::aead::{Nonce, Tag};
use thiserror::Error;

use crate::ids::UploadId;

/// Bytes of the GCM tag that follows every chunk.
pub const TAG_BYTES: usize = 16;

/// A 256-bit key, wiped from memory when dropped.
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// The key that seals one part attempt's stream (manifest format 2): the
/// data key, derived with the attempt's own random upload id. Two attempts
/// at one part number (a re-upload, an UploadPartCopy onto it, two racing
/// clients) therefore never seal under one (key, nonce) pair, although
/// they share the data key and the stream id (spec/encryption.md).
pub fn part_stream_key(data_key: &SecretKey, attempt: &UploadId) -> SecretKey {
    let mut hasher = blake3::Hasher::new_derive_key("cairn 2026-12 part stream key v1");
    hasher.update(data_key.as_bytes());
    hasher.update(attempt.as_bytes());
    SecretKey::from_bytes(*hasher.finalize().as_bytes())
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        for byte in &mut self.0 {
            // Volatile so the wipe is not optimised away as a dead store.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// Plaintext bytes per chunk: a power of two from 4 KiB to 1 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSize(u32);

impl ChunkSize {
    pub const MIN: u32 = 4 << 10;
    pub const MAX: u32 = 1 << 20;
    /// The default: 64 KiB keeps the tag overhead at 0.02% and ranges cheap.
    pub const DEFAULT: ChunkSize = ChunkSize(64 << 10);

    pub fn new(bytes: u32) -> Result<Self, StreamError> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(Self(bytes))
        } else {
            Err(StreamError::InvalidChunkSize { bytes })
        }
    }

    pub fn bytes(self) -> usize {
        self.0 as usize
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// Ciphertext bytes of a full chunk.
    pub fn sealed_bytes(self) -> usize {
        self.bytes() + TAG_BYTES
    }

    /// Chunks in a stream of `plaintext_len` bytes: an empty stream still has
    /// one (empty, final) chunk, so that truncation to nothing is detected.
    pub fn chunk_count(self, plaintext_len: u64) -> u64 {
        plaintext_len.div_ceil(u64::from(self.0)).max(1)
    }

    /// Ciphertext bytes of a stream of `plaintext_len` bytes; `None` when
    /// that does not fit in 64 bits (a length from an untrusted source).
    pub fn ciphertext_len(self, plaintext_len: u64) -> Option<u64> {
        (TAG_BYTES as u64)
            .checked_mul(self.chunk_count(plaintext_len))?
            .checked_add(plaintext_len)
    }
}

/// Why encryption or decryption failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StreamError {
    #[error("chunk size {bytes} is not a power of two between 4 KiB and 1 MiB")]
    InvalidChunkSize { bytes: u32 },
    #[error(
        "chunk {index} failed authentication: the ciphertext was altered, reordered or spliced, or the key is wrong"
    )]
    Authentication { index: u64 },
    #[error("the stream ends before its final chunk: it was truncated")]
    Truncated,
    #[error("data follows the final chunk")]
    DataAfterFinalChunk,
    #[error("chunk {index} holds {len} bytes, more than the chunk size")]
    ChunkTooLong { index: u64, len: usize },
    #[error(
        "only the final chunk may be shorter than the chunk size (chunk {index} has {len} bytes)"
    )]
    ShortChunk { index: u64, len: usize },
    #[error("stream already finished")]
    Finished,
    #[error("range {start}..{end} is outside the {len}-byte object")]
    RangeOutOfBounds { start: u64, end: u64, len: u64 },
    #[error("the stream is too long: chunk index overflow")]
    TooManyChunks,
}

/// The nonce of chunk `index` of stream `stream_id`: 4 bytes stream id,
/// 7 bytes index, 1 byte last flag (spec/encryption.md).
fn chunk_nonce(stream_id: u32, index: u64, last: bool) -> Result<Nonce<Aes256Gcm>, StreamError> {
    if index >= 1 << 56 {
        return Err(StreamError::TooManyChunks);
    }
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&stream_id.to_be_bytes());
    nonce[4..11].copy_from_slice(&index.to_be_bytes()[1..]);
    nonce[11] = u8::from(last);
    Ok(Nonce::<Aes256Gcm>::from(nonce))
}

/// The chunk-level cipher shared by every encryptor and decryptor.
#[derive(Clone)]
pub struct ChunkCipher {
    aead: Aes256Gcm,
    stream_id: u32,
}

impl ChunkCipher {
    /// `stream_id` separates streams under one data key: the part number of
    /// a multipart upload, 0 for a single PUT.
    pub fn new(key: &SecretKey, stream_id: u32) -> Self {
        let aead = Aes256Gcm::new(key.as_bytes().into());
        Self { aead, stream_id }
    }

    /// Encrypts `chunk` in place and returns its tag.
    pub fn seal(
        &self,
        index: u64,
        last: bool,
        chunk: &mut [u8],
    ) -> Result<[u8; TAG_BYTES], StreamError> {
        let nonce = chunk_nonce(self.stream_id, index, last)?;
        let tag = self
            .aead
            .encrypt_inout_detached(&nonce, &[], chunk.into())
            .map_err(|_| StreamError::ChunkTooLong {
                index,
                len: chunk.len(),
            })?;
        Ok(tag.into())
    }

    /// Decrypts `sealed` (ciphertext then tag) in place; on success the
    /// plaintext is `sealed[..sealed.len() - TAG_BYTES]`.
    pub fn open(&self, index: u64, last: bool, sealed: &mut [u8]) -> Result<usize, StreamError> {
        let body_len = sealed
            .len()
            .checked_sub(TAG_BYTES)
            .ok_or(StreamError::Truncated)?;
        let (body, tag) = sealed.split_at_mut(body_len);
        let nonce = chunk_nonce(self.stream_id, index, last)?;
        let tag = Tag::<Aes256Gcm>::try_from(&*tag).map_err(|_| StreamError::Truncated)?;
        self.aead
            .decrypt_inout_detached(&nonce, &[], body.into(), &tag)
            .map_err(|_| StreamError::Authentication { index })?;
        Ok(body_len)
    }

    /// Opens the chunk that should be the stream's last. If it only opens as
    /// a non-final chunk, the stream was cut there: say so plainly.
    fn open_final(&self, index: u64, sealed: &mut [u8]) -> Result<usize, StreamError> {
        let original = sealed.to_vec();
        match self.open(index, true, sealed) {
            Ok(len) => Ok(len),
            Err(StreamError::Authentication { .. }) => {
                let mut probe = original;
                if self.open(index, false, &mut probe).is_ok() {
                    Err(StreamError::Truncated)
                } else {
                    Err(StreamError::Authentication { index })
                }
            }
            Err(other) => Err(other),
        }
    }
}

/// Cuts a byte stream into units of a fixed size and hands each one over
/// only once more input shows that it is not the last: the STREAM last flag
/// must be known when a chunk is sealed or opened.
struct HeldBackUnits {
    pending: Vec<u8>,
    unit: usize,
    next_index: u64,
}

impl HeldBackUnits {
    fn new(unit: usize) -> Self {
        Self {
            pending: Vec::with_capacity(unit),
            unit,
            next_index: 0,
        }
    }

    /// Calls `complete(index, unit)` for each full unit that `input` proves
    /// is not the last.
    fn feed(
        &mut self,
        mut input: &[u8],
        mut complete: impl FnMut(u64, &mut [u8]) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        while !input.is_empty() {
            if self.pending.len() == self.unit {
                self.release(&mut complete)?;
            }
            let take = (self.unit - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
        }
        Ok(())
    }

    /// Hands over the held unit (possibly short or empty) as the last.
    fn release(
        &mut self,
        mut complete: impl FnMut(u64, &mut [u8]) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        complete(self.next_index, &mut self.pending)?;
        self.pending.clear();
        self.next_index += 1;
        Ok(())
    }
}

/// Streaming encryptor: feed plaintext of any shape, collect sealed chunks.
pub struct StreamEncryptor {
    cipher: ChunkCipher,
    chunks: HeldBackUnits,
    finished: bool,
}

impl StreamEncryptor {
    pub fn new(key: &SecretKey, stream_id: u32, chunk_size: ChunkSize) -> Self {
        Self {
            cipher: ChunkCipher::new(key, stream_id),
            chunks: HeldBackUnits::new(chunk_size.bytes()),
            finished: false,
        }
    }

    /// Appends the sealed form of every chunk that `input` completes to `out`.
    pub fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.finished {
            return Err(StreamError::Finished);
        }
        let cipher = &self.cipher;
        self.chunks.feed(input, |index, chunk| {
            seal_into(cipher, index, false, chunk, out)
        })
    }

    /// Seals the final chunk (possibly empty) into `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.finished {
            return Err(StreamError::Finished);
        }
        let cipher = &self.cipher;
        self.chunks
            .release(|index, chunk| seal_into(cipher, index, true, chunk, out))?;
        self.finished = true;
        Ok(())
    }
}

fn seal_into(
    cipher: &ChunkCipher,
    index: u64,
    last: bool,
    chunk: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), StreamError> {
    let start = out.len();
    out.extend_from_slice(chunk);
    let tag = cipher.seal(index, last, &mut out[start..])?;
    out.extend_from_slice(&tag);
    Ok(())
}

/// Streaming decryptor for a stream of unknown length: feed ciphertext of
/// any shape; plaintext is released one verified chunk at a time.
pub struct StreamDecryptor {
    cipher: ChunkCipher,
    chunks: HeldBackUnits,
    finished: bool,
}

impl StreamDecryptor {
    pub fn new(key: &SecretKey, stream_id: u32, chunk_size: ChunkSize) -> Self {
        Self {
            cipher: ChunkCipher::new(key, stream_id),
            chunks: HeldBackUnits::new(chunk_size.sealed_bytes()),
            finished: false,
        }
    }

    pub fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.finished {
            return Err(StreamError::DataAfterFinalChunk);
        }
        let cipher = &self.cipher;
        self.chunks.feed(input, |index, sealed| {
            let len = cipher.open(index, false, sealed)?;
            out.extend_from_slice(&sealed[..len]);
            Ok(())
        })
    }

    /// Opens the held-back chunk as the final one. Fails if the stream was
    /// truncated at a chunk boundary or inside a chunk.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.finished {
            return Err(StreamError::Finished);
        }
        if self.chunks.pending.len() < TAG_BYTES {
            return Err(StreamError::Truncated);
        }
        let cipher = &self.cipher;
        self.chunks.release(|index, sealed| {
            let len = cipher.open_final(index, sealed)?;
            out.extend_from_slice(&sealed[..len]);
            Ok(())
        })?;
        self.finished = true;
        Ok(())
    }
}

/// The ciphertext a plaintext range needs, and how to decrypt it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangePlan {
    /// Bytes of the ciphertext stream to fetch.
    pub ciphertext: Range<u64>,
    first_chunk: u64,
    chunk_count: u64,
    /// Plaintext bytes to drop from the first decrypted chunk.
    skip: u64,
    /// Plaintext bytes to deliver in all.
    len: u64,
}

impl RangePlan {
    /// Plans the decryption of plaintext bytes `range` of a stream whose
    /// plaintext is `plaintext_len` bytes long. Only the covering chunks are
    /// fetched; an empty range needs no ciphertext.
    pub fn new(
        chunk_size: ChunkSize,
        plaintext_len: u64,
        range: Range<u64>,
    ) -> Result<Self, StreamError> {
        if range.start > range.end || range.end > plaintext_len {
            return Err(StreamError::RangeOutOfBounds {
                start: range.start,
                end: range.end,
                len: plaintext_len,
            });
        }
        let chunk = u64::from(chunk_size.get());
        let sealed = chunk_size.sealed_bytes() as u64;
        let total_chunks = chunk_size.chunk_count(plaintext_len);
        let (first, last_exclusive) = if range.is_empty() {
            (0, 0)
        } else {
            (range.start / chunk, range.end.div_ceil(chunk))
        };
        let ciphertext_len = chunk_size
            .ciphertext_len(plaintext_len)
            .ok_or(StreamError::TooManyChunks)?;
        let cipher_end = last_exclusive.saturating_mul(sealed).min(ciphertext_len);
        Ok(Self {
            ciphertext: first * sealed..cipher_end.max(first * sealed),
            first_chunk: first,
            chunk_count: total_chunks,
            skip: range.start - first * chunk,
            len: range.end - range.start,
        })
    }

    pub fn decryptor(
        &self,
        key: &SecretKey,
        stream_id: u32,
        chunk_size: ChunkSize,
    ) -> RangeDecryptor {
        RangeDecryptor {
            cipher: ChunkCipher::new(key, stream_id),
            sealed_bytes: chunk_size.sealed_bytes(),
            pending: Vec::with_capacity(chunk_size.sealed_bytes()),
            next_index: self.first_chunk,
            chunk_count: self.chunk_count,
            skip: self.skip,
            remaining: self.len,
            fed: 0,
            expected: self.ciphertext.end - self.ciphertext.start,
        }
    }
}

/// Decrypts the ciphertext named by a [`RangePlan`] and yields exactly the
/// requested plaintext bytes. The last chunk of the object is opened as
/// final, so a truncated object still fails.
pub struct RangeDecryptor {
    cipher: ChunkCipher,
    sealed_bytes: usize,
    pending: Vec<u8>,
    next_index: u64,
    chunk_count: u64,
    skip: u64,
    remaining: u64,
    fed: u64,
    expected: u64,
}

impl RangeDecryptor {
    pub fn update(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.fed + input.len() as u64 > self.expected {
            return Err(StreamError::DataAfterFinalChunk);
        }
        self.fed += input.len() as u64;
        while !input.is_empty() {
            let take = (self.sealed_bytes - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() == self.sealed_bytes {
                self.open_pending(out)?;
            }
        }
        Ok(())
    }

    /// Checks that every requested byte was delivered.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        if !self.pending.is_empty() {
            // The object's short final chunk.
            self.open_pending(out)?;
        }
        if self.remaining > 0 {
            return Err(StreamError::Truncated);
        }
        Ok(())
    }

    fn open_pending(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        let index = self.next_index;
        let last = index + 1 == self.chunk_count;
        let len = if last {
            self.cipher.open_final(index, &mut self.pending)?
        } else {
            self.cipher.open(index, false, &mut self.pending)?
        };
        let start = (self.skip as usize).min(len);
        let end = (start as u64 + self.remaining).min(len as u64) as usize;
        out.extend_from_slice(&self.pending[start..end]);
        self.remaining -= (end - start) as u64;
        self.skip = 0;
        self.pending.clear();
        self.next_index += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SecretKey {
        SecretKey::from_bytes([byte; 32])
    }

    fn small() -> ChunkSize {
        ChunkSize::new(4096).unwrap()
    }

    fn encrypt(key: &SecretKey, stream_id: u32, plaintext: &[u8]) -> Vec<u8> {
        let mut enc = StreamEncryptor::new(key, stream_id, small());
        let mut out = Vec::new();
        for piece in plaintext.chunks(1000) {
            enc.update(piece, &mut out).unwrap();
        }
        enc.finish(&mut out).unwrap();
        out
    }

    fn decrypt(key: &SecretKey, stream_id: u32, ciphertext: &[u8]) -> Result<Vec<u8>, StreamError> {
        let mut dec = StreamDecryptor::new(key, stream_id, small());
        let mut out = Vec::new();
        for piece in ciphertext.chunks(777) {
            dec.update(piece, &mut out)?;
        }
        dec.finish(&mut out)?;
        Ok(out)
    }

    fn plaintext(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn round_trips_every_boundary_length() {
        let k = key(1);
        for len in [0, 1, 4095, 4096, 4097, 8192, 3 * 4096 + 5] {
            let data = plaintext(len);
            let sealed = encrypt(&k, 0, &data);
            assert_eq!(
                sealed.len() as u64,
                small().ciphertext_len(len as u64).unwrap(),
                "len {len}"
            );
            assert_eq!(decrypt(&k, 0, &sealed).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn truncation_at_a_chunk_boundary_is_detected() {
        let k = key(2);
        let sealed = encrypt(&k, 0, &plaintext(3 * 4096));
        let cut = &sealed[..2 * small().sealed_bytes()];
        assert_eq!(decrypt(&k, 0, cut), Err(StreamError::Truncated));
        assert_eq!(decrypt(&k, 0, &[]), Err(StreamError::Truncated));
    }

    #[test]
    fn truncation_inside_a_chunk_is_detected() {
        let k = key(2);
        let sealed = encrypt(&k, 0, &plaintext(3 * 4096));
        let cut = &sealed[..2 * small().sealed_bytes() + 100];
        assert!(decrypt(&k, 0, cut).is_err());
    }

    #[test]
    fn reordered_chunks_are_detected() {
        let k = key(3);
        let sealed = encrypt(&k, 0, &plaintext(3 * 4096));
        let s = small().sealed_bytes();
        let mut swapped = sealed.clone();
        swapped[..s].copy_from_slice(&sealed[s..2 * s]);
        swapped[s..2 * s].copy_from_slice(&sealed[..s]);
        assert_eq!(
            decrypt(&k, 0, &swapped),
            Err(StreamError::Authentication { index: 0 })
        );
    }

    #[test]
    fn a_chunk_spliced_from_another_object_or_part_is_detected() {
        let s = small().sealed_bytes();
        let (k1, k2) = (key(4), key(5));
        let a = encrypt(&k1, 0, &plaintext(3 * 4096));
        let other_object = encrypt(&k2, 0, &plaintext(3 * 4096));
        let other_part = encrypt(&k1, 1, &plaintext(3 * 4096));
        for donor in [&other_object, &other_part] {
            let mut spliced = a.clone();
            spliced[s..2 * s].copy_from_slice(&donor[s..2 * s]);
            assert_eq!(
                decrypt(&k1, 0, &spliced),
                Err(StreamError::Authentication { index: 1 })
            );
        }
    }

    #[test]
    fn a_flipped_bit_is_detected_anywhere() {
        let k = key(6);
        let sealed = encrypt(&k, 0, &plaintext(2 * 4096 + 10));
        for position in [0, 4095, 4096 + 15, 4112, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[position] ^= 0x01;
            assert!(
                decrypt(&k, 0, &bad).is_err(),
                "bit flip at {position} not detected"
            );
        }
    }

    #[test]
    fn extension_after_the_final_chunk_is_detected() {
        let k = key(7);
        let mut sealed = encrypt(&k, 0, &plaintext(100));
        sealed.extend_from_slice(&[0u8; 40]);
        assert!(decrypt(&k, 0, &sealed).is_err());
    }

    #[test]
    fn ranges_decrypt_only_the_chunks_they_cover() {
        let k = key(8);
        let len = 5 * 4096 + 123;
        let data = plaintext(len);
        let sealed = encrypt(&k, 9, &data);
        let cases = [
            (0, 1),
            (0, len),
            (4095, 4097),
            (4096, 8192),
            (len - 1, len),
            (10_000, 20_000),
            (7, 7),
        ];
        for (start, end) in cases {
            let plan = RangePlan::new(small(), len as u64, start as u64..end as u64).unwrap();
            let chunks_touched = (plan.ciphertext.end - plan.ciphertext.start)
                .div_ceil(small().sealed_bytes() as u64);
            let needed = if start == end {
                0
            } else {
                (end.div_ceil(4096) - start / 4096) as u64
            };
            assert_eq!(chunks_touched, needed, "{start}..{end}");
            let mut dec = plan.decryptor(&k, 9, small());
            let mut out = Vec::new();
            let slice = &sealed[plan.ciphertext.start as usize..plan.ciphertext.end as usize];
            for piece in slice.chunks(1234) {
                dec.update(piece, &mut out).unwrap();
            }
            dec.finish(&mut out).unwrap();
            assert_eq!(out, &data[start..end], "{start}..{end}");
        }
        assert!(RangePlan::new(small(), len as u64, 0..len as u64 + 1).is_err());
    }

    #[test]
    fn a_range_ending_in_a_truncated_final_chunk_fails() {
        let k = key(9);
        let len = 2 * 4096 + 50;
        let sealed = encrypt(&k, 0, &plaintext(len));
        let plan = RangePlan::new(small(), len as u64, 8192..len as u64).unwrap();
        let mut dec = plan.decryptor(&k, 0, small());
        let mut out = Vec::new();
        let slice = &sealed[plan.ciphertext.start as usize..plan.ciphertext.end as usize - 1];
        dec.update(slice, &mut out).unwrap();
        assert!(dec.finish(&mut out).is_err());
    }

    #[test]
    fn chunk_sizes_are_validated() {
        assert!(ChunkSize::new(4096).is_ok());
        assert!(ChunkSize::new(1 << 20).is_ok());
        assert!(ChunkSize::new(5000).is_err());
        assert!(ChunkSize::new(2048).is_err());
        assert!(ChunkSize::new(2 << 20).is_err());
    }
}
