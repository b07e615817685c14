//! Bucket lifecycle configuration (spec/versioning.md, "Lifecycle"): what
//! S3 clients send, checked rule by rule, kept in the bucket's lifecycle
//! register; the nodes' lifecycle worker applies it. Anything Cairn does
//! not do (tags, storage classes) is refused, never ignored.

use std::collections::HashSet;

use cairn_protocol::manifest::MAX_KEY_BYTES;
use cairn_protocol::records::{
    Expiration, LifecycleRule as StoredRule, MAX_LIFECYCLE_RULE_ID_BYTES, MAX_LIFECYCLE_RULES,
    MAX_NEWER_NONCURRENT_VERSIONS, NoncurrentExpiration,
};
use http::HeaderMap;
use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

use super::CairnS3;
use super::headers::{timestamp_of, unix_ms_of};
use crate::error::GatewayError;

const DAY_MS: u64 = 86_400_000;
/// S3's bound on the noncurrent versions a rule keeps.
const MAX_NEWER_NONCURRENT: i32 = MAX_NEWER_NONCURRENT_VERSIONS as i32;

fn malformed(why: &str) -> S3Error {
    S3Error::with_message(S3ErrorCode::MalformedXML, why.to_owned())
}

fn invalid(why: impl Into<String>) -> S3Error {
    GatewayError::InvalidArgument(why.into()).into()
}

/// A count of days a rule names: positive.
fn positive_days(days: i32, what: &str) -> S3Result<u32> {
    u32::try_from(days)
        .ok()
        .filter(|d| *d > 0)
        .ok_or_else(|| invalid(format!("'{what}' must be a positive integer, not {days}")))
}

fn size(bytes: i64, what: &str) -> S3Result<u64> {
    u64::try_from(bytes).map_err(|_| invalid(format!("'{what}' must not be negative")))
}

/// The prefix and sizes a rule's filter (or its older bare Prefix) names.
struct Filter {
    prefix: String,
    greater_than: Option<u64>,
    less_than: Option<u64>,
}

fn tags_refused() -> S3Error {
    GatewayError::NotImplemented(
        "object tags are not offered, so a lifecycle rule cannot filter on them".into(),
    )
    .into()
}

fn filter_of(rule: &LifecycleRule) -> S3Result<Filter> {
    let filter = match (&rule.filter, &rule.prefix) {
        (Some(_), Some(_)) => return Err(malformed("a rule has both Filter and Prefix")),
        (None, None) => return Err(malformed("a rule needs a Filter (or a Prefix)")),
        (None, Some(prefix)) => {
            return Ok(Filter {
                prefix: prefix.clone(),
                greater_than: None,
                less_than: None,
            });
        }
        (Some(filter), None) => filter,
    };
    let named = [
        filter.prefix.is_some(),
        filter.tag.is_some(),
        filter.object_size_greater_than.is_some(),
        filter.object_size_less_than.is_some(),
        filter.and.is_some(),
    ]
    .into_iter()
    .filter(|n| *n)
    .count();
    if named > 1 {
        return Err(malformed(
            "a Filter names one of Prefix, Tag, ObjectSizeGreaterThan, ObjectSizeLessThan or And",
        ));
    }
    if filter.tag.is_some() {
        return Err(tags_refused());
    }
    let (prefix, greater, less) = match &filter.and {
        Some(and) => {
            if and.tags.as_ref().is_some_and(|t| !t.is_empty()) {
                return Err(tags_refused());
            }
            (
                and.prefix.clone(),
                and.object_size_greater_than,
                and.object_size_less_than,
            )
        }
        None => (
            filter.prefix.clone(),
            filter.object_size_greater_than,
            filter.object_size_less_than,
        ),
    };
    let greater_than = greater
        .map(|b| size(b, "ObjectSizeGreaterThan"))
        .transpose()?;
    let less_than = less.map(|b| size(b, "ObjectSizeLessThan")).transpose()?;
    if let (Some(min), Some(max)) = (greater_than, less_than)
        && min >= max
    {
        return Err(invalid(
            "ObjectSizeGreaterThan must be less than ObjectSizeLessThan",
        ));
    }
    Ok(Filter {
        prefix: prefix.unwrap_or_default(),
        greater_than,
        less_than,
    })
}

