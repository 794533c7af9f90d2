//! How a link moves frames: a [`Transport`] sends a frame to a peer and hands back what
//! arrived, each frame with the peer it came from as the transport knows it (by source
//! address or socket, never by what the frame claims: the connection manager drops a frame
//! whose claim differs).
//!
//! - [`UdpLink`]: a guest's link over its point-to-point NICs, one UDP socket per link;
//! - [`UnixLink`]: process mode, one Unix datagram socket per node and link;
//! - the shared-memory mailbox, in [`super::mailbox_link`].

use std::io::ErrorKind;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use wire::interconnect::{LINK_PORT, link_address, node_of_address, node_of_socket, socket_name};

/// Largest datagram a link carries (a frame's header and its largest payload fit).
pub const MAX_DATAGRAM: usize = 65_536;

/// Errors opening a link.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot bind link {link}'s UDP socket to {address}")]
    Udp {
        link: u16,
        address: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind link {link}'s socket {}", path.display())]
    Unix {
        link: u16,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a link's transport counted besides the frames it moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportCounters {
    /// Sends the kernel refused (the peer's end is not there, a full queue, a NIC down).
    pub send_failures: u64,
    /// Datagrams from a source that is no node's end of this link.
    pub unknown_source: u64,
    /// Frames the transport could not carry or lost (the mailbox: too long, overwritten).
    pub lost: u64,
}

/// One link's way of moving frames.
pub trait Transport: Send + std::fmt::Debug {
    /// What the link is, for status: `udp`, `unix`, `mailbox`.
    fn kind(&self) -> &'static str;
    /// A descriptor that is readable when frames wait; None when the link must be polled
    /// on a timer.
    fn fd(&self) -> Option<BorrowedFd<'_>>;
    /// Sends `frame` to node `peer`; a failure is counted, never fatal (the peer may be
    /// down, which is what the heartbeats are for).
    fn send(&mut self, peer: u16, frame: &[u8]);
    /// Appends every frame that arrived, with the node it came from.
    fn receive(&mut self, out: &mut Vec<(u16, Vec<u8>)>);
    fn counters(&self) -> TransportCounters;
    /// A dead link's replacement, once it can be opened (see [`DeadLink`]).
    fn revive(&mut self) -> Option<Box<dyn Transport>> {
        None
    }
}

/// How a dead link tries to open again.
pub type Reopen = Box<dyn FnMut() -> Result<Box<dyn Transport>, OpenError> + Send>;

/// A link that could not be opened: it carries nothing, so the peer sees it down and the
/// link numbers stay the same on both ends; it tries to open again every
/// [`REOPEN_EVERY`] (a NIC that came late, a socket directory made late).
pub struct DeadLink {
    reopen: Option<Reopen>,
    next_try: std::time::Instant,
}

/// How often a dead link tries to open again.
pub const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl DeadLink {
    /// A link that stays dead (`reopen` None) or tries `reopen` now and then.
    pub fn new(reopen: Option<Reopen>) -> Self {
        Self {
            reopen,
            next_try: std::time::Instant::now() + REOPEN_EVERY,
        }
    }
}

impl std::fmt::Debug for DeadLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLink")
            .field("reopens", &self.reopen.is_some())
            .finish()
    }
}

impl Transport for DeadLink {
    fn kind(&self) -> &'static str {
        "none"
    }
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    fn send(&mut self, _peer: u16, _frame: &[u8]) {}
    fn receive(&mut self, _out: &mut Vec<(u16, Vec<u8>)>) {}
    fn counters(&self) -> TransportCounters {
        TransportCounters::default()
    }
    fn revive(&mut self) -> Option<Box<dyn Transport>> {
        let now = std::time::Instant::now();
        let reopen = self.reopen.as_mut()?;
        if now < self.next_try {
            return None;
        }
        self.next_try = now + REOPEN_EVERY;
        match reopen() {
            Ok(transport) => Some(transport),
            Err(error) => {
                log::debug!("interconnect: {}", wire::error_chain::one_line(&error));
                None
            }
        }
    }
}

/// Link `link` of a guest: a UDP socket on the node's address of that link; the NICs'
/// peer routes take each datagram to its peer's wire.
#[derive(Debug)]
pub struct UdpLink {
    link: u16,
    socket: UdpSocket,
    counters: TransportCounters,
    buffer: Vec<u8>,
}

