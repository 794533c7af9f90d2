//! The daemon's reservations for every disk: kept in memory behind one lock per disk and in
//! a small file, written and synced before a change takes effect, so a restarted daemon
//! never lets a fenced node write again.
//!
//! A [`WriteGate`] is the check on the data path: a change to a disk (write, discard,
//! write zeroes) runs while the gate holds the disk's lock shared, and a preemption of that
//! disk takes it exclusively. So when a preemption returns, every change the victim had in progress
//! has finished, and every later one is refused: the "abort" of preempt-and-abort.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::reservation::{Change, DiskReservation, Key, ReservationError};

/// The file's format version.
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct TableFile {
    version: u32,
    disks: BTreeMap<String, DiskReservation>,
}

/// Errors loading the reservations file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a reservations file", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has format version {found}; this daemon reads version {FORMAT_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
}

/// Errors changing a reservation.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("there is no disk named {disk:?}")]
    NoSuchDisk { disk: String },
    #[error("disk {disk}")]
    Refused {
        disk: String,
        #[source]
        source: ReservationError,
    },
    #[error("cannot save the reservations in {}", path.display())]
    Save {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a thread panicked while holding the reservations")]
    Poisoned,
}

/// A request at the data path was refused: the node has no key on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("node {node} is not registered on this disk (fenced)")]
pub struct WriteDenied {
    pub node: u32,
}

#[derive(Debug)]
struct Disk {
    state: RwLock<DiskReservation>,
}

/// Every disk's reservation, persisted at `path`.
#[derive(Debug)]
pub struct Table {
    path: PathBuf,
    disks: BTreeMap<String, Arc<Disk>>,
    /// Held while a change writes the file: changes to different disks one at a time.
    saving: Mutex<()>,
}

/// One disk's state as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskView {
    pub name: String,
    pub holder: Option<u32>,
    pub registered: Vec<Key>,
    pub generation: u64,
}

