//! Delivering an agent's queue to its live session, whatever the transport.
//!
//! While a session is open, [`run`] consumes the agent's queue (bounded by the prefetch count) and
//! hands messages to the session one at a time, in queue order.
//!
//! **Invariants:**
//! - a message is acked to RabbitMQ only after the agent acked it (or after its
//!   `DECRYPTION_FAILED` report was recorded in validation-failures, or after it was dead-lettered);
//! - a failing message is retried with exponential backoff and jitter over
//!   `MESSAGE_DELIVERY_RETRY_BUDGET_MS` (and at most `MESSAGE_DELIVERY_MAX_ATTEMPTS` times, if set),
//!   then dead-lettered to `<agent-id>.dlq` with the last error;
//! - if the session ends mid-delivery the message is neither acked nor rejected: closing the
//!   consumer channel returns it to the queue for the next session. A draining session (server
//!   shutdown) first waits for the answer to the delivery in hand.

use crate::Core;
use crate::router;
use crate::session::Transport;
use backon::BackoffBuilder as _;
use dmr::envelope::Envelope;
use dmr::{ErrorType, MessageError};
use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

/// The agent's answer to one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryAnswer {
    /// Its endpoint answered 2xx.
    Delivered,
    /// Not delivered, with the agent's reasons.
    Failed(Vec<MessageError>),
}

type Waiters = HashMap<u64, oneshot::Sender<DeliveryAnswer>>;

/// Deliveries waiting for the agent's answer.
#[derive(Default)]
pub struct PendingAcks {
    next: AtomicU64,
    waiting: Mutex<Waiters>,
}

impl PendingAcks {
    fn register(&self) -> (u64, oneshot::Receiver<DeliveryAnswer>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        (id, rx)
    }

    fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Records the agent's answer for `delivery_id`; unknown or late ids are ignored (false).
    pub fn resolve(&self, delivery_id: u64, answer: DeliveryAnswer) -> bool {
        let waiter = self.lock().remove(&delivery_id);
        waiter.is_some_and(|tx| tx.send(answer).is_ok())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the delivery loop of one session needs.
pub(crate) struct Deliveries<T: Transport> {
    pub(crate) core: Arc<Core>,
    pub(crate) agent_id: String,
    pub(crate) transport: Arc<T>,
    pub(crate) acks: Arc<PendingAcks>,
    /// Stop at once; a delivery in hand returns to the queue.
    pub(crate) abort: CancellationToken,
    /// Take no new message; finish the one in hand (its current attempt), then stop.
    pub(crate) drain: CancellationToken,
    /// Notified when the agent's queue was re-created (consume again).
    pub(crate) recheck: Arc<Notify>,
    /// Until then, `DECRYPTION_FAILED` may be the agent's start-up race and is retried.
    pub(crate) race_window_until: Instant,
}

/// How a delivery ended, for the loop.
enum Handled {
    /// Settled (acked, recorded or dead-lettered): take the next one.
    Settled,
    /// Left unacked (the session is ending): stop.
    Left,
}

/// Consumes the agent's queue and delivers through the session's transport until aborted or
/// drained.
pub(crate) async fn run<T: Transport>(d: Deliveries<T>) {
    let core = &d.core;
    let agent_id = d.agent_id.as_str();
    let ended = || d.abort.is_cancelled() || d.drain.is_cancelled();
    let mut check = tokio::time::interval(
        core.cfg
            .rabbitmq
            .consumer_check_interval()
            .max(Duration::from_millis(100)),
    );
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retry = core.cfg.rabbitmq.reconnect_interval().min(Duration::from_secs(1));
    let tag = format!("dmr-{agent_id}-{}", uuid::Uuid::new_v4());
    let mut refusals = 0u32;
    let mut handover = true;
    while !ended() {
        if handover {
            // A session that just moved here may still be consumed on another instance (or by this
            // instance's previous session): wait, bounded, until it lets go.
            wait_for_other_consumers(core, agent_id, &d.abort, &d.drain).await;
            handover = false;
        }
        let consumer = match core.broker.consume(agent_id, &tag).await {
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
                if e.is_queue_missing() {
                    // Deleted by hand, say: declare it before retrying.
                    let _ = core.broker.declare_agent(agent_id).await;
                }
                tokio::select! {
                    () = d.abort.cancelled() => break,
                    () = d.drain.cancelled() => break,
                    () = tokio::time::sleep(retry) => continue,
                }
            }
        };
        let mut stream = consumer.consumer;
        check.reset();
        loop {
            let next = tokio::select! {
                () = d.abort.cancelled() => break,
                () = d.drain.cancelled() => break,
                n = stream.next() => n,
                // RabbitMQ does not always tell a consumer that its queue was deleted (seen with
                // quorum queues on 3.10): check now and then, and when told the queue was re-created.
                _ = check.tick() => {
                    if sample_backlog(core, &consumer.channel, agent_id).await {
                        continue;
                    }
                    tracing::info!(agent_id, "the agent's queue was deleted; consuming again");
                    break;
                }
                // A re-declared quorum queue may even report the old consumer (seen on 3.10) while
                // delivering nothing to it: consume again unconditionally.
                () = d.recheck.notified() => {
                    tracing::info!(agent_id, "the agent's queue was re-created; consuming again");
                    break;
                }
            };
            match next {
                Some(Ok(delivery)) => {
                    if let Handled::Left = deliver_one(&d, delivery).await {
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
        if !ended() {
            tokio::select! {
                () = d.abort.cancelled() => break,
                () = d.drain.cancelled() => break,
                () = tokio::time::sleep(retry) => {}
            }
        }
    }
    // Another instance (or session) reports this agent's backlog from now on.
    let _ = core.metrics.agent_queue_messages.remove_label_values(&[agent_id]);
    let _ = core.metrics.agent_oldest_message_age.remove_label_values(&[agent_id]);
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
async fn wait_for_other_consumers(core: &Core, agent_id: &str, abort: &CancellationToken, drain: &CancellationToken) {
    let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
    loop {
        let Ok(counts) = core.broker.counts(agent_id).await else {
            return;
        };
        // The same look tells how many messages wait: report it now rather than ask again.
        record_backlog(core, agent_id, counts.messages);
        match counts.consumers {
            0 => return,
            n if tokio::time::Instant::now() >= deadline => {
                tracing::warn!(
                    agent_id,
                    consumers = n,
                    "the agent's queue still has another consumer; consuming alongside it"
                );
                return;
            }
            _ => {}
        }
        tokio::select! {
            () = abort.cancelled() => return,
            () = drain.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Samples `agent_id`'s queue on the consumer's own channel and records its backlog; true if the
/// queue exists and has a consumer.
async fn sample_backlog(core: &Core, channel: &lapin::Channel, agent_id: &str) -> bool {
    let Ok(counts) = crate::broker::queue_counts(channel, agent_id).await else {
        return false;
    };
    record_backlog(core, agent_id, counts.messages);
    counts.consumers > 0
}

/// Records how many messages wait in `agent_id`'s queue (and, if none, that nothing is old).
fn record_backlog(core: &Core, agent_id: &str, messages: u32) {
    let metrics = &core.metrics;
    metrics
        .agent_queue_messages
        .with_label_values(&[agent_id])
        .set(i64::from(messages));
    if messages == 0 {
        metrics.agent_oldest_message_age.with_label_values(&[agent_id]).set(0.0);
    }
}

/// Seconds since `envelope` was queued (its `receivedAt`), if known.
fn queued_for(envelope: &Envelope) -> Option<f64> {
    let at = chrono::DateTime::parse_from_rfc3339(envelope.received_at.as_deref()?).ok()?;
    Some(
        (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
            .num_milliseconds()
            .max(0) as f64
            / 1000.0,
    )
}

/// What to do with a delivery once the agent answered (or did not).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// Delivered: ack to RabbitMQ.
    Delivered,
    /// The agent could not decrypt or verify it: record in validation-failures, then ack.
    Undecryptable(Vec<MessageError>),
    /// Try again (endpoint failed, timeout), until the budget runs out.
    Retry(String),
    /// `DECRYPTION_FAILED` within the agent's start-up window: try again shortly, outside the
    /// retry budget (the window bounds it), then record it if it persists.
    StartupRace,
}

/// Pause between redeliveries of a message refused during the agent's start-up window.
const STARTUP_RACE_PAUSE: Duration = Duration::from_millis(250);

/// Classifies an agent's answer. `None` means no answer within the timeout. Within the start-up
/// race window a `DECRYPTION_FAILED` is retried: the original agent stores the directory
/// asynchronously and may answer a delivery before it knows the sender (compat §4).
fn verdict(answer: Option<DeliveryAnswer>, in_race_window: bool) -> Verdict {
    match answer {
        None => Verdict::Retry("no acknowledgement within MESSAGE_DELIVERY_TIMEOUT_MS".into()),
        Some(DeliveryAnswer::Delivered) => Verdict::Delivered,
        Some(DeliveryAnswer::Failed(errors)) => {
            let reasons = errors
                .iter()
                .map(|e| format!("{}: {}", e.kind.as_str(), e.message))
                .collect::<Vec<_>>()
                .join("; ");
            if !errors.iter().any(|e| e.kind == ErrorType::DecryptionFailed) {
                Verdict::Retry(reasons)
            } else if in_race_window {
                Verdict::StartupRace
            } else {
                Verdict::Undecryptable(errors)
            }
        }
    }
}

/// The pauses between attempts: exponential from `MESSAGE_DELIVERY_RETRY_DELAY_MS`, with jitter,
/// capped at [`MAX_RETRY_PAUSE`], until `MESSAGE_DELIVERY_RETRY_BUDGET_MS` of pauses are spent.
fn retry_pauses(core: &Core) -> impl Iterator<Item = Duration> {
    let cfg = &core.cfg;
    let attempts = cfg.message_delivery_max_attempts;
    let builder = backon::ExponentialBuilder::new()
        .with_jitter()
        .with_min_delay(cfg.message_delivery_retry_delay())
        .with_max_delay(MAX_RETRY_PAUSE.max(cfg.message_delivery_retry_delay()))
        .with_total_delay(Some(cfg.message_delivery_retry_budget()));
    let builder = if attempts == 0 {
        builder.without_max_times()
    } else {
        builder.with_max_times(attempts.saturating_sub(1) as usize)
    };
    builder.build()
}

/// Longest pause between two attempts of one message.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// Delivers one message, retrying while the budget lasts.
async fn deliver_one<T: Transport>(d: &Deliveries<T>, delivery: Delivery) -> Handled {
    let (core, agent_id) = (&d.core, d.agent_id.as_str());
    let envelope: Envelope = match serde_json::from_slice(&delivery.data) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(agent_id, error = %e, "queued message is not an envelope; dead-lettering it");
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            core.metrics.dead_lettered.inc();
            return Handled::Settled;
        }
    };
    if let Some(age) = queued_for(&envelope) {
        core.metrics
            .agent_oldest_message_age
            .with_label_values(&[agent_id])
            .set(age);
    }
    let mut pauses = retry_pauses(core);
    let mut attempt = 0u32;
    loop {
        let (delivery_id, answer) = d.acks.register();
        if d.transport.deliver(delivery_id, &envelope, attempt).await.is_err() {
            d.acks.forget(delivery_id);
            return Handled::Left;
        }
        // A draining session still waits for this answer; an aborted one leaves it to the queue.
        let answer = tokio::select! {
            () = d.abort.cancelled() => { d.acks.forget(delivery_id); return Handled::Left }
            a = tokio::time::timeout(core.cfg.delivery_timeout(), answer) => a.ok().and_then(Result::ok),
        };
        if answer.is_none() {
            d.acks.forget(delivery_id);
        }
        let reason = match verdict(answer, Instant::now() < d.race_window_until) {
            Verdict::Delivered => {
                core.metrics.delivered.inc();
                if let Some(waited) = queued_for(&envelope) {
                    core.metrics.queue_wait.observe(waited);
                }
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    tracing::warn!(agent_id, message_id = %envelope.id, error = %e, "ack to RabbitMQ failed; the message will be redelivered");
                }
                tracing::debug!(agent_id, message_id = %envelope.id, "delivered");
                return Handled::Settled;
            }
            Verdict::Undecryptable(errors) => {
                router::record_validation_failure(core, envelope.to_value(), errors).await;
                let _ = delivery.ack(BasicAckOptions::default()).await;
                return Handled::Settled;
            }
            Verdict::Retry(reason) => reason,
            Verdict::StartupRace => {
                core.metrics.startup_race_redeliveries.inc();
                tracing::info!(agent_id, message_id = %envelope.id, "DECRYPTION_FAILED right after the agent connected (it may not have stored the directory yet): delivering again");
                tokio::select! {
                    () = d.abort.cancelled() => return Handled::Left,
                    () = d.drain.cancelled() => return Handled::Left,
                    () = tokio::time::sleep(STARTUP_RACE_PAUSE) => {}
                }
                continue;
            }
        };
        attempt += 1;
        tracing::warn!(agent_id, message_id = %envelope.id, attempt, %reason, "delivery failed");
        let Some(pause) = pauses.next() else {
            dead_letter(core, agent_id, &envelope, delivery, attempt, &reason).await;
            return Handled::Settled;
        };
        core.metrics.delivery_retries.inc();
        tokio::select! {
            () = d.abort.cancelled() => return Handled::Left,
            () = d.drain.cancelled() => return Handled::Left,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Moves a message that could not be delivered to `<agent-id>.dlq`, with the last error in its
/// headers (`x-dmr-last-error`, `x-dmr-attempts`); if that publish is not confirmed, rejects it
/// instead, so RabbitMQ dead-letters it (`x-death` reason `rejected`).
async fn dead_letter(
    core: &Core,
    agent_id: &str,
    envelope: &Envelope,
    delivery: Delivery,
    attempts: u32,
    last_error: &str,
) {
    tracing::error!(agent_id, message_id = %envelope.id, attempts, last_error, "delivery attempts exhausted; dead-lettering to {agent_id}.dlq");
    core.metrics.dead_lettered.inc();
    let dlq = format!("{agent_id}.dlq");
    let moved = core
        .broker
        .publish_dead_letter(&dlq, &delivery.data, attempts, last_error)
        .await;
    let settled = match moved {
        Ok(()) => delivery.ack(BasicAckOptions::default()).await,
        Err(e) => {
            tracing::warn!(agent_id, message_id = %envelope.id, error = %e, "could not publish the dead letter; rejecting it to the DLQ instead");
            delivery.reject(BasicRejectOptions { requeue: false }).await
        }
    };
    if let Err(e) = settled {
        tracing::warn!(agent_id, message_id = %envelope.id, error = %e, "settling the dead letter failed; the message will be redelivered");
    }
}

#[cfg(test)]
mod tests {
    use super::{DeliveryAnswer, Verdict, verdict};
    use dmr::{ErrorType, MessageError};

    #[test]
    fn answers_are_classified() {
        assert_eq!(verdict(Some(DeliveryAnswer::Delivered), false), Verdict::Delivered);
        assert!(matches!(verdict(None, false), Verdict::Retry(_)));
        let failed = DeliveryAnswer::Failed(vec![MessageError::new(ErrorType::DeliveryFailed, "status 500")]);
        assert!(matches!(verdict(Some(failed), false), Verdict::Retry(r) if r.contains("status 500")));
        let undecryptable = DeliveryAnswer::Failed(vec![MessageError::new(ErrorType::DecryptionFailed, "x")]);
        assert!(matches!(
            verdict(Some(undecryptable.clone()), false),
            Verdict::Undecryptable(_)
        ));
        assert!(
            matches!(verdict(Some(undecryptable), true), Verdict::StartupRace),
            "retried within the start-up race window"
        );
    }
}
