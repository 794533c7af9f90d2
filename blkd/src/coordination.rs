//! The coordinator as the daemon runs it: one lock around it, so the node sockets and the
//! control socket are served in one order, and the reservations table (or, where the disks
//! cannot fence, the victim's process: [`crate::stonith`]) to fence a claim's victim with.

use std::sync::{Arc, Mutex, MutexGuard};

use wire::coordinator::{IdentityOwner, NodeAnswer, NodeRequest};
use wire::storage::StorageResponse;

use crate::coordinator::{ChangeError, Coordinator, Outcome, Preempted};
use crate::stonith::{PeerProcess, Stonith};
use crate::table::Table;

/// The daemon's coordinator, shared by every socket's thread.
#[derive(Debug)]
pub struct Coordination {
    coordinator: Mutex<Coordinator>,
    table: Arc<Table>,
    /// The plan's disks: where a claim's victim is preempted.
    disks: Vec<String>,
    /// Set where the disks have no I/O fence for the nodes (the process backend): a won
    /// claim kills the victim's process.
    stonith: Option<Stonith>,
}

/// The lock was poisoned: a thread panicked while changing the coordinator, so nothing
/// more is decided (fail closed).
const POISONED: &str = "a thread panicked while holding the coordinator";

impl Coordination {
    /// Takes `coordinator` into service, first carrying out any preemption a previous
    /// daemon saved a claim for but did not do. With `stonith`, a won claim's victim is
    /// also killed (its process is not known yet to a new daemon: such a claim lists it as
    /// not fenced).
    pub fn new(
        coordinator: Coordinator,
        table: Arc<Table>,
        disks: Vec<String>,
        stonith: Option<Stonith>,
    ) -> Self {
        let coordination = Self {
            coordinator: Mutex::new(coordinator),
            table,
            disks,
            stonith,
        };
        if let Ok(mut coordinator) = coordination.lock() {
            coordinator.finish_preemptions(|victim, by| coordination.fence(victim, by));
        }
        coordination
    }

    /// What kills a won claim's victim, where the disks cannot fence it.
    pub fn stonith(&self) -> Option<&Stonith> {
        self.stonith.as_ref()
    }

    /// Node `node`'s process asked something on its socket: the process a claim of the
    /// node kills (only where victims are killed).
    pub fn note_process(&self, node: u32, process: PeerProcess) {
        if let Some(stonith) = &self.stonith {
            stonith.note(node, process);
        }
    }

    /// Fences `victim` for `by`'s won claim: its keys on every disk, then its process
    /// where victims are killed. Called with the coordinator's state saved and before the
    /// answer.
    fn fence(&self, victim: u32, by: u32) -> Preempted {
        let mut done = preempt_everywhere(&self.table, &self.disks, victim, by);
        if let Some(stonith) = &self.stonith {
            done.push(stonith.kill(victim, by));
        }
        done
    }

    /// Answers node `node`'s request on its own socket.
    pub fn answer(&self, node: u32, request: &NodeRequest) -> NodeAnswer {
        let mut coordinator = match self.lock() {
            Ok(coordinator) => coordinator,
            Err(message) => return NodeAnswer::Error { message },
        };
        match *request {
            NodeRequest::State => NodeAnswer::State {
                state: coordinator.state(),
            },
            NodeRequest::Claim { victim, number } => {
                // Where only a kill fences, a member whose process this daemon does not
                // know (it asked nothing since the daemon started) cannot be fenced: it is
                // not claimed, and the claimer asks again until it can be (a victim no
                // member any more gets its stored or lost answer below).
                let unfenceable = self
                    .stonith
                    .as_ref()
                    .is_some_and(|s| s.known(victim).is_none())
                    && coordinator.state().node(victim).is_some_and(|m| m.member);
                if unfenceable {
                    return NodeAnswer::Error {
                        message: format!(
                            "node {victim}'s process is not known to this daemon, so a claim could not fence it: not claimed"
                        ),
                    };
                }
                let fence = |victim, by| self.fence(victim, by);
                match coordinator.claim(node, victim, number, fence) {
                    Ok(answer) => answer,
                    Err(error) => NodeAnswer::Error {
                        message: wire::error_chain::one_line(&error),
                    },
                }
            }
        }
    }

