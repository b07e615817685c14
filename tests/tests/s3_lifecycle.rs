//! S3 lifecycle through aws-sdk-s3 against a real cluster (spec/versioning.md,
//! "Lifecycle"): the configuration calls and their refusals, and the
//! nodes' lifecycle workers applying the rules with lifecycle days of a
//! fraction of a second.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, BucketVersioningStatus,
    ExpirationStatus, LifecycleExpiration, LifecycleRule, LifecycleRuleAndOperator,
    LifecycleRuleFilter, NoncurrentVersionExpiration, ObjectLockMode, Tag, Transition,
    TransitionStorageClass, VersioningConfiguration,
};
use cairn_model::lifecycle::{LifecycleSettings, LifecycleWorker};
use cairn_protocol::status::LifecycleSummary;
use cairn_tests::Cluster;
use cairn_tests::s3::*;

/// A lifecycle day of 200 ms, passes back to back.
const QUICK_LIFECYCLE: LifecycleSettings = LifecycleSettings {
    every: Duration::from_millis(50),
    day: Duration::from_millis(200),
    clock_margin: Duration::ZERO,
    page_entries: 4096,
};

fn rule(id: &str, prefix: &str) -> aws_sdk_s3::types::builders::LifecycleRuleBuilder {
    LifecycleRule::builder()
        .id(id)
        .status(ExpirationStatus::Enabled)
        .filter(LifecycleRuleFilter::builder().prefix(prefix).build())
}

fn expire_after(days: i32) -> LifecycleExpiration {
    LifecycleExpiration::builder().days(days).build()
}

async fn put_rules(client: &Client, bucket: &str, rules: Vec<LifecycleRule>) -> String {
    let configuration = BucketLifecycleConfiguration::builder()
        .set_rules(Some(rules))
        .build()
        .unwrap();
    match client
        .put_bucket_lifecycle_configuration()
        .bucket(bucket)
        .lifecycle_configuration(configuration)
        .send()
        .await
    {
        Ok(_) => "ok".into(),
        Err(error) => code(&error.into_service_error()),
    }
}

async fn versioned_bucket(client: &Client, bucket: &str) {
    client.create_bucket().bucket(bucket).send().await.unwrap();
    client
        .put_bucket_versioning()
        .bucket(bucket)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
}

/// Every version of `key` (delete markers as `marker:`), newest first.
async fn versions_of(client: &Client, bucket: &str, key: &str) -> Vec<String> {
    let out = client
        .list_object_versions()
        .bucket(bucket)
        .prefix(key)
        .send()
        .await
        .unwrap();
    let mut all: Vec<(String, String)> = out
        .versions()
        .iter()
        .filter(|v| v.key() == Some(key))
        .map(|v| (v.version_id().unwrap().to_owned(), String::new()))
        .chain(
            out.delete_markers()
                .iter()
                .filter(|m| m.key() == Some(key))
                .map(|m| (m.version_id().unwrap().to_owned(), "marker:".to_owned())),
        )
        .collect();
    all.sort();
    all.into_iter().map(|(id, kind)| kind + &id).collect()
}

async fn exists(client: &Client, bucket: &str, key: &str) -> bool {
    client
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .is_ok()
}

/// Runs a lifecycle worker on every node until `done`, given their
/// summaries, holds after a pass of each (at most a minute); the workers'
/// summaries then.
async fn run_until<F, Fut>(cluster: &Cluster, mut done: F) -> Vec<LifecycleSummary>
where
    F: FnMut(Vec<LifecycleSummary>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut workers: Vec<LifecycleWorker> = (0..cluster.members.len())
        .map(|i| LifecycleWorker::start(cluster.node(i).handle(), QUICK_LIFECYCLE))
        .collect();
    let finished = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            for worker in workers.iter_mut() {
                worker.next_pass().await.expect("lifecycle runs");
            }
            if done(workers.iter().map(LifecycleWorker::status).collect()).await {
                return;
            }
        }
    })
    .await;
    let summaries = workers.iter().map(LifecycleWorker::status).collect();
    assert!(finished.is_ok(), "not done; workers: {summaries:?}");
    summaries
}

