//! The S3 operations: s3s parses and authenticates a request, and each
//! method here maps it onto buckets and the data path, answering every
//! failure with the error code an S3 client expects.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use cairn_node::meta::listing::{ListPage, ListRequest, ListStart};
use cairn_protocol::ids::{UploadId, VersionId};
use cairn_protocol::manifest::MAX_KEY_BYTES;
use cairn_protocol::meta::prefix_end;
use cairn_protocol::version::{ObjectVersion, StoredHeaders, VersionBody};
use s3s::dto::*;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

use crate::buckets::Buckets;
use crate::checksum::{Algorithm, ChecksumRequest};
use crate::error::GatewayError;
use crate::multipart::{ChosenPart, MAX_PART_NUMBER, check_part_number};
use crate::objects::{DeleteCondition, NewObject, ObjectStore, WriteCondition};
use crate::protections::{Operation, WithCopySource, refuse_unoffered};

/// User metadata (`x-amz-meta-*` names and values) per object, as in S3.
pub const MAX_USER_METADATA_BYTES: usize = 2 << 10;
/// The region this gateway answers for.
pub const DEFAULT_REGION: &str = "us-east-1";

impl From<GatewayError> for S3Error {
    fn from(error: GatewayError) -> Self {
        use S3ErrorCode as C;
        let code = match &error {
            GatewayError::NoSuchBucket(_) => C::NoSuchBucket,
            GatewayError::NoSuchKey => C::NoSuchKey,
            GatewayError::NoSuchVersion => C::NoSuchVersion,
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

/// The S3 service of one gateway.
#[derive(Clone)]
pub struct CairnS3 {
    pub(crate) buckets: Buckets,
    pub(crate) objects: ObjectStore,
    pub(crate) region: String,
}

fn owner_of<T>(req: &S3Request<T>) -> String {
    req.credentials
        .as_ref()
        .map(|c| c.access_key.clone())
        .unwrap_or_default()
}

fn check_key(key: &str) -> Result<(), GatewayError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(GatewayError::KeyTooLong(format!(
            "an object key is 1 to {MAX_KEY_BYTES} bytes; this one has {}",
            key.len()
        )));
    }
    // A key names its head register, which must never contain a zero byte.
    if key.contains('\0') {
        return Err(GatewayError::InvalidArgument(
            "an object key cannot contain the NUL character".into(),
        ));
    }
    Ok(())
}

/// The precondition of a write from If-None-Match and If-Match.
fn write_condition(
    if_none_match: Option<&ETagCondition>,
    if_match: Option<&ETagCondition>,
) -> Result<WriteCondition, GatewayError> {
    match (if_none_match, if_match) {
        (None, None) => Ok(WriteCondition::Always),
        (Some(ETagCondition::Any), None) => Ok(WriteCondition::IfAbsent),
        (Some(ETagCondition::ETag(_)), None) => Err(GatewayError::InvalidArgument(
            "If-None-Match on a write takes only *".into(),
        )),
        (None, Some(ETagCondition::Any)) => Ok(WriteCondition::IfPresent),
        (None, Some(ETagCondition::ETag(etag))) => {
            Ok(WriteCondition::IfMatch(etag.value().to_owned()))
        }
        (Some(_), Some(_)) => Err(GatewayError::InvalidArgument(
            "a write takes If-None-Match or If-Match, not both".into(),
        )),
    }
}

/// The preconditions of a DELETE (If-Match and its size and time
/// companions, or their fields in a DeleteObjects entry).
fn delete_condition(
    version_id: Option<&str>,
    if_match: Option<&ETagCondition>,
    size: Option<i64>,
    last_modified: Option<&Timestamp>,
) -> Result<DeleteCondition, GatewayError> {
    let size_bytes = size
        .map(|size| {
            u64::try_from(size)
                .map_err(|_| GatewayError::InvalidArgument(format!("size {size} is negative")))
        })
        .transpose()?;
    Ok(DeleteCondition {
        if_present: matches!(if_match, Some(ETagCondition::Any)),
        etag: match if_match {
            Some(ETagCondition::ETag(etag)) => Some(etag.value().to_owned()),
            _ => None,
        },
        size_bytes,
        last_modified_unix_s: last_modified
            .map(|t| time::OffsetDateTime::from(t.clone()).unix_timestamp()),
        version: version_id.map(parse_version_id).transpose()?.flatten(),
    })
}

/// A request's `versionId`: `None` for "null", the version every object of
/// a bucket without versioning has (its current one).
fn parse_version_id(text: &str) -> Result<Option<VersionId>, GatewayError> {
    if text == "null" {
        return Ok(None);
    }
    VersionId::parse(text)
        .map(Some)
        .map_err(|_| GatewayError::InvalidArgument(format!("invalid version id {text:?}")))
}

fn timestamp_of(unix_ms: u64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(unix_ms))
}

