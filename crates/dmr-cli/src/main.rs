//! The `dmr` binary: thin wrappers that parse configuration and run the libraries.

mod admin;
mod dev;
mod logging;
mod print_env;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// DMR — Distributed Message Rooms: relay messages between Bürokratt instances, end-to-end encrypted.
#[derive(Parser)]
#[command(name = "dmr", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the central server (gRPC with mutual TLS + HTTP for metrics and health).
    Server(Box<dmr_server::config::ServerConfig>),
    /// Run an agent (REST API for internal services + one gRPC stream to the server).
    Agent(Box<dmr_agent::config::AgentConfig>),
    /// Create a development PKI: CA, server certificate, agent keys and certificates, CentOps JSON.
    Pki(PkiArgs),
    /// Run a complete local relay: server, agents A and B, and a sink printing what arrives.
    Dev(dev::DevArgs),
    /// The operators' console from a terminal: agents, dead letters (list, replay, purge) and
    /// validation failures, over a server's admin API (ADMIN_PORT).
    Admin(admin::AdminArgs),
}

#[derive(clap::Args)]
struct PkiArgs {
    /// Directory to write into (existing material is reused).
    #[arg(long, default_value = "pki")]
    out: PathBuf,
    /// An agent as ID or ID=NAME (repeatable); a random id is made for "new" or "new=NAME".
    #[arg(long = "agent", required = true)]
    agents: Vec<String>,
    /// DNS names or IP addresses for the server certificate (repeatable).
    #[arg(long = "server-name", default_values = ["localhost", "127.0.0.1"])]
    server_names: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = Cli::command()
        .mut_subcommand("server", print_env::with_flag)
        .mut_subcommand("agent", print_env::with_flag);
    if let Some(sub) = print_env::requested(&argv).and_then(|sub| command.find_subcommand(sub)) {
        print!("{}", print_env::listing(sub));
        return Ok(());
    }
    let cli = Cli::from_arg_matches(&command.get_matches_from(argv)).unwrap_or_else(|e| e.exit());
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    logging::init()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Server(cfg) => {
                let server = dmr_server::Server::bind(*cfg).await?;
                tracing::info!(grpc = %server.grpc_addr(), http = %server.http_addr(), "DMR server listening");
                server.run(shutdown_signal()).await?;
            }
            Command::Agent(cfg) => {
                let agent = dmr_agent::Agent::bind(*cfg).await?;
                tracing::info!(http = %agent.http_addr(), "DMR agent listening");
                agent.run(shutdown_signal()).await?;
            }
            Command::Pki(args) => pki(args)?,
            Command::Dev(args) => dev::run(args, shutdown_signal()).await?,
            Command::Admin(args) => admin::run(args).await?,
        }
        Ok(())
    })
}

fn pki(args: PkiArgs) -> anyhow::Result<()> {
    let agents: Vec<(String, String)> = args
        .agents
        .iter()
        .map(|a| {
            let (id, name) = a.split_once('=').unwrap_or((a.as_str(), ""));
            let id = if id == "new" {
                uuid::Uuid::new_v4().to_string()
            } else {
                id.to_ascii_lowercase()
            };
            anyhow::ensure!(dmr::message::is_uuid(&id), "agent id {id:?} is not a UUID");
            let name = if name.is_empty() {
                format!("agent {id}")
            } else {
                name.to_owned()
            };
            Ok((id, name))
        })
        .collect::<anyhow::Result<_>>()?;
    let layout = dmr_pki::Layout::new(&args.out);
    let names: Vec<&str> = args.server_names.iter().map(String::as_str).collect();
    let creds = dmr_pki::ensure(&layout, &names, &agents)?;
    println!("CA certificate:      {}", layout.ca_cert().display());
    println!(
        "server certificate:  {} (key {})",
        layout.server_cert().display(),
        layout.server_key().display()
    );
    for c in &creds {
        println!(
            "agent {}: certificate {} (key {})",
            c.id,
            layout.agent_cert(&c.id).display(),
            layout.agent_key(&c.id).display()
        );
    }
    println!("CentOps JSON:        {}", layout.centops().display());
    Ok(())
}

/// Cancelled on SIGINT or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    t.cancel();
                    return;
                }
            };
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        // Catches clashing argument ids (e.g. PORT vs RABBITMQ_DEFAULT_PORT) that would panic at start.
        super::Cli::command().debug_assert();
    }

    #[test]
    fn server_and_agent_parse_their_environment_names() {
        use clap::Parser as _;
        let cli = super::Cli::try_parse_from([
            "dmr",
            "server",
            "--tls-cert-file",
            "c",
            "--tls-key-file",
            "k",
            "--tls-client-ca-file",
            "ca",
            "--centops-configuration-url",
            "x.json",
            "--port",
            "1",
            "--rabbitmq-port",
            "2",
        ])
        .unwrap();
        let super::Command::Server(cfg) = cli.command else {
            panic!("server")
        };
        assert_eq!((cfg.port, cfg.rabbitmq.port), (1, 2));
    }
}
