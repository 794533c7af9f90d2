use std::cell::RefCell;

use wire::storage::CoordinatorNode;

use super::*;

/// Nodes 0 (a), 1 (b), 2 (c): a and b take over from each other, c takes over from a only
/// after b, and nobody takes over c. Three identities.
fn plan(dir: &Path) -> CoordinatorPlan {
    let node = |node: u32, takers: &[u32]| CoordinatorNode {
        node,
        socket: dir.join(format!("coord-{node}.sock")),
        takers: takers.to_vec(),
    };
    CoordinatorPlan {
        state: dir.join("coordinator.json"),
        identities: 3,
        nodes: vec![node(0, &[1, 2]), node(1, &[0]), node(2, &[])],
        kill_victims: false,
    }
}

fn open(dir: &Path) -> Coordinator {
    Coordinator::open(&plan(dir)).unwrap()
}

/// A preemption that succeeds on disk "a" and is refused on disk "b".
fn preempt_a_not_b(_: u32, _: u32) -> Preempted {
    vec![
        ("a".to_owned(), Ok(())),
        ("b".to_owned(), Err("node 1 is not registered".to_owned())),
    ]
}

fn no_preemption(victim: u32, by: u32) -> Preempted {
    panic!("node {by} preempted node {victim} without winning")
}

fn lost(answer: &NodeAnswer) -> LostReason {
    match answer {
        NodeAnswer::Lost { reason, .. } => *reason,
        other => panic!("not lost: {other:?}"),
    }
}

fn owner(state: &CoordinatorState, identity: u32) -> (Option<u32>, u64) {
    let owner = state.owner(identity).unwrap();
    (owner.node, owner.generation)
}

#[test]
fn a_cluster_starts_with_every_node_a_member_owning_its_own_identity() {
    let dir = tempfile::tempdir().unwrap();
    let state = open(dir.path()).state();
    assert_eq!(state.generation, 0);
    assert_eq!(
        state.nodes,
        vec![
            MemberRecord {
                node: 0,
                member: true,
                since: 0,
                takers: vec![1, 2]
            },
            MemberRecord {
                node: 1,
                member: true,
                since: 0,
                takers: vec![0]
            },
            MemberRecord {
                node: 2,
                member: true,
                since: 0,
                takers: vec![]
            },
        ]
    );
    for identity in 0..3 {
        assert_eq!(owner(&state, identity), (Some(identity), 0));
    }
    assert!(
        !plan(dir.path()).state.exists(),
        "nothing is written before a change"
    );
}

#[test]
fn a_won_claim_moves_every_identity_of_the_victim_and_preempts_after_saving() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = open(dir.path());
    let path = plan(dir.path()).state;
    let calls = RefCell::new(Vec::new());
    let answer = coordinator
        .claim(1, 0, 7, |victim, by| {
            // The claim is on disk before any key is removed.
            let saved: CoordinatorFile = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            assert_eq!(saved.state.generation, 1);
            assert!(saved.claims[0].preemption_pending);
            calls.borrow_mut().push((victim, by));
            preempt_a_not_b(victim, by)
        })
        .unwrap();
    assert_eq!(
        answer,
        NodeAnswer::Won {
            number: 7,
            generation: 1,
            identities: vec![0],
            preempted: vec!["a".into()],
            not_preempted: vec!["b: node 1 is not registered".into()],
        }
    );
    assert_eq!(calls.into_inner(), vec![(0, 1)]);
    let state = coordinator.state();
    assert_eq!(state.generation, 1);
    let a = state.node(0).unwrap();
    assert!(!a.member);
    assert_eq!(a.since, 1);
    assert!(state.node(1).unwrap().member);
    assert_eq!(owner(&state, 0), (Some(1), 1));
    assert_eq!(owner(&state, 1), (Some(1), 0));
    assert_eq!(owner(&state, 2), (Some(2), 0));
    let saved: CoordinatorFile = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert!(!saved.claims[0].preemption_pending);
    assert_eq!(saved.claims[0].answer, answer);
}

