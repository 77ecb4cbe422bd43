//! Relay scenario: synthetic agents on raw mTLS gRPC sessions send one pre-sealed JWE over and
//! over (a new message id each time) → in-process server → RabbitMQ → server → synthetic
//! receiving sessions that answer every delivery with OK at once. No RSA in the loop: this is what
//! the server itself costs on top of the broker.

use crate::fixture::{ServerHandle, centops_file, delete_queues, server_config};
use crate::measure::{CpuSnapshot, Percentiles, Row, reset_peak_rss, status_kib};
use dmr::proto::session_request::Frame as OutFrame;
use dmr::proto::session_response::Frame as InFrame;
use dmr::proto::{DeliveryResult, DeliveryStatus, Envelope, SendRequest, SendStatus, SessionRequest};
use dmr_server::config::RabbitConfig;
use dmr_testkit::TestPki;
use dmr_testkit::session::{RawSession, open_session};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How one relay sweep runs.
pub struct RelayPlan {
    pub pairs: usize,
    /// Offered loads in msg/s over all pairs; `None` = as fast as the window allows.
    pub loads: Vec<Option<f64>>,
    /// How long each load is offered.
    pub seconds: f64,
    /// Unbounded load: messages sent but not yet received, per pair.
    pub window: usize,
}

#[derive(Default)]
struct Shared {
    /// Message id → when it was sent.
    sent: Mutex<HashMap<String, Instant>>,
    /// Correlation id → when it was sent.
    awaiting_result: Mutex<HashMap<String, Instant>>,
    latencies: Mutex<Vec<Duration>>,
    accept_latencies: Mutex<Vec<Duration>>,
    last_received: Mutex<Option<Instant>>,
    received: AtomicUsize,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    first_refusal: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn reset(&self) {
        lock(&self.sent).clear();
        lock(&self.awaiting_result).clear();
        lock(&self.latencies).clear();
        lock(&self.accept_latencies).clear();
        *lock(&self.last_received) = None;
        self.received.store(0, Ordering::SeqCst);
        self.accepted.store(0, Ordering::SeqCst);
        self.refused.store(0, Ordering::SeqCst);
    }
}

/// One sender/receiver pair.
struct Pair {
    sender: tokio::sync::mpsc::Sender<SessionRequest>,
    sender_id: String,
    recipient_id: String,
    jwe: Arc<str>,
    /// Received by this pair's receiver (for the window).
    received: Arc<AtomicUsize>,
    progress: Arc<Notify>,
}

/// Answers every delivery on `session` with OK at once and records its latency.
fn spawn_receiver(
    mut session: RawSession,
    shared: Arc<Shared>,
    received: Arc<AtomicUsize>,
    progress: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(frame)) = session.inbound.message().await {
            let Some(InFrame::Delivery(d)) = frame.frame else {
                continue;
            };
            let now = Instant::now();
            let ack = SessionRequest {
                frame: Some(OutFrame::DeliveryResult(DeliveryResult {
                    delivery_id: d.delivery_id,
                    status: DeliveryStatus::Ok as i32,
                    errors: vec![],
                })),
            };
            if session.tx.send(ack).await.is_err() {
                break;
            }
            let sent = d.envelope.and_then(|e| lock(&shared.sent).remove(&e.id));
            if let Some(sent) = sent {
                lock(&shared.latencies).push(now.duration_since(sent));
                *lock(&shared.last_received) = Some(now);
                shared.received.fetch_add(1, Ordering::SeqCst);
            }
            received.fetch_add(1, Ordering::SeqCst);
            progress.notify_one();
        }
        drop(session.channel);
    })
}

/// Reads the sender's send results.
fn spawn_result_reader(mut session: RawSession, shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(frame)) = session.inbound.message().await {
            let Some(InFrame::SendResult(r)) = frame.frame else {
                continue;
            };
            let now = Instant::now();
            if let Some(sent) = lock(&shared.awaiting_result).remove(&r.correlation_id) {
                lock(&shared.accept_latencies).push(now.duration_since(sent));
            }
            if r.status() == SendStatus::Accepted {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
            } else {
                shared.refused.fetch_add(1, Ordering::SeqCst);
                lock(&shared.first_refusal).get_or_insert_with(|| format!("{}: {}", r.status, r.detail));
            }
        }
        drop(session);
    })
}

