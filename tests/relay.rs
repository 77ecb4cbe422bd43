//! End-to-end behaviour of the core relay: REST → agent → mTLS gRPC → server → RabbitMQ → server →
//! agent → internal endpoint, with real processes' worth of parts in-process: real TLS, real
//! RabbitMQ, real HTTP.

#![allow(clippy::unwrap_used)]

mod support;

use dmr::proto::agent_gateway_client::AgentGatewayClient;
use dmr::proto::session_request::Frame as OutFrame;
use dmr::proto::session_response::Frame as InFrame;
use dmr::proto::{Envelope, SendRequest, SendStatus, SessionRequest};
use serde_json::{Value, json};
use std::time::Duration;
use support::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_example_arrives_decrypted_at_the_recipient_and_a_reply_comes_back() {
    let relay = Relay::start().await;
    let message = seed_message(&relay.a.id);
    let (status, body) = relay.post_to_b(&message).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        Value::String(String::new()),
        "success has an empty body, like the original"
    );

    let received = relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(received.len(), 1, "exactly one message at A's endpoint");
    let expected = json!({
        "id": message["id"], "senderId": relay.b.id, "recipientId": relay.a.id,
        "timestamp": message["timestamp"], "type": "ChatMessage", "payload": message["payload"],
    });
    assert_eq!(received[0], expected);
    let keys: Vec<&String> = received[0].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["id", "senderId", "recipientId", "timestamp", "type", "payload"],
        "the original's property order"
    );

    let reply = seed_message(&relay.b.id);
    let (status, body) = post(&relay.http, &relay.agent_a.url("/v1/messages"), &reply).await;
    assert_eq!(status, 200, "{body}");
    let back = relay.sink_b.wait_for(1, WAIT).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0]["id"], reply["id"]);
    assert_eq!(back[0]["senderId"], json!(relay.a.id));
    assert_eq!(back[0]["payload"], reply["payload"]);
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_spread_over_connections_and_messages_flow_on_each() {
    // One consumer per connection here, so that A and B are served on different connections
    // (in production 1,000 per connection keep an instance under RabbitMQ's 2,047 channels).
    let relay = Relay::start_with(|cfg| cfg.rabbitmq.consumers_per_connection = 1).await;
    let deadline = std::time::Instant::now() + WAIT;
    while relay.server.core.broker.consumer_connections().await != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "two agents, one consumer each, should use two connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let to_a = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&to_a).await.0, 200);
    let to_b = seed_message(&relay.b.id);
    assert_eq!(
        post(&relay.http, &relay.agent_a.url("/v1/messages"), &to_b).await.0,
        200
    );
    assert_eq!(relay.sink_a.wait_for(1, WAIT).await[0]["id"], to_a["id"]);
    assert_eq!(relay.sink_b.wait_for(1, WAIT).await[0]["id"], to_b["id"]);
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bodies_get_field_errors_and_nothing_is_queued() {
    let relay = Relay::start().await;
    let good = seed_message(&relay.a.id);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "missing field",
            without(&good, "recipientId"),
            "recipientId must be a UUID",
        ),
        ("bad UUID", with(&good, "id", json!("not-a-uuid")), "id must be a UUID"),
        (
            "bad timestamp",
            with(&good, "timestamp", json!("15.01.2024")),
            "timestamp must be a valid ISO 8601 date string",
        ),
        (
            "unknown type",
            with(&good, "type", json!("Telegram")),
            "type must be one of the following values: ChatMessage",
        ),
        (
            "sender in body",
            with(&good, "senderId", json!(relay.b.id)),
            "property senderId should not exist",
        ),
        (
            "nested field",
            {
                let mut v = good.clone();
                v["payload"]["messages"][0]["chatId"] = json!(42);
                v
            },
            "payload.messages.0.chatId must be a UUID",
        ),
    ];
    for (name, body, expected) in cases {
        let (status, answer) = relay.post_to_b(&body).await;
        assert_eq!(status, 400, "{name}: {answer}");
        assert_eq!(answer["statusCode"], 400, "{name}");
        assert_eq!(answer["error"], "Bad Request", "{name}");
        let messages: Vec<&str> = answer["message"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(messages.contains(&expected), "{name}: {messages:?} lacks {expected:?}");
    }

    let raw = relay
        .http
        .post(relay.agent_b.url("/v1/messages"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400, "not JSON");
    let answer: Value = raw.json().await.unwrap();
    assert!(
        answer["message"][0]
            .as_str()
            .unwrap()
            .starts_with("body must be valid JSON"),
        "{answer}"
    );

    let mut huge = good.clone();
    huge["payload"]["messages"][0]["content"] = json!("x".repeat(200 * 1024));
    let (status, _) = relay.post_to_b(&huge).await;
    assert_eq!(
        status, 413,
        "oversized bodies are refused as too large (MESSAGE_MAX_BYTES)"
    );

    assert_eq!(
        relay.probe.queue_len(&relay.a.id).await,
        Some(0),
        "nothing queued for A"
    );
    assert_eq!(
        relay.probe.queue_len(&relay.vf_queue).await,
        Some(0),
        "REST validation happens before anything reaches the server"
    );
    // A negative check: nothing may arrive, so there is no condition to poll; give a stray
    // delivery the time it would need to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(relay.sink_a.messages().is_empty());
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_recipient_is_refused_naming_it_and_nothing_is_queued() {
    let relay = Relay::start().await;
    let stranger = uuid::Uuid::new_v4().to_string();
    let (status, answer) = relay.post_to_b(&seed_message(&stranger)).await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains(&stranger), "{answer}");
    assert_eq!(
        relay.probe.queue_len(&stranger).await,
        None,
        "no queue is created for an unknown agent"
    );
    assert_eq!(relay.probe.queue_len(&relay.a.id).await, Some(0));
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_sender_on_the_raw_stream_is_rejected_and_recorded_in_validation_failures() {
    let relay = Relay::start().await;
    let mut client = raw_client(&relay.pki, &relay.b.cert_pem, &relay.b.key_pem, relay.server.grpc)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = inbound.message().await.unwrap().unwrap();
    assert!(
        matches!(first.frame, Some(InFrame::Directory(_))),
        "the directory comes first"
    );

    let id = uuid::Uuid::new_v4().to_string();
    let spoofed = Envelope {
        id: id.clone(),
        sender_id: relay.a.id.clone(), // B pretends to be A
        recipient_id: relay.a.id.clone(),
        timestamp: "2024-01-15T10:30:00.000Z".into(),
        r#type: "ChatMessage".into(),
        payload: "e30.e30.e30.e30.e30".into(),
        received_at: String::new(),
    };
    tx.send(SessionRequest {
        frame: Some(OutFrame::Send(SendRequest {
            correlation_id: "c1".into(),
            envelope: Some(spoofed),
        })),
    })
    .await
    .unwrap();
    let result = loop {
        match inbound.message().await.unwrap().unwrap().frame {
            Some(InFrame::SendResult(r)) => break r,
            _ => continue,
        }
    };
    assert_eq!(result.correlation_id, "c1");
    assert_eq!(result.status, SendStatus::Invalid as i32);
    assert!(
        result.errors.iter().any(|e| e.r#type == "INVALID_SENDER_ID"),
        "{result:?}"
    );

    assert_eq!(relay.probe.wait_queue_len(&relay.vf_queue, 1, WAIT).await, Some(1));
    let records = relay.probe.drain(&relay.vf_queue).await;
    assert_eq!(records[0]["id"], json!(id));
    assert_eq!(records[0]["errors"][0]["type"], "INVALID_SENDER_ID");
    assert_eq!(records[0]["message"]["senderId"], json!(relay.a.id));
    assert!(records[0]["receivedAt"].is_string());
    assert_eq!(
        relay.probe.queue_len(&relay.a.id).await,
        Some(0),
        "nothing queued for A"
    );
    drop(tx);
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_refused_for_a_foreign_ca_an_unknown_agent_or_a_different_key() {
    let relay = Relay::start().await;
    let server = relay.server.grpc;

    // Control: B's real credentials open a stream.
    assert!(
        open_session(&relay.pki, &relay.b.cert_pem, &relay.b.key_pem, server)
            .await
            .is_ok()
    );

    // A certificate for A's own key, but from another CA.
    let foreign = dmr_pki::DevCa::generate("someone else's CA").unwrap();
    let a_key = dmr::keys::PrivateKey::from_pem(&relay.a.key_pem).unwrap();
    let forged = dmr_pki::AgentCredentials::for_key(&foreign, &relay.a.id, "A", &a_key).unwrap();
    let err = open_session(&relay.pki, &forged.cert_pem, &forged.key_pem, server)
        .await
        .unwrap_err();
    assert!(
        !err.contains("PermissionDenied"),
        "refused by TLS, before any RPC: {err}"
    );

    // A valid certificate from our CA for an agent that is not in the directory.
    let stranger = relay.pki.agent("stranger");
    let err = open_session(&relay.pki, &stranger.cert_pem, &stranger.key_pem, server)
        .await
        .unwrap_err();
    assert!(err.contains("PermissionDenied") && err.contains(&stranger.id), "{err}");

    // A valid certificate from our CA with A's id but a key that differs from the directory's.
    let impostor = dmr_pki::AgentCredentials::generate(&relay.pki.ca, &relay.a.id, "A?").unwrap();
    let err = open_session(&relay.pki, &impostor.cert_pem, &impostor.key_pem, server)
        .await
        .unwrap_err();
    assert!(
        err.contains("PermissionDenied") && err.contains("differs from the key published"),
        "{err}"
    );
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoint_causes_bounded_retries_then_dlq_and_recovery_lets_later_messages_flow() {
    let relay = Relay::start().await;
    relay.sink_a.set_status(500);
    let doomed = seed_message(&relay.a.id);
    let (status, answer) = relay.post_to_b(&doomed).await;
    assert_eq!(
        status, 200,
        "accepted: queued durably, delivery is asynchronous: {answer}"
    );
    let dlq = format!("{}.dlq", relay.a.id);
    assert_eq!(
        relay.probe.wait_queue_len(&dlq, 1, WAIT).await,
        Some(1),
        "dead-lettered after the last attempt"
    );
    let attempts = relay.sink_a.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        u32::from(attempts),
        relay.server.core.cfg.message_delivery_max_attempts,
        "bounded retries"
    );

    relay.sink_a.set_status(200);
    let later = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&later).await.0, 200);
    let got = relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], later["id"]);
    let dead = relay.probe.drain(&dlq).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0]["id"], doomed["id"],
        "the DLQ holds the original queued envelope"
    );
    assert!(dead[0]["receivedAt"].is_string());
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_for_an_offline_recipient_waits_in_its_queue_and_arrives_when_it_connects() {
    let mut relay = Relay::start().await;
    relay.take_a_offline().await;
    let message = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&message).await.0, 200);
    assert_eq!(
        relay.probe.wait_queue_len(&relay.a.id, 1, WAIT).await,
        Some(1),
        "waits in A's queue"
    );
    assert!(relay.sink_a.messages().is_empty());

    relay.bring_a_back().await;
    let got = relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], message["id"]);
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_waits_past_the_queue_ttl_moves_to_the_dead_letter_queue() {
    let mut relay = Relay::start_with(|cfg| cfg.rabbitmq.ttl_ms = 1000).await;
    relay.take_a_offline().await;
    let message = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&message).await.0, 200);
    let dlq = format!("{}.dlq", relay.a.id);
    assert_eq!(
        relay.probe.wait_queue_len(&dlq, 1, WAIT).await,
        Some(1),
        "expired into A's dead-letter queue"
    );
    assert_eq!(
        relay.probe.queue_len(&relay.a.id).await,
        Some(0),
        "and out of A's queue"
    );
    let dead = relay.probe.drain(&dlq).await;
    assert_eq!(dead[0]["id"], message["id"], "the envelope as it was queued");
    // A comes back: nothing is delivered (the message expired).
    relay.bring_a_back().await;
    let later = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&later).await.0, 200);
    let got = relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], later["id"], "only the later message arrives");
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_waits_until_another_instance_lets_go_of_the_queue() {
    use futures::StreamExt as _;
    let mut relay = Relay::start().await;
    relay.agent_a.shutdown().await;
    let deadline = std::time::Instant::now() + WAIT;
    while relay.probe.consumer_count(&relay.a.id).await != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "A's consumer goes with its session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another instance still consumes A's queue (quorum queues do not enforce exclusive consumers).
    let (old_channel, mut old_consumer) = relay.probe.hold_consumer(&relay.a.id).await;
    relay.bring_a_back().await;
    // A negative check (the new session must NOT start consuming while the old consumer holds
    // the queue): nothing to poll for, so give it the time it would take to attach.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        relay.probe.consumer_count(&relay.a.id).await,
        Some(1),
        "the new session does not consume alongside the old consumer"
    );
    let message = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&message).await.0, 200);
    let held = tokio::time::timeout(WAIT, old_consumer.next())
        .await
        .expect("the old consumer gets the message")
        .expect("a delivery")
        .expect("not an error");
    let body: Value = serde_json::from_slice(&held.data).unwrap();
    assert_eq!(body["id"], message["id"]);
    assert!(relay.sink_a.messages().is_empty());

    // The old instance lets go without acking: the message returns and the new session takes over.
    old_channel.close(200, "old instance gone".into()).await.unwrap();
    let got = relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], message["id"]);
    assert_eq!(relay.probe.consumer_count(&relay.a.id).await, Some(1));
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_arrive_exactly_once_and_in_order() {
    let relay = Relay::start().await;
    let mut sent = Vec::new();
    for i in 0..1000 {
        let mut m = seed_message(&relay.a.id);
        m["payload"]["messages"][0]["content"] = json!(format!("message {i}"));
        let (status, answer) = relay.post_to_b(&m).await;
        assert_eq!(status, 200, "message {i}: {answer}");
        sent.push(m["id"].clone());
    }
    let got = relay.sink_a.wait_for(1000, Duration::from_secs(60)).await;
    // Give any duplicate a chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_ids: Vec<Value> = relay.sink_a.messages().iter().map(|m| m["id"].clone()).collect();
    assert_eq!(got.len(), 1000);
    assert_eq!(got_ids.len(), 1000, "no duplicates");
    assert_eq!(got_ids, sent, "same order as sent");
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_in_flight_keep_queue_order_when_the_endpoint_refuses_one_in_the_middle() {
    // A backlog makes the server hand over a full window at once; two messages in the middle are
    // refused once each. The endpoint must still see every message in queue order: the refused one
    // again right after its refusal, nothing from behind it before.
    let mut relay = Relay::start_with(|cfg| cfg.message_delivery_retry_delay_ms = 50).await;
    relay.take_a_offline().await;
    let mut sent = Vec::new();
    for i in 0..120 {
        let mut m = seed_message(&relay.a.id);
        m["payload"]["messages"][0]["content"] = json!(format!("message {i}"));
        let (status, answer) = relay.post_to_b(&m).await;
        assert_eq!(status, 200, "message {i}: {answer}");
        sent.push(m["id"].as_str().unwrap().to_owned());
    }
    let refused = [sent[10].clone(), sent[75].clone()];
    for id in &refused {
        relay.sink_a.refuse_once(id);
    }
    relay.bring_a_back().await;
    let got = relay.sink_a.wait_for(sent.len(), Duration::from_secs(60)).await;
    assert_eq!(got.len(), sent.len(), "every message arrived");
    let delivered: Vec<String> = got.iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(delivered, sent, "in queue order, each once");
    let mut expected_posts = Vec::new();
    for id in &sent {
        expected_posts.push(id.clone());
        if refused.contains(id) {
            expected_posts.push(id.clone());
        }
    }
    assert_eq!(
        relay.sink_a.posted_ids(),
        expected_posts,
        "every POST in order: a refused message is posted again before anything behind it"
    );
    let metrics = relay.agent_a.metrics().await;
    assert!(
        dmr_testkit::scrape::metric(&metrics, "dmr_deliveries_held_back_total").unwrap_or(0.0) >= 1.0,
        "deliveries were in flight behind the refused ones (the window is used)"
    );
    assert_eq!(relay.probe.queue_len(&relay.a.id).await, Some(0), "all acked");
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_the_recipient_cannot_decrypt_is_reported_and_recorded_in_validation_failures() {
    let relay = Relay::start().await;
    let mut client = raw_client(&relay.pki, &relay.b.cert_pem, &relay.b.key_pem, relay.server.grpc)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let id = uuid::Uuid::new_v4().to_string();
    let garbage = Envelope {
        id: id.clone(),
        sender_id: relay.b.id.clone(),
        recipient_id: relay.a.id.clone(),
        timestamp: "2024-01-15T10:30:00.000Z".into(),
        r#type: "ChatMessage".into(),
        payload: format!("{}.AAAA.AAAA.AAAA.AAAA", dmr::jose::JWE_HEADER_B64),
        received_at: String::new(),
    };
    tx.send(SessionRequest {
        frame: Some(OutFrame::Send(SendRequest {
            correlation_id: "g".into(),
            envelope: Some(garbage),
        })),
    })
    .await
    .unwrap();
    let accepted = loop {
        if let Some(InFrame::SendResult(r)) = inbound.message().await.unwrap().unwrap().frame {
            break r;
        }
    };
    assert_eq!(
        accepted.status,
        SendStatus::Accepted as i32,
        "the server cannot read payloads, so it queues it"
    );
    assert_eq!(relay.probe.wait_queue_len(&relay.vf_queue, 1, WAIT).await, Some(1));
    let records = relay.probe.drain(&relay.vf_queue).await;
    assert_eq!(records[0]["id"], json!(id));
    assert_eq!(records[0]["errors"][0]["type"], "DECRYPTION_FAILED");
    assert!(
        relay.sink_a.messages().is_empty(),
        "nothing undecryptable reaches the endpoint"
    );
    assert_eq!(
        relay.probe.queue_len(&relay.a.id).await,
        Some(0),
        "and it does not block A's queue"
    );
    drop(tx);
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_id_is_accepted_once() {
    let relay = Relay::start().await;
    let m = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&m).await.0, 200);
    assert_eq!(
        relay.post_to_b(&m).await.0,
        200,
        "a retried POST is answered as accepted"
    );
    relay.sink_a.wait_for(1, WAIT).await;
    // A negative check (no second copy): give a duplicate the time it would need to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(relay.sink_a.messages().len(), 1, "but queued only once");
    relay.finish().await;
}

fn with(v: &Value, key: &str, value: Value) -> Value {
    let mut v = v.clone();
    v[key] = value;
    v
}

fn without(v: &Value, key: &str) -> Value {
    let mut v = v.clone();
    v.as_object_mut().unwrap().remove(key);
    v
}

async fn raw_client(
    pki: &TestPki,
    cert_pem: &str,
    key_pem: &str,
    server: std::net::SocketAddr,
) -> Result<AgentGatewayClient<tonic::transport::Channel>, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca.cert_pem()))
        .identity(Identity::from_pem(cert_pem, key_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", server.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    Ok(AgentGatewayClient::new(channel))
}

/// Opens a session and reads its first frame; Err describes the refusal.
async fn open_session(
    pki: &TestPki,
    cert_pem: &str,
    key_pem: &str,
    server: std::net::SocketAddr,
) -> Result<(), String> {
    let mut client = raw_client(pki, cert_pem, key_pem, server).await?;
    let (_tx, rx) = tokio::sync::mpsc::channel::<SessionRequest>(1);
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    match inbound.message().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("stream ended".into()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_server_answers_503_and_one_whose_server_never_confirms_answers_504() {
    init();
    let pki = TestPki::new();
    let (a, b) = (pki.agent("A"), pki.agent("B"));
    let sink = Sink::start().await;
    let http = reqwest::Client::new();

    // No server at all: 503, nothing else to say.
    let nowhere: std::net::SocketAddr = format!("127.0.0.1:{}", support::processes::free_port())
        .parse()
        .unwrap();
    let mut lonely = start_agent(agent_config(&pki, &b, nowhere, &sink.url)).await;
    // Not a wait for a condition: 503 holds from the start; this lets the agent try (and fail) to
    // connect first, so the answer is checked after a failed attempt too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = post(&http, &lonely.url("/v1/messages"), &seed_message(&a.id)).await;
    assert_eq!(status, 503, "{answer}");
    lonely.shutdown().await;

    // A server that accepts the stream and sends the directory but never confirms a send: 504 after
    // MESSAGE_DELIVERY_TIMEOUT_MS.
    let silent = SilentGateway::start(&pki, &[&a, &b]).await;
    let mut cfg = agent_config(&pki, &b, silent, &sink.url);
    cfg.message_delivery_timeout_ms = 700;
    let mut agent = start_agent(cfg).await;
    agent.wait_connected().await;
    let started = std::time::Instant::now();
    let (status, answer) = post(&http, &agent.url("/v1/messages"), &seed_message(&a.id)).await;
    assert_eq!(status, 504, "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "answered only after the timeout"
    );
    agent.shutdown().await;
}

/// A gRPC gateway with real mTLS that sends the directory and then ignores everything.
struct SilentGateway {
    directory: dmr::directory::Directory,
}

impl SilentGateway {
    async fn start(pki: &TestPki, agents: &[&dmr_pki::AgentCredentials]) -> std::net::SocketAddr {
        let entries: Vec<_> = agents.iter().map(|a| a.centops_entry()).collect();
        let directory = dmr::directory::Directory::from_agents(entries).unwrap();
        let tls = dmr_server::tls::server_config(&pki.server_cert, &pki.server_key, &pki.ca_file).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = std::sync::Arc::new(dmr_server::metrics::Metrics::new());
        let incoming = dmr_server::tls::incoming(listener, tls, metrics, tokio_util::sync::CancellationToken::new());
        let service = dmr::proto::agent_gateway_server::AgentGatewayServer::new(Self { directory });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        addr
    }
}

#[tonic::async_trait]
impl dmr::proto::agent_gateway_server::AgentGateway for SilentGateway {
    type SessionStream = tokio_stream::wrappers::ReceiverStream<Result<dmr::proto::SessionResponse, tonic::Status>>;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<SessionRequest>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let directory = dmr::proto::SessionResponse {
            frame: Some(InFrame::Directory(self.directory.to_proto())),
        };
        tx.send(Ok(directory)).await.unwrap();
        let mut inbound = request.into_inner();
        tokio::spawn(async move {
            // Read and drop every frame, keeping the stream (and `tx`) open.
            while let Ok(Some(_)) = inbound.message().await {}
            drop(tx);
        });
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn list_agents(
        &self,
        _: tonic::Request<dmr::proto::ListAgentsRequest>,
    ) -> Result<tonic::Response<dmr::proto::ListAgentsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("silent"))
    }
}
