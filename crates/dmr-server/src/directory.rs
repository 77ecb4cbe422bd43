//! The server's copy of the agent directory: loaded from CentOps (an http(s) URL) or a local file
//! in the same format, refreshed on `CENTOPS_CONFIGURATION_CRON_TIME` (and, for a file, when it
//! changes), and shared read-mostly with every session.
//!
//! **Invariants:**
//! - the directory in force was always parsed whole; a failed or invalid refresh leaves the last good
//!   one in place (a partial answer is never applied);
//! - every instance refreshes on its own: nothing is coordinated or stored, so instances converge on
//!   the same directory independently;
//! - sessions react to changes themselves (see [`session_update`]): each pushes the difference to its
//!   agent and ends itself if its agent was deleted or re-keyed.

use crate::Core;
use crate::session::Revocation;
use dmr::directory::{AgentEntry, Directory, DirectoryError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Why the directory could not be loaded.
pub type LoadError = crate::refresh::LoadError<DirectoryError>;

impl crate::refresh::Document for Directory {
    type Error = DirectoryError;
    const WHAT: &'static str = "agent directory (CentOps)";

    fn parse(bytes: &[u8]) -> Result<Self, DirectoryError> {
        Directory::from_centops_json(bytes)
    }

    fn error_kind(error: &DirectoryError) -> &'static str {
        match error {
            DirectoryError::Format(_) => "invalid_json",
            DirectoryError::BadId(_) => "bad_id",
            DirectoryError::DuplicateId(_) => "duplicate_id",
            DirectoryError::BadKey { .. } => "bad_key",
        }
    }
}

/// A stable name for a failed load (metric label).
pub fn failure_kind(e: &LoadError) -> &'static str {
    e.kind(<Directory as crate::refresh::Document>::error_kind)
}

/// Fetches and parses the directory from `source` (URL or path).
pub async fn load(source: &str, timeout: Duration) -> Result<Directory, LoadError> {
    crate::refresh::load(source, timeout).await
}

/// `CENTOPS_CONFIGURATION_CRON_TIME` is not a cron expression.
#[derive(Debug, thiserror::Error)]
#[error("CENTOPS_CONFIGURATION_CRON_TIME {expr:?} is not a cron expression of 5 or 6 fields: {source}")]
pub struct ScheduleError {
    expr: String,
    source: croner::errors::CronError,
}

/// Parses a 5-field (original) or 6-field (with seconds) cron expression.
pub fn parse_schedule(expr: &str) -> Result<croner::Cron, ScheduleError> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|source| ScheduleError {
            expr: expr.to_owned(),
            source,
        })
}

/// The directory in force, observable for changes. Until the first good load it is empty and
/// [`DirectoryHandle::is_loaded`] is false: sessions are refused and `/ready` answers 503.
#[derive(Clone)]
pub struct DirectoryHandle {
    tx: Arc<watch::Sender<Arc<Directory>>>,
    loaded: Arc<watch::Sender<bool>>,
}

impl DirectoryHandle {
    /// Wraps an initial directory (loaded).
    pub fn new(initial: Directory) -> Self {
        let handle = Self::not_loaded();
        handle.replace(initial);
        handle
    }

    /// An empty directory, not loaded yet.
    pub fn not_loaded() -> Self {
        Self {
            tx: Arc::new(watch::channel(Arc::new(Directory::default())).0),
            loaded: Arc::new(watch::channel(false).0),
        }
    }

    /// True once a directory was loaded.
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Watches [`DirectoryHandle::is_loaded`].
    pub fn watch_loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    /// The directory in force now.
    pub fn current(&self) -> Arc<Directory> {
        self.tx.borrow().clone()
    }

    /// Replaces the directory (and marks it loaded).
    pub fn replace(&self, next: Directory) {
        self.tx.send_replace(Arc::new(next));
        self.loaded.send_replace(true);
    }

