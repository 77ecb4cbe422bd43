//! The admin API (`/api/v1`): agents, dead letters (list, replay, purge) and validation failures
//! (list, inspect, purge). Every route is authenticated ([`super::auth`]); every action is logged
//! with the operator who did it and counted.

use super::auth::Tokens;
use crate::Core;
use crate::broker::BrokerError;
use crate::broker::admin::{
    DEATH_COUNT, DEATH_QUEUE, DEATH_REASON, DEATH_TIME, Inspected, PresenceNote, PresenceSession,
};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Most messages one listing returns (`limit`).
pub const MAX_LIST: usize = 1000;
/// Default `limit` of a listing.
pub const DEFAULT_LIST: usize = 100;
/// Most messages one replay or purge looks at (oldest first).
pub const MAX_SCAN: usize = 100_000;

/// What the API's handlers share.
pub struct AdminState {
    core: Arc<Core>,
    tokens: Tokens,
    instance: String,
}

impl AdminState {
    /// For `core` (named `instance`), accepting `tokens`.
    pub fn new(core: Arc<Core>, tokens: Tokens, instance: String) -> Self {
        Self { core, tokens, instance }
    }
}

/// How long the agents table waits for the other instances' answers (RabbitMQ).
const PRESENCE_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

/// This instance's sessions, as it tells other instances' consoles.
pub fn presence_sessions(core: &Core) -> Vec<PresenceSession> {
    core.sessions
        .sessions()
        .into_iter()
        .map(|s| PresenceSession {
            agent_id: s.agent_id,
            transport: s.transport.to_owned(),
            since: iso_time(s.since),
            remote_address: s.remote_addr.map(|a| a.to_string()),
        })
        .collect()
}

/// The operator an authenticated request comes from, and from where.
#[derive(Debug, Clone)]
pub struct Operator {
    /// The name given to their token.
    pub name: String,
    /// Their address.
    pub remote: Option<SocketAddr>,
}

/// The API's routes.
pub fn routes(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/agents/{id}/dead-letters", get(dead_letters))
        .route("/api/v1/agents/{id}/dead-letters/replay", post(replay))
        .route("/api/v1/agents/{id}/dead-letters/purge", post(purge_dead_letters))
        .route("/api/v1/validation-failures", get(validation_failures))
        .route("/api/v1/validation-failures/purge", post(purge_validation_failures))
        .route("/api/v1/validation-failures/{id}", get(validation_failure))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

async fn authenticate(State(state): State<Arc<AdminState>>, mut request: Request, next: Next) -> Response {
    let remote = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    match state.tokens.check(authorization) {
        Ok(name) => {
            let operator = Operator {
                name: name.to_owned(),
                remote,
            };
            request.extensions_mut().insert(operator);
            next.run(request).await
        }
        Err(refusal) => {
            state
                .core
                .metrics
                .admin_auth_refusals
                .with_label_values(&[refusal.label()])
                .inc();
            tracing::warn!(
                remote = ?remote,
                path = request.uri().path(),
                reason = refusal.label(),
                "admin API request refused: no valid bearer token"
            );
            let mut response = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required").into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// An API error: a status and a message for the operator.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let status = if e.is_queue_missing() {
            StatusCode::NOT_FOUND
        } else if matches!(e, BrokerError::Unavailable(_)) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_GATEWAY
        };
        error(status, e.to_string())
    }
}

fn iso_time(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn iso_ms(ms: &str) -> Option<String> {
    let ms: i64 = ms.parse().ok()?;
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

// ---- agents -------------------------------------------------------------------------------------

/// One live session of an agent.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    /// The server instance holding it.
    pub instance: String,
    /// "gRPC" or "Socket.IO".
    pub transport: String,
    /// When it opened (RFC 3339).
    pub since: String,
    /// The agent's address, when known.
    pub remote_address: Option<String>,
}

/// An agent of the directory (or connected) with its queues.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    /// Agent id.
    pub id: String,
    /// Display name from the directory (empty if not listed there).
    pub name: String,
    /// Whether a session is live.
    pub connected: bool,
    /// Its live sessions (one, normally).
    pub sessions: Vec<SessionView>,
    /// Messages ready in `<id>` (null: queue missing or broker unavailable).
    pub queue_depth: Option<u32>,
    /// Messages in `<id>.dlq`.
    pub dlq_depth: Option<u32>,
}

/// The agents table.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentsView {
    /// The instance that answered.
    pub instance: String,
    /// Agents, by id.
    pub agents: Vec<AgentView>,
}

