//! NVRAM write-back: exports whose writes are acknowledged once they are in the node's log.
//!
//! Write path: append the write to the log (one appender per node, behind a mutex), record
//! it in the export's overlay while still holding that mutex (so overlay order is log order
//! even with many connections), release, reply. The flusher ([`flusher`]) applies records to
//! the disks in log order and releases them (advances the flushed cursor, prunes the
//! overlays) once they are as durable on the disk as in the log; the syncer ([`syncer`])
//! syncs the disks to their media when the flusher does not.
//!
//! Durability: an acknowledged write is in the node's region. It survives a crash of the
//! agent, of the guest and of hostd; a partner replays it onto the disk after a takeover.
//! `FLUSH` and `FUA` are answered by the log too (NVRAM semantics): they do not wait for the
//! disk. The regions live in host memory (tmpfs), so a host crash loses every write not yet
//! on the disks' media (the region's `synced` word says how far that is).

pub mod flusher;
pub mod overlay;
pub mod partner_layer;
pub mod syncer;
pub mod volume;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use shm::{
    BackPressure, ControlRegion, Cursor, Entry, LogAppender, LogError, NodeRegion, Owner,
    RecordKind,
};

use crate::export::Export;
use crate::export_file::DEFAULT_MAX_REQUEST;
use volume::{Volume, poisoned};

/// Largest request the exports accept: NBD clients' usual maximum, or less if a record
/// could not hold it.
const MAX_REQUEST: u64 = DEFAULT_MAX_REQUEST as u64;

/// The node's log and the volumes whose writes go into it.
#[derive(Debug)]
pub struct Nvram {
    region: NodeRegion,
    appender: Mutex<LogAppender>,
    volumes: RwLock<BTreeMap<u32, Arc<Volume>>>,
    back_pressure: BackPressure,
    wake_flusher: Sender<()>,
    wakeups: Receiver<()>,
    /// Set by the flusher when it goes to sleep with nothing to do: the next write wakes it.
    flusher_idle: AtomicBool,
    /// Unflushed bytes past which every write wakes the flusher; below, it picks writes up
    /// on its next tick, so a stream of small writes does not cost a wakeup each.
    wake_backlog: u64,
    max_request: u32,
    ownership: Option<Ownership>,
    /// Seq the flusher must reach even when paused or delayed (see [`Nvram::drain`]).
    drain_target: AtomicU64,
    /// Seq of the last record whose overlay segment is in place: the flusher applies and
    /// releases nothing past it (see [`Nvram::indexed`]).
    indexed: AtomicU64,
    /// Writes between asking for the appender and getting their record in: while the log
    /// is full, every write that arrives.
    writes_waiting: AtomicU64,
    /// Seqs the flusher must not apply past, by hold (see [`Nvram::hold_flusher`]).
    flush_holds: Mutex<BTreeMap<u64, u64>>,
    next_hold: AtomicU64,
    /// The lowest seq in `flush_holds` (`u64::MAX` when there is none), read on every batch.
    flush_limit: AtomicU64,
    /// Records up to this seq are released without being applied (see [`Nvram::discard`]).
    discarded_through: AtomicU64,
    /// Exports (bit = export id) whose disk refused a write or a sync since the failover
    /// monitor last looked: the storage may have fenced this node.
    disk_errors: AtomicU64,
}

/// Keeps the flusher from applying records past a seq for as long as it lives.
#[derive(Debug)]
pub struct FlushHold {
    nvram: Arc<Nvram>,
    id: u64,
}

impl Drop for FlushHold {
    fn drop(&mut self) {
        self.nvram.release_hold(self.id);
    }
}

/// Who may write what: a write for an identity is logged only while this node owns it, by
/// the newest word of the control region and of the claims published in the regions this
/// node maps ([`shm::newest_owner`]). This is the epoch fence: once hostd has moved an
/// identity elsewhere, or a peer has claimed it while hostd was away, a node that lagged
/// behind (paused, partitioned) cannot log another write for it, whatever it believes.
#[derive(Debug, Clone)]
pub struct Ownership {
    pub control: ControlRegion,
    /// This node's id (the identity it owns by birth has the same index).
    pub node: u32,
    /// The regions whose claims count: this node's own and every peer's it maps.
    pub regions: Vec<NodeRegion>,
}

