//! The embedded engine: the original's queues (compat §6) kept by this process in a
//! [`dmr_store::Store`] under `EMBEDDED_DATA_DIR`.
//!
//! Same queue names, arguments and formats as on RabbitMQ: `<agent-id>` (TTL
//! `RABBITMQ_DEFAULT_TTL`, dead-lettering to `<agent-id>.dlq`), `<agent-id>.dlq`
//! (`RABBITMQ_DEFAULT_DLQ_TTL`), the validation-failures queue, and `dmr.legacy-token.<agent-id>`
//! (one message, newest wins). A publish is answered once the store has fsynced it (group commit:
//! concurrent publishes share one fsync); acks are written without an fsync of their own (one lost
//! in a crash only means a redelivery, which the agents' duplicate window absorbs).
//!
//! One server per data directory: the store holds a lock on it, and a second server fails at start
//! with [`BrokerError::Open`]. There are no other instances to announce sessions to.

use super::{
    BrokerError, DeadLetterValue, QueueCounts, Taken, TokenRecord, TopologySource, dead_letter_headers, dlq_name,
    legacy_token_queue,
};
use crate::config::RabbitConfig;
use crate::metrics::Metrics;
use dmr_store::{Acker, HeaderValue, Headers, QueueArgs, Store, StoreError, StoreOptions};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The embedded engine.
pub struct Embedded {
    store: Store,
    cfg: RabbitConfig,
    ready: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

fn store_error(operation: &'static str, queue: &str) -> impl FnOnce(StoreError) -> BrokerError {
    let queue = queue.to_owned();
    move |source| BrokerError::Store {
        operation,
        queue,
        source: Box::new(source),
    }
}

impl Embedded {
    /// Opens (creating it if needed) the store in `dir`.
    pub(super) fn open(dir: &Path, cfg: RabbitConfig, metrics: Arc<Metrics>) -> Result<Self, BrokerError> {
        let store = Store::open(dir, StoreOptions::default()).map_err(|e| BrokerError::Open(Box::new(e)))?;
        tracing::info!(data_dir = %dir.display(), "embedded broker: store opened");
        Ok(Self {
            store,
            cfg,
            ready: watch::channel(false).0,
            metrics,
        })
    }

    pub(super) fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    fn set_ready(&self, ready: bool) {
        self.ready.send_replace(ready);
        self.metrics.broker_ready.set(i64::from(ready));
    }

    /// Declares the validation-failures queue and every agent's queues, then is ready until `stop`;
    /// then closes the store (after every session drained: see `Server::run`).
    pub(super) async fn run(&self, topology: TopologySource, stop: CancellationToken) {
        let queue = &self.cfg.validation_failures_queue;
        let args = QueueArgs {
            ttl_ms: Some(u64::from(self.cfg.validation_failures_ttl_ms)),
            dead_letter_to: None,
            max_length: None,
        };
        if let Err(e) = self.declare(queue, args).await {
            tracing::error!(queue, error = %e, "embedded broker: cannot declare the validation-failures queue");
        }
        for id in topology() {
            if let Err(e) = self.declare_agent(&id).await {
                tracing::error!(agent_id = %id, error = %e, "cannot declare agent queues");
            }
        }
        self.set_ready(true);
        stop.cancelled().await;
        self.set_ready(false);
        self.store.close();
    }

    /// Declares `queue` on the blocking pool: declaring a new queue waits for its commit (an fsync),
    /// which must not stall a runtime worker (thousands of them at start-up).
    async fn declare(&self, queue: &str, args: QueueArgs) -> Result<(), BrokerError> {
        let (store, name) = (self.store.clone(), queue.to_owned());
        let declared = tokio::task::spawn_blocking(move || store.declare(&name, args))
            .await
            .unwrap_or(Err(StoreError::Closed));
        declared.map_err(store_error("declare", queue))
    }

    /// Declares `<id>.dlq` and `<id>` with the original's arguments.
    pub(super) async fn declare_agent(&self, agent_id: &str) -> Result<(), BrokerError> {
        let dlq = dlq_name(agent_id);
        let dlq_args = QueueArgs {
            ttl_ms: Some(u64::from(self.cfg.dlq_ttl_ms)),
            dead_letter_to: None,
            max_length: None,
        };
        self.declare(&dlq, dlq_args).await?;
        let args = QueueArgs {
            ttl_ms: Some(u64::from(self.cfg.ttl_ms)),
            dead_letter_to: Some(dlq),
            max_length: None,
        };
        let declared = self.declare(agent_id, args).await;
        if let Err(e) = &declared
            && e.is_precondition_failed()
        {
            tracing::error!(queue = agent_id, error = %e, "queue exists with different arguments: align RABBITMQ_DEFAULT_TTL/RABBITMQ_DEFAULT_DLQ_TTL with the server that created it");
        }
        declared
    }

    /// Queues `body` now (in call order) and returns a future that resolves once it is on disk.
    pub(super) fn start_publish(
        &self,
        queue: &str,
        body: &[u8],
    ) -> Result<impl Future<Output = Result<(), BrokerError>> + use<>, BrokerError> {
        let started = std::time::Instant::now();
        let metrics = self.metrics.clone();
        let pending = self
            .store
            .start_publish(queue, bytes::Bytes::copy_from_slice(body), Headers::new())
            .map_err(|e| publish_error(queue, e))?;
        let queue = queue.to_owned();
        Ok(async move {
            pending.await.map_err(|e| publish_error(&queue, e))?;
            metrics.publish_confirm_seconds.observe(started.elapsed().as_secs_f64());
            Ok(())
        })
    }

