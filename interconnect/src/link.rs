//! One link to the peer: its session and its state.
//!
//! A link opens with Hello (the sender's version, node and capabilities) answered by
//! HelloAck, or by Refuse with a reason when the peer cannot work with it. Once open, each
//! side sends a heartbeat every interval; a link that has heard nothing from the peer for
//! `degraded_after` intervals is degraded, for `down_after` intervals down. A down link
//! keeps saying Hello in the background and is up again at the peer's first answer.
//!
//! A link that comes back is not trusted at once: it is *settled* only once it has carried
//! the peer's frames over `return_after` intervals since it came back (see
//! [`Link::settled`]), so placement does not send channels back to a link that flaps.

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
    /// Intervals a link that came back must carry the peer's frames before channels
    /// return to it (placement's hysteresis).
    pub return_after: u32,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(50),
            degraded_after: 2,
            down_after: 3,
            return_after: 3,
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
    /// peer claiming to be another node, or of another session: dropped.
    pub dropped: u64,
    /// Times the link went up (from opening, degraded or down).
    pub ups: u64,
}

/// One link's session and state.
#[derive(Debug)]
pub struct Link {
    pub id: u16,
    state: LinkState,
    config: LinkConfig,
    last_heard: Option<Instant>,
    last_sent: Option<Instant>,
    /// When the link last went up; None while it is not up.
    up_since: Option<Instant>,
    /// When it last answered a frame of an unannounced session with a Hello.
    answered: Option<Instant>,
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
            up_since: None,
            answered: None,
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
        if self.state != LinkState::Up {
            self.up_since = None;
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
        if before == LinkState::Up {
            return None;
        }
        self.up_since = Some(now);
        self.counters.ups += 1;
        Some(LinkState::Up)
    }

    /// Whether channels may return to it: up, and either up for the first time, or it has
    /// carried the peer's frames for `return_after` intervals since it came back. Measured
    /// to the last frame heard, not to now: a link stays up for `degraded_after` intervals
    /// after its last frame, and that silence must not count as carrying.
    pub fn settled(&self) -> bool {
        match (self.up_since, self.last_heard) {
            (Some(since), Some(heard)) => {
                self.counters.ups <= 1
                    || heard.saturating_duration_since(since)
                        >= self.config.heartbeat * self.config.return_after
            }
            _ => false,
        }
    }

    /// When [`Link::tick`] next has something to do: a beat, or a state the silence would
    /// change.
    pub fn next_due(&self, now: Instant) -> Instant {
        let interval = self.config.heartbeat;
        let mut due = self.last_sent.map_or(now, |sent| sent + interval);
        if let Some(heard) = self.last_heard {
            if self.state == LinkState::Up {
                due = due.min(heard + interval * self.config.degraded_after);
            }
            if matches!(self.state, LinkState::Up | LinkState::Degraded) {
                due = due.min(heard + interval * self.config.down_after);
            }
        }
        due
    }

    /// Whether to answer a frame of an unannounced session with a Hello now: at most once
    /// an interval, so a stream of such frames is not answered frame for frame.
    pub fn may_answer_hello(&mut self, now: Instant) -> bool {
        let may = self
            .answered
            .is_none_or(|at| now.saturating_duration_since(at) >= self.config.heartbeat);
        if may {
            self.answered = Some(now);
        }
        may
    }

    /// The peer refused this node (or this node the peer): down until the peer answers.
    pub fn refuse(&mut self, why: String) -> Option<LinkState> {
        let before = self.state;
        self.state = LinkState::Down;
        self.last_heard = None;
        self.up_since = None;
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
            return_after: 3,
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

    #[test]
    fn a_link_that_came_back_settles_only_after_carrying_frames() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut link = Link::new(0, config());
        assert!(!link.settled());
        link.heard(start);
        assert!(link.settled(), "the first time up needs no proof");
        link.tick(start + ms(30));
        assert_eq!(link.state(), LinkState::Down);
        assert!(!link.settled());
        // Back at 40 ms: one frame, then silence. Still up at 55 ms, but not settled.
        link.heard(start + ms(40));
        link.heard(start + ms(45));
        link.tick(start + ms(55));
        assert_eq!(link.state(), LinkState::Up);
        assert!(!link.settled());
        // Frames over three intervals: settled.
        for at in [50, 60, 70] {
            link.heard(start + ms(at));
        }
        assert!(link.settled());
        assert_eq!(link.counters.ups, 2);
    }

    #[test]
    fn the_next_due_time_is_the_next_beat_or_state_change() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut link = Link::new(0, config());
        assert_eq!(link.next_due(start), start);
        link.tick(start);
        assert_eq!(link.next_due(start), start + ms(10));
        link.heard(start + ms(1));
        link.tick(start + ms(10));
        assert_eq!(link.next_due(start + ms(10)), start + ms(20));
        link.tick(start + ms(20));
        // Degraded at 21 ms comes before the beat at 30.
        assert_eq!(link.next_due(start + ms(20)), start + ms(21));
        assert_eq!(link.tick(start + ms(21)).1, Some(LinkState::Degraded));
        assert_eq!(link.next_due(start + ms(21)), start + ms(30));
    }

    #[test]
    fn hellos_in_answer_are_at_most_one_an_interval() {
        let start = Instant::now();
        let mut link = Link::new(0, config());
        assert!(link.may_answer_hello(start));
        assert!(!link.may_answer_hello(start + Duration::from_millis(9)));
        assert!(link.may_answer_hello(start + Duration::from_millis(10)));
    }
}
