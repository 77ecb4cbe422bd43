//! The DMR wire contract, pure and free of I/O. "compat §N" cites section N of `docs/compat.md`.
//!
//! - [`proto`]: the generated gRPC types and service stubs (`dmr.v1`).
//! - [`message`]: the v1 REST message and its validation (the original's DTO rules, compat §1).
//! - [`envelope`]: the agent ⇄ server envelope, its validation (compat §5) and queue formats.
//! - [`jose`]: JWS-in-JWE end-to-end encryption byte-compatible with the original's `jose` usage (compat §3).
//! - [`directory`]: the CentOps agent list format (compat §7) and key parsing.
//! - [`token`]: the legacy agents' handshake JWT (compat §4).
//! - [`policy`]: the relay policy (who may send to whom) and per-agent limit overrides.
//! - [`receipt`]: delivery receipts signed by the recipient agent (the format only, not wired yet).
//!
//! **Invariant:** nothing here opens a socket, spawns a task or reads the environment.

pub mod directory;
pub mod envelope;
pub mod error;
pub mod jose;
pub mod keys;
pub mod message;
pub mod policy;
pub mod receipt;
pub mod time;
pub mod token;

/// Generated protobuf and gRPC code for package `dmr.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("dmr.v1");

    /// Encoded file descriptor set of `dmr.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dmr_v1_descriptor");
}

pub use error::{ErrorType, MessageError};