/// The directory's agents with their sessions and queue depths.
#[utoipa::path(get, path = "/api/v1/agents", security(("bearer" = [])),
    responses((status = 200, body = AgentsView), (status = 401, description = "no valid bearer token")))]
pub async fn agents(State(state): State<Arc<AdminState>>) -> Json<AgentsView> {
    let core = &state.core;
    let directory = core.directory.current();
    let mut table: BTreeMap<String, AgentView> = directory
        .entries()
        .map(|e| {
            let view = AgentView {
                id: e.info.id.clone(),
                name: e.info.name.clone(),
                connected: false,
                sessions: Vec::new(),
                queue_depth: None,
                dlq_depth: None,
            };
            (e.info.id.to_ascii_lowercase(), view)
        })
        .collect();
    // This instance's sessions first-hand, the others' from their answers (RabbitMQ).
    let mut notes = vec![PresenceNote {
        instance: state.instance.clone(),
        sessions: presence_sessions(core),
    }];
    match core.broker.ask_presence(PRESENCE_WAIT).await {
        Ok(others) => notes.extend(others.into_iter().filter(|n| n.instance != state.instance)),
        Err(e) => tracing::warn!(error = %e, "cannot ask the other instances who is connected there"),
    }
    for note in notes {
        for s in note.sessions {
            let view = table
                .entry(s.agent_id.to_ascii_lowercase())
                .or_insert_with(|| AgentView {
                    id: s.agent_id.clone(),
                    name: String::new(),
                    connected: false,
                    sessions: Vec::new(),
                    queue_depth: None,
                    dlq_depth: None,
                });
            view.connected = true;
            view.sessions.push(SessionView {
                instance: note.instance.clone(),
                transport: s.transport,
                since: s.since,
                remote_address: s.remote_address,
            });
        }
    }
    for view in table.values_mut() {
        view.queue_depth = core.broker.counts(&view.id).await.ok().map(|c| c.messages);
        view.dlq_depth = core
            .broker
            .counts(&crate::broker::dlq_name(&view.id))
            .await
            .ok()
            .map(|c| c.messages);
    }
    Json(AgentsView {
        instance: state.instance.clone(),
        agents: table.into_values().collect(),
    })
}

// ---- dead letters -------------------------------------------------------------------------------

/// `?limit=`: how many messages to list (default 100, at most 1000).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// How many, oldest first.
    pub limit: Option<usize>,
}

impl ListQuery {
    fn limit(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_LIST).clamp(1, MAX_LIST)
    }
}

/// Why and when a message was dead-lettered.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterInfo {
    /// `delivery-failed` (the agent kept failing), `expired` (TTL), `rejected`, ...
    pub reason: Option<String>,
    /// How many times it was dead-lettered (`x-death` count).
    pub count: Option<u64>,
    /// The queue it was dead-lettered from.
    pub queue: Option<String>,
    /// When (RFC 3339).
    pub at: Option<String>,
    /// Delivery attempts before it was dead-lettered (`delivery-failed`).
    pub attempts: Option<u32>,
    /// The last delivery error (`delivery-failed`).
    pub last_error: Option<String>,
}

/// A dead letter's metadata (never its payload).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    /// Message id (null: the body is not an envelope).
    pub id: Option<String>,
    /// Sender agent id.
    pub sender_id: Option<String>,
    /// Recipient agent id.
    pub recipient_id: Option<String>,
    /// Message type.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The sender's timestamp.
    pub timestamp: Option<String>,
    /// When the server accepted it.
    pub received_at: Option<String>,
    /// Its dead-lettering.
    pub dead_letter: DeadLetterInfo,
}

/// An agent's dead letters.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLettersView {
    /// The agent.
    pub agent_id: String,
    /// `<id>.dlq`.
    pub queue: String,
    /// Messages in it.
    pub depth: u32,
    /// The oldest `limit` of them.
    pub messages: Vec<DeadLetterView>,
}

fn dead_letter_view(m: &Inspected) -> DeadLetterView {
    let envelope: Option<dmr::envelope::Envelope> = serde_json::from_slice(&m.body).ok();
    let h = |k: &str| m.headers.get(k).cloned();
    let delivery_failed = h("x-dmr-dead-letter-reason");
    let info = DeadLetterInfo {
        reason: delivery_failed.clone().or_else(|| h(DEATH_REASON)),
        count: h(DEATH_COUNT)
            .and_then(|c| c.parse().ok())
            .or(delivery_failed.as_ref().map(|_| 1)),
        queue: h(DEATH_QUEUE),
        at: h("x-dmr-dead-lettered-at").or_else(|| h(DEATH_TIME).and_then(|t| iso_ms(&t))),
        attempts: h("x-dmr-attempts").and_then(|a| a.parse().ok()),
        last_error: h("x-dmr-last-error"),
    };
    match envelope {
        Some(e) => DeadLetterView {
            id: Some(e.id),
            sender_id: Some(e.sender_id),
            recipient_id: Some(e.recipient_id),
            kind: Some(e.kind),
            timestamp: Some(e.timestamp),
            received_at: e.received_at,
            dead_letter: info,
        },
        None => DeadLetterView {
            id: None,
            sender_id: None,
            recipient_id: None,
            kind: None,
            timestamp: None,
            received_at: None,
            dead_letter: info,
        },
    }
}

