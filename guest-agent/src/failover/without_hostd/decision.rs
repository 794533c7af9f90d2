//! Whether this node claims a dead peer's identities while hostd is away: a function of
//! what the failover monitor saw, with no I/O (docs/takeover.md, "Without hostd").
//!
//! - hostd is **absent** once its presence counter has stood still for `absent_after_ms`
//!   on this node's clock (never moved since the agent started counts as standing still
//!   since then). No presence, or a threshold of 0: this node never acts alone.
//! - A peer is **dead** once its region heartbeat has stood still for
//!   `peer_dead_after_ms` and every interconnect link to it is silent (without an
//!   interconnect, the heartbeat alone decides). A heartbeat that stands still while a link
//!   is up is a partition, not a death: nobody claims.
//! - This node claims a dead peer iff hostd is absent, the peer is a member and owns
//!   something, this node is in the peer's takers and every taker listed before it is dead
//!   or no member, and this node did not claim that peer a moment ago.
//! - hostd absent and this node no member: it ejects itself.

use std::time::Duration;

use shm::HostdPresence;
use wire::coordinator::CoordinatorState;

/// What this node knows of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub node: u32,
    /// How long its region heartbeat has stood still, on this node's clock.
    pub beat_still_for: Duration,
    /// Whether every interconnect link to it is silent (true without an interconnect).
    pub links_silent: bool,
    /// Whether it owns an identity, by the newest word (the control region and the claims).
    pub owns_something: bool,
    /// Whether this node claimed it a moment ago (won or lost): not again so soon.
    pub claimed_recently: bool,
}

/// Everything a decision is made of.
#[derive(Debug, Clone)]
pub struct View<'a> {
    pub me: u32,
    /// hostd's presence as last read (`None`: never published, or unreadable).
    pub presence: Option<HostdPresence>,
    /// How long hostd's presence counter has stood still, on this node's clock.
    pub hostd_still_for: Duration,
    /// The peers this node maps.
    pub peers: &'a [PeerView],
    /// The coordinator's state, as last fetched.
    pub state: Option<&'a CoordinatorState>,
}

/// Where hostd stands, for this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostd {
    /// Agents may not move identities without hostd (no presence, or thresholds of 0).
    Decides,
    Present,
    Absent,
}

/// Judges hostd's presence.
pub fn hostd(presence: Option<HostdPresence>, still_for: Duration) -> Hostd {
    match presence {
        Some(p) if p.allows_moves_without_hostd() => {
            if still_for >= Duration::from_millis(p.absent_after_ms) {
                Hostd::Absent
            } else {
                Hostd::Present
            }
        }
        _ => Hostd::Decides,
    }
}

/// Why a peer is not claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Its heartbeat moves.
    Alive,
    /// Its heartbeat stands still, but an interconnect link to it is up.
    Partitioned,
    /// The coordinator does not know it.
    Unknown,
    /// It is no member: claimed already.
    NoMember,
    /// It owns no identity.
    OwnsNothing,
    /// This node claimed it a moment ago.
    ClaimedRecently,
    /// This node is not in its takers.
    NotATaker,
    /// A taker listed before this node is not dead: it claims.
    EarlierTaker(u32),
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Only hostd moves identities in this cluster.
    HostdDecides,
    HostdPresent,
    /// hostd is absent and the coordinator's state is not known yet.
    NoState,
    /// hostd is absent and the coordinator does not know this node.
    UnknownToCoordinator,
    /// hostd is absent and this node is no member: it ejects itself.
    NotMember,
    /// Claim everything `victim` owns.
    Claim {
        victim: u32,
    },
    /// hostd is absent and nobody is claimed, for these reasons.
    Wait(Vec<(u32, Standing)>),
}

/// Decides what this node does now.
pub fn decide(view: &View<'_>) -> Verdict {
    match hostd(view.presence, view.hostd_still_for) {
        Hostd::Decides => return Verdict::HostdDecides,
        Hostd::Present => return Verdict::HostdPresent,
        Hostd::Absent => {}
    }
    let (Some(state), Some(presence)) = (view.state, view.presence) else {
        return Verdict::NoState;
    };
    match state.node(view.me) {
        None => return Verdict::UnknownToCoordinator,
        Some(me) if !me.member => return Verdict::NotMember,
        Some(_) => {}
    }
    let dead_after = Duration::from_millis(presence.peer_dead_after_ms);
    let mut standings = Vec::new();
    for peer in view.peers {
        match standing(view, state, peer, dead_after) {
            None => return Verdict::Claim { victim: peer.node },
            Some(standing) => standings.push((peer.node, standing)),
        }
    }
    Verdict::Wait(standings)
}

/// Whether `peer` is dead: its heartbeat stood still long enough, and no link hears it.
fn dead(peer: &PeerView, dead_after: Duration) -> bool {
    peer.beat_still_for >= dead_after && peer.links_silent
}

