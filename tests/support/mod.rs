//! Shared harness for the end-to-end tests: a real server and real agents in-process on ephemeral
//! ports, real mutual TLS with certificates from the project's own PKI, a real RabbitMQ (never a
//! mock), and an HTTP sink standing in for the internal services.
//!
//! Every relay uses fresh agent ids and its own validation-failures queue, and deletes the queues it
//! created when dropped, so tests can run in parallel against the shared broker.

#![allow(dead_code, clippy::unwrap_used)]

pub mod node;
pub mod processes;

use dmr_agent::config::AgentConfig;
use dmr_pki::{AgentCredentials, DevCa};
use dmr_server::config::{RabbitConfig, ServerConfig};
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Installs the crypto provider once per test binary.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        if std::env::var("TEST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(std::env::var("TEST_LOG").unwrap_or_default())
                .try_init();
        }
    });
}

/// RabbitMQ settings from `RABBITMQ_DEFAULT_*` (default 127.0.0.1:5672 guest/guest).
pub fn rabbit_config() -> RabbitConfig {
    let mut cfg = RabbitConfig::default();
    if let Ok(h) = std::env::var("RABBITMQ_DEFAULT_HOST") {
        cfg.host = h;
    }
    if let Some(p) = std::env::var("RABBITMQ_DEFAULT_PORT").ok().and_then(|p| p.parse().ok()) {
        cfg.port = p;
    }
    cfg
}

/// A direct AMQP connection for inspecting queues. Panics with a clear message if no broker.
pub struct BrokerProbe {
    conn: lapin::Connection,
}

impl BrokerProbe {
    pub async fn connect() -> Self {
        let cfg = rabbit_config();
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            lapin::Connection::connect(&cfg.uri(), lapin::ConnectionProperties::default()),
        )
        .await
        .unwrap_or_else(|_| panic!("RabbitMQ at {} did not answer within 10 s: these tests need a real broker (see README: the test command starts one)", cfg.display_addr()))
        .unwrap_or_else(|e| panic!("RabbitMQ at {} is not reachable ({e}): these tests need a real broker (see README: the test command starts one)", cfg.display_addr()));
        Self { conn }
    }

    /// Messages ready in `queue` (None if it does not exist).
    pub async fn queue_len(&self, queue: &str) -> Option<u32> {
        self.queue_counts(queue).await.map(|(messages, _)| messages)
    }

    /// Consumers on `queue` (None if it does not exist).
    pub async fn consumer_count(&self, queue: &str) -> Option<u32> {
        self.queue_counts(queue).await.map(|(_, consumers)| consumers)
    }

    async fn queue_counts(&self, queue: &str) -> Option<(u32, u32)> {
        let ch = self.conn.create_channel().await.ok()?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .ok()?;
        let _ = ch.close(200, "probe".into()).await;
        Some((q.message_count(), q.consumer_count()))
    }

    /// Waits until `queue` holds `n` ready messages.
    pub async fn wait_queue_len(&self, queue: &str, n: u32, timeout: Duration) -> Option<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let len = self.queue_len(queue).await;
            if len == Some(n) || Instant::now() > deadline {
                return len;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes every message from `queue` (acking them) and returns their JSON bodies.
    pub async fn drain(&self, queue: &str) -> Vec<Value> {
        let ch = self.conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Ok(Some(msg)) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await {
            out.push(serde_json::from_slice(&msg.delivery.data).unwrap_or(Value::Null));
        }
        let _ = ch.close(200, "probe".into()).await;
        out
    }

    /// Consumes `queue` without acking, as another server instance would; closing the channel lets go.
    pub async fn hold_consumer(&self, queue: &str) -> (lapin::Channel, lapin::Consumer) {
        let ch = self.conn.create_channel().await.expect("channel");
        let consumer = ch
            .basic_consume(
                queue.into(),
                "probe-old-instance".into(),
                lapin::options::BasicConsumeOptions::default(),
                Default::default(),
            )
            .await
            .expect("consume");
        (ch, consumer)
    }

    /// Deletes queues (missing ones are fine).
    pub async fn delete(&self, queues: &[String]) {
        for q in queues {
            if let Ok(ch) = self.conn.create_channel().await {
                let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
                let _ = ch.close(200, "cleanup".into()).await;
            }
        }
    }
}

