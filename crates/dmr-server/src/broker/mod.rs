//! The broker: the one interface routing, delivery, retries and dead-lettering are written against,
//! with two engines behind it (`BROKER`):
//! - [`rabbitmq`]: RabbitMQ, the original's topology (compat §6): the distributed engine, shared
//!   by every server instance;
//! - [`embedded`]: in-process queues, durable on disk ([`dmr_store`]), for a single instance with
//!   nothing installed.
//!
//! Both give the same guarantees, which the end-to-end tests demand of each:
//! - [`Broker::publish`] (and the future of [`Broker::start_publish`]) returns `Ok` only once the
//!   message is durably queued: "accepted" means it survives a crash of the broker (RabbitMQ's
//!   publisher confirm; an fsync for the embedded engine);
//! - one queue per agent, `<agent-id>`, delivered in order to [`AgentConsumer`]s with at most
//!   `RABBITMQ_PREFETCH_COUNT` unsettled messages each; a message taken and never settled (the
//!   consumer closed, the process died) is delivered again, before newer ones;
//! - message TTL (`RABBITMQ_DEFAULT_TTL`) moves expired messages to `<agent-id>.dlq`, and so does
//!   [`Taken::reject`]; [`Taken::dead_letter`] moves one there with the delivery's attempts and
//!   last error;
//! - the validation-failures queue, and the last legacy token per agent.
//!
//! While an engine is not ready (RabbitMQ disconnected), every operation fails fast with
//! [`BrokerError::Unavailable`]; nothing is buffered in memory.

pub mod admin;
pub mod embedded;
pub mod rabbitmq;

pub use rabbitmq::SESSIONS_EXCHANGE;

use crate::config::{BrokerConfig, BrokerEngine, RabbitConfig};
use crate::metrics::Metrics;
use futures::future::Either;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Not connected right now; retry later.
    #[error("RabbitMQ at {0} is unavailable")]
    Unavailable(String),
    /// RabbitMQ refused our credentials or the virtual host.
    #[error(
        "RabbitMQ at {addr} refused user {user:?} on virtual host {vhost:?}: check RABBITMQ_DEFAULT_USER, RABBITMQ_DEFAULT_PASS and RABBITMQ_DEFAULT_VHOST ({detail})"
    )]
    AccessRefused {
        /// host:port.
        addr: String,
        /// The user name.
        user: String,
        /// The virtual host.
        vhost: String,
        /// What the broker or client said.
        detail: String,
    },
    /// The broker refused or failed the operation.
    #[error("RabbitMQ {operation} on queue {queue:?} failed: {source}")]
    Amqp {
        /// What we were doing.
        operation: &'static str,
        /// The queue involved.
        queue: String,
        /// The client's error.
        source: lapin::Error,
    },
    /// The embedded engine's store failed the operation.
    #[error("embedded broker: {operation} on queue {queue:?} failed: {source}")]
    Store {
        /// What we were doing.
        operation: &'static str,
        /// The queue involved.
        queue: String,
        /// The store's error.
        source: Box<dmr_store::StoreError>,
    },
    /// The embedded engine's data directory cannot be opened (in use by another server, unreadable).
    #[error("embedded broker: cannot open its data directory (EMBEDDED_DATA_DIR): {0}")]
    Open(Box<dmr_store::StoreError>),
    /// The broker negatively acknowledged or returned the message.
    #[error("the broker did not accept the message for queue {queue:?}: {}", rejection.as_str())]
    NotAccepted {
        /// The queue.
        queue: String,
        /// How it refused.
        rejection: Rejection,
    },
}

impl BrokerError {
    /// True when the operation failed because the queue does not exist.
    pub fn is_queue_missing(&self) -> bool {
        match self {
            Self::Amqp { source, .. } => {
                rabbitmq::soft_error(source) == Some(&lapin::protocol::AMQPSoftError::NOTFOUND)
            }
            Self::Store { source, .. } => matches!(**source, dmr_store::StoreError::QueueNotFound(_)),
            _ => false,
        }
    }

    /// True when a queue exists with other arguments (RabbitMQ's `PRECONDITION_FAILED`).
    pub fn is_precondition_failed(&self) -> bool {
        match self {
            Self::Amqp { source, .. } => {
                rabbitmq::soft_error(source) == Some(&lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)
            }
            Self::Store { source, .. } => matches!(**source, dmr_store::StoreError::ArgsDiffer { .. }),
            _ => false,
        }
    }
}

/// How the broker refused a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No queue of that name (RabbitMQ returned the mandatory publish).
    Unroutable,
    /// Negatively acknowledged.
    Nacked,
    /// The channel was not in confirm mode (a bug on our side).
    ConfirmsOff,
}

