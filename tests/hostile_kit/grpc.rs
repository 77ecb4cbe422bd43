//! Hostile HTTP/2 and TLS clients for the gRPC port.

use dmr_pki::AgentCredentials;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A TLS client trusting `ca`, presenting `creds`' certificate (or none), offering ALPN h2.
pub fn tls_config(ca: &Path, creds: Option<&AgentCredentials>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA cert")).expect("CA added");
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match creds {
        Some(c) => {
            let chain = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("agent certificate");
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).expect("agent key");
            builder.with_client_auth_cert(chain, key).expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A completed TLS session to the gRPC port.
pub async fn tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
}

/// An HTTP/2 connection over mutual TLS; the connection task runs in the background and its end
/// (an error such as GOAWAY, or a clean close) is sent on the returned channel.
pub async fn h2(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::sync::oneshot::Receiver<Result<(), h2::Error>>,
) {
    let io = tls(addr, config).await.expect("TLS with a valid client certificate");
    let (send, connection) = h2::client::Builder::new()
        .max_concurrent_reset_streams(100_000)
        .handshake(io)
        .await
        .expect("HTTP/2 handshake");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(connection.await);
    });
    (send, rx)
}

/// A gRPC request head for `path`.
pub fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
}

pub const SESSION: &str = "/dmr.v1.AgentGateway/Session";
pub const HEALTH: &str = "/grpc.health.v1.Health/Check";
