//! Register tables: the cluster partition's tables of named records
//! (buckets, access keys, KMS keys), each a last-writer-wins register per
//! name, read through a small per-gateway cache.

use std::collections::HashMap;
use std::marker::PhantomData;
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

impl RegisterRecord for BucketRecord {
    const TABLE: Table = Table::Buckets;
    const NOUN: &'static str = "bucket";
    fn encode(&self) -> Vec<u8> {
        BucketRecord::encode(self)
    }
    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        BucketRecord::decode(bytes)
    }
}

impl RegisterRecord for AccessKeyRecord {
    const TABLE: Table = Table::AccessKeys;
    const NOUN: &'static str = "access key";
    fn encode(&self) -> Vec<u8> {
        AccessKeyRecord::encode(self)
    }
    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        AccessKeyRecord::decode(bytes)
    }
}

impl RegisterRecord for KmsKeyRecord {
    const TABLE: Table = Table::KmsKeys;
    const NOUN: &'static str = "KMS key";
    fn encode(&self) -> Vec<u8> {
        KmsKeyRecord::encode(self)
    }
    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        KmsKeyRecord::decode(bytes)
    }
}

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

/// A record or its absence, and when it was read.
type Cached<R> = (Instant, Option<R>);

/// One register table, typed by its record. Cheap to clone.
pub struct RegisterTable<R> {
    metadata: Metadata,
    caching: Caching,
    cache: Arc<Mutex<HashMap<String, Cached<R>>>>,
    record: PhantomData<fn() -> R>,
}

impl<R> Clone for RegisterTable<R> {
    fn clone(&self) -> Self {
        Self {
            metadata: self.metadata.clone(),
            caching: self.caching,
            cache: self.cache.clone(),
            record: PhantomData,
        }
    }
}

impl<R: RegisterRecord> RegisterTable<R> {
    pub fn new(metadata: Metadata, caching: Caching) -> Self {
        Self {
            metadata,
            caching,
            cache: Arc::default(),
            record: PhantomData,
        }
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

    fn cached(&self, name: &str) -> Option<Option<R>> {
        let cache = self.cache.lock().expect("register cache");
        let (at, record) = cache.get(name)?;
        match self.caching {
            Caching::For(trusted) if at.elapsed() < trusted => Some(record.clone()),
            Caching::WriteOnce if record.is_some() => Some(record.clone()),
            _ => None,
        }
    }

    fn remember(&self, name: &str, record: Option<R>) {
        if self.caching == Caching::WriteOnce && record.is_none() {
            return;
        }
        let mut cache = self.cache.lock().expect("register cache");
        if cache.len() >= MAX_CACHED && !cache.contains_key(name) {
            if let Caching::For(trusted) = self.caching {
                cache.retain(|_, (at, _)| at.elapsed() < trusted);
            }
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(name.to_owned(), (Instant::now(), record));
    }

    fn forget(&self, name: &str) {
        self.cache.lock().expect("register cache").remove(name);
    }

    /// The record named `name`, from the cache while it is trusted.
    pub async fn get(&self, name: &str) -> ModelResult<Option<R>> {
        if let Some(record) = self.cached(name) {
            return Ok(record);
        }
        self.get_fresh(name).await
    }

    /// The record named `name` as a majority of replicas hold it now.
    pub async fn get_fresh(&self, name: &str) -> ModelResult<Option<R>> {
        let value = self.metadata.read(vec![Self::row(name)]).await?.remove(0);
        let record = Self::decode(name, value.as_ref())?;
        self.remember(name, record.clone());
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
        self.metadata
            .write(vec![(
                Self::row(name),
                RowValue::Register(Register { at, value }),
            )])
            .await?;
        self.forget(name);
        Ok(())
    }

    /// Every record, by name.
    pub async fn list(&self) -> ModelResult<Vec<(String, R)>> {
        let mut records = Vec::new();
        let mut start = Vec::new();
        loop {
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
