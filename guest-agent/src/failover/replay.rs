//! Taking over a dead node's log: scan it (headers only) into a layer the taker serves at
//! once, then replay it onto the disk in the background and drop the layer.
//!
//! The taker's own records for the export are newer than the dead node's, so its flusher
//! is held back (a [`FlushHold`]) until the replay has written and synced them. Where the
//! replay of each dead node's log stands is published in the taker's region
//! ([`ReplayBook`]): the dead node, once restarted, may forget its log only when a replay
//! of it has finished; until then the layer reads from it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shm::{NodeRegion, Replay, ReplayStatus, ReplayWriter};

use crate::nvram::FlushHold;
use crate::nvram::flusher::apply;
use crate::nvram::partner_layer::PartnerLayer;
use crate::nvram::volume::Volume;

/// How long a replay that failed on the disk waits before it tries again (the layer goes on
/// serving the records meanwhile).
const RETRY_WAIT: Duration = Duration::from_secs(1);
/// The replay thread's nice value: clients are served from the layer meanwhile, and a
/// guest of one vCPU would otherwise split it between them and the replay's crc checks.
const REPLAY_NICE: i32 = 10;

/// What a scan of a dead node's log found for one export.
#[derive(Debug)]
pub struct Scanned {
    pub layer: PartnerLayer,
    /// Seq of the first record after the dead node's flushed cursor.
    pub first_seq: u64,
    /// Seq of the last good record (`first_seq - 1` when there was none): the replay goes
    /// no further.
    pub last_seq: u64,
    /// The export's records among them, and the bytes they change.
    pub records: u64,
    pub bytes: u64,
    /// Why the scan stopped before the head, if it did: a record that failed its checks
    /// (the layer holds everything before it).
    pub stopped: Option<String>,
}

/// What a replay wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Replayed {
    /// Seq of the last record gone through.
    pub last_seq: u64,
    /// The export's records written, and their bytes.
    pub records: u64,
    pub bytes: u64,
    /// Why the replay stopped before the scan's end, if it did: a record whose data failed
    /// its crc (everything before it is on the disk).
    pub stopped: Option<String>,
}