fn last_modified(version: &ObjectVersion) -> Timestamp {
    timestamp_of(version.created.hlc.unix_ms())
}

fn strong_etag(quoted: &str) -> ETag {
    ETag::Strong(quoted.trim_matches('"').to_owned())
}

/// The headers a request sets on the object it writes.
struct HeaderFields<'a> {
    content_type: Option<&'a String>,
    cache_control: Option<&'a String>,
    content_disposition: Option<&'a String>,
    content_encoding: Option<&'a String>,
    content_language: Option<&'a String>,
    expires: Option<&'a Timestamp>,
    website_redirect_location: Option<&'a String>,
    metadata: Option<&'a Metadata>,
}

macro_rules! header_fields {
    ($input:expr) => {
        HeaderFields {
            content_type: $input.content_type.as_ref(),
            cache_control: $input.cache_control.as_ref(),
            content_disposition: $input.content_disposition.as_ref(),
            content_encoding: $input.content_encoding.as_ref(),
            content_language: $input.content_language.as_ref(),
            expires: $input.expires.as_ref(),
            website_redirect_location: $input.website_redirect_location.as_ref(),
            metadata: $input.metadata.as_ref(),
        }
    };
}

/// The headers stored with an object: the standard ones the request sent,
/// its user metadata, and how it is encrypted.
fn stored_headers(fields: HeaderFields<'_>) -> Result<StoredHeaders, GatewayError> {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut push = |name: &str, value: Option<&String>| {
        if let Some(value) = value {
            headers.push((name.to_owned(), value.clone()));
        }
    };
    push("content-type", fields.content_type);
    push("cache-control", fields.cache_control);
    push("content-disposition", fields.content_disposition);
    push("content-encoding", fields.content_encoding);
    push("content-language", fields.content_language);
    push(
        "x-amz-website-redirect-location",
        fields.website_redirect_location,
    );
    let expires = fields.expires.and_then(|t| {
        let mut out = Vec::new();
        t.format(TimestampFormat::HttpDate, &mut out).ok()?;
        String::from_utf8(out).ok()
    });
    push("expires", expires.as_ref());
    push("x-amz-server-side-encryption", Some(&"AES256".to_owned()));
    if let Some(metadata) = fields.metadata {
        let size: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > MAX_USER_METADATA_BYTES {
            return Err(GatewayError::MetadataTooLarge(format!(
                "user metadata takes {size} bytes; at most {MAX_USER_METADATA_BYTES} are allowed"
            )));
        }
        for (name, value) in metadata {
            headers.push((
                format!("x-amz-meta-{}", name.to_ascii_lowercase()),
                value.clone(),
            ));
        }
    }
    StoredHeaders::new(headers).map_err(|e| GatewayError::MetadataTooLarge(e.to_string()))
}

/// The full-object checksum stored with an object, if it has one.
fn stored_checksums(headers: &StoredHeaders) -> Checksum {
    let value = |algorithm: Algorithm| headers.get(algorithm.header()).map(str::to_owned);
    Checksum {
        checksum_crc32: value(Algorithm::Crc32),
        checksum_crc32c: value(Algorithm::Crc32c),
        checksum_crc64nvme: value(Algorithm::Crc64Nvme),
        checksum_sha1: value(Algorithm::Sha1),
        checksum_sha256: value(Algorithm::Sha256),
        checksum_type: headers
            .get("x-amz-checksum-type")
            .map(|t| ChecksumType::from(t.to_owned())),
    }
}

