//! cairn-model: the S3 schema over the replicated metadata. It owns what
//! the tables mean — buckets, access keys and KMS keys as register
//! tables, each key's head register and the policy of what a write or a
//! delete does to its versions, listings, version locks and the orphan
//! collector — so that `cairn-node` stays a store of rows and fragments and
//! the gateway a translator of S3 requests.

pub mod access_keys;
pub mod buckets;
pub mod collector;
pub mod error;
pub mod fragment_locks;
pub mod heads;
pub mod kms;
pub mod lifecycle;
pub mod listing;
pub mod locks;
pub mod registers;
pub mod repair;
pub mod rows;
pub mod trash;
pub mod uploads;

pub use error::{ModelError, ModelResult};
