//! Prometheus metrics of the server. The original's names (compat §9) count gRPC streams as
//! "socket connections" so that its alert rules keep working; RabbitMQ and delivery metrics sit
//! beside them.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Namespace label value used for gRPC sessions in the per-event counters.
pub const GRPC_NAMESPACE: &str = "grpc";

/// All server metrics, registered in one registry.
pub struct Metrics {
    /// The registry behind `/metrics`.
    pub registry: Registry,
    /// Always 1, labelled with this build's version and commit (`dmr_build_info`).
    pub build_info: IntGaugeVec,
    /// Open agent connections (both transports).
    pub connections_active: IntGauge,
    /// Agent connections accepted.
    pub connections_total: IntCounter,
    /// Agent connections closed.
    pub disconnections_total: IntCounter,
    /// How long agent connections lasted.
    pub connection_duration: Histogram,
    /// Connection-level errors, including refused authentication.
    pub socket_errors: IntCounter,
    /// Events received from agents, by event and namespace.
    pub events_received: IntCounterVec,
    /// Events sent to agents, by event and namespace.
    pub events_sent: IntCounterVec,
    /// Time from receiving a send to answering it (validation + confirmed publish).
    pub message_processing: Histogram,
    /// Refused authentications by reason.
    pub auth_failures: IntCounterVec,
    /// 1 while connected to RabbitMQ.
    pub rabbitmq_connected: IntGauge,
    /// 1 while the broker engine (RabbitMQ or embedded) takes and delivers messages.
    pub broker_ready: IntGauge,
    /// Messages in the dead-letter queue of each agent connected to this instance.
    pub agent_dlq_messages: IntGaugeVec,
    /// Publish → confirm latency.
    pub publish_confirm_seconds: Histogram,
    /// Deliveries retried after a failure or timeout.
    pub delivery_retries: IntCounter,
    /// Messages dead-lettered after the last failed attempt.
    pub dead_lettered: IntCounter,
    /// Records written to validation-failures, by error type.
    pub validation_failures: IntCounterVec,
    /// Messages delivered and acked by agents.
    pub delivered: IntCounter,
    /// Failed directory refreshes by kind.
    pub centops_failures: IntCounterVec,
    /// 1 while the last directory refresh failed (the last good directory stays in force).
    pub directory_refresh_failing: IntGauge,
    /// Unix time of the last successful directory load.
    pub directory_last_success: IntGauge,
    /// Seconds since the last successful directory load (updated on scrape).
    pub directory_age: IntGauge,
    /// Agents in the directory in force.
    pub directory_agents: IntGauge,
    /// Legacy agents refused at the handshake, by agent id and reason (an alert can name the agent).
    pub legacy_refusals: IntCounterVec,
    /// Deliveries repeated because a legacy agent answered `DECRYPTION_FAILED` right after connecting.
    pub startup_race_redeliveries: IntCounter,
    /// Messages ready in the queue of each agent connected to this instance (sampled every
    /// `RABBITMQ_CONSUMER_CHECK_INTERVAL_MS` and when its consumer starts).
    pub agent_queue_messages: IntGaugeVec,
    /// Age of the oldest undelivered message of each agent connected here: the one being delivered
    /// (0 once its queue is empty).
    pub agent_oldest_message_age: GaugeVec,
    /// Time messages waited in their queue before their recipient acked them.
    pub queue_wait: Histogram,
    /// Sends refused because the recipient's queue was at `MESSAGE_QUEUE_MAX_DEPTH`.
    pub backlog_refusals: IntCounter,
    /// How long answers to queued sends were held because their recipient was behind.
    pub send_holds: Histogram,
    /// TCP connections on the gRPC port that closed or stalled before a TLS ClientHello (port
    /// probes, load-balancer checks): not authentication failures.
    pub tls_probes: IntCounter,
    /// Sends refused by the relay policy, by sender and recipient.
    pub policy_refusals: IntCounterVec,
    /// Sends, sessions and connection attempts refused by a limit, by agent id ("unknown" for a
    /// Socket.IO connection attempt, which has none yet) and limit.
    pub limit_refusals: IntCounterVec,
    /// Failed relay-policy loads by kind.
    pub policy_failures: IntCounterVec,
    /// 1 while the last relay-policy load failed (the last good policy stays in force).
    pub policy_refresh_failing: IntGauge,
    /// Rules in the relay policy in force.
    pub policy_rules: IntGauge,
    /// Admin API requests refused for want of a valid bearer token, by reason.
    pub admin_auth_refusals: IntCounterVec,
    /// Operators' actions (replay, purges), by action and outcome (`ok`, `error`).
    pub admin_actions: IntCounterVec,
    /// Messages replayed or purged by operators, by action.
    pub admin_messages: IntCounterVec,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                // Names are static and unique, so registration cannot collide.
                let _ = registry.register(Box::new(m.clone()));
                m
            }};
        }
        let counter = |name: &str, help: &str| IntCounter::new(name, help).unwrap_or_else(|_| unreachable!());
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable!())
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).unwrap_or_else(|_| unreachable!())
        };
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).unwrap_or_else(|_| unreachable!());
        // process_* (CPU, resident memory, open file descriptors, start time), as operators expect
        // of every target; only Linux has the collector.
        #[cfg(target_os = "linux")]
        let _ = registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        let build_info = reg!(
            IntGaugeVec::new(
                Opts::new("dmr_build_info", "Always 1: the version and commit of this build"),
                &["version", "commit"]
            )
            .unwrap_or_else(|_| unreachable!())
        );
        // The commit comes from the build environment (the Dockerfile passes DMR_BUILD_COMMIT):
        // reading git here would rebuild the crate on every commit.
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("DMR_BUILD_COMMIT").unwrap_or("unknown"),
            ])
            .set(1);
        let metrics = Self {
            build_info,
            connections_active: reg!(gauge(
                "dmr_socket_connections_active",
                "Open agent connections (gRPC streams and Socket.IO)"
            )),
            connections_total: reg!(counter("dmr_socket_connections_total", "Agent connections accepted")),
            disconnections_total: reg!(counter("dmr_socket_disconnections_total", "Agent connections closed")),
            connection_duration: reg!(histogram(
                "dmr_socket_connection_duration_seconds",
                "Duration of agent connections",
                vec![1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0]
            )),
            socket_errors: reg!(counter(
                "dmr_socket_errors_total",
                "Agent connection errors, including refused authentication"
            )),
            events_received: reg!(counter_vec(
                "dmr_socket_events_received_total",
                "Events received from agents",
                &["event", "namespace"]
            )),
            events_sent: reg!(counter_vec(
                "dmr_socket_events_sent_total",
                "Events sent to agents",
                &["event", "namespace"]
            )),
            message_processing: reg!(histogram(
                "dmr_message_processing_duration_seconds",
                "Time to validate and durably queue a message",
                latency_buckets()
            )),
            auth_failures: reg!(counter_vec(
                "dmr_auth_failures_total",
                "Refused agent authentications",
                &["reason"]
            )),
            rabbitmq_connected: reg!(gauge("dmr_rabbitmq_connected", "1 while connected to RabbitMQ")),
            broker_ready: reg!(gauge(
                "dmr_broker_ready",
                "1 while the broker engine (BROKER: rabbitmq or embedded) takes and delivers messages"
            )),
            agent_dlq_messages: reg!(
                IntGaugeVec::new(
                    Opts::new(
                        "dmr_agent_dlq_messages",
                        "Messages in the dead-letter queue (<agent-id>.dlq) of each agent connected to this instance"
                    ),
                    &["agent_id"]
                )
                .unwrap_or_else(|_| unreachable!())
            ),
            publish_confirm_seconds: reg!(histogram(
                "dmr_rabbitmq_publish_confirm_duration_seconds",
                "Publish to confirm latency",
                latency_buckets()
            )),
            delivery_retries: reg!(counter(
                "dmr_delivery_retries_total",
                "Deliveries retried after a failure or timeout"
            )),
            dead_lettered: reg!(counter(
                "dmr_dead_lettered_total",
                "Messages dead-lettered after the last failed attempt"
            )),
            validation_failures: reg!(counter_vec(
                "dmr_validation_failures_total",
                "Validation-failure records written",
                &["type"]
            )),
            delivered: reg!(counter(
                "dmr_messages_delivered_total",
                "Messages acknowledged by their recipient agent"
            )),
            centops_failures: reg!(counter_vec(
                "dmr_centops_refresh_failures_total",
                "Failed CentOps directory refreshes",
                &["kind"]
            )),
            directory_refresh_failing: reg!(gauge(
                "dmr_directory_refresh_failing",
                "1 while the last directory refresh failed"
            )),
            directory_last_success: reg!(gauge(
                "dmr_directory_last_success_timestamp_seconds",
                "Unix time of the last successful directory load"
            )),
            directory_age: reg!(gauge(
                "dmr_directory_age_seconds",
                "Seconds since the last successful directory load"
            )),
            directory_agents: reg!(gauge("dmr_directory_agents", "Agents in the directory in force")),
            legacy_refusals: reg!(counter_vec(
                "dmr_legacy_auth_refusals_total",
                "Legacy (Socket.IO) agents refused at the handshake and disconnected",
                &["agent_id", "reason"]
            )),
            startup_race_redeliveries: reg!(counter(
                "dmr_delivery_startup_race_redeliveries_total",
                "Deliveries repeated after DECRYPTION_FAILED within a legacy agent's start-up window"
            )),
            agent_queue_messages: reg!(
                IntGaugeVec::new(
                    Opts::new(
                        "dmr_agent_queue_messages",
                        "Messages ready in the queue of each agent connected to this instance"
                    ),
                    &["agent_id"]
                )
                .unwrap_or_else(|_| unreachable!())
            ),
            agent_oldest_message_age: reg!(
                GaugeVec::new(
                    Opts::new(
                        "dmr_agent_oldest_message_age_seconds",
                        "Age of the oldest undelivered message of each agent connected to this instance"
                    ),
                    &["agent_id"]
                )
                .unwrap_or_else(|_| unreachable!())
            ),
            queue_wait: reg!(histogram(
                "dmr_message_queue_wait_seconds",
                "Time from a message being queued to its recipient's ack",
                vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0]
            )),
            backlog_refusals: reg!(counter(
                "dmr_sends_refused_recipient_backlogged_total",
                "Sends refused because the recipient's queue was at MESSAGE_QUEUE_MAX_DEPTH"
            )),
            send_holds: reg!(histogram(
                "dmr_send_hold_seconds",
                "Time the answer to a queued send was held because its connected recipient had messages waiting (MESSAGE_QUEUE_HOLD_MAX_MS)",
                vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
            )),
            tls_probes: reg!(counter(
                "dmr_tls_probe_connections_total",
                "Connections to the gRPC port that never started TLS (probes, health checks)"
            )),
            policy_refusals: reg!(counter_vec(
                "dmr_policy_refusals_total",
                "Sends refused by the relay policy (POLICY_URL), by sender and recipient; nothing was queued",
                &["sender_id", "recipient_id"]
            )),
            limit_refusals: reg!(counter_vec(
                "dmr_limit_refusals_total",
                "Sends, sessions and Socket.IO connection attempts refused by a limit (LIMIT_*), by agent and limit",
                &["agent_id", "limit"]
            )),
            policy_failures: reg!(counter_vec(
                "dmr_policy_refresh_failures_total",
                "Failed loads of the relay policy (POLICY_URL), by kind; the last good policy stays in force",
                &["kind"]
            )),
            policy_refresh_failing: reg!(gauge(
                "dmr_policy_refresh_failing",
                "1 while the last load of the relay policy failed"
            )),
            policy_rules: reg!(gauge("dmr_policy_rules", "Rules in the relay policy in force")),
            admin_auth_refusals: reg!(counter_vec(
                "dmr_admin_auth_refusals_total",
                "Operators' console (admin API) requests refused for want of a valid bearer token, by reason",
                &["reason"]
            )),
            admin_actions: reg!(counter_vec(
                "dmr_admin_actions_total",
                "Operators' actions on queues (replay, purge-dead-letters, purge-validation-failures), by outcome",
                &["action", "outcome"]
            )),
            admin_messages: reg!(counter_vec(
                "dmr_admin_messages_total",
                "Messages replayed or purged by operators, by action",
                &["action"]
            )),
            registry,
        };
        for kind in Self::CENTOPS_FAILURE_KINDS {
            metrics.centops_failures.with_label_values(&[kind]);
        }
        metrics
    }

    /// Every kind of failed directory refresh (see `directory::LoadError::kind`), exported as 0 from
    /// the start so that rate() and alerts see the series before the first failure.
    pub const CENTOPS_FAILURE_KINDS: [&'static str; 8] = [
        "unreachable",
        "timeout",
        "http_status",
        "invalid_json",
        "duplicate_id",
        "bad_id",
        "bad_key",
        "file_unreadable",
    ];

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        self.directory_age
            .set(chrono::Utc::now().timestamp() - self.directory_last_success.get());
        let mut families = self.registry.gather();
        // Process-wide dmr_* metrics (dmr_log_write_failures_total, from the binary's log set-up)
        // live in the default registry; its process_* duplicates ours, so only dmr_* is taken.
        families.extend(
            prometheus::gather()
                .into_iter()
                .filter(|f| f.name().starts_with("dmr_")),
        );
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
