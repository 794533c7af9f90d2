//! The flusher: applies logged writes to the disks in log order, then releases them from
//! the log (advances `flushed`, so their ring space is reused and the overlays drop them).
//!
//! When a record may be released depends on [`Release`]:
//!
//! - [`Release::Written`]: as soon as it is written to the disk, when the disk's page cache
//!   belongs to the kernel that also holds the region (process mode: both are the host's).
//!   From there it survives every failure the log survives (agent, guest, QEMU and hostd
//!   crashes; a host crash takes the tmpfs region too). The [`Syncer`] syncs the disks to
//!   their media in the background, so a host crash loses at most the last sync interval.
//! - [`Release::Synced`]: only once the disk is synced (fdatasync), in group commits: the
//!   records are applied as soon as they are logged, but the disks are synced at most every
//!   [`SYNC_INTERVAL`] while writes keep coming, or at once when the log goes idle or is a
//!   quarter full. One sync then covers thousands of records instead of a few. A guest
//!   always works this way: its page cache dies with it, so a write must leave the guest
//!   before the log may forget it.
//!
//! Applying a batch costs little more than the disk's own work, which matters most when a
//! release drains a full log while clients wait (under TCG, 64 MiB of 64 KiB writes went
//! from about 50 to about 100 MB/s, scattered 512-byte writes from under 1 to about
//! 8 MB/s; see docs/takeover-measurements.md):
//!
//! - Adjacent small writes are gathered into one disk write (`Run`), still in log order.
//! - Pages the batch writes only in part are asked for ahead (`prefetch`): otherwise the
//!   kernel reads each one synchronously inside the write, one read per record.
//! - Records this agent appended itself are copied straight from the ring without checking
//!   their crc again: their writer computed it from the same bytes, the head was published
//!   after them, and clients' reads of unflushed data take the same bytes unchecked from
//!   the overlay. Records inherited from an earlier run of the agent go through a
//!   checking scan. (A software crc32c, all a TCG guest's default CPU offers, took about
//!   40 % of a drain.)
//!
//! None of this changes what is released when: a record is released only after it is
//! written (and, with [`Release::Synced`], synced), never past `Nvram::indexed`, overlays
//! are pruned before `flushed` moves, and after a failed sync everything since the last
//! release is written again from the log.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shm::log::FlushedWriter;
use shm::{Cursor, LogError, LogScanner, NodeRegion, Record, RecordKind, SyncedWriter};

use super::Nvram;
use super::syncer::Syncer;
use super::volume::Volume;

/// Most records applied between two syncs.
const BATCH_RECORDS: usize = 4096;
/// Most bytes applied between two syncs.
const BATCH_BYTES: u64 = 16 << 20;
/// Largest run of adjacent small writes gathered into one disk write (see [`Run`]).
const RUN_BYTES: usize = 1 << 20;
/// The page cache's unit: a write that covers part of a page not cached reads it first.
const PAGE: u64 = 4096;
/// Most pages one prefetch hint asks for: the kernel reads no more than the device's
/// readahead window (128 KiB by default) per hint and drops the rest.
const PREFETCH_PAGES: u64 = 32;
/// How long the flusher sleeps when the log is empty and nobody wakes it. Every write to
/// an idle flusher, a drain and a dropped hold wake it: this is only a backstop, and an
/// idle guest under TCG pays host CPU for each wakeup.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// While writes keep coming, how long the flusher lets them gather between batches.
const TICK: Duration = Duration::from_millis(2);
/// How long it waits before retrying after a disk or log error.
const ERROR_WAIT: Duration = Duration::from_secs(1);
/// Longest time between syncs while records keep arriving.
const SYNC_INTERVAL: Duration = Duration::from_millis(20);
/// When the log goes quiet, sync this long after the last sync: a client writing one block
/// at a time would otherwise cost one sync per write.
const IDLE_SYNC_DELAY: Duration = Duration::from_millis(2);

