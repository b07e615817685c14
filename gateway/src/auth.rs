//! The SigV4 secret lookup s3s calls for every signed request.

use cairn_model::access_keys::AccessKeys;
use s3s::S3Result;
use s3s::auth::{S3Auth, SecretKey as S3SecretKey};

/// The cluster's access keys as s3s asks for them.
pub struct KeyLookup(pub AccessKeys);

#[async_trait::async_trait]
impl S3Auth for KeyLookup {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<S3SecretKey> {
        match self.0.secret(access_key).await {
            Ok(Some(secret)) => Ok(S3SecretKey::from(secret)),
            Ok(None) => Err(s3s::s3_error!(
                InvalidAccessKeyId,
                "The AWS access key Id you provided does not exist in our records."
            )),
            Err(error) => {
                tracing::warn!(%error, "access key lookup failed");
                Err(s3s::s3_error!(
                    ServiceUnavailable,
                    "the access keys cannot be read right now"
                ))
            }
        }
    }
}
