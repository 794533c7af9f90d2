//! A randomised run, many seeds of a small generator (a property test without a framework):
//! a starts, talks, starts again; then for 1.5 s the links lose, delay, reorder, duplicate
//! and corrupt frames, are cut and restored at random, and frames of a's first start (and
//! b's to it) are replayed; then the links heal. Properties:
//!
//! - every message sent after the restart arrives once, in order, on every channel, both
//!   ways;
//! - a runtime that sleeps until `next_wakeup` misses nothing: `poll` before that time sends
//!   nothing and changes no link, and after `poll` the next wakeup is in the future.

use super::*;

/// xorshift64*: enough randomness for a simulation, and no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True `per_mille` times in a thousand.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// A frame on its way: when it arrives, to whom, on which link.
struct Flying {
    at: Instant,
    to_b: bool,
    link: usize,
    bytes: Vec<u8>,
}

/// One side as a runtime drives it: the manager, when it means to wake, what it delivered.
struct Side {
    manager: Manager,
    wake: Instant,
    delivered: Vec<(u16, Vec<u8>, Duration)>,
}

impl Side {
    fn new(manager: Manager, now: Instant) -> Self {
        let wake = manager.next_wakeup(now);
        Self {
            manager,
            wake,
            delivered: Vec::new(),
        }
    }

    fn receive(&mut self, link: usize, bytes: &[u8], now: Instant, at: Duration) {
        for (channel, message) in self.manager.receive(link, bytes, now) {
            self.delivered.push((channel, message, at));
        }
        // A runtime asks again after each arrival.
        self.wake = self.manager.next_wakeup(now);
    }

    fn send(&mut self, channel: u16, n: u64, now: Instant) {
        self.manager.send(channel, numbered(n)).unwrap();
        self.wake = self.manager.next_wakeup(now);
    }

    /// Polls, checking the wakeup properties; returns the frames and the events.
    fn poll(&mut self, now: Instant, seed: u64) -> (Vec<(usize, Vec<u8>)>, Vec<Event>) {
        let before = self.manager.take_events();
        let out = self.manager.poll(now);
        let events = self.manager.take_events();
        if now < self.wake {
            assert!(
                out.is_empty() && events.is_empty(),
                "seed {seed}: poll before the wakeup did something: {} frames, {events:?}",
                out.len()
            );
        }
        self.wake = self.manager.next_wakeup(now);
        assert!(self.wake > now, "seed {seed}: poll left work due");
        (out, before.into_iter().chain(events).collect())
    }
}

/// Figures of one run, summed over the seeds.
#[derive(Debug, Default)]
struct Figures {
    messages: usize,
    stale: u64,
    not_ours: u64,
    malformed: u64,
    refused_links: u64,
}

const CALM_MS: usize = 100;
const CHAOS_MS: usize = 1500;
const HEAL_MS: usize = 1500;

fn run(seed: u64, figures: &mut Figures) {
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let mut now = start;
    let mut a = Side::new(manager(0, 0xa1, config(), now), now);
    let mut b = Side::new(manager(1, 0xb1, config(), now), now);
    let loss = [rng.below(250), rng.below(250)];
    let mut cut = [false; 2];
    let mut flying: Vec<Flying> = Vec::new();
    // Frames of a's first start and b's to it, for replays.
    let mut old: Vec<(bool, usize, Vec<u8>)> = Vec::new();
    let mut sent_a = [0u64; 2];
    let mut sent_b = 0u64;
    let mut b_knows_restart = false;
    for ms in 1..=CALM_MS + CHAOS_MS + HEAL_MS {
        now += TICK;
        let at = now - start;
        let chaos = (CALM_MS..CALM_MS + CHAOS_MS).contains(&ms);
        if ms == CALM_MS {
            a = Side::new(manager(0, 0xa2, config(), now), now);
        }
        if chaos {
            for c in &mut cut {
                *c ^= rng.chance(3);
            }
            if rng.chance(20) && !old.is_empty() {
                let (to_b, link, bytes) = old[rng.below(old.len() as u64) as usize].clone();
                flying.push(Flying {
                    at: now,
                    to_b,
                    link,
                    bytes,
                });
            }
        } else {
            cut = [false; 2];
        }
        // What arrives now.
        let (arriving, later): (Vec<Flying>, Vec<Flying>) =
            flying.into_iter().partition(|f| f.at <= now);
        flying = later;
        for frame in arriving {
            let side = if frame.to_b { &mut b } else { &mut a };
            side.receive(frame.link, &frame.bytes, now, at);
        }
        // What the clients send: a from the restart on, b once it knows of it.
        if (CALM_MS..CALM_MS + CHAOS_MS).contains(&ms) {
            sent_a[0] += 1;
            a.send(CONTROL, sent_a[0], now);
            if ms % 4 == 0 {
                sent_a[1] += 1;
                a.send(BULK, sent_a[1], now);
            }
            if b_knows_restart && ms % 2 == 0 {
                sent_b += 1;
                b.send(CONTROL, sent_b, now);
            }
        }
        for to_b in [true, false] {
            let side = if to_b { &mut a } else { &mut b };
            let (out, events) = side.poll(now, seed);
            if !to_b && events.contains(&Event::PeerRestarted) {
                assert!(!b_knows_restart, "seed {seed}: one restart only");
                b_knows_restart = true;
                b.delivered.clear();
            }
            figures.refused_links += events
                .iter()
                .filter(|e| matches!(e, Event::Refused { .. }))
                .count() as u64;
            for (link, mut bytes) in out {
                if ms < CALM_MS {
                    old.push((to_b, link, bytes.clone()));
                }
                if chaos && (cut[link] || rng.below(1000) < loss[link]) {
                    continue;
                }
                let copies = if chaos && rng.chance(20) { 2 } else { 1 };
                if chaos && rng.chance(10) {
                    let byte = rng.below(bytes.len() as u64) as usize;
                    bytes[byte] ^= 1 << rng.below(8);
                }
                for _ in 0..copies {
                    let delay = if chaos { rng.below(4) } else { 0 };
                    flying.push(Flying {
                        at: now + TICK * delay as u32,
                        to_b,
                        link,
                        bytes: bytes.clone(),
                    });
                }
            }
        }
    }
    assert!(b_knows_restart, "seed {seed}: b never heard a's restart");
    for (side, channel, sent) in [
        (&b, CONTROL, sent_a[0]),
        (&b, BULK, sent_a[1]),
        (&a, CONTROL, sent_b),
    ] {
        assert_eq!(
            numbers(&side.delivered, channel),
            (1..=sent).collect::<Vec<_>>(),
            "seed {seed}: channel {channel}, once each, in order"
        );
        figures.messages += sent as usize;
    }
    figures.stale += b.manager.dropped.stale + a.manager.dropped.stale;
    figures.not_ours += a.manager.dropped.not_ours + b.manager.dropped.not_ours;
    figures.malformed += a.manager.dropped.malformed + b.manager.dropped.malformed;
}

#[test]
fn lossy_links_and_replays_of_an_earlier_start_deliver_exactly_once_in_order() {
    let mut figures = Figures::default();
    for seed in 0..24 {
        run(seed, &mut figures);
    }
    eprintln!("{figures:?}");
    assert!(figures.stale > 0 && figures.not_ours > 0, "{figures:?}");
    assert!(figures.malformed > 0, "{figures:?}");
}