/// Why a batch could not be applied or released. The flusher logs it and tries again.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("cannot read the log")]
    Log(#[source] LogError),
    #[error("log record {seq} is for export {export}, which has no disk here")]
    UnknownExport { seq: u64, export: u32 },
    #[error("cannot apply log record {seq} to {path}")]
    Apply {
        seq: u64,
        export: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The disk may have dropped the pages it failed to write: whatever was applied since
    /// the last good sync must be applied again from the log, not synced again.
    #[error("cannot sync {path}")]
    Sync {
        export: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot advance the flushed cursor")]
    Advance(#[source] LogError),
}

/// When a record applied to a disk may leave the log (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Release {
    /// Once written to the disk: its page cache is as durable as the region.
    Written,
    /// Once the disk is synced to its media.
    #[default]
    Synced,
}

/// How the flusher runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlusherConfig {
    /// Wait this long before each batch (a knob for demos and tests: unflushed records
    /// stay visible in `hostd inspect` for a while).
    pub delay: Duration,
    /// Never flush (for tests and demos of replay; writes block once the log is full).
    pub paused: bool,
    /// When a record leaves the log.
    pub release: Release,
    /// With [`Release::Written`]: how often the disks are synced to their media.
    pub sync_interval: Duration,
}

impl Default for FlusherConfig {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            paused: false,
            release: Release::default(),
            sync_interval: Duration::from_secs(1),
        }
    }
}

/// A running flusher; stops (after its current batch) when dropped, and then has its
/// syncer, if any, sync once more.
#[derive(Debug)]
pub struct Flusher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Dropped after `drop` joined the flusher thread, so its last sync covers every record
    /// the flusher released.
    _syncer: Option<Syncer>,
}

