//! A session's send pipeline: sends are validated and their publish frames written in arrival
//! order; their confirms are awaited concurrently, each answered as soon as the broker confirmed (or
//! refused) it. At most the agent's `LIMIT_SENDS_IN_FLIGHT` (or its relay-policy override) await
//! their answer at once: a send beyond that is refused at once (RESOURCE_EXHAUSTED), not queued
//! behind the others, so a flooding agent cannot hold the session's reader.

use super::Transport;
use crate::Core;
use crate::limits::LimitExceeded;
use crate::router;
use crate::router::SendBody;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio_util::task::TaskTracker;

pub(super) struct SendPipeline<T: Transport> {
    core: Arc<Core>,
    agent_id: String,
    transport: Arc<T>,
    /// Sends awaiting their answer.
    in_flight: Arc<AtomicUsize>,
    confirms: TaskTracker,
}

impl<T: Transport> SendPipeline<T> {
    pub(super) fn new(core: Arc<Core>, agent_id: String, transport: Arc<T>) -> Self {
        Self {
            core,
            agent_id,
            transport,
            in_flight: Arc::new(AtomicUsize::new(0)),
            confirms: TaskTracker::new(),
        }
    }

    /// Refuses the send if the agent has its maximum in flight; otherwise writes the publish frame
    /// (so order is kept) and answers the send in the background once its outcome is known.
    pub(super) async fn start(&self, message: SendBody, reply: T::Reply) {
        let limits = router::send_limits(&self.core, &self.agent_id);
        if self.in_flight.load(Ordering::Acquire) >= limits.in_flight as usize {
            let over = LimitExceeded::InFlight { max: limits.in_flight };
            let outcome = router::over_limit(&self.core, &self.agent_id, over);
            self.transport.answer(reply, &outcome).await;
            return;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let received = Instant::now();
        let outcome = router::start_send(&self.core, &self.agent_id, &limits, message).await;
        let (core, transport, in_flight) = (self.core.clone(), self.transport.clone(), self.in_flight.clone());
        self.confirms.spawn(async move {
            let outcome = outcome.await;
            core.metrics
                .message_processing
                .observe(received.elapsed().as_secs_f64());
            transport.answer(reply, &outcome).await;
            in_flight.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Resolves once every started send was answered.
    pub(super) fn finish(&self) -> impl Future<Output = ()> + use<T> {
        self.confirms.close();
        let confirms = self.confirms.clone();
        async move { confirms.wait().await }
    }
}
