//! The HTTP side: the listener, the host parser, and the checks s3s 0.14
//! leaves to its user (spec/gateway.md, "Request checks"). They live here,
//! in one place, to be deleted when s3s does them itself.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use s3s::host::{S3Host, VirtualHost};
use s3s::service::S3Service;
use s3s::{Body, HttpResponse, S3Result};
use tokio::net::TcpListener;

use crate::objects::MAX_PUT_BYTES;

/// Presigned URLs live at most a week, as in S3.
pub const MAX_PRESIGNED_SECONDS: u64 = 7 * 24 * 3600;

/// Virtual-hosted-style requests name the bucket in the host
/// (`bucket.domain`); any other host (an IP address, `localhost`, a name
/// the gateway was not told about) is path-style.
pub struct CairnHost {
    domains: Vec<String>,
}

impl CairnHost {
    pub fn new(domains: Vec<String>) -> Self {
        Self { domains }
    }
}

impl S3Host for CairnHost {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<VirtualHost<'a>> {
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        };
        for domain in &self.domains {
            if let Some(bucket) = name
                .strip_suffix(domain.as_str())
                .and_then(|rest| rest.strip_suffix('.'))
                && !bucket.is_empty()
            {
                return Ok(VirtualHost::new(domain.as_str()).with_bucket(bucket));
            }
        }
        Ok(VirtualHost::new(host))
    }
}

/// An S3 error answered before s3s sees the request.
fn refuse(status: u16, code: &str, message: &str) -> HttpResponse {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{}</Message></Error>",
        message
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    );
    let mut response = HttpResponse::new(Body::from(xml));
    *response.status_mut() = http::StatusCode::from_u16(status).expect("a valid status");
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    response
}

/// A query parameter's raw value, its name compared case-insensitively.
pub(crate) fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The region named in a SigV4 credential scope
/// (`AKID/20261124/us-east-1/s3/aws4_request`).
fn credential_region(credential: &str) -> Option<&str> {
    credential.split('/').nth(2)
}

/// The checks s3s 0.14 does not make; `None` lets the request through.
pub fn check_request<B>(request: &http::Request<B>, region: &str) -> Option<HttpResponse> {
    let headers = request.headers();
    let query = request.uri().query().unwrap_or("");
    let authorization = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let unsupported = "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256.";
    if authorization.starts_with("AWS ")
        || (query_param(query, "AWSAccessKeyId").is_some()
            && query_param(query, "Signature").is_some())
    {
        return Some(refuse(400, "InvalidRequest", unsupported));
    }
    if let Some(rest) = authorization.strip_prefix("AWS4-HMAC-SHA256") {
        let credential = rest
            .split(',')
            .filter_map(|p| p.trim().strip_prefix("Credential="))
            .next();
        if let Some(theirs) = credential.and_then(credential_region)
            && theirs != region
        {
            return Some(refuse(
                400,
                "AuthorizationHeaderMalformed",
                &format!(
                    "the authorization header is malformed; the region '{theirs}' is wrong; expecting '{region}'"
                ),
            ));
        }
    }
    if query_param(query, "X-Amz-Algorithm").is_some() {
        let credential = query_param(query, "X-Amz-Credential")
            .map(|c| c.replace("%2F", "/").replace("%2f", "/"));
        if let Some(theirs) = credential.as_deref().and_then(credential_region)
            && theirs != region
        {
            return Some(refuse(
                400,
                "AuthorizationQueryParametersError",
                &format!(
                    "Error parsing the X-Amz-Credential parameter; the region '{theirs}' is wrong; expecting '{region}'"
                ),
            ));
        }
        // A presigned URL hands out what it signed, nothing more: an
        // x-amz-* header the signer did not sign (an Object Lock, a
        // governance bypass, an encryption, a copy source, metadata) is
        // refused, as S3 does. Claims about the body that the gateway
        // checks (its hash, length, checksums) grant nothing and may come
        // from the holder of the URL.
        let signed = query_param(query, "X-Amz-SignedHeaders")
            .map(|v| v.replace("%3B", ";").replace("%3b", ";"))
            .unwrap_or_default();
        let signed: Vec<&str> = signed.split(';').collect();
        let body_claim = |name: &str| {
            [
                "x-amz-content-sha256",
                "x-amz-decoded-content-length",
                "x-amz-trailer",
                "x-amz-sdk-checksum-algorithm",
                "x-amz-user-agent",
            ]
            .contains(&name)
                || name.starts_with("x-amz-checksum-")
        };
        if let Some(unsigned) = headers
            .keys()
            .map(|name| name.as_str())
            .find(|name| name.starts_with("x-amz-") && !signed.contains(name) && !body_claim(name))
        {
            return Some(refuse(
                403,
                "AccessDenied",
                &format!(
                    "There were headers present in the request which were not signed: {unsigned}"
                ),
            ));
        }
        let expires = query_param(query, "X-Amz-Expires").and_then(|v| v.parse::<u64>().ok());
        if expires.is_none_or(|seconds| seconds > MAX_PRESIGNED_SECONDS) {
            return Some(refuse(
                400,
                "AuthorizationQueryParametersError",
                &format!(
                    "X-Amz-Expires must be a number of seconds no greater than {MAX_PRESIGNED_SECONDS} (a week)"
                ),
            ));
        }
    }
    let length = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    // aws-chunked framing adds a little to the decoded length.
    let framed_max = MAX_PUT_BYTES + MAX_PUT_BYTES / 64 + (1 << 20);
    if length("x-amz-decoded-content-length").is_some_and(|l| l > MAX_PUT_BYTES)
        || length("content-length").is_some_and(|l| l > framed_max)
    {
        return Some(refuse(
            400,
            "EntityTooLarge",
            &format!(
                "Your proposed upload exceeds the maximum allowed size of {MAX_PUT_BYTES} bytes"
            ),
        ));
    }
    None
}