/// Why `peer` is not claimed (`None`: it is).
fn standing(
    view: &View<'_>,
    state: &CoordinatorState,
    peer: &PeerView,
    dead_after: Duration,
) -> Option<Standing> {
    if peer.beat_still_for < dead_after {
        return Some(Standing::Alive);
    }
    if !peer.links_silent {
        return Some(Standing::Partitioned);
    }
    let Some(record) = state.node(peer.node) else {
        return Some(Standing::Unknown);
    };
    if !record.member {
        return Some(Standing::NoMember);
    }
    if !peer.owns_something {
        return Some(Standing::OwnsNothing);
    }
    if peer.claimed_recently {
        return Some(Standing::ClaimedRecently);
    }
    let Some(position) = record.takers.iter().position(|t| *t == view.me) else {
        return Some(Standing::NotATaker);
    };
    // A taker this node maps no region of cannot be judged: it is taken for alive.
    for &taker in &record.takers[..position] {
        let out = state.node(taker).is_some_and(|t| !t.member);
        let found_dead = view
            .peers
            .iter()
            .find(|p| p.node == taker)
            .is_some_and(|p| dead(p, dead_after));
        if taker != peer.node && !out && !found_dead {
            return Some(Standing::EarlierTaker(taker));
        }
    }
    None
}

impl Standing {
    /// The reason in words; `name` names a node.
    pub fn describe(self, name: &dyn Fn(u32) -> String) -> String {
        match self {
            Standing::Alive => "alive (its heartbeat moves)".into(),
            Standing::Partitioned => "its heartbeat stands still but an interconnect link to it is up: a partition, not a death".into(),
            Standing::Unknown => "unknown to the coordinator".into(),
            Standing::NoMember => "no member any more (claimed already)".into(),
            Standing::OwnsNothing => "dead, but it owns nothing".into(),
            Standing::ClaimedRecently => "dead, and claimed by this node a moment ago".into(),
            Standing::NotATaker => "dead, but this node is not one of its takers".into(),
            Standing::EarlierTaker(node) => {
                let taker = name(node);
                format!("dead, but {taker}, listed before this node in its takers, is not: {taker} claims")
            }
        }
    }
}