/// What GET and HEAD both answer for a data version; `checksums` adds the
/// stored full-object checksum.
fn head_output(version: &ObjectVersion, checksums: bool) -> HeadObjectOutput {
    let VersionBody::Data {
        size_bytes,
        etag,
        headers,
        ..
    } = &version.body
    else {
        return HeadObjectOutput::default();
    };
    let header = |name: &str| headers.get(name).map(str::to_owned);
    let sums = if checksums {
        stored_checksums(headers)
    } else {
        Checksum::default()
    };
    HeadObjectOutput {
        content_length: Some(*size_bytes as i64),
        accept_ranges: Some("bytes".into()),
        e_tag: Some(strong_etag(etag)),
        last_modified: Some(last_modified(version)),
        metadata: user_metadata(headers),
        content_type: header("content-type"),
        cache_control: header("cache-control"),
        content_disposition: header("content-disposition"),
        content_encoding: header("content-encoding"),
        content_language: header("content-language"),
        website_redirect_location: header("x-amz-website-redirect-location"),
        expires: header("expires")
            .and_then(|e| Timestamp::parse(TimestampFormat::HttpDate, &e).ok()),
        server_side_encryption: Some(ServerSideEncryption::from_static(
            ServerSideEncryption::AES256,
        )),
        checksum_crc32: sums.checksum_crc32,
        checksum_crc32c: sums.checksum_crc32c,
        checksum_crc64nvme: sums.checksum_crc64nvme,
        checksum_sha1: sums.checksum_sha1,
        checksum_sha256: sums.checksum_sha256,
        checksum_type: sums.checksum_type,
        ..Default::default()
    }
}

/// A GET answer with every field it shares with `head`, plus `extra`.
macro_rules! from_head {
    ($head:expr, GetObjectOutput { $($extra:tt)* }) => {{
        let head = $head;
        GetObjectOutput {
            accept_ranges: head.accept_ranges,
            e_tag: head.e_tag,
            last_modified: head.last_modified,
            metadata: head.metadata,
            content_type: head.content_type,
            cache_control: head.cache_control,
            content_disposition: head.content_disposition,
            content_encoding: head.content_encoding,
            content_language: head.content_language,
            website_redirect_location: head.website_redirect_location,
            expires: head.expires,
            server_side_encryption: head.server_side_encryption,
            checksum_crc32: head.checksum_crc32,
            checksum_crc32c: head.checksum_crc32c,
            checksum_crc64nvme: head.checksum_crc64nvme,
            checksum_sha1: head.checksum_sha1,
            checksum_sha256: head.checksum_sha256,
            checksum_type: head.checksum_type,
            $($extra)*
        }
    }};
}

fn checksums_wanted(mode: Option<&ChecksumMode>) -> bool {
    mode.is_some_and(|m| m.as_str().eq_ignore_ascii_case(ChecksumMode::ENABLED))
}

fn user_metadata(headers: &StoredHeaders) -> Option<Metadata> {
    let metadata: Metadata = headers
        .iter()
        .filter_map(|(n, v)| Some((n.strip_prefix("x-amz-meta-")?.to_owned(), v.to_owned())))
        .collect();
    (!metadata.is_empty()).then_some(metadata)
}

fn parse_content_md5(value: Option<&String>) -> Result<Option<[u8; 16]>, GatewayError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| GatewayError::InvalidDigest("Content-MD5 is not valid base64".into()))?;
    let digest: [u8; 16] = bytes
        .try_into()
        .map_err(|_| GatewayError::InvalidDigest("Content-MD5 is not 16 bytes".into()))?;
    Ok(Some(digest))
}

/// RFC 9110's order: If-Match, else If-Unmodified-Since; then
/// If-None-Match, else If-Modified-Since.
fn check_read_conditions(
    version: &ObjectVersion,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
    if_modified_since: Option<&Timestamp>,
    if_unmodified_since: Option<&Timestamp>,
) -> Result<(), GatewayError> {
    let VersionBody::Data { etag, .. } = &version.body else {
        return Ok(());
    };
    let ours = strong_etag(etag);
    let matches = |condition: &ETagCondition| match condition {
        ETagCondition::Any => true,
        ETagCondition::ETag(theirs) => theirs.value() == ours.value(),
    };
    // Whole seconds: HTTP dates carry no more.
    let modified_secs = (version.created.hlc.unix_ms() / 1000) as i64;
    let secs = |t: &Timestamp| time::OffsetDateTime::from(t.clone()).unix_timestamp();
    match (if_match, if_unmodified_since) {
        (Some(condition), _) if !matches(condition) => {
            return Err(GatewayError::PreconditionFailed);
        }
        (None, Some(since)) if modified_secs > secs(since) => {
            return Err(GatewayError::PreconditionFailed);
        }
        _ => {}
    }
    match (if_none_match, if_modified_since) {
        (Some(condition), _) if matches(condition) => return Err(GatewayError::NotModified),
        (None, Some(since)) if modified_secs <= secs(since) => {
            return Err(GatewayError::NotModified);
        }
        _ => {}
    }
    Ok(())
}

/// Percent-encodes a key for `encoding-type=url` (everything but
/// unreserved characters and `/`).
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn encode_token(resume: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(resume)
}

fn decode_token(token: &str) -> Result<Vec<u8>, GatewayError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .filter(|bytes| bytes.len() <= MAX_KEY_BYTES + 17)
        .ok_or_else(|| {
            GatewayError::InvalidArgument("The continuation token provided is incorrect".into())
        })
}

