//! The server at its edges, as operators meet it: started before CentOps answers, wrong broker
//! credentials, probes that never speak TLS, an endpoint that is down for a moment, and a dead
//! letter that says why.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};
use support::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const WAIT: Duration = Duration::from_secs(20);

async fn health(ca: &str, creds: &dmr_pki::AgentCredentials, server: std::net::SocketAddr) -> ServingStatus {
    let channel = support::session::connect(ca, &creds.cert_pem, &creds.key_pem, server)
        .await
        .unwrap();
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap();
    answer.into_inner().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_starts_without_centops_is_not_ready_refuses_agents_clearly_then_serves() {
    init();
    let guard = QueueGuard::new(&rabbit_config());
    let pki = TestPki::new();
    let (a, b) = (pki.agent("A"), pki.agent("B"));
    guard.track_agent(&a.id);
    guard.track_agent(&b.id);
    let centops = CentOpsStub::start().await;
    centops.serve(503, "down for maintenance");
    let vf_queue = format!("validation-failures-test-{}", uuid::Uuid::new_v4());
    guard.track(&vf_queue);
    let mut cfg = server_config(&pki, &pki.write_centops(&[&a, &b]), &vf_queue);
    cfg.centops_configuration_url = centops.url.clone();
    cfg.centops_request_timeout_ms = 500;
    let mut server = start_server(cfg).await;
    let http = reqwest::Client::new();
    let ready = format!("http://{}/ready", server.http);
    let r = http.get(&ready).send().await.unwrap();
    assert_eq!(r.status(), 503, "not ready without a directory");
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["directoryLoaded"], false);
    let ca = std::fs::read_to_string(&pki.ca_file).unwrap();
    assert_eq!(
        health(&ca, &a, server.grpc).await,
        ServingStatus::NotServing,
        "grpc.health agrees with /ready"
    );
    let refused = support::session::open_session(&ca, &a, server.grpc)
        .await
        .err()
        .expect("refused");
    assert!(
        refused.to_string().contains("not loaded the agent directory"),
        "{refused}"
    );

    // CentOps comes back: the retrying first load succeeds, and everything serves.
    centops.serve_agents(&[&a, &b]);
    let deadline = Instant::now() + WAIT;
    while http.get(&ready).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health(&ca, &a, server.grpc).await, ServingStatus::Serving);
    support::session::open_session(&ca, &a, server.grpc)
        .await
        .expect("admitted");
    let failures = server.core.metrics.render();
    assert!(
        failures.contains("dmr_centops_refresh_failures_total{kind=\"http_status\"}"),
        "each failure counted"
    );
    server.stop.cancel();
    let _ = (&mut server.task).await;
    guard.delete_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_broker_credentials_stop_the_server_at_start_naming_user_and_vhost() {
    init();
    let pki = TestPki::new();
    let a = pki.agent("A");
    let mut cfg = server_config(&pki, &pki.write_centops(&[&a]), "unused");
    // RabbitMQ's own check, whatever engine the suite runs the others on.
    cfg.broker.engine = dmr_server::config::BrokerEngine::Rabbitmq;
    cfg.rabbitmq.user = "nobody-here".into();
    cfg.rabbitmq.pass = "wrong-password-123".into();
    let err = dmr_server::Server::bind(cfg)
        .await
        .err()
        .expect("refused at start")
        .to_string();
    assert!(
        err.contains("nobody-here") && err.contains("RABBITMQ_DEFAULT_USER"),
        "{err}"
    );
    assert!(err.contains("virtual host \"/\""), "{err}");
    assert!(
        !err.contains("wrong-password-123"),
        "the password is never shown: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_embedded_engines_data_directory_is_refused_naming_it() {
    init();
    let pki = TestPki::new();
    let a = pki.agent("A");
    let data = tempfile::tempdir().unwrap();
    let mut cfg = server_config(&pki, &pki.write_centops(&[&a]), "unused");
    cfg.broker.engine = dmr_server::config::BrokerEngine::Embedded;
    cfg.broker.embedded_data_dir = data.path().to_owned();
    let first = dmr_server::Server::bind(cfg.clone())
        .await
        .expect("the first server starts");
    let err = dmr_server::Server::bind(cfg.clone())
        .await
        .err()
        .expect("the second is refused")
        .to_string();
    let dir = data.path().display().to_string();
    assert!(
        err.contains("EMBEDDED_DATA_DIR") && err.contains(&dir) && err.contains("in use"),
        "{err}"
    );
    drop(first);
    // Once the first is gone, the directory is free again.
    let again = dmr_server::Server::bind(cfg).await;
    assert!(again.is_ok(), "{:?}", again.err().map(|e| e.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_probe_is_not_an_authentication_failure() {
    let relay = Relay::start().await;
    let metrics = &relay.server.core.metrics;
    let failures_before = metrics.auth_failures.with_label_values(&["tls_handshake"]).get();
    for _ in 0..3 {
        drop(tokio::net::TcpStream::connect(relay.server.grpc).await.unwrap());
    }
    let deadline = Instant::now() + WAIT;
    while metrics.tls_probes.get() < 3 {
        assert!(Instant::now() < deadline, "probes not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metrics.auth_failures.with_label_values(&["tls_handshake"]).get(),
        failures_before,
        "not counted as refused authentications"
    );
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_endpoint_outage_does_not_dead_letter() {
    // The documented defaults: no attempt limit, a retry budget of minutes.
    let relay = Relay::start_with(|cfg| cfg.message_delivery_max_attempts = 0).await;
    relay.sink_a.set_status(500);
    let m = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&m).await.0, 200);
    let deadline = Instant::now() + WAIT;
    while relay.sink_a.hits.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "no delivery attempts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The endpoint restarts: about a second of failures, then it answers again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.sink_a.set_status(200);
    let got = relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "delivered once the endpoint is back");
    assert_eq!(
        relay.probe.queue_len(&format!("{}.dlq", relay.a.id)).await,
        Some(0),
        "nothing dead-lettered"
    );
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_carries_the_last_error() {
    let relay = Relay::start_with(|cfg| {
        cfg.message_delivery_max_attempts = 0;
        cfg.message_delivery_retry_budget_ms = 300;
    })
    .await;
    relay.sink_a.set_status(503);
    let m = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&m).await.0, 200);
    let dlq = format!("{}.dlq", relay.a.id);
    assert_eq!(relay.probe.wait_queue_len(&dlq, 1, WAIT).await, Some(1));
    // Read back through the broker's own listing (RabbitMQ: basic.get, then returned).
    let listed = relay.server.core.broker.list(&dlq, 10).await.unwrap();
    assert_eq!(listed.len(), 1, "the dead letter");
    let dead = &listed[0];
    let header = |name: &str| {
        dead.headers
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("header {name} missing: {:?}", dead.headers))
    };
    let last_error = header("x-dmr-last-error");
    assert!(
        last_error.contains("DELIVERY_FAILED") && last_error.contains("503"),
        "{last_error}"
    );
    assert!(header("x-dmr-dead-letter-reason").contains("delivery-failed"));
    let attempts: u32 = header("x-dmr-attempts").parse().expect("x-dmr-attempts is a number");
    assert!(attempts >= 2, "retried before dead-lettering: {attempts}");
    let body: serde_json::Value = serde_json::from_slice(&dead.body).unwrap();
    assert_eq!(body["id"], m["id"], "the original envelope");
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_error_is_not_a_lost_broker_connection() {
    let relay = Relay::start().await;
    let broker = &relay.server.core.broker;
    let missing = format!("no-such-queue-{}", uuid::Uuid::new_v4());
    let err = broker.counts(&missing).await.expect_err("a missing queue");
    assert!(err.is_queue_missing(), "typed, not read from the text: {err}");
    // RabbitMQ closed that channel (NOT_FOUND); the connection must stay up. This sleep backs a
    // negative check: the supervisor would have reacted within milliseconds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(broker.is_ready(), "still connected");
    let m = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&m).await.0, 200);
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_recipient_that_falls_behind_holds_its_senders_answers_and_an_offline_one_does_not() {
    let (relay, extra) = Relay::start_full(1, |cfg| cfg.message_queue_hold_max_ms = 300).await;
    let holds = || relay.server.core.metrics.send_holds.get_sample_count();
    // C never connects: messages for it wait in its queue, and its senders are not held.
    let offline = &extra[0];
    for _ in 0..20 {
        assert_eq!(relay.post_to_b(&seed_message(&offline.id)).await.0, 200);
    }
    assert_eq!(relay.probe.queue_len(&offline.id).await, Some(20));
    assert_eq!(holds(), 0, "nobody is held for an offline recipient");

    // A is connected but its endpoint is slow: once more than its session takes ahead is waiting,
    // answers to its senders are held.
    relay.sink_a.set_delay(Duration::from_millis(100));
    let mut sent = Vec::new();
    for _ in 0..30 {
        let m = seed_message(&relay.a.id);
        assert_eq!(relay.post_to_b(&m).await.0, 200, "held, then accepted");
        sent.push(m["id"].clone());
    }
    assert!(holds() >= 1, "answers were held while A was behind");
    let got = relay.sink_a.wait_for(sent.len(), Duration::from_secs(60)).await;
    let ids: Vec<_> = got.iter().map(|m| m["id"].clone()).collect();
    assert_eq!(ids, sent, "nothing lost, in order");
    relay.finish_with(&[offline]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlogged_recipient_makes_senders_wait_with_429_instead_of_queueing_without_bound() {
    let (relay, extra) = Relay::start_full(1, |cfg| cfg.message_queue_max_depth = 5).await;
    let c = &extra[0]; // never connects: its queue only grows
    let mut accepted = 0u32;
    let deadline = Instant::now() + WAIT;
    let refused = loop {
        assert!(Instant::now() < deadline, "never refused after {accepted} accepted");
        let r = relay
            .http
            .post(relay.agent_b.url("/v1/messages"))
            .json(&seed_message(&c.id))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => accepted += 1,
            429 => break r,
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(accepted >= 5, "the cap is not reached before 5 messages: {accepted}");
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["message"].to_string().contains("MESSAGE_QUEUE_MAX_DEPTH"),
        "{body}"
    );
    assert_eq!(
        relay.probe.queue_len(&c.id).await,
        Some(accepted),
        "the refused one was not queued"
    );
    assert!(relay.server.core.metrics.backlog_refusals.get() >= 1);
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_age_of_an_agents_oldest_waiting_message_is_a_metric() {
    let relay = Relay::start().await;
    relay.sink_a.set_delay(Duration::from_millis(700));
    for _ in 0..4 {
        assert_eq!(relay.post_to_b(&seed_message(&relay.a.id)).await.0, 200);
    }
    let series = format!("dmr_agent_oldest_message_age_seconds{{agent_id=\"{}\"}}", relay.a.id);
    let age = |text: &str| metric(text, &series).unwrap_or(0.0);
    let deadline = Instant::now() + WAIT;
    while age(&relay.server.core.metrics.render()) < 1.0 {
        assert!(Instant::now() < deadline, "the backlog's age never showed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = relay.server.core.metrics.render();
    assert!(text.contains(&format!("dmr_agent_queue_messages{{agent_id=\"{}\"}}", relay.a.id)));
    assert_eq!(relay.sink_a.wait_for(4, WAIT).await.len(), 4);
    assert!(text.contains("dmr_message_queue_wait_seconds_bucket"));
    relay.finish().await;
}
