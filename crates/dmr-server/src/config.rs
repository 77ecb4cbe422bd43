//! Server configuration, parsed once from the environment (original names where the meaning is
//! the same, compat §8). Secrets never appear in `Debug` output.

use std::path::PathBuf;
use std::time::Duration;

/// Everything the server needs to run.
#[derive(Clone, clap::Args)]
pub struct ServerConfig {
    /// HTTP port: /metrics, /health, /ready (and the legacy Socket.IO edge).
    #[arg(long, env = "PORT", default_value_t = 8075)]
    pub port: u16,
    /// gRPC port (mutual TLS) for agent streams.
    #[arg(long, env = "GRPC_PORT", default_value_t = 8076)]
    pub grpc_port: u16,
    /// Address both listeners bind to.
    #[arg(long, env = "BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: String,
    /// Server certificate chain (PEM).
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: PathBuf,
    /// Server private key (PEM).
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: PathBuf,
    /// CA that issues agents' client certificates (PEM).
    #[arg(long, env = "TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: PathBuf,
    /// CentOps agent list: an http(s) URL or a local file path in the same JSON format.
    #[arg(long, env = "CENTOPS_CONFIGURATION_URL")]
    pub centops_configuration_url: String,
    /// Timeout for one CentOps request, in ms.
    #[arg(long, env = "CENTOPS_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub centops_request_timeout_ms: u64,
    /// When to refresh the directory: a cron expression of 5 fields (minute hour day-of-month month
    /// day-of-week, as the original) or 6 fields (a leading seconds field). Evaluated in UTC.
    #[arg(long, env = "CENTOPS_CONFIGURATION_CRON_TIME", default_value = "*/30 * * * *")]
    pub centops_configuration_cron_time: String,
    /// For a file source: how often to check the file for changes, in ms (0 = only on the schedule).
    #[arg(long, env = "CENTOPS_FILE_POLL_INTERVAL_MS", default_value_t = 2000)]
    pub centops_file_poll_interval_ms: u64,
    /// Which broker engine queues the messages.
    #[command(flatten)]
    pub broker: BrokerConfig,
    /// RabbitMQ connection, and the queue settings both engines use (TTLs, prefetch).
    #[command(flatten)]
    pub rabbitmq: RabbitConfig,
    /// How long to wait for an agent's delivery ack, in ms. With several deliveries in flight, the
    /// clock of each starts when the one before it was answered (the agent answers in order).
    #[arg(long, env = "MESSAGE_DELIVERY_TIMEOUT_MS", default_value_t = 2000)]
    pub message_delivery_timeout_ms: u64,
    /// Deliveries handed to one gRPC agent ahead of its answers (the agent still posts them to its
    /// endpoint one at a time, in queue order). 1 = one at a time, as before. Capped by
    /// RABBITMQ_PREFETCH_COUNT. Legacy Socket.IO agents always get one at a time.
    #[arg(long, env = "MESSAGE_DELIVERY_WINDOW", default_value_t = 8,
        value_parser = clap::value_parser!(u16).range(1..))]
    pub message_delivery_window: u16,
    /// Most delivery attempts per message before it is dead-lettered to `<agent-id>.dlq`
    /// (0 = no limit: MESSAGE_DELIVERY_RETRY_BUDGET_MS alone decides).
    #[arg(long, env = "MESSAGE_DELIVERY_MAX_ATTEMPTS", default_value_t = 0)]
    pub message_delivery_max_attempts: u32,
    /// First pause between delivery attempts, in ms (then doubled, with jitter, up to 30 s).
    #[arg(long, env = "MESSAGE_DELIVERY_RETRY_DELAY_MS", default_value_t = 200)]
    pub message_delivery_retry_delay_ms: u64,
    /// How long, in pauses between attempts, a failing message is retried before it is
    /// dead-lettered, in ms (a short outage of the agent's endpoint must not dead-letter).
    #[arg(long, env = "MESSAGE_DELIVERY_RETRY_BUDGET_MS", default_value_t = 120_000)]
    pub message_delivery_retry_budget_ms: u64,
    /// Most messages a recipient's queue may hold before new sends to it are refused (gRPC
    /// RECIPIENT_BACKLOGGED, REST 429 with Retry-After); 0 = no cap (the original's behaviour).
    #[arg(long, env = "MESSAGE_QUEUE_MAX_DEPTH", default_value_t = 0)]
    pub message_queue_max_depth: u32,
    /// Longest time the answer to a send (already queued) is held while the recipient is connected
    /// and its queue has MESSAGE_QUEUE_HOLD_DEPTH messages waiting, in ms, so that senders slow to
    /// the recipient's pace; 0 = never hold. Keep it below the agents' MESSAGE_DELIVERY_TIMEOUT_MS.
    #[arg(long, env = "MESSAGE_QUEUE_HOLD_MAX_MS", default_value_t = 1000)]
    pub message_queue_hold_max_ms: u64,
    /// Messages waiting in a connected recipient's queue (beyond those its session took) from which
    /// answers to sends to it are held (see MESSAGE_QUEUE_HOLD_MAX_MS).
    #[arg(long, env = "MESSAGE_QUEUE_HOLD_DEPTH", default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub message_queue_hold_depth: u32,
    /// Largest accepted envelope `payload` (the JWE), in bytes.
    #[arg(long, env = "MESSAGE_MAX_PAYLOAD_BYTES", default_value_t = 1_048_576)]
    pub message_max_payload_bytes: usize,
    /// On SIGTERM: how long to wait for in-flight sends to be answered before exiting anyway, ms.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,
    /// The legacy Socket.IO edge.
    #[command(flatten)]
    pub legacy: LegacyConfig,
    /// The relay policy and the limits per agent and per instance.
    #[command(flatten)]
    pub policy: PolicyConfig,
    /// HTTP port: how long a client may take to send a request's headers, in ms (also how long an
    /// idle keep-alive connection stays open). A client that trickles its headers (slowloris) is
    /// disconnected after this.
    #[arg(long, env = "HTTP_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub http_header_read_timeout_ms: u64,
    /// HTTP port: how long a client may take to send a request's body once its headers arrived, in
    /// ms; a slower body is refused and the connection closed. Socket.IO polling bodies are at most
    /// about 1 MB: keep it well above what the slowest legacy agent's link needs for that.
    #[arg(long, env = "HTTP_BODY_READ_TIMEOUT_MS", default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub http_body_read_timeout_ms: u64,
    /// gRPC port: how long a client may take to start and complete its TLS handshake, in ms. At most
    /// 256 handshakes run at once, so this also bounds how long silent or slow clients hold those
    /// places.
    #[arg(long, env = "TLS_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub tls_handshake_timeout_ms: u64,
    /// gRPC port: most HTTP/2 streams one connection may have open at once (announced in
    /// SETTINGS_MAX_CONCURRENT_STREAMS; more are refused with REFUSED_STREAM). An agent needs two
    /// (its session, and a health check or ListAgents); without a cap a connection could open
    /// streams without limit.
    #[arg(long, env = "GRPC_MAX_CONCURRENT_STREAMS", default_value_t = 32,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_concurrent_streams: u32,
    /// The operators' console (`ADMIN_PORT`, `ADMIN_TOKEN_FILE`); off unless `ADMIN_PORT` is set.
    #[command(flatten)]
    pub admin: crate::admin::AdminConfig,
}

