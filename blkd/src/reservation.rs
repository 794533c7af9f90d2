//! One disk's persistent reservation, modelled on SCSI-3 persistent reservations (SPC-4).
//!
//! Each node that may use the disk registers a key (its node id and a generation). The
//! reservation is *Write Exclusive – Registrants Only*: every registered node may write,
//! nodes without a key may only read, and one registrant holds the reservation. Fencing a
//! node is *preempt and abort*: another registrant removes the node's key (taking the
//! reservation if the node held it), and the daemon fails the node's writes from then on.
//! A fenced node comes back by registering again with a newer generation, so a key from
//! before the fence can never be replayed (fence_scsi's "unfence" at node start).
//!
//! This module is the state machine only: no locks, no files (see [`crate::table`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's registration key: SCSI's 8-byte reservation key, split into the node and the
/// generation it registered at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key {
    pub node: u32,
    pub generation: u64,
}

/// Why a reservation operation was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReservationError {
    #[error(
        "node {node} cannot register generation {generation}: it registered generation {newest} before"
    )]
    StaleKey {
        node: u32,
        generation: u64,
        newest: u64,
    },
    #[error("node {node} is not registered")]
    NotRegistered { node: u32 },
    #[error("node {holder} holds the reservation")]
    Held { holder: u32 },
    #[error("node {node} cannot preempt itself")]
    SelfPreempt { node: u32 },
}

/// What a successful operation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The operation found the state as asked and changed nothing.
    None,
    /// `key` was registered (replacing an older key of the same node, if any).
    Registered { key: Key },
    /// `node` now holds the reservation.
    Reserved { node: u32 },
    /// `by` removed `victim`'s key; `took_reservation` if `victim` held it.
    Preempted {
        victim: Key,
        by: u32,
        took_reservation: bool,
    },
}

/// One disk's registrations and reservation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReservation {
    /// Registered keys by node: the nodes that may write.
    registered: BTreeMap<u32, u64>,
    /// The newest generation each node ever registered, kept after a preemption, so an old
    /// key cannot come back.
    newest: BTreeMap<u32, u64>,
    /// The holder of the Write Exclusive – Registrants Only reservation.
    holder: Option<u32>,
    /// Bumped on every change (SCSI's PRgeneration).
    generation: u64,
}

impl DiskReservation {
    /// Whether `node` may write the disk now.
    pub fn may_write(&self, node: u32) -> bool {
        self.registered.contains_key(&node)
    }

    /// `node`'s registered key, if it has one.
    pub fn key_of(&self, node: u32) -> Option<Key> {
        self.registered
            .get(&node)
            .map(|&generation| Key { node, generation })
    }

