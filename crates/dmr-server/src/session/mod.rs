//! One agent session, whatever the transport: the driver every gRPC stream and every legacy
//! Socket.IO socket runs through.
//!
//! A session's life, in order ([`run`]):
//! 1. the agent gets the whole directory (before any delivery);
//! 2. the session registers here (replacing an older session of the agent) and is announced to
//!    the other instances (which close theirs);
//! 3. while it runs: the agent's sends are checked against its limits and the relay policy, validated
//!    and published in arrival order, with at most `LIMIT_SENDS_IN_FLIGHT` awaiting their publisher
//!    confirm (see `sends.rs`); its queue is delivered
//!    ([`crate::delivery`]); directory changes are pushed, and a revocation ends the session;
//! 4. when it must end (a typed [`CloseReason`]) it drains: no new sends are taken (they are answered
//!    "unavailable, nothing queued"), a delivery in hand is finished when the server shuts down, and
//!    every send already handed to RabbitMQ is answered — all within the shutdown grace period;
//! 5. only then is the wire closed with the reason, and the session unregistered.
//!
//! A transport is a thin adapter: it turns its frames or events into [`Inbound`] items and
//! implements [`Transport`] for what goes out.
//!
//! **Invariants:**
//! - a send is answered before its session's wire is closed, unless the agent itself went away or the
//!   grace period ran out;
//! - a delivery is never acked to RabbitMQ without the agent's answer (see [`crate::delivery`]).

pub(crate) mod registry;
mod sends;

use crate::Core;
use crate::delivery::{self, DeliveryAnswer, PendingAcks};
use crate::directory::{self, SessionUpdate};
use crate::router::{SendBody, SendOutcome};
use dmr::directory::{AgentEntry, Directory};
use dmr::envelope::Envelope;
use futures::{Stream, StreamExt as _};
pub use registry::SessionRegistry;
use registry::SessionTicket;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Why a session ended. Each transport says it on the wire in its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The agent closed its stream or socket.
    AgentClosed,
    /// The connection broke (stream error, transport dropped, ping timeout).
    TransportLost,
    /// A newer connection of the same agent, here or on another instance.
    Replaced,
    /// The agent was removed or re-keyed in the directory.
    Revoked(Revocation),
    /// This server instance is shutting down: the agent should move to another one.
    ShuttingDown,
    /// The agent sent a frame over the size limit (`MESSAGE_MAX_PAYLOAD_BYTES` and the envelope
    /// around it); it is told why, then the session ends.
    FrameTooLarge,
}

/// Why an agent lost its right to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// No longer in the directory.
    Removed,
    /// Its key in the directory changed (the connected one holds the old key).
    Rekeyed,
}

impl Revocation {
    /// For logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Removed => "removed from the directory",
            Self::Rekeyed => "its key changed in the directory",
        }
    }
}

impl CloseReason {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentClosed => "closed by the agent",
            Self::TransportLost => "connection lost",
            Self::Replaced => "replaced by a newer connection of the agent",
            Self::Revoked(Revocation::Removed) => "revoked: removed from the directory",
            Self::Revoked(Revocation::Rekeyed) => "revoked: key changed in the directory",
            Self::ShuttingDown => "server shutting down",
            Self::FrameTooLarge => "refused: the agent sent a frame over the size limit",
        }
    }

    /// True when the agent's side of the connection is already gone (nothing more can be said).
    fn wire_gone(self) -> bool {
        matches!(self, Self::AgentClosed | Self::TransportLost)
    }

    /// True when the agent is told the reason even though nothing more is read from it (its request
    /// stream failed, but the answers can still reach it).
    fn told_after_its_side_ended(self) -> bool {
        matches!(self, Self::FrameTooLarge)
    }
}

/// The agent's connection is gone: nothing more can be sent on it.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the agent's connection is gone")]
pub struct Gone;

/// What a transport hands to its session.
pub enum Inbound<R> {
    /// A message to route, with what the transport needs to answer it.
    Send {
        /// The envelope as the agent sent it (validated by the router).
        message: SendBody,
        /// Where the answer goes (a correlation id, an ack callback).
        reply: R,
    },
    /// The agent's answer to a delivery.
    DeliveryAnswer {
        /// The delivery it answers.
        delivery_id: u64,
        /// Delivered, or why not.
        answer: DeliveryAnswer,
    },
    /// A keep-alive ping to echo.
    Ping(u64),
    /// The transport ended.
    Closed(CloseReason),
}

