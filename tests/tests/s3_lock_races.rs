//! A seeded randomized test of Object Lock under concurrency: rounds of
//! PUTs, DELETEs, retention and legal hold changes on a few keys, sent at
//! once through three gateways on different nodes. Whatever order the
//! cluster puts them in, no version whose lock was acknowledged before a
//! delete started is lost, and every locked version's fragments are
//! locked on every node that holds them. Replay a failure with the
//! `CAIRN_SEED` it prints.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    ObjectLockLegalHold, ObjectLockLegalHoldStatus, ObjectLockMode, ObjectLockRetention,
    ObjectLockRetentionMode,
};
use cairn_model::collector::{Collection, ReleaseRule};
use cairn_model::heads::{existing_versions, read_manifest};
use cairn_protocol::ids::{FragmentId, VersionId};
use cairn_protocol::version::VersionBody;
use cairn_tests::s3::*;
use cairn_tests::{Cluster, Rng, pseudo_random_bytes, random_secret, test_seed};

const BUCKET: &str = "races";
const KEYS: [&str; 3] = ["a", "b", "c"];
const ROUNDS: usize = 10;
const OPERATIONS_PER_ROUND: usize = 8;
/// Far enough ahead that no test reaches them; later is stronger.
const UNTIL_SECS: [i64; 2] = [4_000_000_000, 4_100_000_000];

/// What the test knows was acknowledged, and when (an operation counter
/// taken when it started and when its answer came).
#[derive(Default)]
struct Acknowledged {
    /// Bodies of every version a PUT answered, by (key, version id).
    bodies: HashMap<(String, String), Vec<u8>>,
    /// The latest compliance date acknowledged for a version, and the
    /// counter when the first such answer came.
    compliance: HashMap<(String, String), (i64, u64)>,
    /// Versions with a legal hold ON acknowledged, when, and whether an
    /// OFF was ever sent for them.
    held: HashMap<(String, String), u64>,
    released: HashSet<(String, String)>,
    /// Permanent deletes answered 204: (key, version, counter at start).
    deleted: Vec<(String, String, u64)>,
    clock: u64,
}

