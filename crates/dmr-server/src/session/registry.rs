//! Which agents hold a session on this instance.
//!
//! **Invariant:** at most one session per agent id is live here; registering a new one ends the
//! previous one first (with [`CloseReason::Replaced`]), so its consumer closes and its
//! unacknowledged deliveries go back to RabbitMQ before the new one consumes.

use super::CloseReason;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A registered session: its generation (to unregister only itself), its stop token and why it was
/// stopped from outside.
pub(crate) struct SessionTicket {
    /// Unique per registration.
    pub(crate) generation: u64,
    /// Cancelled when the session must end (replaced, shutdown).
    pub(crate) stop: CancellationToken,
    /// Set before `stop` is cancelled by the registry (a newer session of the agent).
    pub(crate) reason: Arc<OnceLock<CloseReason>>,
    /// Notified when the agent's queue may have been re-created (its consumer must be checked).
    pub(crate) recheck: Arc<Notify>,
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
    reason: Arc<OnceLock<CloseReason>>,
    recheck: Arc<Notify>,
    transport: &'static str,
    /// When the session registered (for the operators' console).
    since: std::time::SystemTime,
    /// The agent's address, once the transport told it ([`SessionRegistry::set_remote_addr`]).
    remote_addr: Option<std::net::SocketAddr>,
}

/// A live session as the operators' console shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The agent.
    pub agent_id: String,
    /// "gRPC" or "Socket.IO".
    pub transport: &'static str,
    /// When it registered here.
    pub since: std::time::SystemTime,
    /// The agent's address, when known.
    pub remote_addr: Option<std::net::SocketAddr>,
}

impl Live {
    fn end(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.stop.cancel();
    }
}

impl SessionRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a session for `agent_id` under `parent` (server shutdown), replacing any previous one.
    pub(crate) fn register(
        &self,
        agent_id: &str,
        transport: &'static str,
        parent: &CancellationToken,
    ) -> SessionTicket {
        let mut inner = self.lock();
        inner.next += 1;
        let generation = inner.next;
        let stop = parent.child_token();
        let reason = Arc::new(OnceLock::new());
        let recheck = Arc::new(Notify::new());
        let live = Live {
            generation,
            stop: stop.clone(),
            reason: reason.clone(),
            recheck: recheck.clone(),
            transport,
            since: std::time::SystemTime::now(),
            remote_addr: None,
        };
        if let Some(previous) = inner.live.insert(agent_id.to_owned(), live) {
            tracing::info!(agent_id, "a new connection replaces the agent's previous session");
            previous.end(CloseReason::Replaced);
        }
        SessionTicket {
            generation,
            stop,
            reason,
            recheck,
        }
    }

    /// Removes the session if it is still the registered one.
    pub(crate) fn unregister(&self, agent_id: &str, generation: u64) {
        let mut inner = self.lock();
        if inner.live.get(agent_id).is_some_and(|l| l.generation == generation) {
            inner.live.remove(agent_id);
        }
    }

    /// Ends the session of `agent_id`, if any, because the agent connected to another instance.
    pub(crate) fn replaced_elsewhere(&self, agent_id: &str) -> bool {
        let inner = self.lock();
        inner.live.get(agent_id).map(|l| l.end(CloseReason::Replaced)).is_some()
    }

    /// Asks the session of `agent_id` (if here) to check that its consumer is still attached.
    pub(crate) fn recheck_consumer(&self, agent_id: &str) {
        if let Some(l) = self.lock().live.get(agent_id) {
            l.recheck.notify_one();
        }
    }

    /// Ids of connected agents, sorted.
    pub fn connected(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().live.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Connected agents with their transport ("gRPC", "Socket.IO"), sorted by id.
    pub fn connected_with_transport(&self) -> Vec<(String, &'static str)> {
        let mut ids: Vec<(String, &'static str)> = self
            .lock()
            .live
            .iter()
            .map(|(id, l)| (id.clone(), l.transport))
            .collect();
        ids.sort();
        ids
    }

    /// Records the address the live session `generation` of `agent_id` comes from.
    pub(crate) fn set_remote_addr(&self, agent_id: &str, generation: u64, addr: std::net::SocketAddr) {
        if let Some(l) = self
            .lock()
            .live
            .get_mut(agent_id)
            .filter(|l| l.generation == generation)
        {
            l.remote_addr = Some(addr);
        }
    }

    /// Every live session, sorted by agent id.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self
            .lock()
            .live
            .iter()
            .map(|(id, l)| SessionInfo {
                agent_id: id.clone(),
                transport: l.transport,
                since: l.since,
                remote_addr: l.remote_addr,
            })
            .collect();
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        out
    }

    /// True when `agent_id` has a live session here.
    pub fn is_connected(&self, agent_id: &str) -> bool {
        self.lock().live.contains_key(agent_id)
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// True when no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
