//! The test clients of the interconnect, one set per peer: a numbered control stream whose
//! receiver checks order and gaps, pings that measure round trips on a control channel, and
//! bulk channels kept full. They show, on real links, what the connection manager promises
//! (every message once, in order, across link failures) and what it costs.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use interconnect::manager::{Class, Manager};

/// The control stream's channel.
pub const STREAM_CHANNEL: u16 = 1;
/// The pings' channel.
pub const PING_CHANNEL: u16 = 2;
/// The first bulk channel; bulk channel `i` is `BULK_CHANNELS + i`.
pub const BULK_CHANNELS: u16 = 16;
/// Bytes in one bulk message.
pub const BULK_MESSAGE: usize = 8000;
/// Bulk messages a channel keeps unacknowledged: enough to fill a link, little enough
/// that moving to another link resends little.
const BULK_IN_FLIGHT: usize = 64;
/// The window of [`ClientStats::stream_recent_gap_us`].
pub const RECENT_SECONDS: usize = 5;
/// Round trips kept for the percentiles.
const PING_SAMPLES: usize = 1000;

/// What a peer's test clients saw, as published in the region.
pub type ClientStats = shm::LinkClients;

/// Which clients run, and how often.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientConfig {
    pub stream: Option<Duration>,
    pub ping: Option<Duration>,
    pub bulk_channels: u16,
}

/// One peer's test clients.
#[derive(Debug)]
pub struct Clients {
    config: ClientConfig,
    start: Instant,
    stream_next: Instant,
    stream_sent: u64,
    stream_last: Option<(u64, Instant)>,
    /// The longest gap of each of the last seconds: (second since start, gap).
    recent_gaps: VecDeque<(u64, u64)>,
    ping_next: Instant,
    ping_sent: u64,
    rtts: VecDeque<u64>,
    stats: ClientStats,
}

impl Clients {
    /// The clients of `config`, with their channels opened on `manager`.
    pub fn new(config: ClientConfig, manager: &mut Manager, now: Instant) -> Self {
        if config.stream.is_some() {
            manager.open(STREAM_CHANNEL, Class::Control, now);
        }
        if config.ping.is_some() {
            manager.open(PING_CHANNEL, Class::Control, now);
        }
        for i in 0..config.bulk_channels {
            manager.open(BULK_CHANNELS + i, Class::Bulk, now);
        }
        Self {
            config,
            start: now,
            stream_next: now,
            stream_sent: 0,
            stream_last: None,
            recent_gaps: VecDeque::new(),
            ping_next: now,
            ping_sent: 0,
            rtts: VecDeque::new(),
            stats: ClientStats::default(),
        }
    }

    fn micros(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_micros() as u64
    }

    /// What the clients saw, as published (the round trips' percentiles computed now, not
    /// at every answer).
    pub fn stats(&self) -> ClientStats {
        let mut sorted: Vec<u64> = self.rtts.iter().copied().collect();
        sorted.sort_unstable();
        ClientStats {
            ping_p50_us: percentile(&sorted, 50),
            ping_p99_us: percentile(&sorted, 99),
            ..self.stats
        }
    }

    /// The peer started again: its stream starts over.
    pub fn peer_restarted(&mut self) {
        self.stream_last = None;
    }

    /// Sends what is due; returns when something is due next.
    pub fn tick(&mut self, manager: &mut Manager, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        if let Some(every) = self.config.stream {
            while self.stream_next <= now {
                let counter = self.stream_sent + 1;
                // A full channel (the peer unreachable for a long while) holds the stream
                // back: the next number waits for room, so none is ever skipped.
                if manager
                    .send(STREAM_CHANNEL, counter.to_le_bytes().to_vec())
                    .is_err()
                {
                    self.stream_next = now + every;
                    break;
                }
                self.stream_sent = counter;
                self.stream_next += every;
            }
            next = Some(self.stream_next);
        }
        if let Some(every) = self.config.ping {
            if self.ping_next <= now {
                self.ping_sent += 1;
                let mut ping = vec![0u8];
                ping.extend_from_slice(&self.micros(now).to_le_bytes());
                let _ = manager.send(PING_CHANNEL, ping);
                self.ping_next = now + every;
            }
            next = Some(next.map_or(self.ping_next, |n| n.min(self.ping_next)));
        }
        if self.config.bulk_channels > 0 {
            for i in 0..self.config.bulk_channels {
                let id = BULK_CHANNELS + i;
                for _ in manager.in_flight(id)..BULK_IN_FLIGHT {
                    if manager.send(id, vec![0xb5; BULK_MESSAGE]).is_err() {
                        break;
                    }
                }
            }
        }
        next
    }