impl Ownership {
    /// Who owns identity `export` now.
    pub fn owner(&self, export: u32) -> Option<Owner> {
        shm::newest_owner(&self.control, &self.regions, export)
    }

    /// Whether this node owns identity `export` now.
    pub fn owns(&self, export: u32) -> bool {
        self.owner(export)
            .is_some_and(|owner| owner.node == Some(self.node))
    }
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
    #[error(
        "the flusher did not write the log up to seq {target} within {waited:?} (it reached {reached})"
    )]
    DrainTimeout {
        target: u64,
        reached: u64,
        waited: Duration,
    },
}

impl Nvram {
    /// Wraps the node's region (mapped read-write) and its appender.
    pub fn new(
        region: NodeRegion,
        appender: LogAppender,
        back_pressure: BackPressure,
    ) -> Arc<Self> {
        Self::with_ownership(region, appender, back_pressure, None)
    }

    /// Like [`Nvram::new`], with writes fenced by the control region's owners.
    pub fn with_ownership(
        region: NodeRegion,
        appender: LogAppender,
        back_pressure: BackPressure,
        ownership: Option<Ownership>,
    ) -> Arc<Self> {
        let max_payload = region.geometry().max_payload;
        let max_request = (max_payload.saturating_sub(shm::log::record::WRITE_PREFIX_LEN as u64))
            .min(MAX_REQUEST)
            / 4096
            * 4096;
        let (wake_flusher, wakeups) = crossbeam_channel::bounded(1);
        let wake_backlog = region.geometry().ring_size / 64;
        let initial_head = region.head().map_or(0, |head| head.seq);
        Arc::new(Self {
            region,
            appender: Mutex::new(appender),
            volumes: RwLock::new(BTreeMap::new()),
            back_pressure,
            wake_flusher,
            wakeups,
            flusher_idle: AtomicBool::new(false),
            wake_backlog,
            max_request: max_request as u32,
            ownership,
            drain_target: AtomicU64::new(0),
            // Records logged before this agent started have no segments yet; `recover`
            // gives them theirs before the flusher starts.
            indexed: AtomicU64::new(initial_head),
            writes_waiting: AtomicU64::new(0),
            flush_holds: Mutex::new(BTreeMap::new()),
            next_hold: AtomicU64::new(0),
            flush_limit: AtomicU64::new(u64::MAX),
            discarded_through: AtomicU64::new(0),
            disk_errors: AtomicU64::new(0),
        })
    }

    /// Keeps the flusher from applying any record past `seq` until the hold is dropped.
    ///
    /// A taker that serves a dead node's log before replaying it holds its own records back
    /// this way: they are newer than the dead node's, so none may reach the disk before the
    /// replay has written the older ones. A node whose own log waits for another node to
    /// confirm a replay of it holds everything back the same way. A batch already under
    /// way may have read the limit before the hold: callers take it before any record it
    /// protects can be logged (before the identity becomes writable).
    pub fn hold_flusher(self: &Arc<Self>, seq: u64) -> FlushHold {
        let id = self.next_hold.fetch_add(1, Ordering::Relaxed);
        let mut holds = self
            .flush_holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        holds.insert(id, seq);
        self.flush_limit.store(
            holds.values().copied().min().unwrap_or(u64::MAX),
            Ordering::Release,
        );
        FlushHold {
            nvram: Arc::clone(self),
            id,
        }
    }

    fn release_hold(&self, id: u64) {
        let mut holds = self
            .flush_holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        holds.remove(&id);
        self.flush_limit.store(
            holds.values().copied().min().unwrap_or(u64::MAX),
            Ordering::Release,
        );
        drop(holds);
        let _ = self.wake_flusher.try_send(());
    }