/// Keys in one S3 listing page at most.
pub const MAX_KEYS: usize = 1000;

fn max_keys(requested: Option<i32>) -> Result<usize, GatewayError> {
    match requested {
        None => Ok(MAX_KEYS),
        Some(n) if n < 0 => Err(GatewayError::InvalidArgument(
            "max-keys must not be negative".into(),
        )),
        Some(n) => Ok((n as usize).min(MAX_KEYS)),
    }
}

fn listed_objects(page: &ListPage, url: bool) -> (Vec<Object>, Vec<CommonPrefix>) {
    let encode = |key: &str| if url { url_encode(key) } else { key.to_owned() };
    let objects = page
        .entries
        .iter()
        .filter_map(|version| {
            let VersionBody::Data {
                size_bytes, etag, ..
            } = &version.body
            else {
                return None;
            };
            Some(Object {
                key: Some(encode(&version.key)),
                size: Some(*size_bytes as i64),
                e_tag: Some(strong_etag(etag)),
                last_modified: Some(last_modified(version)),
                storage_class: Some(ObjectStorageClass::from_static(
                    ObjectStorageClass::STANDARD,
                )),
                ..Default::default()
            })
        })
        .collect();
    let prefixes = page
        .common_prefixes
        .iter()
        .map(|p| CommonPrefix {
            prefix: Some(encode(p)),
        })
        .collect();
    (objects, prefixes)
}

fn wants_url(encoding: Option<&EncodingType>) -> Result<bool, GatewayError> {
    match encoding.map(|e| e.as_str()) {
        None => Ok(false),
        Some("url") => Ok(true),
        Some(other) => Err(GatewayError::InvalidArgument(format!(
            "encoding-type {other:?} is not supported; use url"
        ))),
    }
}

fn body_length(content_length: Option<i64>, body: &StreamingBlob) -> S3Result<u64> {
    match content_length {
        Some(length) if length >= 0 => Ok(length as u64),
        _ => {
            use s3s::stream::ByteStream;
            body.remaining_length()
                .exact()
                .map(|l| l as u64)
                .ok_or_else(|| {
                    S3Error::with_message(
                        S3ErrorCode::MissingContentLength,
                        "send Content-Length (or x-amz-decoded-content-length)",
                    )
                })
        }
    }
}

type ByteReceiver = tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>;

fn receiver_stream(
    receiver: ByteReceiver,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static {
    Box::pin(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) },
    ))
}

fn parse_upload_id(text: &str) -> Result<UploadId, GatewayError> {
    UploadId::parse(text).map_err(|_| GatewayError::NoSuchUpload)
}

/// The conditions on a copy's source: any that fails is PreconditionFailed.
fn check_copy_conditions(
    version: &ObjectVersion,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
    if_modified_since: Option<&Timestamp>,
    if_unmodified_since: Option<&Timestamp>,
) -> Result<(), GatewayError> {
    match check_read_conditions(
        version,
        if_match,
        if_none_match,
        if_modified_since,
        if_unmodified_since,
    ) {
        Err(GatewayError::NotModified) => Err(GatewayError::PreconditionFailed),
        other => other,
    }
}

/// The request's headers with the protections its parsed input asks for
/// added under their header names: s3s parses a POST Object's form fields
/// into the same input a PUT's headers give.
fn with_typed_protections(headers: &http::HeaderMap, input: &PutObjectInput) -> http::HeaderMap {
    let mut asked = headers.clone();
    let retain_until = input
        .object_lock_retain_until_date
        .as_ref()
        .map(|_| "set".to_owned());
    let fields = [
        (
            "x-amz-server-side-encryption",
            input
                .server_side_encryption
                .as_ref()
                .map(|v| v.as_str().to_owned()),
        ),
        (
            "x-amz-server-side-encryption-aws-kms-key-id",
            input.ssekms_key_id.clone(),
        ),
        (
            "x-amz-server-side-encryption-context",
            input.ssekms_encryption_context.clone(),
        ),
        (
            "x-amz-server-side-encryption-customer-algorithm",
            input.sse_customer_algorithm.clone(),
        ),
        (
            "x-amz-server-side-encryption-customer-key",
            input.sse_customer_key.clone(),
        ),
        (
            "x-amz-server-side-encryption-customer-key-md5",
            input.sse_customer_key_md5.clone(),
        ),
        (
            "x-amz-object-lock-mode",
            input
                .object_lock_mode
                .as_ref()
                .map(|v| v.as_str().to_owned()),
        ),
        ("x-amz-object-lock-retain-until-date", retain_until),
        (
            "x-amz-object-lock-legal-hold",
            input
                .object_lock_legal_hold_status
                .as_ref()
                .map(|v| v.as_str().to_owned()),
        ),
    ];
    for (name, value) in fields {
        if let Some(value) = value
            && !asked.contains_key(name)
            && let Ok(value) = http::HeaderValue::from_str(&value)
        {
            asked.insert(name, value);
        }
    }
    asked
}