fn total(summaries: &[LifecycleSummary], field: fn(&LifecycleSummary) -> u64) -> u64 {
    summaries.iter().map(field).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_configurations_are_kept_answered_removed_and_checked() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("rules").send().await.unwrap();
    let no_configuration = c
        .get_bucket_lifecycle_configuration()
        .bucket("rules")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        code(&no_configuration.into_service_error()),
        "NoSuchLifecycleConfiguration"
    );
    let rules = vec![
        rule("logs", "logs/")
            .expiration(expire_after(30))
            .noncurrent_version_expiration(
                NoncurrentVersionExpiration::builder()
                    .noncurrent_days(7)
                    .newer_noncurrent_versions(2)
                    .build(),
            )
            .abort_incomplete_multipart_upload(
                AbortIncompleteMultipartUpload::builder()
                    .days_after_initiation(3)
                    .build(),
            )
            .build()
            .unwrap(),
        LifecycleRule::builder()
            .id("big")
            .status(ExpirationStatus::Disabled)
            .filter(
                LifecycleRuleFilter::builder()
                    .and(
                        LifecycleRuleAndOperator::builder()
                            .prefix("tmp/")
                            .object_size_greater_than(1024)
                            .build(),
                    )
                    .build(),
            )
            .expiration(
                LifecycleExpiration::builder()
                    .date(DateTime::from_secs(1_893_456_000))
                    .build(),
            )
            .build()
            .unwrap(),
    ];
    assert_eq!(put_rules(c, "rules", rules.clone()).await, "ok");
    let answered = c
        .get_bucket_lifecycle_configuration()
        .bucket("rules")
        .send()
        .await
        .unwrap();
    assert_eq!(answered.rules(), rules.as_slice());

    // Each refusal stores nothing: the rules above stay.
    let refused = [
        (
            "a transition",
            rule("t", "")
                .transitions(
                    Transition::builder()
                        .days(30)
                        .storage_class(TransitionStorageClass::Glacier)
                        .build(),
                )
                .build()
                .unwrap(),
            "NotImplemented",
        ),
        (
            "a tag filter",
            LifecycleRule::builder()
                .id("tags")
                .status(ExpirationStatus::Enabled)
                .filter(
                    LifecycleRuleFilter::builder()
                        .tag(Tag::builder().key("k").value("v").build().unwrap())
                        .build(),
                )
                .expiration(expire_after(1))
                .build()
                .unwrap(),
            "NotImplemented",
        ),
        (
            "zero days",
            rule("zero", "")
                .expiration(expire_after(0))
                .build()
                .unwrap(),
            "InvalidArgument",
        ),
        (
            "a date not at midnight",
            rule("noon", "")
                .expiration(
                    LifecycleExpiration::builder()
                        .date(DateTime::from_secs(1_893_456_000 + 43_200))
                        .build(),
                )
                .build()
                .unwrap(),
            "InvalidArgument",
        ),
        (
            "markers with days",
            rule("both", "")
                .expiration(
                    LifecycleExpiration::builder()
                        .days(1)
                        .expired_object_delete_marker(true)
                        .build(),
                )
                .build()
                .unwrap(),
            "InvalidArgument",
        ),
        (
            "no action",
            rule("idle", "").build().unwrap(),
            "InvalidRequest",
        ),
        (
            "too many newer versions",
            rule("many", "")
                .noncurrent_version_expiration(
                    NoncurrentVersionExpiration::builder()
                        .noncurrent_days(1)
                        .newer_noncurrent_versions(101)
                        .build(),
                )
                .build()
                .unwrap(),
            "InvalidArgument",
        ),
    ];
    for (what, bad, expected) in refused {
        assert_eq!(put_rules(c, "rules", vec![bad]).await, expected, "{what}");
    }
    let twice = vec![
        rule("same", "a/")
            .expiration(expire_after(1))
            .build()
            .unwrap(),
        rule("same", "b/")
            .expiration(expire_after(1))
            .build()
            .unwrap(),
    ];
    assert_eq!(put_rules(c, "rules", twice).await, "InvalidArgument");
    assert_eq!(
        put_rules(
            c,
            "no-such-bucket",
            vec![rule("r", "").expiration(expire_after(1)).build().unwrap()]
        )
        .await,
        "NoSuchBucket"
    );
    let still = c
        .get_bucket_lifecycle_configuration()
        .bucket("rules")
        .send()
        .await
        .unwrap();
    assert_eq!(still.rules(), rules.as_slice());

    c.delete_bucket_lifecycle()
        .bucket("rules")
        .send()
        .await
        .unwrap();
    let removed = c
        .get_bucket_lifecycle_configuration()
        .bucket("rules")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        code(&removed.into_service_error()),
        "NoSuchLifecycleConfiguration"
    );
    // A bucket deleted and created again starts without the old rules.
    assert_eq!(put_rules(c, "rules", rules).await, "ok");
    c.delete_bucket().bucket("rules").send().await.unwrap();
    c.create_bucket().bucket("rules").send().await.unwrap();
    let fresh = c
        .get_bucket_lifecycle_configuration()
        .bucket("rules")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        code(&fresh.into_service_error()),
        "NoSuchLifecycleConfiguration"
    );
    s.shutdown().await;
}