    /// Subscribes to replacements.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Directory>> {
        self.tx.subscribe()
    }
}

/// What a session must do after a directory change.
pub enum SessionUpdate {
    /// Nothing changed.
    None,
    /// Push these entries (deleted ones flagged) to the agent.
    Push(Vec<(AgentEntry, bool)>),
    /// The session's own agent was deleted or re-keyed: end the session.
    Revoked(Revocation),
}

/// Compares what a session last sent its agent with the directory now in force.
pub fn session_update(agent_id: &str, sent: &Directory, now: &Directory) -> SessionUpdate {
    let diff = sent.diff(now);
    if diff.is_empty() {
        return SessionUpdate::None;
    }
    if diff.deleted.iter().any(|e| e.info.id.eq_ignore_ascii_case(agent_id)) {
        return SessionUpdate::Revoked(Revocation::Removed);
    }
    if diff.rekeyed.iter().any(|e| e.info.id.eq_ignore_ascii_case(agent_id)) {
        return SessionUpdate::Revoked(Revocation::Rekeyed);
    }
    let mut changes: Vec<(AgentEntry, bool)> = diff.added.into_iter().chain(diff.rekeyed).map(|e| (e, false)).collect();
    changes.extend(diff.deleted.into_iter().map(|e| (e, true)));
    SessionUpdate::Push(changes)
}

/// The directory as a refreshed document: where it comes from, what a load updates.
pub(crate) struct DirectoryTarget(pub Arc<Core>);

impl crate::refresh::Target for DirectoryTarget {
    type Doc = Directory;

    fn source(&self) -> &str {
        &self.0.cfg.centops_configuration_url
    }

    fn is_loaded(&self) -> bool {
        self.0.directory.is_loaded()
    }

    async fn apply(&self, next: Directory) {
        apply(&self.0, next).await;
    }

    fn failed(&self, kind: &'static str) {
        self.0.metrics.centops_failures.with_label_values(&[kind]).inc();
        self.0.metrics.directory_refresh_failing.set(1);
    }

    fn succeeded(&self) {
        self.0.metrics.directory_refresh_failing.set(0);
        self.0
            .metrics
            .directory_last_success
            .set(chrono::Utc::now().timestamp());
    }
}

/// Puts `next` in force and declares queues for added agents. Sessions see the change themselves
/// (pushing it to their agent, or ending if their agent was revoked).
/// Queues of deleted agents are kept (see README "Directory changes").
pub async fn apply(core: &Core, next: Directory) {
    let current = core.directory.current();
    let diff = current.diff(&next);
    if diff.is_empty() && core.directory.is_loaded() {
        return;
    }
    tracing::info!(
        added = diff.added.len(),
        deleted = diff.deleted.len(),
        rekeyed = diff.rekeyed.len(),
        agents = next.len(),
        "agent directory changed"
    );
    core.metrics.directory_agents.set(next.len() as i64);
    core.directory.replace(next);
    for entry in &diff.added {
        if let Err(e) = core.broker.declare_agent(&entry.info.id.to_ascii_lowercase()).await {
            tracing::error!(agent_id = %entry.info.id, error = %e, "cannot declare queues for a new agent; they will be declared on reconnect or first use");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_schedule;

    #[test]
    fn schedules_take_five_or_six_fields() {
        let every_half_hour = parse_schedule("*/30 * * * *").unwrap();
        let start = chrono::DateTime::parse_from_rfc3339("2024-01-15T10:07:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let next = every_half_hour.find_next_occurrence(&start, false).unwrap();
        assert_eq!(next.to_rfc3339(), "2024-01-15T10:30:00+00:00");
        let every_second = parse_schedule("* * * * * *").unwrap();
        let next = every_second.find_next_occurrence(&start, false).unwrap();
        assert_eq!((next - start).num_seconds(), 1);
        assert!(parse_schedule("every half hour").is_err());
    }
}
