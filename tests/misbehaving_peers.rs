//! Storage nodes that misbehave under a GET, all real `cairn serve`
//! processes on 127.0.0.1: one frozen with SIGSTOP (its connections stay
//! open, its streams are never answered) and one whose fragments are
//! corrupted on disk. The gateway reads each object from the other
//! fragments, in a bounded time.

#[path = "process_support.rs"]
mod process_support;

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::StalledStreamProtectionConfig;
use aws_sdk_s3::primitives::ByteStream;
use process_support::*;

/// Segments hold 4 MiB of plaintext; with 2+1 on three single-node sites
/// every node holds one fragment of each segment, a data fragment (one the
/// gateway asks first) in two segments of three. Six segments make a run
/// where the misbehaving node is never asked first a one in 729 chance.
const SEGMENTS: usize = 6;
/// Six segments, the last one short.
const OBJECT_BYTES: usize = SEGMENTS * (4 << 20) - 12_345;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Where each fragment's bytes lie in a storage node's volume files: each
/// record is `CRNF`, a format byte, the 32-byte id, a u64 length, then the
/// bytes.
fn stored_fragments(data_dir: &Path) -> Vec<(PathBuf, Range<u64>)> {
    const HEADER: usize = 4 + 1 + 32 + 8;
    let mut fragments = Vec::new();
    for entry in std::fs::read_dir(data_dir.join("fragments/volumes")).unwrap() {
        let path = entry.unwrap().path();
        let volume = std::fs::read(&path).unwrap();
        let mut at = 0;
        while at < volume.len() {
            assert_eq!(&volume[at..at + 4], b"CRNF", "{} at {at}", path.display());
            let len = u64::from_be_bytes(volume[at + 37..at + HEADER].try_into().unwrap());
            let start = (at + HEADER) as u64;
            fragments.push((path.clone(), start..start + len));
            at += HEADER + len as usize;
        }
    }
    fragments
}

async fn put(client: &aws_sdk_s3::Client, bucket: &str, body: &[u8]) {
    client.create_bucket().bucket(bucket).send().await.unwrap();
    client
        .put_object()
        .bucket(bucket)
        .key("object")
        .body(ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap();
}

async fn get(client: &aws_sdk_s3::Client, bucket: &str) -> Vec<u8> {
    let object = client
        .get_object()
        .bucket(bucket)
        .key("object")
        .send()
        .await
        .unwrap();
    object.body.collect().await.unwrap().into_bytes().to_vec()
}

/// A frozen node keeps its QUIC connections until the transport's idle
/// timeout (10 s) but answers no stream. The gateway asks another node
/// after 1.5 s rather than wait for it (and asks it last for the rest of
/// the read), so no pause in the body comes near the 8 s after which this
/// client gives up; a gateway that waited for the frozen node, or for the
/// transport to drop it (10 s), fails there. The whole GET is bounded too.
#[test]
fn a_get_with_a_frozen_storage_node_gets_its_bytes_from_the_other_fragments_in_bounded_time() {
    let cluster = ProcessCluster::start(&[1, 1, 1], 2, 1);
    let client = s3_client(&cluster.endpoint, &cluster.access_key, &cluster.secret_key);
    let stalled_stream = StalledStreamProtectionConfig::enabled()
        .grace_period(Duration::from_secs(8))
        .build();
    let client = aws_sdk_s3::Client::from_conf(
        client
            .config()
            .to_builder()
            .stalled_stream_protection(stalled_stream)
            .build(),
    );
    let runtime = runtime();
    let body = pseudo_random(12, OBJECT_BYTES);
    runtime.block_on(put(&client, "frozen", &body));
    assert_eq!(stored_fragments(&cluster.data_dirs[1]).len(), SEGMENTS);

    let frozen = Frozen::stop(&cluster.nodes[1]);
    let started = Instant::now();
    let back = runtime.block_on(get(&client, "frozen"));
    let elapsed = started.elapsed();
    assert!(back == body, "the object read back differs");
    assert!(
        elapsed < Duration::from_secs(60),
        "the GET took {elapsed:?}"
    );
    drop(frozen);
    cluster.shutdown();
}

/// One byte flipped in the middle of every fragment a node stores, headers
/// and index left as they were: the store reads the volume at each request,
/// so the running node sees it. The node hashes what it reads and refuses
/// a fragment that does not match its id (and quarantines it), so this peer
/// is broken rather than lying; the gateway asks the next one either way.
#[test]
fn a_get_skips_a_storage_node_whose_fragments_are_corrupt_on_disk() {
    let cluster = ProcessCluster::start(&[1, 1, 1], 2, 1);
    let client = s3_client(&cluster.endpoint, &cluster.access_key, &cluster.secret_key);
    let runtime = runtime();
    let body = pseudo_random(13, OBJECT_BYTES);
    runtime.block_on(put(&client, "corrupt", &body));
    let fragments = stored_fragments(&cluster.data_dirs[1]);
    assert_eq!(fragments.len(), SEGMENTS);
    for (volume, bytes) in fragments {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(volume)
            .unwrap();
        let middle = (bytes.start + bytes.end) / 2;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, middle).unwrap();
        file.write_all_at(&[!byte[0]], middle).unwrap();
    }

    let back = runtime.block_on(get(&client, "corrupt"));
    assert!(back == body, "the object read back differs");
    cluster.shutdown();
}
