//! End-to-end scenario with real crypto: HTTP clients POST v1 messages to real in-process agents'
//! REST APIs → server → RabbitMQ → server → receiving agents → an in-process sink. The send
//! instant travels inside the message content, so latency runs from the start of the POST to the
//! plaintext's arrival at the sink. REST response times are reported in their own row.
//!
//! Sending agents run on one runtime (threads `agent-snd`), receiving agents on another
//! (`agent-rcv`), the server on a third (`srv`), clients and sink on the bench's own. The set-up
//! ([`Rig`]), the sink, the load generator ([`drive`], [`post_one`]: 2xx answers are accepted,
//! any other answer is counted by status as a refusal) are shared with the pair scenario
//! (`pair.rs`).

use crate::fixture::{ServerHandle, centops_file, delete_queues, runtime, server_config};
use crate::measure::{CpuSnapshot, Percentiles, Row, reset_peak_rss, status_kib};
use crate::now_ns;
use dmr_server::config::RabbitConfig;
use dmr_testkit::{TestPki, base_agent_config, v1_message};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One offered load.
#[derive(Clone, Copy)]
pub enum Load {
    /// Messages per second, open loop (each POST starts on schedule, up to 512 outstanding).
    Rate(f64),
    /// `n` clients each POSTing back to back (closed loop).
    Clients(usize),
}

pub struct E2ePlan {
    pub pairs: usize,
    pub loads: Vec<Load>,
    pub seconds: f64,
}

/// The endpoint the receiving agents POST plaintext to. Counts only messages sent at or after
/// `from_ns` (the current load's start): a backlog left by an earlier load is counted apart.
#[derive(Default)]
pub(crate) struct Sink {
    pub latencies: Mutex<Vec<Duration>>,
    pub last: Mutex<Option<Instant>>,
    pub received: AtomicUsize,
    /// Messages of an earlier load that arrived during this one.
    pub stale: AtomicUsize,
    from_ns: AtomicU64,
}

