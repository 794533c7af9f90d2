//! The mailbox: a link of the interconnect through the node regions themselves.
//!
//! Each agent posts frames for its peers in its own region; a peer reads them through its
//! read-only mapping. Messages are numbered from 1 for the region's life (a restarted agent
//! goes on from the published head); message `n` goes in slot `n % slots`, which holds
//! `(n, to | len << 32)` and the frame.
//!
//! The writer never waits for readers: a reader that falls more than a ring behind loses the
//! oldest messages, and counts them. To post `n` the writer stores 0 in the slot's number,
//! writes the frame and its header, release-stores `n` there and then in the head. A reader
//! copies a message only if the slot's number is `n` before and after the copy (the
//! seqlock of [`crate::published`], with the message number as generation), so a message
//! overwritten while being read is counted as lost, never returned torn. No
//! read-modify-write instruction is used (see [`crate`]).

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use super::InterconnectGeometry;
use crate::layout::node_header;
use crate::layout::node_interconnect::SLOT_HEADER_LEN;
use crate::mapping::Mapping;
use crate::node::NodeRegion;

/// The `to` of a message for every peer.
pub const BROADCAST: u16 = u16::MAX;

/// Why a frame was not posted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    #[error("a frame of {len} bytes does not fit in a mailbox slot (at most {max} bytes)")]
    TooLong { len: usize, max: usize },
    #[error("the mailbox lies outside its region (a bug or a corrupt header)")]
    OutOfRegion,
    #[error("the mailbox has used up its message numbers")]
    Exhausted,
}

/// The agent's handle on its mailbox.
#[derive(Debug)]
pub struct MailboxWriter {
    mapping: Arc<Mapping>,
    geometry: InterconnectGeometry,
    /// Number of the last message posted (the published head).
    last: u64,
}

impl MailboxWriter {
    /// Takes over the mailbox, numbering on from its published head.
    pub(crate) fn resume(mapping: Arc<Mapping>, geometry: InterconnectGeometry) -> Self {
        let last = mapping.load(geometry.mailbox_head());
        Self {
            mapping,
            geometry,
            last,
        }
    }

    /// The largest frame [`post`](Self::post) takes.
    pub fn max_frame(&self) -> usize {
        self.geometry.max_frame()
    }

    /// Slots in the ring: how many frames a reader that falls behind can still find.
    pub fn slots(&self) -> u32 {
        self.geometry.mailbox_slots
    }

    /// Number of the last message posted (0: none yet).
    pub fn head(&self) -> u64 {
        self.last
    }

    /// Posts `frame` for node `to` (or [`BROADCAST`]) and returns its message number.
    pub fn post(&mut self, to: u16, frame: &[u8]) -> Result<u64, MailboxError> {
        let max = self.max_frame();
        if frame.len() > max {
            return Err(MailboxError::TooLong {
                len: frame.len(),
                max,
            });
        }
        let n = self.last.checked_add(1).ok_or(MailboxError::Exhausted)?;
        let slot = self.geometry.slot(n);
        let m = &self.mapping;
        let (Some(number), Some(meta), Some(head)) = (
            m.word(slot),
            m.word(slot + 8),
            m.word(self.geometry.mailbox_head()),
        ) else {
            return Err(MailboxError::OutOfRegion);
        };
        number.store(0, Ordering::Relaxed);
        // Orders the 0 before the frame's bytes: a reader that sees any of them sees the
        // slot's number change (seqlock writer).
        fence(Ordering::Release);
        if !m.write_bytes(slot + SLOT_HEADER_LEN, frame) {
            return Err(MailboxError::OutOfRegion);
        }
        meta.store(
            u64::from(to) | (frame.len() as u64) << 32,
            Ordering::Relaxed,
        );
        number.store(n, Ordering::Release);
        head.store(n, Ordering::Release);
        self.last = n;
        Ok(n)
    }
}

/// What became of one message a reader looked at.
enum Taken {
    Mine(Vec<u8>),
    NotMine,
    Lost,
    Corrupt,
}