impl Acknowledged {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

#[derive(Debug, Clone)]
enum Operation {
    Put {
        key: &'static str,
        seed: u64,
        lock: Option<(ObjectLockMode, i64)>,
        legal_hold: bool,
    },
    DeleteKey(&'static str),
    DeleteVersion {
        key: String,
        version: String,
        bypass: bool,
    },
    Retain {
        key: String,
        version: String,
        mode: ObjectLockRetentionMode,
        until: i64,
    },
    Hold {
        key: String,
        version: String,
        on: bool,
    },
}

fn pick(rng: &mut Rng, known: &[(String, String)]) -> Operation {
    let key = KEYS[rng.below(KEYS.len())];
    let known_version = |rng: &mut Rng| known.get(rng.below(known.len().max(1))).cloned();
    match rng.below(10) {
        0..=3 => Operation::Put {
            key,
            seed: rng.next_u64(),
            lock: match rng.below(3) {
                0 => Some((ObjectLockMode::Compliance, UNTIL_SECS[rng.below(2)])),
                1 => Some((ObjectLockMode::Governance, UNTIL_SECS[rng.below(2)])),
                _ => None,
            },
            legal_hold: rng.below(4) == 0,
        },
        4 => Operation::DeleteKey(key),
        5 | 6 => match known_version(rng) {
            Some((key, version)) => Operation::DeleteVersion {
                key,
                version,
                bypass: rng.below(2) == 0,
            },
            None => Operation::DeleteKey(key),
        },
        7 | 8 => match known_version(rng) {
            Some((key, version)) => Operation::Retain {
                key,
                version,
                mode: if rng.below(2) == 0 {
                    ObjectLockRetentionMode::Compliance
                } else {
                    ObjectLockRetentionMode::Governance
                },
                until: UNTIL_SECS[rng.below(2)],
            },
            None => Operation::DeleteKey(key),
        },
        _ => match known_version(rng) {
            Some((key, version)) => Operation::Hold {
                key,
                version,
                on: rng.below(2) == 0,
            },
            None => Operation::DeleteKey(key),
        },
    }
}

/// Runs one operation; records what its answer acknowledged.
async fn run(client: &Client, operation: Operation, seen: &Mutex<Acknowledged>) {
    let started = seen.lock().unwrap().tick();
    match operation {
        Operation::Put {
            key,
            seed,
            lock,
            legal_hold,
        } => {
            let body = pseudo_random_bytes(seed, 64 + (seed % 2000) as usize);
            let mut put = client
                .put_object()
                .bucket(BUCKET)
                .key(key)
                .body(ByteStream::from(body.clone()));
            if let Some((mode, until)) = &lock {
                put = put
                    .object_lock_mode(mode.clone())
                    .object_lock_retain_until_date(DateTime::from_secs(*until));
            }
            if legal_hold {
                put = put.object_lock_legal_hold_status(ObjectLockLegalHoldStatus::On);
            }
            let Ok(out) = put.send().await else { return };
            let version = out.version_id().unwrap().to_owned();
            let mut seen = seen.lock().unwrap();
            let at = seen.tick();
            let id = (key.to_owned(), version);
            seen.bodies.insert(id.clone(), body);
            if let Some((ObjectLockMode::Compliance, until)) = lock {
                seen.compliance.insert(id.clone(), (until, at));
            }
            if legal_hold {
                seen.held.entry(id).or_insert(at);
            }
        }
        Operation::DeleteKey(key) => {
            let _ = client.delete_object().bucket(BUCKET).key(key).send().await;
        }
        Operation::DeleteVersion {
            key,
            version,
            bypass,
        } => {
            let mut delete = client
                .delete_object()
                .bucket(BUCKET)
                .key(&key)
                .version_id(&version);
            if bypass {
                delete = delete.bypass_governance_retention(true);
            }
            if delete.send().await.is_ok() {
                seen.lock().unwrap().deleted.push((key, version, started));
            }
        }
        Operation::Retain {
            key,
            version,
            mode,
            until,
        } => {
            let answer = client
                .put_object_retention()
                .bucket(BUCKET)
                .key(&key)
                .version_id(&version)
                .retention(
                    ObjectLockRetention::builder()
                        .mode(mode.clone())
                        .retain_until_date(DateTime::from_secs(until))
                        .build(),
                )
                .send()
                .await;
            if answer.is_ok() && mode == ObjectLockRetentionMode::Compliance {
                let mut seen = seen.lock().unwrap();
                let at = seen.tick();
                let entry = seen.compliance.entry((key, version)).or_insert((until, at));
                entry.0 = entry.0.max(until);
            }
        }
        Operation::Hold { key, version, on } => {
            if !on {
                // Sent, whatever its answer: the hold may be off after it.
                seen.lock()
                    .unwrap()
                    .released
                    .insert((key.clone(), version.clone()));
            }
            let status = if on {
                ObjectLockLegalHoldStatus::On
            } else {
                ObjectLockLegalHoldStatus::Off
            };
            let answer = client
                .put_object_legal_hold()
                .bucket(BUCKET)
                .key(&key)
                .version_id(&version)
                .legal_hold(ObjectLockLegalHold::builder().status(status).build())
                .send()
                .await;
            if answer.is_ok() && on {
                let mut seen = seen.lock().unwrap();
                let at = seen.tick();
                seen.held.entry((key, version)).or_insert(at);
            }
        }
    }
}

/// The fragments of every existing data version of `key`, with whether
/// the version is locked for everyone.
async fn locked_fragments(cluster: &Cluster, key: &str) -> Vec<(VersionId, Vec<FragmentId>)> {
    let metadata = cluster.node(0).metadata();
    let now = cairn_node::clock::now_unix_ms();
    let mut locked = Vec::new();
    for version in existing_versions(metadata, BUCKET, key, None)
        .await
        .unwrap()
    {
        let VersionBody::Data { manifest, .. } = &version.body else {
            continue;
        };
        if !version.is_locked_for_everyone(now) {
            continue;
        }
        let manifest = read_manifest(metadata, BUCKET, manifest)
            .await
            .unwrap()
            .unwrap();
        let fragments = manifest.fragment_ids().collect();
        locked.push((version.version, fragments));
    }
    locked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_locked_version_is_lost_to_concurrent_puts_deletes_and_lock_changes() {
    let seed = test_seed("no_locked_version_is_lost");
    let mut rng = Rng(seed);
    let Setup {
        cluster, gateway, ..
    } = setup().await;
    gateway.stop().await;
    for n in 0..cluster.members.len() {
        cluster
            .node(n)
            .install_release_rules(std::sync::Arc::new(ReleaseRule::new(Collection::default())));
    }
    let root = random_secret();
    let gateways = vec![
        gateway_on(&cluster, 0, root).await,
        gateway_on(&cluster, 2, root).await,
        gateway_on(&cluster, 4, root).await,
    ];
    let key = gateways[0]
        .keys()
        .create_with(
            "races",
            cairn_protocol::records::permission::BYPASS_GOVERNANCE,
        )
        .await
        .unwrap();
    let clients: Vec<Client> = gateways
        .iter()
        .map(|g| client_for(g, &key.id, &key.secret))
        .collect();
    clients[0]
        .create_bucket()
        .bucket(BUCKET)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .unwrap();
    let seen = Mutex::new(Acknowledged::default());
    for _ in 0..ROUNDS {
        let known: Vec<(String, String)> = seen.lock().unwrap().bodies.keys().cloned().collect();
        let mut known = known;
        known.sort();
        let operations: Vec<(usize, Operation)> = (0..OPERATIONS_PER_ROUND)
            .map(|_| (rng.below(clients.len()), pick(&mut rng, &known)))
            .collect();
        let runs = operations
            .into_iter()
            .map(|(via, operation)| run(&clients[via], operation, &seen));
        futures::future::join_all(runs).await;
    }

    let seen = seen.into_inner().unwrap();
    let c = &clients[1];
    // No permanent delete that started after a lock was acknowledged
    // succeeded on that version.
    for (key, version, started) in &seen.deleted {
        let id = (key.clone(), version.clone());
        if let Some((_, at)) = seen.compliance.get(&id) {
            assert!(*at > *started, "{key} {version}: deleted under compliance");
        }
        if let Some(at) = seen.held.get(&id)
            && !seen.released.contains(&id)
        {
            assert!(
                *at > *started,
                "{key} {version}: deleted under a legal hold"
            );
        }
    }
    // Every version with a compliance retention or a legal hold never
    // lifted is there, whole, with at least the retention acknowledged.
    let must_stay = seen
        .compliance
        .keys()
        .chain(seen.held.keys().filter(|id| !seen.released.contains(*id)));
    let mut checked = 0;
    for (key, version) in must_stay {
        let got = c
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .version_id(version)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{key} {version}: {e:?}"));
        let body = got.body.collect().await.unwrap().into_bytes();
        assert_eq!(
            body.as_ref(),
            seen.bodies[&(key.clone(), version.clone())].as_slice(),
            "{key} {version}"
        );
        if let Some((until, _)) = seen.compliance.get(&(key.clone(), version.clone())) {
            let retention = c
                .get_object_retention()
                .bucket(BUCKET)
                .key(key)
                .version_id(version)
                .send()
                .await
                .unwrap();
            let retention = retention.retention().unwrap();
            assert_eq!(retention.mode(), Some(&ObjectLockRetentionMode::Compliance));
            assert!(retention.retain_until_date().unwrap().secs() >= *until);
        }
        checked += 1;
    }
    // Every locked version's fragments are locked wherever they are.
    for key in KEYS {
        for (version, fragments) in locked_fragments(&cluster, key).await {
            let mut copies = 0;
            for member in &cluster.members {
                let node = member.node.as_ref().unwrap();
                for id in &fragments {
                    if let Some(entry) = node.store().entry(id).unwrap() {
                        copies += 1;
                        assert!(
                            entry.lock.holds(cairn_node::clock::now_unix_ms()),
                            "{key} {version}: a copy of {id} is not locked"
                        );
                    }
                }
            }
            assert!(copies >= fragments.len(), "{key} {version}");
        }
    }
    eprintln!(
        "seed {seed}: {} versions written, {checked} locked checked, {} permanent deletes",
        seen.bodies.len(),
        seen.deleted.len()
    );
    for gateway in gateways {
        gateway.stop().await;
    }
    cluster.shutdown().await;
}
