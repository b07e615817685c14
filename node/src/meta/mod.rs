//! The replicated metadata: the coordinator that any node runs for the
//! gateway (quorum writes, quorum reads with read repair, merged ordered
//! listing), the local replica's storage, and the RPC between them
//! (spec/metadata.md). There is no leader: any node coordinates any request.
//!
//! A write goes to every replica of its partition and succeeds once a
//! majority has made it durable; a read asks every replica, returns once a
//! majority answered, merges their values and sends the merge back to the
//! ones that were behind. Majorities intersect, so a read sees every write
//! acknowledged before it began.

pub mod antientropy;
pub mod replica;
pub mod rpc;
mod tombstones;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_protocol::cas::{PhaseTally, ReadOutcome, ReadTally, TaggedValue, Tally, next_ballot};
use cairn_protocol::hlc::{HlcClock, Timestamp};
use cairn_protocol::ids::NodeId;
use cairn_protocol::manifest::SignedManifest;
use cairn_protocol::meta::{
    Partition, QuorumSets, RowKey, RowValue, Table, quorum, replica_set, replica_set_id,
};
use cairn_protocol::metarpc::{self, Call, ErrorCode, RegisterKey, Request, Response};
use libp2p::StreamProtocol;
use thiserror::Error;
use tokio::sync::mpsc;

use crate::clock::now_unix_ms;
use crate::identity::peer_id_of;
use crate::mapsync::MapKeeper;
use crate::members::{MEMBERSHIP_WAIT, Members};
use replica::{MetaReplica, ReplicaError};
use rpc::merge_answers;

pub const META_PROTOCOL: StreamProtocol = StreamProtocol::new(metarpc::PROTOCOL_NAME);

/// How far ahead of ours a peer's clock may be before its writes are refused.
pub(crate) const MAX_CLOCK_DRIFT_MS: u64 = 60_000;
/// Metadata calls open at once from this node to one peer: half the
/// default per-peer stream limit of a node (`StreamLimits`), which drops
/// streams past it unanswered.
const MAX_CALLS_PER_PEER: usize = 16;
/// How long one replica may take to answer one request.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a replica waits for a map a request names and it has not
/// verified yet (maps are pushed to every node as they are signed).
const NEWER_MAP_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum MetaError {
    #[error(
        "this node has no cluster map yet, so it cannot tell which nodes hold the metadata; install one with `cairn admin map push`"
    )]
    NoMap,
    #[error(
        "no majority of the replicas of partition {partition:?} answered ({answered} of {asked} did{moving}): {errors}"
    )]
    NoQuorum {
        partition: String,
        asked: usize,
        answered: usize,
        /// Says so when the partition is moving (two majorities needed).
        moving: &'static str,
        errors: String,
    },
    #[error("metadata replica {node} refused the request: {message}")]
    Refused { node: NodeId, message: String },
    #[error("metadata replica {node} did not answer: {error}")]
    Unreachable { node: NodeId, error: String },
    #[error("rows written or read together must be in one partition")]
    MixedPartitions,
    #[error("{count} rows in one request; at most {max} go together")]
    TooManyRows { count: usize, max: usize },
    #[error("the rows of one write take {bytes} bytes; at most {max} go together")]
    TooLarge { bytes: usize, max: usize },
    #[error(transparent)]
    Invalid(#[from] cairn_protocol::meta::MetaError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// A page of a merged listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub rows: Vec<(Vec<u8>, RowValue)>,
    /// Rows remain after the last one.
    pub more: bool,
}

/// One replica's answer to a range read: who, its rows, whether it had more.
type ReplicaPage = (NodeId, Vec<(Vec<u8>, RowValue)>, bool);

/// The metadata coordinator of one node. Cheap to clone.
#[derive(Clone)]
pub struct Metadata {
    inner: Arc<Inner>,
}

struct Inner {
    own: NodeId,
    /// Moved partitions whose new replicas have filled, by map version:
    /// served by the new replica set alone from then on.
    settled: Mutex<HashSet<(Partition, u64)>>,
    /// When the new replicas of a moving partition were last asked.
    asked: Mutex<HashMap<(Partition, u64), Instant>>,
    /// Partitions this node is filling now.
    filling: Mutex<HashSet<(Partition, u64)>>,
    control: libp2p_stream::Control,
    members: Arc<Members>,
    maps: Arc<MapKeeper>,
    replica: MetaReplica,
    clock: Mutex<HlcClock>,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Calls open to each peer: a replica drops streams past its per-peer
    /// limit unanswered, so callers wait here for a slot instead.
    calls_per_peer: Mutex<HashMap<NodeId, Arc<tokio::sync::Semaphore>>>,
}

