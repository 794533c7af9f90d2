//! One node as the daemon sees it: its QEMU, its QMP connection, its region.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use qemu::{QemuChild, QmpClient, QmpEvent};
use shm::NodeRegion;

use crate::protocol::NodeState;

/// A launched node.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub partner: String,
    pub nbd_port: u16,
    pub console: std::path::PathBuf,
    pub child: Option<QemuChild>,
    pub qmp: Option<QmpClient>,
    pub events: Option<Receiver<QmpEvent>>,
    /// The node's region, mapped read-only: hostd never writes a node region.
    pub region: NodeRegion,
    /// Boot id found in the region before launch: a new one means the agent started.
    pub boot_id_before_launch: u64,
    /// How QEMU ended, once it has.
    pub exit: Option<String>,
    pub paused: bool,
    heartbeat: u64,
    heartbeat_moved: Option<Instant>,
}

impl Node {
    pub fn new(
        name: String,
        partner: String,
        nbd_port: u16,
        console: std::path::PathBuf,
        region: NodeRegion,
    ) -> Self {
        let heartbeat = region.heartbeat().map_or(0, |h| h.counter);
        Self {
            boot_id_before_launch: region.boot_id(),
            name,
            partner,
            nbd_port,
            console,
            child: None,
            qmp: None,
            events: None,
            region,
            exit: None,
            paused: false,
            heartbeat,
            heartbeat_moved: None,
        }
    }

    /// Looks at everything that may have changed since the last sample.
    pub fn sample(&mut self, now: Instant) {
        if let (Some(child), None) = (&mut self.child, &self.exit) {
            match child.try_wait() {
                Ok(Some(status)) => {
                    log::warn!("node {}: QEMU exited ({status})", self.name);
                    self.exit = Some(format!("exited: {status}"));
                }
                Ok(None) => {}
                Err(error) => log::warn!("node {}: cannot check QEMU: {error}", self.name),
            }
        }
        if let Some(events) = &self.events {
            for event in events.try_iter() {
                log::debug!(
                    "node {}: QMP event {} {}",
                    self.name,
                    event.name,
                    event.data
                );
                match event.name.as_str() {
                    "STOP" => self.paused = true,
                    "RESUME" => self.paused = false,
                    "GUEST_PANICKED" | "SHUTDOWN" => {
                        log::warn!("node {}: {} {}", self.name, event.name, event.data);
                    }
                    _ => {}
                }
            }
        }
        let counter = self.region.heartbeat().map_or(0, |h| h.counter);
        if counter != self.heartbeat && self.region.boot_id() != self.boot_id_before_launch {
            self.heartbeat = counter;
            self.heartbeat_moved = Some(now);
        }
    }

    pub fn heartbeat(&self) -> u64 {
        self.heartbeat
    }

    pub fn heartbeat_age(&self, now: Instant) -> Option<Duration> {
        self.heartbeat_moved
            .map(|t| now.saturating_duration_since(t))
    }

    pub fn state(&self, now: Instant, timeout: Duration) -> NodeState {
        if self.exit.is_some() || self.child.is_none() {
            return NodeState::Dead;
        }
        if self.paused {
            return NodeState::Paused;
        }
        match self.heartbeat_age(now) {
            None => NodeState::Booting,
            Some(age) if age > timeout => NodeState::Stale,
            Some(_) => NodeState::Up,
        }
    }

    pub fn vm_description(&self) -> String {
        match (&self.exit, self.paused) {
            (Some(exit), _) => exit.clone(),
            (None, true) => "paused".into(),
            (None, false) if self.child.is_some() => "running".into(),
            (None, false) => "not started".into(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child
            .as_ref()
            .filter(|_| self.exit.is_none())
            .map(QemuChild::pid)
    }
}
