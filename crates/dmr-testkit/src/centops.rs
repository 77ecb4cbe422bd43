//! An HTTP stand-in for CentOps whose answer (status, body, delay) the test changes over time.

use dmr_pki::AgentCredentials;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct CentOpsStub {
    pub url: String,
    answer: Arc<Mutex<(u16, String, Duration)>>,
    pub requests: Arc<AtomicUsize>,
}

impl CentOpsStub {
    pub async fn start() -> Self {
        let answer = Arc::new(Mutex::new((200u16, String::from("{\"response\":[]}"), Duration::ZERO)));
        let requests = Arc::new(AtomicUsize::new(0));
        let (a, r) = (answer.clone(), requests.clone());
        let app = axum::Router::new().route(
            "/centops",
            axum::routing::get(move || {
                let (a, r) = (a.clone(), r.clone());
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let (status, body, delay) = lock(&a).clone();
                    tokio::time::sleep(delay).await;
                    let status = axum::http::StatusCode::from_u16(status)
                        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
                    (status, body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("stub binds");
        let url = format!("http://{}/centops", listener.local_addr().expect("stub address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, answer, requests }
    }

    pub fn serve(&self, status: u16, body: &str) {
        *lock(&self.answer) = (status, body.to_owned(), Duration::ZERO);
    }

    pub fn serve_slowly(&self, delay: Duration) {
        lock(&self.answer).2 = delay;
    }

    pub fn serve_agents(&self, agents: &[&AgentCredentials]) {
        self.serve(200, &dmr_pki::centops_json(agents));
    }

    /// Waits until the server asked `n` more times.
    pub async fn wait_polls(&self, n: usize) {
        let start = self.requests.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.requests.load(Ordering::SeqCst) < start + n {
            assert!(Instant::now() < deadline, "CentOps was not polled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
