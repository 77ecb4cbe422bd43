//! The relay policy in force ([`dmr::policy`]): who may send to whom, and per-agent limits. Loaded
//! from `POLICY_URL` (an http(s) URL or a file) by the same rules as the directory
//! ([`crate::refresh`]); without `POLICY_URL` everyone may message everyone.
//!
//! **Invariants:**
//! - every send is checked against the policy in force when it arrives, so a change applies to
//!   sessions already open;
//! - a configured policy that has not loaded yet admits no session (fail closed): the server is not
//!   ready until it loads, as with the directory;
//! - a refused send is never queued.

use crate::Core;
use dmr::policy::{Policy, PolicyError};
use std::sync::Arc;
use tokio::sync::watch;

impl crate::refresh::Document for Policy {
    type Error = PolicyError;
    const WHAT: &'static str = "relay policy";

    fn parse(bytes: &[u8]) -> Result<Self, PolicyError> {
        Policy::from_json(bytes)
    }

    fn error_kind(error: &PolicyError) -> &'static str {
        match error {
            PolicyError::Format(_) => "invalid_json",
            PolicyError::UnknownGroup { .. } => "unknown_group",
            PolicyError::BadMember { .. } => "bad_member",
            PolicyError::BadGroupName(_) => "bad_group_name",
            PolicyError::ZeroLimit { .. } => "zero_limit",
        }
    }
}

/// The policy in force, shared by every session.
pub struct PolicyHandle {
    current: watch::Sender<Arc<Policy>>,
    /// False while a configured policy has not loaded yet.
    loaded: watch::Sender<bool>,
}

impl PolicyHandle {
    /// Allow-all, and loaded unless a policy source is configured.
    pub fn new(configured: bool) -> Self {
        Self {
            current: watch::channel(Arc::new(Policy::allow_all())).0,
            loaded: watch::channel(!configured).0,
        }
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        self.current.borrow().clone()
    }

    /// True once the configured policy loaded (always, when none is configured).
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Watches [`PolicyHandle::is_loaded`].
    pub fn watch_loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    /// Puts `next` in force.
    pub fn replace(&self, next: Policy) {
        self.current.send_replace(Arc::new(next));
        self.loaded.send_replace(true);
    }
}

/// The policy as a refreshed document.
pub(crate) struct PolicyTarget(pub Arc<Core>);

impl crate::refresh::Target for PolicyTarget {
    type Doc = Policy;

    fn source(&self) -> &str {
        self.0.cfg.policy.url.as_deref().unwrap_or_default()
    }

    fn is_loaded(&self) -> bool {
        self.0.policy.is_loaded()
    }

    async fn apply(&self, next: Policy) {
        if *self.0.policy.current() != next || !self.0.policy.is_loaded() {
            tracing::info!(rules = next.rule_count(), "relay policy in force");
            self.0.metrics.policy_rules.set(next.rule_count() as i64);
            self.0.policy.replace(next);
        }
    }

    fn failed(&self, kind: &'static str) {
        self.0.metrics.policy_failures.with_label_values(&[kind]).inc();
        self.0.metrics.policy_refresh_failing.set(1);
    }

    fn succeeded(&self) {
        self.0.metrics.policy_refresh_failing.set(0);
    }
}
