//! One node's replica of the metadata: rows, their digest leaves and the
//! compare-and-set acceptors, in `<data>/meta.redb` (spec/metadata.md,
//! "Replica storage").
//!
//! Every change goes through one writer thread that merges a batch of
//! requests in one durable transaction; a request is answered only after
//! its transaction is committed. A row is only ever replaced by its merge
//! with what is stored, so no write, however late or repeated, undoes
//! another.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;

use cairn_protocol::cas::AcceptorState;
use cairn_protocol::meta::{
    LEAVES, LeafSet, Partition, PartitionDigest, RowKey, RowValue, Table, leaf_of, row_digest,
    xor_into,
};
use cairn_protocol::metarpc::{AcceptedValue, Ballot, ErrorCode, RegisterKey, Response};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

/// (partition, table, sort key) → encoded row value.
const ROWS: TableDefinition<(&str, u8, &[u8]), &[u8]> = TableDefinition::new("rows");
/// (partition, leaf) → XOR of the digests of the leaf's rows.
const LEAF_DIGESTS: TableDefinition<(&str, u8), &[u8]> = TableDefinition::new("leaves");
/// (partition, register name) → encoded acceptor state.
const ACCEPTORS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("acceptors");
/// "fence" → the highest map version seen: changes from older maps are refused.
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
/// (partition, map version, hash of the old replica set) → filled from it.
const FILLED: TableDefinition<(&str, u64, &[u8]), u8> = TableDefinition::new("filled");

/// Requests merged in one transaction at most.
const MAX_BATCH: usize = 512;
/// A range page stops growing past this many bytes of values.
const PAGE_BYTES: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error("metadata database: {0}")]
    Database(String),
    #[error("stored metadata row is unreadable: {0}")]
    Corrupt(String),
    #[error("the metadata writer has stopped")]
    Stopped,
}

fn db_error(e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Database(e.to_string())
}

/// A change for the writer thread. `map_version` is the map of the
/// coordinator that sent it; below the replica's fence it is refused.
enum Job {
    Merge {
        rows: Vec<(RowKey, RowValue)>,
        map_version: u64,
        reply: oneshot::Sender<Result<Response, ReplicaError>>,
    },
    Prepare {
        key: RegisterKey,
        ballot: Ballot,
        map_version: u64,
        reply: oneshot::Sender<Result<Response, ReplicaError>>,
    },
    Accept {
        key: RegisterKey,
        ballot: Ballot,
        value: Option<Vec<u8>>,
        map_version: u64,
        reply: oneshot::Sender<Result<Response, ReplicaError>>,
    },
    /// Refuse changes from maps older than `version` from now on.
    Fence {
        version: u64,
        reply: oneshot::Sender<Result<Response, ReplicaError>>,
    },
    /// Drop every row, digest leaf and acceptor of `partition`.
    Forget {
        partition: Partition,
        reply: oneshot::Sender<Result<Response, ReplicaError>>,
    },
    /// Remove each row whose stored encoding is still exactly the one
    /// given (a tombstone every replica holds; a row changed since stays).
    Remove {
        rows: Vec<(RowKey, Vec<u8>)>,
        reply: oneshot::Sender<Result<Response, ReplicaError>>,
    },
    /// Record that `partition` was filled from `old` under map `version`.
    MarkFilled {
        partition: Partition,
        version: u64,
        old: [u8; 32],
        reply: oneshot::Sender<Result<Response, ReplicaError>>,
    },
}

impl Job {
    fn into_reply(self) -> oneshot::Sender<Result<Response, ReplicaError>> {
        match self {
            Job::Merge { reply, .. }
            | Job::Prepare { reply, .. }
            | Job::Accept { reply, .. }
            | Job::Fence { reply, .. }
            | Job::MarkFilled { reply, .. }
            | Job::Remove { reply, .. }
            | Job::Forget { reply, .. } => reply,
        }
    }
}

/// Map version given for merges that are not coordinator writes (anti-entropy
/// pulls): never fenced.
pub const UNFENCED: u64 = u64::MAX;

/// A replica's storage. Cheap to clone. [`MetaReplica::close`] (or the
/// last clone going) stops the writer after the jobs already queued and
/// closes the database; clones still held answer `Stopped` from then on,
/// so a node can be restarted in the same process.
#[derive(Clone)]
pub struct MetaReplica {
    inner: Arc<ReplicaInner>,
}

