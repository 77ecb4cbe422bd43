//! Behaviour of the queue store: ordering, durability, consumers, TTL, dead-lettering.
#![allow(clippy::unwrap_used)]

mod common;
use common::open;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use dmr_store::{
    Consumer, HeaderValue, Headers, Message, QueueArgs, Store, StoreError, StoreOptions, X_DEATH_COUNT, X_DEATH_DETAIL,
    X_DEATH_QUEUE, X_DEATH_REASON,
};
use tokio::time::timeout;

fn body(i: usize) -> Bytes {
    Bytes::from(format!("m{i}"))
}

fn hdr(k: &str, v: impl Into<HeaderValue>) -> Headers {
    let mut h = Headers::new();
    h.insert(k.into(), v.into());
    h
}

async fn next(c: &mut Consumer) -> Message {
    timeout(Duration::from_secs(5), c.next())
        .await
        .expect("a message within 5 s")
        .expect("the queue is still there")
}

async fn nothing(c: &mut Consumer, ms: u64) {
    if let Ok(m) = timeout(Duration::from_millis(ms), c.next()).await {
        panic!("expected no delivery, got {m:?}");
    }
}

fn bodies(ms: &[Message]) -> Vec<String> {
    ms.iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

#[tokio::test]
async fn fifo_order_and_ack_removes() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("q", QueueArgs::default()).unwrap();
    for i in 0..20 {
        s.publish("q", body(i), hdr("i", i as i64)).await.unwrap();
    }
    assert_eq!(s.counts("q").unwrap().messages_ready, 20);
    let mut c = s.consume("q", 0).unwrap();
    let mut last = 0;
    for i in 0..20 {
        let m = next(&mut c).await;
        assert_eq!(m.body, body(i));
        assert_eq!(m.headers.get("i"), Some(&HeaderValue::Int(i as i64)));
        assert!(!m.redelivered);
        assert!(m.seq > last);
        last = m.seq;
        c.ack(m.seq).await.unwrap();
    }
    let n = s.counts("q").unwrap();
    assert_eq!((n.messages_ready, n.unacked, n.consumers), (0, 0, 1));
    // An acked delivery cannot be acked again.
    assert!(matches!(c.ack(last).await, Err(StoreError::UnknownDelivery { .. })));
    drop(c);
    drop(s);
    // Acks survive a clean close.
    let s = open(dir.path());
    assert_eq!(s.counts("q").unwrap().messages_ready, 0);
}

#[tokio::test]
async fn publish_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        s.declare("q", QueueArgs::default()).unwrap();
        for i in 0..50 {
            s.publish("q", body(i), hdr("k", format!("v{i}"))).await.unwrap();
        }
        // Deliver some without acking: they come back as ready after the reopen.
        let mut c = s.consume("q", 5).unwrap();
        for _ in 0..5 {
            next(&mut c).await;
        }
        s.close();
        assert!(matches!(
            s.publish("q", body(0), Headers::new()).await,
            Err(StoreError::Closed)
        ));
        assert!(timeout(Duration::from_secs(1), c.next()).await.unwrap().is_none());
    }
    let s = open(dir.path());
    assert!(s.queue_exists("q"));
    let all = s.list("q", 1000).unwrap();
    assert_eq!(bodies(&all), (0..50).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(all[7].headers.get("k"), Some(&HeaderValue::from("v7")));
    // New publishes get seqs after the old ones.
    s.publish("q", body(50), Headers::new()).await.unwrap();
    let all = s.list("q", 1000).unwrap();
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(all.len(), 51);
}

