//! What one agent costs on the AMQP side, apart from its gRPC stream: the hidden `amqp-cost`
//! subcommand runs the server's own broker code (`dmr_server::broker::Broker`: its queue
//! declarations and its `consume`, one channel and consumer per agent on the pooled consumer
//! connections) for N agents, without any gRPC, and reads this process's RSS and RabbitMQ's RSS
//! and open files after each phase (see `docs/idle-memory.md`).

use crate::measure::{listener_pid, status_kib};
use dmr_server::broker::{Broker, RemoteSessionHook, TopologySource};
use dmr_server::config::{BrokerConfig, RabbitConfig};
use dmr_server::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One reading of both processes.
struct Reading {
    client_kib: f64,
    broker_kib: f64,
    broker_fds: usize,
}

fn read(broker: Option<u32>) -> Reading {
    let broker_pid = broker.map(|p| p.to_string()).unwrap_or_default();
    Reading {
        client_kib: status_kib("self", "VmRSS"),
        broker_kib: status_kib(&broker_pid, "VmRSS"),
        broker_fds: std::fs::read_dir(format!("/proc/{broker_pid}/fd")).map_or(0, |d| d.count()),
    }
}

fn report(phase: &str, r: &Reading, base: &Reading, per: usize) {
    let per = per.max(1) as f64;
    println!(
        "amqp-cost: {phase:<34} client RSS {:>7.1} MiB ({:+6.1} KiB/agent)   RabbitMQ RSS {:>7.1} MiB ({:+6.1} KiB/agent), open files {:>6} ({:+.2}/agent)",
        r.client_kib / 1024.0,
        (r.client_kib - base.client_kib) / per,
        r.broker_kib / 1024.0,
        (r.broker_kib - base.broker_kib) / per,
        r.broker_fds,
        (r.broker_fds as f64 - base.broker_fds as f64) / per,
    );
}

/// Declares `agents` agents' queues with the server's broker code, consumes each once, and
/// reports the cost per agent of each phase; deletes every queue it declared.
pub async fn run(rabbit: &RabbitConfig, agents: usize, settle: Duration) -> anyhow::Result<()> {
    let ids: Vec<String> = (0..agents).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let mut cfg = rabbit.clone();
    cfg.validation_failures_queue = format!("validation-failures-bench-{}", uuid::Uuid::new_v4());
    let broker_pid = listener_pid(cfg.port);
    let base = read(broker_pid);
    report("before", &base, &base, agents);

    let broker = Broker::new(&BrokerConfig::default(), cfg.clone(), Arc::new(Metrics::new()))?;
    let topology: TopologySource = {
        let ids = ids.clone();
        Arc::new(move || ids.clone())
    };
    let hook: RemoteSessionHook = Arc::new(|_: &str, _| {});
    let stop = CancellationToken::new();
    let task = tokio::spawn(broker.clone().run(topology, hook, stop.clone()));
    let started = Instant::now();
    while !broker.is_ready() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the broker code did not declare {agents} agents' queues within 30 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "amqp-cost: {} quorum queues declared in {:.1} s",
        2 * agents,
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(settle).await;
    let declared = read(broker_pid);
    report("queues declared (2 per agent)", &declared, &base, agents);

    let result = consume_all(&broker, &ids, broker_pid, &declared, settle).await;

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    let names: Vec<String> = ids
        .iter()
        .flat_map(|id| [id.clone(), format!("{id}.dlq")])
        .chain([cfg.validation_failures_queue.clone()])
        .collect();
    let deleted = dmr_testkit::delete_queues(&cfg.uri(), names).await?;
    println!("amqp-cost: deleted {deleted} queues");
    result
}

async fn consume_all(
    broker: &Broker,
    ids: &[String],
    broker_pid: Option<u32>,
    declared: &Reading,
    settle: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut consumers = Vec::with_capacity(ids.len());
    for id in ids {
        let tag = format!("dmr-{id}-{}", uuid::Uuid::new_v4());
        consumers.push(broker.consume(id, &tag).await?);
    }
    println!(
        "amqp-cost: {} consumers on {} connections in {:.1} s",
        consumers.len(),
        broker.consumer_connections().await,
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(settle).await;
    let consuming = read(broker_pid);
    report("one channel + consumer per agent", &consuming, declared, ids.len());
    for c in consumers.drain(..) {
        c.close().await;
    }
    tokio::time::sleep(settle).await;
    let closed = read(broker_pid);
    report("consumers closed again", &closed, declared, ids.len());
    Ok(())
}
