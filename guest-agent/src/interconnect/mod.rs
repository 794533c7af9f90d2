//! The agent's side of the interconnect: its links to the peers (NICs in a guest, Unix
//! datagram sockets in process mode, the shared-memory mailbox), and the thread that runs
//! the connection manager (crate `interconnect`) over them, with the test clients on top,
//! publishing every link's state in the node's region for hostd.

pub mod clients;
pub mod mailbox_link;
pub mod negotiation;
pub mod nics;
pub mod publish;
pub mod runtime;
pub mod transport;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shm::{ControlRegion, InterconnectWriter, NodeRegion};

use mailbox_link::MailboxLink;
use negotiation::{Negotiator, Veto};
use runtime::{LinkSlot, Runtime, StatusSink};
use transport::{DeadLink, Transport, UdpLink, UnixLink};

use interconnect::link::LinkConfig;
use interconnect::manager::ManagerConfig;
use wire::interconnect::InterconnectOptions;

use clients::ClientConfig;
use runtime::Settings;

/// The runtime's settings from hostd's options, for node `me`.
pub fn settings(options: &InterconnectOptions, me: u16) -> Settings {
    let heartbeat = Duration::from_millis(options.heartbeat_ms);
    let every = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
    Settings {
        me,
        peers: options.peers.clone(),
        manager: ManagerConfig {
            link: LinkConfig {
                heartbeat,
                ..LinkConfig::default()
            },
            // Retransmit after four heartbeats: a lost frame is resent well before the
            // link is judged, and a moved channel resends at once anyway.
            retransmit: heartbeat * 4,
            ..ManagerConfig::default()
        },
        clients: ClientConfig {
            stream: every(options.stream_ms),
            ping: every(options.ping_ms),
            bulk_channels: options.bulk,
        },
        timer_poll: Duration::from_millis(options.mailbox_poll_ms),
        publish_every: Duration::from_millis(100),
    }
}

/// How long a negotiation question waits for the holder's answer.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors starting the interconnect.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("process mode needs --ic-socket-dir for the interconnect's network links")]
    NoSocketDir,
    #[error("cannot start the interconnect's thread")]
    Thread(#[source] std::io::Error),
}

/// What the interconnect needs from the agent.
#[derive(Debug)]
pub struct Parts<'a> {
    pub options: &'a InterconnectOptions,
    pub me: u16,
    /// Process mode (links are Unix datagram sockets), or a guest (links are NICs).
    pub process_mode: bool,
    /// Process mode: the directory of the link sockets.
    pub socket_dir: Option<&'a Path>,
    pub sys_class_net: &'a Path,
    /// The peers' regions this node maps (for their mailboxes).
    pub peers: &'a [NodeRegion],
    /// This node's interconnect area; None for a region without one.
    pub area: Option<InterconnectWriter>,
    pub control: Option<ControlRegion>,
    /// The failover monitor's negotiation questions, and this node's veto on the peers'.
    pub negotiation: Option<(negotiation::Questions, Arc<dyn Veto>)>,
}

