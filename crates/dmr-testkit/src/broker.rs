//! The broker from a test's point of view: which engine the suite runs on ([`test_engine`]), the
//! shared RabbitMQ's settings, a probe for inspecting queues on either engine, and deleting the
//! queues a test created on RabbitMQ — also when the test panics ([`QueueGuard`]).

use crate::KitError;
use dmr_server::broker::Broker;
use dmr_server::config::{BrokerEngine, RabbitConfig};
use futures::StreamExt as _;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The engine the end-to-end tests run the server on: `DMR_TEST_BROKER` (`rabbitmq`, the default,
/// or `embedded`; anything else is a mistake and panics). The test command runs the suites once
/// on each.
pub fn test_engine() -> BrokerEngine {
    match std::env::var("DMR_TEST_BROKER").as_deref() {
        Err(_) | Ok("" | "rabbitmq") => BrokerEngine::Rabbitmq,
        Ok("embedded") => BrokerEngine::Embedded,
        Ok(other) => panic!("DMR_TEST_BROKER={other:?}: expected rabbitmq or embedded"),
    }
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

/// The queues the server declares for agent `id`: `<id>`, `<id>.dlq`, and the legacy edge's
/// `dmr.legacy-token.<id>` (declared only if the agent connected over Socket.IO).
pub fn agent_queues(id: &str) -> [String; 3] {
    [id.to_owned(), format!("{id}.dlq"), format!("dmr.legacy-token.{id}")]
}

/// Deletes `names` on the broker at `uri`, 32 at a time (missing queues are fine); returns how
/// many were deleted.
pub async fn delete_queues(uri: &str, names: Vec<String>) -> Result<usize, KitError> {
    let conn = lapin::Connection::connect(uri, lapin::ConnectionProperties::default()).await?;
    let deleted = futures::stream::iter(names)
        .map(|name| {
            let conn = &conn;
            async move {
                let Ok(ch) = conn.create_channel().await else {
                    return false;
                };
                let ok = ch
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
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
    let _ = conn.close(200, "test cleanup".into()).await;
    Ok(deleted)
}

/// [`delete_queues`] from synchronous code (a `Drop`): runs on a thread of its own with its own
/// small runtime, so it works inside a runtime (even one that is unwinding a panic) and outside.
pub fn delete_queues_blocking(uri: &str, names: Vec<String>) -> Result<usize, KitError> {
    let uri = uri.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            match tokio::time::timeout(Duration::from_secs(20), delete_queues(&uri, names)).await {
                Ok(result) => result,
                Err(_) => Err(KitError::Timeout("RabbitMQ (deleting test queues)")),
            }
        })
    })
    .join()
    .map_err(|_| KitError::WorkerPanicked)?
}

/// Queues a test created on the shared broker, deleted when the guard is dropped — at the end of
/// the test or while it unwinds a panic — unless [`QueueGuard::delete_now`] already did.
///
/// Whoever owns the guard must have stopped its servers before it drops: a running server could
/// declare an agent's queues again (see [`crate::Relay`], whose `Drop` stops them first).
pub struct QueueGuard {
    uri: String,
    queues: Mutex<Vec<String>>,
}

impl QueueGuard {
    /// A guard for queues on RabbitMQ at `rabbit`; with the embedded engine ([`test_engine`]) the
    /// queues live in the server's temporary data directory and it has nothing to delete.
    pub fn new(rabbit: &RabbitConfig) -> Self {
        Self {
            uri: match test_engine() {
                BrokerEngine::Rabbitmq => rabbit.uri(),
                BrokerEngine::Embedded => String::new(),
            },
            queues: Mutex::new(Vec::new()),
        }
    }

    /// Also deletes `queue`.
    pub fn track(&self, queue: impl Into<String>) {
        self.lock().push(queue.into());
    }

    /// Also deletes agent `id`'s queues (`<id>`, `<id>.dlq`).
    pub fn track_agent(&self, id: &str) {
        self.lock().extend(agent_queues(id));
    }

    /// The queues still to delete.
    pub fn queues(&self) -> Vec<String> {
        self.lock().clone()
    }

    /// Deletes them now (from async code); the guard then has nothing left to do.
    pub async fn delete_now(&self) {
        let names = std::mem::take(&mut *self.lock());
        if !names.is_empty()
            && !self.uri.is_empty()
            && let Err(e) = delete_queues(&self.uri, names).await
        {
            eprintln!("test queues not deleted: {e}");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A panic while the lock was held must not stop the clean-up.
        self.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.lock());
        if !names.is_empty()
            && !self.uri.is_empty()
            && let Err(e) = delete_queues_blocking(&self.uri, names)
        {
            eprintln!("test queues not deleted: {e}");
        }
    }
}

/// Inspects queues: over a direct AMQP connection (RabbitMQ), or through the in-process server's
/// own broker handle (the embedded engine, whose store only the server may open). Panics with a
/// clear message if RabbitMQ is needed and not there.
pub struct BrokerProbe {
    inner: Probe,
}

enum Probe {
    Amqp(Box<lapin::Connection>),
    Embedded(Box<EmbeddedProbe>),
}

/// The embedded engine: the server's own broker while it runs; once it stopped, the store opened
/// again from its data directory (the lock is free then).
struct EmbeddedProbe {
    live: Arc<Broker>,
    dir: std::path::PathBuf,
    queues: RabbitConfig,
    reopened: tokio::sync::Mutex<Option<Arc<Broker>>>,
}

impl EmbeddedProbe {
    async fn broker(&self) -> Arc<Broker> {
        if self.live.is_ready() {
            return self.live.clone();
        }
        let mut reopened = self.reopened.lock().await;
        if let Some(b) = reopened.as_ref() {
            return b.clone();
        }
        let cfg = dmr_server::config::BrokerConfig {
            engine: BrokerEngine::Embedded,
            embedded_data_dir: self.dir.clone(),
        };
        let metrics = Arc::new(dmr_server::metrics::Metrics::new());
        match Broker::new(&cfg, self.queues.clone(), metrics) {
            Ok(b) => {
                *reopened = Some(b.clone());
                b
            }
            // Still held (stopping): ask the live one.
            Err(_) => self.live.clone(),
        }
    }
}

impl BrokerProbe {
    /// A probe on the shared RabbitMQ.
    pub async fn connect() -> Self {
        Self::connect_to(&rabbit_config()).await
    }

    pub async fn connect_to(cfg: &RabbitConfig) -> Self {
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            lapin::Connection::connect(&cfg.uri(), lapin::ConnectionProperties::default()),
        )
        .await
        .unwrap_or_else(|_| panic!("RabbitMQ at {} did not answer within 10 s: these tests need a real broker (see README: the test command starts one)", cfg.display_addr()))
        .unwrap_or_else(|e| panic!("RabbitMQ at {} is not reachable ({e}): these tests need a real broker (see README: the test command starts one)", cfg.display_addr()));
        Self {
            inner: Probe::Amqp(Box::new(conn)),
        }
    }

    /// A probe on the broker `server` uses, whichever the engine.
    pub async fn for_server(server: &crate::RunningServer) -> Self {
        match server.core.broker.engine() {
            BrokerEngine::Rabbitmq => Self::connect_to(server.core.broker.config()).await,
            BrokerEngine::Embedded => Self {
                inner: Probe::Embedded(Box::new(EmbeddedProbe {
                    live: server.core.broker.clone(),
                    dir: server.core.cfg.broker.embedded_data_dir.clone(),
                    queues: server.core.broker.config().clone(),
                    reopened: tokio::sync::Mutex::new(None),
                })),
            },
        }
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
        let conn = match &self.inner {
            Probe::Amqp(conn) => conn,
            Probe::Embedded(probe) => {
                let c = probe.broker().await.counts(queue).await.ok()?;
                return Some((c.messages, c.consumers));
            }
        };
        let ch = conn.create_channel().await.ok()?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = ch.queue_declare(queue.into(), passive, Default::default()).await.ok()?;
        let _ = ch.close(200, "probe".into()).await;
        Some((q.message_count(), q.consumer_count()))
    }

    /// Waits until `queue` holds `n` ready messages; returns the last length seen.
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

    /// Waits until `queue` holds at least `n` ready messages; false if it did not within `timeout`.
    pub async fn wait_queue_len_at_least(&self, queue: &str, n: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.queue_len(queue).await.is_some_and(|len| len >= n) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes every message from `queue` (acking them) and returns their JSON bodies.
    pub async fn drain(&self, queue: &str) -> Vec<Value> {
        let json = |body: &[u8]| serde_json::from_slice(body).unwrap_or(Value::Null);
        let mut out = Vec::new();
        match &self.inner {
            Probe::Amqp(conn) => {
                let ch = conn.create_channel().await.expect("channel");
                while let Ok(Some(msg)) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await {
                    out.push(json(&msg.delivery.data));
                }
                let _ = ch.close(200, "probe".into()).await;
            }
            Probe::Embedded(probe) => {
                let broker = probe.broker().await;
                let Ok(mut consumer) = broker.consume(queue, "probe").await else {
                    return out;
                };
                while broker.counts(queue).await.is_ok_and(|c| c.messages > 0) {
                    let Ok(Some(Ok(taken))) = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await
                    else {
                        break;
                    };
                    out.push(json(&taken.body));
                    taken.ack().await.expect("ack");
                }
                consumer.close().await;
            }
        }
        out
    }

    /// Consumes `queue` without acking, as another server instance would (RabbitMQ only: the
    /// embedded engine has no other instances); closing the channel lets go.
    pub async fn hold_consumer(&self, queue: &str) -> (lapin::Channel, lapin::Consumer) {
        let Probe::Amqp(conn) = &self.inner else {
            panic!("hold_consumer stands for another server instance: RabbitMQ only");
        };
        let ch = conn.create_channel().await.expect("channel");
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

    /// Deletes queues (missing ones are fine; RabbitMQ only).
    pub async fn delete(&self, queues: &[String]) {
        let Probe::Amqp(conn) = &self.inner else {
            panic!("deleting a queue by hand stands for an operator's RabbitMQ action: RabbitMQ only");
        };
        for q in queues {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
                let _ = ch.close(200, "cleanup".into()).await;
            }
        }
    }
}
