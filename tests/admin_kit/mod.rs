//! The operators' console in the end-to-end tests: a relay whose server has `ADMIN_PORT` on, and a
//! small client of the admin API.

pub mod browser;

use super::support::*;
use serde_json::Value;
use std::net::SocketAddr;

/// The token every console test signs in with (operator "ops-test").
pub const TOKEN: &str = "test-admin-token-0123456789";

/// A relay with the console on, and where it listens.
pub struct AdminRelay {
    pub relay: Relay,
    pub base: String,
    /// The server's token file (`ops-test:<TOKEN>`), which `dmr admin --token-file` reads too.
    pub token_file: std::path::PathBuf,
    /// Holds the token file.
    _dir: tempfile::TempDir,
}

/// A free port on 127.0.0.1 (bound and released: the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a: SocketAddr| a.port())
        .expect("a free port")
}

impl AdminRelay {
    /// A relay (agents A and B connected) with the console on a free port.
    pub async fn start(tune: impl FnOnce(&mut dmr_server::config::ServerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = dir.path().join("admin-tokens");
        std::fs::write(&file, format!("# test operators\nops-test:{TOKEN}\n")).expect("token file");
        let port = free_port();
        let relay = Relay::start_with(|cfg| {
            cfg.admin.admin_port = Some(port);
            cfg.admin.admin_bind_address = Some("127.0.0.1".into());
            cfg.admin.admin_token_file = Some(file.clone());
            tune(cfg);
        })
        .await;
        Self {
            relay,
            base: format!("http://127.0.0.1:{port}"),
            token_file: file,
            _dir: dir,
        }
    }

    /// GET `path` with the token; the status and the JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .relay
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("admin API answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// POST `body` to `path` with the token.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .relay
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .expect("admin API answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The agents table's row of `id`.
    pub async fn agent_row(&self, id: &str) -> Value {
        let (status, view) = self.get("/api/v1/agents").await;
        assert_eq!(status, 200, "{view}");
        view["agents"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["id"] == id))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Sends `n` messages from B to A while A is offline and waits until they expired into A's
    /// dead-letter queue (the relay must have a short `RABBITMQ_DEFAULT_TTL`); returns their ids.
    pub async fn dead_letters_for_a(&mut self, n: usize) -> Vec<String> {
        self.relay.take_a_offline().await;
        let mut ids = Vec::new();
        for _ in 0..n {
            let message = seed_message(&self.relay.a.id);
            let (status, answer) = self.relay.post_to_b(&message).await;
            assert_eq!(status, 200, "{answer}");
            ids.push(message["id"].as_str().unwrap_or_default().to_owned());
        }
        let dlq = format!("{}.dlq", self.relay.a.id);
        let expired = self
            .relay
            .probe
            .wait_queue_len(&dlq, n as u32, std::time::Duration::from_secs(20))
            .await;
        assert_eq!(expired, Some(n as u32), "the messages expired into A's DLQ");
        ids
    }

    /// Stops everything and deletes the queues.
    pub async fn finish(self) {
        self.relay.finish().await;
    }
}

/// Runs `dmr admin --url <console> --token-file <file> <args>`; its exit success, stdout, stderr.
pub async fn dmr_admin(admin: &AdminRelay, token_file: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(processes::dmr_binary())
        .arg("admin")
        .arg("--url")
        .arg(&admin.base)
        .arg("--token-file")
        .arg(token_file)
        .args(args)
        .env("DMR_LOG_FORMAT", "text")
        .output()
        .await
        .expect("dmr admin runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A second server instance on the same broker and directory as `admin`'s relay, with its own
/// console; where that console listens.
pub async fn second_instance(admin: &AdminRelay) -> (RunningServer, String) {
    let relay = &admin.relay;
    let centops = relay.pki.dir.path().join("centops.json");
    let mut cfg = server_config(&relay.pki, &centops, &relay.vf_queue);
    let port = free_port();
    cfg.admin.admin_port = Some(port);
    cfg.admin.admin_bind_address = Some("127.0.0.1".into());
    cfg.admin.admin_token_file = Some(admin.token_file.clone());
    (start_server(cfg).await, format!("http://127.0.0.1:{port}"))
}
