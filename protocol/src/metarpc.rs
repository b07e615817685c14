//! The metadata RPC (`/cairn/meta/1`, spec/metadata.md, "Metadata RPC"):
//! one request and one response per stream, each one length-prefixed frame.
//!
//! Decoding never allocates more than the frame holds: every count and
//! length is checked against the bytes present and against its limit.

use crate::codec::{DecodeError, Reader, Writer};
use crate::ids::NodeId;
use crate::meta::{
    LEAVES, LeafSet, MAX_SORT_BYTES, MAX_VALUE_BYTES, Partition, PartitionDigest, RowKey, RowValue,
    Table,
};

pub const PROTOCOL_NAME: &str = "/cairn/meta/1";
/// Largest frame body: one row of the largest size plus its envelope.
pub const MAX_MESSAGE_BYTES: usize = MAX_VALUE_BYTES + (64 << 10);
/// Rows, keys or entries in one message.
pub const MAX_ITEMS: usize = 4096;
/// Bytes of a compare-and-set register's value.
pub const MAX_REGISTER_BYTES: usize = 64 << 10;
/// Replicas named in a Filled request.
pub const MAX_OLD_REPLICAS: usize = 64;
/// Bytes of an error message.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 512;

/// A Paxos ballot: a round number, ties broken by the proposer's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ballot {
    pub round: u64,
    pub node: NodeId,
}

impl Ballot {
    pub const ZERO: Ballot = Ballot {
        round: 0,
        node: NodeId([0; 32]),
    };

    fn put(&self, out: &mut Vec<u8>) {
        out.put_u64(self.round);
        out.extend_from_slice(self.node.as_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            round: r.u64("ballot round")?,
            node: NodeId(r.array("ballot node")?),
        })
    }
}

/// The name of a compare-and-set register: a partition and a name in it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegisterKey {
    pub partition: Partition,
    pub name: Vec<u8>,
}

/// What an acceptor last accepted: the ballot and the register's value
/// (`None`: the register is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedValue {
    pub ballot: Ballot,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Merge these rows and answer once they are durable.
    Write { rows: Vec<(RowKey, RowValue)> },
    /// The values of these rows, in order.
    Read { keys: Vec<RowKey> },
    /// Rows of one table of one partition with `start <= sort < end`, in
    /// order, at most `limit`.
    Range {
        partition: Partition,
        table: Table,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: u32,
    },
    /// The partitions the replica holds, after `after`, with their roots.
    Partitions {
        after: Option<Partition>,
        limit: u32,
    },
    /// The digest of one partition.
    Digest { partition: Partition },
    /// (table, sort, row digest) of the rows in `leaves`, after a cursor.
    LeafRows {
        partition: Partition,
        leaves: LeafSet,
        after: Option<(Table, Vec<u8>)>,
        limit: u32,
    },
    /// Whether the receiver, a replica of `partition` under map `version`,
    /// has pulled the partition from a majority of `old` (the replicas
    /// under the asker's previous map); asking starts the pull.
    Filled {
        partition: Partition,
        version: u64,
        old: Vec<NodeId>,
    },
    /// Names of the compare-and-set registers the replica holds acceptor
    /// state for in `partition`, after `after`.
    Registers {
        partition: Partition,
        after: Option<Vec<u8>>,
        limit: u32,
    },
    /// Paxos phase 1 for a register.
    Prepare { key: RegisterKey, ballot: Ballot },
    /// Paxos phase 2 for a register.
    Accept {
        key: RegisterKey,
        ballot: Ballot,
        value: Option<Vec<u8>>,
    },
    /// What the acceptor of a register last accepted; changes nothing
    /// (a one-round read, spec/metadata.md "Reading a register").
    ReadRegister { key: RegisterKey },
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request broke the protocol.
    Malformed = 1,
    /// Well-formed but not acceptable (a row that does not fit its key).
    Refused = 2,
    /// The replica is overloaded; try again.
    Busy = 3,
    /// The replica failed (its disk); try another.
    Internal = 4,
    /// The sender's cluster map is older than one the replica has seen:
    /// fetch the newer map and try again.
    StaleMap = 5,
    /// Well-formed, but this replica does not take it now for reasons of
    /// its own state (a row stamped ahead of its clock, a writer it does
    /// not know): a failure that counts against the majority, not a veto.
    Declined = 6,
}