/// The `id` field of a JSON body (an envelope or a validation-failure record).
fn body_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        id: Value,
    }
    match serde_json::from_slice::<Id>(body).ok()?.id {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn known_agent(core: &Core, id: &str) -> Result<String, ApiError> {
    let directory = core.directory.current();
    match directory.get(id) {
        Some(e) => Ok(e.info.id.clone()),
        None if core.sessions.is_connected(id) => Ok(id.to_owned()),
        None => Err(error(
            StatusCode::NOT_FOUND,
            format!("no agent {id:?} in the directory"),
        )),
    }
}

/// An agent's dead letters, oldest first, metadata only.
#[utoipa::path(get, path = "/api/v1/agents/{id}/dead-letters", security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id"), ListQuery),
    responses((status = 200, body = DeadLettersView), (status = 404, description = "unknown agent or no DLQ")))]
pub async fn dead_letters(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<DeadLettersView>, ApiError> {
    let id = known_agent(&state.core, &id)?;
    let queue = crate::broker::dlq_name(&id);
    let depth = state.core.broker.counts(&queue).await?.messages;
    let listed = state.core.broker.inspect(&queue, query.limit()).await?;
    Ok(Json(DeadLettersView {
        agent_id: id,
        queue,
        depth,
        messages: listed.iter().map(dead_letter_view).collect(),
    }))
}

/// Which messages an action applies to: `{"ids": [...]}` or `{"all": true}`.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Selection {
    /// Message ids.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Every message.
    #[serde(default)]
    pub all: bool,
}

impl Selection {
    fn check(&self) -> Result<Option<BTreeSet<String>>, ApiError> {
        match (self.all, self.ids.is_empty()) {
            (true, true) => Ok(None),
            (false, false) => Ok(Some(self.ids.iter().cloned().collect())),
            _ => Err(error(
                StatusCode::BAD_REQUEST,
                "give either \"ids\" (a non-empty list of message ids) or \"all\": true",
            )),
        }
    }
}

/// What an action did.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionResult {
    /// Messages moved back (replay) or deleted (purge).
    pub count: u64,
    /// Ids asked for and not found in the queue.
    pub not_found: Vec<String>,
}

/// Moves the selected messages of `queue` to `to` (or removes them), logging and counting it.
async fn act(
    state: &AdminState,
    operator: &Operator,
    action: &'static str,
    queue: &str,
    to: Option<&str>,
    selection: &Selection,
) -> Result<ActionResult, ApiError> {
    let wanted = selection.check()?;
    let matched = Mutex::new(BTreeSet::new());
    let select = |body: &[u8]| match &wanted {
        None => true,
        Some(ids) => match body_id(body) {
            Some(id) if ids.contains(&id) => {
                matched
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(id);
                true
            }
            _ => false,
        },
    };
    let result = state.core.broker.move_where(queue, to, &select, MAX_SCAN).await;
    let metrics = &state.core.metrics;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics.admin_actions.with_label_values(&[action, outcome]).inc();
    let count = match result {
        Ok(count) => count,
        Err(e) => {
            tracing::error!(operator = %operator.name, remote = ?operator.remote, action, queue, error = %e, "admin action failed");
            return Err(e.into());
        }
    };
    metrics.admin_messages.with_label_values(&[action]).inc_by(count);
    let matched = matched.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    let not_found: Vec<String> = wanted
        .map(|ids| ids.difference(&matched).cloned().collect())
        .unwrap_or_default();
    tracing::info!(
        operator = %operator.name,
        remote = ?operator.remote,
        action,
        queue,
        to,
        all = selection.all,
        ids = ?selection.ids,
        count,
        not_found = not_found.len(),
        "admin action done"
    );
    Ok(ActionResult { count, not_found })
}

/// Moves selected (or all) dead letters back to the agent's queue, to be delivered again.
#[utoipa::path(post, path = "/api/v1/agents/{id}/dead-letters/replay", security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id")), request_body = Selection,
    responses((status = 200, body = ActionResult), (status = 400, description = "bad selection"),
        (status = 404, description = "unknown agent or queue")))]
