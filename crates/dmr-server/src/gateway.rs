//! The gRPC `AgentGateway` service: authenticates each stream by its client certificate, then runs
//! the session (sends in, deliveries out) until the agent leaves, is replaced or is revoked.

use crate::Core;
use crate::delivery::{self, DeliverySink, PendingAcks};
use crate::directory::{self, SessionUpdate};
use crate::metrics::GRPC_NAMESPACE;
use crate::router;
use crate::sessions::OpenSession;
use dmr::MessageError;
use dmr::envelope::Envelope;
use dmr::proto::agent_gateway_server::AgentGateway;
use dmr::proto::session_request::Frame as InFrame;
use dmr::proto::session_response::Frame as OutFrame;
use dmr::proto::{
    AgentInfo, Delivery, DeliveryStatus, DirectoryUpdate, ListAgentsRequest, ListAgentsResponse, Pong, SessionRequest,
    SessionResponse,
};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Frames buffered towards one agent before the session waits (HTTP/2 flow control does the rest).
const OUTBOUND_BUFFER: usize = 64;
/// Agents per directory frame: small frames keep every stream's encode buffer small (one frame of
/// the whole directory made each idle stream hold a buffer as large as the directory).
const DIRECTORY_AGENTS_PER_FRAME: usize = 8;
/// Sends from one agent awaiting their publish confirm at once; more wait for a free slot.
const SENDS_IN_FLIGHT: usize = 256;

/// The tonic service.
pub struct Gateway {
    core: Arc<Core>,
}

impl Gateway {
    /// Wraps the shared core.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// Authenticates the caller: certificate → agent id → must be in the directory with the same key.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let refuse = |reason: &str, status: Status| {
            self.core.metrics.socket_errors.inc();
            self.core.metrics.auth_failures.with_label_values(&[reason]).inc();
            tracing::warn!(reason, detail = status.message(), "agent stream refused");
            Err(status)
        };
        let Some(certs) = request.peer_certs() else {
            return refuse(
                "no_certificate",
                Status::unauthenticated("a client certificate is required"),
            );
        };
        let Some(leaf) = certs.first() else {
            return refuse(
                "no_certificate",
                Status::unauthenticated("a client certificate is required"),
            );
        };
        let (agent_id, key) = match crate::tls::agent_identity(leaf) {
            Ok(identity) => identity,
            Err(e) => return refuse("no_agent_id", Status::unauthenticated(e.to_string())),
        };
        let directory = self.core.directory.current();
        match directory.get(&agent_id) {
            None => refuse(
                "unknown_agent",
                Status::permission_denied(format!("agent {agent_id} is not in the directory")),
            ),
            Some(entry) if entry.key != key => refuse(
                "key_mismatch",
                Status::permission_denied(format!(
                    "the certificate's key for agent {agent_id} differs from the key published in the directory"
                )),
            ),
            Some(_) => Ok(agent_id),
        }
    }
}

type Outbound = mpsc::Sender<Result<SessionResponse, Status>>;

fn frame(f: OutFrame) -> Result<SessionResponse, Status> {
    Ok(SessionResponse { frame: Some(f) })
}

struct GrpcSink {
    tx: Outbound,
    core: Arc<Core>,
}

impl DeliverySink for GrpcSink {
    fn send(&self, delivery_id: u64, envelope: &Envelope, attempt: u32) -> BoxFuture<'_, Result<(), ()>> {
        let f = frame(OutFrame::Delivery(Delivery {
            delivery_id,
            envelope: Some(envelope.to_proto()),
            attempt,
        }));
        Box::pin(async move {
            self.tx.send(f).await.map_err(|_| ())?;
            self.core
                .metrics
                .events_sent
                .with_label_values(&["delivery", GRPC_NAMESPACE])
                .inc();
            Ok(())
        })
    }
}