impl Flusher {
    pub fn spawn(
        nvram: Arc<Nvram>,
        flushed: FlushedWriter,
        synced: SyncedWriter,
        config: FlusherConfig,
    ) -> std::io::Result<Self> {
        let (synced, syncer) = match config.release {
            Release::Synced => (Some(synced), None),
            Release::Written => (
                None,
                Some(Syncer::spawn(
                    Arc::clone(&nvram),
                    synced,
                    config.sync_interval,
                )?),
            ),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || run(&nvram, flushed, synced, config, &stopping))?;
        Ok(Self {
            stop,
            thread: Some(thread),
            _syncer: syncer,
        })
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    nvram: &Nvram,
    mut flushed: FlushedWriter,
    synced: Option<SyncedWriter>,
    config: FlusherConfig,
    stop: &AtomicBool,
) {
    if config.paused {
        log::warn!("flusher paused by configuration: writes stay in the log until it fills");
    }
    // A previous run may have released records on write and died before its syncer synced
    // them: the first sync of a syncing flusher covers every disk, not only those it wrote.
    let touched = match synced {
        Some(_) => nvram.volumes().iter().map(|v| v.export_id).collect(),
        None => BTreeSet::new(),
    };
    let mut state = State {
        applied: flushed.flushed(),
        touched,
        last_sync: Instant::now(),
        synced,
        // Read after this agent's writers may have started: a record counted as inherited
        // by mistake is only checked once more.
        inherited_through: nvram.region().head().map_or(u64::MAX, |head| head.seq),
    };
    let mut drain: Option<DrainStats> = None;
    while !stop.load(Ordering::Relaxed) {
        // A drain (a release of an identity) overrides the pause and the delay.
        let draining = nvram.draining(flushed.flushed());
        if !draining && let Some(stats) = drain.take() {
            stats.report();
        }
        if config.paused && !draining {
            let _ = nvram.wakeups().recv_timeout(IDLE_WAIT);
            continue;
        }
        if !config.delay.is_zero() && !draining {
            std::thread::sleep(config.delay);
        }
        let batch_started = Instant::now();
        let result = apply_batch(nvram, &mut state).and_then(|batch| {
            let applied_at = Instant::now();
            let unsynced = state.applied != flushed.flushed();
            let lagging = state.applied.pos - flushed.flushed().pos
                >= nvram.region().geometry().ring_size / 4;
            let since = state.last_sync.elapsed();
            let due = state.synced.is_none()
                || draining
                || lagging
                || since >= SYNC_INTERVAL
                || (batch.applied == 0 && since >= IDLE_SYNC_DELAY);
            if unsynced && due {
                release(nvram, &mut state, &mut flushed)?;
            }
            if draining {
                let stats = drain.get_or_insert_with(|| DrainStats::new(batch_started));
                stats.records += batch.applied;
                stats.bytes += batch.bytes;
                stats.applying += applied_at - batch_started;
                stats.releasing += applied_at.elapsed();
            }
            Ok(batch)
        });
        match result {
            Ok(Batch { applied: 0, .. }) if state.applied != flushed.flushed() => {
                // Wake when the idle sync falls due (or for a drain).
                let wait = IDLE_SYNC_DELAY.saturating_sub(state.last_sync.elapsed());
                let _ = nvram.wakeups().recv_timeout(wait);
            }
            Ok(Batch { applied: 0, .. }) => {
                // Nothing to do: the next write wakes us (see `Nvram::wake_flusher`).
                if nvram.flusher_sleeps(state.applied) {
                    let _ = nvram.wakeups().recv_timeout(IDLE_WAIT);
                }
            }
            Ok(Batch {
                reached_end: true, ..
            }) if !draining => {
                // Writes are trickling in: let them gather for a tick rather than take them
                // one wakeup each. A backlog past the threshold wakes us early.
                let _ = nvram.wakeups().recv_timeout(TICK);
            }
            Ok(_) => {}
            Err(error) => {
                if let FlushError::Apply { export, .. } | FlushError::Sync { export, .. } = error {
                    // The failover monitor checks whether the storage refused it because
                    // the identity went elsewhere.
                    nvram.note_disk_error(export);
                }
                log::error!(
                    "flusher: {}; retrying in {} s",
                    wire::error_chain::one_line(&error),
                    ERROR_WAIT.as_secs()
                );
                // After a failed sync the disk may have dropped the pages it could not
                // write, and a second sync would report success: apply everything since
                // the last release again from the log. After any other failure, keep what
                // applied cleanly before it (so one bad record does not hold back the rest
                // of the log).
                let kept = !matches!(error, FlushError::Sync { .. })
                    && state.applied != flushed.flushed()
                    && release(nvram, &mut state, &mut flushed).is_ok();
                if !kept {
                    state.applied = flushed.flushed();
                    // The next sync must cover whatever the failed one did not.
                    state
                        .touched
                        .extend(nvram.volumes().iter().map(|v| v.export_id));
                }
                std::thread::sleep(ERROR_WAIT);
            }
        }
    }
}

/// What the flusher has done since it last released records.
struct State {
    /// Just past the last record written to a disk (possibly not released yet).
    applied: Cursor,
    /// Exports written since the last release.
    touched: BTreeSet<u32>,
    last_sync: Instant,
    /// With [`Release::Synced`], where the flusher publishes what its syncs covered.
    synced: Option<SyncedWriter>,
    /// Last seq logged before this flusher started, by an earlier run of the agent: such
    /// records are read through a crc-checking scan. Later ones were appended by this
    /// agent, and their data is copied straight from the ring, as clients' reads of
    /// unflushed data copy it (see the module doc).
    inherited_through: u64,
}

/// What a drain cost, for the log: a planned move waits for it.
struct DrainStats {
    started: Instant,
    records: usize,
    bytes: u64,
    /// Writing records to the disks (page cache).
    applying: Duration,
    /// Syncing the disks and releasing.
    releasing: Duration,
}

impl DrainStats {
    fn new(started: Instant) -> Self {
        Self {
            started,
            records: 0,
            bytes: 0,
            applying: Duration::ZERO,
            releasing: Duration::ZERO,
        }
    }

