//! The REST API for internal services: `POST /v1/messages`, `GET /v1/health`, `GET /ready`,
//! `GET /metrics`.
//!
//! Status codes (compat §1, with our documented differences):
//! 200 empty body = durably queued by the server; 400 = invalid body (Nest-style field errors);
//! 413 = body over `MESSAGE_MAX_BYTES`; 422 = unknown recipient (the original answered 500);
//! 503 = not connected to the server (original: 502); 502 = server refused or connection lost;
//! 504 = no confirmation within `MESSAGE_DELIVERY_TIMEOUT_MS`.

use crate::link::{Link, SendError};
use crate::metrics::Metrics;
use crate::recent::RecentIds;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use dmr::keys::PrivateKey;
use dmr::proto::SendStatus;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How many recently accepted message ids are remembered for idempotency.
const ACCEPTED_IDS_REMEMBERED: usize = 10_000;

/// Shared state of the handlers.
pub struct ApiState {
    /// This agent's id.
    pub agent_id: String,
    /// The private key (signing).
    pub key: Arc<PrivateKey>,
    /// The stream.
    pub link: Arc<Link>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    accepted: Mutex<RecentIds>,
}

impl ApiState {
    /// Creates the state.
    pub fn new(agent_id: String, key: Arc<PrivateKey>, link: Arc<Link>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            agent_id,
            key,
            link,
            metrics,
            accepted: Mutex::new(RecentIds::new(ACCEPTED_IDS_REMEMBERED)),
        })
    }
}

/// The routes.
pub fn router(state: Arc<ApiState>, max_body: usize) -> Router {
    Router::new()
        .route("/v1/messages", post(post_message))
        .route("/v1/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

fn error(status: StatusCode, messages: Vec<String>) -> Response {
    let reason = status.canonical_reason().unwrap_or("Error");
    let message = if messages.len() == 1 && status != StatusCode::BAD_REQUEST {
        Value::String(messages.into_iter().next().unwrap_or_default())
    } else {
        json!(messages)
    };
    (
        status,
        Json(json!({"statusCode": status.as_u16(), "message": message, "error": reason})),
    )
        .into_response()
}

#[utoipa::path(
    post,
    path = "/v1/messages",
    request_body(content = crate::openapi::V1MessageDoc, content_type = "application/json"),
    responses(
        (status = 200, description = "Durably queued for the recipient (empty body)"),
        (status = 400, description = "Invalid body; every problem named with its path", body = crate::openapi::ErrorDoc),
        (status = 413, description = "Body larger than MESSAGE_MAX_BYTES", body = crate::openapi::ErrorDoc),
        (status = 422, description = "recipientId is not a known agent", body = crate::openapi::ErrorDoc),
        (status = 502, description = "The server refused the message, or the stream broke before it answered", body = crate::openapi::ErrorDoc),
        (status = 503, description = "Not connected to the server, or its broker is down; nothing queued", body = crate::openapi::ErrorDoc),
        (status = 504, description = "No confirmation within MESSAGE_DELIVERY_TIMEOUT_MS; outcome unknown", body = crate::openapi::ErrorDoc),
    )
)]
pub(crate) async fn post_message(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            return error(
                rejection.status(),
                vec![format!("request body refused: {}", rejection.body_text())],
            );
        }
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, vec![format!("body must be valid JSON: {e}")]),
    };
    let message = match dmr::message::validate(&value) {
        Ok(m) => m,
        Err(errors) => return error(StatusCode::BAD_REQUEST, errors),
    };
    if state
        .accepted
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains(&message.id)
    {
        // Idempotent: this id was already accepted; do not queue it twice.
        return StatusCode::OK.into_response();
    }
    if !state.link.is_connected() {
        // Checked before the recipient: an agent that never connected has no directory yet.
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            vec![SendError::NotConnected.to_string()],
        );
    }
    let directory = state.link.directory();
    let Some(recipient) = directory.get(&message.recipient_id) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            vec![format!("recipientId {} is not a known agent", message.recipient_id)],
        );
    };
    let (key, recipient_key, payload) = (state.key.clone(), recipient.key.clone(), message.payload.clone());
    let sealed = tokio::task::spawn_blocking(move || dmr::jose::seal(Some(&payload), &key, &recipient_key)).await;
    let jwe = match sealed {
        Ok(Ok(jwe)) => jwe,
        Ok(Err(e)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                vec![format!("encryption failed: {e}")],
            );
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                vec![format!("encryption task failed: {e}")],
            );
        }
    };
    let envelope = dmr::proto::Envelope {
        id: message.id.clone(),
        sender_id: state.agent_id.clone(),
        recipient_id: recipient.info.id.to_ascii_lowercase(),
        timestamp: normalize_timestamp(&message.timestamp),
        r#type: message.kind.clone(),
        payload: jwe,
        received_at: String::new(),
    };
    match state.link.send(envelope).await {
        Ok(result) if result.status == SendStatus::Accepted as i32 => {
            state
                .accepted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(message.id);
            StatusCode::OK.into_response()
        }
        Ok(result) if result.status == SendStatus::Unavailable as i32 => error(
            StatusCode::SERVICE_UNAVAILABLE,
            vec![format!("DMR server could not queue the message: {}", result.detail)],
        ),
        Ok(result) if result.status == SendStatus::Unknown as i32 => error(
            StatusCode::BAD_GATEWAY,
            vec![format!(
                "DMR server lost the broker's confirmation; retry with the same id: {}",
                result.detail
            )],
        ),
        Ok(result) => error(
            StatusCode::BAD_GATEWAY,
            vec![format!("DMR server refused the message: {}", result.detail)],
        ),
        Err(SendError::NotConnected) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            vec![SendError::NotConnected.to_string()],
        ),
        Err(SendError::Timeout) => error(StatusCode::GATEWAY_TIMEOUT, vec![SendError::Timeout.to_string()]),
        Err(e @ SendError::ConnectionLost) => error(StatusCode::BAD_GATEWAY, vec![e.to_string()]),
    }
}

