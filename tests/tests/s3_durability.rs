//! Objects written through S3 survive the failures the map promises to survive.

use aws_sdk_s3::primitives::ByteStream;
use cairn_gateway::kms::RootKey;
use cairn_gateway::{Gateway, GatewayConfig};
use cairn_protocol::erasure::Scheme;
use cairn_tests::s3::*;
use cairn_tests::{Cluster, pseudo_random_bytes, random_secret};

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
        GatewayConfig::default(),
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