    /// Releases the records up to `seq` without applying them, and drops them from the
    /// overlays now: another node replayed them onto the disks and has written newer data
    /// since. Call before dropping the hold that kept the flusher off them.
    pub fn discard(&self, seq: u64) {
        for volume in self.volumes() {
            volume
                .overlay
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .prune(seq);
        }
        self.discarded_through.fetch_max(seq, Ordering::AcqRel);
    }

    /// Records up to this seq are released without being applied (see [`Nvram::discard`]).
    pub(crate) fn discarded_through(&self) -> u64 {
        self.discarded_through.load(Ordering::Acquire)
    }

    /// Allows or refuses writes to `volume`. Returns once no write for the volume is being
    /// logged: after a refusal, the head read next covers every write the volume will ever
    /// have from this node.
    ///
    /// A write checks the flag under the appender's lock, and may hold that lock while it
    /// waits for log space that a paused or delayed flusher would free late or never. So a
    /// refusal is stored first (no write takes the lock and logs after it), the flusher is
    /// asked to drain what is logged (letting a waiting write through), and only then is the
    /// lock taken, to wait out the write in progress.
    pub fn set_writable(&self, volume: &Volume, writable: bool) -> Result<(), NvramError> {
        if !writable {
            volume.store_writable(false);
            self.request_drain()?;
        }
        let _appender = self.appender.lock().map_err(|_| NvramError::Poisoned)?;
        volume.store_writable(writable);
        Ok(())
    }

    /// The flusher could not write or sync `export`'s disk.
    pub fn note_disk_error(&self, export: u32) {
        if let Some(bit) = 1u64.checked_shl(export) {
            self.disk_errors.fetch_or(bit, Ordering::AcqRel);
        }
    }

    /// Whether `export`'s disk refused a write or sync and nothing has taken that note yet.
    pub fn has_disk_error(&self, export: u32) -> bool {
        1u64.checked_shl(export)
            .is_some_and(|bit| self.disk_errors.load(Ordering::Acquire) & bit != 0)
    }