impl CairnS3 {
    /// The source of a copy: its version, resolved like a GET.
    async fn copy_source(&self, source: &CopySource) -> S3Result<ObjectVersion> {
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
        self.resolve(bucket, key, version_id.as_deref()).await
    }

    fn source_stream(
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
        self.buckets.get(bucket).await?;
        check_key(key)?;
        let wanted = version_id.map(parse_version_id).transpose()?.flatten();
        let current = self.objects.current(bucket, key).await?;
        // The bucket keeps no history: the current object is the only
        // version there is (a row left below it is on its way out).
        match (wanted, current) {
            (None, Some(current)) => Ok(current),
            (None, None) => Err(GatewayError::NoSuchKey.into()),
            (Some(wanted), Some(current)) if current.version == wanted => Ok(current),
            (Some(_), _) => Err(GatewayError::NoSuchVersion.into()),
        }
    }

    /// One page of ListObjects (V1 or V2); S3 answers max-keys 0 with an
    /// empty page.
    async fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<String>,
        start: ListStart,
        max_keys: usize,
    ) -> Result<ListPage, GatewayError> {
        if max_keys == 0 {
            return Ok(ListPage {
                entries: Vec::new(),
                common_prefixes: Vec::new(),
                resume: None,
            });
        }
        let request = ListRequest {
            prefix: prefix.to_owned(),
            delimiter,
            start,
            max_keys,
        };
        Ok(self
            .objects
            .node()
            .metadata()
            .list_objects(bucket, &request)
            .await?)
    }
}

#[async_trait::async_trait]
impl S3 for CairnS3 {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let owner = owner_of(&req);
        let buckets = self
            .buckets
            .list()
            .await?
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