#[tokio::test]
async fn dropped_consumer_redelivers_first_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("q", QueueArgs::default()).unwrap();
    for i in 0..6 {
        s.publish("q", body(i), Headers::new()).await.unwrap();
    }
    let mut c1 = s.consume("q", 3).unwrap();
    let got: Vec<_> = vec![next(&mut c1).await, next(&mut c1).await, next(&mut c1).await];
    assert_eq!(bodies(&got), ["m0", "m1", "m2"]);
    c1.ack(got[1].seq).await.unwrap();
    assert_eq!(s.counts("q").unwrap().unacked, 2);
    drop(c1);
    let n = s.counts("q").unwrap();
    assert_eq!((n.messages_ready, n.unacked, n.consumers), (5, 0, 0));
    let mut c2 = s.consume("q", 0).unwrap();
    let a = next(&mut c2).await;
    let b = next(&mut c2).await;
    let c = next(&mut c2).await;
    assert_eq!(bodies(&[a.clone(), b.clone(), c.clone()]), ["m0", "m2", "m3"]);
    assert!(a.redelivered && b.redelivered && !c.redelivered);
}

#[tokio::test]
async fn prefetch_is_respected() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("q", QueueArgs::default()).unwrap();
    for i in 0..5 {
        s.publish("q", body(i), Headers::new()).await.unwrap();
    }
    let mut c = s.consume("q", 2).unwrap();
    let a = next(&mut c).await;
    let b = next(&mut c).await;
    nothing(&mut c, 200).await;
    let n = s.counts("q").unwrap();
    assert_eq!((n.messages_ready, n.unacked), (3, 2));
    // Another consumer may take what this one may not.
    let mut other = s.consume("q", 1).unwrap();
    assert_eq!(next(&mut other).await.body, body(2));
    nothing(&mut other, 100).await;
    // An ack frees exactly one slot.
    c.ack(a.seq).await.unwrap();
    assert_eq!(next(&mut c).await.body, body(3));
    nothing(&mut c, 100).await;
    c.ack(b.seq).await.unwrap();
    assert_eq!(next(&mut c).await.body, body(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_wakes_a_consumer_at_its_prefetch() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("q", QueueArgs::default()).unwrap();
    for i in 0..3 {
        s.publish("q", body(i), Headers::new()).await.unwrap();
    }
    let mut c = s.consume("q", 1).unwrap();
    let a = next(&mut c).await;
    nothing(&mut c, 100).await;
    c.ack(a.seq).await.unwrap();
    let b = next(&mut c).await;
    assert_eq!(b.body, body(1));
    // A publish wakes a consumer waiting on an empty queue.
    c.ack(b.seq).await.unwrap();
    let _c2 = next(&mut c).await; // m2
    let s2 = s.clone();
    let h = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s2.publish("q", body(9), Headers::new()).await.unwrap();
    });
    nothing(&mut c, 50).await; // prefetch 1 still held (m2)
    let _ = h.await;
    assert_eq!(s.counts("q").unwrap().messages_ready, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_share_a_queue() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("q", QueueArgs::default()).unwrap();
    for i in 0..100 {
        s.publish("q", body(i), Headers::new()).await.unwrap();
    }
    let mut c1 = s.consume("q", 10).unwrap();
    let mut c2 = s.consume("q", 10).unwrap();
    assert_eq!(s.counts("q").unwrap().consumers, 2);
    let run = |mut c: Consumer| async move {
        let mut seen = Vec::new();
        while let Ok(Some(m)) = timeout(Duration::from_millis(300), c.next()).await {
            seen.push(m.seq);
            tokio::task::yield_now().await;
            c.ack(m.seq).await.unwrap();
        }
        seen
    };
    let (a, b) = tokio::join!(tokio::spawn(run(c1)), tokio::spawn(run(c2)));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both consumers got messages: {} / {}",
        a.len(),
        b.len()
    );
    let mut all: Vec<u64> = a.iter().chain(b.iter()).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 100, "each message delivered exactly once");
    assert_eq!(a.len() + b.len(), 100);
    // Each consumer sees its share in seq order.
    assert!(a.windows(2).all(|w| w[0] < w[1]) && b.windows(2).all(|w| w[0] < w[1]));
    c1 = s.consume("q", 1).unwrap();
    c2 = s.consume("q", 1).unwrap();
    nothing(&mut c1, 50).await;
    nothing(&mut c2, 50).await;
}

