//! Piece exchange between two nodes on loopback, beside raw quinn on the
//! same machine in the same run: `cargo bench -p cairn-tests --bench pieces`.
//!
//! Cairn: 64 fragments of 1 MiB, 8 in flight, put from node 0 to node 1
//! (TLS 1.3 over QUIC, BLAKE3-verified, fsynced and indexed before the ack),
//! then got back (verified on both ends). Quinn: the same 64 MiB as 64
//! streams of 1 MiB, 8 at a time, between two bare endpoints, each stream
//! answered with one byte once fully read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_protocol::ids::{FragmentId, UploadId};
use cairn_protocol::wire::{self, Hold};
use cairn_tests::{Cluster, pseudo_random_bytes};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::stream::{self, StreamExt};

const FRAGMENT: usize = 1 << 20;
const FRAGMENTS: usize = 64;
const IN_FLIGHT: usize = 8;

fn fragments(round: u64) -> Vec<Vec<u8>> {
    (0..FRAGMENTS as u64)
        .map(|i| pseudo_random_bytes(round << 20 | i, FRAGMENT))
        .collect()
}

fn pieces(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cluster = runtime.block_on(Cluster::start(&[1, 1])).unwrap();
    let mut group = c.benchmark_group("piece_exchange_64MiB");
    group.throughput(Throughput::Bytes((FRAGMENT * FRAGMENTS) as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));

    let mut round = 0u64;
    let mut stored: Vec<FragmentId> = Vec::new();
    group.bench_function("cairn_put_1MiB_8_in_flight", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                round += 1;
                let data = fragments(round);
                let (writer, target) = (cluster.node(0), cluster.node(1).node_id());
                let key = writer.identity().signing_key().clone();
                let start = Instant::now();
                let ids: Vec<FragmentId> = runtime.block_on(
                    stream::iter(data.iter())
                        .map(|bytes| {
                            let id = FragmentId::of(bytes);
                            let hold = Hold::sign(
                                &key,
                                &id,
                                UploadId([1; 16]),
                                cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
                                0,
                            );
                            async move {
                                writer.put_fragment(&target, id, bytes, hold).await.unwrap();
                                id
                            }
                        })
                        .buffer_unordered(IN_FLIGHT)
                        .collect(),
                );
                total += start.elapsed();
                stored = ids;
            }
            total
        })
    });
    group.bench_function("cairn_get_1MiB_8_in_flight", |b| {
        b.iter_custom(|iterations| {
            let (reader, holder) = (cluster.node(0), cluster.node(1).node_id());
            let start = Instant::now();
            for _ in 0..iterations {
                runtime.block_on(
                    stream::iter(stored.iter())
                        .map(|id| async move {
                            reader
                                .get_fragment(&holder, *id, 0, wire::WHOLE)
                                .await
                                .unwrap()
                                .len()
                        })
                        .buffer_unordered(IN_FLIGHT)
                        .collect::<Vec<_>>(),
                );
            }
            start.elapsed()
        })
    });

    let (client, server_addr) = runtime.block_on(quinn_pair());
    let payload = Arc::new(fragments(0).concat());
    group.bench_function("raw_quinn_1MiB_streams_8_in_flight", |b| {
        b.iter_custom(|iterations| {
            let start = Instant::now();
            for _ in 0..iterations {
                runtime.block_on(async {
                    let connection = client
                        .connect(server_addr, "localhost")
                        .unwrap()
                        .await
                        .unwrap();
                    stream::iter(0..FRAGMENTS)
                        .map(|i| {
                            let (connection, payload) = (connection.clone(), payload.clone());
                            async move {
                                let (mut send, mut recv) = connection.open_bi().await.unwrap();
                                send.write_all(&payload[i * FRAGMENT..(i + 1) * FRAGMENT])
                                    .await
                                    .unwrap();
                                send.finish().unwrap();
                                let mut ack = [0u8; 1];
                                recv.read_exact(&mut ack).await.unwrap();
                            }
                        })
                        .buffer_unordered(IN_FLIGHT)
                        .collect::<Vec<_>>()
                        .await;
                    connection.close(0u32.into(), b"done");
                });
            }
            start.elapsed()
        })
    });
    group.finish();
    runtime.block_on(cluster.shutdown());
}

/// A quinn server on 127.0.0.1 that reads each stream to its end and
/// answers one byte, and a client that trusts its self-signed certificate.
async fn quinn_pair() -> (quinn::Endpoint, std::net::SocketAddr) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    let server_config = quinn::ServerConfig::with_single_cert(vec![cert.clone()], key).unwrap();
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let server_addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let connection = incoming.await.unwrap();
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    tokio::spawn(async move {
                        let mut buffer = vec![0u8; 256 << 10];
                        while let Ok(Some(_)) = recv.read(&mut buffer).await {}
                        let _ = send.write_all(&[1]).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client_config = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config);
    (client, server_addr)
}

criterion_group!(benches, pieces);
criterion_main!(benches);
