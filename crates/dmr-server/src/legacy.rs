//! The Socket.IO edge that keeps unmodified legacy TypeScript agents working (compat §4), on the
//! server's HTTP port: Socket.IO v5 (socket.io-client v4), polling and websocket, via socketioxide.
//!
//! A legacy socket becomes the same agent session as a gRPC stream: it registers in the same
//! [`crate::sessions::SessionRegistry`] (a new connection of the agent on either transport replaces
//! the old one), its sends go through [`crate::router`], and its queue is delivered by
//! [`crate::delivery`] through a [`DeliverySink`] that emits `dmr:agents:message-from-dmr-server`.
//!
//! Authentication happens in a connect middleware, so every refusal is a `connect_error` carrying
//! the reason. socketioxide has no connection state recovery: nothing is lost anyway, because a
//! delivery is acked to RabbitMQ only after the agent's ack, and an interrupted one is redelivered.

use crate::Core;
use crate::delivery::{self, DeliverySink, PendingAcks};
use crate::directory::{self, SessionUpdate};
use crate::router::{self, SendOutcome};
use crate::sessions::OpenSession;
use dmr::envelope::Envelope;
use dmr::{ErrorType, MessageError};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, Data, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler as _;
use socketioxide::layer::SocketIoLayer;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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
}

/// Sends a legacy socket may have waiting for their turn (more are refused with an error ack).
const SENDS_QUEUED: usize = 256;

/// Edge state shared by the handlers.
pub struct LegacyEdge {
    core: Arc<Core>,
    /// When each agent's last legacy connection ended (for the stale-token window).
    last_seen: Mutex<HashMap<String, Instant>>,
}

#[derive(Clone)]
struct AgentId(String);

/// Why a handshake was refused (the `connect_error` message the client sees).
#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Builds the tower layer serving Socket.IO, and the handle to it.
pub fn layer(core: Arc<Core>) -> (SocketIoLayer, SocketIo) {
    let edge = Arc::new(LegacyEdge {
        core: core.clone(),
        last_seen: Mutex::new(HashMap::new()),
    });
    let (layer, io) = SocketIo::builder()
        // Node's socket.io default (1 MB) rather than socketioxide's 100 kB, and at least one envelope.
        .max_payload((core.cfg.message_max_payload_bytes as u64 + 64 * 1024).max(1_000_000))
        .ack_timeout(core.cfg.delivery_timeout())
        .with_state(edge)
        .build_layer();
    io.ns(core.cfg.legacy.namespace.clone(), on_connect.with(authenticate));
    (layer, io)
}

fn bearer(socket: &SocketRef) -> Option<String> {
    let header = socket.req_parts().headers.get("authorization")?.to_str().ok()?;
    header.strip_prefix("Bearer ").map(str::to_owned)
}

async fn authenticate(
    socket: SocketRef,
    State(edge): State<Arc<LegacyEdge>>,
    TryData(auth): TryData<Value>,
) -> Result<(), Refusal> {
    let result = edge.check_token(&socket, auth.ok());
    match result {
        Ok(agent_id) => {
            socket.extensions.insert(AgentId(agent_id));
            Ok(())
        }
        Err((reason, message)) => {
            edge.core.metrics.socket_errors.inc();
            edge.core.metrics.auth_failures.with_label_values(&[reason]).inc();
            tracing::warn!(reason, detail = %message, "legacy agent connection refused");
            Err(Refusal(message))
        }
    }
}

