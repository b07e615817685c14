//! The object operations: PUT (and POST), GET, HEAD, DELETE, DeleteObjects
//! and CopyObject, and how a request's key and version resolve to a stored
//! version and its bytes.

use cairn_protocol::version::{ObjectVersion, VersionBody};
use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

use super::CairnS3;
use super::conditions::{
    check_copy_conditions, check_read_conditions, delete_condition, write_condition,
};
use super::headers::{
    body_length, check_key, checksums_wanted, from_head, head_output, header_fields, last_modified,
    parse_content_md5, parse_version_ref, read_version_id, sse_s3, stored_checksums,
    stored_headers, strong_etag, with_typed_protections, written_version_id,
};
use super::locks::{RequestedLock, bypasses_governance, new_lock, requested_lock};
use crate::checksum::ChecksumRequest;
use crate::error::GatewayError;
use crate::objects::{NewObject, SettingsRead, WriteRules};
use crate::protections::{Operation, WithCopySource, refuse_unoffered};
use cairn_model::heads::{DeleteCondition, VersionRef, WriteCondition, version_id_text};
use cairn_node::clock::now_unix_ms;
use cairn_protocol::records::Versioning;

type ByteReceiver = tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>;

/// The largest piece of a GET's body handed to the connection at once: each
/// piece is progress for the connection's idle rule, so a client reading
/// slowly is not taken for one that stopped.
const BODY_PIECE_BYTES: usize = 256 << 10;

