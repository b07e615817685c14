//! Replicated metadata on a 3-site loopback cluster (3 sites × 2 nodes, 3
//! replicas per partition, every node in this one process):
//! `cargo bench -p cairn-tests --bench metadata`.
//!
//! - quorum writes and reads of single version rows, 1000 per sample, 64 in
//!   flight, coordinated by a node that is not a replica (every request
//!   crosses the network);
//! - the same one at a time (latency);
//! - convergence: a replica is stopped, 10 000 rows are written without it,
//!   it is restarted, and the time until its digest equals the others' by
//!   anti-entropy alone is measured.

use std::time::{Duration, Instant};

use cairn_node::meta::Metadata;
use cairn_protocol::erasure::Scheme;
use cairn_protocol::hlc::Timestamp;
use cairn_protocol::ids::{ManifestId, NodeId, VersionId};
use cairn_protocol::meta::{Partition, RowKey, RowValue, Table, version_sort_key};
use cairn_protocol::version::{Lww, ObjectVersion, Retention, VersionBody};
use cairn_tests::Cluster;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::stream::{self, StreamExt};

const BATCH: u64 = 1000;
const IN_FLIGHT: usize = 64;
const MISSED: u64 = 10_000;

fn row(bucket: &str, n: u64, at: Timestamp) -> (RowKey, RowValue) {
    let version = VersionId::new(1_700_000_000_000 + n, [0; 10]);
    let key = format!("objects/{n:08}");
    let entry = ObjectVersion {
        bucket: bucket.into(),
        key: key.clone(),
        version,
        created: at,
        seq: 1,
        null: true,
        body: VersionBody::Data {
            manifest: ManifestId([(n % 251) as u8; 32]),
            size_bytes: n,
            etag: format!("\"{n:032x}\""),
            headers: Default::default(),
        },
        retention: Retention::default(),
        legal_hold: Lww { value: false, at },
        purged: None,
    };
    (
        RowKey::new(
            Partition::bucket(bucket),
            Table::Versions,
            version_sort_key(&key, &version),
        ),
        RowValue::Version(Box::new(entry)),
    )
}

async fn write_all(meta: &Metadata, bucket: &str, from: u64, count: u64, in_flight: usize) {
    stream::iter(from..from + count)
        .map(|n| {
            let meta = meta.clone();
            async move {
                meta.write(vec![row(bucket, n, meta.timestamp())])
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<()>>()
        .await;
}

fn outside(cluster: &Cluster, replicas: &[NodeId]) -> usize {
    (0..cluster.members.len())
        .find(|i| !replicas.contains(&cluster.node_ids()[*i]))
        .expect("a node that is not a replica")
}

fn metadata(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cluster = runtime.block_on(Cluster::start(&[2, 2, 2])).unwrap();
    runtime
        .block_on(cluster.install_map(cluster.map(), Scheme::new(4, 2).unwrap()))
        .unwrap();
    let bucket = "bench";
    let replicas = cluster
        .node(0)
        .metadata()
        .replicas_of(&Partition::bucket(bucket))
        .unwrap();
    let coordinator = cluster
        .node(outside(&cluster, &replicas))
        .metadata()
        .clone();

    let mut group = c.benchmark_group("metadata_quorum");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    let mut next = 0u64;
    group.bench_function("write_1000_rows_64_in_flight", |b| {
        b.iter(|| {
            runtime.block_on(write_all(&coordinator, bucket, next, BATCH, IN_FLIGHT));
            next += BATCH;
        })
    });
    group.bench_function("read_1000_rows_64_in_flight", |b| {
        b.iter(|| {
            runtime.block_on(
                stream::iter(0..BATCH)
                    .map(|n| {
                        let meta = coordinator.clone();
                        async move {
                            let (key, _) = row(bucket, n % next.max(1), meta.timestamp());
                            assert!(meta.read(vec![key]).await.unwrap()[0].is_some());
                        }
                    })
                    .buffer_unordered(IN_FLIGHT)
                    .collect::<Vec<()>>(),
            )
        })
    });
    group.throughput(Throughput::Elements(100));
    group.bench_function("write_100_rows_one_at_a_time", |b| {
        b.iter(|| {
            runtime.block_on(write_all(&coordinator, bucket, next, 100, 1));
            next += 100;
        })
    });
    group.finish();

    let mut group = c.benchmark_group("metadata_convergence");
    group.sample_size(10);
    group.bench_function("replica_missed_10000_writes", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for round in 0..iterations {
                let fresh = format!("converge-{round}-{next}");
                let partition = Partition::bucket(&fresh);
                let replicas = cluster.node(0).metadata().replicas_of(&partition).unwrap();
                let victim = cluster.index_of(&replicas[0]);
                let writer = outside(&cluster, &replicas);
                runtime.block_on(cluster.stop(victim));
                let meta = cluster.node(writer).metadata().clone();
                runtime.block_on(write_all(&meta, &fresh, 0, MISSED, IN_FLIGHT));
                runtime.block_on(cluster.restart(victim)).unwrap();
                let healthy = cluster
                    .node(cluster.index_of(&replicas[1]))
                    .metadata()
                    .clone();
                let back = cluster.node(victim).metadata().clone();
                let root = |meta: &Metadata| meta.replica().digest(&partition).unwrap().root();
                let target = root(&healthy);
                let start = Instant::now();
                while root(&back) != target {
                    runtime.block_on(back.anti_entropy_round()).unwrap();
                }
                total += start.elapsed();
                next += 1;
            }
            total
        })
    });
    group.finish();
    runtime.block_on(cluster.shutdown());
}

criterion_group!(benches, metadata);
criterion_main!(benches);
