//! The publishing connection and the loop that keeps it (and the topology) up.

use super::consumers::{ConsumerConnection, connection_uri};
use super::{RabbitMq, soft_error};
use crate::broker::{BrokerError, RemoteSessionHook, TopologySource};
use futures::StreamExt as _;
use lapin::options::ConfirmSelectOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::{Channel, Connection, ConnectionProperties};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// How long opening a connection may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing our connections may take (a dead one never answers).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Queue declarations run concurrently at start-up and after a reconnect.
const DECLARATIONS_IN_FLIGHT: usize = 32;

/// A live connection with its publishing channel, and the consumer connections opened since.
pub(super) struct Link {
    pub(super) conn: Connection,
    pub(super) publish: Channel,
    /// `None` once the link is closed: no consumer connection may be added after that.
    pub(super) consumers: Mutex<Option<Vec<ConsumerConnection>>>,
    /// The channel queue counts are read on, kept between reads (`None` until the first, and after a
    /// read of a missing queue, which closes it).
    pub(super) counting: Mutex<Option<Channel>>,
}

impl Link {
    async fn close(&self, reason: &str) {
        let _ = self.conn.close(200, reason.into()).await;
        let pool = self.consumers.lock().await.take();
        for c in pool.into_iter().flatten() {
            let _ = c.conn.close(200, reason.into()).await;
        }
    }
}

/// True when RabbitMQ refused the login or the virtual host.
fn is_access_refused(e: &lapin::Error) -> bool {
    if soft_error(e) == Some(&AMQPSoftError::ACCESSREFUSED) {
        return true;
    }
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)))
}

impl RabbitMq {
    /// Opens one connection to check the address and credentials, then closes it. A refused login
    /// or virtual host is an error to report at start; an unreachable broker is not (it may come
    /// up later, and the server reports not-ready meanwhile).
    pub async fn check_access(&self) -> Result<(), BrokerError> {
        match self.open_connection("dmr-server (start-up check)").await {
            Ok(conn) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "checked".into())).await;
                Ok(())
            }
            Err(ConnectFailure::Refused(detail)) => Err(BrokerError::AccessRefused {
                addr: self.cfg.display_addr(),
                user: self.cfg.user.clone(),
                vhost: self.cfg.vhost.clone(),
                detail,
            }),
            Err(ConnectFailure::Unreachable) => Ok(()),
        }
    }

    async fn open_connection(&self, name: &str) -> Result<Connection, ConnectFailure> {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(&connection_uri(&self.cfg), properties),
        )
        .await
        {
            Err(_) => Err(ConnectFailure::Unreachable),
            Ok(Err(e)) if is_access_refused(&e) => Err(ConnectFailure::Refused(e.to_string())),
            Ok(Err(_)) => Err(ConnectFailure::Unreachable),
            Ok(Ok(conn)) => Ok(conn),
        }
    }

    /// Connects, declares the topology, and reconnects after every loss until `stop`.
    pub async fn run(&self, topology: TopologySource, remote_sessions: RemoteSessionHook, stop: CancellationToken) {
        let interval = self.cfg.reconnect_interval();
        loop {
            match self.connect_once(&topology, &remote_sessions).await {
                Ok(conn_errors) => {
                    tracing::info!(broker = %self.cfg.display_addr(), "connected to RabbitMQ");
                    self.set_ready(true);
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = conn_errors => {}
                    }
                    tracing::error!(broker = %self.cfg.display_addr(), "lost the RabbitMQ connection; reconnecting");
                    self.set_ready(false);
                    // Consumers on the other connections end with it and attach again once
                    // reconnected. Closing a dead connection can wait for an answer that never
                    // comes: do it aside, bounded, and never while holding the lock.
                    let old = self.link.write().await.take();
                    if let Some(link) = old {
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close("connection lost")).await;
                        });
                    }
                }
                Err(e) => {
                    tracing::error!(broker = %self.cfg.display_addr(), error = %e, "cannot connect to RabbitMQ; retrying in {} ms", interval.as_millis());
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        self.set_ready(false);
        let last = self.link.write().await.take();
        if let Some(link) = last {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close("server shutting down")).await;
        }
    }

    /// One connection attempt; returns a future that completes when the connection fails.
    async fn connect_once(
        &self,
        topology: &TopologySource,
        remote_sessions: &RemoteSessionHook,
    ) -> Result<futures::future::BoxFuture<'static, ()>, BrokerError> {
        let unavailable = |_| BrokerError::Unavailable(self.cfg.display_addr());
        let conn = match self.open_connection("dmr-server").await {
            Ok(conn) => conn,
            Err(ConnectFailure::Refused(detail)) => {
                return Err(BrokerError::AccessRefused {
                    addr: self.cfg.display_addr(),
                    user: self.cfg.user.clone(),
                    vhost: self.cfg.vhost.clone(),
                    detail,
                });
            }
            Err(ConnectFailure::Unreachable) => return Err(BrokerError::Unavailable(self.cfg.display_addr())),
        };
        let publish = conn.create_channel().await.map_err(unavailable)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        let events: futures::stream::BoxStream<'static, lapin::Event> = Box::pin(conn.events_listener());
        let status_conn = conn.status().clone();
        *self.link.write().await = Some(Arc::new(Link {
            conn,
            publish,
            consumers: Mutex::new(Some(Vec::new())),
            counting: Mutex::new(None),
        }));
        self.declare_validation_failures().await?;
        // Quorum queue declarations take tens of milliseconds each; with thousands of agents a
        // sequential pass would keep the server not-ready for minutes, so declare a few at a time.
        futures::stream::iter(topology())
            .for_each_concurrent(DECLARATIONS_IN_FLIGHT, |id| async move {
                if let Err(e) = self.declare_agent(&id).await {
                    tracing::error!(agent_id = %id, error = %e, "cannot declare agent queues");
                }
            })
            .await;
        self.listen_for_sessions(remote_sessions.clone()).await?;
        Ok(Box::pin(async move {
            let mut events = events;
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    // lapin reports channel-level errors (a passive declare of a missing queue
                    // closes its channel) as events too: only a closed connection is a loss.
                    ev = events.next() => match ev {
                        None => return,
                        Some(lapin::Event::Error(_)) if !status_conn.connected() => return,
                        Some(_) => {}
                    },
                    _ = tick.tick() => if !status_conn.connected() { return },
                }
            }
        }))
    }
}

/// Why a connection could not be opened.
enum ConnectFailure {
    /// Login or virtual host refused (with the broker's words).
    Refused(String),
    /// Not reachable, not answering, or closed on us.
    Unreachable,
}
