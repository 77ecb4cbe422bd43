//! `dmr server --print-env` and `dmr agent --print-env`: every environment variable the binary reads,
//! with its default, generated from the clap definitions (and the logging set-up's list) so that it
//! cannot drift from the code. Deployment checks (scripts/check_deploy.py) read this output instead of
//! the Rust source.
//!
//! Format, one setting per `NAME=default` line (empty after `=` when there is no default), preceded by
//! comment lines: its help text, then `# required` when it must be set, or
//! `# required unless one of: A B` when one variable of a group must be.

use clap::builder::ValueParser;
use clap::error::ErrorKind;
use clap::{Arg, ArgAction, Command};
use std::ffi::OsString;
use std::fmt::Write as _;

/// The flag, added to `dmr server` and `dmr agent` so that `--help` lists it.
pub const FLAG: &str = "print-env";

/// Variables read by `logging::init` straight from the environment (not through clap), with their
/// defaults ("" = unset) and meaning. The test below checks this list against logging.rs.
pub const LOG_ENV: &[(&str, &str, &str)] = &[
    (
        "LOGGER_LOG_LEVELS",
        "error,warn,log",
        "The original's log levels; the most verbose one listed wins (log = info, verbose = trace).",
    ),
    (
        "LOGGER_COLORS",
        "true",
        "Coloured human-readable logs (only on a terminal).",
    ),
    (
        "LOG_FORMAT",
        "",
        "`json` for one JSON object per line; human-readable when unset.",
    ),
    (
        "RUST_LOG",
        "",
        "A tracing filter directive; overrides LOGGER_LOG_LEVELS.",
    ),
    (
        "NO_COLOR",
        "",
        "Set to anything but the empty string: no colours (no-color.org).",
    ),
];

/// The subcommand (`server` or `agent`) whose settings `argv` asks to print, if it asks.
///
/// Checked before clap parses anything: full parsing would refuse a command line without the
/// required settings, and printing them must work on a machine where none is set.
pub fn requested(argv: &[OsString]) -> Option<&'static str> {
    let sub = match argv.get(1)?.to_str()? {
        "server" => "server",
        "agent" => "agent",
        _ => return None,
    };
    let flag = format!("--{FLAG}");
    argv[2..].iter().any(|a| a.to_str() == Some(&flag)).then_some(sub)
}

/// Adds `--print-env` to a subcommand's help.
pub fn with_flag(cmd: Command) -> Command {
    cmd.arg(
        Arg::new(FLAG)
            .long(FLAG)
            .action(ArgAction::SetTrue)
            .help("Print every environment variable this command reads, with its default, and exit"),
    )
}

/// The listing for one subcommand (`sub` as built by clap, e.g. `Cli::command()`'s `server`).
pub fn listing(sub: &Command) -> String {
    let (required, one_of) = requirements(sub);
    let name = sub.get_name();
    let mut out = format!(
        "# Environment variables `dmr {name}` reads, with their defaults (each also a --flag: `dmr {name} --help`).\n\
         # Generated from the code by `dmr {name} --print-env`.\n"
    );
    for arg in sub.get_arguments() {
        let Some(env) = arg.get_env().and_then(|e| e.to_str()) else {
            continue;
        };
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let delimiter = arg.get_value_delimiter().unwrap_or(',').to_string();
        let default: Vec<_> = arg.get_default_values().iter().map(|v| v.to_string_lossy()).collect();
        let _ = writeln!(out, "\n# {}", help.replace('\n', "\n# "));
        let id = arg.get_id().as_str();
        if required.iter().any(|r| r == id) {
            out.push_str("# required\n");
        } else if let Some(group) = one_of.iter().find(|g| g.iter().any(|m| m == id)) {
            let names: Vec<_> = group.iter().filter_map(|m| env_of(sub, m)).collect();
            let _ = writeln!(out, "# required unless one of: {}", names.join(" "));
        }
        let _ = writeln!(out, "{env}={}", default.join(&delimiter));
    }
    out.push_str("\n# Logging (read at start-up, before the settings above).\n");
    for (env, default, help) in LOG_ENV {
        let _ = writeln!(out, "\n# {help}\n{env}={default}");
    }
    out
}

fn env_of(sub: &Command, id: &str) -> Option<String> {
    sub.get_arguments()
        .find(|a| a.get_id() == id)
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
}

