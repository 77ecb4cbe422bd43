//! The directory lifecycle: CentOps is polled, changes reach connected agents on both transports,
//! deleted and re-keyed agents are cut off, and bad answers never replace the last good directory.

#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_agent_connects_and_receives_without_a_restart_and_everyone_sees_it() {
    let centops = CentOpsStub::start().await;
    let (relay, extra) = Relay::start_with_centops(1, &centops).await;
    let legacy_creds = &extra[0];
    let sink_l = Sink::start().await;
    let mut legacy = LegacyAgent::spawn(relay.server.http, legacy_creds, &sink_l.url, &[]).await;
    legacy
        .wait_event("full-list", WAIT)
        .await
        .expect("legacy agent connected");

    // C is not in the directory yet: its stream is refused.
    let c = relay.pki.agent("Agent C");
    // Its queues go with the relay's, also if the test fails halfway.
    relay.guard.track_agent(&c.id);
    let sink_c = Sink::start().await;
    let agent_c = start_agent(agent_config(&relay.pki, &c, relay.server.grpc, &sink_c.url)).await;
    // A negative check (C must NOT get in): give its first attempts the time they take.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!agent_c.link.is_connected(), "an unknown agent is refused");

    centops.serve_agents(&[&relay.a, &relay.b, legacy_creds, &c]);
    agent_c.wait_connected().await;
    assert!(
        eventually(WAIT, || relay.agent_a.link.directory().contains(&c.id)).await,
        "gRPC agents get the partial update"
    );
    let partial = legacy
        .wait_event("partial-list", WAIT)
        .await
        .expect("legacy agents get the partial update");
    assert_eq!(partial["ids"], json!([c.id]));

    let m = seed_message(&c.id);
    assert_eq!(relay.post_to_b(&m).await.0, 200);
    let got = sink_c.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], m["id"]);
    legacy.kill().await;
    let mut agent_c = agent_c;
    agent_c.shutdown().await;
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_agent_is_disconnected_within_a_poll_and_refused_after() {
    let centops = CentOpsStub::start().await;
    let (relay, extra) = Relay::start_with_centops(1, &centops).await;
    let legacy_creds = &extra[0];
    let sink_l = Sink::start().await;
    let mut legacy = LegacyAgent::spawn(relay.server.http, legacy_creds, &sink_l.url, &[]).await;
    legacy
        .wait_event("full-list", WAIT)
        .await
        .expect("legacy agent connected");

    // Remove A (gRPC) and the legacy agent.
    centops.serve_agents(&[&relay.b]);
    assert!(
        eventually(WAIT, || !relay.server.core.sessions.connected().contains(&relay.a.id)).await,
        "A's stream is closed"
    );
    assert!(eventually(WAIT, || !relay.agent_a.link.is_connected()).await);
    legacy
        .wait_event("disconnect", WAIT)
        .await
        .expect("the legacy agent is disconnected");
    // A keeps trying (backoff) but is refused from now on: a negative check, so it gets the time
    // of several reconnection attempts rather than a condition to poll.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!relay.agent_a.link.is_connected(), "a deleted agent cannot come back");
    assert!(!relay.server.core.sessions.connected().contains(&relay.a.id));
    assert!(
        eventually(WAIT, || !relay.agent_b.link.directory().contains(&relay.a.id)).await,
        "B learns A is gone"
    );
    let (status, answer) = relay.post_to_b(&seed_message(&relay.a.id)).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(
        relay.probe.queue_len(&relay.a.id).await,
        Some(0),
        "A's queue is kept (not deleted silently)"
    );
    legacy.kill().await;
    relay.finish().await;
}

