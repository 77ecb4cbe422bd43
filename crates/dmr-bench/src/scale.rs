//! Connection scale: N idle mTLS agent sessions against one server running as its own process
//! (this binary's hidden `server` subcommand, i.e. `dmr_server::Server` exactly as `dmr server`
//! runs it, without logging), so that its memory can be read from /proc. Then a reconnect storm:
//! every session dropped at once, and all reconnecting at once.
//!
//! Two hidden knobs, for working on the server's memory (see `docs/idle-memory.md`):
//! - `DMR_BENCH_SERVER_WRAPPER`: a command prefix for the server process, split at whitespace, e.g.
//!   `env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2` or `heaptrack -o /tmp/srv`. The
//!   server's own pid is then found by its gRPC listening socket, and it is killed with SIGKILL at
//!   the end (a heap profiler then reports what was live at that moment as "leaked").
//! - `DMR_BENCH_SCALE_IDLE_ONLY=1`: stop after the idle measurement (no reconnect storm), killing
//!   the server while every stream is still open.

use crate::fixture::{centops_file, delete_queues};
use crate::measure::{Row, process_cpu_seconds, status_kib};
use dmr_server::config::RabbitConfig;
use dmr_testkit::TestPki;
use dmr_testkit::session::{RawSession, open_session};
use futures::StreamExt as _;
use rand::Rng as _;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Raises this process's open-file limit to what `streams` connections need (the child server
/// inherits it). Fails with a clear message if the hard limit is too low.
pub fn ensure_fd_limit(streams: usize) -> anyhow::Result<u64> {
    let wanted = streams as u64 + 1024;
    let got = rlimit::increase_nofile_limit(wanted)?;
    anyhow::ensure!(
        got >= wanted,
        "{streams} streams need {wanted} open files but the hard limit is {got}: raise it (ulimit -Hn) or use --streams"
    );
    Ok(got)
}

struct Child {
    process: tokio::process::Child,
    /// The server's own pid (with a wrapper, not the wrapper's).
    pid: u32,
    http: u16,
    grpc: u16,
    wrapped: bool,
}

impl Child {
    /// Kills the server (and a wrapper around it).
    async fn kill(&mut self) {
        if self.wrapped {
            let _ = tokio::process::Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status()
                .await;
            // Let a wrapper (a profiler) finish writing what it recorded.
            let _ = tokio::time::timeout(Duration::from_secs(600), self.process.wait()).await;
        }
        let _ = self.process.kill().await;
    }
}

/// `DMR_BENCH_SERVER_WRAPPER`, split at whitespace (empty: none).
fn server_wrapper() -> Vec<String> {
    std::env::var("DMR_BENCH_SERVER_WRAPPER")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `DMR_BENCH_SCALE_IDLE_ONLY` is set (to anything but 0 or empty).
fn idle_only() -> bool {
    std::env::var("DMR_BENCH_SCALE_IDLE_ONLY").is_ok_and(|v| !v.is_empty() && v != "0")
}

async fn spawn_server(
    pki: &TestPki,
    centops: &Path,
    grpc: u16,
    vf: &str,
    rabbit: &RabbitConfig,
) -> anyhow::Result<Child> {
    let http = free_port()?;
    let wrapper = server_wrapper();
    let exe = std::env::current_exe()?;
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => tokio::process::Command::new(&exe),
    };
    let process = command
        .arg("server")
        .env("PORT", http.to_string())
        .env("GRPC_PORT", grpc.to_string())
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("TLS_CERT_FILE", &pki.server_cert)
        .env("TLS_KEY_FILE", &pki.server_key)
        .env("TLS_CLIENT_CA_FILE", &pki.ca_file)
        .env("CENTOPS_CONFIGURATION_URL", centops)
        .env("RABBITMQ_DEFAULT_HOST", &rabbit.host)
        .env("RABBITMQ_DEFAULT_PORT", rabbit.port.to_string())
        .env("RABBITMQ_DEFAULT_USER", &rabbit.user)
        .env("RABBITMQ_DEFAULT_PASS", &rabbit.pass)
        .env("RABBITMQ_DEFAULT_VHOST", &rabbit.vhost)
        .env("RABBITMQ_VALIDATION_FAILURES_QUEUE", vf)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = process
        .id()
        .ok_or_else(|| anyhow::anyhow!("server process exited at once"))?;
    Ok(Child {
        process,
        pid,
        http,
        grpc,
        wrapped: !wrapper.is_empty(),
    })
}

