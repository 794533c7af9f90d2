//! An acknowledged-writes checker for "continuous writes while a node is killed".
//!
//! An [`AckedWriter`] writes self-describing 4 KiB blocks over NBD on its own thread until
//! stopped, reconnecting after connection errors, and records every write's outcome. Then
//! [`History::verify`] reads every slot back and checks that it holds the latest
//! acknowledged write to that slot, or a newer write whose outcome is unknown (the
//! connection was cut before its reply: it may or may not have landed). An older write,
//! a write the server refused, or anything that is not a whole block of ours is a failure.
//!
//! Block layout (little-endian): magic `IVAK` (u32), writer id (u32), sequence (u64),
//! offset (u64); filler derived from those 24 bytes; FNV-1a 64 of bytes 0..4088 in the
//! last 8 bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use campaign::nbd_client::{NbdClient, reply_errno};

pub const BLOCK: usize = 4096;
const HEADER: usize = 24;
const SUM_AT: usize = BLOCK - 8;
const MAGIC: u32 = u32::from_le_bytes(*b"IVAK");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    pub writer_id: u32,
    pub seq: u64,
    pub offset: u64,
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Deterministic filler for bytes `HEADER..SUM_AT` (splitmix64 seeded by the header).
fn fill(block: &mut [u8]) {
    let mut state = fnv1a64(&block[..HEADER]);
    for chunk in block[HEADER..SUM_AT].chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
}

/// The block writer `writer_id` writes as its write number `seq` at `offset`.
pub fn encode_block(writer_id: u32, seq: u64, offset: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    block[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    block[4..8].copy_from_slice(&writer_id.to_le_bytes());
    block[8..16].copy_from_slice(&seq.to_le_bytes());
    block[16..24].copy_from_slice(&offset.to_le_bytes());
    fill(&mut block);
    let sum = fnv1a64(&block[..SUM_AT]);
    block[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
    block
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b)
}

/// The header of a whole, intact block of ours; otherwise a description of what is there.
pub fn decode_block(block: &[u8]) -> Result<BlockHeader, String> {
    if block.len() != BLOCK {
        return Err(format!("{} bytes instead of {BLOCK}", block.len()));
    }
    if block.iter().all(|&b| b == 0) {
        return Err("all zeroes".to_owned());
    }
    let hex: String = block[..HEADER].iter().map(|b| format!("{b:02x}")).collect();
    if block[0..4] != MAGIC.to_le_bytes() {
        return Err(format!("not a checker block (first {HEADER} bytes {hex})"));
    }
    let header = BlockHeader {
        writer_id: u32::from_le_bytes([block[4], block[5], block[6], block[7]]),
        seq: le_u64(&block[8..16]),
        offset: le_u64(&block[16..24]),
    };
    if fnv1a64(&block[..SUM_AT]) != le_u64(&block[SUM_AT..]) {
        return Err(format!("garbage: bad checksum; header claims {header:?}"));
    }
    if block != encode_block(header.writer_id, header.seq, header.offset) {
        return Err(format!("garbage: filler does not match header {header:?}"));
    }
    Ok(header)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The reply arrived with no error.
    Acked,
    /// The server replied with an error.
    Failed,
    /// The connection was cut or timed out before a reply: it may or may not have landed.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Op {
    pub seq: u64,
    pub offset: u64,
    pub outcome: Outcome,
    pub invoked: Instant,
    /// When the reply arrived (None for `Unknown`).
    pub completed: Option<Instant>,
    /// The error, for `Failed` and `Unknown`.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// How long to keep trying to reconnect before the writer gives up.
    pub give_up: Duration,
    /// Pause between reconnect attempts (and after an error reply).
    pub retry_interval: Duration,
    /// Connect, read and write timeout on the socket.
    pub io_timeout: Duration,
    /// Send writes with `NBD_CMD_FLAG_FUA`.
    pub fua: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            give_up: Duration::from_secs(30),
            retry_interval: Duration::from_millis(20),
            io_timeout: Duration::from_secs(5),
            fua: false,
        }
    }
}

