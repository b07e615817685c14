//! Erasure coding of ciphertext segments into fragments (spec/erasure.md).
//!
//! A segment of `len` bytes becomes `k` data fragments (the segment cut in
//! `k` equal shards, the last one zero-padded) and `m` Reed-Solomon parity
//! fragments of the same size; any `k` of the `k + m` rebuild it. With
//! `k = 1` the "parity" fragments are plain copies: replication.

use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};
use thiserror::Error;

use crate::encryption::ChunkSize;
use crate::ids::FragmentId;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ErasureError {
    #[error("k must be 1 to {max} data fragments, got {k}", max = Scheme::MAX_DATA)]
    InvalidDataCount { k: u8 },
    #[error("m must be 0 to {max} parity fragments, got {m}", max = Scheme::MAX_PARITY)]
    InvalidParityCount { m: u8 },
    #[error("a segment of {bytes} bytes is outside {min}..={max} bytes", min = SegmentLayout::MIN_SEGMENT_BYTES, max = SegmentLayout::MAX_SEGMENT_BYTES)]
    InvalidSegmentSize { bytes: u64 },
    #[error("segment of {len} bytes is longer than the layout's {max}")]
    SegmentTooLong { len: usize, max: usize },
    #[error("segment is empty")]
    EmptySegment,
    #[error("fragment index {index} is outside the scheme's {total} fragments")]
    BadIndex { index: usize, total: usize },
    #[error("fragment {index} has {len} bytes, expected {expected}")]
    BadFragmentLength {
        index: usize,
        len: usize,
        expected: usize,
    },
    #[error("only {have} distinct fragments given, {need} are needed")]
    NotEnoughFragments { have: usize, need: usize },
    #[error("reed-solomon: {0}")]
    Codec(String),
}

/// The redundancy scheme: `k` data fragments and `m` parity fragments per segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scheme {
    k: u8,
    m: u8,
}

impl Scheme {
    pub const MAX_DATA: u8 = 32;
    pub const MAX_PARITY: u8 = 32;

    pub fn new(k: u8, m: u8) -> Result<Self, ErasureError> {
        if k == 0 || k > Self::MAX_DATA {
            return Err(ErasureError::InvalidDataCount { k });
        }
        if m > Self::MAX_PARITY {
            return Err(ErasureError::InvalidParityCount { m });
        }
        Ok(Self { k, m })
    }

    pub fn data(self) -> usize {
        usize::from(self.k)
    }

    pub fn parity(self) -> usize {
        usize::from(self.m)
    }

    pub fn total(self) -> usize {
        self.data() + self.parity()
    }

    pub fn is_replication(self) -> bool {
        self.k == 1
    }

    /// Bytes of each fragment of a segment of `segment_len` bytes: the
    /// segment split in `k`, rounded up to even (the codec works on pairs).
    pub fn fragment_len(self, segment_len: usize) -> usize {
        let shard = segment_len.div_ceil(self.data()).max(1);
        if self.is_replication() {
            shard
        } else {
            shard + (shard & 1)
        }
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{}", self.k, self.m)
    }
}

/// How an object's ciphertext is cut: segments are whole numbers of sealed
/// chunks, so a chunk never straddles two segments and a range read touches
/// only the segments holding its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLayout {
    pub scheme: Scheme,
    pub chunk_size: ChunkSize,
    chunks_per_segment: u32,
}

impl SegmentLayout {
    pub const MIN_SEGMENT_BYTES: u64 = 64 << 10;
    pub const MAX_SEGMENT_BYTES: u64 = 64 << 20;

    pub fn new(
        scheme: Scheme,
        chunk_size: ChunkSize,
        chunks_per_segment: u32,
    ) -> Result<Self, ErasureError> {
        let bytes = u64::from(chunks_per_segment) * chunk_size.sealed_bytes() as u64;
        if !(Self::MIN_SEGMENT_BYTES..=Self::MAX_SEGMENT_BYTES).contains(&bytes) {
            return Err(ErasureError::InvalidSegmentSize { bytes });
        }
        Ok(Self {
            scheme,
            chunk_size,
            chunks_per_segment,
        })
    }

