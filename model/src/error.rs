//! What the model refuses or fails at; the S3 adapter gives each its S3
//! error code.

use cairn_node::meta::MetaError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("the bucket {0:?} does not exist")]
    NoSuchBucket(String),
    #[error("you already own the bucket {0:?}")]
    BucketAlreadyOwnedByYou(String),
    #[error("the bucket {0:?} is not empty")]
    BucketNotEmpty(String),
    #[error("{0}")]
    InvalidBucketName(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the key does not exist")]
    NoSuchKey,
    #[error("the version does not exist")]
    NoSuchVersion,
    #[error("{0}")]
    InvalidBucketState(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    OperationAborted(String),
    #[error("the upload does not exist; it may have been completed or aborted")]
    NoSuchUpload,
    #[error("at least one of the preconditions you specified did not hold")]
    PreconditionFailed,
    #[error("the write ran past its deadline of {minutes} minutes; nothing was committed")]
    WriteDeadline { minutes: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("the cluster has no map yet; sign one and push it (`cairn admin map push`)")]
    NoMap,
    #[error("stored data failed its checks: {0}")]
    Corrupt(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Metadata(#[from] MetaError),
}

pub type ModelResult<T> = Result<T, ModelError>;
