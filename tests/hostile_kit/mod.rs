//! The hostile-input suite's harness: the attacked processes (the real `dmr` binary, so that
//! `/proc/<pid>/status` is theirs alone), raw-socket attackers for HTTP/1, a bare engine.io client
//! for the Socket.IO edge, and HTTP/2 attackers over mutual TLS for the gRPC port.

#![allow(dead_code)]

pub mod eio;
pub mod grpc;
pub mod raw;
pub mod tokens;

use crate::support::processes::{agent_env, free_port, server_env};
use crate::support::*;
use dmr_pki::AgentCredentials;
use std::time::Duration;

pub const WAIT: Duration = Duration::from_secs(20);

/// The timeouts the attacked processes run with in this suite (short, so slow clients are cut
/// off quickly; production defaults are 10 s / 30 s / 10 s).
pub const HEADER_TIMEOUT: Duration = Duration::from_millis(1500);
pub const BODY_TIMEOUT: Duration = Duration::from_millis(1500);
pub const TLS_TIMEOUT: Duration = Duration::from_millis(1500);
/// The server's `GRPC_MAX_CONCURRENT_STREAMS` in this suite (its default).
pub const MAX_STREAMS: u32 = 32;

/// "Memory stays bounded": the most an attacked process's RSS may grow during one attack.
pub const RSS_GROWTH_BOUND_KB: u64 = 100 * 1024;

/// One `dmr` child process, killed when dropped, its stderr in a log file.
pub type Proc = crate::support::processes::DmrProcess;

/// A server and two gRPC agents as processes, A and B, each agent's deliveries going to a sink,
/// plus credentials of agents listed in the directory but not started: `legacy` (for Socket.IO
/// handshakes) and `mallory` (a valid client certificate for HTTP/2 attacks).
pub struct Target {
    pub server: Proc,
    pub agent_a: Proc,
    pub agent_b: Proc,
    pub http: reqwest::Client,
    pub server_http: u16,
    pub server_grpc: u16,
    pub a_port: u16,
    pub b_port: u16,
    pub sink_a: Sink,
    pub a: AgentCredentials,
    pub b: AgentCredentials,
    pub legacy: AgentCredentials,
    pub mallory: AgentCredentials,
    pub probe: BrokerProbe,
    pub pki: TestPki,
    pub logs: tempfile::TempDir,
    /// Last: queues go once the processes are killed.
    pub guard: QueueGuard,
    delivered: usize,
}

impl Target {
    pub async fn start() -> Self {
        init();
        let probe = BrokerProbe::connect().await;
        let guard = QueueGuard::new(&rabbit_config());
        let pki = TestPki::new();
        let (a, b, legacy, mallory) = (
            pki.agent("A"),
            pki.agent("B"),
            pki.agent("Legacy"),
            pki.agent("Mallory"),
        );
        for c in [&a, &b, &legacy, &mallory] {
            guard.track_agent(&c.id);
        }
        let centops = pki.write_centops(&[&a, &b, &legacy, &mallory]);
        let vf = format!("validation-failures-test-{}", uuid::Uuid::new_v4());
        guard.track(&vf);
        let logs = tempfile::tempdir().expect("log dir");
        let (server_http, server_grpc, a_port, b_port) = (free_port(), free_port(), free_port(), free_port());
        let ms = |d: Duration| d.as_millis().to_string();
        let mut env = server_env(&pki, &centops, (server_http, server_grpc), &rabbit_config(), &vf);
        env.extend(crate::support::processes::broker_env(&logs.path().join("data")));
        env.extend([
            ("HTTP_HEADER_READ_TIMEOUT_MS".into(), ms(HEADER_TIMEOUT)),
            ("HTTP_BODY_READ_TIMEOUT_MS".into(), ms(BODY_TIMEOUT)),
            ("TLS_HANDSHAKE_TIMEOUT_MS".into(), ms(TLS_TIMEOUT)),
        ]);
        let server = Proc::spawn("server", "server", &env, logs.path());
        let sink_a = Sink::start().await;
        let sink_b = Sink::start().await;
        let grpc = format!("https://localhost:{server_grpc}");
        let agent = |name: &str, creds: &AgentCredentials, port: u16, sink: &Sink| {
            let mut env = agent_env(&pki, creds, port, &grpc, &sink.url);
            env.extend([
                ("HTTP_HEADER_READ_TIMEOUT_MS".into(), ms(HEADER_TIMEOUT)),
                ("HTTP_BODY_READ_TIMEOUT_MS".into(), ms(BODY_TIMEOUT)),
            ]);
            Proc::spawn(name, "agent", &env, logs.path())
        };
        let agent_a = agent("agent-a", &a, a_port, &sink_a);
        let agent_b = agent("agent-b", &b, b_port, &sink_b);
        let target = Self {
            server,
            agent_a,
            agent_b,
            // No pooled connections: the processes close idle ones after HEADER_TIMEOUT, and a
            // request racing that close would fail for a reason that is not the attack's.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("HTTP client"),
            server_http,
            server_grpc,
            a_port,
            b_port,
            sink_a,
            a,
            b,
            legacy,
            mallory,
            probe,
            pki,
            logs,
            guard,
            delivered: 0,
        };
        for port in [server_http, a_port, b_port] {
            let url = format!("http://127.0.0.1:{port}/ready");
            let http = target.http.clone();
            let ready = eventually_async(WAIT, || {
                let (http, url) = (http.clone(), url.clone());
                async move { http.get(url).send().await.is_ok_and(|r| r.status() == 200) }
            })
            .await;
            assert!(ready, "port {port} not ready\n{}", target.all_logs());
        }
        target
    }

