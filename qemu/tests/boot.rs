//! Boots real QEMU (TCG, q35, firmware only: no kernel) with every device ivha uses, to
//! prove QEMU 7.2 accepts the command lines [`QemuCommand`] builds.

// Test helpers outside #[test] functions may unwrap too: a panic is the assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{connect_or_explain, log_of, pidfd_readable, qemu_or_skip, wait_event};
use qemu::{Accel, HostForward, QemuChild, QemuCommand, QmpClient};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);
const IVSHMEM: (u64, u64) = (0x1af4, 0x1110);
const VIRTIO_BLK: [(u64, u64); 2] = [(0x1af4, 0x1001), (0x1af4, 0x1042)];
const OWN_SIZE: u64 = 1 << 20;
const PEER_SIZE: u64 = 64 << 10;
const DISK_SIZE: u64 = 16 << 20;

/// A free TCP port on 127.0.0.1 (free when this returns; QEMU binds it shortly after).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sparse_file(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Every PCI device QMP reports, descending into bridges.
fn pci_devices(buses: &Value) -> Vec<Value> {
    fn walk(devices: &Value, out: &mut Vec<Value>) {
        for d in devices.as_array().into_iter().flatten() {
            out.push(d.clone());
            if let Some(bus) = d.get("pci_bridge").and_then(|b| b.get("devices")) {
                walk(bus, out);
            }
        }
    }
    let mut out = Vec::new();
    for bus in buses.as_array().into_iter().flatten() {
        walk(&bus["devices"], &mut out);
    }
    out
}

fn ids(d: &Value) -> (u64, u64) {
    (
        d["id"]["vendor"].as_u64().unwrap(),
        d["id"]["device"].as_u64().unwrap(),
    )
}

