//! Placement laws over realistic maps: determinism, distinct nodes, the
//! site cap, balance by capacity and minimal movement.

use std::collections::{BTreeMap, BTreeSet};

use cairn_protocol::erasure::Scheme;
use cairn_protocol::ids::{NodeId, SiteId};
use cairn_protocol::placement::{
    ClusterMap, MapNode, NodeState, PlacementError, Placer, Tolerance,
};

fn node_id(site: usize, index: usize) -> NodeId {
    let mut id = [0u8; 32];
    id[0] = site as u8;
    id[1] = index as u8;
    id[2] = 0xc4;
    NodeId(*blake3::hash(&id).as_bytes())
}

/// `sites[s]` lists the capacities (TB) of site `s`'s nodes.
fn map(sites: &[&[u64]]) -> ClusterMap {
    let nodes = sites
        .iter()
        .enumerate()
        .flat_map(|(s, capacities)| {
            capacities.iter().enumerate().map(move |(i, &tb)| MapNode {
                id: node_id(s, i),
                site: SiteId::new(&format!("site-{s}")).unwrap(),
                capacity_bytes: tb << 40,
                state: NodeState::Up,
                since: 1,
            })
        })
        .collect();
    ClusterMap { version: 1, nodes }
}

fn key(i: u64) -> [u8; 32] {
    *blake3::hash(&i.to_be_bytes()).as_bytes()
}

fn scheme(k: u8, m: u8) -> Scheme {
    Scheme::new(k, m).unwrap()
}

#[test]
fn placement_is_deterministic_distinct_and_respects_the_site_cap() {
    let map = map(&[&[1, 2, 3, 4], &[2, 2, 3, 3], &[1, 1, 4, 4]]);
    let placer = Placer::new(&map, scheme(4, 2), Tolerance::default()).unwrap();
    let again = Placer::new(&map, scheme(4, 2), Tolerance::default()).unwrap();
    let site_of: BTreeMap<NodeId, SiteId> =
        map.nodes.iter().map(|n| (n.id, n.site.clone())).collect();
    for i in 0..5_000 {
        let chosen = placer.place(&key(i));
        assert_eq!(chosen, again.place(&key(i)));
        assert_eq!(chosen.len(), 6);
        assert_eq!(
            chosen.iter().collect::<BTreeSet<_>>().len(),
            6,
            "a node holds two fragments"
        );
        let mut per_site = BTreeMap::new();
        for node in &chosen {
            *per_site.entry(&site_of[node]).or_insert(0) += 1;
        }
        assert!(
            per_site.values().all(|&n| n <= placer.site_cap()),
            "{per_site:?}"
        );
    }
}

/// Each node's share of 100 000 placements against its capacity share.
fn shares(map: &ClusterMap, placer: &Placer, ids: u64) -> Vec<(f64, f64)> {
    let mut counts: BTreeMap<NodeId, u64> = BTreeMap::new();
    for i in 0..ids {
        for node in placer.place(&key(i)) {
            *counts.entry(node).or_default() += 1;
        }
    }
    let placed: u64 = counts.values().sum();
    let capacity: u64 = map.nodes.iter().map(|n| n.capacity_bytes).sum();
    map.nodes
        .iter()
        .map(|n| {
            (
                counts.get(&n.id).copied().unwrap_or(0) as f64 / placed as f64,
                n.capacity_bytes as f64 / capacity as f64,
            )
        })
        .collect()
}

#[test]
fn every_node_gets_its_capacity_share_within_five_percent() {
    let map = map(&[&[1, 2, 3, 4], &[2, 2, 3, 3], &[1, 1, 4, 4]]);
    let placer = Placer::new(&map, scheme(4, 2), Tolerance::default()).unwrap();
    let ratios: Vec<f64> = shares(&map, &placer, 100_000)
        .iter()
        .map(|(got, want)| got / want)
        .collect();
    eprintln!("share / capacity share per node: {ratios:.4?}");
    for (node, ratio) in ratios.iter().enumerate() {
        assert!(
            (0.95..=1.05).contains(ratio),
            "node {node}: share / capacity share = {ratio:.4}"
        );
    }
}

#[test]
fn balance_holds_when_site_caps_do_not_bind_every_time() {
    // 4+2 on 4 sites: a site may hold 2, so sites are not filled evenly.
    let map = map(&[&[1, 2, 3, 5], &[2, 2, 3, 4], &[1, 3, 3, 4], &[2, 3, 3, 3]]);
    let placer = Placer::new(&map, scheme(4, 2), Tolerance::default()).unwrap();
    let ratios: Vec<f64> = shares(&map, &placer, 100_000)
        .iter()
        .map(|(got, want)| got / want)
        .collect();
    eprintln!("share / capacity share per node (4 sites): {ratios:.4?}");
    for (node, ratio) in ratios.iter().enumerate() {
        assert!(
            (0.90..=1.10).contains(ratio),
            "node {node}: share / capacity share = {ratio:.4}"
        );
    }
}

