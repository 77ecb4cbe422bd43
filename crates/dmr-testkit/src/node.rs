//! A private RabbitMQ node for tests that stop, restart or break the broker, so the shared broker
//! other tests use in parallel is never disturbed. Its data lives in a temp folder owned by the
//! `rabbitmq` user (Debian's scripts drop to that user); it is stopped and removed on drop, also
//! when the test fails.

use crate::processes::free_port;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A RabbitMQ node of our own on a free port.
pub struct PrivateBroker {
    pub node: String,
    pub port: u16,
    dir: PathBuf,
}

fn rabbitmqctl(node: &str, args: &[&str]) -> std::process::Output {
    Command::new("rabbitmqctl")
        .arg("-n")
        .arg(node)
        .args(args)
        .output()
        .expect("rabbitmqctl is installed (Debian's rabbitmq-server; scripts/ensure-rabbitmq.sh installs it)")
}

impl PrivateBroker {
    pub fn start() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let node = format!("dmrtest{}@localhost", &id[..12]);
        let port = free_port();
        let dist_port = free_port();
        let dir = std::env::temp_dir().join(format!("dmr-rabbit-{}", &id[..12]));
        std::fs::create_dir_all(&dir).expect("node data folder");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .expect("node config");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("node plugins file");
        let chown = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status();
        assert!(
            chown.is_ok_and(|s| s.success()),
            "cannot hand {} to the rabbitmq user (tests run as root)",
            dir.display()
        );
        let broker = Self { node, port, dir };
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &broker.node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", broker.dir.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", broker.dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", broker.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", broker.dir.join("log"))
            .env("RABBITMQ_PID_FILE", broker.dir.join("pid"))
            .status()
            .expect("rabbitmq-server is installed");
        assert!(status.success(), "rabbitmq-server -detached failed for {}", broker.node);
        broker.await_port(Duration::from_secs(90));
        broker
    }

    fn await_port(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        // The node registers with epmd a moment after `-detached` returns: retry until it answers.
        loop {
            let out = rabbitmqctl(&self.node, &["await_startup", "--timeout", "10"]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not boot: {}",
                self.node,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "node {} does not listen on {}",
                self.node,
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the RabbitMQ application (connections drop, the node stays).
    pub fn stop_app(&self) {
        let out = rabbitmqctl(&self.node, &["stop_app"]);
        assert!(
            out.status.success(),
            "stop_app: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts it again and waits until it listens.
    pub fn start_app(&self) {
        let out = rabbitmqctl(&self.node, &["start_app"]);
        assert!(
            out.status.success(),
            "start_app: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.await_port(Duration::from_secs(60));
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&self.node, &["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
