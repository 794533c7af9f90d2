//! Smoke test with a real QEMU 7.2 (TCG, no KVM needed): the daemon serves a 16 MiB raw
//! image over vhost-user-blk, and a guest booted from the project's kernel and client
//! initramfs reads it, writes and fsyncs it (FLUSH), discards, and reads its serial
//! (GET_ID). The guest's /init is replaced by a script appended to the initramfs as a second
//! cpio archive (the kernel unpacks both; the later /init wins), which reports on the serial
//! console.
//!
//! It needs `qemu-system-x86_64` and `target/guest/{vmlinuz,client-initramfs.cpio.gz}`
//! (`scripts/build-guest-image.sh`); without them it says so and passes, except under CI
//! (`CI=true`), where a missing prerequisite is a failure.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use blkd::backend::{BlockBackend, serve};
use blkd::disk::{BlockFile, RawFile};
use blkd::table::WriteGate;

const IMAGE_SIZE: usize = 16 << 20;
const SERIAL: &str = "ivha-smoke-serial";
const WRITTEN: &str = "ivha-blkd smoke write";
/// The range the guest discards (offset, length).
const DISCARDED: (usize, usize) = (1 << 20, 64 << 10);

/// The guest's /init: busybox sh. Lines starting with "SMOKE " are for the test.
const INIT: &str = r#"#!/bin/sh
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
moddir=/lib/modules/$(uname -r)
while read -r mod; do
    [ -d "/sys/module/$mod" ] || insmod "$moddir/$mod.ko"
done <"$moddir/load-order"
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 300 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
[ -b /dev/vda ] || { echo "SMOKE error no /dev/vda"; poweroff -f; }
echo "SMOKE queues $(dmesg | grep -o '[0-9]*/0/0 default/read/poll queues')"
echo "SMOKE size $(cat /sys/block/vda/size)"
echo "SMOKE serial $(cat /sys/block/vda/serial)"
echo "SMOKE wce $(cat /sys/block/vda/queue/write_cache)"
echo "SMOKE sector3 $(dd if=/dev/vda bs=512 skip=3 count=1 2>/dev/null | od -An -v -tx1 | tr -d ' \n')"
echo "SMOKE last $(dd if=/dev/vda bs=512 skip=32767 count=1 2>/dev/null | od -An -v -tx1 | tr -d ' \n')"
printf '%s' "ivha-blkd smoke write" | dd of=/dev/vda bs=512 seek=7 conv=sync,fsync 2>/dev/null && echo "SMOKE wrote"
blkdiscard -o 1048576 -l 65536 /dev/vda && echo "SMOKE discarded"
echo "SMOKE done"
poweroff -f
"#;

/// The image, counting the flushes and discards that reach it.
#[derive(Debug)]
struct Counting {
    inner: RawFile,
    flushes: AtomicU64,
    discards: AtomicU64,
}

impl BlockFile for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.discards.fetch_add(1, Ordering::SeqCst);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

fn image_dir() -> PathBuf {
    let target_tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    target_tmp.parent().unwrap_or(target_tmp).join("guest")
}

