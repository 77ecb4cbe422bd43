//! What the benchmark adds to the shared test kit (`dmr-testkit`: PKI with cached agent keys,
//! configuration builders, raw sessions, queue deletion, seed messages): an in-process server on
//! its own runtime (threads named `srv`, so its CPU time can be told apart) and the
//! scenario-level wrappers.

use dmr_pki::AgentCredentials;
use dmr_server::config::{BrokerEngine, RabbitConfig, ServerConfig};
use dmr_testkit::TestPki;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A multi-threaded runtime whose threads are all called `name` (workers and blocking pool),
/// with one worker per core, like a separate process would have.
pub fn runtime(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .thread_name(name)
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()?)
}

/// The server configuration for a scenario: the kit's loopback/ephemeral-port configuration with
/// every tuning setting at its default (that is what is measured), and its own
/// validation-failures queue.
/// The server's delivery tuning is read from its own variables (`MESSAGE_DELIVERY_WINDOW`,
/// `MESSAGE_QUEUE_HOLD_MAX_MS`, `MESSAGE_QUEUE_HOLD_DEPTH`, the `LIMIT_SEND*` limits) when set, to
/// compare settings.
pub fn server_config(pki: &TestPki, centops: &Path, rabbit: &RabbitConfig) -> ServerConfig {
    let vf = format!("validation-failures-bench-{}", uuid::Uuid::new_v4());
    let mut cfg = dmr_testkit::base_server_config(pki, centops, rabbit, &vf);
    cfg.broker.engine = engine();
    if cfg.broker.engine == BrokerEngine::Embedded {
        // A fresh data directory per server, removed when it stops (`ServerHandle::stop`).
        cfg.broker.embedded_data_dir = std::env::temp_dir().join(format!("dmr-bench-{}", uuid::Uuid::new_v4()));
    }
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(v) = var("MESSAGE_DELIVERY_WINDOW").and_then(|v| u16::try_from(v).ok()) {
        cfg.message_delivery_window = v.max(1);
    }
    if let Some(v) = var("MESSAGE_QUEUE_HOLD_MAX_MS") {
        cfg.message_queue_hold_max_ms = v;
    }
    if let Some(v) = var("MESSAGE_QUEUE_HOLD_DEPTH").and_then(|v| u32::try_from(v).ok()) {
        cfg.message_queue_hold_depth = v.max(1);
    }
    // The benchmarks measure what the relay can carry: one pair sends well above the default
    // per-agent limits (LIMIT_SENDS_PER_SECOND, LIMIT_SENDS_IN_FLIGHT), so those are off here
    // unless set.
    cfg.policy.sends_per_second = var("LIMIT_SENDS_PER_SECOND")
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0);
    cfg.policy.send_bytes_per_second = var("LIMIT_SEND_BYTES_PER_SECOND").unwrap_or(0);
    cfg.policy.sends_in_flight = var("LIMIT_SENDS_IN_FLIGHT")
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(u32::MAX)
        .max(1);
    cfg
}

static ENGINE: std::sync::Mutex<BrokerEngine> = std::sync::Mutex::new(BrokerEngine::Rabbitmq);

/// The broker engine the next scenarios' servers run on (`--engines`).
pub fn set_engine(engine: BrokerEngine) {
    *ENGINE.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = engine;
}

/// The broker engine servers are configured with now.
pub fn engine() -> BrokerEngine {
    *ENGINE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The CentOps file listing `agents`.
pub fn centops_file(pki: &TestPki, agents: &[AgentCredentials]) -> anyhow::Result<PathBuf> {
    let listed: Vec<&AgentCredentials> = agents.iter().collect();
    Ok(pki.try_write("centops.json", &dmr_pki::centops_json(&listed))?)
}

/// Deletes the queues of `agents` (`<id>` and `<id>.dlq`) and `extra` queues.
pub async fn delete_queues(uri: &str, agents: &[AgentCredentials], extra: &[String]) -> anyhow::Result<usize> {
    let names = agents
        .iter()
        .flat_map(|a| dmr_testkit::agent_queues(&a.id))
        .chain(extra.iter().cloned())
        .collect();
    Ok(dmr_testkit::delete_queues(uri, names).await?)
}

/// An in-process server running on its own runtime.
pub struct ServerHandle {
    pub grpc: SocketAddr,
    pub core: Arc<dmr_server::Core>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    rt: tokio::runtime::Runtime,
}

impl ServerHandle {
    /// Binds and runs `cfg` on a new `srv` runtime; returns once it is connected to RabbitMQ with
    /// its queues declared.
    pub async fn start(cfg: ServerConfig) -> anyhow::Result<Self> {
        let rt = runtime("srv")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = rt.spawn(async move {
            match dmr_server::Server::bind(cfg).await {
                Ok(server) => {
                    let _ = tx.send(Ok((server.grpc_addr(), server.core().clone())));
                    if let Err(e) = server.run(s).await {
                        eprintln!("server stopped: {e}");
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let (grpc, core) = rx.await??;
        let deadline = Instant::now() + Duration::from_secs(300);
        while !core.broker.is_ready() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server did not connect to RabbitMQ within 300 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            grpc,
            core,
            stop,
            task,
            rt,
        })
    }

    pub fn validation_failures_queue(&self) -> String {
        self.core.cfg.rabbitmq.validation_failures_queue.clone()
    }

    /// Shuts the server down and drops its runtime (and the embedded engine's data directory).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        self.rt.shutdown_background();
        let broker = &self.core.cfg.broker;
        if broker.engine == BrokerEngine::Embedded {
            let _ = std::fs::remove_dir_all(&broker.embedded_data_dir);
        }
    }
}
