//! A channel: one client's ordered stream of messages to the peer, delivered exactly once
//! whatever link carries it.
//!
//! The sender numbers each message from 1 and keeps it until the peer acknowledges it; it
//! sends it again after a retransmission timeout, or at once when the channel moves to
//! another link (its old link may have taken it down with it). The receiver delivers in
//! number order, keeps a bounded number of early messages, and drops any it has seen: so
//! a message resent on a new link after its first copy did arrive is not delivered twice.
//! An acknowledgement of a message the sender never sent is ignored: it cannot be this
//! channel's, and taking it would drop messages the peer never got.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the channel has {window} messages waiting for the peer's acknowledgement, its limit")]
pub struct Full {
    pub window: usize,
}

/// Why an acknowledgement was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the peer acknowledges messages up to {ack}, but only {sent} were sent")]
pub struct BeyondSent {
    pub ack: u64,
    pub sent: u64,
}

#[derive(Debug)]
struct Unacked {
    seq: u64,
    payload: Vec<u8>,
    /// When it was last sent; None: not sent since it was queued or the channel moved.
    sent: Option<Instant>,
}

/// The sending half.
#[derive(Debug)]
pub struct Sender {
    next_seq: u64,
    /// The highest number sent at least once: no acknowledgement may go past it.
    highest_sent: u64,
    unacked: VecDeque<Unacked>,
    window: usize,
    /// Most messages sent and not yet acknowledged nor timed out at once: a burst (a
    /// move's resend of the whole window) goes out this many at a time, oldest first, so
    /// a link that holds few frames (the mailbox's slots) is not overrun by later ones
    /// while the earliest, which the receiver waits for, are lost each round.
    flight: usize,
    /// Messages sent more than once.
    pub retransmissions: u64,
}

impl Sender {
    /// A sender that holds at most `window` unacknowledged messages, and sends them all
    /// at once when due.
    pub fn new(window: usize) -> Self {
        Self::paced(window, window)
    }

    /// A sender that holds at most `window` unacknowledged messages and has at most
    /// `flight` of them on the way at once.
    pub fn paced(window: usize, flight: usize) -> Self {
        Self {
            next_seq: 1,
            highest_sent: 0,
            unacked: VecDeque::new(),
            window: window.max(1),
            flight: flight.max(1),
            retransmissions: 0,
        }
    }

    /// Messages sent less than `timeout` ago and not acknowledged.
    fn on_the_way(&self, now: Instant, timeout: Duration) -> usize {
        self.unacked
            .iter()
            .filter(|m| {
                m.sent
                    .is_some_and(|at| now.saturating_duration_since(at) < timeout)
            })
            .count()
    }

    /// Queues `payload`; returns its number.
    pub fn push(&mut self, payload: Vec<u8>) -> Result<u64, Full> {
        if self.unacked.len() >= self.window {
            return Err(Full {
                window: self.window,
            });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.push_back(Unacked {
            seq,
            payload,
            sent: None,
        });
        Ok(seq)
    }

    /// The messages to send now: those never sent (or not since the channel moved), and
    /// those unacknowledged for `timeout`. Marks them sent at `now`.
    pub fn due(&mut self, now: Instant, timeout: Duration) -> Vec<(u64, Vec<u8>)> {
        let mut room = self.flight.saturating_sub(self.on_the_way(now, timeout));
        let mut due = Vec::new();
        for message in &mut self.unacked {
            if room == 0 {
                break;
            }
            let send = match message.sent {
                None => true,
                Some(at) if now.saturating_duration_since(at) >= timeout => {
                    self.retransmissions += 1;
                    true
                }
                Some(_) => false,
            };
            if send {
                room -= 1;
                message.sent = Some(now);
                self.highest_sent = self.highest_sent.max(message.seq);
                due.push((message.seq, message.payload.clone()));
            }
        }
        due
    }

    /// When [`Sender::due`] next has something: `now` for a message not sent yet, else the
    /// earliest retransmission; None with nothing in flight.
    pub fn next_due(&self, now: Instant, timeout: Duration) -> Option<Instant> {
        let room = self.on_the_way(now, timeout) < self.flight;
        self.unacked
            .iter()
            .filter_map(|m| match m.sent {
                // Waits for room when the flight is full (an acknowledgement or a timeout
                // makes some).
                None => room.then_some(now),
                Some(at) => Some(at + timeout),
            })
            .min()
    }

    /// The peer has every message up to `ack`: they are dropped. Returns how many were.
    /// An `ack` past the last message sent is refused and changes nothing.
    pub fn acknowledged(&mut self, ack: u64) -> Result<usize, BeyondSent> {
        if ack > self.highest_sent {
            return Err(BeyondSent {
                ack,
                sent: self.highest_sent,
            });
        }
        let before = self.unacked.len();
        while self.unacked.front().is_some_and(|m| m.seq <= ack) {
            self.unacked.pop_front();
        }
        Ok(before - self.unacked.len())
    }

    /// The channel moved to another link: everything unacknowledged goes again.
    pub fn resend_all(&mut self) {
        for message in &mut self.unacked {
            if message.sent.take().is_some() {
                self.retransmissions += 1;
            }
        }
    }

    /// Messages waiting for an acknowledgement.
    pub fn in_flight(&self) -> usize {
        self.unacked.len()
    }
}

/// What the receiver did with an arriving message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Delivered, with this many held messages that followed it.
    Delivered,
    /// Early: held until the ones before it arrive.
    Held,
    /// Seen before: dropped.
    Duplicate,
    /// Too far ahead to hold: dropped (the sender sends it again).
    OutOfWindow,
}