/// Waits until agent B's directory holds `agent`'s key.
async fn b_knows_the_key_of(relay: &Relay, agent: &dmr_pki::AgentCredentials) -> bool {
    let key = dmr::keys::PublicKey::from_pem(&agent.public_key_pem).unwrap();
    eventually(WAIT, || {
        relay
            .agent_b
            .link
            .directory()
            .get(&agent.id)
            .is_some_and(|e| e.key == key)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_cuts_the_old_session_and_the_new_key_keeps_receiving() {
    let centops = CentOpsStub::start().await;
    let (mut relay, _) = Relay::start_with_centops(0, &centops).await;
    let new_a = dmr_pki::AgentCredentials::generate(&relay.pki.ca, &relay.a.id, "Agent A (rotated)").unwrap();
    centops.serve_agents(&[&new_a, &relay.b]);
    assert!(
        eventually(WAIT, || !relay.agent_a.link.is_connected()).await,
        "the old key's session is cut"
    );
    // A negative check: the old key's reconnection attempts (every 100-500 ms) must all fail.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !relay.agent_a.link.is_connected(),
        "the old key cannot authenticate any more"
    );
    relay.agent_a.shutdown().await;

    relay.agent_a = start_agent(agent_config(&relay.pki, &new_a, relay.server.grpc, &relay.sink_a.url)).await;
    relay.agent_a.wait_connected().await;
    assert!(b_knows_the_key_of(&relay, &new_a).await, "B has A's new key");
    let m = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&m).await.0, 200);
    let got = relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "encrypted for the new key and decrypted with it");
    assert_eq!(got[0]["payload"], m["payload"]);
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekeyed_agent_decrypts_what_was_queued_for_its_old_key() {
    // SECURITY.md "Rotating keys and certificates", step by step.
    let centops = CentOpsStub::start().await;
    let (mut relay, _) = Relay::start_with_centops(0, &centops).await;
    relay.take_a_offline().await;
    let before = seed_message(&relay.a.id);
    assert_eq!(
        relay.post_to_b(&before).await.0,
        200,
        "queued, encrypted to A's old key"
    );

    // 1-2: a new key for A, published in CentOps; B learns it.
    let new_a = dmr_pki::AgentCredentials::generate(&relay.pki.ca, &relay.a.id, "Agent A (re-keyed)").unwrap();
    centops.serve_agents(&[&new_a, &relay.b]);
    assert!(b_knows_the_key_of(&relay, &new_a).await, "B has A's new key");
    let after = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&after).await.0, 200, "queued, encrypted to A's new key");

    // 3: A restarts with the new key, and the old one as its previous key.
    let old_key = relay.pki.write("agent-a-previous-key.pem", &relay.a.key_pem);
    let mut cfg = agent_config(&relay.pki, &new_a, relay.server.grpc, &relay.sink_a.url);
    cfg.agent_previous_private_key_file = Some(old_key);
    relay.agent_a = start_agent(cfg).await;
    relay.agent_a.wait_connected().await;
    let got = relay.sink_a.wait_for(2, WAIT).await;
    let ids: Vec<&Value> = got.iter().map(|m| &m["id"]).collect();
    assert_eq!(ids, [&before["id"], &after["id"]], "both delivered, in order");
    assert_eq!(got[0]["payload"], before["payload"]);
    assert_eq!(got[1]["payload"], after["payload"]);
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_outages_leave_the_last_good_directory_in_force() {
    let centops = CentOpsStub::start().await;
    let (relay, _) = Relay::start_with_centops(0, &centops).await;
    let good = dmr_pki::centops_json(&[&relay.a, &relay.b]);
    let mut dup: serde_json::Value = serde_json::from_str(&good).unwrap();
    let first = dup["response"][0].clone();
    dup["response"].as_array_mut().unwrap().push(first);
    let mut bad_key: serde_json::Value = serde_json::from_str(&good).unwrap();
    bad_key["response"][0]["authentication_certificate"] =
        json!("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n");
    let mut missing: serde_json::Value = serde_json::from_str(&good).unwrap();
    missing["response"][1]
        .as_object_mut()
        .unwrap()
        .remove("authentication_certificate");
    let cases: Vec<(&str, u16, String)> = vec![
        ("http_status", 503, "down".into()),
        ("invalid_json", 200, "{not json".into()),
        ("invalid_json", 200, missing.to_string()),
        ("duplicate_id", 200, dup.to_string()),
        ("bad_key", 200, bad_key.to_string()),
    ];
    let metrics = &relay.server.core.metrics;
    for (kind, status, body) in cases {
        let before = metrics.centops_failures.with_label_values(&[kind]).get();
        centops.serve(status, &body);
        centops.wait_polls(2).await;
        assert!(
            metrics.centops_failures.with_label_values(&[kind]).get() > before,
            "{kind} is counted"
        );
        assert_eq!(metrics.directory_refresh_failing.get(), 1);
        assert_eq!(
            relay.server.core.directory.current().len(),
            2,
            "{kind}: last good directory kept"
        );
    }
    centops.serve(200, &good);
    centops.serve_slowly(Duration::from_secs(2));
    centops.wait_polls(1).await;
    assert!(
        eventually(WAIT, || metrics.centops_failures.with_label_values(&["timeout"]).get()
            > 0)
        .await,
        "a slow CentOps times out"
    );
    centops.serve_slowly(Duration::ZERO);
    assert!(
        relay.agent_a.link.is_connected() && relay.agent_b.link.is_connected(),
        "nobody was disconnected"
    );
    let m = seed_message(&relay.a.id);
    assert_eq!(relay.post_to_b(&m).await.0, 200, "and messages still flow");
    assert_eq!(relay.sink_a.wait_for(1, WAIT).await.len(), 1);
    assert!(
        eventually(WAIT, || metrics.directory_refresh_failing.get() == 0).await,
        "recovers when CentOps does"
    );
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_file_is_reread_when_it_changes() {
    let (relay, _) = Relay::start_full(0, |cfg| cfg.centops_file_poll_interval_ms = 200).await;
    let c = relay.pki.agent("Agent C");
    // Its queues go with the relay's, also if the test fails halfway.
    relay.guard.track_agent(&c.id);
    let sink_c = Sink::start().await;
    let mut agent_c = start_agent(agent_config(&relay.pki, &c, relay.server.grpc, &sink_c.url)).await;
    relay.pki.write_centops(&[&relay.a, &relay.b, &c]);
    agent_c.wait_connected().await;
    assert!(eventually(WAIT, || relay.agent_b.link.directory().contains(&c.id)).await);
    agent_c.shutdown().await;
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_converges_on_the_same_directory_independently() {
    let centops = CentOpsStub::start().await;
    let (relay, _) = Relay::start_with_centops(0, &centops).await;
    let mut cfg = server_config(&relay.pki, &relay.pki.dir.path().join("centops.json"), &relay.vf_queue);
    cfg.centops_configuration_url = centops.url.clone();
    cfg.centops_configuration_cron_time = "* * * * * *".into();
    let mut second = start_server(cfg).await;
    let c = relay.pki.agent("Agent C");
    // Its queues go with the relay's, also if the test fails halfway.
    relay.guard.track_agent(&c.id);
    centops.serve_agents(&[&relay.a, &relay.b, &c]);
    let both =
        || relay.server.core.directory.current().contains(&c.id) && second.core.directory.current().contains(&c.id);
    assert!(
        eventually(WAIT, both).await,
        "both instances picked up the change on their own"
    );
    second.stop.cancel();
    let _ = (&mut second.task).await;
    relay.finish().await;
}
