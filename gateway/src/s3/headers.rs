//! Header translation: the fields of a request stored as an object's
//! headers, the stored headers answered as GET and HEAD fields, and the
//! request values (key, version and Content-MD5, length) checked on the way.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use cairn_model::heads::{VersionRef, version_id_text};
use cairn_protocol::ids::VersionId;
use cairn_protocol::manifest::MAX_KEY_BYTES;
use cairn_protocol::records::Versioning;
use cairn_protocol::version::{ObjectVersion, StoredHeaders, VersionBody};
use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Result};

use super::{MAX_KEYS, MAX_USER_METADATA_BYTES};
use crate::checksum::Algorithm;
use crate::error::GatewayError;

pub(super) fn check_key(key: &str) -> Result<(), GatewayError> {
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

/// A request's `versionId`: `None` for "null", the version every object of
/// a bucket without versioning has (its current one).
pub(super) fn parse_version_id(text: &str) -> Result<Option<VersionId>, GatewayError> {
    if text == "null" {
        return Ok(None);
    }
    VersionId::parse(text)
        .map(Some)
        .map_err(|_| GatewayError::InvalidArgument(format!("invalid version id {text:?}")))
}

/// A `versionId` as a client sends it: `null` or an id.
pub(super) fn parse_version_ref(text: &str) -> Result<VersionRef, GatewayError> {
    Ok(match parse_version_id(text)? {
        None => VersionRef::Null,
        Some(id) => VersionRef::Id(id),
    })
}

/// The `x-amz-version-id` a write answers with: none in a bucket that
/// never kept history, `null` for a null version.
pub(super) fn written_version_id(
    version: &ObjectVersion,
    versioning: Versioning,
) -> Option<String> {
    (versioning != Versioning::Unversioned || !version.null).then(|| version_id_text(version))
}

/// The `x-amz-version-id` a read answers with: a version's own id; a null
/// version is not named (in a bucket that never kept history S3 names
/// none, and telling which this is would cost a read).
pub(super) fn read_version_id(version: &ObjectVersion) -> Option<String> {
    (!version.null).then(|| version_id_text(version))
}

/// The last millisecond of year 9999 UTC: the latest date S3's formats
/// write (later ones are refused where they come in).
pub(super) const LATEST_DATE_UNIX_MS: u64 = 253_402_300_799_999;

pub(super) fn timestamp_of(unix_ms: u64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(unix_ms.min(LATEST_DATE_UNIX_MS)))
}

/// The Unix ms of a date a request names (0 before 1970).
pub(super) fn unix_ms_of(timestamp: &Timestamp) -> u64 {
    let at = time::OffsetDateTime::from(timestamp.clone());
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

pub(super) fn last_modified(version: &ObjectVersion) -> Timestamp {
    timestamp_of(version.created.hlc.unix_ms())
}

pub(super) fn strong_etag(quoted: &str) -> ETag {
    ETag::Strong(quoted.trim_matches('"').to_owned())
}

/// The headers a request sets on the object it writes.
pub(super) struct HeaderFields<'a> {
    pub(super) content_type: Option<&'a String>,
    pub(super) cache_control: Option<&'a String>,
    pub(super) content_disposition: Option<&'a String>,
    pub(super) content_encoding: Option<&'a String>,
    pub(super) content_language: Option<&'a String>,
    pub(super) expires: Option<&'a Timestamp>,
    pub(super) website_redirect_location: Option<&'a String>,
    pub(super) metadata: Option<&'a Metadata>,
}

macro_rules! header_fields {
    ($input:expr) => {
        $crate::s3::headers::HeaderFields {
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
pub(super) use header_fields;

/// The headers stored with an object: the standard ones the request sent,
/// its user metadata, and how it is encrypted.
pub(super) fn stored_headers(fields: HeaderFields<'_>) -> Result<StoredHeaders, GatewayError> {
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
pub(super) fn stored_checksums(headers: &StoredHeaders) -> Checksum {
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
pub(super) fn head_output(version: &ObjectVersion, checksums: bool) -> HeadObjectOutput {
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
    let lock = super::locks::lock_fields(version);
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
        server_side_encryption: sse_s3(),
        checksum_crc32: sums.checksum_crc32,
        checksum_crc32c: sums.checksum_crc32c,
        checksum_crc64nvme: sums.checksum_crc64nvme,
        checksum_sha1: sums.checksum_sha1,
        checksum_sha256: sums.checksum_sha256,
        checksum_type: sums.checksum_type,
        version_id: read_version_id(version),
        object_lock_mode: lock.0,
        object_lock_retain_until_date: lock.1,
        object_lock_legal_hold_status: lock.2,
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
            version_id: head.version_id,
            object_lock_mode: head.object_lock_mode,
            object_lock_retain_until_date: head.object_lock_retain_until_date,
            object_lock_legal_hold_status: head.object_lock_legal_hold_status,
            $($extra)*
        }
    }};
}
pub(super) use from_head;

pub(super) fn checksums_wanted(mode: Option<&ChecksumMode>) -> bool {
    mode.is_some_and(|m| m.as_str().eq_ignore_ascii_case(ChecksumMode::ENABLED))
}

fn user_metadata(headers: &StoredHeaders) -> Option<Metadata> {
    let metadata: Metadata = headers
        .iter()
        .filter_map(|(n, v)| Some((n.strip_prefix("x-amz-meta-")?.to_owned(), v.to_owned())))
        .collect();
    (!metadata.is_empty()).then_some(metadata)
}

pub(super) fn parse_content_md5(value: Option<&String>) -> Result<Option<[u8; 16]>, GatewayError> {
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

pub(super) fn body_length(content_length: Option<i64>, body: &StreamingBlob) -> S3Result<u64> {
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

/// The request's headers with the protections its parsed input asks for
/// added under their header names: s3s parses a POST Object's form fields
/// into the same input a PUT's headers give.
pub(super) fn with_typed_protections(
    headers: &http::HeaderMap,
    input: &PutObjectInput,
) -> http::HeaderMap {
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

/// The size of a listing page a client asks for (max-keys, max-parts,
/// max-uploads): S3's cap of 1000 when it asks for none or more, and
/// InvalidArgument when it asks for a negative number.
pub(super) fn page_size(requested: Option<i32>, name: &str) -> Result<usize, GatewayError> {
    match requested {
        None => Ok(MAX_KEYS),
        Some(n) if n < 0 => Err(GatewayError::InvalidArgument(format!(
            "{name} must not be negative"
        ))),
        Some(n) => Ok((n as usize).min(MAX_KEYS)),
    }
}

/// What every answer that names an object's encryption says: SSE-S3,
/// the one mode Cairn gives.
pub(super) fn sse_s3() -> Option<ServerSideEncryption> {
    Some(ServerSideEncryption::from_static(
        ServerSideEncryption::AES256,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::errors::refused;

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
}
