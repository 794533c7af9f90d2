//! `hostd kill NODE --signal ...`: the faults an operator (or the fault campaign) injects.
//! hostd does not act on them here: the monitor sees their effects like any other failure.

use wire::control::KillSignal;
use wire::events::Event;

use super::backend::{BackendError, Signal};
use super::cluster::Cluster;

/// Why a fault could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("no node is called {0:?}")]
    NoSuchNode(String),
    #[error("node {0} is not running")]
    NotRunning(String),
    #[error("cannot inject {signal:?} into node {node}")]
    Backend {
        node: String,
        signal: KillSignal,
        #[source]
        source: BackendError,
    },
}

/// Injects `signal` into node `name`; says what was done.
pub fn inject(
    cluster: &mut Cluster,
    name: &str,
    signal: KillSignal,
) -> Result<String, InjectError> {
    let node = cluster
        .node_named(name)
        .ok_or_else(|| InjectError::NoSuchNode(name.to_owned()))?;
    let Some(pid) = cluster.pid(node) else {
        return Err(InjectError::NotRunning(name.to_owned()));
    };
    let failed = |source| InjectError::Backend {
        node: name.to_owned(),
        signal,
        source,
    };
    let backend = cluster.backend_mut();
    let done = match signal {
        KillSignal::Kill => {
            backend.signal(node, Signal::Kill).map_err(failed)?;
            format!("SIGKILL sent to node {name} (pid {pid})")
        }
        KillSignal::Stop => {
            backend.signal(node, Signal::Stop).map_err(failed)?;
            format!("SIGSTOP sent to node {name} (pid {pid})")
        }
        KillSignal::Agent => backend.kill_agent(node).map_err(failed)?,
        KillSignal::Panic => {
            backend.panic(node).map_err(failed)?;
            format!("NMI injected into node {name}: its kernel panics on it")
        }
    };
    cluster.record(&Event::FaultInjected {
        node: name.to_owned(),
        signal: format!("{signal:?}").to_lowercase(),
    });
    Ok(done)
}
