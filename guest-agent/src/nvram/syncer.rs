//! The syncer: where records leave the log once written (not synced), syncs the disks to
//! their media every interval and publishes how far the log is on the media (`synced`).
//!
//! Records leave the log once they are in the disk's page cache, which survives what the
//! region survives; only a host crash loses both. The syncer bounds what such a crash
//! loses to about one interval (plus the sync's own time). It runs beside the flusher, not
//! in it: a sync of a second's random writes can take longer than a second on a slow disk,
//! and the flusher must go on freeing ring space meanwhile.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use shm::{LogError, SyncedWriter};

use super::Nvram;

/// Why a sync did not happen.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("cannot read the flushed cursor")]
    Cursor(#[source] LogError),
    /// The disk may have dropped the pages it failed to write.
    #[error("cannot sync {}", path.display())]
    Sync {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running syncer; syncs once more, then stops, when dropped.
#[derive(Debug)]
pub struct Syncer {
    /// Dropping it wakes the thread for its last sync.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    pub fn spawn(
        nvram: Arc<Nvram>,
        synced: SyncedWriter,
        interval: Duration,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let thread = std::thread::Builder::new()
            .name("syncer".into())
            .spawn(move || run(&nvram, synced, interval, &stopped))?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(nvram: &Nvram, mut synced: SyncedWriter, interval: Duration, stopped: &Receiver<()>) {
    let mut covered = nvram.region().synced().map_or(0, |s| s.seq);
    // After a failed sync the kernel may have dropped the pages it could not write, and
    // the next sync reports success without them: from then on `synced` would claim what
    // the media may not hold. So it stays where it was, for the life of this agent.
    let mut failed = false;
    loop {
        let last = matches!(
            stopped.recv_timeout(interval),
            Err(RecvTimeoutError::Disconnected)
        );
        if !failed {
            match sync_once(nvram, &mut synced, covered) {
                Ok(seq) => covered = seq,
                Err(error @ SyncError::Cursor(_)) => {
                    log::warn!(
                        "syncer: {}; trying again in {} ms",
                        wire::error_chain::one_line(&error),
                        interval.as_millis()
                    );
                }
                Err(error) => {
                    // Said once; `hostd inspect` shows `synced` growing old from here on.
                    log::error!(
                        "syncer: {}; `synced` stays at seq {covered} for the life of this \
                         agent, and a host crash may lose what was written since",
                        wire::error_chain::one_line(&error)
                    );
                    failed = true;
                }
            }
        }
        if last {
            return;
        }
    }
}

/// Syncs every disk if records were released since `covered`; returns the seq now covered.
fn sync_once(nvram: &Nvram, synced: &mut SyncedWriter, covered: u64) -> Result<u64, SyncError> {
    // Read before syncing: everything released up to here is in the page cache already.
    let flushed =
        nvram
            .region()
            .flushed()
            .ok_or(SyncError::Cursor(LogError::CursorUnreadable {
                name: "flushed",
            }))?;
    if flushed.seq <= covered {
        return Ok(covered);
    }
    for volume in nvram.volumes() {
        volume.disk.sync().map_err(|source| SyncError::Sync {
            path: volume.disk.path().to_owned(),
            source,
        })?;
    }
    synced.publish(flushed.seq);
    Ok(flushed.seq)
}
