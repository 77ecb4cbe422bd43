//! The agent's one stream to the server: connect over mutual TLS, reconnect with capped
//! exponential backoff and jitter, fail over between server addresses, keep the directory current,
//! match send results to waiting REST requests, and hand deliveries to the [`crate::inbox`].
//!
//! **Invariants:**
//! - at most one stream is open at a time;
//! - a REST send is answered "accepted" only on the server's `ACCEPTED` result for its correlation id;
//! - a delivery result is only ever sent on the stream that carried the delivery (delivery ids are
//!   per stream).

use crate::inbox::Inbox;
use crate::metrics::Metrics;
use crate::{StartError, config::AgentConfig};
use dmr::directory::Directory;
use dmr::proto::agent_gateway_client::AgentGatewayClient;
use dmr::proto::session_request::Frame as OutFrame;
use dmr::proto::session_response::Frame as InFrame;
use dmr::proto::{SendRequest, SendResult, SessionRequest};
use rand::Rng as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Why a send did not get a server answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// No stream to the server right now.
    #[error("the agent is not connected to the DMR server")]
    NotConnected,
    /// No answer within `MESSAGE_DELIVERY_TIMEOUT_MS`; the message may or may not be queued.
    #[error("the DMR server did not confirm the message in time")]
    Timeout,
    /// The stream broke before the answer; the message may or may not be queued.
    #[error("the connection to the DMR server was lost before it confirmed the message")]
    ConnectionLost,
}

/// The stream and everything that depends on it.
pub struct Link {
    cfg: AgentConfig,
    endpoints: Vec<Endpoint>,
    directory: Arc<DirectoryCell>,
    connected: watch::Sender<bool>,
    outbound: Mutex<Option<mpsc::Sender<SessionRequest>>>,
    pending: Mutex<HashMap<String, oneshot::Sender<SendResult>>>,
    metrics: Arc<Metrics>,
}

/// Frames buffered towards the server before senders wait.
const OUTBOUND_BUFFER: usize = 256;

