//! `cairn admin status`: every node of the map, what it holds, its scrub
//! and its repair, and the cluster's segments by strength.

use std::collections::BTreeMap;
use std::fmt::Write;

use cairn_protocol::ids::NodeId;
use cairn_protocol::placement::{MapNode, NodeState};
use cairn_protocol::status::NodeStatus;

/// The report for `nodes` (the map's, in order) and each one's answer:
/// its status, or why it could not be asked. `now_unix_ms` dates the ages.
pub fn render(
    nodes: &[MapNode],
    answers: &BTreeMap<NodeId, Result<NodeStatus, String>>,
    now_unix_ms: u64,
) -> String {
    let mut out = String::new();
    let age = |at: u64| {
        if at == 0 {
            "never".to_owned()
        } else {
            let seconds = now_unix_ms.saturating_sub(at) / 1000;
            match seconds {
                0..120 => format!("{seconds} s ago"),
                120..7200 => format!("{} min ago", seconds / 60),
                7200..172_800 => format!("{} h ago", seconds / 3600),
                _ => format!("{} d ago", seconds / 86_400),
            }
        }
    };
    let gib = |bytes: u64| {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut value = bytes as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < units.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            format!("{bytes} B")
        } else {
            format!("{value:.1} {}", units[unit])
        }
    };
    let _ = writeln!(out, "nodes");
    for node in nodes {
        let short = node.id.to_string();
        let short = &short[..short.len().min(12)];
        let state = format!("{:?}", node.state).to_lowercase();
        match answers.get(&node.id) {
            Some(Ok(status)) => {
                let s = &status.store;
                let c = &status.scrub;
                let scrub = if c.pass_started_unix_ms != 0 {
                    format!(
                        "scrubbing ({} checked), last pass {}",
                        c.pass_checked,
                        age(c.last_finished_unix_ms)
                    )
                } else {
                    format!("last scrub {}", age(c.last_finished_unix_ms))
                };
                let _ = writeln!(
                    out,
                    "  {site:<12} {short}  {state:<8} ok    live {live} of {cap} ({frags} fragments; {used} in volumes), trash {trash}, quarantined {q}; {scrub}, corrupt found {corrupt}",
                    site = node.site.as_str(),
                    live = gib(s.live_bytes),
                    cap = gib(s.capacity_bytes),
                    frags = s.live,
                    used = gib(s.used_bytes),
                    trash = s.trash,
                    q = s.quarantined,
                    corrupt = c.corrupt_found,
                );
                let l = &status.lifecycle;
                if l.passes > 0 {
                    let _ = writeln!(
                        out,
                        "  {:<12} {short}  lifecycle: last pass {} over {} buckets; since start expired {}, noncurrent expired {}, delete markers removed {}, uploads aborted {}, kept by a lock {}, failed {}",
                        "",
                        age(l.last_finished_unix_ms),
                        l.buckets,
                        l.expired,
                        l.noncurrent_expired,
                        l.markers_removed,
                        l.uploads_aborted,
                        l.kept_by_lock,
                        l.failed,
                    );
                }
                // What an operator waits for before marking a node out.
                if node.state == NodeState::Draining {
                    let _ = writeln!(
                        out,
                        "  {:<12} {short}  {}",
                        "",
                        if s.live == 0 {
                            "drained: holds no live fragment; once every segment is whole it can be marked out".to_owned()
                        } else {
                            format!("draining: {} live fragments still here", s.live)
                        }
                    );
                }
            }
            Some(Err(why)) => {
                let _ = writeln!(
                    out,
                    "  {site:<12} {short}  {state:<8} DOWN  {why}",
                    site = node.site.as_str()
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  {site:<12} {short}  {state:<8} not asked",
                    site = node.site.as_str()
                );
            }
        }
    }
    // Times every node must share: a node that releases sooner than a
    // gateway's writes may take, or purges its trash sooner than the
    // others, breaks their promises.
    for (what, of) in [
        (
            "trash periods",
            (|s: &NodeStatus| s.store.trash_period_ms) as fn(&NodeStatus) -> u64,
        ),
        ("release graces", |s: &NodeStatus| s.store.release_grace_ms),
    ] {
        let values: std::collections::BTreeSet<u64> = answers.values().flatten().map(of).collect();
        if values.len() > 1 {
            let seconds: Vec<String> = values.iter().map(|ms| format!("{} s", ms / 1000)).collect();
            let _ = writeln!(
                out,
                "WARNING: the nodes' {what} differ ({}): set [store] trash_period_seconds and [collection] the same on every node",
                seconds.join(", ")
            );
        }
    }
    // Segments are counted by the node responsible for their bucket, in
    // its last pass: the sum over nodes counts each once.
    let mut segments = 0;
    let mut whole = 0;
    let mut unreadable = 0;
    let mut pending = 0;
    let mut by_spares: BTreeMap<u8, u64> = BTreeMap::new();
    let mut rebuilt = 0;
    let mut copied = 0;
    let mut last_pass = Vec::new();
    // Figures come from the nodes: sums saturate rather than wrap.
    let mut never_passed = 0;
    for status in answers.values().flatten() {
        let r = &status.repair;
        segments = u64::saturating_add(segments, r.segments);
        whole = u64::saturating_add(whole, r.whole);
        unreadable = u64::saturating_add(unreadable, r.unreadable);
        pending = u64::saturating_add(pending, r.pending);
        for (spares, count) in &r.degraded_by_spares {
            let entry = by_spares.entry(*spares).or_default();
            *entry = entry.saturating_add(*count);
        }
        rebuilt = u64::saturating_add(rebuilt, r.rebuilt);
        copied = u64::saturating_add(copied, r.copied);
        last_pass.push(r.last_finished_unix_ms);
        never_passed += usize::from(r.passes == 0);
    }
    let down = answers.values().filter(|a| a.is_err()).count();
    let _ = writeln!(
        out,
        "segments (each node's last repair pass over the buckets it is first replica of)"
    );
    let _ = writeln!(out, "  checked {segments}, at full strength {whole}");
    if down > 0 || never_passed > 0 {
        // A bucket's segments are counted by one node: one that is down or
        // has not finished a pass leaves its buckets out, and one that
        // took over from it may count them twice.
        let _ = writeln!(
            out,
            "  INCOMPLETE: {down} node(s) did not answer and {never_passed} have not finished a repair pass; figures may miss or repeat buckets"
        );
    }
    for (spares, count) in &by_spares {
        let _ = writeln!(
            out,
            "  degraded, {spares} more loss{} from unreadable: {count}",
            if *spares == 1 { "" } else { "es" }
        );
    }
    let _ = writeln!(out, "  unreadable: {unreadable}");
    let _ = writeln!(out, "  left for a later pass: {pending}");
    let _ = writeln!(
        out,
        "repair since the nodes started: {rebuilt} fragments rebuilt, {copied} copied into place; oldest last pass {}",
        age(last_pass.iter().copied().min().unwrap_or(0))
    );
    out
}

