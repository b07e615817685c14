//! The fragment store: immutable fragments in append-only volumes with a
//! redb index, made durable in batches (spec/store.md).
//!
//! A put is acknowledged only once its bytes and its index entry are both
//! on disk; reads verify every byte against the fragment id and never serve
//! a corrupt fragment. Nothing here overwrites a fragment.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;

use cairn_protocol::ids::{FragmentHasher, FragmentId, NodeId, UploadId};
use cairn_protocol::wire::{FragmentLock, Hold, ObjectKeyDigest};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

const FRAGMENTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("fragments");
const VOLUMES: TableDefinition<u32, u64> = TableDefinition::new("volumes");
/// Upload id ‖ fragment id of every indexed fragment: what a release finds.
const BY_UPLOAD: TableDefinition<&[u8; 48], ()> = TableDefinition::new("by_upload");
/// Where the scrub is (one row, [`SCRUB_ROW`]): a restart resumes it.
const SCRUB: TableDefinition<&str, &[u8]> = TableDefinition::new("scrub");
const SCRUB_ROW: &str = "state";
const RECORD_MAGIC: &[u8; 4] = b"CRNF";
const RECORD_HEADER_BYTES: u64 = 4 + 1 + 32 + 8;
/// The format byte of a record in a volume.
const RECORD_FORMAT: u8 = 2;
/// The format byte of an index entry.
const ENTRY_FORMAT: u8 = 4;
/// The volume of an entry whose record is gone (a corrupt record that
/// compaction did not copy): volumes are numbered from 1.
const NO_VOLUME: u32 = 0;
/// Entries compaction takes from one walk of the index (bounded memory
/// whatever the records' sizes).
const RECORDS_PER_WALK: usize = 65_536;

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The store keeps `index.redb` and `volumes/` here.
    pub dir: PathBuf,
    /// Refuse puts that would take the volumes past this many bytes.
    pub capacity_bytes: u64,
    pub max_fragment_bytes: u64,
    /// Start a new volume when the active one would pass this size.
    pub volume_bytes: u64,
    /// How many bytes one group commit may gather.
    pub batch_bytes: u64,
    /// How long a deleted fragment stays restorable.
    pub trash_ms: u64,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>, capacity_bytes: u64) -> Self {
        Self {
            dir: dir.into(),
            capacity_bytes,
            // The largest segment (64 MiB of ciphertext) stored whole (k = 1).
            max_fragment_bytes: 64 << 20,
            volume_bytes: 1 << 30,
            batch_bytes: 32 << 20,
            trash_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("fragment bytes hash to {actual}, not to the claimed id {claimed}")]
    HashMismatch {
        claimed: FragmentId,
        actual: FragmentId,
    },
    #[error("fragment of {len} bytes is above this node's limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("the hold of fragment {0} is not signed by its writer")]
    BadHold(FragmentId),
    #[error(
        "fragment {id} asks to be held until {retain_until_unix_ms} (Unix ms): a put's hold carries no retention (Object Lock reaches fragments by lock-fragments, checked against the version)"
    )]
    RetentionRefused {
        id: FragmentId,
        retain_until_unix_ms: u64,
    },
    #[error("no room for a {len}-byte fragment: {used} of {capacity} bytes used")]
    DiskFull { len: u64, used: u64, capacity: u64 },
    #[error("fragment {0} is not stored here")]
    NotFound(FragmentId),
    #[error("fragment {0} is corrupt on disk; it is quarantined and will not be served")]
    Corrupt(FragmentId),
    #[error("fragment {id} is kept: {why}")]
    Held { id: FragmentId, why: HeldBy },
    #[error("fragment {0} is not in the trash")]
    NotInTrash(FragmentId),
    #[error("store I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("store index failed: {0}")]
    Index(String),
    #[error("index entry of fragment {0} is malformed")]
    BadIndexEntry(FragmentId),
    #[error("the store is shut down")]
    Closed,
}

fn index_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Index(e.to_string())
}

/// Fragment bytes whose BLAKE3 has been checked against their id.
pub struct VerifiedFragment {
    id: FragmentId,
    bytes: Vec<u8>,
}

impl VerifiedFragment {
    pub fn new(claimed: FragmentId, bytes: Vec<u8>) -> Result<Self, StoreError> {
        Self::check(claimed, FragmentId::of(&bytes), bytes)
    }

    /// For bytes that were hashed as they arrived (a streamed put).
    pub fn from_hasher(
        claimed: FragmentId,
        bytes: Vec<u8>,
        hasher: &FragmentHasher,
    ) -> Result<Self, StoreError> {
        Self::check(claimed, hasher.finalize(), bytes)
    }

    fn check(claimed: FragmentId, actual: FragmentId, bytes: Vec<u8>) -> Result<Self, StoreError> {
        if actual != claimed {
            return Err(StoreError::HashMismatch { claimed, actual });
        }
        Ok(Self { id: claimed, bytes })
    }

    pub fn id(&self) -> FragmentId {
        self.id
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// What keeps a fragment from the trash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldBy {
    /// Its writer's hold, until this date.
    Hold { until_unix_ms: u64 },
    /// A compliance retention of a version that uses it, until this date.
    Compliance { until_unix_ms: u64 },
    /// A legal hold on a version that uses it, leased until this date.
    LegalHold { lease_until_unix_ms: u64 },
}

impl std::fmt::Display for HeldBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hold { until_unix_ms } => {
                write!(f, "its hold keeps it until {until_unix_ms} (Unix ms)")
            }
            Self::Compliance { until_unix_ms } => write!(
                f,
                "a version that uses it is under a compliance retention until {until_unix_ms} (Unix ms)"
            ),
            Self::LegalHold {
                lease_until_unix_ms,
            } => write!(
                f,
                "a version that uses it is under a legal hold (leased here until {lease_until_unix_ms} Unix ms)"
            ),
        }
    }
}

/// What locking an upload's fragments did here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Locked {
    /// Fragments of the upload and object whose lock changed.
    pub changed: u64,
    /// Fragments of the upload and object here, in any state.
    pub fragments: u64,
}

/// What releasing an upload did here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Live fragments of the upload moved to the trash.
    pub trashed: u64,
    /// Live fragments of the upload kept because their hold's retain-until
    /// is still in the future.
    pub held: u64,
}

/// The fragments `by_upload` lists under `upload`.
fn ids_of_upload(
    by_upload: &impl ReadableTable<&'static [u8; 48], ()>,
    upload: &UploadId,
) -> Result<Vec<FragmentId>, StoreError> {
    let first = upload_key(upload, &FragmentId([0; 32]));
    let last = upload_key(upload, &FragmentId([0xff; 32]));
    by_upload
        .range::<&[u8; 48]>(&first..=&last)
        .map_err(index_error)?
        .map(|row| {
            row.map(|(key, _)| FragmentId(key.value()[16..].try_into().expect("32 bytes")))
                .map_err(index_error)
        })
        .collect()
}

/// The entries, in any state, whose hold names `upload` and `object`: only
/// the fragments written for that object (an upload id alone proves
/// nothing).
fn entries_of_upload(
    table: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    by_upload: &impl ReadableTable<&'static [u8; 48], ()>,
    upload: &UploadId,
    object: &ObjectKeyDigest,
) -> Result<Vec<(FragmentId, FragmentEntry)>, StoreError> {
    let mut entries = Vec::new();
    for id in ids_of_upload(by_upload, upload)? {
        let Some(raw) = table.get(id.as_bytes()).map_err(index_error)? else {
            continue;
        };
        let entry = FragmentEntry::decode(id, raw.value())?;
        if entry.hold.upload == *upload && entry.hold.object == *object {
            entries.push((id, entry));
        }
    }
    Ok(entries)
}

