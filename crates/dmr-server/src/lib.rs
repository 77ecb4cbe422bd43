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

pub mod broker;
pub mod config;
pub mod delivery;
pub mod directory;
pub mod gateway;
pub mod http;
pub mod legacy;
pub mod metrics;
pub mod router;
pub mod sessions;
pub mod tls;

use broker::Broker;
use config::ServerConfig;
use directory::DirectoryHandle;
use metrics::Metrics;
use sessions::SessionRegistry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Start-up failures, each naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS files are missing or invalid.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The directory could not be loaded at start.
    #[error(transparent)]
    Directory(#[from] directory::LoadError),
    /// A setting is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
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
}

/// A server with its ports bound, ready to run.
pub struct Server {
    core: Arc<Core>,
    grpc: TcpListener,
    http: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    schedule: croner::Cron,
}

async fn bind(host: &str, port: u16) -> Result<TcpListener, StartError> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

impl Server {
    /// Loads TLS material and the directory, and binds both ports (port 0 picks a free one).
    pub async fn bind(cfg: ServerConfig) -> Result<Self, StartError> {
        let tls = tls::server_config(&cfg.tls_cert_file, &cfg.tls_key_file, &cfg.tls_client_ca_file)?;
        let schedule = directory::parse_schedule(&cfg.centops_configuration_cron_time).map_err(StartError::Config)?;
        let initial = directory::load(
            &cfg.centops_configuration_url,
            Duration::from_millis(cfg.centops_request_timeout_ms),
        )
        .await?;
        tracing::info!(agents = initial.len(), source = %cfg.centops_configuration_url, "agent directory loaded");
        let grpc = bind(&cfg.bind_address, cfg.grpc_port).await?;
        let http = bind(&cfg.bind_address, cfg.port).await?;
        let metrics = Arc::new(Metrics::new());
        metrics.directory_agents.set(initial.len() as i64);
        metrics.directory_last_success.set(chrono::Utc::now().timestamp());
        let core = Arc::new(Core {
            broker: Broker::new(cfg.rabbitmq.clone(), metrics.clone()),
            cfg,
            directory: DirectoryHandle::new(initial),
            sessions: SessionRegistry::default(),
            metrics,
            stop: CancellationToken::new(),
        });
        Ok(Self {
            core,
            grpc,
            http,
            tls,
            schedule,
        })
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

    /// Runs until `shutdown` fires, then closes sessions (returning in-flight deliveries to their
    /// queues) and the broker connection.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let Self {
            core,
            grpc,
            http,
            tls,
            schedule,
        } = self;
        let refresher = tokio::spawn(directory::run_refresh(core.clone(), schedule, core.stop.clone()));
        let dir = core.directory.clone();
        let topology: broker::TopologySource = Arc::new(move || dir.current().ids().map(str::to_owned).collect());
        let weak = Arc::downgrade(&core);
        let remote_sessions: broker::RemoteSessionHook =
            Arc::new(move |agent_id: &str, event: broker::Announcement| {
                let Some(core) = weak.upgrade() else { return };
                match event {
                    broker::Announcement::Session => {
                        if core.sessions.disconnect(agent_id) {
                            tracing::info!(
                                agent_id,
                                "the agent connected to another instance: closing its session here"
                            );
                        }
                    }
                    broker::Announcement::QueueRecreated => core.sessions.recheck_consumer(agent_id),
                }
            });
        let broker_task = tokio::spawn(core.broker.clone().run(topology, remote_sessions, core.stop.clone()));

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<dmr::proto::agent_gateway_server::AgentGatewayServer<gateway::Gateway>>()
            .await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(dmr::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Tls(tls::TlsError::Config(format!("reflection: {e}"))))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(dmr::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| StartError::Tls(tls::TlsError::Config(format!("reflection: {e}"))))?;

        let accept_stop = CancellationToken::new();
        let incoming = tls::incoming(grpc, tls, core.metrics.clone(), accept_stop.clone());
        let gateway = dmr::proto::agent_gateway_server::AgentGatewayServer::new(gateway::Gateway::new(core.clone()))
            .max_decoding_message_size(core.cfg.message_max_payload_bytes + 64 * 1024);
        let grpc_stop = shutdown.clone();
        let grpc_task = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(gateway)
            .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned());
        let http_task =
            axum::serve(http, http::router(core.clone())).with_graceful_shutdown(shutdown.clone().cancelled_owned());

        let stopper = {
            let core = core.clone();
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                tracing::info!("shutting down: closing agent sessions");
                accept_stop.cancel();
                core.stop.cancel();
            }
        };
        let deadline = Duration::from_millis(core.cfg.shutdown_timeout_ms);
        let everything = async {
            let joined = tokio::join!(grpc_task, http_task, stopper);
            let _ = broker_task.await;
            let _ = refresher.await;
            joined
        };
        let overdue = async {
            shutdown.cancelled().await;
            tokio::time::sleep(deadline).await;
        };
        let (grpc_result, http_result, ()) = tokio::select! {
            joined = everything => joined,
            () = overdue => {
                tracing::warn!(deadline_ms = deadline.as_millis() as u64, "shutdown deadline passed; exiting with work still open (unacked deliveries return to their queues)");
                return Ok(());
            }
        };
        grpc_result?;
        http_result.map_err(|source| StartError::Bind {
            addr: "http".into(),
            source,
        })?;
        Ok(())
    }
}
