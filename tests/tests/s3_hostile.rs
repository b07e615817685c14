//! Clients that try to wear the gateway down: connections that never send
//! a whole request, and requests signed with access key ids that do not
//! exist (s3s looks the id up before it checks any signature).

use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use cairn_gateway::{Gateway, GatewayConfig};
use cairn_model::kms::RootKey;
use cairn_protocol::erasure::Scheme;
use cairn_tests::s3::*;
use cairn_tests::{Cluster, random_secret};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn gateway_with(cluster: &Cluster, config: GatewayConfig) -> Gateway {
    Gateway::start(
        cluster.node(0).handle(),
        RootKey::from_bytes(random_secret()),
        config,
    )
    .await
    .unwrap()
}

async fn cluster() -> Cluster {
    let cluster = Cluster::start(&[1, 1, 1]).await.unwrap();
    cluster
        .install_map(cluster.map(), Scheme::new(1, 2).unwrap())
        .await
        .unwrap();
    cluster
}

/// Holds an HTTP/2 connection open the way a client that wants to keep its
/// slot would: it sends `opening` after the preface, answers each of the
/// gateway's pings, and every half second pings it and sends what
/// `repeat` gives for that tick. Returns how long the gateway kept the
/// connection, or `None` if it still had it after 60 s.
async fn hold_http2(
    address: std::net::SocketAddr,
    opening: &[u8],
    repeat: impl Fn(u64) -> Vec<u8>,
) -> Option<Duration> {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(opening);
    stream.write_all(&hello).await.unwrap();
    let opened = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        let mut received: Vec<u8> = Vec::new();
        let mut buffer = vec![0u8; 4096];
        let mut every = tokio::time::interval(Duration::from_millis(500));
        let mut sent = 0u64;
        loop {
            tokio::select! {
                read = stream.read(&mut buffer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => received.extend_from_slice(&buffer[..n]),
                },
                _ = every.tick() => {
                    let mut ping = vec![0, 0, 8, 6, 0, 0, 0, 0, 0];
                    ping.extend_from_slice(&sent.to_be_bytes());
                    ping.extend_from_slice(&repeat(sent));
                    sent += 1;
                    if stream.write_all(&ping).await.is_err() {
                        return;
                    }
                }
            }
            // Frames: length (24 bits), type, flags, stream id, payload.
            while received.len() >= 9 {
                let length = usize::from(received[0]) << 16
                    | usize::from(received[1]) << 8
                    | usize::from(received[2]);
                if received.len() < 9 + length {
                    break;
                }
                let (kind, flags) = (received[3], received[4]);
                if kind == 6 && flags & 1 == 0 {
                    let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                    ack.extend_from_slice(&received[9..17]);
                    if stream.write_all(&ack).await.is_err() {
                        return;
                    }
                }
                received.drain(..9 + length);
            }
        }
    })
    .await;
    closed.ok().map(|()| opened.elapsed())
}

/// HTTP/2 connections that make no progress are closed once their idle
/// time is over, though bytes keep moving on them (pings both ways): one
/// that never sends a request, one whose request's answer cannot be sent
/// because the client opened no flow-control window for it, and one that
/// sends a request the gateway refuses every half second. (Before, any
/// byte counted as use, so pings alone held a connection slot for ever;
/// then a request in flight did; then any request did.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_that_make_no_progress_are_closed() {
    let cluster = cluster().await;
    let idle = Duration::from_secs(2);
    let gateway = gateway_with(
        &cluster,
        GatewayConfig {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: idle,
            ..GatewayConfig::default()
        },
    )
    .await;
    // An empty SETTINGS frame (RFC 9113, 3.4).
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    // HEADERS (END_STREAM, END_HEADERS) on stream `id` for an unsigned
    // GET / (HPACK: indexed :method GET, :scheme http, :path /, then a
    // literal :authority): the gateway refuses it at once.
    let get = |id: u32| {
        let block = [&[0x82u8, 0x86, 0x84, 0x41, 9][..], b"localhost"].concat();
        let mut frame = vec![0u8, 0, block.len() as u8, 1, 5];
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(&block);
        frame
    };
    // SETTINGS_INITIAL_WINDOW_SIZE = 0, then one such GET: its answer
    // cannot be sent.
    let mut closed_window = vec![0u8, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0];
    closed_window.extend_from_slice(&get(1));
    let nothing = |_: u64| Vec::new();
    let refused_again = |tick: u64| get(2 * tick as u32 + 1);
    type Repeat<'a> = &'a dyn Fn(u64) -> Vec<u8>;
    let cases: [(&str, &[u8], Repeat); 3] = [
        ("no request", &settings, &nothing),
        ("an answer it cannot send", &closed_window, &nothing),
        (
            "a refused request every half second",
            &settings,
            &refused_again,
        ),
    ];
    for (what, opening, repeat) in cases {
        let held = hold_http2(gateway.address(), opening, repeat).await;
        let Some(held) = held else {
            panic!("a connection with {what} was still open after 60 s");
        };
        assert!(
            held >= idle,
            "a connection with {what} closed after {held:?}"
        );
    }
    gateway.stop().await;
    cluster.shutdown().await;
}

