//! `hostd fence NODE [--keep-running]` and `hostd unfence NODE`: the operator's I/O fence,
//! as `fence_scsi` gives one (preempt the node's keys on every disk; then kill it, unless
//! asked to keep it running), and its undoing.

use wire::events::Event;

use super::cluster::{Cluster, FENCE_TIMEOUT};
use super::moves;
use crate::storage::StorageError;

/// Why a fence or an unfence failed.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("no node is called {0:?}")]
    NoSuchNode(String),
    #[error("node {0} is fenced already (`hostd unfence {0}`, then `hostd giveback {0}`)")]
    AlreadyFenced(String),
    #[error("cannot fence node {node} at the storage")]
    Storage {
        node: String,
        #[source]
        source: StorageError,
    },
    #[error("cannot kill node {node}")]
    Kill {
        node: String,
        #[source]
        source: super::backend::BackendError,
    },
}

/// Fences node `name`: its keys preempted on every disk, then (unless `keep_running`) its
/// process killed and reaped; its identities then move to takers. Says what was done.
pub fn fence(cluster: &mut Cluster, name: &str, keep_running: bool) -> Result<String, FenceError> {
    let node = cluster
        .node_named(name)
        .ok_or_else(|| FenceError::NoSuchNode(name.to_owned()))?;
    if cluster.node(node).fenced {
        return Err(FenceError::AlreadyFenced(name.to_owned()));
    }
    cluster.record(&Event::FaultInjected {
        node: name.to_owned(),
        signal: if keep_running {
            "fence_keep_running".into()
        } else {
            "fence".into()
        },
    });
    let message = if keep_running {
        cluster
            .fence_at_storage(node, "fenced by the operator")
            .map_err(|source| FenceError::Storage {
                node: name.to_owned(),
                source,
            })?;
        format!(
            "node {name}: keys preempted on every disk, its writes fail there; its QEMU keeps running"
        )
    } else {
        cluster.node_mut(node).down_at = Some(std::time::Instant::now());
        cluster.fence(node).map_err(|source| FenceError::Kill {
            node: name.to_owned(),
            source,
        })?;
        format!("node {name}: keys preempted on every disk, then killed and reaped")
    };
    // Its identities go to takers now, as after any fence.
    moves::adopt_orphans(cluster);
    Ok(message)
}

/// Registers node `name` on its disks again. A node fenced with `--keep-running` is killed
/// first: its log may hold writes a taker has replayed since, which it must never flush
/// over newer data; `hostd giveback` restarts it clean.
pub fn unfence(cluster: &mut Cluster, name: &str) -> Result<String, FenceError> {
    let node = cluster
        .node_named(name)
        .ok_or_else(|| FenceError::NoSuchNode(name.to_owned()))?;
    let mut message = String::new();
    if cluster.node(node).kept_running {
        cluster
            .backend_mut()
            .fence(node, FENCE_TIMEOUT)
            .map_err(|source| FenceError::Kill {
                node: name.to_owned(),
                source,
            })?;
        cluster.node_mut(node).kept_running = false;
        message.push_str(&format!(
            "node {name}: its QEMU, kept running since its fence, was stopped (its log is stale); "
        ));
    }
    cluster
        .register_keys(node)
        .map_err(|source| FenceError::Storage {
            node: name.to_owned(),
            source,
        })?;
    message.push_str(&format!(
        "node {name}: registered on its disks again{}",
        if cluster.node(node).fenced {
            format!("; `hostd giveback {name}` restarts it and gives its identity back")
        } else {
            String::new()
        }
    ));
    Ok(message)
}