    /// The registered keys, by node.
    pub fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        self.registered
            .iter()
            .map(|(&node, &generation)| Key { node, generation })
    }

    pub fn holder(&self) -> Option<u32> {
        self.holder
    }

    /// How many changes the disk's reservation has seen.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Registers `key` (REGISTER AND IGNORE EXISTING KEY): the node may write from now on.
    /// The key it holds again changes nothing; otherwise the generation must be newer than
    /// any the node registered before, so a key from before a preemption stays dead.
    pub fn register(&mut self, key: Key) -> Result<Change, ReservationError> {
        if self.registered.get(&key.node) == Some(&key.generation) {
            return Ok(Change::None);
        }
        let newest = self.newest.get(&key.node).copied();
        if let Some(newest) = newest.filter(|&n| key.generation <= n) {
            return Err(ReservationError::StaleKey {
                node: key.node,
                generation: key.generation,
                newest,
            });
        }
        self.registered.insert(key.node, key.generation);
        self.newest.insert(key.node, key.generation);
        self.generation += 1;
        Ok(Change::Registered { key })
    }

    /// Registers `node` with a generation newer than any it had, unless it holds a key now
    /// (then nothing changes): how a node starts, or comes back after a preemption.
    pub fn register_next(&mut self, node: u32) -> Result<Change, ReservationError> {
        if self.registered.contains_key(&node) {
            return Ok(Change::None);
        }
        self.register(Key {
            node,
            generation: self.newest_generation(node) + 1,
        })
    }

    /// Takes the reservation for `node` (RESERVE): it must be registered, and nobody else
    /// may hold it.
    pub fn reserve(&mut self, node: u32) -> Result<Change, ReservationError> {
        if !self.registered.contains_key(&node) {
            return Err(ReservationError::NotRegistered { node });
        }
        match self.holder {
            Some(holder) if holder == node => Ok(Change::None),
            Some(holder) => Err(ReservationError::Held { holder }),
            None => {
                self.holder = Some(node);
                self.generation += 1;
                Ok(Change::Reserved { node })
            }
        }
    }

    /// Removes `victim`'s key on behalf of registrant `by` (PREEMPT AND ABORT); `by` takes
    /// the reservation if `victim` held it. A victim already without a key changes nothing.
    pub fn preempt(&mut self, victim: u32, by: u32) -> Result<Change, ReservationError> {
        if victim == by {
            return Err(ReservationError::SelfPreempt { node: by });
        }
        if !self.registered.contains_key(&by) {
            return Err(ReservationError::NotRegistered { node: by });
        }
        let Some(generation) = self.registered.remove(&victim) else {
            return Ok(Change::None);
        };
        let took_reservation = self.holder == Some(victim);
        if took_reservation {
            self.holder = Some(by);
        }
        self.generation += 1;
        Ok(Change::Preempted {
            victim: Key {
                node: victim,
                generation,
            },
            by,
            took_reservation,
        })
    }

    /// The newest generation `node` registered, or 0 if it never did.
    pub fn newest_generation(&self, node: u32) -> u64 {
        self.newest.get(&node).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(node: u32, generation: u64) -> Key {
        Key { node, generation }
    }

    fn registered(nodes: &[u32]) -> DiskReservation {
        let mut disk = DiskReservation::default();
        for &node in nodes {
            disk.register(key(node, 1)).unwrap();
        }
        disk
    }

    #[test]
    fn only_registrants_may_write() {
        let mut disk = registered(&[0]);
        assert!(disk.may_write(0));
        assert!(!disk.may_write(1));
        disk.register(key(1, 1)).unwrap();
        assert!(disk.may_write(1));
    }

    #[test]
    fn one_holder_at_a_time() {
        let mut disk = registered(&[0, 1]);
        assert_eq!(disk.reserve(0), Ok(Change::Reserved { node: 0 }));
        assert_eq!(disk.reserve(0), Ok(Change::None));
        assert_eq!(disk.reserve(1), Err(ReservationError::Held { holder: 0 }));
        assert_eq!(
            disk.reserve(2),
            Err(ReservationError::NotRegistered { node: 2 })
        );
        assert_eq!(disk.holder(), Some(0));
    }

    #[test]
    fn preempt_removes_the_key_and_moves_the_reservation() {
        let mut disk = registered(&[0, 1, 2]);
        disk.reserve(0).unwrap();
        let before = disk.generation();
        assert_eq!(
            disk.preempt(0, 1),
            Ok(Change::Preempted {
                victim: key(0, 1),
                by: 1,
                took_reservation: true
            })
        );
        assert!(!disk.may_write(0));
        assert!(disk.may_write(1) && disk.may_write(2));
        assert_eq!(disk.holder(), Some(1));
        assert!(disk.generation() > before);
        // Preempting a node without a key, or a non-holder, leaves the holder.
        assert_eq!(disk.preempt(0, 2), Ok(Change::None));
        assert_eq!(
            disk.preempt(2, 1),
            Ok(Change::Preempted {
                victim: key(2, 1),
                by: 1,
                took_reservation: false
            })
        );
        assert_eq!(disk.holder(), Some(1));
    }

    #[test]
    fn a_node_without_a_key_cannot_preempt_nor_preempt_itself() {
        let mut disk = registered(&[0, 1]);
        assert_eq!(
            disk.preempt(0, 3),
            Err(ReservationError::NotRegistered { node: 3 })
        );
        assert_eq!(
            disk.preempt(1, 1),
            Err(ReservationError::SelfPreempt { node: 1 })
        );
        assert!(disk.may_write(0) && disk.may_write(1));
    }

    #[test]
    fn a_fenced_node_comes_back_only_with_a_newer_generation() {
        let mut disk = registered(&[0, 1]);
        disk.register(key(0, 5)).unwrap();
        disk.preempt(0, 1).unwrap();
        assert_eq!(
            disk.register(key(0, 4)),
            Err(ReservationError::StaleKey {
                node: 0,
                generation: 4,
                newest: 5
            })
        );
        assert!(!disk.may_write(0));
        assert!(matches!(
            disk.register(key(0, 5)),
            Err(ReservationError::StaleKey { .. })
        ));
        assert_eq!(
            disk.register(key(0, 6)),
            Ok(Change::Registered { key: key(0, 6) })
        );
        assert!(disk.may_write(0));
        assert_eq!(disk.newest_generation(0), 6);
        assert_eq!(disk.key_of(0), Some(key(0, 6)));
    }

    #[test]
    fn register_next_picks_a_newer_generation_only_when_needed() {
        let mut disk = DiskReservation::default();
        assert_eq!(
            disk.register_next(2),
            Ok(Change::Registered { key: key(2, 1) })
        );
        assert_eq!(disk.register_next(2), Ok(Change::None));
        disk.register(key(1, 1)).unwrap();
        disk.preempt(2, 1).unwrap();
        assert_eq!(
            disk.register_next(2),
            Ok(Change::Registered { key: key(2, 2) })
        );
    }

    #[test]
    fn every_change_bumps_the_generation_and_no_change_does_not() {
        let mut disk = DiskReservation::default();
        let mut last = disk.generation();
        let mut step = |disk: &mut DiskReservation, changed: bool| {
            assert_eq!(disk.generation() > last, changed);
            last = disk.generation();
        };
        disk.register(key(0, 1)).unwrap();
        step(&mut disk, true);
        disk.register(key(0, 1)).unwrap();
        step(&mut disk, false);
        disk.register(key(1, 1)).unwrap();
        step(&mut disk, true);
        disk.reserve(0).unwrap();
        step(&mut disk, true);
        disk.reserve(0).unwrap();
        step(&mut disk, false);
        disk.preempt(1, 0).unwrap();
        step(&mut disk, true);
        disk.preempt(1, 0).unwrap();
        step(&mut disk, false);
    }
}
