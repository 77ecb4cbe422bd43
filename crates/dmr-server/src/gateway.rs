//! The gRPC `AgentGateway` service: authenticates each stream by its client certificate and runs
//! it as an agent session ([`crate::session`]). This file only translates: stream frames in,
//! [`Transport`] calls out.

use crate::Core;
use crate::delivery::DeliveryAnswer;
use crate::metrics::GRPC_NAMESPACE;
use crate::router::{SendBody, SendOutcome};
use crate::session::{self, CloseReason, Gone, Inbound, Transport};
use dmr::MessageError;
use dmr::directory::{AgentEntry, Directory};
use dmr::envelope::Envelope;
use dmr::proto::agent_gateway_server::AgentGateway;
use dmr::proto::session_request::Frame as InFrame;
use dmr::proto::session_response::Frame as OutFrame;
use dmr::proto::{
    AgentInfo, Delivery, DeliveryResult, DeliveryStatus, DirectoryUpdate, ListAgentsRequest, ListAgentsResponse, Pong,
    SessionClosing, SessionRequest, SessionResponse,
};
use futures::StreamExt as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

/// Frames buffered towards one agent before the session waits (HTTP/2 flow control does the rest).
/// A session sends the whole directory at connect time, in frames of
/// [`DIRECTORY_AGENTS_PER_FRAME`] agents (~4.4 KiB): 16 frames (~70 KiB) wait here at most, where 64
/// made every connecting stream hold ~280 KiB for a moment (and the heap fragmented by thousands of
/// them in a reconnect storm stays with the process).
const OUTBOUND_BUFFER: usize = 16;

/// One outgoing frame in the session's channel. Boxed: tokio's channel allocates its slots in
/// blocks of 32 and keeps a few blocks per channel for the life of the stream, so unboxed
/// (~170-byte) frames cost every idle stream ~17 KiB; boxed, under 1 KiB.
type OutItem = Box<Result<SessionResponse, Status>>;

/// The frames towards one agent, as tonic's encoder reads them: at most one frame per encoding
/// round. tonic encodes every frame that is ready into one buffer (up to 32 KiB) and keeps that
/// buffer, at its largest size, for the life of the stream: the directory frames sent at connect
/// time, all ready at once, left every idle stream holding ~50 KiB. Yielding one frame per round
/// keeps the buffer at tonic's initial 8 KiB (unless a single frame is larger), at the cost of one
/// HTTP/2 DATA frame per gRPC message when several are ready at once.
pub struct Outbound {
    rx: mpsc::Receiver<OutItem>,
    /// A frame went out in the current round.
    yielded: bool,
}

impl futures::Stream for Outbound {
    type Item = Result<SessionResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if std::mem::take(&mut self.yielded) && !self.rx.is_empty() {
            // End the round: the encoder hands over what it has, and polls again at once.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                self.yielded = true;
                Poll::Ready(Some(*item))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
/// Agents per directory frame: small frames keep every stream's encode buffer small (one frame of
/// the whole directory made each idle stream hold a buffer as large as the directory).
const DIRECTORY_AGENTS_PER_FRAME: usize = 8;

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
        if let Err(closed) = self.core.admission() {
            return Err(Status::unavailable(closed.message()));
        }
        let Some(leaf) = request.peer_certs().and_then(|certs| certs.first().cloned()) else {
            return refuse(
                "no_certificate",
                Status::unauthenticated("a client certificate is required"),
            );
        };
        let (agent_id, key) = match crate::tls::agent_identity(&leaf) {
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

#[tonic::async_trait]
impl AgentGateway for Gateway {
    type SessionStream = Outbound;

    async fn session(
        &self,
        request: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let agent_id = self.authenticate(&request)?;
        if let Err(refusal) = self.core.admit_session(&agent_id) {
            return Err(Status::resource_exhausted(refusal.describe()));
        }
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let transport = Arc::new(GrpcTransport {
            tx,
            core: self.core.clone(),
            agent_id: agent_id.clone(),
            remote: request.remote_addr(),
        });
        let inbound = inbound(self.core.clone(), request.into_inner());
        self.core
            .tasks
            .spawn(session::run(self.core.clone(), agent_id, transport, inbound));
        Ok(Response::new(Outbound { rx, yielded: false }))
    }

    async fn list_agents(&self, request: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        self.authenticate(&request)?;
        Ok(Response::new(ListAgentsResponse {
            agents: self.core.directory.current().to_proto().agents,
            connected_agent_ids: self.core.sessions.connected(),
        }))
    }
}

/// Why reading the agent's stream failed: tonic's decoder refusing a frame over the size limit
/// (typed by its status code), which the agent is told, or anything else: the connection breaking.
fn frame_error(status: &Status) -> CloseReason {
    match status.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => CloseReason::FrameTooLarge,
        _ => CloseReason::TransportLost,
    }
}

/// The stream's frames as session items: the end of the stream is the agent closing it, an error
/// a lost connection or a frame over the size limit.
fn inbound(
    core: Arc<Core>,
    frames: Streaming<SessionRequest>,
) -> impl futures::Stream<Item = Inbound<String>> + Send + Unpin + 'static {
    let count = move |event: &str| {
        core.metrics
            .events_received
            .with_label_values(&[event, GRPC_NAMESPACE])
            .inc();
    };
    let items = frames.filter_map(move |frame| {
        let item = match frame {
            Err(status) => Some(Inbound::Closed(frame_error(&status))),
            Ok(SessionRequest { frame: None }) => None,
            Ok(SessionRequest {
                frame: Some(InFrame::Send(send)),
            }) => {
                count("send");
                let message = send
                    .envelope
                    .map_or(SendBody::Json(serde_json::Value::Null), SendBody::Proto);
                Some(Inbound::Send {
                    message,
                    reply: send.correlation_id,
                })
            }
            Ok(SessionRequest {
                frame: Some(InFrame::DeliveryResult(result)),
            }) => {
                count("delivery_result");
                Some(Inbound::DeliveryAnswer {
                    delivery_id: result.delivery_id,
                    answer: answer(&result),
                })
            }
            Ok(SessionRequest {
                frame: Some(InFrame::Ping(ping)),
            }) => Some(Inbound::Ping(ping.nonce)),
        };
        futures::future::ready(item)
    });
    Box::pin(items.chain(futures::stream::once(async {
        Inbound::Closed(CloseReason::AgentClosed)
    })))
}

/// Reads a delivery result through the typed enum, so a new status is a compile error here.
fn answer(result: &DeliveryResult) -> DeliveryAnswer {
    let errors = || result.errors.iter().map(MessageError::from_proto).collect();
    match result.status() {
        DeliveryStatus::Ok => DeliveryAnswer::Delivered,
        DeliveryStatus::Error | DeliveryStatus::Unspecified => DeliveryAnswer::Failed(errors()),
    }
}

/// The outgoing half of a gRPC session.
struct GrpcTransport {
    tx: mpsc::Sender<OutItem>,
    core: Arc<Core>,
    agent_id: String,
    /// The TCP peer, from the TLS connection.
    remote: Option<std::net::SocketAddr>,
}

impl GrpcTransport {
    async fn send(&self, frame: OutFrame, event: &str) -> Result<(), Gone> {
        self.tx
            .send(Box::new(Ok(SessionResponse { frame: Some(frame) })))
            .await
            .map_err(|_| Gone)?;
        self.core
            .metrics
            .events_sent
            .with_label_values(&[event, GRPC_NAMESPACE])
            .inc();
        Ok(())
    }
}

impl Transport for GrpcTransport {
    type Reply = String;
    const NAME: &'static str = "gRPC";

