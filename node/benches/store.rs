//! Durable fragment ingest against the disk's own limit, in the same run:
//! `cargo bench -p cairn-node --bench store`.
//!
//! Store: 64 fragments of 1 MiB put by 8 concurrent writers, each put
//! acknowledged only once fsynced and indexed. Baselines: the same 64 MiB
//! written to one file and made durable with one fdatasync, into fresh
//! disk space and into recycled space.

use std::io::Write;
use std::time::{Duration, Instant};

use cairn_node::store::{FragmentStore, StoreConfig, VerifiedFragment};
use cairn_protocol::ed25519_dalek::SigningKey;
use cairn_protocol::ids::{FragmentId, UploadId};
use cairn_protocol::wire::Hold;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const FRAGMENT: usize = 1 << 20;
const FRAGMENTS: usize = 64;
const WRITERS: usize = 8;

fn unique_fragments(round: u64) -> Vec<Vec<u8>> {
    (0..FRAGMENTS as u64)
        .map(|i| {
            let mut state = (round << 20 | i).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..FRAGMENT)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        })
        .collect()
}

fn ingest(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = StoreConfig::new(dir.path().join("store"), 1 << 40);
    config.volume_bytes = 4 << 30;
    let store = {
        let _guard = runtime.enter();
        FragmentStore::open(config).unwrap()
    };
    let key = SigningKey::from_bytes(&[5; 32]);
    let mut round = 0u64;

    let mut group = c.benchmark_group("durable_ingest_64MiB");
    group.throughput(Throughput::Bytes((FRAGMENT * FRAGMENTS) as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));

    group.bench_function("store_1MiB_fragments_8_writers", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                round += 1;
                // Preparing unique fragments (and their holds) is not timed.
                let prepared: Vec<(VerifiedFragment, Hold)> = unique_fragments(round)
                    .into_iter()
                    .map(|bytes| {
                        let id = FragmentId::of(&bytes);
                        let hold = Hold::sign(
                            &key,
                            &id,
                            UploadId([1; 16]),
                            cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
                            0,
                        );
                        (VerifiedFragment::new(id, bytes).unwrap(), hold)
                    })
                    .collect();
                let start = Instant::now();
                runtime.block_on(async {
                    let mut queues: Vec<Vec<(VerifiedFragment, Hold)>> =
                        (0..WRITERS).map(|_| Vec::new()).collect();
                    for (i, item) in prepared.into_iter().enumerate() {
                        queues[i % WRITERS].push(item);
                    }
                    let writers: Vec<_> = queues
                        .into_iter()
                        .map(|queue| {
                            let store = store.clone();
                            tokio::spawn(async move {
                                for (fragment, hold) in queue {
                                    store.put(fragment, hold, 0).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for writer in writers {
                        writer.await.unwrap();
                    }
                });
                total += start.elapsed();
            }
            total
        })
    });

    // Two baselines, because this machine's virtual disk writes never-used
    // space at a fraction of the speed of recently freed blocks: a store
    // that grows meets the first; create-write-delete loops see the second.
    let payload = unique_fragments(0).concat();
    let growing_path = dir.path().join("growing");
    group.bench_function("one_file_one_fdatasync_fresh_space", |b| {
        b.iter_custom(|iterations| {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&growing_path)
                .unwrap();
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let start = Instant::now();
                file.write_all(&payload).unwrap();
                file.sync_data().unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    group.bench_function("one_file_one_fdatasync_recycled_space", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for i in 0..iterations {
                let path = dir.path().join(format!("sequential-{i}"));
                let start = Instant::now();
                let mut file = std::fs::File::create(&path).unwrap();
                file.write_all(&payload).unwrap();
                file.sync_data().unwrap();
                total += start.elapsed();
                std::fs::remove_file(&path).unwrap();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
