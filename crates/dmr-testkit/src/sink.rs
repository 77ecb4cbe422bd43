//! The sink: an HTTP endpoint standing in for an organisation's internal services
//! (`OUTGOING_MESSAGE_ENDPOINT`), recording what arrives, with a settable answer and delay.

use serde_json::Value;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An HTTP endpoint recording the JSON bodies POSTed to `/`.
#[derive(Clone)]
pub struct Sink {
    pub url: String,
    /// Bodies answered with a 2xx, in arrival order.
    pub received: Arc<Mutex<Vec<Value>>>,
    pub status: Arc<AtomicU16>,
    /// Every POST, whatever the answer.
    pub hits: Arc<AtomicU16>,
    /// Every answer waits this long first (a slow endpoint).
    pub delay_ms: Arc<AtomicU64>,
    /// The `id` of every POST, whatever the answer, in arrival order.
    pub posted_ids: Arc<Mutex<Vec<String>>>,
    /// Message ids to refuse (500) once each, whatever `status` says.
    pub refuse_once: Arc<Mutex<HashSet<String>>>,
}

impl Sink {
    pub async fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let hits = Arc::new(AtomicU16::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let posted_ids = Arc::new(Mutex::new(Vec::new()));
        let refuse_once = Arc::new(Mutex::new(HashSet::new()));
        let (r, s, h, d) = (received.clone(), status.clone(), hits.clone(), delay_ms.clone());
        let (posted, refuse) = (posted_ids.clone(), refuse_once.clone());
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (r, s, h, d) = (r.clone(), s.clone(), h.clone(), d.clone());
                let (posted, refuse) = (posted.clone(), refuse.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let id = value["id"].as_str().unwrap_or_default().to_owned();
                    lock(&posted).push(id.clone());
                    if lock(&refuse).remove(&id) {
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    let delay = d.load(Ordering::SeqCst);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    let code = s.load(Ordering::SeqCst);
                    if code < 300 {
                        lock(&r).push(value);
                    }
                    axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("sink binds");
        let url = format!("http://{}/", listener.local_addr().expect("sink address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            received,
            status,
            hits,
            delay_ms,
            posted_ids,
            refuse_once,
        }
    }

    /// Refuses the message with this id (500) the next time it is posted.
    pub fn refuse_once(&self, id: &str) {
        lock(&self.refuse_once).insert(id.to_owned());
    }

    /// The ids of every POST so far, whatever the answer, in arrival order.
    pub fn posted_ids(&self) -> Vec<String> {
        lock(&self.posted_ids).clone()
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    pub fn messages(&self) -> Vec<Value> {
        lock(&self.received).clone()
    }

    /// Waits until at least `n` messages arrived; returns them (fewer if `timeout` passed).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.messages();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// POSTs `body` as JSON; returns the status and the answer (JSON, or the text as a JSON string).
pub async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = http.post(url).json(body).send().await.expect("POST");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}
