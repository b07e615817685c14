//! Repair brings lost redundancy back without an operator: a node whose
//! disk was wiped, or fragments a write handed to another node while
//! their own node was down, end up on the nodes placement names.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use cairn_model::collector::Collection;
use cairn_model::heads::{existing_versions, read_manifest};
use cairn_model::repair::{RepairSettings, RepairStatus, Repairer};
use cairn_node::scrub::ScrubSettings;
use cairn_node::store::FragmentState;
use cairn_protocol::erasure::Scheme;
use cairn_protocol::ids::{FragmentId, NodeId, VersionId};
use cairn_protocol::manifest::Manifest;
use cairn_protocol::membership::SignedMap;
use cairn_protocol::meta::Partition;
use cairn_protocol::placement::{NodeState, Placer, Tolerance, segment_placement_key};
use cairn_protocol::version::{ObjectVersion, VersionBody};
use cairn_tests::gateway::Gateway;
use cairn_tests::s3::*;
use cairn_tests::{Cluster, QUICK_REPAIR, pseudo_random_bytes, random_secret};

/// How many fragments of the objects `keys` of `bucket` are not on the
/// node their placement names (read through node `via`'s metadata).
async fn fragments_off_placement(
    cluster: &Cluster,
    via: usize,
    bucket: &str,
    keys: &[String],
) -> usize {
    placement_check(cluster, via, bucket, keys).await.off
}

/// Where the fragments of some objects are.
#[derive(Debug, Default)]
struct Placement {
    segments: usize,
    /// Fragments not on the node their placement names.
    off: usize,
    /// Their bytes, and the bytes of the `k` fragments that rebuild each.
    off_bytes: u64,
    off_bytes_times_k: u64,
}

/// The existing versions of `bucket`/`key` as `node` reads them, and the
/// manifest of the first, which holds data.
async fn first_manifest(
    node: &cairn_node::swarm::Node,
    bucket: &str,
    key: &str,
) -> (Vec<ObjectVersion>, Manifest) {
    let versions = existing_versions(node.metadata(), bucket, key, None)
        .await
        .unwrap();
    let VersionBody::Data { manifest, .. } = &versions[0].body else {
        panic!("{key} is data");
    };
    let manifest = read_manifest(node.metadata(), bucket, manifest)
        .await
        .unwrap()
        .expect("the manifest");
    (versions, manifest)
}

/// The segments of the objects `keys` of `bucket`, and which of their
/// fragments are not on the node their placement names.
async fn placement_check(
    cluster: &Cluster,
    via: usize,
    bucket: &str,
    keys: &[String],
) -> Placement {
    let node = cluster.node(via);
    let map = node.cluster_map().expect("a map");
    let mut placement = Placement::default();
    for key in keys {
        let (versions, manifest) = first_manifest(node, bucket, key).await;
        assert_eq!(versions.len(), 1, "{key} has one version");
        let placer = Placer::new(&map.map, manifest.layout.scheme, map.tolerance).unwrap();
        for part in &manifest.parts {
            for segment in &part.segments {
                placement.segments += 1;
                let scheme = manifest.layout.scheme;
                let fragment_len = scheme.fragment_len(segment.ciphertext_len as usize) as u64;
                let placed = placer.place(&segment_placement_key(&segment.fragments));
                for (id, holder) in segment.fragments.iter().zip(&placed) {
                    let store = cluster.node(cluster.index_of(holder)).store();
                    let live = matches!(
                        store.entry(id),
                        Ok(Some(entry)) if entry.state == FragmentState::Live
                    );
                    if !live {
                        placement.off += 1;
                        placement.off_bytes += fragment_len;
                        placement.off_bytes_times_k += fragment_len * scheme.data() as u64;
                    }
                }
            }
        }
    }
    placement
}

/// Every live copy in the running nodes' stores: fragment id -> nodes.
fn live_copies(cluster: &Cluster) -> HashMap<FragmentId, Vec<NodeId>> {
    let mut copies: HashMap<FragmentId, Vec<NodeId>> = HashMap::new();
    for member in cluster.members.iter() {
        let Some(node) = member.node.as_ref() else {
            continue;
        };
        for id in node
            .store()
            .list(&FragmentId([0; 32]), &FragmentId([0xff; 32]), usize::MAX)
            .unwrap()
        {
            copies.entry(id).or_default().push(node.node_id());
        }
    }
    copies
}

/// Every copy of the segments' fragments in the running nodes' stores,
/// live or in the trash: fragment id -> nodes.
fn stored_copies(
    cluster: &Cluster,
    segments: &[(Scheme, Vec<FragmentId>)],
) -> HashMap<FragmentId, Vec<NodeId>> {
    let mut copies: HashMap<FragmentId, Vec<NodeId>> = HashMap::new();
    for member in cluster.members.iter() {
        let Some(node) = member.node.as_ref() else {
            continue;
        };
        for id in segments.iter().flat_map(|(_, ids)| ids) {
            let stored = node
                .store()
                .entry(id)
                .unwrap()
                .is_some_and(|e| matches!(e.state, FragmentState::Live | FragmentState::Trash));
            if stored && !copies.get(id).is_some_and(|n| n.contains(&node.node_id())) {
                copies.entry(*id).or_default().push(node.node_id());
            }
        }
    }
    copies
}

/// The segments of the objects `keys` of `bucket`: scheme and fragment ids.
async fn segments_of(
    cluster: &Cluster,
    via: usize,
    bucket: &str,
    keys: &[String],
) -> Vec<(Scheme, Vec<FragmentId>)> {
    let node = cluster.node(via);
    let mut segments = Vec::new();
    for key in keys {
        let (_, manifest) = first_manifest(node, bucket, key).await;
        for part in &manifest.parts {
            for segment in &part.segments {
                segments.push((manifest.layout.scheme, segment.fragments.clone()));
            }
        }
    }
    segments
}