struct ReplicaInner {
    /// The fence as last committed, to skip needless Fence jobs.
    fence: Arc<AtomicU64>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
    db: RwLock<Option<Arc<Database>>>,
}

impl ReplicaInner {
    fn close(&self) {
        self.jobs.lock().expect("replica lock").take();
        let thread = self.thread.lock().expect("replica lock").take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("the metadata writer panicked");
        }
        self.db.write().expect("replica lock").take();
    }
}

impl Drop for ReplicaInner {
    fn drop(&mut self) {
        self.close();
    }
}

/// A partition and its digest root.
pub type PartitionRoot = (Partition, [u8; 32]);
/// A row seen by anti-entropy: table, sort key, row digest.
pub type LeafRow = (Table, Vec<u8>, [u8; 32]);

/// A page of a range read.
pub struct RangePage {
    pub rows: Vec<(Vec<u8>, RowValue)>,
    pub more: bool,
}

impl MetaReplica {
    pub fn open(path: &Path) -> Result<Self, ReplicaError> {
        let db = Database::create(path).map_err(db_error)?;
        {
            let txn = db.begin_write().map_err(db_error)?;
            txn.open_table(ROWS).map_err(db_error)?;
            txn.open_table(LEAF_DIGESTS).map_err(db_error)?;
            txn.open_table(ACCEPTORS).map_err(db_error)?;
            txn.open_table(FILLED).map_err(db_error)?;
            txn.open_table(STATE).map_err(db_error)?;
            txn.commit().map_err(db_error)?;
        }
        let fence = {
            let txn = db.begin_read().map_err(db_error)?;
            let state = txn.open_table(STATE).map_err(db_error)?;
            state
                .get("fence")
                .map_err(db_error)?
                .map_or(0, |v| v.value())
        };
        let fence = Arc::new(AtomicU64::new(fence));
        let writer_fence = fence.clone();
        let db = Arc::new(db);
        let (jobs, receiver) = mpsc::channel(4096);
        let writer_db = db.clone();
        let thread = thread::Builder::new()
            .name("cairn-meta-writer".into())
            .spawn(move || run_writer(&writer_db, &writer_fence, receiver))
            .map_err(db_error)?;
        Ok(Self {
            inner: Arc::new(ReplicaInner {
                fence,
                jobs: Mutex::new(Some(jobs)),
                thread: Mutex::new(Some(thread)),
                db: RwLock::new(Some(db)),
            }),
        })
    }

    /// Stops the writer once the jobs already queued are done, and closes
    /// the database. Blocks: call it off the async runtime.
    pub fn close(&self) {
        self.inner.close();
    }

    fn db(&self) -> Result<Arc<Database>, ReplicaError> {
        self.inner
            .db
            .read()
            .expect("replica lock")
            .clone()
            .ok_or(ReplicaError::Stopped)
    }

    /// Merges rows into the replica; answers Written once they are
    /// durable, or a StaleMap error below the fence. The caller has checked
    /// that each value fits its key.
    pub async fn merge(
        &self,
        rows: Vec<(RowKey, RowValue)>,
        map_version: u64,
    ) -> Result<Response, ReplicaError> {
        self.run(|reply| Job::Merge {
            rows,
            map_version,
            reply,
        })
        .await
    }

    /// Removes each of `rows` whose stored encoding is still the one given
    /// (metadata.md, "Compacting tombstones").
    pub async fn remove_unchanged(&self, rows: Vec<(RowKey, Vec<u8>)>) -> Result<(), ReplicaError> {
        self.run(|reply| Job::Remove { rows, reply }).await?;
        Ok(())
    }

    pub async fn prepare(
        &self,
        key: RegisterKey,
        ballot: Ballot,
        map_version: u64,
    ) -> Result<Response, ReplicaError> {
        self.run(|reply| Job::Prepare {
            key,
            ballot,
            map_version,
            reply,
        })
        .await
    }

    pub async fn accept(
        &self,
        key: RegisterKey,
        ballot: Ballot,
        value: Option<Vec<u8>>,
        map_version: u64,
    ) -> Result<Response, ReplicaError> {
        self.run(|reply| Job::Accept {
            key,
            ballot,
            value,
            map_version,
            reply,
        })
        .await
    }

