//! One export's disk and its overlay of unflushed writes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::overlay::{LogBytes, Overlay};
use super::partner_layer::PartnerLayer;
use crate::export_file::{file_size, write_zeroes_at};

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {path} is empty")]
    Empty { path: PathBuf },
}

/// A disk image or block device, read and written at offsets.
#[derive(Debug)]
pub struct Disk {
    file: File,
    size: u64,
    path: PathBuf,
    /// Unit tests: this many next syncs fail, losing what was written (see [`Disk::sync`]).
    #[cfg(test)]
    pub(crate) failing_syncs: std::sync::atomic::AtomicU32,
}

impl Disk {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let open_error = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_error)?;
        let size = file_size(&file).map_err(open_error)?;
        if size == 0 {
            return Err(DiskError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            file,
            size,
            path: path.to_owned(),
            #[cfg(test)]
            failing_syncs: std::sync::atomic::AtomicU32::new(0),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Writes zeroes over a range (trim and write-zeroes both end here: ivha exports read
    /// trimmed ranges as zeroes, so the disk must hold zeroes too).
    pub fn zero_at(&self, offset: u64, len: u64) -> std::io::Result<()> {
        write_zeroes_at(&self.file, offset, len)
    }

    pub fn sync(&self) -> std::io::Result<()> {
        #[cfg(test)]
        if self
            .failing_syncs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            // As a disk whose writeback failed: the kernel may drop the pages it could not
            // write. Here everything goes, which the tests arrange to be only unsynced data.
            self.file.set_len(0)?;
            self.file.set_len(self.size)?;
            return Err(std::io::Error::other("injected sync failure"));
        }
        self.file.sync_data()
    }

    /// Syncs, then drops this disk's pages from the page cache. Both guests of a pair see
    /// each disk: before a node starts serving a disk that the other node may have written
    /// since, it must not read pages it cached before.
    pub fn drop_cache(&self) -> std::io::Result<()> {
        self.sync()?;
        nix::fcntl::posix_fadvise(
            &self.file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .map_err(std::io::Error::from)
    }

    /// Asks the kernel to read a range into the page cache in the background
    /// (`POSIX_FADV_WILLNEED`): a write that covers part of a page not cached must read the
    /// page first, one synchronous read per write, unless the page is already coming.
    pub fn prefetch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(());
        };
        nix::fcntl::posix_fadvise(
            &self.file,
            offset,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )
        .map_err(std::io::Error::from)
    }
}

/// An export's disk with its unflushed writes on top.
#[derive(Debug)]
pub struct Volume {
    pub export_id: u32,
    pub name: String,
    pub disk: Disk,
    pub overlay: RwLock<Overlay>,
    /// A dead node's records for this export, while this node replays them (see
    /// [`PartnerLayer`]). Lock order: `overlay`, then this.
    partner: RwLock<Option<PartnerLayer>>,
    /// Whether this node may log writes for the volume: false once it is fenced or released
    /// (changed only under the log's appender lock, see [`super::Nvram::set_writable`]).
    writable: AtomicBool,
}

impl Volume {
    /// A writable volume.
    pub fn new(export_id: u32, name: &str, disk: Disk) -> Arc<Self> {
        Self::with_access(export_id, name, disk, true)
    }

    /// A volume that refuses writes until [`super::Nvram::set_writable`] allows them.
    pub fn with_access(export_id: u32, name: &str, disk: Disk, writable: bool) -> Arc<Self> {
        Arc::new(Self {
            export_id,
            name: name.to_owned(),
            disk,
            overlay: RwLock::new(Overlay::new()),
            partner: RwLock::new(None),
            writable: AtomicBool::new(writable),
        })
    }

    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    pub(super) fn store_writable(&self, writable: bool) {
        self.writable.store(writable, Ordering::Release);
    }

    /// Reads what clients see: the disk, then a dead node's records being replayed, then
    /// this node's unflushed writes from `log`, each newer than the one before. The locks
    /// are held across the disk read, so neither the flusher's pruning nor the end of a
    /// replay can fall between reading the disk and applying what it did not hold yet.
    pub fn read(&self, offset: u64, buf: &mut [u8], log: &impl LogBytes) -> std::io::Result<()> {
        let overlay = self.overlay.read().map_err(|_| poisoned())?;
        let partner = self.partner.read().map_err(|_| poisoned())?;
        self.disk.read_at(offset, buf)?;
        if let Some(layer) = partner.as_ref()
            && !layer.apply(offset, buf)
        {
            return Err(std::io::Error::other(format!(
                "export {}: data at {offset} cannot be read from node {}'s log",
                self.name, layer.node
            )));
        }
        if !overlay.apply(offset, buf, log) {
            return Err(std::io::Error::other(format!(
                "export {}: unflushed data at {offset} cannot be read from the log",
                self.name
            )));
        }
        Ok(())
    }
}

impl Volume {
    /// Serves a dead node's records over the disk until [`Volume::drop_partner_layer`].
    pub fn set_partner_layer(&self, layer: PartnerLayer) {
        // A reader that panicked leaves nothing half-changed here: the slot is replaced whole.
        *self
            .partner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(layer);
    }

    /// Drops the dead node's layer once its records are on the disk. It waits for the
    /// reads in progress: one that read the disk before the replay wrote it still applies
    /// the layer.
    pub fn drop_partner_layer(&self) {
        let _ = self
            .partner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

pub(crate) fn poisoned() -> std::io::Error {
    std::io::Error::other("a thread panicked while holding the volume's lock")
}
