//! Buckets and objects through the S3 API: sizes, ranges, metadata, copies, digests, checksums, bad input, virtual-hosted style.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use cairn_tests::pseudo_random_bytes;
use cairn_tests::s3::*;

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
