//! Which agents hold a session on this instance.
//!
//! **Invariant:** at most one session per agent id is live here; registering a new one cancels the
//! previous one first, so its consumer closes and its unacknowledged deliveries go back to RabbitMQ.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A registered session: its generation (to unregister only itself) and its stop token.
pub struct SessionTicket {
    /// Unique per registration.
    pub generation: u64,
    /// Cancelled when the session must end (replaced, revoked, shutdown).
    pub stop: CancellationToken,
    /// Notified when the agent's queue may have been re-created (its consumer must be checked).
    pub recheck: Arc<Notify>,
}

/// The live sessions of this instance.
#[derive(Default)]
pub struct SessionRegistry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    live: HashMap<String, Live>,
}

struct Live {
    generation: u64,
    stop: CancellationToken,
    recheck: Arc<Notify>,
}

impl SessionRegistry {
    /// Registers a session for `agent_id` under `parent` (server shutdown), replacing any previous one.
    pub fn register(&self, agent_id: &str, parent: &CancellationToken) -> SessionTicket {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.next += 1;
        let generation = inner.next;
        let stop = parent.child_token();
        let recheck = Arc::new(Notify::new());
        let live = Live {
            generation,
            stop: stop.clone(),
            recheck: recheck.clone(),
        };
        if let Some(previous) = inner.live.insert(agent_id.to_owned(), live) {
            tracing::info!(agent_id, "a new connection replaces the agent's previous session");
            previous.stop.cancel();
        }
        SessionTicket {
            generation,
            stop,
            recheck,
        }
    }

    /// Removes the session if it is still the registered one.
    pub fn unregister(&self, agent_id: &str, generation: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if inner.live.get(agent_id).is_some_and(|l| l.generation == generation) {
            inner.live.remove(agent_id);
        }
    }

    /// Ends the session of `agent_id`, if any (e.g. revoked in the directory).
    pub fn disconnect(&self, agent_id: &str) -> bool {
        let inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.live.get(agent_id).map(|l| l.stop.cancel()).is_some()
    }

    /// Asks the session of `agent_id` (if here) to check that its consumer is still attached.
    pub fn recheck_consumer(&self, agent_id: &str) {
        let inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(l) = inner.live.get(agent_id) {
            l.recheck.notify_one();
        }
    }

    /// Ids of connected agents, sorted.
    pub fn connected(&self) -> Vec<String> {
        let inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut ids: Vec<String> = inner.live.keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// One agent session's life, common to both transports: registration (replacing older sessions
/// here, and announcing it so that other instances drop theirs), connection metrics and logs.
pub struct OpenSession {
    /// The agent.
    pub agent_id: String,
    /// Its registration.
    pub ticket: SessionTicket,
    transport: &'static str,
    started: std::time::Instant,
}

impl OpenSession {
    /// Registers the session of `agent_id` arriving over `transport` ("gRPC", "Socket.IO").
    pub async fn open(core: &crate::Core, agent_id: &str, transport: &'static str) -> Self {
        let ticket = core.sessions.register(agent_id, &core.stop);
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
            started: std::time::Instant::now(),
        }
    }

    /// Ends it: stops its tasks, unregisters it (if still the registered one) and counts it.
    pub fn close(&self, core: &crate::Core, reason: &str) {
        self.ticket.stop.cancel();
        core.sessions.unregister(&self.agent_id, self.ticket.generation);
        core.metrics.connections_active.dec();
        core.metrics.disconnections_total.inc();
        core.metrics
            .connection_duration
            .observe(self.started.elapsed().as_secs_f64());
        tracing::info!(agent_id = %self.agent_id, transport = self.transport, reason, "agent disconnected");
    }
}