    pub(super) fn counts(&self, queue: &str) -> Result<QueueCounts, BrokerError> {
        counts(&self.store, queue)
    }

    pub(super) fn consume(&self, queue: &str) -> Result<EmbeddedConsumer, BrokerError> {
        let consumer = self
            .store
            .consume(queue, self.cfg.prefetch_count)
            .map_err(store_error("consume", queue))?;
        Ok(EmbeddedConsumer {
            consumer,
            store: self.store.clone(),
            queue: queue.to_owned(),
        })
    }

    pub(super) async fn remember_legacy_token(
        &self,
        agent_id: &str,
        record: &TokenRecord,
        ttl_ms: u64,
    ) -> Result<(), BrokerError> {
        let queue = legacy_token_queue(agent_id);
        let args = QueueArgs {
            ttl_ms: Some(ttl_ms),
            dead_letter_to: None,
            max_length: Some(1),
        };
        self.declare(&queue, args).await?;
        let body = serde_json::to_vec(record).unwrap_or_default();
        self.start_publish(&queue, &body)?.await
    }

    pub(super) fn last_legacy_token(&self, agent_id: &str, _ttl_ms: u64) -> Result<Option<TokenRecord>, BrokerError> {
        let queue = legacy_token_queue(agent_id);
        match self.store.peek(&queue) {
            Ok(message) => Ok(message.and_then(|m| serde_json::from_slice(&m.body).ok())),
            Err(StoreError::QueueNotFound(_)) => Ok(None),
            Err(e) => Err(store_error("read legacy token", &queue)(e)),
        }
    }

    pub(super) fn list(&self, queue: &str, limit: usize) -> Result<Vec<super::Listed>, BrokerError> {
        let messages = self.store.list(queue, limit).map_err(store_error("list", queue))?;
        Ok(messages
            .into_iter()
            .map(|m| super::Listed {
                body: m.body.to_vec(),
                headers: m
                    .headers
                    .into_iter()
                    .map(|(k, v)| {
                        let v = match v {
                            HeaderValue::String(s) => s,
                            HeaderValue::Int(i) => i.to_string(),
                        };
                        (k, v)
                    })
                    .collect(),
            })
            .collect())
    }
}

/// What `queue` holds now (the store keeps the counts in memory).
fn counts(store: &Store, queue: &str) -> Result<QueueCounts, BrokerError> {
    let c = store.counts(queue).map_err(store_error("count", queue))?;
    Ok(QueueCounts {
        messages: c.messages_ready,
        consumers: c.consumers,
    })
}

/// A publish to a queue that does not exist is "unroutable", as RabbitMQ returns it.
fn publish_error(queue: &str, e: StoreError) -> BrokerError {
    match e {
        StoreError::QueueNotFound(_) => BrokerError::NotAccepted {
            queue: queue.to_owned(),
            rejection: super::Rejection::Unroutable,
        },
        e => store_error("publish", queue)(e),
    }
}

/// A consumer of one queue of the store.
pub struct EmbeddedConsumer {
    consumer: dmr_store::Consumer,
    store: Store,
    queue: String,
}

impl EmbeddedConsumer {
    pub(super) async fn next(&mut self) -> Option<Taken> {
        let message = self.consumer.next().await?;
        Some(Taken::embedded(
            message.body.to_vec(),
            self.consumer.acker(),
            message.seq,
        ))
    }

    pub(super) fn counts(&self) -> Result<QueueCounts, BrokerError> {
        counts(&self.store, &self.queue)
    }
}

pub(super) async fn settle(acker: &Acker, seq: u64, reject: bool) -> Result<(), BrokerError> {
    let result = if reject {
        acker.reject(seq, "rejected").await
    } else {
        acker.ack(seq).await
    };
    result.map_err(store_error(if reject { "reject" } else { "ack" }, ""))
}

/// Moves message `seq` to the DLQ in one transaction, with the same headers the RabbitMQ engine
/// publishes the dead letter with.
pub(super) async fn dead_letter(
    acker: &Acker,
    seq: u64,
    dlq: &str,
    attempts: u32,
    last_error: &str,
) -> Result<(), BrokerError> {
    let headers: Headers = dead_letter_headers(attempts, last_error)
        .into_iter()
        .map(|(name, value)| {
            let value = match value {
                DeadLetterValue::Text(s) => HeaderValue::String(s),
                DeadLetterValue::Count(n) => HeaderValue::Int(i64::from(n)),
            };
            (name.to_owned(), value)
        })
        .collect();
    acker
        .dead_letter(seq, headers)
        .await
        .map_err(store_error("dead-letter", dlq))
}

/// The operators' console ([`super::admin`]) on the embedded engine.
impl Embedded {
    pub(super) fn inspect(&self, queue: &str, limit: usize) -> Result<Vec<super::admin::Inspected>, BrokerError> {
        Ok(self
            .list(queue, limit)?
            .into_iter()
            .map(|m| super::admin::Inspected {
                body: m.body,
                headers: m.headers,
            })
            .collect())
    }

    /// Picks the messages among the first `max` ready ones, then moves them in one transaction.
    pub(super) async fn move_where(
        &self,
        queue: &str,
        to: Option<&str>,
        select: super::admin::Select<'_>,
        max: usize,
    ) -> Result<u64, BrokerError> {
        let operation = if to.is_some() { "replay" } else { "purge" };
        let listed = self.store.list(queue, max).map_err(store_error(operation, queue))?;
        let seqs: Vec<u64> = listed.iter().filter(|m| select(&m.body)).map(|m| m.seq).collect();
        self.store
            .move_ready(queue, &seqs, to)
            .await
            .map_err(store_error(operation, queue))
    }
}
