//! Repair on a loopback cluster (3 sites x 2 nodes, 4+2, every node in
//! this one process): `cargo bench -p cairn-tests --bench repair`.
//!
//! 1. Objects of 64 MiB are written through S3; one node's disk is wiped
//!    (it held one fragment of every segment) and the node restarted.
//!    Repair runs unthrottled on every node: the time until every lost
//!    fragment is back, rebuilt MiB/s, and bytes read per byte rebuilt.
//! 2. Reed-Solomon reconstruction alone on this machine, rebuilding one
//!    fragment of a 4 MiB segment from 4 (decode, then encode again, as
//!    repair does), for comparison.
//! 3. Client PUT and GET throughput beside repair (at its default rate,
//!    16 MiB/s of fragment bytes read and written) rebuilding the node
//!    wiped again: rounds with repair stopped and running in turn, each
//!    measure on half the objects.
//!
//! Under `cargo test` it runs with a few small objects, as a check. With
//! `CAIRN_REPAIR_BENCH_GIB=N` it writes enough 64 MiB objects for the
//! wiped node to hold N GiB and measures step 1 only (the time from the
//! loss of a node with N GiB to full redundancy).

use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use cairn_model::repair::{RepairSettings, Repairer};
use cairn_protocol::erasure::{Scheme, SegmentEncoder, reconstruct};
use cairn_tests::pseudo_random_bytes;
use cairn_tests::s3::{Setup, setup, wipe_a_node_holding_no_metadata_of};
use futures::StreamExt;

const MIB: f64 = (1 << 20) as f64;

/// Puts `count` objects of `size` bytes, two at a time; returns MiB/s.
async fn put_objects(client: &Client, prefix: &str, size: usize, count: usize) -> f64 {
    let body = pseudo_random_bytes(42, size);
    let started = Instant::now();
    let puts = (0..count).map(|n| {
        let (client, body) = (client.clone(), body.clone());
        let key = format!("{prefix}/{n}");
        async move {
            client
                .put_object()
                .bucket("bench")
                .key(key)
                .body(ByteStream::from(body))
                .send()
                .await
                .unwrap();
        }
    });
    futures::stream::iter(puts)
        .buffer_unordered(2)
        .collect::<Vec<()>>()
        .await;
    (size * count) as f64 / MIB / started.elapsed().as_secs_f64()
}

/// Gets the objects `put_objects` wrote, two at a time; returns MiB/s.
async fn get_objects(client: &Client, prefix: &str, size: usize, count: usize) -> f64 {
    let started = Instant::now();
    let gets = (0..count).map(|n| {
        let client = client.clone();
        let key = format!("{prefix}/{n}");
        async move {
            let object = client
                .get_object()
                .bucket("bench")
                .key(key)
                .send()
                .await
                .unwrap();
            let bytes = object.body.collect().await.unwrap().into_bytes();
            assert_eq!(bytes.len(), size);
        }
    });
    futures::stream::iter(gets)
        .buffer_unordered(2)
        .collect::<Vec<()>>()
        .await;
    (size * count) as f64 / MIB / started.elapsed().as_secs_f64()
}

fn start_repairers(s: &Setup, settings: RepairSettings) -> Vec<Repairer> {
    (0..s.cluster.members.len())
        .map(|i| Repairer::start(s.cluster.node(i).handle(), settings))
        .collect()
}

/// Waits until the repairers together rebuilt `fragments`.
async fn wait_for_rebuilt(repairers: &mut [Repairer], fragments: u64) {
    loop {
        let rebuilt: u64 = repairers.iter().map(|r| r.status().rebuilt).sum();
        if rebuilt >= fragments {
            return;
        }
        // Any repairer finishing a pass is a moment to look again.
        let waits = repairers.iter_mut().map(|r| Box::pin(r.next_pass()));
        futures::future::select_all(waits).await;
    }
}

