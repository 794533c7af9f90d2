//! What the cluster's regions say about ownership, read from outside as an agent reads them:
//! hostd's owner records and presence (the control region), and each node's boot id,
//! claims and ejection (its region). The nemesis waits on it while hostd is away; the
//! sampler records its changes into the history.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use shm::{Access, Claim, ControlRegion, Ejection, HostdPresence, Mapping, NodeRegion, Owner};

/// Why the regions cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RegionsError {
    #[error("cannot map region {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: shm::MappingError,
    },
    #[error("{path} is not a control region")]
    Control {
        path: PathBuf,
        #[source]
        source: shm::ControlError,
    },
}

/// The regions of one cluster, by its state directory. Regions are mapped on first use and
/// again when their file is replaced.
#[derive(Debug)]
pub struct ClusterRegions {
    dir: PathBuf,
    mapped: Option<Mapped>,
}

/// The regions mapped now: the control region, and each node's (None: not there yet).
#[derive(Debug)]
struct Mapped {
    control: Region<ControlRegion>,
    nodes: Vec<Option<Region<NodeRegion>>>,
}

/// A region mapped read-only, with the inode it was mapped from (a region file replaced
/// under the same name is mapped again).
#[derive(Debug)]
struct Region<T> {
    inode: u64,
    region: T,
}

impl<T> Region<T> {
    /// Whether the file at `path` is another one than was mapped.
    fn replaced(&self, path: &Path) -> bool {
        inode(path).is_some_and(|ino| ino != self.inode)
    }
}

/// One node's region, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionState {
    /// The boot id of the agent life writing it.
    pub boot_id: u64,
    /// Its claim of each identity, by identity index.
    pub claims: Vec<Option<Claim>>,
    /// Its ejection note.
    pub ejected: Option<Ejection>,
}

/// Everything read at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Node names by node id (configuration order).
    pub nodes: Vec<String>,
    /// Identity names by index.
    pub identities: Vec<String>,
    /// hostd's owner record of each identity.
    pub recorded: Vec<Option<Owner>>,
    /// The owner of each identity by the agents' rule ([`shm::newest_owner`]): the newest of
    /// hostd's record and every claim.
    pub newest: Vec<Option<Owner>>,
    /// Each node's region, None if it could not be read.
    pub regions: Vec<Option<RegionState>>,
    /// hostd's presence as it last published it.
    pub presence: Option<HostdPresence>,
}

impl ClusterRegions {
    /// The regions in `state_dir/regions`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("regions"),
            mapped: None,
        }
    }

    /// Maps the regions that are not mapped, and (`check_files`) those whose file was
    /// replaced.
    fn refresh(&mut self, check_files: bool) -> Result<&Mapped, RegionsError> {
        let control_path = self.dir.join("control.region");
        let kept = self
            .mapped
            .take()
            .filter(|mapped| !(check_files && mapped.control.replaced(&control_path)));
        let mut mapped = match kept {
            Some(mapped) => mapped,
            None => {
                let (inode, mapping) = map(&control_path)?;
                let region =
                    ControlRegion::open(mapping).map_err(|source| RegionsError::Control {
                        path: control_path.clone(),
                        source,
                    })?;
                Mapped {
                    control: Region { inode, region },
                    nodes: Vec::new(),
                }
            }
        };
        let names = mapped.control.region.header().nodes.clone();
        mapped.nodes.resize_with(names.len(), || None);
        for (slot, name) in mapped.nodes.iter_mut().zip(&names) {
            let path = self.dir.join(format!("{name}.region"));
            let stale = match slot {
                None => true,
                Some(region) => check_files && region.replaced(&path),
            };
            if stale {
                // A node region not there yet (or not formatted) is read as unknown.
                *slot = map(&path).ok().and_then(|(inode, mapping)| {
                    NodeRegion::open(mapping)
                        .ok()
                        .map(|region| Region { inode, region })
                });
            }
        }
        Ok(self.mapped.insert(mapped))
    }

    /// Reads everything. `check_files`: also map again regions whose file was replaced
    /// (a stat per region: the sampler does it now and then, not at every read).
    pub fn snapshot(&mut self, check_files: bool) -> Result<Snapshot, RegionsError> {
        let mapped = self.refresh(check_files)?;
        let control = &mapped.control.region;
        let header = control.header();
        let regions: Vec<&NodeRegion> = mapped
            .nodes
            .iter()
            .flatten()
            .map(|node| &node.region)
            .collect();
        let identities = header.identities.len();
        let recorded = (0..identities).map(|i| control.owner(i)).collect();
        let newest = (0..identities)
            .map(|i| shm::newest_owner(control, regions.iter().copied(), i as u32))
            .collect();
        let states = mapped
            .nodes
            .iter()
            .map(|node| {
                node.as_ref().map(|node| RegionState {
                    boot_id: node.region.boot_id(),
                    claims: (0..identities)
                        .map(|i| node.region.claim(i as u32))
                        .collect(),
                    ejected: node.region.ejected(),
                })
            })
            .collect();
        Ok(Snapshot {
            nodes: header.nodes.clone(),
            identities: header.identities.clone(),
            recorded,
            newest,
            regions: states,
            presence: control.hostd(),
        })
    }
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|meta| meta.ino())
}