#[tokio::test]
async fn reject_dead_letters_with_headers() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("q.dlq", QueueArgs::default()).unwrap();
    s.declare(
        "q",
        QueueArgs {
            dead_letter_to: Some("q.dlq".into()),
            ..Default::default()
        },
    )
    .unwrap();
    s.declare("plain", QueueArgs::default()).unwrap();
    s.publish("q", body(1), hdr("orig", "yes")).await.unwrap();
    s.publish("plain", body(2), Headers::new()).await.unwrap();
    let mut c = s.consume("q", 1).unwrap();
    let m = next(&mut c).await;
    c.reject(m.seq, "bad signature").await.unwrap();
    assert_eq!(s.counts("q").unwrap().unacked, 0);
    assert_eq!(s.counts("q").unwrap().messages_ready, 0);
    let d = s.peek("q.dlq").unwrap().unwrap();
    assert_eq!(d.body, body(1));
    assert_eq!(d.headers.get("orig"), Some(&HeaderValue::from("yes")));
    assert_eq!(d.headers.get(X_DEATH_REASON), Some(&HeaderValue::from("rejected")));
    assert_eq!(d.headers.get(X_DEATH_QUEUE), Some(&HeaderValue::from("q")));
    assert_eq!(d.headers.get(X_DEATH_DETAIL), Some(&HeaderValue::from("bad signature")));
    assert_eq!(d.headers.get(X_DEATH_COUNT), Some(&HeaderValue::Int(1)));
    // Without a dead-letter queue, a reject drops.
    let mut p = s.consume("plain", 1).unwrap();
    let m = next(&mut p).await;
    p.reject(m.seq, "nope").await.unwrap();
    assert_eq!(s.counts("plain").unwrap().messages_ready, 0);
    assert_eq!(s.counts("q.dlq").unwrap().messages_ready, 1);
    drop((c, p));
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.counts("q.dlq").unwrap().messages_ready, 1);
    assert_eq!(s.counts("q").unwrap().messages_ready, 0);
}

