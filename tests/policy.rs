//! The relay policy and the limits (issue "Policy, limits and hostile input"): who may send to whom
//! (POLICY_URL), per-agent send limits with policy overrides, and session and connection limits —
//! through the real server, real agents (gRPC and the original's Socket.IO client) and the broker.

#![allow(clippy::unwrap_used)]

mod support;

use dmr::proto::session_request::Frame as OutFrame;
use dmr::proto::session_response::Frame as InFrame;
use dmr::proto::{Envelope, SendRequest, SendResult, SendStatus, SessionRequest};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::session::{RawSession, open_session};
use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// A policy file in its own directory (kept alive by the returned guard).
fn policy_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.json");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// Rewrites the policy file; the server picks it up on its next file check.
fn rewrite(path: &Path, policy: &Value) {
    // A different length is a change even within the file system's timestamp resolution.
    std::fs::write(path, format!("{policy}\n{}", " ".repeat(rand_len()))).unwrap();
}

fn rand_len() -> usize {
    uuid::Uuid::new_v4().as_bytes()[0] as usize
}

async fn scrape(server: &RunningServer) -> String {
    reqwest::get(format!("http://{}/metrics", server.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn metric_value(server: &RunningServer, series: &str) -> f64 {
    metric(&scrape(server).await, series).unwrap_or(0.0)
}

async fn wait_metric(server: &RunningServer, series: &str, want: f64) {
    let reached = eventually_async(WAIT, || async { metric_value(server, series).await == want }).await;
    assert!(reached, "{series} did not reach {want}: {}", scrape(server).await);
}

fn use_policy(cfg: &mut dmr_server::config::ServerConfig, path: &Path) {
    cfg.policy.url = Some(path.display().to_string());
    cfg.centops_file_poll_interval_ms = 100;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pair_gets_403_naming_the_rule_queues_nothing_and_policy_changes_reach_open_sessions() {
    let (_dir, path) = policy_file("{}");
    let (relay, extra) = Relay::start_full(1, |cfg| use_policy(cfg, &path)).await;
    let (a, b, c) = (&relay.a.id, &relay.b.id, &extra[0]);
    let sink_c = Sink::start().await;
    let mut legacy = LegacyAgent::spawn(relay.server.http, c, &sink_c.url, &[]).await;
    assert!(
        legacy.wait_event("full-list", WAIT).await.is_some(),
        "{:?}",
        legacy.events
    );

    // The empty policy allows everything, as without one.
    let (status, answer) = relay.post_to_b(&seed_message(a)).await;
    assert_eq!(status, 200, "{answer}");
    relay.sink_a.wait_for(1, WAIT).await;

    // Nobody may send to A any more but through a group rule; B and the legacy agent C are not in it.
    rewrite(
        &path,
        &json!({
            "groups": {"inner": [a.to_uppercase()]},
            "rules": [
                {"from": "inner", "to": "*", "action": "allow"},
                {"from": [b, &c.id], "to": a, "action": "deny", "reason": "A takes no questions from outside"},
            ],
        }),
    );
    wait_metric(&relay.server, "dmr_policy_rules", 2.0).await;

    let refused = seed_message(a);
    let (status, answer) = relay.post_to_b(&refused).await;
    assert_eq!(status, 403, "{answer}");
    let text = answer.to_string();
    assert!(
        text.contains("rule 2 of the relay policy") && text.contains("A takes no questions from outside"),
        "the refusal names the rule and its reason: {text}"
    );
    let (status, answer) = post(&relay.http, &legacy.url("/v1/messages"), &seed_message(a)).await;
    assert_eq!(status, 502, "the original agent reports an error ack as 502: {answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap_or("")
            .contains("may not send to agent"),
        "the legacy ack carries the reason: {answer}"
    );
    let refusals = format!("dmr_policy_refusals_total{{recipient_id=\"{a}\",sender_id=\"{b}\"}}");
    assert_eq!(metric_value(&relay.server, &refusals).await, 1.0);
    // Refused, not invalid: nothing queued, nothing recorded as a validation failure.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.sink_a.messages().len(), 1, "nothing more reached A");
    assert_eq!(relay.probe.queue_len(a).await, Some(0));
    assert_eq!(relay.probe.queue_len(&relay.vf_queue).await, Some(0));
    // The other direction is not covered by a rule: the default (allow) applies.
    let (status, answer) = post(&relay.http, &relay.agent_a.url("/v1/messages"), &seed_message(b)).await;
    assert_eq!(status, 200, "{answer}");

    // A broken policy is refused whole; the last good one stays in force.
    rewrite(
        &path,
        &json!({"rules": [{"from": "nobody", "to": "*", "action": "allow"}]}),
    );
    wait_metric(
        &relay.server,
        "dmr_policy_refresh_failures_total{kind=\"unknown_group\"}",
        1.0,
    )
    .await;
    assert_eq!(relay.post_to_b(&seed_message(a)).await.0, 403);

    // Allowed again: the same open session's next send goes through.
    rewrite(
        &path,
        &json!({"default": "allow", "rules": [{"from": "*", "to": "*", "action": "allow"}]}),
    );
    wait_metric(&relay.server, "dmr_policy_rules", 1.0).await;
    let again = seed_message(a);
    let (status, answer) = relay.post_to_b(&again).await;
    assert_eq!(status, 200, "{answer}");
    let got = relay.sink_a.wait_for(2, WAIT).await;
    assert_eq!(got[1]["id"], again["id"]);
    assert_ne!(got[1]["id"], refused["id"]);
    legacy.kill().await;
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_policy_that_cannot_load_keeps_the_server_not_ready_and_agents_out() {
    init();
    let pki = TestPki::new();
    let a = pki.agent("Agent A");
    let guard = QueueGuard::new(&rabbit_config());
    guard.track_agent(&a.id);
    let vf = format!("validation-failures-test-{}", uuid::Uuid::new_v4());
    guard.track(&vf);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.json");
    let mut cfg = server_config(&pki, &pki.write_centops(&[&a]), &vf);
    use_policy(&mut cfg, &path);
    let mut server = start_server(cfg).await;

    let ready = reqwest::get(format!("http://{}/ready", server.http)).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(
        body["policy"],
        json!({"configured": true, "loaded": false, "refreshFailing": true})
    );
    let ca = std::fs::read_to_string(&pki.ca_file).unwrap();
    let refused = open_session(&ca, &a, server.grpc)
        .await
        .err()
        .expect("no session without the policy");
    assert!(
        refused.to_string().contains("relay policy (POLICY_URL)"),
        "the agent is told why: {refused}"
    );

    std::fs::write(&path, "{}").unwrap();
    let loaded = eventually_async(WAIT, || async {
        reqwest::get(format!("http://{}/ready", server.http))
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;
    assert!(loaded, "the server becomes ready once the policy loads");
    assert!(open_session(&ca, &a, server.grpc).await.is_ok());
    server.stop.cancel();
    let _ = (&mut server.task).await;
    guard.delete_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_over_its_policy_limits_gets_429_with_retry_after_or_413_and_nothing_is_queued() {
    let (_dir, path) = policy_file("{}");
    let relay = Relay::start_with(|cfg| use_policy(cfg, &path)).await;
    let (a, b) = (&relay.a.id, &relay.b.id);
    rewrite(
        &path,
        &json!({
            "rules": [{"from": "*", "to": "*", "action": "allow"}],
            "limits": [
                {"for": b, "messages_per_second": 1, "burst": 2, "max_payload_bytes": 3000},
                {"for": "*", "messages_per_second": 1000},
            ],
        }),
    );
    wait_metric(&relay.server, "dmr_policy_rules", 1.0).await;

    // The payload (the JWE of a short message, well over 3,000 bytes) is
    // over B's size limit: refused for good, 413.
    let long = v1_message(a, &"x".repeat(5000));
    let (status, answer) = relay.post_to_b(&long).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer.to_string().contains("max_payload_bytes"), "{answer}");

    let mut outcomes = Vec::new();
    for i in 0..3 {
        let response = relay
            .http
            .post(relay.agent_b.url("/v1/messages"))
            .json(&v1_message(a, &format!("short {i}")))
            .send()
            .await
            .unwrap();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        outcomes.push((response.status().as_u16(), retry_after, response.text().await.unwrap()));
    }
    assert_eq!(outcomes[0].0, 200, "{outcomes:?}");
    assert_eq!(outcomes[1].0, 200, "the burst of 2 passes: {outcomes:?}");
    let (status, retry_after, body) = &outcomes[2];
    assert_eq!(*status, 429, "{outcomes:?}");
    assert!(body.contains("1 sends per second"), "the limit is named: {body}");
    let seconds: u64 = retry_after.as_deref().expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&seconds), "Retry-After {seconds}");

    let series = format!("dmr_limit_refusals_total{{agent_id=\"{b}\",limit=\"sends_per_second\"}}");
    assert_eq!(metric_value(&relay.server, &series).await, 1.0);
    let series = format!("dmr_limit_refusals_total{{agent_id=\"{b}\",limit=\"payload_size\"}}");
    assert_eq!(metric_value(&relay.server, &series).await, 1.0);
    // Exactly the two accepted messages arrive; A (limited by the catch-all entry only) still sends.
    assert_eq!(relay.sink_a.wait_for(2, WAIT).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.sink_a.messages().len(), 2);
    let (status, _) = post(&relay.http, &relay.agent_a.url("/v1/messages"), &seed_message(b)).await;
    assert_eq!(status, 200);
    relay.finish().await;
}

/// Sends `count` envelopes from a raw session as fast as it can write them, then reads every
/// answer; returns them.
async fn blast(session: &mut RawSession, sender: &str, recipient: &str, count: usize) -> Vec<SendResult> {
    for i in 0..count {
        let request = SessionRequest {
            frame: Some(OutFrame::Send(SendRequest {
                correlation_id: format!("c{i}"),
                envelope: Some(Envelope {
                    id: uuid::Uuid::new_v4().to_string(),
                    sender_id: sender.to_owned(),
                    recipient_id: recipient.to_owned(),
                    timestamp: dmr::time::now_iso(),
                    r#type: "ChatMessage".into(),
                    payload: "e30.e30.e30.e30.e30".into(),
                    received_at: String::new(),
                }),
            })),
        };
        session.tx.send(request).await.unwrap();
    }
    let mut results = Vec::new();
    while results.len() < count {
        let frame = tokio::time::timeout(WAIT, session.inbound.message())
            .await
            .expect("answers keep coming")
            .unwrap()
            .unwrap();
        if let Some(InFrame::SendResult(r)) = frame.frame {
            results.push(r);
        }
    }
    results
}

fn count(results: &[SendResult], status: SendStatus) -> usize {
    results.iter().filter(|r| r.status == status as i32).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_beyond_the_in_flight_cap_are_refused_at_once_not_queued_behind() {
    let (relay, extra) = Relay::start_full(2, |cfg| cfg.policy.sends_in_flight = 1).await;
    let (sender, offline) = (&extra[0], &extra[1]);
    let ca = std::fs::read_to_string(&relay.pki.ca_file).unwrap();
    let mut session = open_session(&ca, sender, relay.server.grpc).await.unwrap();
    let results = blast(&mut session, &sender.id, &offline.id, 50).await;
    let accepted = count(&results, SendStatus::Accepted);
    let refused: Vec<&SendResult> = results
        .iter()
        .filter(|r| r.status == SendStatus::ResourceExhausted as i32)
        .collect();
    assert_eq!(accepted + refused.len(), 50, "{results:?}");
    assert!(accepted >= 1 && !refused.is_empty(), "{accepted} accepted");
    assert!(
        refused[0].detail.contains("1 sends awaiting their answer"),
        "{:?}",
        refused[0]
    );
    assert_eq!(refused[0].retry_after_ms, 1000);
    assert_eq!(
        relay.probe.wait_queue_len(&offline.id, accepted as u32, WAIT).await,
        Some(accepted as u32),
        "exactly the accepted sends are queued"
    );
    drop(session);
    relay.finish().await;
}

/// REST round trips of `n` sends from B to A, in order; each latency.
async fn latencies(relay: &Relay, n: usize) -> Vec<Duration> {
    let mut all = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        let (status, answer) = relay.post_to_b(&seed_message(&relay.a.id)).await;
        assert_eq!(status, 200, "{answer}");
        all.push(started.elapsed());
    }
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_flooding_is_held_to_its_rate_and_another_agents_latency_stays_in_its_range() {
    let (relay, extra) = Relay::start_full(2, |cfg| {
        cfg.policy.sends_per_second = 50;
        cfg.policy.send_burst = 50;
    })
    .await;
    let (flooder, offline) = (&extra[0], &extra[1]);
    let baseline = latencies(&relay, 20).await;

    let ca = std::fs::read_to_string(&relay.pki.ca_file).unwrap();
    let mut session = open_session(&ca, flooder, relay.server.grpc).await.unwrap();
    let (flooder_id, offline_id) = (flooder.id.clone(), offline.id.clone());
    let started = Instant::now();
    let flood = tokio::spawn(async move {
        let mut results = Vec::new();
        while started.elapsed() < Duration::from_secs(3) {
            results.extend(blast(&mut session, &flooder_id, &offline_id, 200).await);
        }
        (results, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = latencies(&relay, 20).await;
    let (results, flooded_for) = flood.await.unwrap();

    let accepted = count(&results, SendStatus::Accepted);
    let limited = count(&results, SendStatus::ResourceExhausted);
    assert_eq!(accepted + limited, results.len());
    let allowed = 50.0 + 50.0 * flooded_for.as_secs_f64();
    assert!(
        (accepted as f64) <= allowed + 1.0,
        "the flooder got {accepted} sends through in {flooded_for:?}, over its 50/s and burst 50"
    );
    assert!(
        limited > accepted,
        "the flood was mostly refused: {limited} refused, {accepted} accepted"
    );
    let median = |v: &[Duration]| v[v.len() / 2];
    let (before, under) = (median(&baseline), median(&during));
    assert!(
        under <= before * 5 + Duration::from_millis(50),
        "B's median send took {under:?} during the flood, {before:?} before (all: {during:?})"
    );
    println!(
        "flood: {} sends in {flooded_for:?}, {accepted} accepted; B's median {before:?} before, {under:?} during",
        results.len()
    );
    assert_eq!(
        relay.probe.wait_queue_len(&offline.id, accepted as u32, WAIT).await,
        Some(accepted as u32)
    );
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_connection_limits_refuse_with_the_limit_named() {
    let (relay, extra) = Relay::start_full(2, |cfg| {
        cfg.policy.sessions = 3;
        cfg.policy.session_open_burst = 2;
        cfg.policy.session_opens_per_minute = 1;
        cfg.policy.socket_connects_per_minute = 3;
    })
    .await;
    let (c, d) = (&extra[0], &extra[1]);
    let ca = std::fs::read_to_string(&relay.pki.ca_file).unwrap();

    // A flapping agent: two sessions in a row pass (the second replaces the first), the third is refused.
    let first = open_session(&ca, c, relay.server.grpc).await.unwrap();
    drop(first);
    let second = open_session(&ca, c, relay.server.grpc).await.unwrap();
    let third = open_session(&ca, c, relay.server.grpc).await.err().expect("refused");
    assert!(third.to_string().contains("LIMIT_SESSION_OPENS_PER_MINUTE"), "{third}");

    // A, B and C hold the instance's three sessions: D is sent elsewhere.
    let full = open_session(&ca, d, relay.server.grpc).await.err().expect("refused");
    assert!(full.to_string().contains("LIMIT_SESSIONS"), "{full}");
    let series = format!("dmr_limit_refusals_total{{agent_id=\"{}\",limit=\"sessions\"}}", d.id);
    assert_eq!(metric_value(&relay.server, &series).await, 1.0);
    drop(second);

    // Socket.IO connection attempts from one address: three pass, the fourth gets 429.
    let handshake = format!("http://{}/socket.io/?EIO=4&transport=polling", relay.server.http);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = relay.http.get(&handshake).send().await.unwrap();
        statuses.push((
            response.status().as_u16(),
            response.headers().get("retry-after").cloned(),
        ));
    }
    assert!(statuses[..3].iter().all(|(s, _)| *s == 200), "{statuses:?}");
    assert_eq!(statuses[3].0, 429, "{statuses:?}");
    assert!(statuses[3].1.is_some(), "Retry-After is set");
    relay.finish().await;
}
