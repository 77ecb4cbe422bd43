//! The REST API for internal services: `POST /v1/messages`, `GET /v1/health`, `GET /ready`,
//! `GET /metrics`.
//!
//! Status codes (compat §1, with our documented differences):
//! 200 empty body = durably queued by the server; 400 = invalid body (Nest-style field errors);
//! 413 = body over `MESSAGE_MAX_BYTES`; 422 = unknown recipient (the original answered 500);
//! 503 = not connected to the server (original: 502), with `Retry-After`; 502 = server refused or
//! connection lost; 504 = no confirmation within `MESSAGE_DELIVERY_TIMEOUT_MS`. Before the body is
//! read ([`crate::guard`]): 403 = a browser page from an origin not in `CORS_ALLOWED_ORIGINS`,
//! 415 = not `Content-Type: application/json`. 409 = an id accepted before, with another body.
//! 408 = the body did not arrive within `HTTP_BODY_READ_TIMEOUT_MS` ([`crate::serve`]).

use crate::guard::{Origins, error};
use crate::link::{Link, SendError};
use crate::metrics::Metrics;
use crate::recent::Recent;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
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
    /// Browser origins allowed to POST (`CORS_ALLOWED_ORIGINS`).
    pub origins: Origins,
    /// Accepted ids with the fingerprint of their message, for idempotent repeats.
    accepted: Mutex<Recent<u64>>,
}

impl ApiState {
    /// Creates the state.
    pub fn new(
        agent_id: String,
        key: Arc<PrivateKey>,
        link: Arc<Link>,
        metrics: Arc<Metrics>,
        origins: Origins,
    ) -> Arc<Self> {
        Arc::new(Self {
            agent_id,
            key,
            link,
            metrics,
            origins,
            accepted: Mutex::new(Recent::new(ACCEPTED_IDS_REMEMBERED)),
        })
    }

