//! The DMR agent.
//!
//! Internal services POST v1 messages to the REST API ([`api`]); the agent encrypts each for its
//! recipient and sends it up its one mutual-TLS gRPC stream ([`link`]). Deliveries coming down the
//! stream are decrypted, verified and POSTed to `OUTGOING_MESSAGE_ENDPOINT` ([`inbox`]).
//!
//! **Invariant:** the private key never leaves this process: it signs, decrypts and authenticates
//! the TLS client, and is never logged or sent.

pub mod api;
pub mod config;
pub mod guard;
pub mod inbox;
pub mod link;
pub mod metrics;
pub mod openapi;
pub mod preflight;
pub mod recent;

use config::AgentConfig;
use dmr::keys::PrivateKey;
use link::{DirectoryCell, Link};
use metrics::Metrics;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Start-up failures, each naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// A file could not be read.
    #[error("{what} {path}: {source}")]
    File {
        /// Which setting.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The private key is unusable.
    #[error("AGENT_PRIVATE_KEY: {0}")]
    Key(#[from] dmr::keys::KeyError),
    /// The previous private key is unusable.
    #[error("AGENT_PREVIOUS_PRIVATE_KEY_FILE: {0}")]
    PreviousKey(dmr::keys::KeyError),
    /// A certificate file holds no usable certificate.
    #[error("{variable} {path}: {problem}")]
    BadCertificate {
        /// Which setting.
        variable: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// `AGENT_ID` is not the id the certificate names (the server goes by the certificate).
    #[error("AGENT_ID {agent_id} is not the agent id in TLS_CERT_FILE {path} ({cert_id})")]
    IdMismatch {
        /// The configured id.
        agent_id: String,
        /// The certificate's id.
        cert_id: String,
        /// The certificate file.
        path: PathBuf,
    },
    /// The private key is not the certificate's.
    #[error("AGENT_PRIVATE_KEY does not match the certificate in TLS_CERT_FILE {path}")]
    KeyMismatch {
        /// The certificate file.
        path: PathBuf,
    },
    /// A URL setting is unusable.
    #[error("{variable} {url:?} {problem}")]
    BadUrl {
        /// Which setting.
        variable: &'static str,
        /// The value.
        url: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// The REST port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// An agent with its REST port bound, ready to run.
pub struct Agent {
    link: Arc<Link>,
    inbox: Arc<inbox::Inbox>,
    api: Arc<api::ApiState>,
    listener: TcpListener,
    max_body: usize,
    slow_clients: dmr_http::SlowClientLimits,
    shutdown_timeout: Duration,
}

/// The REST port's limits on slow clients (`HTTP_HEADER_READ_TIMEOUT_MS`, `HTTP_BODY_READ_TIMEOUT_MS`).
fn slow_client_limits(cfg: &AgentConfig) -> dmr_http::SlowClientLimits {
    dmr_http::SlowClientLimits {
        header_read_timeout: Duration::from_millis(cfg.http_header_read_timeout_ms),
        body_read_timeout: Duration::from_millis(cfg.http_body_read_timeout_ms),
    }
}

impl Agent {
    /// Loads keys and certificates and binds the REST port (port 0 picks a free one).
    pub async fn bind(cfg: AgentConfig) -> Result<Self, StartError> {
        if !dmr::message::is_uuid(&cfg.agent_id) {
            return Err(StartError::Config(format!("AGENT_ID {:?} is not a UUID", cfg.agent_id)));
        }
        let key = Arc::new(PrivateKey::from_pem(&cfg.private_key_pem()?)?);
        let read = |variable: &'static str, path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|source| StartError::File {
                what: variable,
                path: path.to_owned(),
                source,
            })
        };
        preflight::check(
            &cfg,
            &key,
            &read("TLS_CERT_FILE", &cfg.tls_cert_file)?,
            &read("TLS_CA_FILE", &cfg.tls_ca_file)?,
        )?;
        let metrics = Arc::new(Metrics::new());
        let directory = Arc::new(DirectoryCell::default());
        let link = Link::new(cfg.clone(), &key.to_pkcs8_pem()?, directory.clone(), metrics.clone())?;
        let previous_key = match cfg.previous_private_key_pem()? {
            Some(pem) => Some(PrivateKey::from_pem(&pem).map_err(StartError::PreviousKey)?),
            None => None,
        };
        let inbox = inbox::Inbox::new(
            Arc::new(inbox::DecryptionKeys {
                current: key.clone(),
                previous: previous_key,
            }),
            directory,
            cfg.outgoing_message_endpoint.clone(),
            Duration::from_millis(cfg.outgoing_message_timeout_ms),
            cfg.duplicate_suppression_window,
            metrics.clone(),
        )
        .map_err(|e| StartError::Config(format!("HTTP client: {e}")))?;
        let api = api::ApiState::new(
            cfg.agent_id.to_ascii_lowercase(),
            key,
            link.clone(),
            metrics,
            guard::Origins::new(&cfg.cors_allowed_origins),
        );
        let addr = format!("{}:{}", cfg.bind_address, cfg.port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Self {
            link,
            inbox,
            api,
            listener,
            max_body: cfg.message_max_bytes,
            slow_clients: slow_client_limits(&cfg),
            shutdown_timeout: Duration::from_millis(cfg.shutdown_timeout_ms),
        })
    }

    /// The bound REST address.
    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The stream (for tests and the dev runner).
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Runs until `shutdown`. Then it stops taking REST requests, lets those in flight get their
    /// answer from the server, finishes the delivery in hand, and closes the stream — or gives up
    /// after `SHUTDOWN_TIMEOUT_MS` (undelivered messages stay in RabbitMQ).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let link_stop = CancellationToken::new();
        let link_task = tokio::spawn(self.link.clone().run(self.inbox.clone(), link_stop.clone()));
        let app = api::router(self.api.clone(), self.max_body);
        let listener = self.listener;
        let everything = async {
            let served = dmr_http::serve(listener, app, self.slow_clients, shutdown.clone()).await;
            link_stop.cancel();
            let _ = link_task.await;
            served
        };
        let overdue = async {
            shutdown.cancelled().await;
            tokio::time::sleep(self.shutdown_timeout).await;
        };
        let served = tokio::select! {
            served = everything => served,
            () = overdue => {
                tracing::warn!("shutdown deadline passed; exiting with work still open");
                Ok(())
            }
        };
        served.map_err(|source| StartError::Bind {
            addr: "REST".into(),
            source,
        })
    }
}
