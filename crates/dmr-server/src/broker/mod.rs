//! The RabbitMQ side: one connection for publishing and declarations, a pool of connections for
//! per-agent consumers, topology declaration, confirmed publishing, and a supervisor that
//! reconnects every `RABBITMQ_DEFAULT_DEFAULT_RECONNECT_INTERVAL`.
//!
//! **Invariants:**
//! - [`Broker::publish`] returns `Ok` only when RabbitMQ confirmed the message (ack, and not
//!   returned as unroutable): "accepted" means durably queued.
//! - Declarations use a throw-away channel, so a `PRECONDITION_FAILED` on one queue cannot poison
//!   the publishing channel.
//! - While disconnected, every operation fails fast with [`BrokerError::Unavailable`]; nothing is
//!   buffered in memory.
//! - Each consumer has a channel of its own (closing it returns its unacknowledged deliveries), and
//!   a connection carries at most `RABBITMQ_CONSUMERS_PER_CONNECTION` (1,000) of them: RabbitMQ caps
//!   channels per connection (`channel_max`, 2,047 by default), and one instance serves thousands of
//!   agents.

use crate::config::RabbitConfig;
use crate::metrics::Metrics;
use futures::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, RwLock, watch};
use tokio_util::sync::CancellationToken;

/// What went wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Not connected right now; retry later.
    #[error("RabbitMQ at {0} is unavailable")]
    Unavailable(String),
    /// The broker refused or failed the operation.
    #[error("RabbitMQ {operation} on queue {queue:?} failed: {source}")]
    Amqp {
        /// What we were doing.
        operation: &'static str,
        /// The queue involved.
        queue: String,
        /// The client's error.
        source: lapin::Error,
    },
    /// The broker negatively acknowledged or returned the message.
    #[error("RabbitMQ did not accept the message for queue {queue:?}: {reason}")]
    NotAccepted {
        /// The queue.
        queue: String,
        /// Nack or unroutable.
        reason: &'static str,
    },
}

/// A live connection with its publishing channel, and the consumer connections opened since.
struct Link {
    conn: Connection,
    publish: Channel,
    /// `None` once the link is closed: no consumer connection may be added after that.
    consumers: Mutex<Option<Vec<ConsumerConnection>>>,
}

/// A connection that carries consumers, with how many it carries now.
struct ConsumerConnection {
    conn: Arc<Connection>,
    active: Arc<AtomicUsize>,
}

impl Link {
    /// A connection with room for one more consumer (opening one if none has), and its slot.
    async fn consumer_connection(&self, cfg: &RabbitConfig) -> Result<(Arc<Connection>, ConsumerSlot), lapin::Error> {
        let mut guard = self.consumers.lock().await;
        let Some(pool) = guard.as_mut() else {
            return Err(lapin::ErrorKind::IOError(Arc::new(std::io::ErrorKind::NotConnected.into())).into());
        };
        pool.retain(|c| c.conn.status().connected());
        let found = pool
            .iter()
            .find(|c| c.active.load(Ordering::Relaxed) < usize::from(cfg.consumers_per_connection));
        let (conn, active) = match found {
            Some(c) => (c.conn.clone(), c.active.clone()),
            None => {
                let name = format!("dmr-server consumers {}", pool.len() + 1);
                let properties = ConnectionProperties::default().with_connection_name(name.into());
                let conn = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&cfg.uri(), properties))
                    .await
                    .map_err(|_| lapin::ErrorKind::IOError(Arc::new(std::io::ErrorKind::TimedOut.into())))??;
                let conn = Arc::new(conn);
                let active = Arc::new(AtomicUsize::new(0));
                pool.push(ConsumerConnection {
                    conn: conn.clone(),
                    active: active.clone(),
                });
                (conn, active)
            }
        };
        active.fetch_add(1, Ordering::Relaxed);
        Ok((conn, ConsumerSlot(active)))
    }

    async fn close(&self, reason: &str) {
        let _ = self.conn.close(200, reason.into()).await;
        let pool = self.consumers.lock().await.take();
        for c in pool.into_iter().flatten() {
            let _ = c.conn.close(200, reason.into()).await;
        }
    }
}

/// A consumer's place on a consumer connection; freed when dropped.
struct ConsumerSlot(Arc<AtomicUsize>);