    /// From now on, refuses changes sent under maps older than `version`;
    /// returns once that is durable.
    pub async fn raise_fence(&self, version: u64) -> Result<(), ReplicaError> {
        if version == UNFENCED || version <= self.fence() {
            return Ok(());
        }
        self.run(|reply| Job::Fence { version, reply }).await?;
        Ok(())
    }

    /// The highest map version this replica has seen.
    pub fn fence(&self) -> u64 {
        self.inner.fence.load(Ordering::Acquire)
    }

    pub async fn mark_filled(
        &self,
        partition: Partition,
        version: u64,
        old: [u8; 32],
    ) -> Result<(), ReplicaError> {
        self.run(|reply| Job::MarkFilled {
            partition,
            version,
            old,
            reply,
        })
        .await?;
        Ok(())
    }

    /// Drops everything this replica holds of `partition` (once its new
    /// replicas have settled it and this node is no longer one).
    pub async fn forget(&self, partition: Partition) -> Result<(), ReplicaError> {
        self.run(|reply| Job::Forget { partition, reply }).await?;
        Ok(())
    }

    /// Drops every row, digest leaf, acceptor state and fill record this
    /// replica holds, keeping only its fence; returns how many rows went.
    /// For a node whose membership began after the map it held
    /// (spec/membership.md, "Membership since"): what it holds is from
    /// before a break, and may include values whose tombstones were
    /// compacted meanwhile. Blocks: redb runs it after the writer's batch.
    pub fn forget_everything(&self) -> Result<u64, ReplicaError> {
        let txn = self.db()?.begin_write().map_err(db_error)?;
        let forgotten = {
            let mut rows = txn.open_table(ROWS).map_err(db_error)?;
            let count = rows.len().map_err(db_error)?;
            rows.retain(|_, _| false).map_err(db_error)?;
            txn.open_table(LEAF_DIGESTS)
                .map_err(db_error)?
                .retain(|_, _| false)
                .map_err(db_error)?;
            txn.open_table(ACCEPTORS)
                .map_err(db_error)?
                .retain(|_, _| false)
                .map_err(db_error)?;
            txn.open_table(FILLED)
                .map_err(db_error)?
                .retain(|_, _| false)
                .map_err(db_error)?;
            count
        };
        txn.commit().map_err(db_error)?;
        Ok(forgotten)
    }

