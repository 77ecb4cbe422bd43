//! What the operators' console ([`crate::admin`]) needs of the broker, on both engines: read a
//! queue's messages with their dead-letter history, and move selected messages out of the middle
//! of a queue — to another queue (replay) or nowhere (purge).
//!
//! **Invariant:** a moved message is in the target queue durably (RabbitMQ's publisher confirm; the
//! store's fsync) before it leaves the source queue, so a move never loses a message. On RabbitMQ a
//! crash (of the server, the connection or the broker) between the confirm and the ack leaves it in
//! both queues: the recipient gets it once from its queue, and a later replay of the same dead
//! letter would deliver it again (the agent drops a redelivered id it has seen recently). The
//! embedded engine moves it in one transaction: exactly one of the two queues holds it.
//!
//! Concurrency: the queues operators work on have no consumer of the server's (`<id>.dlq`,
//! validation-failures). On RabbitMQ the messages are taken with `basic.get` on a channel of the
//! operation's own; those not selected stay unacknowledged until the channel closes and then return
//! to the queue, so another operator's concurrent listing or move does not see them meanwhile (it
//! reports fewer messages; nothing is lost or doubled).

use super::{Broker, BrokerError, Engine};
use std::collections::BTreeMap;

/// Header names of a message's last dead-lettering, the same on both engines (RabbitMQ's `x-death`
/// table is flattened into them): reason (`rejected`, `expired`, ...), count, source queue, time
/// (unix milliseconds).
pub const DEATH_REASON: &str = dmr_store::X_DEATH_REASON;
/// See [`DEATH_REASON`].
pub const DEATH_COUNT: &str = dmr_store::X_DEATH_COUNT;
/// See [`DEATH_REASON`].
pub const DEATH_QUEUE: &str = dmr_store::X_DEATH_QUEUE;
/// See [`DEATH_REASON`].
pub const DEATH_TIME: &str = dmr_store::X_DEATH_TIME;

/// A message read for an operator: its body and headers (as text), left in its queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// The message as queued.
    pub body: Vec<u8>,
    /// Its headers as text, with the last `x-death` entry flattened into [`DEATH_REASON`] and
    /// friends.
    pub headers: BTreeMap<String, String>,
}

/// Picks the messages an operation applies to, by body.
pub type Select<'a> = &'a (dyn Fn(&[u8]) -> bool + Send + Sync);

impl Broker {
    /// Up to `limit` ready messages of `queue`, oldest first, left in the queue.
    pub async fn inspect(&self, queue: &str, limit: usize) -> Result<Vec<Inspected>, BrokerError> {
        match &self.engine {
            Engine::RabbitMq(r) => r.inspect(queue, limit).await,
            Engine::Embedded(e) => e.inspect(queue, limit),
        }
    }

    /// Moves the messages of `queue` that `select` picks (looking at most at `max` of them, oldest
    /// first) to the end of `to`, or removes them when `to` is `None`; returns how many. Each is
    /// durably in `to` before it leaves `queue` (see the module docs for a crash in between).
    pub async fn move_where(
        &self,
        queue: &str,
        to: Option<&str>,
        select: Select<'_>,
        max: usize,
    ) -> Result<u64, BrokerError> {
        match &self.engine {
            Engine::RabbitMq(r) => r.move_where(queue, to, select, max).await,
            Engine::Embedded(e) => e.move_where(queue, to, select, max).await,
        }
    }
}

/// One instance's live sessions, as it answers a presence question ([`Broker::ask_presence`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceNote {
    /// The answering instance's name.
    pub instance: String,
    /// Its sessions.
    pub sessions: Vec<PresenceSession>,
}

/// A session in a [`PresenceNote`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceSession {
    /// The agent.
    pub agent_id: String,
    /// "gRPC" or "Socket.IO".
    pub transport: String,
    /// When it opened (RFC 3339).
    pub since: String,
    /// The agent's address, when known.
    pub remote_address: Option<String>,
}

/// What this instance answers when asked who is connected here.
pub type PresenceSource = std::sync::Arc<dyn Fn() -> PresenceNote + Send + Sync>;

impl Broker {
    /// Answers other instances' presence questions with `source()` until `stop` (RabbitMQ; the
    /// embedded engine has no other instance, and returns at once). Re-subscribes after each
    /// reconnection.
    pub async fn serve_presence(&self, source: PresenceSource, stop: tokio_util::sync::CancellationToken) {
        match &self.engine {
            Engine::RabbitMq(r) => r.serve_presence(source, stop).await,
            Engine::Embedded(_) => {}
        }
    }

    /// Asks every instance (this one included) who is connected there, and collects the answers
    /// that arrive within `wait` (RabbitMQ; nothing on the embedded engine).
    pub async fn ask_presence(&self, wait: std::time::Duration) -> Result<Vec<PresenceNote>, BrokerError> {
        match &self.engine {
            Engine::RabbitMq(r) => r.ask_presence(wait).await,
            Engine::Embedded(_) => Ok(Vec::new()),
        }
    }
}