/// The outgoing half of a transport.
pub trait Transport: Send + Sync + 'static {
    /// What answering one send needs.
    type Reply: Send + 'static;
    /// The transport's name in logs ("gRPC", "Socket.IO").
    const NAME: &'static str;

    /// Sends the whole directory; called once, before anything else.
    fn send_directory(&self, directory: &Directory) -> impl Future<Output = Result<(), Gone>> + Send;
    /// Pushes changed entries (`true` = deleted).
    fn send_changes(&self, changes: &[(AgentEntry, bool)]) -> impl Future<Output = Result<(), Gone>> + Send;
    /// Hands a delivery to the agent. Its answer comes back as [`Inbound::DeliveryAnswer`].
    fn deliver(
        &self,
        delivery_id: u64,
        envelope: &Envelope,
        attempt: u32,
        epoch: u64,
    ) -> impl Future<Output = Result<(), Gone>> + Send;
    /// True if the agent takes several deliveries ahead of its answers, posts them in order,
    /// answers in order, and holds back (answers without posting) the deliveries of the same
    /// `epoch` behind one its endpoint refused: the gRPC agent does (proto `Delivery.epoch`).
    /// Otherwise deliveries go one at a time (and `epoch` is 0).
    const PIPELINES: bool = false;
    /// Answers one send.
    fn answer(&self, reply: Self::Reply, outcome: &SendOutcome) -> impl Future<Output = ()> + Send;
    /// Echoes a ping.
    fn pong(&self, nonce: u64) -> impl Future<Output = ()> + Send;
    /// True if the transport can ask the agent to stop sending and close its side
    /// ([`Transport::closing`]); the drain then also waits for the agent's end of stream, so that
    /// every send it wrote is read and answered.
    const ANNOUNCES_CLOSE: bool = false;
    /// Tells the agent the session is ending (see [`Transport::ANNOUNCES_CLOSE`]).
    fn closing(&self, _reason: CloseReason) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// Where the agent connects from, if the transport knows (the operators' console shows it).
    fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        None
    }
    /// Ends the connection, telling the agent why where the transport can.
    fn close(&self, reason: CloseReason) -> impl Future<Output = ()> + Send;
    /// For how long after the session starts a `DECRYPTION_FAILED` answer may be a start-up race of
    /// the agent (it had not stored the directory yet) and is retried instead of recorded.
    fn startup_race_window(&self) -> Duration {
        Duration::ZERO
    }
}

