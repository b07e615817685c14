//! Object Lock enforced by the storage nodes (spec/versioning.md, "Locks on
//! the nodes"): the fragments of a version under a compliance retention or
//! a legal hold are locked on every node that holds them, which then keeps
//! them whatever it is asked, even when the metadata it checks lies.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    ObjectLockLegalHold, ObjectLockLegalHoldStatus, ObjectLockMode, ObjectLockRetention,
    ObjectLockRetentionMode,
};
use cairn_model::collector::{Collection, ReleaseRule};
use cairn_model::heads::{existing_versions, read_manifest};
use cairn_model::repair::Repairer;
use cairn_node::meta::Metadata;
use cairn_node::pieces::PieceError;
use cairn_node::release::{ReleaseCheck, SegmentPlaces, VersionLock};
use cairn_node::store::StoreError;
use cairn_node::swarm::NodeError;
use cairn_protocol::ids::{FragmentId, NodeId, UploadId, VersionId};
use cairn_protocol::version::VersionBody;
use cairn_protocol::wire::{FragmentLock, Hold, ObjectKeyDigest, RejectCode};
use cairn_tests::s3::*;
use cairn_tests::{Cluster, QUICK_REPAIR, pseudo_random_bytes};

/// Large enough to be erasure-coded: one fragment of each segment per node.
const OBJECT_BYTES: usize = 400_000;

/// A date far enough ahead that no test reaches it.
fn far_future() -> DateTime {
    DateTime::from_secs(4_000_000_000)
}

const FAR_FUTURE_MS: u64 = 4_000_000_000_000;

/// Every node checks locks and releases against the real metadata rules.
fn install_rules(cluster: &Cluster) {
    for n in 0..cluster.members.len() {
        cluster
            .node(n)
            .install_release_rules(Arc::new(ReleaseRule::new(Collection::default())));
    }
}

/// Metadata that lies: every release and restore is justified, and no
/// version is locked. What a member that rewrote the metadata would show.
struct ForgedMetadata;

impl ReleaseCheck for ForgedMetadata {
    fn check<'a>(
        &'a self,
        _: &'a Metadata,
        _: &'a str,
        _: &'a str,
        _: UploadId,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async { Ok(()) })
    }

    fn check_restore<'a>(
        &'a self,
        _: &'a Metadata,
        _: &'a str,
        _: &'a str,
        _: UploadId,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async { Ok(()) })
    }

    fn check_drop<'a>(
        &'a self,
        _: &'a Metadata,
        _: &'a str,
        _: &'a str,
        _: VersionId,
        _: FragmentId,
        _: UploadId,
        _: NodeId,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<SegmentPlaces>, String>> + Send + 'a>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn check_keep<'a>(
        &'a self,
        _: &'a Metadata,
        _: &'a str,
        _: &'a str,
        _: VersionId,
        _: FragmentId,
        _: UploadId,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async { Ok(()) })
    }

    fn check_lock<'a>(
        &'a self,
        _: &'a Metadata,
        _: &'a str,
        _: &'a str,
        _: VersionId,
        _: &'a [UploadId],
    ) -> Pin<Box<dyn Future<Output = Result<VersionLock, String>> + Send + 'a>> {
        Box::pin(async { Ok(VersionLock::default()) })
    }

    fn settle_ms(&self) -> u64 {
        0
    }
}

async fn lock_bucket(client: &Client, bucket: &str) {
    client
        .create_bucket()
        .bucket(bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .unwrap();
}

/// PUTs an object of `OBJECT_BYTES` from `seed`, with a compliance
/// retention until `until` if given; its version id.
async fn put_object(
    client: &Client,
    bucket: &str,
    key: &str,
    seed: u64,
    until: Option<DateTime>,
) -> String {
    let mut put = client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(pseudo_random_bytes(seed, OBJECT_BYTES)));
    if let Some(until) = until {
        put = put
            .object_lock_mode(ObjectLockMode::Compliance)
            .object_lock_retain_until_date(until);
    }
    put.send().await.unwrap().version_id().unwrap().to_owned()
}

async fn get_object(client: &Client, bucket: &str, key: &str, version: &str) -> Vec<u8> {
    client
        .get_object()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec()
}

/// The upload and the fragments of `version` of `bucket`/`key`.
async fn fragments_of(
    cluster: &Cluster,
    bucket: &str,
    key: &str,
    version: &str,
) -> (UploadId, Vec<FragmentId>) {
    let metadata = cluster.node(0).metadata();
    let wanted = VersionId::parse(version).unwrap();
    let versions = existing_versions(metadata, bucket, key, None)
        .await
        .unwrap();
    let row = versions.iter().find(|v| v.version == wanted).unwrap();
    let VersionBody::Data { manifest, .. } = &row.body else {
        panic!("{key} {version} holds data");
    };
    let manifest = read_manifest(metadata, bucket, manifest)
        .await
        .unwrap()
        .unwrap();
    let fragments = manifest.fragment_ids().collect();
    (manifest.upload, fragments)
}

