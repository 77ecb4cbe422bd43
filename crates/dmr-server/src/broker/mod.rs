//! The RabbitMQ side, split by job:
//! - [`supervisor`]: one connection for publishing and declarations, kept up by a reconnect loop
//!   (every `RABBITMQ_DEFAULT_DEFAULT_RECONNECT_INTERVAL`);
//! - [`topology`]: the original's queues and their arguments (compat §6);
//! - [`publish`]: confirmed publishing;
//! - [`consumers`]: a pool of connections for per-agent consumers;
//! - [`announce`]: what instances tell each other on the `dmr.sessions` fanout exchange.
//!
//! **Invariants:**
//! - [`Broker::publish`] returns `Ok` only when RabbitMQ confirmed the message (ack, and not
//!   returned as unroutable): "accepted" means durably queued.
//! - Declarations use a throw-away channel, so a `PRECONDITION_FAILED` on one queue cannot poison
//!   the publishing channel.
//! - While disconnected, every operation fails fast with [`BrokerError::Unavailable`]; nothing is
//!   buffered in memory.
//! - Each consumer has a channel of its own (closing it returns its unacknowledged deliveries), and
//!   a connection carries at most `RABBITMQ_CONSUMERS_PER_CONNECTION` (1,000) of them: RabbitMQ caps
//!   channels per connection (`channel_max`, 2,047 by default), and one instance serves thousands of
//!   agents.

mod announce;
mod consumers;
mod legacy_tokens;
mod publish;
mod supervisor;
mod topology;

pub use announce::{Announcement, RemoteSessionHook, SESSIONS_EXCHANGE};
pub use consumers::{AgentConsumer, QueueCounts, queue_counts};
pub use legacy_tokens::TokenRecord;
pub use supervisor::TopologySource;

use crate::config::RabbitConfig;
use crate::metrics::Metrics;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use std::sync::Arc;
use tokio::sync::{RwLock, watch};

/// What went wrong talking to RabbitMQ.
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
    /// The broker negatively acknowledged or returned the message.
    #[error("RabbitMQ did not accept the message for queue {queue:?}: {}", rejection.as_str())]
    NotAccepted {
        /// The queue.
        queue: String,
        /// How it refused.
        rejection: Rejection,
    },
}

/// How RabbitMQ refused a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Returned: no queue of that name (mandatory publish).
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

/// The AMQP soft error in `e`, if the broker sent one.
fn soft_error(e: &lapin::Error) -> Option<&AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

impl BrokerError {
    /// True when the operation failed because the queue does not exist (`NOT_FOUND`).
    pub fn is_queue_missing(&self) -> bool {
        matches!(self, Self::Amqp { source, .. } if soft_error(source) == Some(&AMQPSoftError::NOTFOUND))
    }

    /// True when a queue exists with other arguments (`PRECONDITION_FAILED`).
    pub fn is_precondition_failed(&self) -> bool {
        matches!(self, Self::Amqp { source, .. } if soft_error(source) == Some(&AMQPSoftError::PRECONDITIONFAILED))
    }
}

/// Shared handle to RabbitMQ.
pub struct Broker {
    cfg: RabbitConfig,
    instance_id: String,
    link: RwLock<Option<Arc<supervisor::Link>>>,
    ready: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl Broker {
    /// Creates the handle; call [`Broker::run`] to connect and keep connected.
    pub fn new(cfg: RabbitConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            instance_id: uuid::Uuid::new_v4().to_string(),
            link: RwLock::new(None),
            ready: watch::channel(false).0,
            metrics,
        })
    }

    /// Watches connection readiness.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// True while connected with topology declared.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.cfg
    }

    fn set_ready(&self, ready: bool) {
        self.ready.send_replace(ready);
        self.metrics.rabbitmq_connected.set(i64::from(ready));
    }

    async fn link(&self) -> Result<Arc<supervisor::Link>, BrokerError> {
        self.link
            .read()
            .await
            .clone()
            .ok_or_else(|| BrokerError::Unavailable(self.cfg.display_addr()))
    }
}
