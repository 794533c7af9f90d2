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

    /// Resolves what a user typed: a path to a region file, or a node name.
    pub fn resolve_region(&self, node_or_path: &str) -> Result<PathBuf, StateDirError> {
        let as_path = Path::new(node_or_path);
        if node_or_path.contains('/') || as_path.exists() {
            return Ok(as_path.to_owned());
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
    }
}