#[test]
fn refused_claims_change_nothing_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = open(dir.path());
    let before = coordinator.state();
    // c is not among b's takers; a node cannot claim itself; 9 is nobody.
    for (sender, victim, reason) in [
        (2, 1, LostReason::NotATaker),
        (1, 1, LostReason::NotATaker),
        (9, 0, LostReason::UnknownNode),
        (1, 9, LostReason::UnknownNode),
    ] {
        let answer = coordinator.claim(sender, victim, 1, no_preemption).unwrap();
        assert_eq!(lost(&answer), reason, "{sender} claims {victim}");
        let NodeAnswer::Lost { number, state, .. } = answer else {
            unreachable!()
        };
        assert_eq!(number, 1);
        assert_eq!(state, before);
    }
    assert_eq!(coordinator.state(), before);

    // b claims a; then a, no member now, claims b, and c claims a, who is gone.
    coordinator.claim(1, 0, 1, |_, _| Vec::new()).unwrap();
    let after = coordinator.state();
    assert_eq!(
        lost(&coordinator.claim(0, 1, 1, no_preemption).unwrap()),
        LostReason::NotMember
    );
    assert_eq!(
        lost(&coordinator.claim(2, 0, 1, no_preemption).unwrap()),
        LostReason::VictimGone
    );
    assert_eq!(coordinator.state(), after);
}

#[test]
fn a_claim_asked_again_gets_the_same_answer_without_claiming_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = open(dir.path());
    let first = coordinator.claim(1, 0, 42, preempt_a_not_b).unwrap();
    let again = coordinator.claim(1, 0, 42, no_preemption).unwrap();
    assert_eq!(again, first);
    assert_eq!(coordinator.state().generation, 1);
    // So is a refusal.
    let refused = coordinator.claim(2, 1, 5, no_preemption).unwrap();
    assert_eq!(coordinator.claim(2, 1, 5, no_preemption).unwrap(), refused);
    // And after a restart of the daemon.
    drop(coordinator);
    let mut coordinator = open(dir.path());
    assert_eq!(coordinator.claim(1, 0, 42, no_preemption).unwrap(), first);
    assert_eq!(coordinator.state().generation, 1);
    // Another number is another claim: a is gone already.
    assert_eq!(
        lost(&coordinator.claim(1, 0, 43, no_preemption).unwrap()),
        LostReason::VictimGone
    );
}

#[test]
fn when_both_wake_at_once_the_second_claim_finds_its_sender_no_member() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = open(dir.path());
    let won = coordinator.claim(0, 1, 1, |_, _| Vec::new()).unwrap();
    assert!(
        matches!(won, NodeAnswer::Won { generation: 1, .. }),
        "{won:?}"
    );
    let answer = coordinator.claim(1, 0, 1, no_preemption).unwrap();
    assert_eq!(lost(&answer), LostReason::NotMember);
    let state = coordinator.state();
    assert_eq!(state.owned_by(0), vec![0, 1]);
    assert!(state.node(0).unwrap().member);
    assert!(!state.node(1).unwrap().member);
    assert_eq!(state.generation, 1);
}

#[test]
fn hostd_assigns_only_at_a_newer_generation() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = open(dir.path());
    coordinator.claim(1, 0, 1, |_, _| Vec::new()).unwrap();
    let claimed = coordinator.state();
    for generation in [0, 1] {
        assert_eq!(
            coordinator.assign(0, Some(0), generation).unwrap(),
            Outcome::Stale(claimed.clone()),
            "generation {generation}"
        );
    }
    let Outcome::Done(state) = coordinator.assign(2, None, 5).unwrap() else {
        panic!("a newer assignment was refused");
    };
    assert_eq!(state.generation, 5);
    assert_eq!(owner(&state, 2), (None, 5));
    assert_eq!(owner(&state, 0), (Some(1), 1));
    assert!(matches!(
        coordinator.assign(3, Some(0), 9),
        Err(ChangeError::UnknownIdentity(3))
    ));
    assert!(matches!(
        coordinator.assign(0, Some(7), 9),
        Err(ChangeError::UnknownNode(7))
    ));
    assert_eq!(coordinator.state(), state);
}