impl LegacyEdge {
    /// Verifies the handshake token as the original does (compat §4), with our stale-token window.
    fn check_token(&self, socket: &SocketRef, auth: Option<Value>) -> Result<String, (&'static str, String)> {
        let token = auth
            .as_ref()
            .and_then(|a| a.get("token"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| bearer(socket))
            .ok_or((
                "no_token",
                "authentication token missing (auth.token or Authorization: Bearer)".to_owned(),
            ))?;
        let kid = dmr::token::kid(&token).map_err(|e| ("bad_token", e.to_string()))?;
        let directory = self.core.directory.current();
        let entry = directory
            .get(&kid)
            .ok_or(("unknown_agent", format!("agent {kid} is not in the directory")))?;
        let claims = dmr::token::verify(&token, &entry.key).map_err(|e| ("bad_token", e.to_string()))?;
        let now = chrono::Utc::now().timestamp();
        let legacy = &self.core.cfg.legacy;
        let recently_seen = self
            .lock_seen()
            .get(&claims.agent_id)
            .is_some_and(|t| t.elapsed() <= Duration::from_millis(legacy.max_disconnection_duration_ms));
        let grace = if recently_seen {
            // The original agent reuses its start-up token forever: let it back in within the window.
            i64::MAX
        } else {
            (legacy.expired_token_grace_ms / 1000) as i64
        };
        dmr::token::check_time(&claims, now, grace).map_err(|e| ("expired_token", e.to_string()))?;
        Ok(claims.agent_id)
    }

    fn lock_seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.last_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn count_received(&self, event: &str, ns: &str) {
        self.core.metrics.events_received.with_label_values(&[event, ns]).inc();
    }

    fn count_sent(&self, event: &str, ns: &str) {
        self.core.metrics.events_sent.with_label_values(&[event, ns]).inc();
    }
}

async fn on_connect(socket: SocketRef, State(edge): State<Arc<LegacyEdge>>) {
    let Some(AgentId(agent_id)) = socket.extensions.get::<AgentId>() else {
        let _ = socket.disconnect();
        return;
    };
    let core = edge.core.clone();
    let ns = socket.ns().to_owned();
    let session = Arc::new(OpenSession::open(&core, &agent_id, "Socket.IO").await);
    let ticket = &session.ticket;
    tracing::debug!(agent_id, transport = ?socket.transport_type(), "legacy agent's engine.io transport");

    // The original wraps the list in an extra array (agents read `data[0]`): keep that shape, but
    // send it to the connecting agent only.
    let list: Vec<Value> = core
        .directory
        .current()
        .entries()
        .map(|e| e.to_legacy_json(None))
        .collect();
    if socket.emit(events::FULL_LIST, &vec![list]).is_ok() {
        edge.count_sent(events::FULL_LIST, &ns);
    }

    // Sends are handled in arrival order by one task per socket.
    let (send_tx, send_rx) = mpsc::channel::<(Value, AckSender)>(SENDS_QUEUED);
    tokio::spawn(process_sends(core.clone(), agent_id.clone(), send_rx));
    let on_send_edge = edge.clone();
    socket.on(
        events::MESSAGE_TO_SERVER,
        move |s: SocketRef, Data(message): Data<Value>, ack: AckSender| {
            on_send_edge.count_received(events::MESSAGE_TO_SERVER, s.ns());
            if let Err(mpsc::error::TrySendError::Full((_, ack)) | mpsc::error::TrySendError::Closed((_, ack))) =
                send_tx.try_send((message, ack))
            {
                let _ = ack.send(&json!({"status": "error", "error": "too many messages in flight; retry"}));
            }
            async {}
        },
    );

    let acks = Arc::new(PendingAcks::default());
    let sink = Arc::new(SocketSink {
        socket: socket.clone(),
        acks: acks.clone(),
        edge: edge.clone(),
    });
    tokio::spawn(delivery::run(
        core.clone(),
        agent_id.clone(),
        sink,
        acks,
        ticket.stop.clone(),
        ticket.recheck.clone(),
    ));

    // Directory changes are pushed as partial lists; a revoked agent is disconnected. Replaced (by
    // either transport) or shutting down: close the socket.
    tokio::spawn(follow_directory(
        edge.clone(),
        socket.clone(),
        agent_id.clone(),
        ticket.stop.clone(),
    ));

    let disconnect_edge = edge.clone();
    let session = session.clone();
    socket.on_disconnect(move |reason: socketioxide::socket::DisconnectReason| {
        disconnect_edge
            .lock_seen()
            .insert(session.agent_id.clone(), Instant::now());
        session.close(&disconnect_edge.core, &format!("{reason:?}"));
        async {}
    });
}

async fn follow_directory(edge: Arc<LegacyEdge>, socket: SocketRef, agent_id: String, stop: CancellationToken) {
    let mut changes = edge.core.directory.subscribe();
    let mut sent = changes.borrow_and_update().clone();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = changes.borrow_and_update().clone();
                match directory::session_update(&agent_id, &sent, &now) {
                    SessionUpdate::None => {}
                    SessionUpdate::Push(list) => {
                        let list: Vec<Value> = list.iter().map(|(e, deleted)| e.to_legacy_json(Some(*deleted))).collect();
                        if socket.emit(events::PARTIAL_LIST, &vec![list]).is_ok() {
                            edge.count_sent(events::PARTIAL_LIST, socket.ns());
                        }
                    }
                    SessionUpdate::Revoked(why) => {
                        tracing::warn!(agent_id, why, "legacy agent revoked: disconnecting");
                        break;
                    }
                }
                sent = now;
            }
        }
    }
    if socket.connected() {
        let _ = socket.clone().disconnect();
    }
}

