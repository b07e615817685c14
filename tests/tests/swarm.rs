//! Real nodes on 127.0.0.1 over QUIC: placement-driven puts, reads from
//! other nodes, restarts, outsiders, corruption and protocol violations.

use std::time::Duration;

use cairn_node::clock::now_unix_ms;
use cairn_node::identity::Identity;
use cairn_node::pieces::PieceError;
use cairn_node::swarm::{Node, NodeConfig, NodeError};
use cairn_protocol::ed25519_dalek::SigningKey;
use cairn_protocol::erasure::{Scheme, SegmentEncoder, reconstruct};
use cairn_protocol::ids::{FragmentId, NodeId, SiteId, UploadId};
use cairn_protocol::membership::{Certificate, ClusterId};
use cairn_protocol::placement::{Placer, Tolerance};
use cairn_protocol::wire::{self, Hold, RejectCode};
use cairn_tests::{Cluster, pseudo_random_bytes, random_secret};
use futures::{AsyncReadExt, AsyncWriteExt};

fn segment(len: usize, seed: u64) -> Vec<u8> {
    pseudo_random_bytes(seed, len)
}

/// Encodes a segment 4+2 and puts each fragment, from `writer`, on the node
/// that placement picks. Returns the segment, the fragment ids and nodes.
async fn put_segment(
    cluster: &Cluster,
    writer: usize,
    seed: u64,
) -> (Vec<u8>, Vec<FragmentId>, Vec<NodeId>) {
    let scheme = Scheme::new(4, 2).unwrap();
    let placer = Placer::new(&cluster.map(), scheme, Tolerance::default()).unwrap();
    let data = segment(3 << 20, seed);
    let encoded = SegmentEncoder::new(scheme).encode(data.clone()).unwrap();
    let ids = encoded.fragment_ids().to_vec();
    let mut key = blake3::Hasher::new();
    for id in &ids {
        key.update(id.as_bytes());
    }
    let nodes = placer.place(key.finalize().as_bytes());
    let node = cluster.node(writer);
    for (index, target) in nodes.iter().enumerate() {
        let hold = Hold::sign(
            node.identity().signing_key(),
            &ids[index],
            UploadId([9; 16]),
            cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
            0,
        );
        node.put_fragment(target, ids[index], encoded.fragment(index), hold)
            .await
            .unwrap();
    }
    (data, ids, nodes)
}