#[test]
fn a_sync_replaces_the_owners_unless_it_is_older() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = open(dir.path());
    let owners = [
        IdentityOwner {
            identity: 0,
            node: Some(1),
            generation: 4,
        },
        IdentityOwner {
            identity: 2,
            node: None,
            generation: 3,
        },
    ];
    let Outcome::Done(state) = coordinator.sync(4, &owners).unwrap() else {
        panic!("the first sync was refused");
    };
    assert_eq!(state.generation, 4);
    assert_eq!(owner(&state, 0), (Some(1), 4));
    assert_eq!(owner(&state, 1), (Some(1), 0));
    assert_eq!(owner(&state, 2), (None, 3));
    // The same generation again is accepted; an older one is stale.
    assert!(matches!(
        coordinator.sync(4, &owners).unwrap(),
        Outcome::Done(_)
    ));
    assert_eq!(
        coordinator.sync(3, &[]).unwrap(),
        Outcome::Stale(state.clone())
    );
    // At the coordinator's own generation, a sync that would change an owner is stale: a
    // claim may hold that number.
    let other = [IdentityOwner {
        identity: 0,
        node: Some(0),
        generation: 4,
    }];
    assert_eq!(
        coordinator.sync(4, &other).unwrap(),
        Outcome::Stale(state.clone())
    );
    assert!(matches!(
        coordinator.sync(5, &[owners[0], owners[0]]),
        Err(ChangeError::DuplicateIdentity(0))
    ));
    assert!(matches!(
        coordinator.sync(2, &owners),
        Err(ChangeError::OwnerFromTheFuture { identity: 0, .. })
    ));
    assert_eq!(coordinator.state(), state);
    drop(coordinator);
    assert_eq!(open(dir.path()).state(), state);
}

#[test]
fn a_rejoin_makes_a_member_again_without_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = open(dir.path());
    coordinator.claim(1, 0, 1, |_, _| Vec::new()).unwrap();
    assert_eq!(
        lost(&coordinator.claim(0, 1, 1, no_preemption).unwrap()),
        LostReason::NotMember
    );
    let state = coordinator.rejoin(0).unwrap();
    assert_eq!(state.generation, 1);
    assert_eq!(
        state.node(0),
        Some(&MemberRecord {
            node: 0,
            member: true,
            since: 1,
            takers: vec![1, 2]
        })
    );
    assert_eq!(owner(&state, 0), (Some(1), 1), "a rejoin moves no identity");
    // Its new life's claims are new, even with an old number.
    let answer = coordinator.claim(0, 1, 1, |_, _| Vec::new()).unwrap();
    assert!(
        matches!(answer, NodeAnswer::Won { generation: 2, .. }),
        "{answer:?}"
    );
    assert_eq!(
        coordinator.rejoin(2).unwrap().generation,
        2,
        "a member already"
    );
    assert!(matches!(
        coordinator.rejoin(9),
        Err(ChangeError::UnknownNode(9))
    ));
}

#[test]
fn the_state_survives_a_restart_with_the_plans_takers() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = open(dir.path());
    coordinator.claim(0, 1, 3, |_, _| Vec::new()).unwrap();
    coordinator.assign(2, Some(0), 6).unwrap();
    let state = coordinator.state();
    drop(coordinator);
    assert_eq!(open(dir.path()).state(), state);

    // The takers are configuration: the plan's win. A node new to the plan joins.
    let mut changed = plan(dir.path());
    changed.nodes[2].takers = vec![0];
    changed.nodes.push(CoordinatorNode {
        node: 3,
        socket: dir.path().join("coord-3.sock"),
        takers: vec![],
    });
    let loaded = Coordinator::open(&changed).unwrap().state();
    assert_eq!(loaded.node(2).unwrap().takers, vec![0]);
    assert_eq!(
        loaded.node(3),
        Some(&MemberRecord {
            node: 3,
            member: true,
            since: 6,
            takers: vec![]
        })
    );
    assert_eq!(loaded.owners, state.owners);
}

#[test]
fn a_claim_that_cannot_be_saved_does_not_happen() {
    let dir = tempfile::tempdir().unwrap();
    let mut broken = plan(dir.path());
    broken.state = dir.path().join("missing").join("coordinator.json");
    let mut coordinator = Coordinator::open(&broken).unwrap();
    let before = coordinator.state();
    assert!(matches!(
        coordinator.claim(1, 0, 1, no_preemption),
        Err(ChangeError::Save { .. })
    ));
    assert!(matches!(
        coordinator.assign(0, Some(1), 1),
        Err(ChangeError::Save { .. })
    ));
    assert_eq!(coordinator.state(), before);
}

