//! Getting the state directory ready for a launch: regions and disks.
//!
//! Nothing that could hold client data is ever recreated: an existing region is kept (its
//! agent resumes the log) and an existing disk is never truncated.

use std::path::{Path, PathBuf};

use shm::{Access, ControlRegion, Mapping, NodeRegion};

use crate::config::Config;
use crate::state_dir::StateDir;

/// Errors preparing regions and disks.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot set up the bridge network")]
    Network(#[from] crate::network::SetUpError),
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create region {path}")]
    Region {
        path: PathBuf,
        #[source]
        source: RegionError,
    },
    #[error(
        "region {path} is {actual} bytes but the configuration asks for {wanted}; it may hold unflushed writes, so it is not replaced (remove it with `hostd down --purge` once you are sure)"
    )]
    RegionSize {
        path: PathBuf,
        actual: u64,
        wanted: u64,
    },
    #[error("region {path} belongs to node {found:?}, not {expected:?}")]
    RegionOwner {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "region {path} is node {name:?}'s as node {found} of the cluster, but the configuration lists it as node {expected}: nodes cannot be reordered while their regions may hold unflushed writes"
    )]
    RegionPosition {
        path: PathBuf,
        name: String,
        found: u32,
        expected: u32,
    },
    #[error(
        "control region {path} was made for the nodes {found:?}, but the configuration names {expected:?}: a cluster's nodes cannot change while its state directory exists (`hostd down --purge` removes it, unflushed writes included, or use another --state-dir)"
    )]
    ControlNodes {
        path: PathBuf,
        found: Vec<String>,
        expected: Vec<String>,
    },
    #[error("the interconnect's sockets in {} would have paths of {longest} bytes, over the {MAX_SOCKET_PATH} a socket address holds: use a shorter state directory", path.display())]
    SocketPath { path: PathBuf, longest: usize },
    #[error("cannot create disk image {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a region could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error(transparent)]
    Map(#[from] shm::MappingError),
    #[error(transparent)]
    Node(#[from] shm::NodeError),
    #[error(transparent)]
    Control(#[from] shm::ControlError),
    #[error(transparent)]
    Name(#[from] wire::state_dir::StateDirError),
}

/// Paths of one node's files.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub region: PathBuf,
    pub disk: PathBuf,
}

/// Creates what is missing and checks what exists. Returns the files per node (in config
/// order) and the control region's path.
pub fn prepare(
    config: &Config,
    state: &StateDir,
    bridge: Option<&crate::network::BridgeNetwork>,
) -> Result<(Vec<NodeFiles>, PathBuf), PrepareError> {
    state.create().map_err(|source| PrepareError::StateDir {
        path: state.root().to_owned(),
        source,
    })?;
    let disk_dir = config
        .disks
        .dir
        .clone()
        .unwrap_or_else(|| state.default_disk_dir());
    std::fs::create_dir_all(&disk_dir).map_err(|source| PrepareError::StateDir {
        path: disk_dir.clone(),
        source,
    })?;
    let region_size = config.regions.node_mib << 20;
    let mut files = Vec::new();
    for (index, node) in config.nodes.iter().enumerate() {
        let region = state
            .region_path(&node.name)
            .map_err(|e| PrepareError::Region {
                path: state.regions_dir(),
                source: e.into(),
            })?;
        node_region(&region, index as u32, &node.name, region_size)?;
        let disk = disk_dir.join(format!("{}.img", node.name));
        sparse_disk(&disk, config.disks.size_mib << 20)?;
        files.push(NodeFiles { region, disk });
    }
    let control = state.control_region();
    let names: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
    if control.exists() {
        check_control(&control, &names)?;
    } else {
        Mapping::create_file(&control, 64 << 10)
            .map_err(|e| region_error(&control, e))
            .and_then(|m| {
                ControlRegion::format(m, &names, &names).map_err(|e| region_error(&control, e))
            })?;
    }
    if config.interconnect.enabled() {
        interconnect_dir(&state.interconnect_dir())?;
    }
    if let Some(bridge) = bridge {
        bridge.ensure()?;
    }
    Ok((files, control))
}

/// The interconnect's socket directory; its sockets' paths must fit a socket address.
fn interconnect_dir(dir: &Path) -> Result<(), PrepareError> {
    // The longest name in it: `q{link}-{node}-{peer}`.
    let longest = dir.join("q9-99-99").as_os_str().len();
    if longest > MAX_SOCKET_PATH {
        return Err(PrepareError::SocketPath {
            path: dir.to_owned(),
            longest,
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| PrepareError::StateDir {
        path: dir.to_owned(),
        source,
    })
}

/// The longest path a Unix socket address holds (108 bytes with the terminating zero).
const MAX_SOCKET_PATH: usize = 107;

/// An existing control region must be readable by this build and name the configured
/// nodes, in order: its owners and command slots are by node position.
fn check_control(path: &Path, names: &[&str]) -> Result<(), PrepareError> {
    let region = Mapping::open(path, Access::ReadOnly)
        .map_err(|e| region_error(path, e))
        .and_then(|m| ControlRegion::open(m).map_err(|e| region_error(path, e)))?;
    if region.header().nodes != names {
        return Err(PrepareError::ControlNodes {
            path: path.to_owned(),
            found: region.header().nodes.clone(),
            expected: names.iter().map(|n| (*n).to_owned()).collect(),
        });
    }
    Ok(())
}

/// Deletes what `prepare` created: the regions (with any unflushed writes in them), the
/// given disk images, and the sockets. Returns whether everything went; what could not
/// be removed is logged.
pub fn purge(state: &StateDir, disks: &[PathBuf]) -> bool {
    let mut ok = true;
    let mut remove = |path: &Path| {
        let result = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        if let Err(error) = result.or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        }) {
            log::warn!("cannot remove {}: {error}", path.display());
            ok = false;
        }
    };
    remove(&state.regions_dir());
    for disk in disks {
        remove(disk);
    }
    remove(&state.sockets_dir());
    remove(&state.interconnect_dir());
    // The storage daemon's plan, sockets and reservations: the disks they fence are gone.
    remove(&state.storage_dir());
    ok &= crate::network::purge(state);
    ok
}

/// The disk images `config` names.
pub fn disk_paths(config: &Config, state: &StateDir) -> Vec<PathBuf> {
    let dir = config
        .disks
        .dir
        .clone()
        .unwrap_or_else(|| state.default_disk_dir());
    config
        .nodes
        .iter()
        .map(|node| dir.join(format!("{}.img", node.name)))
        .collect()
}

fn region_error(path: &Path, e: impl Into<RegionError>) -> PrepareError {
    PrepareError::Region {
        path: path.to_owned(),
        source: e.into(),
    }
}

fn node_region(path: &Path, id: u32, name: &str, size: u64) -> Result<(), PrepareError> {
    if !path.exists() {
        let mapping = Mapping::create_file(path, size).map_err(|e| region_error(path, e))?;
        NodeRegion::format(mapping, id, name).map_err(|e| region_error(path, e))?;
        log::info!("created region {} ({} MiB)", path.display(), size >> 20);
        return Ok(());
    }
    let mapping = Mapping::open(path, Access::ReadOnly).map_err(|e| region_error(path, e))?;
    if mapping.len() != size {
        return Err(PrepareError::RegionSize {
            path: path.to_owned(),
            actual: mapping.len(),
            wanted: size,
        });
    }
    let region = NodeRegion::open(mapping).map_err(|e| region_error(path, e))?;
    if region.header().name != name {
        return Err(PrepareError::RegionOwner {
            path: path.to_owned(),
            found: region.header().name.clone(),
            expected: name.to_owned(),
        });
    }
    if region.header().node_id != id {
        return Err(PrepareError::RegionPosition {
            path: path.to_owned(),
            name: name.to_owned(),
            found: region.header().node_id,
            expected: id,
        });
    }
    log::info!(
        "kept region {} (head seq {}, flushed seq {})",
        path.display(),
        region.head().map_or(0, |c| c.seq),
        region.flushed().map_or(0, |c| c.seq)
    );
    Ok(())
}

fn sparse_disk(path: &Path, size: u64) -> Result<(), PrepareError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| PrepareError::Disk {
            path: path.to_owned(),
            source,
        })?;
    let current = file
        .metadata()
        .map_err(|source| PrepareError::Disk {
            path: path.to_owned(),
            source,
        })?
        .len();
    // Grow a new (or smaller) image; never shrink one: that would destroy data.
    if current < size {
        file.set_len(size).map_err(|source| PrepareError::Disk {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_creates_then_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let mut config = Config::default();
        config.regions.node_mib = 1;
        config.disks.size_mib = 4;
        let (files, control) = prepare(&config, &state, None).unwrap();
        assert_eq!(files.len(), 2);
        assert!(control.exists());
        assert_eq!(std::fs::metadata(&files[1].disk).unwrap().len(), 4 << 20);
        // Data in a disk and a region survives a second prepare.
        std::fs::write(&files[0].disk, b"precious").unwrap();
        let region =
            NodeRegion::open(Mapping::open(&files[0].region, Access::ReadWrite).unwrap()).unwrap();
        region.writer(7).unwrap().heartbeat.beat();
        prepare(&config, &state, None).unwrap();
        assert!(
            std::fs::read(&files[0].disk)
                .unwrap()
                .starts_with(b"precious")
        );
        let region =
            NodeRegion::open(Mapping::open(&files[0].region, Access::ReadOnly).unwrap()).unwrap();
        assert_eq!(region.boot_id(), 7);
        // A size change is refused rather than reformatting.
        config.regions.node_mib = 2;
        let error = prepare(&config, &state, None).unwrap_err();
        assert!(matches!(error, PrepareError::RegionSize { .. }), "{error}");
    }

    fn three_nodes() -> Config {
        let mut config = Config::parse(
            "[regions]\nnode_mib = 1\n[disks]\nsize_mib = 4\n\
             [[node]]\nname = \"a\"\nnbd_port = 1\n\
             [[node]]\nname = \"b\"\nnbd_port = 2\n\
             [[node]]\nname = \"c\"\nnbd_port = 3\n",
        )
        .unwrap();
        config.validate().unwrap();
        config.regions.node_mib = 1;
        config
    }

    /// A pair's state directory is not taken for a three-node cluster, nor one whose nodes
    /// were reordered: owners and commands are by node position.
    #[test]
    fn a_state_directory_of_other_nodes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let mut pair = Config::default();
        pair.regions.node_mib = 1;
        pair.disks.size_mib = 4;
        prepare(&pair, &state, None).unwrap();
        let error = prepare(&three_nodes(), &state, None).unwrap_err();
        assert!(
            matches!(error, PrepareError::ControlNodes { .. }),
            "{error}"
        );
        assert!(error.to_string().contains(r#"["a", "b", "c"]"#), "{error}");

        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let config = three_nodes();
        prepare(&config, &state, None).unwrap();
        let mut reordered = config.clone();
        reordered.nodes.swap(0, 1);
        let error = prepare(&reordered, &state, None).unwrap_err();
        assert!(
            matches!(error, PrepareError::RegionPosition { .. }),
            "{error}"
        );
    }

    /// A state directory written by a release with another region format is refused with
    /// a message that says so, not misread.
    #[test]
    fn regions_of_another_format_version_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let config = three_nodes();
        let (_, control) = prepare(&config, &state, None).unwrap();
        // Version 1, with a crc that matches, as an older release wrote it.
        let mut bytes = std::fs::read(&control).unwrap();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..120]);
        bytes[120..124].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&control, bytes).unwrap();
        let error = prepare(&config, &state, None).unwrap_err();
        let chain = wire::error_chain::one_line(&error);
        assert!(
            chain.contains("format version 1 is not supported (this build reads version 2)"),
            "{chain}"
        );
    }
}