    /// What this replica's acceptor of `key` last accepted; reads only.
    pub fn accepted(&self, key: &RegisterKey) -> Result<Option<AcceptedValue>, ReplicaError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let acceptors = txn.open_table(ACCEPTORS).map_err(db_error)?;
        let address = (key.partition.as_str(), key.name.as_slice());
        match acceptors.get(address).map_err(db_error)? {
            None => Ok(None),
            Some(raw) => AcceptorState::decode(raw.value())
                .map(|state| state.accepted)
                .map_err(|e| ReplicaError::Corrupt(e.to_string())),
        }
    }

    pub fn is_filled(
        &self,
        partition: &Partition,
        version: u64,
        old: &[u8; 32],
    ) -> Result<bool, ReplicaError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let filled = txn.open_table(FILLED).map_err(db_error)?;
        Ok(filled
            .get((partition.as_str(), version, old.as_slice()))
            .map_err(db_error)?
            .is_some())
    }

    async fn run(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<Response, ReplicaError>>) -> Job,
    ) -> Result<Response, ReplicaError> {
        let (reply, answer) = oneshot::channel();
        self.submit(job(reply)).await?;
        answer.await.map_err(|_| ReplicaError::Stopped)?
    }

    async fn submit(&self, job: Job) -> Result<(), ReplicaError> {
        let jobs = self
            .inner
            .jobs
            .lock()
            .expect("replica lock")
            .clone()
            .ok_or(ReplicaError::Stopped)?;
        jobs.send(job).await.map_err(|_| ReplicaError::Stopped)
    }

    /// The stored values of `keys`, in order.
    pub fn get(&self, keys: &[RowKey]) -> Result<Vec<Option<RowValue>>, ReplicaError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(ROWS).map_err(db_error)?;
        keys.iter()
            .map(|key| {
                table
                    .get((
                        key.partition.as_str(),
                        key.table.code(),
                        key.sort.as_slice(),
                    ))
                    .map_err(db_error)?
                    .map(|raw| decode_row(raw.value()))
                    .transpose()
            })
            .collect()
    }

    /// The digests of rows as stored here, `None` where there is no row.
    pub fn row_digests(
        &self,
        partition: &Partition,
        keys: &[(Table, Vec<u8>)],
    ) -> Result<Vec<Option<[u8; 32]>>, ReplicaError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(ROWS).map_err(db_error)?;
        keys.iter()
            .map(|(t, sort)| {
                Ok(table
                    .get((partition.as_str(), t.code(), sort.as_slice()))
                    .map_err(db_error)?
                    .map(|raw| row_digest(*t, sort, raw.value())))
            })
            .collect()
    }

    /// Rows of one table of one partition with `start <= sort < end`.
    pub fn range(
        &self,
        partition: &Partition,
        table: Table,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<RangePage, ReplicaError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let rows = txn.open_table(ROWS).map_err(db_error)?;
        let from = (partition.as_str(), table.code(), start);
        let iter = match end {
            Some(end) => rows.range(from..(partition.as_str(), table.code(), end)),
            // Everything of this table: up to the next table code.
            None => rows.range(from..(partition.as_str(), table.code() + 1, &[][..])),
        }
        .map_err(db_error)?;
        let mut page = RangePage {
            rows: Vec::new(),
            more: false,
        };
        let mut bytes = 0;
        for row in iter {
            if page.rows.len() >= limit.max(1) || bytes >= PAGE_BYTES {
                page.more = true;
                break;
            }
            let (key, value) = row.map_err(db_error)?;
            bytes += value.value().len();
            page.rows
                .push((key.value().2.to_vec(), decode_row(value.value())?));
        }
        Ok(page)
    }

    /// Names of the registers of `partition` this replica holds acceptor
    /// state for, after `after`, at most `limit`.
    pub fn register_names(
        &self,
        partition: &Partition,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), ReplicaError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let acceptors = txn.open_table(ACCEPTORS).map_err(db_error)?;
        let name = partition.as_str();
        let start = after.unwrap_or_default();
        let mut names = Vec::new();
        for row in acceptors.range((name, start)..).map_err(db_error)? {
            let (key, _) = row.map_err(db_error)?;
            let (partition_name, register) = key.value();
            if partition_name != name {
                break;
            }
            if after.is_some_and(|a| a == register) {
                continue;
            }
            if names.len() >= limit.max(1) {
                return Ok((names, true));
            }
            names.push(register.to_vec());
        }
        Ok((names, false))
    }

    /// The digest of one partition (all zero leaves if it holds nothing).
    pub fn digest(&self, partition: &Partition) -> Result<PartitionDigest, ReplicaError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let leaves = txn.open_table(LEAF_DIGESTS).map_err(db_error)?;
        let mut digest = PartitionDigest::default();
        for row in leaves
            .range((partition.as_str(), 0u8)..=(partition.as_str(), u8::MAX))
            .map_err(db_error)?
        {
            let (key, value) = row.map_err(db_error)?;
            digest.leaves[usize::from(key.value().1)] = leaf_bytes(value.value())?;
        }
        Ok(digest)
    }

    /// The partitions held here after `after`, with their digest roots.
    pub fn partitions(
        &self,
        after: Option<&Partition>,
        limit: usize,
    ) -> Result<(Vec<PartitionRoot>, bool), ReplicaError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let leaves = txn.open_table(LEAF_DIGESTS).map_err(db_error)?;
        let iter = match after {
            // Past every leaf of `after`: its name followed by a zero byte
            // is the smallest name above it.
            Some(p) => leaves.range((format!("{}\0", p.as_str()).as_str(), 0u8)..),
            None => leaves.range::<(&str, u8)>(..),
        }
        .map_err(db_error)?;
        let mut items: Vec<PartitionRoot> = Vec::new();
        let mut current: Option<(String, PartitionDigest)> = None;
        for row in iter {
            let (key, value) = row.map_err(db_error)?;
            let (name, leaf) = key.value();
            if current.as_ref().is_none_or(|(n, _)| n != name) {
                if let Some((n, digest)) = current.take() {
                    items.push((partition_named(n), digest.root()));
                    if items.len() >= limit.max(1) {
                        return Ok((items, true));
                    }
                }
                current = Some((name.to_owned(), PartitionDigest::default()));
            }
            if let Some((_, digest)) = current.as_mut() {
                digest.leaves[usize::from(leaf)] = leaf_bytes(value.value())?;
            }
        }
        if let Some((n, digest)) = current {
            items.push((partition_named(n), digest.root()));
        }
        Ok((items, false))
    }

    /// (table, sort key, row digest) of the rows of `partition` in `leaves`,
    /// after the cursor, at most `limit`.
    pub fn leaf_rows(
        &self,
        partition: &Partition,
        leaves: &LeafSet,
        after: Option<(Table, &[u8])>,
        limit: usize,
    ) -> Result<(Vec<LeafRow>, bool), ReplicaError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let rows = txn.open_table(ROWS).map_err(db_error)?;
        let name = partition.as_str();
        let iter = match after {
            Some((table, sort)) => rows.range((name, table.code(), sort)..(name, u8::MAX, &[][..])),
            None => rows.range((name, 0u8, &[][..])..(name, u8::MAX, &[][..])),
        }
        .map_err(db_error)?;
        let mut items = Vec::new();
        for row in iter {
            let (key, value) = row.map_err(db_error)?;
            let (_, code, sort) = key.value();
            let Some(table) = Table::from_code(code) else {
                return Err(ReplicaError::Corrupt(format!("unknown table code {code}")));
            };
            if after.is_some_and(|(t, s)| t == table && s == sort)
                || !leaves.contains(leaf_of(table, sort))
            {
                continue;
            }
            if items.len() >= limit.max(1) {
                return Ok((items, true));
            }
            items.push((table, sort.to_vec(), row_digest(table, sort, value.value())));
        }
        Ok((items, false))
    }
}

