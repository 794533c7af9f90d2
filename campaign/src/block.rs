//! The on-disk pattern of one workload block. Every write fills a whole block with a header
//! naming its run, writer, sequence number and target block, a fill derived from those, and a
//! CRC, so that the checker can tell from the final disk contents exactly which write (if any)
//! a block holds, and whether it is intact.
//!
//! ```text
//! offset 0     magic  b"IVHACMP1"
//! offset 8     run_id u64 LE
//! offset 16    writer u32 LE
//! offset 20    reserved u32 = 0
//! offset 24    seq    u64 LE
//! offset 32    block  u64 LE (the block index the write was aimed at)
//! offset 40    fill   xorshift64 stream seeded from (run_id, writer, seq)
//! offset 4092  crc32c u32 LE over bytes 0..4092
//! ```

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::rng::splitmix64;

/// Size of one workload block, in bytes. Block `i` of an export lives at offset `i * BLOCK_SIZE`.
pub const BLOCK_SIZE: usize = 4096;

/// Marks a block written by the campaign workload (format version 1).
pub const MAGIC: [u8; 8] = *b"IVHACMP1";

const RUN_ID_AT: usize = 8;
const WRITER_AT: usize = 16;
const RESERVED_AT: usize = 20;
const SEQ_AT: usize = 24;
const BLOCK_AT: usize = 32;
const FILL_AT: usize = 40;
const CRC_AT: usize = BLOCK_SIZE - 4;

/// What one block of an export holds, as far as the campaign is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockValue {
    /// All bytes zero: never written.
    Zero,
    /// An intact block of this run, written by `writer` as its write number `seq`, aimed at
    /// this block.
    Write {
        /// The writer that wrote it.
        writer: u32,
        /// The writer's write sequence number (from 1).
        seq: u64,
    },
    /// An intact block of this run, but aimed at another block index: it landed in the wrong
    /// place.
    Misplaced {
        /// The writer that wrote it.
        writer: u32,
        /// The writer's write sequence number.
        seq: u64,
        /// The block index the write was aimed at.
        aimed_at: u64,
    },
    /// Not an intact block of this run: bad magic, CRC or fill, another run's block, garbage,
    /// or the wrong length.
    Corrupt {
        /// Why the block is not intact, in a few words.
        reason: String,
    },
}

impl fmt::Display for BlockValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockValue::Zero => write!(f, "zeros"),
            BlockValue::Write { writer, seq } => write!(f, "writer {writer} seq {seq}"),
            BlockValue::Misplaced {
                writer,
                seq,
                aimed_at,
            } => write!(f, "writer {writer} seq {seq} aimed at block {aimed_at}"),
            BlockValue::Corrupt { reason } => write!(f, "corrupt data ({reason})"),
        }
    }
}

/// The JSON shape of a non-zero [`BlockValue`]; `Zero` is `null`. `Misplaced` comes first
/// because an untagged enum takes the first variant that fits and `Write`'s fields are a
/// subset of its fields.
#[derive(Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum BlockValueJson {
    Misplaced {
        writer: u32,
        seq: u64,
        aimed_at: u64,
    },
    Write {
        writer: u32,
        seq: u64,
    },
    Corrupt {
        corrupt: String,
    },
}

impl Serialize for BlockValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let json = match self {
            BlockValue::Zero => return serializer.serialize_none(),
            BlockValue::Write { writer, seq } => BlockValueJson::Write {
                writer: *writer,
                seq: *seq,
            },
            BlockValue::Misplaced {
                writer,
                seq,
                aimed_at,
            } => BlockValueJson::Misplaced {
                writer: *writer,
                seq: *seq,
                aimed_at: *aimed_at,
            },
            BlockValue::Corrupt { reason } => BlockValueJson::Corrupt {
                corrupt: reason.clone(),
            },
        };
        serializer.serialize_some(&json)
    }
}

impl<'de> Deserialize<'de> for BlockValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Option::<BlockValueJson>::deserialize(deserializer)? {
            None => BlockValue::Zero,
            Some(BlockValueJson::Write { writer, seq }) => BlockValue::Write { writer, seq },
            Some(BlockValueJson::Misplaced {
                writer,
                seq,
                aimed_at,
            }) => BlockValue::Misplaced {
                writer,
                seq,
                aimed_at,
            },
            Some(BlockValueJson::Corrupt { corrupt }) => BlockValue::Corrupt { reason: corrupt },
        })
    }
}