impl Sink {
    /// Starts counting afresh for messages sent from now on.
    pub fn reset(&self) {
        self.from_ns.store(now_ns(), Ordering::SeqCst);
        lock(&self.latencies).clear();
        *lock(&self.last) = None;
        self.received.store(0, Ordering::SeqCst);
        self.stale.store(0, Ordering::SeqCst);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn start_sink(sink: Arc<Sink>) -> anyhow::Result<String> {
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let sent = value["payload"]["messages"][0]["content"]
                    .as_str()
                    .and_then(|s| s.parse::<u64>().ok());
                if let Some(sent) = sent {
                    if sent < sink.from_ns.load(Ordering::SeqCst) {
                        sink.stale.fetch_add(1, Ordering::SeqCst);
                        return axum::http::StatusCode::OK;
                    }
                    lock(&sink.latencies).push(Duration::from_nanos(now_ns().saturating_sub(sent)));
                    *lock(&sink.last) = Some(Instant::now());
                    sink.received.fetch_add(1, Ordering::SeqCst);
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// Starts a real agent on `rt`; returns its REST address and its link.
async fn start_agent(
    rt: &tokio::runtime::Runtime,
    cfg: dmr_agent::config::AgentConfig,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, Arc<dmr_agent::link::Link>)> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rt.spawn(async move {
        match dmr_agent::Agent::bind(cfg).await {
            Ok(agent) => {
                let _ = tx.send(Ok((agent.http_addr(), agent.link().clone())));
                let _ = agent.run(stop).await;
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
            }
        }
    });
    rx.await?.map_err(|e| anyhow::anyhow!("agent: {e}"))
}

/// Server, sink and `pairs` sending/receiving agents, connected and ready.
pub(crate) struct Rig {
    /// REST address of each sending agent and the id of its recipient.
    pub targets: Vec<(SocketAddr, String)>,
    pub sink: Arc<Sink>,
    agents: Vec<dmr_pki::AgentCredentials>,
    server: ServerHandle,
    senders_rt: tokio::runtime::Runtime,
    receivers_rt: tokio::runtime::Runtime,
    stop: CancellationToken,
    // Holds the CA and the agents' files for as long as the rig runs.
    pki: TestPki,
}

impl Rig {
    /// Starts the server (`srv` threads), the sink (the bench's runtime), sending agents on one
    /// runtime (`agent-snd`) and receiving agents on another (`agent-rcv`), and waits until every
    /// agent is connected with the whole directory.
    pub async fn start(rabbit: &RabbitConfig, pairs: usize, cache: &Path) -> anyhow::Result<Self> {
        let pki = TestPki::try_new()?;
        let agents = pki.agents_with_cached_keys(pairs * 2, cache)?;
        let cfg = server_config(&pki, &centops_file(&pki, &agents)?, rabbit);
        let server = ServerHandle::start(cfg).await?;
        let sink = Arc::new(Sink::default());
        let sink_url = start_sink(sink.clone()).await?;
        let mut rig = Self {
            targets: Vec::new(),
            sink,
            agents,
            server,
            senders_rt: runtime("agent-snd")?,
            receivers_rt: runtime("agent-rcv")?,
            stop: CancellationToken::new(),
            pki,
        };
        match rig.connect(&sink_url).await {
            Ok(targets) => {
                rig.targets = targets;
                Ok(rig)
            }
            Err(e) => {
                let _ = rig.stop(rabbit).await;
                Err(e)
            }
        }
    }

    async fn connect(&self, sink_url: &str) -> anyhow::Result<Vec<(SocketAddr, String)>> {
        let mut targets = Vec::new();
        let mut links = Vec::new();
        for (i, creds) in self.agents.iter().enumerate() {
            let cfg = base_agent_config(&self.pki, creds, self.server.grpc, sink_url);
            let rt = if i % 2 == 0 {
                &self.senders_rt
            } else {
                &self.receivers_rt
            };
            let (addr, link) = start_agent(rt, cfg, self.stop.clone()).await?;
            if i % 2 == 0 {
                targets.push((addr, self.agents[i + 1].id.clone()));
            }
            links.push(link);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !links
            .iter()
            .all(|l| l.is_connected() && l.directory().len() == self.agents.len())
        {
            anyhow::ensure!(Instant::now() < deadline, "agents did not connect within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(targets)
    }

    /// Stops agents and server and deletes every queue the run created.
    pub async fn stop(self, rabbit: &RabbitConfig) -> anyhow::Result<()> {
        self.stop.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.senders_rt.shutdown_background();
        self.receivers_rt.shutdown_background();
        let vf = self.server.validation_failures_queue();
        self.server.stop().await;
        delete_queues(&rabbit.uri(), &self.agents, &[vf]).await?;
        Ok(())
    }
}

/// The HTTP client the load generators use.
pub(crate) fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()?)
}

pub async fn run(
    rabbit: &RabbitConfig,
    plan: &E2ePlan,
    cache: &Path,
    broker_pid: Option<u32>,
    crypto_ceiling: f64,
) -> anyhow::Result<Vec<Row>> {
    let rig = Rig::start(rabbit, plan.pairs, cache).await?;
    let result = sweep(&rig.targets, &rig.sink, plan, broker_pid, crypto_ceiling).await;
    rig.stop(rabbit).await?;
    result
}

/// What the load generator saw of the REST answers.
#[derive(Default)]
pub(crate) struct Clients {
    /// Response time of every answer (any status, and transport errors).
    pub rest: Mutex<Vec<Duration>>,
    /// Response time of the 2xx answers.
    pub accepted_rest: Mutex<Vec<Duration>>,
    pub accepted: AtomicUsize,
    /// Non-2xx answers and transport errors.
    pub refused: AtomicUsize,
    /// Refusals by status code ("429") or "error" for transport errors.
    pub refusals: Mutex<BTreeMap<String, usize>>,
    pub first_refusal: Mutex<Option<String>>,
    pub sent: AtomicUsize,
}

impl Clients {
    /// "429×12, 503×1" (empty when there were none).
    pub fn refusals_text(&self) -> String {
        lock(&self.refusals)
            .iter()
            .map(|(k, n)| format!("{k}×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// POSTs one v1 message (README-shaped, `dmr_testkit::v1_message`) to `target`, with the instant
/// it started as its content.
pub(crate) async fn post_one(http: &reqwest::Client, target: &(SocketAddr, String), clients: &Clients) {
    let started = Instant::now();
    let body = v1_message(&target.1, &now_ns().to_string());
    clients.sent.fetch_add(1, Ordering::SeqCst);
    let outcome = http
        .post(format!("http://{}/v1/messages", target.0))
        .json(&body)
        .send()
        .await;
    let elapsed = started.elapsed();
    lock(&clients.rest).push(elapsed);
    let refusal = match outcome {
        Ok(r) if r.status().is_success() => None,
        Ok(r) => Some((
            r.status().as_u16().to_string(),
            format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
        )),
        Err(e) => Some(("error".to_owned(), e.to_string())),
    };
    match refusal {
        None => {
            lock(&clients.accepted_rest).push(elapsed);
            clients.accepted.fetch_add(1, Ordering::SeqCst);
        }
        Some((code, why)) => {
            clients.refused.fetch_add(1, Ordering::SeqCst);
            *lock(&clients.refusals).entry(code).or_default() += 1;
            lock(&clients.first_refusal).get_or_insert(why);
        }
    }
}

/// Offers `load` for `seconds` from `t0` and returns once every POST started has been answered.
pub(crate) async fn drive(
    http: &reqwest::Client,
    targets: &[(SocketAddr, String)],
    clients: &Arc<Clients>,
    load: Load,
    t0: Instant,
    seconds: f64,
) {
    let end = t0 + Duration::from_secs_f64(seconds);
    match load {
        Load::Rate(rate) => {
            let outstanding = Arc::new(tokio::sync::Semaphore::new(512));
            let mut handles = Vec::new();
            for i in 0.. {
                let at = t0 + Duration::from_secs_f64(i as f64 / rate);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                let Ok(permit) = outstanding.clone().acquire_owned().await else {
                    break;
                };
                let (http, clients, target) = (http.clone(), clients.clone(), targets[i % targets.len()].clone());
                handles.push(tokio::spawn(async move {
                    post_one(&http, &target, &clients).await;
                    drop(permit);
                }));
            }
            futures::future::join_all(handles).await;
        }
        Load::Clients(n) => {
            let handles: Vec<_> = (0..n)
                .map(|c| {
                    let (http, clients, target) = (http.clone(), clients.clone(), targets[c % targets.len()].clone());
                    tokio::spawn(async move {
                        while Instant::now() < end {
                            post_one(&http, &target, &clients).await;
                        }
                    })
                })
                .collect();
            futures::future::join_all(handles).await;
        }
    }
}

async fn sweep(
    rest: &[(SocketAddr, String)],
    sink: &Arc<Sink>,
    plan: &E2ePlan,
    broker_pid: Option<u32>,
    crypto_ceiling: f64,
) -> anyhow::Result<Vec<Row>> {
    let http = http_client()?;
    // Warm-up: connections, first RSA operations; not reported.
    one_load(&http, rest, sink, Load::Clients(4), 0.5, broker_pid).await;
    let mut rows = Vec::new();
    for &load in &plan.loads {
        let (mut e2e, mut rest_row) = one_load(&http, rest, sink, load, plan.seconds, broker_pid).await;
        let name = format!("e2e {} pair{}", plan.pairs, if plan.pairs == 1 { "" } else { "s" });
        e2e.scenario = name.clone();
        e2e.ceiling = Some("crypto (2 thr)".into());
        e2e.ceiling_value = Some(crypto_ceiling);
        e2e.ratio = Some(e2e.msg_per_s / crypto_ceiling);
        rest_row.scenario = format!("{name}: REST response");
        e2e.print();
        rest_row.print();
        rows.push(e2e);
        rows.push(rest_row);
    }
    Ok(rows)
}

async fn one_load(
    http: &reqwest::Client,
    rest: &[(SocketAddr, String)],
    sink: &Arc<Sink>,
    load: Load,
    seconds: f64,
    broker_pid: Option<u32>,
) -> (Row, Row) {
    sink.reset();
    let clients = Arc::new(Clients::default());
    reset_peak_rss();
    let cpu0 = CpuSnapshot::take(broker_pid);
    let t0 = Instant::now();
    drive(http, rest, &clients, load, t0, seconds).await;
    let sent = clients.sent.load(Ordering::SeqCst);
    let refused = clients.refused.load(Ordering::SeqCst);
    let accepted = sent - refused;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.received.load(Ordering::SeqCst) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = CpuSnapshot::take(broker_pid).since(&cpu0, true);
    let received = sink.received.load(Ordering::SeqCst);
    let last = lock(&sink.last).unwrap_or(t0);
    let secs = last.duration_since(t0).as_secs_f64().max(1e-9);
    let mut latencies = std::mem::take(&mut *lock(&sink.latencies));
    let mut rest_times = std::mem::take(&mut *lock(&clients.rest));
    let offered = match load {
        Load::Rate(r) => format!("{r:.0}/s"),
        Load::Clients(n) => format!("max ({n} clients)"),
    };
    let peak = status_kib("self", "VmHWM") / 1024.0;
    let e2e = Row {
        load: offered.clone(),
        messages: received,
        msg_per_s: received as f64 / secs,
        latency_ms: Percentiles::of(&mut latencies),
        cpu_s: Some(cpu),
        peak_rss_mib: Some(peak),
        errors: refused + accepted.saturating_sub(received),
        note: format!(
            "POST start → plaintext at sink{}",
            lock(&clients.first_refusal)
                .as_ref()
                .map_or(String::new(), |w| format!("; {refused} refused, first: {w}"))
        ),
        ..Row::default()
    };
    let rest_row = Row {
        load: offered,
        messages: rest_times.len(),
        msg_per_s: rest_times.len() as f64 / seconds,
        latency_ms: Percentiles::of(&mut rest_times),
        errors: refused,
        note: "POST /v1/messages answered (sign+encrypt, confirmed publish)".into(),
        ..Row::default()
    };
    (e2e, rest_row)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 429 (or any non-2xx) answer is a refusal, counted by status, never an acceptance.
    #[tokio::test]
    async fn non_2xx_answers_are_counted_apart_from_accepted_ones() {
        let status = Arc::new(AtomicUsize::new(429));
        let s = status.clone();
        let app = axum::Router::new().route(
            "/v1/messages",
            axum::routing::post(move || {
                let code = s.load(Ordering::SeqCst) as u16;
                async move { axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::OK) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = (listener.local_addr().unwrap(), "recipient".to_owned());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = http_client().unwrap();
        let clients = Clients::default();
        post_one(&http, &target, &clients).await;
        post_one(&http, &target, &clients).await;
        status.store(200, Ordering::SeqCst);
        post_one(&http, &target, &clients).await;
        assert_eq!(clients.sent.load(Ordering::SeqCst), 3);
        assert_eq!(clients.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(clients.refused.load(Ordering::SeqCst), 2);
        assert_eq!(clients.refusals_text(), "429×2");
        assert_eq!(lock(&clients.accepted_rest).len(), 1);
        assert_eq!(lock(&clients.rest).len(), 3);
    }
}
