//! Throughput of the PUT pipeline and of each primitive alone, on the same
//! machine in the same run: `cargo bench -p cairn-protocol`.

use std::hint::black_box;
use std::sync::mpsc::sync_channel;

use cairn_protocol::encryption::{ChunkCipher, SecretKey};
use cairn_protocol::erasure::{Scheme, SegmentEncoder, SegmentLayout, reconstruct};
use cairn_protocol::ids::FragmentId;
use cairn_protocol::pipeline::{PutPipeline, SegmentSealer};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const SEGMENT: usize = 4 << 20;
const OBJECT: usize = 64 << 20;

fn data(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn primitives(c: &mut Criterion) {
    let segment = data(SEGMENT);
    let mut group = c.benchmark_group("primitive");
    group.throughput(Throughput::Bytes(SEGMENT as u64));
    group.sample_size(20);

    let cipher = ChunkCipher::new(&SecretKey::from_bytes([1; 32]), 0);
    let mut buffer = segment.clone();
    group.bench_function("aes256gcm_seal_64KiB_chunks", |b| {
        b.iter(|| {
            for (i, chunk) in buffer.chunks_mut(64 << 10).enumerate() {
                black_box(cipher.seal(i as u64, false, chunk).unwrap());
            }
        })
    });
    group.bench_function("blake3_4MiB", |b| {
        b.iter(|| black_box(FragmentId::of(&segment)))
    });
    for (k, m) in [(4u8, 2u8), (8, 4)] {
        let scheme = Scheme::new(k, m).unwrap();
        let shard = scheme.fragment_len(SEGMENT);
        let mut codec =
            reed_solomon_simd::ReedSolomonEncoder::new(usize::from(k), usize::from(m), shard)
                .unwrap();
        group.bench_function(BenchmarkId::new("rs_encode_only", scheme), |b| {
            b.iter(|| {
                for original in segment.chunks_exact(shard) {
                    codec.add_original_shard(original).unwrap();
                }
                black_box(codec.encode().unwrap().recovery(0).map(<[u8]>::len))
            })
        });
        let mut encoder = SegmentEncoder::new(scheme);
        let mut input = Some(segment.clone());
        group.bench_function(BenchmarkId::new("rs_encode_and_hash", scheme), |b| {
            b.iter(|| {
                let mut buffer = input.take().unwrap();
                buffer.clear();
                buffer.extend_from_slice(&segment);
                let encoded = encoder.encode(buffer).unwrap();
                let len = encoded.fragment_len();
                input = Some(encoder.recycle(encoded));
                black_box(len)
            })
        });
        let encoded = SegmentEncoder::new(scheme).encode(segment.clone()).unwrap();
        // Lose the first m data fragments: the worst case, all parity used.
        let survivors: Vec<(usize, &[u8])> = (usize::from(m)..scheme.total())
            .map(|i| (i, encoded.fragment(i)))
            .collect();
        group.bench_function(BenchmarkId::new("rs_reconstruct_m_lost", scheme), |b| {
            b.iter(|| black_box(reconstruct(scheme, SEGMENT, &survivors).unwrap().len()))
        });
    }
    group.bench_function("memcpy_4MiB", |b| {
        let mut target = vec![0u8; SEGMENT];
        b.iter(|| {
            target.copy_from_slice(&segment);
            black_box(&target);
        })
    });
    group.finish();
}

fn pipeline(c: &mut Criterion) {
    let object = data(OBJECT);
    let key = SecretKey::from_bytes([2; 32]);
    let mut group = c.benchmark_group("put_pipeline_64MiB");
    group.throughput(Throughput::Bytes(OBJECT as u64));
    group.sample_size(10);
    for (k, m) in [(4u8, 2u8), (8, 4)] {
        let layout = SegmentLayout::with_defaults(Scheme::new(k, m).unwrap());
        group.bench_function(BenchmarkId::new("one_thread", layout.scheme), |b| {
            b.iter(|| {
                let mut pipeline = PutPipeline::new(&key, 0, layout);
                let mut segments = Vec::new();
                let mut ids = 0usize;
                for piece in object.chunks(1 << 20) {
                    pipeline.push(piece, &mut segments).unwrap();
                    for segment in segments.drain(..) {
                        ids += segment.fragment_ids().len();
                        pipeline.recycle(segment);
                    }
                }
                ids += pipeline.finish().unwrap().fragment_ids().len();
                black_box(ids)
            })
        });
        group.bench_function(BenchmarkId::new("two_stages", layout.scheme), |b| {
            b.iter(|| {
                // Seal on this thread, encode and hash on another; two
                // segments in flight bound the memory.
                let (to_encoder, sealed) = sync_channel::<Vec<u8>>(2);
                let (to_sealer, buffers) = sync_channel::<Vec<u8>>(4);
                let encoder = std::thread::spawn(move || {
                    let mut encoder = SegmentEncoder::new(layout.scheme);
                    let mut ids = 0usize;
                    for segment in sealed {
                        let encoded = encoder.encode(segment).unwrap();
                        ids += encoded.fragment_ids().len();
                        let _ = to_sealer.try_send(encoder.recycle(encoded));
                    }
                    ids
                });
                let mut sealer = SegmentSealer::new(&key, 0, layout);
                let mut out = Vec::new();
                for piece in object.chunks(1 << 20) {
                    while let Ok(buffer) = buffers.try_recv() {
                        sealer.recycle(buffer);
                    }
                    sealer.push(piece, &mut out).unwrap();
                    for segment in out.drain(..) {
                        to_encoder.send(segment).unwrap();
                    }
                }
                to_encoder.send(sealer.finish().unwrap()).unwrap();
                drop(to_encoder);
                black_box(encoder.join().unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, primitives, pipeline);
criterion_main!(benches);
