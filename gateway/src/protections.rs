//! Requests that ask for a protection Cairn does not give yet are refused
//! with the error AWS uses, before anything is stored: a store that
//! accepted `aws:kms` or a customer key and kept the object under SSE-S3,
//! or an Object Lock header on a bucket without Object Lock, would promise
//! what it does not keep (spec/gateway.md, "Refused protections").
//!
//! Pure: it reads the request's headers and query, nothing else. Headers
//! count wherever a client can send them: as headers, or hoisted into the
//! query string of a presigned URL.

use http::{HeaderMap, Uri};

use crate::error::GatewayError;

/// What kind of request is being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// PutObject, CopyObject (the destination), CreateMultipartUpload:
    /// these choose how the new object is protected.
    NewObject,
    /// UploadPart and UploadPartCopy: the upload chose at its creation.
    Part,
    /// GetObject and HeadObject.
    Read,
    /// CreateBucket.
    CreateBucket,
}

/// Whether the request names a copy source, whose SSE-C headers are
/// checked too (CopyObject, UploadPartCopy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithCopySource {
    Yes,
    No,
}

const SSE: &str = "x-amz-server-side-encryption";
const KMS_HEADERS: [&str; 2] = [
    "x-amz-server-side-encryption-aws-kms-key-id",
    "x-amz-server-side-encryption-context",
];
const CUSTOMER_HEADERS: [&str; 3] = [
    "x-amz-server-side-encryption-customer-algorithm",
    "x-amz-server-side-encryption-customer-key",
    "x-amz-server-side-encryption-customer-key-md5",
];
const COPY_SOURCE_CUSTOMER_HEADERS: [&str; 3] = [
    "x-amz-copy-source-server-side-encryption-customer-algorithm",
    "x-amz-copy-source-server-side-encryption-customer-key",
    "x-amz-copy-source-server-side-encryption-customer-key-md5",
];

/// Refuses the request if it asks for a protection Cairn does not give:
/// SSE-KMS and SSE-C (NotImplemented), an unknown encryption
/// (InvalidArgument), customer-key headers for an object that has no
/// customer key (InvalidRequest). Object Lock headers are the bucket's to
/// judge (`s3/locks.rs`).
pub fn refuse_unoffered(
    operation: Operation,
    copy: WithCopySource,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(), GatewayError> {
    let asked = Asked { headers, uri };
    match operation {
        Operation::NewObject => {
            match asked.value(SSE).as_deref() {
                None | Some("AES256") => {}
                Some("aws:kms" | "aws:kms:dsse") => {
                    return Err(GatewayError::NotImplemented(
                        "SSE-KMS (x-amz-server-side-encryption: aws:kms) is not available yet; \
                         objects are encrypted with SSE-S3 (AES256)"
                            .into(),
                    ));
                }
                Some(other) => {
                    return Err(GatewayError::InvalidArgument(format!(
                        "the server-side encryption {other:?} is not one S3 knows \
                         (AES256, aws:kms, aws:kms:dsse)"
                    )));
                }
            }
            if let Some(name) = asked.first_of(&KMS_HEADERS) {
                return Err(GatewayError::InvalidArgument(format!(
                    "{name} applies only to x-amz-server-side-encryption: aws:kms"
                )));
            }
            if let Some(name) = asked.first_of(&CUSTOMER_HEADERS) {
                return Err(customer_keys_not_offered(name));
            }
        }
        Operation::Part => {
            if let Some(name) = asked.first_of(&CUSTOMER_HEADERS) {
                return Err(customer_keys_not_offered(name));
            }
        }
        Operation::Read => {
            if asked.value(SSE).is_some() {
                return Err(GatewayError::InvalidArgument(format!(
                    "{SSE} is not sent with a GET or HEAD: the object says how it is encrypted"
                )));
            }
            if let Some(name) = asked.first_of(&CUSTOMER_HEADERS) {
                return Err(not_customer_encrypted(name));
            }
        }
        Operation::CreateBucket => {}
    }
    if copy == WithCopySource::Yes
        && let Some(name) = asked.first_of(&COPY_SOURCE_CUSTOMER_HEADERS)
    {
        return Err(not_customer_encrypted(name));
    }
    Ok(())
}

fn customer_keys_not_offered(name: &str) -> GatewayError {
    GatewayError::NotImplemented(format!(
        "SSE-C ({name}) is not available yet; nothing was stored"
    ))
}

fn not_customer_encrypted(name: &str) -> GatewayError {
    GatewayError::InvalidRequest(format!(
        "{name}: the encryption parameters are not applicable to this object \
         (it is not encrypted with a customer key)"
    ))
}

/// The value of header `name` (lower-case) as the request sends it: as a
/// header, or hoisted into a presigned URL's query.
pub fn asked_value(headers: &HeaderMap, uri: &Uri, name: &str) -> Option<String> {
    Asked { headers, uri }.value(name)
}

/// A request's headers and query, asked by lower-case header name.
struct Asked<'a> {
    headers: &'a HeaderMap,
    uri: &'a Uri,
}

