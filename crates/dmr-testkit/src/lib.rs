//! The one test kit of DMR, shared by the end-to-end tests (`tests/*.rs`, through `tests/support`)
//! and the benchmark (`crates/dmr-bench`): a real server and real agents in-process on ephemeral
//! ports, real mutual TLS with certificates from the project's own PKI, a real RabbitMQ (never a
//! mock), and an HTTP sink standing in for the internal services.
//!
//! Every relay uses fresh agent ids and its own validation-failures queue, and deletes the queues
//! it created, also when the test panics ([`QueueGuard`]), so tests can run in parallel against the
//! shared broker. Tests that must stop or break a broker use a [`node::PrivateBroker`] instead.
//!
//! Test helpers panic with a clear message on set-up failures (a test cannot go on anyway); the
//! few entry points the benchmark needs return [`KitError`].
//!
//! Never a dependency of the `dmr` library itself: only of its integration tests and of the bench.

pub mod broker;
pub mod centops;
pub mod error;
pub mod legacy;
pub mod messages;
pub mod node;
pub mod pki;
pub mod poll;
pub mod processes;
pub mod relay;
pub mod scrape;
pub mod servers;
pub mod session;
pub mod sink;

pub use broker::{
    BrokerProbe, QueueGuard, agent_queues, delete_queues, delete_queues_blocking, rabbit_config, test_engine,
};
pub use centops::CentOpsStub;
pub use error::KitError;
pub use legacy::LegacyAgent;
pub use messages::{seed_message, v1_message};
pub use pki::TestPki;
pub use poll::{eventually, eventually_async};
pub use relay::Relay;
pub use scrape::metric;
pub use servers::{
    RunningAgent, RunningServer, agent_config, base_agent_config, base_server_config, server_config, start_agent,
    start_server,
};
pub use sink::{Sink, post};

/// Installs the crypto provider once per process; `TEST_LOG=<filter>` turns on logs.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
        }
    });
}

/// The repository root (where `tests/node` lives), whichever crate's test is running.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
