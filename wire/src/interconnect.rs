//! The interconnect between the agents: its settings as hostd hands them over, and how its
//! network links are addressed, defined once for hostd (which wires the NICs) and the agent
//! (which finds and configures them).
//!
//! Link `k` between nodes `i` and `j` is a point-to-point virtio-net pair: node `i`'s NIC for
//! it has the MAC [`nic_mac`]`(k, i, j)`, and the agent gives every link-`k` NIC of node `i`
//! the address [`link_address`]`(k, i)` with a peer route to `link_address(k, j)`, so one UDP
//! socket per link reaches every peer on its own wire. In process mode a link is a Unix
//! datagram socket per node, [`socket_name`].

use std::net::Ipv4Addr;

/// Most network links between two nodes (the shared-memory mailbox comes on top).
pub const MAX_NETWORK_LINKS: u16 = 3;

/// The UDP port of every link in a guest.
pub const LINK_PORT: u16 = 7400;

/// The interconnect's settings, the same for every agent of a cluster but the peers.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct InterconnectOptions {
    /// Interconnect: network links to each peer (NICs in a guest, Unix datagram sockets in
    /// process mode); 0 with no mailbox turns the interconnect off.
    #[arg(id = "ic_links", long = "ic-links", default_value_t = 0, value_name = "COUNT",
          value_parser = clap::value_parser!(u16).range(0..=MAX_NETWORK_LINKS as i64))]
    pub links: u16,

    /// Interconnect: a link through the shared-memory mailbox in the regions as well.
    /// `--ic-mailbox` alone means on; a value (1/0, true/false) may follow.
    #[arg(id = "ic_mailbox", long = "ic-mailbox", num_args = 0..=1, default_missing_value = "true",
          default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "ON")]
    pub mailbox: bool,

    /// Interconnect: heartbeat interval of every link; two intervals of silence make a
    /// link degraded, three down.
    #[arg(id = "ic_heartbeat_ms", long = "ic-heartbeat-ms", default_value_t = 50, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(2..=10_000))]
    pub heartbeat_ms: u64,

    /// Interconnect: how often the mailboxes of the peers are read.
    #[arg(id = "ic_mailbox_poll_ms", long = "ic-mailbox-poll-ms", default_value_t = 5, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pub mailbox_poll_ms: u64,

    /// Interconnect: the node ids of this node's peers (those it may take over, and those
    /// that may take it over).
    #[arg(
        id = "ic_peers",
        long = "ic-peers",
        value_delimiter = ',',
        value_name = "ID,..."
    )]
    pub peers: Vec<u16>,

    /// Interconnect test client: send each peer a numbered control message this often
    /// (0: off); the peer checks order and gaps.
    #[arg(id = "ic_stream_ms", long = "ic-stream-ms", default_value_t = 0, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub stream_ms: u64,

    /// Interconnect test client: ping each peer on a control channel this often and keep
    /// the round trips (0: off).
    #[arg(id = "ic_ping_ms", long = "ic-ping-ms", default_value_t = 0, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub ping_ms: u64,

    /// Interconnect test client: this many bulk channels to each peer, each kept full
    /// (0: off).
    #[arg(id = "ic_bulk", long = "ic-bulk", default_value_t = 0, value_name = "CHANNELS",
          value_parser = clap::value_parser!(u16).range(0..=4))]
    pub bulk: u16,
}

impl Default for InterconnectOptions {
    fn default() -> Self {
        Self {
            links: 0,
            mailbox: false,
            heartbeat_ms: 50,
            mailbox_poll_ms: 5,
            peers: Vec::new(),
            stream_ms: 0,
            ping_ms: 0,
            bulk: 0,
        }
    }
}

impl InterconnectOptions {
    /// Whether the agent runs the interconnect at all.
    pub fn enabled(&self) -> bool {
        (self.links > 0 || self.mailbox) && !self.peers.is_empty()
    }

    /// Every link's index: network links first, then the mailbox.
    pub fn link_count(&self) -> u16 {
        self.links + u16::from(self.mailbox)
    }

