//! Placement: which nodes hold the fragments of a segment (spec/placement.md).
//!
//! Weighted rendezvous hashing ranks the nodes for an id; a walk down the
//! ranking takes nodes while no site exceeds its cap, so losing a whole
//! site (and, if asked, one more node) leaves at least `k` fragments.
//!
//! Taking the top `k + m` of a weighted ranking is weighted sampling without
//! replacement, which under-serves large nodes. The weights are therefore
//! calibrated so that each node's chance to be chosen is proportional to its
//! capacity. Every float operation here is an IEEE basic operation in a
//! fixed order (no libm), so all nodes on all platforms agree bit for bit.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::erasure::Scheme;
use crate::ids::{NodeId, SiteId};

/// What a node is doing, as the cluster map says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Serving and taking new fragments.
    Up,
    /// Unreachable for now: keeps its share of placement, so a transient
    /// failure moves nothing; writers hand its fragments to the next node.
    Down,
    /// Being emptied: takes no new fragments, still serves what it holds.
    Draining,
    /// Gone from the cluster.
    Out,
}

impl NodeState {
    /// Whether the node has a share of placement.
    pub fn is_placed(self) -> bool {
        matches!(self, Self::Up | Self::Down)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapNode {
    pub id: NodeId,
    pub site: SiteId,
    pub capacity_bytes: u64,
    pub state: NodeState,
    /// The map version from which this node has been a member without a
    /// break (0: unknown, from a map of an older format). A node that held
    /// an older map than this forgets its metadata replica before adopting
    /// it (spec/membership.md, "Membership since").
    pub since: u64,
}

/// The cluster map: every node, its site, capacity and state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterMap {
    pub version: u64,
    pub nodes: Vec<MapNode>,
}

/// How many failures beyond one whole site the placement must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tolerance {
    pub extra_nodes: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    #[error("node {0} appears twice in the cluster map")]
    DuplicateNode(NodeId),
    #[error(
        "scheme {scheme} cannot survive the loss of a site{extra} on this map: {reason}. What would work: {suggestion}"
    )]
    Unsafe {
        scheme: Scheme,
        extra: String,
        reason: String,
        suggestion: String,
    },
}

/// A validated placement policy for one scheme over one map.
#[derive(Debug, Clone)]
pub struct Placer {
    scheme: Scheme,
    site_cap: usize,
    /// Nodes lost beyond one whole site that a segment must survive.
    extra_nodes: usize,
    /// Placed nodes: id, site index, weight (`None`: always chosen first).
    nodes: Vec<(NodeId, usize, Option<f64>)>,
    site_count: usize,
}

/// Bytes of a placement id: a segment key or a partition key.
pub type PlacementKey = [u8; 32];

const HASH_CONTEXT: &str = "cairn 2026-11 placement v1";

/// The placement key of a segment: its fragment ids in order, so that the
/// key is known once the segment is encoded and anyone holding the manifest
/// can recompute where the fragments belong.
pub fn segment_placement_key(fragments: &[crate::ids::FragmentId]) -> PlacementKey {
    let mut hasher = blake3::Hasher::new_derive_key("cairn 2026-11 segment placement v1");
    for id in fragments {
        hasher.update(id.as_bytes());
    }
    *hasher.finalize().as_bytes()
}