    /// The control socket's `Coordinator`.
    pub fn state(&self) -> StorageResponse {
        match self.lock() {
            Ok(coordinator) => StorageResponse::Coordinator {
                state: coordinator.state(),
            },
            Err(message) => StorageResponse::Error { message },
        }
    }

    /// The control socket's `Assign`.
    pub fn assign(&self, identity: u32, node: Option<u32>, generation: u64) -> StorageResponse {
        match self.lock() {
            Ok(mut coordinator) => outcome(coordinator.assign(identity, node, generation)),
            Err(message) => StorageResponse::Error { message },
        }
    }

    /// The control socket's `Sync`.
    pub fn sync(&self, generation: u64, owners: &[IdentityOwner]) -> StorageResponse {
        match self.lock() {
            Ok(mut coordinator) => outcome(coordinator.sync(generation, owners)),
            Err(message) => StorageResponse::Error { message },
        }
    }

    /// The control socket's `Rejoin`.
    pub fn rejoin(&self, node: u32) -> StorageResponse {
        match self.lock() {
            Ok(mut coordinator) => match coordinator.rejoin(node) {
                Ok(state) => StorageResponse::Coordinator { state },
                Err(error) => error_response(&error),
            },
            Err(message) => StorageResponse::Error { message },
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Coordinator>, String> {
        self.coordinator.lock().map_err(|_| POISONED.to_owned())
    }
}

fn outcome(result: Result<Outcome, ChangeError>) -> StorageResponse {
    match result {
        Ok(Outcome::Done(state)) => StorageResponse::Coordinator { state },
        Ok(Outcome::Stale(state)) => StorageResponse::Stale { state },
        Err(error) => error_response(&error),
    }
}

fn error_response(error: &ChangeError) -> StorageResponse {
    StorageResponse::Error {
        message: wire::error_chain::one_line(error),
    }
}

/// Removes `victim`'s key, on behalf of `by`, from each of `disks` it is registered on (as
/// hostd's `Preempt`: each returns once the victim has no write in progress there). A disk
/// where `by` has no key refuses, and says why.
pub fn preempt_everywhere(table: &Table, disks: &[String], victim: u32, by: u32) -> Preempted {
    let mut results = Vec::new();
    for disk in disks {
        let mut registered = false;
        let change = table.change(disk, |d| {
            registered = d.may_write(victim);
            if registered {
                d.preempt(victim, by)
            } else {
                Ok(crate::reservation::Change::None)
            }
        });
        match change {
            Ok(change) => {
                crate::control::log_change(disk, change);
                if registered {
                    results.push((disk.clone(), Ok(())));
                }
            }
            Err(error) => {
                // The answer says "disk: why"; the refusal's own message says the rest.
                let why = match &error {
                    crate::table::ChangeError::Refused { source, .. } => source.to_string(),
                    other => wire::error_chain::one_line(other),
                };
                results.push((disk.clone(), Err(why)));
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use wire::coordinator::LostReason;
    use wire::storage::{CoordinatorNode, CoordinatorPlan, StorageRequest};

    use super::*;
    use crate::control::handle;

    fn plan(dir: &Path) -> CoordinatorPlan {
        CoordinatorPlan {
            state: dir.join("coordinator.json"),
            identities: 2,
            nodes: (0..2)
                .map(|node| CoordinatorNode {
                    node,
                    socket: dir.join(format!("coord-{node}.sock")),
                    takers: vec![1 - node],
                })
                .collect(),
            kill_victims: false,
        }
    }

    /// Disks a, b, c: both nodes registered on a, only the victim (0) on b, nobody on c.
    fn coordination(dir: &Path) -> (Arc<Table>, Coordination) {
        let disks: Vec<String> = ["a", "b", "c"].map(str::to_owned).to_vec();
        let table = Arc::new(Table::load(&dir.join("r.json"), &disks).unwrap());
        for (disk, node) in [("a", 0), ("a", 1), ("b", 0)] {
            table.change(disk, |d| d.register_next(node)).unwrap();
        }
        let coordinator = Coordinator::open(&plan(dir)).unwrap();
        let coordination = Coordination::new(coordinator, Arc::clone(&table), disks, None);
        (table, coordination)
    }

    #[test]
    fn a_won_claim_preempts_the_victim_where_it_is_registered() {
        let dir = tempfile::tempdir().unwrap();
        let (table, coordination) = coordination(dir.path());
        let answer = coordination.answer(
            1,
            &NodeRequest::Claim {
                victim: 0,
                number: 1,
            },
        );
        assert_eq!(
            answer,
            NodeAnswer::Won {
                number: 1,
                generation: 1,
                identities: vec![0],
                preempted: vec!["a".into()],
                not_preempted: vec!["b: node 1 is not registered".into()],
            }
        );
        let gate = |disk, node| table.gate(disk, node).unwrap().may_write();
        assert!(!gate("a", 0), "fenced where the winner could preempt");
        assert!(gate("a", 1));
        assert!(gate("b", 0), "the winner has no key on b");
        // The loser of the race hears it is no member.
        let NodeAnswer::Lost { reason, state, .. } = coordination.answer(
            0,
            &NodeRequest::Claim {
                victim: 1,
                number: 1,
            },
        ) else {
            panic!("the victim won too");
        };
        assert_eq!(reason, LostReason::NotMember);
        assert_eq!(state.owned_by(1), vec![0, 1]);
    }

    #[test]
    fn where_victims_are_killed_an_unknown_process_is_not_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let table = Arc::new(Table::load(&dir.path().join("r.json"), &[]).unwrap());
        let coordinator = Coordinator::open(&plan(dir.path())).unwrap();
        let stonith = Stonith::new(Box::new(crate::stonith::HostProcesses));
        let coordination = Coordination::new(coordinator, table, Vec::new(), Some(stonith));
        let claim = NodeRequest::Claim {
            victim: 0,
            number: 1,
        };
        let NodeAnswer::Error { message } = coordination.answer(1, &claim) else {
            panic!("a victim nothing can fence was claimed");
        };
        assert!(message.contains("not known"), "{message}");
        let StorageResponse::Coordinator { state } = coordination.state() else {
            panic!("no state");
        };
        assert_eq!(state.generation, 0, "nothing changed");
    }

    #[test]
    fn the_control_socket_reads_and_moves_the_coordinators_owners() {
        let dir = tempfile::tempdir().unwrap();
        let (table, coordination) = coordination(dir.path());
        let with = |request: StorageRequest| handle(&table, Some(&coordination), &request);
        let StorageResponse::Coordinator { state } = with(StorageRequest::Coordinator) else {
            panic!("no state");
        };
        assert_eq!(state.generation, 0);
        let assigned = with(StorageRequest::Assign {
            identity: 0,
            node: Some(1),
            generation: 3,
        });
        let StorageResponse::Coordinator { state } = assigned else {
            panic!("{assigned:?}");
        };
        assert_eq!(state.owned_by(1), vec![0, 1]);
        assert_eq!(
            with(StorageRequest::Sync {
                generation: 2,
                owners: Vec::new()
            }),
            StorageResponse::Stale {
                state: state.clone()
            }
        );
        assert!(matches!(
            with(StorageRequest::Rejoin { node: 4 }),
            StorageResponse::Error { message } if message == "the coordinator does not know node 4"
        ));
        assert_eq!(
            with(StorageRequest::Rejoin { node: 0 }),
            StorageResponse::Coordinator { state }
        );
        // A daemon without a coordinator says so.
        assert_eq!(
            handle(&table, None, &StorageRequest::Coordinator),
            StorageResponse::Error {
                message: "this daemon runs no coordinator".into()
            }
        );
    }
}