/// Copies of the segments' fragments on nodes placement does not take
/// for their segment (under node 0's map).
fn copies_off_placement(
    cluster: &Cluster,
    segments: &[(Scheme, Vec<FragmentId>)],
    copies: &HashMap<FragmentId, Vec<NodeId>>,
) -> usize {
    // A fragment belongs on any node placement takes for its segment
    // (Placer::arrange): a copy is off placement when its node is not one.
    let map = cluster.node(0).cluster_map().unwrap();
    let mut placed_pairs = HashSet::new();
    for (scheme, ids) in segments {
        let placer = Placer::new(&map.map, *scheme, map.tolerance).unwrap();
        let placed = placer.place(&segment_placement_key(ids));
        for id in ids {
            placed_pairs.extend(placed.iter().map(|node| (*id, *node)));
        }
    }
    segments
        .iter()
        .flat_map(|(_, ids)| ids.iter().copied())
        .collect::<HashSet<_>>()
        .into_iter()
        .flat_map(|id| copies.get(&id).into_iter().flatten().map(move |n| (id, *n)))
        .filter(|pair| !placed_pairs.contains(pair))
        .count()
}

/// Fragments not at the node the arrangement of the live copies names
/// (Placer::arrange under the first node's map), over all segments.
fn fragments_not_arranged(
    cluster: &Cluster,
    segments: &[(Scheme, Vec<FragmentId>)],
    copies: &HashMap<FragmentId, Vec<NodeId>>,
) -> usize {
    let map = cluster.node(0).cluster_map().unwrap();
    segments
        .iter()
        .map(|(scheme, ids)| {
            let placer = Placer::new(&map.map, *scheme, map.tolerance).unwrap();
            let placed = placer.place(&segment_placement_key(ids));
            let holders: Vec<Vec<NodeId>> = ids
                .iter()
                .map(|id| copies.get(id).cloned().unwrap_or_default())
                .collect();
            Placer::arrange(&placed, &holders)
                .iter()
                .zip(&holders)
                .filter(|(node, holders)| !holders.contains(node))
                .count()
        })
        .sum()
}

/// The fewest fragment copies a move to the current map needs: per
/// segment, the placed nodes that hold none of its fragments now.
fn fewest_moves(
    cluster: &Cluster,
    segments: &[(Scheme, Vec<FragmentId>)],
    copies: &HashMap<FragmentId, Vec<NodeId>>,
) -> usize {
    let map = cluster.node(0).cluster_map().unwrap();
    segments
        .iter()
        .map(|(scheme, ids)| {
            let placer = Placer::new(&map.map, *scheme, map.tolerance).unwrap();
            let holding: HashSet<NodeId> = ids
                .iter()
                .flat_map(|id| copies.get(id).into_iter().flatten().copied())
                .collect();
            placer
                .place(&segment_placement_key(ids))
                .iter()
                .filter(|node| !holding.contains(node))
                .count()
        })
        .sum()
}

/// (fragment, node) pairs held in `after` and not in `before`.
fn new_copies(
    before: &HashMap<FragmentId, Vec<NodeId>>,
    after: &HashMap<FragmentId, Vec<NodeId>>,
) -> usize {
    after
        .iter()
        .flat_map(|(id, nodes)| nodes.iter().map(move |node| (id, node)))
        .filter(|(id, node)| !before.get(id).is_some_and(|nodes| nodes.contains(node)))
        .count()
}

/// Whether every segment has `k + m` distinct fragments on distinct
/// running nodes (copies share one id: they count once per node).
fn every_segment_at_full_strength(
    segments: &[(Scheme, Vec<FragmentId>)],
    copies: &HashMap<FragmentId, Vec<NodeId>>,
) -> bool {
    segments.iter().all(|(scheme, ids)| {
        let indexes = ids.iter().filter(|id| copies.contains_key(id)).count();
        let nodes: HashSet<&NodeId> = ids
            .iter()
            .flat_map(|id| copies.get(id).into_iter().flatten())
            .collect();
        indexes.min(nodes.len()) >= scheme.total()
    })
}

/// Whether every segment keeps `k` distinct fragments, counting every
/// live copy, after the loss of any one site.
fn every_segment_survives_any_site(
    cluster: &Cluster,
    segments: &[(Scheme, Vec<FragmentId>)],
    copies: &HashMap<FragmentId, Vec<NodeId>>,
) -> bool {
    let site_of = |node: &NodeId| cluster.members[cluster.index_of(node)].site.clone();
    let sites: HashSet<_> = cluster.members.iter().map(|m| m.site.clone()).collect();
    segments.iter().all(|(scheme, ids)| {
        sites.iter().all(|lost| {
            let left = ids
                .iter()
                .enumerate()
                .filter(|(_, id)| {
                    copies
                        .get(id)
                        .is_some_and(|nodes| nodes.iter().any(|n| site_of(n) != *lost))
                })
                .count();
            left >= scheme.data()
        })
    })
}

/// Waits for passes of every repairer until every fragment is on its
/// placed node.
async fn repair_until_in_place(
    cluster: &Cluster,
    repairers: &mut [Repairer],
    bucket: &str,
    keys: &[String],
) {
    let mut reports = Vec::new();
    let waited = tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            for repairer in repairers.iter_mut() {
                reports.push(repairer.next_pass().await.expect("repair runs"));
            }
            if fragments_off_placement(cluster, 0, bucket, keys).await == 0 {
                // One more pass of each: a pass that did the last puts has
                // then finished and counted them.
                for repairer in repairers.iter_mut() {
                    repairer.next_pass().await.expect("repair runs");
                }
                return;
            }
        }
    })
    .await;
    let left = fragments_off_placement(cluster, 0, bucket, keys).await;
    assert!(
        waited.is_ok(),
        "{left} fragments still off placement; last reports: {:?}",
        reports
            .iter()
            .rev()
            .take(repairers.len())
            .collect::<Vec<_>>()
    );
}

