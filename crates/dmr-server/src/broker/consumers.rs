//! Per-agent consumers, spread over a pool of connections (RabbitMQ caps channels per connection).

use super::supervisor::{CONNECT_TIMEOUT, Link};
use super::{Broker, BrokerError};
use crate::config::RabbitConfig;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
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
pub struct AgentConsumer {
    /// The channel (ack/reject happen through deliveries' ackers).
    pub channel: Channel,
    /// The delivery stream.
    pub consumer: Consumer,
    /// Keeps the consumer counted on its connection.
    _slot: ConsumerSlot,
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

/// What a queue holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery (not counting unacknowledged ones).
    pub messages: u32,
    /// Consumers attached (on any instance).
    pub consumers: u32,
}

/// The counts of `queue` now, by a passive declare on `channel` (which RabbitMQ closes if the
/// queue does not exist).
pub async fn queue_counts(channel: &Channel, queue: &str) -> Result<QueueCounts, lapin::Error> {
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

impl Broker {
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