/// The server demands `toISOString` form (compat §5) while the REST API accepts any ISO-8601 date,
/// so the agent converts what it can; what it cannot is passed on unchanged.
fn normalize_timestamp(ts: &str) -> String {
    if dmr::time::is_js_iso_string(ts) {
        return ts.to_owned();
    }
    let parsed = chrono::DateTime::parse_from_rfc3339(ts)
        .map(|d| d.with_timezone(&chrono::Utc))
        .ok()
        .or_else(|| {
            chrono::NaiveDate::parse_from_str(ts, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|d| d.and_utc())
        });
    parsed.map_or_else(
        || ts.to_owned(),
        |d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

#[utoipa::path(get, path = "/v1/health", responses((status = 200, description = "Alive; `server` tells whether the stream to the DMR server is up", content_type = "application/json")))]
pub(crate) async fn health(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let connected = state.link.is_connected();
    Json(json!({
        "status": "ok",
        "timestamp": chrono::Utc::now().timestamp_millis(),
        "server": if connected { "connected" } else { "disconnected" },
        "agents": state.link.directory().len(),
    }))
}

#[utoipa::path(get, path = "/ready", responses(
    (status = 200, description = "Connected to the DMR server", content_type = "application/json"),
    (status = 503, description = "Not connected to the DMR server", content_type = "application/json"),
))]
pub(crate) async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    if state.link.is_connected() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not connected to the DMR server"})),
        )
            .into_response()
    }
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(crate) async fn metrics(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render())
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(<crate::openapi::ApiDoc as utoipa::OpenApi>::openapi())
}

async fn track(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    state.metrics.http_requests.with_label_values(&[&method, &route]).inc();
    state
        .metrics
        .http_duration
        .with_label_values(&[&method, &route, status.as_str()])
        .observe(started.elapsed().as_secs_f64());
    if status.as_u16() >= 400 {
        state.metrics.http_errors.inc();
    } else {
        state.metrics.http_success.inc();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::normalize_timestamp;

    #[test]
    fn timestamps_are_normalized_for_the_server() {
        assert_eq!(
            normalize_timestamp("2024-01-15T10:30:00.000Z"),
            "2024-01-15T10:30:00.000Z"
        );
        assert_eq!(
            normalize_timestamp("2024-01-15T12:30:00+02:00"),
            "2024-01-15T10:30:00.000Z"
        );
        assert_eq!(normalize_timestamp("2024-01-15"), "2024-01-15T00:00:00.000Z");
    }
}
