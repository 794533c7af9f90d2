//! A guest: the virtio-serial port QEMU connects to the node's coordinator socket.
//!
//! The port is the one whose `/sys/class/virtio-ports/vportNpM/name` is
//! [`wire::coordinator::PORT_NAME`]; its device is `/dev/vportNpM` (devtmpfs makes it).
//! It is opened non-blocking and waited on with poll(2), so every call ends by its
//! deadline. While nothing is connected on the host's side (the storage daemon is not
//! running, or QEMU has not connected its socket yet), the kernel says so at once: poll
//! reports a hang-up, writes would block and reads return 0. That is "unreachable now",
//! and the caller tries again later.
//!
//! A port is one stream for the guest's whole life, not a connection per call: an answer
//! that comes after its call gave up may be read by the next call, which skips it (see
//! [`super::CoordinatorClient`]). Closing the port drops what it had received.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use wire::coordinator::PORT_NAME;

use super::{Channel, ChannelError, MAX_LINE};

/// The port named [`PORT_NAME`], opened on first use.
#[derive(Debug)]
pub struct VirtioChannel {
    /// Where the ports are listed (`/sys/class/virtio-ports`).
    ports: PathBuf,
    /// Where their devices are (`/dev`).
    devices: PathBuf,
    open: Option<OpenPort>,
}

#[derive(Debug)]
struct OpenPort {
    file: File,
    path: PathBuf,
    /// Bytes read past the last whole line.
    received: Vec<u8>,
}

impl VirtioChannel {
    pub fn new(ports: PathBuf, devices: PathBuf) -> Self {
        Self {
            ports,
            devices,
            open: None,
        }
    }

    fn port(&mut self) -> Result<&mut OpenPort, ChannelError> {
        if self.open.is_none() {
            let path = find_port(&self.ports, &self.devices, PORT_NAME)?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
                .open(&path)
                .map_err(|source| ChannelError::Open {
                    what: path.display().to_string(),
                    source,
                })?;
            self.open = Some(OpenPort {
                file,
                path,
                received: Vec::new(),
            });
        }
        self.open.as_mut().ok_or(ChannelError::Closed)
    }
}

/// The device of the virtio-serial port named `name`.
pub fn find_port(ports: &Path, devices: &Path, name: &str) -> Result<PathBuf, ChannelError> {
    let no_port = || ChannelError::NoPort {
        name: name.to_owned(),
        dir: ports.display().to_string(),
    };
    let entries = std::fs::read_dir(ports).map_err(|_| no_port())?;
    for entry in entries.flatten() {
        let named = std::fs::read_to_string(entry.path().join("name"))
            .is_ok_and(|text| text.trim() == name);
        if named {
            return Ok(devices.join(entry.file_name()));
        }
    }
    Err(no_port())
}

/// Waits until `file` is ready for `wanted` (or has hung up) and returns what poll saw;
/// `Timeout` at the deadline.
fn wait(file: &File, wanted: PollFlags, deadline: Instant) -> Result<PollFlags, ChannelError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ChannelError::Timeout);
        }
        // poll(2) counts whole milliseconds: round up, so it never returns early for good.
        let ms = left.as_micros().div_ceil(1000).min(u128::from(u16::MAX)) as u16;
        let mut fds = [PollFd::new(file.as_fd(), wanted)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => return Ok(fds[0].revents().unwrap_or(PollFlags::empty())),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(ChannelError::Io(errno.into())),
        }
    }
}

impl Channel for VirtioChannel {
    fn send_line(&mut self, line: &str, deadline: Instant) -> Result<(), ChannelError> {
        let port = self.port()?;
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        let mut sent = 0;
        while sent < bytes.len() {
            match port.file.write(&bytes[sent..]) {
                Ok(0) => return Err(ChannelError::Closed),
                Ok(n) => sent += n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    let ready = wait(&port.file, PollFlags::POLLOUT, deadline)?;
                    // The host's side is not connected: writes would block for good.
                    if !ready.contains(PollFlags::POLLOUT) && ready.contains(PollFlags::POLLHUP) {
                        return Err(ChannelError::NotConnected);
                    }
                }
                Err(error) => return Err(ChannelError::Io(error)),
            }
        }
        Ok(())
    }

    fn read_line(&mut self, deadline: Instant) -> Result<String, ChannelError> {
        let port = self.port()?;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = port.received.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = port.received.drain(..=end).take(end).collect();
                return String::from_utf8(line)
                    .map_err(|e| ChannelError::Io(std::io::Error::other(e.to_string())));
            }
            if port.received.len() > MAX_LINE {
                return Err(ChannelError::TooLong);
            }
            match port.file.read(&mut buf) {
                // No data, and nobody on the host's side.
                Ok(0) => return Err(ChannelError::NotConnected),
                Ok(n) => port.received.extend_from_slice(&buf[..n]),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    wait(&port.file, PollFlags::POLLIN, deadline)?;
                }
                Err(error) => return Err(ChannelError::Io(error)),
            }
        }
    }

    fn reset(&mut self) {
        self.open = None;
    }

    fn describe(&self) -> String {
        match &self.open {
            Some(port) => format!("virtio-serial port {}", port.path.display()),
            None => format!("virtio-serial port {PORT_NAME:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The port is found by its name, whatever its number.
    #[test]
    fn the_port_is_found_by_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let ports = dir.path().join("virtio-ports");
        for (port, name) in [
            ("vport0p0", "org.qemu.guest_agent.0"),
            ("vport1p1", PORT_NAME),
        ] {
            std::fs::create_dir_all(ports.join(port)).unwrap();
            std::fs::write(ports.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_port(&ports, Path::new("/dev"), PORT_NAME).unwrap(),
            PathBuf::from("/dev/vport1p1")
        );
        assert!(matches!(
            find_port(&ports, Path::new("/dev"), "other"),
            Err(ChannelError::NoPort { .. })
        ));
        assert!(matches!(
            find_port(&dir.path().join("none"), Path::new("/dev"), PORT_NAME),
            Err(ChannelError::NoPort { .. })
        ));
    }

    /// Over a stand-in for the port (one end of a non-blocking socket pair): a line out, a
    /// line back in two pieces, silence until the deadline, and a host side that went away.
    #[test]
    fn lines_go_both_ways_over_a_non_blocking_port() {
        let (ours, mut host) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut channel = VirtioChannel::new(PathBuf::from("/none"), PathBuf::from("/none"));
        channel.open = Some(OpenPort {
            file: File::from(std::os::fd::OwnedFd::from(ours)),
            path: PathBuf::from("socketpair"),
            received: Vec::new(),
        });
        let deadline = || Instant::now() + Duration::from_secs(5);
        channel
            .send_line("{\"request\":\"state\"}", deadline())
            .unwrap();
        let mut got = [0u8; 20];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"{\"request\":\"state\"}\n");
        host.write_all(b"{\"a\":").unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            host.write_all(b"1}\n{\"b\"").unwrap();
            host
        });
        assert_eq!(channel.read_line(deadline()).unwrap(), "{\"a\":1}");
        let host = writer.join().unwrap();
        let started = Instant::now();
        assert!(matches!(
            channel.read_line(Instant::now() + Duration::from_millis(100)),
            Err(ChannelError::Timeout)
        ));
        assert!(started.elapsed() >= Duration::from_millis(100));
        drop(host);
        assert!(matches!(
            channel.read_line(deadline()),
            Err(ChannelError::NotConnected)
        ));
    }
}