    fn accepted(&self) -> std::sync::MutexGuard<'_, Recent<u64>> {
        self.accepted.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The routes.
pub fn router(state: Arc<ApiState>, max_body: usize) -> Router {
    // Pages on an allowed origin get CORS answers (preflight included) so that a browser lets
    // them read the result; everyone else gets none, and `guard::check_request` refuses them.
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(state.origins.header_values())
        .allow_methods([Method::POST])
        .allow_headers([header::CONTENT_TYPE]);
    Router::new()
        .route("/v1/messages", post(post_message).layer(cors))
        .route("/v1/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(crate::guard::not_found)
        .method_not_allowed_fallback(crate::guard::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

#[utoipa::path(
    post,
    path = "/v1/messages",
    tag = "messages",
    request_body(content = crate::openapi::V1MessageDoc, content_type = "application/json"),
    responses(
        (status = 200, description = "Durably queued for the recipient (empty body)"),
        (status = 400, description = "Invalid body; every problem named with its path", body = crate::openapi::ErrorDoc),
        (status = 403, description = "The server's relay policy does not let this agent send to the recipient (the rule is named), or a browser page whose Origin is not in CORS_ALLOWED_ORIGINS sent it; nothing queued", body = crate::openapi::ErrorDoc),
        (status = 408, description = "The body did not arrive within HTTP_BODY_READ_TIMEOUT_MS", body = crate::openapi::ErrorDoc),
        (status = 409, description = "This id was accepted before with a different message", body = crate::openapi::ErrorDoc),
        (status = 413, description = "Body larger than MESSAGE_MAX_BYTES, or the encrypted payload over this agent's max_payload_bytes in the server's relay policy; nothing queued", body = crate::openapi::ErrorDoc),
        (status = 415, description = "Content-Type is not application/json", body = crate::openapi::ErrorDoc),
        (status = 422, description = "recipientId is not a known agent", body = crate::openapi::ErrorDoc),
        (status = 429, description = "The recipient's queue is at the server's MESSAGE_QUEUE_MAX_DEPTH, or this agent is over one of its limits at the server (sends or bytes per second, sends in flight; the limit is named); nothing queued; retry after Retry-After seconds", body = crate::openapi::ErrorDoc,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 502, description = "The server refused the message, or the stream broke before it answered", body = crate::openapi::ErrorDoc),
        (status = 503, description = "Not connected to the server, or its broker is down; nothing queued; retry after Retry-After seconds", body = crate::openapi::ErrorDoc,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 504, description = "No confirmation within MESSAGE_DELIVERY_TIMEOUT_MS; outcome unknown", body = crate::openapi::ErrorDoc),
    )
)]
pub(crate) async fn post_message(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    if let Err(refused) = crate::guard::check_request(&headers, &state.origins) {
        return *refused;
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = if dmr_http::is_body_timeout(&rejection) {
                StatusCode::REQUEST_TIMEOUT
            } else {
                rejection.status()
            };
            let mut refused = error(status, vec![format!("request body refused: {}", rejection.body_text())]);
            // The rest of the body is never read: close the connection instead of leaving the
            // client to push it into a socket nobody reads (hyper would keep it open otherwise).
            refused
                .headers_mut()
                .insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
            return refused;
        }
    };
    let value: Value = match crate::guard::parse_strict_json(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, vec![format!("body must be valid JSON: {e}")]),
    };
    let message = match dmr::message::validate(&value) {
        Ok(m) => m,
        Err(errors) => return error(StatusCode::BAD_REQUEST, errors),
    };
    let fingerprint = crate::guard::fingerprint(&value);
    match state.accepted().get(&message.id) {
        // Idempotent: this message was already accepted; do not queue it twice.
        Some(seen) if *seen == fingerprint => return StatusCode::OK.into_response(),
        // The same id for another message is a client bug that a 200 would hide.
        Some(_) => {
            return error(
                StatusCode::CONFLICT,
                vec![format!(
                    "id {} was already accepted with a different message",
                    message.id
                )],
            );
        }
        None => {}
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
        // Through the typed getter: a new status is a compile error here, not a silent fallthrough.
        Ok(result) => match result.status() {
            SendStatus::Accepted => {
                state.accepted().insert_with(message.id, fingerprint);
                StatusCode::OK.into_response()
            }
            SendStatus::Unavailable => error(
                StatusCode::SERVICE_UNAVAILABLE,
                vec![format!("DMR server could not queue the message: {}", result.detail)],
            ),
            SendStatus::Unknown => error(
                StatusCode::BAD_GATEWAY,
                vec![format!(
                    "DMR server lost the broker's confirmation; retry with the same id: {}",
                    result.detail
                )],
            ),
            SendStatus::RecipientBacklogged => retry_later(&result),
            SendStatus::ResourceExhausted if result.retry_after_ms == 0 => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                vec![format!("DMR server did not queue the message: {}", result.detail)],
            ),
            SendStatus::ResourceExhausted => retry_later(&result),
            SendStatus::PermissionDenied => error(
                StatusCode::FORBIDDEN,
                vec![format!("DMR server did not queue the message: {}", result.detail)],
            ),
            SendStatus::Invalid | SendStatus::Unspecified => error(
                StatusCode::BAD_GATEWAY,
                vec![format!("DMR server refused the message: {}", result.detail)],
            ),
        },
        Err(SendError::NotConnected) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            vec![SendError::NotConnected.to_string()],
        ),
        Err(SendError::Timeout) => error(StatusCode::GATEWAY_TIMEOUT, vec![SendError::Timeout.to_string()]),
        Err(e @ SendError::ConnectionLost) => error(StatusCode::BAD_GATEWAY, vec![e.to_string()]),
    }
}

/// 429 with `Retry-After` (whole seconds, at least 1): the server did not queue the message and said
/// when to try again.
fn retry_later(result: &dmr::proto::SendResult) -> Response {
    let seconds = result.retry_after_ms.div_ceil(1000).max(1);
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        vec![format!("DMR server did not queue the message: {}", result.detail)],
    );
    if let Ok(value) = axum::http::HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, value);
    }
    response
}

/// The server demands `toISOString` form (compat §5) while the REST API accepts any ISO-8601 date
/// (the validator already checked it is one), so the agent converts it.
fn normalize_timestamp(ts: &str) -> String {
    if dmr::time::is_js_iso_string(ts) {
        return ts.to_owned();
    }
    dmr::time::to_js_iso_string(ts).unwrap_or_else(|| ts.to_owned())
}

#[utoipa::path(get, path = "/v1/health", tag = "health", responses((status = 200, description = "Alive; `server` tells whether the stream to the DMR server is up", content_type = "application/json")))]
pub(crate) async fn health(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let connected = state.link.is_connected();
    Json(json!({
        "status": "ok",
        "timestamp": chrono::Utc::now().timestamp_millis(),
        "server": if connected { "connected" } else { "disconnected" },
        "agents": state.link.directory().len(),
    }))
}

#[utoipa::path(get, path = "/ready", tag = "health", responses(
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

#[utoipa::path(get, path = "/metrics", tag = "metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
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
        // Forms the validator accepts but chrono's RFC 3339 parser alone did not convert.
        assert_eq!(normalize_timestamp("2024-01-15T10:30"), "2024-01-15T10:30:00.000Z");
        assert_eq!(normalize_timestamp("2024-01-15t10:30:00z"), "2024-01-15T10:30:00.000Z");
    }
}