/// A writer thread; see the module documentation.
#[derive(Debug)]
pub struct AckedWriter {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: Option<JoinHandle<History>>,
}

impl AckedWriter {
    pub fn start(addr: SocketAddr, export: &str, writer_id: u32, base: u64, slots: u64) -> Self {
        Self::start_with(
            addr,
            export,
            writer_id,
            base,
            slots,
            WriterOptions::default(),
        )
    }

    pub fn start_with(
        addr: SocketAddr,
        export: &str,
        writer_id: u32,
        base: u64,
        slots: u64,
        options: WriterOptions,
    ) -> Self {
        assert!(slots > 0, "AckedWriter needs at least one slot");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let (stop2, acked2, export) = (stop.clone(), acked.clone(), export.to_owned());
        let history = History {
            writer_id,
            base,
            slots,
            started: Instant::now(),
            ops: Vec::new(),
            gave_up: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("acked-writer-{writer_id}"))
            .spawn(move || run(addr, &export, options, history, &stop2, &acked2))
            .expect("spawn the writer thread");
        AckedWriter {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    /// Writes acknowledged so far.
    /// Waits until `more` acknowledgements beyond those so far have come (up to 60 s);
    /// `what` names the moment in the failure.
    pub fn wait_for(&self, more: u64, what: &str) {
        let target = self.acked() + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < target {
            assert!(
                Instant::now() < deadline && !self.finished(),
                "{what}: the writer stalled at {} acknowledgements",
                self.acked()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Whether the thread has ended on its own (it gave up reconnecting).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    pub fn stop(mut self) -> History {
        self.join().expect("the writer thread was already joined")
    }

    fn join(&mut self) -> Option<History> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take()?;
        Some(
            thread
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e)),
        )
    }
}

impl Drop for AckedWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    addr: SocketAddr,
    export: &str,
    options: WriterOptions,
    mut history: History,
    stop: &AtomicBool,
    acked: &AtomicU64,
) -> History {
    let mut client: Option<NbdClient> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            let down_since = Instant::now();
            loop {
                if stop.load(Ordering::Relaxed) {
                    return history;
                }
                match NbdClient::connect(addr, export, options.io_timeout) {
                    Ok(c) => break client = Some(c),
                    Err(e) if down_since.elapsed() >= options.give_up => {
                        history.gave_up = Some(format!(
                            "writer {} gave up reconnecting to {addr} after {:?}: {e}",
                            history.writer_id, options.give_up
                        ));
                        return history;
                    }
                    Err(_) => std::thread::sleep(options.retry_interval),
                }
            }
            continue;
        };
        let offset = history.base + (seq % history.slots) * BLOCK as u64;
        let block = encode_block(history.writer_id, seq, offset);
        let invoked = Instant::now();
        let result = c.write(offset, &block, options.fua);
        let now = Instant::now();
        let (outcome, completed, error) = match result {
            Ok(()) => {
                acked.fetch_add(1, Ordering::Relaxed);
                (Outcome::Acked, Some(now), None)
            }
            Err(e) if reply_errno(&e).is_some() => {
                std::thread::sleep(options.retry_interval);
                (Outcome::Failed, Some(now), Some(e.to_string()))
            }
            Err(e) => {
                client = None; // Closes the socket; the next pass reconnects.
                (Outcome::Unknown, None, Some(e.to_string()))
            }
        };
        history.ops.push(Op {
            seq,
            offset,
            outcome,
            invoked,
            completed,
            error,
        });
        seq += 1;
    }
    if let Some(c) = client {
        c.disconnect();
    }
    history
}

