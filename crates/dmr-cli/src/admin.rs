//! `dmr admin …`: the operators' console from a terminal, over the server's admin API
//! (`ADMIN_PORT`). Tables for people by default, the API's JSON with `--json` for scripts.

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use std::path::PathBuf;

/// Talk to a server's operators' console (admin API).
#[derive(clap::Args)]
pub struct AdminArgs {
    /// The console's base URL (the server's ADMIN_PORT).
    #[arg(long, env = "DMR_ADMIN_URL", default_value = "http://127.0.0.1:8077")]
    url: String,
    /// File holding the bearer token (the first token line; an `<operator>:<token>` line of the
    /// server's ADMIN_TOKEN_FILE works as it is).
    #[arg(long, env = "DMR_ADMIN_TOKEN_FILE")]
    token_file: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(clap::Subcommand)]
enum AdminCommand {
    /// The agents: connected or not, where and how, queue and DLQ depths.
    Agents,
    /// An agent's dead letters (metadata only), oldest first.
    DeadLetters {
        /// Agent id.
        agent: String,
        /// How many (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move dead letters back to the agent's queue, to be delivered again.
    Replay(Selected),
    /// Delete dead letters of an agent.
    Purge(Selected),
    /// The validation failures, oldest first.
    ValidationFailures {
        /// How many (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One validation failure, the record as the server wrote it (JSON).
    ValidationFailure {
        /// Record id.
        id: String,
    },
    /// Delete validation failures.
    PurgeValidationFailures(Selection),
}

#[derive(clap::Args)]
struct Selected {
    /// Agent id.
    agent: String,
    #[command(flatten)]
    selection: Selection,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Selection {
    /// A message id (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Every message.
    #[arg(long)]
    all: bool,
}

impl Selection {
    fn body(&self) -> Value {
        if self.all {
            json!({"all": true})
        } else {
            json!({"ids": self.ids})
        }
    }
}

/// Reads the token: the first line that is neither empty nor a comment, after `<operator>:`.
fn read_token(path: &PathBuf) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once(':').map_or(l, |(_, token)| token.trim()).to_owned())
        .with_context(|| format!("no token in {}", path.display()))
}

/// Runs one `dmr admin` command.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let token = read_token(&args.token_file)?;
    let base = args.url.trim_end_matches('/');
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut request = http.request(method, format!("{base}{path}")).bearer_auth(&token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.with_context(|| format!("cannot reach {base}"))?;
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                let message = body["error"].as_str().unwrap_or("");
                bail!("{status}: {message}");
            }
            Ok(body)
        }
    };
    let get = |path: String| call(reqwest::Method::GET, path, None);
    let post = |path: String, body: Value| call(reqwest::Method::POST, path, Some(body));
    let enc = |s: &str| s.replace('/', "%2F");
    let (body, table) = match &args.command {
        AdminCommand::Agents => {
            let v = get("/api/v1/agents".into()).await?;
            let t = agents_table(&v);
            (v, t)
        }
        AdminCommand::DeadLetters { agent, limit } => {
            let v = get(format!("/api/v1/agents/{}/dead-letters?limit={limit}", enc(agent))).await?;
            let t = dead_letters_table(&v);
            (v, t)
        }
        AdminCommand::Replay(s) => {
            let v = post(
                format!("/api/v1/agents/{}/dead-letters/replay", enc(&s.agent)),
                s.selection.body(),
            )
            .await?;
            let t = action_line("replayed", &v);
            (v, t)
        }
        AdminCommand::Purge(s) => {
            let v = post(
                format!("/api/v1/agents/{}/dead-letters/purge", enc(&s.agent)),
                s.selection.body(),
            )
            .await?;
            let t = action_line("purged", &v);
            (v, t)
        }
        AdminCommand::ValidationFailures { limit } => {
            let v = get(format!("/api/v1/validation-failures?limit={limit}")).await?;
            let t = validation_failures_table(&v);
            (v, t)
        }
        AdminCommand::ValidationFailure { id } => {
            let v = get(format!("/api/v1/validation-failures/{}", enc(id))).await?;
            let t = serde_json::to_string_pretty(&v)?;
            (v, t)
        }
        AdminCommand::PurgeValidationFailures(s) => {
            let v = post("/api/v1/validation-failures/purge".into(), s.body()).await?;
            let t = action_line("purged", &v);
            (v, t)
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        println!("{table}");
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart.
fn render(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(headers.iter().map(|h| (*h).to_owned()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn agents_table(v: &Value) -> String {
    let rows = v["agents"]
        .as_array()
        .map(|agents| {
            agents
                .iter()
                .map(|a| {
                    let s = &a["sessions"][0];
                    vec![
                        text(&a["id"]),
                        text(&a["name"]),
                        if a["connected"] == true { "connected" } else { "offline" }.into(),
                        text(&s["instance"]),
                        text(&s["transport"]),
                        text(&s["since"]),
                        text(&s["remoteAddress"]),
                        text(&a["queueDepth"]),
                        text(&a["dlqDepth"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    render(
        &[
            "AGENT",
            "NAME",
            "STATE",
            "INSTANCE",
            "TRANSPORT",
            "SINCE",
            "REMOTE",
            "QUEUE",
            "DLQ",
        ],
        rows,
    )
}

fn dead_letters_table(v: &Value) -> String {
    let rows = v["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let d = &m["deadLetter"];
                    vec![
                        text(&m["id"]),
                        text(&m["senderId"]),
                        text(&m["type"]),
                        text(&m["receivedAt"]),
                        text(&d["reason"]),
                        text(&d["count"]),
                        text(&d["at"]),
                        text(&d["lastError"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{} dead letter(s) in {}\n{}",
        text(&v["depth"]),
        text(&v["queue"]),
        render(
            &[
                "ID",
                "SENDER",
                "TYPE",
                "RECEIVED",
                "REASON",
                "COUNT",
                "DEAD-LETTERED",
                "LAST ERROR"
            ],
            rows
        )
    )
}

fn validation_failures_table(v: &Value) -> String {
    let rows = v["records"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    let errors = r["errors"]
                        .as_array()
                        .map(|es| es.iter().map(|e| text(&e["message"])).collect::<Vec<_>>().join("; "))
                        .unwrap_or_default();
                    vec![
                        text(&r["id"]),
                        text(&r["receivedAt"]),
                        text(&r["senderId"]),
                        text(&r["recipientId"]),
                        errors,
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{} validation failure(s) in {}\n{}",
        text(&v["depth"]),
        text(&v["queue"]),
        render(&["ID", "RECEIVED", "SENDER", "RECIPIENT", "ERRORS"], rows)
    )
}

fn action_line(verb: &str, v: &Value) -> String {
    let missing: Vec<String> = v["notFound"]
        .as_array()
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default();
    if missing.is_empty() {
        format!("{verb} {}", text(&v["count"]))
    } else {
        format!("{verb} {}; not found: {}", text(&v["count"]), missing.join(", "))
    }
}
