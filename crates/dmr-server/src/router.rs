//! Routing shared by every transport: admitting an agent's send (its limits, then validation, then
//! the relay policy), queueing it, and recording validation failures.
//!
//! **Invariants:**
//! - a send over one of its agent's limits is refused before anything else is done with it, and a
//!   send the relay policy refuses is never queued (neither is recorded as a validation failure);
//! - a send is answered "accepted" only after RabbitMQ confirmed the publish;
//! - a send is queued in the order the session handed it over (publish frames are written in
//!   order; only the confirms are awaited concurrently);
//! - an invalid message is recorded in the validation-failures queue before the sender hears why.

use crate::Core;
use crate::broker::{BrokerError, Rejection};
use crate::limits::{LimitExceeded, SendLimits};
use dmr::MessageError;
use dmr::envelope::{self, Envelope, ValidationContext, ValidationFailure};
use serde_json::Value;
use std::sync::Arc;

/// The outcome of a send, common to both transports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Durably queued.
    Accepted,
    /// Refused by validation (and recorded).
    Invalid(Vec<MessageError>),
    /// The broker could not take it; nothing was queued.
    Unavailable(String),
    /// Handed to the broker, but the confirmation was lost: it may or may not be queued.
    Unknown(String),
    /// Not queued: the relay policy does not let the sender send to this recipient (the reason).
    Forbidden(String),
    /// Not queued: over one of the sender's limits.
    OverLimit(LimitExceeded),
    /// Not queued: the recipient's queue holds `depth` messages, at `MESSAGE_QUEUE_MAX_DEPTH`.
    Backlogged {
        /// Messages waiting for the recipient.
        depth: u32,
        /// When to try again.
        retry_after: std::time::Duration,
    },
}

impl SendOutcome {
    /// The protobuf result for `correlation_id`.
    pub fn to_proto(&self, correlation_id: String) -> dmr::proto::SendResult {
        use dmr::proto::{SendResult, SendStatus};
        let mut retry_after_ms = 0;
        let (status, errors, detail) = match self {
            Self::Accepted => (SendStatus::Accepted, vec![], String::new()),
            Self::Invalid(errors) => (
                SendStatus::Invalid,
                errors.iter().map(MessageError::to_proto).collect(),
                errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>().join("; "),
            ),
            Self::Unavailable(detail) => (SendStatus::Unavailable, vec![], detail.clone()),
            Self::Unknown(detail) => (SendStatus::Unknown, vec![], detail.clone()),
            Self::Backlogged { depth, retry_after } => {
                retry_after_ms = millis(*retry_after);
                (SendStatus::RecipientBacklogged, vec![], backlog_detail(*depth))
            }
            Self::Forbidden(reason) => (SendStatus::PermissionDenied, vec![], reason.clone()),
            Self::OverLimit(over) => {
                retry_after_ms = over.retry_after().map_or(0, millis);
                (SendStatus::ResourceExhausted, vec![], over.describe())
            }
        };
        SendResult {
            correlation_id,
            status: status as i32,
            errors,
            detail,
            retry_after_ms,
        }
    }
}

