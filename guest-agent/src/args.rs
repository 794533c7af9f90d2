//! Command-line arguments.

use std::path::PathBuf;
use std::time::Duration;

use crate::nvram::flusher::Release;

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

    /// This node's disk. Default: the block device whose virtio serial is `ivha-NODE`.
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,

    /// The partner's disk, written only after taking the partner over. Default: the block
    /// device whose virtio serial is `ivha-PARTNER`.
    #[arg(long, value_name = "PATH")]
    pub partner_disk: Option<PathBuf>,

    /// Where block devices are listed (to find disks by serial).
    #[arg(long, default_value = "/sys/block", hide = true)]
    pub sys_block: PathBuf,

    /// Address the NBD server listens on.
    #[arg(long, default_value = "0.0.0.0:10809")]
    pub listen: std::net::SocketAddr,

    /// NBD: after answering, poll the socket this long for the next request before
    /// blocking (saves a wakeup per request at queue depth 1; 0 blocks at once).
    #[arg(long, default_value_t = 0, value_name = "MICROSECONDS",
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub nbd_poll_us: u64,

    /// Flusher: wait this long before each batch (keeps records unflushed for a while).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub flush_delay_ms: u64,

    /// Flusher: never flush (writes stay in the log; they block once it is full).
    #[arg(long)]
    pub flush_paused: bool,

    /// When a logged write leaves the log: `host` once the disk holds it as durably as the
    /// log (process mode: written to the host's page cache; in a guest: synced, since the
    /// guest's page cache dies with the guest), `media` once synced to the disk's media.
    #[arg(long, value_enum, default_value_t = ReleaseArg::Host, value_name = "WHEN")]
    pub release: ReleaseArg,

    /// With `--release host` in process mode: sync the disks to their media this often.
    #[arg(long, default_value_t = 1000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub sync_interval_ms: u64,

    /// How long a write waits for ring space before failing with EIO.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub backpressure_timeout_s: u64,
}

/// Values of `--release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReleaseArg {
    Host,
    Media,
}

impl Args {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// Whether the regions are host files (process mode) rather than a guest's devices.
    pub fn process_mode(&self) -> bool {
        self.region_dir.is_some()
    }

    /// When the flusher may release a record: only where the disk's page cache is the
    /// host's (process mode) can `host` release a record as soon as it is written.
    pub fn release(&self) -> Release {
        match self.release {
            ReleaseArg::Host if self.process_mode() => Release::Written,
            ReleaseArg::Host | ReleaseArg::Media => Release::Synced,
        }
    }
}
