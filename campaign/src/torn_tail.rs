//! The torn-tail fault: a record written past a frozen node's published log head, as if its
//! agent died in the middle of an append.
//!
//! The record is a well-formed WRITE of a campaign block that no client ever invoked (a seq
//! no writer reaches), for a block of the node's own export. Either only part of it reached
//! the ring, or all of it did with a right crc but the head was never published. Neither was
//! acknowledged, so neither may be applied: if a replay did, the block would show a write
//! that was never invoked, and the checker reports it.
//!
//! Writing a node's region from outside is what the fault is; the node is SIGSTOPped while
//! it happens and SIGKILLed right after, so it never sees the bytes.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use shm::log::record::{RECORD_HEADER_LEN, RecordHeader};
use shm::{Access, Entry, Mapping, NodeRegion};

/// The seq a torn record's block carries: far beyond any writer's.
pub const TORN_SEQ: u64 = 1 << 40;

/// Errors leaving a torn tail.
#[derive(Debug, thiserror::Error)]
pub enum TornTailError {
    #[error("cannot map region {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: shm::MappingError,
    },
    #[error("{path} is not a node region")]
    Region {
        path: PathBuf,
        #[source]
        source: shm::NodeError,
    },
    #[error("cannot read the log cursors of {path}")]
    Cursors {
        path: PathBuf,
        #[source]
        source: shm::LogError,
    },
    #[error("cannot write region {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to write: the block (a campaign block of `writer`, aimed at `block` of export
/// `export`).
#[derive(Debug, Clone, Copy)]
pub struct TornWrite {
    pub run_id: u64,
    pub export: u32,
    pub writer: u32,
    pub block: u64,
}

/// Leaves a record for seq head+1 at the head of the log in the region at `path`; whole
/// (right crc, head not published) if `complete`, else cut off halfway through its data.
/// Returns a description.
pub fn leave(path: &Path, write: TornWrite, complete: bool) -> Result<String, TornTailError> {
    let mapping = Mapping::open(path, Access::ReadOnly).map_err(|source| TornTailError::Map {
        path: path.to_owned(),
        source,
    })?;
    let region = NodeRegion::open(mapping).map_err(|source| TornTailError::Region {
        path: path.to_owned(),
        source,
    })?;
    let geometry = region.geometry();
    let (flushed, head) = region
        .log_cursors()
        .map_err(|source| TornTailError::Cursors {
            path: path.to_owned(),
            source,
        })?;
    let data = crate::block::encode(write.run_id, write.writer, TORN_SEQ, write.block);
    let entry = Entry::Write {
        export: write.export,
        offset: write.block * crate::block::BLOCK_SIZE as u64,
        data: &data,
    };
    // Encoded as the log appender encodes it.
    let (fixed, fixed_len, rest) = entry.payload_parts();
    let prefix = &fixed[..fixed_len];
    let payload_len = entry.payload_len() as usize;
    let mut header = RecordHeader::new(entry.kind(), head.seq + 1, payload_len as u32, head.pos);
    header.crc = header.compute_crc_parts(&[prefix, rest]);
    let mut record = header.encode().to_vec();
    record.extend_from_slice(prefix);
    // Cut off halfway through the data unless complete.
    let written = if complete { rest.len() } else { rest.len() / 2 };
    record.extend_from_slice(&rest[..written]);
    // Only free ring space: never over records not yet flushed (a nearly full ring), and
    // never across the ring's end (a writer would have put a wrap marker first; the bytes
    // past the head are just as unpublished either way).
    let at = head.pos % geometry.ring_size;
    let free = geometry
        .ring_size
        .saturating_sub(head.pos.saturating_sub(flushed.pos));
    let room = (geometry.ring_size - at).min(free) as usize;
    record.truncate(room);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| TornTailError::Write {
            path: path.to_owned(),
            source,
        })?;
    file.write_all_at(&record, geometry.ring_offset + at)
        .map_err(|source| TornTailError::Write {
            path: path.to_owned(),
            source,
        })?;
    Ok(format!(
        "{} record seq {} ({} of {} bytes) left past head seq {} at log position {}",
        if complete && record.len() == RECORD_HEADER_LEN + payload_len {
            "a complete but unpublished"
        } else {
            "a half-written"
        },
        head.seq + 1,
        record.len(),
        RECORD_HEADER_LEN + payload_len,
        head.seq,
        head.pos
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_torn_record_is_past_the_head_and_inspect_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.region");
        let region =
            NodeRegion::format(Mapping::create_file(&path, 1 << 20).unwrap(), 0, "a").unwrap();
        let mut writer = region.writer(1).unwrap();
        for i in 0..3u64 {
            writer
                .appender
                .try_append(&shm::Entry::Write {
                    export: 0,
                    offset: i * 4096,
                    data: &[7; 4096],
                })
                .unwrap();
        }
        let write = TornWrite {
            run_id: 9,
            export: 0,
            writer: 0,
            block: 1,
        };
        for complete in [false, true] {
            let said = leave(&path, write, complete).unwrap();
            assert!(said.contains("seq 4"), "{said}");
            let report = shm::inspect::inspect_node(
                Mapping::open(&path, Access::ReadOnly).unwrap(),
                shm::InspectOptions::default(),
            );
            assert_eq!(report.head_seq, Some(3), "the head did not move");
            assert_eq!(report.problem, None, "{report:?}");
            assert_eq!(report.unpublished_tail.map(|t| t.seq), Some(4), "{said}");
        }
    }
}
