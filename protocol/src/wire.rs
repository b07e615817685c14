//! The piece-exchange wire messages and their framing (spec/wire.md).
//!
//! A frame is a u32 big-endian length, a type byte and a payload. The
//! decoder is fed bytes and yields messages; it refuses a declared length
//! above its maximum before buffering a byte of it, so a peer can never make
//! it allocate more than one frame's worth.

use bytes::{Buf, Bytes, BytesMut};
use ed25519_dalek::{Signature, Signer, SigningKey};
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::ids::{FragmentId, NodeId, UploadId, VersionId};
use crate::manifest::{MAX_BUCKET_BYTES, MAX_KEY_BYTES};
use crate::status::NodeStatus;

/// The protocol name on libp2p streams.
/// Version 2: a hold names the object its fragment was written for, and a
/// release names the object it is checked for.
pub const PROTOCOL_NAME: &str = "/cairn/pieces/2";
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest data payload in one frame.
pub const MAX_DATA_BYTES: usize = 1 << 20;
/// Largest frame (type byte and payload) a peer may send.
pub const MAX_FRAME_BYTES: usize = MAX_DATA_BYTES + 1;
pub const MAX_HAVE_IDS: usize = 1024;
/// The most fragment ids one get-any names: every fragment of a segment.
pub const MAX_GET_ANY_IDS: usize = 32;
pub const MAX_REJECT_MESSAGE_BYTES: usize = 512;
/// Read the whole fragment in a get-fragment request.
pub const WHOLE: u64 = u64::MAX;

/// Capability bits announced in hello.
pub mod capability {
    pub const RANGE_GET: u64 = 1 << 0;
    pub const INVENTORY: u64 = 1 << 1;
}

/// The object (bucket and key) a fragment was written for, as a digest:
/// a hold names it, so that a release trashes only the fragments of the
/// object its rule was checked for, whatever upload id it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectKeyDigest(pub [u8; 32]);

impl ObjectKeyDigest {
    /// BLAKE3 in derive-key mode over the bucket's length (u16), the bucket
    /// and the key: no two (bucket, key) pairs share their bytes.
    pub fn of(bucket: &str, key: &str) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("cairn object key digest v1");
        hasher.update(&(bucket.len() as u16).to_be_bytes());
        hasher.update(bucket.as_bytes());
        hasher.update(key.as_bytes());
        Self(*hasher.finalize().as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// The writer's signed statement that a fragment belongs to an upload of
/// an object and must be kept until a date; the storing node enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub upload: UploadId,
    pub object: ObjectKeyDigest,
    pub retain_until_unix_ms: u64,
    pub writer: NodeId,
    pub signature: [u8; 64],
}

const HOLD_CONTEXT: &[u8] = b"cairn hold v2";

impl Hold {
    fn signed_bytes(
        fragment: &FragmentId,
        upload: &UploadId,
        object: &ObjectKeyDigest,
        retain_until_unix_ms: u64,
    ) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HOLD_CONTEXT.len() + 88);
        bytes.extend_from_slice(HOLD_CONTEXT);
        bytes.extend_from_slice(fragment.as_bytes());
        bytes.extend_from_slice(upload.as_bytes());
        bytes.extend_from_slice(object.as_bytes());
        bytes.put_u64(retain_until_unix_ms);
        bytes
    }

    pub fn sign(
        key: &SigningKey,
        fragment: &FragmentId,
        upload: UploadId,
        object: ObjectKeyDigest,
        retain_until_unix_ms: u64,
    ) -> Self {
        let signature = key
            .sign(&Self::signed_bytes(
                fragment,
                &upload,
                &object,
                retain_until_unix_ms,
            ))
            .to_bytes();
        Self {
            upload,
            object,
            retain_until_unix_ms,
            writer: NodeId::from_verifying_key(&key.verifying_key()),
            signature,
        }
    }

    /// Whether the writer named in the hold signed it for this fragment.
    pub fn verify(&self, fragment: &FragmentId) -> bool {
        let Ok(key) = self.writer.verifying_key() else {
            return false;
        };
        let signature = Signature::from_bytes(&self.signature);
        key.verify_strict(
            &Self::signed_bytes(
                fragment,
                &self.upload,
                &self.object,
                self.retain_until_unix_ms,
            ),
            &signature,
        )
        .is_ok()
    }
}

