//! Which start of each node a frame belongs to.
//!
//! Every frame carries two sessions: the sender's, and the receiver's as the sender knows it
//! (0 when it knows none yet). A node's session id is larger at each of its starts (the
//! caller gives it; [`session_id`] takes it from the clock), so of two sessions of the peer
//! the larger is the later start. From any one frame a node can then tell:
//!
//! - a frame that names another session of this node was meant for an earlier start of it
//!   (an acknowledgement of messages this start never sent, say): dropped;
//! - a frame of an earlier session of the peer is stale (late or replayed): dropped, even a
//!   Hello, so a delayed Hello does not pass for a restart;
//! - a Hello or HelloAck of a later session is the peer's restart: channels start over;
//! - any other frame of a later session means the peer restarted and its Hello was lost:
//!   dropped, and answered with a Hello, so the handshake completes within a round trip
//!   instead of the new session being dropped as stale until a Hello gets through.
//!
//! A restart is taken only from a later session, never from an earlier one, even after a
//! long silence: this side's channels start over at a restart, and the peer's must have
//! too, or a channel would wait forever for numbers the peer has long passed. A late Hello
//! of the peer's earlier start (left in a mailbox, say) is no restart. The price: a node
//! whose id goes back (its clock stepped back across a restart) is stale to its peer until
//! the peer restarts too, so ids must never go back.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::frame::{Frame, Kind};

/// A session id for a start at `at`: nanoseconds since the Unix epoch, at least 1 (0 means
/// "not known" in a frame). Larger at each start as long as the clock does not go back.
pub fn session_id(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(1, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
        .max(1)
}

/// What to do with a frame, by its sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Of the peer's known session: taken.
    Current,
    /// Of the first session heard from the peer: taken, and known from now on.
    First,
    /// A Hello or HelloAck of a new session of the peer: the peer started again, every
    /// channel starts over.
    Restart,
    /// Another frame of a later session of the peer, whose Hello was lost: dropped, and
    /// answered with a Hello.
    Unannounced,
    /// Of an earlier session of the peer: dropped.
    Stale,
    /// Names another session of this node: meant for an earlier start of it, dropped.
    NotOurs,
}

/// Judges `frame` at a node of session `mine` that knows the peer's session `known`.
pub fn judge(mine: u64, known: Option<u64>, frame: &Frame) -> Verdict {
    if frame.to_session != 0 && frame.to_session != mine {
        return Verdict::NotOurs;
    }
    let Some(known) = known else {
        return Verdict::First;
    };
    let opens = matches!(frame.kind, Kind::Hello | Kind::HelloAck);
    match frame.session.cmp(&known) {
        std::cmp::Ordering::Equal => Verdict::Current,
        std::cmp::Ordering::Greater if opens => Verdict::Restart,
        std::cmp::Ordering::Greater => Verdict::Unannounced,
        std::cmp::Ordering::Less => Verdict::Stale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ME: u64 = 500;

    fn frame(kind: Kind, session: u64, to_session: u64) -> Frame {
        Frame {
            to_session,
            ..Frame::new(kind, 0, 1, 0, session)
        }
    }

    #[test]
    fn frames_are_judged_by_both_sessions() {
        use Verdict::*;
        let known = Some(200);
        for (kind, session, to, verdict) in [
            (Kind::Data, 200, ME, Current),
            (Kind::Data, 200, 0, Current),
            (Kind::Ack, 200, 499, NotOurs),
            (Kind::Hello, 300, 499, NotOurs),
            (Kind::Hello, 300, 0, Restart),
            (Kind::HelloAck, 300, ME, Restart),
            (Kind::Heartbeat, 300, ME, Unannounced),
            (Kind::Data, 300, 0, Unannounced),
            (Kind::Hello, 100, ME, Stale),
            (Kind::HelloAck, 100, 0, Stale),
            (Kind::Data, 100, ME, Stale),
        ] {
            let got = judge(ME, known, &frame(kind, session, to));
            assert_eq!(got, verdict, "{kind:?} of {session} to {to}");
        }
        assert_eq!(judge(ME, None, &frame(Kind::Data, 7, 0)), First);
        assert_eq!(judge(ME, None, &frame(Kind::Data, 7, 9)), NotOurs);
    }

    #[test]
    fn session_ids_grow_with_the_clock_and_are_never_zero() {
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(session_id(at + Duration::from_nanos(1)) > session_id(at));
        assert_eq!(session_id(UNIX_EPOCH), 1);
        assert_eq!(session_id(UNIX_EPOCH - Duration::from_secs(1)), 1);
    }
}
