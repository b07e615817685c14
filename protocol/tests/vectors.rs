//! The test vectors of spec/vectors/: each file is recomputed from its
//! inputs and compared byte for byte, and its stored bytes are decoded back.
//! `CAIRN_WRITE_VECTORS=1 cargo test -p cairn-protocol --test vectors`
//! rewrites them after a deliberate format change.

use std::path::PathBuf;

use bytes::Bytes;
use cairn_protocol::dht::{StoredProvider, StoredRecord, upload_provider_key};
use cairn_protocol::ed25519_dalek::SigningKey;
use cairn_protocol::encryption::{
    ChunkSize, SecretKey, StreamDecryptor, StreamEncryptor, part_stream_key,
};
use cairn_protocol::erasure::{Scheme, SegmentEncoder, SegmentLayout, reconstruct};
use cairn_protocol::hlc::{Hlc, Timestamp};
use cairn_protocol::ids::{FragmentId, ManifestId, NodeId, SiteId, UploadId, VersionId};
use cairn_protocol::keywrap::{WrapContext, unwrap_data_key, wrap_data_key};
use cairn_protocol::manifest::{
    KeyEnvelope, KeyKind, Manifest, Part, PartKeys, SegmentRef, SignedManifest,
};
use cairn_protocol::membership::{Certificate, ClusterId, SignedMap};
use cairn_protocol::placement::{
    ClusterMap, MapNode, NodeState, Placer, Tolerance, segment_placement_key,
};
use cairn_protocol::version::{
    Lww, ObjectVersion, Retention, RetentionMode, StoredHeaders, VersionBody,
};
use cairn_protocol::wire::{self, FrameDecoder, Hold, Message, RejectCode};
use cairn_protocol::{from_hex, to_hex};
use serde_json::{Value, json};

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../spec/vectors")
        .join(name)
}

/// Compares `computed` with the stored file (or writes it) and returns the
/// stored vectors for decoding checks.
fn check(name: &str, computed: Value) -> Value {
    let file = path(name);
    if std::env::var_os("CAIRN_WRITE_VECTORS").is_some() {
        std::fs::write(
            &file,
            serde_json::to_string_pretty(&computed).unwrap() + "\n",
        )
        .unwrap();
    }
    let stored: Value = serde_json::from_str(
        &std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())),
    )
    .unwrap();
    assert_eq!(
        stored, computed,
        "{name} differs from what this code computes"
    );
    stored
}

fn hex_bytes(v: &Value) -> Vec<u8> {
    let text = v.as_str().expect("hex string");
    (0..text.len() / 2)
        .map(|i| from_hex::<1>(&text[2 * i..2 * i + 2]).expect("hex")[0])
        .collect()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(167).wrapping_add(seed))
        .collect()
}

#[test]
fn identifiers() {
    let fragments: Vec<Value> = [&b""[..], b"abc", &pattern(1025, 1)]
        .iter()
        .map(|bytes| json!({ "bytes": to_hex(bytes), "fragment_id": FragmentId::of(bytes).to_hex() }))
        .collect();
    let versions: Vec<Value> = [(0u64, [0u8; 10]), (1_764_000_000_000, [0xab; 10]), (u64::MAX, [0xff; 10])]
        .iter()
        .map(|(ms, random)| json!({ "unix_ms": ms, "random": to_hex(random), "text": VersionId::new(*ms, *random).to_text() }))
        .collect();
    let stored = check(
        "ids.json",
        json!({ "fragments": fragments, "versions": versions }),
    );
    for v in stored["fragments"].as_array().unwrap() {
        let id = FragmentId::from_hex(v["fragment_id"].as_str().unwrap()).unwrap();
        assert_eq!(FragmentId::of(&hex_bytes(&v["bytes"])), id);
    }
    // BLAKE3 of the empty input, as published with the BLAKE3 reference.
    assert_eq!(
        stored["fragments"][0]["fragment_id"],
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    );
}

fn encrypt(key: &[u8; 32], stream_id: u32, chunk: ChunkSize, plaintext: &[u8]) -> Vec<u8> {
    let mut enc = StreamEncryptor::new(&SecretKey::from_bytes(*key), stream_id, chunk);
    let mut out = Vec::new();
    enc.update(plaintext, &mut out).unwrap();
    enc.finish(&mut out).unwrap();
    out
}

