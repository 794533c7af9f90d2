//! Accepting connections, one thread each.
//!
//! [`Server::spawn`] runs the accept loop on a background thread and returns a handle that
//! can stop it; [`serve`] runs the same loop on the calling thread, for ever. Each accepted
//! connection gets `TCP_NODELAY`, a reader and a writer buffered with
//! [`ServerConfig::buffer_size`] bytes, and its own thread: a client that misbehaves, stalls
//! or disappears ends only its own connection.
//!
//! Connections are bounded, so that clients that connect and idle cannot use up the
//! agent's descriptors and threads: at most [`ServerConfig::max_negotiating`] may be
//! negotiating (more are closed as soon as they are accepted) and at most
//! [`ServerConfig::max_connections_per_export`] may use one export (`NBD_OPT_GO` over it is
//! answered with `NBD_REP_ERR_POLICY`); negotiation has a deadline. A connection holds one
//! descriptor. Refusals and idle closes are counted in [`ConnectionCounters`], which the
//! agent publishes. The limits hold per server: in process mode each identity's listener is
//! a server of its own.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::export::{Export, ExportRegistry};

use super::handshake::{self, Negotiated};
use super::polling::PollingReader;
use super::throttled_log::ThrottledLog;
use super::transmission::{self, End, Stats};
use super::{ConnectionError, IoContext};

/// How long the accept loop waits before it retries a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);
/// How often the accept loop looks for negotiations past their deadline.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// How long [`Server::shutdown`] waits for connection threads to finish.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Tunables of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest a client may take to negotiate, and to send any one part of it, before
    /// it is dropped (`None`: for ever). Transmission has [`ServerConfig::idle_timeout`].
    pub handshake_timeout: Option<Duration>,
    /// Capacity of each connection's read buffer and of its write buffer.
    pub buffer_size: usize,
    /// How long a connection polls its socket for the next request before it blocks
    /// (see [`super::polling`]; zero: it blocks at once).
    pub poll: Duration,
    /// Most connections that may use one export at once.
    pub max_connections_per_export: usize,
    /// Most connections that may be negotiating (no export chosen yet) at once.
    pub max_negotiating: usize,
    /// Close a connection in transmission that sends no request for this long (`None`:
    /// clients may idle for ever).
    pub idle_timeout: Option<Duration>,
    /// Counters shared by every server started with this configuration or a clone of it.
    pub counters: Arc<ConnectionCounters>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Some(Duration::from_secs(30)),
            buffer_size: 256 * 1024,
            poll: Duration::ZERO,
            max_connections_per_export: 128,
            max_negotiating: 32,
            idle_timeout: None,
            counters: Arc::default(),
        }
    }
}

/// Connection counts of one or more servers.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    open: AtomicU64,
    refused: AtomicU64,
    idle_closed: AtomicU64,
}

impl ConnectionCounters {
    /// Connections open now (negotiating or transmitting).
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections refused so far because a limit was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections closed so far because they idled past the timeout.
    pub fn idle_closed(&self) -> u64 {
        self.idle_closed.load(Ordering::Relaxed)
    }
}

