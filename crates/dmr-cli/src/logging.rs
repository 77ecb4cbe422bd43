//! Log set-up: human-readable (`LOG_FORMAT` unset, `text` or `pretty`) or one JSON object per line
//! (`LOG_FORMAT=json`), on standard error. Levels come from `RUST_LOG` if set, else from the
//! original's `LOGGER_LOG_LEVELS` (comma-separated `error,warn,log,debug,verbose`, plus the usual
//! aliases `warning`, `info`, `trace`). A value we do not understand stops the start with an error
//! naming the variable: a typo silently meaning "errors only" hid logs in production.
//!
//! Logging must never take a task down. tracing-subscriber's own writer reports a failed write
//! with `eprintln!`, which panics when standard error is a closed pipe (a supervisor went away,
//! `dmr agent 2>&1 | head`), killing whichever task logged. So our writer swallows write errors
//! and counts them in `dmr_log_write_failures_total`, which both `/metrics` endpoints report (it is
//! registered in Prometheus' default registry, which the agent and the server render too).

use prometheus::IntCounter;
use std::io::IsTerminal as _;
use std::sync::LazyLock;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;

/// A logging variable we refuse, named so the operator knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LogConfigError {
    /// `LOGGER_LOG_LEVELS` lists a level we do not know.
    #[error("LOGGER_LOG_LEVELS: unknown level {0:?} (known: error, warn, warning, log, info, debug, verbose, trace)")]
    UnknownLevel(String),
    /// `LOG_FORMAT` is neither `json` nor a name of the human-readable format.
    #[error("LOG_FORMAT: unknown format {0:?} (known: json, text, pretty; unset means text)")]
    UnknownFormat(String),
    /// `LOGGER_COLORS` is not a boolean.
    #[error("LOGGER_COLORS: {0:?} is neither true nor false")]
    BadColors(String),
    /// `RUST_LOG` is not a valid tracing filter.
    #[error("RUST_LOG: {0}")]
    BadFilter(#[from] tracing_subscriber::filter::ParseError),
    /// A subscriber was already installed (a programming error).
    #[error("cannot install the log subscriber: {0}")]
    Install(#[from] tracing_subscriber::util::TryInitError),
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

/// Counts log lines that could not be written (process-wide).
static WRITE_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    let counter = IntCounter::new(
        "dmr_log_write_failures_total",
        "Log lines that could not be written to standard error (and were dropped)",
    )
    .unwrap_or_else(|_| unreachable!("a static metric definition is valid"));
    // Registered once, in the default registry that both /metrics endpoints render.
    let _ = prometheus::register(Box::new(counter.clone()));
    counter
});

/// Standard error that never fails: a failed write is counted and the line dropped.
struct TolerantStderr;

impl std::io::Write for TolerantStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One formatted event arrives as one buffer, so this counts lines, not fragments.
        if std::io::stderr().lock().write_all(buf).is_err() {
            WRITE_FAILURES.inc();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

struct MakeTolerantStderr;

impl<'a> MakeWriter<'a> for MakeTolerantStderr {
    type Writer = TolerantStderr;

    fn make_writer(&'a self) -> Self::Writer {
        TolerantStderr
    }
}

/// The logging settings, read from the environment and checked.
#[derive(Debug)]
struct Settings {
    filter: String,
    format: Format,
    colors: bool,
}

impl Settings {
    fn from_env(var: impl Fn(&str) -> Option<String>, stderr_is_terminal: bool) -> Result<Self, LogConfigError> {
        let filter = match var("RUST_LOG").filter(|f| !f.trim().is_empty()) {
            Some(directives) => {
                // Checked here so that a typo is an error, not a silently different level.
                EnvFilter::builder().parse(&directives)?;
                directives
            }
            None => level_from_original(var("LOGGER_LOG_LEVELS").as_deref())?,
        };
        let format = match var("LOG_FORMAT").map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "text" | "pretty" | "human") => Format::Text,
            Some("json") => Format::Json,
            Some(_) => return Err(LogConfigError::UnknownFormat(var("LOG_FORMAT").unwrap_or_default())),
        };
        let wanted = match var("LOGGER_COLORS").map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "true" | "1" | "yes" | "on") => true,
            Some("false" | "0" | "no" | "off") => false,
            Some(_) => return Err(LogConfigError::BadColors(var("LOGGER_COLORS").unwrap_or_default())),
        };
        // https://no-color.org: NO_COLOR set to anything but the empty string disables colours.
        let no_color = var("NO_COLOR").is_some_and(|v| !v.is_empty());
        Ok(Self {
            filter,
            format,
            colors: wanted && !no_color && stderr_is_terminal,
        })
    }
}

