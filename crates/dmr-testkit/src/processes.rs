//! Running the real `dmr` binary as child processes (killed on drop), with logs kept in a file so a
//! failing test can show them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::{Child, Command};

/// The `dmr` binary built next to this test binary (`cargo test --workspace` builds it).
pub fn dmr_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(Path::parent).expect("the target profile dir");
    let bin = dir.join("dmr");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p dmr-cli` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A `dmr` child process.
pub struct DmrProcess {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl DmrProcess {
    pub fn spawn(name: &str, subcommand: &str, env: &[(String, String)], log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("process log file");
        let mut cmd = Command::new(dmr_binary());
        cmd.arg(subcommand)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOGGER_COLORS", "false")
            .env("LOGGER_LOG_LEVELS", "error,warn,log")
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("dmr runs");
        Self {
            name: name.to_owned(),
            log,
            child,
        }
    }

    /// SIGKILL: no chance to clean up.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then waits for the exit; returns how long it took and whether it exited cleanly.
    pub async fn terminate(&mut self) -> (std::time::Duration, bool) {
        let started = std::time::Instant::now();
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        let status = self.child.wait().await;
        (started.elapsed(), status.is_ok_and(|s| s.success()))
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is running")
    }

    /// Still running (not exited, not killed).
    pub fn is_up(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident set size, kB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

/// A free TCP port on loopback.
///
/// Picked at random below Linux's ephemeral range (32768–60999), not by binding port 0: a port the
/// kernel hands out for port 0 is an ephemeral one, which the outgoing connection of some other test
/// may take before the child process binds it (a likely cause of a process that never became ready
/// in a loaded run).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let random = uuid::Uuid::new_v4();
        let port = 20_000 + u16::from_le_bytes([random.as_bytes()[0], random.as_bytes()[1]]) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-31999")
}

/// The environment of a `dmr server` process on `ports` (HTTP, gRPC) with `pki`'s certificates, the
/// directory file `centops`, the broker `rabbit` and its own validation-failures queue `vf_queue`.
pub fn server_env(
    pki: &crate::TestPki,
    centops: &Path,
    ports: (u16, u16),
    rabbit: &dmr_server::config::RabbitConfig,
    vf_queue: &str,
) -> Vec<(String, String)> {
    vec![
        ("PORT".into(), ports.0.to_string()),
        ("GRPC_PORT".into(), ports.1.to_string()),
        ("BIND_ADDRESS".into(), "127.0.0.1".into()),
        ("TLS_CERT_FILE".into(), pki.server_cert.display().to_string()),
        ("TLS_KEY_FILE".into(), pki.server_key.display().to_string()),
        ("TLS_CLIENT_CA_FILE".into(), pki.ca_file.display().to_string()),
        ("CENTOPS_CONFIGURATION_URL".into(), centops.display().to_string()),
        ("RABBITMQ_DEFAULT_HOST".into(), rabbit.host.clone()),
        ("RABBITMQ_DEFAULT_PORT".into(), rabbit.port.to_string()),
        ("RABBITMQ_VALIDATION_FAILURES_QUEUE".into(), vf_queue.to_owned()),
    ]
}

/// The broker settings of a `dmr server` process on the engine the suite runs on
/// ([`crate::test_engine`]): nothing for RabbitMQ (the default), `BROKER=embedded` with its data
/// in `data_dir` for the embedded engine.
pub fn broker_env(data_dir: &Path) -> Vec<(String, String)> {
    match crate::test_engine() {
        dmr_server::config::BrokerEngine::Rabbitmq => Vec::new(),
        dmr_server::config::BrokerEngine::Embedded => vec![
            ("BROKER".into(), "embedded".into()),
            ("EMBEDDED_DATA_DIR".into(), data_dir.display().to_string()),
        ],
    }
}

/// The environment of a `dmr agent` process for `creds` on REST port `port`, connecting to the
/// gRPC addresses `servers` (comma-separated `https://localhost:<port>` URLs) and posting what it
/// receives to `endpoint`.
pub fn agent_env(
    pki: &crate::TestPki,
    creds: &dmr_pki::AgentCredentials,
    port: u16,
    servers: &str,
    endpoint: &str,
) -> Vec<(String, String)> {
    let cert = pki.write(&format!("{}.crt", creds.id), &creds.cert_pem);
    vec![
        ("PORT".into(), port.to_string()),
        ("BIND_ADDRESS".into(), "127.0.0.1".into()),
        ("AGENT_ID".into(), creds.id.clone()),
        ("AGENT_PRIVATE_KEY".into(), creds.key_pem.clone()),
        ("TLS_CERT_FILE".into(), cert.display().to_string()),
        ("TLS_CA_FILE".into(), pki.ca_file.display().to_string()),
        ("DMR_SERVER_GRPC_URL".into(), servers.to_owned()),
        ("OUTGOING_MESSAGE_ENDPOINT".into(), endpoint.to_owned()),
        ("OUTGOING_MESSAGE_TIMEOUT_MS".into(), "1000".into()),
        ("WEBSOCKET_RECONNECTION_DELAY".into(), "200".into()),
        ("WEBSOCKET_RECONNECTION_DELAY_MAX".into(), "1000".into()),
        ("SHUTDOWN_TIMEOUT_MS".into(), "5000".into()),
    ]
}