impl Placer {
    /// Checks that `scheme` on `map` keeps every segment readable after the
    /// loss of any one site plus `tolerance.extra_nodes` nodes, and prepares
    /// the calibrated weights.
    pub fn new(
        map: &ClusterMap,
        scheme: Scheme,
        tolerance: Tolerance,
    ) -> Result<Self, PlacementError> {
        let mut seen = std::collections::BTreeSet::new();
        for node in &map.nodes {
            if !seen.insert(node.id) {
                return Err(PlacementError::DuplicateNode(node.id));
            }
        }
        let mut sites: BTreeMap<&SiteId, Vec<&MapNode>> = BTreeMap::new();
        for node in map
            .nodes
            .iter()
            .filter(|n| n.state.is_placed() && n.capacity_bytes > 0)
        {
            sites.entry(&node.site).or_default().push(node);
        }
        let site_sizes: Vec<usize> = sites.values().map(Vec::len).collect();
        let site_cap = check_safety(scheme, tolerance, &site_sizes)?;
        let total = scheme.total();
        let tight = site_sizes.iter().map(|&n| n.min(site_cap)).sum::<usize>() == total;
        let mut nodes = Vec::new();
        if tight {
            // Every site always receives exactly min(cap, size) fragments:
            // calibrate within each site.
            for (site_index, members) in sites.values().enumerate() {
                let capacities: Vec<u64> = members.iter().map(|n| n.capacity_bytes).collect();
                let weights = calibrated_weights(&capacities, members.len().min(site_cap));
                nodes.extend(
                    members
                        .iter()
                        .zip(weights)
                        .map(|(n, w)| (n.id, site_index, w)),
                );
            }
        } else {
            let members: Vec<(usize, &MapNode)> = sites
                .values()
                .enumerate()
                .flat_map(|(i, members)| members.iter().map(move |n| (i, *n)))
                .collect();
            let capacities: Vec<u64> = members.iter().map(|(_, n)| n.capacity_bytes).collect();
            let weights = calibrated_weights(&capacities, total);
            nodes.extend(members.iter().zip(weights).map(|((i, n), w)| (n.id, *i, w)));
        }
        Ok(Self {
            scheme,
            site_cap,
            extra_nodes: usize::from(tolerance.extra_nodes),
            nodes,
            site_count: sites.len(),
        })
    }

    /// The site index of a placed node.
    pub fn site_of(&self, node: &NodeId) -> Option<usize> {
        self.nodes
            .iter()
            .find(|(id, _, _)| id == node)
            .map(|(_, site, _)| *site)
    }

