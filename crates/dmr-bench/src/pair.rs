//! Pair scenario: ONE sending and ONE receiving agent (real agents, real crypto, the README-shaped
//! v1 messages of the end-to-end scenario, same server/agent/sink rig) under three loads in a row:
//!
//! 1. closed loop, 10 clients POSTing back to back;
//! 2. closed loop, 1 client;
//! 3. open loop at 10 % of the rate load 1 got accepted (each POST starts on schedule).
//!
//! Each load is offered for the same time (15 s, 3 s with `--quick`). Its **window** runs from the
//! first POST to the instant sending stops (the last POST started before the end has been
//! answered). Per load:
//!
//! - **accepted/s**: 2xx answers ÷ window; non-2xx answers (e.g. 429 when the recipient's queue is
//!   at `MESSAGE_QUEUE_MAX_DEPTH`, 503) and transport errors are counted apart, by status;
//! - **delivered/s**: plaintexts of this load that reached the sink within the window ÷ window,
//!   and **delivered/accepted**;
//! - **backlog**: accepted − delivered at the instant sending stops, and the time the backlog then
//!   takes to reach the sink (waited for up to 60 s; reported as not drained otherwise);
//! - **e2e p50/p99**: POST start → plaintext at the sink, over every message of the load
//!   (including those delivered while the backlog drained, so under a backlog it is queueing
//!   time); **REST p50/p99** over the 2xx answers;
//! - **CPU ms per delivered message** from the first POST until the backlog drained, split into
//!   server (`srv` threads and its AMQP I/O threads), sending agent (`agent-snd`), receiving agent
//!   (`agent-rcv`), harness (HTTP clients, sink) and RabbitMQ (`beam.smp`).
//!
//! Messages of an earlier load still arriving are not counted (the sink filters on the send
//! instant each message carries). The figures are in the row's `extra` map (JSON) and printed as
//! an indented block under the row by [`print_details`].

use crate::e2e::{Clients, Load, Rig, drive, http_client, lock};
use crate::measure::{CpuSnapshot, Percentiles, Row, reset_peak_rss, status_kib};
use crate::summary::{fmt_stat, values};
use dmr_server::config::RabbitConfig;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub const SCENARIO: &str = "pair 1→1";

pub struct PairPlan {
    /// How long each load is offered.
    pub seconds: f64,
    /// How long to wait for a backlog to drain after each load.
    pub drain_limit: Duration,
}

/// Runs the three loads; `ceiling` (name, msg/s) is what the closed-loop c=10 row's delivered
/// rate is compared with.
pub async fn run(
    rabbit: &RabbitConfig,
    plan: &PairPlan,
    cache: &Path,
    broker_pid: Option<u32>,
    ceiling: Option<(String, f64)>,
) -> anyhow::Result<Vec<Row>> {
    let rig = Rig::start(rabbit, 1, cache).await?;
    let result = sweep(&rig, plan, broker_pid, ceiling).await;
    rig.stop(rabbit).await?;
    result
}

async fn sweep(
    rig: &Rig,
    plan: &PairPlan,
    broker_pid: Option<u32>,
    ceiling: Option<(String, f64)>,
) -> anyhow::Result<Vec<Row>> {
    let http = http_client()?;
    // Warm-up: connections, first RSA operations; not reported.
    one_load(&http, rig, Load::Clients(4), 0.5, broker_pid, plan.drain_limit).await;
    let mut rows = Vec::new();
    let mut c10 = one_load(
        &http,
        rig,
        Load::Clients(10),
        plan.seconds,
        broker_pid,
        plan.drain_limit,
    )
    .await;
    if let Some((name, value)) = &ceiling {
        c10.ceiling = Some(name.clone());
        c10.ceiling_value = Some(*value);
        c10.ratio = Some(c10.msg_per_s / value);
    }
    let tenth = (c10.extra.get("accepted_per_s").copied().unwrap_or(0.0) / 10.0).max(1.0);
    show(&c10);
    rows.push(c10);
    let c1 = one_load(&http, rig, Load::Clients(1), plan.seconds, broker_pid, plan.drain_limit).await;
    show(&c1);
    rows.push(c1);
    let open = one_load(
        &http,
        rig,
        Load::Rate(tenth),
        plan.seconds,
        broker_pid,
        plan.drain_limit,
    )
    .await;
    show(&open);
    rows.push(open);
    Ok(rows)
}

fn show(row: &Row) {
    row.print();
    print_details(&[row]);
}