fn expiration_of(expiration: &LifecycleExpiration) -> S3Result<Option<Expiration>> {
    let markers = expiration.expired_object_delete_marker == Some(true);
    match (expiration.days, &expiration.date, markers) {
        (Some(_), Some(_), _) => Err(malformed("an Expiration names Days or a Date, not both")),
        (None, Some(_), true) | (Some(_), None, true) => Err(invalid(
            "ExpiredObjectDeleteMarker cannot be specified with Days or Date in a Lifecycle Expiration Policy",
        )),
        (Some(days), None, false) => Ok(Some(Expiration::Days(positive_days(
            days,
            "Days' for Expiration action",
        )?))),
        (None, Some(date), false) => {
            let at = time::OffsetDateTime::from(date.clone());
            if at.unix_timestamp() < 0 {
                return Err(invalid("'Date' must be in 1970 or later"));
            }
            let unix_ms = unix_ms_of(date);
            if !unix_ms.is_multiple_of(DAY_MS) {
                return Err(invalid("'Date' must be at midnight GMT"));
            }
            Ok(Some(Expiration::Date(unix_ms)))
        }
        (None, None, true) => Ok(Some(Expiration::ExpiredDeleteMarkers)),
        (None, None, false) => Ok(None),
    }
}

/// One S3 rule, checked, as Cairn keeps it; `id` when it names none.
fn stored_rule(rule: &LifecycleRule, id: String) -> S3Result<StoredRule> {
    let enabled = match rule.status.as_str() {
        ExpirationStatus::ENABLED => true,
        ExpirationStatus::DISABLED => false,
        other => {
            return Err(malformed(&format!(
                "a rule's Status is Enabled or Disabled, not {other:?}"
            )));
        }
    };
    if rule.transitions.as_ref().is_some_and(|t| !t.is_empty())
        || rule
            .noncurrent_version_transitions
            .as_ref()
            .is_some_and(|t| !t.is_empty())
    {
        return Err(GatewayError::NotImplemented(
            "transitions are not offered: Cairn keeps every object in one storage class".into(),
        )
        .into());
    }
    let filter = filter_of(rule)?;
    if filter.prefix.len() > MAX_KEY_BYTES {
        return Err(invalid("a rule's prefix is longer than a key can be"));
    }
    let expiration = rule
        .expiration
        .as_ref()
        .map(expiration_of)
        .transpose()?
        .flatten();
    let noncurrent = match &rule.noncurrent_version_expiration {
        None => None,
        Some(n) => {
            let days = n
                .noncurrent_days
                .ok_or_else(|| malformed("a NoncurrentVersionExpiration needs NoncurrentDays"))?;
            let newer_versions = match n.newer_noncurrent_versions {
                None => 0,
                Some(count) if (1..=MAX_NEWER_NONCURRENT).contains(&count) => count as u32,
                Some(count) => {
                    return Err(invalid(format!(
                        "'NewerNoncurrentVersions' must be 1 to {MAX_NEWER_NONCURRENT}, not {count}"
                    )));
                }
            };
            Some(NoncurrentExpiration {
                days: positive_days(
                    days,
                    "NoncurrentDays' for NoncurrentVersionExpiration action",
                )?,
                newer_versions,
            })
        }
    };
    let abort_incomplete_days = match &rule.abort_incomplete_multipart_upload {
        None => None,
        Some(abort) => {
            let days = abort.days_after_initiation.ok_or_else(|| {
                malformed("an AbortIncompleteMultipartUpload needs DaysAfterInitiation")
            })?;
            if filter.greater_than.is_some() || filter.less_than.is_some() {
                return Err(invalid(
                    "AbortIncompleteMultipartUpload cannot be specified with an object size filter",
                ));
            }
            Some(positive_days(days, "DaysAfterInitiation")?)
        }
    };
    if expiration.is_none() && noncurrent.is_none() && abort_incomplete_days.is_none() {
        return Err(GatewayError::InvalidRequest(
            "At least one action needs to be specified in a rule".into(),
        )
        .into());
    }
    Ok(StoredRule {
        id,
        enabled,
        prefix: filter.prefix,
        size_greater_than: filter.greater_than,
        size_less_than: filter.less_than,
        expiration,
        noncurrent,
        abort_incomplete_days,
    })
}

/// Whether the request carries the digest S3 requires of this call.
fn has_digest(headers: &HeaderMap) -> bool {
    headers.contains_key("content-md5")
        || headers
            .keys()
            .any(|name| name.as_str().starts_with("x-amz-checksum-"))
}