/// Errors that leave a scan or a replay unusable.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read the dead node's log cursors")]
    Cursors(#[source] shm::LogError),
    #[error("cannot write log record {seq} to {disk}")]
    Apply {
        seq: u64,
        disk: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot sync {disk}")]
    Sync {
        disk: String,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the headers of `region`'s records between its flushed cursor and its head and
/// puts those for `export` (a disk of `disk_size` bytes) into a layer over the region. The
/// region's writer must be fenced: nothing may append while the layer exists.
pub fn scan(region: &NodeRegion, export: u32, disk_size: u64) -> Result<Scanned, ReplayError> {
    let (flushed, head) = region.log_cursors().map_err(ReplayError::Cursors)?;
    let mut scanned = Scanned {
        layer: PartnerLayer::new(region.header().node_id, region.clone()),
        first_seq: flushed.seq + 1,
        last_seq: flushed.seq,
        records: 0,
        bytes: 0,
        stopped: None,
    };
    let scanner = shm::LogScanner::new(region.mapping(), region.geometry(), flushed, head);
    for extent in scanner.extents() {
        let extent = match extent {
            Ok(extent) => extent,
            Err(error) => {
                scanned.stopped = Some(format!(
                    "stopped after seq {} of {}: {error}",
                    scanned.last_seq, head.seq
                ));
                break;
            }
        };
        if extent.export == export {
            // No crc has vouched for the range yet: a corrupt one ends the scan, as a bad
            // record does (the replay would refuse to apply it).
            if extent
                .offset
                .checked_add(extent.len)
                .is_none_or(|end| end > disk_size)
            {
                scanned.stopped = Some(format!(
                    "stopped after seq {}: record {} covers {}+{}, beyond the disk's {disk_size} bytes",
                    scanned.last_seq, extent.seq, extent.offset, extent.len
                ));
                break;
            }
            scanned.layer.add(&extent);
            scanned.records += 1;
            scanned.bytes += extent.len;
        }
        scanned.last_seq = extent.seq;
    }
    Ok(scanned)
}

/// The disks a replay writes, by export id: those of the identities taken over from the
/// dead node. Its records for any other export are left alone: another node replays them
/// for the identities it took, or, released before the death, they were flushed already.
#[derive(Debug, Clone, Default)]
pub struct Disks {
    pub volumes: BTreeMap<u32, Arc<Volume>>,
}

impl Disks {
    pub fn of(volumes: &[Arc<Volume>]) -> Self {
        Self {
            volumes: volumes
                .iter()
                .map(|v| (v.export_id, Arc::clone(v)))
                .collect(),
        }
    }
}

/// Writes `region`'s records for the exports in `disks` from its flushed cursor up to seq
/// `last_seq` to their disks, in log order, checking each record's crc, then syncs the
/// disks written. Replaying the same records again onto disks nobody wrote since is
/// harmless.
pub fn replay(region: &NodeRegion, disks: &Disks, last_seq: u64) -> Result<Replayed, ReplayError> {
    let (flushed, head) = region.log_cursors().map_err(ReplayError::Cursors)?;
    let mut replayed = Replayed {
        last_seq: flushed.seq,
        ..Replayed::default()
    };
    let mut touched = BTreeMap::new();
    let scanner = shm::LogScanner::new(region.mapping(), region.geometry(), flushed, head);
    for record in scanner {
        let record = match record {
            Ok(record) if record.seq > last_seq => break,
            Ok(record) => record,
            Err(error) => {
                replayed.stopped = Some(format!(
                    "stopped after seq {} of {last_seq}: {error}",
                    replayed.last_seq
                ));
                break;
            }
        };
        if let Some(volume) = disks.volumes.get(&record.export) {
            match apply(volume, &record) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::InvalidInput => {
                    // A range beyond the disk: no retry makes it fit.
                    replayed.stopped = Some(format!(
                        "stopped after seq {}: record {}: {error}",
                        replayed.last_seq, record.seq
                    ));
                    break;
                }
                Err(source) => {
                    return Err(ReplayError::Apply {
                        seq: record.seq,
                        disk: volume.disk.path().display().to_string(),
                        source,
                    });
                }
            }
            touched.insert(record.export, Arc::clone(volume));
            replayed.records += 1;
            replayed.bytes += record.data.len() as u64;
        }
        replayed.last_seq = record.seq;
    }
    for volume in touched.values() {
        volume.disk.sync().map_err(|source| ReplayError::Sync {
            disk: volume.disk.path().display().to_string(),
            source,
        })?;
    }
    Ok(replayed)
}

/// Where this node's replays of other nodes' logs stand, published in its region, and the
/// layers each replay keeps in place until it has finished.
///
/// One replay runs per dead node's log, whatever number of identities are taken over from
/// it: two replays of the same log side by side could write the same older records over
/// each other's newer ones, and a layer dropped by one could uncover a disk the other still
/// rewrites. An identity taken over from a log whose replay runs already joins it: the
/// replay makes another pass for the identities that joined during the last one, and ends
/// (drops every layer, publishes `Replayed`) only after a pass nobody joined.
#[derive(Debug, Clone)]
pub struct ReplayBook {
    inner: Arc<Mutex<Book>>,
}

#[derive(Debug)]
struct Book {
    writer: ReplayWriter,
    /// By the dead node's id.
    logs: BTreeMap<u32, LogReplay>,
}

/// The replay of one dead node's log.
#[derive(Debug, Default)]
struct LogReplay {
    running: bool,
    epoch: u64,
    first_seq: u64,
    last_seq: u64,
    /// The volumes serving a layer of this log, dropped when the replay ends.
    layers: Vec<Arc<Volume>>,
    /// The volumes no pass of the replay has written yet.
    uncovered: Vec<Arc<Volume>>,
    /// A pass stopped at a bad record.
    stopped: bool,
    /// Holds on this node's flusher, released when the replay ends.
    holds: Vec<FlushHold>,
}

impl ReplayBook {
    pub fn new(writer: ReplayWriter) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Book {
                writer,
                logs: BTreeMap::new(),
            })),
        }
    }

    /// Serves `scanned`'s layer on `volume` (taken over at `epoch`) until the replay of
    /// its log has finished, holding this node's flusher with `hold` until then. Returns
    /// whether a replay must be started: false when one of this log runs already, which
    /// writes the volume's records too (the volume was not served when it started).
    /// Published before the taker acknowledges, so the dead node keeps its log from then on.
    pub fn serve_layer(
        &self,
        scanned: Scanned,
        volume: &Arc<Volume>,
        epoch: u64,
        hold: FlushHold,
    ) -> bool {
        let mut book = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let node = scanned.layer.node;
        let log = book.logs.entry(node).or_default();
        let start = !log.running;
        if start {
            *log = LogReplay {
                running: true,
                first_seq: scanned.first_seq,
                ..LogReplay::default()
            };
        }
        log.epoch = log.epoch.max(epoch);
        log.first_seq = log.first_seq.min(scanned.first_seq);
        log.last_seq = log.last_seq.max(scanned.last_seq);
        volume.set_partner_layer(scanned.layer);
        log.layers.push(Arc::clone(volume));
        log.uncovered.push(Arc::clone(volume));
        log.holds.push(hold);
        let replay = Replay {
            epoch: log.epoch,
            status: ReplayStatus::Replaying,
            first_seq: log.first_seq,
            last_seq: log.last_seq,
        };
        book.writer.publish(node, replay);
        start
    }

    /// The volumes the replay of node `node`'s log writes in its next pass; `None` once
    /// every volume was covered, after which the replay has ended: its layers are dropped,
    /// the region says so, and the flusher may go on, in that order: the dead node may reuse
    /// its log only once no layer reads it, and a release (which waits for the flusher) is
    /// acknowledged only after the region says so.
    fn next_pass(&self, node: u32, stopped: bool) -> Option<Vec<Arc<Volume>>> {
        let mut book = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let log = book.logs.get_mut(&node)?;
        log.stopped |= stopped;
        if !log.uncovered.is_empty() {
            return Some(std::mem::take(&mut log.uncovered));
        }
        for volume in log.layers.drain(..) {
            volume.drop_partner_layer();
        }
        log.running = false;
        let replay = Replay {
            epoch: log.epoch,
            status: if log.stopped {
                ReplayStatus::Stopped
            } else {
                ReplayStatus::Replayed
            },
            first_seq: log.first_seq,
            last_seq: log.last_seq,
        };
        log.stopped = false;
        let holds = std::mem::take(&mut log.holds);
        book.writer.publish(node, replay);
        drop(holds);
        None
    }

    /// Publishes `mark` for node `node`'s log, replayed here (in a replay done before
    /// serving, or one with nothing left to serve), unless a replay of it runs.
    pub fn record_replayed(&self, node: u32, mark: Replay) {
        let mut book = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if book.logs.get(&node).is_some_and(|log| log.running) {
            return;
        }
        book.writer.publish(node, mark);
    }

    /// The last seq any layer of node `node`'s log reaches.
    fn last_seq(&self, node: u32) -> Option<u64> {
        let book = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        book.logs.get(&node).map(|log| log.last_seq)
    }
}