#[test]
fn stream_encryption() {
    let chunk = ChunkSize::new(4096).unwrap();
    let cases: Vec<Value> = [(0usize, 0u32), (5, 0), (4096, 1), (4097, 7)]
        .iter()
        .map(|&(len, stream_id)| {
            let key = [0x42u8; 32];
            let plaintext = pattern(len, 3);
            json!({
                "key": to_hex(&key), "stream_id": stream_id, "chunk_size": 4096,
                "plaintext": to_hex(&plaintext),
                "ciphertext": to_hex(&encrypt(&key, stream_id, chunk, &plaintext)),
            })
        })
        .collect();
    let (data_key, attempt) = (SecretKey::from_bytes([0x42; 32]), UploadId([0x31; 16]));
    let part_key = json!({
        "data_key": to_hex(data_key.as_bytes()),
        "attempt": to_hex(attempt.as_bytes()),
        "part_stream_key": to_hex(part_stream_key(&data_key, &attempt).as_bytes()),
    });
    let stored = check(
        "stream.json",
        json!({ "cases": cases, "part_stream_key": part_key }),
    );
    let part_key = &stored["part_stream_key"];
    assert_eq!(
        part_stream_key(
            &SecretKey::from_bytes(hex_bytes(&part_key["data_key"]).try_into().unwrap()),
            &UploadId(hex_bytes(&part_key["attempt"]).try_into().unwrap()),
        )
        .as_bytes()
        .to_vec(),
        hex_bytes(&part_key["part_stream_key"])
    );
    for case in stored["cases"].as_array().unwrap() {
        let key: [u8; 32] = hex_bytes(&case["key"]).try_into().unwrap();
        let mut dec = StreamDecryptor::new(
            &SecretKey::from_bytes(key),
            case["stream_id"].as_u64().unwrap() as u32,
            chunk,
        );
        let mut out = Vec::new();
        dec.update(&hex_bytes(&case["ciphertext"]), &mut out)
            .unwrap();
        dec.finish(&mut out).unwrap();
        assert_eq!(out, hex_bytes(&case["plaintext"]));
    }
}

#[test]
fn key_wrapping() {
    let kek = SecretKey::from_bytes([0x11; 32]);
    let dek = SecretKey::from_bytes([0x22; 32]);
    let context = WrapContext {
        bucket: "photos",
        key: "2026/cat.jpg",
        version: VersionId::new(1_764_000_000_000, [0xab; 10]),
    };
    let wrapped = wrap_data_key(&kek, &dek, &context, [0x33; 24]);
    let stored = check(
        "keywrap.json",
        json!({
            "kek": to_hex(kek.as_bytes()), "data_key": to_hex(dek.as_bytes()), "salt": to_hex(&[0x33; 24]),
            "bucket": context.bucket, "key": context.key, "version": context.version.to_text(),
            "wrapped": to_hex(&wrapped),
        }),
    );
    let back = unwrap_data_key(&kek, &hex_bytes(&stored["wrapped"]), &context).unwrap();
    assert_eq!(back.as_bytes(), dek.as_bytes());
}

