//! The multipart operations: create, upload a part (or copy one), complete,
//! abort, and list parts and uploads.

use cairn_protocol::ids::UploadId;
use cairn_protocol::version::VersionBody;
use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

use super::CairnS3;
use super::conditions::{check_copy_conditions, write_condition};
use super::headers::{
    body_length, check_key, header_fields, page_size, parse_content_md5, sse_s3, stored_checksums,
    stored_headers, strong_etag, timestamp_of, written_version_id,
};
use super::locks::{new_lock, requested_lock, with_upload_lock};
use crate::checksum::{Algorithm, ChecksumRequest};
use crate::error::GatewayError;
use crate::multipart::{ChosenPart, MAX_PART_NUMBER, check_part_number};
use crate::objects::check_body_length;
use crate::protections::{Operation, WithCopySource, refuse_unoffered};
use cairn_node::clock::now_unix_ms;

fn parse_upload_id(text: &str) -> Result<UploadId, GatewayError> {
    UploadId::parse(text).map_err(|_| GatewayError::NoSuchUpload)
}

impl CairnS3 {
    pub(super) async fn create_multipart_upload_op(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        refuse_unoffered(
            Operation::NewObject,
            WithCopySource::No,
            &req.headers,
            &req.uri,
        )?;
        let requested = requested_lock(&req.headers, &req.uri, now_unix_ms())?;
        let input = req.input;
        let bucket = self.bucket(&input.bucket).await?;
        let settings = self
            .buckets
            .settings_of(&input.bucket, &bucket)
            .await
            .map_err(GatewayError::from)?;
        // Judged now so that a refused lock stores nothing.
        new_lock(requested, &settings, now_unix_ms())?;
        check_key(&input.key)?;
        let headers = with_upload_lock(stored_headers(header_fields!(input))?, requested)?;
        let upload = self
            .objects
            .create_upload(&input.bucket, &bucket.bucket_key_id, &input.key, headers)
            .await?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload.to_text()),
            server_side_encryption: sse_s3(),
            ..Default::default()
        }))
    }

    pub(super) async fn upload_part_op(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        refuse_unoffered(Operation::Part, WithCopySource::No, &req.headers, &req.uri)?;
        let checksum = ChecksumRequest::from_headers(&req.headers, req.trailing_headers.as_ref())?;
        let input = req.input;
        self.bucket(&input.bucket).await?;
        check_key(&input.key)?;
        let number = check_part_number(input.part_number)?;
        let upload = parse_upload_id(&input.upload_id)?;
        let content_md5 = parse_content_md5(input.content_md5.as_ref())?;
        let body = input.body.ok_or_else(|| {
            S3Error::with_message(S3ErrorCode::MissingContentLength, "a part needs a body")
        })?;
        let length = body_length(input.content_length, &body)?;
        let algorithm = checksum.as_ref().map(|c| c.algorithm);
        let (etag, sum) = self
            .objects
            .upload_part(
                &input.bucket,
                &input.key,
                &upload,
                number,
                length,
                content_md5,
                checksum,
                body,
            )
            .await?;
        let mut output = UploadPartOutput::default();
        match (algorithm, sum) {
            (Some(Algorithm::Crc32), sum) => output.checksum_crc32 = sum,
            (Some(Algorithm::Crc32c), sum) => output.checksum_crc32c = sum,
            (Some(Algorithm::Crc64Nvme), sum) => output.checksum_crc64nvme = sum,
            (Some(Algorithm::Sha1), sum) => output.checksum_sha1 = sum,
            (Some(Algorithm::Sha256), sum) => output.checksum_sha256 = sum,
            (None, _) => {}
        }
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(strong_etag(&etag)),
            server_side_encryption: sse_s3(),
            ..output
        }))
    }

    pub(super) async fn upload_part_copy_op(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        refuse_unoffered(Operation::Part, WithCopySource::Yes, &req.headers, &req.uri)?;
        let input = req.input;
        self.bucket(&input.bucket).await?;
        check_key(&input.key)?;
        let number = check_part_number(input.part_number)?;
        let upload = parse_upload_id(&input.upload_id)?;
        let source = self.copy_source(&input.copy_source).await?;
        check_copy_conditions(
            &source,
            input.copy_source_if_match.as_ref(),
            input.copy_source_if_none_match.as_ref(),
            input.copy_source_if_modified_since.as_ref(),
            input.copy_source_if_unmodified_since.as_ref(),
        )?;
        let VersionBody::Data { size_bytes, .. } = &source.body else {
            return Err(GatewayError::NoSuchKey.into());
        };
        let size = *size_bytes;
        let range = match &input.copy_source_range {
            None => 0..size,
            Some(text) => {
                let range = Range::parse(text).map_err(|_| {
                    GatewayError::InvalidArgument(format!(
                        "x-amz-copy-source-range {text:?} is not bytes=first-last"
                    ))
                })?;
                range
                    .check(size)
                    .map_err(|_| GatewayError::InvalidRange { size })?
            }
        };
        // Refusals that need no source byte come before any is read.
        check_body_length(range.end - range.start)?;
        self.objects
            .uploads()
            .get(&input.bucket, &input.key, &upload)
            .await
            .map_err(GatewayError::from)?;
        let open = self.objects.open(&source).await?;
        let body = self.source_stream(open, range.clone());
        let (etag, _) = self
            .objects
            .upload_part(
                &input.bucket,
                &input.key,
                &upload,
                number,
                range.end - range.start,
                None,
                None,
                body,
            )
            .await?;
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(strong_etag(&etag)),
                last_modified: Some(timestamp_of(cairn_node::clock::now_unix_ms())),
                ..Default::default()
            }),
            server_side_encryption: sse_s3(),
            ..Default::default()
        }))
    }

    pub(super) async fn complete_multipart_upload_op(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let input = req.input;
        let settings = self.settings(&input.bucket).await?;
        let versioning = settings.versioning;
        check_key(&input.key)?;
        let upload = parse_upload_id(&input.upload_id)?;
        let condition = write_condition(input.if_none_match.as_ref(), input.if_match.as_ref())?;
        let mut chosen = Vec::new();
        for part in input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default()
        {
            let number = check_part_number(part.part_number.unwrap_or(0))?;
            let checksum = [
                (Algorithm::Crc32, &part.checksum_crc32),
                (Algorithm::Crc32c, &part.checksum_crc32c),
                (Algorithm::Crc64Nvme, &part.checksum_crc64nvme),
                (Algorithm::Sha1, &part.checksum_sha1),
                (Algorithm::Sha256, &part.checksum_sha256),
            ]
            .into_iter()
            .find_map(|(algorithm, value)| value.clone().map(|v| (algorithm, v)));
            let etag = part
                .e_tag
                .map(|e| e.value().to_owned())
                .ok_or_else(|| GatewayError::InvalidPart(format!("part {number} has no ETag")))?;
            chosen.push(ChosenPart {
                number,
                etag,
                checksum,
            });
        }
        let version = self
            .objects
            .complete_upload(
                &input.bucket,
                &input.key,
                &upload,
                &chosen,
                &condition,
                &settings,
            )
            .await?;
        let VersionBody::Data { etag, headers, .. } = &version.body else {
            unreachable!("a completed upload writes data");
        };
        let sums = stored_checksums(headers);
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            checksum_crc32: sums.checksum_crc32,
            checksum_crc32c: sums.checksum_crc32c,
            checksum_crc64nvme: sums.checksum_crc64nvme,
            checksum_sha1: sums.checksum_sha1,
            checksum_sha256: sums.checksum_sha256,
            checksum_type: sums.checksum_type,
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            e_tag: Some(strong_etag(etag)),
            location: Some(format!("/{}/{}", input.bucket, input.key)),
            server_side_encryption: sse_s3(),
            version_id: written_version_id(&version, versioning),
            ..Default::default()
        }))
    }

    pub(super) async fn abort_multipart_upload_op(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let input = req.input;
        self.bucket(&input.bucket).await?;
        let upload = parse_upload_id(&input.upload_id)?;
        self.objects
            .uploads()
            .abort(&input.bucket, &input.key, &upload)
            .await
            .map_err(GatewayError::from)?;
        let mut response = S3Response::new(AbortMultipartUploadOutput::default());
        response.status = Some(http::StatusCode::NO_CONTENT);
        Ok(response)
    }

    pub(super) async fn list_parts_op(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        self.bucket(&input.bucket).await?;
        let upload = parse_upload_id(&input.upload_id)?;
        self.objects
            .uploads()
            .get(&input.bucket, &input.key, &upload)
            .await
            .map_err(GatewayError::from)?;
        let max = page_size(input.max_parts, "max-parts")?;
        let after = match input.part_number_marker {
            None => 0,
            Some(n) if n < 0 => {
                return Err(GatewayError::InvalidArgument(
                    "part-number-marker must not be negative".into(),
                )
                .into());
            }
            Some(n) => n as u32,
        };
        let page = self
            .objects
            .uploads()
            .list_parts(&input.bucket, &upload, after.min(MAX_PART_NUMBER), max)
            .await
            .map_err(GatewayError::from)?;
        let next = page.parts.last().map(|(n, _)| *n as i32);
        let parts = page
            .parts
            .iter()
            .map(|(number, part)| {
                let sum = |algorithm: Algorithm| {
                    part.checksum
                        .as_ref()
                        .filter(|(name, _)| name == algorithm.name())
                        .map(|(_, value)| value.clone())
                };
                s3s::dto::Part {
                    part_number: Some(*number as i32),
                    e_tag: Some(strong_etag(&part.etag)),
                    size: Some(part.plaintext_len as i64),
                    last_modified: Some(timestamp_of(part.uploaded_unix_ms)),
                    checksum_crc32: sum(Algorithm::Crc32),
                    checksum_crc32c: sum(Algorithm::Crc32c),
                    checksum_crc64nvme: sum(Algorithm::Crc64Nvme),
                    checksum_sha1: sum(Algorithm::Sha1),
                    checksum_sha256: sum(Algorithm::Sha256),
                }
            })
            .collect();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload.to_text()),
            max_parts: Some(max as i32),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: page.truncated.then_some(next).flatten(),
            is_truncated: Some(page.truncated),
            parts: Some(parts),
            ..Default::default()
        }))
    }

    pub(super) async fn list_multipart_uploads_op(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        self.bucket(&input.bucket).await?;
        let max = page_size(input.max_uploads, "max-uploads")?;
        let upload_marker = match input.upload_id_marker.as_deref() {
            None | Some("") => None,
            Some(text) => Some(parse_upload_id(text)?),
        };
        let prefix = input.prefix.clone().unwrap_or_default();
        let (uploads, truncated) = self
            .objects
            .uploads()
            .list_uploads(
                &input.bucket,
                &prefix,
                input.key_marker.as_deref().filter(|k| !k.is_empty()),
                upload_marker.as_ref(),
                max,
            )
            .await
            .map_err(GatewayError::from)?;
        let last = uploads
            .last()
            .map(|u| (u.key.clone(), u.record.upload.to_text()));
        let listed = uploads
            .into_iter()
            .map(|u| MultipartUpload {
                key: Some(u.key),
                upload_id: Some(u.record.upload.to_text()),
                initiated: Some(timestamp_of(u.record.started_unix_ms)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: Some(prefix),
            key_marker: input.key_marker,
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            next_key_marker: truncated.then(|| last.clone().map(|l| l.0)).flatten(),
            next_upload_id_marker: truncated.then(|| last.map(|l| l.1)).flatten(),
            uploads: Some(listed),
            ..Default::default()
        }))
    }
}