    async fn send_directory(&self, directory: &Directory) -> Result<(), Gone> {
        for part in directory.to_proto_frames(DIRECTORY_AGENTS_PER_FRAME) {
            self.send(OutFrame::Directory(part), "directory").await?;
        }
        Ok(())
    }

    async fn send_changes(&self, changes: &[(AgentEntry, bool)]) -> Result<(), Gone> {
        let agents: Vec<AgentInfo> = changes
            .iter()
            .map(|(entry, deleted)| AgentInfo {
                deleted: *deleted,
                ..entry.to_proto()
            })
            .collect();
        // Updates apply entry by entry, so a large one may simply be split.
        for part in agents.chunks(DIRECTORY_AGENTS_PER_FRAME) {
            let update = DirectoryUpdate { agents: part.to_vec() };
            self.send(OutFrame::DirectoryUpdate(update), "directory_update").await?;
        }
        Ok(())
    }

    async fn deliver(&self, delivery_id: u64, envelope: &Envelope, attempt: u32, epoch: u64) -> Result<(), Gone> {
        let delivery = Delivery {
            delivery_id,
            envelope: Some(envelope.to_proto()),
            attempt,
            epoch,
        };
        self.send(OutFrame::Delivery(delivery), "delivery").await
    }

    async fn answer(&self, correlation_id: String, outcome: &SendOutcome) {
        let _ = self
            .send(OutFrame::SendResult(outcome.to_proto(correlation_id)), "send_result")
            .await;
    }

    async fn pong(&self, nonce: u64) {
        let pong = SessionResponse {
            frame: Some(OutFrame::Pong(Pong { nonce })),
        };
        let _ = self.tx.send(Box::new(Ok(pong))).await;
    }

    const ANNOUNCES_CLOSE: bool = true;
    const PIPELINES: bool = true;

    fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.remote
    }

    async fn closing(&self, reason: CloseReason) {
        let closing = SessionClosing {
            reason: reason.as_str().to_owned(),
        };
        let _ = self.send(OutFrame::Closing(closing), "closing").await;
    }

    async fn close(&self, reason: CloseReason) {
        let status = match reason {
            CloseReason::ShuttingDown => Status::unavailable("server shutting down; connect to another instance"),
            CloseReason::Replaced => Status::aborted("session ended: replaced by a newer connection of this agent"),
            CloseReason::Revoked(why) => {
                Status::permission_denied(format!("agent {} revoked: {}", self.agent_id, why.as_str()))
            }
            CloseReason::FrameTooLarge => Status::resource_exhausted(format!(
                "a frame over the server's size limit (MESSAGE_MAX_PAYLOAD_BYTES {} and the envelope around it): session ended",
                self.core.cfg.message_max_payload_bytes
            )),
            CloseReason::AgentClosed | CloseReason::TransportLost => return,
        };
        let _ = self.tx.send(Box::new(Err(status))).await;
    }
}
