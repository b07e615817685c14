//! Object Lock (spec/versioning.md, "Object Lock"): a bucket's lock
//! configuration, the lock a new version is written with, and the
//! retention and legal hold of a version, each change decided by the
//! version's lock guard.

use cairn_model::ModelError;
use cairn_model::fragment_locks;
use cairn_model::heads::{HeadWrite, NewLock, WriteCondition};
use cairn_model::locks::{LockError, change_version_lock};
use cairn_model::rows::versions_row;
use cairn_protocol::guard::{GuardChange, GuardRefusal};
use cairn_protocol::records::{
    BucketSettings, DefaultRetention as BucketDefaultRetention, MAX_DEFAULT_DAYS,
    MAX_DEFAULT_YEARS, RetentionPeriod, Versioning,
};
use cairn_protocol::version::{
    ObjectVersion, Retention, RetentionMode, StoredHeaders, VersionBody,
};
use http::{HeaderMap, Uri};
use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

use super::CairnS3;
use super::headers::{LATEST_DATE_UNIX_MS, parse_version_ref, timestamp_of, unix_ms_of};
use crate::error::GatewayError;
use crate::protections::asked_value;

const MODE: &str = "x-amz-object-lock-mode";
const RETAIN_UNTIL: &str = "x-amz-object-lock-retain-until-date";
const LEGAL_HOLD: &str = "x-amz-object-lock-legal-hold";
const BUCKET_LOCK: &str = "x-amz-bucket-object-lock-enabled";
const BYPASS: &str = "x-amz-bypass-governance-retention";

/// Days in a year of a default retention, as S3 counts them.
const DAYS_PER_YEAR: u64 = 365;
const DAY_MS: u64 = 86_400_000;
/// S3's bounds on a default retention period.
const MAX_DAYS: i32 = MAX_DEFAULT_DAYS as i32;
const MAX_YEARS: i32 = MAX_DEFAULT_YEARS as i32;

/// The lock headers of a write, parsed; `None` fields were not sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RequestedLock {
    pub(crate) retention: Option<Retention>,
    pub(crate) legal_hold: Option<bool>,
}

impl RequestedLock {
    fn is_empty(&self) -> bool {
        self.retention.is_none() && self.legal_hold.is_none()
    }
}

fn parse_mode(text: &str) -> Result<RetentionMode, GatewayError> {
    match text {
        "GOVERNANCE" => Ok(RetentionMode::Governance),
        "COMPLIANCE" => Ok(RetentionMode::Compliance),
        other => Err(GatewayError::InvalidArgument(format!(
            "Unknown wormMode directive {other:?}: the Object Lock mode is GOVERNANCE or COMPLIANCE"
        ))),
    }
}

fn future_retention(
    mode: RetentionMode,
    until_unix_ms: u64,
    now_unix_ms: u64,
) -> Result<Retention, GatewayError> {
    if until_unix_ms <= now_unix_ms {
        return Err(GatewayError::InvalidArgument(
            "The retain until date must be in the future!".into(),
        ));
    }
    if until_unix_ms > LATEST_DATE_UNIX_MS {
        return Err(GatewayError::InvalidArgument(
            "The retain until date must be in year 9999 UTC at the latest".into(),
        ));
    }
    Ok(Retention::new(mode, until_unix_ms))
}