impl ErrorCode {
    fn from_code(code: u8) -> Option<Self> {
        [
            Self::Malformed,
            Self::Refused,
            Self::Busy,
            Self::Internal,
            Self::StaleMap,
            Self::Declined,
        ]
        .into_iter()
        .find(|c| *c as u8 == code)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Written,
    /// One entry per key of a Read, `None` where the replica has no row.
    Rows(Vec<Option<RowValue>>),
    /// A Range answer; `more` when rows remain past the last one.
    Page {
        rows: Vec<(Vec<u8>, RowValue)>,
        more: bool,
    },
    Partitions {
        items: Vec<(Partition, [u8; 32])>,
        more: bool,
    },
    Digest(PartitionDigest),
    LeafRows {
        items: Vec<(Table, Vec<u8>, [u8; 32])>,
        more: bool,
    },
    /// The answer to Filled.
    Filled {
        filled: bool,
    },
    /// The answer to Registers.
    Registers {
        names: Vec<Vec<u8>>,
        more: bool,
    },
    /// Phase 1 granted, with what the acceptor accepted before, if anything.
    Promise {
        accepted: Option<AcceptedValue>,
    },
    Accepted,
    /// The answer to ReadRegister.
    RegisterState {
        accepted: Option<AcceptedValue>,
    },
    /// The acceptor has promised a higher ballot.
    Conflict {
        promised: Ballot,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

mod code {
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const RANGE: u8 = 0x03;
    pub const PARTITIONS: u8 = 0x04;
    pub const DIGEST: u8 = 0x05;
    pub const LEAF_ROWS: u8 = 0x06;
    pub const FILLED: u8 = 0x07;
    pub const REGISTERS: u8 = 0x08;
    pub const PREPARE: u8 = 0x10;
    pub const ACCEPT: u8 = 0x11;
    pub const READ_REGISTER: u8 = 0x12;

    pub const WRITTEN: u8 = 0x81;
    pub const ROWS: u8 = 0x82;
    pub const PAGE: u8 = 0x83;
    pub const PARTITIONS_REPLY: u8 = 0x84;
    pub const DIGEST_REPLY: u8 = 0x85;
    pub const LEAF_ROWS_REPLY: u8 = 0x86;
    pub const FILLED_REPLY: u8 = 0x87;
    pub const REGISTERS_REPLY: u8 = 0x88;
    pub const PROMISE: u8 = 0x90;
    pub const ACCEPTED: u8 = 0x91;
    pub const CONFLICT: u8 = 0x92;
    pub const REGISTER_STATE: u8 = 0x93;
    pub const ERROR: u8 = 0xff;
}

fn put_optional_bytes(out: &mut Vec<u8>, value: &Option<Vec<u8>>) {
    match value {
        None => out.put_u8(0),
        Some(bytes) => {
            out.put_u8(1);
            out.put_bytes32(bytes);
        }
    }
}

fn read_optional_bytes(
    r: &mut Reader<'_>,
    field: &'static str,
    max: usize,
) -> Result<Option<Vec<u8>>, DecodeError> {
    Ok(match r.bool(field)? {
        false => None,
        true => Some(r.bytes32(field, max)?.to_vec()),
    })
}

fn put_accepted(out: &mut Vec<u8>, accepted: &Option<AcceptedValue>) {
    match accepted {
        None => out.put_u8(0),
        Some(accepted) => {
            out.put_u8(1);
            accepted.ballot.put(out);
            put_optional_bytes(out, &accepted.value);
        }
    }
}

fn read_accepted(r: &mut Reader<'_>) -> Result<Option<AcceptedValue>, DecodeError> {
    Ok(match r.bool("accepted present")? {
        false => None,
        true => Some(AcceptedValue {
            ballot: Ballot::read(r)?,
            value: read_optional_bytes(r, "register value", MAX_REGISTER_BYTES)?,
        }),
    })
}

fn put_register_key(out: &mut Vec<u8>, key: &RegisterKey) {
    key.partition.put(out);
    out.put_bytes16(&key.name);
}

fn read_register_key(r: &mut Reader<'_>) -> Result<RegisterKey, DecodeError> {
    Ok(RegisterKey {
        partition: Partition::read(r)?,
        name: r.bytes16("register name", MAX_SORT_BYTES)?.to_vec(),
    })
}

/// A request as sent: the map version the sender holds (0: none), which a
/// replica uses to fence off coordinators whose map is older than one it
/// has seen, then the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub map_version: u64,
    pub request: Request,
}

impl Call {
    /// The frame body (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.map_version.to_be_bytes().to_vec();
        out.extend_from_slice(&self.request.encode());
        out
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let map_version = r.u64("map version")?;
        let request = Request::decode(r.take(r.remaining(), "request")?)?;
        Ok(Self {
            map_version,
            request,
        })
    }
}

impl Request {
    /// The request's bytes, after the map version of its [`Call`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Request::Write { rows } => {
                out.put_u8(code::WRITE);
                out.put_u32(rows.len() as u32);
                for (key, value) in rows {
                    key.put(&mut out);
                    value.put(&mut out);
                }
            }
            Request::Read { keys } => {
                out.put_u8(code::READ);
                out.put_u32(keys.len() as u32);
                for key in keys {
                    key.put(&mut out);
                }
            }
            Request::Range {
                partition,
                table,
                start,
                end,
                limit,
            } => {
                out.put_u8(code::RANGE);
                partition.put(&mut out);
                out.put_u8(table.code());
                out.put_bytes16(start);
                match end {
                    None => out.put_u8(0),
                    Some(end) => {
                        out.put_u8(1);
                        out.put_bytes16(end);
                    }
                }
                out.put_u32(*limit);
            }
            Request::Partitions { after, limit } => {
                out.put_u8(code::PARTITIONS);
                match after {
                    None => out.put_u8(0),
                    Some(p) => {
                        out.put_u8(1);
                        p.put(&mut out);
                    }
                }
                out.put_u32(*limit);
            }
            Request::Digest { partition } => {
                out.put_u8(code::DIGEST);
                partition.put(&mut out);
            }
            Request::LeafRows {
                partition,
                leaves,
                after,
                limit,
            } => {
                out.put_u8(code::LEAF_ROWS);
                partition.put(&mut out);
                out.extend_from_slice(&leaves.0);
                match after {
                    None => out.put_u8(0),
                    Some((table, sort)) => {
                        out.put_u8(1);
                        out.put_u8(table.code());
                        out.put_bytes16(sort);
                    }
                }
                out.put_u32(*limit);
            }
            Request::Filled {
                partition,
                version,
                old,
            } => {
                out.put_u8(code::FILLED);
                partition.put(&mut out);
                out.put_u64(*version);
                out.put_u32(old.len() as u32);
                for node in old {
                    out.extend_from_slice(node.as_bytes());
                }
            }
            Request::Registers {
                partition,
                after,
                limit,
            } => {
                out.put_u8(code::REGISTERS);
                partition.put(&mut out);
                match after {
                    None => out.put_u8(0),
                    Some(name) => {
                        out.put_u8(1);
                        out.put_bytes16(name);
                    }
                }
                out.put_u32(*limit);
            }
            Request::Prepare { key, ballot } => {
                out.put_u8(code::PREPARE);
                put_register_key(&mut out, key);
                ballot.put(&mut out);
            }
            Request::Accept { key, ballot, value } => {
                out.put_u8(code::ACCEPT);
                put_register_key(&mut out, key);
                ballot.put(&mut out);
                put_optional_bytes(&mut out, value);
            }
            Request::ReadRegister { key } => {
                out.put_u8(code::READ_REGISTER);
                put_register_key(&mut out, key);
            }
        }
        out
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let request = match r.u8("request type")? {
            code::WRITE => {
                // A row is at least a partition length, table, sort length
                // and a value kind with its smallest body.
                let count = r.count("rows", MAX_ITEMS, 6)?;
                let mut rows = Vec::with_capacity(count);
                for _ in 0..count {
                    let key = RowKey::read(&mut r)?;
                    rows.push((key, RowValue::read(&mut r)?));
                }
                Request::Write { rows }
            }
            code::READ => {
                let count = r.count("keys", MAX_ITEMS, 5)?;
                let mut keys = Vec::with_capacity(count);
                for _ in 0..count {
                    keys.push(RowKey::read(&mut r)?);
                }
                Request::Read { keys }
            }
            code::RANGE => Request::Range {
                partition: Partition::read(&mut r)?,
                table: Table::read(&mut r)?,
                start: r.bytes16("range start", MAX_SORT_BYTES)?.to_vec(),
                end: match r.bool("range end present")? {
                    false => None,
                    true => Some(r.bytes16("range end", MAX_SORT_BYTES)?.to_vec()),
                },
                limit: r.u32("limit")?,
            },
            code::PARTITIONS => Request::Partitions {
                after: match r.bool("after present")? {
                    false => None,
                    true => Some(Partition::read(&mut r)?),
                },
                limit: r.u32("limit")?,
            },
            code::DIGEST => Request::Digest {
                partition: Partition::read(&mut r)?,
            },
            code::LEAF_ROWS => Request::LeafRows {
                partition: Partition::read(&mut r)?,
                leaves: LeafSet(r.array("leaves")?),
                after: match r.bool("cursor present")? {
                    false => None,
                    true => Some((
                        Table::read(&mut r)?,
                        r.bytes16("cursor", MAX_SORT_BYTES)?.to_vec(),
                    )),
                },
                limit: r.u32("limit")?,
            },
            code::FILLED => {
                let partition = Partition::read(&mut r)?;
                let version = r.u64("map version")?;
                let count = r.count("old replicas", MAX_OLD_REPLICAS, 32)?;
                let mut old = Vec::with_capacity(count);
                for _ in 0..count {
                    old.push(NodeId(r.array("old replica")?));
                }
                Request::Filled {
                    partition,
                    version,
                    old,
                }
            }
            code::REGISTERS => Request::Registers {
                partition: Partition::read(&mut r)?,
                after: match r.bool("after present")? {
                    false => None,
                    true => Some(r.bytes16("register name", MAX_SORT_BYTES)?.to_vec()),
                },
                limit: r.u32("limit")?,
            },
            code::PREPARE => Request::Prepare {
                key: read_register_key(&mut r)?,
                ballot: Ballot::read(&mut r)?,
            },
            code::ACCEPT => Request::Accept {
                key: read_register_key(&mut r)?,
                ballot: Ballot::read(&mut r)?,
                value: read_optional_bytes(&mut r, "register value", MAX_REGISTER_BYTES)?,
            },
            code::READ_REGISTER => Request::ReadRegister {
                key: read_register_key(&mut r)?,
            },
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "request type",
                    value: u64::from(other),
                });
            }
        };
        r.finish("metadata request")?;
        Ok(request)
    }
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > MAX_ERROR_MESSAGE_BYTES {
            let mut cut = MAX_ERROR_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Response::Error { code, message }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Response::Written => out.put_u8(code::WRITTEN),
            Response::Rows(values) => {
                out.put_u8(code::ROWS);
                out.put_u32(values.len() as u32);
                for value in values {
                    match value {
                        None => out.put_u8(0),
                        Some(value) => {
                            out.put_u8(1);
                            value.put(&mut out);
                        }
                    }
                }
            }
            Response::Page { rows, more } => {
                out.put_u8(code::PAGE);
                out.put_u32(rows.len() as u32);
                for (sort, value) in rows {
                    out.put_bytes16(sort);
                    value.put(&mut out);
                }
                out.put_bool(*more);
            }
            Response::Partitions { items, more } => {
                out.put_u8(code::PARTITIONS_REPLY);
                out.put_u32(items.len() as u32);
                for (partition, root) in items {
                    partition.put(&mut out);
                    out.extend_from_slice(root);
                }
                out.put_bool(*more);
            }
            Response::Digest(digest) => {
                out.put_u8(code::DIGEST_REPLY);
                for leaf in digest.leaves.iter() {
                    out.extend_from_slice(leaf);
                }
            }
            Response::LeafRows { items, more } => {
                out.put_u8(code::LEAF_ROWS_REPLY);
                out.put_u32(items.len() as u32);
                for (table, sort, digest) in items {
                    out.put_u8(table.code());
                    out.put_bytes16(sort);
                    out.extend_from_slice(digest);
                }
                out.put_bool(*more);
            }
            Response::Promise { accepted } => {
                out.put_u8(code::PROMISE);
                put_accepted(&mut out, accepted);
            }
            Response::RegisterState { accepted } => {
                out.put_u8(code::REGISTER_STATE);
                put_accepted(&mut out, accepted);
            }
            Response::Filled { filled } => {
                out.put_u8(code::FILLED_REPLY);
                out.put_bool(*filled);
            }
            Response::Registers { names, more } => {
                out.put_u8(code::REGISTERS_REPLY);
                out.put_u32(names.len() as u32);
                for name in names {
                    out.put_bytes16(name);
                }
                out.put_bool(*more);
            }
            Response::Accepted => out.put_u8(code::ACCEPTED),
            Response::Conflict { promised } => {
                out.put_u8(code::CONFLICT);
                promised.put(&mut out);
            }
            Response::Error { code: c, message } => {
                out.put_u8(code::ERROR);
                out.put_u8(*c as u8);
                out.put_bytes16(message.as_bytes());
            }
        }
        out
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let response = match r.u8("response type")? {
            code::WRITTEN => Response::Written,
            code::ROWS => {
                let count = r.count("rows", MAX_ITEMS, 1)?;
                let mut values = Vec::with_capacity(count);
                for _ in 0..count {
                    values.push(match r.bool("row present")? {
                        false => None,
                        true => Some(RowValue::read(&mut r)?),
                    });
                }
                Response::Rows(values)
            }
            code::PAGE => {
                let count = r.count("rows", MAX_ITEMS, 3)?;
                let mut rows = Vec::with_capacity(count);
                for _ in 0..count {
                    let sort = r.bytes16("sort key", MAX_SORT_BYTES)?.to_vec();
                    rows.push((sort, RowValue::read(&mut r)?));
                }
                Response::Page {
                    rows,
                    more: r.bool("more")?,
                }
            }
            code::PARTITIONS_REPLY => {
                let count = r.count("partitions", MAX_ITEMS, 34)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push((Partition::read(&mut r)?, r.array("root")?));
                }
                Response::Partitions {
                    items,
                    more: r.bool("more")?,
                }
            }
            code::DIGEST_REPLY => {
                let mut digest = PartitionDigest::default();
                for leaf in 0..LEAVES {
                    digest.leaves[leaf] = r.array("leaf")?;
                }
                Response::Digest(digest)
            }
            code::LEAF_ROWS_REPLY => {
                let count = r.count("leaf rows", MAX_ITEMS, 35)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push((
                        Table::read(&mut r)?,
                        r.bytes16("sort key", MAX_SORT_BYTES)?.to_vec(),
                        r.array("row digest")?,
                    ));
                }
                Response::LeafRows {
                    items,
                    more: r.bool("more")?,
                }
            }
            code::PROMISE => Response::Promise {
                accepted: read_accepted(&mut r)?,
            },
            code::REGISTER_STATE => Response::RegisterState {
                accepted: read_accepted(&mut r)?,
            },
            code::FILLED_REPLY => Response::Filled {
                filled: r.bool("filled")?,
            },
            code::REGISTERS_REPLY => {
                let count = r.count("register names", MAX_ITEMS, 2)?;
                let mut names = Vec::with_capacity(count);
                for _ in 0..count {
                    names.push(r.bytes16("register name", MAX_SORT_BYTES)?.to_vec());
                }
                Response::Registers {
                    names,
                    more: r.bool("more")?,
                }
            }
            code::ACCEPTED => Response::Accepted,
            code::CONFLICT => Response::Conflict {
                promised: Ballot::read(&mut r)?,
            },
            code::ERROR => {
                let raw = r.u8("error code")?;
                let code = ErrorCode::from_code(raw).ok_or(DecodeError::InvalidValue {
                    field: "error code",
                    value: u64::from(raw),
                })?;
                Response::Error {
                    code,
                    message: r
                        .str16("error message", MAX_ERROR_MESSAGE_BYTES)?
                        .to_owned(),
                }
            }
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "response type",
                    value: u64::from(other),
                });
            }
        };
        r.finish("metadata response")?;
        Ok(response)
    }
}

