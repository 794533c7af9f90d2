//! One link to the peer: its session and its state.
//!
//! A link opens with Hello (the sender's version, node and capabilities) answered by
//! HelloAck, or by Refuse with a reason when the peer cannot work with it. Once open, each
//! side sends a heartbeat every interval; a link that has heard nothing from the peer for
//! `degraded_after` intervals is degraded, for `down_after` intervals down. A down link
//! keeps saying Hello in the background and is up again at the peer's first answer.

use std::time::{Duration, Instant};

/// The capabilities this build offers in its Hello (`seq` of the frame): a bit each.
pub const CAPABILITIES: u64 = CAP_CHANNELS;
/// Ordered, acknowledged channels (every build has them).
pub const CAP_CHANNELS: u64 = 1;
/// What a peer must offer for this build to work with it.
pub const REQUIRED: u64 = CAP_CHANNELS;

/// The timing of every link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// How often an open link sends a heartbeat (and a down one a Hello).
    pub heartbeat: Duration,
    /// Intervals without a frame from the peer before the link is degraded.
    pub degraded_after: u32,
    /// Intervals without a frame from the peer before the link is down.
    pub down_after: u32,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(50),
            degraded_after: 2,
            down_after: 3,
        }
    }
}

/// Where a link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Saying Hello; nothing heard yet.
    Opening,
    Up,
    /// Heard nothing for a while: used only when no link is up.
    Degraded,
    /// Silent past the limit, or refused: channels leave it; Hello goes on in the background.
    Down,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Opening => "opening",
            LinkState::Up => "up",
            LinkState::Degraded => "degraded",
            LinkState::Down => "down",
        }
    }
}

/// What a link has carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Frames that were not frames, were of another version, for another node, or from a
    /// peer claiming to be another node: dropped.
    pub dropped: u64,
}

/// One link's session and state.
#[derive(Debug)]
pub struct Link {
    pub id: u16,
    state: LinkState,
    config: LinkConfig,
    last_heard: Option<Instant>,
    last_sent: Option<Instant>,
    /// Why the peer refused this node, or this node the peer, in words.
    pub refused: Option<String>,
    pub counters: LinkCounters,
    /// The last round trip measured (a heartbeat echoed back).
    pub rtt: Option<Duration>,
    /// The peer's last heartbeat stamp and when it arrived, echoed in the next heartbeat.
    echo: Option<(u64, Instant)>,
}

/// What to send on a link, decided by [`Link::tick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    Hello,
    Heartbeat,
}

impl Link {
    pub fn new(id: u16, config: LinkConfig) -> Self {
        Self {
            id,
            state: LinkState::Opening,
            config,
            last_heard: None,
            last_sent: None,
            refused: None,
            counters: LinkCounters::default(),
            rtt: None,
            echo: None,
        }
    }

    pub fn state(&self) -> LinkState {
        self.state
    }

    /// Whether channels may use it: up, or degraded when nothing better is left.
    pub fn usable(&self) -> bool {
        matches!(self.state, LinkState::Up | LinkState::Degraded)
    }

    /// Judges the silence and says what is due now; returns a state change too.
    pub fn tick(&mut self, now: Instant) -> (Option<Beat>, Option<LinkState>) {
        let before = self.state;
        if let Some(heard) = self.last_heard {
            let silence = now.saturating_duration_since(heard);
            let interval = self.config.heartbeat;
            if silence >= interval * self.config.down_after {
                self.state = LinkState::Down;
            } else if silence >= interval * self.config.degraded_after
                && self.state == LinkState::Up
            {
                self.state = LinkState::Degraded;
            }
        }
        let due = self
            .last_sent
            .is_none_or(|sent| now.saturating_duration_since(sent) >= self.config.heartbeat);
        let beat = due.then(|| {
            self.last_sent = Some(now);
            match self.state {
                LinkState::Up | LinkState::Degraded => Beat::Heartbeat,
                LinkState::Opening | LinkState::Down => Beat::Hello,
            }
        });
        (beat, (self.state != before).then_some(self.state))
    }

