//! The in-run ceilings: RabbitMQ driven directly with the server's settings, and the RSA
//! private-key operations of the library the agents use.

use crate::measure::{CpuSnapshot, Percentiles, Row, reset_peak_rss, status_kib, thread_cpu_ns};
use crate::now_ns;
use dmr_server::config::RabbitConfig;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Publish confirms awaited at once, as the server allows per agent stream by default (`LIMIT_SENDS_IN_FLIGHT`).
pub const CONFIRM_WINDOW: usize = 256;

/// The arguments `Broker::declare_agent` gives an agent queue and its DLQ.
fn agent_queue_args(cfg: &RabbitConfig, name: &str) -> (FieldTable, FieldTable) {
    let plain = |ttl: u32| {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        args.insert("x-message-ttl".into(), AMQPValue::LongUInt(ttl));
        args
    };
    let dlq = plain(cfg.dlq_ttl_ms);
    let mut main = plain(cfg.ttl_ms);
    main.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    main.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(format!("{name}.dlq").as_str().into()),
    );
    (main, dlq)
}

/// What to run against the broker.
pub struct BrokerRun {
    pub queues: usize,
    pub messages: usize,
    /// Messages per second in total; `None` = as fast as confirms allow.
    pub rate: Option<f64>,
    pub body_bytes: usize,
}

/// Persistent (delivery mode 2), mandatory, publisher-confirmed publishes with
/// [`CONFIRM_WINDOW`] confirms in flight on one channel, round-robin over `queues` quorum queues
/// declared like the server's, each consumed on its own channel of the same connection with
/// manual acks and the server's prefetch — what the server does, minus the server.
pub async fn broker(cfg: &RabbitConfig, run: &BrokerRun, broker_pid: Option<u32>) -> anyhow::Result<Row> {
    let conn = Connection::connect(&cfg.uri(), ConnectionProperties::default()).await?;
    let names: Vec<String> = (0..run.queues)
        .map(|_| format!("dmr-bench-{}", uuid::Uuid::new_v4()))
        .collect();
    for name in &names {
        let ch = conn.create_channel().await?;
        let (main, dlq) = agent_queue_args(cfg, name);
        ch.queue_declare(
            format!("{name}.dlq").as_str().into(),
            QueueDeclareOptions::durable(),
            dlq,
        )
        .await?;
        ch.queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), main)
            .await?;
        let _ = ch.close(200, "declared".into()).await;
    }
    let result = broker_inner(&conn, cfg, run, &names, broker_pid).await;
    let ch = conn.create_channel().await?;
    for name in &names {
        let _ = ch
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = ch
            .queue_delete(format!("{name}.dlq").as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bench done".into()).await;
    result
}

async fn broker_inner(
    conn: &Connection,
    cfg: &RabbitConfig,
    run: &BrokerRun,
    names: &[String],
    broker_pid: Option<u32>,
) -> anyhow::Result<Row> {
    let per_queue: Vec<usize> = (0..run.queues)
        .map(|q| run.messages / run.queues + usize::from(q < run.messages % run.queues))
        .collect();
    let mut consumers = Vec::new();
    for (name, &expected) in names.iter().zip(&per_queue) {
        let ch = conn.create_channel().await?;
        ch.basic_qos(cfg.prefetch_count, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(expected);
            let mut last = None;
            while latencies.len() < expected {
                let Some(Ok(d)) = consumer.next().await else { break };
                let sent = u64::from_le_bytes(d.data.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]));
                latencies.push(Duration::from_nanos(now_ns().saturating_sub(sent)));
                last = Some(Instant::now());
                if d.ack(BasicAckOptions::default()).await.is_err() {
                    break;
                }
            }
            drop(ch);
            (latencies, last)
        }));
    }
    let publish = conn.create_channel().await?;
    publish.confirm_select(ConfirmSelectOptions::default()).await?;
    reset_peak_rss();
    let cpu0 = CpuSnapshot::take(broker_pid);
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut confirm_times = Vec::with_capacity(run.messages);
    let mut refused = 0usize;
    let mut settle = |c: Result<(Result<Confirmation, lapin::Error>, Duration), tokio::task::JoinError>| {
        if let Ok((c, t)) = c {
            confirm_times.push(t);
            if !matches!(c, Ok(Confirmation::Ack(None))) {
                refused += 1;
            }
        }
    };
    let mut body = vec![b'x'; run.body_bytes.max(8)];
    for i in 0..run.messages {
        if let Some(rate) = run.rate {
            tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        }
        body[..8].copy_from_slice(&now_ns().to_le_bytes());
        let t = Instant::now();
        let confirm = publish
            .basic_publish(
                "".into(),
                names[i % names.len()].as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        // A task per confirm, so that its time is taken when it arrives, not when we look.
        in_flight.push(tokio::spawn(async move { (confirm.await, t.elapsed()) }));
        while in_flight.len() >= CONFIRM_WINDOW {
            if let Some(c) = in_flight.next().await {
                settle(c);
            }
        }
    }
    while let Some(c) = in_flight.next().await {
        settle(c);
    }
    let mut latencies = Vec::new();
    let mut last = started;
    for c in consumers {
        let (l, t) = tokio::time::timeout(Duration::from_secs(120), c).await??;
        latencies.extend(l);
        last = last.max(t.unwrap_or(started));
    }
    let secs = last.duration_since(started).as_secs_f64().max(1e-9);
    let cpu = CpuSnapshot::take(broker_pid).since(&cpu0, false);
    let consumed = latencies.len();
    let latency = Percentiles::of(&mut latencies);
    let confirm = Percentiles::of(&mut confirm_times);
    let mut row = Row {
        scenario: format!("broker ceiling {} q", run.queues),
        load: run.rate.map_or("max".into(), |r| format!("{r:.0}/s")),
        messages: consumed,
        msg_per_s: consumed as f64 / secs,
        latency_ms: latency,
        cpu_s: Some(cpu),
        peak_rss_mib: Some(status_kib("self", "VmHWM") / 1024.0),
        errors: refused + run.messages.saturating_sub(consumed),
        note: format!(
            "publish→consume; {} B, confirm p50/p99 {:.2}/{:.2} ms",
            run.body_bytes,
            confirm.map_or(f64::NAN, |c| c.p50),
            confirm.map_or(f64::NAN, |c| c.p99)
        ),
        ..Row::default()
    };
    if let Some(c) = confirm {
        row.extra.insert("confirm_p50_ms".into(), c.p50);
        row.extra.insert("confirm_p99_ms".into(), c.p99);
    }
    Ok(row)
}