impl UdpLink {
    pub fn open(link: u16, me: u16) -> Result<Self, OpenError> {
        let address = SocketAddrV4::new(link_address(link, me), LINK_PORT);
        let socket = UdpSocket::bind(address)
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
            .map_err(|source| OpenError::Udp {
                link,
                address,
                source,
            })?;
        Ok(Self {
            link,
            socket,
            counters: TransportCounters::default(),
            buffer: vec![0; MAX_DATAGRAM],
        })
    }
}

impl Transport for UdpLink {
    fn kind(&self) -> &'static str {
        "udp"
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.socket.as_fd())
    }

    fn send(&mut self, peer: u16, frame: &[u8]) {
        let to = SocketAddrV4::new(link_address(self.link, peer), LINK_PORT);
        if self.socket.send_to(frame, to).is_err() {
            self.counters.send_failures += 1;
        }
    }

    fn receive(&mut self, out: &mut Vec<(u16, Vec<u8>)>) {
        loop {
            match self.socket.recv_from(&mut self.buffer) {
                Ok((len, SocketAddr::V4(from))) if from.port() == LINK_PORT => {
                    match node_of_address(self.link, *from.ip()) {
                        Some(peer) => out.push((peer, self.buffer[..len].to_vec())),
                        None => self.counters.unknown_source += 1,
                    }
                }
                Ok(_) => self.counters.unknown_source += 1,
                Err(error) if error.kind() == ErrorKind::WouldBlock => return,
                // An ICMP error of an earlier send (the peer's port closed): nothing to read.
                Err(_) => {}
            }
        }
    }

    fn counters(&self) -> TransportCounters {
        self.counters
    }
}

/// Link `link` in process mode: node `me`'s Unix datagram socket in the cluster's
/// interconnect directory; a peer is reached at its own socket there.
#[derive(Debug)]
pub struct UnixLink {
    link: u16,
    dir: PathBuf,
    socket: UnixDatagram,
    counters: TransportCounters,
    buffer: Vec<u8>,
}

impl UnixLink {
    pub fn open(link: u16, me: u16, dir: &Path) -> Result<Self, OpenError> {
        let path = dir.join(socket_name(link, me));
        let failed = |source| OpenError::Unix {
            link,
            path: path.clone(),
            source,
        };
        // An earlier run of this agent left its socket; the region's lock says none runs now.
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != ErrorKind::NotFound => return Err(failed(error)),
            _ => {}
        }
        let socket = UnixDatagram::bind(&path)
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
            .map_err(failed)?;
        Ok(Self {
            link,
            dir: dir.to_owned(),
            socket,
            counters: TransportCounters::default(),
            buffer: vec![0; MAX_DATAGRAM],
        })
    }
}

impl Transport for UnixLink {
    fn kind(&self) -> &'static str {
        "unix"
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.socket.as_fd())
    }

    fn send(&mut self, peer: u16, frame: &[u8]) {
        let to = self.dir.join(socket_name(self.link, peer));
        if self.socket.send_to(frame, to).is_err() {
            self.counters.send_failures += 1;
        }
    }

    fn receive(&mut self, out: &mut Vec<(u16, Vec<u8>)>) {
        loop {
            match self.socket.recv_from(&mut self.buffer) {
                Ok((len, from)) => {
                    let peer = from
                        .as_pathname()
                        .and_then(Path::file_name)
                        .and_then(|name| name.to_str())
                        .and_then(|name| node_of_socket(self.link, name));
                    match peer {
                        Some(peer) => out.push((peer, self.buffer[..len].to_vec())),
                        None => self.counters.unknown_source += 1,
                    }
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return,
            }
        }
    }

    fn counters(&self) -> TransportCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_links_carry_frames_between_nodes_and_name_the_sender_by_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = UnixLink::open(1, 0, dir.path()).unwrap();
        let mut b = UnixLink::open(1, 2, dir.path()).unwrap();
        a.send(2, b"to b");
        a.send(5, b"to nobody");
        assert_eq!(a.counters().send_failures, 1);
        let mut got = Vec::new();
        b.receive(&mut got);
        assert_eq!(got, vec![(0, b"to b".to_vec())]);
        // A stranger's datagram is not a node's.
        let stranger = UnixDatagram::bind(dir.path().join("stranger")).unwrap();
        stranger
            .send_to(b"hi", dir.path().join(socket_name(1, 2)))
            .unwrap();
        got.clear();
        b.receive(&mut got);
        assert!(got.is_empty());
        assert_eq!(b.counters().unknown_source, 1);
        // A restarted agent binds its socket again.
        drop(b);
        let mut b = UnixLink::open(1, 2, dir.path()).unwrap();
        a.send(2, b"again");
        b.receive(&mut got);
        assert_eq!(got, vec![(0, b"again".to_vec())]);
    }
}
