//! The operators' console on RabbitMQ: reading a queue with its `x-death` history, and moving
//! selected messages with `basic.get` (see [`crate::broker::admin`] for the guarantees).

use super::RabbitMq;
use super::publish::text;
use crate::broker::BrokerError;
use crate::broker::admin::{DEATH_COUNT, DEATH_QUEUE, DEATH_REASON, DEATH_TIME, Inspected, Select};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::collections::BTreeMap;

impl RabbitMq {
    pub(crate) async fn inspect(&self, queue: &str, limit: usize) -> Result<Vec<Inspected>, BrokerError> {
        let link = self.link().await?;
        let amqp = amqp_error("inspect", queue);
        let channel = link.conn.create_channel().await.map_err(&amqp)?;
        let mut out = Vec::new();
        let mut failed = None;
        while out.len() < limit {
            match channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await {
                Ok(Some(m)) => out.push(Inspected {
                    headers: headers(m.delivery.properties.headers().as_ref()),
                    body: m.delivery.data,
                }),
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Closing the channel returns every message taken to the queue.
        let _ = channel.close(200, "inspected".into()).await;
        self.await_returned(queue, out.len()).await;
        match failed {
            Some(e) => Err(amqp(e)),
            None => Ok(out),
        }
    }

    pub(crate) async fn move_where(
        &self,
        queue: &str,
        to: Option<&str>,
        select: Select<'_>,
        max: usize,
    ) -> Result<u64, BrokerError> {
        let link = self.link().await?;
        let amqp = amqp_error(if to.is_some() { "replay" } else { "purge" }, queue);
        let channel = link.conn.create_channel().await.map_err(&amqp)?;
        let mut moved = 0u64;
        let mut seen = 0usize;
        let result = async {
            while seen < max {
                let Some(m) = channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(&amqp)?
                else {
                    break;
                };
                seen += 1;
                if !select(&m.delivery.data) {
                    // Held unacknowledged until the channel closes, then back in the queue.
                    continue;
                }
                if let Some(to) = to {
                    let properties = m.delivery.properties.clone();
                    self.start_publish_with(to, &m.delivery.data, properties).await?.await?;
                }
                channel
                    .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
                    .await
                    .map_err(&amqp)?;
                moved += 1;
            }
            Ok(moved)
        }
        .await;
        let _ = channel.close(200, "moved".into()).await;
        self.await_returned(queue, seen.saturating_sub(usize::try_from(moved).unwrap_or(usize::MAX)))
            .await;
        if let Err(e) = &result {
            tracing::warn!(queue, moved, error = %e, "moving messages stopped early; those not moved stay in the queue");
        }
        result
    }
}

impl RabbitMq {
    /// Waits (at most [`RETURN_WAIT`]) until the `held` messages a closed channel returned are
    /// ready in `queue` again: the broker requeues them asynchronously, and an operator who lists
    /// right after an action must see them. Bounded, because other clients may take or add
    /// messages meanwhile.
    async fn await_returned(&self, queue: &str, held: usize) {
        if held == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + RETURN_WAIT;
        while tokio::time::Instant::now() < deadline {
            match self.counts(queue).await {
                Ok(c) if usize::try_from(c.messages).unwrap_or(usize::MAX) >= held => return,
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                Err(_) => return,
            }
        }
    }
}

/// How long an operation waits for the messages it looked at and left alone to be back.
const RETURN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn amqp_error(operation: &'static str, queue: &str) -> impl Fn(lapin::Error) -> BrokerError {
    let queue = queue.to_owned();
    move |source| BrokerError::Amqp {
        operation,
        queue: queue.clone(),
        source,
    }
}

/// Headers as text; the first (latest) `x-death` entry becomes [`DEATH_REASON`] and friends.
fn headers(table: Option<&FieldTable>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(table) = table else { return out };
    for (name, value) in table.inner() {
        if name.as_str() == "x-death" {
            if let AMQPValue::FieldArray(deaths) = value
                && let Some(AMQPValue::FieldTable(last)) = deaths.as_slice().first()
            {
                let field = |k: &str| last.inner().get(k).map(text);
                let time = last.inner().get("time").and_then(|v| match v {
                    AMQPValue::Timestamp(secs) => Some((secs * 1000).to_string()),
                    _ => None,
                });
                for (key, v) in [
                    (DEATH_REASON, field("reason")),
                    (DEATH_COUNT, field("count")),
                    (DEATH_QUEUE, field("queue")),
                    (DEATH_TIME, time),
                ] {
                    if let Some(v) = v {
                        out.insert(key.to_owned(), v);
                    }
                }
            }
            continue;
        }
        out.insert(name.to_string(), text(value));
    }
    out
}