async fn one_load(
    http: &reqwest::Client,
    rig: &Rig,
    load: Load,
    seconds: f64,
    broker_pid: Option<u32>,
    drain_limit: Duration,
) -> Row {
    let sink = &rig.sink;
    sink.reset();
    let clients = Arc::new(Clients::default());
    reset_peak_rss();
    let cpu0 = CpuSnapshot::take(broker_pid);
    let t0 = Instant::now();
    drive(http, &rig.targets, &clients, load, t0, seconds).await;
    let stopped = Instant::now();
    let delivered_in_window = sink.received.load(Ordering::SeqCst);
    let accepted = clients.accepted.load(Ordering::SeqCst);
    let refused = clients.refused.load(Ordering::SeqCst);
    let window = stopped.duration_since(t0).as_secs_f64().max(1e-9);
    let backlog = accepted.saturating_sub(delivered_in_window);
    let deadline = stopped + drain_limit;
    while sink.received.load(Ordering::SeqCst) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = CpuSnapshot::take(broker_pid).since(&cpu0, true);
    let received = sink.received.load(Ordering::SeqCst);
    let drained = received >= accepted;
    let drain_s = match (backlog, drained) {
        (0, _) => 0.0,
        (_, true) => lock(&sink.last).map_or(0.0, |last| last.saturating_duration_since(stopped).as_secs_f64()),
        (_, false) => f64::NAN,
    };
    let latency = Percentiles::of(&mut std::mem::take(&mut *lock(&sink.latencies)));
    let rest = Percentiles::of(&mut std::mem::take(&mut *lock(&clients.accepted_rest)));
    let per_msg = |s: f64| s * 1000.0 / received.max(1) as f64;
    let mut extra = std::collections::HashMap::new();
    let mut put = |k: &str, v: f64| {
        extra.insert(k.to_owned(), v);
    };
    let label = match load {
        Load::Clients(n) => {
            put("clients", n as f64);
            format!("closed c={n}")
        }
        Load::Rate(r) => {
            put("offered_per_s", r);
            format!("open {r:.0}/s (10%)")
        }
    };
    put("window_s", window);
    put("accepted", accepted as f64);
    put("accepted_per_s", accepted as f64 / window);
    put("delivered_in_window", delivered_in_window as f64);
    put("delivered_per_s", delivered_in_window as f64 / window);
    put(
        "delivered_ratio",
        if accepted == 0 {
            f64::NAN
        } else {
            delivered_in_window as f64 / accepted as f64
        },
    );
    put("backlog_at_stop", backlog as f64);
    put("drain_s", drain_s);
    put("drained", if drained { 1.0 } else { 0.0 });
    put("undelivered", accepted.saturating_sub(received) as f64);
    put("stale_deliveries", sink.stale.load(Ordering::SeqCst) as f64);
    put("non_2xx", refused as f64);
    for (code, n) in lock(&clients.refusals).iter() {
        put(&format!("non_2xx_{code}"), *n as f64);
    }
    if let Some(l) = latency {
        put("e2e_p50_ms", l.p50);
        put("e2e_p99_ms", l.p99);
    }
    if let Some(r) = rest {
        put("rest_p50_ms", r.p50);
        put("rest_p99_ms", r.p99);
    }
    put("cpu_ms_server", per_msg(cpu.server));
    put("cpu_ms_agent_snd", per_msg(cpu.agent_snd));
    put("cpu_ms_agent_rcv", per_msg(cpu.agent_rcv));
    put("cpu_ms_harness", per_msg(cpu.harness));
    if let Some(b) = cpu.broker {
        put("cpu_ms_rabbitmq", per_msg(b));
    }
    put(
        "cpu_ms_total",
        per_msg(cpu.server + cpu.agents + cpu.harness + cpu.broker.unwrap_or(0.0)),
    );
    let refusals = clients.refusals_text();
    Row {
        scenario: SCENARIO.into(),
        load: label,
        messages: received,
        msg_per_s: delivered_in_window as f64 / window,
        latency_ms: latency,
        cpu_s: Some(cpu),
        peak_rss_mib: Some(status_kib("self", "VmHWM") / 1024.0),
        errors: refused + accepted.saturating_sub(received),
        note: if refusals.is_empty() {
            "msg/s = delivered in the window; details below".into()
        } else {
            format!(
                "non-2xx {refusals}, first: {}",
                lock(&clients.first_refusal).clone().unwrap_or_default()
            )
        },
        extra,
        ..Row::default()
    }
}

/// Prints the pair figures of one row, or the median (min–max) over the runs of the same row.
pub fn print_details(rows: &[&Row]) {
    let f = |key: &str, decimals: usize| fmt_stat(&values(rows, |r| r.extra.get(key).copied()), decimals);
    let not_drained = rows
        .iter()
        .filter(|r| r.extra.get("drained").is_some_and(|d| *d == 0.0))
        .count();
    let drain = if not_drained == 0 {
        format!("drained in {} s", f("drain_s", 3))
    } else if rows.len() == 1 {
        format!("NOT drained within the wait ({} left)", f("undelivered", 0))
    } else {
        format!(
            "NOT drained in {not_drained} of {} runs; drained in {} s otherwise",
            rows.len(),
            f("drain_s", 3)
        )
    };
    println!(
        "    accepted {}/s · delivered {}/s · delivered/accepted {} · non-2xx {}",
        f("accepted_per_s", 0),
        f("delivered_per_s", 0),
        f("delivered_ratio", 2),
        f("non_2xx", 0),
    );
    println!(
        "    e2e p50 {} / p99 {} ms · REST p50 {} / p99 {} ms · backlog at stop {}, {drain}",
        f("e2e_p50_ms", 2),
        f("e2e_p99_ms", 2),
        f("rest_p50_ms", 2),
        f("rest_p99_ms", 2),
        f("backlog_at_stop", 0),
    );
    println!(
        "    CPU ms/msg: server {} · agent-snd {} · agent-rcv {} · harness {} · RabbitMQ {} · total {}",
        f("cpu_ms_server", 3),
        f("cpu_ms_agent_snd", 3),
        f("cpu_ms_agent_rcv", 3),
        f("cpu_ms_harness", 3),
        f("cpu_ms_rabbitmq", 3),
        f("cpu_ms_total", 3),
    );
}
