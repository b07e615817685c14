//! Requests that ask for a protection Cairn does not give are refused with
//! AWS's error and store nothing; a `versionId` names the current object
//! or none.

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{ObjectLockLegalHoldStatus, ObjectLockMode, ServerSideEncryption};
use cairn_protocol::ids::VersionId;
use cairn_protocol::meta::{Partition, RowKey, RowValue, Table, version_sort_key};
use cairn_protocol::metarpc::RegisterKey;
use cairn_protocol::version::ObjectVersion;
use cairn_tests::s3::*;

const CUSTOMER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const CUSTOMER_KEY_MD5: &str = "hRasmdxgYDKV3nvbahU1MA==";

async fn keys_in(client: &Client, bucket: &str) -> Vec<String> {
    client
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .unwrap()
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect()
}

/// Every refused write answers `expected` and leaves no object, no upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_that_ask_for_sse_c_sse_kms_or_an_object_lock_the_bucket_lacks_are_refused_and_store_nothing()
 {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("guarded").send().await.unwrap();
    put_bytes(c, "guarded", "source", b"source bytes").await;
    let put = || {
        c.put_object()
            .bucket("guarded")
            .key("k")
            .body(ByteStream::from_static(b"must not be stored"))
    };
    let retain_until = DateTime::from_secs(4_000_000_000);
    let refusals = [
        (
            "SSE-C",
            put()
                .sse_customer_algorithm("AES256")
                .sse_customer_key(CUSTOMER_KEY)
                .sse_customer_key_md5(CUSTOMER_KEY_MD5)
                .send()
                .await,
            "NotImplemented",
        ),
        (
            "SSE-KMS",
            put()
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .send()
                .await,
            "NotImplemented",
        ),
        (
            "SSE-KMS with a key id",
            put()
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .ssekms_key_id("alias/mine")
                .send()
                .await,
            "NotImplemented",
        ),
        (
            "an unknown encryption",
            put()
                .server_side_encryption(ServerSideEncryption::from("AES512"))
                .send()
                .await,
            "InvalidArgument",
        ),
        (
            "a KMS key id without aws:kms",
            put().ssekms_key_id("alias/mine").send().await,
            "InvalidArgument",
        ),
        (
            "an Object Lock retention",
            put()
                .object_lock_mode(ObjectLockMode::Compliance)
                .object_lock_retain_until_date(retain_until)
                .send()
                .await,
            "InvalidRequest",
        ),
        (
            "a legal hold",
            put()
                .object_lock_legal_hold_status(ObjectLockLegalHoldStatus::On)
                .send()
                .await,
            "InvalidRequest",
        ),
    ];
    for (what, outcome, expected) in refusals {
        let error = outcome.expect_err(what).into_service_error();
        assert_eq!(code(&error), expected, "{what}: {error:?}");
    }

    let copy = || {
        c.copy_object()
            .bucket("guarded")
            .key("k")
            .copy_source("guarded/source")
    };
    let copies = [
        (
            "a copy to SSE-KMS",
            copy()
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .send()
                .await
                .map(|_| ()),
            "NotImplemented",
        ),
        (
            "a copy to SSE-C",
            copy()
                .sse_customer_algorithm("AES256")
                .sse_customer_key(CUSTOMER_KEY)
                .sse_customer_key_md5(CUSTOMER_KEY_MD5)
                .send()
                .await
                .map(|_| ()),
            "NotImplemented",
        ),
        (
            "a copy from an SSE-C source that is not one",
            copy()
                .copy_source_sse_customer_algorithm("AES256")
                .copy_source_sse_customer_key(CUSTOMER_KEY)
                .copy_source_sse_customer_key_md5(CUSTOMER_KEY_MD5)
                .send()
                .await
                .map(|_| ()),
            "InvalidRequest",
        ),
    ];
    for (what, outcome, expected) in copies {
        let error = outcome.expect_err(what).into_service_error();
        assert_eq!(code(&error), expected, "{what}: {error:?}");
    }

    let error = c
        .create_multipart_upload()
        .bucket("guarded")
        .key("k")
        .server_side_encryption(ServerSideEncryption::AwsKms)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "NotImplemented");
    let upload = create_upload(c, "guarded", "parts").await;
    let error = c
        .upload_part()
        .bucket("guarded")
        .key("parts")
        .upload_id(&upload)
        .part_number(1)
        .sse_customer_algorithm("AES256")
        .sse_customer_key(CUSTOMER_KEY)
        .sse_customer_key_md5(CUSTOMER_KEY_MD5)
        .body(ByteStream::from_static(b"part"))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "NotImplemented");
    let parts = c
        .list_parts()
        .bucket("guarded")
        .key("parts")
        .upload_id(&upload)
        .send()
        .await
        .unwrap();
    assert!(parts.parts().is_empty(), "a refused part was stored");
    let uploads = c
        .list_multipart_uploads()
        .bucket("guarded")
        .send()
        .await
        .unwrap();
    assert_eq!(uploads.uploads().len(), 1, "only the unrefused upload");

    assert_eq!(keys_in(c, "guarded").await, vec!["source".to_owned()]);

    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_with_customer_keys_for_an_object_without_one_are_refused() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("plain").send().await.unwrap();
    put_bytes(c, "plain", "k", b"plain bytes").await;
    let error = c
        .get_object()
        .bucket("plain")
        .key("k")
        .sse_customer_algorithm("AES256")
        .sse_customer_key(CUSTOMER_KEY)
        .sse_customer_key_md5(CUSTOMER_KEY_MD5)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "InvalidRequest");
    let error = c
        .head_object()
        .bucket("plain")
        .key("k")
        .sse_customer_algorithm("AES256")
        .sse_customer_key(CUSTOMER_KEY)
        .sse_customer_key_md5(CUSTOMER_KEY_MD5)
        .send()
        .await
        .unwrap_err();
    // HEAD answers carry no body: the status says it.
    assert_eq!(error.raw_response().map(|r| r.status().as_u16()), Some(400));
    assert_eq!(get_bytes(c, "plain", "k").await, b"plain bytes");
    s.shutdown().await;
}