impl Rejection {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unroutable => "unroutable (queue does not exist)",
            Self::Nacked => "negatively acknowledged by the broker",
            Self::ConfirmsOff => "publisher confirms not enabled",
        }
    }
}

/// What a queue holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery (not counting unsettled ones).
    pub messages: u32,
    /// Consumers attached (on any instance).
    pub consumers: u32,
}

/// Returns the agent ids whose queues must exist (called on every (re)connect).
pub type TopologySource = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Called with an agent id and an [`Announcement`] made by another server instance.
pub type RemoteSessionHook = Arc<dyn Fn(&str, Announcement) + Send + Sync>;

/// What instances tell each other about an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// The agent opened a session on the announcing instance (older sessions elsewhere must close).
    Session,
    /// The agent's queue was missing and has been declared again (consumers must re-attach).
    QueueRecreated,
}

impl Announcement {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::QueueRecreated => "queue-recreated",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "session" => Some(Self::Session),
            "queue-recreated" => Some(Self::QueueRecreated),
            _ => None,
        }
    }
}

/// What is remembered of an agent's last authenticated legacy session: digests only, never the
/// token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    /// SHA-256 of the token, hex.
    pub token_digest: String,
    /// SHA-256 of the directory key the token was verified with, hex (a re-keyed agent's old
    /// token is refused).
    pub key_digest: String,
}

/// The dead-letter queue of agent `agent_id`'s queue (compat §6).
pub fn dlq_name(agent_id: &str) -> String {
    format!("{agent_id}.dlq")
}

/// A header value of a dead letter, which each engine writes in its own types.
pub(crate) enum DeadLetterValue {
    Text(String),
    Count(u32),
}

