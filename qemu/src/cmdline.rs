//! Builds the argument list of `qemu-system-x86_64` for one ivha guest.
//!
//! Everything QEMU parses as a comma-separated option string (`-object`, `-drive`,
//! `-chardev`, `-qmp`, `-device`, `-name`) gets its user-supplied values escaped by doubling
//! commas. `-kernel`, `-initrd` and `-append` are taken literally by QEMU 7.2, so they are
//! passed through unchanged (a doubled comma there would become part of the file name).
//!
//! Facts checked against QEMU 7.2 and encoded here:
//! - `ivshmem-plain` registers its memory as a PCI BAR, which must be a power of two; QEMU
//!   aborts on an assertion otherwise. `memory-backend-file` rounds `size` up to the page
//!   size, and refuses a non-empty backing file whose length differs from `size` (it only
//!   resizes empty or missing files). Hence: a power of two, at least 4 KiB.
//! - `memory-backend-file ... readonly=on` is accepted and maps the file read-only.
//! - Two QEMU processes attaching one raw image read-write need `share-rw=on` on the device
//!   (or `file.locking=off` on the drive); shared disks get both.
//! - `-accel tcg,thread=multi` is accepted for x86 guests (multi-threaded TCG).

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use command_fds::{CommandFdExt, FdMapping};

use crate::accel::Accel;

/// The smallest shared region QEMU accepts: one page (QEMU rounds `size` up to it).
pub const MIN_REGION_SIZE: u64 = 4096;

/// Longest Unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Longest virtio-blk serial the guest can see (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_DISK_SERIAL: usize = 20;

/// Why a [`QemuCommand`] could not produce a command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    /// An id does not follow QEMU's rules.
    #[error(
        "`{id}` is not a valid QEMU id: it must start with a letter and contain only letters, digits, '-', '.' and '_'"
    )]
    InvalidId {
        /// The rejected id.
        id: String,
    },
    /// A vhost-user disk without shared guest RAM: the backend could not map it.
    #[error(
        "disk `{id}` is served over vhost-user, which needs the guest's RAM shared (memory-backend-memfd)"
    )]
    VhostUserNeedsSharedMemory {
        /// The disk's id.
        id: String,
    },
    /// Shared guest RAM without a size.
    #[error("shared guest RAM needs a memory size")]
    SharedMemoryNeedsSize,
    /// Two regions, disks or networks share an id.
    #[error("the id `{id}` is used more than once")]
    DuplicateId {
        /// The repeated id.
        id: String,
    },
    /// A shared region has a size ivshmem-plain cannot map.
    #[error(
        "shared region `{id}` is {size} bytes, but ivshmem-plain needs a power of two of at least {MIN_REGION_SIZE} bytes"
    )]
    RegionSize {
        /// The region's id.
        id: String,
        /// The rejected size in bytes.
        size: u64,
    },
    /// A shared region's backing file exists with another length.
    #[error(
        "shared region `{id}`: {} is {file_len} bytes but the region is {size} bytes (QEMU only resizes empty files)",
        path.display()
    )]
    RegionFileSize {
        /// The region's id.
        id: String,
        /// The backing file.
        path: PathBuf,
        /// The file's current length.
        file_len: u64,
        /// The size asked for.
        size: u64,
    },
    /// A disk serial is too long or has characters the guest cannot show.
    #[error(
        "disk `{id}`: serial `{serial}` must be 1 to {MAX_DISK_SERIAL} printable ASCII characters without ','"
    )]
    InvalidSerial {
        /// The disk's id.
        id: String,
        /// The rejected serial.
        serial: String,
    },
    /// A Unix socket path does not fit in `sun_path`.
    #[error("the QMP socket path {} is {len} bytes; Unix sockets allow at most {MAX_SOCKET_PATH}", path.display())]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Two forwards claim the same host address and port.
    #[error("host forward {addr}:{port} is listed more than once")]
    DuplicateForward {
        /// Host address of the forward.
        addr: Ipv4Addr,
        /// Host port of the forward.
        port: u16,
    },
    /// A numeric setting is zero or otherwise out of range.
    #[error("{what} must be at least 1, got {value}")]
    Zero {
        /// Which setting.
        what: &'static str,
        /// The rejected value.
        value: u32,
    },
    /// `-initrd` or `-append` was given without `-kernel`.
    #[error("{what} needs a kernel: call .kernel() as well")]
    NeedsKernel {
        /// `initrd` or `append`.
        what: &'static str,
    },
    /// The machine type is empty.
    #[error("the machine type must not be empty")]
    EmptyMachine,
    /// The guest name is empty.
    #[error("the guest name must not be empty")]
    EmptyName,
    /// A virtio-serial port's name is empty or has characters the guest would not show.
    #[error(
        "virtio-serial port `{id}`: name {name:?} must be 1 to 64 printable ASCII characters without ','"
    )]
    InvalidPortName {
        /// The port's id.
        id: String,
        /// The rejected name.
        name: String,
    },
    /// A NIC's MAC address is not six hex octets.
    #[error("NIC `{id}`: {mac:?} is not a MAC address (six hex octets: 52:54:00:12:34:56)")]
    InvalidMac {
        /// The NIC's id.
        id: String,
        /// The address given.
        mac: String,
    },
    /// A tap's descriptor could not be duplicated for QEMU.
    #[error("NIC `{id}`: cannot duplicate the tap's descriptor")]
    Tap {
        /// The NIC's id.
        id: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Two descriptors would have one number in QEMU (cannot happen: each has its own).
    #[error("the tap descriptors collide")]
    TapDescriptors,
    /// The backing file of a region could not be inspected.
    #[error("shared region `{id}`: cannot inspect {}", path.display())]
    RegionFile {
        /// The region's id.
        id: String,
        /// The backing file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// One TCP port forward of QEMU user networking: `host_addr:host_port` on the host reaches
/// `guest_port` in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostForward {
    /// Host address to listen on, normally `127.0.0.1`.
    pub host_addr: Ipv4Addr,
    /// Host port to listen on.
    pub host_port: u16,
    /// Guest port to connect to.
    pub guest_port: u16,
}

impl HostForward {
    /// The rule as QEMU's `hostfwd=` and `hostfwd_add` take it: `tcp:ADDR:HP-:GP`.
    pub fn rule(&self) -> String {
        format!(
            "tcp:{}:{}-:{}",
            self.host_addr, self.host_port, self.guest_port
        )
    }
}

/// What QEMU does when the guest reports a panic through pvpanic (`-action panic=...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanicAction {
    /// Stop the vCPUs and keep the process, so memory can still be inspected.
    Pause,
    /// Shut the guest down; QEMU exits with status 0.
    Shutdown,
    /// Exit with a non-zero status, so the exit status alone tells a panic apart.
    ExitFailure,
    /// Only emit the `GUEST_PANICKED` event.
    None,
}

