//! S3 versioning through aws-sdk-s3 against a real cluster: one test per
//! point of AWS's behaviour (spec/versioning.md).

use aws_sdk_s3::Client;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketVersioningStatus, CompletedMultipartUpload, VersioningConfiguration,
};
use cairn_model::heads::{DeleteCondition, HeadWrite, ObjectIndex, WriteCondition};
use cairn_protocol::version::{Lww, ObjectVersion, Retention, VersionBody};
use cairn_tests::random_secret;
use cairn_tests::s3::*;
use std::time::Duration;

async fn set_versioning(client: &Client, bucket: &str, status: BucketVersioningStatus) {
    client
        .put_bucket_versioning()
        .bucket(bucket)
        .versioning_configuration(VersioningConfiguration::builder().status(status).build())
        .send()
        .await
        .unwrap();
}

async fn versioning_status(client: &Client, bucket: &str) -> Option<String> {
    client
        .get_bucket_versioning()
        .bucket(bucket)
        .send()
        .await
        .unwrap()
        .status()
        .map(|s| s.as_str().to_owned())
}

async fn get_version(client: &Client, bucket: &str, key: &str, version: &str) -> Vec<u8> {
    let object = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .send()
        .await
        .unwrap();
    object.body.collect().await.unwrap().into_bytes().to_vec()
}

/// One entry of ListObjectVersions.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    key: String,
    version: String,
    latest: bool,
    marker: bool,
}

/// One page of ListObjectVersions: entries in key order (versions and
/// markers merged; within a key newest first as listed), common prefixes,
/// and the next markers.
struct VersionsPage {
    entries: Vec<Listed>,
    prefixes: Vec<String>,
    next: Option<(String, Option<String>)>,
}

async fn list_versions_page(
    client: &Client,
    bucket: &str,
    prefix: Option<&str>,
    delimiter: Option<&str>,
    markers: Option<(String, Option<String>)>,
    max_keys: Option<i32>,
) -> VersionsPage {
    let (key_marker, version_marker) = match markers {
        Some((k, v)) => (Some(k), v),
        None => (None, None),
    };
    let out = client
        .list_object_versions()
        .bucket(bucket)
        .set_prefix(prefix.map(str::to_owned))
        .set_delimiter(delimiter.map(str::to_owned))
        .set_key_marker(key_marker)
        .set_version_id_marker(version_marker)
        .set_max_keys(max_keys)
        .send()
        .await
        .unwrap();
    let mut entries: Vec<(usize, Listed)> = Vec::new();
    // The XML lists versions and markers apart; the order within a key is
    // rebuilt from LastModified, newest first, ties by listing order.
    for v in out.versions() {
        entries.push((
            entries.len(),
            Listed {
                key: v.key().unwrap().to_owned(),
                version: v.version_id().unwrap().to_owned(),
                latest: v.is_latest().unwrap(),
                marker: false,
            },
        ));
    }
    for m in out.delete_markers() {
        entries.push((
            entries.len(),
            Listed {
                key: m.key().unwrap().to_owned(),
                version: m.version_id().unwrap().to_owned(),
                latest: m.is_latest().unwrap(),
                marker: true,
            },
        ));
    }
    let next = out.is_truncated().unwrap().then(|| {
        (
            out.next_key_marker().unwrap().to_owned(),
            out.next_version_id_marker().map(str::to_owned),
        )
    });
    VersionsPage {
        entries: entries.into_iter().map(|(_, l)| l).collect(),
        prefixes: out
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix().map(str::to_owned))
            .collect(),
        next,
    }
}

/// Every version of every key, as `(key, version, latest, marker)`,
/// grouped by key, each key's entries as listed.
async fn all_versions(client: &Client, bucket: &str) -> Vec<Listed> {
    let page = list_versions_page(client, bucket, None, None, None, None).await;
    assert!(page.next.is_none());
    let mut entries = page.entries;
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    entries
}

