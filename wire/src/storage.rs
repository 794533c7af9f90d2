//! The storage daemon's formats: the plan hostd hands it (which disks, which nodes, which
//! sockets) and its control socket, one JSON request line and one JSON response line.
//!
//! The daemon serves each disk to each node that may use it over a vhost-user socket of
//! its own, `STATE_DIR/blkd/DISK-NODE.sock`, so every request is known to come from one
//! node; its control socket is `STATE_DIR/blkd/control.sock`, mode 0600.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the daemon serves. hostd writes it to `STATE_DIR/blkd/plan.json` before it starts
/// the daemon, which reads it once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoragePlan {
    /// The control socket.
    pub control_socket: PathBuf,
    /// Where the reservations are kept (synced on every change).
    pub reservations: PathBuf,
    pub disks: Vec<PlannedDisk>,
    /// The coordinator, when the cluster's agents may take over from each other without
    /// hostd (absent in plans written before it existed).
    #[serde(default)]
    pub coordinator: Option<CoordinatorPlan>,
}

/// Where the coordinator keeps its state and how each node reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorPlan {
    /// Its state, synced on every change (`STATE_DIR/blkd/coordinator.json`).
    pub state: PathBuf,
    /// Identities, each born owned by the node of the same index (where there is one).
    pub identities: u32,
    pub nodes: Vec<CoordinatorNode>,
    /// The disks have no I/O fence for these nodes (the process backend): a won claim
    /// SIGKILLs the victim's process, known from the peer credentials of its coordinator
    /// connection, and waits until it is gone before answering.
    #[serde(default)]
    pub kill_victims: bool,
}

/// One node's place at the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorNode {
    pub node: u32,
    /// The node's own socket (see `crate::coordinator`).
    pub socket: PathBuf,
    /// The nodes that may claim this node's identities, most preferred first.
    pub takers: Vec<u32>,
}

/// One disk image and the nodes that may attach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedDisk {
    /// The disk's name: the identity whose data it holds.
    pub name: String,
    /// The raw image.
    pub path: PathBuf,
    /// What the guest reads as the disk's serial (virtio-blk GET_ID, at most 20 bytes).
    pub serial: String,
    pub attachments: Vec<Attachment>,
}

/// One node's socket for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The node's index in the cluster (its key's node part).
    pub node: u32,
    pub socket: PathBuf,
}

/// What hostd asks the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum StorageRequest {
    /// Every disk's reservation.
    Status,
    /// `node` registers on `disk` with a generation newer than any it had (unless it holds
    /// a key now): it may write from now on. How a node starts, and how it is unfenced.
    Register { disk: String, node: u32 },
    /// Registrant `node` takes `disk`'s Write Exclusive – Registrants Only reservation.
    Reserve { disk: String, node: u32 },
    /// Registrant `by` removes `victim`'s key from `disk` (preempt and abort): once the
    /// answer comes, `victim` has no write in progress there and every later one fails.
    Preempt { disk: String, victim: u32, by: u32 },
    /// The coordinator's state.
    Coordinator,
    /// hostd moves `identity` to `node` (`None`: nobody) at `generation`, which must be
    /// newer than the coordinator's: a claim an agent won since hostd last looked makes
    /// this fail, and hostd adopts that claim instead of overriding it.
    Assign {
        identity: u32,
        node: Option<u32>,
        generation: u64,
    },
    /// hostd's control region is ahead of the coordinator (a state directory from before
    /// the coordinator, or its state lost): the coordinator takes hostd's owners at
    /// `generation` if that is not older than its own.
    Sync {
        generation: u64,
        owners: Vec<crate::coordinator::IdentityOwner>,
    },
    /// `node` is a member again (hostd restarted it after another node claimed it).
    Rejoin { node: u32 },
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum StorageResponse {
    Status {
        pid: u32,
        disks: Vec<DiskReservationStatus>,
    },
    /// The request was carried out; `changed` is false when it found the state as asked.
    Done {
        changed: bool,
        /// The disk's reservation after it.
        disk: DiskReservationStatus,
    },
    /// The coordinator's state after the request.
    Coordinator {
        state: crate::coordinator::CoordinatorState,
    },
    /// An `Assign` or `Sync` older than the coordinator's state, which is returned: hostd
    /// adopts it.
    Stale {
        state: crate::coordinator::CoordinatorState,
    },
    Error {
        message: String,
    },
}

/// One disk's reservation as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReservationStatus {
    pub name: String,
    /// The node holding the reservation.
    pub holder: Option<u32>,
    /// The registered keys: the nodes that may write.
    pub registered: Vec<RegisteredKey>,
    /// How many changes the reservation has seen (SCSI's PRgeneration).
    pub generation: u64,
}

/// A registered key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredKey {
    pub node: u32,
    pub generation: u64,
}

/// Client side: sends one request and reads the answer.
pub fn call(
    path: &Path,
    request: &StorageRequest,
    timeout: Duration,
) -> std::io::Result<StorageResponse> {
    crate::json_line::call(path, request, timeout, "the storage daemon")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_back_as_written() {
        for request in [
            StorageRequest::Status,
            StorageRequest::Register {
                disk: "a".into(),
                node: 1,
            },
            StorageRequest::Reserve {
                disk: "a".into(),
                node: 0,
            },
            StorageRequest::Preempt {
                disk: "a".into(),
                victim: 0,
                by: 1,
            },
            StorageRequest::Coordinator,
            StorageRequest::Assign {
                identity: 0,
                node: Some(1),
                generation: 4,
            },
            StorageRequest::Rejoin { node: 0 },
        ] {
            let line = serde_json::to_string(&request).unwrap();
            assert_eq!(
                serde_json::from_str::<StorageRequest>(&line).unwrap(),
                request
            );
        }
        let preempt: StorageRequest =
            serde_json::from_str(r#"{"request":"preempt","disk":"b","victim":1,"by":0}"#).unwrap();
        assert_eq!(
            preempt,
            StorageRequest::Preempt {
                disk: "b".into(),
                victim: 1,
                by: 0
            }
        );
    }
}
