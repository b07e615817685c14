//! How writes end: conditional writes, cut-off PUTs, and the collection of fragments no committed object uses.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use cairn_gateway::{Gateway, GatewayConfig};
use cairn_model::kms::RootKey;
use cairn_protocol::erasure::Scheme;
use cairn_protocol::meta::Partition;
use cairn_protocol::metarpc::RegisterKey;
use cairn_protocol::version::{ObjectVersion, VersionBody};
use cairn_tests::s3::*;
use cairn_tests::{Cluster, Rng, pseudo_random_bytes, random_secret};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_writes_from_three_gateways_have_exactly_one_winner() {
    let cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    cluster
        .install_map(cluster.map(), Scheme::new(4, 2).unwrap())
        .await
        .unwrap();
    let root = random_secret();
    let mut gateways = Vec::new();
    for node in [0, 2, 4] {
        gateways.push(
            Gateway::start(
                cluster.node(node).handle(),
                RootKey::from_bytes(root),
                GatewayConfig::default(),
            )
            .await
            .unwrap(),
        );
    }
    let key = gateways[0].keys().create("test").await.unwrap();
    let clients: Vec<Client> = gateways
        .iter()
        .map(|g| client_for(g, &key.id, &key.secret))
        .collect();
    clients[0]
        .create_bucket()
        .bucket("cond")
        .send()
        .await
        .unwrap();

    let attempts = (0..30).map(|n| {
        let client = clients[n % 3].clone();
        async move {
            client
                .put_object()
                .bucket("cond")
                .key("only-once")
                .if_none_match("*")
                .body(ByteStream::from(format!("writer {n}").into_bytes()))
                .send()
                .await
                .map(|_| n)
                .map_err(|e| code(&e.into_service_error()))
        }
    });
    let outcomes = futures::future::join_all(attempts).await;
    let winners: Vec<usize> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok().copied())
        .collect();
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Err(code) if code == "PreconditionFailed"))
        .count();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    assert_eq!(refused, 29, "{outcomes:?}");
    let winner = winners[0];
    for client in &clients {
        let body = get_bytes(client, "cond", "only-once").await;
        assert_eq!(body, format!("writer {winner}").into_bytes());
    }

    // If-Match: the current ETag wins, another one is refused.
    let etag = clients[1]
        .head_object()
        .bucket("cond")
        .key("only-once")
        .send()
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .to_owned();
    let stale = clients[2]
        .put_object()
        .bucket("cond")
        .key("only-once")
        .if_match("\"00000000000000000000000000000000\"")
        .body(ByteStream::from_static(b"stale"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&stale.into_service_error()), "PreconditionFailed");
    clients[2]
        .put_object()
        .bucket("cond")
        .key("only-once")
        .if_match(&etag)
        .body(ByteStream::from_static(b"updated"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        get_bytes(&clients[0], "cond", "only-once").await,
        b"updated"
    );
    let missing = clients[0]
        .put_object()
        .bucket("cond")
        .key("absent")
        .if_match(&etag)
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    // S3 answers a conditional write to a key without an object 404.
    assert_eq!(code(&missing.into_service_error()), "NoSuchKey");

    // A multipart completion is conditional too.
    let upload_id = clients[1]
        .create_multipart_upload()
        .bucket("cond")
        .key("only-once")
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned();
    let part = clients[1]
        .upload_part()
        .bucket("cond")
        .key("only-once")
        .upload_id(&upload_id)
        .part_number(1)
        .body(ByteStream::from_static(b"late"))
        .send()
        .await
        .unwrap();
    let late = clients[1]
        .complete_multipart_upload()
        .bucket("cond")
        .key("only-once")
        .upload_id(&upload_id)
        .if_none_match("*")
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .parts(
                    aws_sdk_s3::types::CompletedPart::builder()
                        .part_number(1)
                        .e_tag(part.e_tag().unwrap())
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&late.into_service_error()), "PreconditionFailed");
    assert_eq!(
        get_bytes(&clients[2], "cond", "only-once").await,
        b"updated"
    );

    // After a delete, a conditional create succeeds again.
    clients[0]
        .delete_object()
        .bucket("cond")
        .key("only-once")
        .send()
        .await
        .unwrap();
    clients[1]
        .put_object()
        .bucket("cond")
        .key("only-once")
        .if_none_match("*")
        .body(ByteStream::from_static(b"again"))
        .send()
        .await
        .unwrap();
    for gateway in gateways {
        gateway.stop().await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_in_the_middle_of_a_put_leaves_no_object() {
    let collection = QUICK_COLLECTION;
    let s = setup_with(collection).await;
    let collectors = start_collectors(&s.cluster, collection);
    s.client.create_bucket().bucket("cut").send().await.unwrap();
    // A presigned PUT lets a raw socket send part of a body and hang up:
    // 6 of 10 MiB, once a whole 4 MiB segment has reached storage.
    let uri = presigned_put(&s.client, "cut", "half").await;
    let address = s.gateway.address();
    let stream = start_put(address, &uri, 10 << 20, &pseudo_random_bytes(1, 6 << 20)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while fragment_counts(&s.cluster).0 == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no segment stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stream);
    // What the server did with it: the fragments it stored end in the
    // trash, and nothing of the PUT is left to collect.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (live, trash) = fragment_counts(&s.cluster);
        let work = collector_work(&s.cluster, "cut").await;
        if live == 0 && trash > 0 && work == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "live fragments {live}, trashed {trash}, collector work {work}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(collectors);
    assert_eq!(head_of(&s.cluster, "cut", "half").await, None);
    let rows = s
        .cluster
        .node(0)
        .metadata()
        .range(
            &Partition::bucket("cut"),
            cairn_protocol::meta::Table::Versions,
            &[],
            None,
            10,
        )
        .await
        .unwrap();
    assert!(rows.rows.is_empty(), "version rows: {:?}", rows.rows);
    let missing = s
        .client
        .head_object()
        .bucket("cut")
        .key("half")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        missing.raw_response().map(|r| r.status().as_u16()),
        Some(404)
    );
    let listed = s
        .client
        .list_objects_v2()
        .bucket("cut")
        .send()
        .await
        .unwrap();
    assert!(listed.contents().is_empty());
    // A body that does not hash to the SHA-256 the request claims.
    let body = pseudo_random_bytes(3, 100_000);
    let claimed = format!("x-amz-content-sha256: {}\r\n", "0".repeat(64));
    let answer = raw_request(address, "PUT", &uri, &address.to_string(), &claimed, &body).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400")
            && answer.contains("<Code>XAmzContentSHA256Mismatch</Code>"),
        "{answer}"
    );
    assert!(
        s.client
            .head_object()
            .bucket("cut")
            .key("half")
            .send()
            .await
            .is_err()
    );
    // The same presigned URL, used in full, stores the object.
    let body = pseudo_random_bytes(2, 1 << 20);
    let answer = raw_request(address, "PUT", &uri, &address.to_string(), "", &body).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(get_bytes(&s.client, "cut", "half").await == body);
    s.shutdown().await;
}