async fn put_objects(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    sizes: &[usize],
    seed: u64,
) -> Vec<(String, Vec<u8>)> {
    let mut objects = Vec::new();
    for (n, &size) in sizes.iter().enumerate() {
        let name = format!("k{n}");
        let body = pseudo_random_bytes(seed + n as u64, size);
        client
            .put_object()
            .bucket(bucket)
            .key(&name)
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap();
        objects.push((name, body));
    }
    objects
}

/// 3 sites of 3, 4+2 with nine metadata replicas (a majority outlives a
/// site), a gateway on node 0 and a client with `bucket` created.
async fn three_sites_of_three(bucket: &str) -> (Cluster, Gateway, Client) {
    let cluster = Cluster::start(&[3, 3, 3]).await.unwrap();
    cluster
        .install_map_with(Scheme::new(4, 2).unwrap(), Tolerance::default(), 9)
        .await
        .unwrap();
    let gateway = gateway_on(&cluster, 0, random_secret()).await;
    let key = gateway.keys().create("test").await.unwrap();
    let client = client_for(&gateway, &key.id, &key.secret);
    client.create_bucket().bucket(bucket).send().await.unwrap();
    (cluster, gateway, client)
}

/// On 3 sites of 2 with 4+2 every node holds a fragment of every segment:
/// with one node's disk lost, a site loss would leave 3 < 4. Repair puts
/// the node's fragments back, from k reads per segment, and then a whole
/// site can go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_gets_its_fragments_back_and_then_a_site_can_go() {
    let mut s = setup().await;
    s.client
        .create_bucket()
        .bucket("heal")
        .send()
        .await
        .unwrap();
    // Erasure-coded objects only, with no tiny last segment: no two
    // fragments of a segment share bytes, so each lost one is rebuilt.
    let sizes = [1usize << 20, (5 << 20) + 1, 9 << 20];
    let objects = put_objects(&s.client, "heal", &sizes, 7000).await;
    let keys: Vec<String> = objects.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(
        fragments_off_placement(&s.cluster, 0, "heal", &keys).await,
        0
    );
    wipe_a_node_holding_no_metadata_of(&mut s.cluster, "heal").await;
    let lost = placement_check(&s.cluster, 0, "heal", &keys).await;
    // 4+2 on 3 sites of 2 puts a fragment of every segment on every node.
    assert_eq!(lost.off, lost.segments, "{lost:?}");
    let mut repairers: Vec<Repairer> = (0..s.cluster.members.len())
        .map(|i| Repairer::start(s.cluster.node(i).handle(), QUICK_REPAIR))
        .collect();
    repair_until_in_place(&s.cluster, &mut repairers, "heal", &keys).await;
    let statuses: Vec<RepairStatus> = repairers.iter().map(Repairer::status).collect();
    let rebuilt: u64 = statuses.iter().map(|r| r.rebuilt).sum();
    let read: u64 = statuses.iter().map(|r| r.bytes_read).sum();
    let written: u64 = statuses.iter().map(|r| r.bytes_written).sum();
    // Two replicas may both repair a segment while the first starts its
    // first pass: each rebuilds it whole, never less.
    assert!(rebuilt >= lost.off as u64, "each lost fragment rebuilt");
    assert!(
        written >= lost.off_bytes,
        "{written} of {} bytes",
        lost.off_bytes
    );
    // k fragments read per fragment rebuilt: the minimum.
    assert_eq!(read, 4 * written, "bytes read per byte rebuilt is k");
    drop(repairers);
    // Site 2 (nodes 4 and 5) goes away; the gateway runs on node 0.
    s.cluster.stop(4).await;
    s.cluster.stop(5).await;
    for (name, body) in &objects {
        let back = get_bytes(&s.client, "heal", name).await;
        assert!(back == *body, "{name} differs with site 2 down");
    }
    s.shutdown().await;
}

/// On 3 sites of 3 a write hands the fragments of a node that is down to
/// another node of its site; once the node is back, repair copies each
/// such fragment to its placed node (one read each, nothing decoded).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fragments_written_while_a_node_was_down_go_back_to_it() {
    let (mut cluster, gateway, client) = three_sites_of_three("away").await;
    cluster.stop(4).await;
    let sizes = [1usize, 1 << 20, (4 << 20) + 7, 9 << 20];
    let objects = put_objects(&client, "away", &sizes, 8000).await;
    let keys: Vec<String> = objects.iter().map(|(k, _)| k.clone()).collect();
    cluster.restart(4).await.unwrap();
    let off = fragments_off_placement(&cluster, 0, "away", &keys).await;
    assert!(
        off > 0,
        "node 4 is placed for some fragment written while it was down"
    );
    let mut repairers: Vec<Repairer> = (0..cluster.members.len())
        .map(|i| Repairer::start(cluster.node(i).handle(), QUICK_REPAIR))
        .collect();
    repair_until_in_place(&cluster, &mut repairers, "away", &keys).await;
    let statuses: Vec<RepairStatus> = repairers.iter().map(Repairer::status).collect();
    let copied: u64 = statuses.iter().map(|r| r.copied).sum();
    let rebuilt: u64 = statuses.iter().map(|r| r.rebuilt).sum();
    assert!(
        copied >= off as u64 && rebuilt == 0,
        "each hand-off copied ({copied} of {off}), nothing rebuilt ({rebuilt})"
    );
    drop(repairers);
    for (name, body) in &objects {
        assert!(
            get_bytes(&client, "away", name).await == *body,
            "{name} differs"
        );
    }
    gateway.stop().await;
    cluster.shutdown().await;
}

