//! What the NBD server serves: exports, and the registry of them.
//!
//! The server does the protocol and every bound check; an [`Export`] only stores bytes. A
//! node serves its own export, and after a takeover its partner's too, so the registry can
//! change while clients are connected.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// A volume served over NBD. The server checks every range against `size()` before calling,
/// and read and write lengths against `max_request()`; trim and write-zeroes lengths may
/// be anything up to the size (clients do not split them).
pub trait Export: Send + Sync + std::fmt::Debug {
    /// The export's name (what clients ask for).
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read-only exports refuse writes with EPERM (checked by the server).
    fn read_only(&self) -> bool {
        false
    }
    /// Largest payload of one request (advertised as the maximum block size).
    fn max_request(&self) -> u32;
    /// Fills `buf` from `offset`. Must return every write acknowledged before it was called.
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Writes `data` at `offset`; returns once the write is stable (acknowledgeable).
    /// `fua`: the client asked that this write be durable before the reply.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()>;
    /// Zeroes `len` bytes at `offset` (may deallocate when `may_trim`).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool)
    -> std::io::Result<()>;
    /// Discards `len` bytes at `offset`; later reads may return anything there, but ivha
    /// exports return zeroes.
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> std::io::Result<()>;
}

/// The exports a node serves, by name. The first one added is the default (what a client
/// asking for the empty name gets).
#[derive(Debug, Default)]
pub struct ExportRegistry {
    exports: RwLock<BTreeMap<String, Arc<dyn Export>>>,
    default: RwLock<Option<String>>,
}

impl ExportRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an export.
    pub fn insert(&self, export: Arc<dyn Export>) {
        let name = export.name().to_owned();
        if let Ok(mut default) = self.default.write() {
            default.get_or_insert_with(|| name.clone());
        }
        if let Ok(mut exports) = self.exports.write() {
            exports.insert(name, export);
        }
    }

    /// Removes an export; connections already using it keep their handle.
    pub fn remove(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports.write().ok()?.remove(name)
    }

    /// Looks up an export; the empty name means the default export.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        let name = if name.is_empty() {
            self.default.read().ok()?.clone()?
        } else {
            name.to_owned()
        };
        self.exports.read().ok()?.get(&name).cloned()
    }

    /// Names of all exports, sorted.
    pub fn names(&self) -> Vec<String> {
        self.exports
            .read()
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default()
    }
}
