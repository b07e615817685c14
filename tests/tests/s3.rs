//! The S3 gateway end to end: a real cluster on 127.0.0.1 (3 sites x 2
//! nodes, 4+2), the gateway on one node, and the aws-sdk-s3 client.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use cairn_gateway::collector::{Collection, Collector};
use cairn_gateway::kms::RootKey;
use cairn_gateway::{Gateway, GatewayConfig};
use cairn_protocol::erasure::Scheme;
use cairn_tests::{Cluster, pseudo_random_bytes, random_secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    cluster: Cluster,
    gateway: Gateway,
    client: Client,
}

async fn setup() -> Setup {
    setup_with(Collection::default()).await
}

async fn setup_with(collection: Collection) -> Setup {
    let cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    cluster
        .install_map(cluster.map(), Scheme::new(4, 2).unwrap())
        .await
        .unwrap();
    let gateway = Gateway::start(
        cluster.node(0).handle(),
        RootKey::from_bytes(random_secret()),
        GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            region: "us-east-1".into(),
            domains: vec!["localhost".into()],
            collection,
            tls: None,
        },
    )
    .await
    .unwrap();
    let key = gateway.keys().create("test").await.unwrap();
    let client = client_for(&gateway, &key.id, &key.secret);
    Setup {
        cluster,
        gateway,
        client,
    }
}

fn client_for(gateway: &Gateway, id: &str, secret: &str) -> Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(format!("http://{}", gateway.address()))
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(id, secret, None, None, "test"))
        .force_path_style(true)
        .build();
    Client::from_conf(config)
}

impl Setup {
    async fn shutdown(self) {
        self.gateway.stop().await;
        self.cluster.shutdown().await;
    }
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    cairn_protocol::to_hex(&md5::Md5::digest(bytes))
}

fn code<E: aws_sdk_s3::error::ProvideErrorMetadata>(error: &E) -> String {
    error.code().unwrap_or("(none)").to_owned()
}

async fn put_bytes(client: &Client, bucket: &str, key: impl Into<String>, body: &'static [u8]) {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from_static(body))
        .send()
        .await
        .unwrap();
}

