//! Helpers shared by the integration tests: deterministic generators, owned log entries,
//! region files with raw byte access, and child processes re-executing the test binary.
//!
//! Each test binary declares this as `#[allow(dead_code)] mod common;`: not every test uses
//! every helper.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::thread::JoinHandle;

use shm::inspect::{InspectOptions, NodeReport, inspect_node};
use shm::layout::node_live;
use shm::log::record::{RECORD_HEADER_LEN, RecordHeader};
use shm::{Access, Cursor, Entry, Mapping, NodeRegion, Record};

// ---------------------------------------------------------------------------------------
// Deterministic generators
// ---------------------------------------------------------------------------------------

/// The splitmix64 finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    /// `len` bytes of the generator's output.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut data = Vec::with_capacity(len + 8);
        while data.len() < len {
            data.extend_from_slice(&self.next().to_le_bytes());
        }
        data.truncate(len);
        data
    }
}

// ---------------------------------------------------------------------------------------
// Entries and records
// ---------------------------------------------------------------------------------------

/// An [`Entry`] that owns its data, as a model or a generator keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedEntry {
    /// The entry, except that a write's data is in `data` (and empty here).
    shape: Entry<'static>,
    data: Vec<u8>,
}

impl OwnedEntry {
    pub fn write(export: u32, offset: u64, data: Vec<u8>) -> Self {
        let shape = Entry::Write {
            export,
            offset,
            data: &[],
        };
        Self { shape, data }
    }

    pub fn trim(export: u32, offset: u64, len: u64) -> Self {
        let shape = Entry::Trim {
            export,
            offset,
            len,
        };
        Self::range(shape)
    }

    pub fn write_zeroes(export: u32, offset: u64, len: u64) -> Self {
        let shape = Entry::WriteZeroes {
            export,
            offset,
            len,
        };
        Self::range(shape)
    }

    fn range(shape: Entry<'static>) -> Self {
        Self {
            shape,
            data: Vec::new(),
        }
    }

    /// The entry to append, or to compare a scanned [`Record::entry`] with.
    pub fn entry(&self) -> Entry<'_> {
        match self.shape {
            Entry::Write { export, offset, .. } => Entry::Write {
                export,
                offset,
                data: &self.data,
            },
            range => range,
        }
    }
}

/// An entry as a failure message shows it: a write by the length of its data, not its bytes.
pub fn describe(entry: &Entry<'_>) -> String {
    match entry {
        Entry::Write {
            export,
            offset,
            data,
        } => format!(
            "write export {export} offset {offset} of {} bytes",
            data.len()
        ),
        other => format!("{other:?}"),
    }
}

/// Checks that `record` is record `seq` and holds `expected`.
pub fn check_record(record: &Record, seq: u64, expected: &Entry<'_>) -> Result<(), String> {
    if record.seq != seq {
        return Err(format!(
            "expected record {seq}, found record {}",
            record.seq
        ));
    }
    let found = record.entry();
    if found != *expected {
        return Err(format!(
            "record {seq} at position {} holds the wrong contents: found {}, expected {}",
            record.pos,
            describe(&found),
            describe(expected)
        ));
    }
    Ok(())
}

/// Every record from flushed to head; panics on any scan error.
pub fn scan_all(region: &NodeRegion) -> Vec<Record> {
    region
        .unflushed()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// The bytes of `header` with the crc it should carry over `payload`.
pub fn sealed(mut header: RecordHeader, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    header.crc = header.compute_crc(payload);
    header.encode()
}

// ---------------------------------------------------------------------------------------
// Region files and raw access
// ---------------------------------------------------------------------------------------

/// A node region file in a temporary directory, so that more mappings can be opened on it.
#[derive(Debug)]
pub struct RegionFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl RegionFile {
    /// Formats a `size`-byte node region in a new file; returns the file and the region.
    pub fn format(size: u64, node_id: u32, name: &str) -> (Self, NodeRegion) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.region");
        let mapping = Mapping::create_file(&path, size).unwrap();
        let region = NodeRegion::format(mapping, node_id, name).unwrap();
        (Self { _dir: dir, path }, region)
    }

    pub fn mapping(&self, access: Access) -> Mapping {
        Mapping::open(&self.path, access).unwrap()
    }

    /// The region through a new mapping.
    pub fn open(&self, access: Access) -> NodeRegion {
        NodeRegion::open(self.mapping(access)).unwrap()
    }

    /// Raw read-write access through a new mapping.
    pub fn raw(&self) -> Raw {
        Raw::open(&self.path)
    }

    /// `inspect` of the region through a new read-only mapping.
    pub fn inspect(&self) -> NodeReport {
        inspect_node(self.mapping(Access::ReadOnly), InspectOptions::default())
    }
}

