//! The Socket.IO edge that keeps unmodified legacy TypeScript agents working (compat §4), on the
//! server's HTTP port: Socket.IO v5 (socket.io-client v4), polling and websocket, via socketioxide.
//!
//! A legacy socket runs as an agent session ([`crate::session`]) exactly like a gRPC stream; this
//! file only authenticates and translates events.
//!
//! **Authentication** (compat §4, and SECURITY.md): the original RS256 JWT, `kid` = `sub` = agent
//! id, verified with the directory's key. A current token must carry `exp` and no `iat`/`nbf` in the
//! future. The original agent makes its token once at start and never refreshes it, so an expired
//! token is accepted only if it is exactly (by SHA-256) the token of the agent's last authenticated
//! session, verified with the same directory key — remembered in RabbitMQ, so every instance and
//! every restart sees it ([`crate::broker::TokenRecord`]).
//!
//! **Refusals** are not `connect_error`s: socket.io-client treats those as final and the original
//! agent would stay stranded. A refused agent is accepted, told why (`dmr:error`), and disconnected,
//! which the original agent retries; each refusal is counted per agent id.

use crate::Core;
use crate::broker::TokenRecord;
use crate::delivery::DeliveryAnswer;
use crate::router::{SendBody, SendOutcome};
use crate::session::{self, CloseReason, Gone, Inbound, Transport};
use dmr::directory::{AgentEntry, Directory};
use dmr::envelope::Envelope;
use dmr::{ErrorType, MessageError};
use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler as _;
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::DisconnectReason;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Event names of the original (`AgentEventNames`).
pub mod events {
    /// Agent → server send, acked `{status}` after the publish is confirmed.
    pub const MESSAGE_TO_SERVER: &str = "dmr:agents:message-to-dmr-server";
    /// Server → agent delivery, acked `{status, errors?}` by the agent.
    pub const MESSAGE_FROM_SERVER: &str = "dmr:agents:message-from-dmr-server";
    /// The whole directory, to the connecting agent.
    pub const FULL_LIST: &str = "dmr:agents:full-list";
    /// Directory changes.
    pub const PARTIAL_LIST: &str = "dmr:agents:partial-list";
    /// Ours: why the server is about to disconnect the agent (the original ignores it).
    pub const ERROR: &str = "dmr:error";
}

/// Events a legacy socket may have waiting for its session (sends beyond it get an error ack).
const INBOUND_QUEUED: usize = 256;

/// How long a shutting-down legacy session waits, after answering its last sends, before it
/// disconnects the socket (see [`SocketTransport::close`]); and a refused socket, after telling the
/// agent why (see [`refuse`]).
const FLUSH_BEFORE_DISCONNECT: Duration = Duration::from_millis(500);

/// How long after a legacy session starts a `DECRYPTION_FAILED` is taken for the original agent's
/// start-up race (it stores the directory asynchronously) and redelivered instead of recorded.
const STARTUP_RACE_WINDOW: Duration = Duration::from_secs(10);

/// Builds the tower layer serving Socket.IO, and the handle to it.
pub fn layer(core: Arc<Core>) -> (SocketIoLayer, SocketIo) {
    let (layer, io) = SocketIo::builder()
        // Node's socket.io default (1 MB) rather than socketioxide's 100 kB, and at least one envelope.
        .max_payload((core.cfg.message_max_payload_bytes as u64 + 64 * 1024).max(1_000_000))
        .ack_timeout(core.cfg.delivery_timeout())
        .with_state(core.clone())
        .build_layer();
    io.ns(core.cfg.legacy.namespace.clone(), on_connect.with(handshake));
    (layer, io)
}

