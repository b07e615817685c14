//! ListObjects and ListObjectsV2: pages of the metadata's listing, their
//! continuation tokens and markers, and `encoding-type=url`.

use base64::Engine;
use cairn_model::heads::version_id_text;
use cairn_model::listing::{ListPage, ListRequest, ListStart, list_objects, list_versions};
use cairn_protocol::manifest::MAX_KEY_BYTES;
use cairn_protocol::meta::prefix_end;
use cairn_protocol::version::VersionBody;
use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result};

use super::CairnS3;
use super::headers::{last_modified, page_size, parse_version_ref, strong_etag};
use crate::error::GatewayError;

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

fn max_keys(requested: Option<i32>) -> Result<usize, GatewayError> {
    page_size(requested, "max-keys")
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

impl CairnS3 {
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
            return Ok(ListPage::empty());
        }
        let request = ListRequest {
            prefix: prefix.to_owned(),
            delimiter,
            start,
            max_keys,
        };
        Ok(list_objects(self.objects.index().metadata(), bucket, &request).await?)
    }

    pub(super) async fn list_objects_v2_op(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        self.bucket(&input.bucket).await?;
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

    pub(super) async fn list_objects_op(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        self.bucket(&input.bucket).await?;
        let url = wants_url(input.encoding_type.as_ref())?;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let start = match &input.marker {
            Some(marker) if !marker.is_empty() => {
                after_marker(&prefix, delimiter.as_deref(), marker)
            }
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
}

/// Where a ListObjectVersions page starts: after the key marker (after
/// every key under it when it is a common prefix), or after one of its
/// versions.
fn versions_start(
    prefix: &str,
    delimiter: Option<&str>,
    key_marker: Option<&str>,
    version_id_marker: Option<&str>,
) -> Result<ListStart, GatewayError> {
    let key_marker = key_marker.filter(|k| !k.is_empty());
    let version_id_marker = version_id_marker.filter(|v| !v.is_empty());
    Ok(match (key_marker, version_id_marker) {
        (None, Some(_)) => {
            return Err(GatewayError::InvalidArgument(
                "A version-id marker cannot be specified without a key marker.".into(),
            ));
        }
        (None, None) => ListStart::Beginning,
        (Some(key), Some(version)) => {
            ListStart::AfterVersion(key.to_owned(), parse_version_ref(version)?)
        }
        (Some(key), None) => after_marker(prefix, delimiter, key),
    })
}

/// Where a listing starts after a key marker: after the key, or after
/// every key under it when it is a common prefix (it ends with the
/// delimiter).
fn after_marker(prefix: &str, delimiter: Option<&str>, marker: &str) -> ListStart {
    match delimiter {
        Some(d) if marker.ends_with(d) && marker.starts_with(prefix) => {
            match prefix_end(marker.as_bytes()) {
                Some(end) => ListStart::Resume(end),
                None => ListStart::AfterKey(marker.to_owned()),
            }
        }
        _ => ListStart::AfterKey(marker.to_owned()),
    }
}

impl CairnS3 {
    pub(super) async fn list_object_versions_op(
        &self,
        req: S3Request<ListObjectVersionsInput>,
    ) -> S3Result<S3Response<ListObjectVersionsOutput>> {
        let input = req.input;
        self.bucket(&input.bucket).await?;
        let url = wants_url(input.encoding_type.as_ref())?;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let start = versions_start(
            &prefix,
            delimiter.as_deref(),
            input.key_marker.as_deref(),
            input.version_id_marker.as_deref(),
        )?;
        let page = if max == 0 {
            ListPage::empty()
        } else {
            let request = ListRequest {
                prefix: prefix.clone(),
                delimiter,
                start,
                max_keys: max,
            };
            list_versions(self.objects.index().metadata(), &input.bucket, &request)
                .await
                .map_err(GatewayError::from)?
        };
        let encode = |text: &str| {
            if url {
                url_encode(text)
            } else {
                text.to_owned()
            }
        };
        let mut versions = Vec::new();
        let mut delete_markers = Vec::new();
        for (version, is_latest) in page.entries.iter().zip(&page.is_latest) {
            let key = Some(encode(&version.key));
            let version_id = Some(version_id_text(version));
            match &version.body {
                VersionBody::Data {
                    size_bytes, etag, ..
                } => versions.push(ObjectVersion {
                    key,
                    version_id,
                    is_latest: Some(*is_latest),
                    last_modified: Some(last_modified(version)),
                    e_tag: Some(strong_etag(etag)),
                    size: Some(*size_bytes as i64),
                    storage_class: Some(ObjectVersionStorageClass::from_static(
                        ObjectVersionStorageClass::STANDARD,
                    )),
                    ..Default::default()
                }),
                VersionBody::DeleteMarker => delete_markers.push(DeleteMarkerEntry {
                    key,
                    version_id,
                    is_latest: Some(*is_latest),
                    last_modified: Some(last_modified(version)),
                    ..Default::default()
                }),
            }
        }
        // The next page starts after the last entry or common prefix.
        let (next_key_marker, next_version_id_marker) = match &page.resume {
            None => (None, None),
            Some(_) => {
                let last_entry = page.entries.last();
                let last_prefix = page.common_prefixes.last();
                match (last_entry, last_prefix) {
                    (Some(entry), Some(prefix)) if prefix.as_str() > entry.key.as_str() => {
                        (Some(prefix.clone()), None)
                    }
                    // The internal id even of a null version: the next
                    // page resumes exactly after it (spec/versioning.md).
                    (Some(entry), _) => (Some(entry.key.clone()), Some(entry.version.to_text())),
                    (None, Some(prefix)) => (Some(prefix.clone()), None),
                    (None, None) => (None, None),
                }
            }
        };
        let common_prefixes = page
            .common_prefixes
            .iter()
            .map(|p| CommonPrefix {
                prefix: Some(encode(p)),
            })
            .collect();
        Ok(S3Response::new(ListObjectVersionsOutput {
            name: Some(input.bucket),
            prefix: Some(encode(&prefix)),
            delimiter: input.delimiter.as_deref().map(encode),
            key_marker: input.key_marker.as_deref().map(encode),
            version_id_marker: input.version_id_marker,
            max_keys: Some(max as i32),
            is_truncated: Some(page.resume.is_some()),
            next_key_marker: next_key_marker.as_deref().map(encode),
            next_version_id_marker,
            encoding_type: input.encoding_type,
            versions: Some(versions),
            delete_markers: Some(delete_markers),
            common_prefixes: Some(common_prefixes),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::MAX_KEYS;
    use crate::s3::errors::refused;

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