fn upload_key(upload: &UploadId, id: &FragmentId) -> [u8; 48] {
    let mut key = [0u8; 48];
    key[..16].copy_from_slice(upload.as_bytes());
    key[16..].copy_from_slice(id.as_bytes());
    key
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    /// The fragment was already here (its hold now keeps the later date).
    AlreadyStored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmentState {
    Live,
    Trash,
    Quarantined,
}

/// An index entry (spec/store.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentEntry {
    pub state: FragmentState,
    pub volume: u32,
    pub offset: u64,
    pub len: u64,
    pub stored_at_unix_ms: u64,
    pub trashed_at_unix_ms: u64,
    pub hold: Hold,
    /// The Object Lock of the versions that use it, as last checked.
    pub lock: FragmentLock,
}

const ENTRY_BYTES: usize = 206;
/// Entries of format 3 had no lock.
const ENTRY_BYTES_FORMAT_3: usize = 190;
/// Entries of format 2 had no object key digest; read as bound to no
/// object, their fragments are never released (spec/store.md).
const ENTRY_BYTES_FORMAT_2: usize = 158;

impl FragmentEntry {
    fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut out = [0u8; ENTRY_BYTES];
        out[0] = ENTRY_FORMAT;
        out[1] = match self.state {
            FragmentState::Live => 0,
            FragmentState::Trash => 1,
            FragmentState::Quarantined => 2,
        };
        out[2..6].copy_from_slice(&self.volume.to_be_bytes());
        out[6..14].copy_from_slice(&self.offset.to_be_bytes());
        out[14..22].copy_from_slice(&self.len.to_be_bytes());
        out[22..30].copy_from_slice(&self.stored_at_unix_ms.to_be_bytes());
        out[30..38].copy_from_slice(&self.trashed_at_unix_ms.to_be_bytes());
        out[38..54].copy_from_slice(self.hold.upload.as_bytes());
        out[54..62].copy_from_slice(&self.hold.retain_until_unix_ms.to_be_bytes());
        out[62..94].copy_from_slice(self.hold.writer.as_bytes());
        out[94..158].copy_from_slice(&self.hold.signature);
        out[158..190].copy_from_slice(self.hold.object.as_bytes());
        out[190..198].copy_from_slice(&self.lock.compliance_until_unix_ms.to_be_bytes());
        out[198..206].copy_from_slice(&self.lock.legal_hold_until_unix_ms.to_be_bytes());
        out
    }

    /// What keeps it from the trash at `now_unix_ms`, if anything.
    pub fn held_by(&self, now_unix_ms: u64) -> Option<HeldBy> {
        if self.lock.legal_hold_until_unix_ms > now_unix_ms {
            Some(HeldBy::LegalHold {
                lease_until_unix_ms: self.lock.legal_hold_until_unix_ms,
            })
        } else if self.lock.compliance_until_unix_ms > now_unix_ms {
            Some(HeldBy::Compliance {
                until_unix_ms: self.lock.compliance_until_unix_ms,
            })
        } else if self.hold.retain_until_unix_ms > now_unix_ms {
            Some(HeldBy::Hold {
                until_unix_ms: self.hold.retain_until_unix_ms,
            })
        } else {
            None
        }
    }

    /// The lock it would carry under `asked`: each date only ever moves
    /// later.
    fn locked_under(&self, asked: FragmentLock) -> FragmentLock {
        self.lock.join(asked)
    }

    fn decode(id: FragmentId, raw: &[u8]) -> Result<Self, StoreError> {
        let bad = || StoreError::BadIndexEntry(id);
        let u64_at = |at: usize| u64::from_be_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        let (object, lock) = match (raw.first(), raw.len()) {
            (Some(&ENTRY_FORMAT), ENTRY_BYTES) => (
                ObjectKeyDigest(raw[158..190].try_into().expect("32 bytes")),
                FragmentLock {
                    compliance_until_unix_ms: u64_at(190),
                    legal_hold_until_unix_ms: u64_at(198),
                },
            ),
            (Some(3), ENTRY_BYTES_FORMAT_3) => (
                ObjectKeyDigest(raw[158..190].try_into().expect("32 bytes")),
                FragmentLock::default(),
            ),
            (Some(2), ENTRY_BYTES_FORMAT_2) => (ObjectKeyDigest([0; 32]), FragmentLock::default()),
            _ => return Err(bad()),
        };
        let state = match raw[1] {
            0 => FragmentState::Live,
            1 => FragmentState::Trash,
            2 => FragmentState::Quarantined,
            _ => return Err(bad()),
        };
        Ok(Self {
            state,
            volume: u32::from_be_bytes(raw[2..6].try_into().expect("4 bytes")),
            offset: u64_at(6),
            len: u64_at(14),
            stored_at_unix_ms: u64_at(22),
            trashed_at_unix_ms: u64_at(30),
            hold: Hold {
                upload: UploadId(raw[38..54].try_into().expect("16 bytes")),
                object,
                retain_until_unix_ms: u64_at(54),
                writer: NodeId(raw[62..94].try_into().expect("32 bytes")),
                signature: raw[94..158].try_into().expect("64 bytes"),
            },
            lock,
        })
    }
}

/// Where the scrub of this store is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubState {
    /// The pass under way, and the last fragment it checked (`None`: the
    /// pass has checked nothing yet).
    pub pass: Option<ScrubPass>,
    /// When the last pass finished (0: never).
    pub last_finished_unix_ms: u64,
    /// Passes finished, and corrupt fragments they found, since the store
    /// was created.
    pub passes: u64,
    pub corrupt_found: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubPass {
    pub started_unix_ms: u64,
    pub after: Option<FragmentId>,
    pub checked: u64,
    pub bytes: u64,
}

impl ScrubState {
    const BYTES: usize = 2 + 32 + 8 * 7;

    fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        let pass = self.pass.unwrap_or_default();
        out[0] = u8::from(self.pass.is_some());
        out[1] = u8::from(pass.after.is_some());
        out[2..34].copy_from_slice(pass.after.as_ref().map_or(&[0; 32], |id| id.as_bytes()));
        let numbers = [
            pass.started_unix_ms,
            pass.checked,
            pass.bytes,
            self.last_finished_unix_ms,
            self.passes,
            self.corrupt_found,
            0,
        ];
        for (i, n) in numbers.iter().enumerate() {
            out[34 + 8 * i..42 + 8 * i].copy_from_slice(&n.to_be_bytes());
        }
        out
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        if raw.len() != Self::BYTES || raw[0] > 1 || raw[1] > 1 {
            return None;
        }
        let n =
            |i: usize| u64::from_be_bytes(raw[34 + 8 * i..42 + 8 * i].try_into().expect("8 bytes"));
        let after = (raw[1] == 1).then(|| FragmentId(raw[2..34].try_into().expect("32 bytes")));
        Some(Self {
            pass: (raw[0] == 1).then_some(ScrubPass {
                started_unix_ms: n(0),
                after,
                checked: n(1),
                bytes: n(2),
            }),
            last_finished_unix_ms: n(3),
            passes: n(4),
            corrupt_found: n(5),
        })
    }
}

/// What one scrub step checked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubStep {
    /// The last fragment of the step (where the next one starts after).
    pub last: Option<FragmentId>,
    /// No live fragment is left after `last`.
    pub reached_end: bool,
    pub checked: u64,
    pub bytes: u64,
    /// Fragments found corrupt, now quarantined.
    pub corrupt: Vec<FragmentId>,
}

struct PutRequest {
    fragment: VerifiedFragment,
    hold: Hold,
    now_unix_ms: u64,
    reply: oneshot::Sender<Result<PutOutcome, StoreError>>,
}

struct Shared {
    config: StoreConfig,
    db: Database,
    /// Read handles of every volume, by number.
    volumes: RwLock<BTreeMap<u32, Arc<File>>>,
}