/// The replay of a dead node's log, to run in the background while its layers serve it.
#[derive(Debug, Clone)]
pub struct ReplayJob {
    pub region: NodeRegion,
    /// Where the replay stands, and how far its layers reach.
    pub book: ReplayBook,
}

impl ReplayJob {
    /// Runs the replay on its own thread, or on this one if no thread can be started (the
    /// layers and holds must not outlive it). A disk error is retried (the layers serve the
    /// records meanwhile); a bad record ends it where it is, as the scan would have.
    pub fn start(self) {
        let name = format!("replay-{}", self.region.header().name);
        let job = self.clone();
        if let Err(error) = std::thread::Builder::new()
            .name(name)
            .spawn(move || job.run())
        {
            log::error!("cannot start a replay thread ({error}): replaying before serving");
            self.run();
        }
    }

    fn run(self) {
        let node = self.region.header().node_id;
        let dead = self.region.header().name.clone();
        // Linux keeps a nice value per thread: this one only.
        if let Err(error) = rustix::process::setpriority_process(None, REPLAY_NICE) {
            log::warn!("cannot lower the replay thread's priority: {error}");
        }
        let started = std::time::Instant::now();
        let (mut records, mut bytes, mut stopped) = (0, 0, false);
        while let Some(volumes) = self.book.next_pass(node, stopped) {
            let disks = Disks::of(&volumes);
            let last_seq = self.book.last_seq(node).unwrap_or_default();
            let replayed = loop {
                match replay(&self.region, &disks, last_seq) {
                    Ok(replayed) => break replayed,
                    Err(error) => {
                        log::error!(
                            "replay of {dead}'s log: {}; retrying in {RETRY_WAIT:?} (reads are served from {dead}'s region meanwhile)",
                            wire::error_chain::one_line(&error)
                        );
                        std::thread::sleep(RETRY_WAIT);
                    }
                }
            };
            if let Some(why) = &replayed.stopped {
                log::error!("replay of {dead}'s log incomplete: {why}");
            }
            stopped = replayed.stopped.is_some();
            records += replayed.records;
            bytes += replayed.bytes;
        }
        log::info!(
            "replayed {records} records ({bytes} bytes) of {dead}'s log in {:?}{}",
            started.elapsed(),
            if stopped {
                ", stopping at a bad record"
            } else {
                ""
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    use proptest::prelude::*;
    use shm::{Access, BackPressure, Entry, Mapping, ReplayStatus};

    use super::*;
    use crate::agent::resume_replays;
    use crate::export::Export;
    use crate::failover::Identity;
    use crate::nvram::flusher::{Flusher, FlusherConfig, Release};
    use crate::nvram::volume::Disk;
    use crate::nvram::{Nvram, NvramExport};

    const DISK_SIZE: usize = 16 << 10;
    const DEAD: u32 = 0;

    /// One change to the export: `(offset, len, byte)`, zeroes when `byte` is `None`.
    type Change = (u64, u64, Option<u8>);

    fn apply_to_model(model: &mut [u8], (offset, len, byte): Change) {
        model[offset as usize..(offset + len) as usize].fill(byte.unwrap_or(0));
    }

    /// The dead node's region: `changes` logged by node 0 for export 0, the first
    /// `flushed` of them also on the disk and released, as its flusher would have left them.
    fn dead_node(dir: &Path, disk: &Path, changes: &[Change], flushed: usize) -> NodeRegion {
        let path = dir.join("a.region");
        let region =
            NodeRegion::format(Mapping::create_file(&path, 1 << 20).unwrap(), DEAD, "a").unwrap();
        let mut writer = region.writer(1).unwrap();
        let mut on_disk = std::fs::read(disk).unwrap();
        for (i, &(offset, len, byte)) in changes.iter().enumerate() {
            let data = vec![byte.unwrap_or(0); len as usize];
            let entry = match byte {
                Some(_) => Entry::Write {
                    export: 0,
                    offset,
                    data: &data,
                },
                None => Entry::WriteZeroes {
                    export: 0,
                    offset,
                    len,
                },
            };
            let appended = writer
                .appender
                .append(&entry, BackPressure::default())
                .unwrap();
            if i < flushed {
                apply_to_model(&mut on_disk, (offset, len, byte));
                writer.flushed.advance(appended.head).unwrap();
            }
        }
        std::fs::write(disk, on_disk).unwrap();
        NodeRegion::open(Mapping::open(&path, Access::ReadOnly).unwrap()).unwrap()
    }

    /// The node that took export 0 over: its own region, the export, a flusher.
    struct Survivor {
        region: NodeRegion,
        export: Arc<NvramExport>,
        _flusher: Flusher,
    }

    impl Survivor {
        /// Starts (or restarts, after a crash) node 1 over its region, with the dead node's
        /// disk as export 0. A restart resumes an unfinished replay as the agent does.
        fn start(path: &Path, disk: &Path, dead: &NodeRegion) -> (Self, Option<ReplayJob>) {
            let fresh = !path.exists();
            let mapping = if fresh {
                Mapping::create_file(path, 1 << 20).unwrap()
            } else {
                Mapping::open(path, Access::ReadWrite).unwrap()
            };
            let region = if fresh {
                NodeRegion::format(mapping, 1, "b").unwrap()
            } else {
                NodeRegion::open(mapping).unwrap()
            };
            let writer = region.writer(2).unwrap();
            let nvram = Nvram::new(region.clone(), writer.appender, BackPressure::default());
            let export = nvram.add_volume(Volume::new(0, "a", Disk::open(disk).unwrap()));
            nvram.recover().unwrap();
            let book = ReplayBook::new(writer.replays);
            let mut job = None;
            if fresh {
                // A takeover, as the failover monitor serves it.
                let head = region.head().unwrap().seq;
                let hold = nvram.hold_flusher(head);
                let scanned = scan(dead, 0, DISK_SIZE as u64).unwrap();
                assert!(book.serve_layer(scanned, export.volume(), 1, hold));
                job = Some(ReplayJob {
                    region: dead.clone(),
                    book: book.clone(),
                });
            } else {
                let identities = [(0, Identity::new(Arc::clone(&export)))].into();
                resume_replays(
                    &nvram,
                    dead,
                    &identities,
                    &book,
                    writer.flushed.flushed().seq,
                )
                .unwrap();
            }
            let flusher = Flusher::spawn(
                Arc::clone(&nvram),
                writer.flushed,
                writer.synced,
                FlusherConfig {
                    release: Release::Written,
                    sync_interval: Duration::from_millis(5),
                    ..FlusherConfig::default()
                },
            )
            .unwrap();
            let survivor = Self {
                region,
                export,
                _flusher: flusher,
            };
            (survivor, job)
        }

        fn read_all(&self) -> Vec<u8> {
            let mut buf = vec![0u8; DISK_SIZE];
            self.export.read(0, &mut buf).unwrap();
            buf
        }

        fn replay_finished(&self) -> bool {
            self.region
                .replay_of(DEAD)
                .is_some_and(|r| r.status.finished())
        }

        fn wait(&self, what: &str, done: impl Fn(&Self) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done(self) {
                assert!(Instant::now() < deadline, "{what} did not happen");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// The first offset at which `read` differs from `model`, and both bytes there.
    fn first_difference(read: &[u8], model: &[u8]) -> Option<(usize, u8, u8)> {
        read.iter()
            .zip(model)
            .position(|(r, m)| r != m)
            .map(|i| (i, read[i], model[i]))
    }

    /// What happens after the takeover, in order.
    #[derive(Debug, Clone)]
    enum Step {
        /// A client writes through the survivor.
        Write(Change),
        /// The replay writes this many more of the dead node's records to the disk (what a
        /// replay in progress leaves behind when the survivor crashes).
        ReplaySome(usize),
        /// The replay runs to its end in the background.
        StartReplay,
        /// The survivor's agent dies and starts again on its region.
        Crash,
    }

    fn change() -> impl Strategy<Value = Change> {
        (
            0..DISK_SIZE as u64 - 1,
            1u64..3000,
            proptest::option::weighted(0.8, 1u8..=255),
        )
            .prop_map(|(offset, len, byte)| (offset, len.min(DISK_SIZE as u64 - offset), byte))
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => change().prop_map(Step::Write),
            2 => (1usize..8).prop_map(Step::ReplaySome),
            1 => Just(Step::StartReplay),
            1 => Just(Step::Crash),
        ]
    }

    /// Applies the dead node's records after its flushed cursor, from the `done`-th on,
    /// `count` of them, to the disk directly; returns how many it applied.
    fn replay_some(dead: &NodeRegion, volume: &Volume, done: usize, count: usize) -> usize {
        let mut applied = 0;
        for record in dead.unflushed().unwrap().skip(done).take(count) {
            apply(volume, &record.unwrap()).unwrap();
            applied += 1;
        }
        applied
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A read never returns data older than an acknowledged write: at every step after
        /// a takeover (the dead node's records served from its region, the survivor's own
        /// writes above them, the replay anywhere between not started and done, the
        /// survivor crashing and its successor replaying both logs), reads through the
        /// survivor equal a flat byte array that took every write in order; at the end
        /// the disk alone holds it all.
        #[test]
        fn serving_before_the_replay_matches_a_flat_model(
            dead_changes in proptest::collection::vec(change(), 0..24),
            flushed_fraction in 0.0f64..1.0,
            steps in proptest::collection::vec(step(), 0..30),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let disk: PathBuf = dir.path().join("a.img");
            let initial: Vec<u8> = (0..DISK_SIZE).map(|i| (i % 251) as u8).collect();
            std::fs::write(&disk, &initial).unwrap();
            let mut model = initial;
            for &c in &dead_changes {
                apply_to_model(&mut model, c);
            }
            let flushed = (dead_changes.len() as f64 * flushed_fraction) as usize;
            let dead = dead_node(dir.path(), &disk, &dead_changes, flushed);
            let survivor_path = dir.path().join("b.region");

            let (mut survivor, mut job) = Survivor::start(&survivor_path, &disk, &dead);
            let mut replayed_by_hand = 0;
            prop_assert_eq!(first_difference(&survivor.read_all(), &model), None, "right after the takeover");
            for step in steps {
                match step {
                    Step::Write((offset, len, byte)) => {
                        match byte {
                            Some(b) => survivor.export.write(offset, &vec![b; len as usize], false),
                            None => survivor.export.write_zeroes(offset, len, false, false),
                        }.unwrap();
                        apply_to_model(&mut model, (offset, len, byte));
                    }
                    Step::ReplaySome(count) => {
                        if job.is_some() {
                            replayed_by_hand +=
                                replay_some(&dead, survivor.export.volume(), replayed_by_hand, count);
                        }
                    }
                    Step::StartReplay => {
                        if let Some(job) = job.take() {
                            job.start();
                        }
                    }
                    Step::Crash => {
                        if job.is_none() && !survivor.replay_finished() {
                            // A running replay cannot be stopped halfway here: the crash
                            // comes once it is done (the cases with `job` unstarted cover
                            // a crash halfway).
                            survivor.wait("the replay", Survivor::replay_finished);
                        }
                        // The agent dies: its flusher stops, then the unstarted job goes (in
                        // that order, or the flusher would run once the job's hold is gone).
                        drop(survivor);
                        drop(job.take());
                        (survivor, job) = Survivor::start(&survivor_path, &disk, &dead);
                        replayed_by_hand = 0;
                    }
                }
                prop_assert_eq!(first_difference(&survivor.read_all(), &model), None);
            }
            if let Some(job) = job.take() {
                job.start();
            }
            survivor.wait("the replay", Survivor::replay_finished);
            prop_assert_eq!(
                survivor.region.replay_of(DEAD).unwrap().status,
                ReplayStatus::Replayed
            );
            survivor.wait("the flush", |s| s.region.flushed() == s.region.head());
            prop_assert_eq!(first_difference(&survivor.read_all(), &model), None);
            drop(survivor);
            prop_assert_eq!(
                first_difference(&std::fs::read(&disk).unwrap(), &model),
                None,
                "the disk alone"
            );
        }
    }
}
