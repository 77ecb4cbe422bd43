//! The operators' console: an admin API and a web page on a port of its own (`ADMIN_PORT`, off
//! unless set), for what operators of the original could only do in RabbitMQ's management UI — and
//! better: which agents are connected and where, queue and dead-letter depths, dead letters with
//! their metadata (never a payload) to replay or purge, and the validation failures.
//!
//! - [`auth`]: bearer tokens from `ADMIN_TOKEN_FILE`, compared in constant time; refusals logged
//!   (without the token) and counted (`dmr_admin_auth_refusals_total`);
//! - [`api`]: the JSON API under `/api/v1` (every route authenticated), its actions logged with the
//!   operator's name and counted (`dmr_admin_actions_total`, `dmr_admin_messages_total`);
//! - [`page`]: the web page at `/` (static HTML and script served by this port, no external
//!   resource; it asks for the token and calls the API);
//! - [`openapi`]: the API's OpenAPI document at `/api/v1/openapi.json`.
//!
//! The broker work (listing with dead-letter history, moving selected messages durably) is
//! [`crate::broker::admin`], on both engines; any instance answers for every agent's queues, since
//! the broker is shared.
//!
//! **Invariants:** no anonymous access to data or actions; the server still never decrypts: a
//! dead letter is shown by its envelope's clear fields only.

pub mod api;
pub mod auth;
pub mod openapi;
pub mod page;

use crate::{Core, StartError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The operators' console (`ADMIN_*`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AdminConfig {
    /// Port of the operators' console (admin API and web page). Unset: no console.
    #[arg(long = "admin-port", env = "ADMIN_PORT")]
    pub admin_port: Option<u16>,
    /// Address the console listens on (unset: BIND_ADDRESS). Keep it on an operators' network.
    #[arg(long = "admin-bind-address", env = "ADMIN_BIND_ADDRESS")]
    pub admin_bind_address: Option<String>,
    /// File of bearer tokens for the console, one per line, `<operator>:<token>` or a bare token
    /// (operator "admin"), at least 16 characters each. Required with ADMIN_PORT.
    #[arg(long = "admin-token-file", env = "ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// The console's port, bound, with its tokens loaded.
pub struct AdminListener {
    listener: TcpListener,
    tokens: auth::Tokens,
}

impl AdminListener {
    /// Binds `ADMIN_PORT` and loads `ADMIN_TOKEN_FILE`; `None` when the console is off.
    pub async fn bind(cfg: &crate::config::ServerConfig) -> Result<Option<Self>, StartError> {
        let Some(port) = cfg.admin.admin_port else {
            return Ok(None);
        };
        let Some(file) = &cfg.admin.admin_token_file else {
            return Err(crate::config::ConfigError(vec![
                "ADMIN_PORT is set but ADMIN_TOKEN_FILE is not: the console allows no anonymous access".into(),
            ])
            .into());
        };
        let tokens = auth::Tokens::load(file).map_err(|e| crate::config::ConfigError(vec![e]))?;
        let host = cfg.admin.admin_bind_address.as_deref().unwrap_or(&cfg.bind_address);
        let addr = format!("{host}:{port}");
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Some(Self { listener, tokens }))
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves the console until `stop`, then lets requests in progress finish; `instance` is this
    /// instance's name in the agents table ([`instance_name`]).
    pub async fn serve(self, core: Arc<Core>, instance: String, stop: CancellationToken) -> std::io::Result<()> {
        if let Some(addr) = self.local_addr() {
            tracing::info!(%addr, "operators' console listening");
        }
        let limits = crate::http::slow_client_limits(&core.cfg);
        let state = Arc::new(api::AdminState::new(core, self.tokens, instance));
        crate::http::serve(self.listener, router(state), limits, stop).await
    }
}

/// How an instance is named in the agents table: its host name (`HOSTNAME`: the pod's name on
/// Kubernetes) and HTTP port.
pub fn instance_name(http: Option<SocketAddr>) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    match http {
        Some(addr) => format!("{host}:{}", addr.port()),
        None => format!("{host}/{}", std::process::id()),
    }
}

/// Answers the other instances' consoles with this instance's sessions (on RabbitMQ; see
/// [`crate::broker::admin::PresenceNote`]) until `stop`. Runs on every instance, console or not.
pub async fn serve_presence(core: &Arc<Core>, instance: String, stop: CancellationToken) {
    let weak = Arc::downgrade(core);
    let source: crate::broker::admin::PresenceSource = Arc::new(move || crate::broker::admin::PresenceNote {
        instance: instance.clone(),
        sessions: weak
            .upgrade()
            .map(|core| api::presence_sessions(&core))
            .unwrap_or_default(),
    });
    core.broker.serve_presence(source, stop).await;
}

/// The console's routes: the page and the OpenAPI document are static; everything under `/api/v1`
/// but the document is authenticated.
pub fn router(state: Arc<api::AdminState>) -> axum::Router {
    axum::Router::new()
        .merge(api::routes(state))
        .merge(page::routes())
        .merge(openapi::routes())
}
