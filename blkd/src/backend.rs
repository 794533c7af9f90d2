//! The vhost-user-blk device: features, config space and queue processing for one QEMU
//! connection ([`BlockBackend`]), and the socket loop that serves QEMU connection after
//! connection ([`serve`]).

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{
    VhostUserBackendMut, VhostUserDaemon, VhostUserHandlerError, VringRwLock, VringState, VringT,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::disk::BlockFile;
use crate::request::{
    DISCARD_SECTOR_ALIGNMENT, Device, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, SECTOR_SIZE, SEG_MAX,
};
use crate::table::WriteGate;

/// The largest queue the driver may set up (QEMU's vhost-user-blk default is 128).
pub const MAX_QUEUE_SIZE: usize = 1024;

/// The config space's length: `struct virtio_blk_config` up to `write_zeroes_may_unmap` and
/// its padding (the secure erase and zoned fields belong to features not offered).
pub const CONFIG_SIZE: usize = 60;

/// Offsets in `struct virtio_blk_config` (VIRTIO 1.2, 5.2.4).
mod offset {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const GEOMETRY: usize = 16;
    pub const BLK_SIZE: usize = 20;
    pub const TOPOLOGY: usize = 24;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// The largest config access vhost-user allows (`VHOST_USER_CONFIG_SIZE`).
const MAX_CONFIG_ACCESS: usize = 0x1000;

/// One QEMU connection's virtio-blk device.
///
/// Each queue is processed synchronously, in order: a request is executed and completed
/// before the next one is popped, so requests complete in the order the guest sent them.
/// The daemon keeps no state about requests in flight (no `INFLIGHT_SHMFD`): if it dies,
/// QEMU reconnects and sends again every request after the used index, and executing one
/// twice is harmless (reads, writes of given bytes, flushes, discards and zeroing are all
/// idempotent).
#[derive(Debug)]
pub struct BlockBackend {
    device: Device,
    queues: usize,
    event_idx: bool,
    /// The guest's choice through CONFIG_WCE (the config's `writeback` byte).
    writeback: bool,
    /// Whether the driver took VIRTIO_BLK_F_FLUSH: without it, writes must be durable when
    /// they complete.
    flush_acked: bool,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
}

impl BlockBackend {
    /// A device serving `file` with `queues` request queues (at least one); `serial` is
    /// what GET_ID answers, and every change goes through `gate`.
    pub fn new(file: Arc<dyn BlockFile>, serial: String, gate: WriteGate, queues: usize) -> Self {
        Self {
            device: Device::new(file, &serial, gate),
            queues: queues.max(1),
            event_idx: false,
            writeback: true,
            flush_acked: true,
            mem: None,
        }
    }

    /// The device's config space, `struct virtio_blk_config` in little-endian.
    pub fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, bytes: &[u8]| {
            if let Some(to) = config.get_mut(at..at + bytes.len()) {
                to.copy_from_slice(bytes);
            }
        };
        put(offset::CAPACITY, &self.device.capacity().to_le_bytes());
        // No SIZE_MAX, GEOMETRY or TOPOLOGY feature: the guest ignores these fields.
        put(offset::SIZE_MAX, &0u32.to_le_bytes());
        put(offset::SEG_MAX, &SEG_MAX.to_le_bytes());
        put(offset::GEOMETRY, &[0; 4]);
        put(offset::BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
        put(offset::TOPOLOGY, &[0; 8]);
        put(
            offset::WRITEBACK,
            &[u8::from(self.writeback && self.flush_acked)],
        );
        let queues = u16::try_from(self.queues).unwrap_or(u16::MAX);
        put(offset::NUM_QUEUES, &queues.to_le_bytes());
        put(
            offset::MAX_DISCARD_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(offset::MAX_DISCARD_SEG, &MAX_DISCARD_SEG.to_le_bytes());
        put(
            offset::DISCARD_SECTOR_ALIGNMENT,
            &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
        );
        put(
            offset::MAX_WRITE_ZEROES_SECTORS,
            &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
        );
        put(
            offset::MAX_WRITE_ZEROES_SEG,
            &MAX_WRITE_ZEROES_SEG.to_le_bytes(),
        );
        put(offset::WRITE_ZEROES_MAY_UNMAP, &[1]);
        config
    }

    /// The request path's view of the device (for tests and reports).
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn update_write_mode(&mut self) {
        self.device
            .set_write_through(!(self.writeback && self.flush_acked));
    }

    /// Pops and executes every available request of `vring`, then signals the guest if it
    /// asked to be. Returns whether any request was completed.
    fn process_queue(
        &self,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        vring: &mut VringState,
    ) -> bool {
        let mut used_any = false;
        while let Some(chain) = vring.get_queue_mut().pop_descriptor_chain(mem.memory()) {
            let head = chain.head_index();
            let len = self.device.execute(chain);
            if let Err(error) = vring.add_used(head, len) {
                // The used ring is not in guest memory: nothing more can complete.
                log::error!("cannot complete request {head}: {error}");
                break;
            }
            used_any = true;
        }
        if used_any {
            let needs = if self.event_idx {
                vring.needs_notification().unwrap_or(true)
            } else {
                true
            };
            if needs {
                if let Err(error) = vring.signal_used_queue() {
                    log::error!("cannot signal the guest: {error}");
                }
            }
        }
        used_any
    }
}

impl VhostUserBackendMut for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.queues > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        features
    }

    fn acked_features(&mut self, features: u64) {
        // VIRTIO 1.2, 5.2.5.1: without FLUSH the device must write through.
        self.flush_acked = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.update_write_mode();
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&mut self) {
        self.writeback = true;
        self.update_write_mode();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// The bytes `offset..offset + size` of the config space. Bytes past its end read as
    /// zeroes: vhost answers a reply of any other length as a failure, and QEMU asks for
    /// the size its own headers give the struct, which depends on its version.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        log::debug!("config read: {size} bytes at {offset}");
        let config = self.config_space();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let size = usize::try_from(size)
            .unwrap_or(usize::MAX)
            .min(MAX_CONFIG_ACCESS);
        let mut bytes: Vec<u8> = config
            .get(start.min(CONFIG_SIZE)..start.saturating_add(size).min(CONFIG_SIZE))
            .unwrap_or_default()
            .to_vec();
        bytes.resize(size, 0);
        bytes
    }

    /// Only the `writeback` byte is writable (CONFIG_WCE); other writes are ignored.
    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let index = usize::try_from(offset)
            .ok()
            .and_then(|start| offset::WRITEBACK.checked_sub(start));
        if let Some(&writeback) = index.and_then(|i| buf.get(i)) {
            self.writeback = writeback != 0;
            self.update_write_mode();
            log::info!(
                "the guest set the write cache to {}",
                if self.writeback {
                    "writeback"
                } else {
                    "write-through"
                }
            );
        }
        Ok(())
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    /// A fresh pair per worker thread: the daemon keeps the notifier and signals it when
    /// the connection ends, so the thread exits (without one, dropping the daemon would
    /// wait for it forever).
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(error) => {
                log::error!("cannot create an exit event: {error}");
                None
            }
        }
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error here would end the worker thread for good: log and carry on instead.
        if evset != EventSet::IN {
            log::warn!("unexpected event set {evset:?} on queue {device_event}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            log::warn!("event for unknown queue {device_event}");
            return Ok(());
        };
        let Some(mem) = self.mem.clone() else {
            log::warn!("queue {device_event} kicked before the guest memory was set");
            return Ok(());
        };
        let mut vring = vring.get_mut();
        if self.event_idx {
            // The queue reads the avail index once per pop: after re-enabling notifications,
            // look again until no request is left, or one added meanwhile would wait for a
            // kick that never comes.
            loop {
                if let Err(error) = vring.enable_notification() {
                    log::error!("cannot enable notifications on queue {device_event}: {error}");
                    break;
                }
                if !self.process_queue(&mem, &mut vring) {
                    break;
                }
            }
        } else {
            self.process_queue(&mem, &mut vring);
        }
        Ok(())
    }
}