impl PanicAction {
    fn as_qemu(self) -> &'static str {
        match self {
            PanicAction::Pause => "pause",
            PanicAction::Shutdown => "shutdown",
            PanicAction::ExitFailure => "exit-failure",
            PanicAction::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
struct Region {
    id: String,
    path: PathBuf,
    size: u64,
    readonly: bool,
}

#[derive(Debug, Clone)]
struct Disk {
    id: String,
    /// The image, or the vhost-user socket.
    path: PathBuf,
    /// Empty for a vhost-user disk: its backend answers the guest's GET_ID.
    serial: String,
    kind: DiskKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskKind {
    /// QEMU opens the image; `shared`: another QEMU may have it open read-write too.
    File { shared: bool },
    /// A vhost-user-blk backend serves the disk over a Unix socket.
    VhostUser,
}

#[derive(Debug, Clone)]
struct UserNet {
    id: String,
    forwards: Vec<HostForward>,
}

/// A NIC on a tap device the caller opened; QEMU gets the descriptor at
/// [`TAP_FD_BASE`] + its position.
#[derive(Debug, Clone)]
struct TapNet {
    id: String,
    fd: Arc<OwnedFd>,
    mac: String,
}

/// A NIC on a point-to-point datagram link between two QEMUs (`-netdev dgram` over Unix
/// sockets): frames go to `remote`, the peer QEMU's `local`.
#[derive(Debug, Clone)]
struct DgramNet {
    id: String,
    local: PathBuf,
    remote: PathBuf,
    mac: String,
}

/// A virtio-serial port whose other end is a Unix socket QEMU connects to.
#[derive(Debug, Clone)]
struct SerialPort {
    id: String,
    socket: PathBuf,
    name: String,
}

/// The descriptor number the first tap has in QEMU (the next ones follow).
pub const TAP_FD_BASE: i32 = 10;

/// Builder for a `qemu-system-x86_64` command line.
///
/// Every command line carries `-nodefaults -no-user-config -display none -no-reboot`:
/// no devices or config files we did not ask for, no window, and a guest reboot (a panic
/// with `panic=...` in the kernel command line, a triple fault, a `reboot`) ends the QEMU
/// process instead of restarting the guest, so hostd sees the failure through the pidfd
/// rather than a guest quietly coming back with stale state.
#[derive(Debug, Clone)]
pub struct QemuCommand {
    binary: PathBuf,
    name: Option<String>,
    machine: String,
    accel: Accel,
    memory_mib: Option<u32>,
    shared_memory: bool,
    cpus: Option<u32>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    serial_log: Option<PathBuf>,
    shell_socket: Option<PathBuf>,
    qmp_socket: Option<PathBuf>,
    regions: Vec<Region>,
    disks: Vec<Disk>,
    nets: Vec<UserNet>,
    taps: Vec<TapNet>,
    dgram_nets: Vec<DgramNet>,
    serial_ports: Vec<SerialPort>,
    pvpanic: bool,
    rng: bool,
    panic_action: Option<PanicAction>,
    extra: Vec<OsString>,
}

impl QemuCommand {
    /// Starts a command line for the QEMU binary at `binary` (a path or a name looked up
    /// in `PATH`). Defaults: machine `q35`, TCG.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        QemuCommand {
            binary: binary.into(),
            name: None,
            machine: "q35".to_owned(),
            accel: Accel::Tcg,
            memory_mib: None,
            shared_memory: false,
            cpus: None,
            kernel: None,
            initrd: None,
            append: None,
            serial_log: None,
            shell_socket: None,
            qmp_socket: None,
            regions: Vec::new(),
            disks: Vec::new(),
            nets: Vec::new(),
            taps: Vec::new(),
            dgram_nets: Vec::new(),
            serial_ports: Vec::new(),
            pvpanic: false,
            rng: false,
            panic_action: None,
            extra: Vec::new(),
        }
    }

    /// Names the guest (`-name`); shows in QMP's `query-name` and in process listings. Its
    /// threads get names too (`debug-threads=on`: `CPU 0/TCG`...), so a host can tell the
    /// vCPUs' CPU time from the rest.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// Sets the machine type option string (`-machine`, default `q35`), passed verbatim.
    pub fn machine(mut self, machine: &str) -> Self {
        self.machine = machine.to_owned();
        self
    }

    /// Chooses the accelerator (`-accel kvm` or `-accel tcg,thread=multi`).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Sets guest RAM in MiB (`-m`).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = Some(mib);
        self
    }