/// Every copy of `fragments` on the running nodes: (node, its lock).
fn copies(cluster: &Cluster, fragments: &[FragmentId]) -> Vec<(usize, FragmentLock)> {
    let mut copies = Vec::new();
    for (n, member) in cluster.members.iter().enumerate() {
        let Some(node) = &member.node else { continue };
        for id in fragments {
            if let Some(entry) = node.store().entry(id).unwrap() {
                copies.push((n, entry.lock));
            }
        }
    }
    copies
}

fn is_refused(answer: Result<u64, NodeError>, code: RejectCode) -> bool {
    matches!(answer, Err(NodeError::Piece(PieceError::Rejected { code: c, .. })) if c == code)
}

/// A compliance version's fragments are locked on every node by the time
/// its PUT answers; a lock beyond what the metadata states is refused; and
/// once the metadata lies (releases justified, no lock stated), no release,
/// lock message or delete takes a fragment of it, while an unlocked
/// version's fragments go at once. (The store's own tests show that its
/// trash purge keeps locked entries.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compliance_versions_fragments_stay_on_every_node_whatever_the_nodes_are_asked() {
    let s = setup().await;
    install_rules(&s.cluster);
    let c = &s.client;
    lock_bucket(c, "vault").await;
    let locked = put_object(c, "vault", "locked", 1, Some(far_future())).await;
    let plain = put_object(c, "vault", "plain", 2, None).await;
    let (upload, fragments) = fragments_of(&s.cluster, "vault", "locked", &locked).await;
    let compliance = FragmentLock {
        compliance_until_unix_ms: FAR_FUTURE_MS,
        legal_hold_until_unix_ms: 0,
    };
    let (locked_id, plain_id) = (
        VersionId::parse(&locked).unwrap(),
        VersionId::parse(&plain).unwrap(),
    );
    let held = copies(&s.cluster, &fragments);
    assert!(held.len() >= fragments.len(), "{held:?}");
    assert!(
        held.iter().all(|(_, lock)| *lock == compliance),
        "every copy locked when the PUT answered: {held:?}"
    );
    let (plain_upload, plain_fragments) = fragments_of(&s.cluster, "vault", "plain", &plain).await;
    assert!(
        copies(&s.cluster, &plain_fragments)
            .iter()
            .all(|(_, lock)| *lock == FragmentLock::default())
    );

    // A lock message asking more than its version states is refused, on
    // every node; what it states is taken (it changes nothing).
    let asker = s.cluster.node(1).handle();
    let ids = s.cluster.node_ids();
    let held_lease = FragmentLock {
        compliance_until_unix_ms: 0,
        legal_hold_until_unix_ms: FragmentLock::legal_hold_lease_end(
            cairn_node::clock::now_unix_ms(),
        ),
    };
    for node in &ids {
        let longer = FragmentLock {
            compliance_until_unix_ms: FAR_FUTURE_MS + 1,
            legal_hold_until_unix_ms: 0,
        };
        let refused = [
            // Beyond the version's date.
            (upload, "locked", locked_id, longer),
            // A legal hold the version is not under.
            (upload, "locked", locked_id, held_lease),
            // A version that states none.
            (plain_upload, "plain", plain_id, compliance),
            // Another version's upload, named by the locked version.
            (plain_upload, "plain", locked_id, compliance),
        ];
        for (asked_upload, key, version, lock) in refused {
            let answer = asker
                .lock_fragments(node, &[asked_upload], "vault", key, version, lock)
                .await;
            assert!(is_refused(answer, RejectCode::Unauthorized), "{node} {key}");
        }
        asker
            .lock_fragments(node, &[upload], "vault", "locked", locked_id, compliance)
            .await
            .unwrap();
    }
    // A put whose hold asks a retention is refused: nothing could check it.
    let bytes = b"pinned forever".to_vec();
    let id = FragmentId::of(&bytes);
    let hold = Hold::sign(
        s.cluster.node(1).identity().signing_key(),
        &id,
        UploadId([9; 16]),
        ObjectKeyDigest::of("vault", "pinned"),
        FAR_FUTURE_MS,
    );
    let put = asker.put_fragment(&ids[2], id, &bytes, hold).await;
    assert!(
        matches!(
            put,
            Err(NodeError::Piece(PieceError::Rejected {
                code: RejectCode::RetentionRefused,
                ..
            }))
        ),
        "{put:?}"
    );
    assert!(s.cluster.node(2).store().entry(&id).unwrap().is_none());

    // The metadata lies from here on.
    for n in 0..s.cluster.members.len() {
        s.cluster
            .node(n)
            .install_release_rules(Arc::new(ForgedMetadata));
    }
    let mut plain_trashed = 0;
    for node in &ids {
        let released = asker
            .release_upload(node, upload, "vault", "locked")
            .await
            .unwrap();
        assert_eq!(released.trashed, 0, "{node}");
        plain_trashed += asker
            .release_upload(node, plain_upload, "vault", "plain")
            .await
            .unwrap()
            .trashed;
        // A lock asked earlier, or none, leaves the date where it is.
        asker
            .lock_fragments(
                node,
                &[upload],
                "vault",
                "locked",
                locked_id,
                FragmentLock::default(),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        plain_trashed,
        plain_fragments.len() as u64,
        "the forged metadata does justify releases"
    );
    for (n, member) in s.cluster.members.iter().enumerate() {
        let store = member.node.as_ref().unwrap().store();
        for id in &fragments {
            let Some(entry) = store.entry(id).unwrap() else {
                continue;
            };
            assert!(
                matches!(
                    store.delete(id, cairn_node::clock::now_unix_ms()),
                    Err(StoreError::Held { .. })
                ),
                "node {n}"
            );
            assert_eq!(entry.lock, compliance, "node {n}");
        }
    }
    let after = copies(&s.cluster, &fragments);
    assert_eq!(after, held, "no copy lost or unlocked");
    assert_eq!(
        get_object(c, "vault", "locked", &locked).await,
        pseudo_random_bytes(1, OBJECT_BYTES)
    );
    s.shutdown().await;
}