#[tokio::test]
async fn dead_letter_merges_caller_headers() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare(
        "q",
        QueueArgs {
            dead_letter_to: Some("dlq".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut c = s.consume("q", 1).unwrap();
    s.publish("q", body(1), hdr("a", "1")).await.unwrap();
    let m = next(&mut c).await;
    // The dead-letter queue is not declared yet: refused, message kept.
    let mut extra = hdr("attempts", 3i64);
    extra.insert("a".into(), "overridden".into());
    assert!(matches!(
        c.dead_letter(m.seq, extra.clone()).await,
        Err(StoreError::QueueNotFound(q)) if q == "dlq"
    ));
    assert_eq!(s.counts("q").unwrap().unacked, 1);
    s.declare("dlq", QueueArgs::default()).unwrap();
    c.dead_letter(m.seq, extra).await.unwrap();
    assert_eq!(s.counts("q").unwrap().unacked, 0);
    let d = s.list("dlq", 10).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].headers.get("attempts"), Some(&HeaderValue::Int(3)));
    assert_eq!(d[0].headers.get("a"), Some(&HeaderValue::from("overridden")));
    assert!(matches!(
        c.dead_letter(m.seq, Headers::new()).await,
        Err(StoreError::UnknownDelivery { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_dead_letters_then_dlq_ttl_drops() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare(
        "dlq",
        QueueArgs {
            ttl_ms: Some(600),
            ..Default::default()
        },
    )
    .unwrap();
    s.declare(
        "q",
        QueueArgs {
            ttl_ms: Some(150),
            dead_letter_to: Some("dlq".into()),
            ..Default::default()
        },
    )
    .unwrap();
    s.publish("q", body(1), hdr("x", "y")).await.unwrap();
    s.publish("q", body(2), Headers::new()).await.unwrap();
    // One held by a consumer does not expire while held.
    let mut c = s.consume("q", 1).unwrap();
    let held = next(&mut c).await;
    assert_eq!(held.body, body(1));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.counts("q").unwrap().messages_ready, 0);
    assert_eq!(s.counts("q").unwrap().unacked, 1);
    let d = s.list("dlq", 10).unwrap();
    assert_eq!(bodies(&d), ["m2"]);
    assert_eq!(d[0].headers.get(X_DEATH_REASON), Some(&HeaderValue::from("expired")));
    assert_eq!(d[0].headers.get(X_DEATH_QUEUE), Some(&HeaderValue::from("q")));
    c.ack(held.seq).await.unwrap();
    // The DLQ's own TTL drops it (no dead-letter target).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(s.counts("dlq").unwrap().messages_ready, 0);
    assert_eq!(s.counts("q").unwrap().messages_ready, 0);
}

#[tokio::test]
async fn expired_message_is_not_delivered_at_consume_time() {
    let dir = tempfile::tempdir().unwrap();
    // A long sweep interval: only the consume-time check can expire it.
    let s = Store::open(
        dir.path(),
        StoreOptions {
            sweep_interval: Duration::from_secs(3600),
        },
    )
    .unwrap();
    s.declare(
        "q",
        QueueArgs {
            ttl_ms: Some(50),
            ..Default::default()
        },
    )
    .unwrap();
    s.publish("q", body(1), Headers::new()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.publish("q", body(2), Headers::new()).await.unwrap();
    let mut c = s.consume("q", 0).unwrap();
    assert_eq!(next(&mut c).await.body, body(2));
}

#[tokio::test]
async fn max_length_drops_head() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let args = QueueArgs {
        max_length: Some(1),
        ..Default::default()
    };
    s.declare("tok", args.clone()).unwrap();
    for i in 0..5 {
        s.publish("tok", body(i), Headers::new()).await.unwrap();
    }
    assert_eq!(s.counts("tok").unwrap().messages_ready, 1);
    assert_eq!(s.peek("tok").unwrap().unwrap().body, body(4));
    // Concurrent publishes (one batch) also keep only the newest.
    let mut hs = Vec::new();
    for i in 10..20 {
        let s = s.clone();
        hs.push(tokio::spawn(
            async move { s.publish("tok", body(i), Headers::new()).await },
        ));
    }
    for h in hs {
        h.await.unwrap().unwrap();
    }
    assert_eq!(s.counts("tok").unwrap().messages_ready, 1);
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.list("tok", 10).unwrap().len(), 1);
    // max_length 3
    s.declare(
        "three",
        QueueArgs {
            max_length: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..7 {
        s.publish("three", body(i), Headers::new()).await.unwrap();
    }
    assert_eq!(bodies(&s.list("three", 10).unwrap()), ["m4", "m5", "m6"]);
}

#[tokio::test]
async fn declare_is_idempotent_and_args_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = QueueArgs {
        ttl_ms: Some(1000),
        dead_letter_to: Some("d".into()),
        max_length: None,
    };
    s.declare("q", a.clone()).unwrap();
    s.declare("q", a.clone()).unwrap();
    let b = QueueArgs {
        ttl_ms: Some(2000),
        ..a.clone()
    };
    let err = s.declare("q", b).unwrap_err();
    assert!(
        matches!(&err, StoreError::ArgsDiffer { queue, .. } if queue == "q"),
        "{err}"
    );
    drop(s);
    let s = open(dir.path());
    s.declare("q", a).unwrap();
    assert!(matches!(
        s.declare("q", QueueArgs::default()),
        Err(StoreError::ArgsDiffer { .. })
    ));
}

#[tokio::test]
async fn unknown_queue_errors_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    assert!(matches!(
        s.publish("nope", body(0), Headers::new()).await,
        Err(StoreError::QueueNotFound(q)) if q == "nope"
    ));
    assert!(matches!(s.consume("nope", 1), Err(StoreError::QueueNotFound(_))));
    assert!(matches!(s.counts("nope"), Err(StoreError::QueueNotFound(_))));
    assert!(!s.queue_exists("nope"));
    s.declare("q", QueueArgs::default()).unwrap();
    for i in 0..4 {
        s.publish("q", body(i), Headers::new()).await.unwrap();
    }
    let mut c = s.consume("q", 1).unwrap();
    next(&mut c).await;
    assert_eq!(s.delete_queue("q").unwrap(), 4);
    assert!(!s.queue_exists("q"));
    assert!(timeout(Duration::from_secs(1), c.next()).await.unwrap().is_none());
    assert_eq!(s.delete_queue("q").unwrap(), 0);
    // Re-declared: empty, and the old consumer stays ended.
    s.declare("q", QueueArgs::default()).unwrap();
    s.publish("q", body(9), Headers::new()).await.unwrap();
    assert!(timeout(Duration::from_secs(1), c.next()).await.unwrap().is_none());
    drop(s);
    let s = open(dir.path());
    assert_eq!(bodies(&s.list("q", 10).unwrap()), ["m9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_keeps_per_task_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("q", QueueArgs::default()).unwrap();
    let tasks = 50;
    let per = 20;
    let mut hs = Vec::new();
    for t in 0..tasks {
        let s = s.clone();
        hs.push(tokio::spawn(async move {
            for i in 0..per {
                let mut h = hdr("task", t as i64);
                h.insert("i".into(), HeaderValue::Int(i as i64));
                s.publish("q", Bytes::from(format!("{t}-{i}")), h).await.unwrap();
            }
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
    let stats = s.stats();
    println!("{stats:?}");
    // 1,000 publishes from 50 concurrent tasks share commits (one fsync each).
    assert!(stats.durable_commits < (tasks * per) as u64, "{stats:?}");
    drop(s);
    let s = open(dir.path());
    let all = s.list("q", 10_000).unwrap();
    assert_eq!(all.len(), tasks * per);
    let mut next_i = vec![0i64; tasks];
    for m in &all {
        let (Some(HeaderValue::Int(t)), Some(HeaderValue::Int(i))) = (m.headers.get("task"), m.headers.get("i")) else {
            panic!("headers missing");
        };
        assert_eq!(*i, next_i[*t as usize], "task {t} out of order");
        next_i[*t as usize] += 1;
    }
}

#[tokio::test]
async fn second_open_is_locked_then_reopen_after_close() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let err = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, StoreError::Locked { pid: Some(p), .. } if p == std::process::id()),
        "{text}"
    );
    assert!(
        text.contains(&dir.path().display().to_string()) && text.contains("in use"),
        "{text}"
    );
    let clone = s.clone();
    drop(s);
    // A clone keeps it open.
    assert!(matches!(
        Store::open(dir.path(), StoreOptions::default()),
        Err(StoreError::Locked { .. })
    ));
    drop(clone);
    let s = open(dir.path());
    s.close();
    let _s = open(dir.path());
}

/// Runs this test binary again as a child running only `test`, with `env` set.
fn child(test: &str, env: (&str, &Path)) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .stdout(Stdio::piped());
    cmd
}

const LOCK_CHILD: &str = "DMR_STORE_TEST_LOCK_CHILD";
const CRASH_CHILD: &str = "DMR_STORE_TEST_CRASH_CHILD";

/// Child role of `second_open_from_another_process_is_locked` (does nothing otherwise).
#[test]
fn lock_child() {
    let Some(dir) = std::env::var_os(LOCK_CHILD) else {
        return;
    };
    match Store::open(Path::new(&dir), StoreOptions::default()) {
        Err(e @ StoreError::Locked { .. }) => println!("LOCKED {e}"),
        Err(e) => println!("OTHER {e}"),
        Ok(_) => println!("OPENED"),
    }
}

#[tokio::test]
async fn second_open_from_another_process_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _s = open(dir.path());
    let out = child("lock_child", (LOCK_CHILD, dir.path())).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // The harness prints "test lock_child ... " before the child's own line.
    let line = stdout
        .lines()
        .find(|l| l.contains("LOCKED ") || l.contains("OTHER ") || l.contains("OPENED"))
        .unwrap_or_else(|| panic!("no verdict in {stdout}"));
    assert!(line.contains("LOCKED "), "{line}");
    assert!(line.contains(&format!("pid {}", std::process::id())), "{line}");
}

/// Child role of `crash_keeps_every_acknowledged_publish`: publishes from 4 tasks, printing
/// each `Ok`, until killed.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_CHILD) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let s = Store::open(Path::new(&dir), StoreOptions::default()).unwrap();
        s.declare("q", QueueArgs::default()).unwrap();
        let mut hs = Vec::new();
        for t in 0..4 {
            let s = s.clone();
            hs.push(tokio::spawn(async move {
                for i in 0.. {
                    let b = Bytes::from(format!("{t}-{i}"));
                    s.publish("q", b, hdr("t", t as i64)).await.unwrap();
                    println!("OK {t}-{i}");
                }
            }));
        }
        for h in hs {
            let _ = h.await;
        }
    });
}

