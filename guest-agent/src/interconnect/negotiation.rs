//! Takeover negotiation: before a planned takeover, the taker asks the identity's holder
//! over the interconnect whether it will give the identity up, and the holder may refuse
//! with a reason (ONTAP's negotiated takeover: a partner that cannot release cleanly says
//! so before anyone cuts its clients off).
//!
//! The failover monitor asks through a [`NegotiationClient`]; the connection manager's
//! thread carries the question on a control channel and answers the peer's questions from
//! the node's [`Veto`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use interconnect::manager::Manager;
use shm::Refusal;

/// The negotiation's channel.
pub const NEGOTIATION_CHANNEL: u16 = 3;

/// A negotiation message, as it travels on [`NEGOTIATION_CHANNEL`]: a tag byte, then
/// little-endian words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// "Will you give `identity` up?"
    Request { id: u64, identity: u32 },
    /// The answer to request `id`: None agrees.
    Answer { id: u64, refusal: Option<Refusal> },
}

impl Message {
    pub fn encode(self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(25);
        match self {
            Message::Request { id, identity } => {
                bytes.push(1);
                bytes.extend_from_slice(&id.to_le_bytes());
                bytes.extend_from_slice(&u64::from(identity).to_le_bytes());
            }
            Message::Answer { id, refusal } => {
                bytes.push(2);
                bytes.extend_from_slice(&id.to_le_bytes());
                bytes.extend_from_slice(&refusal.map_or(0, Refusal::to_word).to_le_bytes());
            }
        }
        bytes
    }

    /// None for anything that is not a whole message of a known kind.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (&tag, rest) = bytes.split_first()?;
        let words: Vec<u64> = rest
            .chunks_exact(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                u64::from_le_bytes(word)
            })
            .collect();
        match (tag, rest.len() % 8, &words[..]) {
            (1, 0, &[id, identity]) => Some(Message::Request {
                id,
                identity: u32::try_from(identity).ok()?,
            }),
            (2, 0, &[id, refusal]) => Some(Message::Answer {
                id,
                refusal: (refusal != 0).then(|| Refusal::from_word(refusal)),
            }),
            _ => None,
        }
    }
}

/// What the holder said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Agreed,
    Refused(Refusal),
    /// No answer: no link to the holder is up, or it did not answer in time.
    Unreachable(String),
}

/// Whether this node would give an identity up now.
pub trait Veto: Send + Sync + std::fmt::Debug {
    /// None: it would; else why not.
    fn check(&self, identity: u32) -> Option<Refusal>;
}

/// A question from the failover monitor to the connection manager.
#[derive(Debug)]
pub struct Ask {
    pub peer: u16,
    pub identity: u32,
    pub reply: Sender<Answer>,
}

/// The failover monitor's end.
#[derive(Debug, Clone)]
pub struct NegotiationClient {
    asks: Sender<Ask>,
    /// Wakes the connection manager's thread, which may be waiting for frames.
    wake: Arc<UnixDatagram>,
}

/// The connection manager's end: the questions, and a socket readable when one is put.
#[derive(Debug)]
pub struct Questions {
    asks: Receiver<Ask>,
    wake: UnixDatagram,
}

/// A client and the connection manager's end of its questions.
pub fn pair() -> std::io::Result<(NegotiationClient, Questions)> {
    let (asks, questions) = unbounded();
    let (wake, woken) = UnixDatagram::pair()?;
    woken.set_nonblocking(true)?;
    wake.set_nonblocking(true)?;
    Ok((
        NegotiationClient {
            asks,
            wake: Arc::new(wake),
        },
        Questions {
            asks: questions,
            wake: woken,
        },
    ))
}

impl NegotiationClient {
    /// Asks node `peer` whether it gives `identity` up; waits at most `timeout`.
    pub fn ask(&self, peer: u16, identity: u32, timeout: Duration) -> Answer {
        let (reply, answer) = bounded(1);
        let ask = Ask {
            peer,
            identity,
            reply,
        };
        if self.asks.send(ask).is_err() {
            return Answer::Unreachable("the interconnect is not running".into());
        }
        // A full socket already has a wake-up in it.
        let _ = self.wake.send(&[1]);
        answer
            .recv_timeout(timeout)
            .unwrap_or_else(|_| Answer::Unreachable(format!("no answer within {timeout:?}")))
    }
}