/// Everything one writer did, in sequence order.
#[derive(Debug, Clone)]
pub struct History {
    pub writer_id: u32,
    pub base: u64,
    pub slots: u64,
    pub started: Instant,
    pub ops: Vec<Op>,
    /// Set when the writer stopped because it could not reconnect.
    pub gave_up: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub acked: usize,
    pub unknown: usize,
    pub failed: usize,
    /// Slots written at least once (each was read back and checked).
    pub slots_checked: u64,
    /// Slots that hold a write whose outcome was unknown (it landed after all).
    pub slots_with_unknown_landed: u64,
}

impl History {
    fn count(&self, outcome: Outcome) -> usize {
        self.ops.iter().filter(|op| op.outcome == outcome).count()
    }

    pub fn acked_count(&self) -> usize {
        self.count(Outcome::Acked)
    }

    /// The longest time between two consecutive acknowledged writes' replies: the outage
    /// a client saw. Zero with fewer than two acknowledged writes.
    pub fn max_gap(&self) -> Duration {
        let done: Vec<Instant> = self
            .ops
            .iter()
            .filter(|op| op.outcome == Outcome::Acked)
            .filter_map(|op| op.completed)
            .collect();
        done.windows(2)
            .map(|w| w[1].saturating_duration_since(w[0]))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Reads every written slot back with `read(offset)` (4096 bytes) and checks it; see the
    /// module documentation. A slot with no acknowledged write may also still be all zeroes.
    pub fn verify(&self, mut read: impl FnMut(u64) -> Vec<u8>) -> Result<VerifyReport, String> {
        let mut report = VerifyReport {
            acked: self.acked_count(),
            unknown: self.count(Outcome::Unknown),
            failed: self.count(Outcome::Failed),
            ..VerifyReport::default()
        };
        let mut by_slot: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
        for op in &self.ops {
            by_slot.entry(op.seq % self.slots).or_default().push(op);
        }
        let mut problems = Vec::new();
        for (slot, ops) in &by_slot {
            let Some(first) = ops.first() else { continue };
            let offset = first.offset;
            report.slots_checked += 1;
            let latest = ops.iter().rev().find(|op| op.outcome == Outcome::Acked);
            let floor = latest.map_or(0, |op| op.seq);
            let maybe: Vec<u64> = ops
                .iter()
                .filter(|op| op.outcome == Outcome::Unknown && (latest.is_none() || op.seq > floor))
                .map(|op| op.seq)
                .collect();
            let block = read(offset);
            let found = decode_block(&block);
            let ok = match &found {
                Ok(h) if h.writer_id == self.writer_id && h.offset == offset => {
                    if latest.is_some_and(|op| op.seq == h.seq) {
                        true
                    } else if maybe.contains(&h.seq) {
                        report.slots_with_unknown_landed += 1;
                        true
                    } else {
                        false
                    }
                }
                Ok(_) => false,
                Err(_) => latest.is_none() && block.iter().all(|&b| b == 0),
            };
            if ok {
                continue;
            }
            let mut expected = match latest {
                Some(op) => format!("acked seq {}", op.seq),
                None => "zeroes (never acked)".to_owned(),
            };
            if !maybe.is_empty() {
                let shown: Vec<u64> = maybe.iter().copied().take(8).collect();
                let _ = write!(expected, " or unknown-outcome seq {shown:?}");
            }
            let found = match found {
                Ok(h) => {
                    let op = ops
                        .iter()
                        .find(|op| op.seq == h.seq && h.writer_id == self.writer_id);
                    match op {
                        Some(op) => format!("{h:?}, a write that was {:?}", op.outcome),
                        None => format!("{h:?}, never written by this writer to this slot"),
                    }
                }
                Err(what) => what,
            };
            problems.push(format!(
                "slot {slot} (offset {offset}): expected {expected}; found {found}"
            ));
        }
        if problems.is_empty() {
            return Ok(report);
        }
        let total = problems.len();
        problems.truncate(10);
        Err(format!(
            "writer {}: {total} bad slot(s) of {} checked ({report:?}):\n  {}",
            self.writer_id,
            report.slots_checked,
            problems.join("\n  ")
        ))
    }
}