/// Installs the global subscriber (logs go to standard error), or says which variable is wrong.
pub fn init() -> Result<(), LogConfigError> {
    let settings = Settings::from_env(|k| std::env::var(k).ok(), std::io::stderr().is_terminal())?;
    LazyLock::force(&WRITE_FAILURES);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::builder().parse(&settings.filter)?)
        .with_writer(MakeTolerantStderr)
        // Our writer never fails; this also keeps the library's own `eprintln!` out of the way.
        .log_internal_errors(false);
    match settings.format {
        Format::Json => builder.json().flatten_event(true).finish().try_init()?,
        Format::Text => builder.with_ansi(settings.colors).finish().try_init()?,
    }
    Ok(())
}

/// Maps the original's level list to a tracing directive (the most verbose level listed wins).
fn level_from_original(levels: Option<&str>) -> Result<String, LogConfigError> {
    let levels = levels.filter(|l| !l.trim().is_empty()).unwrap_or("error,warn,log");
    let mut level = 0;
    for name in levels.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let rank = match name.to_ascii_lowercase().as_str() {
            "error" => 0,
            "warn" | "warning" => 1,
            "log" | "info" => 2,
            "debug" => 3,
            "verbose" | "trace" => 4,
            _ => return Err(LogConfigError::UnknownLevel(name.to_owned())),
        };
        level = level.max(rank);
    }
    let level = ["error", "warn", "info", "debug", "trace"][level];
    // Only our own crates follow the chosen level: libraries below us may log frames (payloads,
    // tokens) at debug or trace level, so they stay at warn (lapin at error: its warnings print
    // returned messages whole).
    Ok(format!(
        "warn,lapin=error,dmr={level},dmr_server={level},dmr_agent={level},dmr_pki={level},dmr_cli={level}"
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;
    use std::io::Write as _;

    fn settings(vars: &[(&str, &str)], terminal: bool) -> Result<Settings, LogConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        Settings::from_env(|k| vars.get(k).cloned(), terminal)
    }

    #[test]
    fn original_levels_map_to_the_most_verbose() {
        assert!(level_from_original(None).unwrap().contains("dmr_server=info,"));
        assert!(level_from_original(Some("error")).unwrap().contains("dmr_agent=error,"));
        assert!(
            level_from_original(Some("error,warn,log,debug"))
                .unwrap()
                .contains("dmr_server=debug,")
        );
        assert!(
            level_from_original(Some("verbose")).unwrap().starts_with("warn,"),
            "libraries stay at warn"
        );
    }

    #[test]
    fn the_usual_aliases_mean_what_they_say() {
        // `info` used to fall through to "errors only".
        assert!(level_from_original(Some("info")).unwrap().contains("dmr_agent=info,"));
        assert!(
            level_from_original(Some("WARNING"))
                .unwrap()
                .contains("dmr_agent=warn,")
        );
        assert!(level_from_original(Some("trace")).unwrap().contains("dmr_agent=trace,"));
    }

    #[test]
    fn unknown_levels_and_formats_are_refused_by_name() {
        let e = settings(&[("LOGGER_LOG_LEVELS", "error,verbos")], false).unwrap_err();
        assert!(matches!(&e, LogConfigError::UnknownLevel(l) if l == "verbos"));
        assert!(e.to_string().starts_with("LOGGER_LOG_LEVELS:"), "{e}");
        let e = settings(&[("LOG_FORMAT", "xml")], false).unwrap_err();
        assert!(matches!(&e, LogConfigError::UnknownFormat(f) if f == "xml"));
        assert!(e.to_string().starts_with("LOG_FORMAT:"), "{e}");
        assert!(matches!(
            settings(&[("LOGGER_COLORS", "maybe")], false).unwrap_err(),
            LogConfigError::BadColors(_)
        ));
        for ok in ["json", "JSON", "text", "pretty", ""] {
            assert!(settings(&[("LOG_FORMAT", ok)], false).is_ok(), "{ok}");
        }
        assert_eq!(settings(&[("LOG_FORMAT", "json")], false).unwrap().format, Format::Json);
    }

    #[test]
    fn colours_only_on_a_terminal_and_never_with_no_color() {
        assert!(settings(&[], true).unwrap().colors);
        assert!(!settings(&[], false).unwrap().colors, "not a terminal");
        assert!(!settings(&[("NO_COLOR", "1")], true).unwrap().colors);
        assert!(
            settings(&[("NO_COLOR", "")], true).unwrap().colors,
            "empty NO_COLOR is unset"
        );
        assert!(!settings(&[("LOGGER_COLORS", "false")], true).unwrap().colors);
    }

    #[test]
    fn a_failed_write_is_counted_not_raised() {
        // Writing to standard error cannot be made to fail from inside a test without closing the
        // test harness's own output, so this checks the contract of the writer on success; the
        // closed-pipe case runs against the real binary in tests/agent_logging.rs.
        let before = WRITE_FAILURES.get();
        let mut w = MakeTolerantStderr.make_writer();
        assert_eq!(w.write(b"").unwrap(), 0);
        assert!(w.flush().is_ok());
        assert_eq!(WRITE_FAILURES.get(), before);
    }
}