/// A rule as S3 answers it.
fn answered_rule(rule: &StoredRule) -> LifecycleRule {
    let prefix = Some(rule.prefix.clone());
    let greater = rule
        .size_greater_than
        .map(|b| b.min(i64::MAX as u64) as i64);
    let less = rule.size_less_than.map(|b| b.min(i64::MAX as u64) as i64);
    let filter = if greater.is_none() && less.is_none() {
        LifecycleRuleFilter {
            prefix,
            ..Default::default()
        }
    } else if rule.prefix.is_empty() && (greater.is_none() || less.is_none()) {
        LifecycleRuleFilter {
            object_size_greater_than: greater,
            object_size_less_than: less,
            ..Default::default()
        }
    } else {
        LifecycleRuleFilter {
            and: Some(LifecycleRuleAndOperator {
                prefix,
                object_size_greater_than: greater,
                object_size_less_than: less,
                tags: None,
            }),
            ..Default::default()
        }
    };
    LifecycleRule {
        id: Some(rule.id.clone()),
        status: ExpirationStatus::from_static(if rule.enabled {
            ExpirationStatus::ENABLED
        } else {
            ExpirationStatus::DISABLED
        }),
        filter: Some(filter),
        expiration: rule.expiration.map(|e| match e {
            Expiration::Days(days) => LifecycleExpiration {
                days: Some(days as i32),
                ..Default::default()
            },
            Expiration::Date(unix_ms) => LifecycleExpiration {
                date: Some(timestamp_of(unix_ms)),
                ..Default::default()
            },
            Expiration::ExpiredDeleteMarkers => LifecycleExpiration {
                expired_object_delete_marker: Some(true),
                ..Default::default()
            },
        }),
        noncurrent_version_expiration: rule.noncurrent.map(|n| NoncurrentVersionExpiration {
            noncurrent_days: Some(n.days as i32),
            newer_noncurrent_versions: (n.newer_versions > 0).then_some(n.newer_versions as i32),
        }),
        abort_incomplete_multipart_upload: rule.abort_incomplete_days.map(|days| {
            AbortIncompleteMultipartUpload {
                days_after_initiation: Some(days as i32),
            }
        }),
        noncurrent_version_transitions: None,
        prefix: None,
        transitions: None,
    }
}

impl CairnS3 {
    pub(super) async fn put_bucket_lifecycle_configuration_op(
        &self,
        req: S3Request<PutBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<PutBucketLifecycleConfigurationOutput>> {
        if !has_digest(&req.headers) {
            return Err(GatewayError::InvalidRequest(
                "Missing required header for this request: Content-MD5 (or an x-amz-checksum- header)".into(),
            )
            .into());
        }
        let input = req.input;
        // Refused before any rule is read: no bucket, nothing to check.
        self.bucket(&input.bucket).await?;
        let configuration = input
            .lifecycle_configuration
            .ok_or_else(|| malformed("the request has no LifecycleConfiguration"))?;
        let rules = configuration.rules;
        if rules.is_empty() {
            return Err(malformed(
                "a LifecycleConfiguration needs at least one Rule",
            ));
        }
        if rules.len() > MAX_LIFECYCLE_RULES {
            return Err(invalid(format!(
                "a lifecycle configuration has at most {MAX_LIFECYCLE_RULES} rules"
            )));
        }
        let mut ids = HashSet::new();
        let mut stored = Vec::with_capacity(rules.len());
        for rule in &rules {
            let id = match &rule.id {
                Some(id) if id.len() > MAX_LIFECYCLE_RULE_ID_BYTES => {
                    return Err(invalid(format!(
                        "ID length should not exceed allowed limit of {MAX_LIFECYCLE_RULE_ID_BYTES}"
                    )));
                }
                Some(id) => id.clone(),
                // S3 names an unnamed rule itself.
                None => cairn_protocol::to_hex(&cairn_node::clock::random_bytes::<12>()),
            };
            if !ids.insert(id.clone()) {
                return Err(invalid(
                    "Rule ID must be unique. Found same ID for more than one rule",
                ));
            }
            stored.push(stored_rule(rule, id)?);
        }
        self.buckets
            .set_lifecycle(&input.bucket, Some(stored))
            .await
            .map_err(GatewayError::from)?;
        Ok(S3Response::new(
            PutBucketLifecycleConfigurationOutput::default(),
        ))
    }

    pub(super) async fn get_bucket_lifecycle_configuration_op(
        &self,
        req: S3Request<GetBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<GetBucketLifecycleConfigurationOutput>> {
        let configuration = self
            .buckets
            .lifecycle(&req.input.bucket)
            .await
            .map_err(GatewayError::from)?
            .ok_or_else(|| {
                S3Error::with_message(
                    S3ErrorCode::NoSuchLifecycleConfiguration,
                    "The lifecycle configuration does not exist",
                )
            })?;
        Ok(S3Response::new(GetBucketLifecycleConfigurationOutput {
            rules: Some(configuration.rules.iter().map(answered_rule).collect()),
            ..Default::default()
        }))
    }

    pub(super) async fn delete_bucket_lifecycle_op(
        &self,
        req: S3Request<DeleteBucketLifecycleInput>,
    ) -> S3Result<S3Response<DeleteBucketLifecycleOutput>> {
        self.buckets
            .set_lifecycle(&req.input.bucket, None)
            .await
            .map_err(GatewayError::from)?;
        Ok(S3Response::new(DeleteBucketLifecycleOutput::default()))
    }
}
