//! The agent's client of the coordinator (kept by the storage daemon): its state, and
//! claims of a dead peer's identities while hostd is away.
//!
//! One JSON [`NodeRequest`] line out, one JSON [`NodeAnswer`] line back
//! ([`wire::coordinator`]), over a [`Channel`]: the node's Unix socket in process mode
//! ([`unix`]), the guest's virtio-serial port in a guest ([`virtio`]). A call that times
//! out, finds the channel closed or gets a line it cannot read drops the connection (a
//! claim tries once more at once, on a new one). A claim keeps its number until it is answered, however
//! many calls that takes: the coordinator answers a number it has seen with the answer it
//! gave, so a claim carried out whose answer was lost is learnt, not made twice.

pub mod unix;
pub mod virtio;

#[cfg(test)]
pub mod double;

use std::time::{Duration, Instant};

use wire::agent::CoordinatorAddress;
use wire::coordinator::{CoordinatorState, LostReason, NodeAnswer, NodeRequest};

/// How long a state request may take.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a claim may take: the coordinator preempts the victim's keys on every disk
/// before it answers.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries per claim: the second one on a new connection. A state request is tried once
/// (on a new connection if the last one failed): the monitor asks again a second later,
/// and a coordinator that hangs must not hold the monitor for long.
const CLAIM_ATTEMPTS: u32 = 2;
/// The longest answer line read (a state of 8 nodes is a few kB).
pub const MAX_LINE: usize = 1 << 20;

/// A connection to the coordinator, opened on first use and again after [`Channel::reset`].
pub trait Channel: Send + std::fmt::Debug {
    /// Sends one line (`line` has no newline; the channel adds it).
    fn send_line(&mut self, line: &str, deadline: Instant) -> Result<(), ChannelError>;
    /// Reads the next line (without its newline).
    fn read_line(&mut self, deadline: Instant) -> Result<String, ChannelError>;
    /// Drops the connection: the next call opens a new one.
    fn reset(&mut self);
    /// Where the channel leads, for logs.
    fn describe(&self) -> String;
}

