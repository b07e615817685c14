//! Kademlia's record store kept in redb, so that records and provider
//! records outlive a restart (spec/store.md, "DHT store").
//!
//! Kademlia calls the store synchronously from the swarm's event loop, so
//! a write commits without an fsync; [`RedbRecordStore::flush`] makes the
//! writes durable and the event loop calls it once a second and on drop.
//! What a crash can lose is at most that second of soft state, which
//! publishers announce again anyway.

use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_protocol::DecodeError;
use cairn_protocol::dht::{StoredProvider, StoredRecord};
use libp2p::kad::store::{Error, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::{Multiaddr, PeerId};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

/// Value records, by key.
const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
/// Provider records of other peers, by key then provider.
const PROVIDERS: TableDefinition<(&[u8], &[u8]), &[u8]> = TableDefinition::new("providers");
/// This node's own provider records, by key: what it announces again.
const PROVIDED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("provided");

#[derive(Debug, Clone, Copy)]
pub struct DhtStoreLimits {
    pub max_records: u64,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Other peers' provider records kept per key.
    pub max_providers_per_key: usize,
    /// Other peers' provider records kept in all.
    pub max_provider_records: u64,
}

impl Default for DhtStoreLimits {
    fn default() -> Self {
        Self {
            max_records: 65_536,
            max_key_bytes: 256,
            max_value_bytes: 64 << 10,
            max_providers_per_key: 20,
            max_provider_records: 16 << 20,
        }
    }
}

pub struct RedbRecordStore {
    db: Database,
    local: PeerId,
    limits: DhtStoreLimits,
    unflushed: bool,
}

/// Wall-clock milliseconds, to keep an expiry across restarts.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An expiry as stored: 0 for none, else a Unix time in milliseconds.
fn expiry_to_unix(expires: Option<Instant>) -> u64 {
    expires.map_or(0, |at| {
        let left = at.saturating_duration_since(Instant::now());
        (unix_ms() + left.as_millis() as u64).max(1)
    })
}

fn expiry_from_unix(stored: u64) -> Option<Instant> {
    (stored != 0).then(|| Instant::now() + Duration::from_millis(stored.saturating_sub(unix_ms())))
}

fn encode_record(record: &Record) -> Vec<u8> {
    StoredRecord {
        expires_unix_ms: expiry_to_unix(record.expires),
        publisher: record.publisher.map(|p| p.to_bytes()),
        value: record.value.clone(),
    }
    .encode()
}

fn decode_record(key: &[u8], bytes: &[u8]) -> std::result::Result<Record, DecodeError> {
    let stored = StoredRecord::decode(bytes)?;
    let publisher = match stored.publisher {
        Some(bytes) => Some(peer(&bytes, "record publisher")?),
        None => None,
    };
    Ok(Record {
        key: RecordKey::new(&key),
        value: stored.value,
        publisher,
        expires: expiry_from_unix(stored.expires_unix_ms),
    })
}

fn encode_provider(record: &ProviderRecord) -> Vec<u8> {
    StoredProvider {
        expires_unix_ms: expiry_to_unix(record.expires),
        addresses: record.addresses.iter().map(|a| a.to_vec()).collect(),
    }
    .encode()
}

fn decode_provider(
    key: &[u8],
    provider: PeerId,
    bytes: &[u8],
) -> std::result::Result<ProviderRecord, DecodeError> {
    let stored = StoredProvider::decode(bytes)?;
    let mut addresses = Vec::with_capacity(stored.addresses.len());
    for bytes in stored.addresses {
        let address = Multiaddr::try_from(bytes).map_err(|_| DecodeError::InvalidValue {
            field: "provider address",
            value: 0,
        })?;
        addresses.push(address);
    }
    Ok(ProviderRecord {
        key: RecordKey::new(&key),
        provider,
        expires: expiry_from_unix(stored.expires_unix_ms),
        addresses,
    })
}

fn peer(bytes: &[u8], field: &'static str) -> std::result::Result<PeerId, DecodeError> {
    PeerId::from_bytes(bytes).map_err(|_| DecodeError::InvalidValue {
        field,
        value: bytes.len() as u64,
    })
}

/// A store failure Kademlia has no word for: logged, and reported as the
/// nearest refusal so that nothing is taken as stored that was not.
fn refused(what: &str, error: impl std::fmt::Display) -> Error {
    tracing::error!(%error, "DHT store: {what} failed");
    Error::MaxRecords
}

impl RedbRecordStore {
    pub fn open(
        path: &Path,
        local: PeerId,
        limits: DhtStoreLimits,
    ) -> std::result::Result<Self, redb::Error> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(RECORDS)?;
        txn.open_table(PROVIDERS)?;
        txn.open_table(PROVIDED)?;
        txn.commit()?;
        Ok(Self {
            db,
            local,
            limits,
            unflushed: false,
        })
    }

    /// Makes every write so far durable.
    pub fn flush(&mut self) -> std::result::Result<(), redb::Error> {
        if !self.unflushed {
            return Ok(());
        }
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.commit()?;
        self.unflushed = false;
        Ok(())
    }

    /// Runs `change` in one write transaction that is made durable later.
    fn write<T>(
        &mut self,
        change: impl FnOnce(&redb::WriteTransaction) -> std::result::Result<T, redb::Error>,
    ) -> std::result::Result<T, redb::Error> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        let out = change(&txn)?;
        txn.commit()?;
        self.unflushed = true;
        Ok(out)
    }

    fn read_records(&self) -> std::result::Result<Vec<Record>, redb::Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            match decode_record(key.value(), value.value()) {
                Ok(record) => out.push(record),
                Err(error) => tracing::warn!(%error, "DHT store: unreadable record skipped"),
            }
        }
        Ok(out)
    }

    fn read_providers(&self, key: &[u8]) -> std::result::Result<Vec<ProviderRecord>, redb::Error> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        let own = txn.open_table(PROVIDED)?;
        if let Some(value) = own.get(key)? {
            match decode_provider(key, self.local, value.value()) {
                Ok(record) => out.push(record),
                Err(error) => tracing::warn!(%error, "DHT store: unreadable own provider record"),
            }
        }
        let others = txn.open_table(PROVIDERS)?;
        for entry in others.range((key, &[][..])..)? {
            let (ids, value) = entry?;
            let (entry_key, provider) = ids.value();
            if entry_key != key {
                break;
            }
            let decoded = peer(provider, "provider")
                .and_then(|provider| decode_provider(key, provider, value.value()));
            match decoded {
                Ok(record) => out.push(record),
                Err(error) => {
                    tracing::warn!(%error, "DHT store: unreadable provider record skipped")
                }
            }
        }
        Ok(out)
    }

    fn read_provided(&self) -> std::result::Result<Vec<ProviderRecord>, redb::Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PROVIDED)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            match decode_provider(key.value(), self.local, value.value()) {
                Ok(record) => out.push(record),
                Err(error) => tracing::warn!(%error, "DHT store: unreadable own provider record"),
            }
        }
        Ok(out)
    }
}

