//! `dmr dev`: a complete local relay in one process: a development PKI in a state directory, the
//! server, agents A and B, and a sink that prints each message it receives as one JSON line on
//! standard output (logs go to standard error).
//!
//! The broker is the embedded engine by default (`--broker embedded`; its queues in
//! `<state dir>/queues`): nothing to install. `--broker rabbitmq` (or `BROKER=rabbitmq`) uses the
//! RabbitMQ of `RABBITMQ_DEFAULT_*` instead.
//!
//! Fixed ports so the original README's curl example works verbatim: agent B's REST API on
//! 127.0.0.1:8074, agent A (`d3b07384-d9a0-4c3f-a4e2-123456789abc`) on 8073, server HTTP 8075,
//! server gRPC 8076, sink 8079.

use axum::body::Bytes;
use axum::routing::post;
use dmr_agent::config::AgentConfig;
use dmr_server::config::{BrokerEngine, RabbitConfig, ServerConfig};
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Agent A's id: the `recipientId` of the original README's curl example.
pub const AGENT_A: &str = "d3b07384-d9a0-4c3f-a4e2-123456789abc";
/// Agent B's id (the original's e2e id).
pub const AGENT_B: &str = "a1e45678-12bc-4ef0-9876-def123456789";

/// Options of `dmr dev`.
#[derive(clap::Args)]
pub struct DevArgs {
    /// Where keys and certificates are kept between runs.
    #[arg(long, env = "DMR_DEV_STATE_DIR", default_value = ".dmr-dev")]
    state_dir: PathBuf,
    /// The broker engine: `embedded` (queues on disk in the state directory, nothing to install)
    /// or `rabbitmq`.
    #[arg(long = "broker", env = "BROKER", value_enum, default_value_t = BrokerEngine::Embedded)]
    broker: BrokerEngine,
    /// RabbitMQ to use (with `--broker rabbitmq`).
    #[command(flatten)]
    rabbitmq: RabbitConfig,
}

const LOCALHOST: &str = "127.0.0.1";

/// Runs the relay until `shutdown`.
pub async fn run(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.broker == BrokerEngine::Rabbitmq {
        check_rabbitmq(&args.rabbitmq).await?;
    }
    let layout = dmr_pki::Layout::new(&args.state_dir);
    let agents = [
        (AGENT_A.to_owned(), "Agent A".to_owned()),
        (AGENT_B.to_owned(), "Agent B".to_owned()),
    ];
    dmr_pki::ensure(&layout, &["localhost", LOCALHOST], &agents)?;
    eprintln!("dmr dev: keys and certificates in {}", args.state_dir.display());

    let mut server_cfg = ServerConfig::new(
        layout.server_cert(),
        layout.server_key(),
        layout.ca_cert(),
        layout.centops().display().to_string(),
    );
    server_cfg.bind_address = LOCALHOST.into();
    server_cfg.rabbitmq = args.rabbitmq.clone();
    server_cfg.broker.engine = args.broker;
    server_cfg.broker.embedded_data_dir = args.state_dir.join("queues");
    eprintln!("dmr dev: broker {}", describe_broker(&args));
    let server = dmr_server::Server::bind(server_cfg).await?;
    let grpc_url = format!("https://localhost:{}", server.grpc_addr().port());

    let sink = tokio::net::TcpListener::bind((LOCALHOST, 8079)).await?;
    let sink_url = format!("http://{}", sink.local_addr()?);
    let agent = |id: &str, port: u16| {
        let mut cfg = AgentConfig::new(
            id.to_owned(),
            layout.agent_key(id),
            layout.agent_cert(id),
            layout.ca_cert(),
            grpc_url.clone(),
            format!("{sink_url}/{id}"),
        );
        cfg.bind_address = LOCALHOST.into();
        cfg.port = port;
        cfg
    };
    let agent_a = dmr_agent::Agent::bind(agent(AGENT_A, 8073)).await?;
    let agent_b = dmr_agent::Agent::bind(agent(AGENT_B, 8074)).await?;
    eprintln!(
        "dmr dev: server gRPC {} HTTP {}; agent A {} on {}; agent B {} on {}; sink {}",
        server.grpc_addr(),
        server.http_addr(),
        AGENT_A,
        agent_a.http_addr(),
        AGENT_B,
        agent_b.http_addr(),
        sink_url
    );
    eprintln!(
        "dmr dev: send to agent A through agent B with: curl -X POST http://localhost:8074/v1/messages -H 'Content-Type: application/json' -d @message.json"
    );

    let sink_app = axum::Router::new().route("/{agent}", post(print_message));
    let sink_task = axum::serve(sink, sink_app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let (s, a, b, k) = tokio::join!(
        server.run(shutdown.clone()),
        agent_a.run(shutdown.clone()),
        agent_b.run(shutdown.clone()),
        sink_task
    );
    s?;
    a?;
    b?;
    k?;
    Ok(())
}

fn describe_broker(args: &DevArgs) -> String {
    match args.broker {
        BrokerEngine::Embedded => format!(
            "embedded, queues in {} (BROKER=rabbitmq to use RabbitMQ)",
            args.state_dir.join("queues").display()
        ),
        BrokerEngine::Rabbitmq => format!("RabbitMQ at {}", args.rabbitmq.display_addr()),
    }
}

/// The sink: prints the received JSON as one line, then answers 200.
async fn print_message(body: Bytes) -> &'static str {
    let line = serde_json::from_slice::<serde_json::Value>(&body)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    "ok"
}

async fn check_rabbitmq(cfg: &RabbitConfig) -> anyhow::Result<()> {
    let attempt = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(&cfg.uri(), lapin::ConnectionProperties::default()),
    )
    .await;
    match attempt {
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "dev check".into()).await;
            Ok(())
        }
        Ok(Err(e)) => anyhow::bail!(no_broker(cfg, &e.to_string())),
        Err(_) => anyhow::bail!(no_broker(cfg, "timed out after 5 s")),
    }
}

fn no_broker(cfg: &RabbitConfig, why: &str) -> String {
    format!(
        "RabbitMQ is not reachable at {} as user {:?} ({why}).\n\
         dmr dev --broker rabbitmq needs a RabbitMQ broker. Either:\n\
         - use the embedded broker:  dmr dev   (the default; BROKER=embedded)\n\
         - start the local one:      rabbitmq-server -detached   (wait a few seconds)\n\
         - install it (Debian):      apt-get install -y rabbitmq-server && rabbitmq-server -detached\n\
         - or point at another one:  RABBITMQ_DEFAULT_HOST=… RABBITMQ_DEFAULT_PORT=… RABBITMQ_DEFAULT_USER=… RABBITMQ_DEFAULT_PASS=… dmr dev --broker rabbitmq",
        cfg.display_addr(),
        cfg.user
    )
}