/// The Socket.IO edge for legacy TypeScript agents (compat §4).
#[derive(Clone, Debug, clap::Args)]
pub struct LegacyConfig {
    /// Socket.IO namespace legacy agents connect to.
    #[arg(
        long = "web-socket-namespace",
        env = "WEB_SOCKET_NAMESPACE",
        default_value = "/v1/dmr-agent-events"
    )]
    pub namespace: String,
    /// Read for compatibility with the original's configuration; no effect here (the last-token
    /// rule, WEB_SOCKET_LAST_TOKEN_TTL_MS, decides which expired tokens come back).
    #[arg(
        long = "web-socket-max-disconnection-duration",
        env = "WEB_SOCKET_MAX_DISCONNECTION_DURATION",
        default_value_t = 120_000
    )]
    pub max_disconnection_duration_ms: u64,
    /// How long (ms) the digest of each legacy agent's last authenticated token is remembered in
    /// RabbitMQ: within it, that exact token (and no other expired one) lets the agent back in after
    /// a restart of any server instance, since the original agent never refreshes its token.
    #[arg(
        long = "web-socket-last-token-ttl",
        env = "WEB_SOCKET_LAST_TOKEN_TTL_MS",
        default_value_t = 604_800_000
    )]
    pub last_token_ttl_ms: u64,
    /// Opt-in, for the first switch from the original server (no token seen yet): accept a validly
    /// signed token that has an `exp` and expired at most this long ago (ms), from any agent. A
    /// captured token can be replayed for this long: keep it off (0) or as short as the switch needs.
    #[arg(
        long = "web-socket-expired-token-grace",
        env = "WEB_SOCKET_EXPIRED_TOKEN_GRACE_MS",
        default_value_t = 0
    )]
    pub expired_token_grace_ms: u64,
}