/// A node's fragment store. Cheap to clone; the last clone dropped stops
/// the writer thread after it has finished the puts already queued.
#[derive(Clone)]
pub struct FragmentStore {
    // Dropped first: stops the writer, which releases its share of `shared`.
    writer: Arc<WriterHandle>,
    /// The appender: the writer thread takes it for each batch, compaction
    /// for each chunk it moves, so that one of them appends at a time.
    appender: Arc<Mutex<Writer>>,
    shared: Arc<Shared>,
}

/// Stops the writer thread when the last store clone goes, after the puts
/// already queued, so that the index is closed when the store is.
struct WriterHandle {
    puts: Option<mpsc::Sender<PutRequest>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.puts.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the fragment store writer panicked");
        }
    }
}

impl Shared {
    /// The bytes of the record `entry` points at, if it holds fragment `id`
    /// whole (header and hash checked; a record cut short by the end of its
    /// volume does not); an unknown volume is a bad entry, and an I/O
    /// error is an error, not evidence of rot.
    fn read_record(
        &self,
        id: &FragmentId,
        entry: &FragmentEntry,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let file = self
            .volumes
            .read()
            .expect("volume map lock")
            .get(&entry.volume)
            .cloned()
            .ok_or(StoreError::BadIndexEntry(*id))?;
        let read = |buffer: &mut [u8], at: u64| match file.read_exact_at(buffer, at) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Err(error) => Err(StoreError::Io(error)),
        };
        let mut header = [0u8; RECORD_HEADER_BYTES as usize];
        let mut bytes = vec![0u8; entry.len as usize];
        let intact = read(&mut header, entry.offset)?
            && read(&mut bytes, entry.offset + RECORD_HEADER_BYTES)?
            && header[..4] == RECORD_MAGIC[..]
            && header[4] == RECORD_FORMAT
            && header[5..37] == id.0[..]
            && header[37..45] == entry.len.to_be_bytes()
            && FragmentId::of(&bytes) == *id;
        Ok(intact.then_some(bytes))
    }
}

fn volume_path(dir: &Path, number: u32) -> PathBuf {
    dir.join("volumes").join(format!("{number:06}.vol"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Deletes the volume files the index does not know: one a compaction
/// emptied and dropped from the index just before a crash, or one started
/// for a batch that never committed. No entry can point into them.
fn remove_orphan_volumes(dir: &Path, committed: &BTreeMap<u32, u64>) -> Result<(), StoreError> {
    let volumes = dir.join("volumes");
    let mut removed = false;
    if committed.is_empty() {
        // An index that names no volume beside volumes that hold bytes is
        // an index lost or replaced, not a crash: delete nothing.
        for file in fs::read_dir(&volumes)? {
            let file = file?;
            if file.metadata()?.len() > 0 {
                return Err(StoreError::Index(format!(
                    "the index names no volume but {} holds bytes: refusing to start over it (restore index.redb, or move the volumes away to start empty)",
                    file.path().display()
                )));
            }
        }
    }
    for file in fs::read_dir(&volumes)? {
        let path = file?.path();
        let number = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".vol"))
            .and_then(|number| number.parse::<u32>().ok());
        if let Some(number) = number
            && !committed.contains_key(&number)
        {
            tracing::info!(volume = number, "removing a volume the index does not name");
            fs::remove_file(&path)?;
            removed = true;
        }
    }
    if removed {
        sync_dir(&volumes)?;
    }
    Ok(())
}

/// What one volume holds, for compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeUse {
    pub number: u32,
    /// Its committed length.
    pub bytes: u64,
    /// The bytes of the records index entries point at, in any state
    /// (a trashed fragment is still restorable); the rest is dead.
    pub referenced_bytes: u64,
    /// New records go here: it is never compacted.
    pub active: bool,
}

impl VolumeUse {
    pub fn dead_bytes(&self) -> u64 {
        self.bytes.saturating_sub(self.referenced_bytes)
    }
}

/// What compacting one volume did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Records copied to the active volume.
    pub moved: u64,
    pub moved_bytes: u64,
    /// Records that did not read whole: their entries are quarantined and
    /// their bytes are not copied.
    pub quarantined: u64,
    /// The length of the volume deleted.
    pub reclaimed_bytes: u64,
}

impl FragmentStore {
    /// Opens (or creates) the store, cutting every volume back to its
    /// committed length: bytes of a batch a crash interrupted disappear.
    pub fn open(config: StoreConfig) -> Result<Self, StoreError> {
        fs::create_dir_all(config.dir.join("volumes"))?;
        let db = Database::create(config.dir.join("index.redb")).map_err(index_error)?;
        let committed: BTreeMap<u32, u64> = {
            let txn = db.begin_write().map_err(index_error)?;
            let committed = {
                txn.open_table(FRAGMENTS).map_err(index_error)?;
                txn.open_table(BY_UPLOAD).map_err(index_error)?;
                txn.open_table(SCRUB).map_err(index_error)?;
                let table = txn.open_table(VOLUMES).map_err(index_error)?;
                table
                    .iter()
                    .map_err(index_error)?
                    .map(|row| {
                        row.map(|(k, v)| (k.value(), v.value()))
                            .map_err(index_error)
                    })
                    .collect::<Result<_, _>>()?
            };
            txn.commit().map_err(index_error)?;
            committed
        };
        remove_orphan_volumes(&config.dir, &committed)?;
        let mut volumes = BTreeMap::new();
        for (&number, &len) in &committed {
            let path = volume_path(&config.dir, number);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            if file.metadata()?.len() > len {
                tracing::warn!(
                    volume = number,
                    committed = len,
                    "cutting an interrupted batch off the volume"
                );
                file.set_len(len)?;
                file.sync_all()?;
            }
            volumes.insert(number, Arc::new(file));
        }
        let shared = Arc::new(Shared {
            config,
            db,
            volumes: RwLock::new(volumes),
        });
        let (puts, requests) = mpsc::channel(1024);
        let appender = Arc::new(Mutex::new(Writer::new(shared.clone(), committed)?));
        let thread = {
            let appender = appender.clone();
            let max_bytes = shared.config.batch_bytes;
            thread::Builder::new()
                .name("cairn-store-writer".into())
                .spawn(move || {
                    crate::batching::run(
                        requests,
                        max_bytes,
                        |request: &PutRequest| request.fragment.len(),
                        |batch| appender.lock().expect("appender lock").commit_batch(batch),
                    )
                })?
        };
        let writer = Arc::new(WriterHandle {
            puts: Some(puts),
            thread: Some(thread),
        });
        Ok(Self {
            writer,
            appender,
            shared,
        })
    }

    /// Stores a fragment durably; returns once it is on disk and indexed.
    pub async fn put(
        &self,
        fragment: VerifiedFragment,
        hold: Hold,
        now_unix_ms: u64,
    ) -> Result<PutOutcome, StoreError> {
        let max = self.shared.config.max_fragment_bytes;
        if fragment.len() > max {
            return Err(StoreError::TooLarge {
                len: fragment.len(),
                max,
            });
        }
        if !hold.verify(&fragment.id) {
            return Err(StoreError::BadHold(fragment.id));
        }
        let (reply, done) = oneshot::channel();
        let request = PutRequest {
            fragment,
            hold,
            now_unix_ms,
            reply,
        };
        let puts = self.writer.puts.as_ref().ok_or(StoreError::Closed)?;
        puts.send(request).await.map_err(|_| StoreError::Closed)?;
        done.await.map_err(|_| StoreError::Closed)?
    }

    /// The index entry of a fragment, in any state.
    pub fn entry(&self, id: &FragmentId) -> Result<Option<FragmentEntry>, StoreError> {
        let txn = self.shared.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(FRAGMENTS).map_err(index_error)?;
        let row = table.get(id.as_bytes()).map_err(index_error)?;
        row.map(|raw| FragmentEntry::decode(*id, raw.value()))
            .transpose()
    }