/// The `x-amz-delete-marker` header of a refusal.
fn marker_header<E>(error: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<String> {
    error
        .raw_response()
        .and_then(|r| r.headers().get("x-amz-delete-marker"))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versioning_states_go_from_unversioned_to_enabled_and_suspended_never_back() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("states").send().await.unwrap();
    assert_eq!(versioning_status(c, "states").await, None);
    set_versioning(c, "states", BucketVersioningStatus::Enabled).await;
    assert_eq!(
        versioning_status(c, "states").await.as_deref(),
        Some("Enabled")
    );
    set_versioning(c, "states", BucketVersioningStatus::Suspended).await;
    assert_eq!(
        versioning_status(c, "states").await.as_deref(),
        Some("Suspended")
    );
    // There is no status that goes back.
    let error = c
        .put_bucket_versioning()
        .bucket("states")
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::from("Unversioned"))
                .build(),
        )
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "MalformedXML");
    assert_eq!(
        versioning_status(c, "states").await.as_deref(),
        Some("Suspended")
    );
    let error = c
        .get_bucket_versioning()
        .bucket("no-such-bucket")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "NoSuchBucket");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enabled_puts_get_new_ids_and_objects_from_before_keep_the_null_version() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("history").send().await.unwrap();
    // An unversioned bucket names no versions.
    assert_eq!(put_bytes(c, "history", "k", b"before").await, None);
    set_versioning(c, "history", BucketVersioningStatus::Enabled).await;
    let v1 = put_bytes(c, "history", "k", b"one").await.unwrap();
    let v2 = put_bytes(c, "history", "k", b"two").await.unwrap();
    assert!(v1 != v2 && v1 != "null" && v2 != "null");
    assert_eq!(get_bytes(c, "history", "k").await, b"two");
    assert_eq!(get_version(c, "history", "k", &v1).await, b"one");
    assert_eq!(get_version(c, "history", "k", &v2).await, b"two");
    assert_eq!(get_version(c, "history", "k", "null").await, b"before");
    let head = c
        .head_object()
        .bucket("history")
        .key("k")
        .version_id(&v1)
        .send()
        .await
        .unwrap();
    assert_eq!(head.version_id(), Some(v1.as_str()));
    assert_eq!(head.content_length(), Some(3));
    // A range of an older version.
    let ranged = c
        .get_object()
        .bucket("history")
        .key("k")
        .version_id("null")
        .range("bytes=1-3")
        .send()
        .await
        .unwrap();
    assert_eq!(
        ranged.body.collect().await.unwrap().into_bytes().as_ref(),
        b"efo"
    );
    assert_eq!(
        all_versions(c, "history").await,
        vec![
            Listed {
                key: "k".into(),
                version: v2.clone(),
                latest: true,
                marker: false
            },
            Listed {
                key: "k".into(),
                version: v1.clone(),
                latest: false,
                marker: false
            },
            Listed {
                key: "k".into(),
                version: "null".into(),
                latest: false,
                marker: false
            },
        ]
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suspended_writes_replace_only_the_null_version_and_deletes_leave_one_null_marker() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("paused").send().await.unwrap();
    put_bytes(c, "paused", "k", b"first null").await;
    set_versioning(c, "paused", BucketVersioningStatus::Enabled).await;
    let kept = put_bytes(c, "paused", "k", b"kept").await.unwrap();
    set_versioning(c, "paused", BucketVersioningStatus::Suspended).await;
    assert_eq!(
        put_bytes(c, "paused", "k", b"second null").await.as_deref(),
        Some("null")
    );
    let versions = all_versions(c, "paused").await;
    let ids: Vec<&str> = versions.iter().map(|l| l.version.as_str()).collect();
    assert_eq!(ids, ["null", kept.as_str()], "{versions:?}");
    assert_eq!(get_version(c, "paused", "k", "null").await, b"second null");
    assert_eq!(get_version(c, "paused", "k", &kept).await, b"kept");

    // Two deletes: the null version goes, and one null marker stays.
    for _ in 0..2 {
        let deleted = c
            .delete_object()
            .bucket("paused")
            .key("k")
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.delete_marker(), Some(true));
        assert_eq!(deleted.version_id(), Some("null"));
    }
    // Versions and markers come in two lists of the XML.
    let versions = all_versions(c, "paused").await;
    assert_eq!(
        versions,
        vec![
            Listed {
                key: "k".into(),
                version: kept.clone(),
                latest: false,
                marker: false
            },
            Listed {
                key: "k".into(),
                version: "null".into(),
                latest: true,
                marker: true
            },
        ]
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_markers_hide_a_key_and_deleting_one_brings_the_version_below_back() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("markers").send().await.unwrap();
    set_versioning(c, "markers", BucketVersioningStatus::Enabled).await;
    let v1 = put_bytes(c, "markers", "k", b"one").await.unwrap();
    put_bytes(c, "markers", "other", b"stays").await;
    let deleted = c
        .delete_object()
        .bucket("markers")
        .key("k")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.delete_marker(), Some(true));
    let marker = deleted.version_id().unwrap().to_owned();
    assert!(marker != v1 && marker != "null");

    // The latest is a marker: 404 saying so; ListObjects hides the key.
    let error = c
        .get_object()
        .bucket("markers")
        .key("k")
        .send()
        .await
        .unwrap_err();
    assert_eq!(marker_header(&error).as_deref(), Some("true"));
    assert_eq!(code(&error.into_service_error()), "NoSuchKey");
    let error = c
        .head_object()
        .bucket("markers")
        .key("k")
        .send()
        .await
        .unwrap_err();
    assert_eq!(marker_header(&error).as_deref(), Some("true"));
    assert_eq!(
        error.raw_response().unwrap().status().as_u16(),
        404,
        "HEAD of a key whose latest is a marker"
    );
    let listed = c.list_objects_v2().bucket("markers").send().await.unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, ["other"]);
    // The marker named by id: 405 with its Last-Modified.
    let error = c
        .get_object()
        .bucket("markers")
        .key("k")
        .version_id(&marker)
        .send()
        .await
        .unwrap_err();
    let raw = error.raw_response().unwrap();
    assert_eq!(raw.status().as_u16(), 405);
    assert!(raw.headers().get("last-modified").is_some());
    assert_eq!(marker_header(&error).as_deref(), Some("true"));
    // The older version is still there by id.
    assert_eq!(get_version(c, "markers", "k", &v1).await, b"one");

    // Deleting the marker by id restores the version below.
    let removed = c
        .delete_object()
        .bucket("markers")
        .key("k")
        .version_id(&marker)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.delete_marker(), Some(true));
    assert_eq!(removed.version_id(), Some(marker.as_str()));
    assert_eq!(get_bytes(c, "markers", "k").await, b"one");
    let listed = c.list_objects_v2().bucket("markers").send().await.unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, ["k", "other"]);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_version_by_id_removes_it_for_good_and_no_marker_is_written() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("purge").send().await.unwrap();
    set_versioning(c, "purge", BucketVersioningStatus::Enabled).await;
    let v1 = put_bytes(c, "purge", "k", b"one").await.unwrap();
    let v2 = put_bytes(c, "purge", "k", b"two").await.unwrap();
    let v3 = put_bytes(c, "purge", "k", b"three").await.unwrap();
    // A version in the middle.
    let deleted = c
        .delete_object()
        .bucket("purge")
        .key("k")
        .version_id(&v2)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.delete_marker(), None);
    assert_eq!(deleted.version_id(), Some(v2.as_str()));
    let error = c
        .get_object()
        .bucket("purge")
        .key("k")
        .version_id(&v2)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "NoSuchVersion");
    // A permanent delete goes to the recoverable trash.
    let trashed = cairn_model::trash::list(
        s.cluster.node(0).metadata(),
        "purge",
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    assert!(
        trashed.iter().any(|t| t.version.to_text() == v2),
        "{trashed:?}"
    );
    // The latest: the one below becomes current.
    c.delete_object()
        .bucket("purge")
        .key("k")
        .version_id(&v3)
        .send()
        .await
        .unwrap();
    assert_eq!(get_bytes(c, "purge", "k").await, b"one");
    let versions = all_versions(c, "purge").await;
    assert_eq!(
        versions,
        vec![Listed {
            key: "k".into(),
            version: v1.clone(),
            latest: true,
            marker: false
        }]
    );
    // A conditional PUT judges against the version uncovered.
    let error = c
        .put_object()
        .bucket("purge")
        .key("k")
        .if_none_match("*")
        .body(ByteStream::from_static(b"not while one exists"))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "PreconditionFailed");
    // Deleting a version that is gone again succeeds and changes nothing.
    c.delete_object()
        .bucket("purge")
        .key("k")
        .version_id(&v3)
        .send()
        .await
        .unwrap();
    // The last version: the key is gone, no marker anywhere.
    c.delete_object()
        .bucket("purge")
        .key("k")
        .version_id(&v1)
        .send()
        .await
        .unwrap();
    let error = c
        .get_object()
        .bucket("purge")
        .key("k")
        .send()
        .await
        .unwrap_err();
    assert_eq!(marker_header(&error), None);
    assert_eq!(code(&error.into_service_error()), "NoSuchKey");
    assert!(all_versions(c, "purge").await.is_empty());
    // An empty bucket can go.
    c.delete_bucket().bucket("purge").send().await.unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bucket_with_versions_or_markers_is_not_empty() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("full").send().await.unwrap();
    set_versioning(c, "full", BucketVersioningStatus::Enabled).await;
    let v1 = put_bytes(c, "full", "k", b"one").await.unwrap();
    let marker = c
        .delete_object()
        .bucket("full")
        .key("k")
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_owned();
    // ListObjects is empty, and still the bucket holds a version.
    let error = c
        .delete_bucket()
        .bucket("full")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "BucketNotEmpty");
    c.delete_object()
        .bucket("full")
        .key("k")
        .version_id(&v1)
        .send()
        .await
        .unwrap();
    // A lone marker too.
    let error = c
        .delete_bucket()
        .bucket("full")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "BucketNotEmpty");
    c.delete_object()
        .bucket("full")
        .key("k")
        .version_id(&marker)
        .send()
        .await
        .unwrap();
    c.delete_bucket().bucket("full").send().await.unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_object_versions_pages_by_key_and_version_markers() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("pages").send().await.unwrap();
    put_bytes(c, "pages", "a", b"a null").await;
    set_versioning(c, "pages", BucketVersioningStatus::Enabled).await;
    let mut expected = Vec::new();
    let a1 = put_bytes(c, "pages", "a", b"a1").await.unwrap();
    let a2 = put_bytes(c, "pages", "a", b"a2").await.unwrap();
    let a_marker = c
        .delete_object()
        .bucket("pages")
        .key("a")
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_owned();
    for (version, latest, marker) in [
        (a_marker.clone(), true, true),
        (a2.clone(), false, false),
        (a1.clone(), false, false),
        ("null".to_owned(), false, false),
    ] {
        expected.push(Listed {
            key: "a".into(),
            version,
            latest,
            marker,
        });
    }
    let d1 = put_bytes(c, "pages", "dir/x", b"x1").await.unwrap();
    let d2 = put_bytes(c, "pages", "dir/x", b"x2").await.unwrap();
    let dy = put_bytes(c, "pages", "dir/y", b"y").await.unwrap();
    for (key, version, latest) in [
        ("dir/x", d2.clone(), true),
        ("dir/x", d1.clone(), false),
        ("dir/y", dy.clone(), true),
    ] {
        expected.push(Listed {
            key: key.into(),
            version,
            latest,
            marker: false,
        });
    }
    let z1 = put_bytes(c, "pages", "z", b"z1").await.unwrap();
    expected.push(Listed {
        key: "z".into(),
        version: z1.clone(),
        latest: true,
        marker: false,
    });

    // Whole listing: newest first within a key, one latest per key.
    let whole = list_versions_page(c, "pages", None, None, None, None).await;
    assert!(whole.next.is_none());
    let mut got = whole.entries.clone();
    got.sort_by(|a, b| a.key.cmp(&b.key));
    // Versions and markers come in two lists: compare key by key as sets
    // for the mixed key, in order for the others.
    let order = |entries: &[Listed], key: &str| -> Vec<String> {
        entries
            .iter()
            .filter(|l| l.key == key && !l.marker)
            .map(|l| l.version.clone())
            .collect()
    };
    assert_eq!(order(&got, "a"), [a2.clone(), a1.clone(), "null".into()]);
    assert_eq!(order(&got, "dir/x"), [d2.clone(), d1.clone()]);
    let mut sorted_expected = expected.clone();
    sorted_expected.sort_by(|a, b| (&a.key, &a.version).cmp(&(&b.key, &b.version)));
    got.sort_by(|a, b| (&a.key, &a.version).cmp(&(&b.key, &b.version)));
    assert_eq!(got, sorted_expected);
    for key in ["a", "dir/x", "dir/y", "z"] {
        assert_eq!(
            got.iter().filter(|l| l.key == key && l.latest).count(),
            1,
            "{key}"
        );
    }

    // Pages of two: every entry exactly once, in the order listed whole.
    let mut paged = Vec::new();
    let mut markers = None;
    let mut pages = 0;
    loop {
        let page = list_versions_page(c, "pages", None, None, markers.clone(), Some(2)).await;
        assert!(page.entries.len() <= 2);
        paged.extend(page.entries);
        pages += 1;
        match page.next {
            Some(next) => markers = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 4);
    paged.sort_by(|a, b| (&a.key, &a.version).cmp(&(&b.key, &b.version)));
    assert_eq!(paged, sorted_expected);

    // Starting after one version of a key lists the older ones.
    let after = list_versions_page(
        c,
        "pages",
        None,
        None,
        Some(("a".into(), Some(a2.clone()))),
        Some(1000),
    )
    .await;
    let versions: Vec<(String, String)> = after
        .entries
        .iter()
        .map(|l| (l.key.clone(), l.version.clone()))
        .collect();
    assert_eq!(
        versions,
        [
            ("a".to_owned(), a1.clone()),
            ("a".to_owned(), "null".to_owned()),
            ("dir/x".to_owned(), d2.clone()),
            ("dir/x".to_owned(), d1.clone()),
            ("dir/y".to_owned(), dy.clone()),
            ("z".to_owned(), z1.clone()),
        ]
    );
    // A key marker alone starts after every version of the key.
    let after_key =
        list_versions_page(c, "pages", None, None, Some(("dir/x".into(), None)), None).await;
    let keys: Vec<&str> = after_key.entries.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(keys, ["dir/y", "z"]);

    // Prefix and delimiter: dir/ rolls up.
    let rolled = list_versions_page(c, "pages", None, Some("/"), None, None).await;
    assert_eq!(rolled.prefixes, ["dir/"]);
    let keys: Vec<&str> = rolled.entries.iter().map(|l| l.key.as_str()).collect();
    assert!(keys.iter().all(|k| *k == "a" || *k == "z"), "{keys:?}");
    let under = list_versions_page(c, "pages", Some("dir/"), None, None, None).await;
    let keys: Vec<&str> = under.entries.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(keys, ["dir/x", "dir/x", "dir/y"]);

    // A version marker without a key marker is refused.
    let error = c
        .list_object_versions()
        .bucket("pages")
        .version_id_marker(&a1)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "InvalidArgument");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_name_their_source_version_and_completions_make_versions() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("copies").send().await.unwrap();
    set_versioning(c, "copies", BucketVersioningStatus::Enabled).await;
    let v1 = put_bytes(c, "copies", "k", b"old bytes").await.unwrap();
    put_bytes(c, "copies", "k", b"new bytes").await.unwrap();
    // Copying an older version onto its own key restores it as the latest.
    let copied = c
        .copy_object()
        .bucket("copies")
        .key("k")
        .copy_source(format!("copies/k?versionId={v1}"))
        .send()
        .await
        .unwrap();
    assert_eq!(copied.copy_source_version_id(), Some(v1.as_str()));
    let restored = copied.version_id().unwrap().to_owned();
    assert!(restored != v1);
    assert_eq!(get_bytes(c, "copies", "k").await, b"old bytes");
    // A delete marker cannot be a copy source by id.
    let marker = c
        .delete_object()
        .bucket("copies")
        .key("gone")
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_owned();
    let error = c
        .copy_object()
        .bucket("copies")
        .key("k2")
        .copy_source(format!("copies/gone?versionId={marker}"))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "InvalidRequest");

    // A multipart completion is a version of its own.
    let upload = create_upload(c, "copies", "k").await;
    let part = c
        .upload_part()
        .bucket("copies")
        .key("k")
        .upload_id(&upload)
        .part_number(1)
        .body(ByteStream::from_static(b"multipart bytes"))
        .send()
        .await
        .unwrap();
    let completed = c
        .complete_multipart_upload()
        .bucket("copies")
        .key("k")
        .upload_id(&upload)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .parts(
                    aws_sdk_s3::types::CompletedPart::builder()
                        .part_number(1)
                        .e_tag(part.e_tag().unwrap())
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let completed_version = completed.version_id().unwrap().to_owned();
    assert_eq!(
        get_version(c, "copies", "k", &completed_version).await,
        b"multipart bytes"
    );
    assert_eq!(get_version(c, "copies", "k", &restored).await, b"old bytes");
    let keys = all_versions(c, "copies").await;
    assert_eq!(keys.iter().filter(|l| l.key == "k").count(), 4);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_objects_writes_markers_and_deletes_versions_by_id() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("batch").send().await.unwrap();
    set_versioning(c, "batch", BucketVersioningStatus::Enabled).await;
    let a1 = put_bytes(c, "batch", "a", b"a1").await.unwrap();
    put_bytes(c, "batch", "b", b"b1").await.unwrap();
    use aws_sdk_s3::types::{Delete, ObjectIdentifier};
    let out = c
        .delete_objects()
        .bucket("batch")
        .delete(
            Delete::builder()
                .objects(
                    ObjectIdentifier::builder()
                        .key("a")
                        .version_id(&a1)
                        .build()
                        .unwrap(),
                )
                .objects(ObjectIdentifier::builder().key("b").build().unwrap())
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert!(out.errors().is_empty());
    let deleted = out.deleted();
    let a = deleted.iter().find(|d| d.key() == Some("a")).unwrap();
    assert_eq!(a.version_id(), Some(a1.as_str()));
    assert_eq!(a.delete_marker(), None);
    let b = deleted.iter().find(|d| d.key() == Some("b")).unwrap();
    assert_eq!(b.delete_marker(), Some(true));
    let b_marker = b.delete_marker_version_id().unwrap().to_owned();
    let versions = all_versions(c, "batch").await;
    assert!(versions.iter().all(|l| l.key == "b"), "{versions:?}");
    assert!(
        versions
            .iter()
            .any(|l| l.version == b_marker && l.marker && l.latest)
    );
    s.shutdown().await;
}

/// A delete marker not yet written out: what a writer that decided its
/// head and stopped leaves.
fn unwritten_marker(index: &ObjectIndex, bucket: &str, key: &str, null: bool) -> ObjectVersion {
    let at = index.metadata().timestamp();
    ObjectVersion {
        bucket: bucket.into(),
        key: key.into(),
        version: index.new_version(),
        created: at,
        seq: 0,
        null,
        body: VersionBody::DeleteMarker,
        retention: Retention::default(),
        legal_hold: Lww { value: false, at },
        purged: None,
    }
}

fn index_on(s: &Setup) -> ObjectIndex {
    ObjectIndex::new(s.cluster.node(0).handle(), Duration::from_secs(3600), 0)
}

/// Decides `marker` as the key's head and writes nothing else, as a
/// DELETE that stopped there.
async fn decide_only(index: &ObjectIndex, bucket: &str, key: &str, marker: &ObjectVersion) {
    index
        .swap_head(
            bucket,
            key,
            &WriteCondition::Deleting(DeleteCondition::default()),
            HeadWrite::Delete(marker),
            None,
        )
        .await
        .unwrap()
        .unwrap();
}

/// A gateway that cached the record of an earlier bucket of the same name
/// changes the settings of the bucket that is, never back to Unversioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_bucket_record_never_writes_the_settings_of_an_earlier_bucket() {
    let Setup {
        cluster, gateway, ..
    } = setup().await;
    gateway.stop().await;
    // Two gateways of one KMS root key, on two nodes.
    let root = random_secret();
    let first = gateway_on(&cluster, 0, root).await;
    let other = gateway_on(&cluster, 1, root).await;
    let key = first.keys().create("two gateways").await.unwrap();
    let c0 = &client_for(&first, &key.id, &key.secret);
    let c1 = client_for(&other, &key.id, &key.secret);
    c0.create_bucket().bucket("again").send().await.unwrap();
    // The second gateway caches the first bucket's record.
    c1.get_bucket_versioning()
        .bucket("again")
        .send()
        .await
        .unwrap();
    c0.delete_bucket().bucket("again").send().await.unwrap();
    c0.create_bucket().bucket("again").send().await.unwrap();
    set_versioning(c0, "again", BucketVersioningStatus::Enabled).await;
    set_versioning(&c1, "again", BucketVersioningStatus::Suspended).await;
    assert_eq!(
        versioning_status(c0, "again").await.as_deref(),
        Some("Suspended")
    );
    assert_eq!(
        versioning_status(&c1, "again").await.as_deref(),
        Some("Suspended")
    );
    first.stop().await;
    other.stop().await;
    cluster.shutdown().await;
}