/// The bucket keeps no history: the current object is its only version.
/// Another version id, even one a crashed writer's row still names, is
/// NoSuchVersion on a read and changes nothing on a DELETE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_id_names_the_current_object_or_nothing() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("versions").send().await.unwrap();
    put_bytes(c, "versions", "k", b"current").await;

    // A row a writer left behind under another version id, not yet purged.
    let metadata = s.cluster.node(0).metadata();
    let head = metadata
        .read_register(RegisterKey {
            partition: Partition::bucket("versions"),
            name: b"k".to_vec(),
        })
        .await
        .unwrap()
        .unwrap();
    let mut leftover = ObjectVersion::decode(&head).unwrap();
    let current_version = leftover.version;
    leftover.version = VersionId::new(current_version.unix_ms() - 1000, [7; 10]);
    leftover.seq = 0;
    metadata
        .write(vec![(
            RowKey::new(
                Partition::bucket("versions"),
                Table::Versions,
                version_sort_key("k", &leftover.version),
            ),
            RowValue::Version(Box::new(leftover.clone())),
        )])
        .await
        .unwrap();

    for other in [
        leftover.version.to_text(),
        VersionId::new(1, [1; 10]).to_text(),
    ] {
        let error = c
            .get_object()
            .bucket("versions")
            .key("k")
            .version_id(&other)
            .send()
            .await
            .unwrap_err()
            .into_service_error();
        assert_eq!(code(&error), "NoSuchVersion", "{other}");
        // DELETE of a version that does not exist succeeds, deletes nothing.
        c.delete_object()
            .bucket("versions")
            .key("k")
            .version_id(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(get_bytes(c, "versions", "k").await, b"current");
    }
    let error = c
        .get_object()
        .bucket("versions")
        .key("k")
        .version_id("not-a-version")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "InvalidArgument");
    let by_null = c
        .get_object()
        .bucket("versions")
        .key("k")
        .version_id("null")
        .send()
        .await
        .unwrap();
    assert_eq!(
        by_null.body.collect().await.unwrap().into_bytes().as_ref(),
        b"current"
    );
    // The current version's own id deletes it, and the row left below it
    // is purged with it.
    c.delete_object()
        .bucket("versions")
        .key("k")
        .version_id(current_version.to_text())
        .send()
        .await
        .unwrap();
    let error = c
        .get_object()
        .bucket("versions")
        .key("k")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(code(&error), "NoSuchKey");
    let rows = metadata
        .read(vec![RowKey::new(
            Partition::bucket("versions"),
            Table::Versions,
            version_sort_key("k", &leftover.version),
        )])
        .await
        .unwrap();
    match &rows[0] {
        Some(RowValue::Version(version)) => assert!(version.purged.is_some(), "{version:?}"),
        other => panic!("{other:?}"),
    }
    assert!(keys_in(c, "versions").await.is_empty());
    s.shutdown().await;
}