    /// The flags (without `--`) and values that differ from an agent without interconnect.
    pub fn flags(&self) -> Vec<(&'static str, Option<String>)> {
        if !self.enabled() {
            return Vec::new();
        }
        let peers = self
            .peers
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut flags = vec![
            ("ic-links", Some(self.links.to_string())),
            ("ic-heartbeat-ms", Some(self.heartbeat_ms.to_string())),
            ("ic-mailbox-poll-ms", Some(self.mailbox_poll_ms.to_string())),
            ("ic-peers", Some(peers)),
        ];
        if self.mailbox {
            flags.push(("ic-mailbox", None));
        }
        for (flag, value) in [
            ("ic-stream-ms", self.stream_ms),
            ("ic-ping-ms", self.ping_ms),
        ] {
            if value > 0 {
                flags.push((flag, Some(value.to_string())));
            }
        }
        if self.bulk > 0 {
            flags.push(("ic-bulk", Some(self.bulk.to_string())));
        }
        flags
    }
}

/// The MAC of node `me`'s NIC for link `link` to node `peer` (locally administered).
pub fn nic_mac(link: u16, me: u16, peer: u16) -> [u8; 6] {
    [0x52, 0x54, 0x01, link as u8, me as u8, peer as u8]
}

/// `nic_mac` as `52:54:01:..`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Which link and peer a NIC of node `me` with MAC `mac` serves, if it is one of its
/// interconnect NICs.
pub fn parse_nic_mac(mac: [u8; 6], me: u16) -> Option<(u16, u16)> {
    let [a, b, c, link, node, peer] = mac;
    ([a, b, c] == [0x52, 0x54, 0x01] && u16::from(node) == me)
        .then_some((u16::from(link), u16::from(peer)))
}

/// Node `node`'s address on link `link` (link-local, one /32 per NIC with a peer route).
pub fn link_address(link: u16, node: u16) -> Ipv4Addr {
    Ipv4Addr::new(169, 254, 100 + link as u8, node as u8 + 1)
}

/// Which node has `address` on link `link`.
pub fn node_of_address(link: u16, address: Ipv4Addr) -> Option<u16> {
    let [a, b, c, d] = address.octets();
    ([a, b, c] == [169, 254, 100 + link as u8] && d > 0).then(|| u16::from(d) - 1)
}

/// Process mode: the name of node `node`'s socket for link `link`, in the cluster's
/// interconnect directory.
pub fn socket_name(link: u16, node: u16) -> String {
    format!("l{link}n{node}")
}

/// Which node a process-mode socket name belongs to, on link `link`.
pub fn node_of_socket(link: u16, name: &str) -> Option<u16> {
    name.strip_prefix(&format!("l{link}n"))?.parse().ok()
}

/// QEMU's `-netdev dgram` endpoint of node `me` for link `link` to `peer` (its peer sends
/// to it), in the cluster's interconnect directory.
pub fn netdev_socket_name(link: u16, me: u16, peer: u16) -> String {
    format!("q{link}-{me}-{peer}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_macs_and_names_read_back() {
        for link in 0..MAX_NETWORK_LINKS {
            for me in 0..8 {
                for peer in 0..8 {
                    assert_eq!(
                        parse_nic_mac(nic_mac(link, me, peer), me),
                        Some((link, peer))
                    );
                    assert_eq!(parse_nic_mac(nic_mac(link, me, peer), me + 1), None);
                }
                assert_eq!(node_of_address(link, link_address(link, me)), Some(me));
                assert_eq!(node_of_socket(link, &socket_name(link, me)), Some(me));
                assert_eq!(node_of_socket(link + 1, &socket_name(link, me)), None);
            }
        }
        assert_eq!(format_mac(nic_mac(1, 0, 2)), "52:54:01:01:00:02");
    }

    #[test]
    fn an_agent_without_peers_or_links_runs_no_interconnect() {
        let mut options = InterconnectOptions::default();
        assert!(!options.enabled());
        assert!(options.flags().is_empty());
        options.links = 2;
        options.peers = vec![1];
        assert!(options.enabled());
        assert_eq!(options.link_count(), 2);
        options.mailbox = true;
        assert_eq!(options.link_count(), 3);
    }
}