async fn read_segment(
    cluster: &Cluster,
    reader: usize,
    ids: &[FragmentId],
    nodes: &[NodeId],
    len: usize,
) -> Vec<u8> {
    let node = cluster.node(reader);
    let mut fragments = Vec::new();
    // The last k fragments: parity included, so decoding is exercised.
    for index in 2..6 {
        let bytes = node
            .get_fragment(&nodes[index], ids[index], 0, wire::WHOLE)
            .await
            .unwrap();
        fragments.push((index, bytes));
    }
    let refs: Vec<(usize, &[u8])> = fragments.iter().map(|(i, b)| (*i, b.as_slice())).collect();
    reconstruct(Scheme::new(4, 2).unwrap(), len, &refs).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_nodes_in_three_sites_store_where_placement_says_and_survive_a_full_restart() {
    let mut cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    let mut segments = Vec::new();
    for seed in 0..3 {
        segments.push(put_segment(&cluster, 0, seed).await);
    }
    for (data, ids, nodes) in &segments {
        // Each fragment sits on its placed node, and only fragments placed there.
        for (index, node) in nodes.iter().enumerate() {
            let holder = cluster
                .members
                .iter()
                .position(|m| m.identity.node_id() == *node)
                .unwrap();
            assert!(
                cluster
                    .node(holder)
                    .store()
                    .entry(&ids[index])
                    .unwrap()
                    .is_some()
            );
        }
        assert_eq!(
            &read_segment(&cluster, 5, ids, nodes, data.len()).await,
            data
        );
    }
    for index in 0..6 {
        cluster.stop(index).await;
    }
    for index in 0..6 {
        cluster.restart(index).await.unwrap();
    }
    for (data, ids, nodes) in &segments {
        assert_eq!(
            &read_segment(&cluster, 3, ids, nodes, data.len()).await,
            data
        );
    }
    // Ranges come back as asked.
    let (_, ids, nodes) = &segments[0];
    let whole = cluster
        .node(1)
        .get_fragment(&nodes[0], ids[0], 0, wire::WHOLE)
        .await
        .unwrap();
    let range = cluster
        .node(1)
        .get_fragment(&nodes[0], ids[0], 1000, 5000)
        .await
        .unwrap();
    assert_eq!(range, &whole[1000..6000]);
    cluster.shutdown().await;
}

/// Polls `locate_fragment` from `asker` until it names exactly `expected`.
async fn wait_until_located(
    cluster: &Cluster,
    asker: usize,
    upload: &UploadId,
    id: &FragmentId,
    expected: &[NodeId],
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found = cluster.node(asker).locate_fragment(upload, id).await;
        if found.as_deref().ok() == Some(expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {asker} located {found:?}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_off_its_placement_is_found_through_the_uploads_providers_across_restarts() {
    let mut cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    let upload = UploadId([42; 16]);
    let bytes = segment(200_000, 11);
    let id = FragmentId::of(&bytes);
    // Stored on node 4 wherever placement would put it, as a repair or a
    // move would; the holder announces the upload by itself.
    let holder = cluster.node(4).node_id();
    let hold = Hold::sign(
        cluster.node(0).identity().signing_key(),
        &id,
        upload,
        cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
        0,
    );
    cluster
        .node(0)
        .put_fragment(&holder, id, &bytes, hold.clone())
        .await
        .unwrap();
    wait_until_located(&cluster, 1, &upload, &id, &[holder]).await;

    // A second copy on node 2 is found beside the first.
    let second = cluster.node(2).node_id();
    cluster
        .node(5)
        .put_fragment(&second, id, &bytes, hold)
        .await
        .unwrap();
    let mut both = vec![holder, second];
    both.sort();
    wait_until_located(&cluster, 3, &upload, &id, &both).await;

    // Every node down, every node up: the provider records were kept on
    // disk, so the lookup answers at once, before any republication.
    for index in 0..6 {
        cluster.stop(index).await;
    }
    for index in 0..6 {
        cluster.restart(index).await.unwrap();
    }
    let providers = cluster.node(5).upload_providers(&upload).await.unwrap();
    assert_eq!(providers, both);
    assert_eq!(
        cluster.node(5).locate_fragment(&upload, &id).await.unwrap(),
        both
    );
    let fetched = cluster
        .node(5)
        .get_fragment(&holder, id, 0, wire::WHOLE)
        .await
        .unwrap();
    assert_eq!(fetched, bytes);
    // An upload nobody holds has no providers.
    assert!(
        cluster
            .node(1)
            .upload_providers(&UploadId([43; 16]))
            .await
            .unwrap()
            .is_empty()
    );
    cluster.shutdown().await;
}

async fn outsider(
    cluster_key: &SigningKey,
    dir: &std::path::Path,
    bootstrap: Vec<cairn_node::swarm::Multiaddr>,
) -> Node {
    let identity = Identity::generate();
    let now = now_unix_ms();
    let site = SiteId::new("elsewhere").unwrap();
    let certificate =
        Certificate::issue(cluster_key, identity.node_id(), site, now, now + 3_600_000);
    let config = NodeConfig {
        data_dir: dir.to_owned(),
        cluster: ClusterId::of(cluster_key),
        certificate,
        listen: "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
        bootstrap,
        capacity_bytes: 1 << 30,
        limits: Default::default(),
        anti_entropy_every: cairn_node::swarm::DEFAULT_ANTI_ENTROPY_EVERY,
        scrub: Default::default(),
        store: Default::default(),
    };
    Node::start(config, identity).await.unwrap()
}

/// What a bare libp2p peer runs to question a node: Kademlia and identify,
/// with no certificate and no handshake.
#[derive(libp2p::swarm::NetworkBehaviour)]
struct Questioner {
    kad: libp2p::kad::Behaviour<libp2p::kad::store::MemoryStore>,
    identify: libp2p::identify::Behaviour,
}

/// An outsider connected to a node learns nothing from the protocols
/// libp2p brings: Kademlia gives it no providers and no peers, identify no
/// addresses. (Before the membership gate, all three answered it until the
/// unverified peer was dropped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_learns_no_peers_providers_or_addresses() {
    use futures::StreamExt;
    use libp2p::kad::{self, GetClosestPeersError, GetProvidersOk, QueryResult};
    use libp2p::swarm::SwarmEvent;

    let cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    let upload = UploadId([5; 16]);
    cluster.node(0).provide_upload(&upload).await.unwrap();
    let known = cluster.node(0).upload_providers(&upload).await.unwrap();
    assert!(
        known.contains(&cluster.node(0).node_id()),
        "the member itself sees the record"
    );

    let mut outsider = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| {
            let mut config = kad::Config::new(libp2p::StreamProtocol::new("/cairn/kad/1.0.0"));
            config.set_query_timeout(Duration::from_secs(5));
            Questioner {
                kad: kad::Behaviour::with_config(
                    key.public().to_peer_id(),
                    kad::store::MemoryStore::new(key.public().to_peer_id()),
                    config,
                ),
                identify: libp2p::identify::Behaviour::new(libp2p::identify::Config::new(
                    "/cairn/id/1".into(),
                    key.public(),
                )),
            }
        })
        .unwrap()
        .build();
    let target = cluster.node(0).listen_addrs()[0].clone();
    let target_peer = cluster.node(0).peer_id();
    outsider
        .behaviour_mut()
        .kad
        .add_address(&target_peer, target.clone());
    let providers_query = outsider
        .behaviour_mut()
        .kad
        .get_providers(kad::RecordKey::new(
            &cairn_protocol::dht::upload_provider_key(&upload),
        ));
    let peers_query = outsider
        .behaviour_mut()
        .kad
        .get_closest_peers(libp2p::PeerId::random());
    let (mut providers, mut peers, mut addresses) = (Vec::new(), Vec::new(), Vec::new());
    let mut open = 2;
    while open > 0 {
        match outsider.select_next_some().await {
            SwarmEvent::Behaviour(QuestionerEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                ..
            })) => {
                match result {
                    QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders {
                        providers: found,
                        ..
                    })) => providers.extend(found),
                    QueryResult::GetClosestPeers(Ok(ok)) => {
                        peers.extend(ok.peers.into_iter().map(|p| p.peer_id))
                    }
                    QueryResult::GetClosestPeers(Err(GetClosestPeersError::Timeout {
                        peers: found,
                        ..
                    })) => peers.extend(found.into_iter().map(|p| p.peer_id)),
                    _ => {}
                }
                if step.last && (id == providers_query || id == peers_query) {
                    open -= 1;
                }
            }
            SwarmEvent::Behaviour(QuestionerEvent::Identify(
                libp2p::identify::Event::Received { info, .. },
            )) => addresses.extend(info.listen_addrs),
            _ => {}
        }
    }
    assert!(
        providers.is_empty(),
        "an outsider found providers {providers:?}"
    );
    assert!(peers.is_empty(), "an outsider learned peers {peers:?}");
    assert!(
        addresses.is_empty(),
        "an outsider learned addresses {addresses:?}"
    );
    drop(outsider);
    cluster.shutdown().await;
}