impl Default for LegacyConfig {
    /// The defaults written in the definitions above (the environment is not read).
    fn default() -> Self {
        defaults_with(&[])
    }
}

/// The relay policy (who may send to whom) and the limits that keep one agent from crowding out the
/// others. A limit of 0 is off. The policy file may override the per-agent send limits agent by
/// agent (`dmr::policy`).
#[derive(Clone, Debug, clap::Args)]
pub struct PolicyConfig {
    /// The relay policy: an http(s) URL or a local file path (JSON, see README "Relay policy and
    /// limits"), refreshed like the directory (CENTOPS_CONFIGURATION_CRON_TIME, and on file change).
    /// Unset: every agent in the directory may send to every other (the original's behaviour).
    #[arg(long = "policy-url", env = "POLICY_URL")]
    pub url: Option<String>,
    /// Sustained sends per second per agent (0 = no limit). Over it: RESOURCE_EXHAUSTED (REST 429).
    #[arg(
        long = "limit-sends-per-second",
        env = "LIMIT_SENDS_PER_SECOND",
        default_value_t = 1000
    )]
    pub sends_per_second: u32,
    /// Sends per agent allowed at once above the sustained rate (the token bucket's size).
    #[arg(long = "limit-send-burst", env = "LIMIT_SEND_BURST", default_value_t = 2000,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub send_burst: u32,
    /// Sustained payload bytes per second per agent (0 = no limit); the bucket holds one second's
    /// worth, and at least one largest payload.
    #[arg(long = "limit-send-bytes-per-second", env = "LIMIT_SEND_BYTES_PER_SECOND", default_value_t = 64 * 1024 * 1024)]
    pub send_bytes_per_second: u64,
    /// Sends of one agent awaiting their answer at once; one more is refused (RESOURCE_EXHAUSTED,
    /// REST 429) until one is answered.
    #[arg(long = "limit-sends-in-flight", env = "LIMIT_SENDS_IN_FLIGHT", default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub sends_in_flight: u32,
    /// Sessions (gRPC streams and Socket.IO sockets) this instance holds at most (0 = no limit); an
    /// agent over it is told to connect to another instance.
    #[arg(long = "limit-sessions", env = "LIMIT_SESSIONS", default_value_t = 20_000)]
    pub sessions: u32,
    /// TLS handshakes the gRPC port runs at once (each within TLS_HANDSHAKE_TIMEOUT_MS); further
    /// connections wait in the listen backlog, so a flood of slow clients cannot exhaust the server.
    #[arg(long = "limit-tls-handshakes", env = "LIMIT_TLS_HANDSHAKES", default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub tls_handshakes: u32,
    /// Sessions one agent may open on this instance per minute, sustained (0 = no limit): a
    /// flapping agent must not churn the broker with consumers.
    #[arg(
        long = "limit-session-opens-per-minute",
        env = "LIMIT_SESSION_OPENS_PER_MINUTE",
        default_value_t = 30
    )]
    pub session_opens_per_minute: u32,
    /// Sessions one agent may open at once above that rate.
    #[arg(long = "limit-session-open-burst", env = "LIMIT_SESSION_OPEN_BURST", default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub session_open_burst: u32,
    /// Socket.IO connection attempts (engine.io handshakes) per source address per minute
    /// (0 = no limit); a burst of this many is allowed. Behind a proxy every client has the proxy's
    /// address: raise it there.
    #[arg(
        long = "limit-socket-connects-per-minute",
        env = "LIMIT_SOCKET_CONNECTS_PER_MINUTE",
        default_value_t = 120
    )]
    pub socket_connects_per_minute: u32,
}

