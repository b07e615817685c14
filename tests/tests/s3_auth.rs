//! Who may talk to the gateway: signatures, and TLS on the S3 listener.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use cairn_gateway::{Gateway, GatewayConfig};
use cairn_model::kms::RootKey;
use cairn_protocol::erasure::Scheme;
use cairn_tests::s3::*;
use cairn_tests::{Cluster, pseudo_random_bytes, random_secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
            tls: Some(cairn_gateway::tls::server_config(&cert, &key).unwrap()),
            ..GatewayConfig::default()
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