/// Offers `rate` (or as much as the window allows) on `pair` for `seconds` from `t0`; returns the
/// number sent.
async fn send_for(
    pair: &Pair,
    shared: &Shared,
    t0: Instant,
    seconds: f64,
    per_pair_rate: Option<f64>,
    offset: Duration,
    window: usize,
) -> usize {
    let end = t0 + Duration::from_secs_f64(seconds);
    let start_received = pair.received.load(Ordering::SeqCst);
    let mut sent = 0usize;
    loop {
        match per_pair_rate {
            Some(r) => {
                let at = t0 + offset + Duration::from_secs_f64(sent as f64 / r);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
            }
            None => {
                if Instant::now() >= end {
                    break;
                }
                loop {
                    let progressed = pair.progress.notified();
                    let done = pair.received.load(Ordering::SeqCst) - start_received;
                    if sent - done.min(sent) < window {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(50), progressed).await;
                }
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let correlation_id = uuid::Uuid::new_v4().simple().to_string();
        let now = Instant::now();
        lock(&shared.sent).insert(id.clone(), now);
        lock(&shared.awaiting_result).insert(correlation_id.clone(), now);
        let frame = SessionRequest {
            frame: Some(OutFrame::Send(SendRequest {
                correlation_id,
                envelope: Some(Envelope {
                    id,
                    sender_id: pair.sender_id.clone(),
                    recipient_id: pair.recipient_id.clone(),
                    timestamp: dmr::time::now_iso(),
                    r#type: "ChatMessage".into(),
                    payload: pair.jwe.to_string(),
                    received_at: String::new(),
                }),
            })),
        };
        if pair.sender.send(frame).await.is_err() {
            break;
        }
        sent += 1;
    }
    sent
}

/// Runs every load of `plan` against one server with `plan.pairs` pairs. `ceiling` gives the
/// broker ceiling (msg/s, name) to compare with.
pub async fn run(
    rabbit: &RabbitConfig,
    plan: &RelayPlan,
    cache: &Path,
    broker_pid: Option<u32>,
    ceiling: Option<(f64, String)>,
) -> anyhow::Result<Vec<Row>> {
    let pki = TestPki::try_new()?;
    let agents = pki.agents_with_cached_keys(plan.pairs * 2, cache)?;
    let cfg = server_config(&pki, &centops_file(&pki, &agents)?, rabbit);
    let server = ServerHandle::start(cfg).await?;
    let vf = server.validation_failures_queue();
    let result = sweep(&pki, &agents, &server, plan, broker_pid, ceiling).await;
    server.stop().await;
    delete_queues(&rabbit.uri(), &agents, &[vf]).await?;
    result
}

async fn sweep(
    pki: &TestPki,
    agents: &[dmr_pki::AgentCredentials],
    server: &ServerHandle,
    plan: &RelayPlan,
    broker_pid: Option<u32>,
    ceiling: Option<(f64, String)>,
) -> anyhow::Result<Vec<Row>> {
    let shared = Arc::new(Shared::default());
    let mut pairs = Vec::new();
    let mut tasks = Vec::new();
    let mut body_bytes = 0usize;
    for p in 0..plan.pairs {
        let (sender, receiver) = (&agents[2 * p], &agents[2 * p + 1]);
        let received = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(Notify::new());
        let rx = open_session(pki.ca.cert_pem(), receiver, server.grpc).await?;
        tasks.push(spawn_receiver(rx, shared.clone(), received.clone(), progress.clone()));
        let tx = open_session(pki.ca.cert_pem(), sender, server.grpc).await?;
        let sender_tx = tx.tx.clone();
        tasks.push(spawn_result_reader(tx, shared.clone()));
        let sender_key = dmr::keys::PrivateKey::from_pem(&sender.key_pem)?;
        let recipient_key = dmr::keys::PublicKey::from_pem(&receiver.public_key_pem)?;
        let payload = serde_json::json!({
            "chat": {"id": uuid::Uuid::new_v4().to_string(), "created": "2024-01-15T10:00:00.000Z"},
            "messages": [{"id": uuid::Uuid::new_v4().to_string(), "content": "relay benchmark message"}]
        });
        let jwe: Arc<str> = dmr::jose::seal(Some(&payload), &sender_key, &recipient_key)?.into();
        // What the server publishes: the envelope JSON with the JWE, ids, timestamps and type.
        body_bytes = jwe.len() + 260;
        pairs.push(Pair {
            sender: sender_tx,
            sender_id: sender.id.clone(),
            recipient_id: receiver.id.clone(),
            jwe,
            received,
            progress,
        });
    }
    let mut rows = Vec::new();
    // Warm-up (connections, consumers, allocator): not reported.
    let warm = RelayPlan {
        pairs: plan.pairs,
        loads: vec![None],
        seconds: 0.5,
        window: 64,
    };
    one_load(&pairs, &shared, &warm, None, broker_pid).await?;
    for &load in &plan.loads {
        let mut row = one_load(&pairs, &shared, plan, load, broker_pid).await?;
        row.scenario = format!("relay {} pair{}", plan.pairs, if plan.pairs == 1 { "" } else { "s" });
        row.note = format!("{} ~{body_bytes} B envelopes; {}", row.note, "send → delivery frame");
        if let Some((value, name)) = &ceiling {
            row.ceiling = Some(name.clone());
            row.ceiling_value = Some(*value);
            row.ratio = Some(row.msg_per_s / value);
        }
        row.print();
        rows.push(row);
    }
    for t in tasks {
        t.abort();
    }
    Ok(rows)
}

async fn one_load(
    pairs: &[Pair],
    shared: &Arc<Shared>,
    plan: &RelayPlan,
    load: Option<f64>,
    broker_pid: Option<u32>,
) -> anyhow::Result<Row> {
    shared.reset();
    reset_peak_rss();
    let cpu0 = CpuSnapshot::take(broker_pid);
    let t0 = Instant::now();
    let per_pair = load.map(|r| r / pairs.len() as f64);
    let sent: usize = futures::future::join_all(pairs.iter().enumerate().map(|(i, pair)| {
        // Stagger the pairs' ticks so paced sends do not arrive in bursts.
        let offset = per_pair.map_or(Duration::ZERO, |r| {
            Duration::from_secs_f64(i as f64 / (r * pairs.len() as f64))
        });
        send_for(pair, shared, t0, plan.seconds, per_pair, offset, plan.window)
    }))
    .await
    .into_iter()
    .sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.received.load(Ordering::SeqCst) + shared.refused.load(Ordering::SeqCst) < sent
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = CpuSnapshot::take(broker_pid).since(&cpu0, true);
    let received = shared.received.load(Ordering::SeqCst);
    let last = lock(&shared.last_received).unwrap_or(t0);
    let secs = last.duration_since(t0).as_secs_f64().max(1e-9);
    let mut latencies = std::mem::take(&mut *lock(&shared.latencies));
    let mut accepts = std::mem::take(&mut *lock(&shared.accept_latencies));
    let accept = Percentiles::of(&mut accepts);
    let refused = shared.refused.load(Ordering::SeqCst);
    let mut row = Row {
        load: load.map_or_else(|| format!("max (w{}/pair)", plan.window), |r| format!("{r:.0}/s")),
        messages: received,
        msg_per_s: received as f64 / secs,
        latency_ms: Percentiles::of(&mut latencies),
        cpu_s: Some(cpu),
        peak_rss_mib: Some(status_kib("self", "VmHWM") / 1024.0),
        errors: sent.saturating_sub(received),
        note: format!(
            "accept p50/p99 {:.2}/{:.2} ms;{}",
            accept.map_or(f64::NAN, |a| a.p50),
            accept.map_or(f64::NAN, |a| a.p99),
            if refused > 0 {
                format!(
                    " {refused} refused ({});",
                    lock(&shared.first_refusal).clone().unwrap_or_default()
                )
            } else {
                String::new()
            }
        ),
        ..Row::default()
    };
    if let Some(a) = accept {
        row.extra.insert("accept_p50_ms".into(), a.p50);
        row.extra.insert("accept_p99_ms".into(), a.p99);
    }
    row.extra.insert("sent".into(), sent as f64);
    Ok(row)
}