/// Slow-loris: hundreds of connections that send part of a request's
/// headers, one byte, or nothing, and wait. The gateway closes each once its
/// header-read time is over, serves at most its connection cap at once,
/// and a normal client is served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_that_never_finish_a_request_are_cut_off_and_others_are_served() {
    let cluster = cluster().await;
    let gateway = gateway_with(
        &cluster,
        GatewayConfig {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            ..GatewayConfig::default()
        },
    )
    .await;
    let address = gateway.address();
    let mut slow = Vec::new();
    for n in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let start: Vec<u8> = match n % 3 {
            // Part of a request's headers.
            0 => format!("PUT /slow/k HTTP/1.1\r\nHost: {address}\r\nX-Slow: ").into_bytes(),
            // One byte that could begin either protocol's preface.
            1 => b"P".to_vec(),
            // Nothing.
            _ => Vec::new(),
        };
        stream.write_all(&start).await.unwrap();
        slow.push(stream);
    }
    // A normal client is served (a failure bound, not a wait).
    let normal = async {
        let key = gateway.keys().create("normal").await.unwrap();
        let client = client_for(&gateway, &key.id, &key.secret);
        client.create_bucket().bucket("slow").send().await.unwrap();
        client
            .put_object()
            .bucket("slow")
            .key("k")
            .body(ByteStream::from_static(b"served"))
            .send()
            .await
            .unwrap();
        let read = client
            .get_object()
            .bucket("slow")
            .key("k")
            .send()
            .await
            .unwrap();
        assert_eq!(
            &read.body.collect().await.unwrap().into_bytes()[..],
            b"served"
        );
    };
    tokio::time::timeout(Duration::from_secs(300), normal)
        .await
        .expect("a normal client was not served");
    // Every slow connection is closed by the gateway (EOF or reset), none
    // is answered with a request's response.
    let closed: FuturesUnordered<_> = slow
        .iter_mut()
        .map(|stream| async move {
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            answer
        })
        .collect();
    let answers = tokio::time::timeout(Duration::from_secs(300), closed.collect::<Vec<_>>())
        .await
        .expect("slow connections were kept open");
    for answer in answers {
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty()
                || text.starts_with("HTTP/1.1 408")
                || text.starts_with("HTTP/1.1 400"),
            "{text}"
        );
    }
    gateway.stop().await;
    cluster.shutdown().await;
}

/// Requests signed with random access key ids of the right shape: each is
/// refused, and together they cost a few listings of the key ids, not one
/// quorum read each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_access_key_ids_are_answered_without_a_read_each() {
    let cluster = cluster().await;
    let gateway = gateway_with(&cluster, GatewayConfig::default()).await;
    let before = gateway.keys().metadata_reads();
    let started = Instant::now();
    const REQUESTS: usize = 2000;
    let mut requests = FuturesUnordered::new();
    let mut refused = 0;
    for n in 0..REQUESTS {
        let id = format!("CKRANDOM{n:012}");
        let client = client_for(&gateway, &id, "not-a-secret");
        requests.push(async move { client.list_buckets().send().await });
        if requests.len() >= 32
            && let Some(answer) = requests.next().await
        {
            let error = answer.unwrap_err().into_service_error();
            assert_eq!(code(&error), "InvalidAccessKeyId");
            refused += 1;
        }
    }
    while let Some(answer) = requests.next().await {
        let error = answer.unwrap_err().into_service_error();
        assert_eq!(code(&error), "InvalidAccessKeyId");
        refused += 1;
    }
    assert_eq!(refused, REQUESTS);
    // One listing (a page or two) per second at most, whatever the rate.
    let reads = gateway.keys().metadata_reads() - before;
    let allowed = 2 * (started.elapsed().as_secs() + 2);
    assert!(
        reads <= allowed,
        "{reads} metadata reads for {REQUESTS} unknown ids in {:?}",
        started.elapsed()
    );
    // A key made now works at once on this gateway.
    let key = gateway.keys().create("real").await.unwrap();
    let client = client_for(&gateway, &key.id, &key.secret);
    client.list_buckets().send().await.unwrap();
    gateway.stop().await;
    cluster.shutdown().await;
}
