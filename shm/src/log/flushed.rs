//! The one writer of a log's flushed cursor: the flusher, after it synced records to disk.

use std::sync::Arc;

use super::{Cursor, Geometry, LogError};
use crate::layout::node_live;
use crate::mapping::Mapping;
use crate::published::PublishedWriter;

/// Advances the flushed cursor. There is one per region; it is not `Clone`.
#[derive(Debug)]
pub struct FlushedWriter {
    mapping: Arc<Mapping>,
    geometry: Geometry,
    flushed: Cursor,
    writer: PublishedWriter<2>,
}

impl FlushedWriter {
    pub(crate) fn resume(mapping: Arc<Mapping>, geometry: Geometry) -> Result<Self, LogError> {
        let flushed = node_live::FLUSHED
            .read(&mapping)
            .map(Cursor::from_words)
            .ok_or(LogError::CursorUnreadable { name: "flushed" })?;
        Ok(Self {
            writer: PublishedWriter::new(node_live::FLUSHED, &mapping),
            mapping,
            geometry,
            flushed,
        })
    }

    /// The flushed cursor as last published.
    pub fn flushed(&self) -> Cursor {
        self.flushed
    }

    /// Declares every record before `to` durable on disk, freeing its ring space.
    ///
    /// `to` must be the end of a record the caller read (see [`super::Record::end`]), at or
    /// after the current flushed cursor and not past the published head.
    pub fn advance(&mut self, to: Cursor) -> Result<(), LogError> {
        let head = node_live::HEAD
            .read(&self.mapping)
            .map(Cursor::from_words)
            .ok_or(LogError::CursorUnreadable { name: "head" })?;
        let refuse = |detail: String| {
            Err(LogError::BadFlushAdvance {
                from: self.flushed,
                to,
                detail,
            })
        };
        if to.seq < self.flushed.seq || to.pos < self.flushed.pos {
            return refuse("the flushed cursor only moves forward".into());
        }
        // Another writer of this region (which must not exist) may have moved it on.
        let published = node_live::FLUSHED
            .read(&self.mapping)
            .map(Cursor::from_words)
            .ok_or(LogError::CursorUnreadable { name: "flushed" })?;
        if to.seq < published.seq || to.pos < published.pos {
            return refuse(format!(
                "the region's flushed cursor is already at {published}: another flusher writes this region"
            ));
        }
        if to.seq > head.seq || to.pos > head.pos {
            return refuse(format!("it would pass the head ({head})"));
        }
        super::check_cursors(&self.geometry, to, head)?;
        if !self.writer.publish(&self.mapping, to.words()) {
            return Err(LogError::OutOfRegion);
        }
        self.flushed = to;
        Ok(())
    }
}
