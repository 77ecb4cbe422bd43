//! Delivering an agent's queue to its live session, whatever the transport.
//!
//! While a session is open, [`run`] consumes the agent's queue (bounded by the prefetch count) and
//! hands messages to the session in queue order, keeping up to a window of them in flight
//! (`MESSAGE_DELIVERY_WINDOW` for transports that pipeline, see [`Transport::PIPELINES`]; one at a
//! time otherwise). The agent answers in order; each answer settles the oldest delivery in flight.
//!
//! **Invariants:**
//! - a message is acked to the broker only after the agent acked it (or after its
//!   `DECRYPTION_FAILED` report was recorded in validation-failures, or after it was dead-lettered);
//! - order per recipient: when a delivery fails, nothing newer is handed over until it is settled.
//!   The deliveries already in flight behind it are collected (the agent holds them back without
//!   posting them, see [`Transport::PIPELINES`]), the failed one is retried alone, then they are
//!   handed over again, in order, before anything newer from the queue;
//! - a failing message is retried with exponential backoff and jitter over
//!   `MESSAGE_DELIVERY_RETRY_BUDGET_MS` (and at most `MESSAGE_DELIVERY_MAX_ATTEMPTS` times, if set),
//!   then dead-lettered to `<agent-id>.dlq` with the last error; a delivery that was only held back
//!   behind a failed one does not count as an attempt;
//! - if the session ends mid-delivery the messages in flight are neither acked nor rejected:
//!   closing the consumer channel returns them to the queue for the next session. A draining
//!   session (server shutdown) first waits for the answers to the deliveries in flight.

use crate::Core;
use crate::broker::{AgentConsumer, Taken, dlq_name};
use crate::router;
use crate::session::{Gone, Transport};
use backon::BackoffBuilder as _;
use dmr::envelope::Envelope;
use dmr::{ErrorType, MessageError};
use std::collections::{HashMap, VecDeque};
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

/// Why the delivery loop of one consumer stopped.
enum Stopped {
    /// The session is ending (aborted, drained, or its wire is gone).
    SessionEnded,
    /// The consumer must be started again (cancelled, failed, or the queue was re-created).
    ConsumeAgain,
}

/// A message handed to the agent, waiting for its answer.
struct InFlight {
    message: Queued,
    delivery_id: u64,
    answer: oneshot::Receiver<DeliveryAnswer>,
}

/// A message taken from the queue (not yet settled).
struct Queued {
    taken: Taken,
    envelope: Envelope,
}