#[test]
fn gateway_records_and_labelled_keys() {
    use cairn_protocol::keywrap::{unwrap_labelled_key, wrap_labelled_key};
    use cairn_protocol::records::{
        AccessKeyRecord, BucketRecord, BucketSettings, DefaultRetention, DegradedRecord,
        Expiration, KmsKeyRecord, LifecycleConfiguration, LifecycleRule, NoncurrentExpiration,
        PartRecord, ReleaseRecord, ReleaseTarget, RetentionPeriod, UploadRecord, Versioning,
    };
    let root = SecretKey::from_bytes([0x44; 32]);
    let key = SecretKey::from_bytes([0x55; 32]);
    let label = "kms/bucket/photos/0011223344556677";
    let wrapped = wrap_labelled_key(&root, &key, label, [0x66; 24]);
    let bucket = BucketRecord {
        created_unix_ms: 1_764_000_000_000,
        owner: "CKABCDEFGHIJKLMNOPQR".into(),
        bucket_key_id: "bucket/photos/0011223344556677".into(),
    };
    let settings = [
        BucketSettings {
            generation: "bucket/photos/0011223344556677".into(),
            claimed_unix_ms: 1_764_000_000_000,
            versioning: Versioning::Suspended,
            object_lock: false,
            default_retention: None,
        },
        BucketSettings {
            generation: "bucket/photos/0011223344556677".into(),
            claimed_unix_ms: 1_764_000_000_000,
            versioning: Versioning::Enabled,
            object_lock: true,
            default_retention: Some(DefaultRetention {
                mode: RetentionMode::Compliance,
                period: RetentionPeriod::Years(7),
            }),
        },
    ];
    let lifecycle = LifecycleConfiguration {
        generation: "bucket/photos/0011223344556677".into(),
        rules: vec![
            LifecycleRule {
                id: "logs".into(),
                enabled: true,
                prefix: "logs/".into(),
                size_greater_than: Some(1024),
                size_less_than: None,
                expiration: Some(Expiration::Days(30)),
                noncurrent: Some(NoncurrentExpiration {
                    days: 7,
                    newer_versions: 2,
                }),
                abort_incomplete_days: Some(3),
            },
            LifecycleRule {
                id: "markers".into(),
                enabled: false,
                prefix: String::new(),
                size_greater_than: None,
                size_less_than: None,
                expiration: Some(Expiration::ExpiredDeleteMarkers),
                noncurrent: None,
                abort_incomplete_days: None,
            },
            LifecycleRule {
                id: "dated".into(),
                enabled: true,
                prefix: "tmp/".into(),
                size_greater_than: None,
                size_less_than: Some(1 << 20),
                expiration: Some(Expiration::Date(1_893_456_000_000)),
                noncurrent: None,
                abort_incomplete_days: None,
            },
        ],
    };
    let access = AccessKeyRecord {
        created_unix_ms: 1_764_000_000_001,
        name: "backup job".into(),
        wrapped_secret: wrapped.to_vec(),
        permissions: Some(cairn_protocol::records::permission::BYPASS_GOVERNANCE),
    };
    let kms = KmsKeyRecord {
        created_unix_ms: 1_764_000_000_002,
        wrapped_key: wrapped.to_vec(),
    };
    let upload = UploadRecord {
        upload: UploadId([0x77; 16]),
        started_unix_ms: 1_764_000_000_003,
        multipart: true,
        scheme: Scheme::new(4, 2).unwrap(),
        bucket_key_id: "bucket/photos/0011223344556677".into(),
        wrapped_key: wrapped.to_vec(),
        headers: StoredHeaders::new(vec![("content-type".into(), "video/mp4".into())]).unwrap(),
    };
    let part = PartRecord {
        part_keys: PartKeys::PerAttempt,
        upload: UploadId([0x79; 16]),
        uploaded_unix_ms: 1_764_000_000_004,
        plaintext_len: 10,
        etag: "\"9e107d9d372bb6826bd81d3542a419d6\"".into(),
        checksum: Some(("CRC32C".into(), "yZRlqg==".into())),
        scheme: Scheme::new(2, 1).unwrap(),
        segments: vec![SegmentRef {
            ciphertext_len: 26,
            fragments: (0..3u8).map(|i| FragmentId([0x80 + i; 32])).collect(),
        }],
    };
    let release_upload = ReleaseRecord {
        since_unix_ms: 1_764_000_000_005,
        target: ReleaseTarget::Upload(UploadId([0x77; 16])),
    };
    let release_manifest = ReleaseRecord {
        since_unix_ms: 1_764_000_000_006,
        target: ReleaseTarget::Manifest(ManifestId([0x78; 32])),
    };
    let degraded = DegradedRecord {
        since_unix_ms: 1_764_000_000_007,
        fragments: (0..3u8).map(|i| FragmentId([0x90 + i; 32])).collect(),
        missing: vec![2],
    };
    let stored = check(
        "gateway.json",
        json!({
            "labelled_key": {
                "kek": to_hex(root.as_bytes()), "key": to_hex(key.as_bytes()),
                "salt": to_hex(&[0x66; 24]), "label": label, "wrapped": to_hex(&wrapped),
            },
            "bucket_record": to_hex(&bucket.encode()),
            "bucket_settings": settings.iter().map(|s| to_hex(&s.encode())).collect::<Vec<_>>(),
            "lifecycle_configuration": to_hex(&lifecycle.encode()),
            "access_key_record": to_hex(&access.encode()),
            "kms_key_record": to_hex(&kms.encode()),
            "upload_record": to_hex(&upload.encode()),
            "part_record": to_hex(&part.encode()),
            "release_records": [to_hex(&release_upload.encode()), to_hex(&release_manifest.encode())],
            "degraded_record": to_hex(&degraded.encode()),
        }),
    );
    assert_eq!(
        DegradedRecord::decode(&hex_bytes(&stored["degraded_record"])),
        Ok(degraded)
    );
    for (stored, record) in stored["release_records"]
        .as_array()
        .unwrap()
        .iter()
        .zip([release_upload, release_manifest])
    {
        assert_eq!(ReleaseRecord::decode(&hex_bytes(stored)), Ok(record));
    }
    let back = unwrap_labelled_key(&root, &hex_bytes(&stored["labelled_key"]["wrapped"]), label);
    assert_eq!(back.unwrap().as_bytes(), key.as_bytes());
    assert_eq!(
        BucketRecord::decode(&hex_bytes(&stored["bucket_record"])),
        Ok(bucket)
    );
    assert_eq!(
        LifecycleConfiguration::decode(&hex_bytes(&stored["lifecycle_configuration"])),
        Ok(lifecycle)
    );
    for (stored, settings) in stored["bucket_settings"]
        .as_array()
        .unwrap()
        .iter()
        .zip(settings)
    {
        assert_eq!(BucketSettings::decode(&hex_bytes(stored)), Ok(settings));
    }
    assert_eq!(
        AccessKeyRecord::decode(&hex_bytes(&stored["access_key_record"])),
        Ok(access)
    );
    assert_eq!(
        KmsKeyRecord::decode(&hex_bytes(&stored["kms_key_record"])),
        Ok(kms)
    );
    assert_eq!(
        UploadRecord::decode(&hex_bytes(&stored["upload_record"])),
        Ok(upload)
    );
}

