//! The bucket operations: list, create, head and delete buckets, and answer
//! where one is.

use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

use cairn_model::ModelError;
use cairn_protocol::records::{BucketSettings, Versioning};

use super::headers::timestamp_of;
use super::{CairnS3, DEFAULT_REGION};
use crate::error::GatewayError;
use crate::protections::{Operation, WithCopySource, refuse_unoffered};

fn owner_of<T>(req: &S3Request<T>) -> String {
    req.credentials
        .as_ref()
        .map(|c| c.access_key.clone())
        .unwrap_or_default()
}

impl CairnS3 {
    pub(super) async fn list_buckets_op(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let owner = owner_of(&req);
        let buckets = self
            .buckets
            .list()
            .await
            .map_err(GatewayError::from)?
            .into_iter()
            .map(|(name, record)| Bucket {
                name: Some(name),
                creation_date: Some(timestamp_of(record.created_unix_ms)),
                bucket_region: Some(self.region.clone()),
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(Owner {
                display_name: Some(owner.clone()),
                id: Some(owner),
            }),
            ..Default::default()
        }))
    }

    pub(super) async fn create_bucket_op(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        refuse_unoffered(
            Operation::CreateBucket,
            WithCopySource::No,
            &req.headers,
            &req.uri,
        )?;
        if let Some(constraint) = req
            .input
            .create_bucket_configuration
            .as_ref()
            .and_then(|c| c.location_constraint.as_ref())
            && constraint.as_str() != self.region
        {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidLocationConstraint,
                format!(
                    "this cluster's region is {}; the location constraint {} is not it",
                    self.region,
                    constraint.as_str()
                ),
            ));
        }
        let owner = owner_of(&req);
        let object_lock = super::locks::bucket_lock_requested(&req.headers, &req.uri)?;
        self.buckets
            .create(&req.input.bucket, &owner, object_lock)
            .await
            .map_err(GatewayError::from)?;
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{}", req.input.bucket)),
        }))
    }

    pub(super) async fn head_bucket_op(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.bucket(&req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput {
            bucket_region: Some(self.region.clone()),
            ..Default::default()
        }))
    }

    pub(super) async fn delete_bucket_op(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.buckets
            .delete(&req.input.bucket)
            .await
            .map_err(GatewayError::from)?;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    pub(super) async fn put_bucket_versioning_op(
        &self,
        req: S3Request<PutBucketVersioningInput>,
    ) -> S3Result<S3Response<PutBucketVersioningOutput>> {
        let input = req.input;
        let configuration = input.versioning_configuration;
        if configuration
            .mfa_delete
            .as_ref()
            .is_some_and(|m| m.as_str() == MFADelete::ENABLED)
        {
            return Err(GatewayError::NotImplemented(
                "MFA Delete is not offered: versions are protected by Object Lock".into(),
            )
            .into());
        }
        let wanted = match configuration.status.as_ref().map(|s| s.as_str()) {
            Some(BucketVersioningStatus::ENABLED) => Versioning::Enabled,
            Some(BucketVersioningStatus::SUSPENDED) => Versioning::Suspended,
            _ => {
                return Err(S3Error::with_message(
                    S3ErrorCode::MalformedXML,
                    "the versioning configuration needs a Status of Enabled or Suspended",
                ));
            }
        };
        self.buckets
            .change_settings(&input.bucket, |current| {
                if wanted == Versioning::Suspended && current.object_lock {
                    return Err(ModelError::InvalidBucketState(
                        "An Object Lock configuration is present on this bucket, so the versioning state cannot be changed.".into(),
                    ));
                }
                Ok(BucketSettings {
                    versioning: wanted,
                    ..current.clone()
                })
            })
            .await
            .map_err(GatewayError::from)?;
        Ok(S3Response::new(PutBucketVersioningOutput {}))
    }

    pub(super) async fn get_bucket_versioning_op(
        &self,
        req: S3Request<GetBucketVersioningInput>,
    ) -> S3Result<S3Response<GetBucketVersioningOutput>> {
        let status = match self.versioning(&req.input.bucket).await? {
            Versioning::Unversioned => None,
            Versioning::Enabled => Some(BucketVersioningStatus::from_static(
                BucketVersioningStatus::ENABLED,
            )),
            Versioning::Suspended => Some(BucketVersioningStatus::from_static(
                BucketVersioningStatus::SUSPENDED,
            )),
        };
        Ok(S3Response::new(GetBucketVersioningOutput {
            status,
            ..Default::default()
        }))
    }

    pub(super) async fn get_bucket_location_op(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.bucket(&req.input.bucket).await?;
        // us-east-1 is spelt as no constraint, as S3 does.
        let constraint = (self.region != DEFAULT_REGION)
            .then(|| BucketLocationConstraint::from(self.region.clone()));
        Ok(S3Response::new(GetBucketLocationOutput {
            location_constraint: constraint,
        }))
    }
}