pub async fn replay(
    State(state): State<Arc<AdminState>>,
    Extension(operator): Extension<Operator>,
    Path(id): Path<String>,
    Json(selection): Json<Selection>,
) -> Result<Json<ActionResult>, ApiError> {
    let id = known_agent(&state.core, &id)?;
    let dlq = crate::broker::dlq_name(&id);
    act(&state, &operator, "replay", &dlq, Some(&id), &selection)
        .await
        .map(Json)
}

/// Deletes selected (or all) dead letters of an agent.
#[utoipa::path(post, path = "/api/v1/agents/{id}/dead-letters/purge", security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id")), request_body = Selection,
    responses((status = 200, body = ActionResult), (status = 400, description = "bad selection"),
        (status = 404, description = "unknown agent or queue")))]
pub async fn purge_dead_letters(
    State(state): State<Arc<AdminState>>,
    Extension(operator): Extension<Operator>,
    Path(id): Path<String>,
    Json(selection): Json<Selection>,
) -> Result<Json<ActionResult>, ApiError> {
    let id = known_agent(&state.core, &id)?;
    let dlq = crate::broker::dlq_name(&id);
    act(&state, &operator, "purge-dead-letters", &dlq, None, &selection)
        .await
        .map(Json)
}

// ---- validation failures ------------------------------------------------------------------------

/// A validation failure in a listing.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationFailureSummary {
    /// The record's id (the message's, when it had one).
    pub id: Option<String>,
    /// When the server saw it.
    pub received_at: Option<String>,
    /// Why it failed (the record's `errors`).
    #[schema(value_type = Vec<Object>)]
    pub errors: Value,
    /// The message's `senderId`, if it had one.
    pub sender_id: Option<String>,
    /// The message's `recipientId`, if it had one.
    pub recipient_id: Option<String>,
}

/// The validation failures.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationFailuresView {
    /// The queue (`RABBITMQ_VALIDATION_FAILURES_QUEUE`).
    pub queue: String,
    /// Records in it.
    pub depth: u32,
    /// The oldest `limit` of them.
    pub records: Vec<ValidationFailureSummary>,
}

fn summary(body: &[u8]) -> ValidationFailureSummary {
    let record: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let text = |v: &Value| v.as_str().map(str::to_owned);
    ValidationFailureSummary {
        id: body_id(body),
        received_at: text(&record["receivedAt"]),
        errors: record["errors"].clone(),
        sender_id: text(&record["message"]["senderId"]),
        recipient_id: text(&record["message"]["recipientId"]),
    }
}

/// The validation failures, oldest first.
#[utoipa::path(get, path = "/api/v1/validation-failures", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = ValidationFailuresView)))]
pub async fn validation_failures(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<ValidationFailuresView>, ApiError> {
    let queue = state.core.broker.config().validation_failures_queue.clone();
    let depth = state.core.broker.counts(&queue).await?.messages;
    let listed = state.core.broker.inspect(&queue, query.limit()).await?;
    Ok(Json(ValidationFailuresView {
        queue,
        depth,
        records: listed.iter().map(|m| summary(&m.body)).collect(),
    }))
}

/// One validation failure: the record as the server wrote it (`dmr::envelope::ValidationFailure`:
/// id, errors, receivedAt and the message as received — whose payload is a JWE, still encrypted).
#[utoipa::path(get, path = "/api/v1/validation-failures/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "record id")),
    responses((status = 200, body = Object), (status = 404, description = "no such record")))]
pub async fn validation_failure(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let queue = state.core.broker.config().validation_failures_queue.clone();
    let listed = state.core.broker.inspect(&queue, MAX_SCAN).await?;
    listed
        .iter()
        .find(|m| body_id(&m.body).as_deref() == Some(id.as_str()))
        .and_then(|m| serde_json::from_slice(&m.body).ok())
        .map(Json)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no validation failure {id:?}")))
}

/// Deletes selected (or all) validation failures.
#[utoipa::path(post, path = "/api/v1/validation-failures/purge", security(("bearer" = [])),
    request_body = Selection, responses((status = 200, body = ActionResult), (status = 400, description = "bad selection")))]
pub async fn purge_validation_failures(
    State(state): State<Arc<AdminState>>,
    Extension(operator): Extension<Operator>,
    Json(selection): Json<Selection>,
) -> Result<Json<ActionResult>, ApiError> {
    let queue = state.core.broker.config().validation_failures_queue.clone();
    act(&state, &operator, "purge-validation-failures", &queue, None, &selection)
        .await
        .map(Json)
}