    fn report(&self) {
        let elapsed = self.started.elapsed();
        log::info!(
            "flusher: drained {} records ({:.1} MiB) in {} ms ({:.1} MB/s): applying {} ms, syncing {} ms",
            self.records,
            self.bytes as f64 / f64::from(1 << 20),
            elapsed.as_millis(),
            self.bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-6),
            self.applying.as_millis(),
            self.releasing.as_millis()
        );
    }
}

/// What [`apply_batch`] did.
#[derive(Debug, Clone, Copy)]
struct Batch {
    /// Records written to the disks.
    applied: usize,
    /// Bytes of data they wrote.
    bytes: u64,
    /// Whether it stopped because it had applied everything it may, not at a batch limit.
    reached_end: bool,
}

/// Writes the next batch of logged records to the disks (without syncing). It stops at the
/// last record the writers have put in the overlays ([`Nvram::indexed`]): a record released
/// before its overlay segment exists would leave that segment pointing at free log space.
fn apply_batch(nvram: &Nvram, state: &mut State) -> Result<Batch, FlushError> {
    let region = nvram.region();
    let head = region
        .head()
        .ok_or(FlushError::Log(LogError::CursorUnreadable { name: "head" }))?;
    let indexed = nvram.indexed();
    let discarded = nvram.discarded_through();
    prefetch(nvram, state.applied, head, indexed);
    let scanner = LogScanner::new(region.mapping(), region.geometry(), state.applied, head);
    // Inherited records come first in the log; a batch holds only one of the two kinds.
    let checking = state.applied.seq < state.inherited_through;
    let scanner = if checking {
        scanner
    } else {
        scanner.without_data()
    };
    let mut applied = 0;
    let mut bytes = 0;
    // Records of a batch are nearly always for one export: look its volume up once.
    let mut volume: Option<Arc<Volume>> = None;
    let mut run = Run::default();
    for record in scanner {
        let mut record = record.map_err(FlushError::Log)?;
        if record.seq > indexed || (checking && record.seq > state.inherited_through) {
            break;
        }
        if record.seq <= discarded {
            // Another node replayed it and wrote newer data since (see `Nvram::discard`).
            run.write(state)?;
            state.applied = record.end();
            continue;
        }
        let volume =
            match volume.take() {
                Some(v) if v.export_id == record.export => volume.insert(v),
                _ => volume.insert(nvram.volume(record.export).ok_or(
                    FlushError::UnknownExport {
                        seq: record.seq,
                        export: record.export,
                    },
                )?),
            };
        applied += 1;
        if record.kind == RecordKind::Write {
            bytes += record.len;
        }
        if !run.continues(volume, &record) {
            run.write(state)?;
        }
        if Run::takes(record.kind, record.len) {
            run.push(volume, record, (!checking).then_some(region))?;
        } else {
            if !checking && record.kind == RecordKind::Write {
                record.data = vec![0; record.len as usize];
                read_data(region, record.data_pos, &mut record.data)?;
            }
            // Not a small write: straight to the disk.
            apply(volume, &record).map_err(|source| FlushError::Apply {
                seq: record.seq,
                export: volume.export_id,
                path: volume.disk.path().to_owned(),
                source,
            })?;
            state.touched.insert(record.export);
            state.applied = record.end();
        }
        if applied >= BATCH_RECORDS || bytes >= BATCH_BYTES {
            run.write(state)?;
            return Ok(Batch {
                applied,
                bytes,
                reached_end: false,
            });
        }
    }
    run.write(state)?;
    Ok(Batch {
        applied,
        bytes,
        reached_end: true,
    })
}

/// Adjacent small writes to one export, gathered into one disk write: in a TCG guest a
/// system call costs more than copying a few KiB, so a client streaming small writes would
/// otherwise have the flusher spend its time entering the kernel. Log order is kept: a run
/// only grows by the record right after it in the log, landing right after it on the disk,
/// and it is written before any other record is applied.
#[derive(Default)]
struct Run {
    volume: Option<Arc<Volume>>,
    offset: u64,
    data: Vec<u8>,
    first_seq: u64,
    /// Just past its last record.
    end: Cursor,
}