/// An HTTP endpoint standing in for an organisation's internal services.
#[derive(Clone)]
pub struct Sink {
    pub url: String,
    pub received: Arc<Mutex<Vec<Value>>>,
    pub status: Arc<AtomicU16>,
    pub hits: Arc<AtomicU16>,
    /// Every answer waits this long first (a slow endpoint).
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Sink {
    pub async fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let hits = Arc::new(AtomicU16::new(0));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (r, s, h, d) = (received.clone(), status.clone(), hits.clone(), delay_ms.clone());
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (r, s, h, d) = (r.clone(), s.clone(), h.clone(), d.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let delay = d.load(Ordering::SeqCst);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    let code = s.load(Ordering::SeqCst);
                    if code < 300 {
                        r.lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                    }
                    axum::http::StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            received,
            status,
            hits,
            delay_ms,
        }
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    pub fn messages(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages arrived; returns them.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.messages();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// PKI material for one test, in a temp dir.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub ca_file: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca_file = write("ca.pem", ca.cert_pem());
        let server_cert = write("server.pem", &server.cert_pem);
        let server_key = write("server-key.pem", &server.key_pem);
        Self {
            dir,
            ca,
            ca_file,
            server_cert,
            server_key,
        }
    }

    pub fn agent(&self, name: &str) -> AgentCredentials {
        AgentCredentials::generate(&self.ca, &uuid::Uuid::new_v4().to_string(), name).unwrap()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn write_centops(&self, agents: &[&AgentCredentials]) -> PathBuf {
        self.write("centops.json", &dmr_pki::centops_json(agents))
    }
}

/// A running server.
pub struct RunningServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub core: Arc<dmr_server::Core>,
}

/// Test knobs for a server.
pub fn server_config(pki: &TestPki, centops: &std::path::Path, vf_queue: &str) -> ServerConfig {
    let mut cfg = ServerConfig::new(
        pki.server_cert.clone(),
        pki.server_key.clone(),
        pki.ca_file.clone(),
        centops.display().to_string(),
    );
    cfg.bind_address = "127.0.0.1".into();
    cfg.port = 0;
    cfg.grpc_port = 0;
    cfg.rabbitmq = rabbit_config();
    cfg.rabbitmq.validation_failures_queue = vf_queue.to_owned();
    cfg.rabbitmq.reconnect_interval_ms = 500;
    cfg.message_delivery_timeout_ms = 2000;
    cfg.message_delivery_retry_delay_ms = 50;
    cfg
}

pub async fn start_server(cfg: ServerConfig) -> RunningServer {
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
            "server did not connect to RabbitMQ within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    RunningServer {
        grpc,
        http,
        stop,
        task,
        core,
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

    pub async fn shutdown(&mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

pub fn agent_config(pki: &TestPki, creds: &AgentCredentials, server: SocketAddr, endpoint: &str) -> AgentConfig {
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
    cfg.reconnection_delay_ms = 100;
    cfg.reconnection_delay_max_ms = 500;
    cfg
}

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

/// A complete relay: one server, agents A and B each with their own sink.
pub struct Relay {
    pub pki: TestPki,
    pub a: AgentCredentials,
    pub b: AgentCredentials,
    pub server: RunningServer,
    pub agent_a: RunningAgent,
    pub agent_b: RunningAgent,
    pub sink_a: Sink,
    pub sink_b: Sink,
    pub vf_queue: String,
    pub probe: BrokerProbe,
    pub http: reqwest::Client,
    pub extra_queues: Vec<String>,
}

impl Relay {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::start_full(0, tune).await.0
    }

    /// A relay whose directory also lists `extra` agents that are not started (e.g. legacy agents).
    pub async fn start_full(extra: usize, tune: impl FnOnce(&mut ServerConfig)) -> (Self, Vec<AgentCredentials>) {
        Self::start_inner(extra, None, tune).await
    }

    /// Like [`Relay::start_full`], with the directory served by `centops` (polled every second).
    pub async fn start_with_centops(extra: usize, centops: &CentOpsStub) -> (Self, Vec<AgentCredentials>) {
        Self::start_inner(extra, Some(centops), |_| {}).await
    }

    async fn start_inner(
        extra: usize,
        stub: Option<&CentOpsStub>,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> (Self, Vec<AgentCredentials>) {
        init();
        let probe = BrokerProbe::connect().await;
        let pki = TestPki::new();
        let a = pki.agent("Agent A");
        let b = pki.agent("Agent B");
        let extras: Vec<AgentCredentials> = (0..extra).map(|i| pki.agent(&format!("extra {i}"))).collect();
        let mut listed = vec![&a, &b];
        listed.extend(extras.iter());
        let centops = pki.write_centops(&listed);
        let vf_queue = format!("validation-failures-test-{}", uuid::Uuid::new_v4());
        let mut cfg = server_config(&pki, &centops, &vf_queue);
        if let Some(stub) = stub {
            stub.serve(200, &std::fs::read_to_string(&centops).unwrap());
            cfg.centops_configuration_url = stub.url.clone();
            cfg.centops_configuration_cron_time = "* * * * * *".into();
            cfg.centops_request_timeout_ms = 500;
        }
        tune(&mut cfg);
        let server = start_server(cfg).await;
        let (sink_a, sink_b) = (Sink::start().await, Sink::start().await);
        let agent_a = start_agent(agent_config(&pki, &a, server.grpc, &sink_a.url)).await;
        let agent_b = start_agent(agent_config(&pki, &b, server.grpc, &sink_b.url)).await;
        agent_a.wait_connected().await;
        agent_b.wait_connected().await;
        let relay = Self {
            pki,
            a,
            b,
            server,
            agent_a,
            agent_b,
            sink_a,
            sink_b,
            vf_queue,
            probe,
            http: reqwest::Client::new(),
            extra_queues: extras
                .iter()
                .flat_map(|c| [c.id.clone(), format!("{}.dlq", c.id)])
                .collect(),
        };
        (relay, extras)
    }

    /// POSTs a v1 message body to agent B's REST API.
    pub async fn post_to_b(&self, body: &Value) -> (u16, Value) {
        post(&self.http, &self.agent_b.url("/v1/messages"), body).await
    }

    /// Queues this relay created.
    pub fn queues(&self) -> Vec<String> {
        let mut q = vec![self.vf_queue.clone()];
        q.extend(self.extra_queues.iter().cloned());
        for id in [&self.a.id, &self.b.id] {
            q.push(id.clone());
            q.push(format!("{id}.dlq"));
        }
        q
    }

    /// Stops everything and deletes the queues, those of `others` (agents a test added) too: only
    /// once the server is stopped, or it could declare them again.
    pub async fn finish_with(mut self, others: &[&AgentCredentials]) {
        for c in others {
            self.extra_queues.push(c.id.clone());
            self.extra_queues.push(format!("{}.dlq", c.id));
        }
        self.finish().await;
    }

    /// Stops everything and deletes the queues.
    pub async fn finish(mut self) {
        self.agent_a.shutdown().await;
        self.agent_b.shutdown().await;
        self.server.stop.cancel();
        let _ = (&mut self.server.task).await;
        self.probe.delete(&self.queues()).await;
    }
}

pub async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = http.post(url).json(body).send().await.expect("POST");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The original README's example body, addressed to `recipient`, with a fresh message id.
pub fn seed_message(recipient: &str) -> Value {
    serde_json::json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "recipientId": recipient,
        "timestamp": "2024-01-15T10:30:00.000Z",
        "type": "ChatMessage",
        "payload": {
            "chat": {"id": "f47ac10b-58cc-4372-a567-0e02b2c3d479", "created": "2024-01-15T10:00:00.000Z"},
            "messages": [{
                "id": "550e8400-e29b-41d4-a716-446655440000",
                "chatId": "f47ac10b-58cc-4372-a567-0e02b2c3d479",
                "content": "example string 2",
                "authorTimestamp": "2024-01-15T10:30:00.000Z",
                "authorRole": "end-user"
            }]
        }
    })
}

/// An original-style legacy agent (Node, real `socket.io-client@4` and `jose`), see
/// `tests/node/legacy-agent.mjs`. Killed when dropped.
pub struct LegacyAgent {
    pub id: String,
    pub port: u16,
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
    pub events: Vec<Value>,
}

impl LegacyAgent {
    pub async fn spawn(
        server_http: SocketAddr,
        creds: &AgentCredentials,
        endpoint: &str,
        knobs: &[(&str, &str)],
    ) -> Self {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
        assert!(
            dir.join("node_modules/socket.io-client").exists(),
            "tests/node/node_modules is missing: run `npm install --prefix tests/node` (the test command in the README does this)"
        );
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(dir.join("legacy-agent.mjs"))
            .env("DMR_SERVER_WEBSOCKET_URL", format!("http://{server_http}"))
            .env("AGENT_ID", &creds.id)
            .env("AGENT_PRIVATE_KEY", &creds.key_pem)
            .env("OUTGOING_MESSAGE_ENDPOINT", endpoint)
            .env("PORT", "0")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in knobs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("node runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt as _;
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let mut agent = Self {
            id: creds.id.clone(),
            port: 0,
            child,
            lines,
            events: Vec::new(),
        };
        let listening = agent
            .wait_event("listening", Duration::from_secs(20))
            .await
            .expect("legacy agent starts");
        agent.port = listening["port"].as_u64().unwrap() as u16;
        agent
    }

    /// The next event named `name` (not seen before), waiting up to `timeout`.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Option<Value> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Some(self.events.remove(i));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(e)) if e["event"] == name => return Some(e),
                Ok(Some(e)) => self.events.push(e),
                _ => return None,
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// An HTTP stand-in for CentOps whose answer (status, body, delay) the test changes over time.
#[derive(Clone)]
pub struct CentOpsStub {
    pub url: String,
    answer: Arc<Mutex<(u16, String, Duration)>>,
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl CentOpsStub {
    pub async fn start() -> Self {
        let answer = Arc::new(Mutex::new((200u16, String::from("{\"response\":[]}"), Duration::ZERO)));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (a, r) = (answer.clone(), requests.clone());
        let app = axum::Router::new().route(
            "/centops",
            axum::routing::get(move || {
                let (a, r) = (a.clone(), r.clone());
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let (status, body, delay) = a.lock().unwrap().clone();
                    tokio::time::sleep(delay).await;
                    (axum::http::StatusCode::from_u16(status).unwrap(), body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/centops", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, answer, requests }
    }

    pub fn serve(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.to_owned(), Duration::ZERO);
    }

    pub fn serve_slowly(&self, delay: Duration) {
        self.answer.lock().unwrap().2 = delay;
    }

    pub fn serve_agents(&self, agents: &[&AgentCredentials]) {
        self.serve(200, &dmr_pki::centops_json(agents));
    }

    /// Waits until the server asked `n` more times.
    pub async fn wait_polls(&self, n: usize) {
        let start = self.requests.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.requests.load(Ordering::SeqCst) < start + n {
            assert!(Instant::now() < deadline, "CentOps was not polled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