    /// Whether `export`'s disk refused a write or sync since the last call for it.
    pub fn take_disk_error(&self, export: u32) -> bool {
        let Some(bit) = 1u64.checked_shl(export) else {
            return false;
        };
        self.disk_errors.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Asks the flusher to write and release everything logged so far, even if it is
    /// paused or delayed, without waiting for it; returns the head it must reach.
    fn request_drain(&self) -> Result<Cursor, NvramError> {
        let head = self
            .region
            .head()
            .ok_or(NvramError::Log(LogError::CursorUnreadable { name: "head" }))?;
        self.drain_target.fetch_max(head.seq, Ordering::AcqRel);
        let _ = self.wake_flusher.try_send(());
        Ok(head)
    }

    /// Has the flusher write and release everything logged so far, even if it is paused or
    /// delayed by configuration, and waits for it; returns the flushed cursor. Released
    /// means as durable on the disk as in the log: synced in a guest, in the host's page
    /// cache in process mode, which a partner on the same host reads as well.
    pub fn drain(&self, timeout: Duration) -> Result<Cursor, NvramError> {
        let head = self.request_drain()?;
        let started = Instant::now();
        loop {
            let _ = self.wake_flusher.try_send(());
            let flushed =
                self.region
                    .flushed()
                    .ok_or(NvramError::Log(LogError::CursorUnreadable {
                        name: "flushed",
                    }))?;
            if flushed.seq >= head.seq {
                return Ok(flushed);
            }
            if started.elapsed() >= timeout {
                return Err(NvramError::DrainTimeout {
                    target: head.seq,
                    reached: flushed.seq,
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether the flusher must go on past `flushed` although paused (see [`Nvram::drain`]).
    pub(crate) fn draining(&self, flushed: Cursor) -> bool {
        self.drain_target.load(Ordering::Acquire) > flushed.seq
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
                RecordKind::Write => {
                    overlay.write(record.offset, record.len, record.data_pos, record.seq);
                }
                RecordKind::Trim | RecordKind::WriteZeroes => {
                    overlay.zero(record.offset, record.len, record.seq);
                }
                RecordKind::Wrap => {}
            }
            count += 1;
        }
        Ok(count)
    }

    /// Writes waiting now to get their record into the log (see [`shm::ServiceCounters`]).
    pub fn writes_waiting(&self) -> u64 {
        self.writes_waiting.load(Ordering::Relaxed)
    }

    pub fn region(&self) -> &NodeRegion {
        &self.region
    }

    // The volume table only ever gains whole entries, so a panic elsewhere while it was
    // locked cannot have left it half changed: its readers carry on past the poison. The
    // flusher in particular must see every volume, or it would skip pruning one.
    pub(crate) fn volume(&self, export: u32) -> Option<Arc<Volume>> {
        self.volumes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&export)
            .cloned()
    }

    pub(crate) fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Seq of the last record whose overlay segment is in place. A writer publishes its
    /// record (the head) before it takes the overlay's lock; were the flusher to release
    /// the record in between, the segment added afterwards would point at log space the
    /// appender may reuse. So the flusher goes no further than this.
    ///
    /// A hold ([`Nvram::hold_flusher`]) lowers this limit for as long as it lives.
    pub(crate) fn indexed(&self) -> u64 {
        self.indexed
            .load(Ordering::Acquire)
            .min(self.flush_limit.load(Ordering::Acquire))
    }

    pub(crate) fn wakeups(&self) -> &Receiver<()> {
        &self.wakeups
    }

    /// Called by the flusher, which applied everything up to `applied`, before it sleeps:
    /// marks it idle, so that the next write wakes it, and returns whether it may sleep
    /// (false if a record was logged meanwhile).
    pub(crate) fn flusher_sleeps(&self, applied: Cursor) -> bool {
        self.flusher_idle.store(true, Ordering::SeqCst);
        // Pairs with the fence in `wake_flusher`: either this load sees the writer's new
        // head, or the writer sees the idle flag.
        fence(Ordering::SeqCst);
        // Nothing to do also when the next record is past what the flusher may apply: the
        // writer that indexes it, or the hold's end, wakes it.
        let sleeps = self
            .region
            .head()
            .is_none_or(|head| head == applied || self.indexed() <= applied.seq);
        if !sleeps {
            self.flusher_idle.store(false, Ordering::Relaxed);
        }
        sleeps
    }

    /// After a write was logged, leaving `unflushed` bytes in the ring: wakes the flusher
    /// if it is idle or the backlog is large.
    fn wake_flusher(&self, unflushed: u64) {
        fence(Ordering::SeqCst);
        if self.flusher_idle.swap(false, Ordering::SeqCst) || unflushed >= self.wake_backlog {
            // A full channel means a wakeup is pending already.
            let _ = self.wake_flusher.try_send(());
        }
    }

    /// Appends `entry` (a change to `volume`) and updates the volume's overlay under the
    /// appender's lock.
    fn log(&self, volume: &Volume, entry: &Entry<'_>) -> std::io::Result<()> {
        let waiting = WaitingWrite::new(&self.writes_waiting);
        let mut appender = self.appender.lock().map_err(|_| poisoned())?;
        let owned = self
            .ownership
            .as_ref()
            .is_none_or(|o| o.owns(volume.export_id));
        if !volume.writable() || !owned {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "export {} is not served by this node any more (fenced)",
                    volume.name
                ),
            ));
        }
        let appended = appender
            .append(entry, self.back_pressure)
            .map_err(|e| match e {
                LogError::TooLarge { .. } => {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
                }
                other => std::io::Error::other(other.to_string()),
            })?;
        drop(waiting);
        let updated = volume.overlay.write().map(|mut overlay| match *entry {
            Entry::Write { offset, data, .. } => {
                overlay.write(offset, data.len() as u64, appended.data_pos, appended.seq);
            }
            Entry::Trim { offset, len, .. } | Entry::WriteZeroes { offset, len, .. } => {
                overlay.zero(offset, len, appended.seq);
            }
        });
        // The record is in the log whatever became of the overlay: the flusher must be able
        // to reach it. Stored under the appender's lock, so it only grows.
        self.indexed.store(appended.seq, Ordering::Release);
        drop(appender);
        self.wake_flusher(appended.unflushed);
        updated.map_err(|_| poisoned())?;
        // No acknowledgement without ownership, checked after the record is published: a
        // peer that claims the identity publishes its claim, then reads this log. With a
        // sequentially consistent fence on both sides, either its replay has this record,
        // or this check sees its claim (see `shm::claims`). The record stays in the log:
        // a write that is not acknowledged may land or not.
        fence(Ordering::SeqCst);
        if let Some(ownership) = &self.ownership
            && !ownership.owns(volume.export_id)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "export {} was claimed by another node while this write was logged: not acknowledged",
                    volume.name
                ),
            ));
        }
        Ok(())
    }
}