/// The collector's work left in a bucket: single-PUT upload records and
/// release rows, as a quorum read sees them.
async fn collector_work(cluster: &Cluster, bucket: &str) -> usize {
    use cairn_protocol::meta::{Partition, Register, RowValue, Table};
    use cairn_protocol::records::UploadRecord;
    let metadata = cluster.node(0).metadata();
    let mut work = 0;
    for table in [Table::Uploads, Table::Releases] {
        let page = metadata
            .range(&Partition::bucket(bucket), table, &[], None, 1000)
            .await
            .unwrap();
        for (_, value) in page.rows {
            if let RowValue::Register(Register {
                value: Some(bytes), ..
            }) = value
                && (table == Table::Releases || !UploadRecord::decode(&bytes).unwrap().multipart)
            {
                work += 1;
            }
        }
    }
    work
}

/// Gives a committed object the upload record its PUT would have left had
/// it crashed between its commit and the record's deletion: the collector
/// must see the object and keep its fragments.
async fn forge_uncommitted_look(cluster: &Cluster, bucket: &str, key: &str) {
    use cairn_protocol::manifest::SignedManifest;
    use cairn_protocol::meta::{Partition, Register, RowKey, RowValue, Table, upload_sort_key};
    use cairn_protocol::records::UploadRecord;
    use cairn_protocol::version::{StoredHeaders, VersionBody};
    let metadata = cluster.node(0).metadata();
    let partition = Partition::bucket(bucket);
    let (start, end) = (
        [key.as_bytes(), &[0]].concat(),
        [key.as_bytes(), &[1]].concat(),
    );
    let page = metadata
        .range(&partition, Table::Versions, &start, Some(&end), 10)
        .await
        .unwrap();
    let RowValue::Version(version) = &page.rows[0].1 else {
        panic!("a version row");
    };
    let VersionBody::Data { manifest, .. } = &version.body else {
        panic!("an object");
    };
    let manifest_row = RowKey::new(
        partition.clone(),
        Table::Manifests,
        manifest.as_bytes().to_vec(),
    );
    let Some(RowValue::Immutable(bytes)) =
        metadata.read(vec![manifest_row]).await.unwrap().remove(0)
    else {
        panic!("a manifest");
    };
    let upload = SignedManifest::decode(&bytes).unwrap().manifest.upload;
    let record = UploadRecord {
        upload,
        started_unix_ms: 1,
        multipart: false,
        scheme: Scheme::new(4, 2).unwrap(),
        bucket_key_id: String::new(),
        wrapped_key: Vec::new(),
        headers: StoredHeaders::default(),
    };
    let row = RowKey::new(
        partition,
        Table::Uploads,
        upload_sort_key(key, upload.as_bytes()),
    );
    let value = RowValue::Register(Register {
        at: metadata.timestamp(),
        value: Some(record.encode()),
    });
    metadata.write(vec![(row, value)]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orphan_fragments_go_to_the_trash_and_committed_ones_stay() {
    // Short deadlines so that the collector acts within the test.
    let collection = QUICK_COLLECTION;
    let s = setup_with(collection).await;
    let collectors = start_collectors(&s.cluster, collection);
    let c = &s.client;
    c.create_bucket().bucket("orphans").send().await.unwrap();
    let put = |key: &'static str, seed: u64| async move {
        c.put_object()
            .bucket("orphans")
            .key(key)
            .body(ByteStream::from(pseudo_random_bytes(seed, 1 << 20)))
            .send()
            .await
            .unwrap();
    };

    // What stays: a plain object, the newest of two versions, and a
    // completed multipart upload.
    put("kept", 1).await;
    put("over", 2).await;
    // Uploads parts (number, seed, size) in order; returns the upload id
    // and, per part number, the ETag of its last upload.
    let upload = |key: &'static str, parts: &'static [(i32, u64, usize)]| async move {
        let created = c
            .create_multipart_upload()
            .bucket("orphans")
            .key(key)
            .send()
            .await
            .unwrap();
        let id = created.upload_id().unwrap().to_owned();
        let mut etags = std::collections::BTreeMap::new();
        for &(number, seed, size) in parts {
            let part = c
                .upload_part()
                .bucket("orphans")
                .key(key)
                .upload_id(&id)
                .part_number(number)
                .body(ByteStream::from(pseudo_random_bytes(seed, size)))
                .send()
                .await
                .unwrap();
            etags.insert(number, part.e_tag().unwrap().to_owned());
        }
        (id, etags)
    };
    let complete = |key: &'static str, id: String, chosen: Vec<(i32, String)>| async move {
        let parts = chosen
            .into_iter()
            .map(|(number, etag)| {
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(number)
                    .e_tag(etag)
                    .build()
            })
            .collect();
        c.complete_multipart_upload()
            .bucket("orphans")
            .key(key)
            .upload_id(&id)
            .multipart_upload(
                aws_sdk_s3::types::CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .unwrap();
    };
    const TWO_PARTS: &[(i32, u64, usize)] = &[(1, 11, 5 << 20), (2, 12, 1 << 20)];
    let (before_completed, _) = fragment_counts(&s.cluster);
    let (id, etags) = upload("completed", TWO_PARTS).await;
    complete("completed", id, etags.into_iter().collect()).await;
    let two_parts = fragment_counts(&s.cluster).0 - before_completed;
    forge_uncommitted_look(&s.cluster, "orphans", "kept").await;
    let (before_deleted, _) = fragment_counts(&s.cluster);
    put("deleted", 3).await;
    let (committed, trash) = fragment_counts(&s.cluster);
    assert_eq!(trash, 0);
    let one_object = committed - before_deleted;
    assert!(one_object > 0);

    // What goes: an overwritten version, a deleted object, an aborted
    // upload, and a PUT whose client hung up after 9 of 12 MiB.
    put("over", 4).await;
    c.delete_object()
        .bucket("orphans")
        .key("deleted")
        .send()
        .await
        .unwrap();
    let (id, _) = upload("aborted", TWO_PARTS).await;
    // Part 1 sent twice, part 3 not chosen: only the second part 1 and
    // part 2 stay.
    let (id_redone, etags) = upload(
        "redone",
        &[
            (1, 20, 5 << 20),
            (1, 11, 5 << 20),
            (2, 12, 1 << 20),
            (3, 23, 1 << 20),
        ],
    )
    .await;
    let chosen = etags.into_iter().filter(|(n, _)| *n < 3).collect();
    complete("redone", id_redone, chosen).await;
    c.abort_multipart_upload()
        .bucket("orphans")
        .key("aborted")
        .upload_id(&id)
        .send()
        .await
        .unwrap();
    let uri = presigned_put(c, "orphans", "cut").await;
    hang_up_mid_put(
        s.gateway.address(),
        &uri,
        12 << 20,
        &pseudo_random_bytes(5, 9 << 20),
    )
    .await;
    let (_, stored_garbage) = {
        let (live, _) = fragment_counts(&s.cluster);
        (live, live - committed)
    };
    assert!(
        stored_garbage >= one_object,
        "the overwrite, the aborted part and the cut PUT stored fragments"
    );

    // Every fragment that no version uses reaches the trash once the
    // deadlines have passed; every committed one stays.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (live, trash) = fragment_counts(&s.cluster);
        if live == committed - one_object + two_parts
            && collector_work(&s.cluster, "orphans").await == 0
        {
            assert!(
                trash >= one_object * 2,
                "the old version and the deleted object: {trash}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "live {live} (want {}), trash {trash}, work {}",
            committed - one_object + two_parts,
            collector_work(&s.cluster, "orphans").await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(get_bytes(c, "orphans", "kept").await == pseudo_random_bytes(1, 1 << 20));
    assert!(get_bytes(c, "orphans", "over").await == pseudo_random_bytes(4, 1 << 20));
    let mut whole = pseudo_random_bytes(11, 5 << 20);
    whole.extend(pseudo_random_bytes(12, 1 << 20));
    assert!(get_bytes(c, "orphans", "completed").await == whole);
    assert!(get_bytes(c, "orphans", "redone").await == whole);
    // More passes change nothing.
    tokio::time::sleep(collection.every * 4).await;
    assert_eq!(
        fragment_counts(&s.cluster).0,
        committed - one_object + two_parts
    );
    drop(collectors);
    s.shutdown().await;
}

/// The key's head as the register holds it (spec/gateway.md, "Heads").
async fn head_of(cluster: &Cluster, bucket: &str, key: &str) -> Option<ObjectVersion> {
    let register = RegisterKey {
        partition: Partition::bucket(bucket),
        name: key.as_bytes().to_vec(),
    };
    let value = cluster
        .node(1)
        .metadata()
        .read_register(register)
        .await
        .unwrap();
    value.map(|bytes| ObjectVersion::decode(&bytes).unwrap())
}

/// A member cannot have a live object's fragments trashed on its word:
/// each node checks the collector's rule in the replicated metadata
/// before it releases anything, and refuses, whatever bucket and key the
/// request names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_of_a_live_objects_upload_is_refused_and_the_object_stays() {
    use cairn_node::pieces::PieceError;
    use cairn_node::swarm::NodeError;
    use cairn_protocol::wire::RejectCode;
    let s = setup_with(QUICK_COLLECTION).await;
    // The collectors install the release rule on every node.
    let _collectors = start_collectors(&s.cluster, QUICK_COLLECTION);
    s.client
        .create_bucket()
        .bucket("live")
        .send()
        .await
        .unwrap();
    let body = pseudo_random_bytes(41, 1 << 20);
    s.client
        .put_object()
        .bucket("live")
        .key("k")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    let head = head_of(&s.cluster, "live", "k").await.unwrap();
    let VersionBody::Data { manifest, .. } = head.body else {
        panic!("{head:?}");
    };
    let manifest =
        cairn_model::heads::read_manifest(s.cluster.node(0).metadata(), "live", &manifest)
            .await
            .unwrap()
            .unwrap();
    let before = fragment_counts(&s.cluster);
    let member = s.cluster.node(1);
    for target in 0..6 {
        let target = s.cluster.node(target).node_id();
        for (bucket, key) in [("live", "k"), ("live", "another"), ("elsewhere", "k")] {
            match member
                .release_upload(&target, manifest.upload, bucket, key)
                .await
            {
                Err(NodeError::Piece(PieceError::Rejected {
                    code: RejectCode::Unauthorized,
                    ..
                })) => {}
                other => {
                    panic!("a release of a live upload as {bucket}/{key} on {target}: {other:?}")
                }
            }
        }
    }
    assert_eq!(
        fragment_counts(&s.cluster),
        before,
        "fragments were trashed"
    );
    // Metadata is writable by any member: it forges a ripe intent record
    // of the upload under a key nobody uses, where the release rule finds
    // the upload released and unused. The fragments' holds name the key
    // they were written for, so nothing of the live object is trashed.
    let forged = cairn_protocol::records::UploadRecord {
        upload: manifest.upload,
        started_unix_ms: 0,
        multipart: false,
        scheme: manifest.layout.scheme,
        bucket_key_id: String::new(),
        wrapped_key: Vec::new(),
        headers: Default::default(),
    };
    let metadata = member.metadata();
    metadata
        .write(vec![(
            cairn_model::rows::upload_row("zzz", "x", &manifest.upload),
            cairn_model::rows::register(Some(forged.encode()), metadata.timestamp()),
        )])
        .await
        .unwrap();
    for target in 0..6 {
        let target = s.cluster.node(target).node_id();
        match member
            .release_upload(&target, manifest.upload, "zzz", "x")
            .await
        {
            Ok(released) => assert_eq!(
                released.trashed, 0,
                "a release under a forged key trashed a live object's fragments on {target}"
            ),
            Err(NodeError::Piece(PieceError::Rejected {
                code: RejectCode::Unauthorized,
                ..
            })) => {}
            Err(other) => panic!("a release under a forged key on {target}: {other}"),
        }
    }
    assert_eq!(
        fragment_counts(&s.cluster),
        before,
        "fragments were trashed"
    );
    assert_eq!(get_bytes(&s.client, "live", "k").await, body);
    s.shutdown().await;
}

/// The release rule checked on the metadata alone cannot protect what has
/// not committed yet, since any member can write metadata: a member forges
/// a ripe release row for a part of an open multipart upload, and a ripe
/// intent record for a single write still on its way. Neither loses a
/// byte: a node keeps a part that an open upload of the key names, and
/// any fragment stored more recently than the rule's grace (its own clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_cannot_have_an_open_uploads_parts_or_a_write_in_flight_trashed() {
    use cairn_model::collector::{Collection, ReleaseRule};
    use cairn_node::pieces::PieceError;
    use cairn_node::swarm::NodeError;
    use cairn_protocol::ids::{FragmentId, UploadId};
    use cairn_protocol::records::{ReleaseRecord, ReleaseTarget, UploadRecord};
    use cairn_protocol::wire::{Hold, ObjectKeyDigest, RejectCode};
    use std::sync::Arc;

    let s = setup().await;
    let install = |collection: Collection| {
        for n in 0..6 {
            s.cluster
                .node(n)
                .install_release_rules(Arc::new(ReleaseRule::new(collection)));
        }
    };
    let refused_or_nothing = |answer: Result<cairn_node::store::Released, NodeError>,
                              what: &str| match answer {
        Ok(released) => assert_eq!(released.trashed, 0, "{what}: trashed"),
        Err(NodeError::Piece(PieceError::Rejected {
            code: RejectCode::Unauthorized,
            ..
        })) => {}
        Err(other) => panic!("{what}: {other}"),
    };
    let member = s.cluster.node(1);
    let metadata = member.metadata();
    s.client
        .create_bucket()
        .bucket("open")
        .send()
        .await
        .unwrap();

    // A part of an open multipart upload, recorded and waiting for the
    // completion; the rule's grace is zero, so only the open upload
    // protects it.
    let upload = create_upload(&s.client, "open", "big").await;
    let body = pseudo_random_bytes(43, 1 << 20);
    let part = s
        .client
        .upload_part()
        .bucket("open")
        .key("big")
        .upload_id(&upload)
        .part_number(1)
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    let attempts = cairn_model::uploads::Uploads::new(metadata)
        .all_part_attempts("open", &UploadId::parse(&upload).unwrap())
        .await
        .unwrap();
    let attempt = attempts[0].record.upload;
    install(Collection {
        write_deadline: Duration::ZERO,
        clock_margin: Duration::ZERO,
        every: Duration::from_secs(3600),
    });
    let forged = ReleaseRecord {
        since_unix_ms: 0,
        target: ReleaseTarget::Upload(attempt),
    };
    metadata
        .write(vec![(
            cairn_protocol::meta::RowKey::new(
                Partition::bucket("open"),
                cairn_protocol::meta::Table::Releases,
                forged.target.sort_key("big"),
            ),
            cairn_model::rows::register(Some(forged.encode()), metadata.timestamp()),
        )])
        .await
        .unwrap();
    let before = fragment_counts(&s.cluster);
    for n in 0..6 {
        let target = s.cluster.node(n).node_id();
        refused_or_nothing(
            member.release_upload(&target, attempt, "open", "big").await,
            "a part of an open upload",
        );
    }
    assert_eq!(
        fragment_counts(&s.cluster),
        before,
        "part fragments trashed"
    );
    complete_upload(
        &s.client,
        "open",
        "big",
        &upload,
        &[(1, part.e_tag().unwrap())],
    )
    .await
    .unwrap();
    assert_eq!(get_bytes(&s.client, "open", "big").await, body);

    // A single write's fragment, just stored, whose intent record a
    // member makes look long abandoned.
    install(Collection {
        write_deadline: Duration::from_secs(600),
        clock_margin: Duration::from_secs(60),
        every: Duration::from_secs(3600),
    });
    let pending = UploadId([0x77; 16]);
    let bytes = pseudo_random_bytes(44, 50_000);
    let id = FragmentId::of(&bytes);
    let holder = s.cluster.node(2);
    let hold = Hold::sign(
        member.identity().signing_key(),
        &id,
        pending,
        ObjectKeyDigest::of("open", "pending"),
        0,
    );
    member
        .put_fragment(&holder.node_id(), id, &bytes, hold)
        .await
        .unwrap();
    let intent = UploadRecord {
        upload: pending,
        started_unix_ms: 0,
        multipart: false,
        scheme: Scheme::new(1, 2).unwrap(),
        bucket_key_id: String::new(),
        wrapped_key: Vec::new(),
        headers: Default::default(),
    };
    metadata
        .write(vec![(
            cairn_model::rows::upload_row("open", "pending", &pending),
            cairn_model::rows::register(Some(intent.encode()), metadata.timestamp()),
        )])
        .await
        .unwrap();
    refused_or_nothing(
        member
            .release_upload(&holder.node_id(), pending, "open", "pending")
            .await,
        "a fragment stored within the grace",
    );
    assert_eq!(
        holder.store().entry(&id).unwrap().map(|e| e.state),
        Some(cairn_node::store::FragmentState::Live)
    );
    s.shutdown().await;
}

/// Writes are ordered by each key's head register, whatever the gateways'
/// clocks say: PUTs and DELETEs race from three gateways whose clocks
/// disagree by half a minute either way, and afterwards every gateway's
/// GET and the listing show exactly what each head names, which is an
/// acknowledged PUT that reads back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_puts_and_deletes_from_skewed_gateways_follow_the_head() {
    let seed = cairn_tests::test_seed("racing heads");
    let cluster = Cluster::start(&[2, 2, 2]).await.unwrap();
    cluster
        .install_map(cluster.map(), Scheme::new(4, 2).unwrap())
        .await
        .unwrap();
    let root = random_secret();
    let mut gateways = Vec::new();
    for (node, skew_ms) in [(0, 0), (2, 30_000), (4, -30_000)] {
        let config = GatewayConfig {
            clock_skew_ms: skew_ms,
            ..GatewayConfig::default()
        };
        gateways.push(
            Gateway::start(
                cluster.node(node).handle(),
                RootKey::from_bytes(root),
                config,
            )
            .await
            .unwrap(),
        );
    }
    let access = gateways[0].keys().create("race").await.unwrap();
    let clients: Vec<Client> = gateways
        .iter()
        .map(|g| client_for(g, &access.id, &access.secret))
        .collect();
    clients[0]
        .create_bucket()
        .bucket("race")
        .send()
        .await
        .unwrap();
    const KEYS: [&str; 3] = ["a", "b", "c"];
    let writers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(writer, client)| {
            let client = client.clone();
            let mut rng = Rng(seed.wrapping_add(writer as u64).wrapping_mul(0x9e37_79b9) | 1);
            tokio::spawn(async move {
                let mut acknowledged: Vec<(&str, String, Vec<u8>)> = Vec::new();
                for _ in 0..16 {
                    let key = KEYS[rng.below(KEYS.len())];
                    if rng.below(4) == 0 {
                        client
                            .delete_object()
                            .bucket("race")
                            .key(key)
                            .send()
                            .await
                            .unwrap();
                        continue;
                    }
                    // Mostly small objects, sometimes 1-8 MiB ones.
                    let size = if rng.below(6) == 0 {
                        (1 << 20) + rng.below(7 << 20)
                    } else {
                        1 + rng.below(300 << 10)
                    };
                    let body = pseudo_random_bytes(rng.next_u64(), size);
                    let put = client
                        .put_object()
                        .bucket("race")
                        .key(key)
                        .body(ByteStream::from(body.clone()))
                        .send()
                        .await
                        .unwrap();
                    acknowledged.push((key, put.e_tag().unwrap().to_owned(), body));
                }
                acknowledged
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    // And in plain sequence, from the fastest clock to the slowest: each
    // later write carries an older version id.
    for (order, writer) in [1, 0, 2].into_iter().enumerate() {
        let body = pseudo_random_bytes(seed ^ order as u64, 1000 + order);
        let put = clients[writer]
            .put_object()
            .bucket("race")
            .key("d")
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap();
        acknowledged.push(("d", put.e_tag().unwrap().to_owned(), body));
    }
    let mut listed_as_heads = Vec::new();
    for key in KEYS.into_iter().chain(["d"]) {
        let head = head_of(&cluster, "race", key).await;
        let expected = match head.as_ref().map(|h| &h.body) {
            Some(VersionBody::Data { etag, .. }) if head.as_ref().unwrap().purged.is_none() => {
                let body = acknowledged
                    .iter()
                    .find(|(k, e, _)| *k == key && e == etag)
                    .map(|(_, _, body)| body)
                    .unwrap_or_else(|| {
                        panic!("{key}: the head names no acknowledged PUT (seed {seed})")
                    });
                listed_as_heads.push((key.to_owned(), etag.clone()));
                Some((etag.clone(), body))
            }
            _ => None,
        };
        for (index, client) in clients.iter().enumerate() {
            let got = client.get_object().bucket("race").key(key).send().await;
            match (&expected, got) {
                (Some((etag, body)), Ok(object)) => {
                    assert_eq!(
                        object.e_tag(),
                        Some(etag.as_str()),
                        "{key} through gateway {index}: not the head's object (seed {seed})"
                    );
                    let read = object.body.collect().await.unwrap().into_bytes();
                    assert!(read == body.as_slice(), "{key}: wrong bytes (seed {seed})");
                }
                (None, Err(error)) => assert_eq!(code(&error.into_service_error()), "NoSuchKey"),
                (Some(_), Err(error)) => {
                    panic!(
                        "{key} through gateway {index}: {error:?}, but the head names an object (seed {seed})"
                    )
                }
                (None, Ok(object)) => panic!(
                    "{key} through gateway {index}: {:?} although its head says deleted (seed {seed})",
                    object.e_tag()
                ),
            }
        }
    }
    let listed = clients[1]
        .list_objects_v2()
        .bucket("race")
        .send()
        .await
        .unwrap();
    let listed: Vec<(String, String)> = listed
        .contents()
        .iter()
        .map(|o| (o.key().unwrap().to_owned(), o.e_tag().unwrap().to_owned()))
        .collect();
    assert_eq!(
        listed, listed_as_heads,
        "the listing disagrees with the heads (seed {seed})"
    );
    for gateway in gateways {
        gateway.stop().await;
    }
    cluster.shutdown().await;
}

/// DeleteObject and DeleteObjects with If-Match (and size or time)
/// delete only the object they name, decided by the head's
/// compare-and-set; a key with no object is a success that changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_deletes_delete_only_the_object_they_name() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("cond").send().await.unwrap();
    put_bytes(c, "cond", "kept", b"first").await;
    let etag = c
        .head_object()
        .bucket("cond")
        .key("kept")
        .send()
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .to_owned();
    let wrong = c
        .delete_object()
        .bucket("cond")
        .key("kept")
        .if_match("\"0123456789abcdef0123456789abcdef\"")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&wrong.into_service_error()), "PreconditionFailed");
    let wrong_size = c
        .delete_object()
        .bucket("cond")
        .key("kept")
        .if_match_size(4)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&wrong_size.into_service_error()), "PreconditionFailed");
    assert_eq!(get_bytes(c, "cond", "kept").await, b"first");
    c.delete_object()
        .bucket("cond")
        .key("kept")
        .if_match(&etag)
        .if_match_size(5)
        .send()
        .await
        .unwrap();
    let gone = c
        .get_object()
        .bucket("cond")
        .key("kept")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&gone.into_service_error()), "NoSuchKey");
    // Nothing there: a success that writes nothing.
    c.delete_object()
        .bucket("cond")
        .key("kept")
        .if_match(&etag)
        .send()
        .await
        .unwrap();
    assert!(
        head_of(&s.cluster, "cond", "kept")
            .await
            .unwrap()
            .purged
            .is_some()
    );
    // Per object in DeleteObjects.
    put_bytes(c, "cond", "x", b"x-body").await;
    put_bytes(c, "cond", "y", b"y-body").await;
    let x_etag = c
        .head_object()
        .bucket("cond")
        .key("x")
        .send()
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .to_owned();
    let entry = |key: &str, etag: &str| {
        aws_sdk_s3::types::ObjectIdentifier::builder()
            .key(key)
            .e_tag(etag)
            .build()
            .unwrap()
    };
    let answer = c
        .delete_objects()
        .bucket("cond")
        .delete(
            aws_sdk_s3::types::Delete::builder()
                .objects(entry("x", &x_etag))
                .objects(entry("y", "\"0123456789abcdef0123456789abcdef\""))
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(answer.deleted().len(), 1);
    assert_eq!(answer.deleted()[0].key(), Some("x"));
    assert_eq!(answer.errors().len(), 1);
    assert_eq!(answer.errors()[0].key(), Some("y"));
    assert_eq!(answer.errors()[0].code(), Some("PreconditionFailed"));
    assert_eq!(get_bytes(c, "cond", "y").await, b"y-body");
    s.shutdown().await;
}

