//! The NBD server against real clients: qemu-io, qemu-img, nbdinfo and nbdcopy, run as
//! subprocesses against a server started in this process over a file-backed export.
//!
//! The tools come from Debian's `qemu-utils` and `libnbd-bin`. When one is missing the test
//! prints SKIPPED and passes, except under `CI=true`, where it fails.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use guest_agent::export::ExportRegistry;
use guest_agent::export_file::FileExport;
use guest_agent::nbd::Server;

const MIB: u64 = 1024 * 1024;

/// Whether every tool is installed; under CI a missing one fails the test.
fn have(tools: &[(&str, &str)]) -> bool {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| {
            !Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(tool, package)| format!("{tool} (apt-get install {package})"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!("NBD client tools missing: {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    false
}

const QEMU_IO: (&str, &str) = ("qemu-io", "qemu-utils");
const QEMU_IMG: (&str, &str) = ("qemu-img", "qemu-utils");
const NBDINFO: (&str, &str) = ("nbdinfo", "libnbd-bin");
const NBDCOPY: (&str, &str) = ("nbdcopy", "libnbd-bin");

/// A server with file-backed exports, each `(name, size, max_request)`.
struct Fixture {
    server: Server,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(exports: &[(&str, u64, u32)]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(ExportRegistry::new());
        for &(name, size, max_request) in exports {
            let path = dir.path().join(format!("{name}.img"));
            std::fs::File::create(&path).unwrap().set_len(size).unwrap();
            let export = FileExport::open(&path, name)
                .unwrap()
                .with_max_request(max_request);
            registry.insert(Arc::new(export));
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = Server::spawn(listener, registry).unwrap();
        Fixture { server, dir }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.server.local_addr())
    }

    fn image(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}.img"))
    }
}

/// Runs a command; panics with its output unless it succeeds. Returns stdout.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        !stdout.contains("failed") && !stderr.contains("failed"),
        "{program} {args:?} reported a failure:\n{stdout}\n{stderr}"
    );
    stdout
}

/// Runs qemu-io commands against `uri` in one session.
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(uri);
    run("qemu-io", &args)
}

fn read_file(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Deterministic pseudo-random bytes (xorshift).
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn qemu_io_reads_writes_flushes_zeroes_and_discards() {
    if !have(&[QEMU_IO]) {
        return;
    }
    let f = Fixture::new(&[("disk", 64 * MIB, 32 << 20)]);
    let uri = f.uri("disk");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            // Unaligned, and with FUA.
            "write -P 0xcd 1000 512",
            "write -f -P 0x11 1M 4k",
            "flush",
            "read -P 0xab 0 1000",
            "read -P 0xcd 1000 512",
            "read -P 0xab 1512 64000",
            "read -P 0x11 1M 4k",
            // Write zeroes, with and without permission to unmap.
            "write -P 0x22 2M 128k",
            "write -z 2M 64k",
            "write -z -u 2112k 32k",
            "read -P 0 2M 96k",
            "read -P 0x22 2144k 32k",
            // Discard reads back as zeroes on this export.
            "write -P 0x33 3M 64k",
            "discard 3M 64k",
            "read -P 0 3M 64k",
            // The last bytes of the export.
            "write -P 0x44 67108352 512",
            "read -P 0x44 67108352 512",
        ],
    );
    // A second session sees it all, and so does the file.
    qemu_io(
        &uri,
        &[
            "read -P 0xcd 1000 512",
            "read -P 0x11 1M 4k",
            "read -P 0 2M 96k",
        ],
    );
    assert_eq!(read_file(&f.image("disk"), 1000, 512), vec![0xcd; 512]);
    assert_eq!(read_file(&f.image("disk"), 999, 1), vec![0xab]);
    assert_eq!(read_file(&f.image("disk"), 1512, 1), vec![0xab]);
    // Past the end fails cleanly, and the server goes on serving.
    let output = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 67108352 1024", &uri])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("read failed") || !output.status.success(),
        "{text}"
    );
    qemu_io(&uri, &["read -P 0x44 67108352 512"]);
}

