//! Failover between server instances (issue 18): when the server an agent is connected to dies,
//! the agent connects to the next address at once, and pauses only after every address failed.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};
use support::processes::{DmrProcess, free_port};
use support::*;

const WAIT: Duration = Duration::from_secs(20);

fn exposed(text: &str, name: &str) -> f64 {
    metric(text, name).unwrap_or_else(|| panic!("{name} not exposed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_costs_only_a_connection_to_the_next() {
    init();
    let probe = BrokerProbe::connect().await;
    let pki = TestPki::new();
    let a = pki.agent("A");
    let centops = pki.write_centops(&[&a]);
    let vf = format!("validation-failures-test-{}", uuid::Uuid::new_v4());
    let logs = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..2).map(|_| (free_port(), free_port())).collect();
    let rabbit = rabbit_config();
    let server_env = |i: usize| support::processes::server_env(&pki, &centops, ports[i], &rabbit, &vf);
    let mut s1 = DmrProcess::spawn("server-1", "server", &server_env(0), logs.path());
    let mut s2 = DmrProcess::spawn("server-2", "server", &server_env(1), logs.path());
    let http = reqwest::Client::new();
    for (port, _) in &ports {
        let url = format!("http://127.0.0.1:{port}/ready");
        let up = eventually_async(WAIT, || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        assert!(up, "server on {port} ready; logs:\n{}\n{}", s1.logs(), s2.logs());
    }

    let sink = Sink::start().await;
    let mut cfg = agent_config(
        &pki,
        &a,
        std::net::SocketAddr::from(([127, 0, 0, 1], ports[0].1)),
        &sink.url,
    );
    cfg.dmr_server_grpc_url = ports.iter().map(|(_, g)| format!("https://localhost:{g}")).collect();
    // A pause this long would show: the old agent slept 5–10 s before trying the next address.
    cfg.reconnection_delay_ms = 10_000;
    cfg.reconnection_delay_max_ms = 10_000;
    let mut agent = start_agent(cfg).await;
    agent.wait_connected().await;
    let post = || {
        let (http, url, body) = (http.clone(), agent.url("/v1/messages"), seed_message(&a.id));
        async move { http.post(url).json(&body).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(post().await, 200);

    // The agent is on the first address; kill that server.
    s1.kill().await;
    let killed = Instant::now();
    let mut refused = 0;
    while post().await != 200 {
        refused += 1;
        assert!(killed.elapsed() < WAIT, "no recovery; logs:\n{}", s2.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered = killed.elapsed();
    eprintln!("back in service {recovered:?} after the kill ({refused} refused sends)");
    let metrics = http
        .get(agent.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(exposed(&metrics, "dmr_agent_failovers_total") >= 1.0);
    assert_eq!(
        exposed(&metrics, "dmr_agent_reconnect_backoffs_total"),
        0.0,
        "the second server was tried before any pause"
    );
    // Generous: far below the 5 s minimum pause configured above.
    assert!(recovered < Duration::from_secs(4), "{recovered:?}");
    assert_eq!(
        sink.wait_for(2, WAIT).await.len(),
        2,
        "both accepted messages delivered"
    );

    agent.shutdown().await;
    s2.terminate().await;
    probe.delete(&[a.id.clone(), format!("{}.dlq", a.id), vf]).await;
}
