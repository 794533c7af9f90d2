//! What the fuzz targets share: in-memory stand-ins for the things a parser talks to (an
//! NBD export, a connection, a mapped region). The parsers themselves are always the
//! project's own code; nothing here parses.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use guest_agent::export::{Export, ExportRegistry};
use shm::Mapping;

/// An in-memory NBD export (what the server's checks protect).
#[derive(Debug)]
pub struct MemExport {
    pub name: &'static str,
    pub data: Mutex<Vec<u8>>,
    pub read_only: bool,
    pub max_request: u32,
    /// Every call fails with this error (to reach the server's errno mapping).
    pub fail: Option<io::ErrorKind>,
}

impl MemExport {
    pub fn new(name: &'static str, size: usize, read_only: bool, max_request: u32) -> Self {
        Self {
            name,
            data: Mutex::new(vec![0; size]),
            read_only,
            max_request,
            fail: None,
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        if let Some(kind) = self.fail {
            return Err(kind.into());
        }
        // The server promises ranges inside the export: a range outside is a finding.
        let size = self.size();
        let end = offset.checked_add(len).expect("range overflows");
        assert!(
            end <= size,
            "server passed {offset}+{len} past the end {size}"
        );
        Ok(offset as usize..end as usize)
    }
}

impl Export for MemExport {
    fn name(&self) -> &str {
        self.name
    }
    fn size(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn max_request(&self) -> u32 {
        self.max_request
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        assert!(
            buf.len() <= self.max_request as usize,
            "read above max_request"
        );
        let range = self.check(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock().expect("lock")[range]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        assert!(!self.read_only, "write reached a read-only export");
        assert!(
            data.len() <= self.max_request as usize,
            "write above max_request"
        );
        let range = self.check(offset, data.len() as u64)?;
        self.data.lock().expect("lock")[range].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool, _may_trim: bool) -> io::Result<()> {
        assert!(!self.read_only, "write-zeroes reached a read-only export");
        let range = self.check(offset, len)?;
        self.data.lock().expect("lock")[range].fill(0);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        assert!(!self.read_only, "trim reached a read-only export");
        let range = self.check(offset, len)?;
        self.data.lock().expect("lock")[range].fill(0);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        match self.fail {
            Some(kind) => Err(kind.into()),
            None => Ok(()),
        }
    }
}

/// The exports the NBD handshake target serves: "a" (the default, writable) and "ro".
pub fn registry() -> ExportRegistry {
    let registry = ExportRegistry::new();
    registry.insert(std::sync::Arc::new(MemExport::new(
        "a",
        1 << 16,
        false,
        1 << 16,
    )));
    registry.insert(std::sync::Arc::new(MemExport::new(
        "ro",
        1 << 12,
        true,
        3000,
    )));
    registry
}

/// One side of a connection: reads come from the fuzz input, writes go to a buffer.
/// It never blocks: the input's end is the peer hanging up.
#[derive(Debug)]
pub struct Pipe<'a> {
    pub input: &'a [u8],
    pub output: Vec<u8>,
}

impl<'a> Pipe<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Self {
            input,
            output: Vec::new(),
        }
    }
}

impl Read for Pipe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Size of the regions the region targets map: a header page and a 12 KiB ring.
pub const REGION_SIZE: u64 = 16 << 10;

/// A fresh read-write memfd mapping of [`REGION_SIZE`] bytes holding `bytes` (zero padded,
/// cut at the region's size), written through the file as another process would.
pub fn region_with(bytes: &[u8]) -> Mapping {
    let mapping = Mapping::create_memfd("fuzz", REGION_SIZE).expect("memfd");
    let len = bytes.len().min(REGION_SIZE as usize);
    mapping
        .file()
        .write_all_at(&bytes[..len], 0)
        .expect("write region");
    mapping
}

/// The same region mapped a second time, read-only, as a partner or hostd maps it.
pub fn read_only_view(mapping: &Mapping) -> Mapping {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", mapping.file().as_raw_fd());
    Mapping::open(std::path::Path::new(&path), shm::Access::ReadOnly).expect("reopen")
}

/// Seals a region's static header with its crc32c (what a real writer always does), so the
/// fuzzer gets past the checksum to the fields behind it.
pub fn seal_static_header(region: &mut [u8]) {
    use shm::layout::STATIC_HEADER_CRC_OFFSET as AT;
    if region.len() >= AT + 4 {
        let crc = crc32c::crc32c(&region[..AT]);
        region[AT..AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Seals a control region's name tables with their crc32c.
pub fn seal_name_tables(region: &mut [u8]) {
    use shm::layout::control_names::{CRC, NODES};
    let (names, crc) = (NODES as usize, CRC as usize);
    if region.len() >= crc + 4 {
        let sum = crc32c::crc32c(&region[names..crc]);
        region[crc..crc + 4].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Little-endian u64 at `at` (zero past the end).
pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}