/// What [`ops_per_second`] measured: throughput, and the CPU time each operation took (the
/// worker threads' own CPU clocks, so it does not depend on what else the machine runs).
#[derive(Debug, Clone, Copy)]
pub struct OpRate {
    pub per_s: f64,
    pub cpu_ms_per_op: f64,
}

/// Operations per second of `op` on `threads` threads for about `seconds`.
fn ops_per_second(threads: usize, seconds: f64, op: impl Fn() + Sync) -> OpRate {
    let started = Instant::now();
    let (total, cpu_ns): (u64, u64) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let cpu0 = thread_cpu_ns();
                    let mut n = 0u64;
                    while started.elapsed().as_secs_f64() < seconds {
                        op();
                        n += 1;
                    }
                    (n, thread_cpu_ns().saturating_sub(cpu0))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or((0, 0)))
            .fold((0, 0), |(n, c), (dn, dc)| (n + dn, c + dc))
    });
    OpRate {
        per_s: total as f64 / started.elapsed().as_secs_f64(),
        cpu_ms_per_op: cpu_ns as f64 / 1e6 / (total.max(1) as f64),
    }
}

/// RSA-2048 figures with `dmr::keys` (aws-lc-rs), the agents' library.
pub struct Crypto {
    /// RS256 signatures with 1 and 2 threads.
    pub sign: [OpRate; 2],
    /// RSA-OAEP (SHA-1) decryptions with 1 and 2 threads.
    pub decrypt: [OpRate; 2],
    /// Complete `jose::seal` + `jose::open` of a small message on 2 threads.
    pub seal_open: OpRate,
}