/// The Object Lock headers of a PutObject, CopyObject or
/// CreateMultipartUpload (sent as headers or in a presigned query).
pub(super) fn requested_lock(
    headers: &HeaderMap,
    uri: &Uri,
    now_unix_ms: u64,
) -> Result<RequestedLock, GatewayError> {
    let mode = asked_value(headers, uri, MODE);
    let until = asked_value(headers, uri, RETAIN_UNTIL);
    let retention = match (mode, until) {
        (None, None) => None,
        (Some(mode), Some(until)) => {
            let mode = parse_mode(&mode)?;
            let until = Timestamp::parse(TimestampFormat::DateTime, &until).map_err(|_| {
                GatewayError::InvalidArgument(format!(
                    "{RETAIN_UNTIL} {until:?} is not an ISO 8601 date and time"
                ))
            })?;
            Some(future_retention(mode, unix_ms_of(&until), now_unix_ms)?)
        }
        _ => {
            return Err(GatewayError::InvalidArgument(format!(
                "{RETAIN_UNTIL} and {MODE} must both be supplied"
            )));
        }
    };
    let legal_hold = match asked_value(headers, uri, LEGAL_HOLD).as_deref() {
        None => None,
        Some("ON") => Some(true),
        Some("OFF") => Some(false),
        Some(other) => {
            return Err(GatewayError::InvalidArgument(format!(
                "{LEGAL_HOLD} {other:?} is neither ON nor OFF"
            )));
        }
    };
    Ok(RequestedLock {
        retention,
        legal_hold,
    })
}

