//! Who is connected where, across instances, for the operators' console: a question on the
//! `dmr.admin.presence` fanout exchange, answered by every instance to the asker's private reply
//! queue. Asked only when an operator looks (nothing flows otherwise); best effort: an instance
//! that does not answer within the wait is missing from that one answer.

use super::RabbitMq;
use crate::broker::BrokerError;
use crate::broker::admin::{PresenceNote, PresenceSource};
use futures::StreamExt as _;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

/// The fanout exchange presence questions go to.
pub const PRESENCE_EXCHANGE: &str = "dmr.admin.presence";

/// Largest answer read (a note of about 20,000 sessions).
const MAX_NOTE_BYTES: usize = 8 * 1024 * 1024;

fn amqp(source: lapin::Error) -> BrokerError {
    BrokerError::Amqp {
        operation: "presence",
        queue: PRESENCE_EXCHANGE.to_owned(),
        source,
    }
}

fn private_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    }
}

fn no_ack() -> BasicConsumeOptions {
    BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    }
}

impl RabbitMq {
    /// Declares the exchange (durable fanout) on `channel`.
    async fn declare_presence(channel: &lapin::Channel) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                PRESENCE_EXCHANGE.into(),
                lapin::ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(amqp)
    }

    pub(crate) async fn serve_presence(&self, source: PresenceSource, stop: CancellationToken) {
        let mut ready = self.ready();
        loop {
            // Wait for a connection.
            while !*ready.borrow_and_update() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = ready.changed() => if changed.is_err() { return },
                }
            }
            if let Err(e) = self.answer_presence(&source, &stop).await {
                tracing::debug!(error = %e, "presence answers stopped; resuming after the next connection");
            }
            if stop.is_cancelled() {
                return;
            }
            // Connected still (a channel error): do not spin.
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    /// Answers questions until the connection is lost or `stop`.
    async fn answer_presence(&self, source: &PresenceSource, stop: &CancellationToken) -> Result<(), BrokerError> {
        let link = self.link().await?;
        let channel = link.conn.create_channel().await.map_err(amqp)?;
        Self::declare_presence(&channel).await?;
        let queue = channel
            .queue_declare("".into(), private_queue(), FieldTable::default())
            .await
            .map_err(amqp)?;
        channel
            .queue_bind(
                queue.name().clone(),
                PRESENCE_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        let mut questions = channel
            .basic_consume(queue.name().clone(), "".into(), no_ack(), FieldTable::default())
            .await
            .map_err(amqp)?;
        loop {
            let question = tokio::select! {
                () = stop.cancelled() => break,
                q = questions.next() => match q {
                    Some(Ok(q)) => q,
                    _ => break,
                },
            };
            let Some(reply_to) = question.properties.reply_to().clone() else {
                continue;
            };
            let note = serde_json::to_vec(&source()).unwrap_or_default();
            // Not mandatory, no confirm awaited beyond the channel's: the asker may be gone.
            if let Ok(confirm) = link
                .publish
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    &note,
                    BasicProperties::default(),
                )
                .await
            {
                let _ = confirm.await;
            }
        }
        let _ = channel.close(200, "presence done".into()).await;
        Ok(())
    }

    pub(crate) async fn ask_presence(&self, wait: std::time::Duration) -> Result<Vec<PresenceNote>, BrokerError> {
        let link = self.link().await?;
        let channel = link.conn.create_channel().await.map_err(amqp)?;
        let result = async {
            Self::declare_presence(&channel).await?;
            let queue = channel
                .queue_declare("".into(), private_queue(), FieldTable::default())
                .await
                .map_err(amqp)?;
            let mut answers = channel
                .basic_consume(queue.name().clone(), "".into(), no_ack(), FieldTable::default())
                .await
                .map_err(amqp)?;
            let question = BasicProperties::default().with_reply_to(queue.name().clone());
            channel
                .basic_publish(
                    PRESENCE_EXCHANGE.into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    question,
                )
                .await
                .map_err(amqp)?;
            let mut notes = Vec::new();
            let deadline = tokio::time::sleep(wait);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    answer = answers.next() => match answer {
                        Some(Ok(a)) if a.data.len() <= MAX_NOTE_BYTES => {
                            if let Ok(note) = serde_json::from_slice::<PresenceNote>(&a.data) {
                                notes.push(note);
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
            Ok(notes)
        }
        .await;
        let _ = channel.close(200, "asked".into()).await;
        result
    }
}
