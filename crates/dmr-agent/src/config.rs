//! Agent configuration, parsed once from the environment (original names where the meaning is the
//! same, compat §8). The private key never appears in `Debug` output.

use std::path::PathBuf;
use std::time::Duration;

/// Everything the agent needs to run.
#[derive(Clone, clap::Args)]
pub struct AgentConfig {
    /// REST API port (`POST /v1/messages`, `/v1/health`, `/ready`, `/metrics`).
    #[arg(long, env = "PORT", default_value_t = 8077)]
    pub port: u16,
    /// Address the REST API binds to.
    #[arg(long, env = "BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: String,
    /// This agent's id (UUID); must match its certificate and the directory.
    #[arg(long, env = "AGENT_ID")]
    pub agent_id: String,
    /// This agent's RSA private key, PEM (PKCS#8 or PKCS#1; literal `\n` accepted).
    #[arg(
        long,
        env = "AGENT_PRIVATE_KEY",
        hide_env_values = true,
        required_unless_present = "agent_private_key_file"
    )]
    pub agent_private_key: Option<String>,
    /// Alternatively, a file holding the private key.
    #[arg(long, env = "AGENT_PRIVATE_KEY_FILE")]
    pub agent_private_key_file: Option<PathBuf>,
    /// While re-keying: a file holding the agent's previous private key. A delivery that does not
    /// decrypt with the current key is tried with this one (messages encrypted to the old key before
    /// the switch); it never signs anything (SECURITY.md "Rotating keys and certificates").
    #[arg(long, env = "AGENT_PREVIOUS_PRIVATE_KEY_FILE")]
    pub agent_previous_private_key_file: Option<PathBuf>,
    /// The agent's client certificate (PEM) for the key above.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: PathBuf,
    /// CA that issued the server's certificate (PEM).
    #[arg(long, env = "TLS_CA_FILE")]
    pub tls_ca_file: PathBuf,
    /// Server gRPC address(es), comma-separated, tried in turn on failure (e.g. `https://dmr.example:8076`).
    #[arg(long, env = "DMR_SERVER_GRPC_URL", value_delimiter = ',')]
    pub dmr_server_grpc_url: Vec<String>,
    /// Name to verify in the server certificate, if it differs from the URL's host.
    #[arg(long, env = "DMR_SERVER_TLS_NAME")]
    pub dmr_server_tls_name: Option<String>,
    /// Where decrypted incoming messages are POSTed.
    #[arg(long, env = "OUTGOING_MESSAGE_ENDPOINT")]
    pub outgoing_message_endpoint: String,
    /// Timeout of that POST, ms (keep it below the server's MESSAGE_DELIVERY_TIMEOUT_MS).
    #[arg(long, env = "OUTGOING_MESSAGE_TIMEOUT_MS", default_value_t = 1500)]
    pub outgoing_message_timeout_ms: u64,
    /// How long `POST /v1/messages` waits for the server's confirmation before answering 504, ms.
    #[arg(long, env = "MESSAGE_DELIVERY_TIMEOUT_MS", default_value_t = 2000)]
    pub message_delivery_timeout_ms: u64,
    /// Initial reconnection delay, ms (doubled per failure, with jitter).
    #[arg(long, env = "WEBSOCKET_RECONNECTION_DELAY", default_value_t = 1000)]
    pub reconnection_delay_ms: u64,
    /// Maximum reconnection delay, ms.
    #[arg(long, env = "WEBSOCKET_RECONNECTION_DELAY_MAX", default_value_t = 5000)]
    pub reconnection_delay_max_ms: u64,
    /// Largest accepted `POST /v1/messages` body, bytes (the original's 100 kB).
    #[arg(long, env = "MESSAGE_MAX_BYTES", default_value_t = 102_400)]
    pub message_max_bytes: usize,
    /// How many recently delivered message ids are remembered to suppress redeliveries (0 = off).
    #[arg(long, env = "DUPLICATE_SUPPRESSION_WINDOW", default_value_t = 100_000)]
    pub duplicate_suppression_window: usize,
    /// On SIGTERM: how long in-flight work may take before the agent exits anyway, ms.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,
    /// Browser origins (`scheme://host[:port]`, comma-separated) allowed to POST messages; a request
    /// carrying any other `Origin` header is refused (none allowed by default).
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,
    /// How long a REST client may take to send a request's headers, in ms (also how long an idle
    /// keep-alive connection stays open). A client that trickles its headers (slowloris) is
    /// disconnected after this.
    #[arg(long, env = "HTTP_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub http_header_read_timeout_ms: u64,
    /// How long a REST client may take to send a request's body once its headers arrived, in ms;
    /// a slower body is answered 408 and the connection closed.
    #[arg(long, env = "HTTP_BODY_READ_TIMEOUT_MS", default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub http_body_read_timeout_ms: u64,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("agent_id", &self.agent_id)
            .field("agent_private_key", &"<redacted>")
            .field("dmr_server_grpc_url", &self.dmr_server_grpc_url)
            .field("outgoing_message_endpoint", &self.outgoing_message_endpoint)
            .finish_non_exhaustive()
    }
}

