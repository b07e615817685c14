//! Helpers for the S3 end-to-end tests: a real cluster on 127.0.0.1
//! (3 sites x 2 nodes, 4+2), the gateway on one node, the aws-sdk-s3
//! client, and raw HTTP for what no SDK sends.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use cairn_gateway::{Gateway, GatewayConfig};
use cairn_model::collector::{Collection, Collector};
use cairn_model::kms::RootKey;
use cairn_protocol::erasure::Scheme;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Cluster, random_secret};

pub struct Setup {
    pub cluster: Cluster,
    pub gateway: Gateway,
    pub client: Client,
}

impl Setup {
    pub async fn shutdown(self) {
        self.gateway.stop().await;
        self.cluster.shutdown().await;
    }
}

/// Deadlines short enough for a collector to act within a test.
pub const QUICK_COLLECTION: Collection = Collection {
    write_deadline: Duration::from_secs(8),
    clock_margin: Duration::from_secs(2),
    every: Duration::from_millis(500),
};

/// A collector on every node of the cluster, as `cairn serve` runs them.
pub fn start_collectors(cluster: &Cluster, collection: Collection) -> Vec<Collector> {
    (0..cluster.members.len())
        .map(|i| Collector::start(cluster.node(i).handle(), collection))
        .collect()
}

pub async fn setup() -> Setup {
    setup_with(Collection::default()).await
}

pub async fn setup_with(collection: Collection) -> Setup {
    let cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    cluster
        .install_map(cluster.map(), Scheme::new(4, 2).unwrap())
        .await
        .unwrap();
    let gateway = Gateway::start(
        cluster.node(0).handle(),
        RootKey::from_bytes(random_secret()),
        GatewayConfig {
            domains: vec!["localhost".into()],
            collection,
            ..GatewayConfig::default()
        },
    )
    .await
    .unwrap();
    let key = gateway
        .keys()
        .create_with(
            "test",
            cairn_protocol::records::permission::BYPASS_GOVERNANCE,
        )
        .await
        .unwrap();
    let client = client_for(&gateway, &key.id, &key.secret);
    Setup {
        cluster,
        gateway,
        client,
    }
}

/// A gateway on node `index` with the KMS root key `root` and the default
/// settings.
pub async fn gateway_on(cluster: &Cluster, index: usize, root: [u8; 32]) -> Gateway {
    Gateway::start(
        cluster.node(index).handle(),
        RootKey::from_bytes(root),
        GatewayConfig::default(),
    )
    .await
    .unwrap()
}

pub fn client_for(gateway: &Gateway, id: &str, secret: &str) -> Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(format!("http://{}", gateway.address()))
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(id, secret, None, None, "test"))
        .force_path_style(true)
        .build();
    Client::from_conf(config)
}

pub fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    cairn_protocol::to_hex(&md5::Md5::digest(bytes))
}

pub fn code<E: aws_sdk_s3::error::ProvideErrorMetadata>(error: &E) -> String {
    error.code().unwrap_or("(none)").to_owned()
}

/// PUTs `body`; the version id the answer names (none in a bucket that
/// never kept history).
pub async fn put_bytes(
    client: &Client,
    bucket: &str,
    key: impl Into<String>,
    body: &'static [u8],
) -> Option<String> {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from_static(body))
        .send()
        .await
        .unwrap()
        .version_id()
        .map(str::to_owned)
}

pub async fn get_bytes(client: &Client, bucket: &str, key: &str) -> Vec<u8> {
    let object = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    object.body.collect().await.unwrap().into_bytes().to_vec()
}

/// Live and trashed fragments over every node of the cluster.
pub fn fragment_counts(cluster: &Cluster) -> (u64, u64) {
    (0..6).fold((0, 0), |(live, trash), i| {
        let (l, t, _) = cluster.node(i).store().counts().unwrap();
        (live + l, trash + t)
    })
}

/// A presigned PutObject URI, for a raw socket to send a body to.
pub async fn presigned_put(client: &Client, bucket: &str, key: &str) -> http::Uri {
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

/// Starts a PUT of `declared` bytes on a raw socket and sends `sent` of
/// them; the caller hangs up by dropping the stream.
pub async fn start_put(
    address: std::net::SocketAddr,
    uri: &http::Uri,
    declared: usize,
    sent: &[u8],
) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {declared}\r\n\r\n",
        uri.path_and_query().unwrap(),
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(sent).await.unwrap();
    stream
}

/// A PUT of `declared` bytes that hangs up after sending `sent`.
pub async fn hang_up_mid_put(
    address: std::net::SocketAddr,
    uri: &http::Uri,
    declared: usize,
    sent: &[u8],
) {
    let mut stream = start_put(address, uri, declared, sent).await;
    stream.shutdown().await.unwrap();
}

/// Sends one HTTP/1.1 request with `host` as its Host header (and any
/// `extra_headers` lines) to the gateway and returns the whole answer.
pub async fn raw_request(
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

/// Starts a multipart upload of `key`; its upload id.
pub async fn create_upload(client: &Client, bucket: &str, key: &str) -> String {
    client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned()
}

/// Completes `upload` with the parts `(number, etag)`, in order.
pub async fn complete_upload(
    client: &Client,
    bucket: &str,
    key: &str,
    upload: &str,
    parts: &[(i32, &str)],
) -> Result<
    aws_sdk_s3::operation::complete_multipart_upload::CompleteMultipartUploadOutput,
    aws_sdk_s3::error::SdkError<
        aws_sdk_s3::operation::complete_multipart_upload::CompleteMultipartUploadError,
    >,
> {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let parts = parts
        .iter()
        .map(|(number, etag)| {
            CompletedPart::builder()
                .part_number(*number)
                .e_tag(*etag)
                .build()
        })
        .collect();
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
}

/// Deletes the data directory of the node of site 1 (of 3 sites x 2)
/// that is no metadata replica of `bucket` (its disk holds fragments
/// only), restarts it and gives it the map again; returns its index.
pub async fn wipe_a_node_holding_no_metadata_of(cluster: &mut Cluster, bucket: &str) -> usize {
    let replicas = cluster
        .node(0)
        .metadata()
        .replicas_of(&cairn_protocol::meta::Partition::bucket(bucket))
        .unwrap();
    let wiped = [2, 3]
        .into_iter()
        .find(|&i| !replicas.contains(&cluster.members[i].identity.node_id()))
        .expect("one replica per site");
    cluster.stop(wiped).await;
    std::fs::remove_dir_all(&cluster.members[wiped].data_dir).unwrap();
    cluster.restart(wiped).await.unwrap();
    let map = cluster.node(0).cluster_map().unwrap();
    cluster.install_signed(map).await.unwrap();
    wiped
}