/// Whether the request asks to bypass a governance retention.
pub(super) fn bypasses_governance(headers: &HeaderMap, uri: &Uri) -> bool {
    asked_value(headers, uri, BYPASS).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Whether a CreateBucket asks for Object Lock.
pub(super) fn bucket_lock_requested(headers: &HeaderMap, uri: &Uri) -> Result<bool, GatewayError> {
    match asked_value(headers, uri, BUCKET_LOCK).as_deref() {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(GatewayError::InvalidArgument(format!(
            "{BUCKET_LOCK} {other:?} is neither true nor false"
        ))),
    }
}

/// The length of a default retention period in milliseconds.
fn period_ms(period: RetentionPeriod) -> u64 {
    match period {
        RetentionPeriod::Days(n) => u64::from(n) * DAY_MS,
        RetentionPeriod::Years(n) => u64::from(n) * DAYS_PER_YEAR * DAY_MS,
    }
}

fn missing_lock_configuration() -> GatewayError {
    GatewayError::InvalidRequest("Bucket is missing Object Lock Configuration".into())
}

/// The lock a new version is written with: what the request asked for,
/// else the bucket's default retention. Lock headers on a bucket without
/// Object Lock are refused: nothing is stored.
pub(crate) fn new_lock(
    requested: RequestedLock,
    settings: &BucketSettings,
    now_unix_ms: u64,
) -> Result<NewLock, GatewayError> {
    if !settings.object_lock {
        if !requested.is_empty() {
            return Err(missing_lock_configuration());
        }
        return Ok(NewLock::default());
    }
    let retention = match (requested.retention, settings.default_retention) {
        (Some(retention), _) => retention,
        (None, Some(default)) => Retention::new(
            default.mode,
            now_unix_ms.saturating_add(period_ms(default.period)),
        ),
        (None, None) => Retention::default(),
    };
    Ok(NewLock {
        retention,
        legal_hold: requested.legal_hold.unwrap_or(false),
    })
}

/// The names under which a multipart upload keeps the lock its creation
/// asked for until its completion (stored headers that no answer shows).
const UPLOAD_MODE: &str = "x-cairn-lock-mode";
const UPLOAD_RETAIN_UNTIL: &str = "x-cairn-lock-retain-until-ms";
const UPLOAD_LEGAL_HOLD: &str = "x-cairn-lock-legal-hold";

/// `headers` with the requested lock added, for an upload's record.
pub(super) fn with_upload_lock(
    headers: StoredHeaders,
    requested: RequestedLock,
) -> Result<StoredHeaders, GatewayError> {
    let mut all: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    if let Some(retention) = requested.retention {
        let mode = match retention.mode {
            RetentionMode::Compliance => "COMPLIANCE",
            _ => "GOVERNANCE",
        };
        all.push((UPLOAD_MODE.into(), mode.into()));
        all.push((
            UPLOAD_RETAIN_UNTIL.into(),
            retention.retain_until_unix_ms.to_string(),
        ));
    }
    if let Some(on) = requested.legal_hold {
        all.push((
            UPLOAD_LEGAL_HOLD.into(),
            if on { "ON" } else { "OFF" }.into(),
        ));
    }
    StoredHeaders::new(all).map_err(|e| GatewayError::InvalidArgument(e.to_string()))
}

/// The lock an upload's record asked for, and its headers without it.
pub(crate) fn take_upload_lock(
    headers: &StoredHeaders,
) -> Result<(RequestedLock, StoredHeaders), GatewayError> {
    let corrupt = |what: &str| GatewayError::Corrupt(format!("upload record: {what}"));
    let retention = match (headers.get(UPLOAD_MODE), headers.get(UPLOAD_RETAIN_UNTIL)) {
        (None, None) => None,
        (Some(mode), Some(until)) => Some(Retention::new(
            parse_mode(mode).map_err(|_| corrupt("lock mode"))?,
            until.parse().map_err(|_| corrupt("retain until"))?,
        )),
        _ => return Err(corrupt("half a retention")),
    };
    let legal_hold = headers.get(UPLOAD_LEGAL_HOLD).map(|v| v == "ON");
    let rest = headers
        .iter()
        .filter(|(n, _)| ![UPLOAD_MODE, UPLOAD_RETAIN_UNTIL, UPLOAD_LEGAL_HOLD].contains(n))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    let rest = StoredHeaders::new(rest).map_err(|e| GatewayError::Corrupt(e.to_string()))?;
    Ok((
        RequestedLock {
            retention,
            legal_hold,
        },
        rest,
    ))
}

/// The lock fields of a HEAD or GET answer: set only where a lock was.
pub(super) fn lock_fields(
    version: &ObjectVersion,
) -> (
    Option<ObjectLockMode>,
    Option<Timestamp>,
    Option<ObjectLockLegalHoldStatus>,
) {
    let (mode, until) = match version.retention.mode {
        RetentionMode::None => (None, None),
        mode => (
            Some(ObjectLockMode::from_static(match mode {
                RetentionMode::Compliance => ObjectLockMode::COMPLIANCE,
                _ => ObjectLockMode::GOVERNANCE,
            })),
            Some(timestamp_of(version.retention.retain_until_unix_ms)),
        ),
    };
    let hold = version
        .legal_hold
        .value
        .then(|| ObjectLockLegalHoldStatus::from_static(ObjectLockLegalHoldStatus::ON));
    (mode, until, hold)
}

fn guard_refusal(key: &str, refusal: GuardRefusal) -> GatewayError {
    match refusal {
        GuardRefusal::Purged => GatewayError::NoSuchVersion,
        other => GatewayError::AccessDenied(format!("{key}: {other}")),
    }
}

impl CairnS3 {
    /// The settings of a bucket whose Object Lock is asked about:
    /// InvalidRequest without Object Lock.
    async fn lock_settings(&self, bucket: &str) -> Result<BucketSettings, GatewayError> {
        let settings = self.settings(bucket).await?;
        if !settings.object_lock {
            return Err(missing_lock_configuration());
        }
        Ok(settings)
    }

    /// The version a retention or legal hold request names: its id, or
    /// the latest; delete markers cannot be locked.
    async fn lockable_version(
        &self,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<ObjectVersion, GatewayError> {
        let index = self.objects.index();
        let version = match version_id {
            Some(text) => index
                .version(bucket, key, parse_version_ref(text)?)
                .await?
                .ok_or(GatewayError::NoSuchVersion)?,
            None => index
                .latest(bucket, key)
                .await?
                .ok_or(GatewayError::NoSuchKey)?,
        };
        if version.body == VersionBody::DeleteMarker {
            return Err(GatewayError::MethodNotAllowed(
                "a delete marker has no Object Lock".into(),
            ));
        }
        Ok(version)
    }

    async fn change_lock(
        &self,
        version: &ObjectVersion,
        change: GuardChange,
    ) -> Result<(), GatewayError> {
        let row = versions_row(&version.bucket, &version.key, &version.version);
        let index = self.objects.index();
        match change_version_lock(index.metadata(), &row, change).await {
            Ok(guard) => {
                // GET and HEAD of the latest version read the head.
                let relock = HeadWrite::Relock {
                    version: version.version,
                    retention: guard.retention,
                    legal_hold: guard.legal_hold,
                };
                match index
                    .swap_head(
                        &version.bucket,
                        &version.key,
                        &WriteCondition::Always,
                        relock,
                        None,
                    )
                    .await
                {
                    Ok(_) | Err(ModelError::NoSuchVersion) => {}
                    Err(error) => return Err(error.into()),
                }
                let locked = ObjectVersion {
                    retention: guard.retention,
                    legal_hold: guard.legal_hold,
                    ..version.clone()
                };
                if fragment_locks::has_node_lock(&locked, cairn_node::clock::now_unix_ms()) {
                    self.objects.lock_on_nodes(&locked, None).await;
                }
                Ok(())
            }
            Err(LockError::Refused(GuardRefusal::Purged)) => {
                // A delete decided it and stopped: finished here.
                index
                    .finish_purge(&version.bucket, &version.key, version.version)
                    .await?;
                Err(GatewayError::NoSuchVersion)
            }
            Err(LockError::Refused(refusal)) => Err(guard_refusal(&version.key, refusal)),
            Err(LockError::NoSuchVersion) => Err(GatewayError::NoSuchVersion),
            Err(LockError::Corrupt(why)) => Err(GatewayError::Corrupt(why)),
            Err(LockError::Meta(error)) => Err(error.into()),
        }
    }

    pub(super) async fn put_object_lock_configuration_op(
        &self,
        req: S3Request<PutObjectLockConfigurationInput>,
    ) -> S3Result<S3Response<PutObjectLockConfigurationOutput>> {
        let input = req.input;
        let configuration = input.object_lock_configuration.unwrap_or_default();
        if configuration
            .object_lock_enabled
            .as_ref()
            .is_none_or(|e| e.as_str() != ObjectLockEnabled::ENABLED)
        {
            return Err(S3Error::with_message(
                S3ErrorCode::MalformedXML,
                "ObjectLockEnabled must be Enabled: Object Lock cannot be turned off",
            ));
        }
        let default = match configuration.rule.and_then(|r| r.default_retention) {
            None => None,
            Some(default) => Some(default_retention(&default)?),
        };
        self.buckets
            .change_settings(&input.bucket, |current| {
                if current.versioning != Versioning::Enabled {
                    return Err(ModelError::InvalidBucketState(
                        "Versioning must be 'Enabled' on the bucket to apply a Object Lock configuration".into(),
                    ));
                }
                Ok(BucketSettings {
                    object_lock: true,
                    default_retention: default,
                    ..current.clone()
                })
            })
            .await
            .map_err(GatewayError::from)?;
        Ok(S3Response::new(PutObjectLockConfigurationOutput::default()))
    }

    pub(super) async fn get_object_lock_configuration_op(
        &self,
        req: S3Request<GetObjectLockConfigurationInput>,
    ) -> S3Result<S3Response<GetObjectLockConfigurationOutput>> {
        let settings = self.settings(&req.input.bucket).await?;
        if !settings.object_lock {
            return Err(S3Error::with_message(
                S3ErrorCode::ObjectLockConfigurationNotFoundError,
                "Object Lock configuration does not exist for this bucket",
            ));
        }
        let rule = settings.default_retention.map(|default| {
            let (days, years) = match default.period {
                RetentionPeriod::Days(n) => (Some(n as i32), None),
                RetentionPeriod::Years(n) => (None, Some(n as i32)),
            };
            ObjectLockRule {
                default_retention: Some(DefaultRetention {
                    mode: Some(ObjectLockRetentionMode::from_static(match default.mode {
                        RetentionMode::Compliance => ObjectLockRetentionMode::COMPLIANCE,
                        _ => ObjectLockRetentionMode::GOVERNANCE,
                    })),
                    days,
                    years,
                }),
            }
        });
        Ok(S3Response::new(GetObjectLockConfigurationOutput {
            object_lock_configuration: Some(ObjectLockConfiguration {
                object_lock_enabled: Some(ObjectLockEnabled::from_static(
                    ObjectLockEnabled::ENABLED,
                )),
                rule,
            }),
        }))
    }

    pub(super) async fn put_object_retention_op(
        &self,
        req: S3Request<PutObjectRetentionInput>,
    ) -> S3Result<S3Response<PutObjectRetentionOutput>> {
        let req_credentials = req.credentials;
        let input = req.input;
        self.lock_settings(&input.bucket).await?;
        let version = self
            .lockable_version(&input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        let asked = input.retention.unwrap_or_default();
        let retention = match (asked.mode, asked.retain_until_date) {
            (Some(mode), Some(until)) => future_retention(
                parse_mode(mode.as_str())?,
                unix_ms_of(&until),
                cairn_node::clock::now_unix_ms(),
            )?,
            (None, None) => {
                // Removing one that no longer holds changes nothing;
                // removing one that holds is for the guard to decide (a
                // governance retention yields to the bypass).
                let now = cairn_node::clock::now_unix_ms();
                let holds = version.retention.mode != RetentionMode::None
                    && version.retention.retain_until_unix_ms > now;
                if !holds {
                    return Ok(S3Response::new(PutObjectRetentionOutput::default()));
                }
                Retention::default()
            }
            _ => {
                return Err(S3Error::with_message(
                    S3ErrorCode::MalformedXML,
                    "a retention has both a Mode and a RetainUntilDate",
                ));
            }
        };
        let change = GuardChange::Retain {
            retention,
            at: self.objects.index().metadata().timestamp(),
            bypass_governance: self
                .bypass(
                    req_credentials.as_ref(),
                    input.bypass_governance_retention == Some(true),
                )
                .await?,
        };
        self.change_lock(&version, change).await?;
        Ok(S3Response::new(PutObjectRetentionOutput::default()))
    }

    pub(super) async fn get_object_retention_op(
        &self,
        req: S3Request<GetObjectRetentionInput>,
    ) -> S3Result<S3Response<GetObjectRetentionOutput>> {
        let input = req.input;
        self.lock_settings(&input.bucket).await?;
        let version = self
            .lockable_version(&input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        let (mode, until, _) = lock_fields(&version);
        let Some(mode) = mode else {
            return Err(S3Error::with_message(
                S3ErrorCode::NoSuchObjectLockConfiguration,
                "The specified object does not have a ObjectLock configuration",
            ));
        };
        Ok(S3Response::new(GetObjectRetentionOutput {
            retention: Some(ObjectLockRetention {
                mode: Some(ObjectLockRetentionMode::from(mode.as_str().to_owned())),
                retain_until_date: until,
            }),
        }))
    }

    pub(super) async fn put_object_legal_hold_op(
        &self,
        req: S3Request<PutObjectLegalHoldInput>,
    ) -> S3Result<S3Response<PutObjectLegalHoldOutput>> {
        let input = req.input;
        self.lock_settings(&input.bucket).await?;
        let on = match input
            .legal_hold
            .and_then(|h| h.status)
            .as_ref()
            .map(|s| s.as_str())
        {
            Some(ObjectLockLegalHoldStatus::ON) => true,
            Some(ObjectLockLegalHoldStatus::OFF) => false,
            _ => {
                return Err(S3Error::with_message(
                    S3ErrorCode::MalformedXML,
                    "a legal hold's Status is ON or OFF",
                ));
            }
        };
        let version = self
            .lockable_version(&input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        let at = self.objects.index().metadata().timestamp();
        self.change_lock(&version, GuardChange::LegalHold { on, at })
            .await?;
        Ok(S3Response::new(PutObjectLegalHoldOutput::default()))
    }

    pub(super) async fn get_object_legal_hold_op(
        &self,
        req: S3Request<GetObjectLegalHoldInput>,
    ) -> S3Result<S3Response<GetObjectLegalHoldOutput>> {
        let input = req.input;
        self.lock_settings(&input.bucket).await?;
        let version = self
            .lockable_version(&input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        let status = if version.legal_hold.value {
            ObjectLockLegalHoldStatus::ON
        } else {
            ObjectLockLegalHoldStatus::OFF
        };
        Ok(S3Response::new(GetObjectLegalHoldOutput {
            legal_hold: Some(ObjectLockLegalHold {
                status: Some(ObjectLockLegalHoldStatus::from_static(status)),
            }),
        }))
    }
}

/// A default retention as a PutObjectLockConfiguration states it: a mode
/// and either days or years, within S3's bounds.
fn default_retention(default: &DefaultRetention) -> Result<BucketDefaultRetention, GatewayError> {
    let mode = match default.mode.as_ref().map(|m| m.as_str()) {
        Some(mode) => parse_mode(mode)?,
        None => {
            return Err(GatewayError::InvalidArgument(
                "a default retention needs a Mode".into(),
            ));
        }
    };
    let period = match (default.days, default.years) {
        (Some(days), None) if (1..=MAX_DAYS).contains(&days) => RetentionPeriod::Days(days as u32),
        (None, Some(years)) if (1..=MAX_YEARS).contains(&years) => {
            RetentionPeriod::Years(years as u32)
        }
        (Some(_), Some(_)) | (None, None) => {
            return Err(GatewayError::InvalidArgument(
                "a default retention has either Days or Years".into(),
            ));
        }
        _ => {
            return Err(GatewayError::InvalidArgument(format!(
                "a default retention is 1 to {MAX_DAYS} days or 1 to {MAX_YEARS} years"
            )));
        }
    };
    Ok(BucketDefaultRetention { mode, period })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock_headers(mode: &str, until: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(MODE, mode.parse().unwrap());
        headers.insert(RETAIN_UNTIL, until.parse().unwrap());
        headers
    }

    #[test]
    fn retain_until_dates_are_future_and_within_year_9999_utc() {
        let uri: Uri = "/b/k".parse().unwrap();
        let now = 1_800_000_000_000;
        let refused = |mode: &str, until: &str| {
            crate::s3::errors::refused(requested_lock(&lock_headers(mode, until), &uri, now))
        };
        // Year 10000 in UTC, written as year 9999 with an offset.
        assert_eq!(
            refused("GOVERNANCE", "9999-12-31T23:59:59-23:59"),
            "InvalidArgument"
        );
        assert_eq!(
            refused("GOVERNANCE", "2020-01-01T00:00:00Z"),
            "InvalidArgument"
        );
        assert_eq!(
            refused("FOREVER", "2099-01-01T00:00:00Z"),
            "InvalidArgument"
        );
        assert!(refused("COMPLIANCE", "9999-12-31T23:59:59Z").starts_with("ok"));
        // What is stored answers without panicking, whatever it holds.
        let _ = timestamp_of(u64::MAX);
    }

    #[test]
    fn default_periods_stay_within_s3_bounds() {
        for (days, years) in [(Some(36_501), None), (None, Some(101)), (Some(-1), None)] {
            let default = DefaultRetention {
                mode: Some(ObjectLockRetentionMode::from_static(
                    ObjectLockRetentionMode::GOVERNANCE,
                )),
                days,
                years,
            };
            assert!(default_retention(&default).is_err(), "{days:?} {years:?}");
        }
        // The longest period does not overflow.
        assert!(period_ms(RetentionPeriod::Years(MAX_DEFAULT_YEARS)) > 0);
    }
}
