//! The server's HTTP port: the legacy Socket.IO edge ([`crate::legacy`]), `/metrics`, `/health`
//! (liveness) and `/ready` (readiness: RabbitMQ connected and a directory loaded, not shutting down;
//! the directory's refresh state is reported beside it, see README "Directory changes").

use crate::Core;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::json;
use std::sync::Arc;

/// The HTTP routes, with the legacy Socket.IO edge layered in front.
pub fn router(core: Arc<Core>) -> Router {
    let (socket_io, _io) = crate::legacy::layer(core.clone());
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(core.clone())
        .layer(socket_io)
        .layer(axum::middleware::from_fn_with_state(
            core,
            crate::legacy::limit_connects,
        ))
}

async fn metrics(State(core): State<Arc<Core>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], core.metrics.render())
}

async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok", "timestamp": chrono::Utc::now().timestamp_millis()}))
}

async fn ready(State(core): State<Arc<Core>>) -> impl IntoResponse {
    let engine = core.broker.engine();
    let broker_ready = core.broker.is_ready();
    let rabbitmq = match engine {
        crate::config::BrokerEngine::Rabbitmq if broker_ready => "connected",
        crate::config::BrokerEngine::Rabbitmq => "disconnected",
        crate::config::BrokerEngine::Embedded => "not used",
    };
    let ready = core.is_ready();
    let agents = core.directory.current().len();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut headers = axum::http::HeaderMap::new();
    if !ready {
        headers.insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("5"),
        );
    }
    (
        status,
        headers,
        Json(json!({
            "status": if ready { "ready" } else { "not ready" },
            "broker": {"engine": engine.as_str(), "ready": broker_ready},
            "rabbitmq": rabbitmq,
            "directoryLoaded": core.directory.is_loaded(),
            "policy": {"configured": core.cfg.policy.url.is_some(), "loaded": core.policy.is_loaded(), "refreshFailing": core.metrics.policy_refresh_failing.get() == 1},
            "shuttingDown": core.stop.is_cancelled(),
            "directoryAgents": agents,
            "directoryRefreshFailing": core.metrics.directory_refresh_failing.get() == 1,
            "directoryAgeSeconds": chrono::Utc::now().timestamp() - core.metrics.directory_last_success.get(),
            "connectedAgents": core.sessions.connected().len(),
        })),
    )
}

pub use dmr_http::{SlowClientLimits, serve};

/// The server's limits on slow clients (`HTTP_HEADER_READ_TIMEOUT_MS`, `HTTP_BODY_READ_TIMEOUT_MS`).
pub fn slow_client_limits(cfg: &crate::config::ServerConfig) -> SlowClientLimits {
    SlowClientLimits {
        header_read_timeout: std::time::Duration::from_millis(cfg.http_header_read_timeout_ms),
        body_read_timeout: std::time::Duration::from_millis(cfg.http_body_read_timeout_ms),
    }
}