impl Drop for RedbRecordStore {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            tracing::error!(%error, "DHT store: last flush failed");
        }
    }
}

impl RecordStore for RedbRecordStore {
    type RecordsIter<'a> = std::vec::IntoIter<Cow<'a, Record>>;
    type ProvidedIter<'a> = std::vec::IntoIter<Cow<'a, ProviderRecord>>;

    fn get(&self, key: &RecordKey) -> Option<Cow<'_, Record>> {
        let read = || -> std::result::Result<Option<Record>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(RECORDS)?;
            let Some(value) = table.get(key.as_ref())? else {
                return Ok(None);
            };
            match decode_record(key.as_ref(), value.value()) {
                Ok(record) => Ok(Some(record)),
                Err(error) => {
                    tracing::warn!(%error, "DHT store: unreadable record ignored");
                    Ok(None)
                }
            }
        };
        match read() {
            Ok(record) => record.map(Cow::Owned),
            Err(error) => {
                tracing::error!(%error, "DHT store: read failed");
                None
            }
        }
    }

    fn put(&mut self, record: Record) -> Result<()> {
        if record.key.as_ref().len() > self.limits.max_key_bytes
            || record.value.len() > self.limits.max_value_bytes
        {
            return Err(Error::ValueTooLarge);
        }
        let max_records = self.limits.max_records;
        let stored = self.write(|txn| {
            let mut table = txn.open_table(RECORDS)?;
            let exists = table.get(record.key.as_ref())?.is_some();
            if !exists && table.len()? >= max_records {
                return Ok(false);
            }
            table.insert(record.key.as_ref(), encode_record(&record).as_slice())?;
            Ok(true)
        });
        match stored {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::MaxRecords),
            Err(error) => Err(refused("put", error)),
        }
    }

    fn remove(&mut self, key: &RecordKey) {
        if let Err(error) = self.write(|txn| {
            txn.open_table(RECORDS)?.remove(key.as_ref())?;
            Ok(())
        }) {
            tracing::error!(%error, "DHT store: remove failed");
        }
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.read_records()
            .unwrap_or_else(|error| {
                tracing::error!(%error, "DHT store: listing records failed");
                Vec::new()
            })
            .into_iter()
            .map(Cow::Owned)
            .collect::<Vec<_>>()
            .into_iter()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        let key = record.key.as_ref();
        if key.len() > self.limits.max_key_bytes {
            return Err(Error::ValueTooLarge);
        }
        let value = encode_provider(&record);
        if record.provider == self.local {
            return self
                .write(|txn| {
                    txn.open_table(PROVIDED)?.insert(key, value.as_slice())?;
                    Ok(())
                })
                .map_err(|error| refused("add own provider", error));
        }
        let provider = record.provider.to_bytes();
        let limits = self.limits;
        let stored = self.write(|txn| {
            let mut table = txn.open_table(PROVIDERS)?;
            let exists = table.get((key, provider.as_slice()))?.is_some();
            if !exists {
                if table.len()? >= limits.max_provider_records {
                    return Ok(false);
                }
                // A full list ignores newcomers, as the in-memory store
                // does: flooding a key with providers displaces no one.
                let mut held = 0;
                for entry in table.range((key, &[][..])..)? {
                    if entry?.0.value().0 != key {
                        break;
                    }
                    held += 1;
                }
                if held >= limits.max_providers_per_key {
                    return Ok(true);
                }
            }
            table.insert((key, provider.as_slice()), value.as_slice())?;
            Ok(true)
        });
        match stored {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::MaxProvidedKeys),
            Err(error) => Err(refused("add provider", error)),
        }
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.read_providers(key.as_ref()).unwrap_or_else(|error| {
            tracing::error!(%error, "DHT store: reading providers failed");
            Vec::new()
        })
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.read_provided()
            .unwrap_or_else(|error| {
                tracing::error!(%error, "DHT store: listing own provider records failed");
                Vec::new()
            })
            .into_iter()
            .map(Cow::Owned)
            .collect::<Vec<_>>()
            .into_iter()
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        let key = key.as_ref();
        let removed = if *provider == self.local {
            self.write(|txn| {
                txn.open_table(PROVIDED)?.remove(key)?;
                Ok(())
            })
        } else {
            let provider = provider.to_bytes();
            self.write(|txn| {
                txn.open_table(PROVIDERS)?
                    .remove((key, provider.as_slice()))?;
                Ok(())
            })
        };
        if let Err(error) = removed {
            tracing::error!(%error, "DHT store: removing a provider failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(key: &[u8], peer: PeerId, ttl: Duration) -> ProviderRecord {
        ProviderRecord {
            key: RecordKey::new(&key),
            provider: peer,
            expires: Some(Instant::now() + ttl),
            addresses: vec!["/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap()],
        }
    }

    #[test]
    fn records_and_providers_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dht.redb");
        let (local, other) = (PeerId::random(), PeerId::random());
        let record = Record {
            key: RecordKey::new(b"k1"),
            value: b"value".to_vec(),
            publisher: Some(other),
            expires: Some(Instant::now() + Duration::from_secs(3600)),
        };
        {
            let mut store = RedbRecordStore::open(&path, local, DhtStoreLimits::default()).unwrap();
            store.put(record.clone()).unwrap();
            store
                .add_provider(provider(b"m1", local, Duration::from_secs(3600)))
                .unwrap();
            store
                .add_provider(provider(b"m1", other, Duration::from_secs(3600)))
                .unwrap();
            store
                .add_provider(provider(b"m2", other, Duration::from_secs(3600)))
                .unwrap();
        }
        let store = RedbRecordStore::open(&path, local, DhtStoreLimits::default()).unwrap();
        let back = store.get(&record.key).expect("record kept");
        assert_eq!(back.value, record.value);
        assert_eq!(back.publisher, Some(other));
        let left = back
            .expires
            .unwrap()
            .saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));
        let mut found: Vec<PeerId> = store
            .providers(&RecordKey::new(b"m1"))
            .into_iter()
            .map(|p| p.provider)
            .collect();
        found.sort();
        let mut expected = vec![local, other];
        expected.sort();
        assert_eq!(found, expected);
        let provided: Vec<_> = store.provided().collect();
        assert_eq!(provided.len(), 1);
        assert_eq!(provided[0].key.as_ref(), b"m1");
        assert_eq!(provided[0].addresses.len(), 1);
        assert_eq!(store.providers(&RecordKey::new(b"m2")).len(), 1);
        assert!(store.providers(&RecordKey::new(b"m")).is_empty());
    }

    #[test]
    fn limits_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let limits = DhtStoreLimits {
            max_records: 2,
            max_providers_per_key: 3,
            ..DhtStoreLimits::default()
        };
        let mut store =
            RedbRecordStore::open(&dir.path().join("dht.redb"), PeerId::random(), limits).unwrap();
        for i in 0..2u8 {
            store
                .put(Record::new(RecordKey::new(&[i]), vec![i]))
                .unwrap();
        }
        assert!(matches!(
            store.put(Record::new(RecordKey::new(&[9]), vec![])),
            Err(Error::MaxRecords)
        ));
        // Replacing a held record is not a new one.
        store
            .put(Record::new(RecordKey::new(&[1]), vec![7]))
            .unwrap();
        assert!(matches!(
            store.put(Record::new(RecordKey::new(&[0]), vec![0; 65 << 10])),
            Err(Error::ValueTooLarge)
        ));
        for _ in 0..5 {
            store
                .add_provider(provider(b"m", PeerId::random(), Duration::from_secs(60)))
                .unwrap();
        }
        assert_eq!(store.providers(&RecordKey::new(b"m")).len(), 3);
        store.remove(&RecordKey::new(&[1]));
        assert!(store.get(&RecordKey::new(&[1])).is_none());
        assert_eq!(store.records().count(), 1);
    }

    #[test]
    fn damaged_entries_are_skipped_not_fatal() {
        assert!(decode_record(b"k", &[]).is_err());
        assert!(decode_record(b"k", &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 40]).is_err());
        assert!(
            decode_provider(
                b"k",
                PeerId::random(),
                &[1, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255]
            )
            .is_err()
        );
        assert!(decode_provider(b"k", PeerId::random(), &[2]).is_err());
    }
}
