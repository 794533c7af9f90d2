//! One virtio-blk request, parsed from its descriptor chain and executed on the disk image.
//!
//! The layout is taken as the specification states it, with no assumption about how the
//! driver split it into descriptors (VIRTIO 1.2, 2.7.4): the device-readable bytes start
//! with the 16-byte header (type, reserved, sector), the device-writable bytes end with the
//! status byte, and what lies between is data. Everything the guest wrote is checked before
//! it is used: a request that does not fit the rules completes with `VIRTIO_BLK_S_IOERR` (or
//! `VIRTIO_BLK_S_UNSUPP` for an unknown type), never with a panic.
//!
//! Every request is idempotent (a read, a write of given bytes, a flush, a discard, a write
//! of zeroes), so executing one twice is harmless: after the daemon restarts, QEMU sends
//! again every request it had not seen completed.

use std::fmt;
use std::io;
use std::ops::Deref;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::disk::BlockFile;
use crate::table::WriteGate;

/// log2 of the sector size: virtio-blk counts in 512-byte sectors whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
/// The sector size in bytes.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// The length of the device's ID (its serial), as GET_ID returns it.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// The most data segments in one request (config `seg_max`): QEMU's value for its default
/// queue size of 128, so a request also fits a queue without indirect descriptors.
pub const SEG_MAX: u32 = 126;
/// The most descriptors in one chain: the data segments, the header and the status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// The most sectors in one DISCARD segment (QEMU's default, about 2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 0x3f_ffff;
/// The most segments in one DISCARD request: one, as qemu-storage-daemon.
pub const MAX_DISCARD_SEG: u32 = 1;
/// The discard granularity the guest is told, in sectors: hole punching works in file
/// system blocks (4 KiB), smaller discards only write zeroes.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// The most sectors in one WRITE_ZEROES segment.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 0x3f_ffff;
/// The most segments in one WRITE_ZEROES request.
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;

/// The request header's length: type u32, reserved u32, sector u64.
const HEADER_LEN: usize = 16;
/// A DISCARD or WRITE_ZEROES segment's length: sector u64, num_sectors u32, flags u32.
const SEGMENT_LEN: usize = 16;
/// The bounce buffer's size: data moves in pieces of at most this much, so a request's
/// length (up to 4 GiB) never sets the daemon's memory use.
const CHUNK: usize = 1 << 20;

/// The request's status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoError,
    Unsupported,
}

impl Status {
    /// The byte the guest reads.
    pub fn byte(self) -> u8 {
        let status = match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoError => VIRTIO_BLK_S_IOERR,
            Status::Unsupported => VIRTIO_BLK_S_UNSUPP,
        };
        // The three statuses are 0, 1 and 2.
        status as u8
    }
}

