//! The DMR central server.
//!
//! Agents hold one mutual-TLS gRPC stream each ([`gateway`]); their sends are validated and
//! published to the recipient's RabbitMQ queue ([`router`], [`broker`]); each connected agent's
//! queue is consumed and delivered over its stream ([`delivery`]). The agent directory comes from
//! CentOps ([`directory`]). Operators get `/metrics`, `/health` and `/ready` on the HTTP port
//! ([`http`]).
//!
//! **Invariant:** the server is stateless: it stores no message and no configuration on disk, and
//! never sees a payload in plaintext.

pub mod admin;
pub(crate) mod backlog;
pub mod broker;
pub mod config;
pub(crate) mod delivery;
pub mod directory;
pub(crate) mod gateway;
pub(crate) mod http;
pub(crate) mod legacy;
pub mod limits;
pub mod metrics;
pub mod policy;
pub(crate) mod refresh;
pub(crate) mod router;
pub(crate) mod session;
pub mod tls;

use broker::Broker;
use config::ServerConfig;
use directory::DirectoryHandle;
use metrics::Metrics;
use session::SessionRegistry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Start-up failures, each naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS files are missing or invalid.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Settings contradict each other.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The refresh schedule is invalid.
    #[error(transparent)]
    Schedule(#[from] directory::ScheduleError),
    /// RabbitMQ refused the credentials or the virtual host.
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// gRPC reflection could not be set up (a build defect).
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

/// What every session and task of one server instance shares.
pub struct Core {
    /// Configuration.
    pub cfg: ServerConfig,
    /// RabbitMQ.
    pub broker: Arc<Broker>,
    /// The agent directory.
    pub directory: DirectoryHandle,
    /// Live sessions on this instance.
    pub sessions: SessionRegistry,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled at shutdown; parent of every session's token.
    pub stop: CancellationToken,
    /// The relay policy in force (`POLICY_URL`).
    pub policy: policy::PolicyHandle,
    /// Per-agent and per-address limiters (`LIMIT_*`).
    pub limits: limits::Limits,
    /// Recent queue depths, for `MESSAGE_QUEUE_MAX_DEPTH`.
    pub(crate) backlog: backlog::BacklogCap,
    /// Every session task: shutdown waits for them (within the grace period) before the broker
    /// connection closes, so no publish confirm or delivery answer is cut off.
    pub tasks: TaskTracker,
}

/// Why this instance takes no new agent session now (both transports ask [`Core::admission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    /// The server is shutting down: the agent should connect to another instance.
    ShuttingDown,
    /// No directory was loaded yet: agents cannot be authenticated.
    DirectoryNotLoaded,
    /// A relay policy is configured but has not loaded yet: sends cannot be checked.
    PolicyNotLoaded,
}

impl NotAdmitted {
    /// A short stable name (metric label, legacy refusal reason).
    pub fn reason(self) -> &'static str {
        match self {
            Self::ShuttingDown => "shutting_down",
            Self::DirectoryNotLoaded => "directory_not_loaded",
            Self::PolicyNotLoaded => "policy_not_loaded",
        }
    }

    /// What the agent is told.
    pub fn message(self) -> &'static str {
        match self {
            Self::ShuttingDown => "server shutting down; connect to another instance",
            Self::DirectoryNotLoaded => "the server has not loaded the agent directory from CentOps yet; retry shortly",
            Self::PolicyNotLoaded => "the server has not loaded its relay policy (POLICY_URL) yet; retry shortly",
        }
    }
}

impl Core {
    /// Whether a new agent session may start now.
    pub fn admission(&self) -> Result<(), NotAdmitted> {
        if self.stop.is_cancelled() {
            Err(NotAdmitted::ShuttingDown)
        } else if !self.directory.is_loaded() {
            Err(NotAdmitted::DirectoryNotLoaded)
        } else if !self.policy.is_loaded() {
            Err(NotAdmitted::PolicyNotLoaded)
        } else {
            Ok(())
        }
    }

    /// Whether authenticated `agent_id` may open a session here now (`LIMIT_SESSIONS`,
    /// `LIMIT_SESSION_OPENS_PER_MINUTE`); a refusal is counted.
    pub fn admit_session(&self, agent_id: &str) -> Result<(), limits::SessionRefusal> {
        let replaces = self.sessions.is_connected(agent_id);
        self.limits
            .open_session(&self.cfg.policy, agent_id, self.sessions.len(), replaces)
            .inspect_err(|refusal| {
                self.metrics
                    .limit_refusals
                    .with_label_values(&[agent_id, refusal.label()])
                    .inc();
                tracing::warn!(
                    agent_id,
                    limit = refusal.label(),
                    "agent session refused: {}",
                    refusal.describe()
                );
            })
    }