fn millis(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

/// What a sender is told when the recipient's queue is at its cap.
pub fn backlog_detail(depth: u32) -> String {
    format!(
        "the recipient's queue holds {depth} messages (MESSAGE_QUEUE_MAX_DEPTH): it is not keeping up; nothing was queued, retry later"
    )
}

/// A send as its transport received it.
pub enum SendBody {
    /// A legacy agent's JSON message.
    Json(Value),
    /// A gRPC `SendRequest.envelope` (validated as is, never turned into JSON unless invalid).
    Proto(dmr::proto::Envelope),
}

impl SendBody {
    /// The payload's size in bytes, as far as it can be told before validation.
    fn payload_len(&self) -> usize {
        match self {
            Self::Json(raw) => raw.get("payload").and_then(Value::as_str).map_or(0, str::len),
            Self::Proto(e) => e.payload.len(),
        }
    }
}

/// `agent_id`'s send limits now: the global settings with the relay policy's overrides.
pub fn send_limits(core: &Core, agent_id: &str) -> SendLimits {
    SendLimits::resolve(
        &core.cfg.policy,
        core.cfg.message_max_payload_bytes,
        core.policy.current().limits_for(agent_id),
    )
}

/// Counts and logs a send refused by a limit.
pub fn over_limit(core: &Core, agent_id: &str, over: LimitExceeded) -> SendOutcome {
    core.metrics
        .limit_refusals
        .with_label_values(&[agent_id, over.label()])
        .inc();
    tracing::debug!(agent_id, limit = over.label(), "send refused: over a limit");
    SendOutcome::OverLimit(over)
}

/// Validates `body` from `agent_id` (after its rate and size limits) and starts publishing it. The
/// returned future resolves to the outcome; the publish frame itself is written before this function
/// returns, which keeps order.
pub async fn start_send(
    core: &Arc<Core>,
    agent_id: &str,
    limits: &SendLimits,
    body: SendBody,
) -> impl Future<Output = SendOutcome> + use<> {
    if let Err(over) = core.limits.take_send(agent_id, limits, body.payload_len()) {
        return futures::future::Either::Left(futures::future::ready(over_limit(core, agent_id, over)));
    }
    let validated = {
        let directory = core.directory.current();
        let known = |id: &str| directory.contains(id);
        let ctx = ValidationContext {
            authenticated_agent: agent_id,
            is_known_agent: &known,
            max_payload_bytes: core.cfg.message_max_payload_bytes,
        };
        match body {
            SendBody::Json(raw) => envelope::validate(&raw, &ctx).map_err(|errors| (raw, errors)),
            SendBody::Proto(e) => {
                envelope::validate_proto(e, &ctx).map_err(|(errors, e)| (Envelope::from_proto(e).to_value(), errors))
            }
        }
    };
    let core = core.clone();
    let validated = match validated {
        Ok(env) => {
            if let Err(denied) = core.policy.current().check(&env.sender_id, &env.recipient_id) {
                let reason = denied.describe(&env.sender_id, &env.recipient_id);
                core.metrics
                    .policy_refusals
                    .with_label_values(&[&env.sender_id, &env.recipient_id])
                    .inc();
                tracing::info!(message_id = %env.id, sender_id = %env.sender_id, recipient_id = %env.recipient_id, rule = ?denied.rule, "send refused by the relay policy");
                return futures::future::Either::Left(futures::future::ready(SendOutcome::Forbidden(reason)));
            }
            Ok(env)
        }
        Err(invalid) => Err(invalid),
    };
    let validated = match validated {
        Ok(env) => match core.backlog.over(&core, &env.recipient_id).await {
            Some(depth) => {
                core.metrics.backlog_refusals.inc();
                tracing::debug!(message_id = %env.id, recipient_id = %env.recipient_id, depth, "recipient backlogged: send refused");
                let outcome = SendOutcome::Backlogged {
                    depth,
                    retry_after: crate::backlog::RETRY_AFTER,
                };
                return futures::future::Either::Left(futures::future::ready(outcome));
            }
            None => Ok(env),
        },
        Err(invalid) => Err(invalid),
    };
    let publish = match validated {
        Err(invalid) => Err(invalid),
        Ok(mut env) => {
            env.received_at = Some(dmr::time::now_iso());
            tracing::debug!(message_id = %env.id, sender_id = %env.sender_id, recipient_id = %env.recipient_id, "queueing message");
            let started = core.broker.start_publish(&env.recipient_id, &encode(&env)).await;
            Ok((env, started))
        }
    };
    futures::future::Either::Right(async move {
        match publish {
            Err((raw, errors)) => {
                record_validation_failure(&core, raw, errors.clone()).await;
                SendOutcome::Invalid(errors)
            }
            Ok((env, Ok(confirm))) => match confirm.await {
                Ok(()) => {
                    // Queued. A recipient that is behind slows its senders: hold the answer.
                    let held = core.backlog.hold(&core, &env.recipient_id).await;
                    if !held.is_zero() {
                        core.metrics.send_holds.observe(held.as_secs_f64());
                    }
                    SendOutcome::Accepted
                }
                Err(BrokerError::NotAccepted {
                    rejection: Rejection::Unroutable,
                    ..
                }) => {
                    // The recipient is in the directory but its queue is missing (deleted by hand, or
                    // added since the last declaration): declare it and publish once more.
                    republish(&core, &env).await
                }
                Err(e) => unconfirmed(&env, e),
            },
            Ok((env, Err(e))) => unavailable(&env, e),
        }
    })
}

async fn republish(core: &Core, env: &Envelope) -> SendOutcome {
    tracing::info!(recipient_id = %env.recipient_id, "recipient queue missing: declaring it again");
    if let Err(e) = core.broker.declare_agent(&env.recipient_id).await {
        return unavailable(env, e);
    }
    // A consumer of the old queue (here or on another instance) may not have been told it is gone.
    core.sessions.recheck_consumer(&env.recipient_id);
    core.broker
        .announce(&env.recipient_id, crate::broker::Announcement::QueueRecreated)
        .await;
    match core.broker.start_publish(&env.recipient_id, &encode(env)).await {
        Ok(confirm) => match confirm.await {
            Ok(()) => SendOutcome::Accepted,
            Err(e) => unconfirmed(env, e),
        },
        Err(e) => unavailable(env, e),
    }
}

/// The publish frame went out but no positive confirm came back.
fn unconfirmed(env: &Envelope, e: BrokerError) -> SendOutcome {
    match e {
        // The broker answered: it did not take the message.
        BrokerError::NotAccepted { .. } => unavailable(env, e),
        // No answer (connection lost): the message may be queued.
        _ => {
            tracing::warn!(message_id = %env.id, recipient_id = %env.recipient_id, error = %e, "publish not confirmed: outcome unknown");
            SendOutcome::Unknown(format!(
                "publish not confirmed, the message may or may not be queued: {e}"
            ))
        }
    }
}

fn unavailable(env: &Envelope, e: BrokerError) -> SendOutcome {
    tracing::warn!(message_id = %env.id, recipient_id = %env.recipient_id, error = %e, "message not queued");
    SendOutcome::Unavailable(format!("message not queued: {e}"))
}

fn encode(env: &Envelope) -> Vec<u8> {
    serde_json::to_vec(env).unwrap_or_default()
}

/// Publishes a validation-failure record; failures to record are logged, never fatal.
pub async fn record_validation_failure(core: &Core, message: Value, errors: Vec<MessageError>) {
    for e in &errors {
        core.metrics
            .validation_failures
            .with_label_values(&[e.kind.as_str()])
            .inc();
    }
    let record = ValidationFailure::new(message, errors);
    tracing::warn!(message_id = %record.id, errors = ?record.errors.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), "message failed validation");
    let body = serde_json::to_vec(&record).unwrap_or_default();
    if let Err(e) = core
        .broker
        .publish(&core.cfg.rabbitmq.validation_failures_queue, &body)
        .await
    {
        tracing::error!(message_id = %record.id, error = %e, "could not record validation failure");
    }
}