/// Outsiders that connect and never pass the handshake cannot fill the
/// connections a node takes in: past an eighth of its incoming limit the
/// oldest is disconnected, and a new member still connects. (Before,
/// twenty outsiders held all sixteen places until their grace ran out, and
/// the member's connection was refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_waiting_for_the_handshake_cannot_fill_the_connection_limit() {
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let mut cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    cluster.limits.incoming_connections = 16;
    cluster.restart(1).await.unwrap();
    let victim = cluster.node(1).listen_addrs()[0].clone();
    // Each outsider says when its connection is closed by the victim.
    let (closed, mut closing) = tokio::sync::mpsc::channel::<()>(32);
    let connected = Arc::new(AtomicUsize::new(0));
    let mut outsiders = Vec::new();
    for _ in 0..20 {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_quic()
            .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.dial(victim.clone()).unwrap();
        let (closed, connected) = (closed.clone(), connected.clone());
        outsiders.push(tokio::spawn(async move {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => {
                        connected.fetch_add(1, Ordering::SeqCst);
                    }
                    SwarmEvent::ConnectionClosed { .. } => {
                        connected.fetch_sub(1, Ordering::SeqCst);
                        let _ = closed.send(()).await;
                    }
                    _ => {}
                }
            }
        }));
    }
    // The victim keeps at most 8 of them (an eighth of 16, at least 8) once
    // they have had time for a handshake: 8 are closed.
    for _ in 0..8 {
        closing.recv().await.unwrap();
    }
    // A member that was never connected to the victim dials it now, while
    // the other outsiders still wait for their grace to run out.
    let dir = tempfile::tempdir().unwrap();
    let newcomer = outsider(&cluster.cluster_key, dir.path(), vec![victim]).await;
    assert!(
        newcomer
            .wait_for_member(&cluster.node(1).node_id(), Duration::from_secs(10))
            .await,
        "a member could not connect past the outsiders"
    );
    assert!(
        connected.load(Ordering::SeqCst) > 0,
        "the member got in only once every outsider was gone"
    );
    for outsider in outsiders {
        outsider.abort();
    }
    newcomer.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_can_neither_store_nor_fetch() {
    let cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Enrolled by another cluster's key: its own handshake passes its own
    // check, but our nodes refuse it.
    let stranger_key = SigningKey::from_bytes(&random_secret());
    let intruder = outsider(&stranger_key, dir.path(), cluster.node(0).listen_addrs()).await;
    let target = cluster.node(0).node_id();
    assert!(
        !intruder
            .wait_for_member(&target, Duration::from_secs(3))
            .await
    );
    let bytes = segment(1000, 7);
    let id = FragmentId::of(&bytes);
    let hold = Hold::sign(
        intruder.identity().signing_key(),
        &id,
        UploadId([1; 16]),
        cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
        0,
    );
    assert!(
        intruder
            .put_fragment(&target, id, &bytes, hold)
            .await
            .is_err()
    );
    // Even on a raw stream, opened without waiting for membership.
    if let Ok(mut stream) = intruder.open_raw_piece_stream(&target).await {
        let mut request = Vec::new();
        wire::Message::Hello {
            version: 1,
            capabilities: 0,
            max_frame_bytes: 1 << 20,
        }
        .encode(&mut request)
        .unwrap();
        wire::Message::GetFragment {
            id,
            offset: 0,
            length: wire::WHOLE,
        }
        .encode(&mut request)
        .unwrap();
        let _ = stream.write_all(&request).await;
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        assert!(
            answer.is_empty(),
            "an outsider got {} bytes of answer",
            answer.len()
        );
    }
    assert!(cluster.node(0).store().entry(&id).unwrap().is_none());
    assert!(!cluster.node(0).is_member(&intruder.node_id()));
    // Nor can it announce itself as a holder of anything.
    let _ = intruder.provide_upload(&UploadId([1; 16])).await;
    for index in 0..3 {
        let providers = cluster
            .node(index)
            .upload_providers(&UploadId([1; 16]))
            .await
            .unwrap_or_default();
        assert!(!providers.contains(&intruder.node_id()));
    }
    intruder.shutdown().await;
    cluster.shutdown().await;
}

