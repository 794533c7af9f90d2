//! The storage daemon's virtio-blk request path (`blkd::request::Device::execute`): what a
//! guest puts in a descriptor chain and the memory it points at.
//! Input: byte 0 picks the device (bit 0: the node's key is gone, as after a preemption;
//! bit 1: every disk call fails), 16 bytes of request header, 32 bytes for the data area,
//! then descriptors of 8 bytes each (where: header, data, status, memory's end or a wild
//! address; a 16-bit offset; a 32-bit length; bit 0 of the last byte: device-writable).
//! Properties: no panic; the bytes reported written fit in the chain's writable bytes;
//! a completed request's status (the last byte of its last descriptor) is OK, IOERR or
//! UNSUPP; a node without a key never changes the disk.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use blkd::disk::{BlockFile, MemoryDisk};
use blkd::request::Device;
use blkd::table::{Table, WriteGate};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 0x40_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x3f_0000;
const DISK_SIZE: usize = 64 * 1024;
const MAX_DESCRIPTORS: usize = 140;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if rest.len() < 48 {
        return;
    }
    let (header, rest) = rest.split_at(16);
    let (junk, descs) = rest.split_at(32);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
    else {
        return;
    };
    let disk = Arc::new(MemoryDisk::from_bytes(
        (0..DISK_SIZE).map(|i| (i * 7) as u8).collect(),
    ));
    disk.set_failing(mode & 2 != 0);
    let gate = if mode & 1 != 0 {
        // No key: what a preempted node's gate is.
        match Table::load(Path::new("/nonexistent/reservations.json"), &["d".to_owned()])
            .ok()
            .and_then(|table| table.gate("d", 0))
        {
            Some(gate) => gate,
            None => return,
        }
    } else {
        WriteGate::open(0)
    };
    let device = Device::new(disk.clone() as Arc<dyn BlockFile>, "ivha-fuzz", gate);
    let before = disk.contents();
    if mem.write_slice(header, GuestAddress(HDR)).is_err()
        || mem.write_slice(junk, GuestAddress(DATA)).is_err()
        || mem.write_obj(0xffu8, GuestAddress(STATUS)).is_err()
    {
        return;
    }
    let descriptors: Vec<(u64, u32, bool)> = descs
        .chunks_exact(8)
        .take(MAX_DESCRIPTORS)
        .map(|d| {
            let offset = u64::from(u16::from_le_bytes([d[1], d[2]]));
            let len = u32::from_le_bytes([d[3], d[4], d[5], d[6]]);
            let addr = match d[0] % 5 {
                0 => HDR + offset % 16,
                1 => DATA + offset,
                2 => STATUS,
                3 => MEM_SIZE.saturating_sub(offset),
                _ => u64::from(len).wrapping_mul(0x9e37_79b9_7f4a_7c15) | offset,
            };
            (addr, len, d[7] & 1 != 0)
        })
        .collect();
    if descriptors.is_empty() {
        return;
    }
    let queue = MockSplitQueue::new(&mem, 256);
    let raw: Vec<RawDescriptor> = descriptors
        .iter()
        .map(|&(addr, len, writable)| {
            let flags = if writable {
                virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
        })
        .collect();
    let Ok(chain) = queue.build_desc_chain(&raw) else {
        return;
    };
    let written = device.execute(chain);
    let writable: u64 = descriptors
        .iter()
        .filter(|d| d.2)
        .map(|d| u64::from(d.1))
        .sum();
    assert!(u64::from(written) <= writable, "{written} > {writable}");
    // A completed request's status is the last byte of its last descriptor (unless
    // virtio-queue cut the chain, past 4 GiB in all).
    let total: u64 = descriptors.iter().map(|d| u64::from(d.1)).sum();
    if written > 0
        && total <= u64::from(u32::MAX)
        && let Some(&(addr, len, true)) = descriptors.last()
        && len > 0
        && let Ok(status) = mem.read_obj::<u8>(GuestAddress(addr + u64::from(len) - 1))
    {
        assert!(status <= 2, "status {status}");
    }
    if mode & 1 != 0 {
        assert!(disk.contents() == before, "a node without a key changed the disk");
    }
});
