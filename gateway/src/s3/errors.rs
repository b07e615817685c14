//! The S3 error code, and for some the status, each gateway failure is
//! answered with.

use s3s::{S3Error, S3ErrorCode};

use crate::error::GatewayError;

impl From<GatewayError> for S3Error {
    fn from(error: GatewayError) -> Self {
        use S3ErrorCode as C;
        let code = match &error {
            GatewayError::NoSuchBucket(_) => C::NoSuchBucket,
            GatewayError::NoSuchKey => C::NoSuchKey,
            GatewayError::NoSuchVersion => C::NoSuchVersion,
            GatewayError::InvalidBucketState(_) => C::InvalidBucketState,
            GatewayError::AccessDenied(_) => C::AccessDenied,
            GatewayError::MethodNotAllowed(_) => C::MethodNotAllowed,
            GatewayError::OperationAborted(_) => C::OperationAborted,
            GatewayError::NoSuchUpload => C::NoSuchUpload,
            GatewayError::BucketAlreadyOwnedByYou(_) => C::BucketAlreadyOwnedByYou,
            GatewayError::BucketAlreadyExists(_) => C::BucketAlreadyExists,
            GatewayError::BucketNotEmpty(_) => C::BucketNotEmpty,
            GatewayError::InvalidBucketName(_) => C::InvalidBucketName,
            GatewayError::InvalidArgument(_) => C::InvalidArgument,
            GatewayError::NotImplemented(_) => C::NotImplemented,
            GatewayError::InvalidRequest(_) => C::InvalidRequest,
            GatewayError::KeyTooLong(_) => C::KeyTooLongError,
            GatewayError::MetadataTooLarge(_) => C::MetadataTooLarge,
            GatewayError::BadDigest | GatewayError::ChecksumMismatch { .. } => C::BadDigest,
            GatewayError::InvalidDigest(_) => C::InvalidDigest,
            GatewayError::IncompleteBody { .. } | GatewayError::ClientBody(_) => C::IncompleteBody,
            GatewayError::WriteDeadline { .. } => C::RequestTimeout,
            // Not among s3s's codes; AWS answers it with 400 (below).
            GatewayError::ContentSha256Mismatch => C::Custom("XAmzContentSHA256Mismatch".into()),
            GatewayError::BodyTooLong { .. } => C::InvalidRequest,
            GatewayError::EntityTooLarge { .. } => C::EntityTooLarge,
            GatewayError::EntityTooSmall => C::EntityTooSmall,
            GatewayError::InvalidRange { .. } => C::InvalidRange,
            GatewayError::InvalidPart(_) => C::InvalidPart,
            GatewayError::InvalidPartOrder => C::InvalidPartOrder,
            GatewayError::PreconditionFailed => C::PreconditionFailed,
            GatewayError::NotModified => C::NotModified,
            GatewayError::Unavailable(_)
            | GatewayError::NoMap
            | GatewayError::Metadata(_)
            | GatewayError::Node(_) => C::ServiceUnavailable,
            GatewayError::Corrupt(_) | GatewayError::Internal(_) => C::InternalError,
        };
        if matches!(code, C::ServiceUnavailable | C::InternalError) {
            tracing::warn!(%error, "request failed");
        }
        let custom = matches!(code, C::Custom(_));
        let mut refusal = S3Error::with_message(code, error.to_string());
        if custom {
            refusal.set_status_code(http::StatusCode::BAD_REQUEST);
        }
        refusal
    }
}

/// The code an outcome is refused with, or `ok` and its value.
#[cfg(test)]
pub(super) fn refused(outcome: Result<impl std::fmt::Debug, GatewayError>) -> String {
    match outcome {
        Ok(value) => format!("ok {value:?}"),
        Err(error) => S3Error::from(error).code().as_str().to_owned(),
    }
}
