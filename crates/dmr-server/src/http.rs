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

/// Limits on how slowly an HTTP client may talk (`HTTP_HEADER_READ_TIMEOUT_MS`,
/// `HTTP_BODY_READ_TIMEOUT_MS`).
#[derive(Debug, Clone, Copy)]
pub struct SlowClientLimits {
    /// Time to send a request's headers (and to start the next request on a kept-alive connection).
    pub header_read_timeout: std::time::Duration,
    /// Time to send a request's body, from its headers.
    pub body_read_timeout: std::time::Duration,
}

impl SlowClientLimits {
    /// From the server's settings.
    pub fn from_config(cfg: &crate::config::ServerConfig) -> Self {
        Self {
            header_read_timeout: std::time::Duration::from_millis(cfg.http_header_read_timeout_ms),
            body_read_timeout: std::time::Duration::from_millis(cfg.http_body_read_timeout_ms),
        }
    }
}

/// Serves `app` on `listener` until `stop` fires, then lets the connections in progress finish
/// (idle ones close at once), like `axum::serve(..).with_graceful_shutdown`, plus what
/// `axum::serve` does not do: a client must send its headers within the header timeout (a
/// slowloris client is disconnected; hyper answers 408 or closes) and its body within the body
/// timeout ([`DeadlineBody`]). Header size is hyper's bound (about 400 KB, 100 headers: 431).
/// Each request carries the peer's `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: SlowClientLimits,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // CONNECT protocol: WebSockets over HTTP/2 (as axum::serve).
    builder.http2().timer(TokioTimer::new()).enable_connect_protocol();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: pause instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let body_timeout = limits.body_read_timeout;
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut request = request.map(|body| axum::body::Body::new(DeadlineBody::new(body, body_timeout)));
            request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            tower::ServiceExt::oneshot(app.clone(), request)
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The body was not received within `HTTP_BODY_READ_TIMEOUT_MS`.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0:?} (HTTP_BODY_READ_TIMEOUT_MS)")]
pub struct BodyTimeout(std::time::Duration);

/// A request body that fails with [`BodyTimeout`] once its time is up, however it trickles in (a
/// timeout per read would let a client send one byte per interval forever).
pub struct DeadlineBody<B> {
    inner: B,
    limit: std::time::Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<B> DeadlineBody<B> {
    /// `inner`, due within `limit` from now.
    pub fn new(inner: B, limit: std::time::Duration) -> Self {
        Self {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout(this.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