impl AgentConfig {
    /// A configuration with the documented defaults (used by `dmr dev` and tests). The defaults
    /// come from the definitions above, with the environment ignored: each is written once.
    pub fn new(
        agent_id: String,
        key_file: PathBuf,
        cert_file: PathBuf,
        ca_file: PathBuf,
        server: String,
        endpoint: String,
    ) -> Self {
        let flag = |name: &str, value: std::ffi::OsString| {
            let mut arg = std::ffi::OsString::from(format!("--{name}="));
            arg.push(value);
            arg
        };
        let args = [
            flag("agent-id", agent_id.into()),
            flag("agent-private-key-file", key_file.into_os_string()),
            flag("tls-cert-file", cert_file.into_os_string()),
            flag("tls-ca-file", ca_file.into_os_string()),
            flag("dmr-server-grpc-url", server.into()),
            flag("outgoing-message-endpoint", endpoint.into()),
        ];
        let command = <Self as clap::Args>::augment_args(clap::Command::new("defaults").no_binary_name(true))
            .mut_args(|a| a.env(None));
        command
            .try_get_matches_from(args)
            .and_then(|m| <Self as clap::FromArgMatches>::from_arg_matches(&m))
            .unwrap_or_else(|e| panic!("the agent configuration's own defaults do not parse: {e}"))
    }

    /// The private key PEM, from the variable or the file.
    pub fn private_key_pem(&self) -> Result<String, crate::StartError> {
        match (&self.agent_private_key, &self.agent_private_key_file) {
            (Some(pem), _) => Ok(pem.clone()),
            (None, Some(path)) => std::fs::read_to_string(path).map_err(|source| crate::StartError::File {
                what: "AGENT_PRIVATE_KEY_FILE",
                path: path.clone(),
                source,
            }),
            (None, None) => Err(crate::StartError::Config(
                "AGENT_PRIVATE_KEY or AGENT_PRIVATE_KEY_FILE must be set".into(),
            )),
        }
    }

    /// The previous private key PEM (`AGENT_PREVIOUS_PRIVATE_KEY_FILE`), if set.
    pub fn previous_private_key_pem(&self) -> Result<Option<String>, crate::StartError> {
        let Some(path) = &self.agent_previous_private_key_file else {
            return Ok(None);
        };
        std::fs::read_to_string(path)
            .map(Some)
            .map_err(|source| crate::StartError::File {
                what: "AGENT_PREVIOUS_PRIVATE_KEY_FILE",
                path: path.clone(),
                source,
            })
    }

    /// The REST confirmation timeout.
    pub fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.message_delivery_timeout_ms)
    }
}
