//! Helpers for tests and benchmarks that drive real `cairn` processes:
//! running admin commands, enrolling nodes, writing their configuration,
//! starting `cairn serve` and `cairn dev` and reading what they print.
//! Included with `#[path]` by the binary's tests and benchmarks, which are
//! the only targets that know where the built binary is.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const CAIRN: &str = env!("CARGO_BIN_EXE_cairn");

pub fn run(args: &[&str]) -> Output {
    let output = Command::new(CAIRN).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The value after `label` in the command's standard output.
pub fn printed(output: &Output, label: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in {stdout}"))
        .trim()
        .to_owned()
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Server {
    pub fn start(config: &Path, env: &[(&str, String)]) -> Self {
        let mut command = Command::new(CAIRN);
        command
            .args(["serve", "-c", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for a log line containing every one of `needles`.
    pub fn wait_for(&self, needles: &[&str]) -> String {
        self.wait_for_within(needles, Duration::from_secs(30))
    }

    /// The same, for up to `patience` (work that waits on timers of the
    /// cluster's own, set in its files).
    pub fn wait_for_within(&self, needles: &[&str], patience: Duration) -> String {
        let deadline = std::time::Instant::now() + patience;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if needles.iter().all(|n| line.contains(n)) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("no log line with {needles:?}; saw:\n{}", seen.join("\n"));
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

/// A test that panics leaves no process running behind it.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A process stopped with SIGSTOP: it keeps its sockets and its QUIC
/// connections but answers nothing. Dropping this resumes it (SIGCONT),
/// also when a test panics, so no stopped process is left behind.
pub struct Frozen {
    pid: u32,
}

impl Frozen {
    pub fn stop(server: &Server) -> Self {
        let pid = server.child.id();
        signal(pid, "-STOP");
        Self { pid }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // No assertion: a panic while unwinding would abort the test run.
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid.to_string()])
            .status();
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([name, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {name} {pid}: {status}");
}

pub fn write_config(dir: &Path, name: &str, cluster: &str, port: u16) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "data_dir = \"{data}\"\ncluster = \"{cluster}\"\ncertificate = \"{cert}\"\nlisten = \"/ip4/127.0.0.1/udp/{port}/quic-v1\"\ncapacity_bytes = 1073741824\n",
        data = dir.join(name).display(),
        cert = dir.join(format!("{name}.cert")).display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `dir/name.cert`; returns its node id.
pub fn enrol(dir: &Path, key: &Path, name: &str, site: &str) -> String {
    let data = dir.join(name);
    let id = printed(
        &run(&["admin", "node", "id", "--data-dir", data.to_str().unwrap()]),
        "node id:",
    );
    let cert = dir.join(format!("{name}.cert"));
    run(&[
        "admin",
        "node",
        "enroll",
        "--cluster-key",
        key.to_str().unwrap(),
        "--node",
        &id,
        "--site",
        site,
        "--out",
        cert.to_str().unwrap(),
    ]);
    id
}

/// Starts `cairn dev` and returns it with its endpoint, key and secret.
pub fn start_dev(dir: &Path, port: u16) -> (Child, String, String, String) {
    let mut child = Command::new(CAIRN)
        .args([
            "dev",
            "--data-dir",
            dir.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut endpoint, mut key, mut secret) = (None, None, None);
    for line in stdout.lines() {
        let line = line.unwrap();
        let value = |label: &str| line.trim().strip_prefix(label).map(|v| v.trim().to_owned());
        endpoint = endpoint.or(value("S3 endpoint:"));
        key = key.or(value("access key:"));
        secret = secret.or(value("secret key:"));
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    (child, endpoint.unwrap(), key.unwrap(), secret.unwrap())
}

pub fn stop_gracefully(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "cairn dev exited with {status}");
}

/// A cluster of `cairn serve` processes: storage nodes in sites, and one
/// more process that serves S3 and holds no data (enrolled, not in the map).
pub struct ProcessCluster {
    pub dir: tempfile::TempDir,
    pub gateway: Server,
    pub nodes: Vec<Server>,
    /// Each storage node's data directory, in the order of `nodes`.
    pub data_dirs: Vec<std::path::PathBuf>,
    /// Each storage node's configuration file, in the order of `nodes`.
    pub node_configs: Vec<std::path::PathBuf>,
    /// The gateway's QUIC address, which storage nodes bootstrap from.
    pub bootstrap: String,
    pub endpoint: String,
    /// The gateway's self-signed certificate, when it speaks TLS.
    pub tls_certificate: Option<std::path::PathBuf>,
    pub access_key: String,
    pub secret_key: String,
    /// What `cairn admin key` needs: the cluster key, a peer, the root key.
    pub admin_args: Vec<String>,
}

impl ProcessCluster {
    /// `nodes_per_site[s]` storage nodes in site `s`, scheme `k+m`.
    #[allow(dead_code)] // Not every includer starts a plain-HTTP cluster.
    pub fn start(nodes_per_site: &[usize], k: u8, m: u8) -> Self {
        Self::start_with_tls(nodes_per_site, k, m, false, None)
    }

    /// The same, with the gateway's S3 listener on TLS with a self-signed
    /// certificate (`[s3] tls_self_signed`) when `tls` is set, and the
    /// storage nodes' repair passing every `repair_every_seconds` if given.
    pub fn start_with_tls(
        nodes_per_site: &[usize],
        k: u8,
        m: u8,
        tls: bool,
        repair_every_seconds: Option<u64>,
    ) -> Self {
        let node_toml = repair_every_seconds
            .map(|every| format!("[repair]\nevery_seconds = {every}\n"))
            .unwrap_or_default();
        Self::start_configured(nodes_per_site, k, m, tls, &node_toml, "")
    }

    /// The same, with `node_toml` added to each storage node's file and
    /// `everyone_toml` to every process's (sections the gateway's file
    /// does not have: it has `[s3]`, `[repair]` and `[scrub]`).
    pub fn start_configured(
        nodes_per_site: &[usize],
        k: u8,
        m: u8,
        tls: bool,
        node_toml: &str,
        everyone_toml: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cluster.key");
        let cluster = printed(
            &run(&["admin", "cluster", "init", "--key", key.to_str().unwrap()]),
            "cluster id:",
        );
        let root = dir.path().join("root.key");
        run(&["admin", "root-key", "--out", root.to_str().unwrap()]);
        let gateway_id = enrol(dir.path(), &key, "gateway", "site-0");
        let gateway_port = free_udp_port();
        let gateway_config = write_config(dir.path(), "gateway", &cluster, gateway_port);
        let s3_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut text = std::fs::read_to_string(&gateway_config).unwrap();
        text += &format!(
            "[s3]\nlisten = \"127.0.0.1:{s3_port}\"\nroot_key_file = \"{}\"\ntls_self_signed = {tls}\naccess_key_cache_seconds = 0\n[repair]\nsegments_at_once = 2\n[scrub]\nbytes_per_second = 8388608\n{everyone_toml}",
            root.display()
        );
        std::fs::write(&gateway_config, text).unwrap();
        let gateway = Server::start(&gateway_config, &[]);
        gateway.wait_for(&["S3 gateway listening"]);
        let first = format!("/ip4/127.0.0.1/udp/{gateway_port}/quic-v1");

        let mut map = format!("version = 1\ndata_fragments = {k}\nparity_fragments = {m}\n");
        let mut nodes = Vec::new();
        let mut data_dirs = Vec::new();
        let mut node_configs = Vec::new();
        for (site, &count) in nodes_per_site.iter().enumerate() {
            for n in 0..count {
                let name = format!("s{site}n{n}");
                let id = enrol(dir.path(), &key, &name, &format!("site-{site}"));
                let config = write_config(dir.path(), &name, &cluster, free_udp_port());
                let mut text = std::fs::read_to_string(&config).unwrap();
                text += node_toml;
                text += everyone_toml;
                std::fs::write(&config, text).unwrap();
                let server = Server::start(&config, &[("CAIRN_BOOTSTRAP", first.clone())]);
                node_configs.push(config);
                server.wait_for(&["member verified", &gateway_id]);
                nodes.push(server);
                data_dirs.push(dir.path().join(&name));
                map += &format!(
                    "[[node]]\nid = \"{id}\"\nsite = \"site-{site}\"\ncapacity_bytes = 1099511627776\n"
                );
            }
        }
        sign_and_push_map(dir.path(), &key, &map, &first);
        let key_arg = key.to_str().unwrap();
        let created = run(&[
            "admin",
            "key",
            "create",
            "--cluster-key",
            key_arg,
            "--peer",
            &first,
            "--root-key",
            root.to_str().unwrap(),
        ]);
        let admin_args = [
            "--cluster-key",
            key_arg,
            "--peer",
            &first,
            "--root-key",
            root.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        Self {
            admin_args,
            access_key: printed(&created, "access key:"),
            secret_key: printed(&created, "secret key:"),
            endpoint: if tls {
                format!("https://localhost:{s3_port}")
            } else {
                format!("http://127.0.0.1:{s3_port}")
            },
            tls_certificate: tls.then(|| dir.path().join("gateway").join("s3-tls-cert.pem")),
            dir,
            gateway,
            nodes,
            data_dirs,
            node_configs,
            bootstrap: first,
        }
    }

    /// Kills storage node `index` (SIGKILL).
    pub fn kill_node(&mut self, index: usize) {
        let child = &mut self.nodes[index].child;
        let _ = child.kill();
        child.wait().unwrap();
    }

    /// Starts storage node `index` again (after a kill), from its file.
    pub fn restart_node(&mut self, index: usize) {
        let server = Server::start(
            &self.node_configs[index],
            &[("CAIRN_BOOTSTRAP", self.bootstrap.clone())],
        );
        server.wait_for(&["member verified"]);
        self.nodes[index] = server;
    }

    pub fn shutdown(self) {
        self.gateway.kill();
        for node in self.nodes {
            node.kill();
        }
    }
}

/// A process's resident memory now and at its peak, in MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// An aws-sdk-s3 client for a Cairn endpoint (path-style, us-east-1).
#[allow(dead_code)] // Not every includer uses plain HTTP.
pub fn s3_client(endpoint: &str, key: &str, secret: &str) -> aws_sdk_s3::Client {
    s3_client_trusting(endpoint, key, secret, None)
}

/// The same, trusting only the PEM certificate `ca` for an https endpoint.
pub fn s3_client_trusting(
    endpoint: &str,
    key: &str,
    secret: &str,
    ca: Option<&[u8]>,
) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};
    let mut config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(key, secret, None, None, "cairn"))
        .force_path_style(true);
    if let Some(ca) = ca {
        let trust = TrustStore::empty().with_pem_certificate(ca);
        config = config.http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
                .tls_context(
                    TlsContext::builder()
                        .with_trust_store(trust)
                        .build()
                        .unwrap(),
                )
                .build_https(),
        );
    }
    aws_sdk_s3::Client::from_conf(config.build())
}

/// Deterministic bytes that do not compress, from a seed (xorshift64).
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Writes `map` (TOML) to `dir/map.toml`, signs it with the cluster key and
/// pushes it to `peer`.
pub fn sign_and_push_map(dir: &Path, cluster_key: &Path, map: &str, peer: &str) {
    let map_toml = dir.join("map.toml");
    std::fs::write(&map_toml, map).unwrap();
    let map_bin = dir.join("map.bin");
    let key = cluster_key.to_str().unwrap();
    let (toml, bin) = (map_toml.to_str().unwrap(), map_bin.to_str().unwrap());
    run(&[
        "admin",
        "map",
        "sign",
        "--cluster-key",
        key,
        "--map",
        toml,
        "--out",
        bin,
    ]);
    run(&[
        "admin",
        "map",
        "push",
        "--cluster-key",
        key,
        "--map",
        bin,
        "--peer",
        peer,
    ]);
}