fn map(path: &Path) -> Result<(u64, Mapping), RegionsError> {
    let map_error = |source| RegionsError::Map {
        path: path.to_owned(),
        source,
    };
    let mapping = Mapping::open(path, Access::ReadOnly).map_err(map_error)?;
    let inode = mapping
        .file()
        .metadata()
        .map(|meta| meta.ino())
        .unwrap_or(0);
    Ok((inode, mapping))
}

impl Snapshot {
    /// The index of identity `name`.
    pub fn identity_index(&self, name: &str) -> Option<usize> {
        self.identities.iter().position(|i| i == name)
    }

    /// The index (node id) of node `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n == name)
    }

    /// The name of node `id`.
    pub fn node_name(&self, id: u32) -> Option<&str> {
        self.nodes.get(id as usize).map(String::as_str)
    }

    /// Who owns identity `name` by the agents' rule: (node, generation); node None while
    /// nobody serves it.
    pub fn owner(&self, identity: &str) -> Option<(Option<&str>, u64)> {
        let owner = self.newest.get(self.identity_index(identity)?)?.as_ref()?;
        let node = owner.node.and_then(|id| self.node_name(id));
        Some((node, owner.epoch))
    }

    /// Node `node`'s claim of identity `identity`.
    pub fn claim(&self, node: &str, identity: &str) -> Option<Claim> {
        let region = self.regions.get(self.node_index(node)?)?.as_ref()?;
        *region.claims.get(self.identity_index(identity)?)?
    }

    /// Node `node`'s region, if it was read.
    pub fn region(&self, node: &str) -> Option<&RegionState> {
        self.regions.get(self.node_index(node)?)?.as_ref()
    }

    /// Whether node `node` ejected itself, in its current life.
    pub fn ejected(&self, node: &str) -> Option<Ejection> {
        self.region(node)?.ejected
    }

    /// What the regions say, in one line for messages: owners (`a=b@3`: a is b's since
    /// generation 3), claims (`b:a@3`), ejections (`a@3`) and hostd's presence.
    pub fn summary(&self) -> String {
        let owners: Vec<String> = self
            .identities
            .iter()
            .map(|identity| match self.owner(identity) {
                Some((node, generation)) => {
                    format!("{identity}={}@{generation}", node.unwrap_or("nobody"))
                }
                None => format!("{identity}=?"),
            })
            .collect();
        let claims: Vec<String> = self
            .claims_after(0)
            .into_iter()
            .map(|(node, identity, claim)| format!("{node}:{identity}@{}", claim.generation))
            .collect();
        let ejected: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|node| {
                let ejection = self.ejected(node)?;
                Some(format!("{node}@{}", ejection.generation))
            })
            .collect();
        let presence = self.presence.map_or("none".to_owned(), |p| {
            format!(
                "counter {}, absent after {} ms, peer dead after {} ms",
                p.counter, p.absent_after_ms, p.peer_dead_after_ms
            )
        });
        format!(
            "owners {}; claims {}; ejected {}; hostd presence {presence}",
            owners.join(" "),
            if claims.is_empty() {
                "none".to_owned()
            } else {
                claims.join(" ")
            },
            if ejected.is_empty() {
                "none".to_owned()
            } else {
                ejected.join(" ")
            },
        )
    }

    /// Every claim newer than `generation`: (claimant, identity, claim).
    pub fn claims_after(&self, generation: u64) -> Vec<(&str, &str, Claim)> {
        let mut found = Vec::new();
        for (node, region) in self.nodes.iter().zip(&self.regions) {
            let Some(region) = region else { continue };
            for (identity, claim) in self.identities.iter().zip(&region.claims) {
                if let Some(claim) = claim.filter(|c| c.generation > generation) {
                    found.push((node.as_str(), identity.as_str(), claim));
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shm::EjectReason;

    /// A cluster's regions in a directory, formatted as hostd formats them.
    fn cluster(dir: &Path, names: &[&str]) -> (ControlRegion, Vec<NodeRegion>) {
        let regions = dir.join("regions");
        std::fs::create_dir_all(&regions).unwrap();
        let control = ControlRegion::format(
            Mapping::create_file(&regions.join("control.region"), 1 << 20).unwrap(),
            names,
            names,
        )
        .unwrap();
        let nodes = names
            .iter()
            .enumerate()
            .map(|(id, name)| {
                NodeRegion::format(
                    Mapping::create_file(&regions.join(format!("{name}.region")), 1 << 20).unwrap(),
                    id as u32,
                    name,
                )
                .unwrap()
            })
            .collect();
        (control, nodes)
    }

    #[test]
    fn a_snapshot_names_claims_owners_and_ejections() {
        let dir = tempfile::tempdir().unwrap();
        let (control, nodes) = cluster(dir.path(), &["a", "b", "c"]);
        let mut regions = ClusterRegions::new(dir.path());
        let first = regions.snapshot(true).unwrap();
        assert_eq!(first.owner("a"), Some((Some("a"), 0)));
        assert_eq!(first.claim("b", "a"), None);
        assert!(first.claims_after(0).is_empty());
        assert_eq!(first.presence, None);

        let mut b = nodes[1].writer(7).unwrap();
        b.claims.publish(
            0,
            Claim {
                generation: 3,
                victim: 0,
            },
        );
        let mut a = nodes[0].writer(9).unwrap();
        let ejection = Ejection {
            generation: 3,
            reason: EjectReason::NotMember,
            unix_ns: 1,
        };
        a.claims.eject(ejection);
        let mut hostd = control.writer().unwrap();
        hostd.beat(1500, 1000);
        let next = regions.snapshot(false).unwrap();
        assert_eq!(next.owner("a"), Some((Some("b"), 3)));
        assert_eq!(next.owner("b"), Some((Some("b"), 0)));
        assert_eq!(next.claim("b", "a").map(|c| c.victim), Some(0));
        assert_eq!(next.ejected("a"), Some(ejection));
        assert_eq!(next.region("b").map(|r| r.boot_id), Some(7));
        assert_eq!(
            next.claims_after(2),
            [("b", "a", next.claim("b", "a").unwrap())]
        );
        assert!(next.claims_after(3).is_empty());
        assert_eq!(
            next.summary(),
            "owners a=b@3 b=b@0 c=c@0; claims b:a@3; ejected a@3; hostd presence counter 1, \
             absent after 1500 ms, peer dead after 1000 ms"
        );
        assert_eq!(next.presence.map(|p| p.absent_after_ms), Some(1500));
        // hostd adopted the claim: its record at the same generation, the same owner.
        hostd
            .set_owner(
                0,
                Owner {
                    node: Some(1),
                    epoch: 3,
                },
            )
            .unwrap();
        let adopted = regions.snapshot(false).unwrap();
        assert_eq!(adopted.owner("a"), Some((Some("b"), 3)));
        assert_eq!(adopted.recorded[0].and_then(|o| o.node), Some(1));
    }

    #[test]
    fn a_replaced_region_file_is_mapped_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_control, nodes) = cluster(dir.path(), &["a", "b"]);
        let mut regions = ClusterRegions::new(dir.path());
        nodes[1].writer(5).unwrap();
        assert_eq!(
            regions
                .snapshot(true)
                .unwrap()
                .region("b")
                .map(|r| r.boot_id),
            Some(5)
        );
        let path = dir.path().join("regions").join("b.region");
        std::fs::remove_file(&path).unwrap();
        let fresh =
            NodeRegion::format(Mapping::create_file(&path, 1 << 20).unwrap(), 1, "b").unwrap();
        fresh.writer(6).unwrap();
        // Without looking at the files the old mapping is read; looking, the new one.
        assert_eq!(
            regions
                .snapshot(false)
                .unwrap()
                .region("b")
                .map(|r| r.boot_id),
            Some(5)
        );
        assert_eq!(
            regions
                .snapshot(true)
                .unwrap()
                .region("b")
                .map(|r| r.boot_id),
            Some(6)
        );
    }

    #[test]
    fn no_cluster_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = ClusterRegions::new(dir.path()).snapshot(true).unwrap_err();
        assert!(error.to_string().contains("control.region"), "{error}");
    }
}