/// A frame: a u32 length, then the body.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.put_bytes32(body);
    out
}

/// The body length a frame header declares, refused above the limit
/// before anything is read.
pub fn frame_len(header: [u8; 4]) -> Result<usize, DecodeError> {
    let declared = u32::from_be_bytes(header) as usize;
    if declared > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLong {
            field: "metadata frame",
            declared: declared as u64,
            max: MAX_MESSAGE_BYTES as u64,
        });
    }
    Ok(declared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::{Hlc, Timestamp};
    use crate::meta::Register;

    fn samples() -> (Vec<Request>, Vec<Response>) {
        let key = RowKey::new(Partition::cluster(), Table::Buckets, b"photos".to_vec());
        let value = RowValue::Register(Register {
            at: Timestamp {
                hlc: Hlc::new(5, 1),
                node: NodeId([2; 32]),
            },
            value: Some(b"settings".to_vec()),
        });
        let register = RegisterKey {
            partition: Partition::bucket("photos"),
            name: b"cat.jpg".to_vec(),
        };
        let ballot = Ballot {
            round: 3,
            node: NodeId([4; 32]),
        };
        let mut leaves = LeafSet::default();
        leaves.insert(9);
        let requests = vec![
            Request::Write {
                rows: vec![(key.clone(), value.clone())],
            },
            Request::Read {
                keys: vec![key.clone()],
            },
            Request::Range {
                partition: Partition::bucket("photos"),
                table: Table::Versions,
                start: b"a".to_vec(),
                end: Some(b"b".to_vec()),
                limit: 1000,
            },
            Request::Partitions {
                after: Some(Partition::cluster()),
                limit: 10,
            },
            Request::Digest {
                partition: Partition::bucket("photos"),
            },
            Request::LeafRows {
                partition: Partition::bucket("photos"),
                leaves,
                after: Some((Table::Versions, b"x".to_vec())),
                limit: 100,
            },
            Request::Filled {
                partition: Partition::bucket("photos"),
                version: 9,
                old: vec![NodeId([1; 32]), NodeId([2; 32])],
            },
            Request::Registers {
                partition: Partition::bucket("photos"),
                after: Some(b"cat.jpg".to_vec()),
                limit: 100,
            },
            Request::Prepare {
                key: register.clone(),
                ballot,
            },
            Request::Accept {
                key: register.clone(),
                ballot,
                value: None,
            },
            Request::ReadRegister { key: register },
        ];
        let responses = vec![
            Response::Written,
            Response::Rows(vec![None, Some(value.clone())]),
            Response::Page {
                rows: vec![(b"photos".to_vec(), value)],
                more: true,
            },
            Response::Partitions {
                items: vec![(Partition::cluster(), [7; 32])],
                more: false,
            },
            Response::Digest(PartitionDigest::default()),
            Response::LeafRows {
                items: vec![(Table::Parts, vec![1; 18], [8; 32])],
                more: false,
            },
            Response::Promise {
                accepted: Some(AcceptedValue {
                    ballot,
                    value: Some(b"v".to_vec()),
                }),
            },
            Response::Promise { accepted: None },
            Response::RegisterState {
                accepted: Some(AcceptedValue {
                    ballot,
                    value: None,
                }),
            },
            Response::RegisterState { accepted: None },
            Response::Accepted,
            Response::Filled { filled: true },
            Response::Registers {
                names: vec![b"a".to_vec(), b"b\0c".to_vec()],
                more: true,
            },
            Response::Conflict { promised: ballot },
            Response::error(ErrorCode::Refused, "no"),
        ];
        (requests, responses)
    }

    #[test]
    fn messages_round_trip_and_every_truncation_fails() {
        let (requests, responses) = samples();
        for request in requests {
            let body = request.encode();
            assert_eq!(Request::decode(&body).unwrap(), request);
            for len in 0..body.len() {
                assert!(
                    Request::decode(&body[..len]).is_err(),
                    "{request:?} at {len}"
                );
            }
        }
        for response in responses {
            let body = response.encode();
            assert_eq!(Response::decode(&body).unwrap(), response);
            for len in 0..body.len() {
                assert!(
                    Response::decode(&body[..len]).is_err(),
                    "{response:?} at {len}"
                );
            }
        }
    }

    #[test]
    fn an_oversize_frame_is_refused_from_its_header() {
        assert!(frame_len((MAX_MESSAGE_BYTES as u32 + 1).to_be_bytes()).is_err());
        assert_eq!(frame_len(5u32.to_be_bytes()), Ok(5));
    }

    #[test]
    fn a_count_beyond_the_bytes_present_is_refused_before_allocating() {
        let mut body = vec![code::READ];
        body.put_u32(4000);
        assert_eq!(
            Request::decode(&body),
            Err(DecodeError::Truncated { field: "keys" })
        );
    }
}