    /// A valid frame from the peer arrived: the link is alive. Returns a state change.
    pub fn heard(&mut self, now: Instant) -> Option<LinkState> {
        self.last_heard = Some(now);
        let before = self.state;
        self.state = LinkState::Up;
        self.refused = None;
        (before != LinkState::Up).then_some(LinkState::Up)
    }

    /// The peer refused this node (or this node the peer): down until the peer answers.
    pub fn refuse(&mut self, why: String) -> Option<LinkState> {
        let before = self.state;
        self.state = LinkState::Down;
        self.last_heard = None;
        self.refused = Some(why);
        (before != LinkState::Down).then_some(LinkState::Down)
    }

    /// The heartbeat payload: this node's stamp (`now_us`), and the peer's last stamp with
    /// how long this node held it, so the peer can measure the round trip.
    pub fn heartbeat_payload(&self, now: Instant, now_us: u64) -> Vec<u8> {
        let (echo, held) = self.echo.map_or((0, 0), |(stamp, at)| {
            (stamp, now.saturating_duration_since(at).as_micros() as u64)
        });
        [now_us, echo, held]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    /// Reads a peer's heartbeat payload (24 bytes; anything else is ignored).
    pub fn heartbeat_arrived(&mut self, payload: &[u8], now: Instant, now_us: u64) {
        let words: Vec<u64> = payload
            .chunks_exact(8)
            .map(|c| {
                let mut word = [0u8; 8];
                word.copy_from_slice(c);
                u64::from_le_bytes(word)
            })
            .collect();
        if let [stamp, echo, held] = words[..] {
            self.echo = Some((stamp, now));
            if echo != 0 {
                let rtt_us = now_us.saturating_sub(echo).saturating_sub(held);
                self.rtt = Some(Duration::from_micros(rtt_us));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LinkConfig {
        LinkConfig {
            heartbeat: Duration::from_millis(10),
            degraded_after: 2,
            down_after: 3,
        }
    }

    #[test]
    fn a_link_opens_then_degrades_then_goes_down_in_silence() {
        let start = Instant::now();
        let mut link = Link::new(0, config());
        assert_eq!(link.tick(start), (Some(Beat::Hello), None));
        assert_eq!(link.tick(start + Duration::from_millis(5)), (None, None));
        assert_eq!(link.heard(start), Some(LinkState::Up));
        assert_eq!(
            link.tick(start + Duration::from_millis(10)),
            (Some(Beat::Heartbeat), None)
        );
        assert_eq!(
            link.tick(start + Duration::from_millis(20)).1,
            Some(LinkState::Degraded)
        );
        assert!(link.usable());
        let (beat, change) = link.tick(start + Duration::from_millis(30));
        assert_eq!(change, Some(LinkState::Down));
        assert_eq!(beat, Some(Beat::Hello), "a down link says Hello again");
        assert!(!link.usable());
        assert_eq!(
            link.heard(start + Duration::from_millis(31)),
            Some(LinkState::Up)
        );
    }

    #[test]
    fn a_refused_link_is_down_with_the_reason() {
        let mut link = Link::new(1, config());
        link.heard(Instant::now());
        assert_eq!(
            link.refuse("the peer speaks version 2".into()),
            Some(LinkState::Down)
        );
        assert_eq!(link.refused.as_deref(), Some("the peer speaks version 2"));
    }

    #[test]
    fn a_heartbeat_echo_measures_the_round_trip() {
        let start = Instant::now();
        let mut a = Link::new(0, config());
        let mut b = Link::new(0, config());
        let sent = a.heartbeat_payload(start, 1_000);
        b.heartbeat_arrived(&sent, start, 50_000);
        // b holds a's stamp 3 ms, then answers; a gets it at its 9 ms.
        let answer = b.heartbeat_payload(start + Duration::from_millis(3), 53_000);
        a.heartbeat_arrived(&answer, start, 10_000);
        assert_eq!(a.rtt, Some(Duration::from_millis(6)));
        // A short or odd payload changes nothing.
        a.heartbeat_arrived(&[1, 2, 3], start, 11_000);
        assert_eq!(a.rtt, Some(Duration::from_millis(6)));
    }
}