    /// A message arrived on `channel`.
    pub fn deliver(&mut self, manager: &mut Manager, channel: u16, message: &[u8], now: Instant) {
        match channel {
            STREAM_CHANNEL => self.stream_arrived(message, now),
            PING_CHANNEL => self.ping_arrived(manager, message, now),
            id if id >= BULK_CHANNELS => self.stats.bulk_bytes_in += message.len() as u64,
            _ => {}
        }
    }

    fn stream_arrived(&mut self, message: &[u8], now: Instant) {
        let Ok(bytes) = <[u8; 8]>::try_from(message) else {
            self.stats.stream_errors += 1;
            return;
        };
        let counter = u64::from_le_bytes(bytes);
        self.stats.stream_received += 1;
        if let Some((last, at)) = self.stream_last {
            if last.checked_add(1) != Some(counter) {
                self.stats.stream_errors += 1;
            }
            let gap = now.saturating_duration_since(at).as_micros() as u64;
            self.stats.stream_max_gap_us = self.stats.stream_max_gap_us.max(gap);
            let second = now.saturating_duration_since(self.start).as_secs();
            match self.recent_gaps.back_mut() {
                Some((at, longest)) if *at == second => *longest = (*longest).max(gap),
                _ => self.recent_gaps.push_back((second, gap)),
            }
            let oldest = second.saturating_sub(RECENT_SECONDS as u64 - 1);
            while self.recent_gaps.front().is_some_and(|(at, _)| *at < oldest) {
                self.recent_gaps.pop_front();
            }
            self.stats.stream_recent_gap_us = self
                .recent_gaps
                .iter()
                .map(|(_, gap)| *gap)
                .max()
                .unwrap_or(0);
        }
        self.stream_last = Some((counter, now));
    }

    fn ping_arrived(&mut self, manager: &mut Manager, message: &[u8], now: Instant) {
        let Some((&kind, stamp)) = message.split_first() else {
            return;
        };
        let Ok(stamp) = <[u8; 8]>::try_from(stamp) else {
            return;
        };
        match kind {
            // A ping: answer with its stamp.
            0 => {
                let mut pong = vec![1u8];
                pong.extend_from_slice(&stamp);
                let _ = manager.send(PING_CHANNEL, pong);
            }
            // Our ping's answer.
            1 => {
                let rtt = self.micros(now).saturating_sub(u64::from_le_bytes(stamp));
                if self.rtts.len() == PING_SAMPLES {
                    self.rtts.pop_front();
                }
                self.rtts.push_back(rtt);
                self.stats.pings += 1;
            }
            _ => {}
        }
    }
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) * p).div_ceil(100)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use interconnect::manager::ManagerConfig;

    #[test]
    fn the_stream_receiver_counts_gaps_and_disorder() {
        let now = Instant::now();
        let mut manager = Manager::new(0, 1, 1, 1, ManagerConfig::default(), now);
        let mut clients = Clients::new(ClientConfig::default(), &mut manager, now);
        for (counter, ms) in [(5u64, 0u64), (6, 1), (7, 5), (9, 6), (9, 7)] {
            clients.stream_arrived(&counter.to_le_bytes(), now + Duration::from_millis(ms));
        }
        assert_eq!(clients.stats.stream_received, 5);
        assert_eq!(clients.stats.stream_errors, 2, "8 skipped, 9 twice");
        assert_eq!(clients.stats.stream_max_gap_us, 4000);
        assert_eq!(clients.stats.stream_recent_gap_us, 4000);
        clients.peer_restarted();
        clients.stream_arrived(&1u64.to_le_bytes(), now + Duration::from_secs(1));
        assert_eq!(
            clients.stats.stream_errors, 2,
            "a restarted peer starts over"
        );
        clients.stream_arrived(b"short", now);
        assert_eq!(clients.stats.stream_errors, 3);
        // A peer's counter at its end wraps nothing and panics nothing.
        clients.stream_arrived(&u64::MAX.to_le_bytes(), now + Duration::from_secs(40));
        clients.stream_arrived(&u64::MAX.to_le_bytes(), now + Duration::from_secs(40));
        assert_eq!(clients.stats.stream_errors, 5);
    }

    #[test]
    fn percentiles_of_round_trips() {
        let sorted: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 50), 51);
        assert_eq!(percentile(&sorted, 99), 100);
        assert_eq!(percentile(&[], 99), 0);
        assert_eq!(percentile(&[7], 99), 7);
    }
}
