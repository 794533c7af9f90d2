//! A coordinator in memory, for tests: answers each request line with what the test says,
//! and can lose answers on the way back.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use wire::coordinator::{NodeAnswer, NodeRequest};

use super::{Channel, ChannelError};

type Responder = Box<dyn FnMut(&NodeRequest) -> Option<NodeAnswer> + Send>;

#[derive(Default)]
struct Inner {
    requests: Vec<NodeRequest>,
    responder: Option<Responder>,
    outbox: VecDeque<String>,
    answers_to_drop: u32,
    resets: u32,
}

/// The test's handle; [`FakeCoordinator::channel`] is the agent's.
#[derive(Clone, Default)]
pub struct FakeCoordinator {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for FakeCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeCoordinator")
    }
}

impl FakeCoordinator {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Each request gets `respond`'s answer (`None`: no answer).
    pub fn answer_with(
        &self,
        respond: impl FnMut(&NodeRequest) -> Option<NodeAnswer> + Send + 'static,
    ) {
        self.inner().responder = Some(Box::new(respond));
    }

    /// The answers to the next `count` requests are lost.
    pub fn drop_answers(&self, count: u32) {
        self.inner().answers_to_drop = count;
    }

    /// An answer to an earlier request, waiting to be read.
    pub fn push_stale(&self, answer: NodeAnswer) {
        let line = serde_json::to_string(&answer).unwrap_or_default();
        self.inner().outbox.push_back(line);
    }

    pub fn requests(&self) -> Vec<NodeRequest> {
        self.inner().requests.clone()
    }

    pub fn resets(&self) -> u32 {
        self.inner().resets
    }

    pub fn channel(&self) -> Box<dyn Channel> {
        Box::new(FakeChannel {
            coordinator: self.clone(),
        })
    }
}

#[derive(Debug)]
struct FakeChannel {
    coordinator: FakeCoordinator,
}

impl Channel for FakeChannel {
    fn send_line(&mut self, line: &str, _deadline: Instant) -> Result<(), ChannelError> {
        let request: NodeRequest = serde_json::from_str(line)
            .map_err(|e| ChannelError::Io(std::io::Error::other(e.to_string())))?;
        let mut inner = self.coordinator.inner();
        inner.requests.push(request.clone());
        let answer = inner
            .responder
            .as_mut()
            .and_then(|respond| respond(&request));
        if inner.answers_to_drop > 0 {
            inner.answers_to_drop -= 1;
        } else if let Some(answer) = answer {
            let line = serde_json::to_string(&answer).unwrap_or_default();
            inner.outbox.push_back(line);
        }
        Ok(())
    }

    fn read_line(&mut self, _deadline: Instant) -> Result<String, ChannelError> {
        self.coordinator
            .inner()
            .outbox
            .pop_front()
            .ok_or(ChannelError::Timeout)
    }

    fn reset(&mut self) {
        let mut inner = self.coordinator.inner();
        inner.resets += 1;
        inner.outbox.clear();
    }

    fn describe(&self) -> String {
        "the test's coordinator".into()
    }
}