/// The headers a delivery dead-lettered after failed attempts carries, on either engine: why
/// (`x-dmr-dead-letter-reason`), how many attempts, the last error, and when.
pub(crate) fn dead_letter_headers(attempts: u32, last_error: &str) -> [(&'static str, DeadLetterValue); 4] {
    [
        (
            "x-dmr-dead-letter-reason",
            DeadLetterValue::Text("delivery-failed".into()),
        ),
        ("x-dmr-attempts", DeadLetterValue::Count(attempts)),
        ("x-dmr-last-error", DeadLetterValue::Text(last_error.into())),
        ("x-dmr-dead-lettered-at", DeadLetterValue::Text(dmr::time::now_iso())),
    ]
}

/// The queue that remembers an agent's last legacy token (at most one message, newest wins).
pub(crate) fn legacy_token_queue(agent_id: &str) -> String {
    format!("dmr.legacy-token.{agent_id}")
}

/// The engine behind a [`Broker`].
enum Engine {
    RabbitMq(rabbitmq::RabbitMq),
    Embedded(embedded::Embedded),
}

/// Shared handle to the broker, whichever the engine.
pub struct Broker {
    engine: Engine,
    rabbitmq: RabbitConfig,
}

impl Broker {
    /// Creates the handle; call [`Broker::run`] to connect (RabbitMQ) or declare the queues
    /// (embedded). The embedded engine opens its data directory here, so a directory in use by
    /// another server is an error at start.
    pub fn new(cfg: &BrokerConfig, rabbitmq: RabbitConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, BrokerError> {
        let engine = match cfg.engine {
            BrokerEngine::Rabbitmq => Engine::RabbitMq(rabbitmq::RabbitMq::new(rabbitmq.clone(), metrics)),
            BrokerEngine::Embedded => Engine::Embedded(embedded::Embedded::open(
                &cfg.embedded_data_dir,
                rabbitmq.clone(),
                metrics,
            )?),
        };
        Ok(Arc::new(Self { engine, rabbitmq }))
    }

    /// Which engine this is.
    pub fn engine(&self) -> BrokerEngine {
        match self.engine {
            Engine::RabbitMq(_) => BrokerEngine::Rabbitmq,
            Engine::Embedded(_) => BrokerEngine::Embedded,
        }
    }

    /// The queue settings (TTLs, prefetch, queue names), shared by both engines.
    pub fn config(&self) -> &RabbitConfig {
        &self.rabbitmq
    }

    /// Watches readiness (connected with the topology declared).
    pub fn ready(&self) -> watch::Receiver<bool> {
        match &self.engine {
            Engine::RabbitMq(r) => r.ready(),
            Engine::Embedded(e) => e.ready(),
        }
    }

    /// True while the engine can take and deliver messages.
    pub fn is_ready(&self) -> bool {
        *self.ready().borrow()
    }

    /// Checks RabbitMQ's address and credentials (a refusal is a start-up error); nothing to check
    /// for the embedded engine.
    pub async fn check_access(&self) -> Result<(), BrokerError> {
        match &self.engine {
            Engine::RabbitMq(r) => r.check_access().await,
            Engine::Embedded(_) => Ok(()),
        }
    }

    /// Keeps the engine up until `stop`: RabbitMQ's reconnect loop; the embedded engine's
    /// declarations (then it waits and closes its store).
    pub async fn run(
        self: Arc<Self>,
        topology: TopologySource,
        remote_sessions: RemoteSessionHook,
        stop: CancellationToken,
    ) {
        match &self.engine {
            Engine::RabbitMq(r) => r.run(topology, remote_sessions, stop).await,
            Engine::Embedded(e) => e.run(topology, stop).await,
        }
    }

    /// Publishes `body` durably to `queue` and waits until it is durably queued.
    pub async fn publish(&self, queue: &str, body: &[u8]) -> Result<(), BrokerError> {
        self.start_publish(queue, body).await?.await
    }

    /// Sends `body` to `queue` now (so calls made in order are queued in order) and returns a future
    /// that resolves once it is durably queued.
    pub async fn start_publish(
        &self,
        queue: &str,
        body: &[u8],
    ) -> Result<impl Future<Output = Result<(), BrokerError>> + use<>, BrokerError> {
        Ok(match &self.engine {
            Engine::RabbitMq(r) => Either::Left(r.start_publish(queue, body).await?),
            Engine::Embedded(e) => Either::Right(e.start_publish(queue, body)?),
        })
    }

    /// Declares `<id>.dlq` and `<id>` with the original's arguments (compat §6).
    pub async fn declare_agent(&self, agent_id: &str) -> Result<(), BrokerError> {
        match &self.engine {
            Engine::RabbitMq(r) => r.declare_agent(agent_id).await,
            Engine::Embedded(e) => e.declare_agent(agent_id).await,
        }
    }

    /// What `queue` holds now (messages ready, consumers on any instance).
    pub async fn counts(&self, queue: &str) -> Result<QueueCounts, BrokerError> {
        match &self.engine {
            Engine::RabbitMq(r) => r.counts(queue).await,
            Engine::Embedded(e) => e.counts(queue),
        }
    }

    /// Open connections that carry agent consumers (RabbitMQ; 0 for the embedded engine).
    pub async fn consumer_connections(&self) -> usize {
        match &self.engine {
            Engine::RabbitMq(r) => r.consumer_connections().await,
            Engine::Embedded(_) => 0,
        }
    }

    /// Starts consuming `queue` with at most `RABBITMQ_PREFETCH_COUNT` unsettled messages.
    pub async fn consume(&self, queue: &str, consumer_tag: &str) -> Result<AgentConsumer, BrokerError> {
        Ok(AgentConsumer(match &self.engine {
            Engine::RabbitMq(r) => Consumer::RabbitMq(Box::new(r.consume(queue, consumer_tag).await?)),
            Engine::Embedded(e) => Consumer::Embedded(e.consume(queue)?),
        }))
    }

    /// Tells the other instances about `agent_id` (best effort; the embedded engine has none).
    pub async fn announce(&self, agent_id: &str, event: Announcement) {
        match &self.engine {
            Engine::RabbitMq(r) => r.announce(agent_id, event).await,
            Engine::Embedded(_) => {}
        }
    }

    /// Remembers `record` (for `ttl_ms`) as the agent's last authenticated legacy token, durably.
    pub async fn remember_legacy_token(
        &self,
        agent_id: &str,
        record: &TokenRecord,
        ttl_ms: u64,
    ) -> Result<(), BrokerError> {
        match &self.engine {
            Engine::RabbitMq(r) => r.remember_legacy_token(agent_id, record, ttl_ms).await,
            Engine::Embedded(e) => e.remember_legacy_token(agent_id, record, ttl_ms).await,
        }
    }

    /// The agent's last authenticated legacy token, if remembered.
    pub async fn last_legacy_token(&self, agent_id: &str, ttl_ms: u64) -> Result<Option<TokenRecord>, BrokerError> {
        match &self.engine {
            Engine::RabbitMq(r) => r.last_legacy_token(agent_id, ttl_ms).await,
            Engine::Embedded(e) => e.last_legacy_token(agent_id, ttl_ms),
        }
    }

    /// Up to `limit` messages ready in `queue`, oldest first, with their headers, left in the
    /// queue (RabbitMQ: taken unacknowledged on a channel of their own, then returned to the queue
    /// by closing it, which marks them redelivered). For operators and tests.
    pub async fn list(&self, queue: &str, limit: usize) -> Result<Vec<Listed>, BrokerError> {
        match &self.engine {
            Engine::RabbitMq(r) => r.list(queue, limit).await,
            Engine::Embedded(e) => e.list(queue, limit),
        }
    }

    /// Moves `taken`, taken from `<agent-id>`'s queue, to `<agent-id>.dlq` with the number of
    /// attempts and the last error (`x-dmr-attempts`, `x-dmr-last-error`); it leaves the queue only
    /// once it is in the DLQ.
    pub async fn dead_letter(
        &self,
        taken: &Taken,
        dlq: &str,
        attempts: u32,
        last_error: &str,
    ) -> Result<(), BrokerError> {
        match &taken.settle {
            Settle::RabbitMq(acker) => {
                let published = match &self.engine {
                    Engine::RabbitMq(r) => r.publish_dead_letter(dlq, &taken.body, attempts, last_error).await,
                    Engine::Embedded(_) => Err(BrokerError::Unavailable(dlq.to_owned())),
                };
                let reject = match published {
                    Ok(()) => false,
                    Err(e) => {
                        tracing::warn!(queue = dlq, error = %e, "could not publish the dead letter; rejecting it to the DLQ instead");
                        true
                    }
                };
                rabbitmq::settle(acker, reject)
                    .await
                    .map_err(|source| BrokerError::Amqp {
                        operation: "dead-letter",
                        queue: dlq.to_owned(),
                        source,
                    })
            }
            Settle::Embedded(acker, seq) => embedded::dead_letter(acker, *seq, dlq, attempts, last_error).await,
        }
    }
}

/// A message listed by [`Broker::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The message as published.
    pub body: Vec<u8>,
    /// Its headers (strings and integers as text; others in their debug form).
    pub headers: std::collections::BTreeMap<String, String>,
}

/// A consumer of one agent queue, whichever the engine.
pub struct AgentConsumer(Consumer);

enum Consumer {
    RabbitMq(Box<rabbitmq::RabbitConsumer>),
    Embedded(embedded::EmbeddedConsumer),
}

impl AgentConsumer {
    /// The next message, in queue order (`None`: the broker ended the consumer, e.g. the queue was
    /// deleted; consume again).
    pub async fn next(&mut self) -> Option<Result<Taken, BrokerError>> {
        match &mut self.0 {
            Consumer::RabbitMq(c) => c.next().await,
            Consumer::Embedded(c) => c.next().await.map(Ok),
        }
    }

    /// The counts of the consumed queue (an error if it is gone).
    pub async fn counts(&self) -> Result<QueueCounts, BrokerError> {
        match &self.0 {
            Consumer::RabbitMq(c) => c.counts().await,
            Consumer::Embedded(c) => c.counts(),
        }
    }

    /// Stops consuming: every message taken and not settled returns to the queue, ahead of newer
    /// ones.
    pub async fn close(self) {
        match self.0 {
            Consumer::RabbitMq(c) => c.close().await,
            Consumer::Embedded(c) => drop(c),
        }
    }
}

/// A message taken from an agent queue, to be settled once (ack, reject, or
/// [`Broker::dead_letter`]); left unsettled, it returns to the queue when its consumer closes.
pub struct Taken {
    /// The message as published.
    pub body: Vec<u8>,
    settle: Settle,
}

enum Settle {
    RabbitMq(lapin::Acker),
    Embedded(dmr_store::Acker, u64),
}

impl Taken {
    pub(crate) fn rabbitmq(body: Vec<u8>, acker: lapin::Acker) -> Self {
        Self {
            body,
            settle: Settle::RabbitMq(acker),
        }
    }

    pub(crate) fn embedded(body: Vec<u8>, acker: dmr_store::Acker, seq: u64) -> Self {
        Self {
            body,
            settle: Settle::Embedded(acker, seq),
        }
    }

    /// Done with it: it leaves the queue.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.finish(false).await
    }

    /// Refused: the broker moves it to the queue's DLQ (`x-death` reason `rejected`).
    pub async fn reject(&self) -> Result<(), BrokerError> {
        self.finish(true).await
    }

    async fn finish(&self, reject: bool) -> Result<(), BrokerError> {
        match &self.settle {
            Settle::RabbitMq(acker) => rabbitmq::settle(acker, reject)
                .await
                .map_err(|source| BrokerError::Amqp {
                    operation: if reject { "reject" } else { "ack" },
                    queue: String::new(),
                    source,
                }),
            Settle::Embedded(acker, seq) => embedded::settle(acker, *seq, reject).await,
        }
    }
}