impl Crypto {
    /// Messages per second the two private-key operations every message costs (the sender's
    /// signature, the recipient's decryption) allow on two threads: 1 / (1/sign + 1/decrypt).
    pub fn ceiling(&self) -> f64 {
        1.0 / (1.0 / self.sign[1].per_s + 1.0 / self.decrypt[1].per_s)
    }

    /// CPU milliseconds of those two operations for one message (2-thread runs, thread CPU
    /// clocks): the RSA work no implementation can avoid.
    pub fn rsa_cpu_ms_per_msg(&self) -> f64 {
        self.sign[1].cpu_ms_per_op + self.decrypt[1].cpu_ms_per_op
    }
}

pub fn crypto(seconds: f64) -> anyhow::Result<Crypto> {
    let sender = Arc::new(dmr::keys::PrivateKey::generate()?);
    let recipient = Arc::new(dmr::keys::PrivateKey::generate()?);
    let cek = recipient
        .public_key()
        .encrypt_oaep_sha1(&[7; 32])
        .ok_or_else(|| anyhow::anyhow!("OAEP encryption failed"))?;
    let signing_input = vec![b'a'; 1024];
    let sign = |threads| {
        ops_per_second(threads, seconds, || {
            std::hint::black_box(sender.sign_rs256(&signing_input));
        })
    };
    let decrypt = |threads| {
        ops_per_second(threads, seconds, || {
            std::hint::black_box(recipient.decrypt_oaep_sha1(&cek));
        })
    };
    let payload = serde_json::json!({"chat": {"id": "f47ac10b-58cc-4372-a567-0e02b2c3d479"}, "messages": [{"content": "x".repeat(200)}]});
    let seal_open = ops_per_second(2, seconds, || {
        if let Ok(jwe) = dmr::jose::seal(Some(&payload), &sender, recipient.public_key()) {
            std::hint::black_box(dmr::jose::open(&jwe, &recipient, sender.public_key()).is_ok());
        }
    });
    Ok(Crypto {
        sign: [sign(1), sign(2)],
        decrypt: [decrypt(1), decrypt(2)],
        seal_open,
    })
}

/// The combined ceiling: what the machine's cores allow when every message costs at least the
/// unavoidable RSA work (one RS256 signature + one OAEP decryption) and RabbitMQ's publish +
/// consume of one message, each as measured alone in this run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Combined {
    pub cores: usize,
    /// CPU ms per message of the RSA private-key operations ([`Crypto::rsa_cpu_ms_per_msg`]).
    pub rsa_ms: f64,
    /// CPU ms per message of RabbitMQ itself (`beam.smp`) in the 1-queue broker ceiling.
    pub rabbit_beam_ms: f64,
    /// CPU ms per message of the AMQP client side in that ceiling (publisher, consumer, lapin's I/O
    /// thread: what the server's broker client does in production).
    pub rabbit_client_ms: f64,
}

impl Combined {
    /// From the crypto figures and the 1-queue broker ceiling's row (`None` without the
    /// broker's CPU time, i.e. when RabbitMQ's process is not visible).
    pub fn of(crypto: &Crypto, broker_1q: &Row) -> Option<Self> {
        let cpu = broker_1q.cpu_s.as_ref()?;
        let n = broker_1q.messages.max(1) as f64;
        Some(Self {
            cores: std::thread::available_parallelism().map_or(2, |n| n.get()),
            rsa_ms: crypto.rsa_cpu_ms_per_msg(),
            rabbit_beam_ms: cpu.broker? * 1000.0 / n,
            rabbit_client_ms: cpu.harness * 1000.0 / n,
        })
    }

    /// RabbitMQ's share: broker plus its clients.
    pub fn rabbit_ms(&self) -> f64 {
        self.rabbit_beam_ms + self.rabbit_client_ms
    }

    /// msg/s = cores ÷ (RSA + RabbitMQ CPU per message), in seconds.
    pub fn msg_per_s(&self) -> f64 {
        self.cores as f64 * 1000.0 / (self.rsa_ms + self.rabbit_ms())
    }

    /// The same with RabbitMQ's own process only (no client side).
    pub fn msg_per_s_beam_only(&self) -> f64 {
        self.cores as f64 * 1000.0 / (self.rsa_ms + self.rabbit_beam_ms)
    }
}
