//! The end-to-end tests' harness is the shared test kit (`crates/dmr-testkit`, also used by the
//! benchmark); this module only re-exports it, so test files keep writing `mod support;` and
//! `use support::*;` (and `support::node::…`, `support::processes::…`).

pub use dmr_testkit::*;
