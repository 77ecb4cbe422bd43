//! Confirmed publishing: "accepted" means RabbitMQ confirmed the message and did not return it.

use super::RabbitMq;
use crate::broker::Listed;
use crate::broker::{BrokerError, DeadLetterValue, Rejection, dead_letter_headers};
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};

impl RabbitMq {
    /// Up to `limit` ready messages of `queue`, taken unacknowledged on a channel of their own and
    /// returned to the queue by closing it.
    pub async fn list(&self, queue: &str, limit: usize) -> Result<Vec<Listed>, BrokerError> {
        let link = self.link().await?;
        let amqp = |source| BrokerError::Amqp {
            operation: "list",
            queue: queue.to_owned(),
            source,
        };
        let channel = link.conn.create_channel().await.map_err(amqp)?;
        let mut out = Vec::new();
        let mut failed = None;
        while out.len() < limit {
            match channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await {
                Ok(Some(m)) => {
                    let headers = m
                        .delivery
                        .properties
                        .headers()
                        .as_ref()
                        .map(|h| h.inner().iter().map(|(k, v)| (k.to_string(), text(v))).collect())
                        .unwrap_or_default();
                    out.push(Listed {
                        body: m.delivery.data,
                        headers,
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Closing the channel returns every message taken to the queue.
        let _ = channel.close(200, "listed".into()).await;
        match failed {
            Some(e) => Err(amqp(e)),
            None => Ok(out),
        }
    }

    /// Publishes `body` persistently to `queue` and waits for the broker's confirm.
    pub async fn publish(&self, queue: &str, body: &[u8]) -> Result<(), BrokerError> {
        self.start_publish(queue, body).await?.await
    }

    /// Publishes a message that could not be delivered to the dead-letter queue `dlq`, with the
    /// number of attempts and the last error in its headers, and waits for the confirm.
    pub async fn publish_dead_letter(
        &self,
        dlq: &str,
        body: &[u8],
        attempts: u32,
        last_error: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        for (name, value) in dead_letter_headers(attempts, last_error) {
            let value = match value {
                DeadLetterValue::Text(s) => AMQPValue::LongString(s.into()),
                DeadLetterValue::Count(n) => AMQPValue::LongUInt(n),
            };
            headers.insert(name.into(), value);
        }
        let properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        self.start_publish_with(dlq, body, properties).await?.await
    }

    /// Sends `body` to `queue` now (so calls made in order are queued in order) and returns a future
    /// that resolves when RabbitMQ confirmed it.
    pub async fn start_publish(
        &self,
        queue: &str,
        body: &[u8],
    ) -> Result<impl Future<Output = Result<(), BrokerError>> + use<>, BrokerError> {
        self.start_publish_with(queue, body, BasicProperties::default().with_delivery_mode(2))
            .await
    }

    pub(super) async fn start_publish_with(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
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
                properties,
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
            let rejection = match confirmation {
                Confirmation::Ack(None) => return Ok(()),
                Confirmation::Ack(Some(_)) => Rejection::Unroutable,
                Confirmation::Nack(_) => Rejection::Nacked,
                Confirmation::NotRequested => Rejection::ConfirmsOff,
            };
            Err(BrokerError::NotAccepted { queue: q, rejection })
        })
    }
}

/// A header value as text (strings as they are, numbers and timestamps in decimal, others in their
/// debug form).
pub(super) fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}