/// A member cannot pin fragments on other nodes (or its own) for ever: a
/// hold that asks for a retain-until is refused with its own reason code,
/// until Object Lock gives a bucket's retention to check it against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_with_a_retention_is_refused_and_nothing_is_stored() {
    let cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    let (member, holder) = (cluster.node(0), cluster.node(1));
    for (n, target) in [holder.node_id(), member.node_id()].into_iter().enumerate() {
        let bytes = segment(40_000, 20 + n as u64);
        let id = FragmentId::of(&bytes);
        let hold = Hold::sign(
            member.identity().signing_key(),
            &id,
            UploadId([7; 16]),
            cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
            u64::MAX,
        );
        match member.put_fragment(&target, id, &bytes, hold).await {
            // The node's own store answers as a peer does.
            Err(NodeError::Piece(PieceError::Rejected {
                code: RejectCode::RetentionRefused,
                ..
            })) => {}
            other => panic!("a pinned hold to {target} was answered {other:?}"),
        }
        let stored_on = if target == member.node_id() {
            member
        } else {
            holder
        };
        assert!(
            stored_on.store().entry(&id).unwrap().is_none(),
            "the pinned fragment was stored"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_corrupted_on_disk_is_refused_as_corrupt() {
    let cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    let holder = cluster.node(1);
    let bytes = segment(200_000, 3);
    let id = FragmentId::of(&bytes);
    let hold = Hold::sign(
        cluster.node(0).identity().signing_key(),
        &id,
        UploadId([1; 16]),
        cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
        0,
    );
    cluster
        .node(0)
        .put_fragment(&holder.node_id(), id, &bytes, hold)
        .await
        .unwrap();
    let entry = holder.store().entry(&id).unwrap().unwrap();
    let volume = cluster.members[1]
        .data_dir
        .join(format!("fragments/volumes/{:06}.vol", entry.volume));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(volume)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"rot", entry.offset + 45 + 1234).unwrap();
    match cluster
        .node(2)
        .get_fragment(&holder.node_id(), id, 0, wire::WHOLE)
        .await
    {
        Err(NodeError::Piece(PieceError::Rejected {
            code: RejectCode::Corrupt,
            ..
        })) => {}
        other => panic!("expected a corrupt refusal, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_oversize_declarations_are_refused_while_others_are_served() {
    let cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    let (attacker, victim, bystander) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let bytes = segment(50_000, 4);
    let id = FragmentId::of(&bytes);
    let hold = Hold::sign(
        bystander.identity().signing_key(),
        &id,
        UploadId([1; 16]),
        cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
        0,
    );
    bystander
        .put_fragment(&victim.node_id(), id, &bytes, hold.clone())
        .await
        .unwrap();

    let mut hello = Vec::new();
    wire::Message::Hello {
        version: 1,
        capabilities: 0,
        max_frame_bytes: 1 << 20,
    }
    .encode(&mut hello)
    .unwrap();
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        (
            "a 4 GiB frame declaration",
            [hello.clone(), u32::MAX.to_be_bytes().to_vec()].concat(),
        ),
        (
            "an unknown message type",
            [hello.clone(), vec![0, 0, 0, 1, 0x7f]].concat(),
        ),
        (
            "a truncated put header",
            [hello.clone(), vec![0, 0, 0, 5, 0x02, 1, 2, 3, 4]].concat(),
        ),
        ("a put larger than the fragment limit", {
            let mut frames = hello.clone();
            let put = wire::Message::PutFragment {
                id,
                length: 1 << 40,
                hold: hold.clone(),
            };
            put.encode(&mut frames).unwrap();
            frames
        }),
    ];
    for (what, frames) in attacks {
        let mut stream = attacker
            .open_raw_piece_stream(&victim.node_id())
            .await
            .unwrap();
        // The victim may refuse before reading everything and stop the stream.
        let _ = stream.write_all(&frames).await;
        let _ = stream.close().await;
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "{what}: the victim kept the stream open");
        let mut decoder = wire::FrameDecoder::default();
        decoder.feed(&answer);
        let mut rejected = false;
        while let Ok(Some(message)) = decoder.next_message() {
            if let wire::Message::Reject { code, .. } = message {
                rejected = matches!(code, RejectCode::Malformed | RejectCode::TooLarge);
            }
        }
        assert!(
            rejected,
            "{what}: no malformed/too-large reject in {} answer bytes",
            answer.len()
        );
        // The victim keeps serving everyone.
        let again = bystander
            .get_fragment(&victim.node_id(), id, 0, wire::WHOLE)
            .await
            .unwrap();
        assert_eq!(again, bytes, "{what}");
    }
    cluster.shutdown().await;
}

/// A map push may declare up to 8 MiB: a member that opens many and sends
/// nothing gets one taken at a time, the rest dropped unanswered, and the
/// node still takes a real map from another member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_pushes_that_stall_are_bounded_per_peer() {
    let cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    cluster
        .install_map(cluster.map(), Scheme::new(1, 2).unwrap())
        .await
        .unwrap();
    let (attacker, victim, other) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut stream = attacker
            .open_raw_stream(&victim.node_id(), cairn_node::mapsync::PROTOCOL)
            .await
            .unwrap();
        // A stream the victim dropped already fails here: fine.
        let _ = stream.write_all(&(8u32 << 20).to_be_bytes()).await;
        let _ = stream.flush().await;
        stalled.push(stream);
    }
    // All but one end without the victim's answer (the version it holds,
    // which a stream it read would get once its wait is over).
    let mut ended = 0;
    let mut reads: futures::stream::FuturesUnordered<_> = stalled
        .iter_mut()
        .map(|stream| async move {
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            answer
        })
        .collect();
    while ended < 7 {
        let answer = futures::StreamExt::next(&mut reads).await.unwrap();
        assert!(answer.is_empty(), "a stalled push past the limit was read");
        ended += 1;
    }
    drop(reads);
    // A newer map from another member is still taken.
    let mut newer = cluster.map();
    newer.version = 2;
    let signed = cairn_protocol::membership::SignedMap::sign(
        &cluster.cluster_key,
        newer,
        Scheme::new(1, 2).unwrap(),
        Tolerance::default(),
    )
    .unwrap();
    other.install_map(&signed).unwrap();
    assert!(
        victim
            .wait_for_map_version(2, Duration::from_secs(30))
            .await,
        "the victim did not take the newer map"
    );
    drop(stalled);
    cluster.shutdown().await;
}

