//! The operators' console (issue 15) through a real server, real agents and the real broker
//! (RabbitMQ, or the embedded engine with `DMR_TEST_BROKER=embedded`): authentication, the agents
//! table, dead letters listed without payloads then replayed (and delivered) or purged, validation
//! failures listed, inspected and purged, and the web page in a real headless Chromium.

#![allow(clippy::unwrap_used)]

mod admin_kit;
mod support;

use admin_kit::{AdminRelay, TOKEN};
use serde_json::{Value, json};
use std::time::Duration;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// Messages for an offline A expire after this (then replayed ones are delivered at once: A is back).
fn short_ttl(cfg: &mut dmr_server::config::ServerConfig) {
    cfg.rabbitmq.ttl_ms = 1000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_requests_without_a_valid_token_and_counts_the_refusals() {
    let admin = AdminRelay::start(|_| {}).await;
    let http = &admin.relay.http;
    let url = format!("{}/api/v1/agents", admin.base);
    let none = http.get(&url).send().await.unwrap();
    assert_eq!(none.status().as_u16(), 401);
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    let wrong = http.get(&url).bearer_auth("not-the-token-at-all").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let basic = http.get(&url).basic_auth("ops", Some(TOKEN)).send().await.unwrap();
    assert_eq!(basic.status().as_u16(), 401, "only a bearer token");
    let purge = http
        .post(format!("{}/api/v1/validation-failures/purge", admin.base))
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status().as_u16(), 401, "actions too");
    let m = &admin.relay.server.core.metrics.admin_auth_refusals;
    assert_eq!(m.with_label_values(&["missing"]).get(), 2);
    assert_eq!(m.with_label_values(&["unknown_token"]).get(), 1);
    assert_eq!(m.with_label_values(&["malformed"]).get(), 1);
    let scrape = admin.relay.server.core.metrics.render();
    assert!(
        scrape.contains("dmr_admin_auth_refusals_total{reason=\"missing\"} 2"),
        "{scrape}"
    );

    // The right token opens it; the page and the OpenAPI document hold no data and need none.
    assert_eq!(admin.get("/api/v1/agents").await.0, 200);
    let page = http.get(format!("{}/", admin.base)).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    assert!(page.text().await.unwrap().contains("DMR operators' console"));
    let doc: Value = http
        .get(format!("{}/api/v1/openapi.json", admin.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/api/v1/agents/{id}/dead-letters/replay"]["post"].is_object());
    admin.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_table_shows_who_is_connected_how_and_since_when_with_queue_depths() {
    let mut admin = AdminRelay::start(short_ttl).await;
    let (a, b) = (admin.relay.a.id.clone(), admin.relay.b.id.clone());
    let row = admin.agent_row(&a).await;
    assert_eq!(row["connected"], true, "{row}");
    assert_eq!(row["name"], "Agent A");
    assert_eq!(row["sessions"][0]["transport"], "gRPC");
    assert!(row["sessions"][0]["since"].as_str().unwrap().ends_with('Z'));
    assert!(row["sessions"][0]["instance"].is_string());
    let from = row["sessions"][0]["remoteAddress"].as_str().unwrap_or_default();
    assert!(from.starts_with("127.0.0.1:"), "where the agent connects from: {row}");
    assert_eq!(
        (row["queueDepth"].clone(), row["dlqDepth"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(admin.agent_row(&b).await["connected"], true);

    let ids = admin.dead_letters_for_a(1).await;
    assert_eq!(ids.len(), 1);
    let row = admin.agent_row(&a).await;
    assert_eq!(row["connected"], false, "A is offline: {row}");
    assert_eq!(row["sessions"], json!([]));
    assert_eq!(row["dlqDepth"], 1, "{row}");
    admin.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_without_payloads_then_replayed_selectively_and_delivered_then_purged() {
    let mut admin = AdminRelay::start(short_ttl).await;
    let a = admin.relay.a.id.clone();
    let ids = admin.dead_letters_for_a(3).await;
    admin.relay.bring_a_back().await;

    let (status, view) = admin.get(&format!("/api/v1/agents/{a}/dead-letters")).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["depth"], 3);
    let listed: Vec<&str> = view["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "oldest first"
    );
    let first = &view["messages"][0];
    assert_eq!(first["senderId"], admin.relay.b.id.as_str());
    assert_eq!(first["recipientId"], a.as_str());
    assert_eq!(first["type"], "ChatMessage");
    assert!(first["receivedAt"].is_string());
    assert_eq!(first["deadLetter"]["reason"], "expired", "{first}");
    assert_eq!(first["deadLetter"]["count"], 1);
    assert_eq!(first["deadLetter"]["queue"], a.as_str());
    assert!(first["deadLetter"]["at"].as_str().unwrap().ends_with('Z'), "{first}");
    assert!(
        !view.to_string().contains("payload"),
        "metadata only, never the payload: {view}"
    );
    assert!(!view.to_string().contains("eyJ"), "no JWE anywhere: {view}");

    // Replay the second one only (plus an id that is not there).
    let (status, done) = admin
        .post(
            &format!("/api/v1/agents/{a}/dead-letters/replay"),
            &json!({"ids": [ids[1], "00000000-0000-0000-0000-000000000000"]}),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(
        done,
        json!({"count": 1, "notFound": ["00000000-0000-0000-0000-000000000000"]})
    );
    let got = admin.relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0]["id"],
        ids[1].as_str(),
        "the replayed dead letter is delivered, decrypted"
    );
    let (_, view) = admin.get(&format!("/api/v1/agents/{a}/dead-letters")).await;
    let left: Vec<&str> = view["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, [ids[0].as_str(), ids[2].as_str()], "the others stay, in order");

    // Purge the first, then all.
    let (status, done) = admin
        .post(
            &format!("/api/v1/agents/{a}/dead-letters/purge"),
            &json!({"ids": [ids[0]]}),
        )
        .await;
    assert_eq!((status, done), (200, json!({"count": 1, "notFound": []})));
    let (_, done) = admin
        .post(&format!("/api/v1/agents/{a}/dead-letters/purge"), &json!({"all": true}))
        .await;
    assert_eq!(done["count"], 1);
    assert_eq!(admin.relay.probe.queue_len(&format!("{a}.dlq")).await, Some(0));
    assert_eq!(
        admin.relay.sink_a.messages().len(),
        1,
        "purged messages are not delivered"
    );

    // A selection must be explicit; an unknown agent is a 404.
    let (status, _) = admin
        .post(&format!("/api/v1/agents/{a}/dead-letters/purge"), &json!({}))
        .await;
    assert_eq!(status, 400);
    let (status, _) = admin.get("/api/v1/agents/no-such-agent/dead-letters").await;
    assert_eq!(status, 404);

    let metrics = &admin.relay.server.core.metrics;
    assert_eq!(metrics.admin_messages.with_label_values(&["replay"]).get(), 1);
    assert_eq!(
        metrics.admin_messages.with_label_values(&["purge-dead-letters"]).get(),
        2
    );
    assert_eq!(metrics.admin_actions.with_label_values(&["replay", "ok"]).get(), 1);
    admin.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_delivers_every_dead_letter_in_order() {
    let mut admin = AdminRelay::start(short_ttl).await;
    let a = admin.relay.a.id.clone();
    let ids = admin.dead_letters_for_a(2).await;
    admin.relay.bring_a_back().await;
    let (status, done) = admin
        .post(
            &format!("/api/v1/agents/{a}/dead-letters/replay"),
            &json!({"all": true}),
        )
        .await;
    assert_eq!((status, done), (200, json!({"count": 2, "notFound": []})));
    let got = admin.relay.sink_a.wait_for(2, WAIT).await;
    let got: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(admin.agent_row(&a).await["dlqDepth"], 0);
    admin.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_failures_are_listed_inspected_and_purged() {
    let admin = AdminRelay::start(|_| {}).await;
    let broker = admin.relay.server.core.broker.clone();
    let vf = admin.relay.vf_queue.clone();
    let mut records = Vec::new();
    for i in 0..3 {
        let record = dmr::envelope::ValidationFailure::new(
            json!({"id": format!("bad-{i}-{}", uuid::Uuid::new_v4()), "senderId": admin.relay.b.id, "recipientId": "nobody"}),
            vec![dmr::error::MessageError::new(
                dmr::error::ErrorType::InvalidRecipientId,
                "recipient not in the directory",
            )],
        );
        broker
            .publish(&vf, &serde_json::to_vec(&record).unwrap())
            .await
            .unwrap();
        records.push(record);
    }
    let (status, view) = admin.get("/api/v1/validation-failures").await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["queue"], vf.as_str());
    assert_eq!(view["depth"], 3);
    assert_eq!(view["records"][0]["id"], records[0].id.as_str());
    assert_eq!(view["records"][0]["senderId"], admin.relay.b.id.as_str());
    assert_eq!(
        view["records"][0]["errors"][0]["type"], "INVALID_RECIPIENT_ID",
        "{view}"
    );

    let (status, one) = admin
        .get(&format!("/api/v1/validation-failures/{}", records[1].id))
        .await;
    assert_eq!(status, 200);
    assert_eq!(one, serde_json::to_value(&records[1]).unwrap(), "the record as written");
    assert_eq!(admin.get("/api/v1/validation-failures/nope").await.0, 404);

    let (status, done) = admin
        .post("/api/v1/validation-failures/purge", &json!({"ids": [records[1].id]}))
        .await;
    assert_eq!((status, done), (200, json!({"count": 1, "notFound": []})));
    let (_, view) = admin.get("/api/v1/validation-failures").await;
    assert_eq!(view["depth"], 2, "the two other records stay: {view}");
    let (_, done) = admin
        .post("/api/v1/validation-failures/purge", &json!({"all": true}))
        .await;
    assert_eq!(done["count"], 2);
    assert_eq!(admin.relay.probe.queue_len(&vf).await, Some(0));
    admin.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_in_chromium_shows_a_connected_agent_and_its_replay_button_gets_a_dead_letter_delivered() {
    let browser = admin_kit::browser::Browser::start().await;
    let mut admin = AdminRelay::start(short_ttl).await;
    let a = admin.relay.a.id.clone();
    let ids = admin.dead_letters_for_a(2).await;
    admin.relay.bring_a_back().await;

    browser.client.goto(&format!("{}/", admin.base)).await.unwrap();
    browser.click("#token").await;
    browser
        .client
        .find(fantoccini::Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    browser.click("#sign-in").await;
    let row = format!("#agents tr.connected[data-agent='{a}']");
    let dlq_cell = format!("{row} td.dlq-depth");
    let shown = eventually_async(WAIT, || async { browser.text(&dlq_cell).await == "2" }).await;
    assert!(
        shown,
        "A is shown connected with 2 dead letters: {:?}",
        browser.text("#agents").await
    );
    assert!(browser.text(&row).await.contains("gRPC"));

    browser.click(&format!("{row} button.show-dead-letters")).await;
    let listed = format!("#dead-letter-table tr[data-id='{}']", ids[0]);
    browser.click(&format!("{listed} input")).await;
    let page = browser.text("#dead-letters").await;
    assert!(page.contains(&ids[1]) && page.contains("expired"), "{page}");
    browser.screenshot("admin-console-dead-letters.png").await;

    browser.click("#replay-selected").await;
    let got = admin.relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], ids[0].as_str(), "the replayed dead letter is delivered");
    let replayed = eventually_async(WAIT, || async { browser.text("#dl-result").await == "replayed 1" }).await;
    assert!(replayed, "{:?}", browser.text("#dl-result").await);
    // The agents table refreshes by itself: A's DLQ depth goes down to 1.
    let live = eventually_async(WAIT, || async { browser.text(&dlq_cell).await == "1" }).await;
    assert!(live, "{:?}", browser.text(&dlq_cell).await);
    assert!(!browser.text("#dead-letters").await.contains(&ids[0]));
    let shot = browser.screenshot("admin-console-after-replay.png").await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);
    browser.close().await;
    admin.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmr_admin_lists_agents_and_dead_letters_as_tables_or_json_and_replays_from_the_terminal() {
    let mut admin = AdminRelay::start(short_ttl).await;
    let a = admin.relay.a.id.clone();
    let ids = admin.dead_letters_for_a(2).await;
    admin.relay.bring_a_back().await;
    let file = admin.token_file.clone();

    let (ok, out, err) = admin_kit::dmr_admin(&admin, &file, &["agents"]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("AGENT"), "a table: {out}");
    let row = out.lines().find(|l| l.starts_with(&a)).unwrap_or_default();
    assert!(
        row.contains("Agent A") && row.contains("connected") && row.contains("gRPC"),
        "{out}"
    );

    let args: Vec<String> = vec!["--json".into(), "dead-letters".into(), a.clone()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = admin_kit::dmr_admin(&admin, &file, &args).await;
    assert!(ok, "{err}");
    let view: Value = serde_json::from_str(&out).expect("--json prints the API's JSON");
    assert_eq!(view["depth"], 2);
    assert_eq!(view["messages"][1]["id"], ids[1].as_str());

    let args = ["replay", a.as_str(), "--id", ids[1].as_str()];
    let (ok, out, err) = admin_kit::dmr_admin(&admin, &file, &args).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "replayed 1");
    let got = admin.relay.sink_a.wait_for(1, WAIT).await;
    assert_eq!(got[0]["id"], ids[1].as_str());

    let (ok, out, _) = admin_kit::dmr_admin(&admin, &file, &["dead-letters", a.as_str()]).await;
    assert!(ok);
    assert!(
        out.starts_with("1 dead letter(s)") && out.contains(&ids[0]) && out.contains("expired"),
        "{out}"
    );

    // A wrong token: refused, and the command says so and fails.
    let wrong = admin.token_file.with_file_name("wrong-token");
    std::fs::write(&wrong, "someone:not-the-right-token-at-all\n").unwrap();
    let (ok, _, err) = admin_kit::dmr_admin(&admin, &wrong, &["agents"]).await;
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
    admin.finish().await;
}

/// RabbitMQ only (skipped by name on the embedded engine, which has one instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_connected_to_another_instance_shows_up_in_any_instances_console() {
    let admin = AdminRelay::start(|_| {}).await;
    let (second, base) = admin_kit::second_instance(&admin).await;
    let a = admin.relay.a.id.clone();
    let first = admin.agent_row(&a).await;
    let here = first["sessions"][0]["instance"].as_str().unwrap().to_owned();

    let response = admin
        .relay
        .http
        .get(format!("{base}/api/v1/agents"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let view: Value = response.json().await.unwrap();
    assert_ne!(view["instance"], here.as_str(), "answered by the second instance");
    let row = view["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == a.as_str())
        .unwrap();
    assert_eq!(
        row["connected"], true,
        "A, connected to the first instance, is seen from the second: {row}"
    );
    assert_eq!(row["sessions"].as_array().unwrap().len(), 1, "{row}");
    assert_eq!(row["sessions"][0]["instance"], here.as_str());
    assert_eq!(row["sessions"][0]["transport"], "gRPC");
    assert_eq!(row["sessions"][0]["since"], first["sessions"][0]["since"]);
    assert_eq!(row["dlqDepth"], 0, "and the queues, shared");
    second.stop.cancel();
    let mut second = second;
    let _ = (&mut second.task).await;
    admin.finish().await;
}