/// A CompleteMultipartUpload retried after it succeeded (a client whose
/// first answer was lost) gets the same success and ETag.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_completion_answers_like_the_first() {
    let s = setup().await;
    let c = &s.client;
    c.create_bucket().bucket("retry").send().await.unwrap();
    let upload = c
        .create_multipart_upload()
        .bucket("retry")
        .key("big")
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap();
    let body = pseudo_random_bytes(12, 1 << 20);
    let part = c
        .upload_part()
        .bucket("retry")
        .key("big")
        .upload_id(upload_id)
        .part_number(1)
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    let parts = aws_sdk_s3::types::CompletedMultipartUpload::builder()
        .parts(
            aws_sdk_s3::types::CompletedPart::builder()
                .part_number(1)
                .e_tag(part.e_tag().unwrap())
                .build(),
        )
        .build();
    let complete = || {
        c.complete_multipart_upload()
            .bucket("retry")
            .key("big")
            .upload_id(upload_id)
            .multipart_upload(parts.clone())
            .send()
    };
    let first = complete().await.unwrap();
    let again = complete().await.unwrap();
    assert_eq!(first.e_tag(), again.e_tag());
    assert_eq!(get_bytes(c, "retry", "big").await, body);
    // Another upload of the key replaces it: the old id is then unknown.
    put_bytes(c, "retry", "big", b"newer").await;
    let late = complete().await.unwrap_err();
    assert_eq!(code(&late.into_service_error()), "NoSuchUpload");
    s.shutdown().await;
}