impl Table {
    /// Loads the table at `path` for `disks`: a disk the file does not know starts with no
    /// registrations; one the file knows but `disks` does not is kept in the file (a disk
    /// removed from the configuration keeps its fences if it comes back).
    pub fn load(path: &Path, disks: &[String]) -> Result<Self, LoadError> {
        let mut file = match fs::read(path) {
            Ok(bytes) => {
                let file: TableFile =
                    serde_json::from_slice(&bytes).map_err(|source| LoadError::Parse {
                        path: path.to_owned(),
                        source,
                    })?;
                if file.version != FORMAT_VERSION {
                    return Err(LoadError::Version {
                        path: path.to_owned(),
                        found: file.version,
                    });
                }
                file.disks
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(LoadError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        for disk in disks {
            file.entry(disk.clone()).or_default();
        }
        Ok(Self {
            path: path.to_owned(),
            disks: file
                .into_iter()
                .map(|(name, state)| {
                    let disk = Disk {
                        state: RwLock::new(state),
                    };
                    (name, Arc::new(disk))
                })
                .collect(),
            saving: Mutex::new(()),
        })
    }

    /// The gate through which `node`'s changes to `disk` go.
    pub fn gate(&self, disk: &str, node: u32) -> Option<WriteGate> {
        self.disks.get(disk).map(|d| WriteGate {
            disk: Arc::clone(d),
            node,
        })
    }

    /// The disks' names.
    pub fn disk_names(&self) -> impl Iterator<Item = &str> {
        self.disks.keys().map(String::as_str)
    }

    /// Every disk's state.
    pub fn views(&self) -> Result<Vec<DiskView>, ChangeError> {
        self.disks
            .iter()
            .map(|(name, disk)| {
                let state = disk.state.read().map_err(|_| ChangeError::Poisoned)?;
                Ok(DiskView {
                    name: name.clone(),
                    holder: state.holder(),
                    registered: state.keys().collect(),
                    generation: state.generation(),
                })
            })
            .collect()
    }

    /// Applies `operation` to `disk`: computes the new state, saves the whole table with it,
    /// and only then lets it take effect. Writes to that disk wait meanwhile; the others'
    /// do not.
    pub fn change(
        &self,
        disk: &str,
        operation: impl FnOnce(&mut DiskReservation) -> Result<Change, ReservationError>,
    ) -> Result<Change, ChangeError> {
        let target = self
            .disks
            .get(disk)
            .ok_or_else(|| ChangeError::NoSuchDisk {
                disk: disk.to_owned(),
            })?;
        // One change at a time writes the file; the other disks are only read (briefly,
        // shared with their writes), so a change waits for this disk's writes alone.
        let _saving = self.saving.lock().map_err(|_| ChangeError::Poisoned)?;
        let mut state = target.state.write().map_err(|_| ChangeError::Poisoned)?;
        let mut next = state.clone();
        let change = operation(&mut next).map_err(|source| ChangeError::Refused {
            disk: disk.to_owned(),
            source,
        })?;
        if change == Change::None {
            return Ok(change);
        }
        let mut disks = BTreeMap::new();
        for (name, other) in &self.disks {
            let other = if name == disk {
                next.clone()
            } else {
                other
                    .state
                    .read()
                    .map_err(|_| ChangeError::Poisoned)?
                    .clone()
            };
            disks.insert(name.clone(), other);
        }
        let file = TableFile {
            version: FORMAT_VERSION,
            disks,
        };
        save(&self.path, &file).map_err(|source| ChangeError::Save {
            path: self.path.clone(),
            source,
        })?;
        *state = next;
        Ok(change)
    }
}

/// Writes `file` to `path` atomically and durably.
fn save(path: &Path, file: &TableFile) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
    crate::durable::replace(path, &bytes)
}

/// One node's permission to change one disk, checked per request.
#[derive(Debug, Clone)]
pub struct WriteGate {
    disk: Arc<Disk>,
    node: u32,
}

impl WriteGate {
    /// A gate that is always open: one node, registered, on a disk of its own (tests and
    /// tools that need no fencing).
    pub fn open(node: u32) -> Self {
        let mut state = DiskReservation::default();
        // A fresh state accepts any first key.
        let _ = state.register(Key {
            node,
            generation: 1,
        });
        Self {
            disk: Arc::new(Disk {
                state: RwLock::new(state),
            }),
            node,
        }
    }

    /// The node this gate is for.
    pub fn node(&self) -> u32 {
        self.node
    }

    /// Runs `change` if the node may write the disk now; a preemption waits until it has
    /// finished. A poisoned lock refuses (fail closed).
    pub fn write<T>(&self, change: impl FnOnce() -> T) -> Result<T, WriteDenied> {
        let denied = WriteDenied { node: self.node };
        let state = self.disk.state.read().map_err(|_| denied)?;
        if !state.may_write(self.node) {
            return Err(denied);
        }
        let result = change();
        drop(state);
        Ok(result)
    }

    /// Whether the node may write now (a read-only look: for reports, not for gating).
    pub fn may_write(&self) -> bool {
        self.disk
            .state
            .read()
            .is_ok_and(|state| state.may_write(self.node))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use super::*;

    fn names(disks: &[&str]) -> Vec<String> {
        disks.iter().map(|d| (*d).to_owned()).collect()
    }

    fn key(node: u32, generation: u64) -> Key {
        Key { node, generation }
    }

    #[test]
    fn changes_survive_a_reload_and_unknown_disks_start_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reservations.json");
        let table = Table::load(&path, &names(&["a", "b"])).unwrap();
        table.change("a", |d| d.register(key(0, 1))).unwrap();
        table.change("a", |d| d.register(key(1, 1))).unwrap();
        table.change("a", |d| d.reserve(0)).unwrap();
        table.change("a", |d| d.preempt(0, 1)).unwrap();
        drop(table);

        let table = Table::load(&path, &names(&["a", "b", "c"])).unwrap();
        let views = table.views().unwrap();
        assert_eq!(views.len(), 3);
        assert_eq!(views[0].name, "a");
        assert_eq!(views[0].holder, Some(1));
        assert_eq!(views[0].registered, vec![key(1, 1)]);
        assert!(views[1].registered.is_empty() && views[2].registered.is_empty());
        assert!(!table.gate("a", 0).unwrap().may_write());
        assert!(table.gate("a", 1).unwrap().may_write());
        // The old key stays refused after the reload.
        assert!(matches!(
            table.change("a", |d| d.register(key(0, 0))),
            Err(ChangeError::Refused {
                source: ReservationError::StaleKey { .. },
                ..
            })
        ));
    }

    #[test]
    fn a_refused_or_empty_change_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reservations.json");
        let table = Table::load(&path, &names(&["a"])).unwrap();
        assert!(matches!(
            table.change("a", |d| d.reserve(0)),
            Err(ChangeError::Refused { .. })
        ));
        assert!(!path.exists());
        assert!(matches!(
            table.change("zz", |d| d.reserve(0)),
            Err(ChangeError::NoSuchDisk { .. })
        ));
    }

    #[test]
    fn a_damaged_or_newer_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reservations.json");
        fs::write(&path, b"{ not json").unwrap();
        assert!(matches!(
            Table::load(&path, &[]),
            Err(LoadError::Parse { .. })
        ));
        fs::write(&path, br#"{"version": 9, "disks": {}}"#).unwrap();
        assert!(matches!(
            Table::load(&path, &[]),
            Err(LoadError::Version { found: 9, .. })
        ));
    }

    #[test]
    fn a_failed_save_leaves_the_old_state_in_force() {
        let dir = tempfile::tempdir().unwrap();
        // A path in a directory that does not exist cannot be saved.
        let path = dir.path().join("missing").join("reservations.json");
        let table = Table::load(&path, &names(&["a"])).unwrap();
        assert!(matches!(
            table.change("a", |d| d.register(key(0, 1))),
            Err(ChangeError::Save { .. })
        ));
        assert!(!table.gate("a", 0).unwrap().may_write());
    }

    #[test]
    fn a_preemption_waits_for_the_victims_write_in_progress_and_refuses_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let table = Arc::new(Table::load(&dir.path().join("r.json"), &names(&["a"])).unwrap());
        table.change("a", |d| d.register(key(0, 1))).unwrap();
        table.change("a", |d| d.register(key(1, 1))).unwrap();
        let gate = table.gate("a", 0).unwrap();
        let (started_tx, started_rx) = mpsc::channel();
        let (finish_tx, finish_rx) = mpsc::channel::<()>();
        let writer = thread::spawn(move || {
            gate.write(|| {
                started_tx.send(()).unwrap();
                finish_rx.recv().unwrap();
                "landed"
            })
        });
        started_rx.recv().unwrap();
        let (preempted_tx, preempted_rx) = mpsc::channel();
        let preempting = Arc::clone(&table);
        let preempter = thread::spawn(move || {
            let change = preempting.change("a", |d| d.preempt(0, 1));
            preempted_tx.send(()).unwrap();
            change
        });
        // The preemption cannot finish while the write is in progress.
        assert!(
            preempted_rx
                .recv_timeout(Duration::from_millis(200))
                .is_err()
        );
        finish_tx.send(()).unwrap();
        assert_eq!(writer.join().unwrap(), Ok("landed"));
        assert!(matches!(
            preempter.join().unwrap(),
            Ok(Change::Preempted { .. })
        ));
        let gate = table.gate("a", 0).unwrap();
        assert_eq!(gate.write(|| ()), Err(WriteDenied { node: 0 }));
        assert_eq!(table.gate("a", 1).unwrap().write(|| 7), Ok(7));
    }

    #[test]
    fn an_open_gate_lets_writes_through() {
        assert_eq!(WriteGate::open(3).write(|| 1), Ok(1));
        assert_eq!(WriteGate::open(3).node(), 3);
    }
}