/// Revocation by map: a node the newest map marks out is disconnected by
/// the others, and its next attempts are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_marked_out_is_disconnected_and_refused() {
    let cluster = Cluster::start(&[1, 1, 1, 1]).await.unwrap();
    let scheme = Scheme::new(1, 2).unwrap();
    cluster.install_map(cluster.map(), scheme).await.unwrap();
    let (member, revoked) = (cluster.node(0), cluster.node(3));
    let put = |seed: u64| {
        let bytes = segment(30_000, seed);
        let id = FragmentId::of(&bytes);
        let hold = Hold::sign(
            revoked.identity().signing_key(),
            &id,
            UploadId([3; 16]),
            cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
            0,
        );
        async move {
            revoked
                .put_fragment(&member.node_id(), id, &bytes, hold)
                .await
        }
    };
    put(30).await.unwrap();
    let mut map = cluster.map();
    map.version = 2;
    let out = map
        .nodes
        .iter_mut()
        .find(|n| n.id == revoked.node_id())
        .unwrap();
    out.state = cairn_protocol::placement::NodeState::Out;
    cluster.install_map(map, scheme).await.unwrap();
    assert!(
        member
            .wait_for_non_member(&revoked.node_id(), Duration::from_secs(60))
            .await,
        "the revoked node is still a member"
    );
    assert!(put(31).await.is_err(), "the revoked node could still store");
    assert!(!member.is_member(&revoked.node_id()));
    cluster.shutdown().await;
}

