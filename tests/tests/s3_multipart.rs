//! Multipart uploads through the S3 API.

use aws_sdk_s3::primitives::ByteStream;
use cairn_tests::pseudo_random_bytes;
use cairn_tests::s3::*;

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

/// Every stored attempt at part `number`.
async fn part_attempts(
    s: &Setup,
    bucket: &str,
    upload: &str,
    number: u16,
) -> Vec<cairn_protocol::records::PartRecord> {
    use cairn_protocol::meta::{Partition, RowValue, Table, part_number_start, prefix_end};
    let upload = cairn_protocol::ids::UploadId::parse(upload).unwrap();
    let start = part_number_start(upload.as_bytes(), number);
    let end = prefix_end(&start);
    let page = s
        .cluster
        .node(0)
        .metadata()
        .range(
            &Partition::bucket(bucket),
            Table::Parts,
            &start,
            end.as_deref(),
            100,
        )
        .await
        .unwrap();
    page.rows
        .into_iter()
        .filter_map(|(_, value)| match value {
            RowValue::Register(register) => register.value,
            _ => None,
        })
        .map(|bytes| cairn_protocol::records::PartRecord::decode(&bytes).unwrap())
        .collect()
}

/// The first bytes of a segment's data fragment 0, from whichever node
/// stores it: the start of the segment's ciphertext.
fn ciphertext_start(s: &Setup, part: &cairn_protocol::records::PartRecord, len: u64) -> Vec<u8> {
    let id = part.segments[0].fragments[0];
    (0..6)
        .find_map(|i| s.cluster.node(i).store().read(&id, 0, len).ok())
        .expect("a node stores the fragment")
}

/// A multipart upload has one data key, and part 1 uploaded twice is two
/// streams with one stream id: each attempt must seal under its own key,
/// or the two ciphertexts XOR to the two plaintexts XORed (AES-GCM is a
/// counter mode) and the authentication key is exposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_attempts_at_one_part_never_share_a_key_and_nonce() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("nonce").send().await.unwrap();
    let upload = create_upload(c, "nonce", "k").await;
    let first = pseudo_random_bytes(1, 64 * 1024);
    let second = pseudo_random_bytes(2, 64 * 1024);
    let mut ciphertexts = Vec::new();
    let mut etag = String::new();
    for body in [&first, &second] {
        etag = c
            .upload_part()
            .bucket("nonce")
            .key("k")
            .upload_id(&upload)
            .part_number(1)
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap()
            .e_tag()
            .unwrap()
            .to_owned();
        let part = part_attempts(&s, "nonce", &upload, 1)
            .await
            .into_iter()
            .find(|part| !ciphertexts.iter().any(|(seen, _)| *seen == part.upload))
            .expect("the new attempt");
        ciphertexts.push((part.upload, ciphertext_start(&s, &part, 64)));
    }
    assert_ne!(
        ciphertexts[0].0, ciphertexts[1].0,
        "one attempt id for two attempts"
    );
    let xor = |a: &[u8], b: &[u8]| -> Vec<u8> { a.iter().zip(b).map(|(x, y)| x ^ y).collect() };
    assert_ne!(
        xor(&ciphertexts[0].1, &ciphertexts[1].1),
        xor(&first[..64], &second[..64]),
        "the two attempts were sealed under one key and nonce"
    );
    complete_upload(c, "nonce", "k", &upload, &[(1, &etag)])
        .await
        .unwrap();
    assert_eq!(get_bytes(c, "nonce", "k").await, second);
    s.shutdown().await;
}

/// Two attempts at one part number, in flight together: the completion
/// takes the one whose ETag it names, whichever finished first, and the
/// other is released with the upload's leftovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_attempts_at_one_part_complete_with_the_one_named() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("racing").send().await.unwrap();
    let bodies = [
        pseudo_random_bytes(21, 3 << 20),
        pseudo_random_bytes(22, 2 << 20),
    ];
    for named in 0..2 {
        let key = format!("k{named}");
        let upload = create_upload(c, "racing", &key).await;
        let attempt = |body: Vec<u8>| {
            c.upload_part()
                .bucket("racing")
                .key(&key)
                .upload_id(&upload)
                .part_number(1)
                .body(ByteStream::from(body))
                .send()
        };
        let (a, b) = tokio::join!(attempt(bodies[0].clone()), attempt(bodies[1].clone()));
        let etags = [
            a.unwrap().e_tag().unwrap().to_owned(),
            b.unwrap().e_tag().unwrap().to_owned(),
        ];
        assert_eq!(part_attempts(&s, "racing", &upload, 1).await.len(), 2);
        let completed = complete_upload(c, "racing", &key, &upload, &[(1, &etags[named])]).await;
        assert!(completed.is_ok(), "naming attempt {named}: {completed:?}");
        assert!(get_bytes(c, "racing", &key).await == bodies[named]);
        // Both attempts' rows are gone; the unchosen one is released.
        assert!(part_attempts(&s, "racing", &upload, 1).await.is_empty());
    }
    s.shutdown().await;
}
