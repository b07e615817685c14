//! The recoverable trash end to end, through `cairn serve` processes, the
//! S3 SDK and `cairn admin trash`: a deleted object comes back exactly
//! (bytes, ETag, headers, Last-Modified), its fragments out of every
//! node's trash; once the trash period is over it is gone for good and
//! compaction gives its space back.

#[path = "process_support.rs"]
mod process_support;

use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use process_support::*;

/// Small volumes, so that an object's fragments fill volumes of their own
/// that compaction can drop; the trash purge and compaction every second.
const NODE_TOML: &str = "[store]\nvolume_bytes = 1048576\nhousekeeping_every_seconds = 1\ntrash_period_seconds = 3600\n";
/// Orphans collected a few seconds after they became garbage.
const EVERYONE_TOML: &str =
    "[collection]\nwrite_deadline_seconds = 3\nclock_margin_seconds = 1\nevery_seconds = 1\n";
/// How long the cluster's own timers (collection, purge) may take here.
const PATIENCE: Duration = Duration::from_secs(90);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn admin(cluster: &ProcessCluster, args: &[&str]) -> std::process::Output {
    let mut all: Vec<&str> = vec!["admin", "trash"];
    all.extend_from_slice(args);
    all.extend(cluster.admin_args.iter().map(String::as_str));
    std::process::Command::new(CAIRN)
        .args(&all)
        .output()
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The version id `cairn admin trash list` shows for `bucket/key`.
fn trashed_version(list: &str, bucket: &str, key: &str) -> Option<String> {
    let prefix = format!("{bucket}/{key} version ");
    list.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|rest| rest.split(':').next().unwrap().to_owned())
}

fn volume_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("fragments/volumes"))
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum()
}

async fn get(
    client: &aws_sdk_s3::Client,
    key: &str,
) -> aws_sdk_s3::operation::get_object::GetObjectOutput {
    client
        .get_object()
        .bucket("keep")
        .key(key)
        .send()
        .await
        .unwrap()
}

async fn put(client: &aws_sdk_s3::Client, key: &str, body: Vec<u8>) {
    client
        .put_object()
        .bucket("keep")
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .unwrap();
}

