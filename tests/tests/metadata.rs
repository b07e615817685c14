//! The replicated metadata on real nodes: quorum writes and reads, ordered
//! listing, read repair, and convergence of concurrent writers.

use std::time::Duration;

use cairn_node::meta::Metadata;
use cairn_node::meta::replica::UNFENCED;
use cairn_protocol::erasure::Scheme;
use cairn_protocol::hlc::Timestamp;
use cairn_protocol::ids::{ManifestId, NodeId, VersionId};
use cairn_protocol::meta::{Partition, Register, RowKey, RowValue, Table, version_sort_key};
use cairn_protocol::metarpc::RegisterKey;
use cairn_protocol::version::{Lww, ObjectVersion, Retention, VersionBody};
use cairn_tests::{Cluster, Rng};

async fn cluster_with_map() -> Cluster {
    let cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    cluster
        .install_map(cluster.map(), Scheme::new(4, 2).unwrap())
        .await
        .unwrap();
    cluster
}

fn bucket_row(name: &str, at: Timestamp, settings: &[u8]) -> (RowKey, RowValue) {
    (
        RowKey::new(
            Partition::cluster(),
            Table::Buckets,
            name.as_bytes().to_vec(),
        ),
        RowValue::Register(Register {
            at,
            value: Some(settings.to_vec()),
        }),
    )
}

fn version_row(bucket: &str, key: &str, n: u64, at: Timestamp) -> (RowKey, RowValue) {
    let version = VersionId::new(1_700_000_000_000 + n, [n as u8; 10]);
    let entry = ObjectVersion {
        bucket: bucket.into(),
        key: key.into(),
        version,
        created: at,
        seq: n,
        null: true,
        body: VersionBody::Data {
            manifest: ManifestId([n as u8; 32]),
            size_bytes: n,
            etag: format!("\"{n}\""),
            headers: Default::default(),
        },
        retention: Retention::default(),
        legal_hold: Lww { value: false, at },
        purged: None,
    };
    (
        RowKey::new(
            Partition::bucket(bucket),
            Table::Versions,
            version_sort_key(key, &version),
        ),
        RowValue::Version(Box::new(entry)),
    )
}

/// A running node that is not among `excluded`.
fn coordinator(cluster: &Cluster, excluded: &[NodeId]) -> usize {
    (0..cluster.members.len())
        .find(|&i| cluster.members[i].node.is_some() && !excluded.contains(&cluster.node_ids()[i]))
        .expect("a running node outside the set")
}