/// `dmr_socket_connections_active` from the server's `/metrics`.
async fn active_sessions(http: &reqwest::Client, port: u16) -> Option<usize> {
    let text = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("dmr_socket_connections_active "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as usize)
}

async fn wait_active(http: &reqwest::Client, port: u16, want: usize, timeout: Duration) -> (bool, Duration) {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if active_sessions(http, port).await == Some(want) {
            return (true, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (false, started.elapsed())
}

/// How many of a sample of the agents' queues have a consumer (each open session should). With
/// the embedded engine (`BROKER=embedded` in this process's environment, which the server inherits)
/// the queues live in the server: a session is counted as consuming once its delivery loop reported
/// its queue (`dmr_agent_queue_messages{agent_id}` on the server's `/metrics`).
async fn consumers_attached(
    uri: &str,
    agents: &[dmr_pki::AgentCredentials],
    sample: usize,
    http_port: u16,
) -> anyhow::Result<(usize, usize)> {
    let step = (agents.len() / sample.max(1)).max(1);
    if std::env::var("BROKER").as_deref() == Ok("embedded") {
        let metrics = reqwest::get(format!("http://127.0.0.1:{http_port}/metrics"))
            .await?
            .text()
            .await?;
        let (mut checked, mut attached) = (0, 0);
        for a in agents.iter().step_by(step) {
            let series = format!("dmr_agent_queue_messages{{agent_id=\"{}\"}}", a.id);
            attached += usize::from(metrics.lines().any(|l| l.starts_with(&series)));
            checked += 1;
        }
        return Ok((checked, attached));
    }
    let conn = lapin::Connection::connect(uri, lapin::ConnectionProperties::default()).await?;
    let (mut checked, mut attached) = (0, 0);
    for a in agents.iter().step_by(step) {
        let ch = conn.create_channel().await?;
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if let Ok(q) = ch
            .queue_declare(a.id.as_str().into(), passive, lapin::types::FieldTable::default())
            .await
        {
            attached += usize::from(q.consumer_count() > 0);
        }
        checked += 1;
        let _ = ch.close(200, "probe".into()).await;
    }
    let _ = conn.close(200, "probe".into()).await;
    Ok((checked, attached))
}

/// Connects every agent, each retrying after a failure (with the agents' jittered 0.5–1 s
/// backoff) until `deadline`; returns the sessions, how long the last one took, and how many
/// attempts failed.
async fn connect_all(
    ca: &str,
    agents: &[dmr_pki::AgentCredentials],
    grpc: SocketAddr,
    concurrency: usize,
    deadline: Duration,
) -> (Vec<RawSession>, Duration, usize, Option<String>) {
    let started = Instant::now();
    let results: Vec<(Option<RawSession>, usize, Option<String>)> = futures::stream::iter(agents)
        .map(|a| async move {
            let (mut failures, mut first_error) = (0usize, None);
            loop {
                match open_session(ca, a, grpc).await {
                    Ok(s) => return (Some(s), failures, first_error),
                    Err(e) => {
                        failures += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                        if started.elapsed() > deadline {
                            return (None, failures, first_error);
                        }
                        let pause = rand::rng().random_range(500..=1000);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let failures = results.iter().map(|r| r.1).sum();
    let first_error = results.iter().find_map(|r| r.2.clone());
    let sessions = results.into_iter().filter_map(|r| r.0).collect();
    (sessions, elapsed, failures, first_error)
}

pub async fn run(rabbit: &RabbitConfig, streams: usize, cache: &Path, settle: Duration) -> anyhow::Result<Vec<Row>> {
    let limit = ensure_fd_limit(streams)?;
    let pki = TestPki::try_new()?;
    let t = Instant::now();
    let agents = pki.agents_with_cached_keys(streams, cache)?;
    eprintln!(
        "scale: {streams} agents' credentials ready in {:.1} s (open-file limit {limit})",
        t.elapsed().as_secs_f64()
    );
    let centops = centops_file(&pki, &agents)?;
    let vf = format!("validation-failures-bench-{}", uuid::Uuid::new_v4());
    let grpc_port = free_port()?;
    let grpc: SocketAddr = format!("127.0.0.1:{grpc_port}").parse()?;
    let mut child = spawn_server(&pki, &centops, grpc_port, &vf, rabbit).await?;
    let result = measure(&pki, &agents, &mut child, grpc, settle, &rabbit.uri()).await;
    child.kill().await;
    let deleted = delete_queues(&rabbit.uri(), &agents, &[vf]).await?;
    eprintln!("scale: deleted {deleted} queues");
    result
}

async fn measure(
    pki: &TestPki,
    agents: &[dmr_pki::AgentCredentials],
    child: &mut Child,
    grpc: SocketAddr,
    settle: Duration,
    uri: &str,
) -> anyhow::Result<Vec<Row>> {
    let n = agents.len();
    let http = reqwest::Client::new();
    let booting = Instant::now();
    let ready_url = format!("http://127.0.0.1:{}/ready", child.http);
    loop {
        if http.get(&ready_url).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        if let Some(status) = child.process.try_wait()? {
            anyhow::bail!("the server process exited: {status}");
        }
        anyhow::ensure!(
            booting.elapsed() < Duration::from_secs(900),
            "the server was not ready within 900 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready_secs = booting.elapsed().as_secs_f64();
    if child.wrapped {
        child.pid = crate::measure::listener_pid(child.grpc)
            .ok_or_else(|| anyhow::anyhow!("no process listens on the server's gRPC port"))?;
    }
    eprintln!(
        "scale: server ready after {ready_secs:.1} s ({} queues declared)",
        2 * n
    );
    let pid = child.pid.to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss0 = status_kib(&pid, "VmRSS");
    let cpu0 = process_cpu_seconds(child.pid);
    let ca = pki.ca.cert_pem();

    // Ramp: connect everyone, 256 handshakes at a time.
    let (sessions, connect_time, connect_failures, connect_error) =
        connect_all(ca, agents, grpc, 256, Duration::from_secs(120)).await;
    let connected = sessions.len();
    let (all_seen, _) = wait_active(&http, child.http, connected, Duration::from_secs(60)).await;
    let cpu_connect = process_cpu_seconds(child.pid) - cpu0;
    tokio::time::sleep(settle).await;
    let rss1 = status_kib(&pid, "VmRSS");
    let per_stream = (rss1 - rss0) / connected.max(1) as f64;
    let idle_cpu0 = process_cpu_seconds(child.pid);
    let idle_window = settle.max(Duration::from_secs(2));
    tokio::time::sleep(idle_window).await;
    let idle_cpu = (process_cpu_seconds(child.pid) - idle_cpu0) / idle_window.as_secs_f64();
    let (checked, attached) = consumers_attached(uri, agents, 100, child.http).await?;
    eprintln!(
        "scale: {connected}/{n} sessions in {:.1} s, server RSS {:.0} → {:.0} MiB ({per_stream:.1} KiB/stream), {attached}/{checked} sampled queues have a consumer",
        connect_time.as_secs_f64(),
        rss0 / 1024.0,
        rss1 / 1024.0
    );
    let idle = Row {
        scenario: format!("idle streams ({n})"),
        load: "256 at a time".into(),
        messages: connected,
        msg_per_s: connected as f64 / connect_time.as_secs_f64().max(1e-9),
        cpu_s: Some(crate::measure::CpuSplit {
            server: cpu_connect,
            process: cpu_connect,
            ..Default::default()
        }),
        peak_rss_mib: Some(status_kib(&pid, "VmHWM") / 1024.0),
        ceiling: Some("15 KiB/stream".into()),
        ceiling_value: Some(15.0),
        ratio: Some(per_stream / 15.0),
        errors: n - connected,
        note: format!(
            "server RSS {per_stream:.1} KiB/stream ({:.0}→{:.0} MiB); msg/s = sessions/s; ready after {ready_secs:.1} s; idle CPU {:.1}%; consumers on {attached}/{checked} sampled queues{}{}",
            rss0 / 1024.0,
            rss1 / 1024.0,
            idle_cpu * 100.0,
            if all_seen {
                ""
            } else {
                "; server never counted them all"
            },
            connect_error.map_or(String::new(), |e| format!(
                "; {connect_failures} failed attempts, first: {e}"
            ))
        ),
        extra: HashMap::from([
            ("kib_per_stream".into(), per_stream),
            ("rss_before_mib".into(), rss0 / 1024.0),
            ("rss_after_mib".into(), rss1 / 1024.0),
            ("ready_s".into(), ready_secs),
            ("idle_cpu_fraction".into(), idle_cpu),
            ("consumers_sampled".into(), checked as f64),
            ("consumers_attached".into(), attached as f64),
        ]),
        ..Row::default()
    };
    idle.print();
    if idle_only() {
        return Ok(vec![idle]);
    }

    // Storm: drop every session at once, wait for the server to notice, reconnect all at once.
    drop(sessions);
    let (drained, drain_time) = wait_active(&http, child.http, 0, Duration::from_secs(120)).await;
    // What the server keeps once every session is gone (allocator retention, caches).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_drained = status_kib(&pid, "VmRSS");
    let cpu1 = process_cpu_seconds(child.pid);
    let (sessions, storm_time, storm_failures, storm_error) =
        connect_all(ca, agents, grpc, n, Duration::from_secs(120)).await;
    let reconnected = sessions.len();
    let (server_saw_all, server_extra) = wait_active(&http, child.http, reconnected, Duration::from_secs(60)).await;
    let storm_cpu = process_cpu_seconds(child.pid) - cpu1;
    tokio::time::sleep(settle).await;
    let (checked2, attached2) = consumers_attached(uri, agents, 100, child.http).await?;
    let storm_secs = storm_time.as_secs_f64()
        + if server_saw_all {
            server_extra.as_secs_f64()
        } else {
            0.0
        };
    let storm = Row {
        scenario: format!("reconnect storm ({n})"),
        load: "all at once".into(),
        messages: reconnected,
        msg_per_s: reconnected as f64 / storm_secs.max(1e-9),
        cpu_s: Some(crate::measure::CpuSplit {
            server: storm_cpu,
            process: storm_cpu,
            ..Default::default()
        }),
        peak_rss_mib: Some(status_kib(&pid, "VmHWM") / 1024.0),
        ceiling: Some("60 s".into()),
        ceiling_value: Some(60.0),
        ratio: Some(storm_secs / 60.0),
        errors: n - reconnected,
        note: format!(
            "all back in {storm_secs:.1} s (server-side count{}); {storm_failures} failed attempts{}; old sessions gone after {:.1} s{}, server RSS then {:.0} MiB; consumers on {attached2}/{checked2} sampled queues",
            if server_saw_all { " reached" } else { " NOT reached" },
            storm_error.map_or(String::new(), |e| format!(" (first: {e})")),
            drain_time.as_secs_f64(),
            if drained { "" } else { " (not all)" },
            rss_drained / 1024.0,
        ),
        extra: HashMap::from([
            ("storm_s".into(), storm_secs),
            ("failed_attempts".into(), storm_failures as f64),
            ("disconnect_drain_s".into(), drain_time.as_secs_f64()),
            ("rss_drained_mib".into(), rss_drained / 1024.0),
            ("consumers_sampled".into(), checked2 as f64),
            ("consumers_attached".into(), attached2 as f64),
        ]),
        ..Row::default()
    };
    storm.print();
    drop(sessions);
    Ok(vec![idle, storm])
}