/// Runs one agent session to its end. `inbound` ends (or yields [`Inbound::Closed`]) when the
/// transport does.
pub(crate) async fn run<T, S>(core: Arc<Core>, agent_id: String, transport: Arc<T>, mut inbound: S)
where
    T: Transport,
    S: Stream<Item = Inbound<T::Reply>> + Send + Unpin + 'static,
{
    let mut changes = core.directory.subscribe();
    let mut sent = changes.borrow_and_update().clone();
    if transport.send_directory(&sent).await.is_err() {
        return;
    }
    let registration = Registration::open(&core, &agent_id, T::NAME).await;
    let ticket = &registration.ticket;
    if let Some(addr) = transport.remote_addr() {
        core.sessions.set_remote_addr(&agent_id, ticket.generation, addr);
    }
    let acks = Arc::new(PendingAcks::default());
    let abort = CancellationToken::new();
    let drain = CancellationToken::new();
    let mut deliveries = tokio::spawn(delivery::run(delivery::Deliveries {
        core: core.clone(),
        agent_id: agent_id.clone(),
        transport: transport.clone(),
        acks: acks.clone(),
        abort: abort.clone(),
        drain: drain.clone(),
        recheck: ticket.recheck.clone(),
        race_window_until: Instant::now() + transport.startup_race_window(),
    }));
    let sends = sends::SendPipeline::new(core.clone(), agent_id.clone(), transport.clone());

    let reason = loop {
        tokio::select! {
            () = ticket.stop.cancelled() => break registration.stop_reason(&core),
            Ok(()) = changes.changed() => {
                let now = changes.borrow_and_update().clone();
                match directory::session_update(&agent_id, &sent, &now) {
                    SessionUpdate::None => {}
                    SessionUpdate::Push(list) => {
                        let _ = transport.send_changes(&list).await;
                    }
                    SessionUpdate::Revoked(why) => {
                        tracing::warn!(agent_id, why = why.as_str(), "agent revoked: closing its session");
                        break CloseReason::Revoked(why);
                    }
                }
                sent = now;
            }
            item = inbound.next() => match item {
                None => break CloseReason::TransportLost,
                Some(Inbound::Closed(reason)) => break reason,
                Some(Inbound::Send { message, reply }) => sends.start(message, reply).await,
                Some(Inbound::DeliveryAnswer { delivery_id, answer }) => { acks.resolve(delivery_id, answer); }
                Some(Inbound::Ping(nonce)) => transport.pong(nonce).await,
            },
        }
    };

    // Drain. A shutdown lets the delivery in hand finish (so the agent does not get it twice after
    // a restart); any other end stops deliveries at once (unacked ones return to the queue).
    if reason == CloseReason::ShuttingDown {
        drain.cancel();
    } else {
        abort.cancel();
    }
    let mut wire_open = !reason.wire_gone();
    // On a shutdown, an agent that can be told so stops sending and closes its side: read until
    // then, so that a send already on its way is answered (unavailable) instead of cut off.
    let await_half_close = T::ANNOUNCES_CLOSE && reason == CloseReason::ShuttingDown && wire_open;
    if await_half_close {
        transport.closing(reason).await;
    }
    let mut deliveries_done = false;
    let grace = tokio::time::sleep(core.cfg.shutdown_timeout());
    tokio::pin!(grace);
    let sends_done = sends.finish();
    tokio::pin!(sends_done);
    let mut sends_answered = false;
    while !(deliveries_done && sends_answered && !(await_half_close && wire_open)) {
        tokio::select! {
            _ = &mut deliveries, if !deliveries_done => deliveries_done = true,
            () = &mut sends_done, if !sends_answered => sends_answered = true,
            item = inbound.next(), if wire_open => match item {
                Some(Inbound::DeliveryAnswer { delivery_id, answer }) => { acks.resolve(delivery_id, answer); }
                Some(Inbound::Send { reply, .. }) => {
                    transport.answer(reply, &SendOutcome::Unavailable(format!("session closing ({}); nothing queued", reason.as_str()))).await;
                }
                Some(Inbound::Ping(nonce)) => transport.pong(nonce).await,
                Some(Inbound::Closed(_)) | None => {
                    wire_open = false;
                    abort.cancel();
                }
            },
            () = &mut grace => {
                tracing::warn!(agent_id, "session drain exceeded the shutdown grace period; closing with work open (unacked deliveries return to the queue)");
                abort.cancel();
                break;
            }
        }
    }
    if wire_open || reason.told_after_its_side_ended() {
        transport.close(reason).await;
    }
    registration.close(&core, reason);
}

/// A session's registration, metrics and logs.
struct Registration {
    agent_id: String,
    ticket: SessionTicket,
    transport: &'static str,
    started: Instant,
}

impl Registration {
    async fn open(core: &Core, agent_id: &str, transport: &'static str) -> Self {
        let ticket = core.sessions.register(agent_id, transport, &core.stop);
        core.broker
            .announce(agent_id, crate::broker::Announcement::Session)
            .await;
        core.metrics.connections_total.inc();
        core.metrics.connections_active.inc();
        tracing::info!(agent_id, transport, "agent connected");
        Self {
            agent_id: agent_id.to_owned(),
            ticket,
            transport,
            started: Instant::now(),
        }
    }

    /// Why the stop token fired: shutdown (the parent token), or the registry's reason.
    fn stop_reason(&self, core: &Core) -> CloseReason {
        if core.stop.is_cancelled() {
            CloseReason::ShuttingDown
        } else {
            self.ticket.reason.get().copied().unwrap_or(CloseReason::Replaced)
        }
    }

    fn close(&self, core: &Core, reason: CloseReason) {
        self.ticket.stop.cancel();
        core.sessions.unregister(&self.agent_id, self.ticket.generation);
        core.metrics.connections_active.dec();
        core.metrics.disconnections_total.inc();
        core.metrics
            .connection_duration
            .observe(self.started.elapsed().as_secs_f64());
        tracing::info!(agent_id = %self.agent_id, transport = self.transport, reason = reason.as_str(), "agent disconnected");
    }
}