/// Why a request did not complete with `VIRTIO_BLK_S_OK`.
#[derive(Debug)]
enum Failure {
    /// The chain or the request breaks the rules (a guest bug or a hostile guest).
    Malformed(&'static str),
    /// The request reaches past the end of the disk.
    OutOfRange,
    /// The type or a flag is not one this device implements.
    Unsupported,
    /// The node is fenced off the disk.
    Denied,
    /// The image failed.
    Io(io::Error),
}

impl Failure {
    fn status(&self) -> Status {
        match self {
            Failure::Unsupported => Status::Unsupported,
            _ => Status::IoError,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Malformed(why) => write!(f, "malformed request: {why}"),
            Failure::OutOfRange => write!(f, "request past the end of the disk"),
            Failure::Unsupported => write!(f, "unsupported request"),
            Failure::Denied => write!(f, "write refused: the node is fenced"),
            Failure::Io(error) => write!(f, "disk I/O failed: {error}"),
        }
    }
}

/// A run of guest memory, checked to be in guest memory when the chain was parsed.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// The bytes one direction of a chain holds, in order.
#[derive(Debug, Default)]
struct Stream {
    segments: Vec<Segment>,
}

impl Stream {
    fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Reads `buf.len()` bytes from the front and drops them from the stream.
    fn read_front<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<(), Failure> {
        let mut filled = 0usize;
        while filled < buf.len() {
            let Some(segment) = self.segments.first_mut() else {
                return Err(Failure::Malformed("request shorter than its header"));
            };
            let n = usize::try_from(segment.len)
                .unwrap_or(usize::MAX)
                .min(buf.len() - filled);
            let piece = buf
                .get_mut(filled..filled + n)
                .ok_or(Failure::Malformed("bad piece"))?;
            mem.read_slice(piece, segment.addr)
                .map_err(|_| Failure::Malformed("unreadable guest memory"))?;
            if n as u64 == segment.len {
                self.segments.remove(0);
            } else {
                // Cannot overflow: the segment's end is in guest memory.
                segment.addr = segment
                    .addr
                    .checked_add(n as u64)
                    .ok_or(Failure::Malformed("address overflow"))?;
                segment.len -= n as u64;
            }
            filled += n;
        }
        Ok(())
    }
}

/// A chain split into its parts.
#[derive(Debug, Default)]
struct Layout {
    /// Header and data the driver wrote.
    readable: Stream,
    /// Data for the driver, without the status byte.
    writable: Stream,
}

/// Visits `segments` in pieces of at most [`CHUNK`] bytes: `f(guest address, length, disk
/// offset)`, the disk offset starting at `start`.
fn for_each_chunk(
    segments: &[Segment],
    start: u64,
    mut f: impl FnMut(GuestAddress, usize, u64) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut offset = start;
    for segment in segments {
        let mut done = 0u64;
        while done < segment.len {
            let n = (segment.len - done).min(CHUNK as u64);
            let addr = segment
                .addr
                .checked_add(done)
                .ok_or(Failure::Malformed("address overflow"))?;
            f(addr, n as usize, offset)?;
            done += n;
            offset = offset.checked_add(n).ok_or(Failure::OutOfRange)?;
        }
    }
    Ok(())
}

/// A buffer for `len` bytes moved in chunks.
fn bounce_buffer(len: u64) -> Vec<u8> {
    vec![0u8; len.min(CHUNK as u64) as usize]
}

/// The disk as one vhost-user connection sees it: the image, the device's serial, the
/// node's write gate and the write cache mode.
#[derive(Debug, Clone)]
pub struct Device {
    file: Arc<dyn BlockFile>,
    id: [u8; ID_BYTES],
    gate: WriteGate,
    write_through: bool,
}

impl Device {
    /// A device for `file`; `serial` is cut to [`ID_BYTES`] bytes (as QEMU does). The
    /// write cache starts in writeback mode.
    pub fn new(file: Arc<dyn BlockFile>, serial: &str, gate: WriteGate) -> Self {
        let mut id = [0u8; ID_BYTES];
        for (to, from) in id.iter_mut().zip(serial.bytes()) {
            *to = from;
        }
        Self {
            file,
            id,
            gate,
            write_through: false,
        }
    }

    /// The capacity in sectors (a partial last sector is not part of the disk).
    pub fn capacity(&self) -> u64 {
        self.file.size() >> SECTOR_SHIFT
    }

