//! The agent's REST API against hostile and sloppy clients (issue 18): cross-site requests, wrong
//! content types, reused ids, ambiguous JSON, unknown routes, and timestamps written the way
//! RFC 3339 allows — each through a real relay (server, agents, RabbitMQ, mutual TLS).

#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

async fn raw_post(relay: &Relay, headers: &[(&str, &str)], body: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = relay.http.post(relay.agent_b.url("/v1/messages")).body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn is_error_body(v: &Value, status: u16) -> bool {
    v["statusCode"] == json!(status) && v["error"].is_string() && !v["message"].is_null()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_post_is_refused_and_nothing_is_delivered() {
    let relay = Relay::start().await;
    let m = seed_message(&relay.a.id);
    let body = m.to_string();
    // What a web page can make a browser send without a CORS preflight.
    let (status, _, answer) = raw_post(
        &relay,
        &[("content-type", "text/plain"), ("origin", "http://evil.example")],
        &body,
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(is_error_body(&answer, 403), "{answer}");
    // The right content type does not make a foreign origin acceptable.
    let (status, _, _) = raw_post(
        &relay,
        &[("content-type", "application/json"), ("origin", "http://evil.example")],
        &body,
    )
    .await;
    assert_eq!(status, 403);
    // Nor does text/plain without an origin (curl, a service with a wrong header).
    let (status, _, answer) = raw_post(&relay, &[("content-type", "text/plain")], &body).await;
    assert_eq!(status, 415, "{answer}");
    assert!(is_error_body(&answer, 415), "{answer}");
    let (status, _, _) = raw_post(&relay, &[], &body).await;
    assert_eq!(status, 415, "no content type at all");
    // A well-formed service request still goes through, and only it arrives.
    let (status, _, answer) = raw_post(&relay, &[("content-type", "application/json")], &body).await;
    assert_eq!(status, 200, "{answer}");
    let got = relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        relay.sink_a.messages().len(),
        1,
        "the refused requests delivered nothing"
    );
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_may_post() {
    init();
    let relay = Relay::start().await;
    // A second agent B process-internal, with an allow-list.
    let mut cfg = agent_config(&relay.pki, &relay.b, relay.server.grpc, &relay.sink_b.url);
    cfg.cors_allowed_origins = vec!["https://chat.example.org".into()];
    let mut allowing = start_agent(cfg).await;
    allowing.wait_connected().await;
    let post = |origin: &'static str| {
        let (http, url, body) = (
            relay.http.clone(),
            allowing.url("/v1/messages"),
            seed_message(&relay.a.id),
        );
        async move {
            http.post(url)
                .header("origin", origin)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let ok = post("https://chat.example.org").await;
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(
        ok.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://chat.example.org"),
        "the allowed page may read the answer"
    );
    assert_eq!(post("https://evil.example").await.status().as_u16(), 403);
    allowing.shutdown().await;
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_id_with_another_body_is_a_conflict() {
    let relay = Relay::start().await;
    let m = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&m).await.0, 200);
    // The same message again (keys in another order): idempotent 200, not queued twice.
    let mut reordered = serde_json::Map::new();
    for key in ["payload", "type", "timestamp", "recipientId", "id"] {
        reordered.insert(key.into(), m[key].clone());
    }
    assert_eq!(relay.post_to_b(&Value::Object(reordered)).await.0, 200);
    // The same id with other content is a client bug: 409, and it is not delivered.
    let mut other = m.clone();
    other["payload"]["messages"][0]["content"] = json!("something else");
    let (status, answer) = relay.post_to_b(&other).await;
    assert_eq!(status, 409, "{answer}");
    assert!(is_error_body(&answer, 409), "{answer}");
    assert_eq!(relay.sink_a.wait_for(1, WAIT).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = relay.sink_a.messages();
    assert_eq!(got.len(), 1, "delivered once");
    assert_eq!(got[0]["payload"]["messages"][0]["content"], json!("example string 2"));
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_json_keys_are_refused() {
    let relay = Relay::start().await;
    let m = seed_message(&relay.a.id);
    // Two recipients in one body: which one wins depends on the parser; refuse instead.
    let text = m.to_string().replacen(
        "\"recipientId\"",
        &format!("\"recipientId\":\"{}\",\"recipientId\"", relay.b.id),
        1,
    );
    let (status, _, answer) = raw_post(&relay, &[("content-type", "application/json")], &text).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.to_string().contains("duplicate key"), "{answer}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(relay.sink_a.messages().is_empty() && relay.sink_b.messages().is_empty());
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_json_errors_and_the_openapi_tags_name_resources() {
    let relay = Relay::start().await;
    let r = relay.http.get(relay.agent_b.url("/nope")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(is_error_body(&r.json::<Value>().await.unwrap(), 404));
    let r = relay.http.get(relay.agent_b.url("/v1/messages")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(is_error_body(&r.json::<Value>().await.unwrap(), 405));
    let doc: Value = relay
        .http
        .get(relay.agent_b.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["paths"]["/v1/messages"]["post"]["tags"], json!(["messages"]));
    assert_eq!(doc["paths"]["/v1/health"]["get"]["tags"], json!(["health"]));
    assert!(!doc.to_string().contains("crate::api"), "no module paths as tags");
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_says_when_to_retry() {
    init();
    let pki = TestPki::new();
    let a = pki.agent("lonely");
    // A server address where nothing listens: the agent never connects.
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], support::processes::free_port()));
    let mut agent = start_agent(agent_config(&pki, &a, dead, "http://127.0.0.1:9/")).await;
    let r = reqwest::Client::new()
        .post(agent.url("/v1/messages"))
        .json(&seed_message(&a.id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc3339_lowercase_timestamps_are_accepted_and_normalised() {
    let relay = Relay::start().await;
    let mut m = seed_message(&relay.a.id);
    m["timestamp"] = json!("2024-01-15t12:30:00+02:00");
    m["payload"]["messages"][0]["authorTimestamp"] = json!("2024-01-15t10:30:00z");
    let (status, answer) = relay.post_to_b(&m).await;
    assert_eq!(status, 200, "{answer}");
    let got = relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["timestamp"], json!("2024-01-15T10:30:00.000Z"));
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_means_a_send_to_any_listed_agent_is_taken() {
    // /ready answered 200 as soon as the stream opened, before its directory arrived: a send right
    // after it could be refused with 422 "not a known agent". Each round starts a fresh agent and
    // sends the moment /ready says 200.
    let (relay, extra) = Relay::start_full(1, |_| {}).await;
    let c = &extra[0];
    let sink = Sink::start().await;
    for round in 0..10 {
        let mut agent = start_agent(agent_config(&relay.pki, c, relay.server.grpc, &sink.url)).await;
        // Polled without pause, to hit the moment it turns ready.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !relay
            .http
            .get(agent.url("/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(std::time::Instant::now() < deadline, "round {round}: never ready");
        }
        let (status, answer) = post(&relay.http, &agent.url("/v1/messages"), &seed_message(&relay.a.id)).await;
        assert_eq!(status, 200, "round {round}: ready, yet the send was refused: {answer}");
        agent.shutdown().await;
    }
    assert_eq!(relay.sink_a.wait_for(10, Duration::from_secs(20)).await.len(), 10);
    relay.finish_with(&[c]).await;
}
