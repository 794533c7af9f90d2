//! Command-line arguments.

use std::path::PathBuf;
use std::time::Duration;

use wire::agent::AgentOptions;

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

    /// Self-test: try to store a marker into a peer's region (which must be
    /// write-protected) and, as a control, into this node's own region.
    #[arg(long)]
    pub selftest_write_partner: bool,

    /// Stop after this many heartbeats (default: run until killed).
    #[arg(long)]
    pub beats: Option<u64>,

    /// This node's disk. Default: the block device whose virtio serial is `ivha-NODE`.
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,

    /// A peer's disk, written only after taking the peer's identity over (repeat for each
    /// peer). Default: the block device whose virtio serial is `ivha-PEER`.
    #[arg(long, value_name = "PEER=PATH", value_parser = parse_peer_disk)]
    pub peer_disk: Vec<(String, PathBuf)>,

    /// Where block devices are listed (to find disks by serial).
    #[arg(long, default_value = "/sys/block", hide = true)]
    pub sys_block: PathBuf,

    /// Process mode: the directory of the interconnect's sockets (one per node and link).
    #[arg(long, value_name = "DIR")]
    pub ic_socket_dir: Option<PathBuf>,

    /// Where network devices are listed (to find the interconnect's NICs by MAC).
    #[arg(long, default_value = "/sys/class/net", hide = true)]
    pub sys_class_net: PathBuf,

    /// Where virtio-serial ports are listed (to find the coordinator's port by name).
    #[arg(long, default_value = "/sys/class/virtio-ports", hide = true)]
    pub sys_virtio_ports: PathBuf,

    /// Address the NBD server listens on.
    #[arg(long, default_value = "0.0.0.0:10809")]
    pub listen: std::net::SocketAddr,

    /// How long a write waits for ring space before failing with EIO.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub backpressure_timeout_s: u64,

    /// Read the settings hostd gives (heartbeat, flusher, NBD) from the `ivha.*` words of
    /// this kernel command line, e.g. /proc/cmdline in a guest; they replace the flags.
    #[arg(long, value_name = "FILE")]
    pub kernel_cmdline: Option<PathBuf>,

    /// The settings hostd gives every agent.
    #[command(flatten)]
    pub options: AgentOptions,
}

fn parse_peer_disk(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((peer, path)) if !peer.is_empty() && !path.is_empty() => {
            Ok((peer.to_owned(), PathBuf::from(path)))
        }
        _ => Err(format!("{text:?} is not PEER=PATH")),
    }
}

/// Errors reading the settings from a kernel command line.
#[derive(Debug, thiserror::Error)]
pub enum KernelCmdlineError {
    #[error("cannot read the kernel command line {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel command line {path} has bad ivha.* settings")]
    Parse {
        path: PathBuf,
        #[source]
        source: clap::Error,
    },
}

impl Args {
    /// Replaces the settings with those of `--kernel-cmdline`, if given.
    pub fn read_kernel_cmdline(&mut self) -> Result<(), KernelCmdlineError> {
        let Some(path) = &self.kernel_cmdline else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path).map_err(|source| KernelCmdlineError::Read {
            path: path.clone(),
            source,
        })?;
        self.options =
            AgentOptions::from_kernel_args(&text).map_err(|source| KernelCmdlineError::Parse {
                path: path.clone(),
                source,
            })?;
        Ok(())
    }

    /// The disk given for `peer` with `--peer-disk`, if any.
    pub fn peer_disk(&self, peer: &str) -> Option<&PathBuf> {
        self.peer_disk
            .iter()
            .find(|(name, _)| name == peer)
            .map(|(_, path)| path)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.options.heartbeat_ms)
    }

    /// Whether the regions are host files (process mode) rather than a guest's devices.
    pub fn process_mode(&self) -> bool {
        self.region_dir.is_some()
    }

    /// When the flusher may release a record: only where the disk's page cache is the
    /// host's (process mode) can `host` release a record as soon as it is written.
    pub fn release(&self) -> Release {
        match self.options.release {
            wire::agent::Release::Host if self.process_mode() => Release::Written,
            wire::agent::Release::Host | wire::agent::Release::Media => Release::Synced,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn the_kernel_command_line_replaces_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let cmdline = dir.path().join("cmdline");
        let given = AgentOptions {
            heartbeat_ms: 50,
            flush_paused: true,
            nbd_poll_us: 20,
            ..AgentOptions::default()
        };
        std::fs::write(
            &cmdline,
            format!("console=ttyS0 ivha.node=a {}\n", given.to_kernel_args()),
        )
        .unwrap();
        let mut args = Args::try_parse_from([
            "guest-agent".as_ref(),
            "--node".as_ref(),
            "a".as_ref(),
            "--heartbeat-ms".as_ref(),
            "999".as_ref(),
            "--kernel-cmdline".as_ref(),
            cmdline.as_os_str(),
        ])
        .unwrap();
        args.read_kernel_cmdline().unwrap();
        assert_eq!(args.options, given);

        std::fs::write(&cmdline, "ivha.heartbeat_ms=soon").unwrap();
        let error = args.read_kernel_cmdline().unwrap_err();
        assert!(matches!(error, KernelCmdlineError::Parse { .. }), "{error}");
    }

    #[test]
    fn hostd_s_flags_parse() {
        let options = AgentOptions {
            release: wire::agent::Release::Media,
            flush_delay_ms: 5,
            ..AgentOptions::default()
        };
        let mut argv = vec!["guest-agent".to_owned(), "--node".into(), "b".into()];
        argv.extend(options.to_args());
        argv.extend(["--peer-disk".into(), "a=/d/a.img".into()]);
        argv.extend(["--peer-disk".into(), "c=/d/c.img".into()]);
        let args = Args::try_parse_from(argv).unwrap();
        assert_eq!(args.options, options);
        assert_eq!(args.release(), Release::Synced);
        assert_eq!(args.peer_disk("c"), Some(&PathBuf::from("/d/c.img")));
        assert_eq!(args.peer_disk("d"), None);
        let bad = Args::try_parse_from(["guest-agent", "--node", "b", "--peer-disk", "a.img"]);
        assert!(bad.unwrap_err().to_string().contains("PEER=PATH"));
    }
}
