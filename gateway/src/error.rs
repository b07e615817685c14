//! What can go wrong behind the S3 front door, each with the S3 error code
//! a client expects (the mapping lives in `s3/errors.rs`).

use cairn_model::ModelError;
use cairn_node::meta::MetaError;
use cairn_node::swarm::NodeError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("the bucket {0:?} does not exist")]
    NoSuchBucket(String),
    #[error("the key does not exist")]
    NoSuchKey,
    #[error("the version does not exist")]
    NoSuchVersion,
    #[error("{0}")]
    InvalidBucketState(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    OperationAborted(String),
    #[error("the upload does not exist; it may have been completed or aborted")]
    NoSuchUpload,
    #[error("you already own the bucket {0:?}")]
    BucketAlreadyOwnedByYou(String),
    #[error("the bucket {0:?} is owned by another access key")]
    BucketAlreadyExists(String),
    #[error("the bucket {0:?} is not empty")]
    BucketNotEmpty(String),
    #[error("{0}")]
    InvalidBucketName(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    KeyTooLong(String),
    #[error("{0}")]
    MetadataTooLarge(String),
    #[error("the Content-MD5 you sent does not match the bytes received")]
    BadDigest,
    #[error("the {algorithm} checksum you sent does not match the bytes received")]
    ChecksumMismatch { algorithm: &'static str },
    #[error("{0}")]
    InvalidDigest(String),
    #[error("the body ended after {got} of the {expected} bytes announced")]
    IncompleteBody { expected: u64, got: u64 },
    #[error("the body is longer than the {expected} bytes announced")]
    BodyTooLong { expected: u64 },
    #[error("the object is larger than {max} bytes")]
    EntityTooLarge { max: u64 },
    #[error("the part is smaller than the 5 MiB minimum and is not the last")]
    EntityTooSmall,
    #[error("the range is not satisfiable for an object of {size} bytes")]
    InvalidRange { size: u64 },
    #[error("{0}")]
    InvalidPart(String),
    #[error("the parts are not in ascending order")]
    InvalidPartOrder,
    #[error("at least one of the preconditions you specified did not hold")]
    PreconditionFailed,
    #[error("not modified")]
    NotModified,
    #[error("the write ran past its deadline of {minutes} minutes; nothing was committed")]
    WriteDeadline { minutes: u64 },
    #[error("the body does not hash to the x-amz-content-sha256 the request was signed with")]
    ContentSha256Mismatch,
    #[error("the client stopped sending the body: {0}")]
    ClientBody(String),
    #[error("not enough storage nodes answered: {0}")]
    Unavailable(String),
    #[error("stored data failed its checks: {0}")]
    Corrupt(String),
    #[error("the cluster has no map yet; sign one and push it (`cairn admin map push`)")]
    NoMap,
    #[error(transparent)]
    Metadata(#[from] MetaError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("{0}")]
    NotImplemented(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type GatewayResult<T> = Result<T, GatewayError>;

impl From<ModelError> for GatewayError {
    fn from(error: ModelError) -> Self {
        match error {
            ModelError::NoSuchBucket(name) => Self::NoSuchBucket(name),
            ModelError::BucketAlreadyOwnedByYou(name) => Self::BucketAlreadyOwnedByYou(name),
            ModelError::BucketNotEmpty(name) => Self::BucketNotEmpty(name),
            ModelError::InvalidBucketName(why) => Self::InvalidBucketName(why),
            ModelError::InvalidArgument(why) => Self::InvalidArgument(why),
            ModelError::NoSuchKey => Self::NoSuchKey,
            ModelError::NoSuchVersion => Self::NoSuchVersion,
            ModelError::InvalidBucketState(why) => Self::InvalidBucketState(why),
            ModelError::AccessDenied(why) => Self::AccessDenied(why),
            ModelError::OperationAborted(why) => Self::OperationAborted(why),
            ModelError::NoSuchUpload => Self::NoSuchUpload,
            ModelError::PreconditionFailed => Self::PreconditionFailed,
            ModelError::WriteDeadline { minutes } => Self::WriteDeadline { minutes },
            ModelError::Unavailable(why) => Self::Unavailable(why),
            ModelError::NoMap => Self::NoMap,
            ModelError::Corrupt(why) => Self::Corrupt(why),
            ModelError::Internal(why) => Self::Internal(why),
            ModelError::Metadata(error) => Self::Metadata(error),
        }
    }
}
