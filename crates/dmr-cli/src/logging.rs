//! Log set-up: human-readable by default, JSON with `LOG_FORMAT=json`. Levels come from `RUST_LOG`
//! if set, else from the original's `LOGGER_LOG_LEVELS` (comma-separated `error,warn,log,debug,verbose`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (logs go to standard error).
pub fn init() {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(level_from_original(std::env::var("LOGGER_LOG_LEVELS").ok().as_deref())));
    let colors = std::env::var("LOGGER_COLORS").map_or(true, |v| v != "false");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.with_ansi(colors).init();
    }
}

/// Maps the original's level list to a tracing directive (the most verbose level listed wins).
fn level_from_original(levels: Option<&str>) -> String {
    let levels = levels.unwrap_or("error,warn,log");
    let has = |l: &str| levels.split(',').any(|x| x.trim().eq_ignore_ascii_case(l));
    let level = if has("verbose") {
        "trace"
    } else if has("debug") {
        "debug"
    } else if has("log") {
        "info"
    } else if has("warn") {
        "warn"
    } else {
        "error"
    };
    // Only our own crates follow the chosen level: libraries below us may log frames (payloads,
    // tokens) at debug or trace level, so they stay at warn (lapin at error: its warnings print
    // returned messages whole).
    format!("warn,lapin=error,dmr={level},dmr_server={level},dmr_agent={level},dmr_pki={level},dmr_cli={level}")
}

#[cfg(test)]
mod tests {
    use super::level_from_original;

    #[test]
    fn original_levels_map_to_the_most_verbose() {
        assert!(level_from_original(None).contains("dmr_server=info,"));
        assert!(level_from_original(Some("error")).contains("dmr_agent=error,"));
        assert!(level_from_original(Some("error,warn,log,debug")).contains("dmr_server=debug,"));
        assert!(
            level_from_original(Some("verbose")).starts_with("warn,"),
            "libraries stay at warn"
        );
    }
}