impl Drop for ConsumerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Consumers of `queue` now, by a passive declare on `channel` (which RabbitMQ closes if the queue
/// does not exist).
pub async fn consumers_on(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    Ok(q.consumer_count())
}

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing our connections may take (a dead one never answers).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Returns the agent ids whose queues must exist (called on every (re)connect).
pub type TopologySource = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Called with an agent id and an [`Announcement`] made by another server instance.
pub type RemoteSessionHook = Arc<dyn Fn(&str, Announcement) + Send + Sync>;

/// What instances tell each other about an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// The agent opened a session on the announcing instance (older sessions elsewhere must close).
    Session,
    /// The agent's queue was missing and has been declared again (consumers must re-attach).
    QueueRecreated,
}

impl Announcement {
    fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::QueueRecreated => "queue-recreated",
        }
    }
}

/// Queue declarations run concurrently at start-up and after a reconnect.
const DECLARATIONS_IN_FLIGHT: usize = 32;

/// Fanout exchange on which instances announce new agent sessions, so that a newer connection of
/// an agent on one instance replaces an older one on another.
pub const SESSIONS_EXCHANGE: &str = "dmr.sessions";

/// Shared handle to RabbitMQ.
pub struct Broker {
    cfg: RabbitConfig,
    instance_id: String,
    link: RwLock<Option<Arc<Link>>>,
    ready: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

/// An open consumer on an agent queue, with the channel it lives on (closing the channel returns
/// unacknowledged deliveries to the queue).
pub struct AgentConsumer {
    /// The channel (ack/reject happen through deliveries' ackers).
    pub channel: Channel,
    /// The delivery stream.
    pub consumer: Consumer,
    /// Keeps the consumer counted on its connection.
    _slot: ConsumerSlot,
}

impl Broker {
    /// Creates the handle; call [`Broker::run`] to connect and keep connected.
    pub fn new(cfg: RabbitConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            instance_id: uuid::Uuid::new_v4().to_string(),
            link: RwLock::new(None),
            ready: watch::channel(false).0,
            metrics,
        })
    }

    /// Watches connection readiness.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// True while connected with topology declared.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.cfg
    }

    /// Connects, declares the topology, and reconnects after every loss until `stop`.
    pub async fn run(
        self: Arc<Self>,
        topology: TopologySource,
        remote_sessions: RemoteSessionHook,
        stop: CancellationToken,
    ) {
        let interval = Duration::from_millis(self.cfg.reconnect_interval_ms);
        loop {
            match self.connect_once(&topology, &remote_sessions).await {
                Ok(conn_errors) => {
                    tracing::info!(broker = %self.cfg.display_addr(), "connected to RabbitMQ");
                    self.set_ready(true);
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = conn_errors => {}
                    }
                    tracing::error!(broker = %self.cfg.display_addr(), "lost the RabbitMQ connection; reconnecting");
                    self.set_ready(false);
                    // Consumers on the other connections end with it and attach again once
                    // reconnected. Closing a dead connection can wait for an answer that never
                    // comes: do it aside, bounded, and never while holding the lock.
                    let old = self.link.write().await.take();
                    if let Some(link) = old {
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close("connection lost")).await;
                        });
                    }
                }
                Err(e) => {
                    tracing::error!(broker = %self.cfg.display_addr(), error = %e, "cannot connect to RabbitMQ; retrying in {} ms", interval.as_millis());
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        self.set_ready(false);
        let last = self.link.write().await.take();
        if let Some(link) = last {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close("server shutting down")).await;
        }
    }

    fn set_ready(&self, ready: bool) {
        self.ready.send_replace(ready);
        self.metrics.rabbitmq_connected.set(i64::from(ready));
    }

    /// One connection attempt; returns a future that completes when the connection fails.
    async fn connect_once(
        &self,
        topology: &TopologySource,
        remote_sessions: &RemoteSessionHook,
    ) -> Result<futures::future::BoxFuture<'static, ()>, BrokerError> {
        let unavailable = |_| BrokerError::Unavailable(self.cfg.display_addr());
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(
                &self.cfg.uri(),
                ConnectionProperties::default().with_connection_name("dmr-server".into()),
            ),
        )
        .await
        .map_err(|_| BrokerError::Unavailable(self.cfg.display_addr()))?
        .map_err(unavailable)?;
        let publish = conn.create_channel().await.map_err(unavailable)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        let events: futures::stream::BoxStream<'static, lapin::Event> = Box::pin(conn.events_listener());
        let status_conn = conn.status().clone();
        *self.link.write().await = Some(Arc::new(Link {
            conn,
            publish,
            consumers: Mutex::new(Some(Vec::new())),
        }));
        self.declare_queue(
            &self.cfg.validation_failures_queue,
            self.plain_queue_args(self.cfg.validation_failures_ttl_ms),
        )
        .await?;
        // Quorum queue declarations take tens of milliseconds each; with thousands of agents a
        // sequential pass would keep the server not-ready for minutes, so declare a few at a time.
        futures::stream::iter(topology())
            .for_each_concurrent(DECLARATIONS_IN_FLIGHT, |id| async move {
                if let Err(e) = self.declare_agent(&id).await {
                    tracing::error!(agent_id = %id, error = %e, "cannot declare agent queues");
                }
            })
            .await;
        self.listen_for_sessions(remote_sessions.clone()).await?;
        Ok(Box::pin(async move {
            let mut events = events;
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    ev = events.next() => match ev {
                        Some(lapin::Event::Error(_)) | None => return,
                        Some(_) => {}
                    },
                    _ = tick.tick() => if !status_conn.connected() { return },
                }
            }
        }))
    }

    /// Binds a private queue to [`SESSIONS_EXCHANGE`] and calls `hook` for other instances' sessions.
    async fn listen_for_sessions(&self, hook: RemoteSessionHook) -> Result<(), BrokerError> {
        let link = self.link().await?;
        let amqp = |source| BrokerError::Amqp {
            operation: "session announcements",
            queue: SESSIONS_EXCHANGE.to_owned(),
            source,
        };
        let channel = link.conn.create_channel().await.map_err(amqp)?;
        channel
            .exchange_declare(
                SESSIONS_EXCHANGE.into(),
                lapin::ExchangeKind::Fanout,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        channel
            .queue_bind(
                queue.name().clone(),
                SESSIONS_EXCHANGE.into(),
                "".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        let me = self.instance_id.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Ok(note) = serde_json::from_slice::<serde_json::Value>(&delivery.data) else {
                    continue;
                };
                let (Some(agent), Some(instance)) = (note["agentId"].as_str(), note["instance"].as_str()) else {
                    continue;
                };
                let event = match note["event"].as_str() {
                    Some("queue-recreated") => Announcement::QueueRecreated,
                    _ => Announcement::Session,
                };
                if instance != me {
                    hook(agent, event);
                }
            }
            drop(channel);
        });
        Ok(())
    }

    /// Tells the other instances about `agent_id` (best effort).
    pub async fn announce(&self, agent_id: &str, event: Announcement) {
        let Ok(link) = self.link().await else { return };
        let note = serde_json::json!({"agentId": agent_id, "instance": self.instance_id, "event": event.as_str()});
        let _ = link
            .publish
            .basic_publish(
                SESSIONS_EXCHANGE.into(),
                "".into(),
                BasicPublishOptions::default(),
                note.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }

    async fn link(&self) -> Result<Arc<Link>, BrokerError> {
        self.link
            .read()
            .await
            .clone()
            .ok_or_else(|| BrokerError::Unavailable(self.cfg.display_addr()))
    }

    fn plain_queue_args(&self, ttl_ms: u32) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        args.insert("x-message-ttl".into(), AMQPValue::LongUInt(ttl_ms));
        args
    }

    /// Declares `<id>.dlq` and `<id>` with the original's arguments (compat §6).
    pub async fn declare_agent(&self, agent_id: &str) -> Result<(), BrokerError> {
        let dlq = format!("{agent_id}.dlq");
        self.declare_queue(&dlq, self.plain_queue_args(self.cfg.dlq_ttl_ms))
            .await?;
        let mut args = self.plain_queue_args(self.cfg.ttl_ms);
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(dlq.as_str().into()),
        );
        self.declare_queue(agent_id, args).await
    }

    /// How many consumers `queue` has now (on any instance).
    pub async fn consumer_count(&self, queue: &str) -> Result<u32, BrokerError> {
        let link = self.link().await?;
        let amqp = |source| BrokerError::Amqp {
            operation: "count consumers",
            queue: queue.to_owned(),
            source,
        };
        // A throw-away channel: a passive declare of a missing queue closes the channel it ran on.
        let channel = link.conn.create_channel().await.map_err(amqp)?;
        let result = consumers_on(&channel, queue).await.map_err(amqp);
        let _ = channel.close(200, "counted".into()).await;
        result
    }

    async fn declare_queue(&self, queue: &str, args: FieldTable) -> Result<(), BrokerError> {
        let link = self.link().await?;
        let amqp = |source| BrokerError::Amqp {
            operation: "declare",
            queue: queue.to_owned(),
            source,
        };
        let channel = link.conn.create_channel().await.map_err(amqp)?;
        let result = channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(amqp);
        if let Err(BrokerError::Amqp { source, .. }) = &result
            && source.to_string().contains("PRECONDITION_FAILED")
        {
            tracing::error!(queue, error = %source, "queue exists with different arguments (PRECONDITION_FAILED): delete it or align RABBITMQ_DEFAULT_TTL/RABBITMQ_DEFAULT_DLQ_TTL with the server that created it");
        }
        let _ = channel.close(200, "declared".into()).await;
        result.map(|_| ())
    }

    /// Publishes `body` persistently to `queue` and waits for the broker's confirm.
    pub async fn publish(&self, queue: &str, body: &[u8]) -> Result<(), BrokerError> {
        self.start_publish(queue, body).await?.await
    }

    /// Sends `body` to `queue` now (so calls made in order are queued in order) and returns a future
    /// that resolves when RabbitMQ confirmed it.
    pub async fn start_publish(
        &self,
        queue: &str,
        body: &[u8],
    ) -> Result<impl Future<Output = Result<(), BrokerError>> + use<>, BrokerError> {
        let link = self.link().await?;
        let started = std::time::Instant::now();
        let q = queue.to_owned();
        let amqp = |source| BrokerError::Amqp {
            operation: "publish",
            queue: queue.to_owned(),
            source,
        };
        let confirm = link
            .publish
            .basic_publish(
                ShortString::from(""),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .map_err(amqp)?;
        let metrics = self.metrics.clone();
        Ok(async move {
            let confirmation = confirm.await.map_err(|source| BrokerError::Amqp {
                operation: "publish confirm",
                queue: q.clone(),
                source,
            })?;
            metrics.publish_confirm_seconds.observe(started.elapsed().as_secs_f64());
            match confirmation {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) => Err(BrokerError::NotAccepted {
                    queue: q,
                    reason: "unroutable (queue does not exist)",
                }),
                Confirmation::Nack(_) => Err(BrokerError::NotAccepted {
                    queue: q,
                    reason: "negatively acknowledged by the broker",
                }),
                Confirmation::NotRequested => Err(BrokerError::NotAccepted {
                    queue: q,
                    reason: "publisher confirms not enabled",
                }),
            }
        })
    }

    /// Open connections that carry agent consumers (besides the publishing connection).
    pub async fn consumer_connections(&self) -> usize {
        let link = self.link.read().await.clone();
        match link {
            Some(link) => link.consumers.lock().await.as_ref().map_or(0, Vec::len),
            None => 0,
        }
    }

    /// Starts consuming `queue` on a new channel with at most `prefetch` unacked deliveries.
    pub async fn consume(&self, queue: &str, consumer_tag: &str) -> Result<AgentConsumer, BrokerError> {
        let link = self.link().await?;
        let amqp = |source| BrokerError::Amqp {
            operation: "consume",
            queue: queue.to_owned(),
            source,
        };
        let (conn, slot) = link.consumer_connection(&self.cfg).await.map_err(amqp)?;
        let channel = conn.create_channel().await.map_err(amqp)?;
        channel
            .basic_qos(self.cfg.prefetch_count, BasicQosOptions::default())
            .await
            .map_err(amqp)?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                consumer_tag.into(),
                // Not `exclusive`: quorum queues ignore it (RabbitMQ 3.10). `delivery::run` waits
                // for other instances' consumers to go before it consumes instead.
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        Ok(AgentConsumer {
            channel,
            consumer,
            _slot: slot,
        })
    }
}