    /// Reads `len` bytes from `offset` of a live fragment (clipped to its
    /// end), after verifying the whole fragment. Blocking: call it from a
    /// blocking thread.
    pub fn read(&self, id: &FragmentId, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let live = |entry: Option<FragmentEntry>| match entry {
            Some(entry) if entry.state == FragmentState::Live => Ok(entry),
            Some(entry) if entry.state == FragmentState::Quarantined => {
                Err(StoreError::Corrupt(*id))
            }
            _ => Err(StoreError::NotFound(*id)),
        };
        let mut entry = live(self.entry(id)?)?;
        let record = match self.shared.read_record(id, &entry) {
            // Its volume was compacted away between the two reads: the
            // entry now names where the record went.
            Err(StoreError::BadIndexEntry(_)) => {
                entry = live(self.entry(id)?)?;
                self.shared.read_record(id, &entry)?
            }
            other => other?,
        };
        let Some(mut bytes) = record else {
            tracing::error!(fragment = %id, volume = entry.volume, offset = entry.offset, "corrupt fragment: quarantined");
            // Kept for the trash period as evidence, then purged.
            self.set_state(id, |e| {
                e.state = FragmentState::Quarantined;
                e.trashed_at_unix_ms = crate::clock::now_unix_ms();
            })?;
            return Err(StoreError::Corrupt(*id));
        };
        let start = offset.min(entry.len) as usize;
        let end = offset.saturating_add(len).min(entry.len) as usize;
        bytes.truncate(end);
        bytes.drain(..start);
        Ok(bytes)
    }

    /// Moves a fragment to the trash, unless its hold forbids it.
    pub fn delete(&self, id: &FragmentId, now_unix_ms: u64) -> Result<(), StoreError> {
        self.set_state(id, |entry| {
            if let Some(why) = entry.held_by(now_unix_ms) {
                return Err(StoreError::Held { id: *id, why });
            }
            if entry.state == FragmentState::Live {
                entry.state = FragmentState::Trash;
                entry.trashed_at_unix_ms = now_unix_ms;
            }
            Ok(())
        })?
    }

    /// Brings a fragment back from the trash.
    pub fn restore(&self, id: &FragmentId) -> Result<(), StoreError> {
        self.set_state(id, |entry| {
            if entry.state != FragmentState::Trash {
                return Err(StoreError::NotInTrash(*id));
            }
            entry.state = FragmentState::Live;
            entry.trashed_at_unix_ms = 0;
            Ok(())
        })?
    }

