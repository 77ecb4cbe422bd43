//! The real `dmr agent` binary (`cargo build -p dmr-cli`): configuration mistakes stop it at
//! start with a message naming the setting, and a standard error nobody reads any more (a closed
//! pipe) does not turn it into a zombie (issue 18).

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};
use support::processes::{dmr_binary, free_port};
use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// Environment variables of a child process.
type Env = Vec<(String, String)>;

/// A working agent environment for `creds` (REST on `port`), on top of which each case spoils one
/// setting.
fn agent_env(
    pki: &TestPki,
    creds: &dmr_pki::AgentCredentials,
    port: u16,
    grpc: u16,
    sink: &str,
) -> Vec<(String, String)> {
    vec![
        ("PORT".into(), port.to_string()),
        ("BIND_ADDRESS".into(), "127.0.0.1".into()),
        ("AGENT_ID".into(), creds.id.clone()),
        (
            "AGENT_PRIVATE_KEY_FILE".into(),
            pki.write(&format!("{}-key.pem", creds.id), &creds.key_pem)
                .display()
                .to_string(),
        ),
        (
            "TLS_CERT_FILE".into(),
            pki.write(&format!("{}-cert.pem", creds.id), &creds.cert_pem)
                .display()
                .to_string(),
        ),
        ("TLS_CA_FILE".into(), pki.ca_file.display().to_string()),
        ("DMR_SERVER_GRPC_URL".into(), format!("https://localhost:{grpc}")),
        ("OUTGOING_MESSAGE_ENDPOINT".into(), sink.to_owned()),
        ("LOGGER_COLORS".into(), "false".into()),
    ]
}

fn command(env: &[(String, String)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(dmr_binary());
    cmd.arg("agent")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .kill_on_drop(true);
    cmd
}

fn with(env: &[(String, String)], key: &str, value: &str) -> Vec<(String, String)> {
    let mut env: Vec<_> = env.iter().filter(|(k, _)| k != key).cloned().collect();
    env.push((key.into(), value.into()));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_misconfiguration_stops_the_agent_at_start_naming_the_setting() {
    init();
    let pki = TestPki::new();
    let (a, b) = (pki.agent("A"), pki.agent("B"));
    let good = agent_env(&pki, &a, free_port(), free_port(), "http://127.0.0.1:9/in");
    let b_key = pki.write("b-key.pem", &b.key_pem).display().to_string();
    let garbage = pki
        .write("garbage-ca.pem", "this is not a certificate\n")
        .display()
        .to_string();
    let cases: Vec<(&str, Env, Vec<&str>)> = vec![
        (
            "AGENT_ID of another agent",
            with(&good, "AGENT_ID", &b.id),
            vec!["AGENT_ID", "TLS_CERT_FILE", &a.id],
        ),
        (
            "a key that is not the certificate's",
            with(&good, "AGENT_PRIVATE_KEY_FILE", &b_key),
            vec!["AGENT_PRIVATE_KEY", "does not match"],
        ),
        (
            "a garbage CA file",
            with(&good, "TLS_CA_FILE", &garbage),
            vec!["TLS_CA_FILE", "garbage-ca.pem"],
        ),
        (
            "a server URL without a scheme",
            with(&good, "DMR_SERVER_GRPC_URL", "localhost:8076"),
            vec!["DMR_SERVER_GRPC_URL", "scheme"],
        ),
        (
            "a plain-text server URL",
            with(&good, "DMR_SERVER_GRPC_URL", "http://localhost:8076"),
            vec!["DMR_SERVER_GRPC_URL", "https://"],
        ),
        (
            "an endpoint that is not an http URL",
            with(&good, "OUTGOING_MESSAGE_ENDPOINT", "bot.internal:3000/messages"),
            vec!["OUTGOING_MESSAGE_ENDPOINT"],
        ),
        (
            "an unknown log level",
            with(&good, "LOGGER_LOG_LEVELS", "error,warn,info,verbos"),
            vec!["LOGGER_LOG_LEVELS", "verbos"],
        ),
        (
            "an unknown log format",
            with(&good, "LOG_FORMAT", "xml"),
            vec!["LOG_FORMAT", "xml"],
        ),
    ];
    for (what, env, needles) in cases {
        let child = command(&env).stderr(Stdio::piped()).spawn().unwrap();
        let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{what}: the agent kept running instead of refusing to start"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: exit status {:?}", out.status);
        for needle in &needles {
            assert!(stderr.contains(needle), "{what}: {needle:?} not in {stderr}");
        }
    }
    // The same environment unspoilt starts (it answers health while it looks for its server).
    let port = free_port();
    let mut child = command(&with(&good, "PORT", &port.to_string()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let up = eventually_async(WAIT, || {
        let http = http.clone();
        async move {
            http.get(format!("http://127.0.0.1:{port}/v1/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    assert!(up, "the good configuration starts");
    child.kill().await.unwrap();
}

/// Sends SIGTERM to `pid`.
fn sigterm(pid: u32) {
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
}

async fn get(http: &reqwest::Client, url: String) -> Option<(u16, String)> {
    let r = http.get(url).send().await.ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_stderr_pipe_closed_keeps_working_and_stops_on_sigterm() {
    init();
    let probe = BrokerProbe::connect().await;
    let pki = TestPki::new();
    let a = pki.agent("A");
    let centops = pki.write_centops(&[&a]);
    let vf = format!("validation-failures-test-{}", uuid::Uuid::new_v4());
    let mut server = start_server(server_config(&pki, &centops, &vf)).await;
    let sink = Sink::start().await;
    let port = free_port();
    let mut env = agent_env(&pki, &a, port, server.grpc.port(), &sink.url);
    // Verbose, so that every task logs (the connection task first of all, at "connected").
    env.push(("LOGGER_LOG_LEVELS".into(), "error,warn,log,debug,verbose".into()));
    let mut child = command(&env).stderr(Stdio::piped()).spawn().unwrap();
    // `dmr agent 2>&1 | head -0`: the reader goes away.
    drop(child.stderr.take());
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");

    let ready = eventually_async(WAIT, || {
        let (http, url) = (http.clone(), format!("{base}/ready"));
        async move { get(&http, url).await.is_some_and(|(s, _)| s == 200) }
    })
    .await;
    assert!(ready, "the agent connects although nobody reads its logs");
    // It has its directory and delivers: a message to itself arrives.
    let m = seed_message(&a.id);
    let answer = http.post(format!("{base}/v1/messages")).json(&m).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(sink.wait_for(1, WAIT).await.len(), 1, "delivered");
    let (_, metrics) = get(&http, format!("{base}/metrics")).await.unwrap();
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dmr_log_write_failures_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("dmr_log_write_failures_total is exposed");
    assert!(failures > 0.0, "lost log lines are counted: {failures}");

    // /ready tells the truth when the server goes away.
    server.stop.cancel();
    let _ = (&mut server.task).await;
    let not_ready = eventually_async(WAIT, || {
        let (http, url) = (http.clone(), format!("{base}/ready"));
        async move { get(&http, url).await.is_some_and(|(s, _)| s == 503) }
    })
    .await;
    assert!(not_ready, "/ready reports the lost server");

    // And SIGTERM still ends it.
    let started = Instant::now();
    sigterm(child.id().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the agent exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    probe.delete(&[a.id.clone(), format!("{}.dlq", a.id), vf]).await;
}