#[tokio::test]
async fn crash_keeps_every_acknowledged_publish() {
    let dir = tempfile::tempdir().unwrap();
    let mut proc = child("crash_child", (CRASH_CHILD, dir.path())).spawn().unwrap();
    let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    while acked.len() < 300 {
        let line = lines.next().expect("child output").unwrap();
        if let Some(rest) = line.strip_prefix("OK ") {
            acked.push(rest.to_string());
        }
    }
    proc.kill().unwrap(); // SIGKILL
    proc.wait().unwrap();
    // Lines printed before the kill are also acknowledged publishes.
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("OK ") {
            acked.push(rest.to_string());
        }
    }
    let s = open(dir.path());
    let stored = bodies(&s.list("q", 1_000_000).unwrap());
    let set: std::collections::HashSet<&String> = stored.iter().collect();
    for a in &acked {
        assert!(
            set.contains(a),
            "acknowledged publish {a} lost ({} stored)",
            stored.len()
        );
    }
    // Per-task order is kept.
    for t in 0..4 {
        let mine: Vec<u64> = stored
            .iter()
            .filter_map(|b| b.strip_prefix(&format!("{t}-")).map(|i| i.parse().unwrap()))
            .collect();
        assert!(
            mine.iter().enumerate().all(|(k, i)| *i == k as u64),
            "task {t}: {mine:?}"
        );
    }
    assert!(stored.len() >= acked.len());
}