impl Metadata {
    pub(crate) fn new(
        own: NodeId,
        control: libp2p_stream::Control,
        members: Arc<Members>,
        maps: Arc<MapKeeper>,
        replica: MetaReplica,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                own,
                settled: Mutex::default(),
                asked: Mutex::default(),
                filling: Mutex::default(),
                control,
                members,
                maps,
                replica,
                clock: Mutex::new(HlcClock::new(MAX_CLOCK_DRIFT_MS)),
                background: Mutex::new(Vec::new()),
                calls_per_peer: Mutex::default(),
            }),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.own
    }

    /// The newest cluster map this node has verified.
    pub fn cluster_map(&self) -> Option<cairn_protocol::membership::SignedMap> {
        self.inner.maps.current()
    }

    /// A stream of `protocol` to member `node`, once the handshake has
    /// admitted it (waiting a few seconds for that).
    pub(crate) async fn open_member_stream(
        &self,
        node: &NodeId,
        protocol: libp2p::StreamProtocol,
    ) -> Result<libp2p::Stream, String> {
        let peer = crate::identity::peer_id_of(node).map_err(|e| e.to_string())?;
        if !self
            .inner
            .members
            .wait_for(&peer, crate::members::MEMBERSHIP_WAIT)
            .await
        {
            return Err(format!("{node} is not a member reachable from here"));
        }
        self.inner
            .control
            .clone()
            .open_stream(peer, protocol)
            .await
            .map_err(|e| e.to_string())
    }

    /// This node's replica (for the RPC server and tests).
    pub fn replica(&self) -> &MetaReplica {
        &self.inner.replica
    }

    /// A fresh timestamp for a write coordinated here.
    pub fn timestamp(&self) -> Timestamp {
        let hlc = self
            .inner
            .clock
            .lock()
            .expect("clock lock")
            .now(now_unix_ms());
        Timestamp {
            hlc,
            node: self.inner.own,
        }
    }

    /// Whether this replica takes from a coordinator a value that fits its
    /// key (checked first): it is stamped no further ahead of this node's
    /// clock than the drift tolerated, and a manifest's writer is a member:
    /// a node of the cluster's map, this node, or a peer connected with a
    /// verified certificate (a node that only serves S3 holds a certificate
    /// but no place in the map). Both depend on this replica's own state,
    /// so a refusal here is a failure, not a veto. Anti-entropy checks the
    /// stamp only: a manifest outlives its writer's membership.
    pub(crate) fn check_incoming(&self, value: &RowValue) -> Result<(), String> {
        value
            .check_stamp(now_unix_ms(), MAX_CLOCK_DRIFT_MS)
            .map_err(|e| e.to_string())?;
        if let RowValue::Immutable(signed) = value {
            let writer = SignedManifest::decode(signed)
                .map_err(|e| e.to_string())?
                .manifest
                .writer;
            let in_map = self
                .inner
                .maps
                .current()
                .is_some_and(|map| map.map.nodes.iter().any(|n| n.id == writer));
            if !(in_map || writer == self.inner.own || self.is_connected(&writer)) {
                return Err(format!(
                    "the manifest's writer {writer} is neither a node of the cluster map nor a connected member"
                ));
            }
        }
        Ok(())
    }

    /// Whether this node holds a verified map of at least `version`,
    /// waiting up to [`NEWER_MAP_WAIT`] for it; else why not. A refusal is
    /// a failure, not a veto: this replica may simply be behind.
    pub(crate) async fn verified_map(&self, version: u64) -> Result<(), String> {
        let maps = &self.inner.maps;
        if version == 0
            || maps.version().is_some_and(|held| held >= version)
            || maps.wait_for_version(version, NEWER_MAP_WAIT).await
        {
            return Ok(());
        }
        Err(format!(
            "this replica has not verified cluster map version {version} (it holds {})",
            maps.version()
                .map_or_else(|| "none".to_owned(), |v| format!("version {v}"))
        ))
    }

    /// Whether this node answers as a metadata replica: only while its map
    /// lists it and not `out` (spec/metadata.md, "Compacting tombstones").
    pub(crate) fn serves_as_replica(&self) -> Result<(), String> {
        let map = self
            .inner
            .maps
            .current()
            .ok_or("this node has no cluster map")?;
        match map.map.nodes.iter().find(|n| n.id == self.inner.own) {
            Some(node) if node.state != cairn_protocol::placement::NodeState::Out => Ok(()),
            Some(_) => Err(format!(
                "this node is out in cluster map version {}; it answers no metadata request",
                map.map.version
            )),
            None => Err(format!(
                "this node is not in cluster map version {}; it answers no metadata request",
                map.map.version
            )),
        }
    }

    /// Moves the clock past a timestamp read from a replica, so that a write
    /// made after a read orders after what was read.
    fn observe(&self, value: &RowValue) {
        if let RowValue::Register(register) = value {
            let mut clock = self.inner.clock.lock().expect("clock lock");
            if let Err(error) = clock.observe(register.at.hlc, now_unix_ms()) {
                tracing::warn!(%error, node = %register.at.node, "a row carries a clock far ahead of ours");
            }
        }
    }

    /// The nodes that replicate `partition` under the current map.
    pub fn replicas_of(&self, partition: &Partition) -> Result<Vec<NodeId>, MetaError> {
        Ok(self.quorum_sets_of(partition)?.current().to_vec())
    }

    /// The replica sets a request on `partition` needs majorities of: the
    /// current map's, and the previous map's while the partition moves.
    ///
    /// A moving partition settles once a majority of its new replicas say
    /// they have filled from the old ones (spec/metadata.md, "Moving
    /// partitions"); they are asked in the background, at most once a
    /// second per partition.
    pub fn quorum_sets_of(&self, partition: &Partition) -> Result<QuorumSets, MetaError> {
        let map = self.inner.maps.current().ok_or(MetaError::NoMap)?;
        let version = map.map.version;
        let current = replica_set(&map.map, partition, usize::from(map.metadata_replicas));
        let previous = self
            .inner
            .maps
            .previous()
            .map(|p| replica_set(&p.map, partition, usize::from(p.metadata_replicas)));
        let sets = QuorumSets::new(current.clone(), previous);
        let Some(old) = sets.previous() else {
            return Ok(sets);
        };
        let key = (partition.clone(), version);
        if self
            .inner
            .settled
            .lock()
            .expect("settled lock")
            .contains(&key)
        {
            return Ok(QuorumSets::new(current, None));
        }
        let due = {
            let mut asked = self.inner.asked.lock().expect("asked lock");
            let now = Instant::now();
            let due = asked
                .get(&key)
                .is_none_or(|at| now.duration_since(*at) >= Duration::from_secs(1));
            if due {
                asked.insert(key.clone(), now);
            }
            due
        };
        if due {
            let (this, old) = (self.clone(), old.to_vec());
            self.spawn_tracked(async move { this.ask_filled(key, current, old).await });
        }
        Ok(sets)
    }

    /// Whether `partition` is served by two replica sets (it moved with the
    /// last map and its new replicas have not all filled yet).
    pub fn is_moving(&self, partition: &Partition) -> Result<bool, MetaError> {
        Ok(self.quorum_sets_of(partition)?.previous().is_some())
    }

    async fn ask_filled(&self, key: (Partition, u64), current: Vec<NodeId>, old: Vec<NodeId>) {
        let (partition, version) = key.clone();
        let asks = current.iter().map(|node| {
            let request = Request::Filled {
                partition: partition.clone(),
                version,
                old: old.clone(),
            };
            self.call(*node, request)
        });
        let filled = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter(|answer| matches!(answer, Ok(Response::Filled { filled: true })))
            .count();
        if filled >= quorum(current.len()) {
            tracing::info!(
                partition = partition.as_str(),
                version,
                "moved partition settled on its new replicas"
            );
            self.inner.settled.lock().expect("settled lock").insert(key);
        }
    }

    /// Answers Filled: pulls `partition` from every node of `old` (each
    /// raises its fence to our map version before it answers) and records
    /// it filled once a majority of `old` was pulled from.
    pub(crate) async fn ensure_filled(
        &self,
        partition: Partition,
        version: u64,
        mut old: Vec<NodeId>,
    ) -> Result<bool, MetaError> {
        let map = self.inner.maps.current().ok_or(MetaError::NoMap)?;
        if map.map.version != version
            || !replica_set(&map.map, &partition, usize::from(map.metadata_replicas))
                .contains(&self.inner.own)
        {
            return Ok(false);
        }
        old.sort();
        old.dedup();
        let old_set = replica_set_id(&old);
        let replica = self.inner.replica.clone();
        let (p, r) = (partition.clone(), replica.clone());
        if tokio::task::spawn_blocking(move || r.is_filled(&p, version, &old_set))
            .await
            .map_err(|e| ReplicaError::Database(e.to_string()))??
        {
            return Ok(true);
        }
        let key = (partition.clone(), version);
        if !self
            .inner
            .filling
            .lock()
            .expect("filling lock")
            .insert(key.clone())
        {
            return Ok(false);
        }
        let mut pulled_from = 0;
        for node in &old {
            if *node == self.inner.own {
                pulled_from += 1;
                continue;
            }
            let ours = self.local_digest(&partition).await;
            match ours {
                Ok(ours) => match self.pull_partition(*node, &partition, &ours).await {
                    Ok(rows) => {
                        tracing::debug!(%node, rows, partition = partition.as_str(), "filled from an old replica");
                        pulled_from += 1;
                    }
                    Err(error) => {
                        tracing::info!(%node, %error, partition = partition.as_str(), "could not fill from an old replica");
                    }
                },
                Err(error) => {
                    self.inner
                        .filling
                        .lock()
                        .expect("filling lock")
                        .remove(&key);
                    return Err(error);
                }
            }
        }
        let filled =
            pulled_from >= quorum(old.len()) && self.carry_registers(&partition, &old).await;
        self.inner
            .filling
            .lock()
            .expect("filling lock")
            .remove(&key);
        if filled {
            replica.mark_filled(partition, version, old_set).await?;
        }
        Ok(filled)
    }

    /// Brings every compare-and-set register of `partition` that the old
    /// replicas hold to the new ones: an identity compare-and-set per
    /// register, run while the partition is moving (joint majorities), so
    /// that the value it chooses is accepted by a majority of the new set.
    /// Acceptor state is never copied: Paxos itself moves it.
    async fn carry_registers(&self, partition: &Partition, old: &[NodeId]) -> bool {
        let mut names = BTreeSet::new();
        let mut listed_from = 0;
        for node in old {
            let mut after = None;
            let listed = loop {
                let request = Request::Registers {
                    partition: partition.clone(),
                    after: after.clone(),
                    limit: metarpc::MAX_ITEMS as u32,
                };
                match self.call(*node, request).await {
                    Ok(Response::Registers { names: page, more }) => {
                        after = page.last().cloned();
                        names.extend(page);
                        if !more {
                            break true;
                        }
                    }
                    _ => break false,
                }
            };
            listed_from += usize::from(listed);
        }
        if listed_from < quorum(old.len()) {
            return false;
        }
        for name in names {
            let key = RegisterKey {
                partition: partition.clone(),
                name,
            };
            let carried = self
                .compare_and_set(key, |_| Err::<Option<Vec<u8>>, ()>(()))
                .await;
            if let Err(error) = carried {
                tracing::info!(%error, partition = partition.as_str(), "could not carry a register to the new replicas");
                return false;
            }
        }
        true
    }

    /// Merges `rows` (all of one partition) into a majority of its replicas.
    pub async fn write(&self, rows: Vec<(RowKey, RowValue)>) -> Result<(), MetaError> {
        let Some(partition) = single_partition(rows.iter().map(|(k, _)| k))? else {
            return Ok(());
        };
        for (key, value) in &rows {
            value.check_fits(key)?;
        }
        let request = Request::Write { rows };
        let bytes = request.encode().len();
        if bytes > metarpc::MAX_MESSAGE_BYTES {
            return Err(MetaError::TooLarge {
                bytes,
                max: metarpc::MAX_MESSAGE_BYTES,
            });
        }
        self.quorum_call(&partition, request, true).await?;
        Ok(())
    }

    /// The merged values of `keys` (all of one partition) from a majority;
    /// where the answers disagree, a value that does not fit its key (a
    /// manifest whose signature fails) takes no part in the merge.
    pub async fn read(&self, keys: Vec<RowKey>) -> Result<Vec<Option<RowValue>>, MetaError> {
        let Some(partition) = single_partition(keys.iter())? else {
            return Ok(Vec::new());
        };
        let answers = self
            .quorum_call(&partition, Request::Read { keys: keys.clone() }, false)
            .await?;
        let merged: Vec<Option<RowValue>> = keys
            .iter()
            .enumerate()
            .map(|(index, key)| {
                let given: Vec<(NodeId, &RowValue)> = answers
                    .iter()
                    .filter_map(|(node, response)| match response {
                        Response::Rows(values) => values
                            .get(index)
                            .and_then(Option::as_ref)
                            .map(|v| (*node, v)),
                        _ => None,
                    })
                    .collect();
                // Answers that agree merge as they are (the reader checks a
                // manifest once anyway); only a disagreement is worth a
                // signature check per answer.
                let agree = given.windows(2).all(|pair| pair[0].1 == pair[1].1);
                given
                    .into_iter()
                    .filter(|(node, value)| agree || fits(*node, key, value))
                    .map(|(_, value)| value.clone())
                    .reduce(|current, value| merge_answers(current, &value))
            })
            .collect();
        merged.iter().flatten().for_each(|v| self.observe(v));
        for (node, response) in answers {
            let Response::Rows(values) = response else {
                continue;
            };
            let stale: Vec<(RowKey, RowValue)> = keys
                .iter()
                .zip(&merged)
                .zip(values)
                .filter_map(|((key, merged), theirs)| match merged {
                    Some(merged) if theirs.as_ref() != Some(merged) => {
                        Some((key.clone(), merged.clone()))
                    }
                    _ => None,
                })
                .collect();
            self.repair(node, stale);
        }
        Ok(merged)
    }

    /// Rows of one table of one partition with `start <= sort < end`, in
    /// order, merged from a majority, at most `limit`.
    pub async fn range(
        &self,
        partition: &Partition,
        table: Table,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Page, MetaError> {
        let limit = limit.clamp(1, metarpc::MAX_ITEMS);
        let request = Request::Range {
            partition: partition.clone(),
            table,
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            limit: limit as u32,
        };
        let answers = self.quorum_call(partition, request, false).await?;
        let pages: Vec<ReplicaPage> = answers
            .into_iter()
            .filter_map(|(node, response)| match response {
                Response::Page { rows, more } => Some((node, rows, more)),
                _ => None,
            })
            .collect();
        // A replica that stopped early vouches only up to its last row.
        let bound: Option<Vec<u8>> = pages
            .iter()
            .filter(|(_, rows, more)| *more && !rows.is_empty())
            .filter_map(|(_, rows, _)| rows.last().map(|(sort, _)| sort.clone()))
            .min();
        let within = |sort: &Vec<u8>| bound.as_ref().is_none_or(|b| sort <= b);
        let mut merged: std::collections::BTreeMap<Vec<u8>, RowValue> = Default::default();
        for (node, rows, _) in &pages {
            for (sort, value) in rows.iter().filter(|(sort, _)| within(sort)) {
                let key = RowKey::new(partition.clone(), table, sort.clone());
                if !fits(*node, &key, value) {
                    continue;
                }
                let next = match merged.remove(sort) {
                    None => value.clone(),
                    Some(current) => merge_answers(current, value),
                };
                merged.insert(sort.clone(), next);
            }
        }
        let mut more = pages.iter().any(|(_, _, more)| *more);
        let rows: Vec<(Vec<u8>, RowValue)> = if merged.len() > limit {
            more = true;
            merged.into_iter().take(limit).collect()
        } else {
            merged.into_iter().collect()
        };
        rows.iter().for_each(|(_, v)| self.observe(v));
        // Every answer covers at least up to the bound, so a merged row an
        // answer lacks or holds older is stale there.
        for (node, theirs, _) in pages {
            let theirs: std::collections::BTreeMap<Vec<u8>, RowValue> =
                theirs.into_iter().collect();
            let stale: Vec<(RowKey, RowValue)> = rows
                .iter()
                .filter(|(sort, value)| theirs.get(sort) != Some(value))
                .map(|(sort, value)| {
                    (
                        RowKey::new(partition.clone(), table, sort.clone()),
                        value.clone(),
                    )
                })
                .collect();
            self.repair(node, stale);
        }
        Ok(Page { rows, more })
    }

    /// The current value of a register, linearizably (spec/metadata.md,
    /// "Reading a register"): one round that changes nothing when a
    /// majority of the replicas agree on what they last accepted, else a
    /// compare-and-set round that writes the current value back.
    pub async fn read_register(&self, key: RegisterKey) -> Result<Option<Vec<u8>>, MetaError> {
        let sets = self.quorum_sets_of(&key.partition)?;
        let nodes = sets.nodes();
        let (answers_tx, mut answers_rx) = mpsc::channel(nodes.len());
        for node in nodes {
            let (this, key, answers_tx) = (self.clone(), key.clone(), answers_tx.clone());
            self.spawn_tracked(async move {
                let answer = this.call(node, Request::ReadRegister { key }).await.ok();
                let _ = answers_tx.send((node, answer)).await;
            });
        }
        drop(answers_tx);
        let mut tally = ReadTally::new(sets);
        while let Some((node, answer)) = answers_rx.recv().await {
            match tally.record(node, answer.as_ref()) {
                ReadOutcome::Pending => {}
                ReadOutcome::Undecided => break,
                ReadOutcome::Chosen(raw) => {
                    let tagged = raw.as_deref().map(TaggedValue::decode).transpose();
                    return match tagged {
                        Ok(tagged) => Ok(tagged.and_then(|t| t.value)),
                        Err(error) => Err(MetaError::Replica(ReplicaError::Corrupt(format!(
                            "register value: {error}"
                        )))),
                    };
                }
            }
        }
        let current = self
            .compare_and_set(key, |current| {
                Err::<Option<Vec<u8>>, _>(current.map(<[u8]>::to_vec))
            })
            .await?;
        Ok(current.unwrap_or_else(|current| current))
    }

    /// Linearizable compare-and-set of one register (spec/metadata.md,
    /// "Compare-and-set"): `change` sees the register's current value and
    /// returns the new one, or refuses with a reason that is handed back.
    /// A refusal still writes the current value back under this ballot, so
    /// that what the refusal was based on is chosen, not just seen.
    /// `change` may run more than once, on each attempt's current value;
    /// the answer is the value actually chosen, which is one of those runs'
    /// results, not necessarily the last.
    pub async fn compare_and_set<R>(
        &self,
        key: RegisterKey,
        change: impl Fn(Option<&[u8]>) -> Result<Option<Vec<u8>>, R>,
    ) -> Result<Result<Option<Vec<u8>>, R>, MetaError> {
        const ATTEMPTS: u32 = 200;
        let sets = self.quorum_sets_of(&key.partition)?;
        let operation: [u8; 16] = {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&random_u64().to_be_bytes());
            id[8..].copy_from_slice(&random_u64().to_be_bytes());
            id
        };
        let mut round = 0;
        let mut seen = None;
        let mut last_failure = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                // Dueling proposers: back off for a random time that grows.
                let cap_ms = (5u64 << attempt.min(7)).min(500);
                tokio::time::sleep(Duration::from_millis(random_u64() % cap_ms)).await;
            }
            let ballot = next_ballot(self.inner.own, round, seen);
            round = ballot.round;
            let prepare = Request::Prepare {
                key: key.clone(),
                ballot,
            };
            let (outcome, promises) = self.phase(&sets, prepare).await;
            if let Tally::Lost { seen: higher } = outcome {
                seen = seen.max(higher);
            }
            if outcome != Tally::Won {
                last_failure = "a majority did not promise".into();
                continue;
            }
            let current_raw = promises.current_value().map(<[u8]>::to_vec);
            let current = match current_raw.as_deref().map(TaggedValue::decode).transpose() {
                Ok(current) => current,
                Err(error) => {
                    return Err(MetaError::Replica(ReplicaError::Corrupt(format!(
                        "register value: {error}"
                    ))));
                }
            };
            // One of our own earlier accepts may have landed: then the
            // current value is ours, and it is finished rather than judged
            // again. It is the value that attempt proposed, which need not
            // be the last one `change` returned (each attempt judged the
            // value it saw), so the answer is the value itself.
            let (decided, value) = match &current {
                Some(current) if current.operation == operation => {
                    (Ok(current.value.clone()), current_raw)
                }
                _ => {
                    let decided = change(current.as_ref().and_then(|c| c.value.as_deref()));
                    let value = match &decided {
                        Ok(new) => Some(
                            TaggedValue {
                                operation,
                                value: new.clone(),
                            }
                            .encode(),
                        ),
                        Err(_) => current_raw,
                    };
                    (decided, value)
                }
            };
            let accept = Request::Accept {
                key: key.clone(),
                ballot,
                value,
            };
            match self.phase(&sets, accept).await {
                (Tally::Won, _) => return Ok(decided),
                (Tally::Lost { seen: higher }, _) => {
                    seen = seen.max(higher);
                    last_failure = "a majority did not accept".into();
                }
                (Tally::Pending, _) => last_failure = "no majority answered".into(),
            }
        }
        Err(MetaError::NoQuorum {
            partition: key.partition.as_str().to_owned(),
            asked: sets.nodes().len(),
            answered: 0,
            moving: moving(&sets),
            errors: format!("compare-and-set gave up after {ATTEMPTS} attempts: {last_failure}"),
        })
    }

    /// Runs one Paxos phase on every replica until a majority decides it.
    async fn phase(&self, sets: &QuorumSets, request: Request) -> (Tally, PhaseTally) {
        let nodes = sets.nodes();
        let (answers_tx, mut answers_rx) = mpsc::channel(nodes.len());
        for node in nodes {
            let (this, request, answers_tx) = (self.clone(), request.clone(), answers_tx.clone());
            self.spawn_tracked(async move {
                let answer = this.call(node, request).await.ok();
                let _ = answers_tx.send((node, answer)).await;
            });
        }
        drop(answers_tx);
        let mut tally = PhaseTally::new(sets.clone());
        while let Some((node, answer)) = answers_rx.recv().await {
            match tally.record(node, answer.as_ref()) {
                Tally::Pending => {}
                decided => return (decided, tally),
            }
        }
        (tally.tally(), tally)
    }

    /// Sends merged rows to a replica that answered with older ones.
    fn repair(&self, node: NodeId, rows: Vec<(RowKey, RowValue)>) {
        if rows.is_empty() {
            return;
        }
        tracing::debug!(%node, rows = rows.len(), "read repair");
        let this = self.clone();
        self.spawn_tracked(async move {
            match this.call(node, Request::Write { rows }).await {
                Ok(Response::Written) => {}
                Ok(other) => tracing::info!(%node, ?other, "read repair refused"),
                Err(error) => tracing::info!(%node, %error, "read repair failed"),
            }
        });
    }

    /// Sends `request` to every replica of `partition` and returns once a
    /// majority has answered. With `finish_all`, the calls to the others go
    /// on in the background (writes reach every replica that is up).
    async fn quorum_call(
        &self,
        partition: &Partition,
        request: Request,
        finish_all: bool,
    ) -> Result<Vec<(NodeId, Response)>, MetaError> {
        let sets = self.quorum_sets_of(partition)?;
        let nodes = sets.nodes();
        let (answers_tx, mut answers_rx) = mpsc::channel(nodes.len());
        let mut calls = Vec::with_capacity(nodes.len());
        for node in &nodes {
            let (this, request, answers_tx, node) =
                (self.clone(), request.clone(), answers_tx.clone(), *node);
            calls.push(self.spawn_tracked(async move {
                let answer = this.call(node, request).await;
                let _ = answers_tx.send((node, answer)).await;
            }));
        }
        drop(answers_tx);
        let mut granted = Vec::with_capacity(nodes.len());
        let mut granted_nodes = BTreeSet::new();
        let mut failed = BTreeSet::new();
        let mut errors = Vec::new();
        while let Some((node, answer)) = answers_rx.recv().await {
            match answer {
                Ok(Response::Error {
                    code: ErrorCode::Refused | ErrorCode::Malformed,
                    message,
                }) => {
                    return Err(MetaError::Refused { node, message });
                }
                Ok(Response::Error { message, .. }) => {
                    errors.push(format!("{node}: {message}"));
                    failed.insert(node);
                }
                Ok(response) => {
                    granted.push((node, response));
                    granted_nodes.insert(node);
                    if sets.reached(&granted_nodes) {
                        break;
                    }
                }
                Err(error) => {
                    errors.push(format!("{node}: {error}"));
                    failed.insert(node);
                }
            }
            if sets.lost(&failed) {
                break;
            }
        }
        if !finish_all {
            calls.iter().for_each(|c| c.abort());
        }
        if sets.reached(&granted_nodes) {
            Ok(granted)
        } else {
            Err(MetaError::NoQuorum {
                partition: partition.as_str().to_owned(),
                asked: nodes.len(),
                answered: granted.len(),
                moving: moving(&sets),
                errors: errors.join("; "),
            })
        }
    }

    fn is_connected(&self, node: &NodeId) -> bool {
        peer_id_of(node).is_ok_and(|peer| self.inner.members.contains(&peer))
    }

    /// Runs background work that [`Metadata::shutdown`] stops.
    /// Runs `round` every `every` (the first after one period) until the
    /// node stops; a round that overruns delays the next.
    fn spawn_every<F, Fut>(&self, every: Duration, round: F)
    where
        F: Fn(Metadata) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let this = self.clone();
        self.spawn_tracked(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                round(this.clone()).await;
            }
        });
    }

    fn spawn_tracked(
        &self,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::AbortHandle {
        let task = tokio::spawn(work);
        let abort = task.abort_handle();
        let mut background = self.inner.background.lock().expect("background lock");
        background.retain(|t| !t.is_finished());
        background.push(task);
        abort
    }

    /// Stops the background calls and repairs, then closes the replica once
    /// the last handle is gone.
    pub(crate) async fn shutdown(self) {
        let tasks = std::mem::take(&mut *self.inner.background.lock().expect("background lock"));
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        // Closed even if clones of this coordinator are still held elsewhere,
        // so that the node can start again in the same process.
        let replica = self.inner.replica.clone();
        let _ = tokio::task::spawn_blocking(move || replica.close()).await;
    }

    /// One request to one replica, this node's own included. Transport
    /// failures are retried: every metadata request is idempotent.
    ///
    /// Returns a boxed future: answering Filled locally calls other
    /// replicas through here again, and a named type ends that cycle.
    fn call(
        &self,
        node: NodeId,
        request: Request,
    ) -> futures::future::BoxFuture<'_, Result<Response, String>> {
        Box::pin(async move {
            let call = Call {
                map_version: self.inner.maps.version().unwrap_or(0),
                request,
            };
            if node == self.inner.own {
                return Ok(rpc::answer(self, call).await);
            }
            let peer = peer_id_of(&node).map_err(|e| e.to_string())?;
            let slots = self
                .inner
                .calls_per_peer
                .lock()
                .expect("call slots")
                .entry(node)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_PER_PEER)))
                .clone();
            const ATTEMPTS: u32 = 4;
            let mut attempt = 0;
            loop {
                let exchange = async {
                    if !self.inner.members.wait_for(&peer, MEMBERSHIP_WAIT).await {
                        return Err("not connected as a verified member".to_owned());
                    }
                    // Taken once the peer is there, so that calls waiting
                    // for a peer that is down hold no slot.
                    let _slot = slots
                        .acquire()
                        .await
                        .map_err(|_| "metadata calls closed".to_owned())?;
                    let stream = self
                        .inner
                        .control
                        .clone()
                        .open_stream(peer, META_PROTOCOL)
                        .await
                        .map_err(|e| e.to_string())?;
                    rpc::call(stream, &call).await.map_err(|e| e.to_string())
                };
                match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
                    Ok(Ok(response)) => return Ok(response),
                    Ok(Err(error)) if attempt + 1 < ATTEMPTS => {
                        tracing::debug!(%node, %error, attempt, "metadata call failed; retrying");
                    }
                    Ok(Err(error)) => return Err(error),
                    Err(_) => return Err(format!("no answer within {CALL_TIMEOUT:?}")),
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
            }
        })
    }
}