/// A null write that decided its head and stopped, then a write with its
/// own id: the null version it replaced is purged all the same, so that
/// `null` names one version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_null_write_is_settled_by_the_next_write_whatever_its_kind() {
    let s = setup().await;
    let c = &s.client;
    let index = index_on(&s);
    c.create_bucket().bucket("settle").send().await.unwrap();
    set_versioning(c, "settle", BucketVersioningStatus::Suspended).await;
    put_bytes(c, "settle", "k", b"old null").await;
    decide_only(
        &index,
        "settle",
        "k",
        &unwritten_marker(&index, "settle", "k", true),
    )
    .await;
    set_versioning(c, "settle", BucketVersioningStatus::Enabled).await;
    let own = put_bytes(c, "settle", "k", b"own id").await.unwrap();
    let versions = all_versions(c, "settle").await;
    assert_eq!(
        versions.iter().filter(|l| l.version == "null").count(),
        1,
        "{versions:?}"
    );
    c.delete_object()
        .bucket("settle")
        .key("k")
        .version_id("null")
        .send()
        .await
        .unwrap();
    let error = c
        .get_object()
        .bucket("settle")
        .key("k")
        .version_id("null")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "NoSuchVersion");
    assert_eq!(get_version(c, "settle", "k", &own).await, b"own id");
    s.shutdown().await;
}

