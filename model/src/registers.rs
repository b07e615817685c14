//! Register tables: the cluster partition's tables of named records
//! (buckets, access keys, KMS keys), each a last-writer-wins register per
//! name, read through a small per-gateway cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_node::meta::Metadata;
use cairn_protocol::meta::{Partition, Register, RowKey, RowValue, Table};
use cairn_protocol::records::{AccessKeyRecord, BucketRecord, KmsKeyRecord, RecordError};

use crate::error::{ModelError, ModelResult};

/// Names remembered per table at most: lookups of names that do not exist
/// are remembered too, and clients choose those names.
const MAX_CACHED: usize = 4096;
/// Rows per page when a table is listed.
const LIST_PAGE: usize = 1000;

/// A record kept under a name in a register table of the cluster partition.
pub trait RegisterRecord: Sized + Clone + Send + Sync + 'static {
    const TABLE: Table;
    /// What the record is, for messages ("bucket", "access key").
    const NOUN: &'static str;
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Result<Self, RecordError>;
}

/// A record type of the protocol crate kept in `$table`.
macro_rules! register_record {
    ($record:ty, $table:expr, $noun:literal) => {
        impl RegisterRecord for $record {
            const TABLE: Table = $table;
            const NOUN: &'static str = $noun;
            fn encode(&self) -> Vec<u8> {
                <$record>::encode(self)
            }
            fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
                <$record>::decode(bytes)
            }
        }
    };
}

register_record!(BucketRecord, Table::Buckets, "bucket");
register_record!(AccessKeyRecord, Table::AccessKeys, "access key");
register_record!(KmsKeyRecord, Table::KmsKeys, "KMS key");

/// How long a read is trusted on this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caching {
    /// Records and absences alike, for this long: a change made through
    /// another gateway shows here within it.
    For(Duration),
    /// Records that never change once written: kept until evicted;
    /// absences are not kept.
    WriteOnce,
}

impl Caching {
    /// Whether what a read found at `at` may still be answered.
    fn trusts<R>(self, at: Instant, record: &Option<R>) -> bool {
        match self {
            Caching::For(trusted) => at.elapsed() < trusted,
            Caching::WriteOnce => record.is_some(),
        }
    }
}

/// A record or its absence, and when the read that found it began.
type Cached<R> = (Instant, Option<R>);

/// What one gateway remembers of a register table: at most [`MAX_CACHED`]
/// names. When full, expired entries go first, then absences (names that
/// clients choose), then everything. An entry's age counts from when its
/// read began, so a slow read is trusted no longer than a fast one.
struct RegisterCache<R> {
    caching: Caching,
    entries: HashMap<String, Cached<R>>,
    /// When each name was last written (or found unusable) through this
    /// gateway: a read of it that began before then is not remembered.
    written: HashMap<String, Instant>,
    /// Reads that began before this are not remembered at all: set when
    /// `written` was full and started over.
    written_all: Option<Instant>,
}

impl<R: Clone> RegisterCache<R> {
    fn new(caching: Caching) -> Self {
        Self {
            caching,
            entries: HashMap::new(),
            written: HashMap::new(),
            written_all: None,
        }
    }

    fn get(&self, name: &str) -> Option<Option<R>> {
        let (began, record) = self.entries.get(name)?;
        self.caching.trusts(*began, record).then(|| record.clone())
    }

    /// Remembers what a read of `name` that began at `began` found, unless
    /// the name was written since or a later read is already remembered.
    fn remember(&mut self, name: &str, record: Option<R>, began: Instant) {
        let stale = self.written_all.is_some_and(|at| began <= at)
            || self.written.get(name).is_some_and(|at| began <= *at)
            || self
                .entries
                .get(name)
                .is_some_and(|(other, _)| *other > began);
        if stale || !self.caching.trusts(began, &record) {
            return;
        }
        if self.entries.len() >= MAX_CACHED && !self.entries.contains_key(name) {
            let caching = self.caching;
            self.entries
                .retain(|_, (began, record)| caching.trusts(*began, record));
            if self.entries.len() >= MAX_CACHED {
                self.entries.retain(|_, (_, record)| record.is_some());
            }
            if self.entries.len() >= MAX_CACHED {
                self.entries.clear();
            }
        }
        self.entries.insert(name.to_owned(), (began, record));
    }