#[test]
fn a_preemption_the_last_daemon_did_not_carry_out_is_done_at_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = plan(dir.path()).state;
    let mut coordinator = open(dir.path());
    coordinator.claim(1, 0, 1, |_, _| Vec::new()).unwrap();
    drop(coordinator);
    // As if the daemon died between saving the claim and preempting.
    let mut file: CoordinatorFile = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    file.claims[0].preemption_pending = true;
    fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();

    let mut coordinator = open(dir.path());
    let mut calls = Vec::new();
    let finished = coordinator.finish_preemptions(|victim, by| {
        calls.push((victim, by));
        preempt_a_not_b(victim, by)
    });
    assert_eq!(finished, 1);
    assert_eq!(calls, vec![(0, 1)]);
    let NodeAnswer::Won {
        preempted,
        not_preempted,
        ..
    } = coordinator.claim(1, 0, 1, no_preemption).unwrap()
    else {
        panic!("the claim's answer changed");
    };
    assert_eq!(preempted, vec!["a".to_owned()]);
    assert_eq!(not_preempted.len(), 1);
    drop(coordinator);
    assert_eq!(open(dir.path()).finish_preemptions(no_preemption), 0);
}

#[test]
fn a_damaged_or_foreign_state_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = plan(dir.path()).state;
    let refused = |bytes: &[u8]| {
        fs::write(&path, bytes).unwrap();
        let error = Coordinator::open(&plan(dir.path())).unwrap_err();
        let text = wire::error_chain::one_line(&error);
        assert!(text.contains(&path.display().to_string()), "{text}");
        error
    };
    assert!(matches!(refused(b"{ not json"), OpenError::Parse { .. }));
    assert!(matches!(
        refused(br#"{"version": 9, "state": {"generation": 0, "nodes": [], "owners": []}}"#),
        OpenError::Version { found: 9, .. }
    ));
    let foreign = |state: CoordinatorState| {
        let file = CoordinatorFile {
            version: FORMAT_VERSION,
            state,
            claims: Vec::new(),
        };
        match refused(&serde_json::to_vec(&file).unwrap()) {
            OpenError::Invalid { source, .. } => source,
            other => panic!("{other:?}"),
        }
    };
    let good = initial_state(&plan(dir.path()));
    let mut unknown_taker = good.clone();
    unknown_taker.nodes[0].takers = vec![1, 8];
    assert!(matches!(foreign(unknown_taker), StateError::UnknownNode(8)));
    let mut unknown_node = good.clone();
    unknown_node.nodes[2].node = 5;
    assert!(matches!(foreign(unknown_node), StateError::UnknownNode(5)));
    let mut unknown_identity = good.clone();
    unknown_identity.owners[2].identity = 3;
    assert!(matches!(
        foreign(unknown_identity),
        StateError::UnknownIdentity { identity: 3, .. }
    ));
    let mut future = good;
    future.owners[0].generation = 2;
    assert!(matches!(
        foreign(future),
        StateError::FromTheFuture { found: 2, .. }
    ));
}

#[test]
fn a_bad_plan_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let check = |edit: &dyn Fn(&mut CoordinatorPlan)| {
        let mut plan = plan(dir.path());
        edit(&mut plan);
        check_plan(&plan).unwrap_err()
    };
    assert!(matches!(
        check(&|p| p.nodes[1].takers = vec![4]),
        PlanError::UnknownTaker { node: 1, taker: 4 }
    ));
    assert!(matches!(
        check(&|p| p.nodes[1].takers = vec![1]),
        PlanError::SelfTaker { node: 1 }
    ));
    assert!(matches!(
        check(&|p| p.nodes[0].takers = vec![1, 1]),
        PlanError::DuplicateTaker { node: 0, taker: 1 }
    ));
    assert!(matches!(
        check(&|p| p.nodes[2].node = 1),
        PlanError::DuplicateNode(1)
    ));
    assert!(matches!(
        check(&|p| p.nodes[2].socket = p.nodes[0].socket.clone()),
        PlanError::DuplicateSocket {
            first: 0,
            second: 2,
            ..
        }
    ));
    assert!(check_plan(&plan(dir.path())).is_ok());
}
