//! The last authenticated legacy token of each agent, kept in RabbitMQ so that every instance sees
//! it and it survives restarts (the server itself stores nothing).
//!
//! One small classic queue per agent, `dmr.legacy-token.<agent-id>`, holding at most one message
//! (`x-max-length` 1, the newest wins) that expires after `WEB_SOCKET_LAST_TOKEN_TTL_MS`. Reading
//! it takes the message without acking and closes the channel, which puts it back.

use super::RabbitMq;
use crate::broker::{BrokerError, TokenRecord, legacy_token_queue};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

impl RabbitMq {
    async fn declare_token_queue(channel: &lapin::Channel, queue: &str, ttl_ms: u64) -> Result<(), lapin::Error> {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(1));
        args.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
        let ttl = u32::try_from(ttl_ms).unwrap_or(u32::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongUInt(ttl));
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
            .await
            .map(|_| ())
    }

    /// Remembers `record` (for `ttl_ms`) as the agent's last authenticated legacy token (confirmed).
    pub async fn remember_legacy_token(
        &self,
        agent_id: &str,
        record: &TokenRecord,
        ttl_ms: u64,
    ) -> Result<(), BrokerError> {
        let queue = legacy_token_queue(agent_id);
        let link = self.link().await?;
        let amqp = |source| BrokerError::Amqp {
            operation: "declare legacy token queue",
            queue: queue.clone(),
            source,
        };
        let channel = link.conn.create_channel().await.map_err(amqp)?;
        let declared = Self::declare_token_queue(&channel, &queue, ttl_ms).await.map_err(amqp);
        let _ = channel.close(200, "declared".into()).await;
        declared?;
        let body = serde_json::to_vec(record).unwrap_or_default();
        self.publish(&queue, &body).await
    }

    /// The agent's last authenticated legacy token, if remembered.
    pub async fn last_legacy_token(&self, agent_id: &str, ttl_ms: u64) -> Result<Option<TokenRecord>, BrokerError> {
        let queue = legacy_token_queue(agent_id);
        let link = self.link().await?;
        let amqp = |source| BrokerError::Amqp {
            operation: "read legacy token",
            queue: queue.clone(),
            source,
        };
        let channel = link.conn.create_channel().await.map_err(amqp)?;
        let result = async {
            Self::declare_token_queue(&channel, &queue, ttl_ms).await?;
            channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
        }
        .await
        .map_err(amqp);
        // Closing the channel returns the unacked message to the queue.
        let _ = channel.close(200, "read".into()).await;
        Ok(result?.and_then(|m| serde_json::from_slice(&m.delivery.data).ok()))
    }
}