/// Expiration by days of the objects a prefix and a size name, in an
/// unversioned bucket; the others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiration_deletes_the_objects_its_filter_names_once_they_are_due() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("expire").send().await.unwrap();
    for key in ["logs/small", "logs/big", "keep/big"] {
        let body: &'static [u8] = if key.ends_with("big") {
            &[7; 4096]
        } else {
            &[7; 10]
        };
        put_bytes(c, "expire", key, body).await;
    }
    let filtered = LifecycleRule::builder()
        .id("big-logs")
        .status(ExpirationStatus::Enabled)
        .filter(
            LifecycleRuleFilter::builder()
                .and(
                    LifecycleRuleAndOperator::builder()
                        .prefix("logs/")
                        .object_size_greater_than(1000)
                        .build(),
                )
                .build(),
        )
        .expiration(expire_after(2))
        .build()
        .unwrap();
    assert_eq!(put_rules(c, "expire", vec![filtered]).await, "ok");
    let summaries = run_until(&s.cluster, |_| async {
        !exists(c, "expire", "logs/big").await
    })
    .await;
    assert!(exists(c, "expire", "logs/small").await);
    assert!(exists(c, "expire", "keep/big").await);
    assert_eq!(total(&summaries, |s| s.expired), 1);
    // What `cairn admin status` shows: the node's published summary.
    let mut published = 0;
    for i in 0..s.cluster.members.len() {
        let node = s.cluster.node(0).handle();
        let status = node.status(&s.cluster.node_ids()[i], false).await.unwrap();
        published += status.lifecycle.expired;
        assert!(status.lifecycle.passes > 0);
    }
    assert_eq!(published, 1);
    s.shutdown().await;
}

/// In a versioned bucket: the current version expires into a delete
/// marker, noncurrent versions go once due except the newest ones a rule
/// keeps, and a delete marker left alone is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versioned_expiration_adds_a_marker_trims_noncurrent_versions_and_removes_lone_markers() {
    let s = setup().await;
    let c = &s.client;
    versioned_bucket(c, "history").await;
    for body in [&b"one"[..], b"two", b"three"] {
        put_bytes(c, "history", "gone/k", body).await;
    }
    let mut kept = Vec::new();
    for body in [&b"a"[..], b"b", b"c", b"d"] {
        kept.push(put_bytes(c, "history", "kept/k", body).await.unwrap());
    }
    let rules = vec![
        rule("expire", "gone/")
            .expiration(expire_after(1))
            .noncurrent_version_expiration(
                NoncurrentVersionExpiration::builder()
                    .noncurrent_days(1)
                    .build(),
            )
            .build()
            .unwrap(),
        rule("markers", "gone/")
            .expiration(
                LifecycleExpiration::builder()
                    .expired_object_delete_marker(true)
                    .build(),
            )
            .build()
            .unwrap(),
        rule("trim", "kept/")
            .noncurrent_version_expiration(
                NoncurrentVersionExpiration::builder()
                    .noncurrent_days(1)
                    .newer_noncurrent_versions(2)
                    .build(),
            )
            .build()
            .unwrap(),
    ];
    assert_eq!(put_rules(c, "history", rules).await, "ok");
    let summaries = run_until(&s.cluster, |_| async {
        versions_of(c, "history", "gone/k").await.is_empty()
            && versions_of(c, "history", "kept/k").await.len() == 3
    })
    .await;
    // The current version and the two newest noncurrent ones of kept/k.
    let mut left = versions_of(c, "history", "kept/k").await;
    let mut expected = kept[1..].to_vec();
    left.sort();
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(total(&summaries, |s| s.expired), 1, "{summaries:?}");
    assert_eq!(total(&summaries, |s| s.markers_removed), 1, "{summaries:?}");
    // gone/k's three versions, kept/k's oldest.
    assert_eq!(
        total(&summaries, |s| s.noncurrent_expired),
        4,
        "{summaries:?}"
    );
    s.shutdown().await;
}

