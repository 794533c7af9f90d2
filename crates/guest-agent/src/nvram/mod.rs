//! NVRAM write-back: exports whose writes are acknowledged once they are in the node's log.
//!
//! Write path: append the write to the log (one appender per node, behind a mutex), record
//! it in the export's overlay while still holding that mutex (so overlay order is log order
//! even with many connections), release, reply. The flusher ([`flusher`]) applies records to
//! the disks in log order, syncs them, advances the flushed cursor and prunes the overlays.
//!
//! Durability: an acknowledged write is in the node's region. It survives a crash of the
//! agent, of the guest and of hostd; a partner replays it onto the disk after a takeover.
//! `FLUSH` and `FUA` are answered by the log too (NVRAM semantics): they do not wait for the
//! disk. The regions live in host memory (tmpfs), so a host crash loses what the flusher had
//! not yet written.

pub mod flusher;
pub mod overlay;
pub mod volume;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use crossbeam_channel::{Receiver, Sender};
use shm::{BackPressure, Entry, LogAppender, LogError, NodeRegion, RecordKind};

use crate::export::Export;
use volume::{Volume, poisoned};

/// Largest request the exports accept: NBD clients' usual maximum, or less if a record
/// could not hold it.
const MAX_REQUEST: u64 = 32 << 20;

/// The node's log and the volumes whose writes go into it.
#[derive(Debug)]
pub struct Nvram {
    region: NodeRegion,
    appender: Mutex<LogAppender>,
    volumes: RwLock<BTreeMap<u32, Arc<Volume>>>,
    back_pressure: BackPressure,
    wake_flusher: Sender<()>,
    wakeups: Receiver<()>,
    max_request: u32,
}

/// Errors setting up NVRAM exports.
#[derive(Debug, thiserror::Error)]
pub enum NvramError {
    #[error("the log's unflushed records cannot be read")]
    Log(#[source] LogError),
    #[error("a thread panicked while holding the volume table")]
    Poisoned,
    #[error("unflushed log record {seq} is for export {export}, which has no disk here")]
    UnknownExport { seq: u64, export: u32 },
}

impl Nvram {
    /// Wraps the node's region (mapped read-write) and its appender.
    pub fn new(
        region: NodeRegion,
        appender: LogAppender,
        back_pressure: BackPressure,
    ) -> Arc<Self> {
        let max_payload = region.geometry().max_payload;
        let max_request = (max_payload.saturating_sub(shm::log::record::WRITE_PREFIX_LEN as u64))
            .min(MAX_REQUEST)
            / 4096
            * 4096;
        let (wake_flusher, wakeups) = crossbeam_channel::bounded(1);
        Arc::new(Self {
            region,
            appender: Mutex::new(appender),
            volumes: RwLock::new(BTreeMap::new()),
            back_pressure,
            wake_flusher,
            wakeups,
            max_request: max_request as u32,
        })
    }

    /// Adds a volume and returns its export.
    pub fn add_volume(self: &Arc<Self>, volume: Arc<Volume>) -> Arc<NvramExport> {
        if let Ok(mut volumes) = self.volumes.write() {
            volumes.insert(volume.export_id, Arc::clone(&volume));
        }
        Arc::new(NvramExport {
            nvram: Arc::clone(self),
            volume,
        })
    }

    /// Loads the log's unflushed records into the overlays, so reads see writes that were
    /// acknowledged before this agent (re)started. Call after adding the volumes and
    /// before serving.
    pub fn recover(&self) -> Result<u64, NvramError> {
        let volumes = self.volumes.read().map_err(|_| NvramError::Poisoned)?;
        let mut count = 0;
        for record in self.region.unflushed().map_err(NvramError::Log)? {
            let record = record.map_err(NvramError::Log)?;
            let Some(volume) = volumes.get(&record.export) else {
                return Err(NvramError::UnknownExport {
                    seq: record.seq,
                    export: record.export,
                });
            };
            let mut overlay = volume.overlay.write().map_err(|_| NvramError::Poisoned)?;
            match record.kind {
                RecordKind::Write => overlay.write(record.offset, record.data.into(), record.seq),
                RecordKind::Trim | RecordKind::WriteZeroes => {
                    overlay.zero(record.offset, record.len, record.seq);
                }
                RecordKind::Wrap => {}
            }
            count += 1;
        }
        Ok(count)
    }

    pub fn region(&self) -> &NodeRegion {
        &self.region
    }

    pub(crate) fn volume(&self, export: u32) -> Option<Arc<Volume>> {
        self.volumes.read().ok()?.get(&export).cloned()
    }

    pub(crate) fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes
            .read()
            .map(|v| v.values().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn wakeups(&self) -> &Receiver<()> {
        &self.wakeups
    }

    /// Appends `entry` (a change to `volume`) and updates the volume's overlay under the
    /// appender's lock.
    fn log(
        &self,
        volume: &Volume,
        entry: &Entry<'_>,
        update: impl FnOnce(&mut overlay::Overlay, u64),
    ) -> std::io::Result<()> {
        let mut appender = self.appender.lock().map_err(|_| poisoned())?;
        let appended = appender
            .append(entry, self.back_pressure)
            .map_err(|e| match e {
                LogError::TooLarge { .. } => {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
                }
                other => std::io::Error::other(other.to_string()),
            })?;
        let mut overlay = volume.overlay.write().map_err(|_| poisoned())?;
        update(&mut overlay, appended.seq);
        drop(overlay);
        drop(appender);
        // Wake the flusher if it sleeps; a full channel means it is already awake.
        let _ = self.wake_flusher.try_send(());
        Ok(())
    }
}

/// An export backed by NVRAM write-back.
#[derive(Debug)]
pub struct NvramExport {
    nvram: Arc<Nvram>,
    volume: Arc<Volume>,
}

impl Export for NvramExport {
    fn name(&self) -> &str {
        &self.volume.name
    }

    fn size(&self) -> u64 {
        self.volume.disk.size()
    }

    fn max_request(&self) -> u32 {
        self.nvram.max_request
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.volume.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> std::io::Result<()> {
        let shared: Arc<[u8]> = data.into();
        let entry = Entry::Write {
            export: self.volume.export_id,
            offset,
            data,
        };
        self.nvram.log(&self.volume, &entry, |overlay, seq| {
            overlay.write(offset, shared, seq)
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _fua: bool,
        _may_trim: bool,
    ) -> std::io::Result<()> {
        let entry = Entry::WriteZeroes {
            export: self.volume.export_id,
            offset,
            len,
        };
        self.nvram.log(&self.volume, &entry, |overlay, seq| {
            overlay.zero(offset, len, seq)
        })
    }

    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let entry = Entry::Trim {
            export: self.volume.export_id,
            offset,
            len,
        };
        self.nvram.log(&self.volume, &entry, |overlay, seq| {
            overlay.zero(offset, len, seq)
        })
    }

    fn flush(&self) -> std::io::Result<()> {
        // Every completed write is already in the log: NVRAM semantics (see the module doc).
        Ok(())
    }
}