/// Throughput of publish + consume + ack (prints msgs/s; no timed assertion).
/// `cargo test -p dmr-store --release --test queues -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("q", QueueArgs::default()).unwrap();
    let n = 20_000usize;
    let publishers = 16;
    let start = std::time::Instant::now();
    let mut c = s.consume("q", 100).unwrap();
    let consumer = tokio::spawn(async move {
        for _ in 0..n {
            let m = next(&mut c).await;
            c.ack(m.seq).await.unwrap();
        }
        c
    });
    let mut hs = Vec::new();
    for p in 0..publishers {
        let s = s.clone();
        hs.push(tokio::spawn(async move {
            for i in 0..n / publishers {
                s.publish("q", Bytes::from(vec![b'x'; 256]), hdr("p", p as i64))
                    .await
                    .unwrap();
                let _ = i;
            }
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
    let published = start.elapsed();
    let _c = consumer.await.unwrap();
    let all = start.elapsed();
    println!(
        "throughput: {n} msgs of 256 B, {publishers} publishers, 1 consumer (prefetch 100): publish {:.0} msgs/s, publish+consume+ack {:.0} msgs/s",
        n as f64 / published.as_secs_f64(),
        n as f64 / all.as_secs_f64()
    );
    assert_eq!(s.counts("q").unwrap().messages_ready, 0);
    println!("{:?}", s.stats());
}