impl Default for PolicyConfig {
    /// The defaults written in the definitions above (the environment is not read).
    fn default() -> Self {
        defaults_with(&[])
    }
}

/// The broker engines (`crate::broker`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerEngine {
    /// RabbitMQ (RABBITMQ_DEFAULT_*): the original's topology, shared by any number of server
    /// instances.
    Rabbitmq,
    /// In-process queues, durable on disk in EMBEDDED_DATA_DIR: one server instance, nothing to
    /// install.
    Embedded,
}

impl BrokerEngine {
    /// The name used in `BROKER`, logs and `/ready`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rabbitmq => "rabbitmq",
            Self::Embedded => "embedded",
        }
    }
}

/// Which broker engine the server uses.
#[derive(Clone, Debug, clap::Args)]
pub struct BrokerConfig {
    /// The broker engine: `rabbitmq` (the default: a drop-in for the original's deployments, any
    /// number of instances) or `embedded` (queues in this process, durable on disk in
    /// EMBEDDED_DATA_DIR; a single instance).
    #[arg(long = "broker", env = "BROKER", value_enum, default_value_t = BrokerEngine::Rabbitmq)]
    pub engine: BrokerEngine,
    /// The embedded engine's data directory (created if missing; one server at a time).
    #[arg(long = "embedded-data-dir", env = "EMBEDDED_DATA_DIR", default_value = "dmr-data")]
    pub embedded_data_dir: PathBuf,
}

impl Default for BrokerConfig {
    /// The defaults written in the definitions above (the environment is not read).
    fn default() -> Self {
        defaults_with(&[])
    }
}

/// RabbitMQ settings (compat §6, §8). The TTLs, the validation-failures queue and the prefetch
/// count apply to the embedded engine too.
#[derive(Clone, clap::Args)]
pub struct RabbitConfig {
    /// Broker host.
    #[arg(long = "rabbitmq-host", env = "RABBITMQ_DEFAULT_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Broker AMQP port.
    #[arg(
        id = "rabbitmq_port",
        long = "rabbitmq-port",
        env = "RABBITMQ_DEFAULT_PORT",
        default_value_t = 5672
    )]
    pub port: u16,
    /// User name.
    #[arg(long = "rabbitmq-user", env = "RABBITMQ_DEFAULT_USER", default_value = "guest")]
    pub user: String,
    /// Password.
    #[arg(
        long = "rabbitmq-pass",
        env = "RABBITMQ_DEFAULT_PASS",
        default_value = "guest",
        hide_env_values = true
    )]
    pub pass: String,
    /// Virtual host.
    #[arg(long = "rabbitmq-vhost", env = "RABBITMQ_DEFAULT_VHOST", default_value = "/")]
    pub vhost: String,
    /// Message TTL in agent queues, ms.
    #[arg(long = "rabbitmq-ttl", env = "RABBITMQ_DEFAULT_TTL", default_value_t = 300_000)]
    pub ttl_ms: u32,
    /// Message TTL in dead-letter queues, ms.
    #[arg(
        long = "rabbitmq-dlq-ttl",
        env = "RABBITMQ_DEFAULT_DLQ_TTL",
        default_value_t = 86_400_000
    )]
    pub dlq_ttl_ms: u32,
    /// Message TTL in the validation-failures queue, ms.
    #[arg(
        long = "rabbitmq-validation-failures-ttl",
        env = "RABBITMQ_VALIDATION_FAILURES_TTL",
        default_value_t = 86_400_000
    )]
    pub validation_failures_ttl_ms: u32,
    /// Name of the validation-failures queue.
    #[arg(
        long = "rabbitmq-validation-failures-queue",
        env = "RABBITMQ_VALIDATION_FAILURES_QUEUE",
        default_value = "validation-failures"
    )]
    pub validation_failures_queue: String,
    /// Pause between reconnection attempts, ms.
    #[arg(
        long = "rabbitmq-reconnect-interval",
        env = "RABBITMQ_DEFAULT_DEFAULT_RECONNECT_INTERVAL",
        default_value_t = 5000
    )]
    pub reconnect_interval_ms: u64,
    /// Unacknowledged deliveries RabbitMQ may push per agent stream (bounds server memory).
    #[arg(
        long = "rabbitmq-prefetch-count",
        env = "RABBITMQ_PREFETCH_COUNT",
        default_value_t = 8
    )]
    pub prefetch_count: u16,
    /// Agent consumers per AMQP connection; more open further connections (each consumer has a
    /// channel of its own, and RabbitMQ allows 2,047 channels per connection by default).
    #[arg(
        long = "rabbitmq-consumers-per-connection",
        env = "RABBITMQ_CONSUMERS_PER_CONNECTION",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u16).range(1..=2000)
    )]
    pub consumers_per_connection: u16,
    /// How often an idle agent consumer checks that its queue still exists, ms.
    #[arg(
        long = "rabbitmq-consumer-check-interval",
        env = "RABBITMQ_CONSUMER_CHECK_INTERVAL_MS",
        default_value_t = 30_000
    )]
    pub consumer_check_interval_ms: u64,
}