/// The cluster's segments as the nodes' last repair passes saw them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Strength {
    pub segments: u64,
    pub whole: u64,
    pub degraded: u64,
    pub unreadable: u64,
    pub pending: u64,
    /// Nodes that did not answer, or have not finished a pass since.
    pub waiting_for: usize,
}

impl Strength {
    /// Sums the answers; a node counts as seen once it finished a pass
    /// that ended after `since_unix_ms`.
    pub fn of(answers: &BTreeMap<NodeId, Result<NodeStatus, String>>, since_unix_ms: u64) -> Self {
        let mut strength = Self::default();
        for answer in answers.values() {
            let Ok(status) = answer else {
                strength.waiting_for += 1;
                continue;
            };
            let r = &status.repair;
            if r.passes == 0 || r.last_finished_unix_ms < since_unix_ms {
                strength.waiting_for += 1;
            }
            strength.segments = strength.segments.saturating_add(r.segments);
            strength.whole = strength.whole.saturating_add(r.whole);
            strength.unreadable = strength.unreadable.saturating_add(r.unreadable);
            strength.pending = strength.pending.saturating_add(r.pending);
            for count in r.degraded_by_spares.values() {
                strength.degraded = strength.degraded.saturating_add(*count);
            }
        }
        strength
    }

    /// Every node has passed since, and nothing is left to repair.
    pub fn settled(&self) -> bool {
        self.waiting_for == 0 && self.degraded == 0 && self.pending == 0 && self.unreadable == 0
    }
}

/// A progress line and its ETA, from how fast segments come back.
pub struct Progress {
    started_unix_ms: u64,
    first_whole: Option<u64>,
}

impl Progress {
    pub fn new(started_unix_ms: u64) -> Self {
        Self {
            started_unix_ms,
            first_whole: None,
        }
    }