    /// The bytes GET_ID returns.
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Whether every change is flushed before it completes (the guest turned the write
    /// cache off, or cannot send flushes).
    pub fn write_through(&self) -> bool {
        self.write_through
    }

    pub fn set_write_through(&mut self, write_through: bool) {
        self.write_through = write_through;
    }

    /// Executes the request `chain` holds and writes its status. Returns the number of
    /// bytes written into guest memory, status included (the used ring's `len`): 0 when the
    /// chain has no writable status byte to report through.
    pub fn execute<M>(&self, mut chain: DescriptorChain<M>) -> u32
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        // One more than allowed, to tell a chain at the limit from one past it.
        let descriptors: Vec<Descriptor> = chain.by_ref().take(MAX_DESCRIPTORS + 1).collect();
        let mem = chain.memory();
        let Some(status_addr) = status_address(mem, &descriptors) else {
            log::debug!("request without a writable status byte dropped");
            return 0;
        };
        let mut written = 0u64;
        let status = match layout(mem, &descriptors)
            .and_then(|layout| self.run(mem, layout, &mut written))
        {
            Ok(()) => Status::Ok,
            Err(failure) => {
                match &failure {
                    Failure::Io(_) => log::warn!("{failure}"),
                    _ => log::debug!("{failure}"),
                }
                failure.status()
            }
        };
        if mem.write_obj(status.byte(), status_addr).is_err() {
            // Checked writable above; if the guest's memory changed meanwhile, the status
            // cannot be given.
            return u32::try_from(written).unwrap_or(u32::MAX);
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    fn run<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        mut layout: Layout,
        written: &mut u64,
    ) -> Result<(), Failure> {
        let mut header = [0u8; HEADER_LEN];
        layout.readable.read_front(mem, &mut header)?;
        let (kind, sector) = parse_header(&header);
        match kind {
            VIRTIO_BLK_T_IN => {
                no_data(&layout.readable)?;
                self.read(mem, sector, &layout.writable.segments, written)
            }
            VIRTIO_BLK_T_OUT => {
                no_data(&layout.writable)?;
                self.write(mem, sector, &layout.readable.segments)
            }
            VIRTIO_BLK_T_FLUSH => {
                no_data(&layout.readable)?;
                no_data(&layout.writable)?;
                self.file.flush().map_err(Failure::Io)
            }
            VIRTIO_BLK_T_GET_ID => {
                no_data(&layout.readable)?;
                self.get_id(mem, &layout.writable, written)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                no_data(&layout.writable)?;
                self.discard_or_zero(mem, kind == VIRTIO_BLK_T_WRITE_ZEROES, layout.readable)
            }
            _ => Err(Failure::Unsupported),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors on the disk.
    fn range(&self, sector: u64, len: u64) -> Result<u64, Failure> {
        if len % SECTOR_SIZE != 0 {
            return Err(Failure::Malformed("data not a whole number of sectors"));
        }
        let sectors = len >> SECTOR_SHIFT;
        let end = sector.checked_add(sectors).ok_or(Failure::OutOfRange)?;
        if end > self.capacity() {
            return Err(Failure::OutOfRange);
        }
        // Cannot overflow: below the capacity, itself a byte size over 512.
        sector.checked_mul(SECTOR_SIZE).ok_or(Failure::OutOfRange)
    }

    fn read<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        sector: u64,
        segments: &[Segment],
        written: &mut u64,
    ) -> Result<(), Failure> {
        let len: u64 = segments.iter().map(|s| s.len).sum();
        let start = self.range(sector, len)?;
        let mut buf = bounce_buffer(len);
        for_each_chunk(segments, start, |addr, n, offset| {
            let piece = buf.get_mut(..n).ok_or(Failure::Malformed("bad chunk"))?;
            self.file.read_at(piece, offset).map_err(Failure::Io)?;
            mem.write_slice(piece, addr)
                .map_err(|_| Failure::Malformed("unwritable guest memory"))?;
            *written += n as u64;
            Ok(())
        })
    }

    fn write<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        sector: u64,
        segments: &[Segment],
    ) -> Result<(), Failure> {
        let len: u64 = segments.iter().map(|s| s.len).sum();
        let start = self.range(sector, len)?;
        let mut buf = bounce_buffer(len);
        self.changed(|| {
            for_each_chunk(segments, start, |addr, n, offset| {
                let piece = buf.get_mut(..n).ok_or(Failure::Malformed("bad chunk"))?;
                mem.read_slice(piece, addr)
                    .map_err(|_| Failure::Malformed("unreadable guest memory"))?;
                self.file.write_at(piece, offset).map_err(Failure::Io)
            })
        })
    }

    fn get_id<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        data: &Stream,
        written: &mut u64,
    ) -> Result<(), Failure> {
        // As much of the (zero-padded) ID as the driver gave room for.
        let mut id: &[u8] = &self.id;
        for segment in &data.segments {
            if id.is_empty() {
                break;
            }
            let n = usize::try_from(segment.len)
                .unwrap_or(usize::MAX)
                .min(id.len());
            let (piece, rest) = id.split_at(n);
            mem.write_slice(piece, segment.addr)
                .map_err(|_| Failure::Malformed("unwritable guest memory"))?;
            *written += n as u64;
            id = rest;
        }
        Ok(())
    }