    /// Moves every live fragment whose hold names `upload` and `object` to
    /// the trash, except those still held: by their retention, or because
    /// they were stored at or after `stored_before` (spec/store.md,
    /// "Releasing an upload").
    /// Blocking: call it from a blocking thread.
    pub fn release(
        &self,
        upload: &UploadId,
        object: &ObjectKeyDigest,
        stored_before: u64,
        now_unix_ms: u64,
    ) -> Result<Released, StoreError> {
        let mut txn = self.shared.db.begin_write().map_err(index_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(index_error)?;
        let mut released = Released::default();
        {
            let mut table = txn.open_table(FRAGMENTS).map_err(index_error)?;
            let by_upload = txn.open_table(BY_UPLOAD).map_err(index_error)?;
            for (id, mut entry) in entries_of_upload(&table, &by_upload, upload, object)? {
                if entry.state != FragmentState::Live {
                    continue;
                }
                if entry.stored_at_unix_ms > now_unix_ms {
                    // Stored while this node's clock ran ahead: counted
                    // from now, or it would be held until that date.
                    entry.stored_at_unix_ms = now_unix_ms;
                    table
                        .insert(id.as_bytes(), &entry.encode()[..])
                        .map_err(index_error)?;
                }
                if entry.held_by(now_unix_ms).is_some() || entry.stored_at_unix_ms >= stored_before
                {
                    released.held += 1;
                    continue;
                }
                entry.state = FragmentState::Trash;
                entry.trashed_at_unix_ms = now_unix_ms;
                table
                    .insert(id.as_bytes(), &entry.encode()[..])
                    .map_err(index_error)?;
                released.trashed += 1;
            }
        }
        txn.commit().map_err(index_error)?;
        Ok(released)
    }

    /// Brings back from the trash every fragment whose hold names `upload`
    /// and `object` (a version that uses them was restored); returns how
    /// many. Blocking.
    pub fn restore_upload(
        &self,
        upload: &UploadId,
        object: &ObjectKeyDigest,
        now_unix_ms: u64,
    ) -> Result<u64, StoreError> {
        // A fragment compaction moved between the read and the change is
        // looked at again where it went (a few rounds: compaction moves a
        // record once per volume it leaves).
        let mut restored = 0;
        for _ in 0..4 {
            let (more, moved) = self.restore_upload_once(upload, object, now_unix_ms)?;
            restored += more;
            if moved == 0 {
                return Ok(restored);
            }
        }
        Err(StoreError::Index(format!(
            "fragments of upload {upload} kept moving while they were restored; try again"
        )))
    }

    /// One round of [`Self::restore_upload`]: (restored, moved meanwhile).
    fn restore_upload_once(
        &self,
        upload: &UploadId,
        object: &ObjectKeyDigest,
        now_unix_ms: u64,
    ) -> Result<(u64, u64), StoreError> {
        // The records are read and hashed outside the write transaction
        // (which would hold up every put meanwhile), then each verdict is
        // applied only to an entry still where and what it was.
        let trashed: Vec<(FragmentId, FragmentEntry)> = {
            let txn = self.shared.db.begin_read().map_err(index_error)?;
            let table = txn.open_table(FRAGMENTS).map_err(index_error)?;
            let by_upload = txn.open_table(BY_UPLOAD).map_err(index_error)?;
            let mut trashed = entries_of_upload(&table, &by_upload, upload, object)?;
            trashed.retain(|(_, entry)| entry.state == FragmentState::Trash);
            trashed
        };
        let mut verdicts = Vec::with_capacity(trashed.len());
        let mut moved = 0u64;
        for (id, entry) in trashed {
            // The trash is not scrubbed: a record that rotted there comes
            // back quarantined, for repair to rebuild; an I/O error is an
            // error. One whose volume went meanwhile is left for next time.
            match self.shared.read_record(&id, &entry) {
                Ok(whole) => verdicts.push((id, entry, whole.is_some())),
                Err(StoreError::BadIndexEntry(_)) => moved += 1,
                Err(error) => return Err(error),
            }
        }
        if verdicts.is_empty() {
            return Ok((0, moved));
        }
        let mut restored = 0;
        let mut txn = self.shared.db.begin_write().map_err(index_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(index_error)?;
        {
            let mut table = txn.open_table(FRAGMENTS).map_err(index_error)?;
            for (id, read, whole) in verdicts {
                let Some(raw) = table.get(id.as_bytes()).map_err(index_error)? else {
                    continue;
                };
                let mut entry = FragmentEntry::decode(id, raw.value())?;
                drop(raw);
                if entry != read {
                    // Moved by compaction: looked at again; changed
                    // otherwise (restored, purged, rewritten): left.
                    if entry.state == read.state
                        && (entry.volume, entry.offset) != (read.volume, read.offset)
                    {
                        moved += 1;
                    }
                    continue;
                }
                if whole {
                    entry.state = FragmentState::Live;
                    entry.trashed_at_unix_ms = 0;
                    restored += 1;
                } else {
                    tracing::error!(fragment = %id, "a fragment in the trash is corrupt: quarantined instead of restored");
                    entry.state = FragmentState::Quarantined;
                    entry.trashed_at_unix_ms = now_unix_ms;
                }
                table
                    .insert(id.as_bytes(), &entry.encode()[..])
                    .map_err(index_error)?;
            }
        }
        txn.commit().map_err(index_error)?;
        Ok((restored, moved))
    }

    /// How many fragments whose hold names `upload` and `object` would
    /// change under `lock` (in any state), and how many there are. Blocking.
    pub fn lock_changes(
        &self,
        upload: &UploadId,
        object: &ObjectKeyDigest,
        lock: FragmentLock,
    ) -> Result<Locked, StoreError> {
        let txn = self.shared.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(FRAGMENTS).map_err(index_error)?;
        let by_upload = txn.open_table(BY_UPLOAD).map_err(index_error)?;
        let mut locked = Locked::default();
        for (_, entry) in entries_of_upload(&table, &by_upload, upload, object)? {
            locked.fragments += 1;
            if entry.locked_under(lock) != entry.lock {
                locked.changed += 1;
            }
        }
        Ok(locked)
    }

    /// Puts every fragment whose hold names `upload` and `object`, in any
    /// state, under `lock` (its compliance date only moves later), in one
    /// transaction (spec/store.md, "Locks"). Blocking.
    pub fn lock_upload(
        &self,
        upload: &UploadId,
        object: &ObjectKeyDigest,
        lock: FragmentLock,
    ) -> Result<Locked, StoreError> {
        let mut txn = self.shared.db.begin_write().map_err(index_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(index_error)?;
        let mut locked = Locked::default();
        {
            let mut table = txn.open_table(FRAGMENTS).map_err(index_error)?;
            let by_upload = txn.open_table(BY_UPLOAD).map_err(index_error)?;
            for (id, mut entry) in entries_of_upload(&table, &by_upload, upload, object)? {
                locked.fragments += 1;
                let next = entry.locked_under(lock);
                if next != entry.lock {
                    entry.lock = next;
                    table
                        .insert(id.as_bytes(), &entry.encode()[..])
                        .map_err(index_error)?;
                    locked.changed += 1;
                }
            }
        }
        txn.commit().map_err(index_error)?;
        Ok(locked)
    }

    /// Moves this node's copy of `id` to the trash if it is live and its
    /// hold names `upload` and `object` and keeps it no longer (a copy left
    /// off placement, checked by the caller); `false` when it was not live.
    pub fn drop_copy(
        &self,
        id: &FragmentId,
        upload: &UploadId,
        object: &ObjectKeyDigest,
        now_unix_ms: u64,
    ) -> Result<bool, StoreError> {
        self.set_state(id, |entry| {
            if entry.state != FragmentState::Live
                || entry.hold.upload != *upload
                || entry.hold.object != *object
            {
                return Ok(false);
            }
            if let Some(why) = entry.held_by(now_unix_ms) {
                return Err(StoreError::Held { id: *id, why });
            }
            entry.state = FragmentState::Trash;
            entry.trashed_at_unix_ms = now_unix_ms;
            Ok(true)
        })?
    }

    /// How long a fragment stays in the trash here.
    pub fn trash_period_ms(&self) -> u64 {
        self.shared.config.trash_ms
    }

    /// How many fragments are here in each state: (live, trash, quarantined).
    pub fn counts(&self) -> Result<(u64, u64, u64), StoreError> {
        let txn = self.shared.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(FRAGMENTS).map_err(index_error)?;
        let mut counts = (0, 0, 0);
        for row in table.iter().map_err(index_error)? {
            let (key, value) = row.map_err(index_error)?;
            match FragmentEntry::decode(FragmentId(*key.value()), value.value())?.state {
                FragmentState::Live => counts.0 += 1,
                FragmentState::Trash => counts.1 += 1,
                FragmentState::Quarantined => counts.2 += 1,
            }
        }
        Ok(counts)
    }

    /// What the store holds, for a status: counts by state, live bytes,
    /// and the bytes of the volumes. Walks the index: blocking.
    pub fn status(&self) -> Result<cairn_protocol::status::StoreStatus, StoreError> {
        let txn = self.shared.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(FRAGMENTS).map_err(index_error)?;
        let mut status = cairn_protocol::status::StoreStatus {
            capacity_bytes: self.shared.config.capacity_bytes,
            ..Default::default()
        };
        for row in table.iter().map_err(index_error)? {
            let (key, value) = row.map_err(index_error)?;
            let Ok(entry) = FragmentEntry::decode(FragmentId(*key.value()), value.value()) else {
                continue;
            };
            match entry.state {
                FragmentState::Live => {
                    status.live += 1;
                    status.live_bytes += entry.len;
                }
                FragmentState::Trash => status.trash += 1,
                FragmentState::Quarantined => status.quarantined += 1,
            }
        }
        let volumes = txn.open_table(VOLUMES).map_err(index_error)?;
        for row in volumes.iter().map_err(index_error)? {
            let (_, len) = row.map_err(index_error)?;
            status.used_bytes += len.value();
        }
        Ok(status)
    }

    /// Forgets the fragments whose trash period is over, and quarantined
    /// entries as long after they were quarantined; returns how many.
    pub fn purge_trash(&self, now_unix_ms: u64) -> Result<usize, StoreError> {
        let trash_ms = self.shared.config.trash_ms;
        let mut txn = self.shared.db.begin_write().map_err(index_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(index_error)?;
        let purged = {
            let mut table = txn.open_table(FRAGMENTS).map_err(index_error)?;
            let mut by_upload = txn.open_table(BY_UPLOAD).map_err(index_error)?;
            let mut expired = Vec::new();
            for row in table.iter().map_err(index_error)? {
                let (key, value) = row.map_err(index_error)?;
                let id = FragmentId(*key.value());
                let entry = FragmentEntry::decode(id, value.value())?;
                // Quarantined before quarantines were stamped: kept.
                let stamped = entry.state == FragmentState::Trash || entry.trashed_at_unix_ms > 0;
                // A locked entry stays whatever its state: a quarantined
                // one keeps its lock for the copy repair writes anew.
                if matches!(
                    entry.state,
                    FragmentState::Trash | FragmentState::Quarantined
                ) && stamped
                    && entry.trashed_at_unix_ms.saturating_add(trash_ms) <= now_unix_ms
                    && entry.held_by(now_unix_ms).is_none()
                {
                    expired.push((id, entry.hold.upload));
                }
            }
            for (id, upload) in &expired {
                table.remove(id.as_bytes()).map_err(index_error)?;
                by_upload
                    .remove(&upload_key(upload, id))
                    .map_err(index_error)?;
            }
            expired.len()
        };
        txn.commit().map_err(index_error)?;
        Ok(purged)
    }

    /// Live fragment ids in `[start, end]`, in order, at most `limit`.
    pub fn list(
        &self,
        start: &FragmentId,
        end: &FragmentId,
        limit: usize,
    ) -> Result<Vec<FragmentId>, StoreError> {
        let txn = self.shared.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(FRAGMENTS).map_err(index_error)?;
        let mut ids = Vec::new();
        for row in table
            .range::<&[u8; 32]>(start.as_bytes()..=end.as_bytes())
            .map_err(index_error)?
        {
            if ids.len() == limit {
                break;
            }
            let (key, value) = row.map_err(index_error)?;
            let id = FragmentId(*key.value());
            if FragmentEntry::decode(id, value.value())?.state == FragmentState::Live {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Count and BLAKE3 digest of the live ids in `[start, end]` (wire.md).
    pub fn digest(
        &self,
        start: &FragmentId,
        end: &FragmentId,
    ) -> Result<(u64, [u8; 32]), StoreError> {
        // Hashed as the range is walked: a digest of any range holds one
        // id in memory, not all of them.
        let txn = self.shared.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(FRAGMENTS).map_err(index_error)?;
        let mut hasher = FragmentHasher::new();
        let mut count = 0u64;
        for row in table
            .range::<&[u8; 32]>(start.as_bytes()..=end.as_bytes())
            .map_err(index_error)?
        {
            let (key, value) = row.map_err(index_error)?;
            let id = FragmentId(*key.value());
            if FragmentEntry::decode(id, value.value())?.state == FragmentState::Live {
                hasher.update(id.as_bytes());
                count += 1;
            }
        }
        Ok((count, hasher.finalize().0))
    }

    /// Where the scrub is.
    pub fn scrub_state(&self) -> Result<ScrubState, StoreError> {
        let txn = self.shared.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(SCRUB).map_err(index_error)?;
        let row = table.get(SCRUB_ROW).map_err(index_error)?;
        Ok(row
            .and_then(|raw| ScrubState::decode(raw.value()))
            .unwrap_or_default())
    }

    pub fn set_scrub_state(&self, state: &ScrubState) -> Result<(), StoreError> {
        let mut txn = self.shared.db.begin_write().map_err(index_error)?;
        // Losing the last steps to a crash only scrubs them again.
        txn.set_durability(Durability::None).map_err(index_error)?;
        {
            let mut table = txn.open_table(SCRUB).map_err(index_error)?;
            table
                .insert(SCRUB_ROW, &state.encode()[..])
                .map_err(index_error)?;
        }
        txn.commit().map_err(index_error)
    }

    /// Re-hashes the live fragments after `after` in id order, until about
    /// `max_bytes` were read; a fragment whose bytes do not match is
    /// quarantined (as any read does). Blocking.
    pub fn scrub_step(
        &self,
        after: Option<&FragmentId>,
        max_bytes: u64,
    ) -> Result<ScrubStep, StoreError> {
        let mut batch: Vec<(FragmentId, u64)> = Vec::new();
        let mut bad_entries = Vec::new();
        let mut last_seen: Option<FragmentId> = None;
        let mut reached_end = true;
        {
            let txn = self.shared.db.begin_read().map_err(index_error)?;
            let table = txn.open_table(FRAGMENTS).map_err(index_error)?;
            let start = match after {
                Some(id) => std::ops::Bound::Excluded(id.as_bytes()),
                None => std::ops::Bound::Unbounded,
            };
            let mut planned = 0u64;
            for row in table
                .range::<&[u8; 32]>((start, std::ops::Bound::Unbounded))
                .map_err(index_error)?
            {
                if planned >= max_bytes {
                    reached_end = false;
                    break;
                }
                let (key, value) = row.map_err(index_error)?;
                let id = FragmentId(*key.value());
                match FragmentEntry::decode(id, value.value()) {
                    Ok(entry) if entry.state == FragmentState::Live => {
                        planned += entry.len;
                        batch.push((id, entry.len));
                    }
                    Ok(_) => {}
                    // An entry that does not decode is reported and passed
                    // over: the scrub goes on past it.
                    Err(_) => bad_entries.push(id),
                }
                last_seen = Some(id);
            }
        }
        let mut step = ScrubStep {
            last: last_seen,
            reached_end,
            corrupt: bad_entries,
            ..ScrubStep::default()
        };
        for (id, len) in batch {
            match self.read(&id, 0, 0) {
                Ok(_) => {}
                Err(StoreError::Corrupt(_) | StoreError::BadIndexEntry(_)) => step.corrupt.push(id),
                // Trashed or replaced since the index was read.
                Err(StoreError::NotFound(_)) => continue,
                Err(error) => return Err(error),
            }
            step.checked += 1;
            step.bytes += len;
        }
        Ok(step)
    }

    /// The bytes of each volume, and how many of them the index still
    /// points at. Walks the index: blocking.
    pub fn volume_use(&self) -> Result<Vec<VolumeUse>, StoreError> {
        let active = self.appender.lock().expect("appender lock").active.0;
        let txn = self.shared.db.begin_read().map_err(index_error)?;
        let mut volumes: BTreeMap<u32, VolumeUse> = BTreeMap::new();
        for row in txn
            .open_table(VOLUMES)
            .map_err(index_error)?
            .iter()
            .map_err(index_error)?
        {
            let (number, len) = row.map_err(index_error)?;
            let number = number.value();
            volumes.insert(
                number,
                VolumeUse {
                    number,
                    bytes: len.value(),
                    referenced_bytes: 0,
                    active: number == active,
                },
            );
        }
        for row in txn
            .open_table(FRAGMENTS)
            .map_err(index_error)?
            .iter()
            .map_err(index_error)?
        {
            let (key, value) = row.map_err(index_error)?;
            let Ok(entry) = FragmentEntry::decode(FragmentId(*key.value()), value.value()) else {
                continue;
            };
            if let Some(volume) = volumes.get_mut(&entry.volume) {
                volume.referenced_bytes += RECORD_HEADER_BYTES + entry.len;
            }
        }
        Ok(volumes.into_values().collect())
    }

    /// Copies every record of volume `number` that the index points at to
    /// the active volume, in chunks of about `chunk_bytes` (each made
    /// durable and switched in one index transaction), then deletes the
    /// volume once no entry points into it (spec/store.md, "Compaction").
    /// `after_chunk` is called with each chunk's bytes, outside the
    /// appender's lock (where a throttle sleeps); when it answers `false`
    /// the compaction stops there (the volume stays, what moved is moved).
    /// The volume must not be the active one ([`Self::seal_volume`]).
    /// Blocking.
    pub fn compact_volume(
        &self,
        number: u32,
        chunk_bytes: u64,
        mut after_chunk: impl FnMut(u64) -> bool,
    ) -> Result<Compacted, StoreError> {
        let mut compacted = Compacted::default();
        loop {
            let records = self.records_in(number, RECORDS_PER_WALK)?;
            if records.is_empty() {
                // No entry points into it, and none can again: entries
                // only ever point into the active volume anew.
                let mut writer = self.appender.lock().expect("appender lock");
                compacted.reclaimed_bytes = writer.drop_volume(number)?;
                return Ok(compacted);
            }
            let mut chunk = Vec::new();
            let mut chunk_len = 0u64;
            let mut records = records.into_iter().peekable();
            while let Some(record) = records.next() {
                chunk_len += RECORD_HEADER_BYTES + record.1.len;
                chunk.push(record);
                if chunk_len >= chunk_bytes || records.peek().is_none() {
                    let moved = self
                        .appender
                        .lock()
                        .expect("appender lock")
                        .move_records(number, &chunk)?;
                    compacted.moved += moved.moved;
                    compacted.moved_bytes += moved.moved_bytes;
                    compacted.quarantined += moved.quarantined;
                    if !after_chunk(chunk_len) {
                        return Ok(compacted);
                    }
                    chunk.clear();
                    chunk_len = 0;
                }
            }
        }
    }

    /// Starts a new active volume if `number` is still the active one, so
    /// that it can be compacted (one mostly dead bytes that no put follows
    /// would otherwise keep them). Blocking.
    pub fn seal_volume(&self, number: u32) -> Result<(), StoreError> {
        let mut writer = self.appender.lock().expect("appender lock");
        if writer.active.0 == number {
            writer.start_volume()?;
            writer.record_active_volume()?;
        }
        Ok(())
    }

    /// Up to `limit` entries that point into volume `number`, in the order
    /// of their records.
    fn records_in(
        &self,
        number: u32,
        limit: usize,
    ) -> Result<Vec<(FragmentId, FragmentEntry)>, StoreError> {
        let txn = self.shared.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(FRAGMENTS).map_err(index_error)?;
        let mut records = Vec::new();
        for row in table.iter().map_err(index_error)? {
            if records.len() == limit {
                break;
            }
            let (key, value) = row.map_err(index_error)?;
            let id = FragmentId(*key.value());
            if let Ok(entry) = FragmentEntry::decode(id, value.value())
                && entry.volume == number
            {
                records.push((id, entry));
            }
        }
        records.sort_by_key(|(_, entry)| entry.offset);
        Ok(records)
    }

    fn set_state<T>(
        &self,
        id: &FragmentId,
        change: impl FnOnce(&mut FragmentEntry) -> T,
    ) -> Result<T, StoreError> {
        let mut txn = self.shared.db.begin_write().map_err(index_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(index_error)?;
        let result = {
            let mut table = txn.open_table(FRAGMENTS).map_err(index_error)?;
            let mut entry = match table.get(id.as_bytes()).map_err(index_error)? {
                Some(raw) => FragmentEntry::decode(*id, raw.value())?,
                None => return Err(StoreError::NotFound(*id)),
            };
            let result = change(&mut entry);
            table
                .insert(id.as_bytes(), &entry.encode()[..])
                .map_err(index_error)?;
            result
        };
        txn.commit().map_err(index_error)?;
        Ok(result)
    }
}

/// The single writer: appends batches of records, syncs once, indexes once.
struct Writer {
    shared: Arc<Shared>,
    committed: BTreeMap<u32, u64>,
    active: (u32, File),
}

impl Writer {
    fn new(shared: Arc<Shared>, committed: BTreeMap<u32, u64>) -> Result<Self, StoreError> {
        let number = committed.keys().next_back().copied().unwrap_or(1);
        let mut writer = Self {
            active: (number, Self::open_volume(&shared, number)?),
            shared,
            committed,
        };
        writer.committed.entry(number).or_insert(0);
        // The active volume has its row before any append: a crash in the
        // first batch then leaves bytes the next open cuts off, not a
        // volume the index does not name beside no other.
        writer.record_active_volume()?;
        Ok(writer)
    }

    /// Writes the active volume's row (its committed length) if missing.
    fn record_active_volume(&self) -> Result<(), StoreError> {
        let (number, _) = self.active;
        let mut txn = self.shared.db.begin_write().map_err(index_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(index_error)?;
        {
            let mut volumes = txn.open_table(VOLUMES).map_err(index_error)?;
            if volumes.get(number).map_err(index_error)?.is_some() {
                drop(volumes);
                txn.abort().map_err(index_error)?;
                return Ok(());
            }
            volumes
                .insert(number, self.committed[&number])
                .map_err(index_error)?;
        }
        txn.commit().map_err(index_error)
    }

    fn open_volume(shared: &Shared, number: u32) -> Result<File, StoreError> {
        let path = volume_path(&shared.config.dir, number);
        let created = !path.exists();
        // Positioned writes at the committed length, not O_APPEND: the bytes
        // of a failed batch are simply overwritten by the next one.
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        if created {
            sync_dir(&shared.config.dir.join("volumes"))?;
        }
        let reader = File::open(&path)?;
        shared
            .volumes
            .write()
            .expect("volume map lock")
            .insert(number, Arc::new(reader));
        Ok(file)
    }

    fn used_bytes(&self) -> u64 {
        self.committed.values().sum()
    }

    /// Leaves the active volume for the next one. Until a batch commits
    /// into it, the new volume has no row in `volumes` (a crash leaves an
    /// orphan file, removed at open).
    fn start_volume(&mut self) -> Result<(), StoreError> {
        // The last records of the volume left must be durable first.
        self.active.1.sync_data()?;
        let next = self.active.0 + 1;
        self.active = (next, Self::open_volume(&self.shared, next)?);
        self.committed.insert(next, 0);
        Ok(())
    }

    /// Cuts what a failed step appended off the active volume and forgets
    /// it; a volume the step filled and left is cut back at the next open.
    fn cut_back(&mut self, before: BTreeMap<u32, u64>) {
        let (number, file) = &self.active;
        let len = before.get(number).copied().unwrap_or(0);
        if let Err(error) = file.set_len(len) {
            tracing::error!(%error, volume = number, "could not cut a failed step off the volume");
        }
        self.committed = before;
        self.committed.entry(*number).or_insert(0);
    }

    /// One chunk of a compaction: copies the records `chunk` names out of
    /// volume `from` (each checked whole on the way), syncs them, then
    /// points their entries at the copies in one transaction. An entry
    /// that changed since `chunk` was read is left alone (its copy is dead
    /// bytes); a record that does not read whole is not copied, and its
    /// entry is quarantined without a volume.
    fn move_records(
        &mut self,
        from: u32,
        chunk: &[(FragmentId, FragmentEntry)],
    ) -> Result<Compacted, StoreError> {
        if from == self.active.0 {
            return Err(StoreError::Index(format!(
                "volume {from} is the active volume and is not compacted"
            )));
        }
        let before = self.committed.clone();
        let result = self.try_move_records(from, chunk);
        if result.is_err() {
            self.cut_back(before);
        }
        result
    }

    fn try_move_records(
        &mut self,
        from: u32,
        chunk: &[(FragmentId, FragmentEntry)],
    ) -> Result<Compacted, StoreError> {
        // Each record: its id, where it was, and where its copy is (none
        // when it did not read whole).
        type Move = (FragmentId, u64, Option<(u32, u64)>);
        let mut moves: Vec<Move> = Vec::with_capacity(chunk.len());
        let mut touched = false;
        for (id, entry) in chunk {
            match self.shared.read_record(id, entry)? {
                Some(bytes) => {
                    moves.push((*id, entry.offset, Some(self.append_record(id, &bytes)?)));
                    touched = true;
                }
                None => moves.push((*id, entry.offset, None)),
            }
        }
        if touched {
            self.active.1.sync_data()?;
        }
        let mut compacted = Compacted::default();
        let now = crate::clock::now_unix_ms();
        let mut txn = self.shared.db.begin_write().map_err(index_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(index_error)?;
        {
            let mut table = txn.open_table(FRAGMENTS).map_err(index_error)?;
            for (id, offset, to) in moves {
                let Some(raw) = table.get(id.as_bytes()).map_err(index_error)? else {
                    continue;
                };
                let Ok(mut entry) = FragmentEntry::decode(id, raw.value()) else {
                    continue;
                };
                drop(raw);
                if entry.volume != from || entry.offset != offset {
                    continue;
                }
                match to {
                    Some((volume, offset)) => {
                        entry.volume = volume;
                        entry.offset = offset;
                        compacted.moved += 1;
                        compacted.moved_bytes += RECORD_HEADER_BYTES + entry.len;
                    }
                    None => {
                        if entry.state != FragmentState::Quarantined {
                            tracing::error!(fragment = %id, volume = from, "corrupt fragment found by compaction: quarantined");
                            entry.state = FragmentState::Quarantined;
                            entry.trashed_at_unix_ms = now;
                        }
                        // No volume: a later put of the id writes it anew.
                        entry.volume = NO_VOLUME;
                        entry.offset = 0;
                        compacted.quarantined += 1;
                    }
                }
                table
                    .insert(id.as_bytes(), &entry.encode()[..])
                    .map_err(index_error)?;
            }
            let mut volumes = txn.open_table(VOLUMES).map_err(index_error)?;
            for (number, len) in &self.committed {
                volumes.insert(number, len).map_err(index_error)?;
            }
        }
        txn.commit().map_err(index_error)?;
        Ok(compacted)
    }

    /// Forgets volume `number` and deletes its file (the caller found no
    /// entry pointing into it); returns its length.
    fn drop_volume(&mut self, number: u32) -> Result<u64, StoreError> {
        if number == self.active.0 {
            return Err(StoreError::Index(format!(
                "volume {number} is the active volume and is not compacted"
            )));
        }
        let mut txn = self.shared.db.begin_write().map_err(index_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(index_error)?;
        {
            let mut volumes = txn.open_table(VOLUMES).map_err(index_error)?;
            volumes.remove(number).map_err(index_error)?;
        }
        txn.commit().map_err(index_error)?;
        let len = self.committed.remove(&number).unwrap_or(0);
        self.shared
            .volumes
            .write()
            .expect("volume map lock")
            .remove(&number);
        // Readers holding the file still read it; the name goes now, and a
        // crash before this leaves an orphan that the next open removes.
        let volumes = self.shared.config.dir.join("volumes");
        fs::remove_file(volume_path(&self.shared.config.dir, number))?;
        sync_dir(&volumes)?;
        Ok(len)
    }

    fn commit_batch(&mut self, batch: Vec<PutRequest>) {
        let before = self.committed.clone();
        let mut replies = Vec::with_capacity(batch.len());
        let result = self.write_batch(batch, &mut replies);
        if let Err(error) = &result {
            tracing::error!(%error, "fragment batch failed; nothing in it is acknowledged");
            self.cut_back(before);
        }
        for (reply, outcome) in replies {
            let outcome = match (&result, outcome) {
                (Err(error), _) => Err(StoreError::Io(io::Error::other(error.to_string()))),
                (Ok(()), outcome) => outcome,
            };
            let _ = reply.send(outcome);
        }
    }

    #[allow(clippy::type_complexity)]
    fn write_batch(
        &mut self,
        batch: Vec<PutRequest>,
        replies: &mut Vec<(
            oneshot::Sender<Result<PutOutcome, StoreError>>,
            Result<PutOutcome, StoreError>,
        )>,
    ) -> Result<(), StoreError> {
        let mut txn = self.shared.db.begin_write().map_err(index_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(index_error)?;
        {
            let mut table = txn.open_table(FRAGMENTS).map_err(index_error)?;
            let mut by_upload = txn.open_table(BY_UPLOAD).map_err(index_error)?;
            let mut new_entries: Vec<(FragmentId, FragmentEntry)> = Vec::new();
            let mut touched_volumes = Vec::new();
            for request in batch {
                let id = request.fragment.id;
                let existing = match table.get(id.as_bytes()).map_err(index_error)? {
                    Some(raw) => Some(FragmentEntry::decode(id, raw.value())?),
                    None => None,
                };
                let duplicate_in_batch = new_entries.iter().any(|(other, _)| *other == id);
                let mut replaced: Option<FragmentEntry> = None;
                match existing {
                    _ if duplicate_in_batch => {
                        replies.push((request.reply, Ok(PutOutcome::AlreadyStored)));
                        continue;
                    }
                    Some(mut entry) if entry.state == FragmentState::Live => {
                        // A hold only ever extends, and only for the
                        // upload and object it names: a later put cannot
                        // move a fragment to an upload or key it can release.
                        if request.hold.upload == entry.hold.upload
                            && request.hold.object == entry.hold.object
                            && request.hold.retain_until_unix_ms > entry.hold.retain_until_unix_ms
                        {
                            by_upload
                                .remove(&upload_key(&entry.hold.upload, &id))
                                .map_err(index_error)?;
                            by_upload
                                .insert(&upload_key(&request.hold.upload, &id), ())
                                .map_err(index_error)?;
                            entry.hold = request.hold;
                        }
                        table
                            .insert(id.as_bytes(), &entry.encode()[..])
                            .map_err(index_error)?;
                        replies.push((request.reply, Ok(PutOutcome::AlreadyStored)));
                        continue;
                    }
                    // A copy in the trash whose bytes are still whole (the
                    // trash is not scrubbed: they are checked here) is live
                    // again in place, under this put's hold and time.
                    Some(mut entry)
                        if entry.state == FragmentState::Trash
                            && matches!(self.shared.read_record(&id, &entry), Ok(Some(_))) =>
                    {
                        by_upload
                            .remove(&upload_key(&entry.hold.upload, &id))
                            .map_err(index_error)?;
                        by_upload
                            .insert(&upload_key(&request.hold.upload, &id), ())
                            .map_err(index_error)?;
                        entry.state = FragmentState::Live;
                        entry.trashed_at_unix_ms = 0;
                        entry.stored_at_unix_ms = request.now_unix_ms;
                        entry.hold = request.hold;
                        table
                            .insert(id.as_bytes(), &entry.encode()[..])
                            .map_err(index_error)?;
                        replies.push((request.reply, Ok(PutOutcome::AlreadyStored)));
                        continue;
                    }
                    // Otherwise (rotted, or quarantined) this put's bytes
                    // are written anew; the old entry's pair goes with it.
                    Some(entry) => replaced = Some(entry),
                    None => {}
                }
                let record_len = RECORD_HEADER_BYTES + request.fragment.len();
                let (used, capacity) = (self.used_bytes(), self.shared.config.capacity_bytes);
                if used + record_len > capacity {
                    let refusal = StoreError::DiskFull {
                        len: request.fragment.len(),
                        used,
                        capacity,
                    };
                    replies.push((request.reply, Err(refusal)));
                    continue;
                }
                let (volume, offset) = self.append(&request.fragment)?;
                if !touched_volumes.contains(&volume) {
                    touched_volumes.push(volume);
                }
                let entry = FragmentEntry {
                    state: FragmentState::Live,
                    volume,
                    offset,
                    len: request.fragment.len(),
                    stored_at_unix_ms: request.now_unix_ms,
                    trashed_at_unix_ms: 0,
                    hold: request.hold,
                    // The lock of the entry it replaces stays: it was
                    // checked for the fragment, whoever writes it again.
                    lock: replaced.as_ref().map(|old| old.lock).unwrap_or_default(),
                };
                if let Some(old) = replaced {
                    by_upload
                        .remove(&upload_key(&old.hold.upload, &id))
                        .map_err(index_error)?;
                }
                new_entries.push((id, entry));
                replies.push((request.reply, Ok(PutOutcome::Stored)));
            }
            if !new_entries.is_empty() {
                // Data first: the index must never point at bytes not on disk.
                self.active.1.sync_data()?;
                for (id, entry) in &new_entries {
                    table
                        .insert(id.as_bytes(), &entry.encode()[..])
                        .map_err(index_error)?;
                    by_upload
                        .insert(&upload_key(&entry.hold.upload, id), ())
                        .map_err(index_error)?;
                }
                let mut volumes = txn.open_table(VOLUMES).map_err(index_error)?;
                for (number, len) in &self.committed {
                    volumes.insert(number, len).map_err(index_error)?;
                }
            }
        }
        txn.commit().map_err(index_error)?;
        Ok(())
    }

    /// Appends one record to the active volume (starting a new one when it
    /// is full) and returns where it starts.
    fn append(&mut self, fragment: &VerifiedFragment) -> Result<(u32, u64), StoreError> {
        self.append_record(&fragment.id, &fragment.bytes)
    }

    fn append_record(&mut self, id: &FragmentId, bytes: &[u8]) -> Result<(u32, u64), StoreError> {
        let record_len = RECORD_HEADER_BYTES + bytes.len() as u64;
        let (number, _) = self.active;
        let end = self.committed[&number];
        if end > 0 && end + record_len > self.shared.config.volume_bytes {
            self.start_volume()?;
        }
        let (number, file) = &self.active;
        let offset = self.committed[number];
        let mut header = [0u8; RECORD_HEADER_BYTES as usize];
        header[..4].copy_from_slice(RECORD_MAGIC);
        header[4] = RECORD_FORMAT;
        header[5..37].copy_from_slice(id.as_bytes());
        header[37..45].copy_from_slice(&(bytes.len() as u64).to_be_bytes());
        file.write_all_at(&header, offset)?;
        file.write_all_at(bytes, offset + RECORD_HEADER_BYTES)?;
        self.committed.insert(*number, offset + record_len);
        Ok((*number, offset))
    }
}
