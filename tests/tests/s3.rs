//! The S3 gateway end to end: a real cluster on 127.0.0.1 (3 sites x 2
//! nodes, 4+2), the gateway on one node, and the aws-sdk-s3 client.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
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

    c.put_object()
        .bucket("photos")
        .key("a")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap();
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
    c.put_object()
        .bucket("data")
        .key("dir/object-1")
        .body(ByteStream::from_static(b"second"))
        .send()
        .await
        .unwrap();
    assert_eq!(get_bytes(c, "data", "dir/object-1").await, b"second");
    c.put_object()
        .bucket("data")
        .key("top")
        .body(ByteStream::from_static(b"t"))
        .send()
        .await
        .unwrap();
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