/// Reads and writes region bytes through the file of a second read-write [`Mapping`] of the
/// region (the mapping itself offers no public byte access). The file is `MAP_SHARED`, so
/// what is written here is what every mapping sees.
#[derive(Debug)]
pub struct Raw {
    _mapping: Mapping,
    file: File,
}

impl Raw {
    pub fn open(path: &Path) -> Self {
        let mapping = Mapping::open(path, Access::ReadWrite).unwrap();
        let file = mapping.file().try_clone().unwrap();
        Self {
            _mapping: mapping,
            file,
        }
    }

    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    pub fn write(&self, offset: u64, bytes: &[u8]) {
        self.file.write_all_at(bytes, offset).unwrap();
    }

    pub fn flip_bit(&self, offset: u64, bit: u32) {
        let mut byte = self.read(offset, 1);
        byte[0] ^= 1 << bit;
        self.write(offset, &byte);
    }

    pub fn u64(&self, offset: u64) -> u64 {
        u64::from_le_bytes(self.read(offset, 8).try_into().unwrap())
    }

    /// The record header at `offset`, decoded.
    pub fn header(&self, offset: u64) -> RecordHeader {
        RecordHeader::decode(&self.read(offset, RECORD_HEADER_LEN).try_into().unwrap())
    }

    /// Publishes `value` at a double-buffered location the way `PublishedWriter` does:
    /// the slot the generation does not point at, then the generation.
    pub fn publish(&self, generation_offset: u64, value: [u64; 2]) {
        let next = self.u64(generation_offset).wrapping_add(1);
        let slot = generation_offset + 8 + (next & 1) * 16;
        self.write(slot, &value[0].to_le_bytes());
        self.write(slot + 8, &value[1].to_le_bytes());
        self.write(generation_offset, &next.to_le_bytes());
    }

    pub fn publish_head(&self, head: Cursor) {
        self.publish(node_live::HEAD.offset(), [head.seq, head.pos]);
    }

    pub fn publish_flushed(&self, flushed: Cursor) {
        self.publish(node_live::FLUSHED.offset(), [flushed.seq, flushed.pos]);
    }
}

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// A command that runs only the test `name` of this test binary, in a child process: how
/// the tests put a writer in another process.
pub fn rerun_test(name: &str) -> std::io::Result<Command> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args([name, "--exact", "--nocapture", "--test-threads=1"]);
    Ok(command)
}

/// A child process that is killed and reaped however the test ends, with its stderr drained
/// on a thread (so the child never blocks on a full pipe).
#[derive(Debug)]
pub struct ChildGuard {
    pub child: Child,
    stderr: Option<JoinHandle<String>>,
}

impl ChildGuard {
    /// Spawns `command`, which must have a piped stderr.
    pub fn spawn(command: &mut Command) -> std::io::Result<Self> {
        let mut child = command.spawn()?;
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        });
        Ok(Self { child, stderr })
    }

    /// Whether the child is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill_and_wait(&mut self) -> std::io::Result<ExitStatus> {
        // SIGKILL; an error only means it already exited, which `wait` then reports.
        let _ = self.child.kill();
        self.child.wait()
    }

    /// What the child wrote to stderr, once it has closed it (empty if taken before).
    pub fn stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