impl std::fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("pass", &"<redacted>")
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

impl Default for RabbitConfig {
    /// The defaults written in the definitions above (the environment is not read).
    fn default() -> Self {
        defaults_with(&[])
    }
}

impl RabbitConfig {
    /// The AMQP URI (contains the password: never log it).
    pub fn uri(&self) -> String {
        // The vhost is one path segment of the URI: "/" (the default vhost) becomes "%2F".
        let vhost = enc(&self.vhost);
        format!(
            "amqp://{}:{}@{}:{}/{}",
            enc(&self.user),
            enc(&self.pass),
            self.host,
            self.port,
            vhost
        )
    }

    /// The pause between reconnection attempts.
    pub fn reconnect_interval(&self) -> Duration {
        Duration::from_millis(self.reconnect_interval_ms)
    }

    /// How often an idle consumer checks its queue.
    pub fn consumer_check_interval(&self) -> Duration {
        Duration::from_millis(self.consumer_check_interval_ms)
    }

    /// Where the broker is, without credentials.
    pub fn display_addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Settings that are each valid but do not make sense (together).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {}", .0.join("; "))]
pub struct ConfigError(pub Vec<String>);

/// Parses `args` as flags only, ignoring the environment: the defaults written in the clap
/// definitions, plus what `args` sets. Only ever called with the flags of the callers above, which
/// the definitions accept, so a failure is a bug in this file.
fn defaults_with<T: clap::Args + clap::FromArgMatches>(args: &[std::ffi::OsString]) -> T {
    let command = T::augment_args(clap::Command::new("defaults").no_binary_name(true)).mut_args(|a| a.env(None));
    command
        .try_get_matches_from(args)
        .and_then(|m| T::from_arg_matches(&m))
        .unwrap_or_else(|e| panic!("the configuration's own defaults do not parse: {e}"))
}

impl ServerConfig {
    /// A configuration with the documented defaults and the given files (used by `dmr dev` and tests).
    /// The defaults come from the definitions above: each is written once.
    pub fn new(tls_cert_file: PathBuf, tls_key_file: PathBuf, tls_client_ca_file: PathBuf, centops: String) -> Self {
        defaults_with(&[
            "--tls-cert-file".into(),
            tls_cert_file.into_os_string(),
            "--tls-key-file".into(),
            tls_key_file.into_os_string(),
            "--tls-client-ca-file".into(),
            tls_client_ca_file.into_os_string(),
            "--centops-configuration-url".into(),
            centops.into(),
        ])
    }

