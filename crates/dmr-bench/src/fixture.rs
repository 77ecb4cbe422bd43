//! What every scenario stands on: a throw-away PKI, agent keys cached between runs, an in-process
//! server on its own runtime (threads named `srv`, so its CPU time can be told apart), raw mTLS
//! gRPC sessions, and deleting the queues a scenario created.

use anyhow::Context as _;
use dmr::keys::PrivateKey;
use dmr::proto::agent_gateway_client::AgentGatewayClient;
use dmr::proto::session_response::Frame as InFrame;
use dmr::proto::{SessionRequest, SessionResponse};
use dmr_pki::{AgentCredentials, DevCa};
use futures::StreamExt as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A CA, a server certificate and the files the server reads, in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub ca_file: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = DevCa::generate("dmr-bench CA")?;
        let server = ca.issue_server(&["localhost", "127.0.0.1"])?;
        let ca_file = dir.path().join("ca.pem");
        let server_cert = dir.path().join("server.pem");
        let server_key = dir.path().join("server-key.pem");
        std::fs::write(&ca_file, ca.cert_pem())?;
        std::fs::write(&server_cert, &server.cert_pem)?;
        std::fs::write(&server_key, &server.key_pem)?;
        Ok(Self {
            dir,
            ca,
            ca_file,
            server_cert,
            server_key,
        })
    }

    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    }

    /// `n` agents with fresh ids (so every run has its own queues) and keys from `cache`.
    pub fn agents(&self, n: usize, cache: &Path) -> anyhow::Result<Vec<AgentCredentials>> {
        let keys = cached_keys(n, cache)?;
        let run = uuid::Uuid::new_v4().simple().to_string();
        parallel_map(&keys, |i, key| {
            let id = uuid::Uuid::new_v4().to_string();
            AgentCredentials::for_key(&self.ca, &id, &format!("bench {} #{i}", &run[..8]), key)
                .map_err(anyhow::Error::from)
        })
    }

    /// The CentOps file listing `agents`.
    pub fn centops(&self, agents: &[AgentCredentials]) -> anyhow::Result<PathBuf> {
        self.write(
            "centops.json",
            &dmr_pki::centops_json(&agents.iter().collect::<Vec<_>>()),
        )
    }
}

/// Runs `f` over `items` on every core, keeping the order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(usize, &T) -> anyhow::Result<R> + Sync,
) -> anyhow::Result<Vec<R>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = items.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                let f = &f;
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(i, item)| f(c * chunk + i, item))
                        .collect::<anyhow::Result<Vec<R>>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            out.extend(h.join().map_err(|_| anyhow::anyhow!("worker thread panicked"))??);
        }
        Ok(out)
    })
}

/// `n` RSA-2048 keys: `cache/key-<i>.pem` where present (PKCS#8), generated (about 50 ms each, on
/// every core) and saved where not. Each agent id needs its own key: the server checks that the
/// certificate's key is the directory's key for that id.
pub fn cached_keys(n: usize, cache: &Path) -> anyhow::Result<Vec<PrivateKey>> {
    std::fs::create_dir_all(cache).with_context(|| format!("key cache {}", cache.display()))?;
    let slots: Vec<usize> = (0..n).collect();
    let missing = slots
        .iter()
        .filter(|i| !cache.join(format!("key-{i}.pem")).exists())
        .count();
    if missing > 0 {
        eprintln!(
            "generating {missing} RSA keys into {} (once; about {} s)",
            cache.display(),
            missing / 40 + 1
        );
    }
    parallel_map(&slots, |_, i| {
        let file = cache.join(format!("key-{i}.pem"));
        if let Ok(pem) = std::fs::read_to_string(&file)
            && let Ok(key) = PrivateKey::from_pem(&pem)
        {
            return Ok(key);
        }
        let key = PrivateKey::generate()?;
        let tmp = cache.join(format!("key-{i}.pem.{}", std::process::id()));
        std::fs::write(&tmp, key.to_pkcs8_pem()?)?;
        std::fs::rename(&tmp, &file)?;
        Ok(key)
    })
}

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

