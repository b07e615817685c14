//! `[s3]` in a node's configuration file: this node is also an S3 gateway.
//! The binary takes the section out of the file before the node reads the
//! rest (the node knows nothing of S3).

use std::path::PathBuf;

use serde::Deserialize;

/// `[s3]`: this node is also an S3 gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    /// A TCP socket address, e.g. "0.0.0.0:9000".
    pub listen: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Domains for virtual-hosted-style requests (`bucket.domain`).
    #[serde(default)]
    pub domains: Vec<String>,
    /// The KMS root key file (64 hex digits, mode 0600), unless
    /// CAIRN_ROOT_KEY is set.
    pub root_key_file: Option<PathBuf>,
    /// TLS with the operator's PEM certificate chain and private key.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// TLS with a self-signed certificate made on first start and kept in
    /// the data directory (when no files are given).
    #[serde(default)]
    pub tls_self_signed: bool,
    /// How long a gateway trusts a looked-up access key before reading it
    /// again: a deleted key authenticates for at most this long.
    #[serde(default = "default_access_key_cache_seconds")]
    pub access_key_cache_seconds: u64,
    /// Client connections served at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long a client may take to send a request's headers (or to
    /// start its next request on a kept-alive connection).
    #[serde(default = "default_header_read_timeout_seconds")]
    pub header_read_timeout_seconds: u64,
    /// How long a connection may go with no byte moving either way.
    #[serde(default = "default_idle_timeout_seconds")]
    pub idle_timeout_seconds: u64,
}

fn default_idle_timeout_seconds() -> u64 {
    crate::DEFAULT_IDLE_TIMEOUT.as_secs()
}

fn default_max_connections() -> usize {
    crate::DEFAULT_MAX_CONNECTIONS
}

fn default_header_read_timeout_seconds() -> u64 {
    crate::DEFAULT_HEADER_READ_TIMEOUT.as_secs()
}

fn default_access_key_cache_seconds() -> u64 {
    10
}

fn default_region() -> String {
    crate::s3::DEFAULT_REGION.into()
}
