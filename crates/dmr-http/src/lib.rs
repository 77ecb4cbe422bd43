//! Serving an axum [`Router`] with limits on slow clients, which `axum::serve` lacks: a client must
//! send its headers within a deadline (a slowloris client is disconnected) and a request body within
//! another ([`DeadlineBody`]), however slowly it trickles in. The server's HTTP port, its operators'
//! console and the agent's REST port are served by [`serve`].
//!
//! **Invariant:** no connection waits on a client without a deadline, except an upgraded one
//! (WebSocket), whose protocol has its own keep-alive.

use axum::Router;

/// Limits on how slowly an HTTP client may talk (`HTTP_HEADER_READ_TIMEOUT_MS`,
/// `HTTP_BODY_READ_TIMEOUT_MS`).
#[derive(Debug, Clone, Copy)]
pub struct SlowClientLimits {
    /// Time to send a request's headers (and to start the next request on a kept-alive connection).
    pub header_read_timeout: std::time::Duration,
    /// Time to send a request's body, from its headers.
    pub body_read_timeout: std::time::Duration,
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

/// Whether a body extractor failed because the body missed its deadline ([`BodyTimeout`]).
pub fn is_body_timeout(rejection: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(rejection);
    while let Some(e) = cause {
        if e.is::<BodyTimeout>() {
            return true;
        }
        cause = e.source();
    }
    false
}
