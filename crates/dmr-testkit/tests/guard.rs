//! The queue guard: a test that panics midway still leaves no queue behind on the shared broker.

use dmr_testkit::{BrokerProbe, Relay, agent_queues};
use std::sync::{Arc, Mutex};

#[test]
fn a_test_that_panics_leaves_no_queues_behind() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let added = dmr_testkit::TestPki::new().agent("added by the test");
    let (s, added_id) = (seen.clone(), added.id.clone());
    // The failing "test": its own multi-thread runtime (as #[tokio::test(flavor = "multi_thread")]
    // gives), on its own thread, so its panic is observed here.
    let outcome = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let relay = Relay::start().await;
            // An agent the test adds: the server would declare its queues when it connects; here
            // they are simply declared, and left to the guard.
            relay.guard.track_agent(&added_id);
            declare(&agent_queues(&added_id)).await;
            let queues = relay.queues();
            // (Legacy-token queues exist only for agents that connected over Socket.IO.)
            for q in queues
                .iter()
                .filter(|q| !q.starts_with("dmr.legacy-token.") || q.ends_with(&added_id))
            {
                assert!(relay.probe.queue_len(q).await.is_some(), "{q} exists before the panic");
            }
            *s.lock().expect("lock") = queues;
            panic!("the test fails midway, before Relay::finish");
        })
    })
    .join();
    assert!(outcome.is_err(), "the test panicked");
    let queues = seen.lock().expect("lock").clone();
    assert!(queues.len() >= 7, "a relay's queues and the added agent's: {queues:?}");
    for q in agent_queues(&added.id) {
        assert!(queues.contains(&q));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let probe = BrokerProbe::connect().await;
        for q in &queues {
            assert_eq!(probe.queue_len(q).await, None, "{q} was left behind");
        }
    });
}

async fn declare(queues: &[String]) {
    let uri = dmr_testkit::rabbit_config().uri();
    let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    for q in queues {
        let durable = lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(q.as_str().into(), durable, Default::default())
            .await
            .expect("declare");
    }
    let _ = conn.close(200, "declared".into()).await;
}
