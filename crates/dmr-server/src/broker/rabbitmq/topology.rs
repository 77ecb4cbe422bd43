//! The original's queues (compat §6): `<id>` (quorum, TTL, dead-lettering to `<id>.dlq`),
//! `<id>.dlq` and the validation-failures queue.

use super::RabbitMq;
use crate::broker::{BrokerError, dlq_name};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

impl RabbitMq {
    fn plain_queue_args(&self, ttl_ms: u32) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        args.insert("x-message-ttl".into(), AMQPValue::LongUInt(ttl_ms));
        args
    }

    /// Declares the validation-failures queue.
    pub(super) async fn declare_validation_failures(&self) -> Result<(), BrokerError> {
        self.declare_queue(
            &self.cfg.validation_failures_queue,
            self.plain_queue_args(self.cfg.validation_failures_ttl_ms),
        )
        .await
    }

    /// Declares `<id>.dlq` and `<id>` with the original's arguments (compat §6).
    pub async fn declare_agent(&self, agent_id: &str) -> Result<(), BrokerError> {
        let dlq = dlq_name(agent_id);
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
        if let Err(e) = &result
            && e.is_precondition_failed()
        {
            tracing::error!(queue, error = %e, "queue exists with different arguments (PRECONDITION_FAILED): delete it or align RABBITMQ_DEFAULT_TTL/RABBITMQ_DEFAULT_DLQ_TTL with the server that created it");
        }
        let _ = channel.close(200, "declared".into()).await;
        result.map(|_| ())
    }
}