    /// Sets the number of vCPUs (`-smp`).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = Some(cpus);
        self
    }

    /// Boots this Linux kernel directly (`-kernel`, taken literally by QEMU).
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// Uses this initramfs (`-initrd`, taken literally by QEMU). Needs [`Self::kernel`].
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// Sets the kernel command line (`-append`). Needs [`Self::kernel`].
    pub fn append(mut self, cmdline: &str) -> Self {
        self.append = Some(cmdline.to_owned());
        self
    }

    /// Writes the guest's first serial port (its console) into this file.
    pub fn serial_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.serial_log = Some(path.into());
        self
    }

    /// Connects the guest's second serial port (ttyS1) to this Unix socket, where QEMU
    /// listens (`server=on,wait=off`). The guest image runs a shell there, so the host can
    /// act inside the guest (fault injection kills the guest agent this way).
    pub fn shell_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.shell_socket = Some(path.into());
        self
    }

    /// Serves QMP on this Unix socket (`-qmp unix:PATH,server=on,wait=off`).
    pub fn qmp_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.qmp_socket = Some(path.into());
        self
    }

    /// Maps the file at `path` into the guest as the BAR 2 of an `ivshmem-plain` PCI device
    /// (vendor 0x1af4, device 0x1110), shared with every other process mapping the file.
    /// The memory backend and the device are both named `id` (`qdev_id` in `query-pci`).
    ///
    /// `size_bytes` must be a power of two of at least [`MIN_REGION_SIZE`]. A missing or
    /// empty file is created or grown by QEMU; any other file must already have exactly
    /// that length ([`Self::args`] checks). With `readonly`, QEMU maps the file without
    /// write permission and the guest cannot modify the region.
    pub fn shared_region(
        mut self,
        id: &str,
        path: impl Into<PathBuf>,
        size_bytes: u64,
        readonly: bool,
    ) -> Self {
        self.regions.push(Region {
            id: id.to_owned(),
            path: path.into(),
            size: size_bytes,
            readonly,
        });
        self
    }

    /// Attaches the raw image at `path` as a virtio-blk disk whose serial is `serial`
    /// (the guest finds it under `/dev/disk/by-id/virtio-SERIAL`).
    ///
    /// The drive uses `cache=writeback`: it works on every host file system (tmpfs refuses
    /// the `O_DIRECT` of `cache=none` on kernels before 6.6), both QEMU processes attaching
    /// the image see one host page cache, and guest flushes still become `fdatasync`.
    /// With `shared`, the drive gets `file.locking=off` and the device `share-rw=on`, so a
    /// second QEMU process can attach the same image read-write; keeping only one writer at
    /// a time is then the caller's job. Drive and device are both named `id`.
    ///
    /// How the cache behaves in the guest depends on its driver: Linux's virtio_blk
    /// negotiates flushes and sees a write-back cache; a driver without flush support
    /// (SeaBIOS) makes QEMU switch the device to write-through.
    pub fn disk(mut self, id: &str, path: impl Into<PathBuf>, serial: &str, shared: bool) -> Self {
        self.disks.push(Disk {
            id: id.to_owned(),
            path: path.into(),
            serial: serial.to_owned(),
            kind: DiskKind::File { shared },
        });
        self
    }

    /// Attaches a virtio-blk disk served by a vhost-user-blk backend listening on `socket`
    /// (`-device vhost-user-blk-pci`); the backend answers the serial. QEMU reconnects to a
    /// restarted backend (`reconnect=1`: every second) and the guest's requests wait
    /// meanwhile. Needs [`QemuCommand::shared_memory`]: the backend maps the guest's RAM.
    pub fn vhost_user_disk(mut self, id: &str, socket: impl Into<PathBuf>) -> Self {
        self.disks.push(Disk {
            id: id.to_owned(),
            path: socket.into(),
            serial: String::new(),
            kind: DiskKind::VhostUser,
        });
        self
    }

    /// Backs the guest's RAM with a shared memfd (`memory-backend-memfd,share=on`), which
    /// vhost-user backends map. Needs [`QemuCommand::memory_mib`].
    pub fn shared_memory(mut self) -> Self {
        self.shared_memory = true;
        self
    }

    /// Adds a user-mode (slirp) network with a virtio-net NIC and TCP port forwards. The
    /// netdev and the NIC are both named `netdev_id`; forwards can be changed at run time
    /// with HMP `hostfwd_add`/`hostfwd_remove` on `netdev_id`.
    pub fn user_net(mut self, netdev_id: &str, forwards: &[HostForward]) -> Self {
        self.nets.push(UserNet {
            id: netdev_id.to_owned(),
            forwards: forwards.to_vec(),
        });
        self
    }

    /// Adds a virtio-net NIC with MAC address `mac` on a point-to-point datagram link: QEMU
    /// binds the Unix socket `local` (which must not exist) and sends every frame to
    /// `remote`, the other end's `local`; frames sent while the other end is absent are
    /// lost, as on a wire. Netdev and NIC are both named `id` (QMP `set_link` takes it).
    pub fn dgram_net(
        mut self,
        id: &str,
        local: impl Into<PathBuf>,
        remote: impl Into<PathBuf>,
        mac: &str,
    ) -> Self {
        self.dgram_nets.push(DgramNet {
            id: id.to_owned(),
            local: local.into(),
            remote: remote.into(),
            mac: mac.to_owned(),
        });
        self
    }

    /// Adds a virtio-net NIC with MAC address `mac` on the tap device open at `tap` (which
    /// the caller made, for instance inside a network namespace). QEMU inherits a
    /// duplicate of the descriptor; the caller drops its own once QEMU runs, so the tap
    /// goes with the QEMU.
    pub fn tap_net(mut self, netdev_id: &str, tap: Arc<OwnedFd>, mac: &str) -> Self {
        self.taps.push(TapNet {
            id: netdev_id.to_owned(),
            fd: tap,
            mac: mac.to_owned(),
        });
        self
    }

    /// Adds a virtio-serial port named `name` (the guest finds it as
    /// `/sys/class/virtio-ports/vport*/name`) whose other end is the Unix socket `socket`,
    /// which QEMU connects to and reconnects to every second when it goes (`reconnect=1`,
    /// as for vhost-user disks). Each port has a controller of its own: `-device
    /// virtio-serial-pci,id=IDserial`, `-chardev socket,id=ID,...` and `-device
    /// virtserialport,bus=IDserial.0,chardev=ID,name=NAME`.
    pub fn virtio_serial_port(mut self, id: &str, socket: impl Into<PathBuf>, name: &str) -> Self {
        self.serial_ports.push(SerialPort {
            id: id.to_owned(),
            socket: socket.into(),
            name: name.to_owned(),
        });
        self
    }

    /// Adds the ISA pvpanic device, so a guest panic emits QMP `GUEST_PANICKED`.
    pub fn pvpanic(mut self) -> Self {
        self.pvpanic = true;
        self
    }

    /// Adds a virtio RNG fed from the host, so the guest's entropy pool is ready at boot
    /// (under TCG an unseeded pool can stall the first `/dev/urandom` read for a second).
    pub fn virtio_rng(mut self) -> Self {
        self.rng = true;
        self
    }

    /// Sets what QEMU does on a guest panic (`-action panic=...`); QEMU's default otherwise.
    pub fn panic_action(mut self, action: PanicAction) -> Self {
        self.panic_action = Some(action);
        self
    }

    /// Appends a raw argument after everything else, unescaped.
    pub fn extra_arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// The QEMU binary this command runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The QMP socket set with [`Self::qmp_socket`], if any.
    pub fn qmp_socket_path(&self) -> Option<&Path> {
        self.qmp_socket.as_deref()
    }

    /// Validates the settings and returns the arguments (without the binary).
    pub fn args(&self) -> Result<Vec<OsString>, CmdlineError> {
        self.validate()?;
        let mut args = Args::default();
        if let Some(name) = &self.name {
            args.push("-name");
            args.push(format!("{},debug-threads=on", escape_str(name)));
        }
        args.push("-machine");
        match (self.shared_memory, self.memory_mib) {
            (true, Some(_)) => args.push(format!("{},memory-backend=ram", self.machine)),
            _ => args.push(&self.machine),
        }
        args.push("-accel");
        args.push(match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg,thread=multi",
        });
        if let Some(mib) = self.memory_mib {
            args.push("-m");
            args.push(format!("{mib}M"));
            if self.shared_memory {
                args.push("-object");
                args.push(format!("memory-backend-memfd,id=ram,size={mib}M,share=on"));
            }
        }
        if let Some(cpus) = self.cpus {
            args.push("-smp");
            args.push(cpus.to_string());
        }
        args.push("-nodefaults");
        args.push("-no-user-config");
        args.push("-display");
        args.push("none");
        args.push("-no-reboot");
        if let Some(kernel) = &self.kernel {
            args.push("-kernel");
            args.push(kernel.as_os_str());
        }
        if let Some(initrd) = &self.initrd {
            args.push("-initrd");
            args.push(initrd.as_os_str());
        }
        if let Some(append) = &self.append {
            args.push("-append");
            args.push(append);
        }
        if let Some(log) = &self.serial_log {
            args.push("-chardev");
            args.push(join(&[
                OsStr::new("file,id=console,path="),
                &escape(log.as_os_str()),
            ]));
            args.push("-serial");
            args.push("chardev:console");
        }
        if let Some(sock) = &self.shell_socket {
            if self.serial_log.is_none() {
                // The shell must be the second port, ttyS1, whatever the first is.
                args.push("-serial");
                args.push("null");
            }
            args.push("-chardev");
            args.push(join(&[
                OsStr::new("socket,id=shell,path="),
                &escape(sock.as_os_str()),
                OsStr::new(",server=on,wait=off"),
            ]));
            args.push("-serial");
            args.push("chardev:shell");
        }
        if let Some(sock) = &self.qmp_socket {
            args.push("-qmp");
            args.push(join(&[
                OsStr::new("unix:"),
                &escape(sock.as_os_str()),
                OsStr::new(",server=on,wait=off"),
            ]));
        }
        for r in &self.regions {
            args.push("-object");
            let mut opt = join(&[
                OsStr::new(&format!("memory-backend-file,id={},mem-path=", r.id)),
                &escape(r.path.as_os_str()),
                OsStr::new(&format!(",size={},share=on", r.size)),
            ]);
            if r.readonly {
                opt.push(",readonly=on");
            }
            args.push(opt);
            args.push("-device");
            args.push(format!("ivshmem-plain,memdev={0},id={0}", r.id));
        }
        for d in &self.disks {
            let shared = match d.kind {
                DiskKind::File { shared } => shared,
                DiskKind::VhostUser => {
                    args.push("-chardev");
                    args.push(join(&[
                        OsStr::new(&format!("socket,id=chr-{},path=", d.id)),
                        &escape(d.path.as_os_str()),
                        OsStr::new(",reconnect=1"),
                    ]));
                    args.push("-device");
                    args.push(format!(
                        "vhost-user-blk-pci,chardev=chr-{0},id={0},num-queues=1",
                        d.id
                    ));
                    continue;
                }
            };
            args.push("-drive");
            let mut drive = join(&[
                OsStr::new("file="),
                &escape(d.path.as_os_str()),
                OsStr::new(&format!(",format=raw,if=none,id={},cache=writeback", d.id)),
            ]);
            let mut device = format!(
                "virtio-blk-pci,drive={0},id={0},serial={1}",
                d.id,
                escape_str(&d.serial)
            );
            if shared {
                drive.push(",file.locking=off");
                device.push_str(",share-rw=on");
            }
            args.push(drive);
            args.push("-device");
            args.push(device);
        }
        for n in &self.nets {
            args.push("-netdev");
            let mut netdev = format!("user,id={}", n.id);
            for f in &n.forwards {
                netdev.push_str(",hostfwd=");
                netdev.push_str(&f.rule());
            }
            args.push(netdev);
            args.push("-device");
            args.push(format!("virtio-net-pci,netdev={0},id={0}", n.id));
        }
        for (n, tap) in self.taps.iter().enumerate() {
            args.push("-netdev");
            args.push(format!("tap,id={},fd={}", tap.id, TAP_FD_BASE + n as i32));
            args.push("-device");
            args.push(format!(
                "virtio-net-pci,netdev={0},id={0},mac={1}",
                tap.id, tap.mac
            ));
        }
        for n in &self.dgram_nets {
            args.push("-netdev");
            args.push(join(&[
                OsStr::new(&format!("dgram,id={},local.type=unix,local.path=", n.id)),
                &escape(n.local.as_os_str()),
                OsStr::new(",remote.type=unix,remote.path="),
                &escape(n.remote.as_os_str()),
            ]));
            args.push("-device");
            args.push(format!(
                "virtio-net-pci,netdev={0},id={0},mac={1}",
                n.id, n.mac
            ));
        }
        for port in &self.serial_ports {
            args.push("-device");
            args.push(format!("virtio-serial-pci,id={}serial", port.id));
            args.push("-chardev");
            args.push(join(&[
                OsStr::new(&format!("socket,id={},path=", port.id)),
                &escape(port.socket.as_os_str()),
                OsStr::new(",reconnect=1"),
            ]));
            args.push("-device");
            args.push(format!(
                "virtserialport,bus={0}serial.0,chardev={0},name={1}",
                port.id, port.name
            ));
        }
        if self.pvpanic {
            args.push("-device");
            args.push("pvpanic");
        }
        if self.rng {
            args.push("-device");
            args.push("virtio-rng-pci");
        }
        if let Some(action) = self.panic_action {
            args.push("-action");
            args.push(format!("panic={}", action.as_qemu()));
        }
        for extra in &self.extra {
            args.push(extra);
        }
        Ok(args.0)
    }

    /// Validates the settings and returns a [`Command`] ready to spawn (stdio untouched).
    pub fn build(&self) -> Result<Command, CmdlineError> {
        let args = self.args()?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(args);
        let mut mappings = Vec::new();
        for (n, tap) in self.taps.iter().enumerate() {
            mappings.push(FdMapping {
                parent_fd: tap.fd.try_clone().map_err(|source| CmdlineError::Tap {
                    id: tap.id.clone(),
                    source,
                })?,
                child_fd: TAP_FD_BASE + n as i32,
            });
        }
        if !mappings.is_empty() {
            cmd.fd_mappings(mappings)
                .map_err(|_| CmdlineError::TapDescriptors)?;
        }
        Ok(cmd)
    }

    fn validate(&self) -> Result<(), CmdlineError> {
        if self.machine.is_empty() {
            return Err(CmdlineError::EmptyMachine);
        }
        if self.name.as_deref() == Some("") {
            return Err(CmdlineError::EmptyName);
        }
        if let Some(mib) = self.memory_mib {
            nonzero("memory (MiB)", mib)?;
        }
        if let Some(cpus) = self.cpus {
            nonzero("cpus", cpus)?;
        }
        if self.kernel.is_none() {
            if self.initrd.is_some() {
                return Err(CmdlineError::NeedsKernel { what: "initrd" });
            }
            if self.append.is_some() {
                return Err(CmdlineError::NeedsKernel { what: "append" });
            }
        }
        if let Some(sock) = &self.qmp_socket {
            let len = sock.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(CmdlineError::SocketPathTooLong {
                    path: sock.clone(),
                    len,
                });
            }
        }
        let mut ids = BTreeSet::new();
        let port_ids: Vec<String> = self
            .serial_ports
            .iter()
            .flat_map(|p| [p.id.clone(), format!("{}serial", p.id)])
            .collect();
        let all_ids = self
            .regions
            .iter()
            .map(|r| &r.id)
            .chain(self.disks.iter().map(|d| &d.id))
            .chain(self.nets.iter().map(|n| &n.id))
            .chain(self.taps.iter().map(|t| &t.id))
            .chain(&port_ids);
        for id in all_ids {
            check_id(id)?;
            if !ids.insert(id.as_str()) {
                return Err(CmdlineError::DuplicateId { id: id.clone() });
            }
        }
        for port in &self.serial_ports {
            let ok = !port.name.is_empty()
                && port.name.len() <= 64
                && port.name.bytes().all(|b| b.is_ascii_graphic() && b != b',');
            if !ok {
                return Err(CmdlineError::InvalidPortName {
                    id: port.id.clone(),
                    name: port.name.clone(),
                });
            }
            let len = port.socket.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(CmdlineError::SocketPathTooLong {
                    path: port.socket.clone(),
                    len,
                });
            }
        }
        for r in &self.regions {
            check_region(r)?;
        }
        if self.shared_memory && self.memory_mib.is_none() {
            return Err(CmdlineError::SharedMemoryNeedsSize);
        }
        for d in self.disks.iter().filter(|d| d.kind == DiskKind::VhostUser) {
            if !self.shared_memory {
                return Err(CmdlineError::VhostUserNeedsSharedMemory { id: d.id.clone() });
            }
            let len = d.path.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(CmdlineError::SocketPathTooLong {
                    path: d.path.clone(),
                    len,
                });
            }
        }
        for d in self.disks.iter().filter(|d| d.kind != DiskKind::VhostUser) {
            let ok = !d.serial.is_empty()
                && d.serial.len() <= MAX_DISK_SERIAL
                && d.serial.bytes().all(|b| b.is_ascii_graphic() && b != b',');
            if !ok {
                return Err(CmdlineError::InvalidSerial {
                    id: d.id.clone(),
                    serial: d.serial.clone(),
                });
            }
        }
        let nics = self.taps.iter().map(|t| (&t.id, &t.mac));
        for (id, mac) in nics.chain(self.dgram_nets.iter().map(|n| (&n.id, &n.mac))) {
            let octets: Vec<&str> = mac.split(':').collect();
            let ok = octets.len() == 6
                && octets
                    .iter()
                    .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(CmdlineError::InvalidMac {
                    id: id.clone(),
                    mac: mac.clone(),
                });
            }
        }
        let mut forwards = BTreeSet::new();
        for f in self.nets.iter().flat_map(|n| &n.forwards) {
            if !forwards.insert((f.host_addr, f.host_port)) {
                return Err(CmdlineError::DuplicateForward {
                    addr: f.host_addr,
                    port: f.host_port,
                });
            }
        }
        Ok(())
    }
}