fn partition_named(name: String) -> Partition {
    if name.is_empty() {
        Partition::cluster()
    } else {
        Partition::bucket(&name)
    }
}

fn leaf_bytes(raw: &[u8]) -> Result<[u8; 32], ReplicaError> {
    raw.try_into()
        .map_err(|_| ReplicaError::Corrupt("digest leaf is not 32 bytes".into()))
}

fn decode_row(raw: &[u8]) -> Result<RowValue, ReplicaError> {
    RowValue::decode(raw).map_err(|e| ReplicaError::Corrupt(e.to_string()))
}

fn run_writer(db: &Database, fence: &AtomicU64, jobs: mpsc::Receiver<Job>) {
    crate::batching::run(
        jobs,
        MAX_BATCH as u64,
        |_| 1,
        |batch| commit_batch(db, fence, batch),
    );
}

/// Applies a batch in one durable transaction, then answers every job.
fn commit_batch(db: &Database, fence: &AtomicU64, batch: Vec<Job>) {
    let mut answers: Vec<Result<Response, ReplicaError>> = Vec::with_capacity(batch.len());
    let mut raised = fence.load(Ordering::Acquire);
    let result = (|| -> Result<(), ReplicaError> {
        let mut txn = db.begin_write().map_err(db_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(db_error)?;
        {
            let mut rows = txn.open_table(ROWS).map_err(db_error)?;
            let mut leaves = txn.open_table(LEAF_DIGESTS).map_err(db_error)?;
            let mut acceptors = txn.open_table(ACCEPTORS).map_err(db_error)?;
            let mut filled = txn.open_table(FILLED).map_err(db_error)?;
            let mut state = txn.open_table(STATE).map_err(db_error)?;
            // Jobs are taken in order: a change queued before a fence is
            // applied, one queued after it is refused.
            let stale = |map_version: u64, fence: u64| {
                (map_version < fence).then(|| {
                    Response::error(
                        ErrorCode::StaleMap,
                        format!("your cluster map (version {map_version}) is older than version {fence}, which this replica has seen"),
                    )
                })
            };
            for job in &batch {
                answers.push(match job {
                    Job::Merge {
                        rows: incoming,
                        map_version,
                        ..
                    } => match stale(*map_version, raised) {
                        Some(refusal) => Ok(refusal),
                        None => {
                            merge_rows(&mut rows, &mut leaves, incoming).map(|()| Response::Written)
                        }
                    },
                    Job::Prepare {
                        key,
                        ballot,
                        map_version,
                        ..
                    } => match stale(*map_version, raised) {
                        Some(refusal) => Ok(refusal),
                        None => {
                            with_acceptor(&mut acceptors, key, |state| state.on_prepare(*ballot))
                        }
                    },
                    Job::Accept {
                        key,
                        ballot,
                        value,
                        map_version,
                        ..
                    } => match stale(*map_version, raised) {
                        Some(refusal) => Ok(refusal),
                        None => with_acceptor(&mut acceptors, key, |state| {
                            state.on_accept(*ballot, value.clone())
                        }),
                    },
                    Job::Fence { version, .. } => {
                        if *version > raised {
                            raised = *version;
                            state.insert("fence", raised).map_err(db_error)?;
                        }
                        Ok(Response::Written)
                    }
                    Job::Remove { rows: removals, .. } => {
                        remove_unchanged(&mut rows, &mut leaves, removals)
                            .map(|()| Response::Written)
                    }
                    Job::Forget { partition, .. } => {
                        forget(&mut rows, &mut leaves, &mut acceptors, partition)
                            .map(|()| Response::Written)
                    }
                    Job::MarkFilled {
                        partition,
                        version,
                        old,
                        ..
                    } => filled
                        .insert((partition.as_str(), *version, old.as_slice()), 1)
                        .map(|_| Response::Written)
                        .map_err(db_error),
                });
            }
        }
        txn.commit().map_err(db_error)
    })();
    match &result {
        Ok(()) => fence.store(raised, Ordering::Release),
        Err(error) => {
            tracing::error!(%error, "metadata batch failed; nothing in it is acknowledged");
        }
    }
    for (job, answer) in batch.into_iter().zip(
        answers
            .into_iter()
            .map(Some)
            .chain(std::iter::repeat_with(|| None)),
    ) {
        let answer = match (&result, answer) {
            (Ok(()), Some(answer)) => answer,
            (Err(error), _) => Err(ReplicaError::Database(error.to_string())),
            (Ok(()), None) => Err(ReplicaError::Database("job not applied".into())),
        };
        let _ = job.into_reply().send(answer);
    }
}

type RowsTable<'t> = redb::Table<'t, (&'static str, u8, &'static [u8]), &'static [u8]>;
type LeavesTable<'t> = redb::Table<'t, (&'static str, u8), &'static [u8]>;
type AcceptorsTable<'t> = redb::Table<'t, (&'static str, &'static [u8]), &'static [u8]>;

fn merge_rows(
    rows: &mut RowsTable<'_>,
    leaves: &mut LeavesTable<'_>,
    incoming: &[(RowKey, RowValue)],
) -> Result<(), ReplicaError> {
    for (key, value) in incoming {
        let address = (
            key.partition.as_str(),
            key.table.code(),
            key.sort.as_slice(),
        );
        let stored = rows
            .get(address)
            .map_err(db_error)?
            .map(|raw| raw.value().to_vec());
        let merged = match &stored {
            None => value.clone(),
            Some(raw) => decode_row(raw)?
                .merge(value)
                .map_err(|e| ReplicaError::Corrupt(e.to_string()))?,
        };
        let encoded = merged.encode();
        if stored.as_deref() == Some(encoded.as_slice()) {
            continue;
        }
        let leaf_key = (key.partition.as_str(), leaf_of(key.table, &key.sort));
        let mut leaf = match leaves.get(leaf_key).map_err(db_error)? {
            Some(raw) => leaf_bytes(raw.value())?,
            None => [0; 32],
        };
        if let Some(old) = &stored {
            xor_into(&mut leaf, &row_digest(key.table, &key.sort, old));
        }
        xor_into(&mut leaf, &row_digest(key.table, &key.sort, &encoded));
        leaves.insert(leaf_key, leaf.as_slice()).map_err(db_error)?;
        rows.insert(address, encoded.as_slice()).map_err(db_error)?;
    }
    Ok(())
}

fn remove_unchanged(
    rows: &mut RowsTable<'_>,
    leaves: &mut LeavesTable<'_>,
    removals: &[(RowKey, Vec<u8>)],
) -> Result<(), ReplicaError> {
    for (key, expected) in removals {
        let address = (
            key.partition.as_str(),
            key.table.code(),
            key.sort.as_slice(),
        );
        let unchanged = rows
            .get(address)
            .map_err(db_error)?
            .is_some_and(|raw| raw.value() == expected.as_slice());
        if !unchanged {
            continue;
        }
        let leaf_key = (key.partition.as_str(), leaf_of(key.table, &key.sort));
        let mut leaf = match leaves.get(leaf_key).map_err(db_error)? {
            Some(raw) => leaf_bytes(raw.value())?,
            None => [0; 32],
        };
        xor_into(&mut leaf, &row_digest(key.table, &key.sort, expected));
        leaves.insert(leaf_key, leaf.as_slice()).map_err(db_error)?;
        rows.remove(address).map_err(db_error)?;
    }
    Ok(())
}

fn forget(
    rows: &mut RowsTable<'_>,
    leaves: &mut LeavesTable<'_>,
    acceptors: &mut AcceptorsTable<'_>,
    partition: &Partition,
) -> Result<(), ReplicaError> {
    let name = partition.as_str();
    rows.retain_in((name, 0u8, &[][..])..(name, u8::MAX, &[][..]), |_, _| false)
        .map_err(db_error)?;
    leaves
        .retain_in((name, 0u8)..=(name, u8::MAX), |_, _| false)
        .map_err(db_error)?;
    // Every register name of the partition: from the empty name up to the
    // next partition's names (the partition name followed by a zero byte).
    let next = format!("{name}\0");
    acceptors
        .retain_in((name, &[][..])..(next.as_str(), &[][..]), |_, _| false)
        .map_err(db_error)?;
    Ok(())
}

fn with_acceptor(
    acceptors: &mut AcceptorsTable<'_>,
    key: &RegisterKey,
    step: impl FnOnce(&mut AcceptorState) -> Response,
) -> Result<Response, ReplicaError> {
    let address = (key.partition.as_str(), key.name.as_slice());
    let mut state = match acceptors.get(address).map_err(db_error)? {
        Some(raw) => {
            AcceptorState::decode(raw.value()).map_err(|e| ReplicaError::Corrupt(e.to_string()))?
        }
        None => AcceptorState::default(),
    };
    let before = state.clone();
    let answer = step(&mut state);
    if state != before {
        acceptors
            .insert(address, state.encode().as_slice())
            .map_err(db_error)?;
    }
    Ok(answer)
}

// A leaf is stored under a u8.
const _: () = assert!(LEAVES == 256);

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_protocol::hlc::{Hlc, Timestamp};
    use cairn_protocol::ids::NodeId;
    use cairn_protocol::meta::Register;

    fn row(name: &str) -> (RowKey, RowValue) {
        (
            RowKey::new(
                Partition::cluster(),
                Table::Buckets,
                name.as_bytes().to_vec(),
            ),
            RowValue::Register(Register {
                at: Timestamp {
                    hlc: Hlc::new(1, 0),
                    node: NodeId([1; 32]),
                },
                value: Some(b"v".to_vec()),
            }),
        )
    }

    #[tokio::test]
    async fn changes_from_maps_older_than_the_fence_are_refused_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let replica = MetaReplica::open(&path).unwrap();
        assert_eq!(
            replica.merge(vec![row("a")], 3).await.unwrap(),
            Response::Written
        );
        replica.raise_fence(4).await.unwrap();
        let refused = replica.merge(vec![row("b")], 3).await.unwrap();
        assert!(
            matches!(
                refused,
                Response::Error {
                    code: ErrorCode::StaleMap,
                    ..
                }
            ),
            "{refused:?}"
        );
        assert_eq!(replica.get(&[row("b").0]).unwrap(), vec![None]);
        // Anti-entropy pulls are not coordinator writes: never fenced.
        assert_eq!(
            replica.merge(vec![row("c")], UNFENCED).await.unwrap(),
            Response::Written
        );
        let closing = replica.clone();
        tokio::task::spawn_blocking(move || closing.close())
            .await
            .unwrap();
        assert!(matches!(
            replica.merge(vec![row("d")], 9).await,
            Err(ReplicaError::Stopped)
        ));
        let reopened = MetaReplica::open(&path).unwrap();
        assert_eq!(reopened.fence(), 4);
        let refused = reopened.merge(vec![row("e")], 3).await.unwrap();
        assert!(matches!(
            refused,
            Response::Error {
                code: ErrorCode::StaleMap,
                ..
            }
        ));
    }
}