/// A byte flipped on a node's disk is found by that node's scrub, which
/// quarantines the fragment; repair then rebuilds it on the same node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flipped_byte_is_found_by_scrub_and_repaired() {
    use std::os::unix::fs::FileExt;
    let mut s = setup().await;
    s.client.create_bucket().bucket("rot").send().await.unwrap();
    let objects = put_objects(&s.client, "rot", &[(5 << 20) + 3], 9000).await;
    let keys: Vec<String> = objects.iter().map(|(k, _)| k.clone()).collect();
    // Node 1 holds a fragment of every segment (4+2 on 3 sites of 2).
    let rotten = 1;
    let store = s.cluster.node(rotten).store().clone();
    let (id, entry) = {
        let ids = store
            .list(&FragmentId([0; 32]), &FragmentId([0xff; 32]), 10)
            .unwrap();
        let id = ids[0];
        (id, store.entry(&id).unwrap().unwrap())
    };
    drop(store);
    let volume = s.cluster.members[rotten]
        .data_dir
        .join("fragments")
        .join("volumes")
        .join(format!("{:06}.vol", entry.volume));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(volume)
        .unwrap();
    let at = entry.offset + 45 + entry.len / 3;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x80], at).unwrap();
    // The node restarts with a scrub at a test rate: a pass every 100 ms.
    s.cluster.scrub = ScrubSettings {
        bytes_per_second: 0,
        every: Duration::from_millis(100),
    };
    s.cluster.restart(rotten).await.unwrap();
    let mut progress = s.cluster.node(rotten).scrub_progress();
    tokio::time::timeout(
        Duration::from_secs(120),
        progress.wait_for(|state| state.corrupt_found >= 1),
    )
    .await
    .expect("scrub finds the flipped byte")
    .unwrap();
    let quarantined = s.cluster.node(rotten).store().entry(&id).unwrap().unwrap();
    assert_eq!(quarantined.state, FragmentState::Quarantined);
    assert_eq!(
        fragments_off_placement(&s.cluster, 0, "rot", &keys).await,
        1
    );
    let mut repairers: Vec<Repairer> = (0..s.cluster.members.len())
        .map(|i| Repairer::start(s.cluster.node(i).handle(), QUICK_REPAIR))
        .collect();
    repair_until_in_place(&s.cluster, &mut repairers, "rot", &keys).await;
    drop(repairers);
    let store = s.cluster.node(rotten).store().clone();
    let bytes = tokio::task::spawn_blocking(move || store.read(&id, 0, u64::MAX))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(FragmentId::of(&bytes), id, "the rebuilt fragment is whole");
    let back = get_bytes(&s.client, "rot", "k0").await;
    assert!(back == objects[0].1);
    s.shutdown().await;
}

/// Waits for passes of every repairer until every fragment of the
/// segments is on the node placement names for it, checking after each
/// round of passes that every segment would survive the loss of any site.
async fn rebalance_until_in_place(
    cluster: &Cluster,
    repairers: &mut [Repairer],
    segments: &[(Scheme, Vec<FragmentId>)],
) {
    let settled = tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            for repairer in repairers.iter_mut() {
                repairer.next_pass().await.expect("repair runs");
            }
            // A copy is dropped only once its placed one is stored, and
            // goes to its holder's trash: counting trashed copies, a
            // snapshot read node after node during a pass never shows
            // fewer than there are.
            let copies = stored_copies(cluster, segments);
            assert!(
                every_segment_survives_any_site(cluster, segments, &copies),
                "a site loss would take a segment below k mid-rebalance"
            );
            if fragments_not_arranged(cluster, segments, &live_copies(cluster)) == 0 {
                for repairer in repairers.iter_mut() {
                    repairer.next_pass().await.expect("repair runs");
                }
                return;
            }
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "{} fragments still off their placed nodes",
        fragments_not_arranged(cluster, segments, &live_copies(cluster))
    );
}

/// A site added to the map: segments are copied to the placement the new
/// map gives and the old copies dropped to their holders' trash, every
/// segment survives a site loss throughout, and every object then reads
/// back with the new site down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_added_gets_its_share_of_every_segment() {
    let mut cluster = Cluster::start(&[2, 2, 2, 2]).await.unwrap();
    let scheme = Scheme::new(4, 2).unwrap();
    let mut three_sites = cluster.map();
    three_sites.nodes.retain(|n| cluster.index_of(&n.id) < 6);
    cluster.install_map(three_sites, scheme).await.unwrap();
    let gateway = gateway_on(&cluster, 0, random_secret()).await;
    let key = gateway.keys().create("test").await.unwrap();
    let client = client_for(&gateway, &key.id, &key.secret);
    client.create_bucket().bucket("grow").send().await.unwrap();
    let sizes = [1usize, 300 << 10, 1 << 20, (4 << 20) + 9, 9 << 20];
    let objects = put_objects(&client, "grow", &sizes, 10_000).await;
    let keys: Vec<String> = objects.iter().map(|(k, _)| k.clone()).collect();
    let segments = segments_of(&cluster, 0, "grow", &keys).await;
    let mut four_sites = cluster.map();
    four_sites.version = 2;
    cluster.install_map(four_sites, scheme).await.unwrap();
    let held_before = live_copies(&cluster);
    let before = copies_off_placement(&cluster, &segments, &held_before);
    assert!(before > 0, "the new site is placed for some fragment");
    let fewest = fewest_moves(&cluster, &segments, &held_before);
    // As `cairn serve` does: the collectors install the rules a drop is
    // checked against.
    let _collectors = start_collectors(&cluster, Collection::default());
    let mut repairers: Vec<Repairer> = (0..cluster.members.len())
        .map(|i| Repairer::start(cluster.node(i).handle(), QUICK_REPAIR))
        .collect();
    rebalance_until_in_place(&cluster, &mut repairers, &segments).await;
    let statuses: Vec<RepairStatus> = repairers.iter().map(Repairer::status).collect();
    let moved: u64 = statuses.iter().map(|r| r.copied).sum();
    let fragments: usize = segments.iter().map(|(_, ids)| ids.len()).sum();
    // The figure spec/repair.md quotes (the new site's fair share of 8
    // nodes is a quarter).
    eprintln!("a fourth site moved {moved} of {fragments} fragments; the fewest is {fewest}");
    assert!(moved > 0, "nothing moved");
    // Only the fragments of nodes leaving a segment's set moved, each to a
    // node joining it: the fewest copies there can be.
    assert_eq!(
        new_copies(&held_before, &live_copies(&cluster)),
        fewest,
        "more copies than the minimum were made"
    );
    assert_eq!(
        statuses.iter().map(|r| r.rebuilt).sum::<u64>(),
        0,
        "moves are copies"
    );
    // The copies left on the old placement went to their holders' trash.
    assert_eq!(
        copies_off_placement(&cluster, &segments, &live_copies(&cluster)),
        0
    );
    assert!(statuses.iter().map(|r| r.dropped).sum::<u64>() > 0);
    drop(repairers);
    // Site 3 (nodes 6 and 7) holds its share now; it goes away, and
    // every object reads back through the gateway on node 0.
    cluster.stop(6).await;
    cluster.stop(7).await;
    for (name, body) in &objects {
        assert!(
            get_bytes(&client, "grow", name).await == *body,
            "{name} differs"
        );
    }
    gateway.stop().await;
    cluster.shutdown().await;
}