/// Pages resume after the exact version they ended on, even when the null
/// version they ended on was deleted or replaced since.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn version_pages_resume_after_a_null_version_deleted_or_replaced_since() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("resume").send().await.unwrap();
    set_versioning(c, "resume", BucketVersioningStatus::Enabled).await;
    let v1 = put_bytes(c, "resume", "k", b"1").await.unwrap();
    let v2 = put_bytes(c, "resume", "k", b"2").await.unwrap();
    set_versioning(c, "resume", BucketVersioningStatus::Suspended).await;
    put_bytes(c, "resume", "k", b"null").await;
    set_versioning(c, "resume", BucketVersioningStatus::Enabled).await;
    put_bytes(c, "resume", "k", b"4").await.unwrap();
    // Page 1 ends on the null version.
    let first = list_versions_page(c, "resume", None, None, None, Some(2)).await;
    assert_eq!(first.entries[1].version, "null");
    // Deleted since: the next page is every older version.
    c.delete_object()
        .bucket("resume")
        .key("k")
        .version_id("null")
        .send()
        .await
        .unwrap();
    let second = list_versions_page(c, "resume", None, None, first.next.clone(), None).await;
    let ids: Vec<&str> = second.entries.iter().map(|l| l.version.as_str()).collect();
    assert_eq!(ids, [v2.as_str(), v1.as_str()]);
    // Replaced since by a newer null version: nothing is listed twice.
    set_versioning(c, "resume", BucketVersioningStatus::Suspended).await;
    put_bytes(c, "resume", "k", b"null again").await;
    let again = list_versions_page(c, "resume", None, None, first.next, None).await;
    let ids: Vec<&str> = again.entries.iter().map(|l| l.version.as_str()).collect();
    assert_eq!(ids, [v2.as_str(), v1.as_str()]);
    s.shutdown().await;
}