    /// Ready to serve: RabbitMQ connected and a directory loaded (`/ready` and `grpc.health.v1`).
    pub fn is_ready(&self) -> bool {
        self.broker.is_ready() && self.admission().is_ok()
    }
}

/// A server with its ports bound, ready to run.
pub struct Server {
    core: Arc<Core>,
    grpc: TcpListener,
    http: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    schedule: croner::Cron,
    /// The operators' console's port (`ADMIN_PORT`), when configured.
    admin: Option<admin::AdminListener>,
}

async fn bind(host: &str, port: u16) -> Result<TcpListener, StartError> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

impl Server {
    /// Loads TLS material, checks RabbitMQ's credentials, tries to load the directory once, and
    /// binds both ports (port 0 picks a free one). A directory that cannot be loaded yet is not an
    /// error: the server starts not-ready and keeps trying (see [`directory::run_refresh`]).
    pub async fn bind(cfg: ServerConfig) -> Result<Self, StartError> {
        cfg.check()?;
        let tls = tls::server_config(&cfg.tls_cert_file, &cfg.tls_key_file, &cfg.tls_client_ca_file)?;
        let schedule = directory::parse_schedule(&cfg.centops_configuration_cron_time)?;
        let metrics = Arc::new(Metrics::new());
        let broker = Broker::new(&cfg.broker, cfg.rabbitmq.clone(), metrics.clone())?;
        broker.check_access().await?;
        let grpc = bind(&cfg.bind_address, cfg.grpc_port).await?;
        let http = bind(&cfg.bind_address, cfg.port).await?;
        let admin = admin::AdminListener::bind(&cfg).await?;
        let directory = match directory::load(
            &cfg.centops_configuration_url,
            Duration::from_millis(cfg.centops_request_timeout_ms),
        )
        .await
        {
            Ok(initial) => {
                tracing::info!(agents = initial.len(), source = %cfg.centops_configuration_url, "agent directory loaded");
                metrics.directory_agents.set(initial.len() as i64);
                metrics.directory_last_success.set(chrono::Utc::now().timestamp());
                DirectoryHandle::new(initial)
            }
            Err(e) => {
                let kind = directory::failure_kind(&e);
                tracing::error!(kind, error = %e, "cannot load the agent directory from CentOps; starting anyway, not ready and refusing agents until it loads");
                metrics.centops_failures.with_label_values(&[kind]).inc();
                metrics.directory_refresh_failing.set(1);
                DirectoryHandle::not_loaded()
            }
        };
        let policy = load_policy(&cfg, &metrics).await;
        let core = Arc::new(Core {
            policy,
            limits: limits::Limits::default(),
            broker,
            cfg,
            directory,
            sessions: SessionRegistry::default(),
            metrics,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            backlog: backlog::BacklogCap::default(),
        });
        Ok(Self {
            core,
            grpc,
            http,
            tls,
            schedule,
            admin,
        })
    }

