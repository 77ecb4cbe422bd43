//! Hostile inputs against the running processes (issue 13): oversized and deeply nested JSON,
//! invalid UTF-8, giant headers, slow clients on the REST and HTTP ports, forged and malformed
//! handshake tokens on the Socket.IO edge, and HTTP/2 and TLS abuse on the gRPC port.
//!
//! Every case attacks the real `dmr` binary (a child process: its RSS is its own), expects a clear
//! refusal, and then checks that every process is still up, that a normal message still goes from
//! agent B through the server to agent A, and that the attacked process's memory grew by less than
//! 100 MB. Slow clients must be cut off within three times the configured timeout
//! (`HTTP_HEADER_READ_TIMEOUT_MS`, `HTTP_BODY_READ_TIMEOUT_MS`, `TLS_HANDSHAKE_TIMEOUT_MS`, 1.5 s
//! here).

#![allow(clippy::unwrap_used)]

mod hostile_kit;
mod support;

use hostile_kit::eio::{self, Eio};
use hostile_kit::{Attacked, BODY_TIMEOUT, HEADER_TIMEOUT, TLS_TIMEOUT, Target, WAIT, grpc, raw, tokens};
use serde_json::{Value, json};
use std::time::Duration;

/// "Within a bounded time": three times the configured timeout (a busy 2-core machine).
fn bound(timeout: Duration) -> Duration {
    timeout * 3
}

