//! Per-agent consumers, spread over a pool of connections (RabbitMQ caps channels per connection).

use super::RabbitMq;
use super::supervisor::{CONNECT_TIMEOUT, Link};
use crate::broker::{BrokerError, QueueCounts, Taken};
use crate::config::RabbitConfig;
use futures::StreamExt as _;
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The largest AMQP frame we accept on our connections (RabbitMQ offers 128 KiB). lapin sizes each
/// connection's read and write buffers at 32 frames and fills them: at 128 KiB that is 8 MiB per
/// connection, i.e. ~8 KiB per agent on a consumer connection of 1,000. At 16 KiB it is 1 MiB; a
/// message body larger than a frame simply travels in several (an agent's ~1.5 KB envelope fits
/// in one).
pub(super) const FRAME_MAX: u32 = 16 * 1024;

/// The broker's URI with our [`FRAME_MAX`].
pub(super) fn connection_uri(cfg: &RabbitConfig) -> String {
    format!("{}?frame_max={FRAME_MAX}", cfg.uri())
}

/// A connection that carries consumers, with how many it carries now.
pub(super) struct ConsumerConnection {
    pub(super) conn: Arc<Connection>,
    active: Arc<AtomicUsize>,
}

/// A consumer's place on a consumer connection; freed when dropped.
struct ConsumerSlot(Arc<AtomicUsize>);

impl Drop for ConsumerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open consumer on an agent queue, with the channel it lives on (closing the channel returns
/// unacknowledged deliveries to the queue).
pub struct RabbitConsumer {
    channel: Channel,
    consumer: Consumer,
    queue: String,
    /// Keeps the consumer counted on its connection.
    _slot: ConsumerSlot,
}

impl RabbitConsumer {
    /// The next message (`None`: the broker cancelled the consumer).
    pub(crate) async fn next(&mut self) -> Option<Result<Taken, BrokerError>> {
        let next = self.consumer.next().await?;
        Some(
            next.map(|delivery| Taken::rabbitmq(delivery.data, delivery.acker))
                .map_err(|source| BrokerError::Amqp {
                    operation: "consume",
                    queue: self.queue.clone(),
                    source,
                }),
        )
    }

    /// The counts of the consumed queue, read on the consumer's own channel (an error if the queue
    /// is gone).
    pub(crate) async fn counts(&self) -> Result<QueueCounts, BrokerError> {
        queue_counts(&self.channel, &self.queue)
            .await
            .map_err(|source| BrokerError::Amqp {
                operation: "count",
                queue: self.queue.clone(),
                source,
            })
    }

    /// Closes the channel: every unacknowledged delivery returns to the queue.
    pub(crate) async fn close(self) {
        let _ = self.channel.close(200, "session ended".into()).await;
    }
}

/// Settles one delivery (`reject`: RabbitMQ dead-letters it to the queue's DLQ, `x-death` reason
/// `rejected`).
pub(crate) async fn settle(acker: &Acker, reject: bool) -> Result<(), lapin::Error> {
    if reject {
        acker.reject(BasicRejectOptions { requeue: false }).await.map(|_| ())
    } else {
        acker.ack(BasicAckOptions::default()).await.map(|_| ())
    }
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
                let conn = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&connection_uri(cfg), properties))
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
}

/// The counts of `queue` now, by a passive declare on `channel` (which RabbitMQ closes if the
/// queue does not exist).
async fn queue_counts(channel: &Channel, queue: &str) -> Result<QueueCounts, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    Ok(QueueCounts {
        messages: q.message_count(),
        consumers: q.consumer_count(),
    })
}

impl RabbitMq {
    /// What `queue` holds now (messages ready, consumers on any instance).
    pub async fn counts(&self, queue: &str) -> Result<QueueCounts, BrokerError> {
        let link = self.link().await?;
        let amqp = |source| BrokerError::Amqp {
            operation: "count",
            queue: queue.to_owned(),
            source,
        };
        // One channel, kept: opening one per read costs RabbitMQ a channel process each time (reads
        // come every 20 ms while senders are held). A passive declare of a missing queue closes
        // the channel it ran on: open another next time.
        let mut counting = link.counting.lock().await;
        let channel = match counting.take().filter(|c| c.status().connected()) {
            Some(channel) => channel,
            None => link.conn.create_channel().await.map_err(amqp)?,
        };
        let result = queue_counts(&channel, queue).await.map_err(amqp);
        if result.is_ok() {
            *counting = Some(channel);
        }
        result
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
    pub async fn consume(&self, queue: &str, consumer_tag: &str) -> Result<RabbitConsumer, BrokerError> {
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
        Ok(RabbitConsumer {
            channel,
            consumer,
            queue: queue.to_owned(),
            _slot: slot,
        })
    }
}
