//! Incoming deliveries: decrypt, verify the sender's signature, POST the plaintext to
//! `OUTGOING_MESSAGE_ENDPOINT`, and report the outcome to the server.
//!
//! The server may hand over several deliveries ahead of their results (`MESSAGE_DELIVERY_WINDOW`).
//! The next [`DECRYPT_AHEAD`] are decrypted and verified in parallel, on the blocking pool, while
//! the endpoint gets them one at a time.
//!
//! **Invariants:**
//! - deliveries of one stream reach the endpoint one at a time, in arrival order (per-recipient
//!   order), and are answered in that order;
//! - after the endpoint refused a delivery of epoch E (proto `Delivery.epoch`, 0 = the server
//!   sends one at a time), later deliveries of the same epoch are not posted but answered "held
//!   back": the server hands them over again after the failed one;
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
use futures::StreamExt as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Deliveries buffered per stream: above the server's window (`MESSAGE_DELIVERY_WINDOW`, 8 by
/// default), so that the stream's reader never waits for the endpoint.
const DELIVERY_BUFFER: usize = 64;

/// Deliveries decrypted and verified ahead of the one being posted.
pub const DECRYPT_AHEAD: usize = 8;

/// A delivery made ready for the endpoint (or already answered).
enum Opened {
    /// Decrypted and verified: to be posted.
    Ready {
        delivery_id: u64,
        epoch: u64,
        dedupe_key: String,
        body: Box<OutgoingMessage>,
        started: Instant,
    },
    /// Answered without posting (cannot be opened).
    Answered(DeliveryResult),
}

/// The keys deliveries are decrypted with: the agent's own, and while it re-keys, its previous one
/// (`AGENT_PREVIOUS_PRIVATE_KEY_FILE`) for messages encrypted to the old key before the switch.
pub struct DecryptionKeys {
    /// The agent's key.
    pub current: Arc<PrivateKey>,
    /// The key it had before, if it is being rotated.
    pub previous: Option<PrivateKey>,
}

impl DecryptionKeys {
    /// Decrypts and verifies `jwe` from `sender`: with the current key, else the previous one.
    /// On failure, the current key's error (the one that matters once the rotation is over).
    pub fn open(
        &self,
        jwe: &str,
        sender: &dmr::keys::PublicKey,
    ) -> Result<Option<serde_json::Value>, dmr::jose::JoseError> {
        let first = dmr::jose::open(jwe, &self.current, sender);
        match (&first, &self.previous) {
            (Err(_), Some(previous)) => dmr::jose::open(jwe, previous, sender).or(first),
            _ => first,
        }
    }
}

