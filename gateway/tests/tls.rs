//! HTTPS from PEM files: a real TLS handshake against a self-signed certificate, HSTS on
//! every response, and clear errors for unusable files.

use std::sync::Arc;
use std::time::Duration;

use maas_gateway::{AppState, GatewayOptions, HttpServer, ServeOptions};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Pem {
    _dir: tempfile::TempDir,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    cert_der: CertificateDer<'static>,
}

fn self_signed() -> Pem {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    Pem { _dir: dir, cert_path, key_path, cert_der: certified.cert.der().clone() }
}

#[tokio::test]
async fn https_serves_with_hsts() {
    let pem = self_signed();
    let tls = maas_gateway::tls::server_config(&pem.cert_path, &pem.key_path).unwrap();
    let state = Arc::new(AppState::new("tls-node", GatewayOptions::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &ServeOptions {
            max_body_bytes: 1 << 20,
            max_upload_bytes: 0,
            drain_timeout: Duration::from_secs(5),
            tls: Some(tls),
            cors: maas_gateway::middleware::CorsPolicy::default(),
        },
    );
    let addr = server.local_addr().unwrap();
    let (_trigger, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(server.run(shutdown));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem.cert_der.clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("strict-transport-security: max-age=31536000"), "{response}");
    assert!(response.contains("\"node\":\"tls-node\""), "{response}");

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"));
}

#[test]
fn unusable_files_are_refused_naming_the_setting() {
    let pem = self_signed();
    let missing = std::path::Path::new("/no/such/cert.pem");
    let err = maas_gateway::tls::server_config(missing, &pem.key_path).unwrap_err().to_string();
    assert!(err.contains("tls.cert_path") && err.contains("/no/such/cert.pem"), "{err}");
    let err = maas_gateway::tls::server_config(&pem.cert_path, &pem.cert_path).unwrap_err().to_string();
    assert!(err.contains("tls.key_path"), "{err}");
    let err = maas_gateway::tls::server_config(&pem.key_path, &pem.key_path).unwrap_err().to_string();
    assert!(err.contains("tls.cert_path"), "{err}");
}
