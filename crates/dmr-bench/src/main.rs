//! `dmr-bench`: the DMR benchmark. Measures the ceilings of this machine in the same run (RabbitMQ
//! driven directly with the server's publish/consume settings; RSA-2048 with the agents' library;
//! the combined ceiling of both, see [`ceilings::Combined`]), then the relay, end-to-end, pair
//! (one sending and one receiving agent, see [`pair`]) and connection-scale scenarios, and prints
//! every figure with its ratio to the relevant ceiling and to the targets of the performance
//! appendix of `docs/compat.md`.
//!
//! `cargo run --release -p dmr-bench -- [--quick] [--json out.json] [--streams N] [--runs N]
//! [--only broker,crypto,relay,e2e,pair,scale]`
//!
//! `--runs N` repeats the selected scenarios N times, then prints the median and min–max of each
//! row's key figures ([`summary`]); the JSON holds every run and the medians.
//!
//! Needs a RabbitMQ on `RABBITMQ_DEFAULT_HOST:RABBITMQ_DEFAULT_PORT` (default 127.0.0.1:5672,
//! guest/guest). Every queue it creates has a fresh name and is deleted at the end.

mod amqp_cost;
mod ceilings;
mod e2e;
mod fixture;
mod measure;
mod pair;
mod relay;
mod scale;
mod summary;

use clap::{Parser, Subcommand};
use measure::Row;
use serde_json::json;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Nanoseconds since the bench started (a clock shared by every part of this process).
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Parser)]
#[command(about = "DMR benchmarks against ceilings measured in the same run")]
struct Args {
    /// Tiny sizes: a smoke run of under a minute.
    #[arg(long)]
    quick: bool,
    /// Also write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Idle agent streams for the connection-scale scenario (default 1000, 100 with --quick).
    #[arg(long)]
    streams: Option<usize>,
    /// Only these scenarios (comma-separated): broker, crypto, relay, e2e, pair, scale.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Repeat the selected scenarios this many times and report the median and min–max.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// The broker engines the server scenarios (relay, e2e, pair) run on, each in turn in every run:
    /// `rabbitmq`, `embedded` or both (`rabbitmq,embedded`); their rows are labelled `[engine]` when
    /// more than one. The ceilings are measured once per run (RabbitMQ's and RSA's).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "rabbitmq")]
    engines: Vec<dmr_server::config::BrokerEngine>,
    /// Where generated agent keys are kept between runs (default: bench-keys beside the target dir).
    #[arg(long)]
    key_cache: Option<PathBuf>,
    #[command(flatten)]
    rabbitmq: dmr_server::config::RabbitConfig,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a DMR server configured from the environment, as `dmr server` does (used by the
    /// connection-scale scenario, which needs the server in a process of its own).
    #[command(hide = true)]
    Server(Box<dmr_server::config::ServerConfig>),
    /// The AMQP side of N agents alone (the server's broker code: queues, one channel and consumer
    /// each), with this process's and RabbitMQ's memory and open files after each phase.
    #[command(hide = true)]
    AmqpCost {
        /// Agents.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    now_ns();
    let rt = fixture::runtime("load")?;
    if let Some(Command::AmqpCost { agents }) = args.command {
        let rabbit = args.rabbitmq.clone();
        return rt.block_on(amqp_cost::run(&rabbit, agents, Duration::from_secs(5)));
    }
    if let Some(Command::Server(cfg)) = args.command {
        return rt.block_on(async move {
            let server = dmr_server::Server::bind(*cfg).await?;
            let stop = tokio_util::sync::CancellationToken::new();
            let s = stop.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                s.cancel();
            });
            server.run(stop).await?;
            Ok(())
        });
    }
    let result = rt.block_on(run(args));
    rt.shutdown_timeout(Duration::from_secs(5));
    result
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let rabbitmq = std::fs::read_dir("/usr/lib/rabbitmq/lib")
        .ok()
        .and_then(|d| {
            d.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("rabbitmq_server-")
                        .map(str::to_owned)
                })
                .next()
        })
        .unwrap_or_else(|| "unknown".into());
    json!({
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": model,
        "memory_kib": std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse::<u64>().ok()),
        "rabbitmq": rabbitmq,
    })
}

struct Target {
    what: &'static str,
    target: String,
    measured: String,
    met: Option<bool>,
}