/// vhost-user-backend's errors (its type implements no `std::error::Error`).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot set up the device's queues")]
    Setup(#[source] VhostUserHandlerError),
    #[error("the vhost-user socket failed")]
    Socket(#[source] VhostUserError),
    #[error("cannot start the connection's thread")]
    Start(#[source] io::Error),
    #[error("the connection's thread panicked")]
    Panicked,
    #[error("a vhost-user request failed")]
    Request(#[source] VhostUserError),
}

impl From<vhost_user_backend::Error> for DaemonError {
    fn from(error: vhost_user_backend::Error) -> Self {
        use vhost_user_backend::Error as E;
        match error {
            E::NewVhostUserHandler(e) => DaemonError::Setup(e),
            E::CreateBackendListener(e)
            | E::CreateBackendReqHandler(e)
            | E::CreateVhostUserListener(e) => DaemonError::Socket(e),
            E::StartDaemon(e) => DaemonError::Start(e),
            E::WaitDaemon(_) => DaemonError::Panicked,
            E::HandleRequest(e) => DaemonError::Request(e),
        }
    }
}

/// Errors serving a socket.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{} exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: VhostUserError,
    },
    #[error("cannot serve the device on {}", path.display())]
    Daemon {
        path: PathBuf,
        #[source]
        source: DaemonError,
    },
}

/// Removes a socket file left by an earlier daemon; refuses to remove anything else.
fn remove_stale_socket(socket: &Path) -> Result<(), ServeError> {
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(socket).map_err(|source| ServeError::RemoveStale {
                path: socket.to_owned(),
                source,
            })
        }
        Ok(_) => Err(ServeError::NotASocket {
            path: socket.to_owned(),
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServeError::RemoveStale {
            path: socket.to_owned(),
            source,
        }),
    }
}

