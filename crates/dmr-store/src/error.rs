//! The store's error type.

use std::path::PathBuf;
use std::sync::Arc;

use crate::QueueArgs;

/// Everything a [`Store`](crate::Store) or [`Consumer`](crate::Consumer) call can fail with.
///
/// Cheap to clone (the underlying I/O and database errors are shared), because one failed group
/// commit is reported to every caller whose operation was in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Another process (or another `Store` in this process) holds the data directory.
    #[error(
        "the data directory {} is in use by another server process{}; stop it or choose another directory",
        path.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The data directory.
        path: PathBuf,
        /// The pid recorded in the lock file by the holder, when it could be read.
        pid: Option<u32>,
    },
    /// The queue has not been declared (or has been deleted).
    #[error("queue {0:?} not found")]
    QueueNotFound(String),
    /// The queue exists with other arguments (RabbitMQ's PRECONDITION_FAILED).
    #[error("queue {queue:?} already exists with different arguments: existing {existing:?}, requested {requested:?}")]
    ArgsDiffer {
        /// The queue.
        queue: String,
        /// The arguments it was declared with.
        existing: QueueArgs,
        /// The arguments of the refused declaration.
        requested: QueueArgs,
    },
    /// The consumer holds no unacknowledged delivery with this sequence number.
    #[error("no unacknowledged delivery {seq} of queue {queue:?} held by this consumer")]
    UnknownDelivery {
        /// The queue.
        queue: String,
        /// The sequence number given.
        seq: u64,
    },
    /// A file-system error on a path of the data directory.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// An error of the database file.
    #[error("database error on {}: {source}", path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// The error.
        #[source]
        source: Arc<redb::Error>,
    },
    /// A record of the database file could not be decoded.
    #[error("corrupt record in {}: {detail}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The store has been closed.
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    pub(crate) fn db(path: &std::path::Path, err: impl Into<redb::Error>) -> Self {
        StoreError::Database {
            path: path.to_path_buf(),
            source: Arc::new(err.into()),
        }
    }

    pub(crate) fn io(path: &std::path::Path, err: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            source: Arc::new(err),
        }
    }
}