impl Run {
    /// Whether a record of this kind and length may be part of a run.
    fn takes(kind: RecordKind, len: u64) -> bool {
        kind == RecordKind::Write && len < RUN_BYTES as u64
    }

    /// Whether `record` may join the run as it is (true when there is no run yet).
    fn continues(&self, volume: &Arc<Volume>, record: &Record) -> bool {
        match &self.volume {
            None => true,
            Some(current) => {
                Self::takes(record.kind, record.len)
                    && Arc::ptr_eq(current, volume)
                    && self.offset.checked_add(self.data.len() as u64) == Some(record.offset)
                    && self.data.len() as u64 + record.len <= RUN_BYTES as u64
            }
        }
    }

    /// Adds a small write that [`Run::continues`] the run, or starts one with it. Its data
    /// is read from `ring` when given (the record was scanned without it), straight into
    /// the run's buffer.
    fn push(
        &mut self,
        volume: &Arc<Volume>,
        record: Record,
        ring: Option<&NodeRegion>,
    ) -> Result<(), FlushError> {
        if self.volume.is_none() {
            self.volume = Some(Arc::clone(volume));
            self.offset = record.offset;
            self.first_seq = record.seq;
            self.data.clear();
        }
        match ring {
            Some(ring) => {
                let at = self.data.len();
                self.data.resize(at + record.len as usize, 0);
                read_data(ring, record.data_pos, &mut self.data[at..])?;
            }
            None => self.data.extend_from_slice(&record.data),
        }
        self.end = record.end();
        Ok(())
    }

    /// Writes the run to its disk (if there is one) and counts its records as applied.
    fn write(&mut self, state: &mut State) -> Result<(), FlushError> {
        let Some(volume) = self.volume.take() else {
            return Ok(());
        };
        let data = &self.data;
        check_range(&volume, self.offset, data.len() as u64)
            .and_then(|()| volume.disk.write_at(self.offset, data))
            .map_err(|source| FlushError::Apply {
                seq: self.first_seq,
                export: volume.export_id,
                path: volume.disk.path().to_owned(),
                source,
            })?;
        state.touched.insert(volume.export_id);
        state.applied = self.end;
        // The buffer is kept for the next run.
        self.data.clear();
        Ok(())
    }
}

/// Copies a write's data from the ring (a record scanned without it).
fn read_data(ring: &NodeRegion, data_pos: u64, buf: &mut [u8]) -> Result<(), FlushError> {
    if ring.read_log(data_pos, buf) {
        Ok(())
    } else {
        Err(FlushError::Log(LogError::OutOfRegion))
    }
}

