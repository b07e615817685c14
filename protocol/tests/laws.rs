//! Property tests: the version merge is a join (commutative, associative,
//! idempotent), clocks never go backwards, and codecs round-trip.

use bytes::Bytes;
use cairn_protocol::hlc::{Hlc, HlcClock, Timestamp};
use cairn_protocol::ids::{FragmentId, ManifestId, NodeId, VersionId};
use cairn_protocol::version::{Lww, ObjectVersion, Retention, RetentionMode, VersionBody};
use cairn_protocol::wire::{FrameDecoder, Message, RejectCode};
use proptest::prelude::*;

fn timestamp() -> impl Strategy<Value = Timestamp> {
    (0u64..50, 0u16..3, 0u8..3).prop_map(|(ms, logical, node)| Timestamp {
        hlc: Hlc::new(ms, logical),
        node: NodeId([node; 32]),
    })
}

fn body() -> impl Strategy<Value = VersionBody> {
    prop_oneof![
        Just(VersionBody::DeleteMarker),
        (0u8..3, 0u64..5).prop_map(|(m, size)| VersionBody::Data {
            manifest: ManifestId([m; 32]),
            size_bytes: size,
            etag: format!("\"{m}\""),
            headers: Default::default(),
        }),
    ]
}

fn mode() -> impl Strategy<Value = RetentionMode> {
    prop_oneof![
        Just(RetentionMode::None),
        Just(RetentionMode::Governance),
        Just(RetentionMode::Compliance)
    ]
}

/// Replica views of one version (same bucket, key and version id).
fn replica_view() -> impl Strategy<Value = ObjectVersion> {
    (
        timestamp(),
        body(),
        mode(),
        0u64..100,
        proptest::option::of(timestamp()),
        any::<bool>(),
        timestamp(),
        proptest::option::of(timestamp()),
    )
        .prop_map(
            |(created, body, mode, until, decided_at, hold, hold_at, purged)| ObjectVersion {
                bucket: "b".into(),
                key: "k".into(),
                version: VersionId::new(7, [1; 10]),
                created,
                seq: 1,
                null: true,
                body,
                // A retention as written (no stamp), or as a guard decided it.
                retention: Retention {
                    at: decided_at.unwrap_or(Timestamp::ZERO),
                    ..Retention::new(mode, until)
                },
                legal_hold: Lww {
                    value: hold,
                    at: hold_at,
                },
                purged,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn merge_is_commutative(a in replica_view(), b in replica_view()) {
        prop_assert_eq!(a.merge(&b).unwrap(), b.merge(&a).unwrap());
    }

    #[test]
    fn merge_is_associative(a in replica_view(), b in replica_view(), c in replica_view()) {
        let left = a.merge(&b).unwrap().merge(&c).unwrap();
        let right = a.merge(&b.merge(&c).unwrap()).unwrap();
        prop_assert_eq!(left, right);
    }

    #[test]
    fn merge_is_idempotent(a in replica_view(), b in replica_view()) {
        prop_assert_eq!(a.merge(&a).unwrap(), a.clone());
        let ab = a.merge(&b).unwrap();
        prop_assert_eq!(ab.merge(&b).unwrap(), ab.clone());
    }

    #[test]
    fn merge_never_weakens_compliance_and_keeps_the_later_governance_decision(
        a in replica_view(),
        b in replica_view(),
    ) {
        let m = a.merge(&b).unwrap();
        let compliance = [a.retention, b.retention]
            .into_iter()
            .filter(|r| r.mode == RetentionMode::Compliance)
            .map(|r| r.retain_until_unix_ms)
            .max();
        match compliance {
            Some(until) => {
                prop_assert_eq!(m.retention.mode, RetentionMode::Compliance);
                prop_assert_eq!(m.retention.retain_until_unix_ms, until);
            }
            None => {
                let later = [a.retention, b.retention]
                    .into_iter()
                    .max_by_key(|r| (r.at, r.mode, r.retain_until_unix_ms))
                    .unwrap();
                prop_assert_eq!(m.retention, later);
            }
        }
        prop_assert!(m.purged >= a.purged && m.purged >= b.purged);
    }

    #[test]
    fn version_entries_round_trip(a in replica_view()) {
        prop_assert_eq!(ObjectVersion::decode(&a.encode()).unwrap(), a);
    }

    #[test]
    fn the_clock_is_monotonic(events in proptest::collection::vec((0u64..1_000, proptest::option::of((0u64..1_100, any::<u16>()))), 1..200)) {
        let mut clock = HlcClock::new(500);
        let mut last = Hlc::default();
        for (physical, remote) in events {
            let next = match remote {
                Some((ms, logical)) => match clock.observe(Hlc::new(ms, logical), physical) {
                    Ok(t) => { prop_assert!(t > Hlc::new(ms, logical)); t }
                    Err(_) => continue,
                },
                None => clock.now(physical),
            };
            prop_assert!(next > last);
            prop_assert!(next.unix_ms() >= physical);
            last = next;
        }
    }

    #[test]
    fn wire_messages_round_trip_whatever_the_split(
        ids in proptest::collection::vec(any::<[u8; 32]>(), 0..20),
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        reason in "\\PC{0,40}",
        offset in any::<u64>(),
        split in 1usize..100,
    ) {
        let ids: Vec<FragmentId> = ids.into_iter().map(FragmentId).collect();
        let first = ids.first().copied().unwrap_or(FragmentId([0; 32]));
        let messages = vec![
            Message::HaveQuery { ids: ids.clone() },
            Message::Data(Bytes::from(data)),
            Message::Reject { code: RejectCode::from_u16(offset as u16), message: reason },
            Message::GetFragment { id: first, offset, length: offset / 2 },
            Message::InventoryPage { ids, more: offset % 2 == 0 },
            Message::InventoryDigest { start: first, end: first, count: offset, digest: [9; 32] },
        ];
        let mut stream = Vec::new();
        for m in &messages {
            m.encode(&mut stream).unwrap();
        }
        let mut decoder = FrameDecoder::default();
        let mut got = Vec::new();
        for piece in stream.chunks(split) {
            decoder.feed(piece);
            while let Some(m) = decoder.next_message().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, messages);
    }

    #[test]
    fn the_frame_decoder_never_panics_on_garbage(garbage in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut decoder = FrameDecoder::default();
        decoder.feed(&garbage);
        while let Ok(Some(_)) = decoder.next_message() {}
    }
}