/// A legal hold reaches the nodes as a lease when it is set, and lifting
/// it clears nothing (the lease runs out); a retention extended reaches
/// them too; a node that was down for a change is brought up to date by
/// repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_changes_reach_the_nodes_and_repair_brings_a_node_that_missed_one_up_to_date() {
    let Setup {
        mut cluster,
        gateway,
        client: c,
    } = setup().await;
    install_rules(&cluster);
    lock_bucket(&c, "holds").await;
    let first = put_object(&c, "holds", "k", 3, None).await;
    let second = put_object(&c, "holds", "k", 4, None).await;
    let set_hold = |version: &str, status: ObjectLockLegalHoldStatus| {
        c.put_object_legal_hold()
            .bucket("holds")
            .key("k")
            .version_id(version)
            .legal_hold(ObjectLockLegalHold::builder().status(status).build())
            .send()
    };
    let (_, fragments) = fragments_of(&cluster, "holds", "k", &first).await;
    let locks = |cluster: &Cluster, fragments: &[FragmentId]| -> Vec<(usize, FragmentLock)> {
        copies(cluster, fragments)
    };
    let now = cairn_node::clock::now_unix_ms();
    set_hold(&first, ObjectLockLegalHoldStatus::On)
        .await
        .unwrap();
    let leased = locks(&cluster, &fragments);
    assert!(
        leased
            .iter()
            .all(|(_, l)| l.legal_hold_until_unix_ms >= FragmentLock::legal_hold_lease_end(now)),
        "{leased:?}"
    );
    // Lifting the hold clears nothing on the nodes: the lease runs out.
    set_hold(&first, ObjectLockLegalHoldStatus::Off)
        .await
        .unwrap();
    assert_eq!(locks(&cluster, &fragments), leased);
    c.put_object_retention()
        .bucket("holds")
        .key("k")
        .version_id(&first)
        .retention(
            ObjectLockRetention::builder()
                .mode(ObjectLockRetentionMode::Compliance)
                .retain_until_date(far_future())
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(
        locks(&cluster, &fragments)
            .iter()
            .all(|(_, l)| l.compliance_until_unix_ms == FAR_FUTURE_MS)
    );

    // Node 5 is down while the second version is put under a legal hold:
    // the request answers all the same, and the node comes back without
    // the hold.
    let (_, fragments) = fragments_of(&cluster, "holds", "k", &second).await;
    cluster.stop(5).await;
    set_hold(&second, ObjectLockLegalHoldStatus::On)
        .await
        .unwrap();
    cluster.restart(5).await.unwrap();
    cluster
        .node(5)
        .install_release_rules(Arc::new(ReleaseRule::new(Collection::default())));
    let on_node_5 = |cluster: &Cluster| -> Vec<FragmentLock> {
        copies(cluster, &fragments)
            .into_iter()
            .filter(|(n, _)| *n == 5)
            .map(|(_, l)| l)
            .collect()
    };
    assert!(!on_node_5(&cluster).is_empty());
    assert!(on_node_5(&cluster).iter().all(|l| !l.holds(now)));
    let mut repairers: Vec<Repairer> = (0..cluster.members.len())
        .map(|i| Repairer::start(cluster.node(i).handle(), QUICK_REPAIR))
        .collect();
    let caught_up = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            for repairer in repairers.iter_mut() {
                repairer.next_pass().await.expect("repair runs");
            }
            if on_node_5(&cluster)
                .iter()
                .all(|l| l.legal_hold_until_unix_ms > now)
            {
                return;
            }
        }
    })
    .await;
    assert!(caught_up.is_ok(), "node 5: {:?}", on_node_5(&cluster));
    drop(repairers);
    gateway.stop().await;
    cluster.shutdown().await;
}