/// Why a handshake was refused: the metric reason and the message the agent is told.
#[derive(Clone)]
struct Refusal {
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

fn token_of(socket: &SocketRef, auth: Option<&Value>) -> Option<String> {
    if let Some(token) = auth.and_then(|a| a.get("token")).and_then(Value::as_str) {
        return Some(token.to_owned());
    }
    let header = socket.req_parts().headers.get("authorization")?.to_str().ok()?;
    header.strip_prefix("Bearer ").map(str::to_owned)
}

fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An authenticated agent and what to remember of its token.
struct Authenticated {
    agent_id: String,
    record: TokenRecord,
}

/// Verifies the handshake token (see the module doc for the rule).
async fn authenticate(core: &Core, token: Option<String>) -> Result<Authenticated, (Option<String>, Refusal)> {
    let token = token.ok_or((
        None,
        Refusal::new(
            "no_token",
            "authentication token missing (auth.token or Authorization: Bearer)",
        ),
    ))?;
    let kid = dmr::token::kid(&token).map_err(|e| (None, Refusal::new(e.reason(), e.to_string())))?;
    if let Err(closed) = core.admission() {
        return Err((Some(kid), Refusal::new(closed.reason(), closed.message())));
    }
    let directory = core.directory.current();
    let Some(entry) = directory.get(&kid) else {
        return Err((
            None,
            Refusal::new("unknown_agent", format!("agent {kid} is not in the directory")),
        ));
    };
    // Each defect under its own metric reason, so a forged token is told apart from an old one.
    let refuse = |e: dmr::token::TokenError| (Some(kid.clone()), Refusal::new(e.reason(), e.to_string()));
    let claims = dmr::token::verify(&token, &entry.key).map_err(refuse)?;
    let record = TokenRecord {
        token_digest: sha256_hex(token.as_bytes()),
        key_digest: sha256_hex(entry.info.authentication_certificate.as_bytes()),
    };
    let lifetime = dmr::token::lifetime(&claims, chrono::Utc::now().timestamp()).map_err(refuse)?;
    if let dmr::token::Lifetime::Expired(by_secs) = lifetime {
        let legacy = &core.cfg.legacy;
        let within_grace =
            by_secs.saturating_mul(1000) <= i64::try_from(legacy.expired_token_grace_ms).unwrap_or(i64::MAX);
        let last = core
            .broker
            .last_legacy_token(&claims.agent_id, legacy.last_token_ttl_ms)
            .await
            .map_err(|e| {
                (
                    Some(kid.clone()),
                    Refusal::new(
                        "token_state_unavailable",
                        format!("cannot check the token now ({e}); reconnect"),
                    ),
                )
            })?;
        if last.as_ref() != Some(&record) && !within_grace {
            return Err((
                Some(kid.clone()),
                Refusal::new(
                    "expired_token",
                    format!(
                        "token expired {by_secs} s ago and is not the agent's last authenticated token: restart the agent"
                    ),
                ),
            ));
        }
    }
    Ok(Authenticated {
        agent_id: claims.agent_id,
        record,
    })
}

/// Counts and logs a refusal, tells the agent, and disconnects it (which the original retries).
fn refuse(core: &Core, socket: SocketRef, agent_id: Option<String>, refusal: Refusal) {
    let agent = agent_id.as_deref().unwrap_or("unknown");
    core.metrics.socket_errors.inc();
    core.metrics.auth_failures.with_label_values(&[refusal.reason]).inc();
    core.metrics
        .legacy_refusals
        .with_label_values(&[agent, refusal.reason])
        .inc();
    tracing::warn!(agent_id = agent, reason = refusal.reason, detail = %refusal.message, "legacy agent connection refused");
    let _ = socket.emit(
        events::ERROR,
        &json!({"reason": refusal.reason, "message": refusal.message}),
    );
    // On the polling transport the reason waits for the client's next poll: disconnecting at once
    // would drop it. The refused socket has no handlers meanwhile (nothing it sends is read). Tracked
    // with the sessions, so a shutdown does not leave it behind.
    core.tasks.spawn(async move {
        tokio::time::sleep(FLUSH_BEFORE_DISCONNECT).await;
        let _ = socket.disconnect();
    });
}

/// The handshake's outcome, left for [`on_connect`] in the socket's extensions.
#[derive(Clone)]
enum Handshake {
    Accepted(String),
    Refused(Option<String>, Refusal),
}

/// Connect middleware: authenticates and remembers the token. It never fails the connection (a
/// `connect_error` would strand the original agent); [`on_connect`] refuses instead.
async fn handshake(
    socket: SocketRef,
    State(core): State<Arc<Core>>,
    TryData(auth): TryData<Value>,
) -> Result<(), std::convert::Infallible> {
    let token = token_of(&socket, auth.as_ref().ok());
    let outcome = match authenticate(&core, token).await {
        Err((agent_id, refusal)) => Handshake::Refused(agent_id, refusal),
        Ok(agent) => match admit(&core, &agent.agent_id).await {
            Err(refusal) => Handshake::Refused(Some(agent.agent_id), refusal),
            Ok(()) => match core
                .broker
                .remember_legacy_token(&agent.agent_id, &agent.record, core.cfg.legacy.last_token_ttl_ms)
                .await
            {
                Ok(()) => Handshake::Accepted(agent.agent_id),
                Err(e) => Handshake::Refused(
                    Some(agent.agent_id),
                    Refusal::new(
                        "token_state_unavailable",
                        format!("cannot record the session now ({e}); reconnect"),
                    ),
                ),
            },
        },
    };
    socket.extensions.insert(outcome);
    Ok(())
}

/// The session limits for an authenticated legacy agent (`LIMIT_SESSIONS`,
/// `LIMIT_SESSION_OPENS_PER_MINUTE`).
async fn admit(core: &Core, agent_id: &str) -> Result<(), Refusal> {
    core.admit_session(agent_id)
        .map_err(|refusal| Refusal::new(refusal.label(), refusal.describe()))
}

/// In front of the Socket.IO edge: refuses a new engine.io connection (a request on the Socket.IO
/// path without a session id) from an address over `LIMIT_SOCKET_CONNECTS_PER_MINUTE`, with 429 and
/// `Retry-After`, before any handshake work; socket.io-client retries with its back-off.
pub(crate) async fn limit_connects(
    axum::extract::State(core): axum::extract::State<Arc<Core>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let opens_connection = request.uri().path().starts_with("/socket.io")
        && !request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("sid=")));
    let address = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    if let (true, Some(address)) = (opens_connection, address)
        && let Err(wait) = core.limits.socket_connect(&core.cfg.policy, address)
    {
        core.metrics
            .limit_refusals
            .with_label_values(&["unknown", "socket_connects"])
            .inc();
        tracing::warn!(%address, "Socket.IO connection attempt refused: over LIMIT_SOCKET_CONNECTS_PER_MINUTE");
        let seconds = wait.as_secs().max(1).to_string();
        return (
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            [(axum::http::header::RETRY_AFTER, seconds)],
            "too many Socket.IO connection attempts from this address (LIMIT_SOCKET_CONNECTS_PER_MINUTE); retry later\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// Registers the event handlers at once (before anything can arrive), then runs the session.
async fn on_connect(socket: SocketRef, State(core): State<Arc<Core>>) {
    let agent_id = match socket.extensions.get::<Handshake>() {
        Some(Handshake::Accepted(agent_id)) => agent_id,
        Some(Handshake::Refused(agent_id, refusal)) => return refuse(&core, socket, agent_id, refusal),
        None => return refuse(&core, socket, None, Refusal::new("no_token", "handshake missing")),
    };
    tracing::debug!(agent_id, transport = ?socket.transport_type(), "legacy agent's engine.io transport");
    let (tx, rx) = mpsc::channel::<Inbound<AckSender>>(INBOUND_QUEUED);
    let send_tx = tx.clone();
    let counting = core.clone();
    socket.on(
        events::MESSAGE_TO_SERVER,
        move |s: SocketRef, TryData(message): TryData<Value>, ack: AckSender| {
            counting
                .metrics
                .events_received
                .with_label_values(&[events::MESSAGE_TO_SERVER, s.ns()])
                .inc();
            match message {
                Ok(message) => {
                    if let Err(
                        mpsc::error::TrySendError::Full(Inbound::Send { reply, .. })
                        | mpsc::error::TrySendError::Closed(Inbound::Send { reply, .. }),
                    ) = send_tx.try_send(Inbound::Send {
                        message: SendBody::Json(message),
                        reply: ack,
                    }) {
                        let _ = reply.send(&json!({"status": "error", "error": "too many messages in flight; retry"}));
                    }
                }
                Err(e) => {
                    let _ = ack.send(&json!({"status": "error", "error": format!("malformed event: {e}")}));
                }
            }
            async {}
        },
    );
    let closed = CancellationToken::new();
    let reason = Arc::new(OnceLock::new());
    let (on_close, close_reason) = (closed.clone(), reason.clone());
    socket.on_disconnect(move |why: DisconnectReason| {
        let _ = close_reason.set(match why {
            DisconnectReason::ClientNSDisconnect | DisconnectReason::TransportClose => CloseReason::AgentClosed,
            _ => CloseReason::TransportLost,
        });
        on_close.cancel();
        async {}
    });
    let transport = Arc::new(SocketTransport {
        socket,
        core: core.clone(),
        answers: tx,
    });
    let ended = futures::stream::once(async move {
        closed.cancelled().await;
        Inbound::Closed(reason.get().copied().unwrap_or(CloseReason::TransportLost))
    });
    let inbound = futures::stream::select(tokio_stream::wrappers::ReceiverStream::new(rx), Box::pin(ended));
    core.tasks
        .spawn(session::run(core.clone(), agent_id, transport, inbound));
}

/// The outgoing half of a legacy session.
struct SocketTransport {
    socket: SocketRef,
    core: Arc<Core>,
    /// Where delivery acks go back to the session.
    answers: mpsc::Sender<Inbound<AckSender>>,
}

impl SocketTransport {
    fn emit(&self, event: &str, data: &impl serde::Serialize) -> Result<(), Gone> {
        self.socket.emit(event, data).map_err(|_| Gone)?;
        self.count_sent(event);
        Ok(())
    }

    fn count_sent(&self, event: &str) {
        self.core
            .metrics
            .events_sent
            .with_label_values(&[event, self.socket.ns()])
            .inc();
    }
}

impl Transport for SocketTransport {
    type Reply = AckSender;
    const NAME: &'static str = "Socket.IO";

    async fn send_directory(&self, directory: &Directory) -> Result<(), Gone> {
        // The original wraps the list in an extra array (agents read `data[0]`): keep that shape.
        let list: Vec<Value> = directory.entries().map(|e| e.to_legacy_json(None)).collect();
        self.emit(events::FULL_LIST, &vec![list])
    }

    async fn send_changes(&self, changes: &[(AgentEntry, bool)]) -> Result<(), Gone> {
        let list: Vec<Value> = changes
            .iter()
            .map(|(e, deleted)| e.to_legacy_json(Some(*deleted)))
            .collect();
        self.emit(events::PARTIAL_LIST, &vec![list])
    }

    async fn deliver(&self, delivery_id: u64, envelope: &Envelope, _attempt: u32, _epoch: u64) -> Result<(), Gone> {
        let ack = self
            .socket
            .emit_with_ack::<_, Value>(events::MESSAGE_FROM_SERVER, &envelope.to_value())
            .map_err(|_| Gone)?;
        self.count_sent(events::MESSAGE_FROM_SERVER);
        let answers = self.answers.clone();
        tokio::spawn(async move {
            // A timeout or a closed socket leaves the delivery unanswered: the delivery loop's own
            // timeout then retries or, if the session is gone, the message returns to the queue.
            if let Ok(answer) = ack.await {
                let _ = answers
                    .send(Inbound::DeliveryAnswer {
                        delivery_id,
                        answer: parse_ack(&answer),
                    })
                    .await;
            }
        });
        Ok(())
    }

    async fn answer(&self, ack: AckSender, outcome: &SendOutcome) {
        let answer = match outcome {
            SendOutcome::Accepted => json!({"status": "ok"}),
            SendOutcome::Invalid(errors) => json!({
                "status": "error",
                "error": errors.iter().map(|e| format!("{}: {}", e.kind.as_str(), e.message)).collect::<Vec<_>>().join("; "),
            }),
            SendOutcome::Unavailable(detail) | SendOutcome::Unknown(detail) => {
                json!({"status": "error", "error": detail})
            }
            SendOutcome::Backlogged { depth, .. } => {
                json!({"status": "error", "error": crate::router::backlog_detail(*depth)})
            }
            SendOutcome::Forbidden(reason) => json!({"status": "error", "error": reason}),
            SendOutcome::OverLimit(over) => json!({"status": "error", "error": over.describe()}),
        };
        let _ = ack.send(&answer);
    }

    async fn pong(&self, _nonce: u64) {}

    fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.socket
            .req_parts()
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0)
    }

    async fn close(&self, reason: CloseReason) {
        tracing::debug!(reason = reason.as_str(), "closing legacy socket");
        if reason == CloseReason::ShuttingDown {
            // Closing the socket drops the packets engine.io has not written or the client has not
            // polled yet — the answers to its last sends among them. Give them time to leave.
            tokio::time::sleep(FLUSH_BEFORE_DISCONNECT).await;
        }
        if self.socket.connected() {
            let _ = self.socket.clone().disconnect();
        }
    }

    fn startup_race_window(&self) -> Duration {
        STARTUP_RACE_WINDOW
    }
}

