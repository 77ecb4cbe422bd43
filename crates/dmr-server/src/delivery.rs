//! Delivering an agent's queue to its live session, transport-agnostic.
//!
//! While a session is open, [`run`] consumes the agent's queue (bounded by the prefetch count) and
//! hands messages to the session one at a time, in queue order.
//!
//! **Invariants:**
//! - a message is acked to RabbitMQ only after the agent acked it (or after its
//!   `DECRYPTION_FAILED` report was recorded in validation-failures);
//! - after `MESSAGE_DELIVERY_MAX_ATTEMPTS` failed attempts it is rejected without requeue, which
//!   dead-letters it to `<agent-id>.dlq`;
//! - if the session ends mid-delivery the message is neither acked nor rejected: closing the
//!   consumer channel returns it to the queue for the next session.

use crate::Core;
use crate::router::{self, DeliveryVerdict};
use dmr::MessageError;
use dmr::envelope::Envelope;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

/// The transport half of a session: how a delivery reaches the agent.
pub trait DeliverySink: Send + Sync + 'static {
    /// Sends one delivery; `Err` when the connection is gone.
    fn send(&self, delivery_id: u64, envelope: &Envelope, attempt: u32) -> BoxFuture<'_, Result<(), ()>>;
}

/// The agent's answer to a delivery: delivered or not, and why not.
pub type Answer = (bool, Vec<MessageError>);
type Waiters = HashMap<u64, oneshot::Sender<Answer>>;

/// Deliveries waiting for the agent's answer.
#[derive(Default)]
pub struct PendingAcks {
    next: AtomicU64,
    waiting: Mutex<Waiters>,
}

impl PendingAcks {
    fn register(&self) -> (u64, oneshot::Receiver<Answer>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        (id, rx)
    }

    fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Records the agent's answer for `delivery_id`; unknown or late ids are ignored.
    pub fn resolve(&self, delivery_id: u64, ok: bool, errors: Vec<MessageError>) -> bool {
        let waiter = self.lock().remove(&delivery_id);
        waiter.is_some_and(|tx| tx.send((ok, errors)).is_ok())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Consumes `agent_id`'s queue and delivers through `sink` until `stop` fires.
pub async fn run(
    core: Arc<Core>,
    agent_id: String,
    sink: Arc<dyn DeliverySink>,
    acks: Arc<PendingAcks>,
    stop: CancellationToken,
    recheck: Arc<Notify>,
) {
    let mut check = tokio::time::interval(Duration::from_millis(
        core.cfg.rabbitmq.consumer_check_interval_ms.max(100),
    ));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retry = Duration::from_millis(core.cfg.rabbitmq.reconnect_interval_ms.min(1000));
    let tag = format!("dmr-{agent_id}-{}", uuid::Uuid::new_v4());
    let mut refusals = 0u32;
    let mut handover = true;
    while !stop.is_cancelled() {
        if handover {
            // A session that just moved here may still be consumed on another instance (or by this
            // instance's previous session): wait, bounded, until it lets go.
            wait_for_other_consumers(&core, &agent_id, &stop).await;
            handover = false;
        }
        let consumer = match core.broker.consume(&agent_id, &tag).await {
            Ok(c) => {
                refusals = 0;
                c
            }
            Err(e) => {
                // Typically the queue is missing or the broker is reconnecting: say so once, then
                // quietly retry.
                if refusals == 0 {
                    tracing::warn!(agent_id, error = %e, "cannot consume the agent's queue yet; retrying");
                } else {
                    tracing::debug!(agent_id, error = %e, "still cannot consume the agent's queue; retrying");
                }
                refusals = refusals.saturating_add(1);
                if core.broker.is_ready() && e.to_string().contains("NOT_FOUND") {
                    // The queue is missing (e.g. deleted by hand): declare it before retrying.
                    let _ = core.broker.declare_agent(&agent_id).await;
                }
                tokio::select! { () = stop.cancelled() => break, () = tokio::time::sleep(retry) => continue }
            }
        };
        let mut stream = consumer.consumer;
        check.reset();
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => break,
                n = stream.next() => n,
                // RabbitMQ does not always tell a consumer that its queue was deleted (seen with
                // quorum queues on 3.10): check now and then, and when told the queue was re-created.
                _ = check.tick() => {
                    if consumer_attached(&consumer.channel, &agent_id).await {
                        continue;
                    }
                    tracing::info!(agent_id, "the agent's queue was deleted; consuming again");
                    break;
                }
                // A re-declared quorum queue may even report the old consumer (seen on 3.10) while
                // delivering nothing to it: consume again unconditionally.
                () = recheck.notified() => {
                    tracing::info!(agent_id, "the agent's queue was re-created; consuming again");
                    break;
                }
            };
            match next {
                Some(Ok(delivery)) => {
                    if !deliver_one(&core, &agent_id, sink.as_ref(), &acks, delivery, &stop).await {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(agent_id, error = %e, "consumer failed; consuming again");
                    break;
                }
                None => {
                    tracing::info!(agent_id, "consumer cancelled by the broker; consuming again");
                    break;
                }
            }
        }
        // Closing the channel returns every unacknowledged delivery to the queue.
        let _ = consumer.channel.close(200, "session ended".into()).await;
        if !stop.is_cancelled() {
            tokio::select! { () = stop.cancelled() => break, () = tokio::time::sleep(retry) => {} }
        }
    }
}

/// Longest wait for another consumer of an agent's queue to go before consuming anyway.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// Waits until nobody consumes `agent_id`'s queue, for at most [`HANDOVER_WAIT`].
///
/// RabbitMQ 3.10 does not enforce `exclusive` consumers on quorum queues, and a single-active-consumer
/// queue argument would make our queues incompatible with the original's. Without this wait, the
/// old consumer's prefetched messages would be redelivered after newer ones, breaking queue order.
/// The old consumer normally goes within milliseconds (its session ends when the agent's stream
/// does, or on the `dmr.sessions` announcement); after the wait we consume anyway (a consumer whose
/// connection is gone unnoticed is dropped by RabbitMQ's heartbeat), and say so.
async fn wait_for_other_consumers(core: &Core, agent_id: &str, stop: &CancellationToken) {
    let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
    loop {
        match core.broker.consumer_count(agent_id).await.ok() {
            Some(0) | None => return,
            Some(n) if tokio::time::Instant::now() >= deadline => {
                tracing::warn!(
                    agent_id,
                    consumers = n,
                    "the agent's queue still has another consumer; consuming alongside it"
                );
                return;
            }
            Some(_) => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// True if `queue` exists and has a consumer.
async fn consumer_attached(channel: &lapin::Channel, queue: &str) -> bool {
    matches!(crate::broker::consumers_on(channel, queue).await, Ok(n) if n > 0)
}

/// Delivers one message with retries. Returns false when the session is gone.
async fn deliver_one(
    core: &Arc<Core>,
    agent_id: &str,
    sink: &dyn DeliverySink,
    acks: &PendingAcks,
    delivery: Delivery,
    stop: &CancellationToken,
) -> bool {
    let envelope: Envelope = match serde_json::from_slice(&delivery.data) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(agent_id, error = %e, "queued message is not an envelope; dead-lettering it");
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            core.metrics.dead_lettered.inc();
            return true;
        }
    };
    let max_attempts = core.cfg.message_delivery_max_attempts.max(1);
    let mut pause = Duration::from_millis(core.cfg.message_delivery_retry_delay_ms);
    let mut last_reason = String::new();
    for attempt in 0..max_attempts {
        if attempt > 0 {
            core.metrics.delivery_retries.inc();
            tokio::select! { () = stop.cancelled() => return false, () = tokio::time::sleep(pause) => {} }
            pause = pause.saturating_mul(2);
        }
        let (delivery_id, answer) = acks.register();
        if sink.send(delivery_id, &envelope, attempt).await.is_err() {
            acks.forget(delivery_id);
            return false;
        }
        let answer = tokio::select! {
            () = stop.cancelled() => { acks.forget(delivery_id); return false }
            a = tokio::time::timeout(core.cfg.delivery_timeout(), answer) => a.ok().and_then(Result::ok),
        };
        if answer.is_none() {
            acks.forget(delivery_id);
        }
        match router::verdict(answer) {
            DeliveryVerdict::Delivered => {
                core.metrics.delivered.inc();
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    tracing::warn!(agent_id, message_id = %envelope.id, error = %e, "ack to RabbitMQ failed; the message will be redelivered");
                }
                tracing::debug!(agent_id, message_id = %envelope.id, "delivered");
                return true;
            }
            DeliveryVerdict::Undecryptable(errors) => {
                router::record_validation_failure(core, envelope.to_value(), errors).await;
                let _ = delivery.ack(BasicAckOptions::default()).await;
                return true;
            }
            DeliveryVerdict::Retry(reason) => {
                tracing::warn!(agent_id, message_id = %envelope.id, attempt = attempt + 1, max_attempts, %reason, "delivery failed");
                last_reason = reason;
            }
        }
    }
    tracing::error!(agent_id, message_id = %envelope.id, reason = %last_reason, "delivery attempts exhausted; dead-lettering to {agent_id}.dlq");
    core.metrics.dead_lettered.inc();
    if let Err(e) = delivery.reject(BasicRejectOptions { requeue: false }).await {
        tracing::warn!(agent_id, message_id = %envelope.id, error = %e, "reject failed; the message will be redelivered");
    }
    true
}