fn nonzero(what: &'static str, value: u32) -> Result<(), CmdlineError> {
    if value == 0 {
        return Err(CmdlineError::Zero { what, value });
    }
    Ok(())
}

/// QEMU's id rule (`id_wellformed`): a letter, then letters, digits, `-`, `.`, `_`.
fn check_id(id: &str) -> Result<(), CmdlineError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(CmdlineError::InvalidId { id: id.to_owned() })
    }
}

fn check_region(r: &Region) -> Result<(), CmdlineError> {
    if r.size < MIN_REGION_SIZE || !r.size.is_power_of_two() {
        return Err(CmdlineError::RegionSize {
            id: r.id.clone(),
            size: r.size,
        });
    }
    match std::fs::metadata(&r.path) {
        Ok(meta) if meta.is_file() && meta.len() != 0 && meta.len() != r.size => {
            Err(CmdlineError::RegionFileSize {
                id: r.id.clone(),
                path: r.path.clone(),
                file_len: meta.len(),
                size: r.size,
            })
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CmdlineError::RegionFile {
            id: r.id.clone(),
            path: r.path.clone(),
            source,
        }),
    }
}

/// Escapes a value for a QEMU option string: every `,` becomes `,,`.
pub fn escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn escape_str(value: &str) -> String {
    value.replace(',', ",,")
}

