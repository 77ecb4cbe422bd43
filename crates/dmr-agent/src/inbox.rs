//! Incoming deliveries: decrypt, verify the sender's signature, POST the plaintext to
//! `OUTGOING_MESSAGE_ENDPOINT`, and report the outcome to the server.
//!
//! **Invariants:**
//! - deliveries of one stream are handled one at a time, in arrival order (per-recipient order);
//! - `ok` is reported only after the endpoint answered 2xx;
//! - anything that cannot be decrypted or verified, including a sender missing from the directory,
//!   is reported as `DECRYPTION_FAILED`, never dropped silently;
//! - a message already handed to the endpoint (same sender and id, within the last
//!   `DUPLICATE_SUPPRESSION_WINDOW` messages) is acknowledged without a second POST.

use crate::link::DirectoryCell;
use crate::metrics::Metrics;
use crate::recent::RecentIds;
use dmr::ErrorType;
use dmr::keys::PrivateKey;
use dmr::message::OutgoingMessage;
use dmr::proto::session_request::Frame as OutFrame;
use dmr::proto::{Delivery, DeliveryResult, DeliveryStatus, MessageError, SessionRequest};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Deliveries buffered per stream (the server sends one at a time; this is slack, not a queue).
const DELIVERY_BUFFER: usize = 16;

/// Turns deliveries into POSTs to the internal endpoint.
pub struct Inbox {
    key: Arc<PrivateKey>,
    directory: Arc<DirectoryCell>,
    http: reqwest::Client,
    endpoint: String,
    metrics: Arc<Metrics>,
    /// `sender/id` of messages already handed to the endpoint (redeliveries after a failover).
    delivered: Mutex<RecentIds>,
}

impl Inbox {
    /// Creates the inbox.
    pub fn new(
        key: Arc<PrivateKey>,
        directory: Arc<DirectoryCell>,
        endpoint: String,
        timeout: Duration,
        dedupe_window: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Arc::new(Self {
            key,
            directory,
            http,
            endpoint,
            metrics,
            delivered: Mutex::new(RecentIds::new(dedupe_window)),
        }))
    }

    /// Starts the worker of one stream; results go back on `results`.
    pub fn start_stream_worker(
        self: Arc<Self>,
        results: mpsc::Sender<SessionRequest>,
    ) -> (mpsc::Sender<Delivery>, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Delivery>(DELIVERY_BUFFER);
        let handle = tokio::spawn(async move {
            while let Some(delivery) = rx.recv().await {
                let result = self.handle(delivery).await;
                let ok = result.status() == DeliveryStatus::Ok;
                let frame = SessionRequest {
                    frame: Some(OutFrame::DeliveryResult(result)),
                };
                if results.send(frame).await.is_err() {
                    break;
                }
                self.metrics
                    .events_sent
                    .with_label_values(&[if ok { "delivery_ok" } else { "delivery_error" }])
                    .inc();
            }
        });
        (tx, handle)
    }

    fn lock_delivered(&self) -> std::sync::MutexGuard<'_, RecentIds> {
        self.delivered.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn handle(&self, delivery: Delivery) -> DeliveryResult {
        let started = Instant::now();
        let delivery_id = delivery.delivery_id;
        let fail = |kind: ErrorType, message: String| DeliveryResult {
            delivery_id,
            status: DeliveryStatus::Error as i32,
            errors: vec![MessageError {
                r#type: kind.as_str().to_owned(),
                message,
            }],
        };
        let Some(env) = delivery.envelope else {
            return fail(ErrorType::DecryptionFailed, "delivery without an envelope".into());
        };
        let dedupe_key = format!("{}/{}", env.sender_id.to_ascii_lowercase(), env.id);
        if self.lock_delivered().contains(&dedupe_key) {
            // Already handed to the endpoint; the server redelivered it (e.g. our ack was lost in a
            // failover). Acknowledge without a second POST.
            self.metrics.duplicates_suppressed.inc();
            tracing::info!(message_id = %env.id, sender_id = %env.sender_id, "duplicate delivery suppressed");
            return DeliveryResult {
                delivery_id,
                status: DeliveryStatus::Ok as i32,
                errors: vec![],
            };
        }
        let Some(sender) = self.directory.get().get(&env.sender_id).map(|e| e.key.clone()) else {
            tracing::warn!(message_id = %env.id, sender_id = %env.sender_id, "message from a sender not in this agent's directory");
            return fail(
                ErrorType::DecryptionFailed,
                format!("sender {} is not in this agent's directory", env.sender_id),
            );
        };
        let key = self.key.clone();
        let jwe = env.payload.clone();
        let opened = tokio::task::spawn_blocking(move || dmr::jose::open(&jwe, &key, &sender)).await;
        let payload = match opened {
            Ok(Ok(payload)) => payload,
            Ok(Err(e)) => {
                tracing::warn!(message_id = %env.id, sender_id = %env.sender_id, error = %e, "cannot decrypt or verify message");
                return fail(ErrorType::DecryptionFailed, e.to_string());
            }
            Err(e) => return fail(ErrorType::DecryptionFailed, format!("decryption task failed: {e}")),
        };
        let body = OutgoingMessage {
            id: env.id.clone(),
            sender_id: env.sender_id.clone(),
            recipient_id: env.recipient_id.clone(),
            timestamp: env.timestamp.clone(),
            kind: env.r#type.clone(),
            payload,
        };
        let outcome = self.http.post(&self.endpoint).json(&body).send().await;
        self.metrics.message_processing.observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(r) if r.status().is_success() => {
                self.lock_delivered().insert(dedupe_key);
                tracing::debug!(message_id = %env.id, sender_id = %env.sender_id, "handed to the internal endpoint");
                DeliveryResult {
                    delivery_id,
                    status: DeliveryStatus::Ok as i32,
                    errors: vec![],
                }
            }
            Ok(r) => {
                tracing::warn!(message_id = %env.id, status = r.status().as_u16(), "internal endpoint refused the message");
                fail(
                    ErrorType::DeliveryFailed,
                    format!("OUTGOING_MESSAGE_ENDPOINT answered {}", r.status()),
                )
            }
            Err(e) => {
                tracing::warn!(message_id = %env.id, error = %e, "internal endpoint unreachable");
                fail(
                    ErrorType::DeliveryFailed,
                    format!("OUTGOING_MESSAGE_ENDPOINT failed: {e}"),
                )
            }
        }
    }
}
