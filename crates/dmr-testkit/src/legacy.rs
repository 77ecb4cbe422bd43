//! An original-style legacy agent: `tests/node/legacy-agent.mjs` on the real `socket.io-client@4`
//! and `jose` (Node), driven through the JSON events it prints. Killed when dropped.

use dmr_pki::AgentCredentials;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

pub struct LegacyAgent {
    pub id: String,
    pub port: u16,
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
    /// Events read while waiting for another one, in order.
    pub events: Vec<Value>,
}

impl LegacyAgent {
    /// Starts it against the Socket.IO edge on `server_http`; `knobs` are extra environment
    /// variables of the script. Returns once it listens.
    pub async fn spawn(
        server_http: SocketAddr,
        creds: &AgentCredentials,
        endpoint: &str,
        knobs: &[(&str, &str)],
    ) -> Self {
        let dir = crate::workspace_root().join("tests/node");
        assert!(
            dir.join("node_modules/socket.io-client").exists(),
            "tests/node/node_modules is missing: run `npm install --prefix tests/node` (the test command in the README does this)"
        );
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(dir.join("legacy-agent.mjs"))
            .env("DMR_SERVER_WEBSOCKET_URL", format!("http://{server_http}"))
            .env("AGENT_ID", &creds.id)
            .env("AGENT_PRIVATE_KEY", &creds.key_pem)
            .env("OUTGOING_MESSAGE_ENDPOINT", endpoint)
            .env("PORT", "0")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in knobs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("node runs");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt as _;
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let mut agent = Self {
            id: creds.id.clone(),
            port: 0,
            child,
            lines,
            events: Vec::new(),
        };
        let listening = agent
            .wait_event("listening", Duration::from_secs(20))
            .await
            .expect("legacy agent starts");
        agent.port = listening["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .expect("its port");
        agent
    }

    /// The next event named `name` (not seen before), waiting up to `timeout`.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Option<Value> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Some(self.events.remove(i));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(e)) if e["event"] == name => return Some(e),
                Ok(Some(e)) => self.events.push(e),
                _ => return None,
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}
