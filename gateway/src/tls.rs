//! HTTPS: a rustls server configuration from PEM files, with HTTP/2 and HTTP/1.1 offered
//! by ALPN. The crypto provider is chosen here (ring), not taken from a process default,
//! so other crates' providers cannot make it ambiguous.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate chain {path} (tls.cert_path): {reason}")]
    Certificates { path: String, reason: String },
    #[error("{path} (tls.cert_path) holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("cannot read the private key {path} (tls.key_path): {reason}")]
    Key { path: String, reason: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Loads a PEM certificate chain and private key into a server configuration.
pub fn server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_name = cert_path.display().to_string();
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(Iterator::collect)
        .map_err(|err| TlsError::Certificates { path: cert_name.clone(), reason: err.to_string() })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_name });
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|err| TlsError::Key { path: key_path.display().to_string(), reason: err.to_string() })?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certificates, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