/// A node drained, then marked out and its disk deleted: every fragment
/// it held is copied to the nodes placement now names first and then
/// dropped from it (its status shows no live fragment), and nothing is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_node_can_be_removed_once_its_fragments_are_in_place() {
    let (mut cluster, gateway, client) = three_sites_of_three("drain").await;
    let scheme = Scheme::new(4, 2).unwrap();
    let sign = |map, cluster: &Cluster| {
        SignedMap::sign_with_replicas(&cluster.cluster_key, map, scheme, Tolerance::default(), 9)
            .unwrap()
    };
    let sizes = [1usize, 200 << 10, 1 << 20, 2 << 20, (4 << 20) + 9, 9 << 20];
    let objects = put_objects(&client, "drain", &sizes, 11_000).await;
    let keys: Vec<String> = objects.iter().map(|(k, _)| k.clone()).collect();
    let segments = segments_of(&cluster, 0, "drain", &keys).await;
    let drained = 4;
    let drained_id = cluster.members[drained].identity.node_id();
    let held = |cluster: &Cluster| {
        live_copies(cluster)
            .values()
            .filter(|nodes| nodes.contains(&drained_id))
            .count()
    };
    assert!(held(&cluster) > 0, "node {drained} holds fragments");
    let mut draining = cluster.map();
    draining.version = 2;
    draining.nodes[drained].state = NodeState::Draining;
    cluster
        .install_signed(sign(draining.clone(), &cluster))
        .await
        .unwrap();
    // As `cairn serve` does: the collectors install the rules a drop is
    // checked against.
    let _collectors = start_collectors(&cluster, Collection::default());
    let mut repairers: Vec<Repairer> = (0..cluster.members.len())
        .map(|i| Repairer::start(cluster.node(i).handle(), QUICK_REPAIR))
        .collect();
    rebalance_until_in_place(&cluster, &mut repairers, &segments).await;
    drop(repairers);
    // It emptied itself: what it held is in its trash, and its status
    // says it holds no live fragment.
    assert_eq!(held(&cluster), 0, "node {drained} still holds live copies");
    assert_eq!(cluster.node(drained).store().status().unwrap().live, 0);
    // Out, stopped, its data deleted.
    let mut out = draining;
    out.version = 3;
    out.nodes[drained].state = NodeState::Out;
    cluster.install_signed(sign(out, &cluster)).await.unwrap();
    cluster.stop(drained).await;
    std::fs::remove_dir_all(&cluster.members[drained].data_dir).unwrap();
    for (name, body) in &objects {
        assert!(
            get_bytes(&client, "drain", name).await == *body,
            "{name} differs"
        );
    }
    // And still with a whole other site down.
    for node in [6, 7, 8] {
        cluster.stop(node).await;
    }
    for (name, body) in &objects {
        assert!(
            get_bytes(&client, "drain", name).await == *body,
            "{name} differs with site 2 down"
        );
    }
    gateway.stop().await;
    cluster.shutdown().await;
}

/// A node gone past the grace: its fragments are rebuilt on spares, each
/// in a site with room under the cap (on 3 sites of 3 with 4+2 every site
/// holds 2 of each segment, so only the lost node's own site has room),
/// and every segment then survives the loss of any site.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fragments_of_a_node_gone_for_good_are_rebuilt_within_the_site_caps() {
    let (mut cluster, gateway, client) = three_sites_of_three("gone").await;
    // Small objects are three copies (1+2): a lost copy is one too.
    let sizes = [
        1,
        200 << 10,
        1 << 20,
        2 << 20,
        3 << 20,
        (5 << 20) + 1,
        9 << 20,
    ];
    let objects = put_objects(&client, "gone", &sizes, 12_000).await;
    let keys: Vec<String> = objects.iter().map(|(k, _)| k.clone()).collect();
    let segments = segments_of(&cluster, 0, "gone", &keys).await;
    // A node other than the gateway's that holds a copy of the 1-byte
    // object (and fragments of the others).
    let small = &segments[0].1[0];
    let gone = live_copies(&cluster)[small]
        .iter()
        .map(|n| cluster.index_of(n))
        .find(|&i| i != 0)
        .expect("three copies");
    let gone_id = cluster.members[gone].identity.node_id();
    cluster.stop(gone).await;
    assert!(
        !every_segment_at_full_strength(&segments, &live_copies(&cluster)),
        "node {gone} held fragments"
    );
    let at_once = RepairSettings {
        away_grace: Duration::ZERO,
        ..QUICK_REPAIR
    };
    let mut repairers: Vec<Repairer> = (0..cluster.members.len())
        .filter(|&i| i != gone)
        .map(|i| Repairer::start(cluster.node(i).handle(), at_once))
        .collect();
    let rebuilt = tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            for repairer in repairers.iter_mut() {
                repairer.next_pass().await.expect("repair runs");
            }
            let copies = live_copies(&cluster);
            if every_segment_at_full_strength(&segments, &copies) {
                return copies;
            }
        }
    })
    .await
    .expect("every segment back to k + m on running nodes");
    assert!(
        rebuilt.values().all(|nodes| !nodes.contains(&gone_id)),
        "only running nodes are counted"
    );
    assert!(
        every_segment_survives_any_site(&cluster, &segments, &rebuilt),
        "a fragment was rebuilt in a site already at its cap"
    );
    drop(repairers);
    for (name, body) in &objects {
        assert!(
            get_bytes(&client, "gone", name).await == *body,
            "{name} differs"
        );
    }
    gateway.stop().await;
    cluster.shutdown().await;
}