#[test]
fn erasure_coding() {
    let cases: Vec<Value> = [(4u8, 2u8, 100usize), (1, 2, 10), (3, 3, 1)]
        .iter()
        .map(|&(k, m, len)| {
            let segment = pattern(len, k);
            let encoded = SegmentEncoder::new(Scheme::new(k, m).unwrap()).encode(segment.clone()).unwrap();
            let fragments: Vec<String> = (0..usize::from(k + m)).map(|i| to_hex(encoded.fragment(i))).collect();
            let ids: Vec<String> = encoded.fragment_ids().iter().map(FragmentId::to_hex).collect();
            json!({ "k": k, "m": m, "segment": to_hex(&segment), "fragments": fragments, "fragment_ids": ids })
        })
        .collect();
    let stored = check("erasure.json", json!({ "cases": cases }));
    for case in stored["cases"].as_array().unwrap() {
        let scheme = Scheme::new(
            case["k"].as_u64().unwrap() as u8,
            case["m"].as_u64().unwrap() as u8,
        )
        .unwrap();
        let fragments: Vec<Vec<u8>> = case["fragments"]
            .as_array()
            .unwrap()
            .iter()
            .map(hex_bytes)
            .collect();
        // Rebuild from the last k fragments: parity first where there is any.
        let chosen: Vec<(usize, &[u8])> = (scheme.total() - scheme.data()..scheme.total())
            .map(|i| (i, fragments[i].as_slice()))
            .collect();
        let segment = hex_bytes(&case["segment"]);
        assert_eq!(
            reconstruct(scheme, segment.len(), &chosen).unwrap(),
            segment
        );
    }
}

fn vector_manifest(key: &SigningKey) -> Manifest {
    let scheme = Scheme::new(2, 1).unwrap();
    let layout = SegmentLayout::new(scheme, ChunkSize::new(4096).unwrap(), 16).unwrap();
    let part = |number: u32, plaintext_len: u64| Part {
        number,
        upload: UploadId([0x30 + number as u8; 16]),
        plaintext_len,
        segments: layout
            .segment_lens(plaintext_len)
            .unwrap()
            .enumerate()
            .map(|(s, len)| SegmentRef {
                ciphertext_len: len as u32,
                fragments: (0..3)
                    .map(|f| FragmentId([(number as u8) << 4 | (s * 3 + f) as u8; 32]))
                    .collect(),
            })
            .collect(),
    };
    Manifest {
        part_keys: PartKeys::PerAttempt,
        writer: NodeId::from_verifying_key(&key.verifying_key()),
        created_unix_ms: 1_764_000_000_000,
        bucket: "photos".into(),
        key: "2026/cat.jpg".into(),
        version: VersionId::new(1_764_000_000_000, [0xab; 10]),
        upload: UploadId([0xcd; 16]),
        layout,
        encryption: KeyEnvelope {
            kind: KeyKind::SseKms,
            key_id: "arn:aws:kms:local:key/1".into(),
            wrapped: vec![0x5a; 73],
        },
        etag: "\"9b2cf535f27731c974343645a3985328-2\"".into(),
        parts: vec![part(1, 16 * 4096 + 1), part(2, 10)],
    }
}

#[test]
fn manifests() {
    let key = SigningKey::from_bytes(&[0x07; 32]);
    let signed = vector_manifest(&key).sign(&key).unwrap();
    let stored = check(
        "manifest.json",
        json!({
            "writer_secret_key": to_hex(&[0x07; 32]),
            "encoded": to_hex(&signed.encoded),
            "manifest_id": signed.id.to_hex(),
        }),
    );
    let decoded = SignedManifest::decode(&hex_bytes(&stored["encoded"])).unwrap();
    assert_eq!(
        decoded.id,
        ManifestId::from_hex(stored["manifest_id"].as_str().unwrap()).unwrap()
    );
    assert_eq!(decoded.manifest, vector_manifest(&key));
}

fn vector_map() -> ClusterMap {
    let nodes = (0..9u8)
        .map(|i| MapNode {
            id: NodeId(*blake3::hash(&[i]).as_bytes()),
            site: SiteId::new(&format!("site-{}", i / 3)).unwrap(),
            capacity_bytes: (1 + u64::from(i % 3)) << 40,
            state: NodeState::Up,
            since: 1,
        })
        .collect();
    ClusterMap { version: 1, nodes }
}