    /// 64 KiB chunks, 64 per segment: segments of 4 MiB + 1 KiB of ciphertext.
    pub fn with_defaults(scheme: Scheme) -> Self {
        Self {
            scheme,
            chunk_size: ChunkSize::DEFAULT,
            chunks_per_segment: 64,
        }
    }

    pub fn chunks_per_segment(self) -> u32 {
        self.chunks_per_segment
    }

    /// Ciphertext bytes of a full segment.
    pub fn segment_bytes(self) -> usize {
        self.chunks_per_segment as usize * self.chunk_size.sealed_bytes()
    }

    /// The ciphertext length of every segment of a stream of `plaintext_len`
    /// bytes, in order: all full but the last.
    /// `None` when the stream's length does not fit in 64 bits.
    pub fn segment_lens(self, plaintext_len: u64) -> Option<impl Iterator<Item = usize>> {
        let total = self.chunk_size.ciphertext_len(plaintext_len)?;
        let full = self.segment_bytes() as u64;
        let count = total.div_ceil(full);
        Some((0..count).map(move |i| (total - i * full).min(full) as usize))
    }
}

/// One encoded segment. Data fragments are slices of the (padded) segment
/// itself; only the parity is new memory.
pub struct EncodedSegment {
    scheme: Scheme,
    segment_len: usize,
    fragment_len: usize,
    data: Vec<u8>,
    parity: Vec<u8>,
    ids: Vec<FragmentId>,
}

impl EncodedSegment {
    pub fn segment_len(&self) -> usize {
        self.segment_len
    }

    pub fn fragment_len(&self) -> usize {
        self.fragment_len
    }

    pub fn fragment_ids(&self) -> &[FragmentId] {
        &self.ids
    }

    /// Fragment `index` (0..k are data, k..k+m parity; copies for k = 1).
    pub fn fragment(&self, index: usize) -> &[u8] {
        let len = self.fragment_len;
        if index < self.scheme.data() || self.scheme.is_replication() {
            let i = if self.scheme.is_replication() {
                0
            } else {
                index
            };
            &self.data[i * len..(i + 1) * len]
        } else {
            let p = index - self.scheme.data();
            &self.parity[p * len..(p + 1) * len]
        }
    }
}

/// Encodes segments one after another, reusing the codec's work memory.
pub struct SegmentEncoder {
    scheme: Scheme,
    codec: Option<ReedSolomonEncoder>,
    spare_parity: Option<Vec<u8>>,
}

impl SegmentEncoder {
    pub fn new(scheme: Scheme) -> Self {
        Self {
            scheme,
            codec: None,
            spare_parity: None,
        }
    }

    /// Takes back a segment whose fragments are no longer needed: keeps its
    /// parity memory for the next segment and returns the segment buffer
    /// (for [`crate::pipeline::SegmentSealer::recycle`]). Fresh multi-MiB
    /// buffers cost page faults on every segment.
    pub fn recycle(&mut self, segment: EncodedSegment) -> Vec<u8> {
        let mut parity = segment.parity;
        parity.clear();
        self.spare_parity = Some(parity);
        segment.data
    }