    async fn create_bucket(
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
        self.buckets.create(&req.input.bucket, &owner).await?;
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{}", req.input.bucket)),
        }))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.buckets.get(&req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput {
            bucket_region: Some(self.region.clone()),
            ..Default::default()
        }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.buckets.delete(&req.input.bucket).await?;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.buckets.get(&req.input.bucket).await?;
        // us-east-1 is spelt as no constraint, as S3 does.
        let constraint = (self.region != DEFAULT_REGION)
            .then(|| BucketLocationConstraint::from(self.region.clone()));
        Ok(S3Response::new(GetBucketLocationOutput {
            location_constraint: constraint,
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        // A browser POST's form fields reach here parsed, not as headers.
        let asked = with_typed_protections(&req.headers, &req.input);
        refuse_unoffered(Operation::NewObject, WithCopySource::No, &asked, &req.uri)?;
        let checksum = ChecksumRequest::from_headers(&req.headers, req.trailing_headers.as_ref())?;
        let input = req.input;
        let bucket = self.buckets.get(&input.bucket).await?;
        check_key(&input.key)?;
        let headers = stored_headers(header_fields!(input))?;
        let content_md5 = parse_content_md5(input.content_md5.as_ref())?;
        let condition = write_condition(input.if_none_match.as_ref(), input.if_match.as_ref())?;
        let body = input.body.ok_or_else(|| {
            S3Error::with_message(S3ErrorCode::MissingContentLength, "a PUT needs a body")
        })?;
        let length = body_length(input.content_length, &body)?;
        let version = self
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
            server_side_encryption: Some(ServerSideEncryption::from_static(
                ServerSideEncryption::AES256,
            )),
            ..Default::default()
        }))
    }

    async fn get_object(
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

    async fn head_object(
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

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let input = req.input;
        self.buckets.get(&input.bucket).await?;
        check_key(&input.key)?;
        // Deleting a key that does not exist succeeds, as in S3.
        let condition = delete_condition(
            input.version_id.as_deref(),
            input.if_match.as_ref(),
            input.if_match_size,
            input.if_match_last_modified_time.as_ref(),
        )?;
        self.objects
            .delete(&input.bucket, &input.key, &condition)
            .await?;
        let mut response = S3Response::new(DeleteObjectOutput {
            version_id: input.version_id,
            ..Default::default()
        });
        response.status = Some(http::StatusCode::NO_CONTENT);
        Ok(response)
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        self.buckets.get(&input.bucket).await?;
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
            let outcome = match check_key(&object.key) {
                Ok(()) => match delete_condition(
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
                        self.objects
                            .delete(&input.bucket, &object.key, &condition)
                            .await
                    }
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            match outcome {
                Ok(()) if !quiet => deleted.push(DeletedObject {
                    key: Some(object.key),
                    version_id: object.version_id,
                    ..Default::default()
                }),
                Ok(()) => {}
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

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        self.buckets.get(&input.bucket).await?;
        let url = wants_url(input.encoding_type.as_ref())?;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let start = match (&input.continuation_token, &input.start_after) {
            (Some(token), _) => ListStart::Resume(decode_token(token)?),
            (None, Some(after)) if !after.is_empty() => ListStart::AfterKey(after.clone()),
            _ => ListStart::Beginning,
        };
        let page = self
            .list_page(&input.bucket, &prefix, input.delimiter.clone(), start, max)
            .await?;
        let (contents, common_prefixes) = listed_objects(&page, url);
        let encode = |text: String| if url { url_encode(&text) } else { text };
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(encode(prefix)),
            delimiter: input.delimiter.map(encode),
            max_keys: Some(max as i32),
            key_count: Some((contents.len() + common_prefixes.len()) as i32),
            is_truncated: Some(page.resume.is_some()),
            continuation_token: input.continuation_token,
            next_continuation_token: page.resume.as_deref().map(encode_token),
            start_after: input.start_after.map(encode),
            encoding_type: input.encoding_type,
            contents: Some(contents),
            common_prefixes: Some(common_prefixes),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        self.buckets.get(&input.bucket).await?;
        let url = wants_url(input.encoding_type.as_ref())?;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let start = match &input.marker {
            Some(marker) if !marker.is_empty() => match &delimiter {
                // A marker that is a common prefix skips everything under it.
                Some(d) if marker.ends_with(d.as_str()) && marker.starts_with(&prefix) => {
                    match prefix_end(marker.as_bytes()) {
                        Some(end) => ListStart::Resume(end),
                        None => ListStart::AfterKey(marker.clone()),
                    }
                }
                _ => ListStart::AfterKey(marker.clone()),
            },
            _ => ListStart::Beginning,
        };
        let page = self
            .list_page(&input.bucket, &prefix, delimiter, start, max)
            .await?;
        // V1 has no token: the next marker is the last key or prefix listed.
        let next_marker = page.resume.as_ref().and_then(|_| {
            let last_key = page.entries.last().map(|v| v.key.clone());
            let last_prefix = page.common_prefixes.last().cloned();
            last_key.max(last_prefix)
        });
        let (contents, common_prefixes) = listed_objects(&page, url);
        let encode = |text: String| if url { url_encode(&text) } else { text };
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(encode(prefix)),
            marker: input.marker.map(encode),
            delimiter: input.delimiter.map(encode),
            max_keys: Some(max as i32),
            is_truncated: Some(page.resume.is_some()),
            next_marker: next_marker.map(encode),
            encoding_type: input.encoding_type,
            contents: Some(contents),
            common_prefixes: Some(common_prefixes),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        refuse_unoffered(
            Operation::NewObject,
            WithCopySource::Yes,
            &req.headers,
            &req.uri,
        )?;
        let input = req.input;
        let bucket = self.buckets.get(&input.bucket).await?;
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
        if !replace && source.bucket == input.bucket && source.key == input.key {
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
        let version = self
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
            server_side_encryption: Some(ServerSideEncryption::from_static(
                ServerSideEncryption::AES256,
            )),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        refuse_unoffered(
            Operation::NewObject,
            WithCopySource::No,
            &req.headers,
            &req.uri,
        )?;
        let input = req.input;
        let bucket = self.buckets.get(&input.bucket).await?;
        check_key(&input.key)?;
        let headers = stored_headers(header_fields!(input))?;
        let upload = self
            .objects
            .create_upload(&input.bucket, &bucket.bucket_key_id, &input.key, headers)
            .await?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload.to_text()),
            server_side_encryption: Some(ServerSideEncryption::from_static(
                ServerSideEncryption::AES256,
            )),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        refuse_unoffered(Operation::Part, WithCopySource::No, &req.headers, &req.uri)?;
        let checksum = ChecksumRequest::from_headers(&req.headers, req.trailing_headers.as_ref())?;
        let input = req.input;
        self.buckets.get(&input.bucket).await?;
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
            server_side_encryption: Some(ServerSideEncryption::from_static(
                ServerSideEncryption::AES256,
            )),
            ..output
        }))
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        refuse_unoffered(Operation::Part, WithCopySource::Yes, &req.headers, &req.uri)?;
        let input = req.input;
        self.buckets.get(&input.bucket).await?;
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
                last_modified: Some(timestamp_of(cairn_node::swarm::now_unix_ms())),
                ..Default::default()
            }),
            server_side_encryption: Some(ServerSideEncryption::from_static(
                ServerSideEncryption::AES256,
            )),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let input = req.input;
        self.buckets.get(&input.bucket).await?;
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
            .complete_upload(&input.bucket, &input.key, &upload, &chosen, &condition)
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
            server_side_encryption: Some(ServerSideEncryption::from_static(
                ServerSideEncryption::AES256,
            )),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let input = req.input;
        self.buckets.get(&input.bucket).await?;
        let upload = parse_upload_id(&input.upload_id)?;
        self.objects
            .abort_upload(&input.bucket, &input.key, &upload)
            .await?;
        let mut response = S3Response::new(AbortMultipartUploadOutput::default());
        response.status = Some(http::StatusCode::NO_CONTENT);
        Ok(response)
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        self.buckets.get(&input.bucket).await?;
        let upload = parse_upload_id(&input.upload_id)?;
        self.objects
            .upload(&input.bucket, &input.key, &upload)
            .await?;
        let max = match input.max_parts {
            Some(n) if n < 0 => {
                return Err(
                    GatewayError::InvalidArgument("max-parts must not be negative".into()).into(),
                );
            }
            Some(n) => (n as usize).min(1000),
            None => 1000,
        };
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
            .list_parts(&input.bucket, &upload, after.min(MAX_PART_NUMBER), max)
            .await?;
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

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        self.buckets.get(&input.bucket).await?;
        let max = match input.max_uploads {
            Some(n) if n < 0 => {
                return Err(GatewayError::InvalidArgument(
                    "max-uploads must not be negative".into(),
                )
                .into());
            }
            Some(n) => (n as usize).min(1000),
            None => 1000,
        };
        let upload_marker = match input.upload_id_marker.as_deref() {
            None | Some("") => None,
            Some(text) => Some(parse_upload_id(text)?),
        };
        let prefix = input.prefix.clone().unwrap_or_default();
        let (uploads, truncated) = self
            .objects
            .list_uploads(
                &input.bucket,
                &prefix,
                input.key_marker.as_deref().filter(|k| !k.is_empty()),
                upload_marker.as_ref(),
                max,
            )
            .await?;
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