/// Why a channel could not carry a line.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot open {what}")]
    Open {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no virtio-serial port is named {name:?} under {dir}")]
    NoPort { name: String, dir: String },
    #[error("the other side is not connected (no coordinator behind the port)")]
    NotConnected,
    #[error("the connection was closed")]
    Closed,
    #[error("no answer in time")]
    Timeout,
    #[error("an answer line is longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("cannot read or write the connection")]
    Io(#[source] std::io::Error),
}

/// Why a call got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the coordinator at {at} is unreachable")]
    Unreachable {
        at: String,
        #[source]
        source: ChannelError,
    },
    #[error("cannot write the request")]
    Request(#[source] serde_json::Error),
    #[error("the coordinator's answer cannot be read: {line:?}")]
    Malformed {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the coordinator answered with an error: {message}")]
    Coordinator { message: String },
    #[error("the claim of node {victim} has no answer yet: it is asked again before another")]
    Unanswered { victim: u32 },
}

/// A claim's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This node owns `identities` at `generation`; the victim is out of the membership.
    Won {
        generation: u64,
        identities: Vec<u32>,
        preempted: Vec<String>,
        not_preempted: Vec<String>,
    },
    /// Nothing changed.
    Lost {
        reason: LostReason,
        state: CoordinatorState,
    },
}

/// The coordinator's client of one agent life.
#[derive(Debug)]
pub struct CoordinatorClient {
    channel: Box<dyn Channel>,
    /// The number the next new claim gets.
    next_number: u64,
    /// A claim asked and not answered yet: `(victim, number)`.
    unanswered: Option<(u32, u64)>,
}

impl CoordinatorClient {
    /// A client whose claims are numbered from `first_number` on; the numbers of one node
    /// must grow across its agent's lives (see [`first_number`]).
    pub fn new(channel: Box<dyn Channel>, first_number: u64) -> Self {
        Self {
            channel,
            next_number: first_number.max(1),
            unanswered: None,
        }
    }

    /// Where the coordinator is, for logs.
    pub fn describe(&self) -> String {
        self.channel.describe()
    }

    /// The victim of a claim asked and not answered yet.
    pub fn unanswered(&self) -> Option<u32> {
        self.unanswered.map(|(victim, _)| victim)
    }

    /// Opens the connection and asks the state once, at the agent's start, so the
    /// coordinator knows this node's process before anyone claims it (in process mode a
    /// won claim kills the victim's process, known from its connection). The connection
    /// stays open. Takes at most [`STATE_TIMEOUT`]; an unreachable coordinator is only
    /// logged (the monitor asks again when it needs the coordinator).
    pub fn connect_now(&mut self) {
        match self.state() {
            Ok(state) => log::info!(
                "coordinator at {} reached (generation {})",
                self.describe(),
                state.generation
            ),
            Err(error) => log::warn!(
                "coordinator not reached at the start: {}",
                wire::error_chain::one_line(&error)
            ),
        }
    }

    /// The coordinator's state.
    pub fn state(&mut self) -> Result<CoordinatorState, CallError> {
        let answer = self.call(&NodeRequest::State, STATE_TIMEOUT, 1, |answer| {
            matches!(answer, NodeAnswer::State { .. } | NodeAnswer::Error { .. })
        })?;
        match answer {
            NodeAnswer::State { state } => Ok(state),
            NodeAnswer::Error { message } => Err(CallError::Coordinator { message }),
            // `call` returns only what the filter took.
            NodeAnswer::Won { .. } | NodeAnswer::Lost { .. } => Err(CallError::Coordinator {
                message: "a claim's answer to a state request".into(),
            }),
        }
    }

    /// Claims every identity `victim` owns. Without an answer (or with the coordinator's
    /// error) the claim stays unanswered, and the next claim must be of the same victim:
    /// it is asked again with the same number.
    pub fn claim(&mut self, victim: u32) -> Result<ClaimOutcome, CallError> {
        let number = match self.unanswered {
            Some((asked, number)) if asked == victim => number,
            Some((asked, _)) => return Err(CallError::Unanswered { victim: asked }),
            None => {
                let number = self.next_number;
                self.next_number += 1;
                self.unanswered = Some((victim, number));
                number
            }
        };
        let request = NodeRequest::Claim { victim, number };
        let answer = self.call(
            &request,
            CLAIM_TIMEOUT,
            CLAIM_ATTEMPTS,
            |answer| match answer {
                NodeAnswer::Won { number: n, .. } | NodeAnswer::Lost { number: n, .. } => {
                    *n == number
                }
                NodeAnswer::Error { .. } => true,
                NodeAnswer::State { .. } => false,
            },
        )?;
        let outcome = match answer {
            NodeAnswer::Won {
                generation,
                identities,
                preempted,
                not_preempted,
                ..
            } => ClaimOutcome::Won {
                generation,
                identities,
                preempted,
                not_preempted,
            },
            NodeAnswer::Lost { reason, state, .. } => ClaimOutcome::Lost { reason, state },
            // Nothing known of the claim: it is asked again, with its number.
            NodeAnswer::Error { message } => return Err(CallError::Coordinator { message }),
            NodeAnswer::State { .. } => {
                return Err(CallError::Coordinator {
                    message: "a state answer to a claim".into(),
                });
            }
        };
        self.unanswered = None;
        Ok(outcome)
    }

    /// Sends `request` and returns the first answer `expected` takes; a line it does not
    /// take (the late answer of an earlier call on a port that outlived it) is skipped.
    fn call(
        &mut self,
        request: &NodeRequest,
        timeout: Duration,
        attempts: u32,
        expected: impl Fn(&NodeAnswer) -> bool,
    ) -> Result<NodeAnswer, CallError> {
        let line = serde_json::to_string(request).map_err(CallError::Request)?;
        let mut last = None;
        for _ in 0..attempts {
            match self.attempt(&line, timeout, &expected) {
                Ok(answer) => return Ok(answer),
                Err(error) => {
                    self.channel.reset();
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or_else(|| CallError::Unreachable {
            at: self.channel.describe(),
            source: ChannelError::Closed,
        }))
    }

    fn attempt(
        &mut self,
        line: &str,
        timeout: Duration,
        expected: &impl Fn(&NodeAnswer) -> bool,
    ) -> Result<NodeAnswer, CallError> {
        let deadline = Instant::now() + timeout;
        let unreachable = |channel: &dyn Channel, source| CallError::Unreachable {
            at: channel.describe(),
            source,
        };
        self.channel
            .send_line(line, deadline)
            .map_err(|source| unreachable(self.channel.as_ref(), source))?;
        loop {
            let answer_line = self
                .channel
                .read_line(deadline)
                .map_err(|source| unreachable(self.channel.as_ref(), source))?;
            let answer: NodeAnswer =
                serde_json::from_str(answer_line.trim()).map_err(|source| {
                    CallError::Malformed {
                        line: answer_line.chars().take(200).collect(),
                        source,
                    }
                })?;
            if expected(&answer) {
                return Ok(answer);
            }
            log::debug!("coordinator: skipped an answer to an earlier request: {answer_line}");
        }
    }
}

/// The first claim number of this agent life: the Unix time in nanoseconds, so that a
/// later life's numbers are above every earlier one's (an earlier life claims far fewer
/// times than it lives nanoseconds).
pub fn first_number() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
}

/// The channel to the coordinator at `address`; `virtio_ports` is where the guest lists
/// its virtio-serial ports (`/sys/class/virtio-ports`).
pub fn channel(address: &CoordinatorAddress, virtio_ports: &std::path::Path) -> Box<dyn Channel> {
    match address {
        CoordinatorAddress::Socket(path) => Box::new(unix::UnixChannel::new(path.clone())),
        CoordinatorAddress::Virtio => Box::new(virtio::VirtioChannel::new(
            virtio_ports.to_owned(),
            std::path::PathBuf::from("/dev"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use wire::coordinator::MemberRecord;

    use super::double::FakeCoordinator;
    use super::*;

    fn state(generation: u64) -> CoordinatorState {
        CoordinatorState {
            generation,
            nodes: vec![MemberRecord {
                node: 1,
                member: true,
                since: 0,
                takers: vec![0],
            }],
            owners: vec![],
        }
    }

    /// A claim whose answer was lost is asked again on a new connection with the same
    /// number, and a later claim gets a new one.
    #[test]
    fn a_retried_claim_reuses_its_number() {
        let fake = FakeCoordinator::default();
        fake.answer_with(|request| match request {
            NodeRequest::Claim { number, .. } => Some(NodeAnswer::Won {
                number: *number,
                generation: 4,
                identities: vec![1],
                preempted: vec!["b".into()],
                not_preempted: vec![],
            }),
            NodeRequest::State => Some(NodeAnswer::State { state: state(4) }),
        });
        let mut client = CoordinatorClient::new(fake.channel(), 100);
        // The answers to both attempts of the first call, and to the first attempt of the
        // next, are lost on the way back.
        fake.drop_answers(3);
        assert!(matches!(
            client.claim(1),
            Err(CallError::Unreachable { .. })
        ));
        assert_eq!(client.unanswered(), Some(1));
        assert!(matches!(
            client.claim(2),
            Err(CallError::Unanswered { victim: 1 })
        ));
        let won = client.claim(1).unwrap();
        assert!(matches!(won, ClaimOutcome::Won { generation: 4, .. }));
        assert_eq!(client.unanswered(), None);
        client.claim(2).unwrap();
        let numbers: Vec<u64> = fake
            .requests()
            .iter()
            .filter_map(|r| match r {
                NodeRequest::Claim { number, .. } => Some(*number),
                NodeRequest::State => None,
            })
            .collect();
        assert_eq!(numbers, [100, 100, 100, 100, 101]);
        assert!(fake.resets() >= 3, "each failed attempt reconnects");
    }

    /// A late answer to an earlier request (a port outlives a connection) is skipped.
    #[test]
    fn answers_to_other_requests_are_skipped() {
        let fake = FakeCoordinator::default();
        fake.answer_with(|request| match request {
            NodeRequest::State => Some(NodeAnswer::State { state: state(2) }),
            NodeRequest::Claim { number, .. } => Some(NodeAnswer::Lost {
                number: *number,
                reason: LostReason::VictimGone,
                state: state(3),
            }),
        });
        fake.push_stale(NodeAnswer::Lost {
            number: 7,
            reason: LostReason::NotMember,
            state: state(1),
        });
        let mut client = CoordinatorClient::new(fake.channel(), 8);
        assert_eq!(client.state().unwrap().generation, 2);
        fake.push_stale(NodeAnswer::State { state: state(1) });
        let lost = client.claim(1).unwrap();
        assert!(matches!(
            lost,
            ClaimOutcome::Lost {
                reason: LostReason::VictimGone,
                ..
            }
        ));
    }

    /// At the start one state request goes out; no answer is no failure.
    #[test]
    fn connecting_at_the_start_asks_the_state_once() {
        let fake = FakeCoordinator::default();
        fake.answer_with(|_| Some(NodeAnswer::State { state: state(3) }));
        let mut client = CoordinatorClient::new(fake.channel(), 1);
        client.connect_now();
        assert_eq!(fake.requests(), [NodeRequest::State]);
        assert_eq!(fake.resets(), 0, "the connection stays open");

        let silent = FakeCoordinator::default();
        silent.answer_with(|_| None);
        let mut client = CoordinatorClient::new(silent.channel(), 1);
        let started = Instant::now();
        client.connect_now();
        assert!(started.elapsed() < STATE_TIMEOUT * 2);
        assert_eq!(silent.requests(), [NodeRequest::State]);
    }

    /// The coordinator's error leaves a claim unanswered: nothing is known of it.
    #[test]
    fn an_error_answer_keeps_the_claim_open() {
        let fake = FakeCoordinator::default();
        fake.answer_with(|_| {
            Some(NodeAnswer::Error {
                message: "cannot persist".into(),
            })
        });
        let mut client = CoordinatorClient::new(fake.channel(), 1);
        assert!(matches!(
            client.claim(1),
            Err(CallError::Coordinator { .. })
        ));
        assert_eq!(client.unanswered(), Some(1));
    }
}
