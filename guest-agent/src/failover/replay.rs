//! Replaying a fenced partner's log onto the disks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use shm::{LogScanner, NodeRegion};

use crate::nvram::flusher::apply;
use crate::nvram::volume::Volume;

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Replayed {
    /// Seq of the first record to replay (just after the partner's flushed cursor).
    pub first_seq: u64,
    /// Seq of the last record replayed (`first_seq - 1` when there was none).
    pub last_seq: u64,
    pub records: u64,
    pub bytes: u64,
    /// Why the replay stopped before the head, if it did: a record that failed its checks
    /// (everything before it was replayed) or a record for a disk this node does not have.
    pub stopped: Option<String>,
}

/// Errors that leave a replay unusable.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read the partner's log cursors")]
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

/// Writes every record of `region` between its flushed cursor and its head to the disk of
/// the record's export (in `volumes`, by export id), in log order, then syncs those disks.
/// Records for an export in `served` are skipped: this node serves it already, after a
/// replay of this same log, and has written newer data since, which a second replay
/// would overwrite with older.
///
/// The region's writer must be fenced: nothing may append while this runs. The flushed
/// cursor is left alone (the region is the dead partner's, mapped read-only); replaying
/// the same records again onto disks nobody wrote since is harmless, since they are
/// applied in order.
pub fn replay(
    region: &NodeRegion,
    volumes: &BTreeMap<u32, Arc<Volume>>,
    served: &BTreeSet<u32>,
) -> Result<Replayed, ReplayError> {
    let (flushed, head) = region.log_cursors().map_err(ReplayError::Cursors)?;
    let mut replayed = Replayed {
        first_seq: flushed.seq + 1,
        last_seq: flushed.seq,
        ..Replayed::default()
    };
    let mut touched = BTreeMap::new();
    let scanner = LogScanner::new(region.mapping(), region.geometry(), flushed, head);
    for record in scanner {
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                replayed.stopped = Some(format!(
                    "stopped after seq {} of {}: {error}",
                    replayed.last_seq, head.seq
                ));
                break;
            }
        };
        if served.contains(&record.export) {
            replayed.last_seq = record.seq;
            continue;
        }
        let Some(volume) = volumes.get(&record.export) else {
            replayed.stopped = Some(format!(
                "record {} is for export {}, which has no disk here",
                record.seq, record.export
            ));
            break;
        };
        apply(volume, &record).map_err(|source| ReplayError::Apply {
            seq: record.seq,
            disk: volume.disk.path().display().to_string(),
            source,
        })?;
        touched.insert(volume.export_id, Arc::clone(volume));
        replayed.last_seq = record.seq;
        replayed.records += 1;
        replayed.bytes += record.data.len() as u64;
    }
    for volume in touched.values() {
        volume.disk.sync().map_err(|source| ReplayError::Sync {
            disk: volume.disk.path().display().to_string(),
            source,
        })?;
    }
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::volume::Disk;
    use shm::{Access, BackPressure, Entry, Mapping};

    fn disk(dir: &std::path::Path, name: &str) -> Disk {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        Disk::open(&path).unwrap()
    }

    #[test]
    fn replays_unflushed_records_in_order_onto_their_disks() {
        let dir = tempfile::tempdir().unwrap();
        let region_path = dir.path().join("a.region");
        let mapping = Mapping::create_file(&region_path, 1 << 20).unwrap();
        let region = NodeRegion::format(mapping, 0, "a").unwrap();
        let mut writer = region.writer(7).unwrap();
        let backpressure = BackPressure::default();
        for (export, offset, byte) in [(0, 0, 1u8), (1, 4096, 2), (0, 0, 3), (0, 8192, 4)] {
            writer
                .appender
                .append(
                    &Entry::Write {
                        export,
                        offset,
                        data: &[byte; 4096],
                    },
                    backpressure,
                )
                .unwrap();
        }
        writer
            .appender
            .append(
                &Entry::WriteZeroes {
                    export: 0,
                    offset: 8192,
                    len: 100,
                },
                backpressure,
            )
            .unwrap();
        let mut volumes = BTreeMap::new();
        volumes.insert(0, Volume::new(0, "a", disk(dir.path(), "a.img")));
        volumes.insert(1, Volume::new(1, "b", disk(dir.path(), "b.img")));

        let reader =
            NodeRegion::open(Mapping::open(&region_path, Access::ReadOnly).unwrap()).unwrap();
        // A second replay for another identity, while export 0 is served here with a newer
        // write: export 0 keeps it.
        let newer = vec![7u8; 4096];
        let replayed = replay(&reader, &volumes, &BTreeSet::new()).unwrap();
        volumes[&0].disk.write_at(0, &newer).unwrap();
        let again = replay(&reader, &volumes, &BTreeSet::from([0])).unwrap();
        assert_eq!(again.last_seq, 5, "the whole log was gone through");
        let mut buf = vec![0u8; 4096];
        volumes[&0].disk.read_at(0, &mut buf).unwrap();
        assert_eq!(
            buf, newer,
            "a served export must not get the older records again"
        );
        volumes[&0].disk.write_at(0, &[3u8; 4096]).unwrap();
        assert_eq!(replayed.records, 5);
        assert_eq!((replayed.first_seq, replayed.last_seq), (1, 5));
        assert_eq!(replayed.stopped, None);
        let read = |export: u32, offset: u64| {
            let mut buf = vec![0u8; 4096];
            volumes[&export].disk.read_at(offset, &mut buf).unwrap();
            buf
        };
        assert_eq!(read(0, 0), vec![3u8; 4096], "the later write wins");
        assert_eq!(read(1, 4096), vec![2u8; 4096]);
        let third = read(0, 8192);
        assert!(third[..100].iter().all(|b| *b == 0));
        assert!(third[100..].iter().all(|b| *b == 4));
    }

    #[test]
    fn a_record_for_an_unknown_disk_stops_the_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let mapping = Mapping::create_file(&dir.path().join("a.region"), 1 << 20).unwrap();
        let region = NodeRegion::format(mapping, 0, "a").unwrap();
        let mut writer = region.writer(7).unwrap();
        for export in [0, 5, 0] {
            writer
                .appender
                .append(
                    &Entry::Write {
                        export,
                        offset: 0,
                        data: &[9; 512],
                    },
                    BackPressure::default(),
                )
                .unwrap();
        }
        let mut volumes = BTreeMap::new();
        volumes.insert(0, Volume::new(0, "a", disk(dir.path(), "a.img")));
        let replayed = replay(&region, &volumes, &BTreeSet::new()).unwrap();
        assert_eq!(replayed.records, 1);
        assert!(
            replayed.stopped.as_deref().unwrap().contains("export 5"),
            "{replayed:?}"
        );
    }
}
