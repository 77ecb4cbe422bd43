//! A session's send pipeline: sends are validated and their publish frames written in arrival
//! order; their confirms are awaited concurrently, at most [`super::SENDS_IN_FLIGHT`] at once, each
//! answered as soon as RabbitMQ confirmed (or refused) it.

use super::Transport;
use crate::Core;
use crate::router;
use crate::router::SendBody;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

pub(super) struct SendPipeline<T: Transport> {
    core: Arc<Core>,
    agent_id: String,
    transport: Arc<T>,
    slots: Arc<Semaphore>,
    confirms: TaskTracker,
}

impl<T: Transport> SendPipeline<T> {
    pub(super) fn new(core: Arc<Core>, agent_id: String, transport: Arc<T>) -> Self {
        Self {
            core,
            agent_id,
            transport,
            slots: Arc::new(Semaphore::new(super::SENDS_IN_FLIGHT)),
            confirms: TaskTracker::new(),
        }
    }

    /// Waits for a free slot, writes the publish frame (so order is kept), and answers the send in
    /// the background once its outcome is known.
    pub(super) async fn start(&self, message: SendBody, reply: T::Reply) {
        // The semaphore is never closed, so acquiring only fails if it were.
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return;
        };
        let received = Instant::now();
        let outcome = router::start_send(&self.core, &self.agent_id, message).await;
        let (core, transport) = (self.core.clone(), self.transport.clone());
        self.confirms.spawn(async move {
            let outcome = outcome.await;
            core.metrics
                .message_processing
                .observe(received.elapsed().as_secs_f64());
            transport.answer(reply, &outcome).await;
            drop(slot);
        });
    }

    /// Resolves once every started send was answered.
    pub(super) fn finish(&self) -> impl Future<Output = ()> + use<T> {
        self.confirms.close();
        let confirms = self.confirms.clone();
        async move { confirms.wait().await }
    }
}
