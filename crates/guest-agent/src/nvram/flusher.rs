//! The flusher: applies logged writes to the disks in log order, syncs, advances `flushed`.
//!
//! Group commit: records are applied (written to the disks' page cache) as soon as they are
//! logged, but the disks are synced, and `flushed` advanced, at most every
//! [`SYNC_INTERVAL`] while writes keep coming, or at once when the log goes idle or is a
//! quarter full. One sync then covers thousands of records instead of a few, which is what
//! keeps the flusher's CPU cost (mostly the kernel's writeback) below the client's rate.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shm::log::FlushedWriter;
use shm::{Cursor, LogScanner, Record, RecordKind};

use super::Nvram;
use super::volume::Volume;

/// Most records applied between two syncs.
const BATCH_RECORDS: usize = 4096;
/// Most bytes applied between two syncs.
const BATCH_BYTES: u64 = 16 << 20;
/// How long the flusher sleeps when the log is empty and nobody wakes it.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// How long it waits before retrying after a disk or log error.
const ERROR_WAIT: Duration = Duration::from_secs(1);
/// Longest time between syncs while records keep arriving.
const SYNC_INTERVAL: Duration = Duration::from_millis(20);
/// When the log goes quiet, sync this long after the last sync: a client writing one block
/// at a time would otherwise cost one sync per write.
const IDLE_SYNC_DELAY: Duration = Duration::from_millis(2);

/// How the flusher runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlusherConfig {
    /// Wait this long before each batch (a knob for demos and tests: unflushed records
    /// stay visible in `hostd inspect` for a while).
    pub delay: Duration,
    /// Never flush (for tests and demos of replay; writes block once the log is full).
    pub paused: bool,
}

/// A running flusher; stops (after its current batch) when dropped.
#[derive(Debug)]
pub struct Flusher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    pub fn spawn(
        nvram: Arc<Nvram>,
        flushed: FlushedWriter,
        config: FlusherConfig,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || run(&nvram, flushed, config, &stopping))?;
        Ok(Self {
            stop,
            thread: Some(thread),
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

fn run(nvram: &Nvram, mut flushed: FlushedWriter, config: FlusherConfig, stop: &AtomicBool) {
    if config.paused {
        log::warn!("flusher paused by configuration: writes stay in the log until it fills");
    }
    let mut state = State {
        applied: flushed.flushed(),
        touched: BTreeSet::new(),
        last_sync: Instant::now(),
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
            let due = draining
                || lagging
                || since >= SYNC_INTERVAL
                || (applied == 0 && since >= IDLE_SYNC_DELAY);
            if unsynced && due {
                sync(nvram, &mut state, &mut flushed)?;
            }
            Ok(applied)
        });
        match result {
            Ok(0) => {
                // Wake for new records, or when an idle sync falls due.
                let wait = if state.applied != flushed.flushed() {
                    IDLE_SYNC_DELAY.saturating_sub(state.last_sync.elapsed())
                } else {
                    IDLE_WAIT
                };
                let _ = nvram.wakeups().recv_timeout(wait);
            }
            Ok(_) => {}
            Err(error) => {
                log::error!("flusher: {error}; retrying in {} s", ERROR_WAIT.as_secs());
                // Keep what applied cleanly before the failure (so one bad record does not
                // hold back the rest of the log), else start again from what is on disk.
                let kept = state.applied != flushed.flushed()
                    && sync(nvram, &mut state, &mut flushed).is_ok();
                if !kept {
                    state.applied = flushed.flushed();
                    state.touched.clear();
                }
                std::thread::sleep(ERROR_WAIT);
            }
        }
    }
}

/// What the flusher has done since its last sync.
struct State {
    /// Just past the last record written to a disk (possibly not synced yet).
    applied: Cursor,
    /// Exports written since the last sync.
    touched: BTreeSet<u32>,
    last_sync: Instant,
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

/// Syncs the disks written since the last sync, then publishes `flushed` and prunes.
fn sync(nvram: &Nvram, state: &mut State, flushed: &mut FlushedWriter) -> Result<(), String> {
    for export in &state.touched {
        if let Some(volume) = nvram.volume(*export) {
            volume
                .disk
                .sync()
                .map_err(|e| format!("cannot sync {}: {e}", volume.disk.path().display()))?;
        }
    }
    state.touched.clear();
    state.last_sync = Instant::now();
    // Only now, with the data synced, may the ring space be reused and the overlays drop it.
    flushed.advance(state.applied).map_err(|e| e.to_string())?;
    for volume in nvram.volumes() {
        if let Ok(mut overlay) = volume.overlay.write() {
            overlay.prune(state.applied.seq);
        }
    }
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