/// The block a workload write of `(run_id, writer, seq)` aimed at block index `block` puts on
/// disk: exactly [`BLOCK_SIZE`] bytes.
pub fn encode(run_id: u64, writer: u32, seq: u64, block: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_SIZE];
    bytes[..RUN_ID_AT].copy_from_slice(&MAGIC);
    bytes[RUN_ID_AT..WRITER_AT].copy_from_slice(&run_id.to_le_bytes());
    bytes[WRITER_AT..RESERVED_AT].copy_from_slice(&writer.to_le_bytes());
    // bytes RESERVED_AT..SEQ_AT stay zero.
    bytes[SEQ_AT..BLOCK_AT].copy_from_slice(&seq.to_le_bytes());
    bytes[BLOCK_AT..FILL_AT].copy_from_slice(&block.to_le_bytes());
    let mut fill = Fill::new(run_id, writer, seq);
    for chunk in bytes[FILL_AT..CRC_AT].chunks_mut(8) {
        let word = fill.next_word().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    let crc = crc32c::crc32c(&bytes[..CRC_AT]);
    bytes[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// What `bytes`, read from block index `block` of an export, holds for run `run_id`.
/// Never panics, whatever the input.
pub fn decode(bytes: &[u8], run_id: u64, block: u64) -> BlockValue {
    let corrupt = |reason: String| BlockValue::Corrupt { reason };
    if bytes.len() != BLOCK_SIZE {
        return corrupt(format!("block is {} bytes, not {BLOCK_SIZE}", bytes.len()));
    }
    if bytes.iter().all(|&b| b == 0) {
        return BlockValue::Zero;
    }
    if bytes[..RUN_ID_AT] != MAGIC {
        return corrupt("bad magic".to_owned());
    }
    let stored_crc = u32_at(bytes, CRC_AT);
    let computed_crc = crc32c::crc32c(&bytes[..CRC_AT]);
    if stored_crc != computed_crc {
        return corrupt(format!(
            "bad crc32c: stored {stored_crc:#010x}, computed {computed_crc:#010x}"
        ));
    }
    let block_run_id = u64_at(bytes, RUN_ID_AT);
    if block_run_id != run_id {
        return corrupt(format!(
            "block of another run: run_id {block_run_id}, expected {run_id}"
        ));
    }
    if u32_at(bytes, RESERVED_AT) != 0 {
        return corrupt("reserved field is not zero".to_owned());
    }
    let writer = u32_at(bytes, WRITER_AT);
    let seq = u64_at(bytes, SEQ_AT);
    let mut fill = Fill::new(run_id, writer, seq);
    for (index, chunk) in bytes[FILL_AT..CRC_AT].chunks(8).enumerate() {
        let word = fill.next_word().to_le_bytes();
        if chunk != &word[..chunk.len()] {
            return corrupt(format!(
                "fill of writer {writer} seq {seq} differs at byte {}",
                FILL_AT + index * 8
            ));
        }
    }
    let aimed_at = u64_at(bytes, BLOCK_AT);
    if aimed_at != block {
        return BlockValue::Misplaced {
            writer,
            seq,
            aimed_at,
        };
    }
    BlockValue::Write { writer, seq }
}

/// Callers guarantee `at + 4 <= bytes.len()`; a short slice reads as zero rather than panic.
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Callers guarantee `at + 8 <= bytes.len()`; a short slice reads as zero rather than panic.
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The deterministic fill stream of one write: xorshift64 seeded by mixing run, writer and seq
/// (so two writes never share a fill and a torn mix of two writes fails the check).
struct Fill {
    state: u64,
}

impl Fill {
    fn new(run_id: u64, writer: u32, seq: u64) -> Self {
        let seed = splitmix64(splitmix64(splitmix64(run_id) ^ u64::from(writer)) ^ seq);
        // xorshift's all-zero state is a fixed point.
        let state = if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        };
        Fill { state }
    }

    fn next_word(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const RUN: u64 = 0x1234_5678_9abc_def0;

    #[test]
    fn round_trip() {
        let bytes = encode(RUN, 3, 17, 42);
        assert_eq!(bytes.len(), BLOCK_SIZE);
        assert_eq!(
            decode(&bytes, RUN, 42),
            BlockValue::Write { writer: 3, seq: 17 }
        );
    }

    #[test]
    fn zero_block_is_zero() {
        assert_eq!(decode(&[0u8; BLOCK_SIZE], RUN, 0), BlockValue::Zero);
    }

    #[test]
    fn other_block_index_is_misplaced() {
        let bytes = encode(RUN, 1, 2, 7);
        assert_eq!(
            decode(&bytes, RUN, 8),
            BlockValue::Misplaced {
                writer: 1,
                seq: 2,
                aimed_at: 7
            }
        );
    }

    #[test]
    fn other_run_is_corrupt() {
        let bytes = encode(RUN + 1, 1, 2, 7);
        assert!(
            matches!(decode(&bytes, RUN, 7), BlockValue::Corrupt { reason } if reason.contains("another run"))
        );
    }

    #[test]
    fn writes_differ_in_fill() {
        let a = encode(RUN, 0, 1, 0);
        let b = encode(RUN, 0, 2, 0);
        let c = encode(RUN, 1, 1, 0);
        assert_ne!(a[FILL_AT..CRC_AT], b[FILL_AT..CRC_AT]);
        assert_ne!(a[FILL_AT..CRC_AT], c[FILL_AT..CRC_AT]);
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let good = encode(RUN, 5, 9, 11);
        for at in 0..BLOCK_SIZE {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] ^= flip;
                let value = decode(&bad, RUN, 11);
                assert!(
                    matches!(value, BlockValue::Corrupt { .. }),
                    "byte {at} ^ {flip:#x} decoded as {value:?}"
                );
            }
        }
    }

    #[test]
    fn a_tampered_field_with_a_fixed_crc_is_still_caught() {
        // Change the seq and recompute the CRC: only the fill check can notice.
        let mut bytes = encode(RUN, 5, 9, 11);
        bytes[SEQ_AT..BLOCK_AT].copy_from_slice(&10u64.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..CRC_AT]);
        bytes[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert!(
            matches!(decode(&bytes, RUN, 11), BlockValue::Corrupt { reason } if reason.contains("fill"))
        );
    }

    #[test]
    fn garbage_and_wrong_lengths_are_corrupt_not_panics() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in [0, 1, 7, 8, 39, 40, 4091, 4095, 4097, 8192] {
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            assert!(matches!(decode(&bytes, RUN, 0), BlockValue::Corrupt { .. }));
        }
        for _ in 0..200 {
            let mut bytes: Vec<u8> = (0..BLOCK_SIZE).map(|_| next() as u8).collect();
            if next() % 2 == 0 {
                // Give some buffers a valid magic so decode gets past the first check.
                bytes[..8].copy_from_slice(&MAGIC);
            }
            assert!(matches!(decode(&bytes, RUN, 0), BlockValue::Corrupt { .. }));
        }
        // The right length of a valid block, cut short or padded.
        let good = encode(RUN, 0, 1, 0);
        assert!(matches!(
            decode(&good[..BLOCK_SIZE - 1], RUN, 0),
            BlockValue::Corrupt { .. }
        ));
    }

    #[test]
    fn json_shapes() {
        let cases = [
            (BlockValue::Zero, "null"),
            (
                BlockValue::Write { writer: 0, seq: 3 },
                r#"{"writer":0,"seq":3}"#,
            ),
            (
                BlockValue::Misplaced {
                    writer: 1,
                    seq: 2,
                    aimed_at: 9,
                },
                r#"{"writer":1,"seq":2,"aimed_at":9}"#,
            ),
            (
                BlockValue::Corrupt {
                    reason: "bad magic".into(),
                },
                r#"{"corrupt":"bad magic"}"#,
            ),
        ];
        for (value, json) in cases {
            assert_eq!(serde_json::to_string(&value).unwrap(), json);
            assert_eq!(serde_json::from_str::<BlockValue>(json).unwrap(), value);
        }
        assert!(serde_json::from_str::<BlockValue>(r#"{"writer":0}"#).is_err());
        assert!(serde_json::from_str::<BlockValue>(r#"{"writer":0,"seq":1,"x":2}"#).is_err());
    }
}