/// A running NBD server: an accept thread plus a thread per connection.
///
/// Dropping it is the same as [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts serving `registry` on `listener` with the default configuration.
    pub fn spawn(listener: TcpListener, registry: Arc<ExportRegistry>) -> io::Result<Self> {
        Self::spawn_with(listener, registry, ServerConfig::default())
    }

    /// Starts serving `registry` on `listener`.
    pub fn spawn_with(
        listener: TcpListener,
        registry: Arc<ExportRegistry>,
        config: ServerConfig,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::new(registry, config)?);
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("nbd-accept {local_addr}"))
                .spawn(move || {
                    if let Err(error) = accept_loop(&listener, &shared) {
                        log::error!("nbd: server on {local_addr} stopped: {error}");
                    }
                })?
        };
        log::info!("nbd: serving on {local_addr}");
        Ok(Self {
            local_addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The counters this server shares with every server started with its configuration.
    pub fn counters(&self) -> &ConnectionCounters {
        &self.shared.config.counters
    }

    /// Number of connections open now (negotiating or transmitting).
    pub fn connection_count(&self) -> usize {
        self.shared.connections().live.len()
    }

    /// Closes every connection that is using export `name` (hard disconnect); returns how
    /// many. Remove the export from the registry first: a connection that picks it
    /// concurrently is then closed too, as soon as it has picked it.
    pub fn disconnect_export(&self, name: &str) -> usize {
        let connections = self.shared.connections();
        let mut count = 0;
        for connection in connections.live.values() {
            if connection.export.as_deref() == Some(name) {
                log::info!(
                    "nbd: disconnecting {} from export {name:?}",
                    connection.peer
                );
                let _ = connection.stream.shutdown(Shutdown::Both);
                count += 1;
            }
        }
        count
    }

    /// Stops accepting new connections; open ones go on.
    pub fn stop_accepting(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        // A full socket buffer means the accept loop has been woken already.
        let _ = (&self.shared.wake_acceptor).write(&[1]);
    }

    /// Stops accepting, closes every connection, and waits (up to 5 s) for their threads to
    /// finish. Requests being executed complete; their replies may not reach the client.
    pub fn shutdown(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.stop_accepting();
        if acceptor.join().is_err() {
            log::error!("nbd: the accept thread of {} panicked", self.local_addr);
        }
        {
            let connections = self.shared.connections();
            for connection in connections.live.values() {
                let _ = connection.stream.shutdown(Shutdown::Both);
            }
        }
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while self.connection_count() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let left = self.connection_count();
        if left > 0 {
            log::warn!(
                "nbd: server on {} stopped with {left} connection thread(s) still busy",
                self.local_addr
            );
        } else {
            log::info!("nbd: server on {} stopped", self.local_addr);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

/// State shared by the accept loop, the connection threads and the [`Server`] handle.
#[derive(Debug)]
struct Shared {
    registry: Arc<ExportRegistry>,
    config: ServerConfig,
    stopping: AtomicBool,
    /// Written to when `stopping` is set: the accept loop sleeps in `poll` on the other end
    /// instead of waking every few milliseconds to look at the flag, which an idle guest
    /// under TCG pays for in host CPU.
    wake_acceptor: UnixStream,
    acceptor_wakeups: UnixStream,
    connections: Mutex<Connections>,
    /// Warnings that would otherwise repeat for every client while their cause lasts.
    refusal_log: ThrottledLog,
    accept_log: ThrottledLog,
}

#[derive(Debug, Default)]
struct Connections {
    next_id: u64,
    live: HashMap<u64, Connection>,
}

/// What the server keeps of an open connection: enough to close it and to say what it uses.
#[derive(Debug)]
struct Connection {
    peer: SocketAddr,
    stream: Arc<TcpStream>,
    export: Option<String>,
    accepted: Instant,
}

/// Why a connection is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Refusal {
    #[error("the server is stopping")]
    Stopping,
    #[error("{limit} connections are negotiating already, the limit")]
    Negotiating { limit: usize },
    #[error("export {export:?} has {limit} connections, its limit")]
    ExportFull { export: String, limit: usize },
    #[error("export {export:?} is no longer served here")]
    Withdrawn { export: String },
}

impl Shared {
    fn new(registry: Arc<ExportRegistry>, config: ServerConfig) -> io::Result<Self> {
        let (wake_acceptor, acceptor_wakeups) = UnixStream::pair()?;
        wake_acceptor.set_nonblocking(true)?;
        Ok(Self {
            registry,
            config,
            stopping: AtomicBool::new(false),
            wake_acceptor,
            acceptor_wakeups,
            connections: Mutex::new(Connections::default()),
            refusal_log: ThrottledLog::default(),
            accept_log: ThrottledLog::default(),
        })
    }

    /// Counts a refusal over a limit and says so (at most once a second).
    fn refused(&self, peer: SocketAddr, refusal: &Refusal) {
        self.config.counters.refused.fetch_add(1, Ordering::Relaxed);
        self.refusal_log
            .warn(|| format!("nbd: refusing {peer}: {refusal}"));
    }

    fn connections(&self) -> MutexGuard<'_, Connections> {
        // The table stays consistent even if a holder panicked: every update is one insert,
        // remove or field store.
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a new connection, unless the server is stopping or too many connections
    /// are negotiating.
    fn register(&self, peer: SocketAddr, stream: Arc<TcpStream>) -> Result<u64, Refusal> {
        let mut connections = self.connections();
        if self.stopping.load(Ordering::Acquire) {
            return Err(Refusal::Stopping);
        }
        let negotiating = connections
            .live
            .values()
            .filter(|c| c.export.is_none())
            .count();
        if negotiating >= self.config.max_negotiating {
            return Err(Refusal::Negotiating {
                limit: self.config.max_negotiating,
            });
        }
        let id = connections.next_id;
        connections.next_id += 1;
        connections.live.insert(
            id,
            Connection {
                peer,
                stream,
                export: None,
                accepted: Instant::now(),
            },
        );
        self.config.counters.open.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Lets a connection use the export it chose, if the export is still served and has
    /// room. Counting and recording under one lock keeps the limit exact.
    fn claim(&self, id: u64, export: &Arc<dyn Export>) -> Result<(), Refusal> {
        let mut connections = self.connections();
        let name = export.name();
        if !self
            .registry
            .get(name)
            .is_some_and(|current| Arc::ptr_eq(&current, export))
        {
            return Err(Refusal::Withdrawn {
                export: name.to_owned(),
            });
        }
        let using = connections
            .live
            .values()
            .filter(|c| c.export.as_deref() == Some(name))
            .count();
        if using >= self.config.max_connections_per_export {
            return Err(Refusal::ExportFull {
                export: name.to_owned(),
                limit: self.config.max_connections_per_export,
            });
        }
        if let Some(connection) = connections.live.get_mut(&id) {
            connection.export = Some(name.to_owned());
        }
        Ok(())
    }

    /// Closes connections still negotiating past the handshake timeout. The socket's
    /// timeout bounds each read only; a client that sends an option now and then would
    /// otherwise hold a negotiating slot for ever.
    fn close_slow_negotiations(&self) {
        let Some(timeout) = self.config.handshake_timeout else {
            return;
        };
        let connections = self.connections();
        for connection in connections.live.values() {
            if connection.export.is_none() && connection.accepted.elapsed() > timeout {
                log::info!(
                    "nbd: closing {}: still negotiating after {} s",
                    connection.peer,
                    timeout.as_secs()
                );
                let _ = connection.stream.shutdown(Shutdown::Both);
            }
        }
    }

    fn deregister(&self, id: u64) {
        if self.connections().live.remove(&id).is_some() {
            self.config.counters.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) -> io::Result<()> {
    let mut next_reap = Instant::now() + REAP_INTERVAL;
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        if Instant::now() >= next_reap {
            shared.close_slow_negotiations();
            next_reap = Instant::now() + REAP_INTERVAL;
        }
        match listener.accept() {
            Ok((stream, peer)) => start_connection(stream, peer, shared),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                // Until a client connects, the server stops or the next reap is due.
                let timeout =
                    PollTimeout::try_from(next_reap.saturating_duration_since(Instant::now()))
                        .unwrap_or(PollTimeout::MAX);
                let mut fds = [
                    PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                    PollFd::new(shared.acceptor_wakeups.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(errno) => return Err(io::Error::from(errno)),
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                ) => {}
            Err(error) => {
                // Out of file descriptors or memory, most likely: wait and retry.
                shared
                    .accept_log
                    .warn(|| format!("nbd: accept failed: {error}; retrying"));
                thread::sleep(ACCEPT_RETRY);
            }
        }
    }
}

fn start_connection(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let stream = Arc::new(stream);
    let id = match shared.register(peer, Arc::clone(&stream)) {
        Ok(id) => id,
        Err(Refusal::Stopping) => return,
        // Closed at once: the client sees the connection end before any greeting.
        Err(refusal) => return shared.refused(peer, &refusal),
    };
    let thread_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("nbd {peer}"))
        .spawn(move || run_connection(stream, peer, id, &thread_shared));
    if let Err(error) = spawned {
        log::warn!("nbd: dropping connection from {peer}: no thread: {error}");
        shared.deregister(id);
    }
}

/// Removes a connection from the table when its thread ends, even by panic.
struct Deregister<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Deregister<'_> {
    fn drop(&mut self) {
        self.shared.deregister(self.id);
    }
}

fn run_connection(stream: Arc<TcpStream>, peer: SocketAddr, id: u64, shared: &Shared) {
    let _deregister = Deregister { shared, id };
    log::info!("nbd: connection from {peer}");
    let mut stats = Stats::default();
    match connection(stream, peer, id, shared, &mut stats) {
        Ok(None) => log::info!("nbd: {peer} disconnected during negotiation"),
        Ok(Some((export, end))) => {
            let how = match end {
                End::Disconnect => "disconnected",
                End::HangUp => "hung up",
            };
            log::info!("nbd: {peer} {how} from export {export:?} ({stats})");
        }
        Err(ConnectionError::Idle(timeout)) => {
            shared
                .config
                .counters
                .idle_closed
                .fetch_add(1, Ordering::Relaxed);
            log::info!(
                "nbd: closing connection from {peer}: no request for {} s ({stats})",
                timeout.as_secs()
            );
        }
        Err(error @ ConnectionError::Refused { .. }) => {
            log::info!("nbd: closing connection from {peer}: {error}");
        }
        Err(error) if error.is_timeout() => {
            log::info!(
                "nbd: closing connection from {peer}: {} ({stats})",
                wire::error_chain::one_line(&error)
            );
        }
        Err(error) if error.is_hang_up() => {
            log::info!(
                "nbd: {peer} went away: {} ({stats})",
                wire::error_chain::one_line(&error)
            );
        }
        Err(error) => {
            log::warn!(
                "nbd: closing connection from {peer}: {} ({stats})",
                wire::error_chain::one_line(&error)
            );
        }
    }
}

/// Negotiates and serves one connection; `None` if it ended during negotiation.
fn connection(
    stream: Arc<TcpStream>,
    peer: SocketAddr,
    id: u64,
    shared: &Shared,
    stats: &mut Stats,
) -> Result<Option<(String, End)>, ConnectionError> {
    // Accepted sockets do not inherit O_NONBLOCK on Linux; make sure anyway.
    stream
        .set_nonblocking(false)
        .context("configuring the socket")?;
    stream.set_nodelay(true).context("configuring the socket")?;
    stream
        .set_read_timeout(shared.config.handshake_timeout)
        .context("configuring the socket")?;
    // Reader, writer and the server's table share the one descriptor.
    let read_half = PollingReader::new(Arc::clone(&stream), shared.config.poll);
    let mut reader = BufReader::with_capacity(shared.config.buffer_size, read_half);
    let mut writer = BufWriter::with_capacity(shared.config.buffer_size, &*stream);

    let mut admit = |export: &Arc<dyn Export>| {
        shared.claim(id, export).map_err(|refusal| {
            if matches!(refusal, Refusal::ExportFull { .. }) {
                shared.refused(peer, &refusal);
            } else {
                log::info!("nbd: refusing {peer}: {refusal}");
            }
            refusal.to_string()
        })
    };
    let negotiated =
        handshake::negotiate_admitting(&mut reader, &mut writer, &shared.registry, &mut admit)?;
    let export = match negotiated {
        Negotiated::Transmission(export) => export,
        Negotiated::Ended => return Ok(None),
    };
    let idle_timeout = shared.config.idle_timeout;
    stream
        .set_read_timeout(idle_timeout)
        .context("configuring the socket")?;
    log::info!(
        "nbd: {peer} uses export {:?} ({} bytes{})",
        export.name(),
        export.size(),
        if export.read_only() {
            ", read-only"
        } else {
            ""
        }
    );
    let end =
        transmission::serve(&mut reader, &mut writer, export.as_ref(), stats).map_err(|error| {
            match idle_timeout {
                Some(timeout) if error.is_idle() => ConnectionError::Idle(timeout),
                _ => error,
            }
        })?;
    Ok(Some((export.name().to_owned(), end)))
}