/// A peer that stalls in the middle of a put gives the holder's byte
/// budget back once its silence runs out: a put from another member, which
/// needs the same budget, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_that_stalls_midway_does_not_hold_up_other_puts() {
    let mut cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    // The budget is then one fragment of the largest size.
    cluster.limits.bytes_in_flight = 0;
    cluster.restart(1).await.unwrap();
    let (attacker, victim, writer) = (cluster.node(0), cluster.node(1), cluster.node(2));
    assert!(
        attacker
            .wait_for_member(&victim.node_id(), Duration::from_secs(30))
            .await
    );
    const LARGEST: usize = 64 << 20;
    let bytes = segment(LARGEST, 50);
    let id = FragmentId::of(&bytes);
    let hold = Hold::sign(
        attacker.identity().signing_key(),
        &id,
        UploadId([5; 16]),
        cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
        0,
    );
    let mut frames = Vec::new();
    wire::Message::Hello {
        version: 1,
        capabilities: 0,
        max_frame_bytes: 1 << 20,
    }
    .encode(&mut frames)
    .unwrap();
    wire::Message::PutFragment {
        id,
        length: LARGEST as u64,
        hold,
    }
    .encode(&mut frames)
    .unwrap();
    let mut stream = attacker
        .open_raw_piece_stream(&victim.node_id())
        .await
        .unwrap();
    stream.write_all(&frames).await.unwrap();
    // All but the last byte: once written, the victim has read most of
    // them, so it holds the whole budget for this put.
    for piece in bytes[..LARGEST - 1].chunks(wire::MAX_DATA_BYTES) {
        let mut header = Vec::new();
        wire::encode_data_header(piece.len(), &mut header).unwrap();
        stream.write_all(&header).await.unwrap();
        stream.write_all(piece).await.unwrap();
    }
    stream.flush().await.unwrap();
    let other = segment(100_000, 51);
    let other_id = FragmentId::of(&other);
    let other_hold = Hold::sign(
        writer.identity().signing_key(),
        &other_id,
        UploadId([6; 16]),
        cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
        0,
    );
    writer
        .put_fragment(&victim.node_id(), other_id, &other, other_hold)
        .await
        .unwrap();
    assert!(victim.store().entry(&other_id).unwrap().is_some());
    drop(stream);
    cluster.shutdown().await;
}