#[test]
fn qemu_io_splits_requests_at_the_advertised_maximum() {
    if !have(&[QEMU_IO]) {
        return;
    }
    // A 64 KiB maximum block size: qemu must split a 1 MiB write and read, or the server
    // refuses them with EINVAL.
    let f = Fixture::new(&[("small", 16 * MIB, 64 * 1024)]);
    qemu_io(
        &f.uri("small"),
        &[
            "write -P 0x5a 100 1M",
            "read -P 0x5a 100 1M",
            "write -z 4M 3M",
            "read -P 0 4M 3M",
        ],
    );
    assert_eq!(
        read_file(&f.image("small"), 100, 1 << 20),
        vec![0x5a; 1 << 20]
    );
    // And a 40 MiB request against the default 32 MiB maximum.
    let f = Fixture::new(&[("big", 64 * MIB, 32 << 20)]);
    qemu_io(
        &f.uri("big"),
        &["write -P 0x6b 1M 40M", "read -P 0x6b 1M 40M"],
    );
}

#[test]
fn qemu_img_convert_round_trip() {
    if !have(&[QEMU_IMG]) {
        return;
    }
    let f = Fixture::new(&[("conv", 8 * MIB, 32 << 20)]);
    let data = random_bytes(8 * MIB as usize, 0x1234_5678_9abc_def1);
    let source = f.dir.path().join("source.raw");
    std::fs::write(&source, &data).unwrap();
    let uri = f.uri("conv");
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            source.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(std::fs::read(f.image("conv")).unwrap() == data);
    let back = f.dir.path().join("back.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            back.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&back).unwrap() == data);
    let info = run("qemu-img", &["info", "-f", "raw", &uri]);
    assert!(info.contains("8 MiB"), "{info}");
}

#[test]
fn nbdcopy_round_trip_over_several_connections() {
    if !have(&[NBDCOPY]) {
        return;
    }
    let f = Fixture::new(&[("copy", 8 * MIB, 32 << 20)]);
    let data = random_bytes(8 * MIB as usize, 0x0fed_cba9_8765_4321);
    let source = f.dir.path().join("source.raw");
    std::fs::write(&source, &data).unwrap();
    let uri = f.uri("copy");
    // nbdcopy opens several connections when the server allows multi-conn.
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            source.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(std::fs::read(f.image("copy")).unwrap() == data);
    let back = f.dir.path().join("back.raw");
    std::fs::File::create(&back).unwrap();
    run("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data);
}

#[test]
fn nbdinfo_describes_and_lists_exports() {
    if !have(&[NBDINFO]) {
        return;
    }
    let f = Fixture::new(&[("a", 64 * MIB, 32 << 20), ("b", 8 * MIB, 1 << 20)]);
    let info = run("nbdinfo", &[&f.uri("a")]);
    for expected in [
        "export=\"a\"",
        "export-size: 67108864",
        "can_flush: true",
        "can_fua: true",
        "can_multi_conn: true",
        "can_trim: true",
        "can_zero: true",
        "is_read_only: false",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
    ] {
        assert!(info.contains(expected), "no {expected:?} in:\n{info}");
    }
    let size = run("nbdinfo", &["--size", &f.uri("b")]);
    assert_eq!(size.trim(), "8388608");
    let list = run("nbdinfo", &["--list", &f.uri("")]);
    for expected in ["export=\"a\"", "export=\"b\"", "export-size: 8388608"] {
        assert!(list.contains(expected), "no {expected:?} in:\n{list}");
    }
    // An unknown export is refused with a message, not a hang or a crash.
    let output = Command::new("nbdinfo").arg(f.uri("nope")).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nope"), "{stderr}");
    // The server is still fine.
    run("nbdinfo", &["--size", &f.uri("a")]);
}