    fn discard_or_zero<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        zeroes: bool,
        mut data: Stream,
    ) -> Result<(), Failure> {
        let (max_segments, max_sectors) = if zeroes {
            (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
        } else {
            (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
        };
        let len = data.len();
        if len == 0 || len % SEGMENT_LEN as u64 != 0 {
            return Err(Failure::Malformed("segments not a whole number"));
        }
        if len / SEGMENT_LEN as u64 > u64::from(max_segments) {
            return Err(Failure::Malformed("too many segments"));
        }
        // Every segment is checked before any is applied: all or nothing.
        let mut ranges = Vec::new();
        while !data.is_empty() {
            let mut raw = [0u8; SEGMENT_LEN];
            data.read_front(mem, &mut raw)?;
            let (sector, sectors, flags) = parse_segment(&raw);
            let allowed = if zeroes {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Err(Failure::Unsupported);
            }
            if sectors > max_sectors {
                return Err(Failure::Malformed("segment too long"));
            }
            let len = u64::from(sectors) << SECTOR_SHIFT;
            let offset = self.range(sector, len)?;
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if len > 0 {
                ranges.push((offset, len, !zeroes || unmap));
            }
        }
        self.changed(|| {
            for &(offset, len, unmap) in &ranges {
                if unmap {
                    // Reads back as zeroes too: WRITE_ZEROES with UNMAP may deallocate.
                    self.file.discard(offset, len)
                } else {
                    self.file.write_zeroes(offset, len)
                }
                .map_err(Failure::Io)?;
            }
            Ok(())
        })
    }

    /// Runs a change to the disk through the node's gate, then flushes it in write-through
    /// mode.
    fn changed(&self, change: impl FnOnce() -> Result<(), Failure>) -> Result<(), Failure> {
        self.gate.write(change).map_err(|_| Failure::Denied)??;
        if self.write_through {
            self.file.flush().map_err(Failure::Io)?;
        }
        Ok(())
    }
}

/// The request's type and sector.
fn parse_header(header: &[u8; HEADER_LEN]) -> (u32, u64) {
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = *header;
    (
        u32::from_le_bytes([t0, t1, t2, t3]),
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
    )
}

/// A DISCARD or WRITE_ZEROES segment: sector, number of sectors, flags.
fn parse_segment(raw: &[u8; SEGMENT_LEN]) -> (u64, u32, u32) {
    let [
        s0,
        s1,
        s2,
        s3,
        s4,
        s5,
        s6,
        s7,
        n0,
        n1,
        n2,
        n3,
        f0,
        f1,
        f2,
        f3,
    ] = *raw;
    (
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        u32::from_le_bytes([n0, n1, n2, n3]),
        u32::from_le_bytes([f0, f1, f2, f3]),
    )
}

/// Data in a direction the request type does not use.
fn no_data(stream: &Stream) -> Result<(), Failure> {
    if stream.is_empty() {
        Ok(())
    } else {
        Err(Failure::Malformed("data descriptor of the wrong direction"))
    }
}

/// The status byte's address: the last byte of the chain, if the last descriptor is
/// device-writable and in guest memory.
fn status_address<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: &[Descriptor],
) -> Option<GuestAddress> {
    let last = descriptors.last()?;
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    mem.check_range(addr, 1, Permissions::Write).then_some(addr)
}

/// Splits the chain into its readable and writable bytes (the status byte left out),
/// checking each descriptor against guest memory and the ordering rule.
fn layout<M: GuestMemory + ?Sized>(mem: &M, descriptors: &[Descriptor]) -> Result<Layout, Failure> {
    if descriptors.len() > MAX_DESCRIPTORS {
        return Err(Failure::Malformed("too many descriptors"));
    }
    let mut layout = Layout::default();
    let mut total = 0u64;
    let count = descriptors.len();
    for (index, descriptor) in descriptors.iter().enumerate() {
        let mut len = u64::from(descriptor.len());
        total += len;
        if index + 1 == count {
            // The status byte (status_address made sure it is there).
            len = len.saturating_sub(1);
        }
        if len == 0 {
            continue;
        }
        let writable = descriptor.is_write_only();
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let in_memory =
            usize::try_from(len).is_ok_and(|len| mem.check_range(descriptor.addr(), len, access));
        if !in_memory {
            return Err(Failure::Malformed("descriptor outside guest memory"));
        }
        let segment = Segment {
            addr: descriptor.addr(),
            len,
        };
        if writable {
            layout.writable.segments.push(segment);
        } else if layout.writable.is_empty() {
            layout.readable.segments.push(segment);
        } else {
            return Err(Failure::Malformed(
                "readable descriptor after a writable one",
            ));
        }
    }
    // The used ring's length is 32 bits (and VIRTIO caps a chain at 4 GiB).
    if total > u64::from(u32::MAX) {
        return Err(Failure::Malformed("chain longer than 4 GiB"));
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::disk::MemoryDisk;
    use crate::table::Table;

    const MEM_SIZE: u64 = 0x40_0000;
    /// Where the tests put headers, data and status bytes (above the queue's rings).
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x3f_0000;
    const DISK_SIZE: usize = 64 * 1024;

    struct Harness {
        mem: GuestMemoryMmap,
        disk: Arc<MemoryDisk>,
        device: Device,
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    fn harness_with(gate: WriteGate) -> Harness {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let disk = Arc::new(MemoryDisk::from_bytes(pattern(DISK_SIZE)));
        let device = Device::new(disk.clone(), "ivha-disk-0", gate);
        Harness { mem, disk, device }
    }

    fn harness() -> Harness {
        harness_with(WriteGate::open(0))
    }

    /// A descriptor: (address, length, device-writable).
    type Desc = (u64, u32, bool);

    impl Harness {
        fn header(&self, kind: u32, sector: u64) {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&kind.to_le_bytes());
            bytes[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
            bytes[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&bytes, GuestAddress(HDR)).unwrap();
            // A status the device must overwrite.
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        }

        fn run(&self, descs: &[Desc]) -> u32 {
            let queue = MockSplitQueue::new(&self.mem, 256);
            // Each run is a fresh queue over the same memory: restart its avail index.
            self.mem
                .write_obj(0u16, queue.avail_addr().unchecked_add(2))
                .unwrap();
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .map(|&(addr, len, writable)| {
                    let flags = if writable {
                        VRING_DESC_F_WRITE as u16
                    } else {
                        0
                    };
                    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
                })
                .collect();
            let chain = queue.build_desc_chain(&raw).unwrap();
            self.device.execute(chain)
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }

        fn segment(&self, sector: u64, sectors: u32, flags: u32) {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&sector.to_le_bytes());
            bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
            bytes[12..].copy_from_slice(&flags.to_le_bytes());
            self.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn a_read_copies_the_sectors_into_the_guest() {
        let h = harness();
        h.header(VIRTIO_BLK_T_IN, 3);
        let len = h.run(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
        assert_eq!(len, 1025);
        assert_eq!(h.status(), OK);
        assert_eq!(h.guest(DATA, 1024), pattern(DISK_SIZE)[1536..2560]);
    }

    #[test]
    fn a_read_into_several_segments_and_a_merged_status_works() {
        let h = harness();
        h.header(VIRTIO_BLK_T_IN, 0);
        // Data split 100/412, and the last data bytes share the status descriptor.
        let len = h.run(&[
            (HDR, 16, false),
            (DATA, 100, true),
            (DATA + 0x1000, 412, true),
            (STATUS - 512, 513, true),
        ]);
        assert_eq!(len, 1025);
        assert_eq!(h.status(), OK);
        let disk = pattern(DISK_SIZE);
        assert_eq!(h.guest(DATA, 100), disk[..100]);
        assert_eq!(h.guest(DATA + 0x1000, 412), disk[100..512]);
        assert_eq!(h.guest(STATUS - 512, 512), disk[512..1024]);
    }

    #[test]
    fn a_write_lands_on_the_disk() {
        let h = harness();
        h.header(VIRTIO_BLK_T_OUT, 2);
        h.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        // The header and the data in one descriptor.
        h.mem
            .write_slice(&[0x5a; 512], GuestAddress(HDR + 16))
            .unwrap();
        let len = h.run(&[
            (HDR, 16 + 512, false),
            (DATA, 512, false),
            (STATUS, 1, true),
        ]);
        assert_eq!(len, 1);
        assert_eq!(h.status(), OK);
        let mut expected = pattern(DISK_SIZE);
        expected[1024..2048].fill(0x5a);
        assert_eq!(h.disk.contents(), expected);
        assert_eq!(h.disk.flush_count(), 0);
    }

    #[test]
    fn a_write_through_device_flushes_every_write() {
        let mut h = harness();
        h.device.set_write_through(true);
        h.header(VIRTIO_BLK_T_OUT, 0);
        h.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(h.status(), OK);
        assert_eq!(h.disk.flush_count(), 1);
    }

    #[test]
    fn a_flush_syncs_the_disk() {
        let h = harness();
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.run(&[(HDR, 16, false), (STATUS, 1, true)]), 1);
        assert_eq!(h.status(), OK);
        assert_eq!(h.disk.flush_count(), 1);
    }

    #[test]
    fn get_id_returns_the_zero_padded_serial() {
        let h = harness();
        h.header(VIRTIO_BLK_T_GET_ID, 0);
        h.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
        assert_eq!(
            h.run(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]),
            21
        );
        assert_eq!(h.status(), OK);
        let mut expected = b"ivha-disk-0".to_vec();
        expected.resize(20, 0);
        assert_eq!(h.guest(DATA, 20), expected);

        // A long serial is cut; a short buffer gets what fits.
        let device = Device::new(
            h.disk.clone(),
            "0123456789abcdefghijKLMN",
            WriteGate::open(0),
        );
        assert_eq!(device.id(), b"0123456789abcdefghij");
        assert_eq!(
            h.run(&[(HDR, 16, false), (DATA + 100, 8, true), (STATUS, 1, true)]),
            9
        );
        assert_eq!(h.guest(DATA + 100, 8), b"ivha-dis");
    }

    #[test]
    fn discard_and_write_zeroes_zero_the_range() {
        let h = harness();
        h.header(VIRTIO_BLK_T_DISCARD, 0);
        h.segment(1, 2, 0);
        assert_eq!(
            h.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]),
            1
        );
        assert_eq!(h.status(), OK);
        let mut expected = pattern(DISK_SIZE);
        expected[512..1536].fill(0);
        assert_eq!(h.disk.contents(), expected);

        for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
            h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
            h.segment(10 + u64::from(flags), 1, flags);
            h.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
            assert_eq!(h.status(), OK);
        }
        expected[5120..6144].fill(0);
        assert_eq!(h.disk.contents(), expected);
    }