/// The Object Lock a storing node keeps on the fragments of an upload, as
/// versions that use them state it (spec/versioning.md, "Locks on the
/// nodes"): a compliance retain-until, and the end of a legal hold's lease
/// (a legal hold has no date: while it is on, repair renews the lease; once
/// lifted, the lease runs out). Both only ever move later. Governance
/// retention is not here: it yields to a bypass, so the gateway alone
/// enforces it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FragmentLock {
    pub compliance_until_unix_ms: u64,
    pub legal_hold_until_unix_ms: u64,
}

/// How long a legal hold's lease on the nodes lasts past the lock that
/// set it, and the grid its ends fall on (so that a lease renewed every
/// repair pass changes a node's entries once per step, not every pass).
pub const LEGAL_HOLD_LEASE_MS: u64 = 24 * 3600 * 1000;
pub const LEGAL_HOLD_LEASE_STEP_MS: u64 = 6 * 3600 * 1000;
/// The most uploads one lock-fragments names (a multipart object's
/// parts are named in several).
pub const MAX_LOCK_UPLOADS: usize = 1024;

impl FragmentLock {
    /// Whether it keeps its fragments at `now_unix_ms`.
    pub fn holds(&self, now_unix_ms: u64) -> bool {
        self.legal_hold_until_unix_ms > now_unix_ms || self.compliance_until_unix_ms > now_unix_ms
    }

    /// Each date the later of the two.
    pub fn join(self, other: Self) -> Self {
        Self {
            compliance_until_unix_ms: self
                .compliance_until_unix_ms
                .max(other.compliance_until_unix_ms),
            legal_hold_until_unix_ms: self
                .legal_hold_until_unix_ms
                .max(other.legal_hold_until_unix_ms),
        }
    }

