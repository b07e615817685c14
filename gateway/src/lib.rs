//! cairn-gateway: the S3 front door. It maps S3 requests onto the swarm and
//! the replicated metadata of `cairn-node`, and never talks to storage
//! nodes except through it.

pub mod auth;
pub mod checksum;
pub mod chunked;
pub mod config;
pub mod dev;
pub mod error;
pub mod multipart;
pub mod objects;
pub mod protections;
pub mod s3;
pub mod server;
pub mod tls;

use std::net::SocketAddr;

use cairn_model::access_keys::AccessKeys;
use cairn_model::buckets::Buckets;
use cairn_model::collector::Collection;
use cairn_model::heads::ObjectIndex;
use cairn_model::kms::{Kms, RootKey};
use cairn_node::swarm::NodeHandle;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

use crate::auth::KeyLookup;
use crate::error::{GatewayError, GatewayResult};
use crate::objects::ObjectStore;
use crate::s3::CairnS3;
use crate::server::CairnHost;

/// Client connections a gateway serves at once, unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// How long a connection may idle, unless configured.
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// How long a client has to send a request's headers, unless configured.
pub const DEFAULT_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How a gateway is set up.
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// The region clients sign for.
    pub region: String,
    /// Domains for virtual-hosted-style requests (`bucket.domain`).
    pub domains: Vec<String>,
    /// Write deadlines, shared with the orphan collector.
    pub collection: Collection,
    /// TLS on the listener (`None`: plain HTTP).
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// How long a looked-up access key is trusted before it is read again:
    /// a deleted key authenticates on this gateway for at most this long.
    pub access_key_cache: std::time::Duration,
    /// Added to the wall clock where this gateway reads it itself (for
    /// version ids): tests set it to reproduce gateways whose clocks
    /// disagree. Zero in service.
    pub clock_skew_ms: i64,
    /// Client connections open at once; past this, new ones wait in the
    /// listen backlog.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, or to
    /// start its next request on a kept-alive connection, before the
    /// connection is closed.
    pub header_read_timeout: std::time::Duration,
    /// How long a connection may go with no byte moving either way (a
    /// slow answer being prepared counts too: it must be above the
    /// longest request the gateway works on silently).
    pub idle_timeout: std::time::Duration,
}

impl Default for GatewayConfig {
    /// Plain HTTP on a free port of 127.0.0.1, region us-east-1.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            region: crate::s3::DEFAULT_REGION.into(),
            domains: Vec::new(),
            collection: Collection::default(),
            tls: None,
            access_key_cache: cairn_model::access_keys::DEFAULT_CACHE_FOR,
            clock_skew_ms: 0,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// A running S3 gateway on one node.
pub struct Gateway {
    address: SocketAddr,
    keys: AccessKeys,
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Gateway {
    /// Binds `config.listen` and serves S3 there through `node`.
    pub async fn start(
        node: NodeHandle,
        root: RootKey,
        config: GatewayConfig,
    ) -> GatewayResult<Self> {
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            GatewayError::Internal(format!("cannot listen on {}: {e}", config.listen))
        })?;
        Self::start_on(node, root, config, listener)
    }

    /// Serves S3 on an already bound listener.
    pub fn start_on(
        node: NodeHandle,
        root: RootKey,
        config: GatewayConfig,
        listener: TcpListener,
    ) -> GatewayResult<Self> {
        let address = listener
            .local_addr()
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        let metadata = node.metadata().clone();
        let kms = Kms::new(root, metadata.clone());
        let keys = AccessKeys::new(kms.clone(), metadata.clone(), config.access_key_cache);
        let index = ObjectIndex::new(
            node.clone(),
            config.collection.write_deadline,
            config.clock_skew_ms,
        );
        let s3 = CairnS3 {
            keys: keys.clone(),
            buckets: Buckets::new(metadata, kms.clone()),
            objects: ObjectStore::new(node, kms, index),
            region: config.region.clone(),
        };
        let mut builder = S3ServiceBuilder::new(s3);
        builder.set_auth(KeyLookup(keys.clone()));
        builder.set_host(CairnHost::new(config.domains));
        let service = builder.build();
        let tls = config.tls.map(tokio_rustls::TlsAcceptor::from);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let limits = server::Limits {
            max_connections: config.max_connections.max(1),
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout.max(config.header_read_timeout),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server::serve(
            listener,
            service,
            config.region,
            tls,
            limits,
            stopped,
        ));
        tracing::info!(%address, scheme, "S3 gateway listening");
        Ok(Self {
            address,
            keys,
            task,
            stop,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The access keys, to create and delete them.
    pub fn keys(&self) -> &AccessKeys {
        &self.keys
    }

    /// Stops accepting requests, closes every open connection and drops
    /// the gateway's handles on the node.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