    pub fn all_logs(&self) -> String {
        [&self.server, &self.agent_a, &self.agent_b]
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.name, p.logs()))
            .collect()
    }

    pub fn server_http_addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.server_http).into()
    }

    pub fn agent_b_addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.b_port).into()
    }

    pub fn server_grpc_addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.server_grpc).into()
    }

    /// A normal message from B (REST) through the server to A's sink.
    pub async fn relay_one(&mut self) {
        let m = seed_message(&self.a.id);
        let url = format!("http://127.0.0.1:{}/v1/messages", self.b_port);
        let (status, answer) = post(&self.http, &url, &m).await;
        assert_eq!(status, 200, "a normal send is accepted: {answer}\n{}", self.all_logs());
        self.delivered += 1;
        let got = self.sink_a.wait_for(self.delivered, WAIT).await;
        assert!(
            got.iter().any(|g| g["id"] == m["id"]),
            "the normal message is delivered\n{}",
            self.all_logs()
        );
    }

    /// After an attack: every process is still up, a normal message goes through, and the attacked
    /// process grew by less than [`RSS_GROWTH_BOUND_KB`] since `before` (its RSS then).
    pub async fn assert_survived(&mut self, attacked: Attacked, before_kb: u64) {
        for p in [&mut self.server, &mut self.agent_a, &mut self.agent_b] {
            assert!(p.is_up(), "{} died:\n{}", p.name, p.logs());
        }
        self.relay_one().await;
        let after_kb = self.proc(attacked).rss_kb();
        eprintln!(
            "{:?} RSS: {before_kb} kB before, {after_kb} kB after (+{} kB)",
            attacked,
            after_kb.saturating_sub(before_kb)
        );
        assert!(
            after_kb < before_kb + RSS_GROWTH_BOUND_KB,
            "{attacked:?}'s RSS grew from {before_kb} kB to {after_kb} kB"
        );
    }

    pub fn proc(&self, which: Attacked) -> &Proc {
        match which {
            Attacked::Server => &self.server,
            Attacked::AgentB => &self.agent_b,
        }
    }

    /// The server's `/metrics` text.
    pub async fn server_metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.server_http);
        self.http
            .get(url)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics")
    }

    /// `dmr_legacy_auth_refusals_total` for `agent_id` and `reason` (0 if absent).
    pub async fn legacy_refusals(&self, agent_id: &str, reason: &str) -> f64 {
        labelled(
            &self.server_metrics().await,
            "dmr_legacy_auth_refusals_total",
            &[("agent_id", agent_id), ("reason", reason)],
        )
    }
}

/// Which process an attack is aimed at.
#[derive(Debug, Clone, Copy)]
pub enum Attacked {
    Server,
    AgentB,
}

/// The value of the series of `name` carrying all `labels` (in any order), 0 if there is none.
pub fn labelled(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