    pub fn line(&mut self, strength: &Strength, now_unix_ms: u64) -> String {
        let first = *self.first_whole.get_or_insert(strength.whole);
        let total = strength.segments.max(1);
        let percent = strength.whole.saturating_mul(100) / total;
        let filled = (percent / 5) as usize;
        let bar = format!(
            "[{}{}]",
            "#".repeat(filled),
            ".".repeat(20 - filled.min(20))
        );
        let elapsed_s = now_unix_ms.saturating_sub(self.started_unix_ms) / 1000;
        let gained = strength.whole.saturating_sub(first);
        let eta = if strength.whole >= strength.segments {
            String::new()
        } else if gained == 0 || elapsed_s == 0 {
            ", ETA unknown".to_owned()
        } else {
            let left = strength.segments - strength.whole;
            format!(", ETA {} s", left.saturating_mul(elapsed_s) / gained)
        };
        let waiting = if strength.waiting_for > 0 {
            format!("; waiting for a pass of {} node(s)", strength.waiting_for)
        } else {
            String::new()
        };
        format!(
            "{bar} {percent}% of {} segments at full strength, {} degraded, {} unreadable, {} pending{eta}{waiting}",
            strength.segments, strength.degraded, strength.unreadable, strength.pending
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_protocol::ids::SiteId;
    use cairn_protocol::placement::NodeState;
    use cairn_protocol::status::RepairSummary;

    #[test]
    fn degraded_segments_are_summed_over_nodes_and_a_node_down_says_why() {
        let node = |n: u8, site: &str| MapNode {
            id: NodeId([n; 32]),
            site: SiteId::new(site).unwrap(),
            capacity_bytes: 1 << 40,
            state: NodeState::Up,
            since: 1,
        };
        let nodes = [node(1, "paris"), node(2, "lyon")];
        let first = NodeStatus {
            repair: RepairSummary {
                segments: 10,
                whole: 7,
                degraded_by_spares: [(0, 1), (1, 2)].into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let first_clone = first.clone();
        let answers = BTreeMap::from([
            (NodeId([1; 32]), Ok(first)),
            (NodeId([2; 32]), Err("no answer within 10 s".to_owned())),
        ]);
        let text = render(&nodes, &answers, 1_000_000);
        assert!(text.contains("checked 10, at full strength 7"), "{text}");
        assert!(
            text.contains("degraded, 0 more losses from unreadable: 1"),
            "{text}"
        );
        assert!(
            text.contains("degraded, 1 more loss from unreadable: 2"),
            "{text}"
        );
        assert!(text.contains("DOWN  no answer within 10 s"), "{text}");
        let mut shorter = first_clone.clone();
        shorter.store.trash_period_ms = 1000;
        let differing = BTreeMap::from([
            (NodeId([1; 32]), Ok(first_clone.clone())),
            (NodeId([2; 32]), Ok(shorter)),
        ]);
        let warned = render(&nodes, &differing, 1_000_000);
        assert!(
            warned.contains("WARNING: the nodes' trash periods differ (0 s, 1 s)"),
            "{warned}"
        );
        assert!(
            text.contains("INCOMPLETE: 1 node(s) did not answer"),
            "{text}"
        );
        let strength = Strength::of(&answers, 0);
        assert_eq!((strength.degraded, strength.waiting_for), (3, 2));
        assert!(!strength.settled());
        let mut progress = Progress::new(0);
        let line = progress.line(&strength, 10_000);
        assert!(
            line.starts_with("[##############......] 70% of 10 segments"),
            "{line}"
        );
        // 2 more whole in 20 s: the last one in 10 s more.
        let better = Strength {
            whole: 9,
            degraded: 1,
            ..strength
        };
        let line = progress.line(&better, 20_000);
        assert!(line.contains("ETA 10 s"), "{line}");
    }

    #[test]
    fn a_draining_node_says_whether_it_still_holds_fragments() {
        let draining = |n: u8| MapNode {
            id: NodeId([n; 32]),
            site: SiteId::new("paris").unwrap(),
            capacity_bytes: 1 << 40,
            state: NodeState::Draining,
            since: 1,
        };
        let holding = |live| NodeStatus {
            store: cairn_protocol::status::StoreStatus {
                live,
                ..Default::default()
            },
            ..Default::default()
        };
        let nodes = [draining(1), draining(2)];
        let answers = BTreeMap::from([
            (NodeId([1; 32]), Ok(holding(12))),
            (NodeId([2; 32]), Ok(holding(0))),
        ]);
        let text = render(&nodes, &answers, 1_000_000);
        assert!(
            text.contains("draining: 12 live fragments still here"),
            "{text}"
        );
        assert!(text.contains("drained: holds no live fragment"), "{text}");
    }
}
