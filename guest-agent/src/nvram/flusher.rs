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
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shm::log::FlushedWriter;
use shm::{Cursor, LogError, LogScanner, Record, RecordKind, SyncedWriter};

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
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The disk may have dropped the pages it failed to write: whatever was applied since
    /// the last good sync must be applied again from the log, not synced again.
    #[error("cannot sync {path}")]
    Sync {
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
        let result = apply_batch(nvram, &mut state).and_then(|batch| {
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
}

/// What [`apply_batch`] did.
#[derive(Debug, Clone, Copy)]
struct Batch {
    /// Records written to the disks.
    applied: usize,
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
    let scanner = LogScanner::new(region.mapping(), region.geometry(), state.applied, head);
    let mut applied = 0;
    let mut bytes = 0;
    // Records of a batch are nearly always for one export: look its volume up once.
    let mut volume: Option<Arc<Volume>> = None;
    for record in scanner {
        let record = record.map_err(FlushError::Log)?;
        if record.seq > indexed {
            break;
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
        apply(volume, &record).map_err(|source| FlushError::Apply {
            seq: record.seq,
            path: volume.disk.path().to_owned(),
            source,
        })?;
        state.touched.insert(record.export);
        state.applied = record.end();
        applied += 1;
        bytes += record.data.len() as u64;
        if applied >= BATCH_RECORDS || bytes >= BATCH_BYTES {
            return Ok(Batch {
                applied,
                reached_end: false,
            });
        }
    }
    Ok(Batch {
        applied,
        reached_end: true,
    })
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