    /// Encodes `segment` (its bytes, which this takes over and pads) and
    /// hashes every fragment.
    pub fn encode(&mut self, mut segment: Vec<u8>) -> Result<EncodedSegment, ErasureError> {
        let scheme = self.scheme;
        let segment_len = segment.len();
        if segment_len == 0 {
            return Err(ErasureError::EmptySegment);
        }
        let fragment_len = scheme.fragment_len(segment_len);
        segment.resize(
            fragment_len
                * if scheme.is_replication() {
                    1
                } else {
                    scheme.data()
                },
            0,
        );
        let mut parity = self.spare_parity.take().unwrap_or_default();
        if !scheme.is_replication() && scheme.parity() > 0 {
            let codec = match self.codec.as_mut() {
                Some(codec) => {
                    codec
                        .reset(scheme.data(), scheme.parity(), fragment_len)
                        .map_err(|e| ErasureError::Codec(e.to_string()))?;
                    codec
                }
                None => self.codec.insert(
                    ReedSolomonEncoder::new(scheme.data(), scheme.parity(), fragment_len)
                        .map_err(|e| ErasureError::Codec(e.to_string()))?,
                ),
            };
            for shard in segment.chunks_exact(fragment_len) {
                codec
                    .add_original_shard(shard)
                    .map_err(|e| ErasureError::Codec(e.to_string()))?;
            }
            let result = codec
                .encode()
                .map_err(|e| ErasureError::Codec(e.to_string()))?;
            parity.reserve_exact(fragment_len * scheme.parity());
            for shard in result.recovery_iter() {
                parity.extend_from_slice(shard);
            }
        }
        let mut encoded = EncodedSegment {
            scheme,
            segment_len,
            fragment_len,
            data: segment,
            parity,
            ids: Vec::with_capacity(scheme.total()),
        };
        if scheme.is_replication() {
            let id = FragmentId::of(encoded.fragment(0));
            encoded.ids.resize(scheme.total(), id);
        } else {
            let ids = (0..scheme.total())
                .map(|i| FragmentId::of(encoded.fragment(i)))
                .collect();
            encoded.ids = ids;
        }
        Ok(encoded)
    }
}