impl Link {
    /// Prepares TLS and endpoints (no connection yet).
    pub fn new(
        cfg: AgentConfig,
        key_pkcs8_pem: &str,
        directory: Arc<DirectoryCell>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StartError> {
        let read = |what: &'static str, path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|source| StartError::File {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let cert = read("TLS_CERT_FILE", &cfg.tls_cert_file)?;
        let ca = read("TLS_CA_FILE", &cfg.tls_ca_file)?;
        if cfg.dmr_server_grpc_url.is_empty() {
            return Err(StartError::Config(
                "DMR_SERVER_GRPC_URL must name at least one server".into(),
            ));
        }
        let mut endpoints = Vec::new();
        for url in &cfg.dmr_server_grpc_url {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca))
                .identity(Identity::from_pem(&cert, key_pkcs8_pem));
            if let Some(name) = &cfg.dmr_server_tls_name {
                tls = tls.domain_name(name.clone());
            }
            let endpoint = Endpoint::from_shared(url.trim().to_owned())
                .map_err(|e| StartError::Config(format!("DMR_SERVER_GRPC_URL {url:?}: {e}")))?
                .tls_config(tls)
                .map_err(|e| StartError::Config(format!("TLS for {url}: {e}")))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true);
            endpoints.push(endpoint);
        }
        Ok(Arc::new(Self {
            cfg,
            endpoints,
            directory,
            connected: watch::channel(false).0,
            outbound: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    /// The directory as last pushed by the server.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory.get()
    }

    /// True while a stream is open.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Watches the connection state.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Sends an envelope and waits for the server's result.
    pub async fn send(&self, envelope: dmr::proto::Envelope) -> Result<SendResult, SendError> {
        let tx = self
            .outbound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(SendError::NotConnected)?;
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let (result_tx, result_rx) = oneshot::channel();
        self.lock_pending().insert(correlation_id.clone(), result_tx);
        let frame = SessionRequest {
            frame: Some(OutFrame::Send(SendRequest {
                correlation_id: correlation_id.clone(),
                envelope: Some(envelope),
            })),
        };
        let outcome = tokio::time::timeout(self.cfg.delivery_timeout(), async {
            tx.send(frame).await.map_err(|_| SendError::ConnectionLost)?;
            self.metrics.events_sent.with_label_values(&["send"]).inc();
            result_rx.await.map_err(|_| SendError::ConnectionLost)
        })
        .await;
        self.lock_pending().remove(&correlation_id);
        outcome.unwrap_or(Err(SendError::Timeout))
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<SendResult>>> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a stream open until `stop`, reconnecting with backoff and failing over between servers.
    pub async fn run(self: Arc<Self>, inbox: Arc<Inbox>, stop: CancellationToken) {
        let mut failures: u32 = 0;
        let mut index = 0usize;
        while !stop.is_cancelled() {
            let endpoint = &self.endpoints[index % self.endpoints.len()];
            let started = Instant::now();
            match self.serve_stream(endpoint, &inbox, &stop).await {
                Ok(()) => tracing::warn!(server = %endpoint.uri(), "stream to the DMR server ended"),
                Err(reason) => {
                    self.metrics.socket_errors.inc();
                    tracing::warn!(server = %endpoint.uri(), %reason, "cannot hold a stream to the DMR server");
                }
            }
            if stop.is_cancelled() {
                break;
            }
            // A stream that lived a while resets the backoff; a failing address makes us try the next.
            if started.elapsed() > Duration::from_secs(10) {
                failures = 0;
            } else {
                failures = failures.saturating_add(1);
                index += 1;
            }
            let delay = backoff(
                self.cfg.reconnection_delay_ms,
                self.cfg.reconnection_delay_max_ms,
                failures,
            );
            tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
            tokio::select! { () = stop.cancelled() => break, () = tokio::time::sleep(delay) => {} }
        }
    }

    async fn serve_stream(
        &self,
        endpoint: &Endpoint,
        inbox: &Arc<Inbox>,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e} ({:?})", std::error::Error::source(&e)))?;
        let mut client = AgentGatewayClient::new(channel).max_decoding_message_size(16 * 1024 * 1024);
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let response = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("server refused the stream: {:?}: {}", s.code(), s.message()))?;
        let mut inbound = response.into_inner();
        *self.outbound.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx.clone());
        self.connected.send_replace(true);
        self.metrics.connection_active.set(1);
        let connected_at = Instant::now();
        tracing::info!(server = %endpoint.uri(), agent_id = %self.cfg.agent_id, "connected to the DMR server");

        let (deliveries, worker) = inbox.clone().start_stream_worker(tx.clone());
        let mut full_list = Vec::new();
        let result = loop {
            let message = tokio::select! {
                () = stop.cancelled() => break Ok(()),
                m = inbound.message() => m,
            };
            let frame = match message {
                Ok(Some(response)) => response.frame,
                Ok(None) => break Ok(()),
                Err(status) => break Err(format!("stream closed: {:?}: {}", status.code(), status.message())),
            };
            match frame {
                Some(InFrame::Directory(d)) => {
                    // The full list may come in parts; it replaces our copy once complete.
                    full_list.extend(d.agents);
                    if d.more {
                        continue;
                    }
                    self.metrics.events_received.with_label_values(&["directory"]).inc();
                    match Directory::from_proto(&std::mem::take(&mut full_list)) {
                        Ok(dir) => self.replace_directory(dir),
                        Err(e) => {
                            tracing::error!(error = %e, "server sent an unusable directory; keeping the previous one")
                        }
                    }
                }
                Some(InFrame::DirectoryUpdate(u)) => {
                    self.metrics
                        .events_received
                        .with_label_values(&["directory_update"])
                        .inc();
                    let mut next = (*self.directory()).clone();
                    for e in next.apply_update(&u.agents) {
                        tracing::error!(error = %e, "skipping an unusable directory entry");
                    }
                    self.replace_directory(next);
                }
                Some(InFrame::Delivery(d)) => {
                    self.metrics.events_received.with_label_values(&["delivery"]).inc();
                    if deliveries.send(d).await.is_err() {
                        break Err("delivery worker stopped".into());
                    }
                }
                Some(InFrame::SendResult(r)) => {
                    self.metrics.events_received.with_label_values(&["send_result"]).inc();
                    if let Some(waiter) = self.lock_pending().remove(&r.correlation_id) {
                        let _ = waiter.send(r);
                    }
                }
                Some(InFrame::Pong(_)) | None => {}
            }
        };
        *self.outbound.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.connected.send_replace(false);
        self.metrics.connection_active.set(0);
        self.metrics
            .connection_duration
            .observe(connected_at.elapsed().as_secs_f64());
        // Waiting senders learn the stream is gone (their outcome is unknown to us).
        self.lock_pending().clear();
        drop(deliveries);
        let _ = worker.await;
        result
    }

    fn replace_directory(&self, next: Directory) {
        tracing::info!(agents = next.len(), "agent directory updated");
        self.directory.replace(next);
    }
}

/// The directory as the server last pushed it, shared by the link (which updates it), the REST API
/// (recipient keys) and the inbox (sender keys).
#[derive(Default)]
pub struct DirectoryCell(RwLock<Arc<Directory>>);

impl DirectoryCell {
    /// The current directory.
    pub fn get(&self) -> Arc<Directory> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces it.
    pub fn replace(&self, next: Directory) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
    }
}

/// Capped exponential backoff with jitter: `initial · 2^(failures-1)` capped at `max`, then a
/// random value in its upper half so that many agents do not reconnect in lock-step.
pub fn backoff(initial_ms: u64, max_ms: u64, failures: u32) -> Duration {
    let exp = initial_ms.saturating_mul(1u64 << failures.saturating_sub(1).min(20));
    let capped = exp.min(max_ms).max(1);
    let jittered = rand::rng().random_range(capped / 2..=capped);
    Duration::from_millis(jittered)
}

#[cfg(test)]
mod tests {
    use super::backoff;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let first = backoff(1000, 5000, 1).as_millis();
            assert!((500..=1000).contains(&first), "{first}");
            let third = backoff(1000, 5000, 3).as_millis();
            assert!((2000..=4000).contains(&third), "{third}");
            let late = backoff(1000, 5000, 30).as_millis();
            assert!((2500..=5000).contains(&late), "{late}");
        }
    }
}