/// The first metadata replica of a bucket runs but does not repair (an
/// old binary, a stuck task): the next replica sees no recent pass in its
/// status and repairs the bucket in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_replica_that_does_not_repair_is_passed_over() {
    let mut s = setup().await;
    s.client
        .create_bucket()
        .bucket("idle")
        .send()
        .await
        .unwrap();
    let objects = put_objects(&s.client, "idle", &[(5 << 20) + 1], 13_000).await;
    let keys: Vec<String> = objects.iter().map(|(k, _)| k.clone()).collect();
    let replicas = s
        .cluster
        .node(0)
        .metadata()
        .replicas_of(&Partition::bucket("idle"))
        .unwrap();
    let idle = s.cluster.index_of(&replicas[0]);
    wipe_a_node_holding_no_metadata_of(&mut s.cluster, "idle").await;
    assert!(fragments_off_placement(&s.cluster, 0, "idle", &keys).await > 0);
    let mut repairers: Vec<Repairer> = (0..s.cluster.members.len())
        .filter(|&i| i != idle)
        .map(|i| Repairer::start(s.cluster.node(i).handle(), QUICK_REPAIR))
        .collect();
    repair_until_in_place(&s.cluster, &mut repairers, "idle", &keys).await;
    drop(repairers);
    s.shutdown().await;
}