/// Consumes the agent's queue and delivers through the session's transport until aborted or
/// drained.
pub(crate) async fn run<T: Transport>(d: Deliveries<T>) {
    let core = &d.core;
    let agent_id = d.agent_id.as_str();
    let ended = || d.abort.is_cancelled() || d.drain.is_cancelled();
    let retry = core.cfg.rabbitmq.reconnect_interval().min(Duration::from_secs(1));
    let tag = format!("dmr-{agent_id}-{}", uuid::Uuid::new_v4());
    let mut refusals = 0u32;
    let mut handover = true;
    // See the proto's `Delivery.epoch`: 0 for transports that get one delivery at a time.
    let mut epoch = u64::from(T::PIPELINES);
    while !ended() {
        if handover {
            // A session that just moved here may still be consumed on another instance (or by this
            // instance's previous session): wait, bounded, until it lets go.
            wait_for_other_consumers(core, agent_id, &d.abort, &d.drain).await;
            handover = false;
        }
        let mut consumer = match core.broker.consume(agent_id, &tag).await {
            Ok(c) => {
                refusals = 0;
                c
            }
            Err(e) => {
                refusals = refusals.saturating_add(1);
                if e.is_queue_missing() {
                    // Not declared yet (the session came before the start-up declarations) or
                    // deleted by hand: declare it; the first time, consume again at once.
                    let declared = core.broker.declare_agent(agent_id).await.is_ok();
                    if declared && refusals == 1 {
                        tracing::info!(agent_id, "the agent's queue did not exist; declared it");
                        continue;
                    }
                }
                // Typically the broker is reconnecting: say so once, then quietly retry.
                if refusals <= 2 {
                    tracing::warn!(agent_id, error = %e, "cannot consume the agent's queue yet; retrying");
                } else {
                    tracing::debug!(agent_id, error = %e, "still cannot consume the agent's queue; retrying");
                }
                tokio::select! {
                    () = d.abort.cancelled() => break,
                    () = d.drain.cancelled() => break,
                    () = tokio::time::sleep(retry) => continue,
                }
            }
        };
        let stopped = deliver_from(&d, &mut consumer, &mut epoch).await;
        next_epoch::<T>(&mut epoch);
        // Every message taken and not settled returns to the queue.
        consumer.close().await;
        if matches!(stopped, Stopped::ConsumeAgain) && !ended() {
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
    let _ = core.metrics.agent_dlq_messages.remove_label_values(&[agent_id]);
}

/// Delivers from one consumer, keeping up to the session's window of deliveries in flight, until
/// the session ends or the consumer must be started again.
async fn deliver_from<T: Transport>(d: &Deliveries<T>, consumer: &mut AgentConsumer, epoch: &mut u64) -> Stopped {
    let core = &d.core;
    let agent_id = d.agent_id.as_str();
    let window = if T::PIPELINES { core.cfg.delivery_window() } else { 1 };
    let mut check = tokio::time::interval(
        core.cfg
            .rabbitmq
            .consumer_check_interval()
            .max(Duration::from_millis(100)),
    );
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.reset();
    // Handed over, oldest first; answers come back in this order.
    let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(window);
    // Taken from the queue but to be handed over (again) before anything newer: the deliveries
    // that were in flight behind a failed one.
    let mut again: VecDeque<Queued> = VecDeque::new();
    // When the oldest delivery in flight must have been answered.
    let mut head_deadline = tokio::time::Instant::now();
    loop {
        let room = in_flight.len() < window && !d.drain.is_cancelled();
        if room && let Some(message) = again.pop_front() {
            if send_behind(d, message, *epoch, &mut in_flight, &mut head_deadline)
                .await
                .is_err()
            {
                return Stopped::SessionEnded;
            }
            continue;
        }
        let idle = in_flight.is_empty() && again.is_empty();
        tokio::select! {
            biased;
            () = d.abort.cancelled() => {
                // Answers that arrived before the end still count: fewer redeliveries.
                settle_answered(d, &mut in_flight).await;
                return Stopped::SessionEnded;
            }
            // Draining: what is still to be handed over again returns to the queue.
            () = d.drain.cancelled(), if in_flight.is_empty() => return Stopped::SessionEnded,
            answer = oldest_answer(&mut in_flight, head_deadline) => {
                let Some(done) = in_flight.pop_front() else { continue };
                if answer.is_none() {
                    d.acks.forget(done.delivery_id);
                }
                head_deadline = tokio::time::Instant::now() + core.cfg.delivery_timeout();
                record_oldest(core, agent_id, in_flight.front().map(|f| &f.message).or(again.front()));
                match settle(d, done.message, answer).await {
                    Settle::Done => {}
                    Settle::Failed(message, failure) => {
                        // Nothing newer goes out until this one is settled: collect what is in
                        // flight behind it, then retry it alone. Whatever goes out from now on
                        // was sent knowing of the failure: a new epoch.
                        next_epoch::<T>(epoch);
                        let behind = collect_behind(d, &mut in_flight).await;
                        for m in behind.into_iter().rev() {
                            again.push_front(m);
                        }
                        if d.abort.is_cancelled() {
                            return Stopped::SessionEnded;
                        }
                        if let Handled::Left = retry_alone(d, *message, failure, epoch).await {
                            return Stopped::SessionEnded;
                        }
                    }
                }
            }
            next = consumer.next(), if room => match next {
                Some(Ok(taken)) => {
                    let Some(message) = parse(core, agent_id, taken).await else { continue };
                    if send_behind(d, message, *epoch, &mut in_flight, &mut head_deadline).await.is_err() {
                        return Stopped::SessionEnded;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(agent_id, error = %e, "consumer failed; consuming again");
                    return Stopped::ConsumeAgain;
                }
                None => {
                    tracing::info!(agent_id, "consumer cancelled by the broker; consuming again");
                    return Stopped::ConsumeAgain;
                }
            },
            // RabbitMQ does not always tell a consumer that its queue was deleted (seen with
            // quorum queues on 3.10): check now and then, and when told the queue was re-created.
            _ = check.tick(), if idle => {
                if !sample_backlog(core, consumer, agent_id).await {
                    tracing::info!(agent_id, "the agent's queue was deleted; consuming again");
                    return Stopped::ConsumeAgain;
                }
            }
            // A re-declared quorum queue may even report the old consumer (seen on 3.10) while
            // delivering nothing to it: consume again unconditionally.
            () = d.recheck.notified(), if idle => {
                tracing::info!(agent_id, "the agent's queue was re-created; consuming again");
                return Stopped::ConsumeAgain;
            }
        }
    }
}

/// Hands `message` over behind the deliveries in flight (its answer's clock starts now if it is the
/// only one).
async fn send_behind<T: Transport>(
    d: &Deliveries<T>,
    message: Queued,
    epoch: u64,
    in_flight: &mut VecDeque<InFlight>,
    head_deadline: &mut tokio::time::Instant,
) -> Result<(), Gone> {
    let f = hand_over(d, message, 0, epoch).await?;
    if in_flight.is_empty() {
        *head_deadline = tokio::time::Instant::now() + d.core.cfg.delivery_timeout();
        record_oldest(&d.core, &d.agent_id, Some(&f.message));
    }
    in_flight.push_back(f);
    Ok(())
}

/// Records the age of the oldest message taken from the agent's queue and not settled yet (0 when
/// none waits).
fn record_oldest(core: &Core, agent_id: &str, oldest: Option<&Queued>) {
    let age = oldest.and_then(|q| queued_for(&q.envelope)).unwrap_or(0.0);
    core.metrics
        .agent_oldest_message_age
        .with_label_values(&[agent_id])
        .set(age);
}

/// Settles, oldest first, the deliveries in flight whose answer already arrived; stops at the
/// first without one or that failed (it and those behind it return to the queue).
async fn settle_answered<T: Transport>(d: &Deliveries<T>, in_flight: &mut VecDeque<InFlight>) {
    while let Some(f) = in_flight.front_mut() {
        let Ok(answer) = f.answer.try_recv() else { return };
        let Some(f) = in_flight.pop_front() else { return };
        if let Settle::Failed(..) = settle(d, f.message, Some(answer)).await {
            return;
        }
    }
}

/// The answer to the oldest delivery in flight, or `None` if it did not come by `deadline`
/// (never ready while nothing is in flight).
async fn oldest_answer(in_flight: &mut VecDeque<InFlight>, deadline: tokio::time::Instant) -> Option<DeliveryAnswer> {
    let Some(head) = in_flight.front_mut() else {
        return std::future::pending().await;
    };
    tokio::time::timeout_at(deadline, &mut head.answer)
        .await
        .ok()
        .and_then(Result::ok)
}

/// Reads a queued message; one that is not an envelope is dead-lettered at once (`None`).
async fn parse(core: &Core, agent_id: &str, taken: Taken) -> Option<Queued> {
    match serde_json::from_slice::<Envelope>(&taken.body) {
        Ok(envelope) => Some(Queued { taken, envelope }),
        Err(e) => {
            tracing::error!(agent_id, error = %e, "queued message is not an envelope; dead-lettering it");
            let _ = taken.reject().await;
            core.metrics.dead_lettered.inc();
            None
        }
    }
}

/// Hands `message` to the agent as attempt `attempt` of `epoch`.
async fn hand_over<T: Transport>(
    d: &Deliveries<T>,
    message: Queued,
    attempt: u32,
    epoch: u64,
) -> Result<InFlight, Gone> {
    let (delivery_id, answer) = d.acks.register();
    if d.transport
        .deliver(delivery_id, &message.envelope, attempt, epoch)
        .await
        .is_err()
    {
        d.acks.forget(delivery_id);
        return Err(Gone);
    }
    Ok(InFlight {
        message,
        delivery_id,
        answer,
    })
}

/// What became of one answered (or unanswered) delivery.
enum Settle {
    /// Acked, recorded as undecryptable: nothing more to do.
    Done,
    /// Not delivered: to be retried.
    Failed(Box<Queued>, Failure),
}

/// Why a delivery is to be retried.
enum Failure {
    /// It failed (endpoint error, timeout): retry within the budget.
    Retry(String),
    /// `DECRYPTION_FAILED` within the start-up window (see [`Verdict::StartupRace`]).
    StartupRace,
}

/// Settles a delivery from the agent's answer (`None`: none within the timeout).
async fn settle<T: Transport>(d: &Deliveries<T>, message: Queued, answer: Option<DeliveryAnswer>) -> Settle {
    let (core, agent_id) = (&d.core, d.agent_id.as_str());
    match verdict(answer, Instant::now() < d.race_window_until) {
        Verdict::Delivered => {
            core.metrics.delivered.inc();
            if let Some(waited) = queued_for(&message.envelope) {
                core.metrics.queue_wait.observe(waited);
            }
            if let Err(e) = message.taken.ack().await {
                tracing::warn!(agent_id, message_id = %message.envelope.id, error = %e, "ack to the broker failed; the message will be redelivered");
            }
            tracing::debug!(agent_id, message_id = %message.envelope.id, "delivered");
            Settle::Done
        }
        Verdict::Undecryptable(errors) => {
            router::record_validation_failure(core, message.envelope.to_value(), errors).await;
            let _ = message.taken.ack().await;
            Settle::Done
        }
        Verdict::Retry(reason) => Settle::Failed(Box::new(message), Failure::Retry(reason)),
        Verdict::StartupRace => Settle::Failed(Box::new(message), Failure::StartupRace),
    }
}

/// After a failed delivery: waits for the answers to every delivery in flight behind it, settles
/// those that were delivered anyway, and returns the others, in order, to be handed over again.
/// These were held back by the agent (or failed on their own); either way they are not counted as
/// attempts.
async fn collect_behind<T: Transport>(d: &Deliveries<T>, in_flight: &mut VecDeque<InFlight>) -> Vec<Queued> {
    let mut behind = Vec::new();
    let mut deadline = tokio::time::Instant::now() + d.core.cfg.delivery_timeout();
    while let Some(f) = in_flight.pop_front() {
        let Ok((message, answer)) = answer_by(d, f, deadline).await else {
            continue;
        };
        deadline = tokio::time::Instant::now() + d.core.cfg.delivery_timeout();
        if let Settle::Failed(message, _) = settle(d, message, answer).await {
            behind.push(*message);
        }
    }
    behind
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

/// Samples `agent_id`'s queue through its consumer and records its backlog and its DLQ's depth;
/// true if the queue exists and has a consumer.
async fn sample_backlog(core: &Core, consumer: &AgentConsumer, agent_id: &str) -> bool {
    let Ok(counts) = consumer.counts().await else {
        return false;
    };
    record_backlog(core, agent_id, counts.messages);
    if let Ok(dlq) = core.broker.counts(&dlq_name(agent_id)).await {
        core.metrics
            .agent_dlq_messages
            .with_label_values(&[agent_id])
            .set(i64::from(dlq.messages));
    }
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
    /// Delivered: ack to the broker.
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

/// Retries a failed delivery alone (nothing else in flight) until it is delivered, recorded as
/// undecryptable or dead-lettered, while the retry budget lasts.
/// Each failure it learns of starts a new `epoch` (see the proto's `Delivery.epoch`).
async fn retry_alone<T: Transport>(d: &Deliveries<T>, message: Queued, failure: Failure, epoch: &mut u64) -> Handled {
    let (core, agent_id) = (&d.core, d.agent_id.as_str());
    let mut pauses = retry_pauses(core);
    let mut attempt = 0u32;
    let mut message = message;
    let mut failure = failure;
    loop {
        if d.drain.is_cancelled() {
            // A shutdown does not wait out retries: the message returns to the queue.
            return Handled::Left;
        }
        match failure {
            Failure::StartupRace => {
                core.metrics.startup_race_redeliveries.inc();
                tracing::info!(agent_id, message_id = %message.envelope.id, "DECRYPTION_FAILED right after the agent connected (it may not have stored the directory yet): delivering again");
                if pause(d, STARTUP_RACE_PAUSE).await.is_err() {
                    return Handled::Left;
                }
            }
            Failure::Retry(reason) => {
                attempt += 1;
                tracing::warn!(agent_id, message_id = %message.envelope.id, attempt, %reason, "delivery failed");
                let Some(wait) = pauses.next() else {
                    dead_letter(core, agent_id, &message, attempt, &reason).await;
                    return Handled::Settled;
                };
                core.metrics.delivery_retries.inc();
                if pause(d, wait).await.is_err() {
                    return Handled::Left;
                }
            }
        }
        record_oldest(core, agent_id, Some(&message));
        let Ok(f) = hand_over(d, message, attempt, *epoch).await else {
            return Handled::Left;
        };
        // A draining session still waits for this answer; an aborted one leaves it to the queue.
        let deadline = tokio::time::Instant::now() + core.cfg.delivery_timeout();
        let Ok((message_back, answer)) = answer_by(d, f, deadline).await else {
            return Handled::Left;
        };
        match settle(d, message_back, answer).await {
            Settle::Done => return Handled::Settled,
            Settle::Failed(m, v) => {
                message = *m;
                failure = v;
                next_epoch::<T>(epoch);
            }
        }
    }
}

/// The session aborted while a delivery waited for its answer.
struct Aborted;

/// Waits until `deadline` for the answer to `f` (`None`: none came), unless the session aborts
/// first; a delivery id left unanswered is forgotten.
async fn answer_by<T: Transport>(
    d: &Deliveries<T>,
    f: InFlight,
    deadline: tokio::time::Instant,
) -> Result<(Queued, Option<DeliveryAnswer>), Aborted> {
    let answer = tokio::select! {
        () = d.abort.cancelled() => None,
        a = tokio::time::timeout_at(deadline, f.answer) => Some(a.ok().and_then(Result::ok)),
    };
    if !matches!(answer, Some(Some(_))) {
        d.acks.forget(f.delivery_id);
    }
    answer.map(|a| (f.message, a)).ok_or(Aborted)
}

/// Advances the session's delivery epoch after a failure or a new consumer (see the proto's
/// `Delivery.epoch`); transports that get one delivery at a time stay at 0.
fn next_epoch<T: Transport>(epoch: &mut u64) {
    if T::PIPELINES {
        *epoch += 1;
    }
}

/// Sleeps `wait`, unless the session aborts or drains first (`Err`).
async fn pause<T: Transport>(d: &Deliveries<T>, wait: Duration) -> Result<(), ()> {
    tokio::select! {
        () = d.abort.cancelled() => Err(()),
        () = d.drain.cancelled() => Err(()),
        () = tokio::time::sleep(wait) => Ok(()),
    }
}

/// Moves a message that could not be delivered to `<agent-id>.dlq`, with the last error in its
/// headers (`x-dmr-last-error`, `x-dmr-attempts`); see [`crate::broker::Broker::dead_letter`].
async fn dead_letter(core: &Core, agent_id: &str, message: &Queued, attempts: u32, last_error: &str) {
    let envelope = &message.envelope;
    tracing::error!(agent_id, message_id = %envelope.id, attempts, last_error, "delivery attempts exhausted; dead-lettering to {agent_id}.dlq");
    core.metrics.dead_lettered.inc();
    let dlq = dlq_name(agent_id);
    if let Err(e) = core
        .broker
        .dead_letter(&message.taken, &dlq, attempts, last_error)
        .await
    {
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
