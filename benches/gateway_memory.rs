//! The memory of one S3 gateway process while a 2 GiB object goes in and
//! out: six storage nodes (3 sites x 2, 4+2) and the gateway each run as
//! their own `cairn serve` process; the gateway holds no data, so its
//! resident memory is the data path's.
//!
//! `cargo bench --bench gateway_memory`; under `cargo test`, 64 MiB.

#[path = "../tests/process_support.rs"]
mod process_support;

use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use process_support::{ProcessCluster, pseudo_random, rss_mib, s3_client};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let size: u64 = if full { 2 << 30 } else { 64 << 20 };
    let cluster = ProcessCluster::start(&[2, 2, 2], 4, 2);
    let pid = cluster.gateway.child.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = s3_client(&cluster.endpoint, &cluster.access_key, &cluster.secret_key);
    let file = cluster.dir.path().join("object.bin");
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        let block = pseudo_random(7, 1 << 20);
        for _ in 0..(size >> 20) {
            out.write_all(&block).unwrap();
        }
    }
    let mib = size as f64 / f64::from(1 << 20);
    let (idle, _) = rss_mib(pid);
    runtime.block_on(async {
        client.create_bucket().bucket("memory").send().await.unwrap();
        let started = Instant::now();
        client
            .put_object()
            .bucket("memory")
            .key("big")
            .body(ByteStream::from_path(&file).await.unwrap())
            .send()
            .await
            .unwrap();
        let put = started.elapsed().as_secs_f64();
        let (_, after_put) = rss_mib(pid);
        let started = Instant::now();
        let object = client.get_object().bucket("memory").key("big").send().await.unwrap();
        let mut body = object.body;
        let mut read = 0u64;
        while let Some(chunk) = body.try_next().await.unwrap() {
            read += chunk.len() as u64;
        }
        assert_eq!(read, size);
        let get = started.elapsed().as_secs_f64();
        let (_, peak) = rss_mib(pid);
        println!(
            "gateway process, {mib:.0} MiB object: PUT {:.1} MiB/s, GET {:.1} MiB/s; RSS {idle:.0} MiB idle, peak {after_put:.0} MiB after the PUT, {peak:.0} MiB after the GET",
            mib / put,
            mib / get
        );
    });
    cluster.shutdown();
}