/// Reads a legacy delivery ack: `{status:"ok"}` or `{status:"error", errors:[{type, message}]}`.
fn parse_ack(answer: &Value) -> DeliveryAnswer {
    if answer.get("status").and_then(Value::as_str) == Some("ok") {
        return DeliveryAnswer::Delivered;
    }
    let errors: Vec<MessageError> = answer
        .get("errors")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|e| {
                    MessageError::new(
                        ErrorType::parse(e.get("type").and_then(Value::as_str).unwrap_or_default()),
                        e.get("message").and_then(Value::as_str).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if errors.is_empty() {
        return DeliveryAnswer::Failed(vec![MessageError::new(
            ErrorType::Unknown,
            format!("unexpected ack {answer}"),
        )]);
    }
    DeliveryAnswer::Failed(errors)
}

#[cfg(test)]
mod tests {
    use super::parse_ack;
    use crate::delivery::DeliveryAnswer;
    use dmr::ErrorType;
    use serde_json::json;

    #[test]
    fn acks_are_read_like_the_original_sends_them() {
        assert_eq!(parse_ack(&json!({"status": "ok"})), DeliveryAnswer::Delivered);
        let DeliveryAnswer::Failed(errors) =
            parse_ack(&json!({"status": "error", "errors": [{"type": "DECRYPTION_FAILED", "message": "x"}]}))
        else {
            panic!("an error ack is a failure");
        };
        assert_eq!(errors[0].kind, ErrorType::DecryptionFailed);
        let DeliveryAnswer::Failed(errors) = parse_ack(&json!("weird")) else {
            panic!("an unexpected ack is a failure");
        };
        assert_eq!(errors[0].kind, ErrorType::Unknown);
    }
}