/// Has the kernel read, in the background and all at once, the pages that the next batch
/// (from `from`, up to `indexed`) writes only in part. Without it each such write waits for
/// its own read of the page before it can go on: in a TCG guest that took about half a
/// millisecond, so a log of 512-byte writes to scattered pages flushed at under 1 MB/s.
/// Only a hint: an error costs speed, not data, and is not reported.
fn prefetch(nvram: &Nvram, from: Cursor, head: Cursor, indexed: u64) {
    let region = nvram.region();
    // (export, page) of every page the batch covers in part.
    let mut pages = Vec::new();
    let mut partial_ends = |export: u32, start: u64, end: u64| {
        if start % PAGE != 0 {
            pages.push((export, start / PAGE));
        }
        if end % PAGE != 0 {
            pages.push((export, end / PAGE));
        }
    };
    // The disk writes the batch makes, as `apply_batch` gathers them: (export, start, end,
    // whether more small writes may join it).
    let mut range: Option<(u32, u64, u64, bool)> = None;
    let (mut records, mut bytes) = (0, 0);
    let scanner = LogScanner::new(region.mapping(), region.geometry(), from, head);
    for extent in scanner.extents() {
        let Ok(extent) = extent else { break };
        if extent.seq > indexed || records >= BATCH_RECORDS || bytes >= BATCH_BYTES {
            break;
        }
        records += 1;
        if extent.kind == RecordKind::Write {
            bytes += extent.len;
        }
        if extent.kind == RecordKind::Wrap {
            continue;
        }
        let end = extent.offset.saturating_add(extent.len);
        let small = Run::takes(extent.kind, extent.len);
        match &mut range {
            Some((export, start, run_end, true))
                if small
                    && *export == extent.export
                    && *run_end == extent.offset
                    && end - *start <= RUN_BYTES as u64 =>
            {
                *run_end = end;
            }
            _ => {
                if let Some((export, start, end, _)) = range {
                    partial_ends(export, start, end);
                }
                range = Some((extent.export, extent.offset, end, small));
            }
        }
    }
    if let Some((export, start, end, _)) = range {
        partial_ends(export, start, end);
    }
    if pages.is_empty() {
        return;
    }
    pages.sort_unstable();
    pages.dedup();
    // One hint per stretch of consecutive pages.
    let mut volume: Option<Arc<Volume>> = None;
    let mut i = 0;
    while i < pages.len() {
        let (export, first) = pages[i];
        let mut last = first;
        i += 1;
        while i < pages.len() && pages[i] == (export, last + 1) && last + 1 - first < PREFETCH_PAGES
        {
            last += 1;
            i += 1;
        }
        let volume = match volume.take() {
            Some(v) if v.export_id == export => volume.insert(v),
            _ => match nvram.volume(export) {
                Some(v) => volume.insert(v),
                None => continue,
            },
        };
        if let Err(error) = volume
            .disk
            .prefetch(first * PAGE, (last - first + 1) * PAGE)
        {
            log::debug!(
                "flusher: cannot prefetch {}: {error}",
                volume.disk.path().display()
            );
        }
    }
}

/// Releases every record applied so far: syncs the disks written since the last release
/// (with [`Release::Synced`]), then prunes the overlays and publishes `flushed`.
fn release(
    nvram: &Nvram,
    state: &mut State,
    flushed: &mut FlushedWriter,
) -> Result<(), FlushError> {
    if let Some(synced) = &mut state.synced {
        for export in &state.touched {
            if let Some(volume) = nvram.volume(*export) {
                volume.disk.sync().map_err(|source| FlushError::Sync {
                    export: *export,
                    path: volume.disk.path().to_owned(),
                    source,
                })?;
            }
        }
        state.last_sync = Instant::now();
        synced.publish(state.applied.seq);
    }
    state.touched.clear();
    // Only now, with the data where the release mode wants it, may the overlays drop it
    // and then the ring space be reused. In that order: overlay segments point into the
    // log, so none may be left pointing at space the appender can reuse. A poisoned
    // overlay is pruned all the same: pruning only removes segments, which is always safe.
    for volume in nvram.volumes() {
        volume
            .overlay
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .prune(state.applied.seq);
    }
    flushed
        .advance(state.applied)
        .map_err(FlushError::Advance)?;
    Ok(())
}

pub(crate) fn apply(volume: &Volume, record: &Record) -> std::io::Result<()> {
    check_range(volume, record.offset, record.len)?;
    match record.kind {
        RecordKind::Write => volume.disk.write_at(record.offset, &record.data),
        RecordKind::Trim | RecordKind::WriteZeroes => {
            volume.disk.zero_at(record.offset, record.len)
        }
        RecordKind::Wrap => Ok(()),
    }
}

/// The server checked the range before logging it; check again rather than let a bad
/// record grow an image file or fail deep in the block layer.
fn check_range(volume: &Volume, offset: u64, len: u64) -> std::io::Result<()> {
    if offset
        .checked_add(len)
        .is_none_or(|end| end > volume.disk.size())
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "range {offset}+{len} is beyond the disk's {} bytes",
                volume.disk.size()
            ),
        ));
    }
    Ok(())
}
