//! `Store::move_ready`: taking selected ready messages out of the middle of a queue, to another
//! queue or nowhere, atomically and durably.
#![allow(clippy::unwrap_used)]

mod common;
use common::open;

use std::time::Duration;

use bytes::Bytes;
use dmr_store::{HeaderValue, Headers, Message, QueueArgs, Store, StoreError};

fn bodies(ms: &[Message]) -> Vec<String> {
    ms.iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

async fn fill(s: &Store, queue: &str, n: usize) {
    for i in 0..n {
        let mut h = Headers::new();
        h.insert("i".into(), HeaderValue::Int(i as i64));
        s.publish(queue, Bytes::from(format!("m{i}")), h).await.unwrap();
    }
}

#[tokio::test]
async fn selected_messages_move_to_the_end_of_the_target_with_their_headers_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        s.declare("dlq", QueueArgs::default()).unwrap();
        s.declare("q", QueueArgs::default()).unwrap();
        s.publish("q", Bytes::from("already"), Headers::new()).await.unwrap();
        fill(&s, "dlq", 5).await;
        let listed = s.list("dlq", 10).unwrap();
        let pick = [listed[1].seq, listed[3].seq, 999_999];
        assert_eq!(
            s.move_ready("dlq", &pick, Some("q")).await.unwrap(),
            2,
            "the unknown seq is skipped"
        );
        assert_eq!(
            bodies(&s.list("dlq", 10).unwrap()),
            ["m0", "m2", "m4"],
            "the others stay, in order"
        );
        let q = s.list("q", 10).unwrap();
        assert_eq!(bodies(&q), ["already", "m1", "m3"]);
        assert_eq!(q[2].headers.get("i"), Some(&HeaderValue::Int(3)), "headers kept");
        // Moving the same seqs again finds nothing.
        assert_eq!(s.move_ready("dlq", &pick, Some("q")).await.unwrap(), 0);
        s.close();
    }
    let s = open(dir.path());
    assert_eq!(bodies(&s.list("dlq", 10).unwrap()), ["m0", "m2", "m4"]);
    assert_eq!(bodies(&s.list("q", 10).unwrap()), ["already", "m1", "m3"]);
}

#[tokio::test]
async fn without_a_target_the_selected_messages_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("dlq", QueueArgs::default()).unwrap();
    fill(&s, "dlq", 4).await;
    let seqs: Vec<u64> = s.list("dlq", 10).unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(s.move_ready("dlq", &seqs[..2], None).await.unwrap(), 2);
    assert_eq!(bodies(&s.list("dlq", 10).unwrap()), ["m2", "m3"]);
    assert_eq!(s.counts("dlq").unwrap().messages_ready, 2);
    drop(s);
    let s = open(dir.path());
    assert_eq!(
        bodies(&s.list("dlq", 10).unwrap()),
        ["m2", "m3"],
        "the removal was durable"
    );
}

#[tokio::test]
async fn missing_queues_are_errors_and_nothing_moves() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("dlq", QueueArgs::default()).unwrap();
    fill(&s, "dlq", 2).await;
    let seqs: Vec<u64> = s.list("dlq", 10).unwrap().iter().map(|m| m.seq).collect();
    assert!(matches!(
        s.move_ready("dlq", &seqs, Some("nowhere")).await,
        Err(StoreError::QueueNotFound(q)) if q == "nowhere"
    ));
    assert!(matches!(
        s.move_ready("nothing", &seqs, None).await,
        Err(StoreError::QueueNotFound(q)) if q == "nothing"
    ));
    assert_eq!(bodies(&s.list("dlq", 10).unwrap()), ["m0", "m1"]);
}

#[tokio::test]
async fn a_message_held_by_a_consumer_is_not_moved_and_a_moved_one_is_delivered_from_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.declare("src", QueueArgs::default()).unwrap();
    s.declare("dst", QueueArgs::default()).unwrap();
    fill(&s, "src", 2).await;
    let seqs: Vec<u64> = s.list("src", 10).unwrap().iter().map(|m| m.seq).collect();
    let mut held = s.consume("src", 1).unwrap();
    let first = held.next().await.unwrap();
    assert_eq!(first.seq, seqs[0]);
    assert_eq!(
        s.move_ready("src", &seqs, Some("dst")).await.unwrap(),
        1,
        "only the ready one"
    );
    let mut c = s.consume("dst", 0).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.body, Bytes::from("m1"));
    // The held one is still the consumer's to settle.
    held.ack(first.seq).await.unwrap();
    assert_eq!(s.counts("src").unwrap().messages_ready, 0);
}