/// The connection manager's side: sends questions, answers the peers', matches answers.
#[derive(Debug)]
pub struct Negotiator {
    questions: Questions,
    veto: Arc<dyn Veto>,
    /// Questions sent and not answered: id → (peer, reply, deadline).
    pending: BTreeMap<u64, (u16, Sender<Answer>, Instant)>,
    next_id: u64,
    timeout: Duration,
}

impl Negotiator {
    /// `timeout`: how long a question waits for its answer before it is unreachable.
    pub fn new(questions: Questions, veto: Arc<dyn Veto>, timeout: Duration) -> Self {
        Self {
            questions,
            veto,
            pending: BTreeMap::new(),
            next_id: 1,
            timeout,
        }
    }

    /// A descriptor readable when a question waits.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.questions.wake.as_fd()
    }

    /// The questions waiting, taken.
    pub fn take_questions(&mut self) -> Vec<Ask> {
        let mut drained = [0u8; 64];
        while self.questions.wake.recv(&mut drained).is_ok() {}
        self.questions.asks.try_iter().collect()
    }

    /// Sends `ask` on `manager` (its peer's), or answers it at once when `reachable` is
    /// false.
    pub fn send(&mut self, ask: Ask, manager: Option<(&mut Manager, bool)>, now: Instant) {
        match manager {
            Some((manager, true)) => {
                let id = self.next_id;
                self.next_id += 1;
                let message = Message::Request {
                    id,
                    identity: ask.identity,
                };
                match manager.send(NEGOTIATION_CHANNEL, message.encode()) {
                    Ok(_) => {
                        self.pending
                            .insert(id, (ask.peer, ask.reply, now + self.timeout));
                    }
                    Err(error) => {
                        let _ = ask.reply.send(Answer::Unreachable(error.to_string()));
                    }
                }
            }
            Some((_, false)) => {
                let _ = ask.reply.send(Answer::Unreachable(format!(
                    "no interconnect link to node {} is up",
                    ask.peer
                )));
            }
            None => {
                let _ = ask.reply.send(Answer::Unreachable(format!(
                    "node {} is not a peer of this node",
                    ask.peer
                )));
            }
        }
    }

    /// A message arrived on the negotiation channel from `peer` (whose manager it is).
    pub fn deliver(&mut self, peer: u16, manager: &mut Manager, bytes: &[u8]) {
        match Message::decode(bytes) {
            Some(Message::Request { id, identity, .. }) => {
                let refusal = self.veto.check(identity);
                match refusal {
                    Some(refusal) => log::info!(
                        "interconnect: node {peer} asks for identity {identity}: refused, {}",
                        refusal.describe()
                    ),
                    None => {
                        log::info!("interconnect: node {peer} asks for identity {identity}: agreed")
                    }
                }
                let _ = manager.send(
                    NEGOTIATION_CHANNEL,
                    Message::Answer { id, refusal }.encode(),
                );
            }
            Some(Message::Answer { id, refusal }) => {
                // Only the peer asked may answer.
                if self
                    .pending
                    .get(&id)
                    .is_some_and(|(asked, _, _)| *asked == peer)
                    && let Some((_, reply, _)) = self.pending.remove(&id)
                {
                    let _ = reply.send(match refusal {
                        None => Answer::Agreed,
                        Some(refusal) => Answer::Refused(refusal),
                    });
                }
            }
            None => log::warn!("interconnect: a malformed negotiation message from node {peer}"),
        }
    }

    /// Questions past their deadline are answered unreachable.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (_, _, deadline))| *deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some((peer, reply, _)) = self.pending.remove(&id) {
                let _ = reply.send(Answer::Unreachable(format!(
                    "node {peer} did not answer within {:?}",
                    self.timeout
                )));
            }
        }
    }

    /// When the next question expires.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|(_, _, deadline)| *deadline)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use interconnect::manager::{Class, ManagerConfig};

    #[derive(Debug)]
    struct Refuses(Option<Refusal>);

    impl Veto for Refuses {
        fn check(&self, _identity: u32) -> Option<Refusal> {
            self.0
        }
    }

    #[test]
    fn messages_read_back_and_garbage_is_none() {
        for message in [
            Message::Request { id: 7, identity: 1 },
            Message::Answer {
                id: 7,
                refusal: None,
            },
            Message::Answer {
                id: 8,
                refusal: Some(Refusal::DiskFailing),
            },
        ] {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
        assert_eq!(Message::decode(&[]), None);
        assert_eq!(Message::decode(&[1, 2, 3]), None);
        assert_eq!(Message::decode(&[9; 17]), None);
        let mut long = Message::Answer {
            id: 1,
            refusal: None,
        }
        .encode();
        long.push(0);
        assert_eq!(Message::decode(&long), None);
    }

    /// Two managers joined directly: a question crosses, the holder's veto answers it.
    fn ask_through(veto: Option<Refusal>, reachable: bool) -> Answer {
        let now = Instant::now();
        let config = ManagerConfig::default();
        let mut asker = Manager::new(0, 1, 1, 1, config, now);
        let mut holder = Manager::new(1, 0, 2, 1, config, now);
        for m in [&mut asker, &mut holder] {
            m.open(NEGOTIATION_CHANNEL, Class::Control, now);
        }
        let (client, questions) = pair().unwrap();
        let mut mine = Negotiator::new(questions, Arc::new(Refuses(None)), Duration::from_secs(1));
        let (_unused, theirs_questions) = pair().unwrap();
        let mut theirs = Negotiator::new(
            theirs_questions,
            Arc::new(Refuses(veto)),
            Duration::from_secs(1),
        );
        let asked = std::thread::spawn(move || client.ask(1, 0, Duration::from_secs(5)));
        // The monitor's question arrives on the runtime's side.
        let ask = loop {
            if let Some(ask) = mine.take_questions().pop() {
                break ask;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        mine.send(ask, Some((&mut asker, reachable)), now);
        let mut t = now;
        for _ in 0..50 {
            t += Duration::from_millis(5);
            for (link, bytes) in asker.poll(t) {
                for (channel, message) in holder.receive(link, &bytes, t) {
                    assert_eq!(channel, NEGOTIATION_CHANNEL);
                    theirs.deliver(0, &mut holder, &message);
                }
            }
            for (link, bytes) in holder.poll(t) {
                for (_, message) in asker.receive(link, &bytes, t) {
                    mine.deliver(1, &mut asker, &message);
                }
            }
        }
        asked.join().unwrap()
    }

    #[test]
    fn the_holder_agrees_or_refuses_with_its_reason() {
        assert_eq!(ask_through(None, true), Answer::Agreed);
        assert_eq!(
            ask_through(Some(Refusal::DiskFailing), true),
            Answer::Refused(Refusal::DiskFailing)
        );
        assert!(
            matches!(ask_through(None, false), Answer::Unreachable(why) if why.contains("no interconnect link"))
        );
    }

    #[test]
    fn an_unanswered_question_expires_and_a_stranger_cannot_answer() {
        let now = Instant::now();
        let mut manager = Manager::new(0, 1, 1, 1, ManagerConfig::default(), now);
        manager.open(NEGOTIATION_CHANNEL, Class::Control, now);
        let (_client, questions) = pair().unwrap();
        let mut negotiator = Negotiator::new(
            questions,
            Arc::new(Refuses(None)),
            Duration::from_millis(100),
        );
        let (reply, answer) = bounded(1);
        negotiator.send(
            Ask {
                peer: 1,
                identity: 0,
                reply,
            },
            Some((&mut manager, true)),
            now,
        );
        // Node 2 answers a question put to node 1: ignored.
        let forged = Message::Answer {
            id: 1,
            refusal: None,
        }
        .encode();
        negotiator.deliver(2, &mut manager, &forged);
        assert!(answer.try_recv().is_err());
        assert_eq!(
            negotiator.next_deadline(),
            Some(now + Duration::from_millis(100))
        );
        negotiator.expire(now + Duration::from_millis(100));
        assert!(
            matches!(answer.try_recv(), Ok(Answer::Unreachable(why)) if why.contains("did not answer"))
        );
    }
}