/// Turns deliveries into POSTs to the internal endpoint.
pub struct Inbox {
    keys: Arc<DecryptionKeys>,
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
        keys: Arc<DecryptionKeys>,
        directory: Arc<DirectoryCell>,
        endpoint: String,
        timeout: Duration,
        dedupe_window: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Arc::new(Self {
            keys,
            directory,
            http,
            endpoint,
            metrics,
            delivered: Mutex::new(RecentIds::new(dedupe_window)),
        }))
    }

    /// Starts the worker of one stream; results go back on `results`, in arrival order.
    pub fn start_stream_worker(
        self: Arc<Self>,
        results: mpsc::Sender<SessionRequest>,
    ) -> (mpsc::Sender<Delivery>, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Delivery>(DELIVERY_BUFFER);
        let handle = tokio::spawn(async move {
            let opener = self.clone();
            let opened = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
                .map(move |delivery| {
                    let inbox = opener.clone();
                    async move { inbox.open(delivery).await }
                })
                .buffered(DECRYPT_AHEAD);
            tokio::pin!(opened);
            // The epoch in which the endpoint refused a delivery: later ones of it are held back.
            let mut refused_in: Option<u64> = None;
            while let Some(opened) = opened.next().await {
                let result = self.deliver(opened, &mut refused_in).await;
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

    /// Decrypts and verifies a delivery (on the blocking pool); may run ahead of [`Self::deliver`].
    async fn open(&self, delivery: Delivery) -> Opened {
        let started = Instant::now();
        let delivery_id = delivery.delivery_id;
        let Some(env) = delivery.envelope else {
            return Opened::Answered(failed(
                delivery_id,
                ErrorType::DecryptionFailed,
                "delivery without an envelope".into(),
            ));
        };
        let dedupe_key = format!("{}/{}", env.sender_id.to_ascii_lowercase(), env.id);
        let Some(sender) = self.directory.get().get(&env.sender_id).map(|e| e.key.clone()) else {
            tracing::warn!(message_id = %env.id, sender_id = %env.sender_id, "message from a sender not in this agent's directory");
            return Opened::Answered(failed(
                delivery_id,
                ErrorType::DecryptionFailed,
                format!("sender {} is not in this agent's directory", env.sender_id),
            ));
        };
        let keys = self.keys.clone();
        let jwe = env.payload;
        let opened = tokio::task::spawn_blocking(move || keys.open(&jwe, &sender)).await;
        let payload = match opened {
            Ok(Ok(payload)) => payload,
            Ok(Err(e)) => {
                tracing::warn!(message_id = %env.id, sender_id = %env.sender_id, error = %e, "cannot decrypt or verify message");
                return Opened::Answered(failed(delivery_id, ErrorType::DecryptionFailed, e.to_string()));
            }
            Err(e) => {
                return Opened::Answered(failed(
                    delivery_id,
                    ErrorType::DecryptionFailed,
                    format!("decryption task failed: {e}"),
                ));
            }
        };
        Opened::Ready {
            delivery_id,
            epoch: delivery.epoch,
            dedupe_key,
            body: Box::new(OutgoingMessage {
                id: env.id,
                sender_id: env.sender_id,
                recipient_id: env.recipient_id,
                timestamp: env.timestamp,
                kind: env.r#type,
                payload,
            }),
            started,
        }
    }

    /// Posts an opened delivery to the endpoint, in arrival order; `refused_in` is the epoch of the
    /// last refused delivery (see the module's invariants).
    async fn deliver(&self, opened: Opened, refused_in: &mut Option<u64>) -> DeliveryResult {
        let (delivery_id, epoch, dedupe_key, body, started) = match opened {
            Opened::Answered(result) => return result,
            Opened::Ready {
                delivery_id,
                epoch,
                dedupe_key,
                body,
                started,
            } => (delivery_id, epoch, dedupe_key, body, started),
        };
        if epoch != 0 && *refused_in == Some(epoch) {
            self.metrics.deliveries_held_back.inc();
            tracing::debug!(message_id = %body.id, "held back behind a refused delivery; the server hands it over again");
            return failed(
                delivery_id,
                ErrorType::DeliveryFailed,
                "held back: an earlier message to this agent was not delivered yet".into(),
            );
        }
        if self.lock_delivered().contains(&dedupe_key) {
            // Already handed to the endpoint; the server redelivered it (e.g. our ack was lost in a
            // failover). Acknowledge without a second POST.
            self.metrics.duplicates_suppressed.inc();
            tracing::info!(message_id = %body.id, sender_id = %body.sender_id, "duplicate delivery suppressed");
            return DeliveryResult {
                delivery_id,
                status: DeliveryStatus::Ok as i32,
                errors: vec![],
            };
        }
        let outcome = self.http.post(&self.endpoint).json(&body).send().await;
        self.metrics.message_processing.observe(started.elapsed().as_secs_f64());
        let refused = match outcome {
            Ok(r) if r.status().is_success() => {
                self.lock_delivered().insert(dedupe_key);
                tracing::debug!(message_id = %body.id, sender_id = %body.sender_id, "handed to the internal endpoint");
                return DeliveryResult {
                    delivery_id,
                    status: DeliveryStatus::Ok as i32,
                    errors: vec![],
                };
            }
            Ok(r) => {
                tracing::warn!(message_id = %body.id, status = r.status().as_u16(), "internal endpoint refused the message");
                format!("OUTGOING_MESSAGE_ENDPOINT answered {}", r.status())
            }
            Err(e) => {
                tracing::warn!(message_id = %body.id, error = %e, "internal endpoint unreachable");
                format!("OUTGOING_MESSAGE_ENDPOINT failed: {e}")
            }
        };
        if epoch != 0 {
            *refused_in = Some(epoch);
        }
        failed(delivery_id, ErrorType::DeliveryFailed, refused)
    }
}

/// An error answer to `delivery_id`.
fn failed(delivery_id: u64, kind: ErrorType, message: String) -> DeliveryResult {
    DeliveryResult {
        delivery_id,
        status: DeliveryStatus::Error as i32,
        errors: vec![MessageError {
            r#type: kind.as_str().to_owned(),
            message,
        }],
    }
}