    /// The bound address of the operators' console, when `ADMIN_PORT` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(admin::AdminListener::local_addr)
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The shared core (for tests and the dev runner).
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Runs until `shutdown` fires, then drains in order: stop accepting connections, close every
    /// session (each answers its pending sends and finishes the delivery in hand, agents are told to
    /// move), wait for them within `SHUTDOWN_TIMEOUT_MS`, and only then close RabbitMQ.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let Self {
            core,
            grpc,
            http,
            tls,
            schedule,
            admin,
        } = self;
        // The operators' console serves through the drain (operators watch it) and stops before
        // the broker closes; every instance answers the consoles' "who is connected here".
        let admin_stop = CancellationToken::new();
        let instance = admin::instance_name(http.local_addr().ok());
        let presence_task = tokio::spawn({
            let (core, instance, stop) = (core.clone(), instance.clone(), admin_stop.clone());
            async move { admin::serve_presence(&core, instance, stop).await }
        });
        let admin_task = admin.map(|a| tokio::spawn(a.serve(core.clone(), instance, admin_stop.clone())));
        let refresh_schedule = |cron| refresh::Schedule {
            cron,
            timeout: Duration::from_millis(core.cfg.centops_request_timeout_ms),
            file_poll: (core.cfg.centops_file_poll_interval_ms > 0)
                .then(|| Duration::from_millis(core.cfg.centops_file_poll_interval_ms)),
        };
        let refresher = tokio::spawn(refresh::run(
            directory::DirectoryTarget(core.clone()),
            refresh_schedule(schedule.clone()),
            core.stop.clone(),
        ));
        let policy_refresher = core.cfg.policy.url.is_some().then(|| {
            tokio::spawn(refresh::run(
                policy::PolicyTarget(core.clone()),
                refresh_schedule(schedule),
                core.stop.clone(),
            ))
        });
        let broker_stop = CancellationToken::new();
        let broker_task = tokio::spawn(core.broker.clone().run(
            topology_source(&core),
            remote_session_hook(&core),
            broker_stop.clone(),
        ));
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let health_task = tokio::spawn(follow_readiness(core.clone(), health_reporter));
        let accept_stop = CancellationToken::new();
        let handshakes = tls::HandshakeLimits {
            timeout: Duration::from_millis(core.cfg.tls_handshake_timeout_ms),
            concurrent: core.cfg.policy.tls_handshakes as usize,
        };
        let incoming = tls::incoming_with_timeout(grpc, tls, core.metrics.clone(), handshakes, accept_stop.clone());
        let grpc_task = grpc_server(&core, health_service)?
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        // The HTTP port keeps serving until the sessions drained: a legacy agent on the polling
        // transport needs new requests to receive the answers to its last sends.
        let drained = CancellationToken::new();
        // Not axum::serve: it has no header or body read timeouts (slowloris), see `http::serve`.
        let http_task = http::serve(
            http,
            http::router(core.clone()),
            http::slow_client_limits(&core.cfg),
            drained.clone(),
        );

        let drain = {
            let (core, shutdown, broker_stop, drained) =
                (core.clone(), shutdown.clone(), broker_stop.clone(), drained.clone());
            async move {
                shutdown.cancelled().await;
                tracing::info!(
                    sessions = core.sessions.len(),
                    "shutting down: no new connections; draining agent sessions"
                );
                accept_stop.cancel();
                core.stop.cancel();
                core.tasks.close();
                if tokio::time::timeout(core.cfg.shutdown_timeout(), core.tasks.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        grace_ms = core.cfg.shutdown_timeout_ms,
                        "shutdown grace period passed with sessions still open (unacked deliveries return to their queues)"
                    );
                }
                drained.cancel();
                broker_stop.cancel();
            }
        };
        let everything = async { tokio::join!(grpc_task, http_task, drain) };
        let overdue = async {
            shutdown.cancelled().await;
            tokio::time::sleep(core.cfg.shutdown_timeout() + CLOSE_MARGIN).await;
        };
        let results = tokio::select! {
            joined = everything => Some(joined),
            () = overdue => None,
        };
        admin_stop.cancel();
        let _ = tokio::time::timeout(CLOSE_MARGIN, presence_task).await;
        if let Some(task) = admin_task {
            let abort = task.abort_handle();
            if tokio::time::timeout(CLOSE_MARGIN, task).await.is_err() {
                abort.abort();
            }
        }
        broker_stop.cancel();
        let _ = tokio::time::timeout(CLOSE_MARGIN, broker_task).await;
        let _ = refresher.await;
        if let Some(policy_refresher) = policy_refresher {
            let _ = policy_refresher.await;
        }
        health_task.abort();
        let Some((grpc_result, http_result, ())) = results else {
            tracing::warn!("connections still open after the grace period; exiting");
            return Ok(());
        };
        grpc_result?;
        http_result.map_err(StartError::Http)?;
        Ok(())
    }
}