    /// The end of a legal hold's lease taken at `now_unix_ms`: at least a
    /// lease ahead, on the step grid.
    pub fn legal_hold_lease_end(now_unix_ms: u64) -> u64 {
        now_unix_ms
            .saturating_add(LEGAL_HOLD_LEASE_MS)
            .div_ceil(LEGAL_HOLD_LEASE_STEP_MS)
            .saturating_mul(LEGAL_HOLD_LEASE_STEP_MS)
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCode {
    Malformed,
    UnsupportedVersion,
    Unauthorized,
    NotFound,
    HashMismatch,
    TooLarge,
    DiskFull,
    Busy,
    Corrupt,
    Cancelled,
    BadHold,
    Internal,
    /// The hold's retain-until is beyond what the node allows.
    RetentionRefused,
    /// A code this version does not know; kept, not refused.
    Unknown(u16),
}

impl RejectCode {
    pub fn to_u16(self) -> u16 {
        match self {
            Self::Malformed => 1,
            Self::UnsupportedVersion => 2,
            Self::Unauthorized => 3,
            Self::NotFound => 4,
            Self::HashMismatch => 5,
            Self::TooLarge => 6,
            Self::DiskFull => 7,
            Self::Busy => 8,
            Self::Corrupt => 9,
            Self::Cancelled => 10,
            Self::BadHold => 11,
            Self::Internal => 12,
            Self::RetentionRefused => 13,
            Self::Unknown(code) => code,
        }
    }

    pub fn from_u16(code: u16) -> Self {
        match code {
            1 => Self::Malformed,
            2 => Self::UnsupportedVersion,
            3 => Self::Unauthorized,
            4 => Self::NotFound,
            5 => Self::HashMismatch,
            6 => Self::TooLarge,
            7 => Self::DiskFull,
            8 => Self::Busy,
            9 => Self::Corrupt,
            10 => Self::Cancelled,
            11 => Self::BadHold,
            12 => Self::Internal,
            13 => Self::RetentionRefused,
            other => Self::Unknown(other),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        version: u16,
        capabilities: u64,
        max_frame_bytes: u32,
    },
    /// Starts a streamed put: `length` bytes follow in data frames.
    PutFragment {
        id: FragmentId,
        length: u64,
        hold: Hold,
    },
    Data(Bytes),
    /// The fragment is verified and durable.
    Ack {
        id: FragmentId,
    },
    Reject {
        code: RejectCode,
        message: String,
    },
    /// Asks for `length` bytes from `offset` (`WHOLE`: to the end).
    GetFragment {
        id: FragmentId,
        offset: u64,
        length: u64,
    },
    /// Answers a get: `length` bytes of a `total_len`-byte fragment follow.
    FragmentHeader {
        id: FragmentId,
        total_len: u64,
        offset: u64,
        length: u64,
    },
    HaveQuery {
        ids: Vec<FragmentId>,
    },
    /// As a have-query, counting only copies held live for `upload` and
    /// `object` (a copy planted under another hold, which a release of
    /// that upload could take, does not count): answered by a have-reply.
    HaveHeld {
        upload: UploadId,
        object: ObjectKeyDigest,
        ids: Vec<FragmentId>,
    },
    /// Bit `i` (most significant first) says whether `ids[i]` is held.
    HaveReply {
        count: u32,
        bitmap: Vec<u8>,
    },
    /// Asks for a digest of the held ids in `[start, end]`.
    InventoryQuery {
        start: FragmentId,
        end: FragmentId,
    },
    /// BLAKE3 over the sorted held ids in the range, and their count.
    InventoryDigest {
        start: FragmentId,
        end: FragmentId,
        count: u64,
        digest: [u8; 32],
    },
    /// Asks for up to `limit` held ids in `[start, end]`, in order.
    InventoryList {
        start: FragmentId,
        end: FragmentId,
        limit: u32,
    },
    InventoryPage {
        ids: Vec<FragmentId>,
        more: bool,
    },
    Cancel,
    /// Asks the holder to move every fragment whose hold names `upload` to
    /// its trash: the upload never committed or its versions are purged.
    /// `bucket` and `key` say where the replicated metadata shows why, for
    /// the holder to check before it trashes anything.
    Release {
        upload: UploadId,
        bucket: String,
        key: String,
    },
    /// Answers a release: fragments moved to the trash, and those kept
    /// because their hold's retain-until is still ahead.
    Released {
        trashed: u64,
        held: u64,
    },
    /// Asks the holder to bring back from its trash every fragment whose
    /// hold names `upload` and the object `bucket`/`key`: a version that
    /// uses the upload was restored. The holder checks the replicated
    /// metadata for that version first.
    Restore {
        upload: UploadId,
        bucket: String,
        key: String,
    },
    /// Answers a restore: fragments brought back from the trash.
    Restored {
        restored: u64,
    },
    /// Asks the holder to keep every fragment whose hold names one of
    /// `uploads` and the object `bucket`/`key` at least until the dates of
    /// `lock`, which `version` of that object states; the holder checks
    /// the version in the replicated metadata first.
    LockFragments {
        uploads: Vec<UploadId>,
        bucket: String,
        key: String,
        version: VersionId,
        lock: FragmentLock,
    },
    /// Answers a lock: the fragments of the uploads and object held here,
    /// each now locked at least until the dates asked.
    FragmentsLocked {
        fragments: u64,
    },
    /// Asks the holder to move its copy of `fragment` to its trash: the
    /// fragment is part of `version` of `bucket`/`key`, placement under the
    /// current map does not name the holder for it, and names `keeper`,
    /// which holds it. The holder checks all of it itself.
    DropCopy {
        fragment: FragmentId,
        bucket: String,
        key: String,
        version: VersionId,
        keeper: NodeId,
    },
    /// Answers a drop: the copy is in the trash.
    Dropped,
    /// Asks a keeper named in a drop to show `fragment`: it answers as to
    /// a whole get only if placement under its own map names it for the
    /// fragment in `version` of `bucket`/`key`, written by `upload`.
    KeepCheck {
        fragment: FragmentId,
        bucket: String,
        key: String,
        version: VersionId,
        upload: UploadId,
    },
    /// Asks for whichever of `ids` (the fragments of one segment) the node
    /// holds live, the first in their order: answered as a get of that
    /// fragment (its fragment-header names it), or refused when none.
    GetAny {
        ids: Vec<FragmentId>,
        offset: u64,
        length: u64,
    },
    /// Asks for the node's status (`cairn admin status`); without `store`,
    /// the store's part is left empty (it walks the whole index).
    StatusQuery {
        store: bool,
    },
    StatusReply(Box<NodeStatus>),
}

mod tag {
    pub const HELLO: u8 = 0x01;
    pub const PUT_FRAGMENT: u8 = 0x02;
    pub const DATA: u8 = 0x03;
    pub const ACK: u8 = 0x04;
    pub const REJECT: u8 = 0x05;
    pub const GET_FRAGMENT: u8 = 0x06;
    pub const FRAGMENT_HEADER: u8 = 0x07;
    pub const HAVE_QUERY: u8 = 0x08;
    pub const HAVE_REPLY: u8 = 0x09;
    pub const INVENTORY_QUERY: u8 = 0x0a;
    pub const INVENTORY_DIGEST: u8 = 0x0b;
    pub const INVENTORY_LIST: u8 = 0x0c;
    pub const INVENTORY_PAGE: u8 = 0x0d;
    pub const CANCEL: u8 = 0x0e;
    pub const RELEASE: u8 = 0x0f;
    pub const RELEASED: u8 = 0x10;
    pub const STATUS_QUERY: u8 = 0x11;
    pub const STATUS_REPLY: u8 = 0x12;
    pub const RESTORE: u8 = 0x13;
    pub const RESTORED: u8 = 0x14;
    pub const DROP_COPY: u8 = 0x15;
    pub const DROPPED: u8 = 0x16;
    pub const KEEP_CHECK: u8 = 0x17;
    pub const GET_ANY: u8 = 0x18;
    pub const HAVE_HELD: u8 = 0x19;
    pub const LOCK_FRAGMENTS: u8 = 0x1a;
    pub const FRAGMENTS_LOCKED: u8 = 0x1b;
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("frame declares {declared} bytes, above the limit of {max}")]
    FrameTooLarge { declared: usize, max: usize },
    #[error("empty frame")]
    EmptyFrame,
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed message: {0}")]
    Malformed(#[from] DecodeError),
    #[error("{what} holds {len} entries, above the limit of {max}")]
    TooMany {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

impl Message {
    /// Appends this message as one frame.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        out.put_u32(0);
        match self {
            Message::Hello {
                version,
                capabilities,
                max_frame_bytes,
            } => {
                out.put_u8(tag::HELLO);
                out.put_u16(*version);
                out.put_u64(*capabilities);
                out.put_u32(*max_frame_bytes);
            }
            Message::PutFragment { id, length, hold } => {
                out.put_u8(tag::PUT_FRAGMENT);
                out.extend_from_slice(id.as_bytes());
                out.put_u64(*length);
                out.extend_from_slice(hold.upload.as_bytes());
                out.extend_from_slice(hold.object.as_bytes());
                out.put_u64(hold.retain_until_unix_ms);
                out.extend_from_slice(hold.writer.as_bytes());
                out.extend_from_slice(&hold.signature);
            }
            Message::Data(bytes) => {
                check_len("data", bytes.len(), MAX_DATA_BYTES)?;
                out.put_u8(tag::DATA);
                out.extend_from_slice(bytes);
            }
            Message::Ack { id } => {
                out.put_u8(tag::ACK);
                out.extend_from_slice(id.as_bytes());
            }
            Message::Reject { code, message } => {
                out.put_u8(tag::REJECT);
                out.put_u16(code.to_u16());
                // Cut an over-long reason at a character boundary rather than fail.
                let mut end = message.len().min(MAX_REJECT_MESSAGE_BYTES);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                out.put_bytes16(&message.as_bytes()[..end]);
            }
            Message::GetFragment { id, offset, length } => {
                out.put_u8(tag::GET_FRAGMENT);
                out.extend_from_slice(id.as_bytes());
                out.put_u64(*offset);
                out.put_u64(*length);
            }
            Message::FragmentHeader {
                id,
                total_len,
                offset,
                length,
            } => {
                out.put_u8(tag::FRAGMENT_HEADER);
                out.extend_from_slice(id.as_bytes());
                out.put_u64(*total_len);
                out.put_u64(*offset);
                out.put_u64(*length);
            }
            Message::HaveQuery { ids } => {
                check_len("have query", ids.len(), MAX_HAVE_IDS)?;
                out.put_u8(tag::HAVE_QUERY);
                put_ids(out, ids);
            }
            Message::HaveHeld {
                upload,
                object,
                ids,
            } => {
                check_len("have-held query", ids.len(), MAX_HAVE_IDS)?;
                out.put_u8(tag::HAVE_HELD);
                out.extend_from_slice(&upload.0);
                out.extend_from_slice(&object.0);
                put_ids(out, ids);
            }
            Message::HaveReply { count, bitmap } => {
                check_len("have reply", *count as usize, MAX_HAVE_IDS)?;
                if bitmap.len() != (*count as usize).div_ceil(8) {
                    return Err(WireError::Malformed(DecodeError::InvalidValue {
                        field: "bitmap length",
                        value: bitmap.len() as u64,
                    }));
                }
                out.put_u8(tag::HAVE_REPLY);
                out.put_u32(*count);
                out.extend_from_slice(bitmap);
            }
            Message::InventoryQuery { start, end } => {
                out.put_u8(tag::INVENTORY_QUERY);
                out.extend_from_slice(start.as_bytes());
                out.extend_from_slice(end.as_bytes());
            }
            Message::InventoryDigest {
                start,
                end,
                count,
                digest,
            } => {
                out.put_u8(tag::INVENTORY_DIGEST);
                out.extend_from_slice(start.as_bytes());
                out.extend_from_slice(end.as_bytes());
                out.put_u64(*count);
                out.extend_from_slice(digest);
            }
            Message::InventoryList { start, end, limit } => {
                out.put_u8(tag::INVENTORY_LIST);
                out.extend_from_slice(start.as_bytes());
                out.extend_from_slice(end.as_bytes());
                out.put_u32(*limit);
            }
            Message::InventoryPage { ids, more } => {
                check_len("inventory page", ids.len(), MAX_HAVE_IDS)?;
                out.put_u8(tag::INVENTORY_PAGE);
                out.put_bool(*more);
                put_ids(out, ids);
            }
            Message::Cancel => out.put_u8(tag::CANCEL),
            Message::Release {
                upload,
                bucket,
                key,
            } => {
                check_len("release bucket", bucket.len(), MAX_BUCKET_BYTES)?;
                check_len("release key", key.len(), MAX_KEY_BYTES)?;
                out.put_u8(tag::RELEASE);
                out.extend_from_slice(upload.as_bytes());
                out.put_bytes16(bucket.as_bytes());
                out.put_bytes16(key.as_bytes());
            }
            Message::Released { trashed, held } => {
                out.put_u8(tag::RELEASED);
                out.put_u64(*trashed);
                out.put_u64(*held);
            }
            Message::Restore {
                upload,
                bucket,
                key,
            } => {
                check_len("restore bucket", bucket.len(), MAX_BUCKET_BYTES)?;
                check_len("restore key", key.len(), MAX_KEY_BYTES)?;
                out.put_u8(tag::RESTORE);
                out.extend_from_slice(upload.as_bytes());
                out.put_bytes16(bucket.as_bytes());
                out.put_bytes16(key.as_bytes());
            }
            Message::Restored { restored } => {
                out.put_u8(tag::RESTORED);
                out.put_u64(*restored);
            }
            Message::LockFragments {
                uploads,
                bucket,
                key,
                version,
                lock,
            } => {
                check_len("lock uploads", uploads.len(), MAX_LOCK_UPLOADS)?;
                check_len("lock bucket", bucket.len(), MAX_BUCKET_BYTES)?;
                check_len("lock key", key.len(), MAX_KEY_BYTES)?;
                out.put_u8(tag::LOCK_FRAGMENTS);
                out.put_u32(uploads.len() as u32);
                for upload in uploads {
                    out.extend_from_slice(upload.as_bytes());
                }
                out.put_bytes16(bucket.as_bytes());
                out.put_bytes16(key.as_bytes());
                out.extend_from_slice(&version.0);
                out.put_u64(lock.compliance_until_unix_ms);
                out.put_u64(lock.legal_hold_until_unix_ms);
            }
            Message::FragmentsLocked { fragments } => {
                out.put_u8(tag::FRAGMENTS_LOCKED);
                out.put_u64(*fragments);
            }
            Message::DropCopy {
                fragment,
                bucket,
                key,
                version,
                keeper,
            } => {
                check_len("drop bucket", bucket.len(), MAX_BUCKET_BYTES)?;
                check_len("drop key", key.len(), MAX_KEY_BYTES)?;
                out.put_u8(tag::DROP_COPY);
                out.extend_from_slice(fragment.as_bytes());
                out.put_bytes16(bucket.as_bytes());
                out.put_bytes16(key.as_bytes());
                out.extend_from_slice(&version.0);
                out.extend_from_slice(keeper.as_bytes());
            }
            Message::Dropped => out.put_u8(tag::DROPPED),
            Message::KeepCheck {
                fragment,
                bucket,
                key,
                version,
                upload,
            } => {
                check_len("keep bucket", bucket.len(), MAX_BUCKET_BYTES)?;
                check_len("keep key", key.len(), MAX_KEY_BYTES)?;
                out.put_u8(tag::KEEP_CHECK);
                out.extend_from_slice(fragment.as_bytes());
                out.put_bytes16(bucket.as_bytes());
                out.put_bytes16(key.as_bytes());
                out.extend_from_slice(&version.0);
                out.extend_from_slice(upload.as_bytes());
            }
            Message::GetAny {
                ids,
                offset,
                length,
            } => {
                if ids.is_empty() {
                    return Err(WireError::TooMany {
                        what: "get-any ids (none)",
                        len: 0,
                        max: MAX_GET_ANY_IDS,
                    });
                }
                check_len("get-any ids", ids.len(), MAX_GET_ANY_IDS)?;
                out.put_u8(tag::GET_ANY);
                out.put_u8(ids.len() as u8);
                for id in ids {
                    out.extend_from_slice(id.as_bytes());
                }
                out.put_u64(*offset);
                out.put_u64(*length);
            }
            Message::StatusQuery { store } => {
                out.put_u8(tag::STATUS_QUERY);
                out.put_bool(*store);
            }
            Message::StatusReply(status) => {
                out.put_u8(tag::STATUS_REPLY);
                status.put(out);
            }
        }
        let frame_len = out.len() - start - 4;
        out[start..start + 4].copy_from_slice(&(frame_len as u32).to_be_bytes());
        Ok(())
    }

    fn decode(kind: u8, payload: Bytes) -> Result<Self, WireError> {
        if kind == tag::DATA {
            return Ok(Message::Data(payload));
        }
        let mut r = Reader::new(&payload);
        let message = match kind {
            tag::HELLO => Message::Hello {
                version: r.u16("version")?,
                capabilities: r.u64("capabilities")?,
                max_frame_bytes: r.u32("max frame bytes")?,
            },
            tag::PUT_FRAGMENT => Message::PutFragment {
                id: FragmentId(r.array("fragment id")?),
                length: r.u64("length")?,
                hold: Hold {
                    upload: UploadId(r.array("upload id")?),
                    object: ObjectKeyDigest(r.array("object key digest")?),
                    retain_until_unix_ms: r.u64("retain until")?,
                    writer: NodeId(r.array("writer")?),
                    signature: r.array("signature")?,
                },
            },
            tag::ACK => Message::Ack {
                id: FragmentId(r.array("fragment id")?),
            },
            tag::REJECT => Message::Reject {
                code: RejectCode::from_u16(r.u16("code")?),
                message: r.str16("message", MAX_REJECT_MESSAGE_BYTES)?.to_owned(),
            },
            tag::GET_FRAGMENT => Message::GetFragment {
                id: FragmentId(r.array("fragment id")?),
                offset: r.u64("offset")?,
                length: r.u64("length")?,
            },
            tag::FRAGMENT_HEADER => Message::FragmentHeader {
                id: FragmentId(r.array("fragment id")?),
                total_len: r.u64("total length")?,
                offset: r.u64("offset")?,
                length: r.u64("length")?,
            },
            tag::HAVE_QUERY => Message::HaveQuery {
                ids: read_ids(&mut r)?,
            },
            tag::HAVE_HELD => Message::HaveHeld {
                upload: UploadId(r.array("upload id")?),
                object: ObjectKeyDigest(r.array("object key digest")?),
                ids: read_ids(&mut r)?,
            },
            tag::HAVE_REPLY => {
                let count = r.count("have reply", MAX_HAVE_IDS, 0)?;
                let bitmap = r.take(count.div_ceil(8), "bitmap")?.to_vec();
                Message::HaveReply {
                    count: count as u32,
                    bitmap,
                }
            }
            tag::INVENTORY_QUERY => Message::InventoryQuery {
                start: FragmentId(r.array("start")?),
                end: FragmentId(r.array("end")?),
            },
            tag::INVENTORY_DIGEST => Message::InventoryDigest {
                start: FragmentId(r.array("start")?),
                end: FragmentId(r.array("end")?),
                count: r.u64("count")?,
                digest: r.array("digest")?,
            },
            tag::INVENTORY_LIST => Message::InventoryList {
                start: FragmentId(r.array("start")?),
                end: FragmentId(r.array("end")?),
                limit: r.u32("limit")?,
            },
            tag::INVENTORY_PAGE => {
                let more = r.bool("more")?;
                Message::InventoryPage {
                    ids: read_ids(&mut r)?,
                    more,
                }
            }
            tag::CANCEL => Message::Cancel,
            tag::RELEASE => Message::Release {
                upload: UploadId(r.array("upload id")?),
                bucket: r.str16("release bucket", MAX_BUCKET_BYTES)?.to_owned(),
                key: r.str16("release key", MAX_KEY_BYTES)?.to_owned(),
            },
            tag::RELEASED => Message::Released {
                trashed: r.u64("trashed")?,
                held: r.u64("held")?,
            },
            tag::RESTORE => Message::Restore {
                upload: UploadId(r.array("upload id")?),
                bucket: r.str16("restore bucket", MAX_BUCKET_BYTES)?.to_owned(),
                key: r.str16("restore key", MAX_KEY_BYTES)?.to_owned(),
            },
            tag::RESTORED => Message::Restored {
                restored: r.u64("restored")?,
            },
            tag::LOCK_FRAGMENTS => {
                let count = r.count("lock uploads", MAX_LOCK_UPLOADS, 16)?;
                let uploads = (0..count)
                    .map(|_| r.array("upload id").map(UploadId))
                    .collect::<Result<Vec<_>, _>>()?;
                Message::LockFragments {
                    uploads,
                    bucket: r.str16("lock bucket", MAX_BUCKET_BYTES)?.to_owned(),
                    key: r.str16("lock key", MAX_KEY_BYTES)?.to_owned(),
                    version: VersionId(r.array("version id")?),
                    lock: FragmentLock {
                        compliance_until_unix_ms: r.u64("compliance until")?,
                        legal_hold_until_unix_ms: r.u64("legal hold until")?,
                    },
                }
            }
            tag::FRAGMENTS_LOCKED => Message::FragmentsLocked {
                fragments: r.u64("fragments locked")?,
            },
            tag::DROP_COPY => Message::DropCopy {
                fragment: FragmentId(r.array("fragment id")?),
                bucket: r.str16("drop bucket", MAX_BUCKET_BYTES)?.to_owned(),
                key: r.str16("drop key", MAX_KEY_BYTES)?.to_owned(),
                version: VersionId(r.array("version id")?),
                keeper: NodeId(r.array("keeper")?),
            },
            tag::DROPPED => Message::Dropped,
            tag::KEEP_CHECK => Message::KeepCheck {
                fragment: FragmentId(r.array("fragment id")?),
                bucket: r.str16("keep bucket", MAX_BUCKET_BYTES)?.to_owned(),
                key: r.str16("keep key", MAX_KEY_BYTES)?.to_owned(),
                version: VersionId(r.array("version id")?),
                upload: UploadId(r.array("upload id")?),
            },
            tag::GET_ANY => {
                let count = usize::from(r.u8("get-any count")?);
                if count == 0 || count > MAX_GET_ANY_IDS {
                    return Err(WireError::Malformed(DecodeError::InvalidValue {
                        field: "get-any count",
                        value: count as u64,
                    }));
                }
                let mut ids = Vec::with_capacity(count);
                for _ in 0..count {
                    ids.push(FragmentId(r.array("fragment id")?));
                }
                Message::GetAny {
                    ids,
                    offset: r.u64("offset")?,
                    length: r.u64("length")?,
                }
            }
            tag::STATUS_QUERY => Message::StatusQuery {
                store: r.bool("store")?,
            },
            tag::STATUS_REPLY => Message::StatusReply(Box::new(NodeStatus::read(&mut r)?)),
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish("message")?;
        Ok(message)
    }
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        Err(WireError::TooMany { what, len, max })
    } else {
        Ok(())
    }
}

fn put_ids(out: &mut Vec<u8>, ids: &[FragmentId]) {
    out.put_u32(ids.len() as u32);
    for id in ids {
        out.extend_from_slice(id.as_bytes());
    }
}

fn read_ids(r: &mut Reader<'_>) -> Result<Vec<FragmentId>, DecodeError> {
    let count = r.count("ids", MAX_HAVE_IDS, 32)?;
    (0..count)
        .map(|_| r.array("fragment id").map(FragmentId))
        .collect()
}

/// Writes only the header of a data frame, so that the payload can be sent
/// from where it already lies.
pub fn encode_data_header(payload_len: usize, out: &mut Vec<u8>) -> Result<(), WireError> {
    check_len("data", payload_len, MAX_DATA_BYTES)?;
    out.put_u32(payload_len as u32 + 1);
    out.put_u8(tag::DATA);
    Ok(())
}

/// Sans-IO frame decoder: `feed` bytes as they arrive, then take messages
/// with `next_message` until it returns `None`.
pub struct FrameDecoder {
    buffer: BytesMut,
    max_frame_bytes: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_BYTES)
    }
}

impl FrameDecoder {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            max_frame_bytes,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if self.buffer.len() < 4 {
            return Ok(None);
        }
        let declared = u32::from_be_bytes([
            self.buffer[0],
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
        ]) as usize;
        if declared == 0 {
            return Err(WireError::EmptyFrame);
        }
        if declared > self.max_frame_bytes {
            return Err(WireError::FrameTooLarge {
                declared,
                max: self.max_frame_bytes,
            });
        }
        if self.buffer.len() < 4 + declared {
            return Ok(None);
        }
        self.buffer.advance(4);
        let mut frame = self.buffer.split_to(declared).freeze();
        let kind = frame[0];
        frame.advance(1);
        Message::decode(kind, frame).map(Some)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reject_codes_round_trip_and_unknown_ones_are_kept() {
        for number in 1..=13u16 {
            let code = RejectCode::from_u16(number);
            assert!(!matches!(code, RejectCode::Unknown(_)), "{number}");
            assert_eq!(code.to_u16(), number);
        }
        assert_eq!(RejectCode::from_u16(14), RejectCode::Unknown(14));
        assert_eq!(RejectCode::RetentionRefused.to_u16(), 13);
    }

    use super::*;

    #[test]
    fn an_oversize_declaration_is_refused_before_buffering() {
        let mut decoder = FrameDecoder::default();
        decoder.feed(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decoder.next_message(),
            Err(WireError::FrameTooLarge { .. })
        ));
        let mut decoder = FrameDecoder::default();
        decoder.feed(&[0, 0, 0, 0]);
        assert_eq!(decoder.next_message(), Err(WireError::EmptyFrame));
    }

    #[test]
    fn messages_survive_arbitrary_splitting() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let id = FragmentId::of(b"fragment");
        let messages = vec![
            Message::Hello {
                version: PROTOCOL_VERSION,
                capabilities: capability::RANGE_GET,
                max_frame_bytes: MAX_FRAME_BYTES as u32,
            },
            Message::PutFragment {
                id,
                length: 8,
                hold: Hold::sign(
                    &key,
                    &id,
                    UploadId([1; 16]),
                    ObjectKeyDigest::of("bucket", "key"),
                    42,
                ),
            },
            Message::Data(Bytes::from_static(b"fragment")),
            Message::Ack { id },
            Message::HaveQuery { ids: vec![id; 9] },
            Message::HaveHeld {
                upload: UploadId([1; 16]),
                object: ObjectKeyDigest::of("bucket", "key"),
                ids: vec![id; 3],
            },
            Message::HaveReply {
                count: 9,
                bitmap: vec![0xff, 0x80],
            },
            Message::Cancel,
            Message::Release {
                upload: UploadId([7; 16]),
                bucket: "photos".into(),
                key: "2026/cat.jpg".into(),
            },
            Message::Released {
                trashed: 3,
                held: 1,
            },
            Message::Restore {
                upload: UploadId([7; 16]),
                bucket: "photos".into(),
                key: "2026/cat.jpg".into(),
            },
            Message::Restored { restored: 3 },
            Message::LockFragments {
                uploads: vec![UploadId([7; 16]), UploadId([8; 16])],
                bucket: "photos".into(),
                key: "2026/cat.jpg".into(),
                version: VersionId([9; 16]),
                lock: FragmentLock {
                    compliance_until_unix_ms: 1_900_000_000_000,
                    legal_hold_until_unix_ms: 1_800_000_000_000,
                },
            },
            Message::FragmentsLocked { fragments: 5 },
            Message::DropCopy {
                fragment: id,
                bucket: "photos".into(),
                key: "2026/cat.jpg".into(),
                version: VersionId([9; 16]),
                keeper: NodeId([4; 32]),
            },
            Message::Dropped,
            Message::KeepCheck {
                fragment: id,
                bucket: "photos".into(),
                key: "2026/cat.jpg".into(),
                version: VersionId([9; 16]),
                upload: UploadId([7; 16]),
            },
            Message::GetAny {
                ids: vec![id; 6],
                offset: 0,
                length: WHOLE,
            },
            Message::StatusQuery { store: true },
            Message::StatusReply(Box::new(NodeStatus {
                store: crate::status::StoreStatus {
                    live: 4,
                    ..Default::default()
                },
                repair: crate::status::RepairSummary {
                    degraded_by_spares: [(0, 2), (1, 5)].into(),
                    ..Default::default()
                },
                ..Default::default()
            })),
        ];
        let mut stream = Vec::new();
        for m in &messages {
            m.encode(&mut stream).unwrap();
        }
        for step in [1, 3, 7, 64, stream.len()] {
            let mut decoder = FrameDecoder::default();
            let mut got = Vec::new();
            for piece in stream.chunks(step) {
                decoder.feed(piece);
                while let Some(m) = decoder.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, messages, "split every {step} bytes");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn holds_verify_only_for_their_fragment() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let id = FragmentId::of(b"a");
        let hold = Hold::sign(
            &key,
            &id,
            UploadId([1; 16]),
            ObjectKeyDigest::of("bucket", "key"),
            1000,
        );
        assert!(hold.verify(&id));
        assert!(!hold.verify(&FragmentId::of(b"b")));
        let mut longer = hold.clone();
        longer.retain_until_unix_ms += 1;
        assert!(!longer.verify(&id));
    }
}
