//! The preconditions of writes, deletes, reads and copies: If-Match,
//! If-None-Match and their time and size companions.

use cairn_protocol::version::{ObjectVersion, VersionBody};
use s3s::dto::*;

use super::headers::{parse_version_id, strong_etag};
use crate::error::GatewayError;
use cairn_model::heads::{DeleteCondition, WriteCondition};

/// The precondition of a write from If-None-Match and If-Match.
pub(super) fn write_condition(
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
pub(super) fn delete_condition(
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

/// RFC 9110's order: If-Match, else If-Unmodified-Since; then
/// If-None-Match, else If-Modified-Since.
pub(super) fn check_read_conditions(
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

/// The conditions on a copy's source: any that fails is PreconditionFailed.
pub(super) fn check_copy_conditions(
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use cairn_protocol::hlc::{Hlc, Timestamp as Stamp};
    use cairn_protocol::ids::{ManifestId, NodeId, VersionId};
    use cairn_protocol::version::{Lww, Retention, StoredHeaders};

    use super::*;
    use crate::s3::errors::refused;

    fn strong(value: &str) -> ETagCondition {
        ETagCondition::ETag(ETag::Strong(value.into()))
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
            null: true,
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
}
