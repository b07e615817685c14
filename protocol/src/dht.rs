//! The DHT's keys and the records its store keeps on disk (spec/dht.md).
//! Peer ids and multiaddrs are carried as their binary forms; the node
//! turns them into libp2p types.

use crate::codec::{DecodeError, Reader, Writer};
use crate::ids::UploadId;

const FORMAT_VERSION: u8 = 1;
/// Addresses kept per provider record.
pub const MAX_ADDRESSES: usize = 32;
/// Bytes of one binary multiaddr.
pub const MAX_ADDRESS_BYTES: usize = 512;
/// Bytes of a publisher's peer id (an ed25519 one is 38).
pub const MAX_PEER_ID_BYTES: usize = 128;

/// The key under which the holders of an upload's fragments announce
/// themselves.
pub fn upload_provider_key(upload: &UploadId) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + UploadId::LEN);
    key.push(0x01);
    key.extend_from_slice(upload.as_bytes());
    key
}

/// A value record as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// 0: never expires.
    pub expires_unix_ms: u64,
    /// The publisher's peer id bytes, if any.
    pub publisher: Option<Vec<u8>>,
    pub value: Vec<u8>,
}

impl StoredRecord {
    /// The caller keeps `publisher` within [`MAX_PEER_ID_BYTES`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.value.len() + 48);
        out.put_u8(FORMAT_VERSION);
        out.put_u64(self.expires_unix_ms);
        out.put_bytes16(self.publisher.as_deref().unwrap_or_default());
        out.extend_from_slice(&self.value);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        version(&mut reader)?;
        let expires_unix_ms = reader.u64("record expiry")?;
        let publisher = match reader.bytes16("record publisher", MAX_PEER_ID_BYTES)? {
            [] => None,
            bytes => Some(bytes.to_vec()),
        };
        let value = reader.take(reader.remaining(), "record value")?.to_vec();
        Ok(Self {
            expires_unix_ms,
            publisher,
            value,
        })
    }
}

/// A provider record as kept on disk; the key and the provider are the
/// table's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProvider {
    /// 0: never expires.
    pub expires_unix_ms: u64,
    /// Binary multiaddrs.
    pub addresses: Vec<Vec<u8>>,
}

impl StoredProvider {
    /// Writes at most [`MAX_ADDRESSES`] addresses, skipping any longer than
    /// [`MAX_ADDRESS_BYTES`].
    pub fn encode(&self) -> Vec<u8> {
        let kept: Vec<&Vec<u8>> = self
            .addresses
            .iter()
            .filter(|a| a.len() <= MAX_ADDRESS_BYTES)
            .take(MAX_ADDRESSES)
            .collect();
        let mut out = Vec::with_capacity(16 + kept.iter().map(|a| a.len() + 2).sum::<usize>());
        out.put_u8(FORMAT_VERSION);
        out.put_u64(self.expires_unix_ms);
        out.put_u16(kept.len() as u16);
        for address in kept {
            out.put_bytes16(address);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        version(&mut reader)?;
        let expires_unix_ms = reader.u64("provider expiry")?;
        let count = usize::from(reader.u16("provider address count")?);
        if count > MAX_ADDRESSES {
            return Err(DecodeError::TooLong {
                field: "provider address count",
                declared: count as u64,
                max: MAX_ADDRESSES as u64,
            });
        }
        let mut addresses = Vec::with_capacity(count);
        for _ in 0..count {
            addresses.push(
                reader
                    .bytes16("provider address", MAX_ADDRESS_BYTES)?
                    .to_vec(),
            );
        }
        reader.finish("provider record")?;
        Ok(Self {
            expires_unix_ms,
            addresses,
        })
    }
}

fn version(reader: &mut Reader<'_>) -> Result<(), DecodeError> {
    match reader.u8("format version")? {
        FORMAT_VERSION => Ok(()),
        other => Err(DecodeError::InvalidValue {
            field: "format version",
            value: u64::from(other),
        }),
    }
}