/// Counts a write as waiting to get into the log for as long as it lives.
struct WaitingWrite<'a>(&'a AtomicU64);

impl<'a> WaitingWrite<'a> {
    fn new(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for WaitingWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An export backed by NVRAM write-back.
#[derive(Debug)]
pub struct NvramExport {
    nvram: Arc<Nvram>,
    volume: Arc<Volume>,
}

impl NvramExport {
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }
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
        self.volume.read(offset, buf, self.nvram.region())?;
        // A node that lost the identity (a claim while it hung) may not have the newest
        // writes: what it read goes out only if it still owns the identity after reading.
        fence(Ordering::SeqCst);
        if self
            .nvram
            .ownership
            .as_ref()
            .is_some_and(|o| !o.owns(self.volume.export_id))
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "export {} is owned by another node now: the read is not answered",
                    self.volume.name
                ),
            ));
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> std::io::Result<()> {
        let entry = Entry::Write {
            export: self.volume.export_id,
            offset,
            data,
        };
        self.nvram.log(&self.volume, &entry)
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
        self.nvram.log(&self.volume, &entry)
    }

    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let entry = Entry::Trim {
            export: self.volume.export_id,
            offset,
            len,
        };
        self.nvram.log(&self.volume, &entry)
    }

    fn flush(&self) -> std::io::Result<()> {
        // Every completed write is already in the log: NVRAM semantics (see the module doc).
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::flusher::{Flusher, FlusherConfig, Release};
    use super::volume::Disk;
    use super::*;
    use shm::Mapping;

    /// A node with one volume and a running flusher, in a temporary directory.
    struct TestNode {
        dir: tempfile::TempDir,
        region: NodeRegion,
        nvram: Arc<Nvram>,
        export: Arc<NvramExport>,
        _flusher: Flusher,
    }

    impl TestNode {
        fn start(config: FlusherConfig) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let region = NodeRegion::format(
                Mapping::create_file(&dir.path().join("a.region"), 1 << 20).unwrap(),
                0,
                "a",
            )
            .unwrap();
            std::fs::File::create(dir.path().join("a.img"))
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
            let writer = region.writer(1).unwrap();
            let nvram = Nvram::new(region.clone(), writer.appender, BackPressure::default());
            let export = nvram.add_volume(Volume::new(
                0,
                "a",
                Disk::open(&dir.path().join("a.img")).unwrap(),
            ));
            let flusher =
                Flusher::spawn(Arc::clone(&nvram), writer.flushed, writer.synced, config).unwrap();
            Self {
                dir,
                region,
                nvram,
                export,
                _flusher: flusher,
            }
        }

        fn wait_flushed(&self, within: Duration) {
            let deadline = Instant::now() + within;
            while self.region.flushed() != self.region.head() {
                assert!(Instant::now() < deadline, "the flusher did not catch up");
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        fn disk_bytes(&self, offset: usize, len: usize) -> Vec<u8> {
            std::fs::read(self.dir.path().join("a.img")).unwrap()[offset..offset + len].to_vec()
        }
    }

    /// The flusher gathers adjacent small writes into one disk write and asks for the pages
    /// they cover in part ahead of time: whatever the mix (runs, overlaps, unaligned ends,
    /// zeroes between, writes too large for a run), the disk must end up as if every record
    /// had been written alone, in log order.
    #[test]
    fn gathered_writes_reach_the_disk_as_if_applied_one_by_one() {
        for (release, paused) in [
            (Release::Synced, true),
            (Release::Written, true),
            (Release::Synced, false),
        ] {
            let node = TestNode::start(FlusherConfig {
                release,
                paused,
                ..FlusherConfig::default()
            });
            let mut model = vec![0u8; 1 << 20];
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = |bound: u64| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % bound
            };
            let mut offset = 0u64;
            let mut logged = 0u64;
            for i in 0..400u32 {
                let len = [512, 1000, 4096, 8192, 3000, 70_000][next(6) as usize];
                offset = match next(4) {
                    // Right after the last write (a run), or over it, or anywhere.
                    0 | 1 => offset + len,
                    2 => offset.saturating_sub(next(4096)),
                    _ => next(1 << 20),
                }
                .min((1 << 20) - len);
                let range = offset as usize..(offset + len) as usize;
                if next(10) == 0 {
                    node.export.write_zeroes(offset, len, false, false).unwrap();
                    model[range].fill(0);
                } else {
                    let data: Vec<u8> = (0..len).map(|b| (b as u32 ^ i) as u8 | 1).collect();
                    node.export.write(offset, &data, false).unwrap();
                    model[range].copy_from_slice(&data);
                    logged += len;
                }
                // Stay well inside the ring while the flusher is paused.
                if logged > 400 << 10 {
                    node.nvram.drain(Duration::from_secs(10)).unwrap();
                    logged = 0;
                }
            }
            node.nvram.drain(Duration::from_secs(10)).unwrap();
            node.wait_flushed(Duration::from_secs(10));
            assert!(
                node.disk_bytes(0, 1 << 20) == model,
                "{release:?}, paused {paused}: the disk differs from the writes applied in order"
            );
        }
    }

    /// A failed sync may lose what was written since the last one (the kernel drops the
    /// pages it could not write back); a second sync would then succeed over the loss.
    /// The flusher must write those records again from the log, and only then release them.
    #[test]
    fn after_a_failed_sync_the_flusher_writes_the_records_again() {
        let node = TestNode::start(FlusherConfig {
            release: Release::Synced,
            ..FlusherConfig::default()
        });
        let disk = &node.export.volume().disk;
        disk.failing_syncs.store(1, Ordering::Release);
        for i in 0..16u8 {
            node.export
                .write(u64::from(i) * 4096, &[i + 1; 4096], false)
                .unwrap();
        }
        node.wait_flushed(Duration::from_secs(10));
        assert_eq!(
            disk.failing_syncs.load(Ordering::Acquire),
            0,
            "no sync failed"
        );
        for i in 0..16u8 {
            assert_eq!(
                node.disk_bytes(usize::from(i) * 4096, 4096),
                vec![i + 1; 4096],
                "block {i} was released without being written again"
            );
        }
    }

    /// After a failed sync, `synced` must not claim what the media may have lost, however
    /// well later syncs go.
    #[test]
    fn after_a_failed_sync_synced_stays_where_it_was() {
        let node = TestNode::start(FlusherConfig {
            release: Release::Written,
            sync_interval: Duration::from_millis(20),
            ..FlusherConfig::default()
        });
        let disk = &node.export.volume().disk;
        node.export.write(0, &[1; 4096], false).unwrap();
        node.wait_flushed(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        while node.region.synced().unwrap().seq < 1 {
            assert!(Instant::now() < deadline, "the syncer never synced");
            std::thread::sleep(Duration::from_millis(5));
        }
        disk.failing_syncs.store(1, Ordering::Release);
        node.export.write(4096, &[2; 4096], false).unwrap();
        node.wait_flushed(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        while disk.failing_syncs.load(Ordering::Acquire) > 0 {
            assert!(Instant::now() < deadline, "the syncer did not sync again");
            std::thread::sleep(Duration::from_millis(5));
        }
        // More writes and many good intervals later: still the last seq before the failure.
        node.export.write(8192, &[3; 4096], false).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(node.region.synced().unwrap().seq, 1);
    }

    /// A writer publishes its record before it takes the overlay's lock; the flusher must
    /// not release the record in that gap, or the segment added afterwards would point at
    /// free log space. Here a record is appended behind `log`'s back, as if its writer
    /// were stopped in the gap: the flusher must leave it alone until it is indexed.
    #[test]
    fn the_flusher_releases_nothing_past_the_last_indexed_record() {
        for release in [Release::Written, Release::Synced] {
            let node = TestNode::start(FlusherConfig {
                release,
                ..FlusherConfig::default()
            });
            let (region, nvram, export) = (&node.region, &node.nvram, &node.export);
            export.write(0, &[1; 512], false).unwrap();
            let stopped_in_the_gap = nvram
                .appender
                .lock()
                .unwrap()
                .append(
                    &Entry::Write {
                        export: 0,
                        offset: 512,
                        data: &[2; 512],
                    },
                    BackPressure::default(),
                )
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(
                region.flushed().unwrap().seq,
                stopped_in_the_gap.seq - 1,
                "{release:?}: the flusher released a record whose segment did not exist yet"
            );
            // The next write through `log` indexes everything before it.
            export.write(1024, &[3; 512], false).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while region.flushed() != region.head() {
                assert!(
                    Instant::now() < deadline,
                    "{release:?}: the flusher stalled"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// A write waits for log space while a peer claims its identity (hostd being away).
    /// Its record gets into the log once space is freed, and the check made after the
    /// record was published sees the claim: the write fails, unacknowledged, and its
    /// record stays in the log. The next write is refused before it is logged.
    #[test]
    fn a_write_logged_while_a_peer_claims_its_identity_fails() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["a", "b"];
        let control = ControlRegion::format(
            Mapping::create_memfd("control", 1 << 20).unwrap(),
            &names,
            &names,
        )
        .unwrap();
        let own = NodeRegion::format(Mapping::create_memfd("a", 1 << 20).unwrap(), 0, "a").unwrap();
        let peer =
            NodeRegion::format(Mapping::create_memfd("b", 1 << 20).unwrap(), 1, "b").unwrap();
        std::fs::File::create(dir.path().join("a.img"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let mut writer = own.writer(1).unwrap();
        // A full log, which nothing flushes.
        let block = [7u8; 4096];
        let fill = Entry::Write {
            export: 0,
            offset: 0,
            data: &block,
        };
        loop {
            match writer.appender.try_append(&fill) {
                Ok(_) => {}
                Err(LogError::Full { .. }) => break,
                Err(other) => panic!("{other}"),
            }
        }
        let ownership = Ownership {
            control,
            node: 0,
            regions: vec![own.clone(), peer.clone()],
        };
        let nvram = Nvram::with_ownership(
            own.clone(),
            writer.appender,
            BackPressure {
                timeout: Duration::from_secs(10),
            },
            Some(ownership),
        );
        let disk = Disk::open(&dir.path().join("a.img")).unwrap();
        let export = nvram.add_volume(Volume::new(0, "a", disk));
        let full = own.head().unwrap();
        let waiting = {
            let export = Arc::clone(&export);
            std::thread::spawn(move || export.write(0, &[1; 4096], false))
        };
        // Past the check made before logging: it waits for space.
        let deadline = Instant::now() + Duration::from_secs(5);
        while own.stats().backpressure_waits == 0 {
            assert!(Instant::now() < deadline, "the write never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut peer_claims = peer.writer(2).unwrap().claims;
        peer_claims.publish(
            0,
            shm::Claim {
                generation: 1,
                victim: 0,
            },
        );
        writer.flushed.advance(full).unwrap();
        let refused = waiting.join().unwrap().unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(
            refused.to_string().contains("claimed by another node"),
            "{refused}"
        );
        let head = own.head().unwrap();
        assert_eq!(head.seq, full.seq + 1, "the record stays in the log");
        let refused = export.write(0, &[2; 4096], false).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(own.head().unwrap(), head, "nothing more is logged");
    }
}