/// A member cannot have a copy dropped on its word: the holder checks the
/// version in the metadata, placement under its own map (never while it
/// takes the holder for the segment, and only for a keeper it takes) and
/// that the keeper sends the fragment's bytes; then the copy goes to its
/// trash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_is_dropped_only_when_the_holder_checked_it_is_left_behind() {
    use cairn_node::pieces::PieceError;
    use cairn_node::swarm::NodeError;
    use cairn_protocol::wire::{Hold, ObjectKeyDigest, RejectCode};
    let (cluster, gateway, client) = three_sites_of_three("drops").await;
    let _collectors = start_collectors(&cluster, Collection::default());
    let objects = put_objects(&client, "drops", &[1 << 20], 12_000).await;
    let node = cluster.node(0);
    let (versions, manifest) = first_manifest(node, "drops", "k0").await;
    let segment = &manifest.parts[0].segments[0];
    let map = node.cluster_map().unwrap();
    let placer = Placer::new(&map.map, manifest.layout.scheme, map.tolerance).unwrap();
    let placed = placer.place(&segment_placement_key(&segment.fragments));
    let (fragment, keeper) = (segment.fragments[0], placed[0]);
    let other_placed = placed[1];
    let spares: Vec<NodeId> = cluster
        .node_ids()
        .into_iter()
        .filter(|n| !placed.contains(n))
        .collect();
    let (spare, other_spare) = (spares[0], spares[1]);
    // A copy of fragment 0 off placement, as a write's hand-off leaves.
    let bytes = cluster
        .node(0)
        .get_fragment(&keeper, fragment, 0, u64::MAX)
        .await
        .unwrap();
    let signer = cluster.members[0].identity.signing_key();
    let hold = Hold::sign(
        signer,
        &fragment,
        manifest.upload,
        ObjectKeyDigest::of("drops", "k0"),
        0,
    );
    node.put_fragment(&spare, fragment, &bytes, hold)
        .await
        .unwrap();
    let state = |n: &NodeId| {
        cluster
            .node(cluster.index_of(n))
            .store()
            .entry(&fragment)
            .unwrap()
            .map(|e| e.state)
    };
    let refused = |outcome: Result<(), NodeError>, what: &str| match outcome {
        Err(NodeError::Piece(PieceError::Rejected {
            code: RejectCode::Unauthorized,
            message,
        })) => message,
        other => panic!("{what}: {other:?}"),
    };
    let member = cluster.node(1);
    let version = manifest.version;
    // The placed node never drops its own fragment.
    let why = refused(
        member
            .drop_copy(&keeper, fragment, "drops", "k0", version, spare)
            .await,
        "a drop of a placed fragment",
    );
    assert!(why.contains("takes this node"), "{why}");
    // The keeper must be a node placement takes for the segment, and hold
    // the fragment there.
    let why = refused(
        member
            .drop_copy(&spare, fragment, "drops", "k0", version, other_spare)
            .await,
        "a drop naming a keeper placement does not take",
    );
    assert!(why.contains("does not take"), "{why}");
    refused(
        member
            .drop_copy(&spare, fragment, "drops", "k0", version, other_placed)
            .await,
        "a drop naming a placed node without the fragment as keeper",
    );
    // A version that does not exist, or another object's name: refused.
    refused(
        member
            .drop_copy(&spare, fragment, "drops", "k0", VersionId([7; 16]), keeper)
            .await,
        "a drop naming no version",
    );
    refused(
        member
            .drop_copy(&spare, fragment, "drops", "other", version, keeper)
            .await,
        "a drop naming another object",
    );
    // A member forges a version of the key whose manifest (signed by
    // itself: any member can) puts the fragment, written by the same
    // upload, in a segment placement gives to itself and not to the
    // keeper; it holds the bytes, and asks the keeper to drop its copy.
    // The real version still places the fragment on the keeper: refused.
    let forger_index = (0..cluster.members.len())
        .find(|i| {
            let id = cluster.node_ids()[*i];
            id != keeper && id != spare
        })
        .unwrap();
    let forger = cluster.node(forger_index);
    let forger_id = forger.node_id();
    let forged_version = VersionId([0x66; 16]);
    let mut seed = 0u64;
    let forged_segment = loop {
        seed += 1;
        let mut fragments = segment.fragments.clone();
        for (i, id) in fragments.iter_mut().enumerate().skip(1) {
            *id = FragmentId::of(&[seed.to_be_bytes().as_slice(), &[i as u8]].concat());
        }
        let placed = placer.place(&segment_placement_key(&fragments));
        if placed[0] == forger_id && !placed.contains(&keeper) {
            let mut forged = segment.clone();
            forged.fragments = fragments;
            break forged;
        }
    };
    let mut forged = manifest.clone();
    forged.version = forged_version;
    forged.writer = forger_id;
    forged.parts[0].segments = vec![forged_segment];
    forged.parts.truncate(1);
    let signed = forged
        .sign(cluster.members[forger_index].identity.signing_key())
        .unwrap();
    let mut row = versions[0].clone();
    row.version = forged_version;
    row.body = VersionBody::Data {
        manifest: signed.id,
        size_bytes: 1,
        etag: "\"forged\"".into(),
        headers: Default::default(),
    };
    forger
        .metadata()
        .write(vec![
            (
                cairn_model::rows::manifest_row("drops", &signed.id),
                cairn_protocol::meta::RowValue::Immutable(signed.encoded.clone()),
            ),
            (
                cairn_model::rows::versions_row("drops", "k0", &forged_version),
                cairn_protocol::meta::RowValue::Version(Box::new(row)),
            ),
        ])
        .await
        .unwrap();
    let forged_hold = Hold::sign(
        cluster.members[forger_index].identity.signing_key(),
        &fragment,
        manifest.upload,
        ObjectKeyDigest::of("drops", "k0"),
        0,
    );
    forger
        .put_fragment(&forger_id, fragment, &bytes, forged_hold)
        .await
        .unwrap();
    let why = refused(
        forger
            .drop_copy(&keeper, fragment, "drops", "k0", forged_version, forger_id)
            .await,
        "a drop on a forged version's word",
    );
    assert!(why.contains("takes this node"), "{why}");
    assert_eq!(state(&keeper), Some(FragmentState::Live));
    // While it exists the forged version also stands in the way of honest
    // drops (it does not place the fragment on the keeper); purged, it no
    // longer counts.
    let mut purged = match forger
        .metadata()
        .read(vec![cairn_model::rows::versions_row(
            "drops",
            "k0",
            &forged_version,
        )])
        .await
        .unwrap()
        .remove(0)
    {
        Some(cairn_protocol::meta::RowValue::Version(version)) => version,
        other => panic!("{other:?}"),
    };
    purged.purged = Some(forger.metadata().timestamp());
    forger
        .metadata()
        .write(vec![(
            cairn_model::rows::versions_row("drops", "k0", &forged_version),
            cairn_protocol::meta::RowValue::Version(purged),
        )])
        .await
        .unwrap();
    // The keeper must show the bytes: with its copy in its trash, it cannot.
    let keeper_store = cluster.node(cluster.index_of(&keeper)).store();
    keeper_store.delete(&fragment, 0).unwrap();
    let why = refused(
        member
            .drop_copy(&spare, fragment, "drops", "k0", version, keeper)
            .await,
        "a drop whose keeper lacks the fragment",
    );
    assert!(why.contains("did not show"), "{why}");
    assert_eq!(state(&spare), Some(FragmentState::Live));
    keeper_store.restore(&fragment).unwrap();
    // The keeper shows the fragment only when its own map places it there
    // (two nodes whose maps differ cannot each drop on the other's word):
    // the spare, which holds it off placement, refuses to be a keeper.
    let (upload, len) = (manifest.upload, bytes.len() as u64);
    // Asked from the forger's node: neither the keeper nor the spare.
    let ask_keep = |node: NodeId| async move {
        assert!(forger.reach(&node, Duration::from_secs(20)).await);
        let stream = forger.open_raw_piece_stream(&node).await.unwrap();
        cairn_node::pieces::keep_check(stream, fragment, "drops", "k0", version, upload, len).await
    };
    match ask_keep(spare).await {
        Err(PieceError::Rejected {
            code: RejectCode::Unauthorized,
            message,
        }) => assert!(message.contains("does not take this node"), "{message}"),
        other => panic!("a spare showed itself as keeper: {other:?}"),
    }
    assert_eq!(ask_keep(keeper).await.unwrap(), bytes);
    // A copy the keeper holds for another object does not vouch: a member
    // that planted it there could have it released later.
    let hold_for = |object: &str| {
        Hold::sign(
            signer,
            &fragment,
            manifest.upload,
            ObjectKeyDigest::of("drops", object),
            0,
        )
    };
    keeper_store.delete(&fragment, 0).unwrap();
    forger
        .put_fragment(&keeper, fragment, &bytes, hold_for("planted"))
        .await
        .unwrap();
    match ask_keep(keeper).await {
        Err(PieceError::Rejected {
            code: RejectCode::Unauthorized,
            message,
        }) => assert!(message.contains("no live copy"), "{message}"),
        other => panic!("a copy held for another object vouched: {other:?}"),
    }
    keeper_store.delete(&fragment, 0).unwrap();
    forger
        .put_fragment(&keeper, fragment, &bytes, hold_for("k0"))
        .await
        .unwrap();
    // Everything checks out: the copy goes to the spare's trash.
    member
        .drop_copy(&spare, fragment, "drops", "k0", version, keeper)
        .await
        .unwrap();
    assert_eq!(state(&spare), Some(FragmentState::Trash));
    assert_eq!(state(&keeper), Some(FragmentState::Live));
    assert!(get_bytes(&client, "drops", "k0").await == objects[0].1);
    gateway.stop().await;
    cluster.shutdown().await;
}