/// The guest-physical address of BAR 2 of the ivshmem device `qdev_id`, once the firmware
/// has assigned it.
fn bar2_address(qmp: &mut QmpClient, qdev_id: &str) -> u64 {
    let deadline = Instant::now() + T;
    loop {
        let pci = qmp.execute("query-pci", None).unwrap();
        let dev = pci_devices(&pci)
            .into_iter()
            .find(|d| d["qdev_id"] == qdev_id)
            .unwrap_or_else(|| panic!("no PCI device {qdev_id} in {pci}"));
        let bar = dev["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["bar"] == 2)
            .unwrap_or_else(|| panic!("{qdev_id} has no BAR 2: {dev}"))
            .clone();
        // -1 until the firmware programs the BAR.
        if let Some(addr) = bar["address"].as_u64() {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "firmware never assigned {qdev_id}'s BAR 2"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `len` bytes of guest-physical memory through HMP `xp`.
fn guest_bytes(qmp: &mut QmpClient, addr: u64, len: usize) -> Vec<u8> {
    let out = qmp
        .human_monitor_command(&format!("xp /{len}bx {addr:#x}"))
        .unwrap();
    // Lines look like "00000000fe800000: 0x49 0x56 0x48 0x41".
    out.lines()
        .filter_map(|l| l.split_once(": "))
        .flat_map(|(_, bytes)| {
            bytes
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).unwrap())
        .collect()
}

/// The permissions of every mapping of `file` in process `pid` (e.g. "rw-s").
fn mapping_perms(pid: u32, file: &Path) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let file = file.to_str().unwrap();
    maps.lines()
        .filter(|l| l.ends_with(file))
        .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
        .collect()
}

struct Files {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Files {
    /// A scratch directory on tmpfs, as hostd's state directory would be. Its name holds a
    /// comma, so every path option goes through QEMU's comma escaping.
    fn new() -> Files {
        let shm = Path::new("/dev/shm");
        let mut builder = tempfile::Builder::new();
        builder.prefix("ivha-qemu,test");
        let dir = if shm.is_dir() {
            builder.tempdir_in(shm)
        } else {
            builder.tempdir()
        }
        .unwrap();
        let root = dir.path().to_owned();
        Files { _dir: dir, root }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn spawn(cmd: &QemuCommand, log: &Path) -> QemuChild {
    let args: Vec<String> = cmd
        .args()
        .unwrap()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    eprintln!("{} {}", cmd.binary().display(), args.join(" "));
    QemuChild::spawn_with_log(cmd.build().unwrap(), log).unwrap()
}

#[test]
fn boot_with_every_device() {
    let Some(bin) = qemu_or_skip("boot_with_every_device") else {
        return;
    };
    let started = Instant::now();
    let f = Files::new();
    let (own, peer, disk) = (f.path("region-a"), f.path("region-b"), f.path("disk-a.img"));
    sparse_file(&peer, PEER_SIZE);
    write_at(&peer, 0, b"PEER");
    sparse_file(&disk, DISK_SIZE);
    let port = free_port();
    let sock = f.path("qmp.sock");
    let cmd = QemuCommand::new(&bin)
        .name("boot-test")
        .machine("q35")
        .accel(Accel::Tcg)
        .memory_mib(128)
        .cpus(1)
        .shared_region("own", &own, OWN_SIZE, false)
        .shared_region("peer", &peer, PEER_SIZE, true)
        .disk("disk-a", &disk, "ivha-disk-a", true)
        .user_net(
            "n0",
            &[HostForward {
                host_addr: Ipv4Addr::LOCALHOST,
                host_port: port,
                guest_port: 10809,
            }],
        )
        .pvpanic()
        .serial_log(f.path("console.log"))
        .qmp_socket(&sock);
    let mut child = spawn(&cmd, &f.path("qemu.log"));
    let mut qmp = connect_or_explain(&mut child, &sock);
    let events = qmp.events();

    let status = qmp.execute("query-status", None).unwrap();
    assert_eq!(status["status"], "running", "{status}\n{}", log_of(&child));

    let pci = qmp.execute("query-pci", None).unwrap();
    let devices = pci_devices(&pci);
    let ivshmem: Vec<&Value> = devices.iter().filter(|d| ids(d) == IVSHMEM).collect();
    assert_eq!(ivshmem.len(), 2, "{pci}");
    let blk = devices
        .iter()
        .filter(|d| VIRTIO_BLK.contains(&ids(d)))
        .count();
    assert_eq!(blk, 1, "{pci}");
    for (qdev, size) in [("own", OWN_SIZE), ("peer", PEER_SIZE)] {
        let dev = ivshmem.iter().find(|d| d["qdev_id"] == qdev).unwrap();
        let bar2 = dev["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["bar"] == 2)
            .unwrap();
        assert_eq!(bar2["size"].as_u64(), Some(size), "{dev}");
    }
    let hmp_pci = qmp.human_monitor_command("info pci").unwrap();
    assert_eq!(hmp_pci.matches("1af4:1110").count(), 2, "{hmp_pci}");

    // QEMU created the missing region file at its size.
    assert_eq!(std::fs::metadata(&own).unwrap().len(), OWN_SIZE);
    let ro = |q: &mut QmpClient, obj: &str| {
        q.execute(
            "qom-get",
            Some(json!({"path": format!("/objects/{obj}"), "property": "readonly"})),
        )
        .unwrap()
    };
    assert_eq!(ro(&mut qmp, "peer"), json!(true));
    assert_eq!(ro(&mut qmp, "own"), json!(false));
    // QEMU maps the read-only region without write permission, the other shared-writable.
    assert_eq!(mapping_perms(child.pid(), &peer), ["r--s"]);
    assert_eq!(mapping_perms(child.pid(), &own), ["rw-s"]);

    // The guest sees what the host writes into the region files (shared mappings).
    write_at(&own, 0, b"IVHA");
    let own_bar = bar2_address(&mut qmp, "own");
    assert_eq!(guest_bytes(&mut qmp, own_bar, 4), b"IVHA");
    let peer_bar = bar2_address(&mut qmp, "peer");
    assert_eq!(guest_bytes(&mut qmp, peer_bar, 4), b"PEER");

    let block = qmp.execute("query-block", None).unwrap();
    let disk_info = block
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["device"] == "disk-a")
        .unwrap_or_else(|| panic!("{block}"));
    assert_eq!(disk_info["inserted"]["ro"], false, "{disk_info}");
    // "writeback" is not checked: it is the guest-visible write cache, which QEMU turns
    // off when a guest driver without flush support (SeaBIOS) takes the device.
    assert_eq!(
        disk_info["inserted"]["cache"]["no-flush"], false,
        "{disk_info}"
    );
    assert_eq!(
        disk_info["inserted"]["cache"]["direct"], false,
        "{disk_info}"
    );

    // The host forward is listening.
    TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), T)
        .unwrap_or_else(|e| panic!("hostfwd 127.0.0.1:{port} not listening: {e}"));
    let usernet = qmp.human_monitor_command("info usernet").unwrap();
    assert!(usernet.contains(&port.to_string()), "{usernet}");

    // Moving an address at run time, as a takeover does: remove the forward, add another.
    let out = qmp
        .human_monitor_command(&format!("hostfwd_remove n0 tcp:127.0.0.1:{port}"))
        .unwrap();
    assert!(out.contains("removed"), "{out:?}");
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
    let moved = HostForward {
        host_addr: Ipv4Addr::LOCALHOST,
        host_port: free_port(),
        guest_port: 10809,
    };
    let out = qmp
        .human_monitor_command(&format!("hostfwd_add n0 {}", moved.rule()))
        .unwrap();
    assert!(out.trim().is_empty(), "{out:?}");
    TcpStream::connect((Ipv4Addr::LOCALHOST, moved.host_port)).unwrap();
    // HMP reports failures as text in a successful QMP return, not as QMP errors.
    let out = qmp
        .human_monitor_command(&format!("hostfwd_add n0 {}", moved.rule()))
        .unwrap();
    assert!(
        !out.trim().is_empty(),
        "adding a forward twice should complain"
    );
    eprintln!("duplicate hostfwd_add says: {}", out.trim());

    qmp.quit().unwrap();
    wait_event(&events, "SHUTDOWN", T);
    assert!(pidfd_readable(&child, T), "QEMU did not exit after quit");
    let status = child.wait_timeout(T).unwrap().unwrap();
    assert!(status.success(), "{status}\n{}", log_of(&child));
    eprintln!("boot_with_every_device took {:?}", started.elapsed());
}

#[test]
fn rejected_command_line_fails_with_qemu_stderr() {
    let Some(bin) = qemu_or_skip("rejected_command_line_fails_with_qemu_stderr") else {
        return;
    };
    let f = Files::new();
    let cmd = QemuCommand::new(&bin)
        .machine("none")
        .qmp_socket(f.path("qmp.sock"))
        .extra_arg("-device")
        .extra_arg("no-such-device");
    let started = Instant::now();
    let err = qemu::launch(&cmd, &f.path("qemu.log"), T).unwrap_err();
    assert!(matches!(err, qemu::LaunchError::Exited { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("'no-such-device' is not a valid device model name"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// The layout of an ivha pair: each guest maps its own region read-write and its partner's
/// read-only, and both attach both disks.
#[test]
fn pair_shares_regions_and_disks() {
    let Some(bin) = qemu_or_skip("pair_shares_regions_and_disks") else {
        return;
    };
    let f = Files::new();
    let nodes = ["a", "b"];
    for n in nodes {
        sparse_file(&f.path(&format!("region-{n}")), OWN_SIZE);
        sparse_file(&f.path(&format!("disk-{n}.img")), DISK_SIZE);
    }
    let mut guests = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let peer = nodes[1 - i];
        let sock = f.path(&format!("qmp-{n}.sock"));
        let cmd = QemuCommand::new(&bin)
            .name(&format!("node-{n}"))
            .memory_mib(64)
            .shared_region("own", f.path(&format!("region-{n}")), OWN_SIZE, false)
            .shared_region("peer", f.path(&format!("region-{peer}")), OWN_SIZE, true)
            .disk("disk-a", f.path("disk-a.img"), "ivha-a", true)
            .disk("disk-b", f.path("disk-b.img"), "ivha-b", true)
            .user_net("n0", &[])
            .pvpanic()
            .qmp_socket(&sock);
        let mut child = spawn(&cmd, &f.path(&format!("qemu-{n}.log")));
        let qmp = connect_or_explain(&mut child, &sock);
        guests.push((child, qmp));
    }
    for (child, qmp) in &mut guests {
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running", "{status}\n{}", log_of(child));
    }
    // A's log written on the host side shows up in A's own BAR and in B's peer BAR.
    write_at(&f.path("region-a"), 8, b"node-a log");
    let (_, qmp_a) = &mut guests[0];
    let addr = bar2_address(qmp_a, "own") + 8;
    assert_eq!(guest_bytes(qmp_a, addr, 10), b"node-a log");
    let (_, qmp_b) = &mut guests[1];
    let addr = bar2_address(qmp_b, "peer") + 8;
    assert_eq!(guest_bytes(qmp_b, addr, 10), b"node-a log");
    // Fence A; B keeps running with A's disk attached.
    let (mut child_a, _) = guests.remove(0);
    child_a.kill_and_reap(T).unwrap();
    let (child_b, qmp_b) = &mut guests[0];
    assert_eq!(
        qmp_b.execute("query-status", None).unwrap()["status"],
        "running"
    );
    assert_eq!(child_b.try_wait().unwrap(), None);
    // Dropping B's handle kills it.
}

/// The coordinator's port: a virtio-serial port on a Unix socket QEMU connects to. QEMU
/// starts while nothing listens there yet (`reconnect=1`), and connects once something
/// does, as it does to a storage daemon started again.
#[test]
fn a_virtio_serial_port_reaches_its_socket_once_it_listens() {
    let Some(bin) = qemu_or_skip("a_virtio_serial_port_reaches_its_socket_once_it_listens") else {
        return;
    };
    let f = Files::new();
    let socket = f.path("coord-a.sock");
    let qmp_socket = f.path("qmp.sock");
    let cmd = QemuCommand::new(&bin)
        .machine("q35")
        .accel(Accel::Tcg)
        .memory_mib(64)
        .virtio_serial_port("coord", &socket, "ivha.coordinator")
        .qmp_socket(&qmp_socket);
    let mut child = spawn(&cmd, &f.path("qemu.log"));
    let mut qmp = connect_or_explain(&mut child, &qmp_socket);
    let status = qmp.execute("query-status", None).unwrap();
    assert_eq!(status["status"], "running", "{status}\n{}", log_of(&child));
    let pci = qmp.execute("query-pci", None).unwrap();
    let serial = pci_devices(&pci)
        .into_iter()
        .find(|d| d["qdev_id"] == "coordserial")
        .unwrap_or_else(|| panic!("no virtio-serial controller in {pci}"));
    // virtio-serial: legacy 0x1003, modern 0x1043.
    assert!(
        [(0x1af4, 0x1003), (0x1af4, 0x1043)].contains(&ids(&serial)),
        "{serial}"
    );
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "QEMU did not connect to {} within 5 s\n{}",
                    socket.display(),
                    log_of(&child)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    }
    let chardevs = qmp.execute("query-chardev", None).unwrap();
    let coord = chardevs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["label"] == "coord")
        .unwrap_or_else(|| panic!("{chardevs}"));
    assert!(
        coord["filename"]
            .as_str()
            .unwrap_or_default()
            .contains("coord-a.sock"),
        "{coord}"
    );
}