fn moved_fraction(before: &Placer, after: &Placer, ids: u64) -> f64 {
    let mut moved = 0usize;
    for i in 0..ids {
        let old: BTreeSet<NodeId> = before.place(&key(i)).into_iter().collect();
        let new: BTreeSet<NodeId> = after.place(&key(i)).into_iter().collect();
        moved += new.difference(&old).count();
    }
    moved as f64 / (ids as f64 * before.scheme().total() as f64)
}

#[test]
fn adding_a_node_moves_about_one_nth_of_the_placements() {
    let sites: [&[u64]; 3] = [&[2, 3, 2, 3], &[2, 2, 3, 3], &[3, 3, 2, 2]];
    let before = map(&sites);
    let mut after = before.clone();
    after.version += 1;
    after.nodes.push(MapNode {
        id: node_id(0, 99),
        site: SiteId::new("site-0").unwrap(),
        capacity_bytes: 5 << 40,
        state: NodeState::Up,
        since: 1,
    });
    let s = scheme(4, 2);
    let (p0, p1) = (
        Placer::new(&before, s, Tolerance::default()).unwrap(),
        Placer::new(&after, s, Tolerance::default()).unwrap(),
    );
    let moved = moved_fraction(&p0, &p1, 20_000);
    let ideal = 1.0 / after.nodes.len() as f64;
    eprintln!(
        "moved {moved:.4} of placements; 1/N = {ideal:.4}; ratio {:.3}",
        moved / ideal
    );
    assert!(moved <= 1.5 * ideal, "moved {moved:.4}, ideal {ideal:.4}");
    assert!(
        moved >= 0.5 * ideal,
        "the new node took almost nothing: {moved:.4}"
    );
}

#[test]
fn a_down_node_keeps_its_placement_and_a_draining_one_loses_it() {
    let mut m = map(&[&[1, 1, 1], &[1, 1, 1], &[1, 1, 1]]);
    let s = scheme(5, 4);
    let base = Placer::new(&m, s, Tolerance { extra_nodes: 1 }).unwrap();
    m.nodes[0].state = NodeState::Down;
    let down = Placer::new(&m, s, Tolerance { extra_nodes: 1 }).unwrap();
    for i in 0..200 {
        assert_eq!(base.place(&key(i)), down.place(&key(i)));
    }
    let mut m = map(&[&[1, 1, 1, 1], &[1, 1, 1], &[1, 1, 1]]);
    m.nodes[0].state = NodeState::Draining;
    let draining = Placer::new(&m, s, Tolerance { extra_nodes: 1 }).unwrap();
    for i in 0..200 {
        assert!(!draining.place(&key(i)).contains(&m.nodes[0].id));
    }
}

#[test]
fn safe_schemes_are_accepted() {
    let p = Placer::new(
        &map(&[&[1, 1], &[1, 1], &[1, 1]]),
        scheme(4, 2),
        Tolerance::default(),
    )
    .unwrap();
    assert_eq!(p.site_cap(), 2);
    let p = Placer::new(
        &map(&[&[1; 3], &[1; 3], &[1; 3]]),
        scheme(5, 4),
        Tolerance { extra_nodes: 1 },
    )
    .unwrap();
    assert_eq!(p.site_cap(), 3);
}