/// Every fragment of an existing version in the trash (a restore cut off
/// between its commit and its requests to the nodes, or a release that
/// should not have been): repair finds the segments too short to read and
/// has the nodes bring the fragments back from their trash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fragments_of_an_existing_version_are_brought_back_from_the_trash() {
    let (cluster, gateway, client) = three_sites_of_three("back").await;
    let _collectors = start_collectors(&cluster, Collection::default());
    let objects = put_objects(&client, "back", &[1 << 20, 5 << 20], 13_000).await;
    let keys: Vec<String> = objects.iter().map(|(k, _)| k.clone()).collect();
    let segments = segments_of(&cluster, 0, "back", &keys).await;
    let mut trashed = 0;
    for member in &cluster.members {
        let store = member.node.as_ref().unwrap().store();
        for id in segments.iter().flat_map(|(_, ids)| ids) {
            if store
                .entry(id)
                .unwrap()
                .is_some_and(|e| e.state == FragmentState::Live)
            {
                store.delete(id, 0).unwrap();
                trashed += 1;
            }
        }
    }
    assert!(trashed > 0);
    assert!(live_copies(&cluster).is_empty());
    let mut repairers: Vec<Repairer> = (0..cluster.members.len())
        .map(|i| Repairer::start(cluster.node(i).handle(), QUICK_REPAIR))
        .collect();
    repair_until_in_place(&cluster, &mut repairers, "back", &keys).await;
    drop(repairers);
    for (name, body) in &objects {
        assert!(get_bytes(&client, "back", name).await == *body, "{name}");
    }
    gateway.stop().await;
    cluster.shutdown().await;
}

/// Copies of one fragment planted on other nodes of its segment's set
/// (anyone holding the bytes can put them) neither starve a read (each
/// node is asked for the fragment it was written first) nor let a node of
/// the set vouch for a fragment the set does not otherwise hold: a copy
/// off placement is dropped only while the segment is whole on its placed
/// nodes, each counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_planted_on_the_set_neither_starve_a_read_nor_vouch_for_a_drop() {
    use cairn_node::pieces::PieceError;
    use cairn_node::swarm::NodeError;
    use cairn_protocol::wire::{Hold, ObjectKeyDigest, RejectCode};
    let (cluster, gateway, client) = three_sites_of_three("plant").await;
    let _collectors = start_collectors(&cluster, Collection::default());
    let objects = put_objects(&client, "plant", &[1 << 20], 14_000).await;
    let node = cluster.node(0);
    let (_, manifest) = first_manifest(node, "plant", "k0").await;
    let segment = &manifest.parts[0].segments[0];
    let map = node.cluster_map().unwrap();
    let placer = Placer::new(&map.map, manifest.layout.scheme, map.tolerance).unwrap();
    let placed = placer.place(&segment_placement_key(&segment.fragments));
    let fragment = segment.fragments[0];
    let bytes = node
        .get_fragment(&placed[0], fragment, 0, u64::MAX)
        .await
        .unwrap();
    let member = cluster.node(1);
    let hold = || {
        Hold::sign(
            cluster.members[1].identity.signing_key(),
            &fragment,
            manifest.upload,
            ObjectKeyDigest::of("plant", "k0"),
            0,
        )
    };
    // Fragment 0 on three more nodes of the set, each still holding its own.
    for other in &placed[1..4] {
        member
            .put_fragment(other, fragment, &bytes, hold())
            .await
            .unwrap();
    }
    assert!(
        get_bytes(&client, "plant", "k0").await == objects[0].1,
        "the read was starved by the planted copies"
    );
    // Fragment 0 leaves its place and survives only on a spare (as after
    // a map change, before repair) and on a node of the set that holds
    // another fragment: that node vouching cannot get the spare's copy
    // dropped, since the set holds five distinct fragments for the upload
    // on five nodes.
    let spare = cluster
        .node_ids()
        .into_iter()
        .find(|n| !placed.contains(n))
        .unwrap();
    member
        .put_fragment(&spare, fragment, &bytes, hold())
        .await
        .unwrap();
    cluster
        .node(cluster.index_of(&placed[0]))
        .store()
        .delete(&fragment, 0)
        .unwrap();
    // Back at its place, but held for another upload (a release of that
    // upload would trash it): it does not count either.
    let foreign = Hold::sign(
        cluster.members[1].identity.signing_key(),
        &fragment,
        cairn_protocol::ids::UploadId([0x77; 16]),
        ObjectKeyDigest::of("plant", "k0"),
        0,
    );
    member
        .put_fragment(&placed[0], fragment, &bytes, foreign)
        .await
        .unwrap();
    let outcome = member
        .drop_copy(&spare, fragment, "plant", "k0", manifest.version, placed[2])
        .await;
    match outcome {
        Err(NodeError::Piece(PieceError::Rejected {
            code: RejectCode::Unauthorized,
            message,
        })) => assert!(message.contains("not whole"), "{message}"),
        other => panic!("a drop vouched for by a node holding another fragment: {other:?}"),
    }
    let spare_state = cluster
        .node(cluster.index_of(&spare))
        .store()
        .entry(&fragment)
        .unwrap()
        .map(|e| e.state);
    assert_eq!(spare_state, Some(FragmentState::Live));
    gateway.stop().await;
    cluster.shutdown().await;
}