fn receiver_stream(
    receiver: ByteReceiver,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static {
    Box::pin(futures::stream::unfold(
        (receiver, bytes::Bytes::new()),
        |(mut receiver, mut rest)| async move {
            if rest.is_empty() {
                match receiver.recv().await? {
                    Ok(bytes) => rest = bytes,
                    Err(error) => return Some((Err(error), (receiver, rest))),
                }
            }
            let piece = rest.split_to(rest.len().min(BODY_PIECE_BYTES));
            Some((Ok(piece), (receiver, rest)))
        },
    ))
}

/// The answer to a read that finds a delete marker: 404 NoSuchKey when it
/// is the latest version, 405 MethodNotAllowed when the request named it;
/// both say `x-amz-delete-marker: true` and the marker's version id.
fn delete_marker_refusal(marker: &ObjectVersion, named: bool) -> S3Error {
    let mut refusal = if named {
        S3Error::with_message(
            S3ErrorCode::MethodNotAllowed,
            "The specified method is not allowed against a delete marker.",
        )
    } else {
        S3Error::with_message(S3ErrorCode::NoSuchKey, "The specified key does not exist.")
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "x-amz-delete-marker",
        http::HeaderValue::from_static("true"),
    );
    if let Ok(id) = http::HeaderValue::from_str(&version_id_text(marker)) {
        headers.insert("x-amz-version-id", id);
    }
    if named {
        let mut date = Vec::new();
        if last_modified(marker)
            .format(TimestampFormat::HttpDate, &mut date)
            .is_ok()
            && let Ok(value) = http::HeaderValue::from_bytes(&date)
        {
            headers.insert(http::header::LAST_MODIFIED, value);
        }
    }
    refusal.set_headers(headers);
    refusal
}

impl CairnS3 {
    /// The source of a copy: its version, resolved like a GET.
    pub(super) async fn copy_source(&self, source: &CopySource) -> S3Result<ObjectVersion> {
        let CopySource::Bucket {
            bucket,
            key,
            version_id,
        } = source
        else {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                "copy sources are bucket/key",
            ));
        };
        match self.resolve(bucket, key, version_id.as_deref()).await {
            Err(refusal) if *refusal.code() == S3ErrorCode::MethodNotAllowed => {
                Err(S3Error::with_message(
                    S3ErrorCode::InvalidRequest,
                    "The source of a copy request may not specifically refer to a delete marker by version id.",
                ))
            }
            other => other,
        }
    }

    pub(super) fn source_stream(
        &self,
        open: crate::objects::OpenObject,
        range: std::ops::Range<u64>,
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static
    {
        receiver_stream(self.objects.read(open, range))
    }

    async fn resolve(
        &self,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
    ) -> S3Result<ObjectVersion> {
        self.bucket(bucket).await?;
        check_key(key)?;
        let index = self.objects.index();
        let Some(text) = version_id else {
            return match index
                .latest(bucket, key)
                .await
                .map_err(GatewayError::from)?
            {
                Some(version) if matches!(version.body, VersionBody::Data { .. }) => Ok(version),
                Some(marker) => Err(delete_marker_refusal(&marker, false)),
                None => Err(GatewayError::NoSuchKey.into()),
            };
        };
        let wanted = parse_version_ref(text)?;
        match index
            .version(bucket, key, wanted)
            .await
            .map_err(GatewayError::from)?
        {
            Some(version) if matches!(version.body, VersionBody::Data { .. }) => Ok(version),
            Some(marker) => Err(delete_marker_refusal(&marker, true)),
            None => Err(GatewayError::NoSuchVersion.into()),
        }
    }

    pub(super) async fn put_object_op(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        // A browser POST's form fields reach here parsed, not as headers.
        let asked = with_typed_protections(&req.headers, &req.input);
        refuse_unoffered(Operation::NewObject, WithCopySource::No, &asked, &req.uri)?;
        let requested = requested_lock(&asked, &req.uri, now_unix_ms())?;
        let checksum = ChecksumRequest::from_headers(&req.headers, req.trailing_headers.as_ref())?;
        let input = req.input;
        let bucket = self.bucket(&input.bucket).await?;
        // The settings are read while the body is stored, unless the
        // request asks for a lock they may refuse (spec/versioning.md).
        let reading = {
            let (buckets, name, record) =
                (self.buckets.clone(), input.bucket.clone(), bucket.clone());
            async move {
                let settings = buckets
                    .settings_of(&name, &record)
                    .await
                    .map_err(GatewayError::from)?;
                let lock = new_lock(requested, &settings, now_unix_ms())?;
                Ok::<_, GatewayError>((settings.versioning, lock))
            }
        };
        let rules = if requested == RequestedLock::default() {
            WriteRules::Reading(SettingsRead(tokio::spawn(reading)))
        } else {
            let (versioning, lock) = reading.await?;
            WriteRules::Known(versioning, lock)
        };
        check_key(&input.key)?;
        let headers = stored_headers(header_fields!(input))?;
        let content_md5 = parse_content_md5(input.content_md5.as_ref())?;
        if requested != RequestedLock::default() && content_md5.is_none() && checksum.is_none() {
            return Err(GatewayError::InvalidRequest(
                "Content-MD5 OR x-amz-checksum- HTTP header is required for Put Object requests with Object Lock parameters".into(),
            )
            .into());
        }
        let condition = write_condition(input.if_none_match.as_ref(), input.if_match.as_ref())?;
        let body = input.body.ok_or_else(|| {
            S3Error::with_message(S3ErrorCode::MissingContentLength, "a PUT needs a body")
        })?;
        let length = body_length(input.content_length, &body)?;
        let (version, versioning) = self
            .objects
            .put(
                NewObject {
                    bucket: input.bucket.clone(),
                    bucket_key_id: bucket.bucket_key_id,
                    key: input.key.clone(),
                    headers,
                    length,
                    content_md5,
                    checksum,
                    condition,
                    rules,
                },
                body,
            )
            .await?;
        let VersionBody::Data { etag, headers, .. } = &version.body else {
            unreachable!("a PUT writes data");
        };
        let sums = stored_checksums(headers);
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(strong_etag(etag)),
            checksum_crc32: sums.checksum_crc32,
            checksum_crc32c: sums.checksum_crc32c,
            checksum_crc64nvme: sums.checksum_crc64nvme,
            checksum_sha1: sums.checksum_sha1,
            checksum_sha256: sums.checksum_sha256,
            server_side_encryption: sse_s3(),
            version_id: written_version_id(&version, versioning),
            ..Default::default()
        }))
    }

    pub(super) async fn get_object_op(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        refuse_unoffered(Operation::Read, WithCopySource::No, &req.headers, &req.uri)?;
        let input = req.input;
        let version = self
            .resolve(&input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        check_read_conditions(
            &version,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        let VersionBody::Data { size_bytes, .. } = &version.body else {
            return Err(GatewayError::NoSuchKey.into());
        };
        let size = *size_bytes;
        let (range, content_range) = match &input.range {
            None => (0..size, None),
            Some(range) => {
                let r = range
                    .check(size)
                    .map_err(|_| GatewayError::InvalidRange { size })?;
                let text = format!("bytes {}-{}/{size}", r.start, r.end - 1);
                (r, Some(text))
            }
        };
        let open = self.objects.open(&version).await?;
        let stream = self.source_stream(open, range.clone());
        // A checksum covers the whole object: a range is sent without it.
        let head = head_output(
            &version,
            checksums_wanted(input.checksum_mode.as_ref()) && input.range.is_none(),
        );
        let mut output = from_head!(
            head,
            GetObjectOutput {
                body: Some(StreamingBlob::wrap(stream)),
                content_length: Some((range.end - range.start) as i64),
                content_range,
                ..Default::default()
            }
        );
        // The response-* query parameters override what was stored.
        if let Some(v) = input.response_content_type {
            output.content_type = Some(v);
        }
        if let Some(v) = input.response_cache_control {
            output.cache_control = Some(v);
        }
        if let Some(v) = input.response_content_disposition {
            output.content_disposition = Some(v);
        }
        if let Some(v) = input.response_content_encoding {
            output.content_encoding = Some(v);
        }
        if let Some(v) = input.response_content_language {
            output.content_language = Some(v);
        }
        if let Some(v) = input.response_expires {
            output.expires = Some(v);
        }
        let mut response = S3Response::new(output);
        if input.range.is_some() {
            response.status = Some(http::StatusCode::PARTIAL_CONTENT);
        }
        Ok(response)
    }

    pub(super) async fn head_object_op(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        refuse_unoffered(Operation::Read, WithCopySource::No, &req.headers, &req.uri)?;
        let input = req.input;
        let version = self
            .resolve(&input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        check_read_conditions(
            &version,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        Ok(S3Response::new(head_output(
            &version,
            checksums_wanted(input.checksum_mode.as_ref()),
        )))
    }

    /// Deletes what a DELETE names: with a version id in a bucket that
    /// keeps history, that version, permanently; otherwise the current
    /// object (a delete marker where the bucket keeps history). The answer
    /// is the version id deleted or written and whether it is a marker.
    async fn delete_one(
        &self,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
        condition: DeleteCondition,
        versioning: Versioning,
        bypass_governance: bool,
    ) -> Result<(Option<String>, bool), GatewayError> {
        check_key(key)?;
        let index = self.objects.index();
        match (version_id, versioning) {
            (Some(text), Versioning::Enabled | Versioning::Suspended) => {
                let wanted = parse_version_ref(text)?;
                let condition = DeleteCondition {
                    version: None,
                    ..condition
                };
                let deleted = index
                    .delete_version(bucket, key, wanted, &condition, bypass_governance)
                    .await?;
                let marker = deleted.is_some_and(|v| v.body == VersionBody::DeleteMarker);
                let id = match wanted {
                    VersionRef::Null => "null".to_owned(),
                    VersionRef::Id(id) => id.to_text(),
                };
                Ok((Some(id), marker))
            }
            (version_id, _) => {
                let marker = index
                    .delete(bucket, key, &condition, versioning)
                    .await?
                    .marker;
                Ok(match marker {
                    Some(marker) => (Some(version_id_text(&marker)), true),
                    None => (version_id.map(str::to_owned), false),
                })
            }
        }
    }

    pub(super) async fn delete_object_op(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let bypass = self
            .bypass(
                req.credentials.as_ref(),
                bypasses_governance(&req.headers, &req.uri),
            )
            .await?;
        let input = req.input;
        let versioning = self.versioning(&input.bucket).await?;
        // Deleting a key that does not exist succeeds, as in S3.
        let condition = delete_condition(
            input.version_id.as_deref(),
            input.if_match.as_ref(),
            input.if_match_size,
            input.if_match_last_modified_time.as_ref(),
        )?;
        let (version_id, marker) = self
            .delete_one(
                &input.bucket,
                &input.key,
                input.version_id.as_deref(),
                condition,
                versioning,
                bypass,
            )
            .await?;
        let mut response = S3Response::new(DeleteObjectOutput {
            version_id,
            delete_marker: marker.then_some(true),
            ..Default::default()
        });
        response.status = Some(http::StatusCode::NO_CONTENT);
        Ok(response)
    }

    pub(super) async fn delete_objects_op(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let bypass = self
            .bypass(
                req.credentials.as_ref(),
                bypasses_governance(&req.headers, &req.uri),
            )
            .await?;
        let input = req.input;
        let versioning = self.versioning(&input.bucket).await?;
        if input.delete.objects.len() > 1000 {
            return Err(S3Error::with_message(
                S3ErrorCode::MalformedXML,
                "a DeleteObjects request names at most 1000 keys",
            ));
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for object in input.delete.objects {
            let outcome = match delete_condition(
                object.version_id.as_deref(),
                object
                    .e_tag
                    .as_ref()
                    .map(|etag| ETagCondition::ETag(etag.clone()))
                    .as_ref(),
                object.size,
                object.last_modified_time.as_ref(),
            ) {
                Ok(condition) => {
                    self.delete_one(
                        &input.bucket,
                        &object.key,
                        object.version_id.as_deref(),
                        condition,
                        versioning,
                        bypass,
                    )
                    .await
                }
                Err(error) => Err(error),
            };
            match outcome {
                Ok((version_id, marker)) if !quiet => {
                    // A marker written is named apart from the version the
                    // request named.
                    let (version_id, marker_version_id) = match &object.version_id {
                        None if marker => (None, version_id),
                        // A marker deleted by id is named twice, as in S3.
                        Some(_) if marker => (version_id.clone(), version_id),
                        _ => (version_id, None),
                    };
                    deleted.push(DeletedObject {
                        key: Some(object.key),
                        version_id,
                        delete_marker: marker.then_some(true),
                        delete_marker_version_id: marker_version_id,
                    })
                }
                Ok(_) => {}
                Err(error) => {
                    let s3: S3Error = error.into();
                    errors.push(Error {
                        code: Some(s3.code().as_str().to_owned()),
                        key: Some(object.key),
                        message: s3.message().map(str::to_owned),
                        version_id: object.version_id,
                    });
                }
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    pub(super) async fn copy_object_op(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        refuse_unoffered(
            Operation::NewObject,
            WithCopySource::Yes,
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
        let versioning = settings.versioning;
        let lock = new_lock(requested, &settings, now_unix_ms())?;
        check_key(&input.key)?;
        let source = self.copy_source(&input.copy_source).await?;
        check_copy_conditions(
            &source,
            input.copy_source_if_match.as_ref(),
            input.copy_source_if_none_match.as_ref(),
            input.copy_source_if_modified_since.as_ref(),
            input.copy_source_if_unmodified_since.as_ref(),
        )?;
        let VersionBody::Data {
            size_bytes,
            headers: source_headers,
            ..
        } = &source.body
        else {
            return Err(GatewayError::NoSuchKey.into());
        };
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        // Copying a key's older version onto it is how S3 restores one;
        // a bucket that keeps no history has no other version.
        let same_version = source.bucket == input.bucket && source.key == input.key && {
            let CopySource::Bucket { version_id, .. } = &input.copy_source else {
                unreachable!("copy_source refuses the others");
            };
            version_id.is_none() || versioning == Versioning::Unversioned
        };
        if !replace && same_version {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidRequest,
                "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata, storage class, website redirect location or encryption attributes.",
            ));
        }
        let headers = if replace {
            stored_headers(header_fields!(input))?
        } else {
            source_headers.clone()
        };
        let open = self.objects.open(&source).await?;
        let body = self.source_stream(open, 0..*size_bytes);
        let (version, _) = self
            .objects
            .put(
                NewObject {
                    bucket: input.bucket.clone(),
                    bucket_key_id: bucket.bucket_key_id,
                    key: input.key.clone(),
                    headers,
                    length: *size_bytes,
                    content_md5: None,
                    checksum: None,
                    condition: WriteCondition::Always,
                    rules: WriteRules::Known(versioning, lock),
                },
                body,
            )
            .await?;
        let VersionBody::Data { etag, .. } = &version.body else {
            unreachable!("a copy writes data");
        };
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(strong_etag(etag)),
                last_modified: Some(last_modified(&version)),
                ..Default::default()
            }),
            server_side_encryption: sse_s3(),
            version_id: written_version_id(&version, versioning),
            copy_source_version_id: read_version_id(&source),
            ..Default::default()
        }))
    }
}