async fn get_bytes(client: &Client, bucket: &str, key: &str) -> Vec<u8> {
    let object = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    object.body.collect().await.unwrap().into_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buckets_are_created_listed_and_deleted_with_s3_errors() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("photos").send().await.unwrap();
    c.head_bucket().bucket("photos").send().await.unwrap();
    let again = c.create_bucket().bucket("photos").send().await.unwrap_err();
    assert_eq!(code(&again.into_service_error()), "BucketAlreadyOwnedByYou");
    let names: Vec<String> = c
        .list_buckets()
        .send()
        .await
        .unwrap()
        .buckets()
        .iter()
        .filter_map(|b| b.name().map(str::to_owned))
        .collect();
    assert_eq!(names, ["photos"]);

    put_bytes(c, "photos", "a", b"x").await;
    let busy = c.delete_bucket().bucket("photos").send().await.unwrap_err();
    assert_eq!(code(&busy.into_service_error()), "BucketNotEmpty");
    c.delete_object()
        .bucket("photos")
        .key("a")
        .send()
        .await
        .unwrap();
    c.delete_bucket().bucket("photos").send().await.unwrap();
    let gone = c.head_bucket().bucket("photos").send().await.unwrap_err();
    assert_eq!(gone.raw_response().map(|r| r.status().as_u16()), Some(404));
    let missing = c
        .get_object()
        .bucket("photos")
        .key("a")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&missing.into_service_error()), "NoSuchBucket");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_of_every_size_round_trip_with_s3_etags_ranges_and_metadata() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("data").send().await.unwrap();
    let sizes = [0usize, 1, 256 << 10, (5 << 20) + 1, 9 << 20];
    for (n, size) in sizes.iter().enumerate() {
        let body = pseudo_random_bytes(n as u64 + 1, *size);
        let put = c
            .put_object()
            .bucket("data")
            .key(format!("dir/object-{size}"))
            .content_type("application/x-test")
            .metadata("colour", "blue")
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            put.e_tag(),
            Some(format!("\"{}\"", md5_hex(&body)).as_str())
        );
        let back = get_bytes(c, "data", &format!("dir/object-{size}")).await;
        assert!(back == body, "object of {size} bytes read back differently");
        let head = c
            .head_object()
            .bucket("data")
            .key(format!("dir/object-{size}"))
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_length(), Some(*size as i64));
        assert_eq!(head.content_type(), Some("application/x-test"));
        assert_eq!(
            head.metadata()
                .and_then(|m| m.get("colour"))
                .map(String::as_str),
            Some("blue")
        );
    }
    // Ranges: inside a segment, across segments, the suffix, past the end.
    let big = pseudo_random_bytes(5, 9 << 20);
    for (range, expected) in [
        ("bytes=10-99", &big[10..100]),
        ("bytes=4194000-4195000", &big[4_194_000..4_195_001]),
        ("bytes=-7", &big[big.len() - 7..]),
        ("bytes=9437000-", &big[9_437_000..]),
    ] {
        let part = c
            .get_object()
            .bucket("data")
            .key(format!("dir/object-{}", 9 << 20))
            .range(range)
            .send()
            .await
            .unwrap();
        let bytes = part.body.collect().await.unwrap().into_bytes();
        assert!(bytes.as_ref() == expected, "range {range}");
    }
    let beyond = c
        .get_object()
        .bucket("data")
        .key("dir/object-1")
        .range("bytes=5-9")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&beyond.into_service_error()), "InvalidRange");

    // Overwrite, list, delete.
    put_bytes(c, "data", "dir/object-1", b"second").await;
    assert_eq!(get_bytes(c, "data", "dir/object-1").await, b"second");
    put_bytes(c, "data", "top", b"t").await;
    let listed = c
        .list_objects_v2()
        .bucket("data")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    let prefixes: Vec<&str> = listed
        .common_prefixes()
        .iter()
        .filter_map(|p| p.prefix())
        .collect();
    assert_eq!(keys, ["top"]);
    assert_eq!(prefixes, ["dir/"]);
    let mut all = Vec::new();
    let mut token = None;
    loop {
        let page = c
            .list_objects_v2()
            .bucket("data")
            .prefix("dir/")
            .max_keys(2)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        all.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        token = page.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(all.len(), sizes.len());
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");

    c.delete_object()
        .bucket("data")
        .key("top")
        .send()
        .await
        .unwrap();
    let gone = c
        .get_object()
        .bucket("data")
        .key("top")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&gone.into_service_error()), "NoSuchKey");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_content_md5_is_refused_and_stores_nothing() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("checked").send().await.unwrap();
    let wrong = c
        .put_object()
        .bucket("checked")
        .key("k")
        .content_md5("AAAAAAAAAAAAAAAAAAAAAA==")
        .body(ByteStream::from_static(b"hello"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&wrong.into_service_error()), "BadDigest");
    let missing = c
        .head_object()
        .bucket("checked")
        .key("k")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        missing.raw_response().map(|r| r.status().as_u16()),
        Some(404)
    );
    let listed = c.list_objects_v2().bucket("checked").send().await.unwrap();
    assert!(listed.contents().is_empty());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsigned_badly_signed_and_sigv2_requests_are_refused() {
    let s = setup().await;
    let address = s.gateway.address();
    let raw = |request: String| async move {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    let unsigned = raw(format!(
        "GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert!(unsigned.starts_with("HTTP/1.1 403"), "{unsigned}");
    let sigv2 = raw(format!(
        "GET / HTTP/1.1\r\nHost: {address}\r\nAuthorization: AWS AKIDEXAMPLE:c2lnbmF0dXJl\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert!(sigv2.starts_with("HTTP/1.1 400"), "{sigv2}");
    assert!(sigv2.contains("AWS4-HMAC-SHA256"), "{sigv2}");

    let wrong_secret = client_for(&s.gateway, "CKNOSUCHKEY0000000000", "not-the-secret");
    let refused = wrong_secret.list_buckets().send().await.unwrap_err();
    assert_eq!(code(&refused.into_service_error()), "InvalidAccessKeyId");
    let key = s.gateway.keys().create("second").await.unwrap();
    let bad_signature = client_for(
        &s.gateway,
        &key.id,
        "0000000000000000000000000000000000000000",
    );
    let refused = bad_signature.list_buckets().send().await.unwrap_err();
    assert_eq!(code(&refused.into_service_error()), "SignatureDoesNotMatch");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_object_stays_readable_with_a_whole_site_stopped() {
    let mut s = setup().await;
    s.client
        .create_bucket()
        .bucket("safe")
        .send()
        .await
        .unwrap();
    let sizes = [1usize, 100 << 10, (5 << 20) + 1];
    let mut objects = Vec::new();
    for (n, size) in sizes.iter().enumerate() {
        let body = pseudo_random_bytes(100 + n as u64, *size);
        s.client
            .put_object()
            .bucket("safe")
            .key(format!("k{n}"))
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap();
        objects.push(body);
    }
    // Site 2 (nodes 4 and 5) goes away; the gateway runs on node 0.
    s.cluster.stop(4).await;
    s.cluster.stop(5).await;
    for (n, body) in objects.iter().enumerate() {
        let back = get_bytes(&s.client, "safe", &format!("k{n}")).await;
        assert!(back == *body, "object {n} differs with site 2 down");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100_mib_multipart_upload_completes_with_the_s3_etag_and_reads_back() {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("big").send().await.unwrap();
    let part_size = 5 << 20;
    let parts = 20;
    let body = pseudo_random_bytes(77, part_size * parts);
    let upload = c
        .create_multipart_upload()
        .bucket("big")
        .key("video.bin")
        .content_type("video/mp4")
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap().to_owned();
    let listed = c
        .list_multipart_uploads()
        .bucket("big")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.uploads().len(), 1);
    assert_eq!(listed.uploads()[0].upload_id(), Some(upload_id.as_str()));

    let mut completed = Vec::new();
    let mut md5s = Vec::new();
    for (index, chunk) in body.chunks(part_size).enumerate() {
        let number = index as i32 + 1;
        let part = c
            .upload_part()
            .bucket("big")
            .key("video.bin")
            .upload_id(&upload_id)
            .part_number(number)
            .body(ByteStream::from(chunk.to_vec()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            part.e_tag(),
            Some(format!("\"{}\"", md5_hex(chunk)).as_str())
        );
        md5s.extend(cairn_protocol::from_hex::<16>(&md5_hex(chunk)).unwrap());
        completed.push(
            CompletedPart::builder()
                .part_number(number)
                .e_tag(part.e_tag().unwrap())
                .build(),
        );
    }
    // ListParts pages.
    let first = c
        .list_parts()
        .bucket("big")
        .key("video.bin")
        .upload_id(&upload_id)
        .max_parts(7)
        .send()
        .await
        .unwrap();
    assert_eq!(first.parts().len(), 7);
    assert_eq!(first.is_truncated(), Some(true));
    let rest = c
        .list_parts()
        .bucket("big")
        .key("video.bin")
        .upload_id(&upload_id)
        .part_number_marker(first.next_part_number_marker().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(rest.parts().len(), parts - 7);
    assert_eq!(rest.parts()[0].part_number(), Some(8));

    let done = c
        .complete_multipart_upload()
        .bucket("big")
        .key("video.bin")
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(completed))
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        done.e_tag(),
        Some(format!("\"{}-{parts}\"", md5_hex(&md5s)).as_str())
    );
    let back = get_bytes(c, "big", "video.bin").await;
    assert!(back == body, "the 100 MiB object read back differently");
    let head = c
        .head_object()
        .bucket("big")
        .key("video.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("video/mp4"));
    // A range across a part boundary.
    let across = c
        .get_object()
        .bucket("big")
        .key("video.bin")
        .range(format!("bytes={}-{}", part_size - 100, part_size + 99))
        .send()
        .await
        .unwrap();
    let bytes = across.body.collect().await.unwrap().into_bytes();
    assert!(bytes.as_ref() == &body[part_size - 100..part_size + 100]);
    let after = c
        .list_multipart_uploads()
        .bucket("big")
        .send()
        .await
        .unwrap();
    assert!(after.uploads().is_empty());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multipart_mistakes_get_their_s3_errors_and_change_nothing() {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("multi").send().await.unwrap();
    let upload_id = c
        .create_multipart_upload()
        .bucket("multi")
        .key("k")
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned();
    for bad in [0, 10_001] {
        let error = c
            .upload_part()
            .bucket("multi")
            .key("k")
            .upload_id(&upload_id)
            .part_number(bad)
            .body(ByteStream::from_static(b"x"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(
            code(&error.into_service_error()),
            "InvalidArgument",
            "part {bad}"
        );
    }
    let mut etags = Vec::new();
    for (number, size) in [(1, 1024usize), (2, 1024)] {
        let part = c
            .upload_part()
            .bucket("multi")
            .key("k")
            .upload_id(&upload_id)
            .part_number(number)
            .body(ByteStream::from(pseudo_random_bytes(number as u64, size)))
            .send()
            .await
            .unwrap();
        etags.push(part.e_tag().unwrap().to_owned());
    }
    let complete = |parts: Vec<(i32, &str)>| {
        c.complete_multipart_upload()
            .bucket("multi")
            .key("k")
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(
                        parts
                            .into_iter()
                            .map(|(n, e)| CompletedPart::builder().part_number(n).e_tag(e).build())
                            .collect(),
                    ))
                    .build(),
            )
            .send()
    };
    let small = complete(vec![(1, &etags[0]), (2, &etags[1])])
        .await
        .unwrap_err();
    assert_eq!(code(&small.into_service_error()), "EntityTooSmall");
    let order = complete(vec![(2, &etags[1]), (1, &etags[0])])
        .await
        .unwrap_err();
    assert_eq!(code(&order.into_service_error()), "InvalidPartOrder");
    let wrong = complete(vec![(1, "\"00000000000000000000000000000000\"")])
        .await
        .unwrap_err();
    assert_eq!(code(&wrong.into_service_error()), "InvalidPart");
    let missing = complete(vec![(3, &etags[0])]).await.unwrap_err();
    assert_eq!(code(&missing.into_service_error()), "InvalidPart");
    // None of these made an object; a single part (the last) is fine.
    let none = c
        .head_object()
        .bucket("multi")
        .key("k")
        .send()
        .await
        .unwrap_err();
    assert_eq!(none.raw_response().map(|r| r.status().as_u16()), Some(404));
    complete(vec![(2, &etags[1])]).await.unwrap();
    assert_eq!(
        get_bytes(c, "multi", "k").await,
        pseudo_random_bytes(2, 1024)
    );

    // Abort: the upload is gone.
    let other = c
        .create_multipart_upload()
        .bucket("multi")
        .key("other")
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned();
    c.abort_multipart_upload()
        .bucket("multi")
        .key("other")
        .upload_id(&other)
        .send()
        .await
        .unwrap();
    let gone = c
        .list_parts()
        .bucket("multi")
        .key("other")
        .upload_id(&other)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&gone.into_service_error()), "NoSuchUpload");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_keep_or_replace_metadata_and_copy_parts_by_range() {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, MetadataDirective};
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("src").send().await.unwrap();
    c.create_bucket().bucket("dst").send().await.unwrap();
    let body = pseudo_random_bytes(9, (6 << 20) + 3);
    c.put_object()
        .bucket("src")
        .key("original")
        .content_type("text/x-original")
        .metadata("origin", "here")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    c.copy_object()
        .bucket("dst")
        .key("kept")
        .copy_source("src/original")
        .send()
        .await
        .unwrap();
    let kept = c
        .head_object()
        .bucket("dst")
        .key("kept")
        .send()
        .await
        .unwrap();
    assert_eq!(kept.content_type(), Some("text/x-original"));
    assert_eq!(
        kept.metadata()
            .and_then(|m| m.get("origin"))
            .map(String::as_str),
        Some("here")
    );
    assert!(get_bytes(c, "dst", "kept").await == body);
    c.copy_object()
        .bucket("dst")
        .key("replaced")
        .copy_source("src/original")
        .metadata_directive(MetadataDirective::Replace)
        .content_type("text/x-new")
        .send()
        .await
        .unwrap();
    let replaced = c
        .head_object()
        .bucket("dst")
        .key("replaced")
        .send()
        .await
        .unwrap();
    assert_eq!(replaced.content_type(), Some("text/x-new"));
    assert!(replaced.metadata().is_none_or(|m| m.is_empty()));
    let itself = c
        .copy_object()
        .bucket("src")
        .key("original")
        .copy_source("src/original")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&itself.into_service_error()), "InvalidRequest");
    let precondition = c
        .copy_object()
        .bucket("dst")
        .key("never")
        .copy_source("src/original")
        .copy_source_if_match("\"0000\"")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        code(&precondition.into_service_error()),
        "PreconditionFailed"
    );

    // UploadPartCopy: the source's first 5 MiB, then the rest.
    let upload_id = c
        .create_multipart_upload()
        .bucket("dst")
        .key("assembled")
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned();
    let split = 5 << 20;
    let mut completed = Vec::new();
    for (number, range) in [
        (1, format!("bytes=0-{}", split - 1)),
        (2, format!("bytes={split}-{}", body.len() - 1)),
    ] {
        let copied = c
            .upload_part_copy()
            .bucket("dst")
            .key("assembled")
            .upload_id(&upload_id)
            .part_number(number)
            .copy_source("src/original")
            .copy_source_range(range)
            .send()
            .await
            .unwrap();
        let etag = copied
            .copy_part_result()
            .unwrap()
            .e_tag()
            .unwrap()
            .to_owned();
        completed.push(
            CompletedPart::builder()
                .part_number(number)
                .e_tag(etag)
                .build(),
        );
    }
    c.complete_multipart_upload()
        .bucket("dst")
        .key("assembled")
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(completed))
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(get_bytes(c, "dst", "assembled").await == body);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn additional_checksums_are_verified_kept_and_returned() {
    use aws_sdk_s3::types::{
        ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload, CompletedPart,
    };
    use base64::Engine;
    use s3s::crypto::{Checksum, Crc32c, Sha256};
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("sums").send().await.unwrap();
    let body = pseudo_random_bytes(3, 3 << 20);
    let expected = b64(&Crc32c::checksum(&body));
    let put = c
        .put_object()
        .bucket("sums")
        .key("crc")
        .checksum_algorithm(ChecksumAlgorithm::Crc32C)
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(put.checksum_crc32_c(), Some(expected.as_str()));
    let head = c
        .head_object()
        .bucket("sums")
        .key("crc")
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(head.checksum_crc32_c(), Some(expected.as_str()));
    // The client checks the checksum it is sent back against the bytes.
    let got = c
        .get_object()
        .bucket("sums")
        .key("crc")
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(got.checksum_crc32_c(), Some(expected.as_str()));
    assert!(got.body.collect().await.unwrap().into_bytes().as_ref() == body.as_slice());

    // A body streamed from a file goes as aws-chunked with the checksum in
    // a trailer.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &body).unwrap();
    let streamed = c
        .put_object()
        .bucket("sums")
        .key("streamed")
        .checksum_algorithm(ChecksumAlgorithm::Crc32C)
        .body(ByteStream::from_path(file.path()).await.unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.checksum_crc32_c(), Some(expected.as_str()));
    assert!(get_bytes(c, "sums", "streamed").await == body);

    let sha = b64(Sha256::checksum(b"exact").as_ref());
    c.put_object()
        .bucket("sums")
        .key("sha")
        .checksum_sha256(&sha)
        .body(ByteStream::from_static(b"exact"))
        .send()
        .await
        .unwrap();
    let wrong = c
        .put_object()
        .bucket("sums")
        .key("wrong")
        .checksum_sha256(b64(Sha256::checksum(b"other").as_ref()))
        .body(ByteStream::from_static(b"exact"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&wrong.into_service_error()), "BadDigest");
    let none = c
        .head_object()
        .bucket("sums")
        .key("wrong")
        .send()
        .await
        .unwrap_err();
    assert_eq!(none.raw_response().map(|r| r.status().as_u16()), Some(404));

    let upload_id = c
        .create_multipart_upload()
        .bucket("sums")
        .key("parts")
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned();
    let part = c
        .upload_part()
        .bucket("sums")
        .key("parts")
        .upload_id(&upload_id)
        .part_number(1)
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .body(ByteStream::from_static(b"part one"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        part.checksum_sha256(),
        Some(b64(Sha256::checksum(b"part one").as_ref()).as_str())
    );
    // A second part, then the object: S3's composite checksum, the
    // SHA-256 of the parts' binary SHA-256s, then -2.
    let first = pseudo_random_bytes(31, 5 << 20);
    let part_one = c
        .upload_part()
        .bucket("sums")
        .key("parts")
        .upload_id(&upload_id)
        .part_number(1)
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .body(ByteStream::from(first.clone()))
        .send()
        .await
        .unwrap();
    let part_two = c
        .upload_part()
        .bucket("sums")
        .key("parts")
        .upload_id(&upload_id)
        .part_number(2)
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .body(ByteStream::from_static(b"part two"))
        .send()
        .await
        .unwrap();
    let listed = c
        .list_parts()
        .bucket("sums")
        .key("parts")
        .upload_id(&upload_id)
        .send()
        .await
        .unwrap();
    let sums: Vec<Option<&str>> = listed.parts().iter().map(|p| p.checksum_sha256()).collect();
    let one = b64(Sha256::checksum(&first).as_ref());
    let two = b64(Sha256::checksum(b"part two").as_ref());
    assert_eq!(sums, [Some(one.as_str()), Some(two.as_str())]);
    let completed = |first_sum: String| {
        let parts = vec![
            CompletedPart::builder()
                .part_number(1)
                .e_tag(part_one.e_tag().unwrap())
                .checksum_sha256(first_sum)
                .build(),
            CompletedPart::builder()
                .part_number(2)
                .e_tag(part_two.e_tag().unwrap())
                .checksum_sha256(two.clone())
                .build(),
        ];
        c.complete_multipart_upload()
            .bucket("sums")
            .key("parts")
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
    };
    let wrong = completed(two.clone()).await.unwrap_err();
    assert_eq!(code(&wrong.into_service_error()), "InvalidPart");
    let done = completed(one.clone()).await.unwrap();
    let mut both = Sha256::checksum(&first).as_ref().to_vec();
    both.extend_from_slice(Sha256::checksum(b"part two").as_ref());
    let expected = format!("{}-2", b64(Sha256::checksum(&both).as_ref()));
    assert_eq!(done.checksum_sha256(), Some(expected.as_str()));
    let head = c
        .head_object()
        .bucket("sums")
        .key("parts")
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(head.checksum_sha256(), Some(expected.as_str()));
    assert_eq!(head.checksum_type().map(|t| t.as_str()), Some("COMPOSITE"));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_writes_from_three_gateways_have_exactly_one_winner() {
    let cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    cluster
        .install_map(cluster.map(), Scheme::new(4, 2).unwrap())
        .await
        .unwrap();
    let root = random_secret();
    let mut gateways = Vec::new();
    for node in [0, 2, 4] {
        gateways.push(
            Gateway::start(
                cluster.node(node).handle(),
                RootKey::from_bytes(root),
                GatewayConfig {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    region: "us-east-1".into(),
                    domains: Vec::new(),
                    collection: Collection::default(),
                    tls: None,
                },
            )
            .await
            .unwrap(),
        );
    }
    let key = gateways[0].keys().create("test").await.unwrap();
    let clients: Vec<Client> = gateways
        .iter()
        .map(|g| client_for(g, &key.id, &key.secret))
        .collect();
    clients[0]
        .create_bucket()
        .bucket("cond")
        .send()
        .await
        .unwrap();

    let attempts = (0..30).map(|n| {
        let client = clients[n % 3].clone();
        async move {
            client
                .put_object()
                .bucket("cond")
                .key("only-once")
                .if_none_match("*")
                .body(ByteStream::from(format!("writer {n}").into_bytes()))
                .send()
                .await
                .map(|_| n)
                .map_err(|e| code(&e.into_service_error()))
        }
    });
    let outcomes = futures::future::join_all(attempts).await;
    let winners: Vec<usize> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok().copied())
        .collect();
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Err(code) if code == "PreconditionFailed"))
        .count();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    assert_eq!(refused, 29, "{outcomes:?}");
    let winner = winners[0];
    for client in &clients {
        let body = get_bytes(client, "cond", "only-once").await;
        assert_eq!(body, format!("writer {winner}").into_bytes());
    }

    // If-Match: the current ETag wins, another one is refused.
    let etag = clients[1]
        .head_object()
        .bucket("cond")
        .key("only-once")
        .send()
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .to_owned();
    let stale = clients[2]
        .put_object()
        .bucket("cond")
        .key("only-once")
        .if_match("\"00000000000000000000000000000000\"")
        .body(ByteStream::from_static(b"stale"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&stale.into_service_error()), "PreconditionFailed");
    clients[2]
        .put_object()
        .bucket("cond")
        .key("only-once")
        .if_match(&etag)
        .body(ByteStream::from_static(b"updated"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        get_bytes(&clients[0], "cond", "only-once").await,
        b"updated"
    );
    let missing = clients[0]
        .put_object()
        .bucket("cond")
        .key("absent")
        .if_match(&etag)
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&missing.into_service_error()), "PreconditionFailed");

    // A multipart completion is conditional too.
    let upload_id = clients[1]
        .create_multipart_upload()
        .bucket("cond")
        .key("only-once")
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned();
    let part = clients[1]
        .upload_part()
        .bucket("cond")
        .key("only-once")
        .upload_id(&upload_id)
        .part_number(1)
        .body(ByteStream::from_static(b"late"))
        .send()
        .await
        .unwrap();
    let late = clients[1]
        .complete_multipart_upload()
        .bucket("cond")
        .key("only-once")
        .upload_id(&upload_id)
        .if_none_match("*")
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
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
        .unwrap_err();
    assert_eq!(code(&late.into_service_error()), "PreconditionFailed");
    assert_eq!(
        get_bytes(&clients[2], "cond", "only-once").await,
        b"updated"
    );

    // After a delete, a conditional create succeeds again.
    clients[0]
        .delete_object()
        .bucket("cond")
        .key("only-once")
        .send()
        .await
        .unwrap();
    clients[1]
        .put_object()
        .bucket("cond")
        .key("only-once")
        .if_none_match("*")
        .body(ByteStream::from_static(b"again"))
        .send()
        .await
        .unwrap();
    for gateway in gateways {
        gateway.stop().await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_5_plus_4_on_three_sites_every_object_survives_a_site_and_one_more_node() {
    use cairn_protocol::membership::SignedMap;
    use cairn_protocol::placement::Tolerance;
    let mut cluster = Cluster::start(&[3, 3, 3]).await.unwrap();
    // Nine metadata replicas: a majority survives four nodes lost.
    let map = SignedMap::sign_with_replicas(
        &cluster.cluster_key,
        cluster.map(),
        Scheme::new(5, 4).unwrap(),
        Tolerance { extra_nodes: 1 },
        9,
    )
    .unwrap();
    cluster.install_signed(map).await.unwrap();
    let gateway = Gateway::start(
        cluster.node(0).handle(),
        RootKey::from_bytes(random_secret()),
        GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            region: "us-east-1".into(),
            domains: Vec::new(),
            collection: Collection::default(),
            tls: None,
        },
    )
    .await
    .unwrap();
    let key = gateway.keys().create("test").await.unwrap();
    let client = client_for(&gateway, &key.id, &key.secret);
    client
        .create_bucket()
        .bucket("sturdy")
        .send()
        .await
        .unwrap();
    let sizes = [0usize, 1, 200 << 10, (5 << 20) + 1, 13 << 20];
    let mut objects = Vec::new();
    for (n, size) in sizes.iter().enumerate() {
        let body = pseudo_random_bytes(500 + n as u64, *size);
        client
            .put_object()
            .bucket("sturdy")
            .key(format!("k{n}"))
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap();
        objects.push(body);
    }
    // Site 2 (nodes 6, 7, 8) and node 3 of site 1 go away; the gateway
    // runs on node 0.
    for node in [6, 7, 8, 3] {
        cluster.stop(node).await;
    }
    for (n, body) in objects.iter().enumerate() {
        let back = get_bytes(&client, "sturdy", &format!("k{n}")).await;
        assert!(back == *body, "object {n} differs with four nodes down");
    }
    let listed = client
        .list_objects_v2()
        .bucket("sturdy")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.contents().len(), sizes.len());
    gateway.stop().await;
    cluster.shutdown().await;
}

/// Replaces a request's body before it is signed, to send what no SDK
/// would: malformed XML, correctly signed.
#[derive(Debug)]
struct ReplaceBody(&'static str);

impl aws_sdk_s3::config::Intercept for ReplaceBody {
    fn name(&self) -> &'static str {
        "replace body"
    }

    fn modify_before_signing(
        &self,
        context: &mut aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _components: &aws_sdk_s3::config::RuntimeComponents,
        _config: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let request = context.request_mut();
        *request.body_mut() = aws_sdk_s3::primitives::SdkBody::from(self.0);
        request
            .headers_mut()
            .insert("content-length", self.0.len().to_string());
        request.headers_mut().remove("content-md5");
        for algorithm in ["crc32", "crc32c", "crc64nvme", "sha1", "sha256"] {
            request
                .headers_mut()
                .remove(format!("x-amz-checksum-{algorithm}"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_its_s3_error_and_changes_nothing() {
    let s = setup().await;
    let c = &s.client;
    for bad in ["Bad_Name", "ab", "-leading", "192.168.0.1"] {
        let error = c.create_bucket().bucket(bad).send().await.unwrap_err();
        assert_eq!(
            code(&error.into_service_error()),
            "InvalidBucketName",
            "{bad}"
        );
    }
    assert!(c.list_buckets().send().await.unwrap().buckets().is_empty());
    c.create_bucket().bucket("strict").send().await.unwrap();

    let large = c
        .put_object()
        .bucket("strict")
        .key("k")
        .metadata("big", "x".repeat(2100))
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&large.into_service_error()), "MetadataTooLarge");

    // A malformed XML body, signed like any other.
    let upload_id = c
        .create_multipart_upload()
        .bucket("strict")
        .key("k")
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned();
    let malformed = c
        .complete_multipart_upload()
        .bucket("strict")
        .key("k")
        .upload_id(&upload_id)
        .customize()
        .interceptor(ReplaceBody("<CompleteMultipartUpload><Part><PartNumber>1"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&malformed.into_service_error()), "MalformedXML");
    let malformed = c
        .delete_objects()
        .bucket("strict")
        .delete(
            aws_sdk_s3::types::Delete::builder()
                .objects(
                    aws_sdk_s3::types::ObjectIdentifier::builder()
                        .key("k")
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
        )
        .customize()
        .interceptor(ReplaceBody("<Delete><Object><Key>k</Object></Delete>"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&malformed.into_service_error()), "MalformedXML");
    let upload = c
        .list_multipart_uploads()
        .bucket("strict")
        .send()
        .await
        .unwrap();
    assert_eq!(upload.uploads().len(), 1, "the upload is still there");
    let listed = c.list_objects_v2().bucket("strict").send().await.unwrap();
    assert!(listed.contents().is_empty());
    let bad_token = c
        .list_objects_v2()
        .bucket("strict")
        .continuation_token("!!!")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&bad_token.into_service_error()), "InvalidArgument");
    let long_key = c
        .put_object()
        .bucket("strict")
        .key("k".repeat(1025))
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&long_key.into_service_error()), "KeyTooLongError");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_in_the_middle_of_a_put_leaves_no_object() {
    let s = setup().await;
    s.client.create_bucket().bucket("cut").send().await.unwrap();
    // A presigned PUT lets a raw socket send part of a body and hang up.
    let uri = presigned_put(&s.client, "cut", "half").await;
    let address = s.gateway.address();
    hang_up_mid_put(address, &uri, 10 << 20, &pseudo_random_bytes(1, 3 << 20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let missing = s
        .client
        .head_object()
        .bucket("cut")
        .key("half")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        missing.raw_response().map(|r| r.status().as_u16()),
        Some(404)
    );
    let listed = s
        .client
        .list_objects_v2()
        .bucket("cut")
        .send()
        .await
        .unwrap();
    assert!(listed.contents().is_empty());
    // A body that does not hash to the SHA-256 the request claims.
    let body = pseudo_random_bytes(3, 100_000);
    let claimed = format!("x-amz-content-sha256: {}\r\n", "0".repeat(64));
    let answer = raw_request(address, "PUT", &uri, &address.to_string(), &claimed, &body).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400")
            && answer.contains("<Code>XAmzContentSHA256Mismatch</Code>"),
        "{answer}"
    );
    assert!(
        s.client
            .head_object()
            .bucket("cut")
            .key("half")
            .send()
            .await
            .is_err()
    );
    // The same presigned URL, used in full, stores the object.
    let body = pseudo_random_bytes(2, 1 << 20);
    let answer = raw_request(address, "PUT", &uri, &address.to_string(), "", &body).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(get_bytes(&s.client, "cut", "half").await == body);
    s.shutdown().await;
}

/// Live and trashed fragments over every node of the cluster.
fn fragment_counts(cluster: &Cluster) -> (u64, u64) {
    (0..6).fold((0, 0), |(live, trash), i| {
        let (l, t, _) = cluster.node(i).store().counts().unwrap();
        (live + l, trash + t)
    })
}

/// The collector's work left in a bucket: single-PUT upload records and
/// release rows, as a quorum read sees them.
async fn collector_work(cluster: &Cluster, bucket: &str) -> usize {
    use cairn_protocol::meta::{Partition, Register, RowValue, Table};
    use cairn_protocol::records::UploadRecord;
    let metadata = cluster.node(0).metadata();
    let mut work = 0;
    for table in [Table::Uploads, Table::Releases] {
        let page = metadata
            .range(&Partition::bucket(bucket), table, &[], None, 1000)
            .await
            .unwrap();
        for (_, value) in page.rows {
            if let RowValue::Register(Register {
                value: Some(bytes), ..
            }) = value
                && (table == Table::Releases || !UploadRecord::decode(&bytes).unwrap().multipart)
            {
                work += 1;
            }
        }
    }
    work
}

/// Gives a committed object the upload record its PUT would have left had
/// it crashed between its commit and the record's deletion: the collector
/// must see the object and keep its fragments.
async fn forge_uncommitted_look(cluster: &Cluster, bucket: &str, key: &str) {
    use cairn_protocol::manifest::SignedManifest;
    use cairn_protocol::meta::{Partition, Register, RowKey, RowValue, Table, upload_sort_key};
    use cairn_protocol::records::UploadRecord;
    use cairn_protocol::version::{StoredHeaders, VersionBody};
    let metadata = cluster.node(0).metadata();
    let partition = Partition::bucket(bucket);
    let (start, end) = (
        [key.as_bytes(), &[0]].concat(),
        [key.as_bytes(), &[1]].concat(),
    );
    let page = metadata
        .range(&partition, Table::Versions, &start, Some(&end), 10)
        .await
        .unwrap();
    let RowValue::Version(version) = &page.rows[0].1 else {
        panic!("a version row");
    };
    let VersionBody::Data { manifest, .. } = &version.body else {
        panic!("an object");
    };
    let manifest_row = RowKey::new(
        partition.clone(),
        Table::Manifests,
        manifest.as_bytes().to_vec(),
    );
    let Some(RowValue::Immutable(bytes)) =
        metadata.read(vec![manifest_row]).await.unwrap().remove(0)
    else {
        panic!("a manifest");
    };
    let upload = SignedManifest::decode(&bytes).unwrap().manifest.upload;
    let record = UploadRecord {
        upload,
        started_unix_ms: 1,
        multipart: false,
        scheme: Scheme::new(4, 2).unwrap(),
        bucket_key_id: String::new(),
        wrapped_key: Vec::new(),
        headers: StoredHeaders::default(),
    };
    let row = RowKey::new(
        partition,
        Table::Uploads,
        upload_sort_key(key, upload.as_bytes()),
    );
    let value = RowValue::Register(Register {
        at: metadata.timestamp(),
        value: Some(record.encode()),
    });
    metadata.write(vec![(row, value)]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orphan_fragments_go_to_the_trash_and_committed_ones_stay() {
    // Short deadlines so that the collector acts within the test; every
    // node runs one, as `cairn serve` does.
    let collection = Collection {
        write_deadline: Duration::from_secs(8),
        clock_margin: Duration::from_secs(2),
        every: Duration::from_millis(500),
    };
    let s = setup_with(collection).await;
    let collectors: Vec<Collector> = (0..6)
        .map(|i| Collector::start(s.cluster.node(i).handle(), collection))
        .collect();
    let c = &s.client;
    c.create_bucket().bucket("orphans").send().await.unwrap();
    let put = |key: &'static str, seed: u64| async move {
        c.put_object()
            .bucket("orphans")
            .key(key)
            .body(ByteStream::from(pseudo_random_bytes(seed, 1 << 20)))
            .send()
            .await
            .unwrap();
    };

    // What stays: a plain object, the newest of two versions, and a
    // completed multipart upload.
    put("kept", 1).await;
    put("over", 2).await;
    // Uploads parts (number, seed, size) in order; returns the upload id
    // and, per part number, the ETag of its last upload.
    let upload = |key: &'static str, parts: &'static [(i32, u64, usize)]| async move {
        let created = c
            .create_multipart_upload()
            .bucket("orphans")
            .key(key)
            .send()
            .await
            .unwrap();
        let id = created.upload_id().unwrap().to_owned();
        let mut etags = std::collections::BTreeMap::new();
        for &(number, seed, size) in parts {
            let part = c
                .upload_part()
                .bucket("orphans")
                .key(key)
                .upload_id(&id)
                .part_number(number)
                .body(ByteStream::from(pseudo_random_bytes(seed, size)))
                .send()
                .await
                .unwrap();
            etags.insert(number, part.e_tag().unwrap().to_owned());
        }
        (id, etags)
    };
    let complete = |key: &'static str, id: String, chosen: Vec<(i32, String)>| async move {
        let parts = chosen
            .into_iter()
            .map(|(number, etag)| {
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(number)
                    .e_tag(etag)
                    .build()
            })
            .collect();
        c.complete_multipart_upload()
            .bucket("orphans")
            .key(key)
            .upload_id(&id)
            .multipart_upload(
                aws_sdk_s3::types::CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .unwrap();
    };
    const TWO_PARTS: &[(i32, u64, usize)] = &[(1, 11, 5 << 20), (2, 12, 1 << 20)];
    let (before_completed, _) = fragment_counts(&s.cluster);
    let (id, etags) = upload("completed", TWO_PARTS).await;
    complete("completed", id, etags.into_iter().collect()).await;
    let two_parts = fragment_counts(&s.cluster).0 - before_completed;
    forge_uncommitted_look(&s.cluster, "orphans", "kept").await;
    let (before_deleted, _) = fragment_counts(&s.cluster);
    put("deleted", 3).await;
    let (committed, trash) = fragment_counts(&s.cluster);
    assert_eq!(trash, 0);
    let one_object = committed - before_deleted;
    assert!(one_object > 0);

    // What goes: an overwritten version, a deleted object, an aborted
    // upload, and a PUT whose client hung up after 9 of 12 MiB.
    put("over", 4).await;
    c.delete_object()
        .bucket("orphans")
        .key("deleted")
        .send()
        .await
        .unwrap();
    let (id, _) = upload("aborted", TWO_PARTS).await;
    // Part 1 sent twice, part 3 not chosen: only the second part 1 and
    // part 2 stay.
    let (id_redone, etags) = upload(
        "redone",
        &[
            (1, 20, 5 << 20),
            (1, 11, 5 << 20),
            (2, 12, 1 << 20),
            (3, 23, 1 << 20),
        ],
    )
    .await;
    let chosen = etags.into_iter().filter(|(n, _)| *n < 3).collect();
    complete("redone", id_redone, chosen).await;
    c.abort_multipart_upload()
        .bucket("orphans")
        .key("aborted")
        .upload_id(&id)
        .send()
        .await
        .unwrap();
    let uri = presigned_put(c, "orphans", "cut").await;
    hang_up_mid_put(
        s.gateway.address(),
        &uri,
        12 << 20,
        &pseudo_random_bytes(5, 9 << 20),
    )
    .await;
    let (_, stored_garbage) = {
        let (live, _) = fragment_counts(&s.cluster);
        (live, live - committed)
    };
    assert!(
        stored_garbage >= one_object,
        "the overwrite, the aborted part and the cut PUT stored fragments"
    );

    // Every fragment that no version uses reaches the trash once the
    // deadlines have passed; every committed one stays.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (live, trash) = fragment_counts(&s.cluster);
        if live == committed - one_object + two_parts
            && collector_work(&s.cluster, "orphans").await == 0
        {
            assert!(
                trash >= one_object * 2,
                "the old version and the deleted object: {trash}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "live {live} (want {}), trash {trash}, work {}",
            committed - one_object + two_parts,
            collector_work(&s.cluster, "orphans").await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(get_bytes(c, "orphans", "kept").await == pseudo_random_bytes(1, 1 << 20));
    assert!(get_bytes(c, "orphans", "over").await == pseudo_random_bytes(4, 1 << 20));
    let mut whole = pseudo_random_bytes(11, 5 << 20);
    whole.extend(pseudo_random_bytes(12, 1 << 20));
    assert!(get_bytes(c, "orphans", "completed").await == whole);
    assert!(get_bytes(c, "orphans", "redone").await == whole);
    // More passes change nothing.
    tokio::time::sleep(collection.every * 4).await;
    assert_eq!(
        fragment_counts(&s.cluster).0,
        committed - one_object + two_parts
    );
    drop(collectors);
    s.shutdown().await;
}

/// A presigned PutObject URI, for a raw socket to send a body to.
async fn presigned_put(client: &Client, bucket: &str, key: &str) -> http::Uri {
    let presigned = client
        .put_object()
        .bucket(bucket)
        .key(key)
        .presigned(
            aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(300)).unwrap(),
        )
        .await
        .unwrap();
    presigned.uri().parse().unwrap()
}

/// Announces `declared` bytes to a presigned PUT, sends `sent`, and hangs up.
async fn hang_up_mid_put(
    address: std::net::SocketAddr,
    uri: &http::Uri,
    declared: usize,
    sent: &[u8],
) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {declared}\r\n\r\n",
        uri.path_and_query().unwrap(),
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(sent).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Sends one HTTP/1.1 request with `host` as its Host header (and any
/// `extra_headers` lines) to the gateway and returns the whole answer.
async fn raw_request(
    address: std::net::SocketAddr,
    method: &str,
    uri: &http::Uri,
    host: &str,
    extra_headers: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "{method} {} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        uri.path_and_query().unwrap(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn virtual_hosted_style_requests_reach_their_bucket() {
    let s = setup().await;
    s.client
        .create_bucket()
        .bucket("vhost")
        .send()
        .await
        .unwrap();
    let key = s.gateway.keys().create("virtual").await.unwrap();
    // Signed for `vhost.localhost:<port>`, sent to 127.0.0.1 with that Host.
    let port = s.gateway.address().port();
    let virtual_client = Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(format!("http://localhost:{port}"))
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new(&key.id, &key.secret, None, None, "test"))
            .force_path_style(false)
            .build(),
    );
    let presign =
        || aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(300)).unwrap();
    let put = virtual_client
        .put_object()
        .bucket("vhost")
        .key("dir/object.txt")
        .presigned(presign())
        .await
        .unwrap();
    let put_uri: http::Uri = put.uri().parse().unwrap();
    let host = format!("vhost.localhost:{port}");
    assert_eq!(put_uri.authority().unwrap().as_str(), host);
    assert_eq!(put_uri.path(), "/dir/object.txt");
    let answer = raw_request(
        s.gateway.address(),
        "PUT",
        &put_uri,
        &host,
        "",
        b"by virtual host",
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Path-style sees what the virtual-hosted PUT stored, and back.
    assert_eq!(
        get_bytes(&s.client, "vhost", "dir/object.txt").await,
        b"by virtual host"
    );
    let get = virtual_client
        .get_object()
        .bucket("vhost")
        .key("dir/object.txt")
        .presigned(presign())
        .await
        .unwrap();
    let answer = raw_request(
        s.gateway.address(),
        "GET",
        &get.uri().parse().unwrap(),
        &host,
        "",
        b"",
    )
    .await;
    assert!(answer.ends_with(b"\r\n\r\nby virtual host"));
    // A bucket that does not exist, named by the host.
    let missing = virtual_client
        .get_object()
        .bucket("absent-bucket")
        .key("dir/object.txt")
        .presigned(presign())
        .await
        .unwrap();
    let answer = raw_request(
        s.gateway.address(),
        "GET",
        &missing.uri().parse().unwrap(),
        &format!("absent-bucket.localhost:{port}"),
        "",
        b"",
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 404") && answer.contains("<Code>NoSuchBucket</Code>"),
        "{answer}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_s3_listener_speaks_tls_with_a_kept_self_signed_certificate() {
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};
    let cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    cluster
        .install_map(cluster.map(), Scheme::new(4, 2).unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let (cert, key) = cairn_gateway::tls::self_signed(dir.path(), &names).unwrap();
    let pem = std::fs::read(&cert).unwrap();
    // The second start keeps the certificate the first one made.
    assert_eq!(
        cairn_gateway::tls::self_signed(dir.path(), &names).unwrap(),
        (cert.clone(), key.clone())
    );
    assert_eq!(std::fs::read(&cert).unwrap(), pem);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let gateway = Gateway::start(
        cluster.node(0).handle(),
        RootKey::from_bytes(random_secret()),
        GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            region: "us-east-1".into(),
            domains: Vec::new(),
            collection: Collection::default(),
            tls: Some(cairn_gateway::tls::server_config(&cert, &key).unwrap()),
        },
    )
    .await
    .unwrap();
    let access = gateway.keys().create("tls").await.unwrap();
    let client_with = |trust: TrustStore| {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .tls_context(
                TlsContext::builder()
                    .with_trust_store(trust)
                    .build()
                    .unwrap(),
            )
            .build_https();
        Client::from_conf(
            aws_sdk_s3::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .http_client(http)
                .endpoint_url(format!("https://localhost:{}", gateway.address().port()))
                .region(Region::new("us-east-1"))
                .credentials_provider(Credentials::new(
                    &access.id,
                    &access.secret,
                    None,
                    None,
                    "t",
                ))
                .force_path_style(true)
                .build(),
        )
    };
    let trusted = client_with(TrustStore::empty().with_pem_certificate(pem.as_slice()));
    trusted
        .create_bucket()
        .bucket("secure")
        .send()
        .await
        .unwrap();
    let body = pseudo_random_bytes(9, 3 << 20);
    trusted
        .put_object()
        .bucket("secure")
        .key("k")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    assert!(get_bytes(&trusted, "secure", "k").await == body);
    // A client that does not trust the certificate gets no answer, and
    // plain HTTP on the TLS port gets none either.
    let untrusted = client_with(TrustStore::empty());
    assert!(untrusted.list_buckets().send().await.is_err());
    let mut stream = tokio::net::TcpStream::connect(gateway.address())
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"));
    gateway.stop().await;
    cluster.shutdown().await;
}
