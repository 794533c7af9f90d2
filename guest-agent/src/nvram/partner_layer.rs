//! A dead node's unflushed writes to one export, read in place from its region while the
//! taker replays them onto the disk.
//!
//! A taker serves the export as soon as it has scanned the dead node's log (headers only):
//! reads go to the disk, then this layer, then the taker's own overlay, so each byte comes
//! from the newest acknowledged write. The dead node's records are older than anything the
//! taker logs for the export, so the taker's flusher is held back (see
//! [`super::Nvram::hold_flusher`]) until the replay has written and synced the layer's
//! records; only then is the layer dropped, under the volume's lock, so a reader sees
//! either the layer or a disk that holds everything it had.

use shm::{Extent, NodeRegion, RecordKind};

use super::overlay::Overlay;

/// The records of one export in a dead node's log, by byte range.
#[derive(Debug)]
pub struct PartnerLayer {
    /// Node id of the log's writer.
    pub node: u32,
    overlay: Overlay,
    log: NodeRegion,
}

impl PartnerLayer {
    /// An empty layer over node `node`'s region (mapped read-only, and left as it is until
    /// the layer is dropped).
    pub fn new(node: u32, log: NodeRegion) -> Self {
        Self {
            node,
            overlay: Overlay::new(),
            log,
        }
    }

    /// Adds a record (in log order).
    pub fn add(&mut self, extent: &Extent) {
        match extent.kind {
            RecordKind::Write => {
                self.overlay
                    .write(extent.offset, extent.len, extent.data_pos, extent.seq);
            }
            RecordKind::Trim | RecordKind::WriteZeroes => {
                self.overlay.zero(extent.offset, extent.len, extent.seq);
            }
            RecordKind::Wrap => {}
        }
    }

    /// Overwrites the parts of `buf` (the disk's bytes at `offset`) that the dead node's log
    /// changed; false if its region could not be read.
    #[must_use]
    pub fn apply(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.overlay.apply(offset, buf, &self.log)
    }
}