/// One reader of a peer's mailbox (or of its own, in tests), through any mapping.
#[derive(Debug)]
pub struct MailboxReader {
    mapping: Arc<Mapping>,
    geometry: InterconnectGeometry,
    /// Number of the last message looked at.
    cursor: u64,
    /// The region's creation time when the cursor was set: a new one means the region was
    /// formatted again, and its numbers started over.
    created: u64,
    /// Messages (to anyone) overwritten before this reader could look at them.
    pub lost: u64,
    /// Slots whose contents made no sense (a corrupt or hostile region), skipped.
    pub corrupt: u64,
    /// Times the reader jumped to the head without reading: the head went back, or the
    /// region was formatted again.
    pub resyncs: u64,
}

impl MailboxReader {
    /// A reader of `region`'s mailbox from its current head on: what was posted before is
    /// history, not news. `None` if the region has no mailbox.
    pub fn new(region: &NodeRegion) -> Option<Self> {
        let geometry = region.header().interconnect?;
        let mapping = region.shared_mapping();
        Some(Self {
            cursor: mapping.load(geometry.mailbox_head()),
            created: created(&mapping),
            mapping,
            geometry,
            lost: 0,
            corrupt: 0,
            resyncs: 0,
        })
    }

    /// Number of the last message looked at.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Appends to `out` every message for `me` (or for everyone) posted since the last
    /// read, oldest first, and returns how many. Never blocks and never panics, whatever
    /// the region holds.
    pub fn read(&mut self, me: u16, out: &mut Vec<Vec<u8>>) -> usize {
        let head = self.mapping.load(self.geometry.mailbox_head());
        let created = created(&self.mapping);
        if head < self.cursor || created != self.created {
            // Numbers went back: nothing after the cursor can be told from what came
            // before, so start again from the head rather than return stale messages.
            self.cursor = head;
            self.created = created;
            self.resyncs += 1;
            return 0;
        }
        let slots = u64::from(self.geometry.mailbox_slots);
        // Messages at or before `first` were looked at already, or overwritten since.
        let first = self.cursor.max(head.saturating_sub(slots));
        self.lost = self.lost.saturating_add(first - self.cursor);
        let mut delivered = 0;
        for n in (first..head).map(|n| n + 1) {
            match self.take(n, me) {
                Taken::Mine(frame) => {
                    out.push(frame);
                    delivered += 1;
                }
                Taken::NotMine => {}
                Taken::Lost => self.lost = self.lost.saturating_add(1),
                Taken::Corrupt => self.corrupt = self.corrupt.saturating_add(1),
            }
        }
        self.cursor = head;
        delivered
    }

    /// Copies message `n` out of its slot if it is for `me` and still there, whole.
    fn take(&self, n: u64, me: u16) -> Taken {
        let slot = self.geometry.slot(n);
        let (Some(number), Some(meta)) = (self.mapping.word(slot), self.mapping.word(slot + 8))
        else {
            return Taken::Corrupt;
        };
        let seen = number.load(Ordering::Acquire);
        if seen != n {
            // 0: being overwritten; later: overwritten. An earlier number is impossible
            // once the head passed `n`.
            return if seen == 0 || seen > n {
                Taken::Lost
            } else {
                Taken::Corrupt
            };
        }
        let word = meta.load(Ordering::Relaxed);
        let to = word as u16;
        let len = (word >> 32) as usize;
        let still_there = || {
            // Orders the loads above before the number's second load (seqlock reader).
            fence(Ordering::Acquire);
            number.load(Ordering::Relaxed) == n
        };
        if to != me && to != BROADCAST {
            return if still_there() {
                Taken::NotMine
            } else {
                Taken::Lost
            };
        }
        if len > self.geometry.max_frame() {
            return if still_there() {
                Taken::Corrupt
            } else {
                Taken::Lost
            };
        }
        let mut frame = vec![0u8; len];
        if !self.mapping.read_bytes(slot + SLOT_HEADER_LEN, &mut frame) {
            return Taken::Corrupt;
        }
        if still_there() {
            Taken::Mine(frame)
        } else {
            Taken::Lost
        }
    }
}

/// The region's creation time, from its static header.
fn created(mapping: &Mapping) -> u64 {
    mapping.load(node_header::CREATED_UNIX_NS as u64)
}

impl NodeRegion {
    /// Number of the last message posted in the region's mailbox; `None` for a region
    /// without one.
    pub fn mailbox_head(&self) -> Option<u64> {
        let geometry = self.header().interconnect?;
        Some(self.mapping().load(geometry.mailbox_head()))
    }
}
