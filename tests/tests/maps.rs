//! The cluster map spreads to every member, newest valid version wins, and
//! each node keeps it across restarts.

use std::time::Duration;

use cairn_node::swarm::NodeError;
use cairn_protocol::ed25519_dalek::SigningKey;
use cairn_protocol::erasure::Scheme;
use cairn_protocol::membership::SignedMap;
use cairn_protocol::placement::{NodeState, Tolerance};
use cairn_tests::{Cluster, random_secret};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_learns_the_newest_valid_map_and_keeps_it() {
    let mut cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    let scheme = Scheme::new(4, 2).unwrap();
    let v1 = SignedMap::sign(
        &cluster.cluster_key,
        cluster.map(),
        scheme,
        Tolerance::default(),
    )
    .unwrap();
    assert!(cluster.node(0).install_map(&v1).unwrap());
    for i in 0..6 {
        assert!(
            cluster.node(i).wait_for_map_version(1, WAIT).await,
            "node {i} never got map v1"
        );
    }

    // Node 5 is down while v2 is issued from another node.
    cluster.stop(5).await;
    let mut map = cluster.map();
    map.version = 2;
    map.nodes[5].state = NodeState::Down;
    let v2 = SignedMap::sign(&cluster.cluster_key, map, scheme, Tolerance::default()).unwrap();
    assert!(cluster.node(3).install_map(&v2).unwrap());
    for i in 0..5 {
        assert!(
            cluster.node(i).wait_for_map_version(2, WAIT).await,
            "node {i} never got map v2"
        );
    }

    // A stale map changes nothing; one signed by another key is refused.
    assert!(!cluster.node(1).install_map(&v1).unwrap());
    assert_eq!(cluster.node(1).cluster_map().unwrap().map.version, 2);
    let stranger = SigningKey::from_bytes(&random_secret());
    let mut forged = v2.map.clone();
    forged.version = 99;
    let foreign = SignedMap::sign(&stranger, forged, scheme, Tolerance::default()).unwrap();
    assert!(matches!(
        cluster.node(1).install_map(&foreign),
        Err(NodeError::ForeignMap(_))
    ));

    // Node 5 comes back with v1 on disk and catches up from its peers.
    cluster.restart(5).await.unwrap();
    assert!(
        cluster.node(5).wait_for_map_version(2, WAIT).await,
        "node 5 never caught up"
    );
    // And keeps it: straight after another restart it already holds v2.
    cluster.restart(5).await.unwrap();
    assert_eq!(cluster.node(5).cluster_map().unwrap().map.version, 2);
    cluster.shutdown().await;
}
