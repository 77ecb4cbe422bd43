//! The RabbitMQ engine, split by job:
//! - [`supervisor`]: one connection for publishing and declarations, kept up by a reconnect loop
//!   (every `RABBITMQ_DEFAULT_DEFAULT_RECONNECT_INTERVAL`);
//! - [`topology`]: the original's queues and their arguments (compat §6);
//! - [`publish`]: confirmed publishing;
//! - [`consumers`]: a pool of connections for per-agent consumers;
//! - [`announce`]: what instances tell each other on the `dmr.sessions` fanout exchange;
//! - [`legacy_tokens`]: the last legacy token digest per agent.
//!
//! **Invariants:**
//! - [`RabbitMq::publish`] returns `Ok` only when RabbitMQ confirmed the message (ack, and not
//!   returned as unroutable): "accepted" means durably queued.
//! - Declarations use a throw-away channel, so a `PRECONDITION_FAILED` on one queue cannot poison
//!   the publishing channel.
//! - While disconnected, every operation fails fast with [`BrokerError::Unavailable`]; nothing is
//!   buffered in memory.
//! - Each consumer has a channel of its own (closing it returns its unacknowledged deliveries), and
//!   a connection carries at most `RABBITMQ_CONSUMERS_PER_CONNECTION` (1,000) of them: RabbitMQ caps
//!   channels per connection (`channel_max`, 2,047 by default), and one instance serves thousands of
//!   agents.

mod admin;
mod announce;
mod consumers;
mod legacy_tokens;
mod presence;
mod publish;
mod supervisor;
mod topology;

pub use announce::SESSIONS_EXCHANGE;
pub use consumers::RabbitConsumer;
pub(crate) use consumers::settle;

use super::BrokerError;
use crate::config::RabbitConfig;
use crate::metrics::Metrics;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use std::sync::Arc;
use tokio::sync::{RwLock, watch};

/// The AMQP soft error in `e`, if the broker sent one.
pub(super) fn soft_error(e: &lapin::Error) -> Option<&AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Shared handle to RabbitMQ.
pub struct RabbitMq {
    cfg: RabbitConfig,
    instance_id: String,
    link: RwLock<Option<Arc<supervisor::Link>>>,
    ready: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl RabbitMq {
    /// Creates the handle; call [`RabbitMq::run`] to connect and keep connected.
    pub fn new(cfg: RabbitConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            cfg,
            instance_id: uuid::Uuid::new_v4().to_string(),
            link: RwLock::new(None),
            ready: watch::channel(false).0,
            metrics,
        }
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
        self.metrics.broker_ready.set(i64::from(ready));
    }

    async fn link(&self) -> Result<Arc<supervisor::Link>, BrokerError> {
        self.link
            .read()
            .await
            .clone()
            .ok_or_else(|| BrokerError::Unavailable(self.cfg.display_addr()))
    }
}
