//! Documents the server loads from an http(s) URL or a local file and keeps current: the CentOps
//! agent directory ([`crate::directory`]) and the relay policy ([`crate::policy`]). One set of
//! rules for both: loaded at start (retried with backoff while the server runs not-ready), then
//! refreshed on `CENTOPS_CONFIGURATION_CRON_TIME` and, for a file, when it changes.
//!
//! **Invariant:** a document in force was always parsed whole; a failed or invalid refresh leaves
//! the last good one in place, and is counted and logged once per kind of failure.

use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// A document format: how to parse it and name its failures.
pub trait Document: Sized + Send + Sync + 'static {
    /// Why a document was refused.
    type Error: std::error::Error + Send + Sync + 'static;
    /// What it is, for logs ("agent directory", "relay policy").
    const WHAT: &'static str;
    /// Parses a whole document.
    fn parse(bytes: &[u8]) -> Result<Self, Self::Error>;
    /// A short stable name for a refusal (metric label).
    fn error_kind(error: &Self::Error) -> &'static str;
}

/// Why a document could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError<E: std::error::Error + 'static> {
    /// The file could not be read.
    #[error("cannot read file {path}: {source}")]
    File {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP request failed or timed out.
    #[error("cannot fetch {url}: {source}")]
    Http {
        /// The URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The answer was refused.
    #[error("{source_name} refused: {error}")]
    Invalid {
        /// Where it came from.
        source_name: String,
        /// Why.
        error: E,
    },
}

impl<E: std::error::Error + 'static> LoadError<E> {
    /// A short stable name for metrics and log de-duplication.
    pub fn kind(&self, invalid_kind: impl Fn(&E) -> &'static str) -> &'static str {
        match self {
            Self::File { .. } => "file_unreadable",
            Self::Http { source, .. } if source.is_timeout() => "timeout",
            Self::Http { source, .. } if source.is_status() => "http_status",
            Self::Http { .. } => "unreachable",
            Self::Invalid { error, .. } => invalid_kind(error),
        }
    }
}

pub(crate) fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

fn file_path(source: &str) -> &str {
    source.strip_prefix("file://").unwrap_or(source)
}

/// Fetches and parses a document from `source` (URL or path).
pub async fn load<D: Document>(source: &str, timeout: Duration) -> Result<D, LoadError<D::Error>> {
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
    D::parse(&bytes).map_err(|error| LoadError::Invalid {
        source_name: source.to_owned(),
        error,
    })
}

/// Where a refreshed document goes, and what its loads are counted as.
pub(crate) trait Target: Send + Sync + 'static {
    /// The document.
    type Doc: Document;
    /// Its URL or path.
    fn source(&self) -> &str;
    /// True once one was loaded.
    fn is_loaded(&self) -> bool;
    /// Puts a freshly loaded document in force.
    fn apply(&self, doc: Self::Doc) -> impl Future<Output = ()> + Send;
    /// Counts a failed load (its kind).
    fn failed(&self, kind: &'static str);
    /// Counts a good load.
    fn succeeded(&self);
}

/// How often and how patiently to refresh.
pub(crate) struct Schedule {
    /// The cron schedule (`CENTOPS_CONFIGURATION_CRON_TIME`).
    pub cron: croner::Cron,
    /// One request's timeout.
    pub timeout: Duration,
    /// For a file source: how often to look for a change (`None` = only on the schedule).
    pub file_poll: Option<Duration>,
}

/// Longest pause between two attempts at the first load.
const FIRST_LOAD_MAX_PAUSE: Duration = Duration::from_secs(30);

/// Refreshes `target` until `stop`: on the cron schedule, and for a file source when it changes.
/// If nothing was loaded at start, first retries (backoff 0.5 s up to 30 s) until it loads.
pub(crate) async fn run<T: Target>(target: T, schedule: Schedule, stop: CancellationToken) {
    let source = target.source().to_owned();
    let mut last_failure: Option<&'static str> = None;
    if !target.is_loaded() {
        last_failure = load_first(&target, &schedule, &stop).await;
    }
    let poll = schedule.file_poll.filter(|_| !is_url(&source));
    let mut last_stamp = file_stamp(&source).await;
    loop {
        let now = chrono::Utc::now();
        let until_cron = schedule
            .cron
            .find_next_occurrence(&now, false)
            .ok()
            .and_then(|next| (next - now).to_std().ok())
            .unwrap_or(Duration::from_secs(60));
        let wait = poll.map_or(until_cron, |p| p.min(until_cron));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        if wait != until_cron {
            let stamp = file_stamp(&source).await;
            if stamp == last_stamp {
                continue;
            }
            last_stamp = stamp;
        }
        match load::<T::Doc>(&source, schedule.timeout).await {
            Ok(next) => {
                if let Some(kind) = last_failure.take() {
                    tracing::info!(
                        previous_failure = kind,
                        what = <T::Doc>::WHAT,
                        "{} usable again",
                        <T::Doc>::WHAT
                    );
                }
                target.succeeded();
                target.apply(next).await;
            }
            Err(e) => last_failure = Some(report_failure(&target, &e, last_failure)),
        }
    }
}

async fn load_first<T: Target>(target: &T, schedule: &Schedule, stop: &CancellationToken) -> Option<&'static str> {
    use backon::BackoffBuilder as _;
    let mut pauses = backon::ExponentialBuilder::new()
        .with_jitter()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(FIRST_LOAD_MAX_PAUSE)
        .without_max_times()
        .build();
    let mut last_failure = None;
    loop {
        match load::<T::Doc>(target.source(), schedule.timeout).await {
            Ok(doc) => {
                tracing::info!(source = target.source(), "{} loaded", <T::Doc>::WHAT);
                target.succeeded();
                target.apply(doc).await;
                return last_failure;
            }
            Err(e) => last_failure = Some(report_failure(target, &e, last_failure)),
        }
        let pause = pauses.next().unwrap_or(FIRST_LOAD_MAX_PAUSE);
        tokio::select! {
            () = stop.cancelled() => return last_failure,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Counts and logs a failed load; returns its kind. Repeats of the same kind only at debug level.
fn report_failure<T: Target>(
    target: &T,
    e: &LoadError<<T::Doc as Document>::Error>,
    last_failure: Option<&'static str>,
) -> &'static str {
    let what = <T::Doc>::WHAT;
    let kind = e.kind(<T::Doc>::error_kind);
    target.failed(kind);
    if last_failure == Some(kind) {
        tracing::debug!(kind, error = %e, "{what}: still failing");
    } else if target.is_loaded() {
        tracing::error!(kind, error = %e, "{what}: refresh failed; keeping the last good one");
    } else {
        tracing::error!(kind, error = %e, "{what}: cannot load it yet; agents are refused until it loads (retrying)");
    }
    kind
}

async fn file_stamp(source: &str) -> Option<(SystemTime, u64)> {
    if is_url(source) {
        return None;
    }
    let meta = tokio::fs::metadata(file_path(source)).await.ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