fn moving(sets: &QuorumSets) -> &'static str {
    if sets.previous().is_some() {
        "; the partition is moving, so a majority of both its old and its new replicas is needed"
    } else {
        ""
    }
}

/// A random number for back-off (the standard library's per-process
/// random hash keys, drawn fresh each time).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Whether a replica's answer for `key` may take part in a merge: a
/// value that does not fit its key would otherwise win it (the smaller
/// bytes of a forged manifest do).
fn fits(node: NodeId, key: &RowKey, value: &RowValue) -> bool {
    match value.check_fits(key) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%node, %error, "a replica answered with a row that does not fit its key; left out");
            false
        }
    }
}

fn single_partition<'a>(
    keys: impl ExactSizeIterator<Item = &'a RowKey>,
) -> Result<Option<Partition>, MetaError> {
    if keys.len() > metarpc::MAX_ITEMS {
        return Err(MetaError::TooManyRows {
            count: keys.len(),
            max: metarpc::MAX_ITEMS,
        });
    }
    let mut keys = keys;
    let Some(first) = keys.next() else {
        return Ok(None);
    };
    if keys.any(|k| k.partition != first.partition) {
        return Err(MetaError::MixedPartitions);
    }
    Ok(Some(first.partition.clone()))
}

/// Before adopting `newer`: a node whose membership it says began after the
/// map this node held (`since` above its version, or any `since` when it
/// held none) was out of the cluster in between, and forgets its metadata
/// replica, which may hold values whose tombstones were compacted while it
/// was away (spec/membership.md, "Membership since").
pub(crate) fn forget_if_membership_broke(
    own: NodeId,
    replica: &MetaReplica,
    held: Option<&cairn_protocol::membership::SignedMap>,
    newer: &cairn_protocol::membership::SignedMap,
) -> Result<(), String> {
    let Some(entry) = newer.map.nodes.iter().find(|n| n.id == own) else {
        return Ok(());
    };
    let held_version = held.map_or(0, |h| h.map.version);
    if entry.since <= held_version {
        return Ok(());
    }
    let forgotten = replica.forget_everything().map_err(|e| e.to_string())?;
    if forgotten > 0 {
        tracing::warn!(
            forgotten,
            since = entry.since,
            held_version,
            "this node's membership began after the map it held: its metadata replica was forgotten and fills again"
        );
    }
    Ok(())
}
