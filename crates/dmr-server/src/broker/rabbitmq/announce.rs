//! What instances tell each other about agents, on the `dmr.sessions` fanout exchange: a new
//! session of an agent (older sessions elsewhere must close) and a re-created queue (consumers
//! must re-attach). Best effort: a lost note is covered by the consumer handover wait and checks.

use super::RabbitMq;
use crate::broker::{Announcement, BrokerError, RemoteSessionHook};
use futures::StreamExt as _;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;

/// Fanout exchange on which instances announce new agent sessions, so that a newer connection of
/// an agent on one instance replaces an older one on another.
pub const SESSIONS_EXCHANGE: &str = "dmr.sessions";

impl RabbitMq {
    /// Binds a private queue to [`SESSIONS_EXCHANGE`] and calls `hook` for other instances' notes.
    pub(super) async fn listen_for_sessions(&self, hook: RemoteSessionHook) -> Result<(), BrokerError> {
        let link = self.link().await?;
        let amqp = |source| BrokerError::Amqp {
            operation: "session announcements",
            queue: SESSIONS_EXCHANGE.to_owned(),
            source,
        };
        let channel = link.conn.create_channel().await.map_err(amqp)?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                SESSIONS_EXCHANGE.into(),
                lapin::ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        let private = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = channel
            .queue_declare("".into(), private, FieldTable::default())
            .await
            .map_err(amqp)?;
        channel
            .queue_bind(
                queue.name().clone(),
                SESSIONS_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let mut consumer = channel
            .basic_consume(queue.name().clone(), "".into(), no_ack, FieldTable::default())
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
                // Notes from older instances carry no event: they announced sessions only.
                let event = note["event"]
                    .as_str()
                    .map_or(Some(Announcement::Session), Announcement::parse);
                if let Some(event) = event
                    && instance != me
                {
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
        let published = link
            .publish
            .basic_publish(
                SESSIONS_EXCHANGE.into(),
                "".into(),
                BasicPublishOptions::default(),
                note.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await;
        // The channel is in confirm mode: a confirm nobody awaits stays in lapin's books for the
        // connection's life (~450 bytes per session ever opened, found with heaptrack).
        if let Ok(confirm) = published {
            let _ = confirm.await;
        }
    }
}
