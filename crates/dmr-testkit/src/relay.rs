//! A complete relay for one test: a server, agents A and B each with their own sink, fresh ids,
//! its own validation-failures queue, and a guard deleting its queues even if the test panics.

use crate::broker::{BrokerProbe, QueueGuard, agent_queues, rabbit_config};
use crate::servers::{RunningAgent, RunningServer, agent_config, server_config, start_agent, start_server};
use crate::{CentOpsStub, Sink, TestPki, init, post};
use dmr_pki::AgentCredentials;
use dmr_server::config::ServerConfig;
use serde_json::Value;

/// Fields drop in order: agents, then the server (each stops on drop), and the queue guard last,
/// so queues are deleted only once no server of this relay can declare them again.
pub struct Relay {
    pub agent_a: RunningAgent,
    pub agent_b: RunningAgent,
    pub server: RunningServer,
    pub pki: TestPki,
    pub a: AgentCredentials,
    pub b: AgentCredentials,
    pub sink_a: Sink,
    pub sink_b: Sink,
    pub vf_queue: String,
    pub probe: BrokerProbe,
    pub http: reqwest::Client,
    /// Queues of the extra (listed but not started) agents.
    pub extra_queues: Vec<String>,
    /// Every queue of this relay; add those of agents a test adds with [`QueueGuard::track_agent`].
    pub guard: QueueGuard,
}

impl Relay {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::start_full(0, tune).await.0
    }

    /// A relay whose directory also lists `extra` agents that are not started (e.g. legacy agents).
    pub async fn start_full(extra: usize, tune: impl FnOnce(&mut ServerConfig)) -> (Self, Vec<AgentCredentials>) {
        Self::start_inner(extra, None, tune).await
    }

    /// Like [`Relay::start_full`], with the directory served by `centops` (polled every second).
    pub async fn start_with_centops(extra: usize, centops: &CentOpsStub) -> (Self, Vec<AgentCredentials>) {
        Self::start_inner(extra, Some(centops), |_| {}).await
    }

    async fn start_inner(
        extra: usize,
        stub: Option<&CentOpsStub>,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> (Self, Vec<AgentCredentials>) {
        init();
        // First, so that it drops last if the start-up itself fails.
        let guard = QueueGuard::new(&rabbit_config());
        let pki = TestPki::new();
        let a = pki.agent("Agent A");
        let b = pki.agent("Agent B");
        let extras: Vec<AgentCredentials> = (0..extra).map(|i| pki.agent(&format!("extra {i}"))).collect();
        let vf_queue = format!("validation-failures-test-{}", uuid::Uuid::new_v4());
        guard.track(&vf_queue);
        let mut listed = vec![&a, &b];
        listed.extend(extras.iter());
        for agent in &listed {
            guard.track_agent(&agent.id);
        }
        let centops = pki.write_centops(&listed);
        let mut cfg = server_config(&pki, &centops, &vf_queue);
        if let Some(stub) = stub {
            stub.serve(200, &std::fs::read_to_string(&centops).expect("centops file"));
            cfg.centops_configuration_url = stub.url.clone();
            cfg.centops_configuration_cron_time = "* * * * * *".into();
            cfg.centops_request_timeout_ms = 500;
        }
        tune(&mut cfg);
        let server = start_server(cfg).await;
        let probe = BrokerProbe::for_server(&server).await;
        let (sink_a, sink_b) = (Sink::start().await, Sink::start().await);
        let agent_a = start_agent(agent_config(&pki, &a, server.grpc, &sink_a.url)).await;
        let agent_b = start_agent(agent_config(&pki, &b, server.grpc, &sink_b.url)).await;
        agent_a.wait_connected().await;
        agent_b.wait_connected().await;
        let relay = Self {
            agent_a,
            agent_b,
            server,
            pki,
            a,
            b,
            sink_a,
            sink_b,
            vf_queue,
            probe,
            http: reqwest::Client::new(),
            extra_queues: extras.iter().flat_map(|c| agent_queues(&c.id)).collect(),
            guard,
        };
        (relay, extras)
    }

    /// POSTs a v1 message body to agent B's REST API.
    pub async fn post_to_b(&self, body: &Value) -> (u16, Value) {
        post(&self.http, &self.agent_b.url("/v1/messages"), body).await
    }

    /// Stops agent A and waits until the server saw it leave (its messages then wait in its queue).
    pub async fn take_a_offline(&mut self) {
        self.agent_a.shutdown().await;
        let gone = crate::eventually(std::time::Duration::from_secs(20), || {
            !self.server.core.sessions.connected().contains(&self.a.id)
        })
        .await;
        assert!(gone, "the server saw A leave");
    }

    /// Starts agent A again (on the same sink) after [`Relay::take_a_offline`].
    pub async fn bring_a_back(&mut self) {
        self.agent_a = start_agent(agent_config(&self.pki, &self.a, self.server.grpc, &self.sink_a.url)).await;
        self.agent_a.wait_connected().await;
    }

    /// Stops the server (it drains, as on SIGTERM) and returns its configuration.
    pub async fn stop_server(&mut self) -> ServerConfig {
        let cfg = self.server.core.cfg.clone();
        self.server.stop.cancel();
        while !self.server.task.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        cfg
    }

    /// Starts a server with `cfg` in place of the stopped one (nothing in memory survives, as with
    /// a new process); with the embedded engine it opens the same data directory.
    pub async fn start_server_again(&mut self, cfg: ServerConfig) {
        let data_dir = self.server.data_dir.take();
        self.server = start_server(cfg).await;
        self.server.data_dir = data_dir;
        self.probe = BrokerProbe::for_server(&self.server).await;
    }

    /// [`Relay::stop_server`], then [`Relay::start_server_again`] with the same configuration.
    pub async fn restart_server(&mut self) {
        let cfg = self.stop_server().await;
        self.start_server_again(cfg).await;
    }

    /// Queues this relay deletes when it finishes or drops.
    pub fn queues(&self) -> Vec<String> {
        self.guard.queues()
    }

    /// Stops everything and deletes the queues, those of `others` (agents a test added) too.
    pub async fn finish_with(self, others: &[&AgentCredentials]) {
        for c in others {
            self.guard.track_agent(&c.id);
        }
        self.finish().await;
    }

    /// Stops everything, then deletes the queues: only once the server is stopped, or it could
    /// declare them again.
    pub async fn finish(mut self) {
        self.agent_a.shutdown().await;
        self.agent_b.shutdown().await;
        self.server.stop.cancel();
        let _ = (&mut self.server.task).await;
        self.guard.delete_now().await;
    }
}