#[test]
fn a_deleted_object_comes_back_from_the_trash_exactly_and_after_the_period_is_gone_and_its_space_reclaimed()
 {
    let mut cluster =
        ProcessCluster::start_configured(&[1, 1, 1], 2, 1, false, NODE_TOML, EVERYONE_TOML);
    let client = s3_client(&cluster.endpoint, &cluster.access_key, &cluster.secret_key);
    let runtime = runtime();
    let body = pseudo_random(61, 300_000);
    let before = runtime.block_on(async {
        client.create_bucket().bucket("keep").send().await.unwrap();
        client
            .put_object()
            .bucket("keep")
            .key("a")
            .content_type("image/png")
            .metadata("colour", "tabby")
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap();
        // Large enough to be erasure-coded (smaller objects are stored as
        // copies): each node holds a fragment of its own.
        put(&client, "b", pseudo_random(63, 300_000)).await;
        put(&client, "b", pseudo_random(64, 300_000)).await;
        let before = get(&client, "a").await;
        client
            .delete_object()
            .bucket("keep")
            .key("a")
            .send()
            .await
            .unwrap();
        before
    });
    // Each node moves its fragment of a, and of b's first version, to its
    // trash once the collector's grace is over.
    for node in &cluster.nodes {
        for _ in 0..2 {
            node.wait_for_within(&["released an upload's fragments to the trash"], PATIENCE);
        }
    }
    let list = stdout(&admin(&cluster, &["list"]));
    let version = trashed_version(&list, "keep", "a").unwrap_or_else(|| panic!("{list}"));
    assert!(trashed_version(&list, "keep", "b").is_some(), "{list}");

    let restored = admin(
        &cluster,
        &[
            "restore",
            "--bucket",
            "keep",
            "--key",
            "a",
            "--version",
            &version,
        ],
    );
    let said = stdout(&restored);
    assert!(
        restored.status.success() && said.contains("3 fragments back from the trash"),
        "{said}{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert!(said.contains("whole 1, degraded 0"), "{said}");
    runtime.block_on(async {
        let after = get(&client, "a").await;
        assert_eq!(after.e_tag(), before.e_tag());
        assert_eq!(after.content_type(), Some("image/png"));
        assert_eq!(after.metadata(), before.metadata());
        assert_eq!(after.last_modified(), before.last_modified());
        let bytes = after.body.collect().await.unwrap().into_bytes();
        assert!(bytes == body, "the restored object differs");
    });
    // Every node took its fragment back: any two of the three read it.
    cluster.kill_node(0);
    runtime.block_on(async {
        let bytes = get(&client, "a").await.body.collect().await.unwrap();
        assert!(bytes.into_bytes() == body, "read without node 0");
    });
    cluster.restart_node(0);

    // Past the trash period: c's version and fragments are purged, and the
    // volume that held its fragment on each node is compacted away.
    let big = pseudo_random(62, 3 << 20);
    runtime.block_on(async {
        put(&client, "c", big).await;
        // Small: stored as two copies, so on one node c's volume stays the
        // active one (compaction seals it first).
        put(&client, "d", b"after c".to_vec()).await;
        client
            .delete_object()
            .bucket("keep")
            .key("c")
            .send()
            .await
            .unwrap();
    });
    for node in &cluster.nodes {
        node.wait_for_within(&["released an upload's fragments to the trash"], PATIENCE);
    }
    let list = stdout(&admin(&cluster, &["list"]));
    let version = trashed_version(&list, "keep", "c").unwrap_or_else(|| panic!("{list}"));
    let used: Vec<u64> = cluster.data_dirs.iter().map(|d| volume_bytes(d)).collect();
    for (index, config) in cluster.node_configs.clone().iter().enumerate() {
        cluster.kill_node(index);
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(
            config,
            text.replace("trash_period_seconds = 3600", "trash_period_seconds = 1"),
        )
        .unwrap();
        cluster.restart_node(index);
    }
    for (index, dir) in cluster.data_dirs.iter().enumerate() {
        let deadline = Instant::now() + PATIENCE;
        // c's fragment (1.5 MiB) is gone from the volumes.
        while volume_bytes(dir) + (1 << 20) > used[index] {
            assert!(
                Instant::now() < deadline,
                "node {index}: {} of {} bytes still in volumes",
                volume_bytes(dir),
                used[index]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let list = stdout(&admin(&cluster, &["list"]));
    assert!(trashed_version(&list, "keep", "c").is_none(), "{list}");
    let refused = admin(
        &cluster,
        &[
            "restore",
            "--bucket",
            "keep",
            "--key",
            "c",
            "--version",
            &version,
        ],
    );
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        // Its row may be compacted away by then, or not yet.
        !refused.status.success() && why.contains("trash period"),
        "{why}"
    );
    // What stayed is whole.
    runtime.block_on(async {
        let bytes = get(&client, "a").await.body.collect().await.unwrap();
        assert!(bytes.into_bytes() == body);
        let d = get(&client, "d").await.body.collect().await.unwrap();
        assert_eq!(&d.into_bytes()[..], b"after c");
        let b = get(&client, "b").await.body.collect().await.unwrap();
        assert!(b.into_bytes() == pseudo_random(64, 300_000));
    });
    cluster.shutdown();
}

/// kill -9 of a storage node in the middle of compacting a volume: after
/// a restart the compaction finishes, the volume is gone, and every object
/// reads back with another node down (so the restarted node's fragments
/// are needed).
#[test]
fn a_node_killed_in_the_middle_of_a_compaction_loses_nothing() {
    const SLOW_COMPACTION: &str = "[store]\nvolume_bytes = 1048576\nhousekeeping_every_seconds = 1\ntrash_period_seconds = 1\ncompaction_bytes_per_second = 65536\n";
    let mut cluster =
        ProcessCluster::start_configured(&[1, 1, 1], 2, 1, false, SLOW_COMPACTION, EVERYONE_TOML);
    let client = s3_client(&cluster.endpoint, &cluster.access_key, &cluster.secret_key);
    let runtime = runtime();
    // Seven objects of 300 kB: each node holds 150 kB of each, six in its
    // first volume of 1 MiB and the seventh in the next.
    let bodies: Vec<Vec<u8>> = (0..7).map(|i| pseudo_random(70 + i, 300_000)).collect();
    runtime.block_on(async {
        client.create_bucket().bucket("keep").send().await.unwrap();
        for (i, body) in bodies.iter().enumerate() {
            put(&client, &format!("o{i}"), body.clone()).await;
        }
        // Four of the first six go: their volume is mostly dead bytes.
        for i in 0..4 {
            client
                .delete_object()
                .bucket("keep")
                .key(format!("o{i}"))
                .send()
                .await
                .unwrap();
        }
    });
    let victim = 1;
    let first_volume = cluster.data_dirs[victim].join("fragments/volumes/000001.vol");
    assert!(first_volume.exists());
    // At 64 KiB/s a 150 kB record is one chunk and then more than two
    // seconds of pause: the kill lands between two chunks' commits.
    cluster.nodes[victim].wait_for_within(&["compaction moved a chunk"], PATIENCE);
    cluster.kill_node(victim);
    assert!(first_volume.exists(), "killed before its compaction ended");
    cluster.restart_node(victim);
    let deadline = Instant::now() + PATIENCE;
    while first_volume.exists() {
        assert!(Instant::now() < deadline, "the compaction never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Node 2 down: every remaining object needs the victim's fragment.
    cluster.kill_node(2);
    runtime.block_on(async {
        for (i, body) in bodies.iter().enumerate().skip(4) {
            let bytes = get(&client, &format!("o{i}"))
                .await
                .body
                .collect()
                .await
                .unwrap();
            assert!(bytes.into_bytes() == *body, "o{i} differs");
        }
    });
    cluster.shutdown();
}