/// A member cannot bring a deleted object's fragments back from the trash
/// on its word (they would stay live with nothing to release them): each
/// node checks that a version that exists uses the upload, and refuses,
/// whatever bucket and key the request names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_of_an_upload_no_version_uses_is_refused_and_the_trash_stays() {
    use cairn_node::pieces::PieceError;
    use cairn_node::swarm::NodeError;
    use cairn_protocol::wire::RejectCode;
    let s = setup_with(QUICK_COLLECTION).await;
    let _collectors = start_collectors(&s.cluster, QUICK_COLLECTION);
    let c = &s.client;
    c.create_bucket().bucket("gone").send().await.unwrap();
    c.put_object()
        .bucket("gone")
        .key("k")
        .body(ByteStream::from(pseudo_random_bytes(42, 1 << 20)))
        .send()
        .await
        .unwrap();
    let head = head_of(&s.cluster, "gone", "k").await.unwrap();
    let VersionBody::Data { manifest, .. } = head.body else {
        panic!("{head:?}");
    };
    let manifest =
        cairn_model::heads::read_manifest(s.cluster.node(0).metadata(), "gone", &manifest)
            .await
            .unwrap()
            .unwrap();
    c.delete_object()
        .bucket("gone")
        .key("k")
        .send()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let trashed = loop {
        let (live, trash) = fragment_counts(&s.cluster);
        if live == 0 && trash > 0 && collector_work(&s.cluster, "gone").await == 0 {
            break trash;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "live {live}, trash {trash}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let member = s.cluster.node(1);
    for target in 0..6 {
        let target = s.cluster.node(target).node_id();
        for (bucket, key) in [("gone", "k"), ("gone", "another"), ("elsewhere", "k")] {
            match member
                .restore_upload(&target, manifest.upload, bucket, key)
                .await
            {
                Err(NodeError::Piece(PieceError::Rejected {
                    code: RejectCode::Unauthorized,
                    ..
                })) => {}
                other => {
                    panic!("a restore of a deleted upload as {bucket}/{key} on {target}: {other:?}")
                }
            }
        }
    }
    assert_eq!(fragment_counts(&s.cluster), (0, trashed));
    s.shutdown().await;
}