async fn local_value(metadata: &Metadata, key: &RowKey) -> Option<RowValue> {
    let (replica, key) = (metadata.replica().clone(), key.clone());
    tokio::task::spawn_blocking(move || replica.get(&[key]).unwrap().remove(0))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_and_list_after_write_with_one_replica_down_and_read_repair_after() {
    let mut cluster = cluster_with_map().await;
    let partition = Partition::bucket("photos");
    let replicas = cluster.node(0).metadata().replicas_of(&partition).unwrap();
    assert_eq!(replicas.len(), 3);
    let down = cluster.index_of(&replicas[0]);
    cluster.stop(down).await;

    // Written through a node that is not a replica, read through another.
    let writer = coordinator(&cluster, &replicas);
    let meta = cluster.node(writer).metadata().clone();
    let mut rows = Vec::new();
    for n in 0..50 {
        rows.push(version_row(
            "photos",
            &format!("cats/{n:03}"),
            n,
            meta.timestamp(),
        ));
    }
    meta.write(rows.clone()).await.unwrap();
    let reader = coordinator(&cluster, &[cluster.node_ids()[writer]]);
    let reader_meta = cluster.node(reader).metadata().clone();
    let read = reader_meta
        .read(vec![rows[7].0.clone(), rows[42].0.clone()])
        .await
        .unwrap();
    assert_eq!(
        read,
        vec![Some(rows[7].1.clone()), Some(rows[42].1.clone())]
    );

    // Listed in key order, in pages.
    let mut listed = Vec::new();
    let mut start = b"cats/".to_vec();
    loop {
        let page = reader_meta
            .range(&partition, Table::Versions, &start, Some(b"cats0"), 20)
            .await
            .unwrap();
        assert!(page.rows.len() <= 20);
        listed.extend(page.rows.iter().cloned());
        if !page.more {
            break;
        }
        start = page.rows.last().unwrap().0.clone();
        start.push(0);
    }
    let expected: Vec<(Vec<u8>, RowValue)> = rows
        .iter()
        .map(|(k, v)| (k.sort.clone(), v.clone()))
        .collect();
    assert_eq!(listed, expected);

    // The replica that was down comes back. A row that only two replicas
    // hold (merged into their stores directly, as if the third had missed
    // it) reaches the third through a read.
    cluster.restart(down).await.unwrap();
    let late = version_row("photos", "dogs/1", 99, meta.timestamp());
    for replica in &replicas[1..] {
        let node = cluster.node(cluster.index_of(replica)).metadata().clone();
        node.replica()
            .merge(vec![late.clone()], UNFENCED)
            .await
            .unwrap();
    }
    let back = cluster.node(down).metadata().clone();
    assert_eq!(local_value(&back, &late.0).await, None);
    let mut repaired = false;
    for _ in 0..100 {
        // The restarted node may not be in the first majority to answer.
        let read = reader_meta.read(vec![late.0.clone()]).await.unwrap();
        assert_eq!(read, vec![Some(late.1.clone())]);
        if local_value(&back, &late.0).await == Some(late.1.clone()) {
            repaired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(repaired, "read repair never reached the restarted replica");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_two_nodes_converge_on_every_replica() {
    let cluster = cluster_with_map().await;
    let (a, b) = (
        cluster.node(0).metadata().clone(),
        cluster.node(3).metadata().clone(),
    );
    let keys: Vec<String> = (0..20).map(|i| format!("bucket-{i:02}")).collect();
    let write_all = |meta: Metadata, tag: &'static [u8]| {
        let keys = keys.clone();
        async move {
            for key in &keys {
                meta.write(vec![bucket_row(key, meta.timestamp(), tag)])
                    .await
                    .unwrap();
            }
        }
    };
    tokio::join!(
        write_all(a.clone(), b"from a"),
        write_all(b.clone(), b"from b")
    );

    let replicas = a.replicas_of(&Partition::cluster()).unwrap();
    // Writes reach every replica that is up, in the background after the
    // majority answered: wait for them to land.
    for key in &keys {
        let row = RowKey::new(
            Partition::cluster(),
            Table::Buckets,
            key.as_bytes().to_vec(),
        );
        let through_a = a.read(vec![row.clone()]).await.unwrap().remove(0);
        let through_b = b.read(vec![row.clone()]).await.unwrap().remove(0);
        assert_eq!(through_a, through_b, "{key}");
        let Some(RowValue::Register(register)) = &through_a else {
            panic!("{key} missing");
        };
        assert!(
            register.value.as_deref() == Some(b"from a")
                || register.value.as_deref() == Some(b"from b")
        );
        for replica in &replicas {
            let node = cluster.node(cluster.index_of(replica)).metadata().clone();
            let mut same = false;
            for _ in 0..100 {
                if local_value(&node, &row).await == through_a {
                    same = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(same, "replica {replica} differs on {key}");
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_does_not_fit_its_key_is_refused_and_nothing_is_written() {
    let cluster = cluster_with_map().await;
    let meta = cluster.node(1).metadata().clone();
    let (key, value) = version_row("photos", "a", 1, meta.timestamp());
    let mut wrong = key.clone();
    wrong.sort = version_sort_key("b", &VersionId::new(1, [0; 10]));
    let error = meta.write(vec![(wrong.clone(), value)]).await.unwrap_err();
    assert!(error.to_string().contains("does not match"), "{error}");
    assert_eq!(meta.read(vec![wrong]).await.unwrap(), vec![None]);

    // Too many rows, or too many bytes, for one request: refused up front.
    let many: Vec<(RowKey, RowValue)> = (0..4097)
        .map(|n| bucket_row(&format!("b{n}"), meta.timestamp(), b""))
        .collect();
    let error = meta.write(many).await.unwrap_err();
    assert!(error.to_string().contains("at most 4096"), "{error}");
    let big = vec![0u8; 9 << 20];
    let error = meta
        .write(vec![
            bucket_row("big-a", meta.timestamp(), &big),
            bucket_row("big-b", meta.timestamp(), &big),
        ])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("bytes"), "{error}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_fifty_concurrent_conditional_creates_exactly_one_wins_with_a_replica_stopped_midway() {
    let mut cluster = cluster_with_map().await;
    let key = RegisterKey {
        partition: Partition::bucket("photos"),
        name: b"cat.jpg".to_vec(),
    };
    let replicas = cluster
        .node(0)
        .metadata()
        .replicas_of(&key.partition)
        .unwrap();
    let victim = cluster.index_of(&replicas[1]);
    // Every node but the victim proposes; the victim is a replica (acceptor).
    let proposers: Vec<Metadata> = (0..6)
        .filter(|&i| i != victim)
        .map(|i| cluster.node(i).metadata().clone())
        .collect();
    let mut attempts = Vec::new();
    for writer in 0..50u32 {
        let (meta, key) = (
            proposers[writer as usize % proposers.len()].clone(),
            key.clone(),
        );
        attempts.push(tokio::spawn(async move {
            let mine = format!("writer {writer}").into_bytes();
            // If-None-Match: * — create only if the register is empty.
            meta.compare_and_set(key, |current| match current {
                None => Ok(Some(mine.clone())),
                Some(existing) => Err(existing.to_vec()),
            })
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    cluster.stop(victim).await;

    let mut winners = Vec::new();
    let mut losers_saw = Vec::new();
    for (writer, attempt) in attempts.into_iter().enumerate() {
        match attempt.await.unwrap().unwrap() {
            Ok(Some(value)) => winners.push((writer, value)),
            Ok(None) => panic!("writer {writer} set an empty value"),
            Err(existing) => losers_saw.push(existing),
        }
    }
    let distinct: std::collections::BTreeSet<&Vec<u8>> = losers_saw.iter().collect();
    assert_eq!(
        winners.len(),
        1,
        "winners: {winners:?}, losers saw {distinct:?}"
    );
    let winning = &winners[0].1;
    assert_eq!(winning, &format!("writer {}", winners[0].0).into_bytes());
    // Every loser was refused because of the winner's value, no other.
    assert_eq!(losers_saw.len(), 49);
    assert!(losers_saw.iter().all(|seen| seen == winning));

    // A linearizable read afterwards, through another node, agrees.
    let read = proposers[3]
        .compare_and_set(key, |current| {
            Err::<Option<Vec<u8>>, _>(current.map(<[u8]>::to_vec))
        })
        .await
        .unwrap();
    assert_eq!(read, Err(Some(winning.clone())));
    cluster.shutdown().await;
}

/// A signed manifest of `writer` for one 10-byte object in `bucket`.
fn signed_manifest(
    writer: &cairn_protocol::ed25519_dalek::SigningKey,
    bucket: &str,
) -> cairn_protocol::manifest::SignedManifest {
    use cairn_protocol::encryption::ChunkSize;
    use cairn_protocol::erasure::SegmentLayout;
    use cairn_protocol::ids::{FragmentId, UploadId};
    use cairn_protocol::manifest::{KeyEnvelope, KeyKind, Manifest, Part, PartKeys, SegmentRef};
    let layout = SegmentLayout::new(
        Scheme::new(2, 1).unwrap(),
        ChunkSize::new(4096).unwrap(),
        16,
    )
    .unwrap();
    Manifest {
        part_keys: PartKeys::PerAttempt,
        writer: NodeId::from_verifying_key(&writer.verifying_key()),
        created_unix_ms: 1_764_000_000_000,
        bucket: bucket.into(),
        key: "k".into(),
        version: VersionId::new(1_764_000_000_000, [1; 10]),
        upload: UploadId([2; 16]),
        layout,
        encryption: KeyEnvelope {
            kind: KeyKind::SseS3,
            key_id: "bucket-key".into(),
            wrapped: vec![5; 60],
        },
        etag: "\"0\"".into(),
        parts: vec![Part {
            number: 0,
            upload: UploadId([2; 16]),
            plaintext_len: 10,
            segments: vec![SegmentRef {
                ciphertext_len: 26,
                fragments: (0..3).map(|f| FragmentId([f; 32])).collect(),
            }],
        }],
    }
    .sign(writer)
    .unwrap()
}

/// Manifests merge by their bytes (the smaller wins), so a body with a
/// signature nobody made would replace the real one on every replica and
/// leave the object unreadable: replicas take only manifests their writer
/// signed, and only from writers in the map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_foreign_manifests_are_refused_and_the_real_one_stays() {
    let cluster = cluster_with_map().await;
    let metadata = cluster.node(0).metadata();
    let member = cluster.node(3).identity().signing_key().clone();
    let genuine = signed_manifest(&member, "photos");
    let row = RowKey::new(
        Partition::bucket("photos"),
        Table::Manifests,
        genuine.id.as_bytes().to_vec(),
    );
    let mut forged = genuine.encoded.clone();
    let signature_at = forged.len() - 64;
    forged[signature_at..].fill(0);
    assert!(forged < genuine.encoded, "the forgery would win a merge");
    let refused = metadata
        .write(vec![(row.clone(), RowValue::Immutable(forged.clone()))])
        .await;
    assert!(refused.is_err(), "a forged manifest was accepted");
    metadata
        .write(vec![(
            row.clone(),
            RowValue::Immutable(genuine.encoded.clone()),
        )])
        .await
        .unwrap();
    // A hostile coordinator skips its own checks and sends the forgery to
    // each replica: each refuses it and keeps the real one.
    let replicas = metadata.replicas_of(&row.partition).unwrap();
    for replica in &replicas {
        use cairn_protocol::metarpc::{Call, ErrorCode, Request, Response};
        let node = cluster.node(cluster.index_of(replica));
        let answer = cairn_node::meta::rpc::answer(
            node.metadata(),
            Call {
                map_version: 1,
                request: Request::Write {
                    rows: vec![(row.clone(), RowValue::Immutable(forged.clone()))],
                },
            },
        )
        .await;
        assert!(
            matches!(
                answer,
                Response::Error {
                    code: ErrorCode::Refused,
                    ..
                }
            ),
            "replica {replica} answered {answer:?}"
        );
    }
    // The write reached a majority (the rest catch up in the background):
    // no replica holds the forgery, and a quorum read gives the real one.
    for replica in &replicas {
        let node = cluster.node(cluster.index_of(replica));
        let held = local_value(node.metadata(), &row).await;
        assert!(
            held.is_none() || held == Some(RowValue::Immutable(genuine.encoded.clone())),
            "replica {replica} holds {held:?}"
        );
    }
    assert_eq!(
        metadata.read(vec![row.clone()]).await.unwrap(),
        vec![Some(RowValue::Immutable(genuine.encoded.clone()))]
    );
    // A replica whose store holds the forgery anyway (bit rot, a hostile
    // node): its answer takes no part in a read, even as the coordinator.
    let poisoned = cluster.node(cluster.index_of(&replicas[0]));
    poisoned
        .metadata()
        .replica()
        .merge(
            vec![(row.clone(), RowValue::Immutable(forged.clone()))],
            UNFENCED,
        )
        .await
        .unwrap();
    assert_eq!(
        local_value(poisoned.metadata(), &row).await,
        Some(RowValue::Immutable(forged.clone())),
        "the forgery wins a merge of the bytes alone"
    );
    assert_eq!(
        poisoned.metadata().read(vec![row.clone()]).await.unwrap(),
        vec![Some(RowValue::Immutable(genuine.encoded.clone()))]
    );
    // A well-signed manifest of a node that is not in the map.
    let outsider = cairn_protocol::ed25519_dalek::SigningKey::from_bytes(&[0x0f; 32]);
    let foreign = signed_manifest(&outsider, "photos");
    let foreign_row = RowKey::new(
        Partition::bucket("photos"),
        Table::Manifests,
        foreign.id.as_bytes().to_vec(),
    );
    let refused = metadata
        .write(vec![(
            foreign_row.clone(),
            RowValue::Immutable(foreign.encoded),
        )])
        .await;
    assert!(refused.is_err(), "an outsider's manifest was accepted");
    assert_eq!(metadata.read(vec![foreign_row]).await.unwrap(), vec![None]);
    cluster.shutdown().await;
}

/// A replica that has seen a newer map refuses register reads from a
/// coordinator with an older one, as it refuses Prepare and Accept: the
/// coordinator may be reading replicas that no longer hold the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_read_under_an_old_map_is_refused_past_the_fence() {
    use cairn_node::meta::rpc::answer;
    use cairn_protocol::metarpc::{Call, ErrorCode, Request, Response};
    let cluster = cluster_with_map().await;
    let metadata = cluster.node(2).metadata();
    let key = RegisterKey {
        partition: Partition::bucket("fenced"),
        name: b"k".to_vec(),
    };
    let read = |map_version: u64| Call {
        map_version,
        request: Request::ReadRegister { key: key.clone() },
    };
    assert!(matches!(
        answer(metadata, read(1)).await,
        Response::RegisterState { .. }
    ));
    // A newer map, once this node has verified it, raises the fence with
    // the first request that names it.
    let mut newer = cluster.map();
    newer.version = 2;
    cluster
        .install_map(newer, Scheme::new(4, 2).unwrap())
        .await
        .unwrap();
    let raised = answer(
        metadata,
        Call {
            map_version: 2,
            request: Request::Write { rows: Vec::new() },
        },
    )
    .await;
    assert_eq!(raised, Response::Written);
    let refused = answer(metadata, read(1)).await;
    assert!(
        matches!(
            refused,
            Response::Error {
                code: ErrorCode::StaleMap,
                ..
            }
        ),
        "{refused:?}"
    );
    cluster.shutdown().await;
}

/// A member cannot raise a replica's fence past every real map (which
/// would stop all writes there for good) nor skip it with the unfenced
/// sentinel: the fence moves only to maps the replica has verified, and a
/// coordinator with a really stale map is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_poison_a_fence_or_skip_it() {
    use cairn_node::meta::rpc::answer;
    use cairn_protocol::metarpc::{Call, ErrorCode, Request, Response};
    let cluster = cluster_with_map().await;
    let replica = cluster.node(2).metadata();
    let write = |map_version: u64, name: &str| Call {
        map_version,
        request: Request::Write {
            rows: vec![bucket_row(name, replica.timestamp(), b"x")],
        },
    };
    let poisoned = answer(replica, write(u64::MAX - 1, "poison")).await;
    assert!(
        matches!(
            poisoned,
            Response::Error {
                code: ErrorCode::Declined,
                ..
            }
        ),
        "{poisoned:?}"
    );
    assert!(
        replica.replica().fence() <= 1,
        "the fence moved past every verified map"
    );
    let skipped = answer(replica, write(u64::MAX, "skip")).await;
    assert!(
        matches!(
            skipped,
            Response::Error {
                code: ErrorCode::Malformed,
                ..
            }
        ),
        "{skipped:?}"
    );
    // Writes go on, through this replica as coordinator and as replica.
    for coordinator in [0, 2] {
        let metadata = cluster.node(coordinator).metadata();
        let name = format!("after-{coordinator}");
        metadata
            .write(vec![bucket_row(&name, metadata.timestamp(), b"ok")])
            .await
            .unwrap();
    }
    let (key, _) = bucket_row("skip", replica.timestamp(), b"");
    assert_eq!(
        local_value(replica, &key).await,
        None,
        "the unfenced write was stored"
    );
    // A coordinator whose map is older than one the replica verified and
    // saw in a request is refused.
    let mut newer = cluster.map();
    newer.version = 2;
    cluster
        .install_map(newer, Scheme::new(4, 2).unwrap())
        .await
        .unwrap();
    assert_eq!(
        answer(replica, write(2, "current")).await,
        Response::Written
    );
    let stale = answer(replica, write(1, "stale")).await;
    assert!(
        matches!(
            stale,
            Response::Error {
                code: ErrorCode::StaleMap,
                ..
            }
        ),
        "{stale:?}"
    );
    cluster.shutdown().await;
}

/// Last writer wins, so a row stamped a day ahead would win every later
/// write of its row for a day (an access key deleted would keep
/// authenticating): replicas refuse it, and the next honest write wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_stamped_far_in_the_future_is_refused_and_later_writes_win() {
    use cairn_protocol::hlc::Hlc;
    let cluster = cluster_with_map().await;
    let metadata = cluster.node(0).metadata();
    let now = metadata.timestamp();
    let day_ahead = Timestamp {
        hlc: Hlc::new(now.hlc.unix_ms() + 86_400_000, 0),
        node: now.node,
    };
    let refused = metadata
        .write(vec![bucket_row("keys", day_ahead, b"from the future")])
        .await;
    assert!(refused.is_err(), "a row stamped a day ahead was accepted");
    metadata
        .write(vec![bucket_row("keys", metadata.timestamp(), b"now")])
        .await
        .unwrap();
    let (key, _) = bucket_row("keys", now, b"");
    match metadata.read(vec![key]).await.unwrap().remove(0) {
        Some(RowValue::Register(register)) => {
            assert_eq!(register.value.as_deref(), Some(&b"now"[..]));
        }
        other => panic!("{other:?}"),
    }
    cluster.shutdown().await;
}

/// Dueling proposers retry, and an attempt's accept can land on some
/// replicas and be chosen after a later attempt judged another value: each
/// caller must be answered with the value that was chosen for it, never a
/// proposal of its that lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_of_many_racing_appends_is_answered_with_the_value_chosen_for_it() {
    let cluster = cluster_with_map().await;
    let key = RegisterKey {
        partition: Partition::bucket("log"),
        name: b"appends".to_vec(),
    };
    const WRITERS: usize = 60;
    let mut attempts = Vec::new();
    for writer in 0..WRITERS {
        let (meta, key) = (
            cluster
                .node(writer % cluster.members.len())
                .metadata()
                .clone(),
            key.clone(),
        );
        attempts.push(tokio::spawn(async move {
            let entry = format!("[{writer}]");
            let answer = meta
                .compare_and_set(key, |current| {
                    let mut log = current.map(<[u8]>::to_vec).unwrap_or_default();
                    log.extend_from_slice(entry.as_bytes());
                    Ok::<_, ()>(Some(log))
                })
                .await
                .unwrap()
                .unwrap()
                .expect("an append chooses a value");
            (entry, String::from_utf8(answer).unwrap())
        }));
    }
    let mut answers = Vec::new();
    for attempt in attempts {
        answers.push(attempt.await.unwrap());
    }
    let last = cluster
        .node(0)
        .metadata()
        .read_register(key)
        .await
        .unwrap()
        .expect("the log");
    let last = String::from_utf8(last).unwrap();
    for (entry, answer) in &answers {
        // Every chosen value extends the one before it, so a value that was
        // chosen is a prefix of the last; the caller's entry ends it.
        assert!(
            last.starts_with(answer.as_str()),
            "{entry} was answered {answer:?}, which was never chosen (last: {last:?})"
        );
        assert!(
            answer.ends_with(entry.as_str()),
            "{entry} answered {answer:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_a_thousand_writes_converges_by_anti_entropy_alone() {
    let mut cluster = cluster_with_map().await;
    let partition = Partition::bucket("logs");
    let replicas = cluster.node(0).metadata().replicas_of(&partition).unwrap();
    let victim = cluster.index_of(&replicas[2]);
    cluster.stop(victim).await;

    // A thousand writes through a node that is no replica, which is then
    // stopped too: nothing but anti-entropy can bring them to the victim.
    let writer = coordinator(&cluster, &replicas);
    let meta = cluster.node(writer).metadata().clone();
    for batch in 0..10u64 {
        let rows = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                version_row("logs", &format!("day/{n:04}"), n, meta.timestamp())
            })
            .collect();
        meta.write(rows).await.unwrap();
    }
    cluster.stop(writer).await;

    cluster.anti_entropy_every = Duration::from_millis(200);
    cluster.restart(victim).await.unwrap();
    let digest = |index: usize| {
        let replica = cluster.node(index).metadata().replica().clone();
        let partition = partition.clone();
        async move {
            tokio::task::spawn_blocking(move || replica.digest(&partition).unwrap().root())
                .await
                .unwrap()
        }
    };
    let healthy = digest(cluster.index_of(&replicas[0])).await;
    assert_eq!(healthy, digest(cluster.index_of(&replicas[1])).await);
    let mut converged = false;
    for _ in 0..300 {
        if digest(victim).await == healthy {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(converged, "the restarted replica never converged");
    let back = cluster.node(victim).metadata().clone();
    let page = back
        .replica()
        .range(&partition, Table::Versions, b"", None, 2000)
        .unwrap();
    assert_eq!(page.rows.len(), 1000);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_roll_up_prefixes_hide_deleted_keys_and_page_in_order() {
    use cairn_model::listing::{ListRequest, ListStart};
    use cairn_protocol::version::RetentionMode;

    let cluster = cluster_with_map().await;
    let meta = cluster.node(2).metadata().clone();
    let mut rows = Vec::new();
    let mut n = 0;
    let mut add = |key: &str, edit: &dyn Fn(&mut ObjectVersion)| {
        n += 1;
        let (row_key, value) = version_row("docs", key, n, meta.timestamp());
        let RowValue::Version(mut version) = value else {
            unreachable!()
        };
        edit(&mut version);
        rows.push((row_key, RowValue::Version(version)));
    };
    let keep = |_: &mut ObjectVersion| {};
    add("a", &keep);
    add("b/1", &keep);
    add("b/2", &keep);
    add("c", &keep);
    add("c", &|v| v.body = VersionBody::DeleteMarker);
    add("d", &keep);
    add("d", &keep);
    let purged_at = meta.timestamp();
    add("e", &|v| v.purged = Some(purged_at));
    add("f", &|v| {
        v.purged = Some(purged_at);
        v.retention.mode = RetentionMode::Compliance;
        v.retention.retain_until_unix_ms = u64::MAX;
    });
    meta.write(rows).await.unwrap();

    let keys = |entries: &[ObjectVersion]| -> Vec<String> {
        entries.iter().map(|v| v.key.clone()).collect()
    };
    let request = |delimiter: Option<&str>, start: ListStart, max_keys: usize| ListRequest {
        prefix: String::new(),
        delimiter: delimiter.map(str::to_owned),
        start,
        max_keys,
    };
    let all = cairn_model::listing::list_objects(
        &meta,
        "docs",
        &request(None, ListStart::Beginning, 1000),
    )
    .await
    .unwrap();
    // c's newest version is a delete marker; e was purged; f was purged
    // under a compliance lock, which the purge cannot pass.
    assert_eq!(keys(&all.entries), ["a", "b/1", "b/2", "d", "f"]);
    assert!(
        matches!(all.entries[3].body, VersionBody::Data { size_bytes: 7, .. }),
        "d lists its newest version"
    );
    assert_eq!(all.resume, None);

    let first = cairn_model::listing::list_objects(
        &meta,
        "docs",
        &request(Some("/"), ListStart::Beginning, 2),
    )
    .await
    .unwrap();
    assert_eq!(keys(&first.entries), ["a"]);
    assert_eq!(first.common_prefixes, ["b/"]);
    let second = cairn_model::listing::list_objects(
        &meta,
        "docs",
        &request(
            Some("/"),
            ListStart::Resume(first.resume.clone().unwrap()),
            2,
        ),
    )
    .await
    .unwrap();
    assert_eq!(keys(&second.entries), ["d", "f"]);
    assert!(second.common_prefixes.is_empty());

    let after = cairn_model::listing::list_objects(
        &meta,
        "docs",
        &request(None, ListStart::AfterKey("b/1".into()), 1000),
    )
    .await
    .unwrap();
    assert_eq!(keys(&after.entries), ["b/2", "d", "f"]);

    let versions = cairn_model::listing::list_versions(
        &meta,
        "docs",
        &request(None, ListStart::Beginning, 1000),
    )
    .await
    .unwrap();
    assert_eq!(
        keys(&versions.entries),
        ["a", "b/1", "b/2", "c", "c", "d", "d", "f"]
    );
    assert_eq!(versions.entries[3].body, VersionBody::DeleteMarker);
    assert!(versions.entries[5].version > versions.entries[6].version);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_version_survives_a_delete_sent_to_every_replica() {
    use cairn_protocol::version::RetentionMode;

    let cluster = cluster_with_map().await;
    let meta = cluster.node(4).metadata().clone();
    let (key, RowValue::Version(mut locked)) = version_row("vault", "ledger", 1, meta.timestamp())
    else {
        unreachable!()
    };
    locked.retention.mode = RetentionMode::Compliance;
    locked.retention.retain_until_unix_ms = u64::MAX;
    meta.write(vec![(key.clone(), RowValue::Version(locked.clone()))])
        .await
        .unwrap();

    // A delete that tries to clear the lock and purge, merged straight into
    // every replica's store.
    let mut delete = locked.clone();
    delete.retention = Retention::default();
    delete.purged = Some(meta.timestamp());
    for replica in meta.replicas_of(&key.partition).unwrap() {
        let node = cluster.node(cluster.index_of(&replica)).metadata().clone();
        node.replica()
            .merge(
                vec![(key.clone(), RowValue::Version(delete.clone()))],
                UNFENCED,
            )
            .await
            .unwrap();
    }
    let Some(RowValue::Version(after)) = meta.read(vec![key]).await.unwrap().remove(0) else {
        panic!("the version is gone");
    };
    assert_eq!(after.retention, locked.retention, "retention was shortened");
    assert!(after.exists(cairn_node::clock::now_unix_ms()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_writes_reads_stops_and_restarts_lose_no_acknowledged_write() {
    let seed = cairn_tests::test_seed("random metadata test");
    let mut rng = Rng(seed);
    let mut cluster = cluster_with_map().await;
    let buckets = ["alpha", "beta", "gamma"];
    let mut acknowledged: Vec<(RowKey, RowValue)> = Vec::new();
    let mut down: Option<usize> = None;
    let (mut writes, mut failed_writes, mut reads, mut stops) = (0, 0, 0, 0);
    for step in 0..300u64 {
        let running: Vec<usize> = (0..6).filter(|i| Some(*i) != down).collect();
        let coordinator = running[rng.below(running.len())];
        let meta = cluster.node(coordinator).metadata().clone();
        match rng.below(100) {
            0..60 => {
                let bucket = buckets[rng.below(buckets.len())];
                let key = format!("k{:02}", rng.below(20));
                let row = version_row(bucket, &key, step, meta.timestamp());
                writes += 1;
                // Only a write that was acknowledged must survive.
                match meta.write(vec![row.clone()]).await {
                    Ok(()) => acknowledged.push(row),
                    Err(error) => {
                        failed_writes += 1;
                        eprintln!("step {step}: write not acknowledged: {error}");
                    }
                }
            }
            60..85 if !acknowledged.is_empty() => {
                let (key, value) = acknowledged[rng.below(acknowledged.len())].clone();
                reads += 1;
                let read = meta.read(vec![key.clone()]).await.unwrap();
                assert_eq!(read, vec![Some(value)], "step {step}: seed {seed}");
            }
            85..93 if down.is_none() => {
                // At most one node down: every partition keeps a majority.
                let victim = rng.below(6);
                cluster.stop(victim).await;
                down = Some(victim);
                stops += 1;
            }
            93..100 if down.is_some() => {
                cluster.restart(down.take().unwrap()).await.unwrap();
            }
            _ => {}
        }
    }
    if let Some(index) = down.take() {
        cluster.restart(index).await.unwrap();
    }
    eprintln!(
        "{writes} writes ({failed_writes} not acknowledged), {reads} reads, {stops} stops; checking {} rows on every node",
        acknowledged.len()
    );
    assert!(acknowledged.len() > 100, "too few writes to mean anything");
    for index in 0..6 {
        let meta = cluster.node(index).metadata().clone();
        for bucket in buckets {
            let (keys, values): (Vec<RowKey>, Vec<RowValue>) = acknowledged
                .iter()
                .filter(|(k, _)| k.partition == Partition::bucket(bucket))
                .cloned()
                .unzip();
            let read = meta.read(keys).await.unwrap();
            let expected: Vec<Option<RowValue>> = values.into_iter().map(Some).collect();
            assert_eq!(read, expected, "node {index}, bucket {bucket}: seed {seed}");
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_moved_by_a_new_map_under_load_lose_nothing() {
    // Anti-entropy stays at its default period (a minute): the reads below
    // must succeed by quorums alone, and the filling is driven by hand.
    let cluster = Cluster::start(&[3, 3, 3]).await.unwrap();
    // Map 1: two nodes per site; map 2 adds the third of each site.
    let scheme = Scheme::new(4, 2).unwrap();
    let mut small = cluster.map();
    small
        .nodes
        .retain(|n| ![2, 5, 8].contains(&cluster.index_of(&n.id)));
    cluster.install_map(small, scheme).await.unwrap();
    let buckets: Vec<String> = (0..12).map(|i| format!("bucket-{i:02}")).collect();
    let before: Vec<Vec<NodeId>> = buckets
        .iter()
        .map(|b| {
            cluster
                .node(0)
                .metadata()
                .replicas_of(&Partition::bucket(b))
                .unwrap()
        })
        .collect();

    // Writers on three nodes keep writing while the map changes: each
    // has 20 writes acknowledged before the change and 20 more after it,
    // however slow the machine.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let mut writers = Vec::new();
    for (w, index) in [0usize, 4, 7].into_iter().enumerate() {
        let (meta, stop, counts, buckets) = (
            cluster.node(index).metadata().clone(),
            stop.clone(),
            counts.clone(),
            buckets.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let bucket = &buckets[(n as usize + w) % buckets.len()];
                let row = version_row(bucket, &format!("w{w}/{n:05}"), n, meta.timestamp());
                if meta.write(vec![row.clone()]).await.is_ok() {
                    acknowledged.push(row);
                    counts[w].fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            acknowledged
        }));
    }
    let each_reaches = |floor: [usize; 3]| {
        let counts = counts.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while (0..3).any(|w| counts[w].load(Ordering::Relaxed) < floor[w] + 20) {
                assert!(tokio::time::Instant::now() < deadline, "writers stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    each_reaches([0; 3]).await;
    let mut big = cluster.map();
    big.version = 2;
    cluster.install_map(big, scheme).await.unwrap();
    each_reaches(std::array::from_fn(|w| counts[w].load(Ordering::Relaxed))).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    // Writer 2's rows are never read: read repair cannot fill them.
    let mut unread = Vec::new();
    for (w, writer) in writers.into_iter().enumerate() {
        let rows = writer.await.unwrap();
        if w == 2 {
            unread = rows;
        } else {
            acknowledged.extend(rows);
        }
    }
    let after: Vec<Vec<NodeId>> = buckets
        .iter()
        .map(|b| {
            cluster
                .node(0)
                .metadata()
                .replicas_of(&Partition::bucket(b))
                .unwrap()
        })
        .collect();
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    eprintln!(
        "{} + {} writes acknowledged; {moved} of 12 partitions moved",
        acknowledged.len(),
        unread.len()
    );
    assert!(moved > 0, "no partition moved: the test proves nothing");
    assert!(acknowledged.len() > 50 && unread.len() > 25);

    // Every acknowledged write reads back through every node...
    for index in [1, 2, 5, 8] {
        let meta = cluster.node(index).metadata().clone();
        for (key, value) in &acknowledged {
            let read = meta.read(vec![key.clone()]).await.unwrap();
            assert_eq!(read, vec![Some(value.clone())], "through node {index}");
        }
    }
    // ...and after one anti-entropy round on every node, the new replicas
    // of every partition hold every row, pulled from the old ones (the
    // unread rows: read repair did not touch them).
    for index in 0..9 {
        let stats = cluster
            .node(index)
            .metadata()
            .anti_entropy_round()
            .await
            .unwrap();
        eprintln!("node {index}: {stats:?}");
    }
    for (key, value) in &unread {
        let bucket_index = buckets
            .iter()
            .position(|b| b == key.partition.as_str())
            .unwrap();
        for replica in &after[bucket_index] {
            let node = cluster.node(cluster.index_of(replica)).metadata().clone();
            assert_eq!(
                local_value(&node, key).await.as_ref(),
                Some(value),
                "new replica {replica} lacks {:?}",
                key.sort
            );
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_delete_racing_a_new_lock_is_decided_one_way_only() {
    use cairn_model::locks::LockError;
    use cairn_protocol::guard::{GuardChange, GuardRefusal};

    let cluster = cluster_with_map().await;
    let (deleter, locker) = (
        cluster.node(1).metadata().clone(),
        cluster.node(4).metadata().clone(),
    );
    let (mut deletes_won, mut locks_won) = (0, 0);
    for trial in 0..20u64 {
        let row = version_row("vault", &format!("doc-{trial}"), trial, deleter.timestamp());
        deleter.write(vec![row.clone()]).await.unwrap();
        let key = row.0.clone();
        let hold = GuardChange::LegalHold {
            on: true,
            at: locker.timestamp(),
        };
        // Trials alternate: a true race, a delete with a head start, a true
        // race, a lock with a head start.
        let head_start = |side: u64| async move {
            if trial % 4 == side {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (deleted, locked) = tokio::join!(
            async {
                head_start(3).await;
                cairn_model::locks::change_version_lock(
                    &deleter,
                    &key,
                    GuardChange::Purge {
                        bypass_governance: false,
                    },
                )
                .await
            },
            async {
                head_start(1).await;
                cairn_model::locks::change_version_lock(&locker, &key, hold).await
            },
        );
        let Some(RowValue::Version(after)) =
            deleter.read(vec![key.clone()]).await.unwrap().remove(0)
        else {
            panic!("trial {trial}: the row is gone");
        };
        let now = cairn_node::clock::now_unix_ms();
        match (deleted, locked) {
            (Ok(_), Err(LockError::Refused(GuardRefusal::Purged))) => {
                deletes_won += 1;
                assert!(
                    !after.exists(now) && !after.legal_hold.value,
                    "trial {trial}"
                );
            }
            (Err(LockError::Refused(GuardRefusal::Locked { .. })), Ok(_)) => {
                locks_won += 1;
                assert!(after.exists(now) && after.legal_hold.value, "trial {trial}");
                assert_eq!(after.purged, None, "trial {trial}");
            }
            (deleted, locked) => {
                panic!("trial {trial}: both or neither decided: {deleted:?} / {locked:?}")
            }
        }
    }
    eprintln!("deletes won {deletes_won}, locks won {locks_won}");
    assert!(deletes_won > 0 && locks_won > 0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_partition_settles_on_its_new_replicas_and_outlives_its_old_ones() {
    use cairn_protocol::meta::replica_set;

    let mut cluster = Cluster::start(&[3, 3, 3]).await.unwrap();
    let scheme = Scheme::new(4, 2).unwrap();
    let mut small = cluster.map();
    small
        .nodes
        .retain(|n| ![2, 5, 8].contains(&cluster.index_of(&n.id)));
    let mut big = cluster.map();
    big.version = 2;
    // A bucket that map 2 moves off two of its three map-1 replicas.
    let (bucket, old, new) = (0..10_000)
        .map(|i| format!("moving-{i}"))
        .find_map(|name| {
            let p = Partition::bucket(&name);
            let (old, new) = (replica_set(&small, &p, 3), replica_set(&big, &p, 3));
            let gone = old.iter().filter(|n| !new.contains(n)).count();
            (gone >= 2).then_some((name, old, new))
        })
        .expect("some bucket moves off two replicas");
    let partition = Partition::bucket(&bucket);
    cluster.install_map(small, scheme).await.unwrap();

    // Written under map 1: held by the old replicas only.
    let coordinator = (0..9)
        .find(|i| {
            let id = cluster.node_ids()[*i];
            !old.contains(&id) && !new.contains(&id)
        })
        .expect("a node outside both sets");
    let meta = cluster.node(coordinator).metadata().clone();
    let rows: Vec<(RowKey, RowValue)> = (0..200)
        .map(|n| version_row(&bucket, &format!("k{n:03}"), n, meta.timestamp()))
        .collect();
    meta.write(rows.clone()).await.unwrap();
    // And a conditional create decided by the old replicas.
    let register = RegisterKey {
        partition: partition.clone(),
        name: b"only-once".to_vec(),
    };
    let create = |value: &'static [u8]| {
        move |current: Option<&[u8]>| match current {
            None => Ok(Some(value.to_vec())),
            Some(existing) => Err(existing.to_vec()),
        }
    };
    let first = meta
        .compare_and_set(register.clone(), create(b"first"))
        .await
        .unwrap();
    assert_eq!(first, Ok(Some(b"first".to_vec())));

    cluster.install_map(big, scheme).await.unwrap();
    assert!(meta.is_moving(&partition).unwrap());
    // Touching the partition asks its new replicas to fill; once a majority
    // of them has, it is served by them alone.
    let mut settled = false;
    for _ in 0..100 {
        if !meta.is_moving(&partition).unwrap() {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "the moved partition never settled");

    // The old replicas that left the set forget the partition once it has
    // settled, and then go away: everything is still readable and writable
    // through the new replicas.
    let empty = cairn_protocol::meta::PartitionDigest::default().root();
    for gone in old.iter().filter(|n| !new.contains(n)) {
        let node = cluster.node(cluster.index_of(gone)).metadata().clone();
        let mut forgot = false;
        for _ in 0..50 {
            node.anti_entropy_round().await.unwrap();
            if node.replica().digest(&partition).unwrap().root() == empty {
                forgot = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(forgot, "old replica {gone} kept the partition");
        cluster.stop(cluster.index_of(gone)).await;
    }
    let keys: Vec<RowKey> = rows.iter().map(|(k, _)| k.clone()).collect();
    let read = meta.read(keys).await.unwrap();
    let missing = rows
        .iter()
        .zip(&read)
        .filter(|((_, value), got)| got.as_ref() != Some(value))
        .count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} rows lost with the old replicas",
        rows.len()
    );
    meta.write(vec![version_row(&bucket, "after", 999, meta.timestamp())])
        .await
        .unwrap();
    // The register's decision moved too: a second create is refused.
    let second = meta
        .compare_and_set(register, create(b"second"))
        .await
        .unwrap();
    assert_eq!(second, Err(b"first".to_vec()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_sets_the_replica_count_and_five_replicas_outlive_two_failures() {
    use cairn_protocol::placement::Tolerance;

    let mut cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    cluster
        .install_map_with(Scheme::new(4, 2).unwrap(), Tolerance::default(), 5)
        .await
        .unwrap();
    let partition = Partition::bucket("wide");
    let replicas = cluster.node(0).metadata().replicas_of(&partition).unwrap();
    assert_eq!(replicas.len(), 5);
    let coordinator = coordinator(&cluster, &replicas);
    for gone in &replicas[..2] {
        cluster.stop(cluster.index_of(gone)).await;
    }
    let meta = cluster.node(coordinator).metadata().clone();
    let row = version_row("wide", "k", 1, meta.timestamp());
    meta.write(vec![row.clone()]).await.unwrap();
    assert_eq!(
        meta.read(vec![row.0.clone()]).await.unwrap(),
        vec![Some(row.1)]
    );
    cluster.shutdown().await;
}

/// Tombstones (a cleared register, a purged version) older than the age
/// go from a replica only once every node of the map holds them or
/// nothing: a replica, or a node that is no replica, still holding the
/// live value keeps them (and is handed the tombstone); a locked purged
/// version and live rows are never removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_compacted_only_once_every_replica_holds_them() {
    use cairn_protocol::version::RetentionMode;
    let cluster = cluster_with_map().await;
    let partition = Partition::bucket("tombs");
    let replicas = cluster.node(0).metadata().replicas_of(&partition).unwrap();
    let meta = cluster
        .node(cluster.index_of(&replicas[0]))
        .metadata()
        .clone();
    let register = |name: &str, value: Option<&[u8]>| {
        (
            RowKey::new(partition.clone(), Table::Releases, name.as_bytes().to_vec()),
            RowValue::Register(Register {
                at: meta.timestamp(),
                value: value.map(<[u8]>::to_vec),
            }),
        )
    };
    // Written live everywhere, then cleared everywhere: a tombstone.
    meta.write(vec![register("cleared", Some(b"work"))])
        .await
        .unwrap();
    let (cleared, tombstone) = register("cleared", None);
    meta.write(vec![(cleared.clone(), tombstone.clone())])
        .await
        .unwrap();
    // Cleared on two replicas only: the third still holds the work.
    meta.write(vec![register("half", Some(b"work"))])
        .await
        .unwrap();
    let (half, half_tombstone) = register("half", None);
    for replica in &replicas[..2] {
        let node = cluster.node(cluster.index_of(replica)).metadata().clone();
        node.replica()
            .merge(vec![(half.clone(), half_tombstone.clone())], UNFENCED)
            .await
            .unwrap();
    }
    // A purged version, a purged version under a legal hold, a live one.
    let purged_row = |n: u64, hold: bool| {
        let (key, value) = version_row("tombs", &format!("k{n}"), n, meta.timestamp());
        let RowValue::Version(mut version) = value else {
            unreachable!()
        };
        version.purged = Some(meta.timestamp());
        if hold {
            version.legal_hold = Lww {
                value: true,
                at: meta.timestamp(),
            };
            version.retention.mode = RetentionMode::None;
        }
        (key, RowValue::Version(version))
    };
    let (gone, gone_value) = purged_row(1, false);
    let (held, held_value) = purged_row(2, true);
    let (live, live_value) = version_row("tombs", "k3", 3, meta.timestamp());
    meta.write(vec![
        (gone.clone(), gone_value),
        (held.clone(), held_value),
        (live.clone(), live_value),
    ])
    .await
    .unwrap();

    for replica in &replicas {
        let node = cluster.node(cluster.index_of(replica)).metadata().clone();
        node.compact_tombstones(Duration::ZERO).await.unwrap();
    }
    for replica in &replicas {
        let node = cluster.node(cluster.index_of(replica)).metadata().clone();
        assert_eq!(local_value(&node, &cleared).await, None, "{replica}");
        assert_eq!(local_value(&node, &gone).await, None, "{replica}");
        assert!(local_value(&node, &held).await.is_some(), "{replica}");
        assert!(local_value(&node, &live).await.is_some(), "{replica}");
    }
    // The replica that missed the clearing kept the first from removing
    // it, and was handed the tombstone: the work is gone everywhere.
    let first_replica = cluster
        .node(cluster.index_of(&replicas[0]))
        .metadata()
        .clone();
    assert_eq!(
        local_value(&first_replica, &half).await,
        Some(half_tombstone.clone())
    );
    for replica in &replicas {
        let node = cluster.node(cluster.index_of(replica)).metadata().clone();
        assert!(
            !matches!(
                local_value(&node, &half).await,
                Some(RowValue::Register(Register { value: Some(_), .. }))
            ),
            "{replica} still holds the work"
        );
    }
    // A node that is no replica but still holds the work (as a node that
    // was one before a map change may) keeps the tombstone too.
    let outsider = cluster
        .node_ids()
        .into_iter()
        .find(|n| !replicas.contains(n))
        .unwrap();
    let outsider = cluster.node(cluster.index_of(&outsider)).metadata().clone();
    let (kept, kept_value) = register("kept", Some(b"work"));
    outsider
        .replica()
        .merge(vec![(kept.clone(), kept_value)], UNFENCED)
        .await
        .unwrap();
    let (_, kept_tombstone) = register("kept", None);
    for replica in &replicas {
        let node = cluster.node(cluster.index_of(replica)).metadata().clone();
        node.replica()
            .merge(vec![(kept.clone(), kept_tombstone.clone())], UNFENCED)
            .await
            .unwrap();
    }
    first_replica
        .compact_tombstones(Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        local_value(&first_replica, &kept).await,
        Some(kept_tombstone.clone()),
        "a tombstone went while a node held the value it replaced"
    );
    assert_eq!(
        local_value(&outsider, &kept).await,
        Some(kept_tombstone.clone()),
        "the node holding the old value was not handed the tombstone"
    );
    // Now that it holds the tombstone, the next passes remove it.
    for replica in &replicas {
        let node = cluster.node(cluster.index_of(replica)).metadata().clone();
        node.compact_tombstones(Duration::ZERO).await.unwrap();
    }
    for replica in &replicas {
        let node = cluster.node(cluster.index_of(replica)).metadata().clone();
        assert_eq!(local_value(&node, &half).await, None, "{replica}");
        assert_eq!(local_value(&node, &kept).await, None, "{replica}");
    }
    // The replicas' digests agree again.
    let root = |index: usize| {
        let replica = cluster.node(index).metadata().replica().clone();
        let partition = partition.clone();
        async move {
            tokio::task::spawn_blocking(move || replica.digest(&partition).unwrap().root())
                .await
                .unwrap()
        }
    };
    let first = root(cluster.index_of(&replicas[0])).await;
    for replica in &replicas[1..] {
        assert_eq!(root(cluster.index_of(replica)).await, first);
    }
    cluster.shutdown().await;
}

/// A node out of the map while tombstones were compacted forgets its
/// metadata replica when a map brings it back (its `since` is after the
/// map it held), so the values those tombstones replaced stay gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_an_absence_cannot_bring_back_what_compacted_tombstones_replaced() {
    let mut cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    let scheme = Scheme::new(2, 1).unwrap();
    cluster.install_map(cluster.map(), scheme).await.unwrap();
    let partition = Partition::bucket("away");
    let replicas = cluster.node(0).metadata().replicas_of(&partition).unwrap();
    let away_id = replicas[0];
    let away = cluster.index_of(&away_id);
    let meta = cluster
        .node(coordinator(&cluster, &[away_id]))
        .metadata()
        .clone();
    let key = RowKey::new(partition.clone(), Table::Releases, b"work".to_vec());
    let register = |value: Option<&[u8]>| {
        RowValue::Register(Register {
            at: meta.timestamp(),
            value: value.map(<[u8]>::to_vec),
        })
    };
    let live = register(Some(b"work"));
    meta.write(vec![(key.clone(), live.clone())]).await.unwrap();
    // The node about to leave holds the live value (the write reaches it
    // in the background).
    let held = cluster.node(away).metadata().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while local_value(&held, &key).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the write never reached it"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    cluster.stop(away).await;

    // Map 2 leaves it out; the partition settles on its new replicas.
    let mut without = cluster.map();
    without.version = 2;
    without.nodes.retain(|n| n.id != away_id);
    cluster.install_map(without, scheme).await.unwrap();
    // Each new replica asks the stopped node too, and waits out its calls.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while meta.is_moving(&partition).unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partition never settled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Cleared, and the tombstone compacted on every node of map 2.
    meta.write(vec![(key.clone(), register(None))])
        .await
        .unwrap();
    let running: Vec<usize> = (0..cluster.members.len()).filter(|i| *i != away).collect();
    // A node of map 2 stopped might still hold the value: nothing goes.
    let stopped = *running.last().unwrap();
    cluster.stop(stopped).await;
    for &i in running.iter().filter(|i| **i != stopped) {
        let node = cluster.node(i).metadata().clone();
        assert_eq!(node.compact_tombstones(Duration::ZERO).await.unwrap(), 0);
    }
    cluster.restart(stopped).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut left = 0;
        for &i in &running {
            let node = cluster.node(i).metadata().clone();
            node.compact_tombstones(Duration::ZERO).await.unwrap();
            left += usize::from(local_value(&node, &key).await.is_some());
        }
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} nodes keep the row"
        );
    }

    // Map 3 brings it back; it restarts with map 1 and the live value on
    // disk, and forgets them as it adopts map 3 from its peers.
    let mut back = cluster.map();
    back.version = 3;
    let signed = cluster.install_map(back, scheme).await.unwrap();
    assert_eq!(
        signed
            .map
            .nodes
            .iter()
            .find(|n| n.id == away_id)
            .unwrap()
            .since,
        3
    );
    cluster.restart(away).await.unwrap();
    assert!(
        cluster
            .node(away)
            .wait_for_map_version(3, Duration::from_secs(30))
            .await
    );
    assert_eq!(
        local_value(cluster.node(away).metadata(), &key).await,
        None,
        "the node back kept a value from before its absence"
    );
    for i in 0..cluster.members.len() {
        cluster
            .node(i)
            .metadata()
            .anti_entropy_round()
            .await
            .unwrap();
    }
    for i in 0..cluster.members.len() {
        assert_eq!(
            cluster
                .node(i)
                .metadata()
                .read(vec![key.clone()])
                .await
                .unwrap(),
            vec![None],
            "node {i} reads the cleared value back"
        );
        assert_eq!(local_value(cluster.node(i).metadata(), &key).await, None);
    }
    cluster.shutdown().await;
}