/// The receiving half.
#[derive(Debug)]
pub struct Receiver {
    delivered: u64,
    held: BTreeMap<u64, Vec<u8>>,
    window: u64,
    /// Copies of messages already delivered or held, dropped.
    pub duplicates: u64,
}

impl Receiver {
    /// A receiver that holds messages at most `window` ahead of the next one to deliver.
    pub fn new(window: u64) -> Self {
        Self {
            delivered: 0,
            held: BTreeMap::new(),
            window: window.max(1),
            duplicates: 0,
        }
    }

    /// Every message up to this number was delivered: what to acknowledge.
    pub fn ack(&self) -> u64 {
        self.delivered
    }

    /// Takes message `seq`; appends what can be delivered now, in order, to `out`.
    pub fn arrive(&mut self, seq: u64, payload: Vec<u8>, out: &mut Vec<Vec<u8>>) -> Arrival {
        if seq <= self.delivered || self.held.contains_key(&seq) {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        if seq > self.delivered.saturating_add(self.window) {
            return Arrival::OutOfWindow;
        }
        self.held.insert(seq, payload);
        let before = out.len();
        while let Some(payload) = self.held.remove(&(self.delivered + 1)) {
            self.delivered += 1;
            out.push(payload);
        }
        if out.len() > before {
            Arrival::Delivered
        } else {
            Arrival::Held
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(50);

    #[test]
    fn messages_go_once_until_acknowledged_or_late() {
        let start = Instant::now();
        let mut sender = Sender::new(8);
        assert_eq!(sender.push(b"one".to_vec()), Ok(1));
        assert_eq!(sender.push(b"two".to_vec()), Ok(2));
        assert_eq!(sender.due(start, TIMEOUT).len(), 2);
        assert!(sender.due(start + TIMEOUT / 2, TIMEOUT).is_empty());
        assert_eq!(sender.acknowledged(1), Ok(1));
        let again = sender.due(start + TIMEOUT, TIMEOUT);
        assert_eq!(again, vec![(2, b"two".to_vec())]);
        assert_eq!(sender.retransmissions, 1);
        sender.resend_all();
        assert_eq!(sender.due(start + TIMEOUT, TIMEOUT).len(), 1);
        assert_eq!(sender.acknowledged(2), Ok(1));
        assert_eq!(sender.in_flight(), 0);
    }

    #[test]
    fn an_acknowledgement_past_what_was_sent_is_ignored() {
        let start = Instant::now();
        let mut sender = Sender::new(8);
        for n in 1..=3u8 {
            sender.push(vec![n]).unwrap();
        }
        assert_eq!(sender.acknowledged(1), Err(BeyondSent { ack: 1, sent: 0 }));
        assert_eq!(sender.in_flight(), 3, "queued is not sent");
        assert_eq!(sender.next_due(start, TIMEOUT), Some(start));
        assert_eq!(sender.due(start, TIMEOUT).len(), 3);
        assert_eq!(
            sender.acknowledged(500),
            Err(BeyondSent { ack: 500, sent: 3 })
        );
        assert_eq!(sender.in_flight(), 3);
        assert_eq!(sender.next_due(start, TIMEOUT), Some(start + TIMEOUT));
        assert_eq!(sender.acknowledged(3), Ok(3));
        assert_eq!(sender.next_due(start, TIMEOUT), None);
    }

    #[test]
    fn a_full_window_refuses_more() {
        let mut sender = Sender::new(2);
        sender.push(vec![1]).unwrap();
        sender.push(vec![2]).unwrap();
        assert_eq!(sender.push(vec![3]), Err(Full { window: 2 }));
        sender.due(Instant::now(), TIMEOUT);
        sender.acknowledged(1).unwrap();
        assert_eq!(sender.push(vec![3]), Ok(3));
    }

    #[test]
    fn the_receiver_delivers_in_order_once() {
        let mut receiver = Receiver::new(4);
        let mut out = Vec::new();
        assert_eq!(receiver.arrive(2, vec![2], &mut out), Arrival::Held);
        assert_eq!(receiver.arrive(2, vec![2], &mut out), Arrival::Duplicate);
        assert_eq!(receiver.arrive(9, vec![9], &mut out), Arrival::OutOfWindow);
        assert!(out.is_empty());
        assert_eq!(receiver.arrive(1, vec![1], &mut out), Arrival::Delivered);
        assert_eq!(out, vec![vec![1], vec![2]]);
        assert_eq!(receiver.ack(), 2);
        assert_eq!(receiver.arrive(1, vec![1], &mut out), Arrival::Duplicate);
        assert_eq!(receiver.duplicates, 2);
    }
}
