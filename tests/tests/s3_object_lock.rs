//! S3 Object Lock through aws-sdk-s3 against a real cluster: one test per
//! point of AWS's behaviour (spec/versioning.md, "Object Lock").

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    BucketVersioningStatus, DefaultRetention, ObjectLockConfiguration, ObjectLockEnabled,
    ObjectLockLegalHold, ObjectLockLegalHoldStatus, ObjectLockMode, ObjectLockRetention,
    ObjectLockRetentionMode, ObjectLockRule, VersioningConfiguration,
};
use cairn_tests::random_secret;
use cairn_tests::s3::*;

/// A date far enough ahead that no test reaches it.
fn far_future() -> DateTime {
    DateTime::from_secs(4_000_000_000)
}

fn farther_future() -> DateTime {
    DateTime::from_secs(4_100_000_000)
}

async fn lock_bucket(client: &Client, bucket: &str) {
    client
        .create_bucket()
        .bucket(bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .unwrap();
}

async fn put_version(client: &Client, bucket: &str, key: &str, body: &'static [u8]) -> String {
    put_bytes(client, bucket, key, body).await.unwrap()
}

async fn put_locked(
    client: &Client,
    bucket: &str,
    key: &str,
    mode: ObjectLockMode,
    until: DateTime,
) -> String {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .object_lock_mode(mode)
        .object_lock_retain_until_date(until)
        .body(ByteStream::from_static(b"locked bytes"))
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_owned()
}

/// DELETE of one version; the error code, or `ok`.
async fn delete_version(
    client: &Client,
    bucket: &str,
    key: &str,
    version: &str,
    bypass: bool,
) -> String {
    let mut delete = client
        .delete_object()
        .bucket(bucket)
        .key(key)
        .version_id(version);
    if bypass {
        delete = delete.bypass_governance_retention(true);
    }
    match delete.send().await {
        Ok(_) => "ok".into(),
        Err(error) => code(&error.into_service_error()),
    }
}

async fn retention_of(client: &Client, bucket: &str, key: &str, version: &str) -> (String, i64) {
    let out = client
        .get_object_retention()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .send()
        .await
        .unwrap();
    let retention = out.retention().unwrap();
    (
        retention.mode().unwrap().as_str().to_owned(),
        retention.retain_until_date().unwrap().secs(),
    )
}

async fn set_retention(
    client: &Client,
    bucket: &str,
    key: &str,
    version: &str,
    mode: ObjectLockRetentionMode,
    until: DateTime,
    bypass: bool,
) -> String {
    let mut put = client
        .put_object_retention()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .retention(
            ObjectLockRetention::builder()
                .mode(mode)
                .retain_until_date(until)
                .build(),
        );
    if bypass {
        put = put.bypass_governance_retention(true);
    }
    match put.send().await {
        Ok(_) => "ok".into(),
        Err(error) => code(&error.into_service_error()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn object_lock_is_enabled_at_creation_or_on_a_versioned_bucket_and_never_off() {
    let s = setup().await;
    let c = &s.client;
    lock_bucket(c, "locked").await;
    let versioning = c
        .get_bucket_versioning()
        .bucket("locked")
        .send()
        .await
        .unwrap();
    assert_eq!(versioning.status(), Some(&BucketVersioningStatus::Enabled));
    let configuration = c
        .get_object_lock_configuration()
        .bucket("locked")
        .send()
        .await
        .unwrap();
    assert_eq!(
        configuration
            .object_lock_configuration()
            .unwrap()
            .object_lock_enabled(),
        Some(&ObjectLockEnabled::Enabled)
    );
    // Versioning cannot be suspended under Object Lock.
    let error = c
        .put_bucket_versioning()
        .bucket("locked")
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Suspended)
                .build(),
        )
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "InvalidBucketState");

    // A bucket without it says so; an unversioned one cannot get it.
    c.create_bucket().bucket("plain").send().await.unwrap();
    let error = c
        .get_object_lock_configuration()
        .bucket("plain")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "ObjectLockConfigurationNotFoundError");
    let enable = || {
        c.put_object_lock_configuration()
            .bucket("plain")
            .object_lock_configuration(
                ObjectLockConfiguration::builder()
                    .object_lock_enabled(ObjectLockEnabled::Enabled)
                    .build(),
            )
            .send()
    };
    let error = enable().await.unwrap_err().into_service_error();
    assert_eq!(code(&error), "InvalidBucketState");
    c.put_bucket_versioning()
        .bucket("plain")
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
    enable().await.unwrap();
    let configuration = c
        .get_object_lock_configuration()
        .bucket("plain")
        .send()
        .await
        .unwrap();
    assert!(configuration.object_lock_configuration().is_some());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_default_retention_locks_new_versions_and_leaves_existing_ones() {
    let s = setup().await;
    let c = &s.client;
    lock_bucket(c, "defaults").await;
    let before = put_version(c, "defaults", "k", b"before any default").await;
    let set_default = |mode: ObjectLockRetentionMode, days: Option<i32>, years: Option<i32>| {
        c.put_object_lock_configuration()
            .bucket("defaults")
            .object_lock_configuration(
                ObjectLockConfiguration::builder()
                    .object_lock_enabled(ObjectLockEnabled::Enabled)
                    .rule(
                        ObjectLockRule::builder()
                            .default_retention(
                                DefaultRetention::builder()
                                    .mode(mode)
                                    .set_days(days)
                                    .set_years(years)
                                    .build(),
                            )
                            .build(),
                    )
                    .build(),
            )
            .send()
    };
    // Days and years together, or neither, are refused.
    for (days, years) in [(Some(1), Some(1)), (None, None), (Some(0), None)] {
        let error = set_default(ObjectLockRetentionMode::Governance, days, years)
            .await
            .unwrap_err()
            .into_service_error();
        assert_eq!(code(&error), "InvalidArgument", "{days:?} {years:?}");
    }
    set_default(ObjectLockRetentionMode::Compliance, Some(2), None)
        .await
        .unwrap();
    let shown = c
        .get_object_lock_configuration()
        .bucket("defaults")
        .send()
        .await
        .unwrap();
    let default = shown
        .object_lock_configuration()
        .unwrap()
        .rule()
        .unwrap()
        .default_retention()
        .unwrap();
    assert_eq!(default.mode(), Some(&ObjectLockRetentionMode::Compliance));
    assert_eq!(default.days(), Some(2));

    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let after = put_version(c, "defaults", "k", b"under the default").await;
    let (mode, until) = retention_of(c, "defaults", "k", &after).await;
    assert_eq!(mode, "COMPLIANCE");
    assert!(
        (start + 2 * 86_400 - 5..=start + 2 * 86_400 + 60).contains(&until),
        "{until} vs {start}"
    );
    assert_eq!(
        delete_version(c, "defaults", "k", &after, true).await,
        "AccessDenied"
    );
    // The version from before has no retention and goes.
    let error = c
        .get_object_retention()
        .bucket("defaults")
        .key("k")
        .version_id(&before)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "NoSuchObjectLockConfiguration");
    assert_eq!(
        delete_version(c, "defaults", "k", &before, false).await,
        "ok"
    );
    // Explicit headers win over the default.
    let explicit = put_locked(c, "defaults", "e", ObjectLockMode::Governance, far_future()).await;
    assert_eq!(
        retention_of(c, "defaults", "e", &explicit).await,
        ("GOVERNANCE".to_owned(), far_future().secs())
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_headers_are_checked_and_refused_on_a_bucket_without_object_lock() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("plain").send().await.unwrap();
    lock_bucket(c, "locked").await;
    let put = |bucket: &'static str| {
        c.put_object()
            .bucket(bucket)
            .key("k")
            .body(ByteStream::from_static(b"must not be stored"))
    };
    let error = put("plain")
        .object_lock_mode(ObjectLockMode::Governance)
        .object_lock_retain_until_date(far_future())
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "InvalidRequest");
    let error = put("plain")
        .object_lock_legal_hold_status(ObjectLockLegalHoldStatus::On)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "InvalidRequest");
    let cases = [
        (
            "a date in the past",
            put("locked")
                .object_lock_mode(ObjectLockMode::Governance)
                .object_lock_retain_until_date(DateTime::from_secs(1_000_000_000))
                .send()
                .await,
        ),
        (
            "a mode without a date",
            put("locked")
                .object_lock_mode(ObjectLockMode::Compliance)
                .send()
                .await,
        ),
        (
            "a date without a mode",
            put("locked")
                .object_lock_retain_until_date(far_future())
                .send()
                .await,
        ),
    ];
    for (what, outcome) in cases {
        assert_eq!(
            code(&outcome.unwrap_err().into_service_error()),
            "InvalidArgument",
            "{what}"
        );
    }
    for bucket in ["plain", "locked"] {
        let listed = c
            .list_object_versions()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        assert!(listed.versions().is_empty(), "{bucket}");
    }
    // A multipart upload on a bucket without Object Lock too.
    let error = c
        .create_multipart_upload()
        .bucket("plain")
        .key("k")
        .object_lock_mode(ObjectLockMode::Governance)
        .object_lock_retain_until_date(far_future())
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "InvalidRequest");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_version_stays_while_new_puts_and_delete_markers_go_on() {
    let s = setup().await;
    let c = &s.client;
    lock_bucket(c, "vault").await;
    let locked = put_locked(c, "vault", "k", ObjectLockMode::Compliance, far_future()).await;
    assert_eq!(
        delete_version(c, "vault", "k", &locked, false).await,
        "AccessDenied"
    );
    // A new version and a delete marker are still allowed.
    let newer = put_version(c, "vault", "k", b"newer").await;
    assert_eq!(get_bytes(c, "vault", "k").await, b"newer");
    let marker = c
        .delete_object()
        .bucket("vault")
        .key("k")
        .send()
        .await
        .unwrap();
    assert_eq!(marker.delete_marker(), Some(true));
    // Markers cannot be locked.
    let error = c
        .put_object_legal_hold()
        .bucket("vault")
        .key("k")
        .version_id(marker.version_id().unwrap())
        .legal_hold(
            ObjectLockLegalHold::builder()
                .status(ObjectLockLegalHoldStatus::On)
                .build(),
        )
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "MethodNotAllowed");
    // HEAD and GET of the locked version show the lock.
    let head = c
        .head_object()
        .bucket("vault")
        .key("k")
        .version_id(&locked)
        .send()
        .await
        .unwrap();
    assert_eq!(head.object_lock_mode(), Some(&ObjectLockMode::Compliance));
    assert_eq!(
        head.object_lock_retain_until_date().map(|d| d.secs()),
        Some(far_future().secs())
    );
    let get = c
        .get_object()
        .bucket("vault")
        .key("k")
        .version_id(&locked)
        .send()
        .await
        .unwrap();
    assert_eq!(get.object_lock_mode(), Some(&ObjectLockMode::Compliance));
    assert_eq!(
        get.body.collect().await.unwrap().into_bytes().as_ref(),
        b"locked bytes"
    );
    // The unlocked ones go; the bucket still cannot.
    assert_eq!(delete_version(c, "vault", "k", &newer, false).await, "ok");
    assert_eq!(
        delete_version(c, "vault", "k", marker.version_id().unwrap(), false).await,
        "ok"
    );
    let error = c
        .delete_bucket()
        .bucket("vault")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "BucketNotEmpty");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn governance_yields_to_the_bypass_and_compliance_to_nothing() {
    let s = setup().await;
    let c = &s.client;
    lock_bucket(c, "modes").await;
    let governed = put_locked(c, "modes", "g", ObjectLockMode::Governance, far_future()).await;
    let compliant = put_locked(c, "modes", "c", ObjectLockMode::Compliance, far_future()).await;

    // Governance: extending is allowed; shortening without the bypass is
    // refused; deleting needs the bypass.
    assert_eq!(
        set_retention(
            c,
            "modes",
            "g",
            &governed,
            ObjectLockRetentionMode::Governance,
            farther_future(),
            false
        )
        .await,
        "ok"
    );
    assert_eq!(
        set_retention(
            c,
            "modes",
            "g",
            &governed,
            ObjectLockRetentionMode::Governance,
            far_future(),
            false
        )
        .await,
        "AccessDenied"
    );
    assert_eq!(
        delete_version(c, "modes", "g", &governed, false).await,
        "AccessDenied"
    );
    assert_eq!(delete_version(c, "modes", "g", &governed, true).await, "ok");
    // Gone for good: no longer readable or listed.
    let error = c
        .get_object()
        .bucket("modes")
        .key("g")
        .version_id(&governed)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "NoSuchVersion");
    let listed = c
        .list_object_versions()
        .bucket("modes")
        .prefix("g")
        .send()
        .await
        .unwrap();
    assert!(listed.versions().is_empty());

    // Compliance: no shortening, no switch to governance, no bypass;
    // extending is allowed.
    assert_eq!(
        set_retention(
            c,
            "modes",
            "c",
            &compliant,
            ObjectLockRetentionMode::Compliance,
            DateTime::from_secs(3_900_000_000),
            true
        )
        .await,
        "AccessDenied"
    );
    assert_eq!(
        set_retention(
            c,
            "modes",
            "c",
            &compliant,
            ObjectLockRetentionMode::Governance,
            farther_future(),
            true
        )
        .await,
        "AccessDenied"
    );
    assert_eq!(
        delete_version(c, "modes", "c", &compliant, true).await,
        "AccessDenied"
    );
    assert_eq!(
        set_retention(
            c,
            "modes",
            "c",
            &compliant,
            ObjectLockRetentionMode::Compliance,
            farther_future(),
            false
        )
        .await,
        "ok"
    );
    assert_eq!(
        retention_of(c, "modes", "c", &compliant).await,
        ("COMPLIANCE".to_owned(), farther_future().secs())
    );
    assert_eq!(
        delete_version(c, "modes", "c", &compliant, true).await,
        "AccessDenied"
    );
    // A governance version can be made compliance.
    let upgraded = put_locked(c, "modes", "u", ObjectLockMode::Governance, far_future()).await;
    assert_eq!(
        set_retention(
            c,
            "modes",
            "u",
            &upgraded,
            ObjectLockRetentionMode::Compliance,
            far_future(),
            false
        )
        .await,
        "ok"
    );
    assert_eq!(
        delete_version(c, "modes", "u", &upgraded, true).await,
        "AccessDenied"
    );
    s.shutdown().await;
}