#[tonic::async_trait]
impl AgentGateway for Gateway {
    type SessionStream = ReceiverStream<Result<SessionResponse, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let agent_id = self.authenticate(&request)?;
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let directory = self.core.directory.current();
        let core = self.core.clone();
        tokio::spawn(run_session(core, agent_id, directory, request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_agents(&self, request: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        self.authenticate(&request)?;
        Ok(Response::new(ListAgentsResponse {
            agents: self.core.directory.current().to_proto().agents,
            connected_agent_ids: self.core.sessions.connected(),
        }))
    }
}

async fn run_session(
    core: Arc<Core>,
    agent_id: String,
    mut sent: Arc<dmr::directory::Directory>,
    mut inbound: Streaming<SessionRequest>,
    tx: Outbound,
) {
    let mut directory_changes = core.directory.subscribe();
    // The directory goes first, before any delivery (sent here, not in `session`, because the
    // stream is only drained once `session` has returned).
    for part in sent.to_proto_frames(DIRECTORY_AGENTS_PER_FRAME) {
        if tx.send(frame(OutFrame::Directory(part))).await.is_err() {
            return;
        }
    }
    let session = OpenSession::open(&core, &agent_id, "gRPC").await;
    let ticket = &session.ticket;
    let acks = Arc::new(PendingAcks::default());
    let sink = Arc::new(GrpcSink {
        tx: tx.clone(),
        core: core.clone(),
    });
    let deliveries = tokio::spawn(delivery::run(
        core.clone(),
        agent_id.clone(),
        sink,
        acks.clone(),
        ticket.stop.clone(),
        ticket.recheck.clone(),
    ));
    let sends = Arc::new(Semaphore::new(SENDS_IN_FLIGHT));
    let end_reason = loop {
        let message = tokio::select! {
            () = ticket.stop.cancelled() => break "replaced, revoked or shutting down",
            m = inbound.message() => m,
            Ok(()) = directory_changes.changed() => {
                let now = directory_changes.borrow_and_update().clone();
                match directory::session_update(&agent_id, &sent, &now) {
                    SessionUpdate::None => {}
                    SessionUpdate::Push(changes) => {
                        let agents: Vec<AgentInfo> = changes
                            .into_iter()
                            .map(|(entry, deleted)| AgentInfo { deleted, ..entry.to_proto() })
                            .collect();
                        // Updates apply entry by entry, so a large one may simply be split.
                        for part in agents.chunks(DIRECTORY_AGENTS_PER_FRAME) {
                            let update = DirectoryUpdate { agents: part.to_vec() };
                            if tx.send(frame(OutFrame::DirectoryUpdate(update))).await.is_ok() {
                                core.metrics.events_sent.with_label_values(&["directory_update", GRPC_NAMESPACE]).inc();
                            }
                        }
                    }
                    SessionUpdate::Revoked(why) => {
                        tracing::warn!(agent_id, why, "agent revoked: closing its stream");
                        let _ = tx.send(Err(Status::permission_denied(format!("agent {agent_id} revoked: {why}")))).await;
                        break "revoked";
                    }
                }
                sent = now;
                continue;
            }
        };
        let incoming = match message {
            Ok(Some(SessionRequest { frame: Some(f) })) => f,
            Ok(Some(SessionRequest { frame: None })) => continue,
            Ok(None) => break "closed by the agent",
            Err(_) => break "stream error",
        };
        match incoming {
            InFrame::Send(send) => {
                core.metrics
                    .events_received
                    .with_label_values(&["send", GRPC_NAMESPACE])
                    .inc();
                let Ok(permit) = sends.clone().acquire_owned().await else {
                    break "shutting down";
                };
                let received = Instant::now();
                let raw = send
                    .envelope
                    .map(|e| Envelope::from_proto(e).to_value())
                    .unwrap_or(serde_json::Value::Null);
                let outcome = router::start_send(&core, &agent_id, raw).await;
                let (tx, core) = (tx.clone(), core.clone());
                tokio::spawn(async move {
                    let result = outcome.await.to_proto(send.correlation_id);
                    core.metrics
                        .message_processing
                        .observe(received.elapsed().as_secs_f64());
                    if tx.send(frame(OutFrame::SendResult(result))).await.is_ok() {
                        core.metrics
                            .events_sent
                            .with_label_values(&["send_result", GRPC_NAMESPACE])
                            .inc();
                    }
                    drop(permit);
                });
            }
            InFrame::DeliveryResult(result) => {
                core.metrics
                    .events_received
                    .with_label_values(&["delivery_result", GRPC_NAMESPACE])
                    .inc();
                let ok = result.status == DeliveryStatus::Ok as i32;
                let errors = result.errors.iter().map(MessageError::from_proto).collect();
                acks.resolve(result.delivery_id, ok, errors);
            }
            InFrame::Ping(ping) => {
                let _ = tx.send(frame(OutFrame::Pong(Pong { nonce: ping.nonce }))).await;
            }
        }
    };
    ticket.stop.cancel();
    // Answer the sends already handed to RabbitMQ before closing the stream, so that no sender is
    // left guessing about a message that was in fact queued.
    let in_flight = u32::try_from(SENDS_IN_FLIGHT).unwrap_or(u32::MAX);
    let deadline = Duration::from_millis(core.cfg.shutdown_timeout_ms);
    let _ = tokio::time::timeout(deadline, sends.acquire_many(in_flight)).await;
    if core.stop.is_cancelled() {
        let _ = tx.send(Err(Status::unavailable("server shutting down"))).await;
    } else if end_reason.starts_with("replaced") {
        let _ = tx
            .send(Err(Status::aborted(
                "session ended: replaced by a newer connection of this agent, or revoked",
            )))
            .await;
    }
    drop(tx);
    let _ = deliveries.await;
    session.close(&core, end_reason);
}
