//! The console's web page: one static HTML page and its script, compiled into the binary and
//! served by this port (no CDN, nothing fetched from elsewhere; the Content-Security-Policy says
//! so). The page holds no data: it asks for a token, keeps it in the tab's `sessionStorage`, and
//! calls the API with it; the agents table (queue depths only) refreshes every 2 s, while dead
//! letters and validation failures are listed when asked for: listing takes the messages and
//! returns them, which RabbitMQ counts as a delivery of each.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const HTML: &str = include_str!("console.html");
const SCRIPT: &str = include_str!("console.js");
const POLICY: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'";

async fn html() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::CACHE_CONTROL, "no-store"),
        ],
        HTML,
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        SCRIPT,
    )
}

/// `/` and `/console.js`.
pub fn routes() -> Router {
    Router::new().route("/", get(html)).route("/console.js", get(script))
}
