//! Operability with the real tools operators use: grpcurl against the mTLS gRPC port (reflection,
//! health, ListAgents), schemathesis against the agent's OpenAPI document, a real Prometheus
//! scraping server and agents, and logs that never carry payloads, keys or tokens.
//! The tools come from `scripts/test-tools.sh` (sourced by the test command), via `DMR_GRPCURL`,
//! `DMR_SCHEMATHESIS` and `DMR_PROMETHEUS`.

#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;
use support::processes::{DmrProcess, free_port};
use support::*;

const WAIT: Duration = Duration::from_secs(20);

fn tool(var: &str) -> String {
    let path = std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with `bash scripts/test.sh` (it installs grpcurl, schemathesis and prometheus)")
    });
    assert!(std::path::Path::new(&path).exists(), "{var}={path} does not exist");
    path
}

fn grpcurl(args: &[&str]) -> (bool, String) {
    let out = Command::new(tool("DMR_GRPCURL")).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_checks_health_and_lists_agents_with_a_client_certificate() {
    let relay = Relay::start().await;
    let ca = relay.pki.ca_file.display().to_string();
    let cert = relay.pki.write("b.crt", &relay.b.cert_pem).display().to_string();
    let key = relay.pki.write("b.key", &relay.b.key_pem).display().to_string();
    let addr = format!("localhost:{}", relay.server.grpc.port());
    let tls = ["-cacert", ca.as_str(), "-cert", cert.as_str(), "-key", key.as_str()];
    let with_tls = |rest: &[&str]| -> Vec<String> { tls.iter().chain(rest.iter()).map(|s| (*s).to_owned()).collect() };
    let run = |rest: &[&str]| {
        let args = with_tls(rest);
        grpcurl(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let (ok, out) = run(&[&addr, "list"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("dmr.v1.AgentGateway") && out.contains("grpc.health.v1.Health"),
        "{out}"
    );

    let (ok, out) = run(&[&addr, "describe", "dmr.v1.AgentGateway"]);
    assert!(
        ok && out.contains("rpc Session") && out.contains("rpc ListAgents"),
        "{out}"
    );

    let (ok, out) = run(&[&addr, "grpc.health.v1.Health/Check"]);
    assert!(ok && out.contains("SERVING"), "{out}");

    let (ok, out) = run(&[&addr, "dmr.v1.AgentGateway/ListAgents"]);
    assert!(ok, "{out}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert!(
        ids.contains(&relay.a.id.as_str()) && ids.contains(&relay.b.id.as_str()),
        "{out}"
    );
    let connected = listed["connectedAgentIds"].as_array().unwrap();
    assert_eq!(connected.len(), 2, "{out}");

    // Without a client certificate the server refuses the TLS handshake.
    let (ok, out) = grpcurl(&["-cacert", &ca, &addr, "list"]);
    assert!(!ok, "must fail without a client certificate: {out}");
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_undocumented_status_or_hang_in_the_rest_api() {
    let relay = Relay::start().await;
    let doc: Value = relay
        .http
        .get(relay.agent_b.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        doc["paths"]["/v1/messages"]["post"].is_object(),
        "the document describes POST /v1/messages"
    );
    let required = &doc["components"]["schemas"]["V1Message"]["required"];
    assert_eq!(required, &json!(["id", "recipientId", "timestamp", "type", "payload"]));
    let url = relay.agent_b.url("/openapi.json");
    let report = relay.pki.dir.path().join("schemathesis");
    let out = tokio::process::Command::new(tool("DMR_SCHEMATHESIS"))
        .args([
            "run",
            &url,
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args([
            "--max-examples",
            "40",
            "--request-timeout",
            "10",
            "--max-response-time",
            "5",
            "--generation-deterministic",
        ])
        .arg("--report-dir")
        .arg(&report)
        .env("SCHEMATHESIS_HOOKS", "")
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(text.contains("/v1/messages"), "it exercised POST /v1/messages:\n{text}");
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_metrics_the_alert_rules_use_with_sane_values() {
    let relay = Relay::start().await;
    for _ in 0..5 {
        assert_eq!(relay.post_to_b(&seed_message(&relay.a.id)).await.0, 200);
    }
    let _ = relay.post_to_b(&json!({"not": "valid"})).await;
    relay.sink_a.wait_for(5, WAIT).await;

    let dir = relay.pki.dir.path();
    let port = free_port();
    let targets = |addr: std::net::SocketAddr| format!("'{addr}'");
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: dmr-server\n    static_configs:\n      - targets: [{}]\n  - job_name: dmr-agent\n    static_configs:\n      - targets: [{}, {}]\n",
        targets(relay.server.http),
        targets(relay.agent_a.http),
        targets(relay.agent_b.http)
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let mut prometheus = tokio::process::Command::new(tool("DMR_PROMETHEUS"))
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let query = |q: String| {
        let http = relay.http.clone();
        async move {
            let encoded: String = q
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect();
            let url = format!("http://127.0.0.1:{port}/api/v1/query?query={encoded}");
            match http.get(url).send().await {
                Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null)["data"]["result"].clone(),
                Err(_) => Value::Null,
            }
        }
    };
    let value = |result: &Value| -> Vec<f64> {
        result.as_array().map_or(vec![], |rs| {
            rs.iter().filter_map(|r| r["value"][1].as_str()?.parse().ok()).collect()
        })
    };
    let up_all = async {
        loop {
            let up = value(&query("up".into()).await);
            if up.len() == 3 && up.iter().all(|v| *v == 1.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), up_all)
        .await
        .expect("prometheus scrapes server and agents");

    // Every dmr_* metric named in the shipped alert rules is scraped.
    let rules = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/monitoring/alerts.yml")).unwrap();
    let mut names: Vec<String> = Vec::new();
    let expressions: String = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for token in expressions.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if token.len() > 4 && token.starts_with("dmr_") && !names.iter().any(|n| n == token) {
            names.push(token.to_owned());
        }
    }
    assert!(names.len() >= 5, "{names:?}");
    for name in &names {
        assert!(!value(&query(name.clone()).await).is_empty(), "{name} is not scraped");
    }
    // Sane values after the traffic above.
    assert_eq!(
        value(&query("dmr_socket_connections_active{job='dmr-server'}".into()).await),
        vec![2.0]
    );
    assert_eq!(
        value(&query("dmr_agent_socket_connection_active".into()).await),
        vec![1.0, 1.0]
    );
    let posts = value(&query("sum(dmr_http_requests_total{route='/v1/messages'})".into()).await);
    assert!(posts.first().is_some_and(|v| *v >= 6.0), "{posts:?}");
    let errors = value(&query("sum(dmr_http_errors_total)".into()).await);
    assert!(
        errors.first().is_some_and(|v| *v >= 1.0),
        "the invalid body counts as an error: {errors:?}"
    );
    let delivered = value(&query("dmr_messages_delivered_total".into()).await);
    assert_eq!(delivered, vec![5.0]);
    let p95 = value(
        &query(
            "histogram_quantile(0.95, sum(dmr_message_processing_duration_seconds_bucket{job='dmr-server'}) by (le))"
                .into(),
        )
        .await,
    );
    assert!(
        p95.first().is_some_and(|v| *v > 0.0 && *v < 0.5),
        "routing latency is measured and below the alert threshold: {p95:?}"
    );
    let _ = prometheus.kill().await;
    relay.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_logs_ids_as_fields_but_never_payloads_keys_or_tokens() {
    init();
    // Fails early, with a clear message, if there is no broker.
    let _broker = BrokerProbe::connect().await;
    let pki = TestPki::new();
    let (a, b, c) = (pki.agent("A"), pki.agent("B"), pki.agent("Legacy C"));
    let centops = pki.write_centops(&[&a, &b, &c]);
    let logs = tempfile::tempdir().unwrap();
    let vf = format!("validation-failures-test-{}", uuid::Uuid::new_v4());
    // Declared before the processes, so it drops after they are killed: queues go even if the test
    // fails halfway.
    let guard = QueueGuard::new(&rabbit_config());
    guard.track(&vf);
    for id in [&a.id, &b.id, &c.id] {
        guard.track_agent(id);
    }
    let (http_port, grpc_port) = (free_port(), free_port());
    let verbose = [
        ("LOGGER_LOG_LEVELS", "error,warn,log,debug,verbose"),
        ("LOG_FORMAT", "json"),
    ];
    let mut env = support::processes::server_env(&pki, &centops, (http_port, grpc_port), &rabbit_config(), &vf);
    env.extend(verbose.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let mut server = DmrProcess::spawn("server", "server", &env, logs.path());
    let sink = Sink::start().await;
    let agent_env = |creds: &dmr_pki::AgentCredentials, port: u16| -> Vec<(String, String)> {
        let mut e: Vec<(String, String)> = vec![
            ("PORT".into(), port.to_string()),
            ("BIND_ADDRESS".into(), "127.0.0.1".into()),
            ("AGENT_ID".into(), creds.id.clone()),
            // The key in the environment, one line with literal \n, as operators often pass it.
            ("AGENT_PRIVATE_KEY".into(), creds.key_pem.replace('\n', "\\n")),
            (
                "TLS_CERT_FILE".into(),
                pki.write(&format!("{}.crt", creds.id), &creds.cert_pem)
                    .display()
                    .to_string(),
            ),
            ("TLS_CA_FILE".into(), pki.ca_file.display().to_string()),
            ("DMR_SERVER_GRPC_URL".into(), format!("https://localhost:{grpc_port}")),
            ("OUTGOING_MESSAGE_ENDPOINT".into(), sink.url.clone()),
        ];
        e.extend(verbose.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        e
    };
    let (a_port, b_port) = (free_port(), free_port());
    let mut agent_a = DmrProcess::spawn("agent-a", "agent", &agent_env(&a, a_port), logs.path());
    let mut agent_b = DmrProcess::spawn("agent-b", "agent", &agent_env(&b, b_port), logs.path());
    let http = reqwest::Client::new();
    for port in [http_port, a_port, b_port] {
        let ready = format!("http://127.0.0.1:{port}/ready");
        let ok = eventually_async(WAIT, || {
            let (http, ready) = (http.clone(), ready.clone());
            async move { http.get(&ready).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        assert!(ok, "{port} not ready:\n{}", server.logs());
    }
    let sink_c = Sink::start().await;
    let server_http: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let mut legacy = LegacyAgent::spawn(server_http, &c, &sink_c.url, &[]).await;
    legacy
        .wait_event("full-list", WAIT)
        .await
        .expect("legacy agent connected");

    let secret = format!("TOP-SECRET-CONTENT-{}", uuid::Uuid::new_v4());
    let mut m = seed_message(&a.id);
    m["payload"]["messages"][0]["content"] = json!(secret);
    let (status, _) = post(&http, &format!("http://127.0.0.1:{b_port}/v1/messages"), &m).await;
    assert_eq!(status, 200);
    let mut to_c = seed_message(&c.id);
    to_c["payload"]["messages"][0]["content"] = json!(secret);
    assert_eq!(
        post(&http, &format!("http://127.0.0.1:{a_port}/v1/messages"), &to_c)
            .await
            .0,
        200
    );
    assert_eq!(sink.wait_for(1, WAIT).await.len(), 1);
    assert_eq!(sink_c.wait_for(1, WAIT).await.len(), 1);
    // An invalid message and a refused token too, so error paths are logged.
    let _ = post(
        &http,
        &format!("http://127.0.0.1:{b_port}/v1/messages"),
        &json!({"id": secret}),
    )
    .await;
    let stranger = pki.agent("stranger");
    let mut refused = LegacyAgent::spawn(
        server_http,
        &c,
        &sink_c.url,
        &[("TOKEN_KEY", stranger.key_pem.as_str())],
    )
    .await;
    refused.wait_event("server_error", WAIT).await.expect("refused");
    refused.kill().await;
    legacy.kill().await;
    // The checks below are negative (no secret in any log line): give the processes the time to
    // write the lines of the refusal and the disconnections, so that they are covered too.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let all = [&server, &agent_a, &agent_b]
        .iter()
        .map(|p| p.logs())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.lines().count() > 10, "verbose logs were written");
    let key_line = |pem: &str| pem.lines().nth(3).unwrap().to_owned();
    let forbidden = [
        ("message content", secret.clone()),
        ("an encrypted payload", dmr::jose::JWE_HEADER_B64.to_owned()),
        ("a signed payload", dmr::jose::JWS_HEADER_B64.to_owned()),
        ("a legacy JWT", "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIs".to_owned()),
        ("a private key", "PRIVATE KEY".to_owned()),
        ("agent A's key material", key_line(&a.key_pem)),
        ("agent B's key material", key_line(&b.key_pem)),
        ("the RabbitMQ password in a URI", "guest:guest@".to_owned()),
    ];
    for (what, needle) in &forbidden {
        let hit = all.lines().find(|l| l.contains(needle.as_str()));
        assert!(
            hit.is_none(),
            "logs contain {what}: {}",
            hit.unwrap_or_default().chars().take(400).collect::<String>()
        );
    }
    // JSON lines with the ids as fields.
    let lines: Vec<Value> = all.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        lines.len() * 10 >= all.lines().count() * 9,
        "LOG_FORMAT=json writes JSON lines"
    );
    let id = m["id"].as_str().unwrap();
    assert!(
        lines.iter().any(|l| l["message_id"] == json!(id)),
        "message ids are logged as fields"
    );
    assert!(
        lines.iter().any(|l| l["agent_id"] == json!(a.id)),
        "agent ids are logged as fields"
    );

    for p in [&mut agent_a, &mut agent_b, &mut server] {
        p.terminate().await;
    }
    guard.delete_now().await;
}