    /// Forgets `name`, and what reads of it in flight will find.
    fn forget(&mut self, name: &str) {
        let now = Instant::now();
        self.entries.remove(name);
        if self.written.len() >= MAX_CACHED && !self.written.contains_key(name) {
            self.written.clear();
            self.written_all = Some(now);
        }
        self.written.insert(name.to_owned(), now);
    }
}

/// One register table, typed by its record. Cheap to clone.
pub struct RegisterTable<R> {
    metadata: Metadata,
    cache: Arc<Mutex<RegisterCache<R>>>,
    /// Quorum reads made (single records and listing pages).
    reads: Arc<AtomicU64>,
}

impl<R> Clone for RegisterTable<R> {
    fn clone(&self) -> Self {
        Self {
            metadata: self.metadata.clone(),
            cache: self.cache.clone(),
            reads: self.reads.clone(),
        }
    }
}

impl<R: RegisterRecord> RegisterTable<R> {
    pub fn new(metadata: Metadata, caching: Caching) -> Self {
        Self {
            metadata,
            cache: Arc::new(Mutex::new(RegisterCache::new(caching))),
            reads: Arc::default(),
        }
    }

    /// Quorum reads this table has made so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// What the cache answers for `name` without a read, if anything.
    pub fn cached(&self, name: &str) -> Option<Option<R>> {
        self.cache().get(name)
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    fn row(name: &str) -> RowKey {
        RowKey::new(Partition::cluster(), R::TABLE, name.as_bytes().to_vec())
    }

    fn decode(name: &str, value: Option<&RowValue>) -> ModelResult<Option<R>> {
        match value {
            Some(RowValue::Register(Register {
                value: Some(bytes), ..
            })) => R::decode(bytes)
                .map(Some)
                .map_err(|e| ModelError::Corrupt(format!("{} {name:?}: {e}", R::NOUN))),
            _ => Ok(None),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, RegisterCache<R>> {
        self.cache.lock().expect("register cache")
    }

    /// Drops what is remembered of `name`: its record turned out unusable
    /// (a key that does not unwrap), so the next use reads it again.
    pub fn forget(&self, name: &str) {
        self.cache().forget(name);
    }

    /// The record named `name`, from the cache while it is trusted.
    pub async fn get(&self, name: &str) -> ModelResult<Option<R>> {
        if let Some(record) = self.cache().get(name) {
            return Ok(record);
        }
        self.get_fresh(name).await
    }

    /// The record named `name` as a majority of replicas hold it now.
    pub async fn get_fresh(&self, name: &str) -> ModelResult<Option<R>> {
        let began = Instant::now();
        self.reads.fetch_add(1, Ordering::Relaxed);
        let value = self.metadata.read(vec![Self::row(name)]).await?.remove(0);
        let record = Self::decode(name, value.as_ref())?;
        self.cache().remember(name, record.clone(), began);
        Ok(record)
    }

    /// Writes `record` under `name` (the last write wins).
    pub async fn put(&self, name: &str, record: &R) -> ModelResult<()> {
        self.write(name, Some(record.encode())).await
    }

    /// Deletes the record named `name`.
    pub async fn delete(&self, name: &str) -> ModelResult<()> {
        self.write(name, None).await
    }

    async fn write(&self, name: &str, value: Option<Vec<u8>>) -> ModelResult<()> {
        self.forget(name);
        let at = self.metadata.timestamp();
        let written = self
            .metadata
            .write(vec![(
                Self::row(name),
                RowValue::Register(Register { at, value }),
            )])
            .await;
        // Also after a failure: the write may still reach a majority.
        self.forget(name);
        written?;
        Ok(())
    }

    /// The name of every record, without decoding any: one record of a
    /// format this version does not know hides no other.
    pub async fn names(&self) -> ModelResult<Vec<String>> {
        let mut names = Vec::new();
        let mut start = Vec::new();
        loop {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let page = self
                .metadata
                .range(&Partition::cluster(), R::TABLE, &start, None, LIST_PAGE)
                .await?;
            for (sort, value) in &page.rows {
                if let RowValue::Register(Register { value: Some(_), .. }) = value {
                    names.push(String::from_utf8_lossy(sort).into_owned());
                }
            }
            match page.rows.last() {
                Some((last, _)) if page.more => {
                    start = last.clone();
                    start.push(0);
                }
                _ => return Ok(names),
            }
        }
    }

    /// Every record, by name.
    pub async fn list(&self) -> ModelResult<Vec<(String, R)>> {
        let mut records = Vec::new();
        let mut start = Vec::new();
        loop {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let page = self
                .metadata
                .range(&Partition::cluster(), R::TABLE, &start, None, LIST_PAGE)
                .await?;
            for (sort, value) in &page.rows {
                let name = String::from_utf8_lossy(sort).into_owned();
                if let Some(record) = Self::decode(&name, Some(value))? {
                    records.push((name, record));
                }
            }
            match page.rows.last() {
                Some((last, _)) if page.more => {
                    start = last.clone();
                    start.push(0);
                }
                _ => return Ok(records),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A_WHILE: Duration = Duration::from_secs(3600);

    #[test]
    fn absences_are_kept_only_when_reads_expire() {
        let now = Instant::now();
        let mut expiring = RegisterCache::new(Caching::For(A_WHILE));
        expiring.remember("gone", None::<u8>, now);
        assert_eq!(expiring.get("gone"), Some(None));
        let mut write_once = RegisterCache::new(Caching::WriteOnce);
        write_once.remember("gone", None::<u8>, now);
        write_once.remember("here", Some(1), now);
        assert_eq!(write_once.get("gone"), None);
        assert_eq!(write_once.get("here"), Some(Some(1)));
        let mut expired = RegisterCache::new(Caching::For(Duration::ZERO));
        expired.remember("here", Some(1u8), now);
        assert_eq!(expired.get("here"), None);
    }

    #[test]
    fn a_read_that_began_before_a_write_of_its_name_is_not_remembered() {
        let mut cache = RegisterCache::new(Caching::For(A_WHILE));
        let began = Instant::now();
        cache.forget("key");
        cache.remember("key", Some(1u8), began);
        assert_eq!(cache.get("key"), None, "began before the write");
        cache.remember("other", Some(3), began);
        assert_eq!(
            cache.get("other"),
            Some(Some(3)),
            "another name is not held up"
        );
        let later = Instant::now() + Duration::from_millis(1);
        cache.remember("key", Some(2), later);
        assert_eq!(cache.get("key"), Some(Some(2)));
        // A slow read that began earlier does not replace a later one.
        cache.remember("key", None, later - Duration::from_millis(1));
        assert_eq!(cache.get("key"), Some(Some(2)));
    }

    #[test]
    fn an_entry_ages_from_when_its_read_began() {
        let mut cache = RegisterCache::new(Caching::For(Duration::from_secs(10)));
        let long_ago = Instant::now() - Duration::from_secs(11);
        cache.remember("slow", Some(1u8), long_ago);
        assert_eq!(cache.get("slow"), None);
    }

    #[test]
    fn names_clients_choose_cannot_push_out_records() {
        let now = Instant::now();
        let mut cache = RegisterCache::new(Caching::For(A_WHILE));
        cache.remember("real", Some(7u8), now);
        for n in 0..3 * MAX_CACHED {
            cache.remember(&format!("random-{n}"), None, now);
            assert!(cache.entries.len() <= MAX_CACHED);
        }
        assert_eq!(cache.get("real"), Some(Some(7)));
        // Past the bound with records alone, the cache starts over.
        for n in 0..MAX_CACHED {
            cache.remember(&format!("record-{n}"), Some(0), now);
        }
        assert!(cache.entries.len() <= MAX_CACHED);
    }

    #[test]
    fn writes_to_many_names_still_hold_back_older_reads() {
        let mut cache = RegisterCache::new(Caching::For(A_WHILE));
        let began = Instant::now();
        for n in 0..2 * MAX_CACHED {
            cache.forget(&format!("name-{n}"));
        }
        assert!(cache.written.len() <= MAX_CACHED);
        cache.remember("name-0", Some(1u8), began);
        assert_eq!(cache.get("name-0"), None);
    }
}
