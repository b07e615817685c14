//! TLS for the S3 listener (spec/gateway.md, "TLS"): the operator's PEM
//! certificate chain and key, or a self-signed certificate made on first
//! start and kept in the data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{GatewayError, GatewayResult};

fn tls_error(context: impl std::fmt::Display) -> impl Fn(String) -> GatewayError {
    move |e| GatewayError::Internal(format!("TLS: {context}: {e}"))
}

/// A server configuration from a PEM certificate chain and a PEM private
/// key (PKCS#8, PKCS#1 or SEC1), offering HTTP/2 and HTTP/1.1.
pub fn server_config(cert_file: &Path, key_file: &Path) -> GatewayResult<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| tls_error(cert_file.display())(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(cert_file.display())(e.to_string()))?;
    if chain.is_empty() {
        return Err(tls_error(cert_file.display())(
            "no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| tls_error(key_file.display())(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("protocol versions")(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls_error("certificate and key")(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The self-signed certificate and key in `dir` (`s3-tls-cert.pem`,
/// `s3-tls-key.pem`, the key mode 0600), made for `names` (DNS names or IP
/// addresses) the first time. Returns their paths.
pub fn self_signed(dir: &Path, names: &[String]) -> GatewayResult<(PathBuf, PathBuf)> {
    let cert_file = dir.join("s3-tls-cert.pem");
    let key_file = dir.join("s3-tls-key.pem");
    if cert_file.exists() && key_file.exists() {
        return Ok((cert_file, key_file));
    }
    let certified = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| tls_error("self-signed certificate")(e.to_string()))?;
    write_private(&key_file, certified.key_pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert_file, certified.cert.pem())
        .map_err(|e| tls_error(cert_file.display())(e.to_string()))?;
    tracing::info!(certificate = %cert_file.display(), "made a self-signed TLS certificate for S3");
    Ok((cert_file, key_file))
}

fn write_private(path: &Path, bytes: &[u8]) -> GatewayResult<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(|e| tls_error(path.display())(e.to_string()))
}