/// Opens every link and starts the connection manager's thread; does nothing when the
/// interconnect is off. A link that cannot be opened is logged and left dead: the others
/// carry the channels.
pub fn start(parts: Parts<'_>) -> Result<(), StartError> {
    let options = parts.options;
    if !options.enabled() {
        return Ok(());
    }
    let me = parts.me;
    let mut transports: Vec<Box<dyn Transport>> = Vec::new();
    if options.links > 0 {
        match (parts.process_mode, parts.socket_dir) {
            (true, None) => return Err(StartError::NoSocketDir),
            (true, Some(dir)) => {
                for link in 0..options.links {
                    let dir = dir.to_owned();
                    transports.push(opened(
                        link,
                        UnixLink::open(link, me, &dir),
                        Box::new(move || {
                            UnixLink::open(link, me, &dir)
                                .map(|t| Box::new(t) as Box<dyn Transport>)
                        }),
                    ));
                }
            }
            (false, _) => {
                let nics = nics::find(parts.sys_class_net, me);
                nics::set_up(&nics, me);
                for link in 0..options.links {
                    if !nics.iter().any(|nic| nic.link == link) {
                        log::warn!("interconnect: no NIC of link {link} yet");
                    }
                    let sys = parts.sys_class_net.to_owned();
                    transports.push(opened(
                        link,
                        UdpLink::open(link, me),
                        Box::new(move || {
                            // A NIC that came late gets its address first.
                            let nics: Vec<nics::Nic> = nics::find(&sys, me)
                                .into_iter()
                                .filter(|nic| nic.link == link)
                                .collect();
                            nics::set_up(&nics, me);
                            UdpLink::open(link, me).map(|t| Box::new(t) as Box<dyn Transport>)
                        }),
                    ));
                }
            }
        }
    }
    let (sink, mailbox): (Box<dyn StatusSink>, _) = match parts.area {
        Some(area) => (
            Box::new(publish::RegionSink(area.links)),
            Some(area.mailbox),
        ),
        None => {
            log::warn!(
                "interconnect: this node's region has no interconnect area (formatted by an older build): no mailbox, links not shown"
            );
            (Box::new(NoSink), None)
        }
    };
    let mut settings = settings(options, me);
    if options.mailbox {
        transports.push(match mailbox {
            Some(writer) => {
                // A channel's burst must fit in the ring with room for the heartbeats and
                // acknowledgements, or its oldest frames are overwritten before they are read.
                let fits = (writer.slots() as usize / 2).max(1);
                settings.manager.flight = settings.manager.flight.min(fits);
                Box::new(MailboxLink::new(me, writer, parts.peers))
            }
            None => Box::new(DeadLink::new(None)),
        });
    }
    let links = transports
        .into_iter()
        .enumerate()
        .map(|(index, transport)| {
            // A guest's network links are cut at their NICs (the heartbeats see it);
            // hostd's word cuts what has no NIC: the mailbox, process mode's sockets.
            let at_nic = !parts.process_mode && index < usize::from(options.links);
            let cut: Box<dyn Fn() -> bool + Send> = match &parts.control {
                Some(control) if !at_nic => {
                    let control = control.clone();
                    let node = usize::from(me);
                    Box::new(move || control.links_cut(node) & (1 << index) != 0)
                }
                _ => Box::new(|| false),
            };
            LinkSlot { transport, cut }
        })
        .collect::<Vec<_>>();
    let kinds: Vec<&str> = links.iter().map(|l| l.transport.kind()).collect();
    log::info!(
        "interconnect: links {} to nodes {:?}, heartbeat {} ms",
        kinds.join(", "),
        options.peers,
        options.heartbeat_ms
    );
    let session = interconnect::session::session_id(std::time::SystemTime::now());
    let negotiator = parts
        .negotiation
        .map(|(questions, veto)| Negotiator::new(questions, veto, NEGOTIATION_TIMEOUT));
    let runtime = Runtime::new(settings, links, sink, negotiator, session, Instant::now());
    std::thread::Builder::new()
        .name("interconnect".into())
        .spawn(move || {
            // A bug here must not pass unnoticed: the agent goes on serving (its data
            // path does not need the interconnect), the error is logged, and the link
            // table, no longer published, goes stale in hostd's status.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.run())).is_err() {
                log::error!(
                    "interconnect: the connection manager failed; its links are no longer run"
                );
            }
        })
        .map_err(StartError::Thread)?;
    Ok(())
}

fn opened<T: Transport + 'static>(
    link: u16,
    result: Result<T, transport::OpenError>,
    reopen: transport::Reopen,
) -> Box<dyn Transport> {
    match result {
        Ok(transport) => Box::new(transport),
        Err(error) => {
            log::warn!(
                "interconnect: link {link} is down until it can be opened: {}",
                wire::error_chain::one_line(&error)
            );
            Box::new(DeadLink::new(Some(reopen)))
        }
    }
}

/// Publishes nothing (a region without an interconnect area).
#[derive(Debug)]
struct NoSink;

impl StatusSink for NoSink {
    fn config(&mut self, _links: u16, _heartbeat_ms: u64, _session: u64) {}
    fn link(&mut self, _peer: u16, _link: u16, _status: &shm::LinkStatus) {}
    fn clients(&mut self, _peer: u16, _stats: &clients::ClientStats) {}
}
