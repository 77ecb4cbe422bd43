//! Mutual TLS for the gRPC port: TLS 1.3 only, client certificates required and chained to the
//! configured client CA, and the agent identity read from the certificate.
//!
//! The accept loop hands each TCP connection to its own handshake task, so a slow or hostile client
//! cannot stall other agents' connections.

use crate::metrics::Metrics;
use dmr::keys::PublicKey;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// TLS set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{what} {path}: {detail}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn pem_err(what: &'static str, path: &Path, detail: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// Builds the server's rustls configuration.
pub fn server_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err("TLS_CERT_FILE", cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err("TLS_CERT_FILE", cert, e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err("TLS_KEY_FILE", key, e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca).map_err(|e| pem_err("TLS_CLIENT_CA_FILE", client_ca, e))? {
        roots
            .add(ca.map_err(|e| pem_err("TLS_CLIENT_CA_FILE", client_ca, e))?)
            .map_err(|e| pem_err("TLS_CLIENT_CA_FILE", client_ca, e))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The default of `LIMIT_TLS_HANDSHAKES`.
pub const DEFAULT_CONCURRENT_HANDSHAKES: usize = 256;
/// At most one warning per this period about refused handshakes; the rest go to debug level.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// The default of `TLS_HANDSHAKE_TIMEOUT_MS`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How patient the accept loop is with TLS handshakes.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// `TLS_HANDSHAKE_TIMEOUT_MS`: for the first byte, and as long again for the handshake.
    pub timeout: Duration,
    /// `LIMIT_TLS_HANDSHAKES`: handshakes in progress at once; further connections wait in the
    /// listen backlog.
    pub concurrent: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            concurrent: DEFAULT_CONCURRENT_HANDSHAKES,
        }
    }
}

/// [`incoming_with_timeout`] with the default [`HandshakeLimits`].
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    incoming_with_timeout(listener, config, metrics, HandshakeLimits::default(), stop)
}

/// Accepts TCP connections and yields completed TLS sessions; stops when `stop` fires.
///
/// A client has `limits.timeout` (`TLS_HANDSHAKE_TIMEOUT_MS`) to send its first byte, and as
/// long again to complete the handshake; then it is disconnected (a slowloris on TLS).
/// At most `limits.concurrent` (`LIMIT_TLS_HANDSHAKES`) handshakes run at once (the permit travels with each
/// handshake task), so a flood of slow or hostile clients cannot exhaust the server. A connection
/// that closes or stays silent without starting TLS (a TCP probe, a load-balancer check) is counted
/// apart (`dmr_tls_probe_connections_total`) and logged at debug level; refused handshakes are
/// counted each and logged at most once per [`REFUSAL_LOG_PERIOD`].
pub fn incoming_with_timeout(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    metrics: Arc<Metrics>,
    limits: HandshakeLimits,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    // Bounded: when tonic stops taking connections the accept loop waits instead of piling them up.
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(limits.concurrent.max(1)));
    let handshake_timeout = limits.timeout;
    let refusals = Arc::new(RefusalLog::default());
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                () = stop.cancelled() => break,
                p = handshakes.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, metrics, refusals) = (acceptor.clone(), tx.clone(), metrics.clone(), refusals.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if !starts_talking(&tcp, handshake_timeout).await {
                    metrics.tls_probes.inc();
                    tracing::debug!(%peer, "connection closed or silent before TLS started (probe)");
                    return;
                }
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        metrics.socket_errors.inc();
                        metrics.auth_failures.with_label_values(&["tls_handshake"]).inc();
                        refusals.report(&peer, &e);
                    }
                    Err(_) => {
                        metrics
                            .auth_failures
                            .with_label_values(&["tls_handshake_timeout"])
                            .inc();
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// True once the client sent a first byte; false if it closed or stayed silent.
async fn starts_talking(tcp: &TcpStream, timeout: Duration) -> bool {
    let mut first = [0u8; 1];
    matches!(tokio::time::timeout(timeout, tcp.peek(&mut first)).await, Ok(Ok(n)) if n > 0)
}

/// Rate-limited logging of refused handshakes (a port scan must not flood the log).
#[derive(Default)]
struct RefusalLog {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RefusalLog {
    fn report(&self, peer: &std::net::SocketAddr, e: &std::io::Error) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_PERIOD) {
            *suppressed += 1;
            tracing::debug!(%peer, error = %e, "TLS handshake refused");
            return;
        }
        tracing::warn!(%peer, error = %e, suppressed_since_last_warning = *suppressed, "TLS handshake refused");
        *last = Some(std::time::Instant::now());
        *suppressed = 0;
    }
}

/// Why an agent's certificate does not identify an agent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// No client certificate was presented.
    #[error("no client certificate")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("client certificate unreadable: {0}")]
    Unreadable(String),
    /// Neither a `urn:uuid:` SAN nor a UUID common name.
    #[error("client certificate carries no agent id (SAN URI urn:uuid:<id> or CN <id>)")]
    NoAgentId,
}

/// The agent id and key of a client certificate: SAN URI `urn:uuid:<id>` first, else a UUID CN.
pub fn agent_identity(cert: &CertificateDer<'_>) -> Result<(String, PublicKey), IdentityError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| IdentityError::Unreadable(e.to_string()))?;
    let id = dmr::keys::agent_id_in_certificate(&parsed).ok_or(IdentityError::NoAgentId)?;
    let key =
        PublicKey::from_spki_der(parsed.public_key().raw).map_err(|e| IdentityError::Unreadable(e.to_string()))?;
    Ok((id, key))
}