/// Lifecycle never deletes through an Object Lock, and aborts multipart
/// uploads left incomplete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_keeps_locked_versions_and_aborts_incomplete_uploads() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket()
        .bucket("guarded")
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .unwrap();
    let locked = c
        .put_object()
        .bucket("guarded")
        .key("k")
        .object_lock_mode(ObjectLockMode::Compliance)
        .object_lock_retain_until_date(DateTime::from_secs(4_000_000_000))
        .body(ByteStream::from_static(b"locked"))
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_owned();
    let newer = put_bytes(c, "guarded", "k", b"newer").await.unwrap();
    let upload = create_upload(c, "guarded", "parts/left").await;
    let rules = vec![
        rule("noncurrent", "")
            .noncurrent_version_expiration(
                NoncurrentVersionExpiration::builder()
                    .noncurrent_days(1)
                    .build(),
            )
            .abort_incomplete_multipart_upload(
                AbortIncompleteMultipartUpload::builder()
                    .days_after_initiation(1)
                    .build(),
            )
            .build()
            .unwrap(),
    ];
    assert_eq!(put_rules(c, "guarded", rules).await, "ok");
    let uploads_left = || async {
        c.list_multipart_uploads()
            .bucket("guarded")
            .send()
            .await
            .unwrap()
            .uploads()
            .len()
    };
    let summaries = run_until(&s.cluster, |summaries| async move {
        total(&summaries, |s| s.kept_by_lock) > 0 && uploads_left().await == 0
    })
    .await;
    assert_eq!(total(&summaries, |s| s.uploads_aborted), 1);
    assert_eq!(total(&summaries, |s| s.noncurrent_expired), 0);
    let left = versions_of(c, "guarded", "k").await;
    let mut expected = vec![locked, newer];
    expected.sort();
    assert_eq!(left, expected);
    let parts = c
        .list_parts()
        .bucket("guarded")
        .key("parts/left")
        .upload_id(&upload)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&parts.into_service_error()), "NoSuchUpload");
    s.shutdown().await;
}