/// A member that keeps its puts alive by trickling a byte now and then
/// holds at most its share of a node's byte budget (a quarter): another
/// member's put is served at once. Before, four such puts held the whole
/// budget for as long as the trickle lasted, and every other put got busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_trickling_puts_holds_only_its_share_of_the_budget() {
    let mut cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    const LARGEST: usize = 64 << 20;
    cluster.limits.bytes_in_flight = 4 * LARGEST as u64;
    cluster.restart(1).await.unwrap();
    let (attacker, victim, writer) = (cluster.node(0), cluster.node(1), cluster.node(2));
    assert!(
        attacker
            .wait_for_member(&victim.node_id(), Duration::from_secs(30))
            .await
    );
    let (held, mut first_held) = tokio::sync::mpsc::channel::<()>(4);
    let mut trickles = Vec::new();
    for n in 0..4u64 {
        let bytes = segment(LARGEST, 60 + n);
        let id = FragmentId::of(&bytes);
        let hold = Hold::sign(
            attacker.identity().signing_key(),
            &id,
            UploadId([8; 16]),
            cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
            0,
        );
        let mut frames = Vec::new();
        wire::Message::Hello {
            version: 1,
            capabilities: 0,
            max_frame_bytes: 1 << 20,
        }
        .encode(&mut frames)
        .unwrap();
        wire::Message::PutFragment {
            id,
            length: LARGEST as u64,
            hold,
        }
        .encode(&mut frames)
        .unwrap();
        let mut stream = attacker
            .open_raw_piece_stream(&victim.node_id())
            .await
            .unwrap();
        // The victim's hello answers once it serves the stream, and its
        // next step is to take budget for the put already sent: the puts
        // reach the budget in this order, before the other member's.
        stream.write_all(&frames).await.unwrap();
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).await.unwrap();
        let mut hello = vec![0u8; u32::from_be_bytes(length) as usize];
        stream.read_exact(&mut hello).await.unwrap();
        let held = held.clone();
        trickles.push(tokio::spawn(async move {
            // Half the body: more than QUIC buffers, so once written the
            // victim has taken budget for this put and is reading it.
            for piece in bytes[..LARGEST / 2].chunks(wire::MAX_DATA_BYTES) {
                let mut header = Vec::new();
                wire::encode_data_header(piece.len(), &mut header).unwrap();
                stream.write_all(&header).await?;
                stream.write_all(piece).await?;
            }
            stream.flush().await?;
            let _ = held.send(()).await;
            // Then a byte now and then, within the victim's silence limit.
            for byte in &bytes[LARGEST / 2..] {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let mut header = Vec::new();
                wire::encode_data_header(1, &mut header).unwrap();
                stream.write_all(&header).await?;
                stream.write_all(std::slice::from_ref(byte)).await?;
                stream.flush().await?;
            }
            std::io::Result::Ok(())
        }));
    }
    first_held.recv().await.unwrap();
    let other = segment(100_000, 61);
    let other_id = FragmentId::of(&other);
    let other_hold = Hold::sign(
        writer.identity().signing_key(),
        &other_id,
        UploadId([9; 16]),
        cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
        0,
    );
    writer
        .put_fragment(&victim.node_id(), other_id, &other, other_hold)
        .await
        .expect("another member's put, while the trickling puts hold on");
    assert!(victim.store().entry(&other_id).unwrap().is_some());
    for trickle in trickles {
        trickle.abort();
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_past_its_stream_limit_gets_busy_while_others_are_served() {
    let mut cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    cluster.limits.streams_per_peer = 1;
    cluster.restart(1).await.unwrap();
    let (greedy, victim, other) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let bytes = segment(10_000, 5);
    let id = FragmentId::of(&bytes);
    let hold = Hold::sign(
        other.identity().signing_key(),
        &id,
        UploadId([1; 16]),
        cairn_protocol::wire::ObjectKeyDigest::of("bucket", "key"),
        0,
    );
    other
        .put_fragment(&victim.node_id(), id, &bytes, hold)
        .await
        .unwrap();

    let mut hello = Vec::new();
    wire::Message::Hello {
        version: 1,
        capabilities: 0,
        max_frame_bytes: 1 << 20,
    }
    .encode(&mut hello)
    .unwrap();
    // The first exchange stays open: hello sent, no request yet.
    let mut first = greedy
        .open_raw_piece_stream(&victim.node_id())
        .await
        .unwrap();
    first.write_all(&hello).await.unwrap();
    first.flush().await.unwrap();
    let mut answer = vec![0u8; hello.len()];
    first.read_exact(&mut answer).await.unwrap();
    let mut decoder = wire::FrameDecoder::default();
    decoder.feed(&answer);
    assert!(
        matches!(
            decoder.next_message(),
            Ok(Some(wire::Message::Hello { .. }))
        ),
        "the victim answers hello once the exchange has its slot"
    );

    let mut second = greedy
        .open_raw_piece_stream(&victim.node_id())
        .await
        .unwrap();
    let mut request = hello.clone();
    wire::Message::GetFragment {
        id,
        offset: 0,
        length: wire::WHOLE,
    }
    .encode(&mut request)
    .unwrap();
    // The victim may answer busy without reading this and stop the stream,
    // so the write can fail; the answer is there to read either way.
    let _ = second.write_all(&request).await;
    let _ = second.close().await;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let mut decoder = wire::FrameDecoder::default();
    decoder.feed(&reply);
    assert!(
        matches!(
            decoder.next_message(),
            Ok(Some(wire::Message::Reject {
                code: RejectCode::Busy,
                ..
            }))
        ),
        "expected busy, got {} bytes",
        reply.len()
    );

    // Another peer is served meanwhile, and the greedy one once it lets go.
    assert_eq!(
        other
            .get_fragment(&victim.node_id(), id, 0, wire::WHOLE)
            .await
            .unwrap(),
        bytes
    );
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match greedy
            .get_fragment(&victim.node_id(), id, 0, wire::WHOLE)
            .await
        {
            Ok(got) => break assert_eq!(got, bytes),
            Err(error) if tokio::time::Instant::now() < deadline => {
                assert!(error.to_string().contains("Busy"), "{error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("never served again: {error}"),
        }
    }
    cluster.shutdown().await;
}
