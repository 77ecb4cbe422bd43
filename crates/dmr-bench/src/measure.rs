//! What a scenario measures besides its messages: latency percentiles, CPU time split by the
//! component that spent it (threads are named after their runtime: `srv`, `agent-snd`,
//! `agent-rcv`, anything else is the harness), the broker's CPU time, and peak memory; and one row
//! of the results table.

use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (`None` when there are none).
    pub fn of(samples: &mut [Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((samples.len() as f64) * q).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1000.0
        };
        Some(Self {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: at(1.0),
        })
    }
}

/// CPU seconds of the bench process's threads, by thread name, and of the broker.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    threads: HashMap<u32, (String, u64)>,
    process_ns: u64,
    broker_ns: Option<u64>,
}

/// Where the CPU time of one measurement went, in seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuSplit {
    /// The DMR server (its runtime's threads and its AMQP connection's I/O thread).
    pub server: f64,
    /// The in-process agents (end-to-end and pair scenarios): `agent_snd` + `agent_rcv`.
    pub agents: f64,
    /// The sending agents (threads `agent-snd`).
    pub agent_snd: f64,
    /// The receiving agents (threads `agent-rcv`).
    pub agent_rcv: f64,
    /// The load generator, sinks and the harness's own AMQP client.
    pub harness: f64,
    /// RabbitMQ (`beam.smp`).
    pub broker: Option<f64>,
    /// The whole bench process (including threads that ended during the measurement).
    pub process: f64,
}

impl CpuSplit {
    /// Compact form for the table: server/agents/harness/broker.
    pub fn short(&self) -> String {
        let b = self.broker.map_or("?".into(), |b| format!("{b:.1}"));
        format!("{:.1}/{:.1}/{:.1}/{b}", self.server, self.agents, self.harness)
    }
}

fn ticks_to_ns(ticks: u64) -> u64 {
    // USER_HZ is 100 on Linux.
    ticks * 10_000_000
}

/// utime + stime of a `/proc/.../stat` line, in nanoseconds.
fn stat_cpu_ns(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ticks_to_ns(utime + stime))
}

/// CPU time of the calling thread in nanoseconds (`/proc/thread-self/schedstat`; 0 if unreadable).
pub fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time of process `pid` in seconds (NaN if unreadable).
pub fn process_cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_cpu_ns(&s))
        .map_or(f64::NAN, |ns| ns as f64 / 1e9)
}

impl CpuSnapshot {
    /// Reads every thread of this process (schedstat: nanosecond run time) and the broker.
    pub fn take(broker: Option<u32>) -> Self {
        let mut threads = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for entry in dir.flatten() {
                let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
                    continue;
                };
                let path = entry.path();
                let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                let ns = std::fs::read_to_string(path.join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                    .or_else(|| stat_cpu_ns(&std::fs::read_to_string(path.join("stat")).ok()?));
                if let Some(ns) = ns {
                    threads.insert(tid, (comm.trim().to_owned(), ns));
                }
            }
        }
        let process_ns = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| stat_cpu_ns(&s))
            .unwrap_or(0);
        let broker_ns = broker.and_then(|pid| stat_cpu_ns(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?));
        Self {
            threads,
            process_ns,
            broker_ns,
        }
    }

    /// CPU spent since `before`. `lapin_is_server`: the AMQP I/O threads belong to the server
    /// (relay, end-to-end) rather than to the harness (broker ceiling).
    pub fn since(&self, before: &Self, lapin_is_server: bool) -> CpuSplit {
        let mut split = CpuSplit::default();
        for (tid, (comm, ns)) in &self.threads {
            let start = before.threads.get(tid).map_or(0, |(_, n)| *n);
            let secs = ns.saturating_sub(start) as f64 / 1e9;
            match comm.as_str() {
                "srv" => split.server += secs,
                "agent-snd" => split.agent_snd += secs,
                "agent-rcv" => split.agent_rcv += secs,
                "lapin-io-loop" if lapin_is_server => split.server += secs,
                _ => split.harness += secs,
            }
        }
        split.agents = split.agent_snd + split.agent_rcv;
        split.process = self.process_ns.saturating_sub(before.process_ns) as f64 / 1e9;
        split.broker = match (self.broker_ns, before.broker_ns) {
            (Some(a), Some(b)) => Some(a.saturating_sub(b) as f64 / 1e9),
            _ => None,
        };
        split
    }
}

/// The process listening on TCP `port` on this machine (the RabbitMQ node the bench talks to),
/// if it can be seen: found through the listening socket's inode in /proc/net/tcp{,6}.
pub fn listener_pid(port: u16) -> Option<u32> {
    let hex_port = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, rem_address, st (0A = LISTEN), ..., inode at index 9.
            if f.len() > 9 && f[1].ends_with(&hex_port) && f[3] == "0A" {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`); `pid` "self" for this process.
pub fn status_kib(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// Resets this process's peak RSS (VmHWM) so the next reading is the peak of what follows.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One row of the results table (and of the JSON).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    /// Scenario, e.g. "relay 4 pairs".
    pub scenario: String,
    /// Offered load, e.g. "300/s" or "max (window 1000)".
    pub load: String,
    /// Messages (or streams) measured.
    pub messages: usize,
    /// Throughput (or rate) achieved.
    pub msg_per_s: f64,
    /// Latency percentiles (ms), when the scenario has a latency.
    pub latency_ms: Option<Percentiles>,
    /// CPU seconds during the measurement.
    pub cpu_s: Option<CpuSplit>,
    /// Peak RSS (MiB) of the process measured: the bench process (server and agents run inside
    /// it) or, for connection scale, the server process.
    pub peak_rss_mib: Option<f64>,
    /// Which ceiling the ratio is against.
    pub ceiling: Option<String>,
    /// The ceiling's value (msg/s, or the target for connection scale).
    pub ceiling_value: Option<f64>,
    /// msg/s ÷ ceiling (connection scale: measured ÷ target, lower is better).
    pub ratio: Option<f64>,
    /// Failures: refused sends, lost messages, failed connections.
    pub errors: usize,
    /// Anything else worth knowing.
    pub note: String,
    /// Extra figures (e.g. accept latency, per-stream KiB), for the JSON.
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub extra: HashMap<String, f64>,
}

/// Prints the table header.
pub fn print_header() {
    println!(
        "{:<30} {:>14} {:>7} {:>8} {:>8} {:>8} {:>8} {:>22} {:>8} {:>17} {:>6} {:>4}  note",
        "scenario",
        "offered",
        "msgs",
        "msg/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "CPU s srv/agt/hrn/mq",
        "RSS MiB",
        "ceiling",
        "ratio",
        "err"
    );
}

fn num(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".into(),
    }
}

impl Row {
    /// Prints the row.
    pub fn print(&self) {
        let l = self.latency_ms;
        println!(
            "{:<30} {:>14} {:>7} {:>8} {:>8} {:>8} {:>8} {:>22} {:>8} {:>17} {:>6} {:>4}  {}",
            self.scenario,
            self.load,
            self.messages,
            num(Some(self.msg_per_s), 0),
            num(l.map(|l| l.p50), 2),
            num(l.map(|l| l.p95), 2),
            num(l.map(|l| l.p99), 2),
            self.cpu_s.as_ref().map_or("-".into(), CpuSplit::short),
            num(self.peak_rss_mib, 0),
            self.ceiling.clone().unwrap_or_else(|| "-".into()),
            num(self.ratio, 2),
            self.errors,
            self.note
        );
    }
}