/// Null versions (written unversioned and while suspended) are acted on
/// like the others: a noncurrent one goes, a lone null delete marker is
/// removed, a Date rule in the past expires the current null version into
/// a null marker; a disabled rule does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn null_versions_date_rules_and_disabled_rules() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("nulls").send().await.unwrap();
    put_bytes(c, "nulls", "s/k", b"null, unversioned").await;
    put_bytes(c, "nulls", "off/k", b"kept").await;
    let status = |status: BucketVersioningStatus| {
        c.put_bucket_versioning()
            .bucket("nulls")
            .versioning_configuration(VersioningConfiguration::builder().status(status).build())
            .send()
    };
    status(BucketVersioningStatus::Enabled).await.unwrap();
    put_bytes(c, "nulls", "s/k", b"own id").await;
    status(BucketVersioningStatus::Suspended).await.unwrap();
    // A null marker on top: [null marker, own id] (the null version is
    // replaced by the marker).
    c.delete_object()
        .bucket("nulls")
        .key("s/k")
        .send()
        .await
        .unwrap();
    put_bytes(c, "nulls", "d/k", b"null, suspended").await;
    let rules = vec![
        rule("noncurrent", "s/")
            .noncurrent_version_expiration(
                NoncurrentVersionExpiration::builder()
                    .noncurrent_days(1)
                    .build(),
            )
            .build()
            .unwrap(),
        rule("markers", "s/")
            .expiration(
                LifecycleExpiration::builder()
                    .expired_object_delete_marker(true)
                    .build(),
            )
            .build()
            .unwrap(),
        rule("dated", "d/")
            .expiration(
                LifecycleExpiration::builder()
                    .date(DateTime::from_secs(1_577_836_800))
                    .build(),
            )
            .build()
            .unwrap(),
        LifecycleRule::builder()
            .id("off")
            .status(ExpirationStatus::Disabled)
            .filter(LifecycleRuleFilter::builder().prefix("off/").build())
            .expiration(expire_after(1))
            .build()
            .unwrap(),
    ];
    assert_eq!(put_rules(c, "nulls", rules).await, "ok");
    let summaries = run_until(&s.cluster, |_| async {
        versions_of(c, "nulls", "s/k").await.is_empty() && !exists(c, "nulls", "d/k").await
    })
    .await;
    // d/k's null version became a null marker, the only version left.
    let left = versions_of(c, "nulls", "d/k").await;
    assert!(
        left.len() == 1 && left[0].starts_with("marker:"),
        "{left:?}"
    );
    assert!(exists(c, "nulls", "off/k").await);
    assert_eq!(total(&summaries, |s| s.expired), 1, "{summaries:?}");
    assert_eq!(total(&summaries, |s| s.markers_removed), 1, "{summaries:?}");
    assert_eq!(
        total(&summaries, |s| s.noncurrent_expired),
        1,
        "{summaries:?}"
    );
    s.shutdown().await;
}

/// A walk whose pages end inside a key sees each of its versions once, in
/// the key's order, even when a skewed gateway gave the newer version the
/// older id: a noncurrent rule deletes the noncurrent version, never the
/// current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_that_end_inside_a_key_never_make_the_current_version_noncurrent() {
    let Setup {
        cluster, gateway, ..
    } = setup().await;
    gateway.stop().await;
    let root = cairn_tests::random_secret();
    let on_time = gateway_on(&cluster, 0, root).await;
    let behind = cairn_gateway::Gateway::start(
        cluster.node(2).handle(),
        cairn_model::kms::RootKey::from_bytes(root),
        cairn_gateway::GatewayConfig {
            clock_skew_ms: -3_600_000,
            ..cairn_gateway::GatewayConfig::default()
        },
    )
    .await
    .unwrap();
    let key = on_time.keys().create("pages").await.unwrap();
    let c = client_for(&on_time, &key.id, &key.secret);
    let late = client_for(&behind, &key.id, &key.secret);
    versioned_bucket(&c, "pages").await;
    let older = put_bytes(&c, "pages", "k", b"older").await.unwrap();
    // Written second, with an id an hour older.
    let newer = put_bytes(&late, "pages", "k", b"newer").await.unwrap();
    let rules = vec![
        rule("noncurrent", "")
            .noncurrent_version_expiration(
                NoncurrentVersionExpiration::builder()
                    .noncurrent_days(1)
                    .build(),
            )
            .build()
            .unwrap(),
    ];
    assert_eq!(put_rules(&c, "pages", rules).await, "ok");
    let one_per_page = LifecycleSettings {
        page_entries: 1,
        ..QUICK_LIFECYCLE
    };
    let mut workers: Vec<LifecycleWorker> = (0..cluster.members.len())
        .map(|i| LifecycleWorker::start(cluster.node(i).handle(), one_per_page))
        .collect();
    let finished = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            for worker in workers.iter_mut() {
                worker.next_pass().await.expect("lifecycle runs");
            }
            if versions_of(&c, "pages", "k").await.len() < 2 {
                return;
            }
        }
    })
    .await;
    assert!(finished.is_ok());
    assert_eq!(versions_of(&c, "pages", "k").await, vec![newer.clone()]);
    let body = c
        .get_object()
        .bucket("pages")
        .key("k")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(body.as_ref(), b"newer");
    let _ = older;
    drop(workers);
    on_time.stop().await;
    behind.stop().await;
    cluster.shutdown().await;
}
