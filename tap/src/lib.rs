//! Tap devices for guests' NICs (bridge mode).
//!
//! hostd opens each guest's tap inside the cluster's network namespace and hands the file
//! descriptor to QEMU, so QEMU itself stays in hostd's namespace (its QMP socket, regions
//! and disks are where hostd left them). A tap made by `TUNSETIFF` lives as long as a
//! descriptor does: it goes with the QEMU that holds it, and a restarted guest gets a new
//! one of the same name.
//!
//! Written here rather than taken from the `tun` crate: that crate brings an async stack
//! and hands the descriptor out as a raw number, and all this needs is one ioctl.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sched::CloneFlags;

/// The longest interface name Linux takes (`IFNAMSIZ` less the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// How long a tap whose previous holder just died may stay busy.
const BUSY_FOR: Duration = Duration::from_secs(2);

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} must be 1 to 15 letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error("cannot open network namespace {}", path.display())]
    Namespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {}", path.display())]
    Enter {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot open /dev/net/tun (bridge mode needs root and the tun module)")]
    Tun(#[source] std::io::Error),
    #[error("the kernel refused to create tap {name}")]
    Create {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("cannot start the thread that opens tap {name}")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the thread that opened tap {name} panicked")]
    Panicked { name: String },
}

nix::ioctl_readwrite_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);

/// Creates tap `name` (no packet information, with virtio-net headers, as QEMU's own taps
/// are) in the network namespace at `netns` (`/run/netns/NAME`), or in hostd's own with
/// None, and returns its descriptor (close-on-exec).
pub fn open(netns: Option<&Path>, name: &str) -> Result<OwnedFd, TapError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(TapError::Name(name.to_owned()));
    }
    let namespace = match netns {
        Some(path) => Some(File::open(path).map_err(|source| TapError::Namespace {
            path: path.to_owned(),
            source,
        })?),
        None => None,
    };
    // setns changes only the calling thread's namespace: a thread of its own enters it,
    // creates the tap there (a tap belongs to the namespace it is created in) and ends.
    std::thread::scope(|scope| {
        let opener = std::thread::Builder::new()
            .name("tap".into())
            .spawn_scoped(scope, || {
                if let (Some(file), Some(path)) = (&namespace, netns) {
                    nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(
                        |source| TapError::Enter {
                            path: path.to_owned(),
                            source,
                        },
                    )?;
                }
                create(name)
            })
            .map_err(|source| TapError::Thread {
                name: name.to_owned(),
                source,
            })?;
        opener.join().map_err(|_| TapError::Panicked {
            name: name.to_owned(),
        })?
    })
}

fn create(name: &str) -> Result<OwnedFd, TapError> {
    let mut ifr_name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (to, from) in ifr_name.iter_mut().zip(name.bytes()) {
        *to = from as libc::c_char;
    }
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // Every byte of the union set (the widest member zeroed) before the flags go in: the
    // kernel copies the whole struct in.
    let mut ifr_ifru = libc::__c_anonymous_ifr_ifru {
        ifru_map: libc::__c_anonymous_ifru_map {
            mem_start: 0,
            mem_end: 0,
            base_addr: 0,
            irq: 0,
            dma: 0,
            port: 0,
        },
    };
    ifr_ifru.ifru_flags = flags;
    let mut request = libc::ifreq { ifr_name, ifr_ifru };
    let deadline = Instant::now() + BUSY_FOR;
    loop {
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(TapError::Tun)?;
        // SAFETY: TUNSETIFF (_IOW('T', 202, int), whatever its size field says) reads one
        // `struct ifreq` through the pointer and writes the device's name back into it:
        // the pointer is to `request`, a fully initialised `libc::ifreq` (the kernel's
        // layout, 40 bytes on x86_64) borrowed mutably for the whole call; the descriptor is
        // an open /dev/net/tun that `tun` owns.
        #[allow(unsafe_code)]
        let done = unsafe { tun_set_iff(tun.as_raw_fd(), &mut request) };
        match done {
            Ok(_) => return Ok(OwnedFd::from(tun)),
            // The tap of a QEMU that just died may not be gone yet.
            Err(Errno::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(TapError::Create {
                    name: name.to_owned(),
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_anything_is_opened() {
        for name in ["", "a-name-that-is-too-long", "tap 0", "tap/0"] {
            let error = open(None, name).unwrap_err();
            assert!(matches!(error, TapError::Name(_)), "{name}: {error}");
        }
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let error = open(Some(Path::new("/run/netns/ivha-no-such-ns")), "t0").unwrap_err();
        assert!(error.to_string().contains("ivha-no-such-ns"), "{error}");
    }
}