/// (ids that must always be set, groups of ids of which one must be set), found by asking clap
/// itself: plain `required` is a getter, but `required_unless_present` has none, so the groups are
/// found by parsing probe command lines (environment ignored, every value accepted) and reading
/// the typed error kind.
fn requirements(sub: &Command) -> (Vec<String>, Vec<Vec<String>>) {
    let probe = sub.clone().no_binary_name(true).mut_args(|a| {
        let a = a.env(None);
        if a.get_action().takes_values() {
            a.value_parser(ValueParser::os_string())
        } else {
            a
        }
    });
    let long = |a: &Arg| a.get_long().map(|l| format!("--{l}"));
    let required: Vec<&Arg> = probe.get_arguments().filter(|a| a.is_required_set()).collect();
    let mut base: Vec<String> = Vec::new();
    for a in &required {
        base.extend(long(a));
        base.push("x".into());
    }
    let missing = |extra: &[String]| {
        let argv = base.iter().chain(extra);
        matches!(
            probe.clone().try_get_matches_from(argv),
            Err(e) if e.kind() == ErrorKind::MissingRequiredArgument
        )
    };
    let mut one_of = Vec::new();
    if missing(&[]) {
        let group: Vec<String> = probe
            .get_arguments()
            .filter(|a| {
                !a.is_required_set()
                    && a.get_default_values().is_empty()
                    && a.get_action().takes_values()
                    && long(a).is_some_and(|l| !missing(&[l, "x".into()]))
            })
            .map(|a| a.get_id().to_string())
            .collect();
        one_of.push(group);
    }
    let required = required.iter().map(|a| a.get_id().to_string()).collect();
    (required, one_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn sub(name: &str) -> Command {
        crate::Cli::command()
            .find_subcommand(name)
            .cloned()
            .unwrap_or_else(|| panic!("no subcommand {name}"))
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect()
    }

    #[test]
    fn only_server_and_agent_with_the_flag_are_intercepted() {
        let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(requested(&argv(&["dmr", "server", "--print-env"])), Some("server"));
        assert_eq!(
            requested(&argv(&["dmr", "agent", "--port", "1", "--print-env"])),
            Some("agent")
        );
        assert_eq!(requested(&argv(&["dmr", "server"])), None);
        assert_eq!(requested(&argv(&["dmr", "pki", "--print-env"])), None);
        assert_eq!(requested(&argv(&["dmr"])), None);
    }

    #[test]
    fn the_server_listing_has_defaults_and_marks_required_settings() {
        let out = listing(&sub("server"));
        let l = lines(&out);
        for want in [
            "PORT=8075",
            "GRPC_PORT=8076",
            "RABBITMQ_DEFAULT_PORT=5672",
            "CENTOPS_CONFIGURATION_CRON_TIME=*/30 * * * *",
            "TLS_CERT_FILE=",
            "LOGGER_LOG_LEVELS=error,warn,log",
        ] {
            assert!(l.contains(&want), "{want} missing from:\n{out}");
        }
        assert!(out.contains("# required\nCENTOPS_CONFIGURATION_URL=\n"), "{out}");
        assert!(!out.contains("# required\nPORT="), "{out}");
        // Every line is NAME=value, each name once.
        let mut names: Vec<_> = l.iter().map(|l| l.split_once('=').map(|(n, _)| n)).collect();
        assert!(names.iter().all(Option::is_some), "{out}");
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a name listed twice:\n{out}");
    }

    #[test]
    fn the_agent_listing_knows_one_of_the_key_settings_is_required() {
        let out = listing(&sub("agent"));
        assert!(out.contains("# required\nAGENT_ID=\n"), "{out}");
        assert!(
            out.contains("# required unless one of: AGENT_PRIVATE_KEY AGENT_PRIVATE_KEY_FILE\nAGENT_PRIVATE_KEY=\n"),
            "{out}"
        );
        assert!(!out.contains("# required\nDMR_SERVER_TLS_NAME="), "optional: {out}");
        assert!(lines(&out).contains(&"PORT=8077"), "{out}");
    }

    #[test]
    fn the_logging_list_matches_what_logging_reads() {
        // logging.rs reads these outside clap; keep LOG_ENV in step with it.
        let src = include_str!("logging.rs");
        let read: Vec<&str> = ["var(\"", "var_os(\""]
            .iter()
            .flat_map(|call| src.split(call).skip(1))
            .filter_map(|rest| rest.split_once('"').map(|(name, _)| name))
            .collect();
        for name in &read {
            assert!(
                LOG_ENV.iter().any(|(n, _, _)| n == name),
                "logging.rs reads {name}, not in LOG_ENV"
            );
        }
        for (name, _, _) in LOG_ENV {
            assert!(
                read.contains(name),
                "LOG_ENV lists {name}, which logging.rs does not read"
            );
        }
    }
}