fn refusal(sites: &[&[u64]], s: Scheme, extra_nodes: u8) -> String {
    match Placer::new(&map(sites), s, Tolerance { extra_nodes }) {
        Err(e @ PlacementError::Unsafe { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn unsafe_schemes_are_refused_with_what_would_work() {
    let two_sites = refusal(&[&[1; 3], &[1; 3]], scheme(4, 2), 0);
    assert!(
        two_sites.contains("cannot survive the loss of a site"),
        "{two_sites}"
    );
    assert!(two_sites.contains("2+2"), "{two_sites}");
    assert!(two_sites.contains("add 1 site"), "{two_sites}");

    let plus_node = refusal(&[&[1, 1], &[1, 1], &[1, 1]], scheme(4, 2), 1);
    assert!(plus_node.contains("and 1 more node"), "{plus_node}");
    assert!(plus_node.contains("What would work"), "{plus_node}");

    let one_site = refusal(&[&[1; 12]], scheme(4, 2), 0);
    assert!(one_site.contains("1 site(s)"), "{one_site}");
}

#[test]
fn duplicate_nodes_are_refused() {
    let mut m = map(&[&[1, 1], &[1, 1], &[1, 1]]);
    m.nodes.push(m.nodes[0].clone());
    assert!(matches!(
        Placer::new(&m, scheme(4, 2), Tolerance::default()),
        Err(PlacementError::DuplicateNode(_))
    ));
}

/// Fragments that move when the map changes: each segment's fragments
/// held as written under `before`, arranged under `after`
/// (`Placer::arrange`); a fragment moves when its node changes. Returns
/// (moved, the minimum: the nodes new to each placed set, and what the
/// written index alone would move), as fractions of all fragments.
fn moved_by_arrangement(before: &Placer, after: &Placer, ids: u64) -> (f64, f64, f64) {
    let (mut moved, mut minimum, mut by_index) = (0usize, 0usize, 0usize);
    for i in 0..ids {
        let (old, new) = (before.place(&key(i)), after.place(&key(i)));
        let holders: Vec<Vec<NodeId>> = old.iter().map(|n| vec![*n]).collect();
        let arranged = Placer::arrange(&new, &holders);
        let mut sorted = arranged.clone();
        sorted.sort();
        let mut set = new.clone();
        set.sort();
        assert_eq!(sorted, set, "the arrangement is a permutation of the set");
        moved += old.iter().zip(&arranged).filter(|(o, n)| o != n).count();
        by_index += old.iter().zip(&new).filter(|(o, n)| o != n).count();
        let old: BTreeSet<NodeId> = old.into_iter().collect();
        minimum += new.iter().filter(|n| !old.contains(n)).count();
    }
    let all = ids as f64 * before.scheme().total() as f64;
    (
        moved as f64 / all,
        minimum as f64 / all,
        by_index as f64 / all,
    )
}

/// A site of two nodes added to three (4+2): how many fragments change
/// node against the minimum, the fragments the new nodes take
/// (spec/placement.md, "Fragment indexes"). Arranged by what the nodes
/// hold, only the fragments of nodes leaving a set move: the minimum
/// exactly, where fragment `i` on the `i`-th node taken would move 2.66
/// times as many.
#[test]
fn a_site_added_moves_the_minimum_of_fragments() {
    let three = map(&[&[1, 1], &[1, 1], &[1, 1]]);
    let four = {
        let mut four = map(&[&[1, 1], &[1, 1], &[1, 1], &[1, 1]]);
        four.version = 2;
        four
    };
    let s = scheme(4, 2);
    let (p0, p1) = (
        Placer::new(&three, s, Tolerance::default()).unwrap(),
        Placer::new(&four, s, Tolerance::default()).unwrap(),
    );
    let (moved, minimum, by_index) = moved_by_arrangement(&p0, &p1, 20_000);
    eprintln!(
        "a fourth site: {moved:.4} of fragments change node (by written index: {by_index:.4}); the minimum is {minimum:.4}"
    );
    assert!(minimum > 0.2 && minimum < 0.3, "{minimum}");
    assert_eq!(moved, minimum, "moved {moved:.4}, minimum {minimum:.4}");
    assert!(by_index > 2.0 * minimum, "{by_index}");
}

/// Arranging keeps what is at its place, gives a fragment held by a node
/// of the set to that node, and fills the gaps from the nodes holding
/// nothing; a segment with its fragments where they were written is
/// arranged as placed.
#[test]
fn arranging_keeps_holders_in_the_set_and_fills_the_rest() {
    let n = |i: usize| node_id(9, i);
    let placed = [n(0), n(1), n(2), n(3)];
    let as_written: Vec<Vec<NodeId>> = placed.iter().map(|p| vec![*p]).collect();
    assert_eq!(Placer::arrange(&placed, &as_written), placed);
    // n(1) holds fragment 3, fragment 1 is nowhere, n(9) (off the set)
    // holds fragment 0 and n(0) nothing.
    let holders = vec![vec![n(9)], vec![], vec![n(2)], vec![n(1)]];
    assert_eq!(Placer::arrange(&placed, &holders), [n(0), n(3), n(2), n(1)]);
    // Two nodes holding the same fragment: one keeps it, the other gets
    // a fragment held nowhere.
    let holders = vec![vec![n(1), n(0)], vec![n(1)], vec![], vec![n(3)]];
    assert_eq!(Placer::arrange(&placed, &holders), [n(0), n(1), n(2), n(3)]);
    // Lengths that disagree give the placement back.
    assert_eq!(Placer::arrange(&placed, &[]), placed);
}