async fn process_sends(core: Arc<Core>, agent_id: String, mut sends: mpsc::Receiver<(Value, AckSender)>) {
    while let Some((message, ack)) = sends.recv().await {
        let received = Instant::now();
        let outcome = router::start_send(&core, &agent_id, message).await;
        let core = core.clone();
        tokio::spawn(async move {
            let answer = match outcome.await {
                SendOutcome::Accepted => json!({"status": "ok"}),
                SendOutcome::Invalid(errors) => json!({
                    "status": "error",
                    "error": errors.iter().map(|e| format!("{}: {}", e.kind.as_str(), e.message)).collect::<Vec<_>>().join("; "),
                }),
                SendOutcome::Unavailable(detail) | SendOutcome::Unknown(detail) => {
                    json!({"status": "error", "error": detail})
                }
            };
            core.metrics
                .message_processing
                .observe(received.elapsed().as_secs_f64());
            let _ = ack.send(&answer);
        });
    }
}

/// Delivers by emitting `dmr:agents:message-from-dmr-server` with an ack.
struct SocketSink {
    socket: SocketRef,
    acks: Arc<PendingAcks>,
    edge: Arc<LegacyEdge>,
}

impl DeliverySink for SocketSink {
    fn send(&self, delivery_id: u64, envelope: &Envelope, _attempt: u32) -> BoxFuture<'_, Result<(), ()>> {
        let emitted = self
            .socket
            .emit_with_ack::<_, Value>(events::MESSAGE_FROM_SERVER, &envelope.to_value());
        Box::pin(async move {
            let ack = emitted.map_err(|_| ())?;
            self.edge.count_sent(events::MESSAGE_FROM_SERVER, self.socket.ns());
            let acks = self.acks.clone();
            tokio::spawn(async move {
                // A timeout or a closed socket leaves the delivery unanswered: the delivery loop's own
                // timeout then retries or, if the session is gone, the message returns to the queue.
                if let Ok(answer) = ack.await {
                    let (ok, errors) = parse_ack(&answer);
                    acks.resolve(delivery_id, ok, errors);
                }
            });
            Ok(())
        })
    }
}

/// Reads a legacy delivery ack: `{status:"ok"}` or `{status:"error", errors:[{type, message}]}`.
fn parse_ack(answer: &Value) -> (bool, Vec<MessageError>) {
    if answer.get("status").and_then(Value::as_str) == Some("ok") {
        return (true, vec![]);
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
        return (
            false,
            vec![MessageError::new(
                ErrorType::Unknown,
                format!("unexpected ack {answer}"),
            )],
        );
    }
    (false, errors)
}

#[cfg(test)]
mod tests {
    use super::parse_ack;
    use dmr::ErrorType;
    use serde_json::json;

    #[test]
    fn acks_are_read_like_the_original_sends_them() {
        assert_eq!(parse_ack(&json!({"status": "ok"})), (true, vec![]));
        let (ok, errors) =
            parse_ack(&json!({"status": "error", "errors": [{"type": "DECRYPTION_FAILED", "message": "x"}]}));
        assert!(!ok);
        assert_eq!(errors[0].kind, ErrorType::DecryptionFailed);
        let (ok, errors) = parse_ack(&json!("weird"));
        assert!(!ok);
        assert_eq!(errors[0].kind, ErrorType::Unknown);
    }
}
