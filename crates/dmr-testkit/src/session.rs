//! A raw agent session: the gRPC `Session` stream over mutual TLS without the agent library, for
//! tests and the benchmark that drive the protocol frame by frame.

use crate::KitError;
use dmr::proto::agent_gateway_client::AgentGatewayClient;
use dmr::proto::session_response::Frame as InFrame;
use dmr::proto::{SessionRequest, SessionResponse};
use dmr_pki::AgentCredentials;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// One agent's raw session: frames out, frames in (after the directory).
pub struct RawSession {
    pub tx: mpsc::Sender<SessionRequest>,
    pub inbound: tonic::Streaming<SessionResponse>,
    /// The connection (dropping the session closes it).
    pub channel: tonic::transport::Channel,
}

/// A mutual-TLS connection authenticated as `cert_pem`/`key_pem` (its own TCP + TLS connection)
/// to the server at `server`, whose certificate is checked against `ca_pem` for `localhost`.
pub async fn connect(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    server: SocketAddr,
) -> Result<tonic::transport::Channel, KitError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem))
        .domain_name("localhost");
    Ok(Endpoint::from_shared(format!("https://127.0.0.1:{}", server.port()))?
        .tls_config(tls)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(20))
        .connect()
        .await?)
}

/// A gRPC client on [`connect`]'s connection.
pub async fn raw_client(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    server: SocketAddr,
) -> Result<AgentGatewayClient<tonic::transport::Channel>, KitError> {
    let channel = connect(ca_pem, cert_pem, key_pem, server).await?;
    Ok(AgentGatewayClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// Opens agent `creds`'s session on `server` and reads the directory the server sends first.
pub async fn open_session(ca_pem: &str, creds: &AgentCredentials, server: SocketAddr) -> Result<RawSession, KitError> {
    let channel = connect(ca_pem, &creds.cert_pem, &creds.key_pem, server).await?;
    let mut client = AgentGatewayClient::new(channel.clone()).max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(1024);
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The directory comes first, in one or more frames.
    loop {
        match inbound.message().await? {
            Some(SessionResponse {
                frame: Some(InFrame::Directory(d)),
            }) if d.more => {}
            Some(SessionResponse {
                frame: Some(InFrame::Directory(_)),
            }) => return Ok(RawSession { tx, inbound, channel }),
            other => return Err(KitError::UnexpectedFrame(format!("{other:?}"))),
        }
    }
}