/// The scenarios `--only` accepts.
const SCENARIOS: [&str; 6] = ["broker", "crypto", "relay", "e2e", "pair", "scale"];

/// What one run of the selected scenarios produced.
struct RunOutput {
    rows: Vec<Row>,
    broker_ceilings: Vec<(usize, f64)>,
    crypto_ceiling: f64,
    combined: Option<ceilings::Combined>,
    targets: Vec<Target>,
}

/// The machine's ceilings measured by the first engine's pass of a run, reused by the others.
struct Ceilings {
    broker: Vec<(usize, f64)>,
    crypto: f64,
    combined: Option<ceilings::Combined>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    if let Some(unknown) = args.only.iter().find(|o| !SCENARIOS.contains(&o.as_str())) {
        anyhow::bail!("--only {unknown}: not a scenario (one of {})", SCENARIOS.join(", "));
    }
    let rabbit = args.rabbitmq.clone();
    let cache = match &args.key_cache {
        Some(c) => c.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .map_or_else(|| PathBuf::from("bench-keys"), |t| t.join("bench-keys")),
    };
    let broker_pid = measure::listener_pid(rabbit.port);
    let machine = machine();
    println!(
        "machine: {} × {}, RabbitMQ {}{}",
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["rabbitmq"].as_str().unwrap_or("?"),
        if broker_pid.is_some() {
            ""
        } else {
            " (its process is not visible: broker CPU not measured)"
        }
    );
    if broker_pid.is_some() {
        println!("CPU s columns: server / agents / harness (load generator, sinks, test AMQP client) / RabbitMQ");
    }
    // An open AMQP connection tells us the negotiated channel limit (the server opens one channel
    // per connected agent, plus one per declaration).
    let probe = tokio::time::timeout(
        Duration::from_secs(15),
        lapin::Connection::connect(&rabbit.uri(), lapin::ConnectionProperties::default()),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "RabbitMQ at {} accepted no AMQP connection within 15 s",
            rabbit.display_addr()
        )
    })?
    .map_err(|e| anyhow::anyhow!("RabbitMQ at {} is not reachable: {e}", rabbit.display_addr()))?;
    let channel_max = probe.configuration().channel_max();
    let _ = probe.close(200, "probe".into()).await;
    println!("RabbitMQ channel_max negotiated by lapin: {channel_max}");

    let mut outputs: Vec<RunOutput> = Vec::new();
    for i in 1..=args.runs {
        if args.runs > 1 {
            println!("\n=== run {i} of {} ===", args.runs);
        }
        let mut out: Option<RunOutput> = None;
        let mut carried: Option<Ceilings> = None;
        for (n, &engine) in args.engines.iter().enumerate() {
            fixture::set_engine(engine);
            if args.engines.len() > 1 {
                println!("\n--- broker engine: {} ---", engine.as_str());
            }
            measure::print_header();
            let mut this = run_once(&args, &rabbit, &cache, broker_pid, carried.as_ref()).await?;
            if n == 0 {
                carried = Some(Ceilings {
                    broker: this.broker_ceilings.clone(),
                    crypto: this.crypto_ceiling,
                    combined: this.combined,
                });
            }
            if args.engines.len() > 1 {
                for row in &mut this.rows {
                    row.scenario = format!("{} [{}]", row.scenario, engine.as_str());
                }
            }
            out = Some(match out {
                None => this,
                Some(mut first) => {
                    first.rows.append(&mut this.rows);
                    first.targets.append(&mut this.targets);
                    first
                }
            });
        }
        let Some(out) = out else {
            anyhow::bail!("--engines: name at least one engine");
        };
        println!("\ntargets (docs/compat.md, performance appendix):");
        for t in &out.targets {
            println!(
                "  {:<58} {:>18}  measured {:<28} {}",
                t.what,
                t.target,
                t.measured,
                match t.met {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "not measured",
                }
            );
        }
        outputs.push(out);
    }
    let all_rows: Vec<Vec<Row>> = outputs.iter().map(|o| o.rows.clone()).collect();
    if args.runs > 1 {
        summary::print(&all_rows);
    }
    println!("finished in {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        let runs: Vec<serde_json::Value> = outputs
            .iter()
            .map(|o| {
                json!({
                    "ceilings": {
                        "broker_msg_per_s": o.broker_ceilings.iter().map(|(q, v)| (format!("{q}q"), json!(v))).collect::<serde_json::Map<_, _>>(),
                        "crypto_msg_per_s": o.crypto_ceiling,
                        "combined": o.combined.map(|c| json!({
                            "msg_per_s": c.msg_per_s(),
                            "beam_only_msg_per_s": c.msg_per_s_beam_only(),
                            "cores": c.cores,
                            "rsa_ms": c.rsa_ms,
                            "rabbit_ms": c.rabbit_ms(),
                            "rabbit_beam_ms": c.rabbit_beam_ms,
                            "rabbit_client_ms": c.rabbit_client_ms,
                        })),
                    },
                    "rows": o.rows,
                    "targets": o.targets.iter().map(|t| json!({"what": t.what, "target": t.target, "measured": t.measured, "met": t.met})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let doc = json!({
            "machine": machine,
            "rabbitmq_channel_max": channel_max,
            "quick": args.quick,
            "runs_requested": args.runs,
            "seconds": started.elapsed().as_secs_f64(),
            "runs": runs,
            "medians": summary::medians_json(&all_rows),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// One run of the selected scenarios; prints its rows as they are measured.
async fn run_once(
    args: &Args,
    rabbit: &dmr_server::config::RabbitConfig,
    cache: &std::path::Path,
    broker_pid: Option<u32>,
    carried: Option<&Ceilings>,
) -> anyhow::Result<RunOutput> {
    let with_ceilings = carried.is_none();
    let quick = args.quick;
    let wants = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    // The ceilings are the machine's (RabbitMQ's, RSA's): measured with the first engine only.
    let wants_ceiling = |s: &str| with_ceilings && wants(s);
    let mut rows: Vec<Row> = Vec::new();
    let pair_counts: Vec<usize> = if quick { vec![1, 4] } else { vec![1, 4, 16] };

    // Ceilings.
    let mut broker_ceilings: Vec<(usize, f64)> = carried.map(|c| c.broker.clone()).unwrap_or_default();
    let mut broker_1q: Option<Row> = None;
    if wants_ceiling("broker") || (with_ceilings && wants("relay")) {
        let n = if quick { 3_000 } else { 40_000 };
        for &q in &pair_counts {
            let row = ceilings::broker(
                rabbit,
                &ceilings::BrokerRun {
                    queues: q,
                    messages: n,
                    rate: None,
                    body_bytes: 1024,
                },
                broker_pid,
            )
            .await?;
            row.print();
            broker_ceilings.push((q, row.msg_per_s));
            if q == 1 {
                broker_1q = Some(row.clone());
            }
            rows.push(row);
        }
        // The floor of latency: the broker alone at a tenth of its ceiling.
        let tenth = (broker_ceilings[0].1 / 10.0).round();
        let mut row = ceilings::broker(
            rabbit,
            &ceilings::BrokerRun {
                queues: 1,
                messages: if quick { 300 } else { (tenth * 5.0) as usize },
                rate: Some(tenth),
                body_bytes: 1024,
            },
            broker_pid,
        )
        .await?;
        row.scenario = "broker 1 q at 10% load".into();
        row.print();
        rows.push(row);
    }
    let mut crypto_ceiling = carried.map_or(f64::NAN, |c| c.crypto);
    let mut combined = carried.and_then(|c| c.combined);
    if wants_ceiling("crypto") || (with_ceilings && wants("e2e")) {
        let c = ceilings::crypto(if quick { 0.3 } else { 2.0 })?;
        crypto_ceiling = c.ceiling();
        let op = |name: &str, threads: usize, ops: ceilings::OpRate, note: &str| Row {
            scenario: format!("crypto {name} ({threads} thr)"),
            load: "max".into(),
            msg_per_s: ops.per_s,
            note: format!("{note}; {:.3} ms CPU each", ops.cpu_ms_per_op),
            extra: [("cpu_ms_per_op".to_owned(), ops.cpu_ms_per_op)].into(),
            ..Row::default()
        };
        let mut ceiling_row = Row {
            scenario: "crypto ceiling (2 thr)".into(),
            load: "max".into(),
            msg_per_s: crypto_ceiling,
            note: format!(
                "msg/s = 1/(1/sign + 1/decrypt): one signature and one decryption per message; {:.3} ms CPU",
                c.rsa_cpu_ms_per_msg()
            ),
            ..Row::default()
        };
        ceiling_row.extra.insert("rsa_cpu_ms".into(), c.rsa_cpu_ms_per_msg());
        for row in [
            op("RS256 sign", 1, c.sign[0], "ops/s, RSA-2048, dmr::keys (aws-lc-rs)"),
            op("RS256 sign", 2, c.sign[1], "ops/s"),
            op("OAEP decrypt", 1, c.decrypt[0], "ops/s"),
            op("OAEP decrypt", 2, c.decrypt[1], "ops/s"),
            ceiling_row,
            op(
                "jose seal+open",
                2,
                c.seal_open,
                "msg/s of complete seal (sign+encrypt) + open (decrypt+verify)",
            ),
        ] {
            row.print();
            rows.push(row);
        }
        // The combined ceiling needs the broker ceiling of this run (and RabbitMQ's CPU time).
        combined = broker_1q.as_ref().and_then(|b| ceilings::Combined::of(&c, b));
        match combined {
            Some(k) => {
                let row = Row {
                    scenario: "combined ceiling RSA+RabbitMQ".into(),
                    load: "max".into(),
                    msg_per_s: k.msg_per_s(),
                    note: "msg/s = cores ÷ CPU ms per message of RSA (sign+decrypt) + RabbitMQ (broker ceiling 1 q)"
                        .into(),
                    extra: [
                        ("cores".to_owned(), k.cores as f64),
                        ("rsa_ms".to_owned(), k.rsa_ms),
                        ("rabbit_ms".to_owned(), k.rabbit_ms()),
                        ("rabbit_beam_ms".to_owned(), k.rabbit_beam_ms),
                        ("rabbit_client_ms".to_owned(), k.rabbit_client_ms),
                        ("beam_only_msg_per_s".to_owned(), k.msg_per_s_beam_only()),
                    ]
                    .into(),
                    ..Row::default()
                };
                row.print();
                summary::print_combined_details(&[&row]);
                rows.push(row);
            }
            None if broker_1q.is_none() => {
                println!("    (combined ceiling: needs the broker ceiling in the same run: add --only broker)");
            }
            None => println!("    (combined ceiling: RabbitMQ's process is not visible, its CPU time is unknown)"),
        }
    }

    // Relay.
    if wants("relay") {
        for &pairs in &pair_counts {
            let ceiling = broker_ceilings
                .iter()
                .find(|(q, _)| *q == pairs)
                .map(|(q, v)| (*v, format!("broker {q} q")));
            let plan = relay::RelayPlan {
                pairs,
                loads: if quick {
                    vec![Some(200.0), None]
                } else {
                    vec![Some(100.0), Some(300.0), Some(1000.0), None]
                },
                seconds: if quick { 1.5 } else { 6.0 },
                window: 1000,
            };
            rows.extend(relay::run(rabbit, &plan, cache, broker_pid, ceiling).await?);
        }
    }

    // End to end.
    let mut tenth_load = f64::NAN;
    if wants("e2e") {
        tenth_load = (crypto_ceiling / 10.0).round();
        let mut loads = if quick {
            vec![e2e::Load::Rate(tenth_load), e2e::Load::Clients(8)]
        } else {
            vec![
                e2e::Load::Rate(50.0),
                e2e::Load::Rate(tenth_load),
                e2e::Load::Rate(150.0),
                e2e::Load::Rate(500.0),
                e2e::Load::Clients(32),
            ]
        };
        loads.dedup_by(|a, b| matches!((a, b), (e2e::Load::Rate(x), e2e::Load::Rate(y)) if x == y));
        let seconds = if quick { 2.0 } else { 8.0 };
        let plan = e2e::E2ePlan {
            pairs: 1,
            loads,
            seconds,
        };
        rows.extend(e2e::run(rabbit, &plan, cache, broker_pid, crypto_ceiling).await?);
        if !quick {
            let plan = e2e::E2ePlan {
                pairs: 4,
                loads: vec![e2e::Load::Clients(32)],
                seconds,
            };
            rows.extend(e2e::run(rabbit, &plan, cache, broker_pid, crypto_ceiling).await?);
        }
    }

    // One sending and one receiving agent: closed loop c=10, c=1, open loop at 10 %.
    if wants("pair") {
        let ceiling = match combined {
            Some(k) => Some(("combined".to_owned(), k.msg_per_s())),
            None if crypto_ceiling.is_finite() => Some(("crypto (2 thr)".to_owned(), crypto_ceiling)),
            None => None,
        };
        let plan = pair::PairPlan {
            seconds: if quick { 3.0 } else { 15.0 },
            drain_limit: Duration::from_secs(60),
        };
        rows.extend(pair::run(rabbit, &plan, cache, broker_pid, ceiling).await?);
    }

    // Connection scale.
    if wants("scale") {
        let streams = args.streams.unwrap_or(if quick { 100 } else { 1000 });
        let settle = Duration::from_secs(if quick { 2 } else { 5 });
        rows.extend(scale::run(rabbit, streams, cache, settle).await?);
    }

    let targets = targets(&rows, tenth_load);
    Ok(RunOutput {
        rows,
        broker_ceilings,
        crypto_ceiling,
        combined,
        targets,
    })
}

/// The performance targets (docs/compat.md appendix), judged on this run's rows.
fn targets(rows: &[Row], tenth_load: f64) -> Vec<Target> {
    let mut out = Vec::new();
    let best_ratio = |prefix: &str| {
        rows.iter()
            .filter(|r| r.scenario.starts_with(prefix) && !r.scenario.contains("REST"))
            .filter_map(|r| Some((r.ratio?, r.msg_per_s, r.scenario.clone())))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    };
    let relay = best_ratio("relay");
    out.push(Target {
        what: "relay throughput vs broker ceiling (best sweep point)",
        target: "≥ 0.70".into(),
        measured: relay
            .as_ref()
            .map_or("-".into(), |(r, v, s)| format!("{r:.2} ({v:.0}/s, {s})")),
        met: relay.map(|(r, _, _)| r >= 0.70),
    });
    let e2e = best_ratio("e2e");
    out.push(Target {
        what: "end-to-end throughput vs crypto ceiling (best)",
        target: "≥ 0.70".into(),
        measured: e2e
            .as_ref()
            .map_or("-".into(), |(r, v, s)| format!("{r:.2} ({v:.0}/s, {s})")),
        met: e2e.map(|(r, _, _)| r >= 0.70),
    });
    let tenth = format!("{tenth_load:.0}/s");
    let at_tenth = rows
        .iter()
        .find(|r| r.scenario == "e2e 1 pair" && r.load == tenth)
        .and_then(|r| r.latency_ms);
    out.push(Target {
        what: "e2e latency at 10% of crypto ceiling, p50",
        target: "≤ 5 ms".into(),
        measured: at_tenth.map_or("-".into(), |l| format!("{:.2} ms at {tenth}", l.p50)),
        met: at_tenth.map(|l| l.p50 <= 5.0),
    });
    out.push(Target {
        what: "e2e latency at 10% of crypto ceiling, p99",
        target: "≤ 15 ms".into(),
        measured: at_tenth.map_or("-".into(), |l| format!("{:.2} ms at {tenth}", l.p99)),
        met: at_tenth.map(|l| l.p99 <= 15.0),
    });
    let rest = rows
        .iter()
        .find(|r| r.scenario == "e2e 1 pair: REST response" && r.load == tenth)
        .and_then(|r| r.latency_ms);
    out.push(Target {
        what: "REST POST /v1/messages p99 at that load",
        target: "≤ 10 ms".into(),
        measured: rest.map_or("-".into(), |l| format!("{:.2} ms", l.p99)),
        met: rest.map(|l| l.p99 <= 10.0),
    });
    let idle = rows.iter().find(|r| r.scenario.starts_with("idle streams"));
    out.push(Target {
        what: "idle streams: server RSS per stream (10,000 streams)",
        target: "≤ 15 KiB".into(),
        measured: idle.map_or("-".into(), |r| {
            format!(
                "{:.1} KiB with {} streams",
                r.extra.get("kib_per_stream").copied().unwrap_or(f64::NAN),
                r.messages
            )
        }),
        met: idle.map(|r| r.extra.get("kib_per_stream").is_some_and(|k| *k <= 15.0) && r.errors == 0),
    });
    let storm = rows.iter().find(|r| r.scenario.starts_with("reconnect storm"));
    out.push(Target {
        what: "reconnect storm: all reconnected",
        target: "≤ 60 s".into(),
        measured: storm.map_or("-".into(), |r| {
            format!(
                "{:.1} s for {} streams",
                r.extra.get("storm_s").copied().unwrap_or(f64::NAN),
                r.messages
            )
        }),
        met: storm.map(|r| r.extra.get("storm_s").is_some_and(|s| *s <= 60.0) && r.errors == 0),
    });
    out
}
