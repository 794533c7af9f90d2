//! Finding this node's regions and telling them apart.
//!
//! Inside a guest the regions are ivshmem BARs, in PCI slot order, which says nothing about
//! which is which; each is identified by its header instead.

use std::path::{Path, PathBuf};

use shm::{Access, Mapping, RegionKind};

/// Errors finding regions.
#[derive(Debug, thiserror::Error)]
pub enum RegionsError {
    #[error("cannot list regions")]
    Scan(#[source] shm::MappingError),
    #[error("cannot read region directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no node region named {node:?} among {searched} candidate regions {where_}")]
    OwnMissing {
        node: String,
        searched: usize,
        where_: String,
    },
    #[error("no disk with serial {serial:?} (serials seen: {seen}); pass --disk PATH")]
    NoDisk { serial: String, seen: String },
    #[error("two regions claim to be node {node:?}: {first} and {second}")]
    Duplicate {
        node: String,
        first: PathBuf,
        second: PathBuf,
    },
}

/// The regions this node maps, by role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub own: PathBuf,
    /// The other nodes' regions (those whose identities this node may take over), by name.
    pub peers: Vec<(String, PathBuf)>,
    pub control: Option<PathBuf>,
}

/// The block device (under `/dev`) whose virtio serial is `serial`, found through `sys_block`
/// (normally `/sys/block`).
pub fn disk_by_serial(sys_block: &Path, serial: &str) -> Result<PathBuf, RegionsError> {
    let entries = std::fs::read_dir(sys_block).map_err(|source| RegionsError::Dir {
        path: sys_block.to_owned(),
        source,
    })?;
    let mut seen = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let found = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        let name = entry.file_name().to_string_lossy().into_owned();
        if found.trim() == serial {
            return Ok(PathBuf::from("/dev").join(name));
        }
        if !found.trim().is_empty() {
            seen.push(format!("{name}={}", found.trim()));
        }
    }
    Err(RegionsError::NoDisk {
        serial: serial.to_owned(),
        seen: if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        },
    })
}

/// Candidate region paths: PCI BARs, or `*.region` files in a directory.
pub fn candidates(
    pci_root: &Path,
    region_dir: Option<&Path>,
) -> Result<Vec<PathBuf>, RegionsError> {
    match region_dir {
        None => shm::mapping::ivshmem_resources(pci_root).map_err(RegionsError::Scan),
        Some(dir) => {
            let entries = std::fs::read_dir(dir).map_err(|source| RegionsError::Dir {
                path: dir.to_owned(),
                source,
            })?;
            let mut paths: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "region"))
                .collect();
            paths.sort();
            Ok(paths)
        }
    }
}

/// Identifies each candidate by its header and picks this node's regions.
pub fn classify(node: &str, candidates: &[PathBuf]) -> Result<Found, RegionsError> {
    let mut own: Option<PathBuf> = None;
    let mut peers: Vec<(String, PathBuf)> = Vec::new();
    let mut control = None;
    for path in candidates {
        let kind = match Mapping::open(path, Access::ReadOnly) {
            Ok(mapping) => shm::identify(&mapping),
            Err(error) => {
                log::warn!("skipping {}: {error}", path.display());
                continue;
            }
        };
        match kind {
            RegionKind::Node { name, .. } if name == node => {
                if let Some(first) = own.replace(path.clone()) {
                    return Err(RegionsError::Duplicate {
                        node: name,
                        first,
                        second: path.clone(),
                    });
                }
            }
            RegionKind::Node { name, .. } => {
                if let Some((_, first)) = peers.iter().find(|(n, _)| *n == name) {
                    return Err(RegionsError::Duplicate {
                        node: name,
                        first: first.clone(),
                        second: path.clone(),
                    });
                }
                peers.push((name, path.clone()));
            }
            RegionKind::Control => control = control.or(Some(path.clone())),
            RegionKind::Unknown => log::warn!("{} holds no ivha region", path.display()),
        }
    }
    let own = own.ok_or_else(|| RegionsError::OwnMissing {
        node: node.to_owned(),
        searched: candidates.len(),
        where_: candidates
            .first()
            .and_then(|p| p.parent())
            .map_or_else(String::new, |p| format!("under {}", p.display())),
    })?;
    Ok(Found {
        own,
        peers,
        control,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shm::{ControlRegion, NodeRegion};

    #[test]
    fn regions_are_told_apart_by_header_not_by_name_or_order() {
        let dir = tempfile::tempdir().unwrap();
        // File names deliberately mislead: identification must read headers.
        let paths = [
            "1.region",
            "2.region",
            "3.region",
            "junk.region",
            "4.region",
        ]
        .map(|n| dir.path().join(n));
        NodeRegion::format(Mapping::create_file(&paths[0], 65536).unwrap(), 1, "b").unwrap();
        ControlRegion::format(
            Mapping::create_file(&paths[1], 65536).unwrap(),
            &["a", "b", "c"],
            &["a", "b", "c"],
        )
        .unwrap();
        NodeRegion::format(Mapping::create_file(&paths[2], 65536).unwrap(), 0, "a").unwrap();
        std::fs::write(&paths[3], vec![0u8; 65536]).unwrap();
        NodeRegion::format(Mapping::create_file(&paths[4], 65536).unwrap(), 2, "c").unwrap();

        let found = classify(
            "a",
            &candidates(Path::new("/nonexistent"), Some(dir.path())).unwrap(),
        )
        .unwrap();
        assert_eq!(found.own, paths[2]);
        assert_eq!(
            found.peers,
            [
                ("b".to_owned(), paths[0].clone()),
                ("c".to_owned(), paths[4].clone())
            ]
        );
        assert_eq!(found.control, Some(paths[1].clone()));

        let missing = classify("d", &candidates(Path::new("/x"), Some(dir.path())).unwrap());
        assert!(matches!(missing, Err(RegionsError::OwnMissing { .. })));

        // Two regions for one peer: refused, not one picked at random.
        std::fs::copy(&paths[4], dir.path().join("5.region")).unwrap();
        let twice = classify("a", &candidates(Path::new("/x"), Some(dir.path())).unwrap());
        assert!(
            matches!(twice, Err(RegionsError::Duplicate { .. })),
            "{twice:?}"
        );
    }

    #[test]
    fn disks_are_found_by_serial() {
        let sys = tempfile::tempdir().unwrap();
        for (dev, serial) in [("vda", "ivha-b\n"), ("vdb", "ivha-a\n"), ("loop0", "")] {
            std::fs::create_dir(sys.path().join(dev)).unwrap();
            std::fs::write(sys.path().join(dev).join("serial"), serial).unwrap();
        }
        assert_eq!(
            disk_by_serial(sys.path(), "ivha-a").unwrap(),
            Path::new("/dev/vdb")
        );
        let error = disk_by_serial(sys.path(), "ivha-c")
            .unwrap_err()
            .to_string();
        assert!(error.contains("vda=ivha-b"), "{error}");
    }
}