    #[test]
    fn discard_and_write_zeroes_refuse_bad_flags_counts_and_ranges() {
        let h = harness();
        let cases: &[(u32, u64, u32, u32, u32, u8)] = &[
            // (type, sector, sectors, flags, segment bytes, expected status)
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                1,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                16,
                UNSUPP,
            ),
            (VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 2, 16, UNSUPP),
            (VIRTIO_BLK_T_DISCARD, 0, 1, 0, 32, IOERR),
            (VIRTIO_BLK_T_DISCARD, 0, 1, 0, 15, IOERR),
            (VIRTIO_BLK_T_DISCARD, 127, 2, 0, 16, IOERR),
            (VIRTIO_BLK_T_WRITE_ZEROES, u64::MAX, 2, 0, 16, IOERR),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                MAX_WRITE_ZEROES_SECTORS + 1,
                0,
                16,
                IOERR,
            ),
        ];
        for &(kind, sector, sectors, flags, bytes, status) in cases {
            h.header(kind, 0);
            h.segment(sector, sectors, flags);
            h.run(&[(HDR, 16, false), (DATA, bytes, false), (STATUS, 1, true)]);
            assert_eq!(
                h.status(),
                status,
                "{kind} {sector} {sectors} {flags} {bytes}"
            );
        }
        assert_eq!(h.disk.contents(), pattern(DISK_SIZE));
    }

    #[test]
    fn an_unknown_type_is_unsupported() {
        let h = harness();
        for kind in [2, 3, 14, 0x8000_0001, u32::MAX] {
            h.header(kind, 0);
            assert_eq!(h.run(&[(HDR, 16, false), (STATUS, 1, true)]), 1);
            assert_eq!(h.status(), UNSUPP);
        }
    }

    #[test]
    fn requests_past_the_end_fail() {
        let h = harness();
        let last = (DISK_SIZE / 512) as u64 - 1;
        for (kind, sector, len) in [
            (VIRTIO_BLK_T_IN, last, 1024),
            (VIRTIO_BLK_T_IN, last + 1, 512),
            (VIRTIO_BLK_T_IN, u64::MAX, 512),
            (VIRTIO_BLK_T_OUT, last, 1024),
            (VIRTIO_BLK_T_OUT, u64::MAX / 512, 512),
            // Not a whole sector.
            (VIRTIO_BLK_T_OUT, 0, 100),
        ] {
            h.header(kind, sector);
            let writable = kind == VIRTIO_BLK_T_IN;
            assert_eq!(
                h.run(&[(HDR, 16, false), (DATA, len, writable), (STATUS, 1, true)]),
                1
            );
            assert_eq!(h.status(), IOERR, "{kind} {sector} {len}");
        }
        // The last sector itself is in range.
        h.header(VIRTIO_BLK_T_IN, last);
        h.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(h.status(), OK);
        assert_eq!(h.disk.contents(), pattern(DISK_SIZE));
    }

    fn fenced_gate(dir: &Path) -> WriteGate {
        let table = Table::load(&dir.join("r.json"), &["d".to_owned()]).unwrap();
        let gate = table.gate("d", 4).unwrap();
        assert!(!gate.may_write());
        gate
    }

    #[test]
    fn a_fenced_node_cannot_change_the_disk_but_can_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let h = harness_with(fenced_gate(dir.path()));
        h.header(VIRTIO_BLK_T_OUT, 0);
        h.mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
        h.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(h.status(), IOERR);
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            h.header(kind, 0);
            h.segment(0, 1, 0);
            h.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
            assert_eq!(h.status(), IOERR);
        }
        assert_eq!(h.disk.contents(), pattern(DISK_SIZE));

        h.header(VIRTIO_BLK_T_IN, 0);
        h.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(h.status(), OK);
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        h.run(&[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(h.status(), OK);
    }

    #[test]
    fn an_io_error_is_reported_as_ioerr() {
        let h = harness();
        h.disk.set_failing(true);
        for (kind, writable) in [(VIRTIO_BLK_T_IN, true), (VIRTIO_BLK_T_OUT, false)] {
            h.header(kind, 0);
            h.run(&[(HDR, 16, false), (DATA, 512, writable), (STATUS, 1, true)]);
            assert_eq!(h.status(), IOERR);
        }
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        h.run(&[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(h.status(), IOERR);
        h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        h.segment(0, 1, 0);
        h.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
        assert_eq!(h.status(), IOERR);
    }

    #[test]
    fn malformed_chains_fail_with_ioerr() {
        let h = harness();
        let out_of_memory = MEM_SIZE + 0x1000;
        let cases: &[(u32, &[Desc])] = &[
            // Header too short.
            (VIRTIO_BLK_T_IN, &[(HDR, 8, false), (STATUS, 1, true)]),
            // No header at all.
            (VIRTIO_BLK_T_IN, &[(STATUS, 1, true)]),
            // Header outside guest memory.
            (
                VIRTIO_BLK_T_IN,
                &[(out_of_memory, 16, false), (STATUS, 1, true)],
            ),
            // Data outside guest memory, or straddling its end.
            (
                VIRTIO_BLK_T_IN,
                &[
                    (HDR, 16, false),
                    (out_of_memory, 512, true),
                    (STATUS, 1, true),
                ],
            ),
            (
                VIRTIO_BLK_T_OUT,
                &[
                    (HDR, 16, false),
                    (MEM_SIZE - 256, 512, false),
                    (STATUS, 1, true),
                ],
            ),
            // Data of the wrong direction.
            (
                VIRTIO_BLK_T_IN,
                &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            ),
            (
                VIRTIO_BLK_T_OUT,
                &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            ),
            (
                VIRTIO_BLK_T_FLUSH,
                &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            ),
            (
                VIRTIO_BLK_T_GET_ID,
                &[(HDR, 16, false), (DATA, 20, false), (STATUS, 1, true)],
            ),
            // A readable descriptor after a writable one.
            (
                VIRTIO_BLK_T_IN,
                &[
                    (HDR, 16, false),
                    (DATA, 512, true),
                    (DATA, 512, false),
                    (STATUS, 1, true),
                ],
            ),
        ];
        for &(kind, descs) in cases {
            h.header(kind, 0);
            assert_eq!(h.run(descs), 1, "{descs:?}");
            assert_eq!(h.status(), IOERR, "{descs:?}");
        }
        // Too many descriptors.
        h.header(VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![(HDR, 16, false)];
        descs.extend((0..SEG_MAX as u64 + 1).map(|i| (DATA + i * 512, 512, true)));
        descs.push((STATUS, 1, true));
        h.run(&descs);
        assert_eq!(h.status(), IOERR);
        // At the limit it works.
        descs.remove(1);
        assert_eq!(h.run(&descs), SEG_MAX * 512 + 1);
        assert_eq!(h.status(), OK);
        assert_eq!(h.disk.contents(), pattern(DISK_SIZE));
    }

    #[test]
    fn a_chain_without_a_usable_status_byte_completes_with_nothing_written() {
        let h = harness();
        h.header(VIRTIO_BLK_T_IN, 0);
        for descs in [
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)][..],
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 0, true)],
            &[(HDR, 16, false), (DATA, 512, true), (MEM_SIZE, 1, true)],
            &[(HDR, 16, false), (DATA, 512, true), (u64::MAX, 1, true)],
            &[(HDR, 16, false), (DATA, 512, true), (u64::MAX - 1, 3, true)],
            // Over 4 GiB: virtio-queue ends the chain before the status descriptor.
            &[(HDR, 16, false), (DATA, u32::MAX, true), (STATUS, 1, true)],
        ] {
            assert_eq!(h.run(descs), 0);
            assert_eq!(h.status(), 0xff);
        }
    }

    /// xorshift64*: enough randomness for layouts, and reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_chains_never_panic() {
        let h = harness();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let kinds = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ];
        let mut completed = 0;
        for _ in 0..5000 {
            let kind = if rng.below(8) == 0 {
                rng.next() as u32
            } else {
                kinds[rng.below(kinds.len() as u64) as usize]
            };
            let sector = match rng.below(3) {
                0 => rng.below(DISK_SIZE as u64 / 512 + 2),
                1 => rng.next(),
                _ => 0,
            };
            h.header(kind, sector);
            // Random segments and random bytes in the data area.
            let mut junk = [0u8; 64];
            junk.iter_mut().for_each(|b| *b = rng.next() as u8);
            if rng.below(2) == 0 {
                h.segment(rng.below(200), rng.below(300) as u32, rng.below(4) as u32);
                h.mem
                    .write_slice(&junk[..16], GuestAddress(DATA + 16))
                    .unwrap();
            } else {
                h.mem.write_slice(&junk, GuestAddress(DATA)).unwrap();
            }
            let most = if rng.below(20) == 0 { 140 } else { 5 };
            let count = 1 + rng.below(most);
            let descs: Vec<Desc> = (0..count)
                .map(|i| {
                    let addr = match rng.below(10) {
                        0 => rng.next(),
                        1 => MEM_SIZE - rng.below(1024),
                        2 if i == 0 => HDR,
                        _ => DATA + rng.below(0x2000),
                    };
                    let len = match rng.below(8) {
                        0 => 0,
                        1 => 1,
                        2 => 16,
                        3 => 512,
                        4 => 512 * rng.below(10) as u32,
                        5 => rng.next() as u32,
                        _ => rng.below(2048) as u32,
                    };
                    (addr, len, rng.below(2) == 0)
                })
                .collect();
            let len = h.run(&descs);
            if len > 0 {
                completed += 1;
                // Unless virtio-queue cut the chain (past 4 GiB), the status is the last
                // descriptor's last byte.
                let total: u64 = descs.iter().map(|&(_, len, _)| u64::from(len)).sum();
                let &(addr, last_len, _) = descs.last().unwrap();
                if total <= u64::from(u32::MAX) {
                    let status: u8 = h
                        .mem
                        .read_obj(GuestAddress(addr + u64::from(last_len) - 1))
                        .unwrap();
                    assert!(status <= UNSUPP);
                }
            }
        }
        // The generator reaches the interesting paths, not just malformed chains.
        assert!(completed > 100, "{completed}");
    }
}
