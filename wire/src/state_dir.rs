//! Where a cluster keeps its files.
//!
//! Each cluster has a state directory (`--state-dir`, env `IVHA_STATE_DIR`), so that several
//! clusters, and tests, run side by side. Regions live in `regions/NAME.region`; the state
//! directory should be on tmpfs so regions are memory, and survive any process crash.

use std::path::{Path, PathBuf};

/// The state directory used when neither `--state-dir` nor `IVHA_STATE_DIR` is given.
pub const DEFAULT_STATE_DIR: &str = "/dev/shm/ivha";

/// Errors resolving names inside the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "no region for node {node:?}: {path} does not exist (is the cluster up, and is --state-dir right?)"
    )]
    NoRegion { node: String, path: PathBuf },
    #[error("node name {0:?} is not a plain name (letters, digits, '-' and '_')")]
    BadNodeName(String),
}

/// A cluster's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of node `name`'s region (it may not exist).
    pub fn region_path(&self, name: &str) -> Result<PathBuf, StateDirError> {
        let plain = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !plain {
            return Err(StateDirError::BadNodeName(name.to_owned()));
        }
        Ok(self.root.join("regions").join(format!("{name}.region")))
    }

    /// The control region.
    pub fn control_region(&self) -> PathBuf {
        self.root.join("regions").join("control.region")
    }

    /// Records of the running node processes, for a restarted hostd (see [`crate::records`]).
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// The storage daemon's directory: its plan, reservations, control and disk sockets.
    pub fn storage_dir(&self) -> PathBuf {
        self.root.join("blkd")
    }

    /// The interconnect's sockets (short names: a socket path has at most 107 bytes).
    pub fn interconnect_dir(&self) -> PathBuf {
        self.root.join("ic")
    }

    /// Directory of the region files.
    pub fn regions_dir(&self) -> PathBuf {
        self.root.join("regions")
    }

    /// Guest console log of node `name` (names are validated by the config).
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.root.join("consoles").join(format!("{name}.log"))
    }

    /// QEMU's own stdout/stderr for node `name`.
    pub fn qemu_log(&self, name: &str) -> PathBuf {
        self.root.join("consoles").join(format!("{name}.qemu.log"))
    }

    /// The socket of node `name`'s guest shell (its second serial port).
    pub fn shell_socket(&self, name: &str) -> PathBuf {
        self.sockets_dir().join(format!("{name}.shell.sock"))
    }

    /// Directory of the QMP and guest shell sockets.
    pub fn sockets_dir(&self) -> PathBuf {
        self.root.join("qmp")
    }

    /// QMP socket of node `name`.
    pub fn qmp_socket(&self, name: &str) -> PathBuf {
        self.sockets_dir().join(format!("{name}.sock"))
    }

    /// The daemon's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("hostd.sock")
    }

    /// Held (flock) by the running daemon: one daemon per state directory.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("hostd.lock")
    }

    /// Output of a detached daemon.
    pub fn daemon_log(&self) -> PathBuf {
        self.root.join("hostd.log")
    }

    /// The structured event log.
    pub fn event_log(&self) -> PathBuf {
        self.root.join("events.jsonl")
    }

    /// Default directory of the disk images.
    pub fn default_disk_dir(&self) -> PathBuf {
        self.root.join("disks")
    }

    /// Creates the directories a running cluster uses (mode 0700: they hold client data and
    /// the control socket).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        for dir in [
            self.root.clone(),
            self.regions_dir(),
            self.root.join("consoles"),
            self.sockets_dir(),
        ] {
            builder.create(&dir)?;
        }
        Ok(())
    }

    /// Resolves what a user typed: a node name, or a path to a region file. A path has a
    /// `/` (`./a` for a file `a` here): a bare word is always a node.
    pub fn resolve_region(&self, node_or_path: &str) -> Result<PathBuf, StateDirError> {
        if node_or_path.contains('/') {
            return Ok(PathBuf::from(node_or_path));
        }
        let path = self.region_path(node_or_path)?;
        if !path.exists() {
            return Err(StateDirError::NoRegion {
                node: node_or_path.to_owned(),
                path,
            });
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        std::fs::create_dir(dir.path().join("regions")).unwrap();
        std::fs::write(dir.path().join("regions/a.region"), b"x").unwrap();
        assert_eq!(
            state.resolve_region("a").unwrap(),
            dir.path().join("regions/a.region")
        );
        assert!(matches!(
            state.resolve_region("b"),
            Err(StateDirError::NoRegion { .. })
        ));
        assert!(matches!(
            state.region_path("../etc"),
            Err(StateDirError::BadNodeName(_))
        ));
        let file = dir.path().join("regions/a.region");
        assert_eq!(state.resolve_region(file.to_str().unwrap()).unwrap(), file);
        // A node name never means a file of that name in the current directory (the
        // tests run in the crate's directory, which has `src`).
        assert!(Path::new("src").exists());
        assert!(matches!(
            state.resolve_region("src"),
            Err(StateDirError::NoRegion { .. })
        ));
    }
}