#[test]
fn placement() {
    let map = vector_map();
    let placer = Placer::new(&map, Scheme::new(4, 2).unwrap(), Tolerance::default()).unwrap();
    let placements: Vec<Value> = (0..8u8)
        .map(|i| {
            let key = *blake3::hash(&[b'k', i]).as_bytes();
            let nodes: Vec<String> = placer.place(&key).iter().map(NodeId::to_hex).collect();
            json!({ "key": to_hex(&key), "nodes": nodes })
        })
        .collect();
    let nodes: Vec<Value> = map
        .nodes
        .iter()
        .map(|n| json!({ "id": n.id.to_hex(), "site": n.site.as_str(), "capacity_bytes": n.capacity_bytes }))
        .collect();
    let segment: Vec<FragmentId> = (0..6u8).map(|i| FragmentId([i; 32])).collect();
    let stored = check(
        "placement.json",
        json!({
            "scheme": "4+2",
            "extra_nodes": 0,
            "nodes": nodes,
            "placements": placements,
            "segment_fragments": segment.iter().map(FragmentId::to_hex).collect::<Vec<_>>(),
            "segment_placement_key": to_hex(&segment_placement_key(&segment)),
        }),
    );
    for p in stored["placements"].as_array().unwrap() {
        let key: [u8; 32] = hex_bytes(&p["key"]).try_into().unwrap();
        let want: Vec<NodeId> = p["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| NodeId::from_hex(n.as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(placer.place(&key), want);
    }
}

fn vector_messages() -> Vec<(&'static str, Message)> {
    let key = SigningKey::from_bytes(&[0x09; 32]);
    let id = FragmentId::of(b"fragment");
    vec![
        (
            "hello",
            Message::Hello {
                version: 1,
                capabilities: wire::capability::RANGE_GET | wire::capability::INVENTORY,
                max_frame_bytes: wire::MAX_FRAME_BYTES as u32,
            },
        ),
        (
            "put_fragment",
            Message::PutFragment {
                id,
                length: 8,
                hold: Hold::sign(
                    &key,
                    &id,
                    UploadId([0x0d; 16]),
                    cairn_protocol::wire::ObjectKeyDigest::of("photos", "2026/cat.jpg"),
                    1_900_000_000_000,
                ),
            },
        ),
        ("data", Message::Data(Bytes::from_static(b"fragment"))),
        ("ack", Message::Ack { id }),
        (
            "reject",
            Message::Reject {
                code: RejectCode::HashMismatch,
                message: "fragment bytes do not hash to its id".into(),
            },
        ),
        (
            "get_fragment",
            Message::GetFragment {
                id,
                offset: 0,
                length: wire::WHOLE,
            },
        ),
        (
            "fragment_header",
            Message::FragmentHeader {
                id,
                total_len: 8,
                offset: 2,
                length: 4,
            },
        ),
        (
            "have_query",
            Message::HaveQuery {
                ids: vec![id, FragmentId([0; 32])],
            },
        ),
        (
            "have_reply",
            Message::HaveReply {
                count: 2,
                bitmap: vec![0b1000_0000],
            },
        ),
        (
            "inventory_query",
            Message::InventoryQuery {
                start: FragmentId([0; 32]),
                end: FragmentId([0xff; 32]),
            },
        ),
        (
            "inventory_digest",
            Message::InventoryDigest {
                start: FragmentId([0; 32]),
                end: FragmentId([0xff; 32]),
                count: 1,
                digest: *blake3::hash(id.as_bytes()).as_bytes(),
            },
        ),
        (
            "inventory_list",
            Message::InventoryList {
                start: FragmentId([0; 32]),
                end: FragmentId([0xff; 32]),
                limit: 1024,
            },
        ),
        (
            "inventory_page",
            Message::InventoryPage {
                ids: vec![id],
                more: false,
            },
        ),
        ("cancel", Message::Cancel),
        (
            "release",
            Message::Release {
                upload: UploadId([0x4d; 16]),
                bucket: "photos".into(),
                key: "2026/cat.jpg".into(),
            },
        ),
        (
            "released",
            Message::Released {
                trashed: 12,
                held: 1,
            },
        ),
        ("status_query", Message::StatusQuery { store: true }),
        (
            "status_reply",
            Message::StatusReply(Box::new(cairn_protocol::status::NodeStatus {
                store: cairn_protocol::status::StoreStatus {
                    capacity_bytes: 1 << 40,
                    used_bytes: 3 << 30,
                    live_bytes: 2 << 30,
                    live: 2048,
                    trash: 3,
                    quarantined: 1,
                    trash_period_ms: 7 * 24 * 3600 * 1000,
                    release_grace_ms: 7 * 3600 * 1000,
                },
                scrub: cairn_protocol::status::ScrubStatus {
                    passes: 2,
                    last_finished_unix_ms: 1_764_000_000_000,
                    pass_started_unix_ms: 0,
                    pass_checked: 0,
                    pass_bytes: 0,
                    corrupt_found: 1,
                },
                repair: cairn_protocol::status::RepairSummary {
                    passes: 7,
                    last_finished_unix_ms: 1_764_000_100_000,
                    pass_progress_unix_ms: 1_764_000_700_000,
                    partitions: 3,
                    segments: 500,
                    whole: 497,
                    degraded_by_spares: [(0, 1), (1, 2)].into(),
                    unreadable: 0,
                    pending: 1,
                    rebuilt: 9,
                    copied: 4,
                    bytes_read: 37 << 20,
                    bytes_written: 13 << 20,
                },
                lifecycle: cairn_protocol::status::LifecycleSummary {
                    passes: 12,
                    last_finished_unix_ms: 1_764_000_800_000,
                    buckets: 2,
                    expired: 40,
                    noncurrent_expired: 30,
                    markers_removed: 5,
                    uploads_aborted: 3,
                    kept_by_lock: 1,
                    failed: 0,
                },
            })),
        ),
        (
            "restore",
            Message::Restore {
                upload: UploadId([0x4d; 16]),
                bucket: "photos".into(),
                key: "2026/cat.jpg".into(),
            },
        ),
        ("restored", Message::Restored { restored: 12 }),
        (
            "drop_copy",
            Message::DropCopy {
                fragment: id,
                bucket: "photos".into(),
                key: "2026/cat.jpg".into(),
                version: cairn_protocol::ids::VersionId([0x5e; 16]),
                keeper: cairn_protocol::ids::NodeId([0x6b; 32]),
            },
        ),
        ("dropped", Message::Dropped),
        (
            "keep_check",
            Message::KeepCheck {
                fragment: id,
                bucket: "photos".into(),
                key: "2026/cat.jpg".into(),
                version: cairn_protocol::ids::VersionId([0x5e; 16]),
                upload: UploadId([0x4d; 16]),
            },
        ),
        (
            "get_any",
            Message::GetAny {
                ids: vec![id, FragmentId([0x2a; 32])],
                offset: 4096,
                length: 8192,
            },
        ),
        (
            "have_held",
            Message::HaveHeld {
                upload: UploadId([0x4d; 16]),
                object: cairn_protocol::wire::ObjectKeyDigest::of("photos", "2026/cat.jpg"),
                ids: vec![id, FragmentId([0x2a; 32])],
            },
        ),
        (
            "lock_fragments",
            Message::LockFragments {
                uploads: vec![UploadId([0x4d; 16]), UploadId([0x4e; 16])],
                bucket: "photos".into(),
                key: "2026/cat.jpg".into(),
                version: cairn_protocol::ids::VersionId([0x5e; 16]),
                lock: cairn_protocol::wire::FragmentLock {
                    compliance_until_unix_ms: 1_900_000_000_000,
                    legal_hold_until_unix_ms: 1_800_000_000_000,
                },
            },
        ),
        (
            "fragments_locked",
            Message::FragmentsLocked { fragments: 12 },
        ),
    ]
}

#[test]
fn wire_frames() {
    let frames: Vec<Value> = vector_messages()
        .iter()
        .map(|(name, message)| {
            let mut frame = Vec::new();
            message.encode(&mut frame).unwrap();
            json!({ "message": name, "frame": to_hex(&frame) })
        })
        .collect();
    let stored = check("wire.json", json!({ "frames": frames }));
    for ((name, message), v) in vector_messages()
        .into_iter()
        .zip(stored["frames"].as_array().unwrap())
    {
        let mut decoder = FrameDecoder::default();
        decoder.feed(&hex_bytes(&v["frame"]));
        assert_eq!(decoder.next_message().unwrap(), Some(message), "{name}");
    }
}

#[test]
fn object_versions() {
    let at = |ms: u64, node: u8| Timestamp {
        hlc: Hlc::new(ms, 1),
        node: NodeId([node; 32]),
    };
    let entry = ObjectVersion {
        bucket: "photos".into(),
        key: "2026/cat.jpg".into(),
        version: VersionId::new(1_764_000_000_000, [0xab; 10]),
        created: at(1_764_000_000_000, 1),
        seq: 42,
        null: true,
        body: VersionBody::Data {
            manifest: ManifestId([0x0d; 32]),
            size_bytes: 65_547,
            etag: "\"9b2cf535f27731c974343645a3985328-2\"".into(),
            headers: StoredHeaders::new(vec![
                ("content-type".into(), "image/jpeg".into()),
                ("x-amz-meta-camera".into(), "pinhole".into()),
            ])
            .unwrap(),
        },
        retention: Retention::new(RetentionMode::Compliance, 1_900_000_000_000),
        legal_hold: Lww {
            value: true,
            at: at(1_764_000_000_500, 2),
        },
        purged: None,
    };
    let marker = ObjectVersion {
        body: VersionBody::DeleteMarker,
        retention: Retention::default(),
        legal_hold: Lww {
            value: false,
            at: at(0, 0),
        },
        purged: Some(at(1_764_000_009_000, 3)),
        ..entry.clone()
    };
    // A version with its own id (written while versioning was Enabled).
    let own_id = ObjectVersion {
        null: false,
        body: VersionBody::DeleteMarker,
        retention: Retention::default(),
        purged: None,
        ..entry.clone()
    };
    // A null version whose governance retention a guard decision set
    // (shortened through the bypass): format 4.
    let stamped = ObjectVersion {
        retention: Retention {
            at: at(1_764_000_000_900, 3),
            ..Retention::new(RetentionMode::Governance, 1_800_000_000_000)
        },
        ..entry.clone()
    };
    let stored = check(
        "version.json",
        json!({
            "stamped_retention": to_hex(&stamped.encode()),
            "data_version": to_hex(&entry.encode()),
            "purged_delete_marker": to_hex(&marker.encode()),
            "own_id_delete_marker": to_hex(&own_id.encode()),
        }),
    );
    assert_eq!(
        ObjectVersion::decode(&hex_bytes(&stored["own_id_delete_marker"])).unwrap(),
        own_id
    );
    assert_eq!(
        ObjectVersion::decode(&hex_bytes(&stored["data_version"])).unwrap(),
        entry
    );
    assert_eq!(
        ObjectVersion::decode(&hex_bytes(&stored["stamped_retention"])).unwrap(),
        stamped
    );
    assert_eq!(
        ObjectVersion::decode(&hex_bytes(&stored["purged_delete_marker"])).unwrap(),
        marker
    );
}

#[test]
fn membership() {
    let cluster_key = SigningKey::from_bytes(&[0x0c; 32]);
    let cluster = ClusterId::of(&cluster_key);
    let node = NodeId::from_verifying_key(&SigningKey::from_bytes(&[0x0e; 32]).verifying_key());
    let certificate = Certificate::issue(
        &cluster_key,
        node,
        SiteId::new("lyon-1").unwrap(),
        1_764_000_000_000,
        1_795_536_000_000,
    );
    let mut map = vector_map();
    map.nodes.truncate(6);
    map.version = 7;
    map.nodes[5].state = NodeState::Draining;
    let signed = SignedMap::sign(
        &cluster_key,
        map,
        Scheme::new(4, 2).unwrap(),
        Tolerance::default(),
    )
    .unwrap();
    let stored = check(
        "membership.json",
        json!({
            "cluster_secret_key": to_hex(&[0x0c; 32]),
            "cluster_id": cluster.to_hex(),
            "certificate": to_hex(&certificate.encode()),
            "map": to_hex(&signed.encode()),
        }),
    );
    let cluster = ClusterId::from_hex(stored["cluster_id"].as_str().unwrap()).unwrap();
    let decoded = Certificate::decode(&hex_bytes(&stored["certificate"])).unwrap();
    decoded.verify(&cluster, &node, 1_770_000_000_000).unwrap();
    assert_eq!(
        SignedMap::decode(&hex_bytes(&stored["map"]), &cluster).unwrap(),
        signed
    );
}

#[test]
fn dht_records() {
    let upload = UploadId([0x2a; 16]);
    // A libp2p peer id of an ed25519 key: the identity multihash (0x00,
    // length 36) of the protobuf-encoded public key.
    let public = SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();
    let mut publisher = vec![0x00, 36, 0x08, 0x01, 0x12, 32];
    publisher.extend_from_slice(&public);
    let record = StoredRecord {
        expires_unix_ms: 1_790_000_000_000,
        publisher: Some(publisher.clone()),
        value: b"cairn".to_vec(),
    };
    let anonymous = StoredRecord {
        expires_unix_ms: 0,
        publisher: None,
        value: Vec::new(),
    };
    // /ip4/127.0.0.1/udp/4001/quic-v1 and /ip6/::1/udp/4002/quic-v1
    let mut ip6 = vec![0x29];
    ip6.extend_from_slice(&[0; 15]);
    ip6.extend_from_slice(&[1, 0x91, 0x02, 0x0f, 0xa2, 0xcd, 0x03]);
    let addresses = vec![
        vec![0x04, 127, 0, 0, 1, 0x91, 0x02, 0x0f, 0xa1, 0xcd, 0x03],
        ip6,
    ];
    let provider = StoredProvider {
        expires_unix_ms: 1_790_000_000_000,
        addresses: addresses.clone(),
    };
    let stored = check(
        "dht.json",
        json!({
            "upload_id": upload.to_text(),
            "upload_provider_key": to_hex(&upload_provider_key(&upload)),
            "publisher_peer_id": to_hex(&publisher),
            "record": {
                "expires_unix_ms": record.expires_unix_ms,
                "value": to_hex(&record.value),
                "encoded": to_hex(&record.encode()),
            },
            "record_without_publisher": {
                "expires_unix_ms": 0,
                "encoded": to_hex(&anonymous.encode()),
            },
            "provider": {
                "expires_unix_ms": provider.expires_unix_ms,
                "addresses": addresses.iter().map(|a| to_hex(a)).collect::<Vec<_>>(),
                "encoded": to_hex(&provider.encode()),
            },
        }),
    );
    let encoded_record = hex_bytes(&stored["record"]["encoded"]);
    assert_eq!(StoredRecord::decode(&encoded_record).unwrap(), record);
    assert_eq!(
        StoredRecord::decode(&hex_bytes(&stored["record_without_publisher"]["encoded"])).unwrap(),
        anonymous
    );
    let encoded_provider = hex_bytes(&stored["provider"]["encoded"]);
    assert_eq!(StoredProvider::decode(&encoded_provider).unwrap(), provider);
    // A truncated value is refused, never a panic: a provider record
    // anywhere, a record anywhere before its value begins.
    for cut in 0..encoded_provider.len() {
        assert!(StoredProvider::decode(&encoded_provider[..cut]).is_err());
    }
    for cut in 0..1 + 8 + 2 + publisher.len() {
        assert!(StoredRecord::decode(&encoded_record[..cut]).is_err());
    }
}

#[test]
fn metadata_rows_rpc_and_replicas() {
    use cairn_protocol::cas::TaggedValue;
    use cairn_protocol::meta::{
        Partition, PartitionDigest, Register, RowKey, RowValue, Table, leaf_of, replica_set,
        row_digest, version_sort_key, xor_into,
    };
    use cairn_protocol::metarpc::{AcceptedValue, Ballot, RegisterKey, Request, Response};

    let at = Timestamp {
        hlc: Hlc::new(1_790_000_000_000, 3),
        node: NodeId([0x11; 32]),
    };
    let bucket_key = RowKey::new(Partition::cluster(), Table::Buckets, b"photos".to_vec());
    let bucket_value = RowValue::Register(Register {
        at,
        value: Some(b"settings".to_vec()),
    });
    let encoded_value = bucket_value.encode();
    let leaf = leaf_of(Table::Buckets, &bucket_key.sort);
    let digest = row_digest(Table::Buckets, &bucket_key.sort, &encoded_value);
    let mut partition_digest = PartitionDigest::default();
    xor_into(&mut partition_digest.leaves[usize::from(leaf)], &digest);
    let version = VersionId::new(1_790_000_000_000, [0x5a; 10]);
    let sites = ["a", "b", "c"];
    let map = ClusterMap {
        version: 1,
        nodes: (0..6u8)
            .map(|i| MapNode {
                id: NodeId([i + 1; 32]),
                site: SiteId::new(sites[usize::from(i % 3)]).unwrap(),
                capacity_bytes: 1 << 40,
                state: NodeState::Up,
                since: 1,
            })
            .collect(),
    };
    let photos = Partition::bucket("photos");
    let ballot = Ballot {
        round: 7,
        node: NodeId([0x22; 32]),
    };
    let tagged = TaggedValue {
        operation: [0x33; 16],
        value: Some(b"head".to_vec()),
    };
    let register = RegisterKey {
        partition: photos.clone(),
        name: b"cat.jpg".to_vec(),
    };
    let write = Request::Write {
        rows: vec![(bucket_key.clone(), bucket_value.clone())],
    };
    let accept = Request::Accept {
        key: register.clone(),
        ballot,
        value: Some(tagged.encode()),
    };
    let guard = cairn_protocol::guard::VersionGuard {
        retention: Retention {
            at,
            ..Retention::new(RetentionMode::Compliance, 1_800_000_000_000)
        },
        legal_hold: Lww { value: true, at },
        purged: false,
    };
    let promise = Response::Promise {
        accepted: Some(AcceptedValue {
            ballot,
            value: Some(tagged.encode()),
        }),
    };
    let stored = check(
        "meta.json",
        json!({
            "register_row": {
                "partition": "",
                "table": 1,
                "sort": to_hex(&bucket_key.sort),
                "hlc": at.hlc.as_u64(),
                "node": to_hex(at.node.as_bytes()),
                "value": to_hex(b"settings"),
                "encoded": to_hex(&encoded_value),
                "leaf": leaf,
                "row_digest": to_hex(&digest),
                "partition_root": to_hex(&partition_digest.root()),
            },
            "version_sort_key": {
                "key": "cats/tom.jpg",
                "version": version.to_text(),
                "sort": to_hex(&version_sort_key("cats/tom.jpg", &version)),
            },
            "replicas": {
                "nodes": map.nodes.iter().map(|n| json!({
                    "id": to_hex(n.id.as_bytes()),
                    "site": n.site.as_str(),
                })).collect::<Vec<_>>(),
                "partition": "photos",
                "placement_key": to_hex(&photos.placement_key()),
                "replicas_3": replica_set(&map, &photos, 3)
                    .iter()
                    .map(|id| to_hex(id.as_bytes()))
                    .collect::<Vec<_>>(),
            },
            "tagged_value": {
                "operation": to_hex(&tagged.operation),
                "value": to_hex(b"head"),
                "encoded": to_hex(&tagged.encode()),
            },
            "guard": {
                "mode": 2,
                "retain_until_unix_ms": 1_800_000_000_000u64,
                "legal_hold": true,
                "purged": false,
                "encoded": to_hex(&guard.encode()),
            },
            "requests": {
                "call_map_version": 5,
                "call_write": to_hex(&cairn_protocol::metarpc::Call {
                    map_version: 5,
                    request: write.clone(),
                }.encode()),
                "write": to_hex(&write.encode()),
                "accept": to_hex(&accept.encode()),
                "read_register": to_hex(&Request::ReadRegister { key: register.clone() }.encode()),
            },
            "responses": {
                "promise": to_hex(&promise.encode()),
                "register_state": to_hex(&Response::RegisterState {
                    accepted: Some(AcceptedValue { ballot, value: Some(tagged.encode()) }),
                }.encode()),
                "written": to_hex(&Response::Written.encode()),
            },
        }),
    );
    assert_eq!(
        RowValue::decode(&hex_bytes(&stored["register_row"]["encoded"])).unwrap(),
        bucket_value
    );
    assert_eq!(
        Request::decode(&hex_bytes(&stored["requests"]["write"])).unwrap(),
        write
    );
    assert_eq!(
        Request::decode(&hex_bytes(&stored["requests"]["accept"])).unwrap(),
        accept
    );
    assert_eq!(
        Response::decode(&hex_bytes(&stored["responses"]["promise"])).unwrap(),
        promise
    );
    assert_eq!(
        Request::decode(&hex_bytes(&stored["requests"]["read_register"])).unwrap(),
        Request::ReadRegister { key: register }
    );
    assert_eq!(
        Response::decode(&hex_bytes(&stored["responses"]["register_state"])).unwrap(),
        Response::RegisterState {
            accepted: Some(AcceptedValue {
                ballot,
                value: Some(tagged.encode())
            })
        }
    );
    assert_eq!(
        TaggedValue::decode(&hex_bytes(&stored["tagged_value"]["encoded"])).unwrap(),
        tagged
    );
    assert_eq!(
        cairn_protocol::guard::VersionGuard::decode(&hex_bytes(&stored["guard"]["encoded"]))
            .unwrap(),
        guard
    );
}