/// Rebuilds a segment of `segment_len` bytes from any `k` of its fragments,
/// given as (index, bytes). The caller has verified each fragment's id.
pub fn reconstruct(
    scheme: Scheme,
    segment_len: usize,
    fragments: &[(usize, &[u8])],
) -> Result<Vec<u8>, ErasureError> {
    if segment_len == 0 {
        return Err(ErasureError::EmptySegment);
    }
    let fragment_len = scheme.fragment_len(segment_len);
    let mut present: Vec<Option<&[u8]>> = vec![None; scheme.total()];
    for &(index, bytes) in fragments {
        if index >= scheme.total() {
            return Err(ErasureError::BadIndex {
                index,
                total: scheme.total(),
            });
        }
        if bytes.len() != fragment_len {
            return Err(ErasureError::BadFragmentLength {
                index,
                len: bytes.len(),
                expected: fragment_len,
            });
        }
        present[index] = Some(bytes);
    }
    let have = present.iter().filter(|f| f.is_some()).count();
    if have < scheme.data() {
        return Err(ErasureError::NotEnoughFragments {
            have,
            need: scheme.data(),
        });
    }
    if scheme.is_replication() {
        let copy = present
            .iter()
            .flatten()
            .next()
            .expect("one fragment is present");
        return Ok(copy[..segment_len].to_vec());
    }
    let mut segment = Vec::with_capacity(fragment_len * scheme.data());
    if present[..scheme.data()].iter().all(Option::is_some) {
        for shard in present[..scheme.data()].iter().flatten() {
            segment.extend_from_slice(shard);
        }
    } else {
        let mut codec = ReedSolomonDecoder::new(scheme.data(), scheme.parity(), fragment_len)
            .map_err(|e| ErasureError::Codec(e.to_string()))?;
        for (index, shard) in present.iter().enumerate() {
            let Some(shard) = shard else { continue };
            let added = if index < scheme.data() {
                codec.add_original_shard(index, shard)
            } else {
                codec.add_recovery_shard(index - scheme.data(), shard)
            };
            added.map_err(|e| ErasureError::Codec(e.to_string()))?;
        }
        let result = codec
            .decode()
            .map_err(|e| ErasureError::Codec(e.to_string()))?;
        for (index, shard) in present[..scheme.data()].iter().enumerate() {
            match shard {
                Some(shard) => segment.extend_from_slice(shard),
                None => {
                    segment.extend_from_slice(result.restored_original(index).ok_or_else(|| {
                        ErasureError::Codec(format!("shard {index} was not restored"))
                    })?)
                }
            }
        }
    }
    segment.truncate(segment_len);
    Ok(segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Every subset of `k` fragments rebuilds the segment.
    fn check_all_subsets(k: u8, m: u8, len: usize) {
        let scheme = Scheme::new(k, m).unwrap();
        let segment = bytes(len, k ^ m);
        let encoded = SegmentEncoder::new(scheme).encode(segment.clone()).unwrap();
        let n = scheme.total();
        for mask in 0u32..(1 << n) {
            if mask.count_ones() as usize != scheme.data() {
                continue;
            }
            let chosen: Vec<(usize, &[u8])> = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| (i, encoded.fragment(i)))
                .collect();
            assert_eq!(
                reconstruct(scheme, len, &chosen).unwrap(),
                segment,
                "{scheme} mask {mask:b}"
            );
        }
    }

    #[test]
    fn any_k_fragments_rebuild_the_segment() {
        check_all_subsets(4, 2, 100_000);
        check_all_subsets(3, 3, 7);
        check_all_subsets(5, 4, 1);
        check_all_subsets(1, 2, 1000);
        check_all_subsets(2, 0, 33);
    }

    #[test]
    fn replication_fragments_are_identical_copies() {
        let scheme = Scheme::new(1, 2).unwrap();
        let encoded = SegmentEncoder::new(scheme).encode(bytes(5000, 1)).unwrap();
        assert_eq!(encoded.fragment_ids().len(), 3);
        assert!(
            encoded
                .fragment_ids()
                .iter()
                .all(|id| *id == FragmentId::of(&bytes(5000, 1)))
        );
    }

    #[test]
    fn fewer_than_k_fragments_or_wrong_lengths_are_refused() {
        let scheme = Scheme::new(4, 2).unwrap();
        let encoded = SegmentEncoder::new(scheme).encode(bytes(1000, 3)).unwrap();
        let three: Vec<(usize, &[u8])> = (0..3).map(|i| (i, encoded.fragment(i))).collect();
        assert_eq!(
            reconstruct(scheme, 1000, &three),
            Err(ErasureError::NotEnoughFragments { have: 3, need: 4 })
        );
        let short = &encoded.fragment(0)[1..];
        assert!(matches!(
            reconstruct(scheme, 1000, &[(0, short)]),
            Err(ErasureError::BadFragmentLength { .. })
        ));
        assert!(matches!(
            reconstruct(scheme, 1000, &[(6, encoded.fragment(0))]),
            Err(ErasureError::BadIndex { .. })
        ));
    }

    #[test]
    fn schemes_and_layouts_are_validated() {
        assert!(Scheme::new(0, 2).is_err());
        assert!(Scheme::new(33, 2).is_err());
        assert!(Scheme::new(4, 33).is_err());
        let scheme = Scheme::new(4, 2).unwrap();
        assert!(SegmentLayout::new(scheme, ChunkSize::DEFAULT, 0).is_err());
        assert!(SegmentLayout::new(scheme, ChunkSize::DEFAULT, 2000).is_err());
        assert!(SegmentLayout::new(scheme, ChunkSize::DEFAULT, 1).is_ok());
    }

    #[test]
    fn segment_lengths_cover_the_ciphertext_with_a_short_last_one() {
        let layout = SegmentLayout::new(
            Scheme::new(4, 2).unwrap(),
            ChunkSize::new(4096).unwrap(),
            16,
        )
        .unwrap();
        let plaintext_len = 16 * 4096 * 2 + 10;
        let lens: Vec<usize> = layout.segment_lens(plaintext_len).unwrap().collect();
        assert_eq!(lens, vec![16 * 4112, 16 * 4112, 10 + 16]);
        assert_eq!(
            layout.segment_lens(0).unwrap().collect::<Vec<_>>(),
            vec![16]
        );
    }
}
