//! Graceful shutdown, as the README promises it: on SIGTERM the server stops taking new work, but
//! every send already handed to RabbitMQ is answered (on both transports) before the connection to
//! the agent and then the broker close. So no sender is told "outcome unknown" (502) or left
//! without an answer for a message that was in fact queued. And when a server is killed outright
//! (SIGKILL), every send it answered "accepted" is delivered once a server is back, on either
//! broker engine.

#![allow(clippy::unwrap_used)]

mod support;

use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::processes::{DmrProcess, broker_env, free_port, server_env};
use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// Sends `seed_message(recipient)` to `url` from `workers` concurrent senders until `stop` is
/// set (and at most `max` messages); returns each message id with the HTTP status it got (0 =
/// no answer).
async fn send_until(
    url: String,
    recipient: String,
    workers: usize,
    max: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> HashMap<String, u16> {
    let statuses: Arc<Mutex<HashMap<String, u16>>> = Arc::default();
    let http = reqwest::Client::new();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (statuses, http, url, recipient, stop, sent) = (
            statuses.clone(),
            http.clone(),
            url.clone(),
            recipient.clone(),
            stop.clone(),
            sent.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < max
            {
                let m = seed_message(&recipient);
                let id = m["id"].as_str().unwrap().to_owned();
                let status = match http.post(&url).json(&m).timeout(Duration::from_secs(15)).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                statuses.lock().unwrap().insert(id, status);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(statuses).unwrap().into_inner().unwrap()
}

/// Every queued message was answered 200, and every 200 is queued.
fn assert_answers_match_queue(statuses: &HashMap<String, u16>, queued: &[Value]) {
    let queued: HashSet<&str> = queued.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let accepted: HashSet<&str> = statuses
        .iter()
        .filter(|(_, s)| **s == 200)
        .map(|(id, _)| id.as_str())
        .collect();
    let unanswered: Vec<(&str, u16)> = queued
        .iter()
        .filter(|id| !accepted.contains(*id))
        .map(|id| (*id, statuses.get(*id).copied().unwrap_or(0)))
        .collect();
    assert!(
        unanswered.is_empty(),
        "{} queued messages were not answered 200 (id, status): {unanswered:?}",
        unanswered.len()
    );
    let lost: Vec<&&str> = accepted.iter().filter(|id| !queued.contains(*id)).collect();
    assert!(lost.is_empty(), "accepted but not queued: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_queued_send_and_never_says_outcome_unknown() {
    init();
    let guard = QueueGuard::new(&rabbit_config());
    let probe = BrokerProbe::connect().await;
    let pki = TestPki::new();
    let (b, d) = (pki.agent("B"), pki.agent("D (never connects)"));
    let vf_queue = format!("validation-failures-test-{}", uuid::Uuid::new_v4());
    guard.track(&vf_queue);
    guard.track_agent(&b.id);
    guard.track_agent(&d.id);
    let centops = pki.write_centops(&[&b, &d]);
    let logs = tempfile::tempdir().unwrap();
    let (http_port, grpc_port) = (free_port(), free_port());
    let rabbit = rabbit_config();
    let mut env = support::processes::server_env(&pki, &centops, (http_port, grpc_port), &rabbit, &vf_queue);
    env.push(("SHUTDOWN_TIMEOUT_MS".into(), "10000".into()));
    let mut server = DmrProcess::spawn("server", "server", &env, logs.path());
    let sink = Sink::start().await;
    let agent_b = connected_agent(&server, &pki, &b, grpc_port, &sink.url).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders = tokio::spawn(send_until(
        agent_b.url("/v1/messages"),
        d.id.clone(),
        10,
        100_000,
        stop.clone(),
    ));
    // Under load: wait until a good number were queued, then SIGTERM mid-traffic.
    assert!(
        probe.wait_queue_len_at_least(&d.id, 100, WAIT).await,
        "traffic never reached the queue"
    );
    let (took, clean) = server.terminate().await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let statuses = senders.await.unwrap();
    assert!(clean, "the server exits 0 on SIGTERM:\n{}", server.logs());
    assert!(took < Duration::from_secs(13), "within the grace period: {took:?}");
    let by_status = statuses.values().fold(HashMap::<u16, usize>::new(), |mut m, s| {
        *m.entry(*s).or_default() += 1;
        m
    });
    assert!(
        !by_status.contains_key(&502),
        "no 'outcome unknown' on a graceful shutdown: {by_status:?}\n{}",
        server.logs()
    );
    let queued = probe.drain(&d.id).await;
    assert_answers_match_queue(&statuses, &queued);
    drop(agent_b);
    guard.delete_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_agents_sends_in_flight_at_shutdown_are_answered_before_it_is_disconnected() {
    let (relay, extra) = Relay::start_full(2, |cfg| cfg.shutdown_timeout_ms = 10_000).await;
    let (c, d) = (&extra[0], &extra[1]);
    let sink_c = Sink::start().await;
    // A long ack timeout, so that a 504 can only mean the answer never came (not a slow one).
    let knobs = [("MESSAGE_DELIVERY_TIMEOUT_MS", "15000")];
    let mut legacy = LegacyAgent::spawn(relay.server.http, c, &sink_c.url, &knobs).await;
    legacy.wait_event("full-list", WAIT).await.expect("connected");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders = tokio::spawn(send_until(
        legacy.url("/v1/messages"),
        d.id.clone(),
        20,
        100_000,
        stop.clone(),
    ));
    assert!(
        relay.probe.wait_queue_len_at_least(&d.id, 60, WAIT).await,
        "traffic never reached the queue"
    );
    relay.server.stop.cancel();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !relay.server.task.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the server did not stop within its grace period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let statuses = senders.await.unwrap();
    let queued = relay.probe.drain(&d.id).await;
    // The test agent answers 504 when its ack never came (the socket closed first).
    assert_answers_match_queue(&statuses, &queued);
    legacy.kill().await;
    relay.finish().await;
}

/// An in-process agent for `creds` on the server process listening on `grpc_port`, once connected.
async fn connected_agent(
    server: &DmrProcess,
    pki: &TestPki,
    creds: &dmr_pki::AgentCredentials,
    grpc_port: u16,
    sink_url: &str,
) -> RunningAgent {
    let grpc: std::net::SocketAddr = format!("127.0.0.1:{grpc_port}").parse().unwrap();
    let agent = start_agent(agent_config(pki, creds, grpc, sink_url)).await;
    let deadline = Instant::now() + WAIT;
    while !agent.link.is_connected() {
        assert!(
            Instant::now() < deadline,
            "{} never connected:\n{}",
            creds.id,
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent
}

/// Sends accepted (answered 200) by the server at `http_port` so far, read from its metrics.
async fn accepted_so_far(http: &reqwest::Client, http_port: u16) -> f64 {
    let Ok(r) = http.get(format!("http://127.0.0.1:{http_port}/metrics")).send().await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("dmr_message_processing_duration_seconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_under_load_loses_no_accepted_message_once_it_is_back() {
    init();
    let guard = QueueGuard::new(&rabbit_config());
    let pki = TestPki::new();
    let (a, b) = (pki.agent("A (offline until the restart)"), pki.agent("B"));
    let vf_queue = format!("validation-failures-test-{}", uuid::Uuid::new_v4());
    guard.track(&vf_queue);
    guard.track_agent(&a.id);
    guard.track_agent(&b.id);
    let centops = pki.write_centops(&[&a, &b]);
    let (logs, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (http_port, grpc_port) = (free_port(), free_port());
    let mut env = server_env(&pki, &centops, (http_port, grpc_port), &rabbit_config(), &vf_queue);
    env.extend(broker_env(data.path()));
    let mut server = DmrProcess::spawn("server", "server", &env, logs.path());
    let sink_b = Sink::start().await;
    let agent_b = connected_agent(&server, &pki, &b, grpc_port, &sink_b.url).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders = tokio::spawn(send_until(
        agent_b.url("/v1/messages"),
        a.id.clone(),
        10,
        100_000,
        stop.clone(),
    ));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    while accepted_so_far(&http, http_port).await < 150.0 {
        assert!(Instant::now() < deadline, "traffic never flowed:\n{}", server.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Mid-traffic, no chance to clean up.
    server.kill().await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let statuses = senders.await.unwrap();
    let accepted: HashSet<String> = statuses
        .iter()
        .filter(|(_, s)| **s == 200)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(accepted.len() >= 150, "accepted before the kill: {}", accepted.len());

    let mut server = DmrProcess::spawn("server-again", "server", &env, logs.path());
    let sink_a = Sink::start().await;
    let grpc: std::net::SocketAddr = format!("127.0.0.1:{grpc_port}").parse().unwrap();
    let agent_a = start_agent(agent_config(&pki, &a, grpc, &sink_a.url)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let delivered: HashSet<String> = sink_a
            .messages()
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect();
        let missing: Vec<&String> = accepted.difference(&delivered).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.len();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        missing,
        0,
        "of {} sends accepted before the kill, {missing} never arrived:\n{}",
        accepted.len(),
        server.logs()
    );
    let ids: Vec<Value> = sink_a.messages().iter().map(|m| m["id"].clone()).collect();
    let unique: HashSet<&Value> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "each delivered once");
    drop(agent_a);
    drop(agent_b);
    server.terminate().await;
    guard.delete_now().await;
}
