//! Command-line arguments.

use std::path::PathBuf;
use std::time::Duration;

/// ivha guest agent: owns this node's shared-memory region.
#[derive(Debug, clap::Parser)]
#[command(name = "guest-agent", version, about)]
pub struct Args {
    /// This node's name (its region is the node region carrying this name).
    #[arg(long)]
    pub node: String,

    /// Where to find regions: the ivshmem devices under this PCI sysfs directory.
    #[arg(
        long,
        default_value = "/sys/bus/pci/devices",
        conflicts_with = "region_dir"
    )]
    pub pci_root: PathBuf,

    /// Process mode: the regions are the `*.region` files in this directory.
    #[arg(long)]
    pub region_dir: Option<PathBuf>,

    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub heartbeat_ms: u64,

    /// Self-test: try to store a marker into the partner's region (which must be
    /// write-protected) and, as a control, into this node's own region.
    #[arg(long)]
    pub selftest_write_partner: bool,

    /// Stop after this many heartbeats (default: run until killed).
    #[arg(long)]
    pub beats: Option<u64>,
}

impl Args {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}