    /// Whether a segment whose fragments are held by `holders` (one each)
    /// stays readable after the loss of any one site plus `extra_nodes`
    /// more nodes: what the map promises of every committed segment. The
    /// worst case loses the site holding the most fragments, then one
    /// fragment per extra node; a holder that is not a placed node of this
    /// map counts for nothing.
    pub fn survives(&self, holders: &[NodeId]) -> bool {
        let mut seen = std::collections::BTreeSet::new();
        let mut per_site = vec![0usize; self.site_count];
        for holder in holders {
            if seen.insert(*holder)
                && let Some(site) = self.site_of(holder)
            {
                per_site[site] += 1;
            }
        }
        let held: usize = per_site.iter().sum();
        let worst_site = per_site.iter().copied().max().unwrap_or(0);
        held.saturating_sub(worst_site)
            .saturating_sub(self.extra_nodes)
            >= self.scheme.data()
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The most fragments of one segment that any site may hold.
    pub fn site_cap(&self) -> usize {
        self.site_cap
    }

    /// Every placed node, best first, for `key`.
    pub fn rank(&self, key: &PlacementKey) -> Vec<NodeId> {
        self.ranked(key)
            .into_iter()
            .map(|i| self.nodes[i].0)
            .collect()
    }

    /// The `k + m` nodes for `key`, fragment `i` on the `i`-th: distinct
    /// nodes, at most `site_cap` per site.
    pub fn place(&self, key: &PlacementKey) -> Vec<NodeId> {
        let mut per_site = vec![0usize; self.site_count];
        let mut chosen = Vec::with_capacity(self.scheme.total());
        for index in self.ranked(key) {
            let (id, site, _) = self.nodes[index];
            if per_site[site] < self.site_cap {
                per_site[site] += 1;
                chosen.push(id);
                if chosen.len() == self.scheme.total() {
                    break;
                }
            }
        }
        chosen
    }

    /// Where each fragment of a segment belongs now, given the nodes found
    /// holding each (`holders[i]`, any nodes) and the set placement takes
    /// (`placed`, from [`Placer::place`]): a permutation of `placed`
    /// (spec/placement.md, "Fragment indexes"). A node of the set keeps a
    /// fragment it holds (its own placed index first); the fragments no
    /// node of the set holds go to the nodes of the set holding none, each
    /// to its placed node when that one is free, else in placement order.
    /// A map change thus moves only the fragments of nodes that left the
    /// set, to the nodes that joined it: the fewest there can be.
    pub fn arrange(placed: &[NodeId], holders: &[Vec<NodeId>]) -> Vec<NodeId> {
        if placed.len() != holders.len() {
            return placed.to_vec();
        }
        let mut place: Vec<Option<NodeId>> = vec![None; placed.len()];
        let mut used: Vec<bool> = vec![false; placed.len()];
        // Its own placed index first, so that a segment no map change
        // touched arranges as it was written.
        for (index, node) in placed.iter().enumerate() {
            if holders[index].contains(node) && !used[index] {
                place[index] = Some(*node);
                used[index] = true;
            }
        }
        for index in 0..placed.len() {
            if place[index].is_some() {
                continue;
            }
            if let Some(at) =
                (0..placed.len()).find(|&at| !used[at] && holders[index].contains(&placed[at]))
            {
                place[index] = Some(placed[at]);
                used[at] = true;
            }
        }
        for index in 0..placed.len() {
            if place[index].is_none() && !used[index] {
                place[index] = Some(placed[index]);
                used[index] = true;
            }
        }
        for slot in place.iter_mut().filter(|slot| slot.is_none()) {
            let at = (0..placed.len())
                .find(|&at| !used[at])
                .expect("as many nodes as fragments");
            *slot = Some(placed[at]);
            used[at] = true;
        }
        place
            .into_iter()
            .map(|n| n.expect("every index placed"))
            .collect()
    }

    fn ranked(&self, key: &PlacementKey) -> Vec<usize> {
        let base = blake3::Hasher::new_derive_key(HASH_CONTEXT);
        let mut scored: Vec<(u8, f64, usize)> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(index, (id, _, weight))| {
                let mut hasher = base.clone();
                hasher.update(key);
                hasher.update(id.as_bytes());
                let mut first = [0u8; 8];
                first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
                // A uniform draw in (0, 1), never 0 or 1.
                let unit = ((u64::from_be_bytes(first) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                let exponential = -det_ln(unit);
                match weight {
                    None => (0, exponential, index),
                    Some(w) => (1, exponential / w, index),
                }
            })
            .collect();
        // Scores are finite and never NaN; ties fall back to the node id.
        scored.sort_by(|a, b| {
            (a.0, a.1)
                .partial_cmp(&(b.0, b.1))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| self.nodes[a.2].0.cmp(&self.nodes[b.2].0))
        });
        scored.into_iter().map(|(_, _, index)| index).collect()
    }
}

/// Returns the per-site cap, or explains why the scheme is unsafe and what
/// would be safe instead.
fn check_safety(
    scheme: Scheme,
    tolerance: Tolerance,
    site_sizes: &[usize],
) -> Result<usize, PlacementError> {
    let (k, m, extra) = (
        scheme.data(),
        scheme.parity(),
        usize::from(tolerance.extra_nodes),
    );
    let total = k + m;
    let extra_text = if extra == 0 {
        String::new()
    } else {
        format!(
            " and {extra} more node{}",
            if extra == 1 { "" } else { "s" }
        )
    };
    let fits = |m: usize| -> bool {
        m > extra && site_sizes.iter().map(|&n| n.min(m - extra)).sum::<usize>() >= k + m
    };
    if fits(m) {
        return Ok(m - extra);
    }
    let reason = if m <= extra {
        format!(
            "m={m} parity fragments cannot cover a site and {extra} more node(s): a site must be allowed at least one fragment"
        )
    } else {
        let cap = m - extra;
        let room: usize = site_sizes.iter().map(|&n| n.min(cap)).sum();
        format!(
            "to survive, a site may hold at most {cap} of a segment's {total} fragments, and the {} site(s) with placed nodes ({}) hold only {room}",
            site_sizes.len(),
            site_sizes
                .iter()
                .map(|n| format!("{n} node(s)"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut options = Vec::new();
    if let Some(m2) = (m + 1..=usize::from(Scheme::MAX_PARITY)).find(|&m2| fits(m2)) {
        options.push(format!("{k}+{m2}"));
    }
    if let Some(k2) = (1..k).rev().find(|&k2| {
        let cap = m.saturating_sub(extra);
        cap > 0 && site_sizes.iter().map(|&n| n.min(cap)).sum::<usize>() >= k2 + m
    }) {
        options.push(format!("{k2}+{m}"));
    }
    let cap = m.saturating_sub(extra).max(1);
    let room: usize = site_sizes.iter().map(|&n| n.min(cap)).sum();
    let missing_sites = (total.saturating_sub(room)).div_ceil(cap);
    if m > extra && missing_sites > 0 {
        options.push(format!(
            "keep {scheme} and add {missing_sites} site(s) of at least {cap} up node(s) each"
        ));
    }
    if options.is_empty() {
        options.push("add sites and nodes".into());
    }
    Err(PlacementError::Unsafe {
        scheme,
        extra: extra_text,
        reason,
        suggestion: options.join(", or "),
    })
}

/// Weights under which the top-`picks` of the exponential ranking include
/// each node with probability `picks * capacity / total` (capped at 1).
/// `None` marks a node that must always be chosen.
fn calibrated_weights(capacities: &[u64], picks: usize) -> Vec<Option<f64>> {
    let n = capacities.len();
    let targets = inclusion_targets(capacities, picks);
    let mut weights: Vec<Option<f64>> = targets
        .iter()
        .map(|&t| if t >= 1.0 { None } else { Some(t) })
        .collect();
    let free: Vec<usize> = (0..n).filter(|&i| weights[i].is_some()).collect();
    let free_picks = picks.min(n) - (n - free.len());
    if free_picks == 0 || free.is_empty() {
        return weights;
    }
    let goal: Vec<f64> = free.iter().map(|&i| targets[i]).collect();
    // Rosén's approximation for successive sampling as the starting point.
    let mut w: Vec<f64> = goal.iter().map(|&t| -det_ln(1.0 - t)).collect();
    for _ in 0..60 {
        let actual = inclusion_probabilities(&w, free_picks);
        let mut worst: f64 = 0.0;
        for j in 0..w.len() {
            let ratio = goal[j] / actual[j];
            worst = worst.max((ratio - 1.0).abs());
            w[j] *= ratio;
        }
        let mean = w.iter().sum::<f64>() / w.len() as f64;
        for x in &mut w {
            *x /= mean;
        }
        if worst < 1e-9 {
            break;
        }
    }
    for (slot, &i) in free.iter().enumerate() {
        weights[i] = Some(w[slot]);
    }
    weights
}

/// Each node's target chance of being chosen, water-filled so that none
/// exceeds 1: a node that would need more than certainty is always chosen
/// and the rest share the remaining picks.
fn inclusion_targets(capacities: &[u64], picks: usize) -> Vec<f64> {
    let n = capacities.len();
    let mut targets = vec![0.0; n];
    let mut fixed = vec![false; n];
    loop {
        let remaining_picks = picks.min(n) - fixed.iter().filter(|&&f| f).count();
        let remaining_capacity: f64 = (0..n)
            .filter(|&i| !fixed[i])
            .map(|i| capacities[i] as f64)
            .sum();
        let mut changed = false;
        for i in 0..n {
            if fixed[i] {
                continue;
            }
            let t = remaining_picks as f64 * capacities[i] as f64 / remaining_capacity;
            if t >= 1.0 {
                fixed[i] = true;
                targets[i] = 1.0;
                changed = true;
            } else {
                targets[i] = t;
            }
        }
        if !changed {
            return targets;
        }
    }
}

/// Exact (to quadrature error) inclusion probabilities of "the `picks`
/// smallest of independent Exp(w_i)": the integral over x of node i's
/// density at x times the chance that fewer than `picks` others fall below x.
fn inclusion_probabilities(w: &[f64], picks: usize) -> Vec<f64> {
    const STEPS: usize = 1024;
    let n = w.len();
    if n <= picks {
        return vec![1.0; n];
    }
    let mean = w.iter().sum::<f64>() / n as f64;
    let mut result = vec![0.0; n];
    let mut q = vec![0.0; n];
    // prefix[j * picks + c]: chance that exactly c of nodes 0..j fall below x.
    let mut prefix = vec![0.0; (n + 1) * picks];
    let mut suffix_cumulative = vec![0.0; (n + 1) * picks];
    let mut suffix = vec![0.0; picks];
    for step in 0..STEPS {
        let s = (step as f64 + 0.5) / STEPS as f64;
        let x = -det_ln(1.0 - s) / mean;
        let jacobian = 1.0 / ((1.0 - s) * mean);
        for j in 0..n {
            q[j] = 1.0 - det_exp(-w[j] * x);
        }
        prefix[..picks].fill(0.0);
        prefix[0] = 1.0;
        for j in 0..n {
            for c in 0..picks {
                let below = if c > 0 {
                    prefix[j * picks + c - 1] * q[j]
                } else {
                    0.0
                };
                prefix[(j + 1) * picks + c] = prefix[j * picks + c] * (1.0 - q[j]) + below;
            }
        }
        // Suffix distributions, stored as cumulative sums over c.
        suffix.fill(0.0);
        suffix[0] = 1.0;
        let write_cumulative = |j: usize, dist: &[f64], out: &mut Vec<f64>| {
            let mut sum = 0.0;
            for c in 0..picks {
                sum += dist[c];
                out[j * picks + c] = sum;
            }
        };
        write_cumulative(n, &suffix, &mut suffix_cumulative);
        for j in (0..n).rev() {
            for c in (0..picks).rev() {
                let below = if c > 0 { suffix[c - 1] * q[j] } else { 0.0 };
                suffix[c] = suffix[c] * (1.0 - q[j]) + below;
            }
            write_cumulative(j, &suffix, &mut suffix_cumulative);
        }
        for i in 0..n {
            // Fewer than `picks` of the others below x.
            let mut fewer = 0.0;
            for a in 0..picks {
                fewer +=
                    prefix[i * picks + a] * suffix_cumulative[(i + 1) * picks + (picks - 1 - a)];
            }
            result[i] += w[i] * det_exp(-w[i] * x) * fewer * jacobian / STEPS as f64;
        }
    }
    result
}

const LN_2: f64 = std::f64::consts::LN_2;

/// Natural logarithm of a positive normal number, from basic operations only.
pub(crate) fn det_ln(x: f64) -> f64 {
    debug_assert!(x > 0.0 && x.is_finite());
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut mantissa = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if mantissa > std::f64::consts::SQRT_2 {
        mantissa /= 2.0;
        exponent += 1;
    }
    // ln(m) = 2 atanh(s) with |s| < 0.172: the series converges fast.
    let s = (mantissa - 1.0) / (mantissa + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = s;
    for k in 1..16 {
        term *= s2;
        sum += term / (2 * k + 1) as f64;
    }
    2.0 * sum + exponent as f64 * LN_2
}

/// e^x for x <= 0 (what the calibration needs), from basic operations only.
pub(crate) fn det_exp(x: f64) -> f64 {
    if x < -740.0 {
        return 0.0;
    }
    let k = (x / LN_2).round();
    let r = x - k * LN_2;
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 1..22 {
        term *= r / n as f64;
        sum += term;
    }
    let mut k = k as i64;
    let mut scale = 1.0;
    while k < -1000 {
        scale *= f64::from_bits(((-1000 + 1023) as u64) << 52);
        k += 1000;
    }
    sum * scale * f64::from_bits(((k + 1023) as u64) << 52)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_math_matches_libm() {
        for &x in &[
            1e-300,
            1e-16,
            0.001,
            0.3,
            0.5,
            std::f64::consts::FRAC_1_SQRT_2,
            std::f64::consts::SQRT_2,
            1.5,
            0.999999,
            1.0,
            2.0,
            12345.678,
        ] {
            let err = (det_ln(x) - x.ln()).abs();
            assert!(
                err <= 4.0 * f64::EPSILON * x.ln().abs().max(1.0),
                "ln({x}) off by {err}"
            );
        }
        for &x in &[0.0, -1e-9, -0.3, -1.0, -5.5, -20.0, -300.0, -700.0] {
            let rel = ((det_exp(x) - x.exp()) / x.exp()).abs();
            assert!(rel < 1e-13, "exp({x}) off by {rel}");
        }
    }

    #[test]
    fn calibration_hits_the_targets() {
        let w = calibrated_weights(&[1, 2, 3, 4], 2);
        let w: Vec<f64> = w.into_iter().map(Option::unwrap).collect();
        let p = inclusion_probabilities(&w, 2);
        for (got, want) in p.iter().zip([0.2, 0.4, 0.6, 0.8]) {
            assert!((got - want).abs() < 1e-6, "{p:?}");
        }
    }

    fn map_of(sites: &[usize]) -> ClusterMap {
        let mut nodes = Vec::new();
        for (site, &count) in sites.iter().enumerate() {
            for i in 0..count {
                nodes.push(MapNode {
                    id: NodeId([(site * 16 + i) as u8; 32]),
                    site: SiteId::new(&format!("site-{site}")).unwrap(),
                    capacity_bytes: 1 << 40,
                    state: NodeState::Up,
                    since: 1,
                });
            }
        }
        ClusterMap { version: 1, nodes }
    }

    fn node(site: usize, i: usize) -> NodeId {
        NodeId([(site * 16 + i) as u8; 32])
    }

    #[test]
    fn survival_counts_the_worst_site_and_the_extra_nodes() {
        let four_two = Scheme::new(4, 2).unwrap();
        let placer = Placer::new(&map_of(&[3, 3, 3]), four_two, Tolerance::default()).unwrap();
        let all = [
            node(0, 0),
            node(0, 1),
            node(1, 0),
            node(1, 1),
            node(2, 0),
            node(2, 1),
        ];
        assert!(placer.survives(&all));
        // One fragment missing: of 5, a site loss takes 2 and leaves 3,
        // fewer than k = 4.
        assert!(!placer.survives(&all[..5]));
        // Three in one site (a replacement that ignored the cap): a site
        // loss leaves 3 of 6.
        let crowded = [
            node(0, 0),
            node(0, 1),
            node(0, 2),
            node(1, 0),
            node(1, 1),
            node(2, 0),
        ];
        assert!(!placer.survives(&crowded));
        // Repeated holders and strangers count once and not at all.
        let repeated = [all[0], all[0], all[1], all[2], all[3], all[4], all[5]];
        assert!(placer.survives(&repeated));
        let mut stranger = all;
        stranger[5] = NodeId([0xee; 32]);
        assert!(!placer.survives(&stranger));

        let five_four = Scheme::new(5, 4).unwrap();
        let tolerant =
            Placer::new(&map_of(&[3, 3, 3]), five_four, Tolerance { extra_nodes: 1 }).unwrap();
        let nine: Vec<NodeId> = (0..3)
            .flat_map(|s| (0..3).map(move |i| node(s, i)))
            .collect();
        assert!(tolerant.survives(&nine));
        // Eight of nine: a site of 3 and one more node leave 4 < 5.
        assert!(!tolerant.survives(&nine[..8]));
    }

    #[test]
    fn water_filling_caps_targets_at_certainty() {
        let t = inclusion_targets(&[10, 1, 1], 2);
        assert_eq!(t[0], 1.0);
        assert!((t[1] - 0.5).abs() < 1e-12 && (t[2] - 0.5).abs() < 1e-12);
    }
}
