//! The bucket operations: list, create, head and delete buckets, and answer
//! where one is.

use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

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
        self.buckets
            .create(&req.input.bucket, &owner)
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