/// Serves vhost-user-blk on `socket`, one QEMU connection at a time, with a device from
/// `make_backend` for each (a fresh device: nothing of a connection's negotiation carries
/// over). When QEMU disconnects (it stopped or crashed, or the connection broke), the next
/// connection is accepted: QEMU reconnects by itself with
/// `-chardev socket,...,reconnect=1`. Returns only on an error that is not one
/// connection's: the socket or the daemon's set-up failing.
pub fn serve<F>(socket: &Path, mut make_backend: F) -> Result<(), ServeError>
where
    F: FnMut() -> BlockBackend,
{
    remove_stale_socket(socket)?;
    let mut listener = Listener::new(socket, false).map_err(|source| ServeError::Listen {
        path: socket.to_owned(),
        source,
    })?;
    let daemon_error = |source: vhost_user_backend::Error| ServeError::Daemon {
        path: socket.to_owned(),
        source: source.into(),
    };
    loop {
        let backend = Arc::new(RwLock::new(make_backend()));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vhost-user-blk".to_owned(), backend, mem)
            .map_err(daemon_error)?;
        daemon.start(&mut listener).map_err(daemon_error)?;
        log::info!("{}: QEMU connected", socket.display());
        match daemon.wait().map_err(DaemonError::from) {
            Ok(()) => log::info!("{}: QEMU disconnected", socket.display()),
            Err(DaemonError::Request(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => {
                log::info!("{}: QEMU disconnected", socket.display());
            }
            Err(error) => log::warn!(
                "{}: the connection ended: {}",
                socket.display(),
                wire::error_chain::one_line(&error)
            ),
        }
        // Dropping the daemon stops its queue thread before the next connection's starts.
        drop(daemon);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::disk::MemoryDisk;

    fn backend(queues: usize) -> BlockBackend {
        let disk = Arc::new(MemoryDisk::new(16 << 20));
        BlockBackend::new(disk, "serial".to_owned(), WriteGate::open(0), queues)
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn the_config_space_has_the_standard_layout() {
        let config = backend(4).config_space();
        assert_eq!(
            u64::from_le_bytes(config[0..8].try_into().unwrap()),
            (16 << 20) / 512
        );
        assert_eq!(u32_at(&config, 8), 0);
        assert_eq!(u32_at(&config, 12), SEG_MAX);
        assert_eq!(u32_at(&config, 20), 512);
        assert_eq!(config[32], 1);
        assert_eq!(u16::from_le_bytes([config[34], config[35]]), 4);
        assert_eq!(u32_at(&config, 36), MAX_DISCARD_SECTORS);
        assert_eq!(u32_at(&config, 40), 1);
        assert_eq!(u32_at(&config, 44), DISCARD_SECTOR_ALIGNMENT);
        assert_eq!(u32_at(&config, 48), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(u32_at(&config, 52), 1);
        assert_eq!(config[56], 1);
        assert_eq!(&config[57..], &[0, 0, 0]);
        assert!(
            config[16..20]
                .iter()
                .chain(&config[24..32])
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn get_config_returns_the_asked_range_and_zeroes_past_the_end() {
        let b = backend(1);
        let config = b.config_space();
        assert_eq!(b.get_config(0, 57), config[..57]);
        assert_eq!(b.get_config(0, 60), config[..]);
        assert_eq!(b.get_config(32, 1), [1]);
        let past = b.get_config(56, 8);
        assert_eq!(past, [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.get_config(1000, 4), [0; 4]);
        assert_eq!(b.get_config(u32::MAX, u32::MAX).len(), MAX_CONFIG_ACCESS);
    }

    #[test]
    fn the_write_cache_follows_config_wce_and_flush() {
        let mut b = backend(1);
        assert!(!b.device().write_through());
        b.set_config(32, &[0]).unwrap();
        assert!(b.device().write_through());
        assert_eq!(b.get_config(32, 1), [0]);
        // Writes elsewhere are ignored, a write covering the byte counts.
        b.set_config(0, &[9; 8]).unwrap();
        b.set_config(33, &[1]).unwrap();
        b.set_config(u32::MAX, &[1]).unwrap();
        assert!(b.device().write_through());
        b.set_config(30, &[0, 0, 1, 0]).unwrap();
        assert!(!b.device().write_through());
        // A driver without FLUSH gets write-through whatever the byte says.
        b.acked_features(b.features() & !(1 << VIRTIO_BLK_F_FLUSH));
        assert!(b.device().write_through());
        assert_eq!(b.get_config(32, 1), [0]);
        b.acked_features(b.features());
        assert!(!b.device().write_through());
        b.set_config(32, &[0]).unwrap();
        b.reset_device();
        assert!(!b.device().write_through());
    }

    #[test]
    fn the_features_are_the_ones_offered() {
        let single = backend(1);
        let features = single.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(features & (1 << bit), 0, "bit {bit}");
        }
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert_eq!(features & (1 << VIRTIO_BLK_F_MQ), 0);
        let expected = (1u64 << 32) | (0b11 << 28) | (1 << 30) | (1 << 2) | (1 << 6);
        let expected = expected | (1 << 9) | (1 << 11) | (1 << 13) | (1 << 14);
        assert_eq!(features, expected);

        let multi = backend(4);
        assert_eq!(multi.features(), features | (1 << VIRTIO_BLK_F_MQ));
        assert_eq!(multi.num_queues(), 4);
        assert_eq!(backend(0).num_queues(), 1);
        assert_eq!(
            single.protocol_features(),
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
        );
        assert!(single.exit_event(0).is_some());
    }

    #[test]
    fn a_kick_completes_every_available_request_in_order() {
        for event_idx in [false, true] {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
            let atomic = GuestMemoryAtomic::new(mem.clone());
            let queue = MockSplitQueue::new(&mem, 16);
            // Three reads of one sector each: header, data, status.
            let mut descs = Vec::new();
            for i in 0..3u64 {
                let base = 0x10_0000 + i * 0x1000;
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
                header[8..].copy_from_slice(&i.to_le_bytes());
                mem.write_slice(&header, GuestAddress(base)).unwrap();
                let next = (i * 3) as u16;
                let write = VRING_DESC_F_WRITE as u16;
                let next_flag = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
                descs.push(RawDescriptor::from(Descriptor::new(
                    base,
                    16,
                    next_flag,
                    next + 1,
                )));
                descs.push(RawDescriptor::from(Descriptor::new(
                    base + 0x100,
                    512,
                    next_flag | write,
                    next + 2,
                )));
                descs.push(RawDescriptor::from(Descriptor::new(
                    base + 0x400,
                    1,
                    write,
                    0,
                )));
            }
            queue.add_desc_chains(&descs, 0).unwrap();

            let vring = VringRwLock::new(atomic.clone(), 16).unwrap();
            vring.set_queue_size(16);
            vring
                .set_queue_info(
                    queue.desc_table_addr().raw_value(),
                    queue.avail_addr().raw_value(),
                    queue.used_addr().raw_value(),
                )
                .unwrap();
            vring.set_queue_event_idx(event_idx);
            vring.set_queue_ready(true);
            vring.set_enabled(true);

            let mut b = backend(1);
            b.set_event_idx(event_idx);
            b.update_memory(atomic).unwrap();
            b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
                .unwrap();

            assert_eq!(vring.queue_used_idx().unwrap(), 3);
            for i in 0..3u64 {
                let base = 0x10_0000 + i * 0x1000;
                let status: u8 = mem.read_obj(GuestAddress(base + 0x400)).unwrap();
                assert_eq!(u32::from(status), VIRTIO_BLK_S_OK);
                let used = queue.used().ring().ref_at(i as usize).unwrap().load();
                assert_eq!((used.id(), used.len()), ((i * 3) as u32, 513));
            }
            // Unknown queues and odd events are ignored, not fatal.
            b.handle_event(7, EventSet::IN, std::slice::from_ref(&vring), 0)
                .unwrap();
            b.handle_event(0, EventSet::OUT, std::slice::from_ref(&vring), 0)
                .unwrap();
        }
    }

    #[test]
    fn serve_refuses_to_remove_a_file_that_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"keep me").unwrap();
        assert!(matches!(
            serve(&path, || backend(1)),
            Err(ServeError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn serve_replaces_a_stale_socket_and_accepts_connection_after_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blk.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = made.clone();
        let server_path = path.clone();
        std::thread::spawn(move || {
            serve(&server_path, || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                backend(1)
            })
        });
        // Each connection that comes and goes is followed by a fresh device for the next.
        for expected in 2..=4 {
            let stream = loop {
                match std::os::unix::net::UnixStream::connect(&path) {
                    Ok(stream) => break stream,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            drop(stream);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while made.load(std::sync::atomic::Ordering::SeqCst) < expected {
                assert!(std::time::Instant::now() < deadline, "no new device");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