fn join(parts: &[&OsStr]) -> OsString {
    let mut out = OsString::new();
    for p in parts {
        out.push(p);
    }
    out
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, arg: impl Into<OsString>) {
        self.0.push(arg.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(cmd: &QemuCommand) -> Vec<String> {
        cmd.args()
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    /// The value following the `n`-th occurrence of `flag`.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn defaults_are_safe() {
        let args = strings(&QemuCommand::new("qemu-system-x86_64"));
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing in {args:?}");
        }
        assert_eq!(values(&args, "-display"), ["none"]);
        assert_eq!(values(&args, "-machine"), ["q35"]);
        assert_eq!(values(&args, "-accel"), ["tcg,thread=multi"]);
    }

    #[test]
    fn basic_settings() {
        let cmd = QemuCommand::new("/usr/bin/qemu-system-x86_64")
            .name("node-a")
            .machine("pc")
            .accel(Accel::Kvm)
            .memory_mib(256)
            .cpus(2)
            .kernel("/k/vmlinuz")
            .initrd("/k/initrd")
            .append("console=ttyS0,115200 panic=-1")
            .serial_log("/s/console.log")
            .shell_socket("/s/shell.sock")
            .qmp_socket("/s/qmp.sock")
            .pvpanic()
            .panic_action(PanicAction::ExitFailure);
        let args = strings(&cmd);
        assert_eq!(values(&args, "-name"), ["node-a,debug-threads=on"]);
        assert_eq!(values(&args, "-machine"), ["pc"]);
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert_eq!(values(&args, "-m"), ["256M"]);
        assert_eq!(values(&args, "-smp"), ["2"]);
        assert_eq!(values(&args, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(values(&args, "-initrd"), ["/k/initrd"]);
        assert_eq!(values(&args, "-append"), ["console=ttyS0,115200 panic=-1"]);
        assert_eq!(
            values(&args, "-chardev"),
            [
                "file,id=console,path=/s/console.log",
                "socket,id=shell,path=/s/shell.sock,server=on,wait=off"
            ]
        );
        assert_eq!(
            values(&args, "-serial"),
            ["chardev:console", "chardev:shell"]
        );
        let shell_only = strings(&QemuCommand::new("qemu").shell_socket("/s/shell.sock"));
        assert_eq!(values(&shell_only, "-serial"), ["null", "chardev:shell"]);
        assert_eq!(
            values(&args, "-qmp"),
            ["unix:/s/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(values(&args, "-device"), ["pvpanic"]);
        let with_rng = strings(&QemuCommand::new("qemu").virtio_rng());
        assert_eq!(values(&with_rng, "-device"), ["virtio-rng-pci"]);
        assert_eq!(values(&args, "-action"), ["panic=exit-failure"]);
        let built = cmd.build().unwrap();
        assert_eq!(built.get_program(), "/usr/bin/qemu-system-x86_64");
        assert_eq!(built.get_args().count(), args.len());
    }

    #[test]
    fn shared_regions() {
        let cmd = QemuCommand::new("q")
            .shared_region("own", "/dev/shm/ivha-a", 1 << 20, false)
            .shared_region("peer", "/dev/shm/ivha-b", 64 << 20, true);
        let args = strings(&cmd);
        assert_eq!(
            values(&args, "-object"),
            [
                "memory-backend-file,id=own,mem-path=/dev/shm/ivha-a,size=1048576,share=on",
                "memory-backend-file,id=peer,mem-path=/dev/shm/ivha-b,size=67108864,share=on,readonly=on",
            ]
        );
        assert_eq!(
            values(&args, "-device"),
            [
                "ivshmem-plain,memdev=own,id=own",
                "ivshmem-plain,memdev=peer,id=peer"
            ]
        );
    }

    #[test]
    fn region_size_must_be_power_of_two_and_at_least_a_page() {
        for size in [0, 512, 2048, 4095, 3 << 20, (1 << 20) + 4096] {
            let err = QemuCommand::new("q")
                .shared_region("r", "/nonexistent/r", size, false)
                .args()
                .unwrap_err();
            assert!(
                matches!(err, CmdlineError::RegionSize { size: s, .. } if s == size),
                "{size}: {err}"
            );
            assert!(err.to_string().contains("power of two"), "{err}");
        }
        for size in [4096, 8192, 1 << 20, 1 << 30] {
            QemuCommand::new("q")
                .shared_region("r", "/nonexistent/r", size, false)
                .args()
                .unwrap();
        }
    }

    #[test]
    fn region_file_length_must_match_unless_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        std::fs::File::create(&path).unwrap();
        let ok = QemuCommand::new("q").shared_region("r", &path, 8192, false);
        ok.args().unwrap();
        std::fs::File::create(&path).unwrap().set_len(4096).unwrap();
        let err = ok.args().unwrap_err();
        assert!(
            matches!(
                err,
                CmdlineError::RegionFileSize {
                    file_len: 4096,
                    size: 8192,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn disks_private_and_shared() {
        let cmd = QemuCommand::new("q")
            .disk("da", "/d/a.img", "ivha-a", false)
            .disk("db", "/d/b.img", "ivha-b", true);
        let args = strings(&cmd);
        assert_eq!(
            values(&args, "-drive"),
            [
                "file=/d/a.img,format=raw,if=none,id=da,cache=writeback",
                "file=/d/b.img,format=raw,if=none,id=db,cache=writeback,file.locking=off",
            ]
        );
        assert_eq!(
            values(&args, "-device"),
            [
                "virtio-blk-pci,drive=da,id=da,serial=ivha-a",
                "virtio-blk-pci,drive=db,id=db,serial=ivha-b,share-rw=on",
            ]
        );
    }

    #[test]
    fn disk_serial_is_validated() {
        for serial in ["", "has space", "a,b", "012345678901234567890"] {
            let err = QemuCommand::new("q")
                .disk("d", "/d", serial, false)
                .args()
                .unwrap_err();
            assert!(matches!(err, CmdlineError::InvalidSerial { .. }), "{err}");
        }
    }

    #[test]
    fn tap_nics_get_their_descriptor_and_mac() {
        let fd = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let command = QemuCommand::new("q").tap_net("br0", Arc::clone(&fd), "52:54:00:77:00:01");
        let args = strings(&command);
        let at = args.iter().position(|a| a == "tap,id=br0,fd=10").unwrap();
        assert_eq!(
            args[at + 2],
            "virtio-net-pci,netdev=br0,id=br0,mac=52:54:00:77:00:01"
        );
        command.build().unwrap();
        let bad = QemuCommand::new("q").tap_net("br0", fd, "52:54:00:77:01");
        let error = bad.args().unwrap_err().to_string();
        assert!(error.contains("is not a MAC address"), "{error}");
    }

    #[test]
    fn dgram_nics_name_both_ends_and_their_mac() {
        let command = QemuCommand::new("q").dgram_net(
            "ic0n1",
            "/s,t/q0-0-1",
            "/s,t/q0-1-0",
            "52:54:01:00:00:01",
        );
        let args = strings(&command);
        assert_eq!(
            values(&args, "-netdev"),
            [
                "dgram,id=ic0n1,local.type=unix,local.path=/s,,t/q0-0-1,remote.type=unix,remote.path=/s,,t/q0-1-0"
            ]
        );
        assert_eq!(
            values(&args, "-device"),
            ["virtio-net-pci,netdev=ic0n1,id=ic0n1,mac=52:54:01:00:00:01"]
        );
        let bad = QemuCommand::new("q").dgram_net("ic0n1", "/a", "/b", "52:54");
        assert!(bad.args().unwrap_err().to_string().contains("ic0n1"));
    }

    #[test]
    fn user_net_with_forwards() {
        let fwd = [
            HostForward {
                host_addr: Ipv4Addr::LOCALHOST,
                host_port: 10809,
                guest_port: 10809,
            },
            HostForward {
                host_addr: Ipv4Addr::new(127, 0, 0, 2),
                host_port: 2222,
                guest_port: 22,
            },
        ];
        let args = strings(&QemuCommand::new("q").user_net("n0", &fwd));
        assert_eq!(
            values(&args, "-netdev"),
            ["user,id=n0,hostfwd=tcp:127.0.0.1:10809-:10809,hostfwd=tcp:127.0.0.2:2222-:22"]
        );
        assert_eq!(values(&args, "-device"), ["virtio-net-pci,netdev=n0,id=n0"]);
        let err = QemuCommand::new("q")
            .user_net("n0", &fwd[..1])
            .user_net("n1", &fwd[..1])
            .args()
            .unwrap_err();
        assert!(
            matches!(err, CmdlineError::DuplicateForward { port: 10809, .. }),
            "{err}"
        );
    }

    #[test]
    fn commas_are_doubled_in_option_strings_only() {
        let cmd = QemuCommand::new("q")
            .name("a,b")
            .kernel("/k,1/vmlinuz")
            .initrd("/k,1/initrd")
            .serial_log("/s,1/console.log")
            .qmp_socket("/s,1/qmp.sock")
            .shared_region("r", "/dev/shm/x,y", 4096, false)
            .disk("d", "/d,1/a.img", "s", true);
        let args = strings(&cmd);
        assert_eq!(values(&args, "-name"), ["a,,b,debug-threads=on"]);
        assert_eq!(values(&args, "-kernel"), ["/k,1/vmlinuz"]);
        assert_eq!(values(&args, "-initrd"), ["/k,1/initrd"]);
        assert_eq!(
            values(&args, "-chardev"),
            ["file,id=console,path=/s,,1/console.log"]
        );
        assert_eq!(
            values(&args, "-qmp"),
            ["unix:/s,,1/qmp.sock,server=on,wait=off"]
        );
        assert!(values(&args, "-object")[0].contains("mem-path=/dev/shm/x,,y,size="));
        assert!(values(&args, "-drive")[0].starts_with("file=/d,,1/a.img,format=raw"));
    }

    #[test]
    fn escape_handles_non_utf8_and_runs_of_commas() {
        let raw = OsStr::from_bytes(b"a,,b\xff,");
        assert_eq!(escape(raw).as_bytes(), b"a,,,,b\xff,,");
        assert_eq!(escape(OsStr::new("")), OsString::new());
        assert_eq!(escape(OsStr::new("plain")), OsString::from("plain"));
    }

    #[test]
    fn ids_are_checked_and_unique() {
        for id in ["", "1abc", "a b", "a,b", "a=b", "ä"] {
            let err = QemuCommand::new("q").user_net(id, &[]).args().unwrap_err();
            assert!(matches!(err, CmdlineError::InvalidId { .. }), "{id}: {err}");
        }
        QemuCommand::new("q")
            .user_net("n-0.x_y", &[])
            .args()
            .unwrap();
        let err = QemuCommand::new("q")
            .shared_region("x", "/r", 4096, false)
            .disk("x", "/d", "s", false)
            .args()
            .unwrap_err();
        assert!(
            matches!(&err, CmdlineError::DuplicateId { id } if id == "x"),
            "{err}"
        );
    }

    #[test]
    fn other_validation() {
        let cases: Vec<(QemuCommand, &str)> = vec![
            (QemuCommand::new("q").memory_mib(0), "memory"),
            (QemuCommand::new("q").cpus(0), "cpus"),
            (QemuCommand::new("q").initrd("/i"), "initrd needs a kernel"),
            (QemuCommand::new("q").append("x"), "append needs a kernel"),
            (QemuCommand::new("q").machine(""), "machine"),
            (QemuCommand::new("q").name(""), "name"),
            (
                QemuCommand::new("q").qmp_socket("/".repeat(MAX_SOCKET_PATH + 1)),
                "Unix sockets allow",
            ),
        ];
        for (cmd, needle) in cases {
            let err = cmd.args().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
        QemuCommand::new("q")
            .qmp_socket("/".repeat(MAX_SOCKET_PATH))
            .args()
            .unwrap();
    }

    #[test]
    fn extra_args_come_last_and_verbatim() {
        let args = strings(&QemuCommand::new("q").pvpanic().extra_arg("-S"));
        assert_eq!(args.last().map(String::as_str), Some("-S"));
    }

    #[test]
    fn a_virtio_serial_port_connects_to_its_socket_and_reconnects() {
        let args = strings(&QemuCommand::new("q").virtio_serial_port(
            "coord",
            "/s,1/blkd/coord-a.sock",
            "ivha.coordinator",
        ));
        assert_eq!(
            values(&args, "-device"),
            [
                "virtio-serial-pci,id=coordserial",
                "virtserialport,bus=coordserial.0,chardev=coord,name=ivha.coordinator"
            ]
        );
        assert_eq!(
            values(&args, "-chardev"),
            ["socket,id=coord,path=/s,,1/blkd/coord-a.sock,reconnect=1"]
        );
        let cases = [
            (
                QemuCommand::new("q").virtio_serial_port("coord", "/s", "a,b"),
                "name \"a,b\"",
            ),
            (
                QemuCommand::new("q").virtio_serial_port("coord", "/s", ""),
                "must be 1 to 64",
            ),
            (
                QemuCommand::new("q").virtio_serial_port(
                    "coord",
                    format!("/{}", "s".repeat(MAX_SOCKET_PATH)),
                    "p",
                ),
                "Unix sockets allow",
            ),
            (
                QemuCommand::new("q")
                    .virtio_serial_port("coord", "/s", "p")
                    .user_net("coordserial", &[]),
                "used more than once",
            ),
        ];
        for (command, needle) in cases {
            let error = command.args().unwrap_err().to_string();
            assert!(error.contains(needle), "{error:?} lacks {needle:?}");
        }
    }

    #[test]
    fn a_vhost_user_disk_needs_shared_ram_and_reconnects() {
        let command = QemuCommand::new("q")
            .memory_mib(256)
            .shared_memory()
            .vhost_user_disk("disk-own", "/s/a,1-a.sock");
        let args = strings(&command);
        assert_eq!(values(&args, "-machine"), ["q35,memory-backend=ram"]);
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-memfd,id=ram,size=256M,share=on"]
        );
        assert_eq!(
            values(&args, "-chardev"),
            ["socket,id=chr-disk-own,path=/s/a,,1-a.sock,reconnect=1"]
        );
        assert_eq!(
            values(&args, "-device"),
            ["vhost-user-blk-pci,chardev=chr-disk-own,id=disk-own,num-queues=1"]
        );
        assert!(values(&args, "-drive").is_empty());

        let private = QemuCommand::new("q")
            .memory_mib(256)
            .vhost_user_disk("d", "/s");
        assert!(matches!(
            private.args(),
            Err(CmdlineError::VhostUserNeedsSharedMemory { .. })
        ));
        assert!(matches!(
            QemuCommand::new("q").shared_memory().args(),
            Err(CmdlineError::SharedMemoryNeedsSize)
        ));
        let long = format!("/{}", "s".repeat(MAX_SOCKET_PATH));
        assert!(matches!(
            QemuCommand::new("q")
                .memory_mib(64)
                .shared_memory()
                .vhost_user_disk("d", long)
                .args(),
            Err(CmdlineError::SocketPathTooLong { .. })
        ));
    }
}