impl Verdict {
    /// The decision in words; `name` names a node.
    pub fn describe(&self, name: &dyn Fn(u32) -> String) -> String {
        match self {
            Verdict::HostdDecides => {
                "only hostd moves identities in this cluster: never acting alone".into()
            }
            Verdict::HostdPresent => "hostd is present: it decides".into(),
            Verdict::NoState => "hostd is absent; the coordinator's state is not known yet".into(),
            Verdict::UnknownToCoordinator => {
                "hostd is absent; the coordinator does not know this node".into()
            }
            Verdict::NotMember => {
                "hostd is absent and the coordinator says this node is no member".into()
            }
            Verdict::Claim { victim } => format!(
                "hostd is absent and {} is dead: this node is its first live taker",
                name(*victim)
            ),
            Verdict::Wait(standings) if standings.is_empty() => {
                "hostd is absent; no peer to claim".into()
            }
            Verdict::Wait(standings) => {
                let reasons: Vec<String> = standings
                    .iter()
                    .map(|(node, standing)| format!("{} {}", name(*node), standing.describe(name)))
                    .collect();
                format!("hostd is absent; nobody to claim: {}", reasons.join("; "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use wire::coordinator::MemberRecord;

    use super::*;

    const A: u32 = 0;
    const B: u32 = 1;
    const C: u32 = 2;

    fn presence(absent_after_ms: u64, peer_dead_after_ms: u64) -> Option<HostdPresence> {
        Some(HostdPresence {
            counter: 9,
            unix_ns: 0,
            absent_after_ms,
            peer_dead_after_ms,
        })
    }

    /// a, b, c, all members; a's takers b then c, b's c then a, c's a then b.
    fn state() -> CoordinatorState {
        let record = |node, takers: Vec<u32>| MemberRecord {
            node,
            member: true,
            since: 0,
            takers,
        };
        CoordinatorState {
            generation: 1,
            nodes: vec![
                record(A, vec![B, C]),
                record(B, vec![C, A]),
                record(C, vec![A, B]),
            ],
            owners: vec![],
        }
    }

    /// A peer whose heartbeat stood still for `still_ms`, links silent, owning its identity.
    fn peer(node: u32, still_ms: u64) -> PeerView {
        PeerView {
            node,
            beat_still_for: Duration::from_millis(still_ms),
            links_silent: true,
            owns_something: true,
            claimed_recently: false,
        }
    }

    fn decide_for(
        me: u32,
        hostd_still_ms: u64,
        peers: &[PeerView],
        state: &CoordinatorState,
    ) -> Verdict {
        decide(&View {
            me,
            presence: presence(3000, 1000),
            hostd_still_for: Duration::from_millis(hostd_still_ms),
            peers,
            state: Some(state),
        })
    }

    #[test]
    fn while_hostd_is_present_nothing_is_claimed() {
        let peers = [peer(A, 60_000)];
        assert_eq!(decide_for(B, 2999, &peers, &state()), Verdict::HostdPresent);
        assert_eq!(
            decide_for(B, 3000, &peers, &state()),
            Verdict::Claim { victim: A },
            "absent once its counter stood still for absent_after_ms"
        );
    }

    #[test]
    fn thresholds_of_zero_or_no_presence_mean_never() {
        let peers = [peer(A, 600_000)];
        for presence in [None, presence(0, 1000), presence(3000, 0)] {
            let view = View {
                me: B,
                presence,
                hostd_still_for: Duration::from_secs(600),
                peers: &peers,
                state: Some(&state()),
            };
            assert_eq!(decide(&view), Verdict::HostdDecides, "{presence:?}");
        }
    }

    #[test]
    fn a_peer_whose_heartbeat_moves_is_not_claimed() {
        let peers = [peer(A, 999)];
        assert_eq!(
            decide_for(B, 10_000, &peers, &state()),
            Verdict::Wait(vec![(A, Standing::Alive)])
        );
    }

    /// Every link cut while both live: each sees the other's heartbeat move, nobody claims.
    /// A heartbeat that stands still while a link is up is not a death either.
    #[test]
    fn a_partition_is_not_a_death() {
        let mut silent_but_linked = peer(A, 5000);
        silent_but_linked.links_silent = false;
        assert_eq!(
            decide_for(B, 10_000, &[silent_but_linked], &state()),
            Verdict::Wait(vec![(A, Standing::Partitioned)])
        );
    }

    #[test]
    fn the_first_taker_claims_a_dead_peer() {
        assert_eq!(
            decide_for(B, 10_000, &[peer(A, 1000), peer(C, 10)], &state()),
            Verdict::Claim { victim: A }
        );
    }

    /// c is a's second taker: it waits while b lives, and claims once b is dead too, or
    /// no member.
    #[test]
    fn the_second_taker_waits_while_the_first_lives() {
        let state = state();
        assert_eq!(
            decide_for(C, 10_000, &[peer(A, 1000), peer(B, 10)], &state),
            Verdict::Wait(vec![(A, Standing::EarlierTaker(B)), (B, Standing::Alive)])
        );
        assert_eq!(
            decide_for(C, 10_000, &[peer(A, 1000), peer(B, 1000)], &state),
            Verdict::Claim { victim: A }
        );
        let mut b_out = state.clone();
        b_out.nodes[B as usize].member = false;
        assert_eq!(
            decide_for(C, 10_000, &[peer(A, 1000), peer(B, 10)], &b_out),
            Verdict::Claim { victim: A }
        );
        // A taker this node cannot watch (it maps no region of it) is not taken for dead.
        assert_eq!(
            decide_for(C, 10_000, &[peer(A, 1000)], &state),
            Verdict::Wait(vec![(A, Standing::EarlierTaker(B))])
        );
    }

    #[test]
    fn a_dead_peer_is_not_claimed_when_there_is_nothing_to_claim() {
        let state = state();
        let mut owns_nothing = peer(A, 1000);
        owns_nothing.owns_something = false;
        assert_eq!(
            decide_for(B, 10_000, &[owns_nothing], &state),
            Verdict::Wait(vec![(A, Standing::OwnsNothing)])
        );
        let mut recent = peer(A, 1000);
        recent.claimed_recently = true;
        assert_eq!(
            decide_for(B, 10_000, &[recent], &state),
            Verdict::Wait(vec![(A, Standing::ClaimedRecently)])
        );
        let mut a_out = state.clone();
        a_out.nodes[A as usize].member = false;
        assert_eq!(
            decide_for(B, 10_000, &[peer(A, 1000)], &a_out),
            Verdict::Wait(vec![(A, Standing::NoMember)])
        );
        let mut not_taker = state.clone();
        not_taker.nodes[A as usize].takers = vec![C];
        assert_eq!(
            decide_for(B, 10_000, &[peer(A, 1000)], &not_taker),
            Verdict::Wait(vec![(A, Standing::NotATaker)])
        );
    }

    #[test]
    fn a_node_that_is_no_member_ejects_itself_and_claims_nothing() {
        let mut state = state();
        state.nodes[B as usize].member = false;
        assert_eq!(
            decide_for(B, 10_000, &[peer(A, 1000)], &state),
            Verdict::NotMember
        );
        assert_eq!(
            decide_for(B, 10, &[peer(A, 1000)], &state),
            Verdict::HostdPresent
        );
        let view = View {
            me: B,
            presence: presence(3000, 1000),
            hostd_still_for: Duration::from_secs(10),
            peers: &[],
            state: None,
        };
        assert_eq!(decide(&view), Verdict::NoState);
    }
}