/// An unversioned bucket keeps its old behaviour: a copy onto itself needs
/// a change, `versionId=null` or not; a DELETE that decided its head and
/// stopped leaves no object to GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unversioned_bucket_keeps_its_copy_and_delete_rules() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("plain").send().await.unwrap();
    put_bytes(c, "plain", "k", b"x").await;
    for source in ["plain/k", "plain/k?versionId=null"] {
        let error = c
            .copy_object()
            .bucket("plain")
            .key("k")
            .copy_source(source)
            .send()
            .await
            .unwrap_err()
            .into_service_error();
        assert_eq!(code(&error), "InvalidRequest", "{source}");
    }
    let index = index_on(&s);
    let mut marker = unwritten_marker(&index, "plain", "k", true);
    marker.purged = Some(marker.created);
    decide_only(&index, "plain", "k", &marker).await;
    let error = c
        .get_object()
        .bucket("plain")
        .key("k")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "NoSuchKey");
    s.shutdown().await;
}

/// A permanent delete decided by the version's guard whose deleter stopped
/// before moving the head: the DELETE retried finishes it, and the version
/// below is latest again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_permanent_delete_that_stopped_after_its_decision_is_finished_by_a_retry() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("finish").send().await.unwrap();
    set_versioning(c, "finish", BucketVersioningStatus::Enabled).await;
    put_bytes(c, "finish", "k", b"below").await.unwrap();
    let top = put_bytes(c, "finish", "k", b"top").await.unwrap();
    // The guard decides the purge and the row is stamped; nothing else.
    let row = cairn_model::rows::versions_row(
        "finish",
        "k",
        &cairn_protocol::ids::VersionId::parse(&top).unwrap(),
    );
    cairn_model::locks::change_version_lock(
        s.cluster.node(0).metadata(),
        &row,
        cairn_protocol::guard::GuardChange::Purge {
            bypass_governance: false,
        },
    )
    .await
    .unwrap();
    c.delete_object()
        .bucket("finish")
        .key("k")
        .version_id(&top)
        .send()
        .await
        .unwrap();
    assert_eq!(get_bytes(c, "finish", "k").await, b"below");
    s.shutdown().await;
}