/// The server configuration for a scenario: loopback, ephemeral ports, its own
/// validation-failures queue.
pub fn server_config(
    pki: &Pki,
    centops: &Path,
    rabbit: &dmr_server::config::RabbitConfig,
) -> dmr_server::config::ServerConfig {
    let mut cfg = dmr_server::config::ServerConfig::new(
        pki.server_cert.clone(),
        pki.server_key.clone(),
        pki.ca_file.clone(),
        centops.display().to_string(),
    );
    cfg.bind_address = "127.0.0.1".into();
    cfg.port = 0;
    cfg.grpc_port = 0;
    cfg.rabbitmq = rabbit.clone();
    cfg.rabbitmq.validation_failures_queue = format!("validation-failures-bench-{}", uuid::Uuid::new_v4());
    cfg
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
    pub async fn start(cfg: dmr_server::config::ServerConfig) -> anyhow::Result<Self> {
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
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        });
        let (grpc, core) = rx.await?.map_err(|e| anyhow::anyhow!("server: {e}"))?;
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

    /// Shuts the server down and drops its runtime.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        self.rt.shutdown_background();
    }
}

/// One agent's raw session: frames out, frames in (after the directory).
pub struct RawSession {
    pub tx: mpsc::Sender<SessionRequest>,
    pub inbound: tonic::Streaming<SessionResponse>,
    /// The connection (dropping the session closes it).
    pub channel: tonic::transport::Channel,
}

/// Opens agent `creds`'s session on `server` (its own TCP + TLS connection) and reads the
/// directory the server sends first.
pub async fn open_session(ca_pem: &str, creds: &AgentCredentials, server: SocketAddr) -> anyhow::Result<RawSession> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(&creds.cert_pem, &creds.key_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", server.port()))?
        .tls_config(tls)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(20))
        .connect()
        .await?;
    let mut client = AgentGatewayClient::new(channel.clone()).max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(1024);
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The directory comes first, in one or more frames.
    loop {
        match inbound.message().await? {
            Some(SessionResponse {
                frame: Some(InFrame::Directory(d)),
            }) if d.more => {}
            Some(SessionResponse {
                frame: Some(InFrame::Directory(_)),
            }) => return Ok(RawSession { tx, inbound, channel }),
            other => anyhow::bail!("expected the directory first, got {other:?}"),
        }
    }
}

/// Deletes the queues of `agents` (`<id>` and `<id>.dlq`) and `extra` queues, a few at a time.
pub async fn delete_queues(uri: &str, agents: &[AgentCredentials], extra: &[String]) -> anyhow::Result<usize> {
    let conn = lapin::Connection::connect(uri, lapin::ConnectionProperties::default()).await?;
    let names: Vec<String> = agents
        .iter()
        .flat_map(|a| [a.id.clone(), format!("{}.dlq", a.id)])
        .chain(extra.iter().cloned())
        .collect();
    let deleted = futures::stream::iter(names)
        .map(|name| {
            let conn = &conn;
            async move {
                let Ok(ch) = conn.create_channel().await else {
                    return false;
                };
                let ok = ch
                    .queue_delete(name.as_str().into(), lapin::options::QueueDeleteOptions::default())
                    .await
                    .is_ok();
                let _ = ch.close(200, "deleted".into()).await;
                ok
            }
        })
        .buffer_unordered(32)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    let _ = conn.close(200, "bench cleanup".into()).await;
    Ok(deleted)
}

/// The `/v1/messages` body the end-to-end scenario posts; `content` carries the send time.
pub fn v1_message(recipient: &str, content: &str) -> serde_json::Value {
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
                "content": content,
                "authorTimestamp": "2024-01-15T10:30:00.000Z",
                "authorRole": "end-user"
            }]
        }
    })
}