fn reconstruction_alone(segments: usize) -> f64 {
    let scheme = Scheme::new(4, 2).unwrap();
    let segment = pseudo_random_bytes(7, (4 << 20) + 1024);
    let encoded = SegmentEncoder::new(scheme).encode(segment.clone()).unwrap();
    let fragment_len = encoded.fragment_len();
    // Fragment 0 lost: rebuilt from 1, 2, 3 and 4.
    let present: Vec<(usize, Vec<u8>)> =
        (1..5).map(|i| (i, encoded.fragment(i).to_vec())).collect();
    let mut encoder = SegmentEncoder::new(scheme);
    let started = Instant::now();
    for _ in 0..segments {
        let fragments: Vec<(usize, &[u8])> =
            present.iter().map(|(i, b)| (*i, b.as_slice())).collect();
        let rebuilt = reconstruct(scheme, segment.len(), &fragments).unwrap();
        let again = encoder.encode(rebuilt).unwrap();
        assert_eq!(again.fragment_ids()[0], encoded.fragment_ids()[0]);
        encoder.recycle(again);
    }
    (fragment_len * segments) as f64 / MIB / started.elapsed().as_secs_f64()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // A 64 MiB object puts 16 fragments of 1 MiB on every node.
    let lost_gib: Option<usize> = std::env::var("CAIRN_REPAIR_BENCH_GIB").ok().map(|n| {
        n.parse()
            .expect("CAIRN_REPAIR_BENCH_GIB is a number of GiB")
    });
    let (size, count) = match lost_gib {
        Some(gib) if full => (64 << 20, gib * 64),
        _ if full => (64 << 20, 8),
        _ => (5 << 20, 2),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut s = setup().await;
        s.client.create_bucket().bucket("bench").send().await.unwrap();
        let idle_put = put_objects(&s.client, "a", size, count).await;
        let idle_get = if lost_gib.is_some() {
            0.0
        } else {
            get_objects(&s.client, "a", size, count).await
        };
        // 4 MiB of plaintext per segment; every node holds one fragment of each.
        let segments = (count * size.div_ceil(4 << 20)) as u64;

        wipe_a_node_holding_no_metadata_of(&mut s.cluster, "bench").await;
        let unthrottled = RepairSettings {
            every: Duration::from_millis(50),
            bytes_per_second: 0,
            ..RepairSettings::default()
        };
        let mut repairers = start_repairers(&s, unthrottled);
        let started = Instant::now();
        wait_for_rebuilt(&mut repairers, segments).await;
        let seconds = started.elapsed().as_secs_f64();
        let read: u64 = repairers.iter().map(|r| r.status().bytes_read).sum();
        let written: u64 = repairers.iter().map(|r| r.status().bytes_written).sum();
        drop(repairers);
        if lost_gib.is_some() {
            println!(
                "| node lost with {:.2} GiB ({segments} fragments) | full redundancy after {seconds:.1} s | {:.1} MiB/s rebuilt | {:.2} bytes read per byte rebuilt |",
                written as f64 / MIB / 1024.0,
                written as f64 / MIB / seconds,
                read as f64 / written as f64
            );
            s.shutdown().await;
            return;
        }
        let alone = reconstruction_alone(if full { 64 } else { 2 });

        // Client load beside repair at its default rate, rebuilding the
        // same node wiped again: rounds with repair stopped and running in
        // turn, so that the machine's moment and the wiped node weigh on
        // both sides alike.
        let wiped = wipe_a_node_holding_no_metadata_of(&mut s.cluster, "bench").await;
        // Each new object puts one fragment of each segment on every node
        // (6 fragments, 6 nodes): what the wiped node holds beyond those
        // came back by repair.
        let per_object = size.div_ceil(4 << 20) as u64;
        let mut put_since_wipe = 0u64;
        let rebuilt_on_wiped = |put_since_wipe: u64| {
            let live = s.cluster.node(wiped).store().status().unwrap().live;
            live.saturating_sub(put_since_wipe * per_object)
        };
        let background = RepairSettings {
            every: Duration::from_millis(50),
            ..RepairSettings::default()
        };
        let rounds = if full { 3 } else { 1 };
        let per_round = (count / 2).max(1);
        let mut table = Vec::new();
        for round in 0..rounds {
            let quiet_put = put_objects(&s.client, &format!("q{round}"), size, per_round).await;
            let quiet_get = get_objects(&s.client, "a", size, per_round).await;
            let repairers = start_repairers(&s, background);
            let busy_put = put_objects(&s.client, &format!("r{round}"), size, per_round).await;
            let busy_get = get_objects(&s.client, "a", size, per_round).await;
            drop(repairers);
            put_since_wipe += 2 * per_round as u64;
            let rebuilt = rebuilt_on_wiped(put_since_wipe);
            table.push((quiet_put, busy_put, quiet_get, busy_get, rebuilt));
        }
        // The rest of the repair, so that the cluster ends whole (a
        // repairer stopped mid-segment may have stored fragments it did not
        // count: passes finding every segment whole are what ends it).
        let mut repairers = start_repairers(&s, background);
        loop {
            for repairer in repairers.iter_mut() {
                repairer.next_pass().await;
            }
            if repairers
                .iter()
                .all(|r| r.status().last.is_some_and(|last| last.all_whole()))
            {
                break;
            }
        }
        drop(repairers);
        println!(
            "Repair on 3 sites x 2 nodes, 4+2, {count} objects of {} MiB ({segments} segments)",
            size >> 20
        );
        println!("| measure | figure |");
        println!("| --- | --- |");
        println!(
            "| lost with the wiped node | {segments} fragments, {:.1} MiB |",
            written as f64 / MIB
        );
        println!("| time to full redundancy, unthrottled | {seconds:.2} s |");
        println!(
            "| repair throughput (fragment bytes rebuilt) | {:.1} MiB/s |",
            written as f64 / MIB / seconds
        );
        println!(
            "| bytes read per byte rebuilt | {:.2} (k = 4) |",
            read as f64 / written as f64
        );
        println!(
            "| RS reconstruction alone (decode and encode, one fragment of 4) | {alone:.1} MiB/s of fragment rebuilt |"
        );
        println!("| client PUT and GET, idle before the wipe | {idle_put:.1} / {idle_get:.1} MiB/s |");
        let rate = RepairSettings::default().bytes_per_second >> 20;
        println!();
        println!(
            "Client beside repair at {rate} MiB/s, {per_round} objects per measure, repair stopped and running in turn:"
        );
        println!("| round | PUT stopped → running | GET stopped → running | fragments rebuilt by the round's end, of {segments} |");
        println!("| --- | --- | --- | --- |");
        for (round, (quiet_put, busy_put, quiet_get, busy_get, rebuilt)) in table.iter().enumerate() {
            println!(
                "| {} | {quiet_put:.1} → {busy_put:.1} MiB/s ({:+.0}%) | {quiet_get:.1} → {busy_get:.1} MiB/s ({:+.0}%) | {} |",
                round + 1,
                (busy_put / quiet_put - 1.0) * 100.0,
                (busy_get / quiet_get - 1.0) * 100.0,
                rebuilt
            );
        }
        let sum = |pick: fn(&(f64, f64, f64, f64, u64)) -> f64| table.iter().map(pick).sum::<f64>();
        println!(
            "| all rounds | {:+.0}% | {:+.0}% | |",
            (sum(|r| r.1) / sum(|r| r.0) - 1.0) * 100.0,
            (sum(|r| r.3) / sum(|r| r.2) - 1.0) * 100.0
        );
        s.shutdown().await;
    });
}
