//! Errors of the kit's fallible entry points (the benchmark's set-up).

/// Why a fixture could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("file system: {0}")]
    Io(#[from] std::io::Error),
    #[error("PKI: {0}")]
    Pki(#[from] dmr_pki::PkiError),
    #[error("key: {0}")]
    Key(#[from] dmr::keys::KeyError),
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("gRPC connection: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC call refused: {0}")]
    Status(#[from] tonic::Status),
    #[error("expected the directory first, got {0}")]
    UnexpectedFrame(String),
    #[error("{0} did not answer in time")]
    Timeout(&'static str),
    #[error("a worker thread panicked")]
    WorkerPanicked,
}