impl Asked<'_> {
    fn value(&self, name: &str) -> Option<String> {
        if let Some(value) = self.headers.get(name) {
            return Some(String::from_utf8_lossy(value.as_bytes()).trim().to_owned());
        }
        crate::server::query_param(self.uri.query()?, name)
            .map(|value| percent_decoded(value).trim().to_owned())
    }

    fn first_of<'n>(&self, names: &[&'n str]) -> Option<&'n str> {
        names
            .iter()
            .copied()
            .find(|name| self.value(name).is_some())
    }
}

/// A query component with its `%XX` escapes (and `+`) decoded; escapes
/// that are not two hex digits are kept as they are.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        operation: Operation,
        copy: WithCopySource,
        pairs: &[(&str, &str)],
        query: &str,
    ) -> String {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let uri: Uri = format!("/b/k{query}").parse().unwrap();
        match refuse_unoffered(operation, copy, &headers, &uri) {
            Ok(()) => "ok".into(),
            Err(GatewayError::NotImplemented(_)) => "NotImplemented".into(),
            Err(GatewayError::InvalidRequest(_)) => "InvalidRequest".into(),
            Err(GatewayError::InvalidArgument(_)) => "InvalidArgument".into(),
            Err(other) => format!("{other:?}"),
        }
    }

    #[test]
    fn what_cairn_gives_passes() {
        use Operation::*;
        assert_eq!(check(NewObject, WithCopySource::No, &[], ""), "ok");
        assert_eq!(
            check(NewObject, WithCopySource::No, &[(SSE, "AES256")], ""),
            "ok"
        );
        assert_eq!(check(Read, WithCopySource::No, &[], ""), "ok");
        assert_eq!(check(Part, WithCopySource::Yes, &[], ""), "ok");
        assert_eq!(
            check(
                CreateBucket,
                WithCopySource::No,
                &[("x-amz-bucket-object-lock-enabled", "true")],
                ""
            ),
            "ok"
        );
    }

    /// A request (headers, query) and the answer expected.
    type Case<'a> = (
        Operation,
        WithCopySource,
        &'a [(&'a str, &'a str)],
        &'a str,
        &'a str,
    );

    #[test]
    fn each_protection_not_given_is_refused_with_the_aws_error() {
        use Operation::*;
        let cases: &[Case] = &[
            (
                NewObject,
                WithCopySource::No,
                &[(SSE, "aws:kms")],
                "",
                "NotImplemented",
            ),
            (
                NewObject,
                WithCopySource::No,
                &[(SSE, "aws:kms:dsse")],
                "",
                "NotImplemented",
            ),
            (
                NewObject,
                WithCopySource::No,
                &[(SSE, "AES512")],
                "",
                "InvalidArgument",
            ),
            (
                NewObject,
                WithCopySource::No,
                &[(KMS_HEADERS[0], "alias/x")],
                "",
                "InvalidArgument",
            ),
            (
                NewObject,
                WithCopySource::No,
                &[(CUSTOMER_HEADERS[0], "AES256")],
                "",
                "NotImplemented",
            ),
            (
                NewObject,
                WithCopySource::No,
                &[(CUSTOMER_HEADERS[1], "a2V5")],
                "",
                "NotImplemented",
            ),
            (
                Part,
                WithCopySource::No,
                &[(CUSTOMER_HEADERS[2], "bWQ1")],
                "",
                "NotImplemented",
            ),
            (
                Read,
                WithCopySource::No,
                &[(CUSTOMER_HEADERS[0], "AES256")],
                "",
                "InvalidRequest",
            ),
            (
                Read,
                WithCopySource::No,
                &[(SSE, "AES256")],
                "",
                "InvalidArgument",
            ),
            (
                NewObject,
                WithCopySource::Yes,
                &[(COPY_SOURCE_CUSTOMER_HEADERS[0], "AES256")],
                "",
                "InvalidRequest",
            ),
            (
                Part,
                WithCopySource::Yes,
                &[(COPY_SOURCE_CUSTOMER_HEADERS[1], "a2V5")],
                "",
                "InvalidRequest",
            ),
            // Hoisted into a presigned URL's query, in any case.
            (
                NewObject,
                WithCopySource::No,
                &[],
                "?X-Amz-Server-Side-Encryption=aws%3Akms",
                "NotImplemented",
            ),
            (
                NewObject,
                WithCopySource::No,
                &[],
                "?x-amz-server-side-encryption-customer-algorithm=AES256",
                "NotImplemented",
            ),
        ];
        for (request, copy, headers, query, expected) in cases {
            assert_eq!(
                check(*request, *copy, headers, query),
                *expected,
                "{request:?} {headers:?} {query}"
            );
        }
    }
}