#[cfg(test)]
mod tests {
    use cairn_protocol::hlc::{Hlc, Timestamp as Stamp};
    use cairn_protocol::ids::{ManifestId, NodeId};
    use cairn_protocol::version::{Lww, Retention};

    use super::*;

    fn strong(value: &str) -> ETagCondition {
        ETagCondition::ETag(ETag::Strong(value.into()))
    }

    fn refused(outcome: Result<impl std::fmt::Debug, GatewayError>) -> String {
        match outcome {
            Ok(value) => format!("ok {value:?}"),
            Err(error) => S3Error::from(error).code().as_str().to_owned(),
        }
    }

    #[test]
    fn keys_are_1_to_1024_bytes_without_nul() {
        assert!(check_key("a/b.txt").is_ok());
        assert!(check_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert_eq!(refused(check_key("")), "KeyTooLongError");
        assert_eq!(
            refused(check_key(&"k".repeat(MAX_KEY_BYTES + 1))),
            "KeyTooLongError"
        );
        assert_eq!(refused(check_key("a\0b")), "InvalidArgument");
    }

    #[test]
    fn write_conditions_take_one_header_and_only_star_for_if_none_match() {
        assert_eq!(write_condition(None, None).unwrap(), WriteCondition::Always);
        assert_eq!(
            write_condition(Some(&ETagCondition::Any), None).unwrap(),
            WriteCondition::IfAbsent
        );
        assert_eq!(
            write_condition(None, Some(&ETagCondition::Any)).unwrap(),
            WriteCondition::IfPresent
        );
        assert_eq!(
            write_condition(None, Some(&strong("abc"))).unwrap(),
            WriteCondition::IfMatch("abc".into())
        );
        assert_eq!(
            refused(write_condition(Some(&strong("abc")), None)),
            "InvalidArgument"
        );
        assert_eq!(
            refused(write_condition(
                Some(&ETagCondition::Any),
                Some(&ETagCondition::Any)
            )),
            "InvalidArgument"
        );
    }

    #[test]
    fn delete_conditions_and_version_ids() {
        let version = VersionId::new(1_764_000_000_000, [7; 10]);
        let condition = delete_condition(
            Some(&version.to_text()),
            Some(&strong("e1")),
            Some(12),
            None,
        )
        .unwrap();
        assert_eq!(condition.etag.as_deref(), Some("e1"));
        assert_eq!(condition.size_bytes, Some(12));
        assert_eq!(condition.version, Some(version));
        assert!(!condition.if_present);
        let star = delete_condition(Some("null"), Some(&ETagCondition::Any), None, None).unwrap();
        assert!(star.if_present && star.version.is_none());
        assert_eq!(
            refused(delete_condition(None, None, Some(-1), None)),
            "InvalidArgument"
        );
        assert_eq!(
            refused(parse_version_id("not-a-version")),
            "InvalidArgument"
        );
        // One spelling per version: upper-case hex is not it.
        assert_eq!(
            refused(parse_version_id(&version.to_text().to_uppercase())),
            "InvalidArgument"
        );
        assert_eq!(parse_version_id("null").unwrap(), None);
    }

    #[test]
    fn content_md5_is_16_bytes_of_base64() {
        assert_eq!(
            parse_content_md5(Some(&"AAAAAAAAAAAAAAAAAAAAAA==".to_owned())).unwrap(),
            Some([0; 16])
        );
        assert_eq!(parse_content_md5(None).unwrap(), None);
        assert_eq!(
            refused(parse_content_md5(Some(&"!!".to_owned()))),
            "InvalidDigest"
        );
        assert_eq!(
            refused(parse_content_md5(Some(&"AAAA".to_owned()))),
            "InvalidDigest"
        );
    }

    #[test]
    fn read_conditions_follow_rfc_9110_order() {
        let at = Stamp {
            hlc: Hlc::new(1_000_000, 0),
            node: NodeId([1; 32]),
        };
        let version = ObjectVersion {
            bucket: "b".into(),
            key: "k".into(),
            version: VersionId::new(1_000_000, [1; 10]),
            created: at,
            seq: 1,
            body: VersionBody::Data {
                manifest: ManifestId([1; 32]),
                size_bytes: 1,
                etag: "\"e1\"".into(),
                headers: StoredHeaders::default(),
            },
            retention: Retention::default(),
            legal_hold: Lww { value: false, at },
            purged: None,
        };
        let secs = |s: u64| Timestamp::from(UNIX_EPOCH + Duration::from_secs(s));
        let check = |m: Option<&ETagCondition>,
                     n: Option<&ETagCondition>,
                     modified: Option<&Timestamp>,
                     unmodified: Option<&Timestamp>| {
            refused(check_read_conditions(&version, m, n, modified, unmodified))
        };
        assert_eq!(check(Some(&strong("e1")), None, None, None), "ok ()");
        assert_eq!(
            check(Some(&strong("e2")), None, None, None),
            "PreconditionFailed"
        );
        // If-Match that holds outweighs If-Unmodified-Since that does not.
        assert_eq!(
            check(Some(&strong("e1")), None, None, Some(&secs(10))),
            "ok ()"
        );
        assert_eq!(
            check(None, None, None, Some(&secs(10))),
            "PreconditionFailed"
        );
        assert_eq!(check(None, Some(&strong("e1")), None, None), "NotModified");
        assert_eq!(
            check(None, Some(&ETagCondition::Any), None, None),
            "NotModified"
        );
        assert_eq!(check(None, None, Some(&secs(1_000)), None), "NotModified");
        assert_eq!(check(None, None, Some(&secs(999)), None), "ok ()");
    }

    #[test]
    fn listing_tokens_round_trip_and_bad_ones_are_refused() {
        let resume = b"photos/2026\0\x01".to_vec();
        assert_eq!(decode_token(&encode_token(&resume)).unwrap(), resume);
        assert_eq!(refused(decode_token("not base64!")), "InvalidArgument");
        let long = encode_token(&vec![b'k'; MAX_KEY_BYTES + 18]);
        assert_eq!(refused(decode_token(&long)), "InvalidArgument");
        assert_eq!(url_encode("a b/ü~"), "a%20b/%C3%BC~");
        assert_eq!(max_keys(None).unwrap(), MAX_KEYS);
        assert_eq!(max_keys(Some(5000)).unwrap(), MAX_KEYS);
        assert_eq!(max_keys(Some(0)).unwrap(), 0);
        assert_eq!(refused(max_keys(Some(-1))), "InvalidArgument");
    }
}
