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
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why the directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read CentOps file {path}: {source}")]
    File {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP request failed or timed out.
    #[error("cannot fetch CentOps configuration from {url}: {source}")]
    Http {
        /// The URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The answer was refused.
    #[error("CentOps configuration from {source_name} refused: {error}")]
    Invalid {
        /// Where it came from.
        source_name: String,
        /// Why.
        error: DirectoryError,
    },
}

impl LoadError {
    /// A short stable name for metrics and log de-duplication.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File { .. } => "file_unreadable",
            Self::Http { source, .. } if source.is_timeout() => "timeout",
            Self::Http { source, .. } if source.is_status() => "http_status",
            Self::Http { .. } => "unreachable",
            Self::Invalid {
                error: DirectoryError::Format(_),
                ..
            } => "invalid_json",
            Self::Invalid {
                error: DirectoryError::BadId(_),
                ..
            } => "bad_id",
            Self::Invalid {
                error: DirectoryError::DuplicateId(_),
                ..
            } => "duplicate_id",
            Self::Invalid {
                error: DirectoryError::BadKey { .. },
                ..
            } => "bad_key",
        }
    }
}

fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

fn file_path(source: &str) -> &str {
    source.strip_prefix("file://").unwrap_or(source)
}

/// Fetches and parses the directory from `source` (URL or path).
pub async fn load(source: &str, timeout: Duration) -> Result<Directory, LoadError> {
    let bytes = if is_url(source) {
        let http = |e| LoadError::Http {
            url: source.to_owned(),
            source: e,
        };
        let client = reqwest::Client::builder().timeout(timeout).build().map_err(http)?;
        let response = client
            .get(source)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(http)?;
        response.bytes().await.map_err(http)?.to_vec()
    } else {
        let path = file_path(source);
        tokio::fs::read(path).await.map_err(|e| LoadError::File {
            path: path.to_owned(),
            source: e,
        })?
    };
    Directory::from_centops_json(&bytes).map_err(|error| LoadError::Invalid {
        source_name: source.to_owned(),
        error,
    })
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

/// Counts and logs a failed load; returns its kind. Repeats of the same kind only at debug level.
fn report_failure(core: &Core, e: &LoadError, last_failure: Option<&'static str>) -> &'static str {
    let kind = e.kind();
    core.metrics.centops_failures.with_label_values(&[kind]).inc();
    core.metrics.directory_refresh_failing.set(1);
    if last_failure == Some(kind) {
        tracing::debug!(kind, error = %e, "CentOps still failing");
    } else if core.directory.is_loaded() {
        tracing::error!(kind, error = %e, "CentOps refresh failed; keeping the last good directory");
    } else {
        tracing::error!(kind, error = %e, "cannot load the agent directory from CentOps yet; agents are refused until it loads (retrying)");
    }
    kind
}

fn record_success(core: &Core) {
    core.metrics.directory_refresh_failing.set(0);
    core.metrics.directory_last_success.set(chrono::Utc::now().timestamp());
}

/// Longest pause between two attempts at the first load.
const FIRST_LOAD_MAX_PAUSE: Duration = Duration::from_secs(30);

/// Loads the directory until it succeeds (exponential backoff with jitter, 0.5 s up to 30 s) or
/// `stop`. Returns the last failure kind, for the refresh loop's log de-duplication.
async fn load_first(core: &Core, source: &str, timeout: Duration, stop: &CancellationToken) -> Option<&'static str> {
    use backon::BackoffBuilder as _;
    let mut pauses = backon::ExponentialBuilder::new()
        .with_jitter()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(FIRST_LOAD_MAX_PAUSE)
        .without_max_times()
        .build();
    let mut last_failure = None;
    loop {
        match load(source, timeout).await {
            Ok(directory) => {
                tracing::info!(agents = directory.len(), source, "agent directory loaded");
                record_success(core);
                apply(core, directory).await;
                return last_failure;
            }
            Err(e) => last_failure = Some(report_failure(core, &e, last_failure)),
        }
        let pause = pauses.next().unwrap_or(FIRST_LOAD_MAX_PAUSE);
        tokio::select! {
            () = stop.cancelled() => return last_failure,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Refreshes the directory until `stop`: on the cron schedule, and for a file source when it changes.
/// If no directory was loaded at start, first retries until one loads.
pub async fn run_refresh(core: Arc<Core>, schedule: croner::Cron, stop: CancellationToken) {
    let source = core.cfg.centops_configuration_url.clone();
    let timeout = Duration::from_millis(core.cfg.centops_request_timeout_ms);
    let mut last_failure: Option<&'static str> = None;
    if !core.directory.is_loaded() {
        last_failure = load_first(&core, &source, timeout, &stop).await;
    }
    let poll = (!is_url(&source) && core.cfg.centops_file_poll_interval_ms > 0)
        .then(|| Duration::from_millis(core.cfg.centops_file_poll_interval_ms));
    let mut last_stamp = file_stamp(&source).await;
    loop {
        let now = chrono::Utc::now();
        let until_cron = schedule
            .find_next_occurrence(&now, false)
            .ok()
            .and_then(|next| (next - now).to_std().ok())
            .unwrap_or(Duration::from_secs(60));
        let wait = poll.map_or(until_cron, |p| p.min(until_cron));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let due = wait == until_cron;
        if !due {
            let stamp = file_stamp(&source).await;
            if stamp == last_stamp {
                continue;
            }
            last_stamp = stamp;
        }
        match load(&source, timeout).await {
            Ok(next) => {
                if let Some(kind) = last_failure.take() {
                    tracing::info!(previous_failure = kind, "CentOps configuration usable again");
                }
                record_success(&core);
                apply(&core, next).await;
            }
            Err(e) => last_failure = Some(report_failure(&core, &e, last_failure)),
        }
    }
}

async fn file_stamp(source: &str) -> Option<(SystemTime, u64)> {
    if is_url(source) {
        return None;
    }
    let meta = tokio::fs::metadata(file_path(source)).await.ok()?;
    Some((meta.modified().ok()?, meta.len()))
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