fn prerequisites() -> bool {
    let mut missing = Vec::new();
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        missing.push("qemu-system-x86_64".to_owned());
    }
    for file in ["vmlinuz", "client-initramfs.cpio.gz"] {
        let path = image_dir().join(file);
        if !path.exists() {
            missing.push(format!(
                "{} (run scripts/build-guest-image.sh)",
                path.display()
            ));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "QEMU smoke test prerequisites missing: {}",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    false
}

/// Appends one entry to a cpio archive in the "newc" format.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// The client initramfs with our /init on top.
fn initramfs(dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(image_dir().join("client-initramfs.cpio.gz")).unwrap();
    // The kernel looks for the next archive at a 4-byte boundary and skips zeroes.
    while bytes.len() % 512 != 0 {
        bytes.push(0);
    }
    cpio_entry(&mut bytes, 1, "init", 0o100_755, INIT.as_bytes());
    cpio_entry(&mut bytes, 2, "TRAILER!!!", 0, &[]);
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of the console's "SMOKE <key> <value>" line.
fn reported<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("SMOKE {key}");
    console
        .lines()
        .find_map(|line| line.trim_end_matches('\r').strip_prefix(prefix.as_str()))
        .map(str::trim)
}

#[test]
fn a_guest_reads_writes_flushes_and_discards_through_qemu() {
    if prerequisites() {
        boot_guest(1);
    }
}

#[test]
fn a_guest_with_two_cpus_uses_two_queues() {
    if prerequisites() {
        boot_guest(2);
    }
}

/// Boots the guest on a fresh image with `queues` request queues (and as many CPUs, so
/// that Linux uses them all), and checks what it reported and left on the image.
fn boot_guest(queues: usize) {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let original = pattern(IMAGE_SIZE);
    std::fs::write(&image, &original).unwrap();
    let file = Arc::new(Counting {
        inner: RawFile::open(&image).unwrap(),
        flushes: AtomicU64::new(0),
        discards: AtomicU64::new(0),
    });
    let counts = file.clone();
    let socket = dir.path().join("blk.sock");

    let server_socket = socket.clone();
    // Serves forever; the thread ends with the test process.
    std::thread::spawn(move || {
        serve(&server_socket, || {
            BlockBackend::new(file.clone(), SERIAL.to_owned(), WriteGate::open(0), queues)
        })
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(10));
    }

    let console = dir.path().join("console.log");
    let qemu_log = std::fs::File::create(dir.path().join("qemu.log")).unwrap();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-machine", "q35,memory-backend=mem", "-m", "256M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .arg("-kernel")
        .arg(image_dir().join("vmlinuz"))
        .arg("-initrd")
        .arg(initramfs(dir.path()))
        // Kernel messages off the console: they could land in the middle of a report line.
        .args(["-append", "console=ttyS0 panic=-1 loglevel=1"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=c0,path={},reconnect=1",
            socket.display()
        ))
        .arg("-smp")
        .arg(queues.to_string())
        .arg("-device")
        .arg(format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"))
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone().unwrap())
        .stderr(qemu_log)
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let qemu_text = std::fs::read_to_string(dir.path().join("qemu.log")).unwrap_or_default();
    let context = format!("console:\n{text}\nqemu:\n{qemu_text}");
    assert!(
        status.is_some_and(|s| s.success()),
        "QEMU did not power off: {context}"
    );

    assert_eq!(
        reported(&text, "queues"),
        Some(format!("{queues}/0/0 default/read/poll queues").as_str()),
        "{context}"
    );
    assert_eq!(reported(&text, "size"), Some("32768"), "{context}");
    assert_eq!(reported(&text, "serial"), Some(SERIAL), "{context}");
    assert_eq!(reported(&text, "wce"), Some("write back"), "{context}");
    assert_eq!(
        reported(&text, "sector3"),
        Some(hex(&original[3 * 512..4 * 512]).as_str()),
        "{context}"
    );
    assert_eq!(
        reported(&text, "last"),
        Some(hex(&original[IMAGE_SIZE - 512..]).as_str()),
        "{context}"
    );
    assert!(reported(&text, "wrote").is_some(), "{context}");
    assert!(reported(&text, "discarded").is_some(), "{context}");
    assert!(reported(&text, "done").is_some(), "{context}");

    let after = std::fs::read(&image).unwrap();
    let mut expected = original.clone();
    expected[7 * 512..8 * 512].fill(0);
    expected[7 * 512..7 * 512 + WRITTEN.len()].copy_from_slice(WRITTEN.as_bytes());
    expected[DISCARDED.0..DISCARDED.0 + DISCARDED.1].fill(0);
    assert!(
        counts.flushes.load(Ordering::SeqCst) > 0,
        "no flush reached the image"
    );
    assert!(
        counts.discards.load(Ordering::SeqCst) > 0,
        "no discard reached the image"
    );

    let first_difference = after.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "{context}");
    assert_eq!(after.len(), IMAGE_SIZE);
}
