//! End-to-end S3 load against `cairn dev` (3 sites x 2 nodes, 4+2, one
//! process) through aws-sdk-s3: PUT and GET throughput for 1 MiB and
//! 64 MiB objects, operations per second for 4 KiB objects, a 2 GiB object
//! each way, and the cluster process's peak resident memory.
//!
//! `cargo bench --bench s3load` runs the full load; under `cargo test` it
//! runs a few objects of each size only, as a check that it still works.

#[path = "../tests/process_support.rs"]
mod process_support;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use process_support::{pseudo_random, rss_mib, s3_client, start_dev};
use tokio::task::JoinSet;

struct Figures {
    seconds: f64,
    bytes: u64,
    count: usize,
}

impl Figures {
    fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.seconds
    }

    fn ops_per_s(&self) -> f64 {
        self.count as f64 / self.seconds
    }
}

async fn put_all(
    client: &Client,
    prefix: &str,
    body: Arc<Vec<u8>>,
    count: usize,
    concurrency: usize,
) -> Figures {
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let mut next = 0;
    while next < count || !tasks.is_empty() {
        while next < count && tasks.len() < concurrency {
            let (client, body, key) = (client.clone(), body.clone(), format!("{prefix}/{next}"));
            tasks.spawn(async move {
                client
                    .put_object()
                    .bucket("load")
                    .key(key)
                    .body(ByteStream::from(body.as_ref().clone()))
                    .send()
                    .await
                    .unwrap();
            });
            next += 1;
        }
        tasks.join_next().await.unwrap().unwrap();
    }
    Figures {
        seconds: started.elapsed().as_secs_f64(),
        bytes: body.len() as u64 * count as u64,
        count,
    }
}

async fn get_all(
    client: &Client,
    prefix: &str,
    len: usize,
    count: usize,
    concurrency: usize,
) -> Figures {
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let mut next = 0;
    while next < count || !tasks.is_empty() {
        while next < count && tasks.len() < concurrency {
            let (client, key) = (client.clone(), format!("{prefix}/{next}"));
            tasks.spawn(async move {
                let object = client
                    .get_object()
                    .bucket("load")
                    .key(key)
                    .send()
                    .await
                    .unwrap();
                let mut body = object.body;
                let mut read = 0;
                while let Some(chunk) = body.try_next().await.unwrap() {
                    read += chunk.len();
                }
                assert_eq!(read, len);
            });
            next += 1;
        }
        tasks.join_next().await.unwrap().unwrap();
    }
    Figures {
        seconds: started.elapsed().as_secs_f64(),
        bytes: len as u64 * count as u64,
        count,
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().unwrap();
    let (mut child, endpoint, key, secret) = start_dev(&dir.path().join("dev"), free_tcp_port());
    let pid = child.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = s3_client(&endpoint, &key, &secret);
    let scale = |n: usize| if full { n } else { 2 };
    runtime.block_on(async {
        client.create_bucket().bucket("load").send().await.unwrap();
        println!("S3 load against cairn dev (3 sites x 2 nodes, 4+2), client in the same machine");
        println!("| workload | PUT | GET |");
        println!("| --- | --- | --- |");
        for (label, size, count, concurrency) in [
            ("4 KiB objects, 16 in flight", 4 << 10, scale(2000), 16),
            ("1 MiB objects, 8 in flight", 1 << 20, scale(300), 8),
            ("64 MiB objects, 2 in flight", 64 << 20, scale(12), 2),
        ] {
            let body = Arc::new(pseudo_random(size as u64, size));
            let prefix = format!("s{size}");
            let put = put_all(&client, &prefix, body, count, concurrency).await;
            let get = get_all(&client, &prefix, size, count, concurrency).await;
            if size < (1 << 20) {
                println!(
                    "| {label} | {:.0} ops/s | {:.0} ops/s |",
                    put.ops_per_s(),
                    get.ops_per_s()
                );
            } else {
                println!(
                    "| {label} | {:.1} MiB/s | {:.1} MiB/s |",
                    put.mib_per_s(),
                    get.mib_per_s()
                );
            }
        }
        println!("peak RSS of the cluster process so far: {:.0} MiB", rss_mib(pid).1);
        if full {
            // 2 GiB each way, streamed from and to the client's disk.
            let size: u64 = 2 << 30;
            let file = dir.path().join("big.bin");
            {
                use std::io::Write;
                let mut out = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
                let block = pseudo_random(7, 1 << 20);
                for _ in 0..(size >> 20) {
                    out.write_all(&block).unwrap();
                }
            }
            let before = rss_mib(pid).1;
            let started = Instant::now();
            client
                .put_object()
                .bucket("load")
                .key("two-gib")
                .body(ByteStream::from_path(&file).await.unwrap())
                .send()
                .await
                .unwrap();
            let put = started.elapsed().as_secs_f64();
            let started = Instant::now();
            let object = client.get_object().bucket("load").key("two-gib").send().await.unwrap();
            let mut body = object.body;
            let mut read = 0u64;
            while let Some(chunk) = body.try_next().await.unwrap() {
                read += chunk.len() as u64;
            }
            assert_eq!(read, size);
            let get = started.elapsed().as_secs_f64();
            println!(
                "| 2 GiB object, alone | {:.1} MiB/s | {:.1} MiB/s |",
                2048.0 / put,
                2048.0 / get
            );
            println!(
                "peak RSS of the cluster process: {before:.0} MiB before the 2 GiB object, {:.0} MiB after",
                rss_mib(pid).1
            );
        }
    });
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    let _ = child.wait();
}