/// The relay policy at start: allow-all without `POLICY_URL`; otherwise loaded once here (a failure
/// is not fatal: the server starts not ready and the refresher keeps trying).
async fn load_policy(cfg: &ServerConfig, metrics: &Metrics) -> policy::PolicyHandle {
    let Some(source) = cfg.policy.url.as_deref() else {
        return policy::PolicyHandle::new(false);
    };
    let handle = policy::PolicyHandle::new(true);
    let timeout = Duration::from_millis(cfg.centops_request_timeout_ms);
    match refresh::load::<dmr::policy::Policy>(source, timeout).await {
        Ok(loaded) => {
            tracing::info!(rules = loaded.rule_count(), source, "relay policy loaded");
            metrics.policy_rules.set(loaded.rule_count() as i64);
            handle.replace(loaded);
        }
        Err(e) => {
            let kind = e.kind(<dmr::policy::Policy as refresh::Document>::error_kind);
            tracing::error!(kind, error = %e, "cannot load the relay policy; starting anyway, not ready and refusing agents until it loads");
            metrics.policy_failures.with_label_values(&[kind]).inc();
            metrics.policy_refresh_failing.set(1);
        }
    }
    handle
}

/// Time allowed beyond the grace period for connections and the broker to close.
const CLOSE_MARGIN: Duration = Duration::from_secs(3);

/// The agent ids whose queues must exist, read at each (re)connect to RabbitMQ.
fn topology_source(core: &Arc<Core>) -> broker::TopologySource {
    let dir = core.directory.clone();
    Arc::new(move || dir.current().ids().map(str::to_owned).collect())
}

/// What to do when another instance announces something about an agent.
fn remote_session_hook(core: &Arc<Core>) -> broker::RemoteSessionHook {
    let weak = Arc::downgrade(core);
    Arc::new(move |agent_id: &str, event: broker::Announcement| {
        let Some(core) = weak.upgrade() else { return };
        match event {
            broker::Announcement::Session => {
                if core.sessions.replaced_elsewhere(agent_id) {
                    tracing::info!(
                        agent_id,
                        "the agent connected to another instance: closing its session here"
                    );
                }
            }
            broker::Announcement::QueueRecreated => core.sessions.recheck_consumer(agent_id),
        }
    })
}

/// Streams a client may reset before the server accepted them, at once, before the connection is
/// closed with ENHANCE_YOUR_CALM (h2's own default).
const GRPC_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

type GatewayServer = dmr::proto::agent_gateway_server::AgentGatewayServer<gateway::Gateway>;

/// The gRPC services: health, reflection (v1 and v1alpha, for every grpcurl) and the gateway.
fn grpc_server(
    core: &Arc<Core>,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) -> Result<tonic::transport::server::Router, StartError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dmr::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dmr::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let gateway = GatewayServer::new(gateway::Gateway::new(core.clone()))
        .max_decoding_message_size(core.cfg.message_max_payload_bytes + 64 * 1024);
    Ok(tonic::transport::Server::builder()
        // hyper's default receive windows are 1 MiB per stream and per connection: that much of an
        // agent's unread sends could wait in every connection's buffers. The adaptive window starts
        // at HTTP/2's 64 KiB and grows with the measured bandwidth-delay product, so a busy stream
        // on a long link still gets the window it needs (docs/idle-memory.md).
        .http2_adaptive_window(Some(true))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // tonic's default is no cap at all (it overrides hyper's 200): one connection could open
        // streams without limit (GRPC_MAX_CONCURRENT_STREAMS).
        .max_concurrent_streams(core.cfg.grpc_max_concurrent_streams)
        // HTTP/2 rapid reset (CVE-2023-44487): streams a client resets before they were served
        // count against this; past it the connection gets GOAWAY (h2's default, said explicitly).
        .http2_max_pending_accept_reset_streams(Some(GRPC_MAX_PENDING_ACCEPT_RESET_STREAMS))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(gateway))
}

/// Keeps `grpc.health.v1` in step with `/ready`: SERVING only while RabbitMQ is connected, the
/// directory (and a configured relay policy) is loaded and the server is not shutting down.
async fn follow_readiness(core: Arc<Core>, reporter: tonic_health::server::HealthReporter) {
    let mut broker = core.broker.ready();
    let mut directory = core.directory.watch_loaded();
    let mut policy = core.policy.watch_loaded();
    loop {
        // Shutting down is part of `is_ready`: the last pass reports NOT_SERVING.
        let status = if core.is_ready() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter
            .set_service_status(<GatewayServer as tonic::server::NamedService>::NAME, status)
            .await;
        if core.stop.is_cancelled() {
            return;
        }
        tokio::select! {
            r = broker.changed() => if r.is_err() { return },
            r = directory.changed() => if r.is_err() { return },
            r = policy.changed() => if r.is_err() { return },
            () = core.stop.cancelled() => {}
        }
    }
}
