//! Servers and agents in-process: configuration builders (loopback, ephemeral ports) and
//! starters that return once the thing is usable.

use crate::TestPki;
use crate::broker::{rabbit_config, test_engine};
use dmr_agent::config::AgentConfig;
use dmr_pki::AgentCredentials;
use dmr_server::config::{BrokerEngine, RabbitConfig, ServerConfig};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A server configuration on loopback with ephemeral ports, the broker `rabbit` and its own
/// validation-failures queue; every other setting at its default (what the benchmark measures).
pub fn base_server_config(pki: &TestPki, centops: &Path, rabbit: &RabbitConfig, vf_queue: &str) -> ServerConfig {
    let mut cfg = ServerConfig::new(
        pki.server_cert.clone(),
        pki.server_key.clone(),
        pki.ca_file.clone(),
        centops.display().to_string(),
    );
    cfg.bind_address = "127.0.0.1".into();
    cfg.port = 0;
    cfg.grpc_port = 0;
    cfg.rabbitmq = rabbit.clone();
    cfg.rabbitmq.validation_failures_queue = vf_queue.to_owned();
    cfg.broker.engine = test_engine();
    cfg
}

/// [`base_server_config`] on the shared broker, with test knobs: quick reconnects and retries.
pub fn server_config(pki: &TestPki, centops: &Path, vf_queue: &str) -> ServerConfig {
    let mut cfg = base_server_config(pki, centops, &rabbit_config(), vf_queue);
    cfg.rabbitmq.reconnect_interval_ms = 500;
    cfg.message_delivery_timeout_ms = 2000;
    cfg.message_delivery_retry_delay_ms = 50;
    // A few quick attempts, so that tests of dead-lettering do not wait for the retry budget.
    cfg.message_delivery_max_attempts = 3;
    cfg
}

/// A running server.
pub struct RunningServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub core: Arc<dmr_server::Core>,
    /// The embedded engine's data directory, when the server got a temporary one (removed on drop,
    /// after the server: fields drop in order).
    pub data_dir: Option<tempfile::TempDir>,
}

/// Binds and runs `cfg` on the current runtime; returns once its broker is ready. With the
/// embedded engine and no data directory chosen (the default one), the server gets a temporary one.
pub async fn start_server(mut cfg: ServerConfig) -> RunningServer {
    let default_dir = dmr_server::config::BrokerConfig::default().embedded_data_dir;
    let data_dir = (cfg.broker.engine == BrokerEngine::Embedded && cfg.broker.embedded_data_dir == default_dir)
        .then(|| tempfile::tempdir().expect("temporary data directory"));
    if let Some(dir) = &data_dir {
        cfg.broker.embedded_data_dir = dir.path().to_owned();
    }
    let server = dmr_server::Server::bind(cfg).await.expect("server starts");
    let (grpc, http, core) = (server.grpc_addr(), server.http_addr(), server.core().clone());
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        server.run(s).await.expect("server runs");
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while !core.broker.is_ready() {
        assert!(
            Instant::now() < deadline,
            "the server's broker was not ready within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    RunningServer {
        grpc,
        http,
        stop,
        task,
        core,
        data_dir,
    }
}

/// A running agent.
pub struct RunningAgent {
    pub id: String,
    pub http: SocketAddr,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub link: Arc<dmr_agent::link::Link>,
}

impl RunningAgent {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Its `/metrics` exposition.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits until its stream is up and it holds the directory.
    pub async fn wait_connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.link.is_connected() || self.link.directory().is_empty() {
            assert!(
                Instant::now() < deadline,
                "agent {} did not connect within 15 s",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the agent and waits for it; a second call does nothing.
    pub async fn shutdown(&mut self) {
        if self.stop.is_cancelled() && self.task.is_finished() {
            return;
        }
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

/// An agent configuration for `creds` on loopback with an ephemeral REST port, talking to the
/// server's gRPC port `server` and delivering to `endpoint`; other settings at their defaults.
pub fn base_agent_config(pki: &TestPki, creds: &AgentCredentials, server: SocketAddr, endpoint: &str) -> AgentConfig {
    let key = pki.write(&format!("{}-key.pem", creds.id), &creds.key_pem);
    let cert = pki.write(&format!("{}-cert.pem", creds.id), &creds.cert_pem);
    let mut cfg = AgentConfig::new(
        creds.id.clone(),
        key,
        cert,
        pki.ca_file.clone(),
        format!("https://localhost:{}", server.port()),
        endpoint.to_owned(),
    );
    cfg.bind_address = "127.0.0.1".into();
    cfg.port = 0;
    cfg
}

/// [`base_agent_config`] with test knobs: quick reconnects.
pub fn agent_config(pki: &TestPki, creds: &AgentCredentials, server: SocketAddr, endpoint: &str) -> AgentConfig {
    let mut cfg = base_agent_config(pki, creds, server, endpoint);
    cfg.reconnection_delay_ms = 100;
    cfg.reconnection_delay_max_ms = 500;
    cfg
}

/// Binds and runs an agent on the current runtime (connecting happens in the background: see
/// [`RunningAgent::wait_connected`]).
pub async fn start_agent(cfg: AgentConfig) -> RunningAgent {
    let id = cfg.agent_id.clone();
    let agent = dmr_agent::Agent::bind(cfg).await.expect("agent starts");
    let (http, link) = (agent.http_addr(), agent.link().clone());
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        agent.run(s).await.expect("agent runs");
    });
    RunningAgent {
        id,
        http,
        stop,
        task,
        link,
    }
}

impl Drop for RunningServer {
    /// A test that panics never reaches its own shutdown: stop here, so that the queue guard
    /// dropped after it deletes queues no running server can declare again.
    fn drop(&mut self) {
        stop_and_wait(&self.stop, &self.task);
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        stop_and_wait(&self.stop, &self.task);
    }
}

/// Cancels `stop` and waits (at most 15 s) until `task` has finished. `Drop` cannot await: on a
/// multi-thread runtime the other workers drive the task to its end while this thread waits; a
/// current-thread runtime cannot run it while we block, so it is aborted (it never runs again).
fn stop_and_wait(stop: &CancellationToken, task: &tokio::task::JoinHandle<()>) {
    stop.cancel();
    if task.is_finished() {
        return;
    }
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !task.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }),
        _ => task.abort(),
    }
}