/// Serves `service` on `listener` until the task is aborted.
/// What one client connection may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: std::time::Duration,
    pub idle_timeout: std::time::Duration,
}

/// When a connection last made progress, and whether a request handler is
/// running on it. Progress is a request that succeeded ending, or a frame
/// of a request's body or of a successful response's body going through.
/// Bytes alone prove nothing: HTTP/2 pings (the gateway's, or a client's)
/// move bytes on a connection that serves nothing, a response stuck behind
/// a client's closed flow-control window moves none, and refused requests
/// (anyone can send them) are no use of the connection.
#[derive(Clone)]
struct Activity {
    start: std::time::Instant,
    /// Milliseconds after `start`.
    last_progress: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Handlers working on a request (a copy, say): the connection is busy
    /// while one runs, whatever moves on it.
    handling: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            last_progress: std::sync::Arc::default(),
            handling: std::sync::Arc::default(),
        }
    }

    fn progress(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_progress
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    fn handling(&self) -> Handling {
        self.handling
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Handling(self.clone())
    }

    /// Returns once no handler is at work on the connection.
    async fn no_handler_at_work(&self) {
        while self.handling.load(std::sync::atomic::Ordering::Acquire) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Returns once the connection has made no progress for `idle` with
    /// no handler running.
    async fn idle_for(&self, idle: std::time::Duration) {
        use std::sync::atomic::Ordering;
        let idle_ms = idle.as_millis() as u64;
        loop {
            let now = self.start.elapsed().as_millis() as u64;
            if self.handling.load(Ordering::Acquire) > 0 {
                self.last_progress.store(now, Ordering::Relaxed);
            }
            let quiet = now.saturating_sub(self.last_progress.load(Ordering::Relaxed));
            if quiet >= idle_ms {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(idle_ms - quiet)).await;
        }
    }
}

/// A handler at work, until dropped with the response it returns.
struct Handling(Activity);

impl Drop for Handling {
    fn drop(&mut self) {
        // Not progress by itself: only a successful answer is (RequestEnd).
        self.0
            .handling
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A successful request's end, as progress, when its response is dropped.
struct RequestEnd(Activity);

impl Drop for RequestEnd {
    fn drop(&mut self) {
        self.0.progress();
    }
}

/// A body (a request's, or a response's) whose frames count as progress.
struct ProgressBody<B> {
    body: B,
    /// `None` for the body of a refused request's answer.
    activity: Option<Activity>,
    _end: Option<RequestEnd>,
}

impl<B> http_body::Body for ProgressBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let (std::task::Poll::Ready(Some(Ok(_))), Some(activity)) = (&polled, &self.activity) {
            activity.progress();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How long a stopping gateway lets the requests in flight finish.
const GRACEFUL_STOP: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves until `stop` fires (or its sender is dropped); then every open
/// connection finishes the requests in flight and closes (for at most
/// [`GRACEFUL_STOP`], then it is cut), so that nothing of the gateway holds
/// the node any longer and no request stops half way.
pub async fn serve(
    listener: TcpListener,
    service: S3Service,
    region: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut open = tokio::task::JoinSet::new();
    let (stopping, stopping_seen) = tokio::sync::watch::channel(false);
    tokio::select! {
        _ = stop => {}
        () = accept(&listener, &service, &region, &tls, limits, &mut open, &stopping_seen) => {}
    }
    drop(listener);
    let _ = stopping.send(true);
    let drained = async { while open.join_next().await.is_some() {} };
    if tokio::time::timeout(GRACEFUL_STOP, drained).await.is_err() {
        tracing::warn!("connections still busy after the graceful stop: cut");
    }
    open.shutdown().await;
}

/// Drives one connection; when the gateway stops, it is asked to finish
/// gracefully (HTTP/1 closes once the request in flight is answered,
/// HTTP/2 sends GOAWAY and ends with its last stream), and it is dropped
/// as soon as no handler is at work on it: an idle keep-alive connection
/// goes at once, a request in flight finishes its work first.
macro_rules! drive {
    ($connection:expr, $stopping:expr, $activity:expr) => {{
        let connection = $connection;
        tokio::pin!(connection);
        let mut stopping = $stopping;
        let mut asked = *stopping.borrow();
        if asked {
            connection.as_mut().graceful_shutdown();
        }
        loop {
            tokio::select! {
                served = connection.as_mut() => break served.map_err(|e| e.to_string()),
                _ = stopping.changed(), if !asked => {
                    asked = true;
                    connection.as_mut().graceful_shutdown();
                }
                () = $activity.no_handler_at_work(), if asked => break Ok(()),
            }
        }
    }};
}

async fn accept(
    listener: &TcpListener,
    service: &S3Service,
    region: &str,
    tls: &Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    open: &mut tokio::task::JoinSet<()>,
    stopping: &tokio::sync::watch::Receiver<bool>,
) {
    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        while open.try_join_next().is_some() {}
        // A connection is accepted only with room for it: past the cap,
        // clients wait in the listen backlog.
        let Ok(room) = connections.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small requests must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let region = region.to_owned();
        let tls = tls.clone();
        let stopping = stopping.clone();
        open.spawn(async move {
            let _room = room;
            let activity = Activity::new();
            let requests = activity.clone();
            let handler = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let handling = requests.handling();
                let activity = requests.clone();
                let service = service.clone();
                let refused = check_request(&request, &region);
                // Only the method and path are ever logged: headers carry
                // credentials and SSE-C keys.
                let (method, path) = (request.method().clone(), request.uri().path().to_owned());
                async move {
                    let response = match refused {
                        Some(response) => Ok(response),
                        None if crate::chunked::is_aws_chunked(request.headers()) => {
                            let request = request.map(|body| ProgressBody {
                                body: crate::chunked::ChunkGuard::new(body),
                                activity: Some(activity.clone()),
                                _end: None,
                            });
                            tower::Service::call(&mut service.clone(), request).await
                        }
                        // No body to watch (a GET, a HEAD): s3s's own path.
                        None if http_body::Body::is_end_stream(request.body()) => {
                            hyper::service::Service::call(&service, request).await
                        }
                        None => {
                            let request = request.map(|body| ProgressBody {
                                body,
                                activity: Some(activity.clone()),
                                _end: None,
                            });
                            tower::Service::call(&mut service.clone(), request).await
                        }
                    };
                    match &response {
                        Ok(r) if r.status().is_server_error() => {
                            tracing::warn!(%method, %path, status = %r.status(), "S3 request failed");
                        }
                        Err(_) => tracing::warn!(%method, %path, "S3 request failed"),
                        Ok(_) => {}
                    }
                    drop(handling);
                    response.map(|response| {
                        let succeeded = response.status().as_u16() < 400;
                        response.map(|body| ProgressBody {
                            body,
                            activity: succeeded.then(|| activity.clone()),
                            _end: succeeded.then(|| RequestEnd(activity)),
                        })
                    })
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client that trickles its headers (or idles between
            // requests) is cut off; HTTP/2 clients are pinged.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(limits.header_read_timeout))
                .keep_alive_timeout(limits.header_read_timeout);
            // hyper's header timeout starts once it knows the protocol,
            // which takes a first byte: a client that sends none is cut
            // off here.
            // A stopping gateway does not wait for them either.
            let mut first = [0u8; 1];
            let mut stopped = stopping.clone();
            tokio::select! {
                peeked = tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut first)) => {
                    match peeked {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => {
                            tracing::debug!(%peer, "no request bytes in time: closed");
                            return;
                        }
                    }
                }
                _ = stopped.wait_for(|stop| *stop) => return,
            }
            // Whatever the protocol, a connection that makes no progress
            // for the idle time, with no handler at work, is closed: a
            // client that stops mid-preface or after its TLS handshake,
            // stops sending a body or reading an answer, keeps an HTTP/2
            // connection up with pings alone, or with refused requests.
            let watched = activity.clone();
            let serving = async move {
                match tls {
                    Some(tls) => {
                        match tokio::time::timeout(TLS_HANDSHAKE, tls.accept(stream)).await {
                            Ok(Ok(stream)) => drive!(
                                builder.serve_connection(TokioIo::new(stream), handler),
                                stopping,
                                watched
                            ),
                            Ok(Err(error)) => Err(format!("TLS handshake failed: {error}")),
                            Err(_) => Err("TLS handshake timed out".into()),
                        }
                    }
                    None => drive!(
                        builder.serve_connection(TokioIo::new(stream), handler),
                        stopping,
                        watched
                    ),
                }
            };
            tokio::select! {
                served = serving => {
                    if let Err(error) = served {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                }
                () = activity.idle_for(limits.idle_timeout) => {
                    tracing::debug!(%peer, "connection idle: closed");
                }
            }
        });
    }
}

/// How long a client has to finish its TLS handshake.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// The address a listener is bound to, for messages.
pub fn bound(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn code_of(response: Option<HttpResponse>) -> Option<String> {
        let response = response?;
        Some(format!("{}", response.status().as_u16()))
    }

    #[test]
    fn hosts_name_buckets_only_under_a_configured_domain() {
        let host = CairnHost::new(vec!["s3.example.org".into(), "localhost".into()]);
        let parsed = host.parse_host_header("photos.s3.example.org").unwrap();
        assert_eq!(parsed.bucket(), Some("photos"));
        let parsed = host.parse_host_header("photos.localhost:9000").unwrap();
        assert_eq!(parsed.bucket(), Some("photos"));
        for path_style in [
            "s3.example.org",
            "localhost:9000",
            "127.0.0.1:9000",
            "other.host",
            "[::1]:9000",
        ] {
            let parsed = host.parse_host_header(path_style).unwrap();
            assert_eq!(parsed.bucket(), None, "{path_style}");
        }
    }

    #[test]
    fn sigv2_foreign_regions_long_presigned_urls_and_huge_bodies_are_refused() {
        let region = "us-east-1";
        let ok = request(
            "/b/k",
            &[(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AK/20261124/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00",
            )],
        );
        assert!(check_request(&ok, region).is_none());
        let v2 = request("/b/k", &[("authorization", "AWS AK:c2ln")]);
        assert_eq!(code_of(check_request(&v2, region)).as_deref(), Some("400"));
        let v2_query = request("/b/k?AWSAccessKeyId=AK&Expires=1&Signature=x", &[]);
        assert_eq!(
            code_of(check_request(&v2_query, region)).as_deref(),
            Some("400")
        );
        let foreign = request(
            "/b/k",
            &[(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AK/20261124/eu-west-3/s3/aws4_request, SignedHeaders=host, Signature=00",
            )],
        );
        assert_eq!(
            code_of(check_request(&foreign, region)).as_deref(),
            Some("400")
        );
        let week = "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F20261124%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Expires=604800";
        assert!(check_request(&request(week, &[]), region).is_none());
        let longer = week.replace("604800", "604801");
        assert_eq!(
            code_of(check_request(&request(&longer, &[]), region)).as_deref(),
            Some("400")
        );
        let foreign_presigned = week.replace("us-east-1", "ap-south-1");
        assert_eq!(
            code_of(check_request(&request(&foreign_presigned, &[]), region)).as_deref(),
            Some("400")
        );
        let huge = request("/b/k", &[("x-amz-decoded-content-length", "5368709121")]);
        assert_eq!(
            code_of(check_request(&huge, region)).as_deref(),
            Some("400")
        );
        let largest = request("/b/k", &[("content-length", "5368709120")]);
        assert!(check_request(&largest, region).is_none());
    }
}