// ---------------------------------------------------------------------------------------------
// Agent REST port: POST /v1/messages
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_refuses_a_50_mb_streamed_body_early_without_buffering_it() {
    let mut t = Target::start().await;
    let before = t.agent_b.rss_kb();
    let head = b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let piece = {
        let data = vec![b' '; 64 * 1024];
        let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
        chunk.extend_from_slice(&data);
        chunk.extend_from_slice(b"\r\n");
        chunk
    };
    let fifty_mb = 50 * 1024 * 1024 / (64 * 1024);
    let out = raw::attack(
        t.agent_b_addr(),
        head,
        &[],
        Duration::ZERO,
        std::iter::repeat_n(piece, fifty_mb),
        WAIT,
    )
    .await;
    assert_eq!(out.status, Some(413), "{out:?}");
    assert!(
        out.answer.contains("MESSAGE_MAX_BYTES") || out.answer.contains("length limit"),
        "{}",
        out.answer
    );
    assert!(
        out.written < 25 * 1024 * 1024,
        "the agent stopped reading early: the client could write only {} bytes of 50 MB",
        out.written
    );
    t.assert_survived(Attacked::AgentB, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_refuses_json_nested_100k_deep_with_400() {
    let mut t = Target::start().await;
    let before = t.agent_b.rss_kb();
    let body = "[".repeat(100_000);
    let out = raw::request(
        t.agent_b_addr(),
        "POST",
        "/v1/messages",
        "Content-Type: application/json\r\n",
        body.as_bytes(),
    )
    .await;
    assert_eq!(out.status, Some(400), "{out:?}");
    assert!(out.answer.contains("recursion limit"), "{}", out.answer);
    t.assert_survived(Attacked::AgentB, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_refuses_invalid_utf8_with_400() {
    let mut t = Target::start().await;
    let before = t.agent_b.rss_kb();
    let mut body = br#"{"id":""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    body.extend_from_slice(br#"","recipientId":"x"}"#);
    let out = raw::request(
        t.agent_b_addr(),
        "POST",
        "/v1/messages",
        "Content-Type: application/json\r\n",
        &body,
    )
    .await;
    assert_eq!(out.status, Some(400), "{out:?}");
    assert!(out.answer.contains("valid JSON"), "{}", out.answer);
    t.assert_survived(Attacked::AgentB, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_refuses_a_1_mb_header_and_10k_headers_with_431() {
    let mut t = Target::start().await;
    let before = t.agent_b.rss_kb();
    let huge = format!("X-Huge: {}\r\n", "h".repeat(1 << 20));
    let out = raw::request(t.agent_b_addr(), "POST", "/v1/messages", &huge, b"{}").await;
    assert_eq!(out.status, Some(431), "1 MB header: {:?}", out.status);
    let many: String = (0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let out = raw::request(t.agent_b_addr(), "POST", "/v1/messages", &many, b"{}").await;
    assert_eq!(out.status, Some(431), "10k headers: {:?}", out.status);
    t.assert_survived(Attacked::AgentB, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_disconnects_a_slowloris_client_that_never_finishes_its_headers() {
    let mut t = Target::start().await;
    let before = t.agent_b.rss_kb();
    let addr = t.agent_b_addr();
    let slow = tokio::spawn(raw::slow_headers(
        addr,
        "/v1/messages",
        Duration::from_millis(300),
        WAIT,
    ));
    // Meanwhile the agent serves others.
    t.relay_one().await;
    let out = slow.await.unwrap();
    assert!(
        out.closed_after < bound(HEADER_TIMEOUT),
        "closed after {:?} (header timeout {HEADER_TIMEOUT:?}): {out:?}",
        out.closed_after
    );
    t.assert_survived(Attacked::AgentB, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_answers_408_to_a_client_that_trickles_its_body() {
    let mut t = Target::start().await;
    let before = t.agent_b.rss_kb();
    let addr = t.agent_b_addr();
    let slow = tokio::spawn(raw::slow_body(
        addr,
        "/v1/messages",
        "",
        Duration::from_millis(300),
        WAIT,
    ));
    t.relay_one().await;
    let out = slow.await.unwrap();
    assert_eq!(out.status, Some(408), "{out:?}");
    assert!(out.answer.contains("HTTP_BODY_READ_TIMEOUT_MS"), "{}", out.answer);
    assert!(
        out.closed_after < bound(BODY_TIMEOUT),
        "closed after {:?}",
        out.closed_after
    );
    t.assert_survived(Attacked::AgentB, before).await;
}

// ---------------------------------------------------------------------------------------------
// Server HTTP port: Socket.IO, /metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_http_disconnects_slowloris_on_metrics_and_socket_io() {
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    let addr = t.server_http_addr();
    let interval = Duration::from_millis(300);
    let on_metrics = tokio::spawn(raw::slow_headers(addr, "/metrics", interval, WAIT));
    let on_socket_io = tokio::spawn(raw::slow_headers(
        addr,
        "/socket.io/?EIO=4&transport=polling",
        interval,
        WAIT,
    ));
    t.relay_one().await;
    assert!(t.server_metrics().await.contains("dmr_"), "/metrics served meanwhile");
    for slow in [on_metrics, on_socket_io] {
        let out = slow.await.unwrap();
        assert!(
            out.closed_after < bound(HEADER_TIMEOUT),
            "closed after {:?}",
            out.closed_after
        );
    }
    // A body trickled into an engine.io session's POST is cut off too.
    let session = eio::open(&t.http, addr).await.expect("engine.io handshake");
    let _ = session;
    let out = raw::slow_body(addr, "/socket.io/?EIO=4&transport=polling&sid=x", "", interval, WAIT).await;
    assert!(
        out.closed_after < bound(BODY_TIMEOUT),
        "slow body closed after {:?}: {out:?}",
        out.closed_after
    );
    t.assert_survived(Attacked::Server, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_http_refuses_a_1_mb_header_and_10k_headers_with_431() {
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    let huge = format!("Authorization: Bearer {}\r\n", "h".repeat(1 << 20));
    let out = raw::request(
        t.server_http_addr(),
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        &huge,
        b"",
    )
    .await;
    assert_eq!(out.status, Some(431), "{:?}", out.status);
    let many: String = (0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let out = raw::request(t.server_http_addr(), "GET", "/metrics", &many, b"").await;
    assert_eq!(out.status, Some(431), "{:?}", out.status);
    t.assert_survived(Attacked::Server, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_survives_an_engine_io_handshake_flood() {
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    let addr = t.server_http_addr();
    let (mut opened, mut refused) = (0usize, 0usize);
    let http = reqwest::Client::new();
    for _ in 0..40 {
        let batch: Vec<_> = (0..50)
            .map(|_| {
                let http = http.clone();
                tokio::spawn(async move { eio::open(&http, addr).await.map(|_| ()) })
            })
            .collect();
        for h in batch {
            match h.await.unwrap() {
                Ok(()) => opened += 1,
                Err(status) => {
                    assert!(status == 429 || status == 503, "a refused handshake says why: {status}");
                    refused += 1;
                }
            }
        }
    }
    eprintln!("engine.io handshake flood: {opened} opened, {refused} refused");
    assert_eq!(opened + refused, 2000);
    t.assert_survived(Attacked::Server, before).await;
}

/// A legacy client authenticated as the directory's `legacy` agent.
async fn authenticated(t: &Target) -> Eio {
    let mut s = eio::open(&t.http, t.server_http_addr())
        .await
        .expect("engine.io handshake");
    let token = tokens::valid_shape(&t.legacy, tokens::now(), Some(tokens::now() + 60));
    s.send_while_polling(&[Eio::connect_packet(&json!({"token": token}))])
        .await;
    let list = format!("2{},[\"dmr:agents:full-list\"", eio::NAMESPACE);
    assert!(
        s.wait_for(WAIT, |p| p.starts_with(&list)).await.is_some(),
        "the legacy agent gets its session: {:?}",
        s.received
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_refuses_oversized_deeply_nested_and_invalid_utf8_events() {
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    // Over the polling payload limit (about 1.1 MB): refused before it is parsed.
    let s = authenticated(&t).await;
    let big = Eio::event_packet(1, eio::SEND_EVENT, &json!({"payload": "x".repeat(3 << 20)}));
    let status = s.send(&[big]).await;
    assert!(
        status == 413 || status == 400 || status == 0,
        "3 MB payload: HTTP {status}"
    );

    // 100k nested arrays: within the payload limit, refused by the parser's depth limit.
    let mut s = authenticated(&t).await;
    let nested = format!("42{},7[\"{}\",{}", eio::NAMESPACE, eio::SEND_EVENT, "[".repeat(100_000));
    let status = s.send(&[nested]).await;
    let ack = s.ack(7, Duration::from_secs(3)).await;
    assert!(
        status != 200 || s.closed || ack.as_ref().is_some_and(|a| a["status"] == "error"),
        "deep nesting refused: HTTP {status}, ack {ack:?}, closed {}",
        s.closed
    );

    // Invalid UTF-8 inside an event.
    let s = authenticated(&t).await;
    let mut bytes = format!("42{},8[\"{}\",{{\"id\":\"", eio::NAMESPACE, eio::SEND_EVENT).into_bytes();
    bytes.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    bytes.extend_from_slice(b"\"}]");
    let status = s.post_raw(bytes).await;
    assert_ne!(status, 200, "invalid UTF-8 refused");
    // Nothing of it reached a queue: only the normal message arrives at A.
    t.assert_survived(Attacked::Server, before).await;
    assert_eq!(t.sink_a.messages().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Socket.IO handshake tokens
// ---------------------------------------------------------------------------------------------

/// Presents the token `make` builds (from the started target's agents) in the handshake, with a
/// send smuggled in the same payload; expects a refusal whose message contains `detail`, counted in
/// `dmr_legacy_auth_refusals_total` under `reason` for the legacy agent (or "unknown" when the
/// token names nobody), and that nothing reached a queue.
async fn refused_token(make: fn(&Target) -> String, detail: &str, named: bool, reason: &str) {
    refusal_case(make, detail, named, reason, Client::Smuggling).await;
}

/// [`refused_token`], and every attempt must hear the reason (`dmr:error`) over polling.
async fn refused_token_strictly(make: fn(&Target) -> String, detail: &str, named: bool, reason: &str) {
    refusal_case(make, detail, named, reason, Client::Strict).await;
}

/// How the hostile client behaves around its handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Client {
    /// Sends an event right behind its CONNECT; the reason may be lost.
    Smuggling,
    /// The same, and every attempt must hear the reason.
    Strict,
    /// Waits for the answer to its CONNECT, as the original agent does. A client that writes an
    /// event while a slow check (the broker's last-token lookup) is still running is disconnected by
    /// socketioxide before the handshake ends: refused, but neither told nor counted.
    Waiting,
}

async fn refusal_case(make: fn(&Target) -> String, detail: &str, named: bool, reason: &str, client: Client) {
    let strict = client == Client::Strict;
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    let token = make(&t);
    let agent_label = if named {
        t.legacy.id.clone()
    } else {
        "unknown".to_owned()
    };
    let counted_before = t.legacy_refusals(&agent_label, reason).await;
    let smuggled = envelope(&t.a.id, &t.legacy.id);
    // Up to three attempts, as the original agent retries after a disconnect: every one must be
    // refused, and the refusal counted at least once. (Over polling, an attempt whose engine.io
    // session the server closes before reading the CONNECT is occasionally not counted.)
    let mut counted = false;
    for _ in 0..3 {
        let mut s = eio::open(&t.http, t.server_http_addr())
            .await
            .expect("engine.io handshake");
        s.send_while_polling(&[Eio::connect_packet(&json!({"token": token}))])
            .await;
        // A send right behind the handshake, before the refusal arrives.
        if client != Client::Waiting {
            let _ = s.send(&[Eio::event_packet(1, eio::SEND_EVENT, &smuggled)]).await;
        }
        // On the polling transport the `dmr:error` is lost when the server disconnects right after
        // it (see `a_polling_client_hears_why_its_token_was_refused`): checked when it arrives.
        let refusal = s.refusal(Duration::from_secs(3)).await;
        if strict || refusal.is_some() {
            let refusal = refusal.unwrap_or_else(|| panic!("refused with dmr:error: {:?}", s.received));
            assert!(
                refusal["message"].as_str().unwrap_or_default().contains(detail),
                "the refusal names the defect ({detail}): {refusal}"
            );
            assert_eq!(refusal["reason"], reason, "{refusal}");
        }
        let full_list = format!("2{},[\"dmr:agents:full-list\"", eio::NAMESPACE);
        assert!(!s.received.iter().any(|p| p.starts_with(&full_list)), "no session");
        counted = support::eventually_async(Duration::from_secs(5), || {
            let (t, agent_label) = (&t, &agent_label);
            async move { t.legacy_refusals(agent_label, reason).await > counted_before }
        })
        .await;
        if counted {
            break;
        }
    }
    if !counted {
        let text = t.server_metrics().await;
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("dmr_legacy_auth_refusals_total"))
            .collect();
        panic!(
            "counted in dmr_legacy_auth_refusals_total{{agent_id=\"{agent_label}\",reason=\"{reason}\"}}: {lines:?}\n{}",
            t.server.logs()
        );
    }
    t.assert_survived(Attacked::Server, before).await;
    let ids: Vec<Value> = t.sink_a.messages().iter().map(|m| m["id"].clone()).collect();
    assert!(!ids.contains(&smuggled["id"]), "the smuggled send never reached A");
    assert_eq!(
        t.probe.queue_len(&t.a.id).await.unwrap_or(0),
        0,
        "nothing waits in A's queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_client_hears_why_its_token_was_refused() {
    refused_token_strictly(
        |t| tokens::alg_none(&t.legacy),
        "algorithm none is not RS256",
        true,
        "bad_algorithm",
    )
    .await;
}

/// An envelope from `sender` to `recipient` (its payload shaped like a JWE).
fn envelope(recipient: &str, sender: &str) -> Value {
    json!({"id": uuid::Uuid::new_v4().to_string(), "type": "ChatMessage", "payload": "a.b.c.d.e",
           "recipientId": recipient, "senderId": sender, "timestamp": "2024-01-15T10:30:00.000Z"})
}

// Each defect is counted under its own metric reason (`TokenError::reason`), expiry under
// `expired_token`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_alg_none() {
    refused_token(
        |t| tokens::alg_none(&t.legacy),
        "algorithm none is not RS256",
        true,
        "bad_algorithm",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_hs256_signed_with_the_agents_public_key() {
    refused_token(
        |t| tokens::hs256_with_public_key(&t.legacy),
        "algorithm HS256 is not RS256",
        true,
        "bad_algorithm",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_kid_not_equal_to_sub() {
    refused_token(
        |t| tokens::kid_not_sub(&t.legacy, &t.a.id),
        "sub and kid do not match",
        true,
        "subject_mismatch",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_an_expired_token() {
    refusal_case(
        |t| tokens::valid_shape(&t.legacy, tokens::now() - 3600, Some(tokens::now() - 3540)),
        "expired",
        true,
        "expired_token",
        Client::Waiting,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_iat_in_the_future() {
    refused_token(
        |t| tokens::valid_shape(&t.legacy, tokens::now() + 3600, Some(tokens::now() + 3660)),
        "issued in the future",
        true,
        "not_yet_valid",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_a_token_without_exp() {
    refused_token(
        |t| tokens::valid_shape(&t.legacy, tokens::now(), None),
        "no exp claim",
        true,
        "missing_expiry",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_a_garbage_token() {
    refused_token(
        |_| "not.a.jwt".to_owned(),
        "not a well-formed JWT",
        false,
        "malformed_token",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_a_1_mb_token_before_decoding_it() {
    // A client that waits for its answer: one that writes on behind a 1 MB CONNECT can be dropped
    // by the Socket.IO layer before the handshake is read (refused, but not counted; see `Client`).
    refusal_case(
        |t| tokens::one_megabyte(&t.legacy),
        "at most 8192 are accepted",
        false,
        "malformed_token",
        Client::Waiting,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// gRPC port: HTTP/2 over mutual TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_survives_an_http2_rapid_reset_flood() {
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    let config = grpc::tls_config(&t.pki.ca_file, Some(&t.mallory));
    let (send, ended) = grpc::h2(t.server_grpc_addr(), config).await;
    let mut send = send;
    let started = std::time::Instant::now();
    let mut reset = 0usize;
    for _ in 0..20_000 {
        let Ok(Ok(ready)) = tokio::time::timeout(Duration::from_secs(5), send.clone().ready()).await else {
            break;
        };
        send = ready;
        let Ok((_response, mut stream)) = send.send_request(grpc::grpc_request(grpc::SESSION), false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        reset += 1;
    }
    let elapsed = started.elapsed();
    let closed = tokio::time::timeout(Duration::from_secs(5), ended).await;
    eprintln!("rapid reset: {reset} streams opened and reset in {elapsed:?}; connection end: {closed:?}");
    t.assert_survived(Attacked::Server, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_caps_concurrent_streams_per_connection() {
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    let config = grpc::tls_config(&t.pki.ca_file, Some(&t.mallory));
    let (mut send, _ended) = grpc::h2(t.server_grpc_addr(), config).await;
    // One complete exchange first, so the server's SETTINGS are known.
    send = send.ready().await.unwrap();
    let (first, _) = send.send_request(grpc::grpc_request(grpc::HEALTH), true).unwrap();
    let _ = tokio::time::timeout(WAIT, first).await.expect("a health answer");
    let mut open = Vec::new();
    // Health checks whose request never ends: each stream stays open.
    for i in 0..=hostile_kit::MAX_STREAMS {
        let ready = tokio::time::timeout(Duration::from_secs(2), send.clone().ready()).await;
        match ready {
            Ok(Ok(s)) => send = s,
            // The client holds back streams beyond the announced cap.
            _ => {
                assert!(i >= hostile_kit::MAX_STREAMS, "held back only beyond the cap");
                break;
            }
        }
        let (response, stream) = send.send_request(grpc::grpc_request(grpc::HEALTH), false).unwrap();
        open.push((response, stream));
    }
    assert_eq!(
        send.current_max_send_streams(),
        hostile_kit::MAX_STREAMS as usize,
        "the server announces GRPC_MAX_CONCURRENT_STREAMS"
    );
    drop(open);
    t.assert_survived(Attacked::Server, before).await;
}

/// The `grpc-status` of a response: from its headers (trailers-only) or its trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> Option<String> {
    let response = response.await.ok()?;
    let head = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    if head.is_some() {
        return head;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return None };
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.ok()??;
    trailers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
}

/// A Session whose first message announces 512 MB (64 KiB of it sent): the stream's grpc-status
/// (`None`: reset), after checking the server survived unbloated.
async fn oversized_message() -> Option<String> {
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    let config = grpc::tls_config(&t.pki.ca_file, Some(&t.mallory));
    let (send, _ended) = grpc::h2(t.server_grpc_addr(), config).await;
    let mut send = send.ready().await.unwrap();
    let (response, mut stream) = send.send_request(grpc::grpc_request(grpc::SESSION), false).unwrap();
    // A message announcing 512 MB, then 64 KiB of it.
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(512u32 << 20).to_be_bytes());
    frame.extend_from_slice(&[7u8; 64 * 1024]);
    stream.reserve_capacity(frame.len());
    stream.send_data(bytes::Bytes::from(frame), false).unwrap();
    let status = tokio::time::timeout(WAIT, grpc_status(response))
        .await
        .expect("the stream ends at once");
    eprintln!("oversized message: grpc-status {status:?}");
    t.assert_survived(Attacked::Server, before).await;
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_ends_the_stream_of_a_message_over_the_size_limit_without_buffering_it() {
    oversized_message().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_a_message_over_the_size_limit_with_resource_exhausted() {
    let status = oversized_message().await;
    assert_eq!(status.as_deref(), Some("8"), "RESOURCE_EXHAUSTED, not {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_closes_a_connection_that_sends_garbage_after_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    let config = grpc::tls_config(&t.pki.ca_file, Some(&t.mallory));
    let mut tls = grpc::tls(t.server_grpc_addr(), config).await.expect("TLS");
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = tls.write_all(&garbage).await;
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server closes the connection");
    t.assert_survived(Attacked::Server, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_a_tls_client_without_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    let config = grpc::tls_config(&t.pki.ca_file, None);
    let refused = match grpc::tls(t.server_grpc_addr(), config).await {
        Err(_) => true,
        // TLS 1.3: the client finishes first; the server's alert arrives on the next read.
        Ok(mut tls) => {
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            matches!(
                tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await,
                Ok(Err(_) | Ok(0))
            )
        }
    };
    assert!(refused, "no client certificate, no connection");
    let failures = hostile_kit::labelled(
        &t.server_metrics().await,
        "dmr_auth_failures_total",
        &[("reason", "tls_handshake")],
    );
    assert!(failures >= 1.0, "counted as a TLS handshake failure");
    t.assert_survived(Attacked::Server, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_disconnects_a_tls_handshake_that_never_finishes() {
    let mut t = Target::start().await;
    let before = t.server.rss_kb();
    // The first bytes of a ClientHello record, then one more byte now and then, never finishing.
    let head = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01];
    let out = raw::attack(
        t.server_grpc_addr(),
        &head,
        &[0u8; 100],
        Duration::from_millis(300),
        std::iter::empty(),
        WAIT,
    )
    .await;
    assert!(
        out.closed_after < bound(TLS_TIMEOUT),
        "closed after {:?} (TLS_HANDSHAKE_TIMEOUT_MS {TLS_TIMEOUT:?})",
        out.closed_after
    );
    // And a client that connects and says nothing at all.
    let silent = raw::attack(t.server_grpc_addr(), &[], &[], Duration::ZERO, std::iter::empty(), WAIT).await;
    assert!(
        silent.closed_after < bound(TLS_TIMEOUT),
        "silent closed after {:?}",
        silent.closed_after
    );
    t.assert_survived(Attacked::Server, before).await;
}
