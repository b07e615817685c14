//! The `cairn` binary end to end: a cluster key, enrolled nodes started as
//! real processes on 127.0.0.1 and killed with SIGKILL and started again, a
//! cluster map signed and pushed to one node and spread to the others, a
//! key file that others can read refused, and metadata replicas killed in
//! the middle of writes and of a compare-and-set race, and `cairn dev`
//! serving S3 across a restart.

#[path = "process_support.rs"]
mod process_support;

use std::time::Duration;

use process_support::*;
use std::process::Command;

#[test]
fn enrolled_nodes_run_as_processes_survive_kill_dash_nine_and_refuse_an_open_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    let cluster = printed(
        &run(&["admin", "cluster", "init", "--key", key.to_str().unwrap()]),
        "cluster id:",
    );
    // The cluster key is never overwritten.
    let again = Command::new(CAIRN)
        .args(["admin", "cluster", "init", "--key", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));

    let ids: Vec<String> = [("a", "site-a"), ("b", "site-b")]
        .into_iter()
        .map(|(name, site)| enrol(dir.path(), &key, name, site))
        .collect();
    let (port_a, port_b) = (free_udp_port(), free_udp_port());
    let config_a = write_config(dir.path(), "a", &cluster, port_a);
    let config_b = write_config(dir.path(), "b", &cluster, port_b);
    let bootstrap = vec![(
        "CAIRN_BOOTSTRAP",
        format!("/ip4/127.0.0.1/udp/{port_a}/quic-v1"),
    )];

    let a = Server::start(&config_a, &[]);
    a.wait_for(&["listening"]);
    let b = Server::start(&config_b, &bootstrap);
    b.wait_for(&["member verified", &ids[0], "site-a"]);
    a.wait_for(&["member verified", &ids[1], "site-b"]);

    // SIGKILL, then the same node comes back with the same identity.
    b.kill();
    let b = Server::start(&config_b, &bootstrap);
    b.wait_for(&["member verified", &ids[0]]);

    // A map is signed, handed to node a, and reaches node b through it.
    let map_toml = dir.path().join("map.toml");
    let node_entry = |id: &str, site: &str| {
        format!("[[node]]\nid = \"{id}\"\nsite = \"{site}\"\ncapacity_bytes = 1073741824\n")
    };
    let write_map = |version: u64| {
        let text = format!(
            "version = {version}\ndata_fragments = 1\nparity_fragments = 1\n{}{}",
            node_entry(&ids[0], "site-a"),
            node_entry(&ids[1], "site-b")
        );
        std::fs::write(&map_toml, text).unwrap();
    };
    let map_bin = dir.path().join("map.bin");
    let sign = [
        "admin",
        "map",
        "sign",
        "--cluster-key",
        key.to_str().unwrap(),
        "--map",
        map_toml.to_str().unwrap(),
        "--out",
        map_bin.to_str().unwrap(),
    ];
    write_map(2);
    run(&sign);
    let push = [
        "admin",
        "map",
        "push",
        "--cluster-key",
        key.to_str().unwrap(),
        "--map",
        map_bin.to_str().unwrap(),
        "--peer",
        &format!("/ip4/127.0.0.1/udp/{port_a}/quic-v1"),
    ];
    let pushed = run(&push);
    assert!(printed(&pushed, "node").contains("holds cluster map version 2"));
    b.wait_for(&["adopted a newer cluster map", "version=2"]);
    let signed = std::fs::read(&map_bin).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("b/cluster-map.bin")).unwrap(),
        signed
    );
    // An older map is refused with the version to use instead.
    write_map(1);
    run(&sign);
    let stale = Command::new(CAIRN).args(push).output().unwrap();
    assert!(!stale.status.success());
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(
        stderr.contains("already holds map version 2") && stderr.contains("as version 3"),
        "{stderr}"
    );
    // A map whose placement cannot survive a site loss is not signed.
    std::fs::write(
        &map_toml,
        format!(
            "version = 3\ndata_fragments = 2\nparity_fragments = 2\n{}",
            node_entry(&ids[0], "site-a")
        ),
    )
    .unwrap();
    let unsafe_map = Command::new(CAIRN).args(sign).output().unwrap();
    assert!(!unsafe_map.status.success());
    assert!(
        String::from_utf8_lossy(&unsafe_map.stderr).contains("cannot survive the loss of a site")
    );
    b.kill();

    // A key file others can read stops the node with the fix in the message.
    let key_b = dir.path().join("b/node.key");
    std::fs::set_permissions(&key_b, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let refused = Command::new(CAIRN)
        .args(["serve", "-c", config_b.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    a.kill();
}

/// Enrols a node for `site`: its identity in `dir/name`, its certificate in
#[test]
fn metadata_replicas_killed_with_sigkill_lose_no_acknowledged_write_and_no_decision() {
    use cairn_node::config::ServeConfig;
    use cairn_node::swarm::Node;
    use cairn_protocol::meta::{Partition, Register, RowKey, RowValue, Table};
    use cairn_protocol::metarpc::RegisterKey;

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    let cluster = printed(
        &run(&["admin", "cluster", "init", "--key", key.to_str().unwrap()]),
        "cluster id:",
    );
    // Three replicas as processes, one per site; the coordinator runs in
    // this test, enrolled like any node but not in the map.
    let names = ["a", "b", "c"];
    let ids: Vec<String> = names
        .iter()
        .map(|n| enrol(dir.path(), &key, n, &format!("site-{n}")))
        .collect();
    enrol(dir.path(), &key, "coordinator", "site-a");
    let ports: Vec<u16> = names.iter().map(|_| free_udp_port()).collect();
    let configs: Vec<_> = names
        .iter()
        .zip(&ports)
        .map(|(n, p)| write_config(dir.path(), n, &cluster, *p))
        .collect();
    let first = format!("/ip4/127.0.0.1/udp/{}/quic-v1", ports[0]);
    let bootstrap = vec![("CAIRN_BOOTSTRAP", first.clone())];
    let a = Server::start(&configs[0], &[]);
    a.wait_for(&["listening"]);
    let mut b = Server::start(&configs[1], &bootstrap);
    let mut c = Server::start(&configs[2], &bootstrap);
    b.wait_for(&["member verified", &ids[0]]);
    c.wait_for(&["member verified", &ids[0]]);

    let mut text = "version = 1\ndata_fragments = 1\nparity_fragments = 1\n".to_owned();
    for (id, n) in ids.iter().zip(names) {
        text +=
            &format!("[[node]]\nid = \"{id}\"\nsite = \"site-{n}\"\ncapacity_bytes = 1073741824\n");
    }
    sign_and_push_map(dir.path(), &key, &text, &first);

    let coordinator_config = write_config(dir.path(), "coordinator", &cluster, free_udp_port());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut settings = ServeConfig::from_file(&coordinator_config).unwrap();
    settings.bootstrap = vec![first.clone()];
    let (node_config, identity) = settings.into_node_config().unwrap();
    let node = runtime
        .block_on(Node::start(node_config, identity))
        .unwrap();
    assert!(runtime.block_on(node.wait_for_map_version(1, Duration::from_secs(30))));
    let meta = node.metadata().clone();
    let partition = Partition::bucket("killed");
    // Every replica connected before the test begins.
    for id in &ids {
        let id = cairn_protocol::ids::NodeId::from_hex(id).unwrap();
        assert!(runtime.block_on(node.wait_for_member(&id, Duration::from_secs(30))));
    }

    // 30 concurrent conditional creates of one register; b is killed with
    // SIGKILL 20 ms in. Exactly one wins.
    let register = RegisterKey {
        partition: partition.clone(),
        name: b"once".to_vec(),
    };
    let creates: Vec<_> = (0..30u32)
        .map(|n| {
            let (meta, register) = (meta.clone(), register.clone());
            runtime.spawn(async move {
                let mine = format!("writer {n}").into_bytes();
                meta.compare_and_set(register, |current| match current {
                    None => Ok(Some(mine.clone())),
                    Some(existing) => Err(existing.to_vec()),
                })
                .await
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    b.kill();
    let outcomes: Vec<_> = creates
        .into_iter()
        .map(|c| runtime.block_on(c).unwrap().unwrap())
        .collect();
    let winners: Vec<&Vec<u8>> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok()?.as_ref())
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let winner = winners[0].clone();
    assert!(
        outcomes
            .iter()
            .all(|o| o.as_ref().err().is_none_or(|seen| *seen == winner))
    );

    // b comes back; writes run while c is killed and started again.
    b = Server::start(&configs[1], &bootstrap);
    b.wait_for(&["member verified", &ids[0]]);
    let writing = {
        let (meta, partition) = (meta.clone(), partition.clone());
        runtime.spawn(async move {
            let mut acknowledged = Vec::new();
            let started = std::time::Instant::now();
            let mut n = 0u64;
            while started.elapsed() < Duration::from_secs(3) {
                let row = (
                    RowKey::new(
                        Partition::cluster(),
                        Table::Buckets,
                        format!("bucket-{n}").into_bytes(),
                    ),
                    RowValue::Register(Register {
                        at: meta.timestamp(),
                        value: Some(n.to_be_bytes().to_vec()),
                    }),
                );
                let in_bucket = RowKey::new(partition.clone(), Table::Uploads, {
                    let mut sort = format!("key-{n}").into_bytes();
                    sort.push(0);
                    sort.extend_from_slice(&[7; 16]);
                    sort
                });
                let upload = RowValue::Register(Register {
                    at: meta.timestamp(),
                    value: Some(vec![1]),
                });
                if meta.write(vec![row.clone()]).await.is_ok() {
                    acknowledged.push(row);
                }
                if meta
                    .write(vec![(in_bucket.clone(), upload.clone())])
                    .await
                    .is_ok()
                {
                    acknowledged.push((in_bucket, upload));
                }
                n += 1;
            }
            acknowledged
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.kill();
    std::thread::sleep(Duration::from_millis(1000));
    c = Server::start(&configs[2], &bootstrap);
    c.wait_for(&["member verified", &ids[0]]);
    let acknowledged = runtime.block_on(writing).unwrap();
    assert!(
        acknowledged.len() > 20,
        "only {} writes acknowledged",
        acknowledged.len()
    );
    eprintln!(
        "{} writes acknowledged across two SIGKILLs",
        acknowledged.len()
    );

    // Every acknowledged write is read back, and the decision stands.
    runtime.block_on(async {
        for (key, value) in &acknowledged {
            let read = meta.read(vec![key.clone()]).await.unwrap();
            assert_eq!(read, vec![Some(value.clone())], "{key:?}");
        }
        let again = meta
            .compare_and_set(register, |current| {
                Err::<Option<Vec<u8>>, _>(current.map(<[u8]>::to_vec))
            })
            .await
            .unwrap();
        assert_eq!(again, Err(Some(winner)));
        node.shutdown().await;
    });
    a.kill();
    b.kill();
    c.kill();
}

#[test]
fn cairn_dev_serves_s3_and_keeps_objects_and_credentials_across_a_restart() {
    use aws_sdk_s3::primitives::ByteStream;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev-data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();

    let (mut child, endpoint, key, secret) = start_dev(&data, port);
    assert_eq!(endpoint, format!("http://127.0.0.1:{port}"));
    runtime.block_on(async {
        let s3 = s3_client(&endpoint, &key, &secret);
        s3.create_bucket().bucket("kept").send().await.unwrap();
        s3.put_object()
            .bucket("kept")
            .key("blob")
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap();
    });
    stop_gracefully(&mut child);

    let (mut child, endpoint, key_again, secret_again) = start_dev(&data, port);
    assert_eq!((&key_again, &secret_again), (&key, &secret));
    runtime.block_on(async {
        let s3 = s3_client(&endpoint, &key, &secret);
        let object = s3
            .get_object()
            .bucket("kept")
            .key("blob")
            .send()
            .await
            .unwrap();
        let back = object.body.collect().await.unwrap().into_bytes();
        assert!(
            back.as_ref() == body.as_slice(),
            "the object changed across the restart"
        );
    });
    stop_gracefully(&mut child);
}

#[test]
fn a_served_node_with_an_s3_section_serves_keys_made_by_the_admin_commands() {
    use aws_sdk_s3::primitives::ByteStream;

    // Three storage nodes and a gateway process serving S3 over TLS with
    // the self-signed certificate it made, keys made by the admin commands
    // through the gateway's QUIC address.
    // Repair passes every second, for `cairn admin status` to report.
    let cluster = ProcessCluster::start_with_tls(&[1, 1, 1], 1, 1, true, Some(1));
    let certificate = std::fs::read(cluster.tls_certificate.as_ref().unwrap()).unwrap();
    let admin = |command: &[&str]| {
        let args: Vec<&str> = ["admin", "key"]
            .into_iter()
            .chain(command.iter().copied())
            .chain(cluster.admin_args.iter().map(String::as_str))
            .collect();
        run(&args)
    };
    let created = admin(&["create", "--name", "ci"]);
    let (id, secret) = (
        printed(&created, "access key:"),
        printed(&created, "secret key:"),
    );
    let listed = admin(&["list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&id));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = s3_client_trusting(&cluster.endpoint, &id, &secret, Some(&certificate));
    runtime.block_on(async {
        client
            .create_bucket()
            .bucket("served")
            .send()
            .await
            .unwrap();
        client
            .put_object()
            .bucket("served")
            .key("k")
            .body(ByteStream::from_static(b"through cairn serve"))
            .send()
            .await
            .unwrap();
        let object = client
            .get_object()
            .bucket("served")
            .key("k")
            .send()
            .await
            .unwrap();
        let bytes = object.body.collect().await.unwrap().into_bytes();
        assert_eq!(bytes.as_ref(), b"through cairn serve");
    });

    // `cairn admin status` shows the three nodes up, and the object's one
    // segment whole once the responsible node's repair has passed over it.
    let status = || {
        let mut args = vec!["admin", "status"];
        args.extend(cluster.admin_args[..4].iter().map(String::as_str));
        String::from_utf8_lossy(&run(&args).stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let report = loop {
        let report = status();
        if report.contains("checked 1, at full strength 1") && report.matches(" ok ").count() == 3 {
            break report;
        }
        assert!(std::time::Instant::now() < deadline, "{report}");
        // Each run joins the cluster: leave the nodes a moment between.
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(report.contains("unreadable: 0"), "{report}");
    assert!(report.contains("(1 fragments;"), "{report}");
    // `--wait` returns once every node has passed again and nothing is
    // degraded, with its progress as plain lines (no terminal here).
    let mut args = vec!["admin", "status", "--wait"];
    args.extend(cluster.admin_args[..4].iter().map(String::as_str));
    let waited = String::from_utf8_lossy(&run(&args).stdout).into_owned();
    assert!(
        waited.contains("of 1 segments at full strength"),
        "{waited}"
    );
    assert!(
        waited.contains("every segment is at full strength"),
        "{waited}"
    );

    admin(&["delete", &id]);
    // The served gateway caches no access key (access_key_cache_seconds = 0).
    runtime.block_on(async {
        let refused = client.list_buckets().send().await.unwrap_err();
        let code = aws_sdk_s3::error::ProvideErrorMetadata::code(&refused.into_service_error())
            .map(str::to_owned);
        assert_eq!(code.as_deref(), Some("InvalidAccessKeyId"));
    });
    cluster.shutdown();
}