/// A governance retention is shortened or removed with the bypass (and
/// only with it), and stays so on every replica and on the head; a
/// compliance one never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bypass_shortens_or_removes_a_governance_retention_never_a_compliance_one() {
    let s = setup().await;
    let c = &s.client;
    lock_bucket(c, "shorten").await;
    let governed = put_locked(
        c,
        "shorten",
        "g",
        ObjectLockMode::Governance,
        farther_future(),
    )
    .await;
    let compliant = put_locked(
        c,
        "shorten",
        "c",
        ObjectLockMode::Compliance,
        farther_future(),
    )
    .await;
    let shorten = |key: &'static str, version: String, bypass: bool| async move {
        set_retention(
            c,
            "shorten",
            key,
            &version,
            ObjectLockRetentionMode::Governance,
            far_future(),
            bypass,
        )
        .await
    };
    assert_eq!(shorten("g", governed.clone(), false).await, "AccessDenied");
    assert_eq!(shorten("g", governed.clone(), true).await, "ok");
    assert_eq!(
        retention_of(c, "shorten", "g", &governed).await,
        ("GOVERNANCE".to_owned(), far_future().secs())
    );
    // The head (what HEAD of the latest version reads) agrees.
    let head = c
        .head_object()
        .bucket("shorten")
        .key("g")
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.object_lock_retain_until_date().map(|d| d.secs()),
        Some(far_future().secs())
    );
    // Extending again is a later decision: it wins as well.
    assert_eq!(
        set_retention(
            c,
            "shorten",
            "g",
            &governed,
            ObjectLockRetentionMode::Governance,
            farther_future(),
            false
        )
        .await,
        "ok"
    );
    assert_eq!(
        retention_of(c, "shorten", "g", &governed).await,
        ("GOVERNANCE".to_owned(), farther_future().secs())
    );
    // Removing: refused without the bypass, done with it.
    let remove = |bypass: bool| {
        let mut put = c
            .put_object_retention()
            .bucket("shorten")
            .key("g")
            .version_id(&governed)
            .retention(ObjectLockRetention::builder().build());
        if bypass {
            put = put.bypass_governance_retention(true);
        }
        put.send()
    };
    assert_eq!(
        code(&remove(false).await.unwrap_err().into_service_error()),
        "AccessDenied"
    );
    remove(true).await.unwrap();
    let gone = c
        .get_object_retention()
        .bucket("shorten")
        .key("g")
        .version_id(&governed)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        code(&gone.into_service_error()),
        "NoSuchObjectLockConfiguration"
    );
    // Without a retention, the version is deleted without the bypass.
    assert_eq!(
        delete_version(c, "shorten", "g", &governed, false).await,
        "ok"
    );
    // Compliance yields to nothing.
    assert_eq!(shorten("c", compliant.clone(), true).await, "AccessDenied");
    assert_eq!(
        set_retention(
            c,
            "shorten",
            "c",
            &compliant,
            ObjectLockRetentionMode::Compliance,
            far_future(),
            true
        )
        .await,
        "AccessDenied"
    );
    assert_eq!(
        retention_of(c, "shorten", "c", &compliant).await,
        ("COMPLIANCE".to_owned(), farther_future().secs())
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_legal_hold_blocks_deletion_until_it_is_lifted() {
    let s = setup().await;
    let c = &s.client;
    lock_bucket(c, "holds").await;
    let held = c
        .put_object()
        .bucket("holds")
        .key("k")
        .object_lock_legal_hold_status(ObjectLockLegalHoldStatus::On)
        .body(ByteStream::from_static(b"held"))
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_owned();
    let hold_of = |version: String| async move {
        c.get_object_legal_hold()
            .bucket("holds")
            .key("k")
            .version_id(version)
            .send()
            .await
            .unwrap()
            .legal_hold()
            .unwrap()
            .status()
            .unwrap()
            .clone()
    };
    assert_eq!(hold_of(held.clone()).await, ObjectLockLegalHoldStatus::On);
    // No retention, and still no delete, bypass or not.
    assert_eq!(
        delete_version(c, "holds", "k", &held, true).await,
        "AccessDenied"
    );
    let set_hold = |status: ObjectLockLegalHoldStatus| {
        c.put_object_legal_hold()
            .bucket("holds")
            .key("k")
            .version_id(&held)
            .legal_hold(ObjectLockLegalHold::builder().status(status).build())
            .send()
    };
    set_hold(ObjectLockLegalHoldStatus::Off).await.unwrap();
    assert_eq!(hold_of(held.clone()).await, ObjectLockLegalHoldStatus::Off);
    set_hold(ObjectLockLegalHoldStatus::On).await.unwrap();
    // HEAD of the latest version shows the hold set after its write, and
    // a retention added since.
    let latest = c
        .head_object()
        .bucket("holds")
        .key("k")
        .send()
        .await
        .unwrap();
    assert_eq!(
        latest.object_lock_legal_hold_status(),
        Some(&ObjectLockLegalHoldStatus::On)
    );
    assert_eq!(
        set_retention(
            c,
            "holds",
            "k",
            &held,
            ObjectLockRetentionMode::Governance,
            far_future(),
            false
        )
        .await,
        "ok"
    );
    let latest = c
        .head_object()
        .bucket("holds")
        .key("k")
        .send()
        .await
        .unwrap();
    assert_eq!(latest.object_lock_mode(), Some(&ObjectLockMode::Governance));
    assert_eq!(
        delete_version(c, "holds", "k", &held, true).await,
        "AccessDenied"
    );
    assert_eq!(
        delete_version(c, "holds", "k", &held, false).await,
        "AccessDenied"
    );
    set_hold(ObjectLockLegalHoldStatus::Off).await.unwrap();
    assert_eq!(
        delete_version(c, "holds", "k", &held, false).await,
        "AccessDenied"
    );
    assert_eq!(delete_version(c, "holds", "k", &held, true).await, "ok");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_and_multipart_uploads_take_their_own_lock() {
    let s = setup().await;
    let c = &s.client;
    lock_bucket(c, "sources").await;
    let source = put_locked(
        c,
        "sources",
        "src",
        ObjectLockMode::Compliance,
        far_future(),
    )
    .await;
    // A copy does not inherit the source's lock; it takes its own.
    let copied = c
        .copy_object()
        .bucket("sources")
        .key("copy")
        .copy_source(format!("sources/src?versionId={source}"))
        .object_lock_mode(ObjectLockMode::Governance)
        .object_lock_retain_until_date(farther_future())
        .send()
        .await
        .unwrap();
    let copy_version = copied.version_id().unwrap().to_owned();
    assert_eq!(
        retention_of(c, "sources", "copy", &copy_version).await,
        ("GOVERNANCE".to_owned(), farther_future().secs())
    );
    let upload = c
        .create_multipart_upload()
        .bucket("sources")
        .key("mp")
        .object_lock_mode(ObjectLockMode::Compliance)
        .object_lock_retain_until_date(far_future())
        .object_lock_legal_hold_status(ObjectLockLegalHoldStatus::On)
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned();
    let part = c
        .upload_part()
        .bucket("sources")
        .key("mp")
        .upload_id(&upload)
        .part_number(1)
        .body(ByteStream::from_static(b"multipart locked"))
        .send()
        .await
        .unwrap();
    let etag = part.e_tag().unwrap().to_owned();
    let completed = complete_upload(c, "sources", "mp", &upload, &[(1, etag.as_str())])
        .await
        .unwrap();
    let version = completed.version_id().unwrap().to_owned();
    assert_eq!(
        retention_of(c, "sources", "mp", &version).await,
        ("COMPLIANCE".to_owned(), far_future().secs())
    );
    let head = c
        .head_object()
        .bucket("sources")
        .key("mp")
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.object_lock_legal_hold_status(),
        Some(&ObjectLockLegalHoldStatus::On)
    );
    // The lock is no stored header an answer shows.
    assert!(head.metadata().is_none_or(|m| m.is_empty()));
    assert_eq!(
        delete_version(c, "sources", "mp", &version, true).await,
        "AccessDenied"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compliance_lock_survives_the_restart_of_every_node() {
    // A gateway whose KMS root key the test keeps, to read after restarts.
    let Setup {
        mut cluster,
        gateway,
        ..
    } = setup().await;
    gateway.stop().await;
    let root = random_secret();
    let gateway = gateway_on(&cluster, 1, root).await;
    let key = gateway
        .keys()
        .create_with(
            "restart",
            cairn_protocol::records::permission::BYPASS_GOVERNANCE,
        )
        .await
        .unwrap();
    let c = client_for(&gateway, &key.id, &key.secret);
    lock_bucket(&c, "durable").await;
    let locked = put_locked(&c, "durable", "k", ObjectLockMode::Compliance, far_future()).await;
    gateway.stop().await;
    for node in 0..cluster.members.len() {
        cluster.stop(node).await;
    }
    for node in 0..cluster.members.len() {
        cluster.restart(node).await.unwrap();
    }
    let gateway = gateway_on(&cluster, 1, root).await;
    let c = client_for(&gateway, &key.id, &key.secret);
    assert_eq!(
        delete_version(&c, "durable", "k", &locked, true).await,
        "AccessDenied"
    );
    assert_eq!(
        retention_of(&c, "durable", "k", &locked).await,
        ("COMPLIANCE".to_owned(), far_future().secs())
    );
    let body = c
        .get_object()
        .bucket("durable")
        .key("k")
        .version_id(&locked)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(body.as_ref(), b"locked bytes");
    gateway.stop().await;
    cluster.shutdown().await;
}

/// A presigned URL grants what its signer signed: an Object Lock or a
/// governance bypass header added by whoever holds the URL is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presigned_urls_refuse_lock_and_bypass_headers_they_did_not_sign() {
    let s = setup().await;
    let c = &s.client;
    lock_bucket(c, "signed").await;
    let uri = presigned_put(c, "signed", "k").await;
    let answer = raw_request(
        s.gateway.address(),
        "PUT",
        &uri,
        &s.gateway.address().to_string(),
        "x-amz-object-lock-mode: COMPLIANCE\r\nx-amz-object-lock-retain-until-date: 2099-01-01T00:00:00Z\r\nContent-MD5: kAFQmDzST7DWlj99KOF/cg==\r\n",
        b"abc",
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("x-amz-object-lock-mode"), "{answer}");
    let listed = c
        .list_object_versions()
        .bucket("signed")
        .send()
        .await
        .unwrap();
    assert!(listed.versions().is_empty());
    s.shutdown().await;
}

/// Creations of one name racing through two gateways, one asking for
/// Object Lock: exactly one creates the bucket, and a creation answered
/// 200 with Object Lock leaves a bucket that has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_creations_of_one_name_create_one_bucket_with_its_lock() {
    let Setup {
        cluster, gateway, ..
    } = setup().await;
    gateway.stop().await;
    let root = random_secret();
    let first = gateway_on(&cluster, 0, root).await;
    let second = gateway_on(&cluster, 3, root).await;
    let key = first.keys().create("racers").await.unwrap();
    let locking = client_for(&first, &key.id, &key.secret);
    let plain = client_for(&second, &key.id, &key.secret);
    for round in 0..10 {
        let name = format!("race-{round}");
        let (with_lock, without) = tokio::join!(
            locking
                .create_bucket()
                .bucket(&name)
                .object_lock_enabled_for_bucket(true)
                .send(),
            plain.create_bucket().bucket(&name).send(),
        );
        let created: Vec<bool> = [with_lock.is_ok(), without.is_ok()].into();
        assert_eq!(
            created.iter().filter(|c| **c).count(),
            1,
            "round {round}: {with_lock:?} {without:?}"
        );
        for refused in [
            with_lock.err().map(|e| code(&e.into_service_error())),
            without.err().map(|e| code(&e.into_service_error())),
        ]
        .into_iter()
        .flatten()
        {
            assert!(
                refused == "OperationAborted" || refused == "BucketAlreadyOwnedByYou",
                "round {round}: {refused}"
            );
        }
        let configuration = locking
            .get_object_lock_configuration()
            .bucket(&name)
            .send()
            .await;
        assert_eq!(configuration.is_ok(), created[0], "round {round}");
    }
    // A name deleted is free again at once.
    locking
        .create_bucket()
        .bucket("again")
        .send()
        .await
        .unwrap();
    locking
        .delete_bucket()
        .bucket("again")
        .send()
        .await
        .unwrap();
    lock_bucket(&plain, "again").await;
    assert!(
        plain
            .get_object_lock_configuration()
            .bucket("again")
            .send()
            .await
            .is_ok()
    );
    first.stop().await;
    second.stop().await;
    cluster.shutdown().await;
}

/// The governance bypass is a permission of the access key: a key made
/// without it is refused, 403, whenever it asks for the bypass, and
/// nothing changes; without the header it is an ordinary request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_key_with_the_permission_bypasses_governance() {
    let s = setup().await;
    lock_bucket(&s.client, "permitted").await;
    let governed = put_locked(
        &s.client,
        "permitted",
        "g",
        ObjectLockMode::Governance,
        farther_future(),
    )
    .await;
    let plain = put_version(&s.client, "permitted", "p", b"plain").await;
    let key = s.gateway.keys().create("no bypass").await.unwrap();
    let c = client_for(&s.gateway, &key.id, &key.secret);
    assert_eq!(
        delete_version(&c, "permitted", "g", &governed, true).await,
        "AccessDenied"
    );
    assert_eq!(
        set_retention(
            &c,
            "permitted",
            "g",
            &governed,
            ObjectLockRetentionMode::Governance,
            far_future(),
            true
        )
        .await,
        "AccessDenied"
    );
    // Refused even where nothing holds: the key asked for what it may not.
    assert_eq!(
        delete_version(&c, "permitted", "p", &plain, true).await,
        "AccessDenied"
    );
    assert_eq!(
        retention_of(&s.client, "permitted", "g", &governed).await,
        ("GOVERNANCE".to_owned(), farther_future().secs())
    );
    // Without the header the same key works as any other.
    assert_eq!(
        delete_version(&c, "permitted", "p", &plain, false).await,
        "ok"
    );
    // The key of the setup has the permission.
    assert_eq!(
        delete_version(&s.client, "permitted", "g", &governed, true).await,
        "ok"
    );
    s.shutdown().await;
}