    /// Checks what clap cannot see field by field; every problem is reported, each naming its
    /// variable.
    pub fn check(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut require = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_owned());
            }
        };
        require(
            self.message_delivery_timeout_ms > 0,
            "MESSAGE_DELIVERY_TIMEOUT_MS must be above 0",
        );
        require(
            self.centops_request_timeout_ms > 0,
            "CENTOPS_REQUEST_TIMEOUT_MS must be above 0",
        );
        require(
            self.message_max_payload_bytes > 0,
            "MESSAGE_MAX_PAYLOAD_BYTES must be above 0",
        );
        require(
            self.rabbitmq.prefetch_count > 0,
            "RABBITMQ_PREFETCH_COUNT must be above 0 (0 would mean no limit)",
        );
        require(
            self.rabbitmq.reconnect_interval_ms > 0,
            "RABBITMQ_DEFAULT_DEFAULT_RECONNECT_INTERVAL must be above 0",
        );
        require(
            u32::try_from(self.legacy.last_token_ttl_ms).is_ok(),
            "WEB_SOCKET_LAST_TOKEN_TTL_MS must fit RabbitMQ's 32-bit message TTL (at most 4294967295)",
        );
        require(
            self.message_delivery_max_attempts > 0 || self.message_delivery_retry_budget_ms > 0,
            "MESSAGE_DELIVERY_MAX_ATTEMPTS and MESSAGE_DELIVERY_RETRY_BUDGET_MS cannot both be 0 (a failing message would be retried forever)",
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }

    /// The delivery ack timeout.
    pub fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.message_delivery_timeout_ms)
    }

    /// The longest hold of a send's answer (`MESSAGE_QUEUE_HOLD_MAX_MS`; zero = off).
    pub fn message_queue_hold_max(&self) -> Duration {
        Duration::from_millis(self.message_queue_hold_max_ms)
    }

    /// Deliveries in flight per gRPC session: `MESSAGE_DELIVERY_WINDOW`, at most the prefetch count.
    pub fn delivery_window(&self) -> usize {
        usize::from(self.message_delivery_window.min(self.rabbitmq.prefetch_count).max(1))
    }

    /// The first pause between delivery attempts.
    pub fn message_delivery_retry_delay(&self) -> Duration {
        Duration::from_millis(self.message_delivery_retry_delay_ms)
    }

    /// The total of pauses between delivery attempts before a message is dead-lettered.
    pub fn message_delivery_retry_budget(&self) -> Duration {
        Duration::from_millis(self.message_delivery_retry_budget_ms)
    }

    /// The shutdown grace period.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::ServerConfig;

    fn config() -> ServerConfig {
        ServerConfig::new("c".into(), "k".into(), "ca".into(), "centops.json".into())
    }

    #[test]
    fn defaults_come_from_the_definitions() {
        let cfg = config();
        assert_eq!((cfg.port, cfg.grpc_port), (8075, 8076));
        assert_eq!(cfg.message_delivery_retry_budget_ms, 120_000);
        assert_eq!(cfg.rabbitmq.vhost, "/");
        assert_eq!(cfg.rabbitmq.consumers_per_connection, 1000);
        assert_eq!(cfg.legacy.namespace, "/v1/dmr-agent-events");
        assert_eq!(cfg.centops_configuration_url, "centops.json");
        assert!(cfg.check().is_ok());
    }

    #[test]
    fn the_vhost_is_one_percent_encoded_path_segment() {
        let mut cfg = config();
        assert!(cfg.rabbitmq.uri().ends_with("/%2F"));
        cfg.rabbitmq.vhost = "team/dmr".into();
        assert!(cfg.rabbitmq.uri().ends_with("/team%2Fdmr"));
    }

    #[test]
    fn contradictions_are_refused_together_naming_each_variable() {
        let mut cfg = config();
        cfg.rabbitmq.prefetch_count = 0;
        cfg.message_delivery_max_attempts = 0;
        cfg.message_delivery_retry_budget_ms = 0;
        let err = cfg.check().unwrap_err().to_string();
        assert!(
            err.contains("RABBITMQ_PREFETCH_COUNT") && err.contains("MESSAGE_DELIVERY_RETRY_BUDGET_MS"),
            "{err}"
        );
    }
}
