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

    /// Keeps a stream open until `stop`, failing over between servers and backing off.
    ///
    /// When a stream ends or a connection fails, the next address is tried at once: with several
    /// servers, a killed one costs only the time to connect to the next. Only after every address
    /// failed in turn does the agent pause (capped exponential backoff with jitter) before the
    /// next round, so a fleet does not hammer servers that are all down.
    pub async fn run(self: Arc<Self>, inbox: Arc<Inbox>, stop: CancellationToken) {
        let mut index = 0usize;
        let mut failed_in_round = 0usize;
        let mut pauses = self.pauses();
        while !stop.is_cancelled() {
            let endpoint = &self.endpoints[index % self.endpoints.len()];
            let (held, outcome) = self.serve_stream(endpoint, &inbox, &stop).await;
            match outcome {
                Ok(()) => tracing::warn!(server = %endpoint.uri(), "stream to the DMR server ended"),
                Err(reason) => {
                    self.metrics.socket_errors.inc();
                    tracing::warn!(server = %endpoint.uri(), %reason, "cannot hold a stream to the DMR server");
                }
            }
            if stop.is_cancelled() {
                break;
            }
            index += 1;
            if held.is_some_and(|d| d >= STREAM_STABLE) {
                // A server that served us a while went away: a new round, from the next address.
                failed_in_round = 0;
                pauses = self.pauses();
            } else {
                failed_in_round += 1;
            }
            if failed_in_round < self.endpoints.len() {
                self.metrics.failovers.inc();
                tracing::info!(server = %self.endpoints[index % self.endpoints.len()].uri(), "trying the next server at once");
                continue;
            }
            failed_in_round = 0;
            let delay = pauses
                .next()
                .unwrap_or(Duration::from_millis(self.cfg.reconnection_delay_max_ms));
            self.metrics.reconnect_backoffs.inc();
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "every server failed; reconnecting after a pause"
            );
            tokio::select! { () = stop.cancelled() => break, () = tokio::time::sleep(delay) => {} }
        }
    }

    /// Pauses between rounds: [`backoff`]'s schedule, from a maintained crate.
    fn pauses(&self) -> impl Iterator<Item = Duration> + use<> {
        backoff(self.cfg.reconnection_delay_ms, self.cfg.reconnection_delay_max_ms)
    }

    /// One stream: how long it was connected (`None` if it never was), and how it ended.
    async fn serve_stream(
        &self,
        endpoint: &Endpoint,
        inbox: &Arc<Inbox>,
        stop: &CancellationToken,
    ) -> (Option<Duration>, Result<(), String>) {
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => return (None, Err(format!("connect: {e} ({:?})", std::error::Error::source(&e)))),
        };
        let mut client = AgentGatewayClient::new(channel).max_decoding_message_size(16 * 1024 * 1024);
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let response = match client.session(ReceiverStream::new(rx)).await {
            Ok(r) => r,
            Err(s) => {
                return (
                    None,
                    Err(format!("server refused the stream: {:?}: {}", s.code(), s.message())),
                );
            }
        };
        let mut inbound = response.into_inner();
        *self.outbound.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx.clone());
        // Connected (`/ready`, `is_connected`) once the stream's directory is in: before that a
        // send to an agent added since the last stream would be refused as unknown.
        let mut directory_in = false;
        self.metrics.connection_active.set(1);
        let connected_at = Instant::now();
        tracing::info!(server = %endpoint.uri(), agent_id = %self.cfg.agent_id, "connected to the DMR server");

        let (deliveries, worker) = inbox.clone().start_stream_worker(tx.clone());
        // `None` once the server announced the end of the stream: no new delivery will come.
        let mut deliveries = Some(deliveries);
        let mut tx = Some(tx);
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
                    if !std::mem::replace(&mut directory_in, true) {
                        self.connected.send_replace(true);
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
                    let Some(deliveries) = &deliveries else {
                        tracing::warn!(
                            "delivery after the server announced the end of the stream; ignored (it returns to the queue)"
                        );
                        continue;
                    };
                    if deliveries.send(d).await.is_err() {
                        break Err("delivery worker stopped".into());
                    }
                }
                Some(InFrame::Closing(c)) => {
                    // Send nothing more here: new sends answer 503 until the next stream, and our
                    // side closes once the delivery in hand is answered (the worker holds the last
                    // sender). The server answers every send already written, then ends the stream.
                    tracing::info!(server = %endpoint.uri(), reason = %c.reason, "the server is closing this stream");
                    self.metrics.events_received.with_label_values(&["closing"]).inc();
                    *self.outbound.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                    self.connected.send_replace(false);
                    drop(tx.take());
                    deliveries = None;
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
        let held = connected_at.elapsed();
        self.metrics.connection_duration.observe(held.as_secs_f64());
        // Waiting senders learn the stream is gone (their outcome is unknown to us).
        self.lock_pending().clear();
        drop(deliveries);
        let _ = worker.await;
        (Some(held), result)
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

/// A stream held this long counts as a working server: its end starts a fresh round and resets
/// the backoff.
const STREAM_STABLE: Duration = Duration::from_secs(10);

/// Capped exponential backoff with jitter (backon): the `n`-th pause is a random value in the
/// upper half of `initial · 2^(n-1)` capped at `max`, so that many agents do not reconnect in
/// lock-step and no pause exceeds `max`.
pub fn backoff(initial_ms: u64, max_ms: u64) -> impl Iterator<Item = Duration> + use<> {
    use backon::BackoffBuilder as _;
    // backon's jitter adds up to 100 % to each delay, so halve both ends to land in [d/2, d].
    let half = |ms: u64| Duration::from_millis((ms / 2).max(1));
    backon::ExponentialBuilder::new()
        .with_min_delay(half(initial_ms))
        .with_max_delay(half(max_ms.max(initial_ms)))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::backoff;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let pauses: Vec<u128> = backoff(1000, 5000).take(30).map(|d| d.as_millis()).collect();
            assert!((500..=1000).contains(&pauses[0]), "{pauses:?}");
            assert!((2000..=4000).contains(&pauses[2]), "{pauses:?}");
            assert!((2500..=5000).contains(&pauses[29]), "{pauses:?}");
        }
    }
}
