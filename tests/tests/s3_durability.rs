//! Objects written through S3 survive the failures the map promises to survive.

use aws_sdk_s3::primitives::ByteStream;
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
    use cairn_protocol::placement::Tolerance;
    let mut cluster = Cluster::start(&[3, 3, 3]).await.unwrap();
    // Nine metadata replicas: a majority survives four nodes lost.
    cluster
        .install_map_with(Scheme::new(5, 4).unwrap(), Tolerance { extra_nodes: 1 }, 9)
        .await
        .unwrap();
    let gateway = gateway_on(&cluster, 0, random_secret()).await;
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

/// Writes objects of `sizes` bytes through a gateway on node 0, the first
/// before the nodes `stopped` go down and the rest after; returns the
/// objects acknowledged, and checks that every PUT refused was refused
/// with 503 and left nothing a client or the listing sees.
async fn put_with_nodes_down(
    cluster: &mut Cluster,
    root: [u8; 32],
    stopped: &[usize],
    sizes: &[usize],
) -> (Vec<(String, Vec<u8>)>, usize) {
    let gateway = gateway_on(cluster, 0, root).await;
    let key = gateway.keys().create("test").await.unwrap();
    let client = client_for(&gateway, &key.id, &key.secret);
    client.create_bucket().bucket("sites").send().await.unwrap();
    // The first object before the node goes down, the rest after.
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for (n, &size) in sizes.iter().enumerate() {
        if n == 1 {
            for &node in stopped {
                cluster.stop(node).await;
            }
        }
        let name = format!("k{n}");
        let body = pseudo_random_bytes(900 + n as u64, size);
        let put = client
            .put_object()
            .bucket("sites")
            .key(&name)
            .body(ByteStream::from(body.clone()))
            .send()
            .await;
        match put {
            Ok(_) => acknowledged.push((name, body)),
            Err(error) => {
                let status = error.raw_response().map(|r| r.status().as_u16());
                assert_eq!(status, Some(503), "{name}: {error:?}");
                let missing = client
                    .head_object()
                    .bucket("sites")
                    .key(&name)
                    .send()
                    .await
                    .unwrap_err();
                assert_eq!(
                    missing.raw_response().map(|r| r.status().as_u16()),
                    Some(404)
                );
                refused += 1;
            }
        }
    }
    let listed = client
        .list_objects_v2()
        .bucket("sites")
        .send()
        .await
        .unwrap();
    let listed: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    let acknowledged_keys: Vec<&str> = acknowledged.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(listed, acknowledged_keys);
    gateway.stop().await;
    (acknowledged, refused)
}

/// With the stopped node back, stops each site in turn and reads every
/// acknowledged object through a gateway in another site.
async fn every_object_survives_each_site(
    cluster: &mut Cluster,
    root: [u8; 32],
    sites: &[Vec<usize>],
    objects: &[(String, Vec<u8>)],
) {
    let key_id_and_secret = {
        let gateway = gateway_on(cluster, 0, root).await;
        let key = gateway.keys().create("reader").await.unwrap();
        gateway.stop().await;
        (key.id, key.secret)
    };
    for (site, nodes) in sites.iter().enumerate() {
        for &node in nodes {
            cluster.stop(node).await;
        }
        let reader = sites[(site + 1) % sites.len()][0];
        let gateway = gateway_on(cluster, reader, root).await;
        let client = client_for(&gateway, &key_id_and_secret.0, &key_id_and_secret.1);
        for (name, body) in objects {
            let back = client
                .get_object()
                .bucket("sites")
                .key(name)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{name} with site {site} down: {e:?}"));
            let back = back.body.collect().await.unwrap().into_bytes();
            assert!(back == body[..], "{name} differs with site {site} down");
        }
        gateway.stop().await;
        for &node in nodes {
            cluster.restart(node).await.unwrap();
        }
    }
}

/// Nodes that fail during a PUT are replaced within their own sites (the
/// per-site cap), so every acknowledged object survives any one site; with
/// a node down in each of two sites, every write still finds room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_nodes_down_writes_on_3_sites_of_3_still_survive_any_site() {
    use cairn_protocol::placement::Tolerance;
    let mut cluster = Cluster::start(&[3, 3, 3]).await.unwrap();
    // Nine metadata replicas: a majority outlives two nodes, or a site.
    cluster
        .install_map_with(Scheme::new(4, 2).unwrap(), Tolerance::default(), 9)
        .await
        .unwrap();
    let root = random_secret();
    let sizes = [
        1 << 20,
        1 << 20,
        1 << 20,
        1 << 20,
        1 << 20,
        1 << 20,
        9 << 20,
    ];
    let (objects, refused) = put_with_nodes_down(&mut cluster, root, &[1, 4], &sizes).await;
    // Sites 0 and 1 keep two nodes each: room for every fragment.
    assert_eq!(
        refused, 0,
        "a node down in each of two sites refuses no write"
    );
    cluster.restart(1).await.unwrap();
    cluster.restart(4).await.unwrap();
    let sites = [vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]];
    every_object_survives_each_site(&mut cluster, root, &sites, &objects).await;
    cluster.shutdown().await;
}

/// On 3 sites of 2 with 4+2 every node holds a fragment of every segment:
/// with one down, a segment can be stored only 5 times, and a site loss
/// would leave 3 < 4. Such a PUT is refused (503) rather than acknowledged
/// and later lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_node_down_writes_on_3_sites_of_2_fail_or_survive_any_site() {
    let mut cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    cluster
        .install_map(cluster.map(), Scheme::new(4, 2).unwrap())
        .await
        .unwrap();
    let root = random_secret();
    let sizes = [1 << 20, 1 << 20, 1 << 20, 5 << 20];
    let (objects, refused) = put_with_nodes_down(&mut cluster, root, &[1], &sizes).await;
    // Every node holds a fragment of every segment, so every PUT after the
    // node went down is refused; the one before it stands.
    assert_eq!(refused, sizes.len() - 1);
    assert_eq!(objects.len(), 1);
    cluster.restart(1).await.unwrap();
    let sites = [vec![0, 1], vec![2, 3], vec![4, 5]];
    every_object_survives_each_site(&mut cluster, root, &sites, &objects).await;
    cluster.shutdown().await;
}
