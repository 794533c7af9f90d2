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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shm::log::FlushedWriter;
use shm::{Cursor, LogScanner, Record, RecordKind, SyncedWriter};

use super::Nvram;
use super::syncer::Syncer;
use super::volume::Volume;

/// Most records applied between two syncs.
const BATCH_RECORDS: usize = 4096;
/// Most bytes applied between two syncs.
const BATCH_BYTES: u64 = 16 << 20;
/// How long the flusher sleeps when the log is empty and nobody wakes it.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// While writes keep coming, how long the flusher lets them gather between batches.
const TICK: Duration = Duration::from_millis(2);
/// How long it waits before retrying after a disk or log error.
const ERROR_WAIT: Duration = Duration::from_secs(1);
/// Longest time between syncs while records keep arriving.
const SYNC_INTERVAL: Duration = Duration::from_millis(20);
/// When the log goes quiet, sync this long after the last sync: a client writing one block
/// at a time would otherwise cost one sync per write.
const IDLE_SYNC_DELAY: Duration = Duration::from_millis(2);

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
    /// Declared after `thread`, so it stops after the flusher and its last sync covers
    /// every record the flusher released.
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
    let mut state = State {
        applied: flushed.flushed(),
        touched: BTreeSet::new(),
        last_sync: Instant::now(),
        synced,
    };
    while !stop.load(Ordering::Relaxed) {
        // A drain (a release of an identity) overrides the pause and the delay.
        let draining = nvram.draining(flushed.flushed());
        if config.paused && !draining {
            let _ = nvram.wakeups().recv_timeout(IDLE_WAIT);
            continue;
        }
        if !config.delay.is_zero() && !draining {
            std::thread::sleep(config.delay);
        }
        let result = apply_batch(nvram, &mut state).and_then(|applied| {
            let unsynced = state.applied != flushed.flushed();
            let lagging = state.applied.pos - flushed.flushed().pos
                >= nvram.region().geometry().ring_size / 4;
            let since = state.last_sync.elapsed();
            let due = state.synced.is_none()
                || draining
                || lagging
                || since >= SYNC_INTERVAL
                || (applied == 0 && since >= IDLE_SYNC_DELAY);
            if unsynced && due {
                release(nvram, &mut state, &mut flushed)?;
            }
            Ok(applied)
        });
        match result {
            Ok(0) if state.applied != flushed.flushed() => {
                // Wake when the idle sync falls due (or for a drain).
                let wait = IDLE_SYNC_DELAY.saturating_sub(state.last_sync.elapsed());
                let _ = nvram.wakeups().recv_timeout(wait);
            }
            Ok(0) => {
                // Nothing to do: the next write wakes us (see `Nvram::wake_flusher`).
                if nvram.flusher_sleeps(state.applied) {
                    let _ = nvram.wakeups().recv_timeout(IDLE_WAIT);
                }
            }
            Ok(applied) if applied < BATCH_RECORDS && !draining => {
                // Writes are trickling in: let them gather for a tick rather than take them
                // one wakeup each. A backlog past the threshold wakes us early.
                let _ = nvram.wakeups().recv_timeout(TICK);
            }
            Ok(_) => {}
            Err(error) => {
                log::error!("flusher: {error}; retrying in {} s", ERROR_WAIT.as_secs());
                // Keep what applied cleanly before the failure (so one bad record does not
                // hold back the rest of the log), else start again from what is on disk.
                let kept = state.applied != flushed.flushed()
                    && release(nvram, &mut state, &mut flushed).is_ok();
                if !kept {
                    state.applied = flushed.flushed();
                    state.touched.clear();
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
}

/// Writes the next batch of logged records to the disks (without syncing); returns how many.
fn apply_batch(nvram: &Nvram, state: &mut State) -> Result<usize, String> {
    let region = nvram.region();
    let head = region
        .head()
        .ok_or_else(|| "cannot read the log's head".to_owned())?;
    let scanner = LogScanner::new(region.mapping(), region.geometry(), state.applied, head);
    let mut count = 0;
    let mut bytes = 0;
    // Records of a batch are nearly always for one export: look its volume up once.
    let mut volume: Option<Arc<Volume>> = None;
    for record in scanner {
        let record = record.map_err(|e| format!("cannot read the log: {e}"))?;
        if volume.as_ref().is_none_or(|v| v.export_id != record.export) {
            volume = Some(nvram.volume(record.export).ok_or_else(|| {
                format!(
                    "log record {} is for export {}, which has no disk here",
                    record.seq, record.export
                )
            })?);
        }
        let Some(volume) = volume.as_deref() else {
            continue;
        };
        apply(volume, &record).map_err(|e| {
            format!(
                "cannot apply log record {} to {}: {e}",
                record.seq,
                volume.disk.path().display()
            )
        })?;
        state.touched.insert(record.export);
        state.applied = record.end();
        count += 1;
        bytes += record.data.len() as u64;
        if count >= BATCH_RECORDS || bytes >= BATCH_BYTES {
            break;
        }
    }
    Ok(count)
}

/// Releases every record applied so far: syncs the disks written since the last release
/// (with [`Release::Synced`]), then publishes `flushed` and prunes the overlays.
fn release(nvram: &Nvram, state: &mut State, flushed: &mut FlushedWriter) -> Result<(), String> {
    if let Some(synced) = &mut state.synced {
        for export in &state.touched {
            if let Some(volume) = nvram.volume(*export) {
                volume
                    .disk
                    .sync()
                    .map_err(|e| format!("cannot sync {}: {e}", volume.disk.path().display()))?;
            }
        }
        state.last_sync = Instant::now();
        synced.publish(state.applied.seq);
    }
    state.touched.clear();
    // Only now, with the data where the release mode wants it, may the overlays drop it
    // and then the ring space be reused. In that order: overlay segments point into the
    // log, so none may be left pointing at space the appender can reuse.
    for volume in nvram.volumes() {
        volume
            .overlay
            .write()
            .map_err(|_| format!("the overlay of {} is poisoned", volume.name))?
            .prune(state.applied.seq);
    }
    flushed.advance(state.applied).map_err(|e| e.to_string())?;
    Ok(())
}

pub(crate) fn apply(volume: &Volume, record: &Record) -> std::io::Result<()> {
    // The server checked the range before logging it; check again rather than let a bad
    // record grow an image file or fail deep in the block layer.
    if record
        .offset
        .checked_add(record.len)
        .is_none_or(|end| end > volume.disk.size())
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "range {}+{} is beyond the disk's {} bytes",
                record.offset,
                record.len,
                volume.disk.size()
            ),
        ));
    }
    match record.kind {
        RecordKind::Write => volume.disk.write_at(record.offset, &record.data),
        RecordKind::Trim | RecordKind::WriteZeroes => {
            volume.disk.zero_at(record.offset, record.len)
        }
        RecordKind::Wrap => Ok(()),
    }
}
