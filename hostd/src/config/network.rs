//! `[network]`: how clients reach the nodes' identities.
//!
//! ```toml
//! [network]
//! mode = "bridge"             # user (default): QEMU user networking, identities on 127.0.0.1 ports
//! bridge = "ivha0"            # bridge mode: the Linux bridge the guests' NICs join (created if missing)
//! netns = "ivha"              # optional: the bridge and taps live in this network namespace
//! bridge_address = "10.77.0.1/24"  # optional: an address of the host's (or the namespace's) on the bridge
//! adopt_existing = false      # use a bridge or namespace that exists but ivha did not make
//! arp_count = 5               # gratuitous ARPs announcing a service IP (IPaddr2's defaults)
//! arp_interval_ms = 200
//!
//! [[node]]
//! name = "a"
//! nbd_port = 10809
//! address = "10.77.0.2/24"    # bridge mode: the node's own fixed address
//! service_ip = "10.77.0.11/24" # bridge mode: the identity's address, held by whoever serves it
//! ```

use serde::{Deserialize, Serialize};
use wire::network::Ipv4Net;

use super::NodeConfig;

/// How clients reach the identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// QEMU user networking: each identity is a port on 127.0.0.1 that hostd forwards to
    /// the node serving it.
    #[default]
    User,
    /// Each guest has a NIC on a Linux bridge; each identity has a service IP that the
    /// node serving it holds and announces.
    Bridge,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub mode: NetworkMode,
    pub bridge: String,
    pub netns: Option<String>,
    pub bridge_address: Option<Ipv4Net>,
    /// Use a bridge or namespace of this name that ivha did not make (else refused).
    pub adopt_existing: bool,
    pub arp_count: u32,
    pub arp_interval_ms: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            mode: NetworkMode::User,
            bridge: "ivha0".to_owned(),
            netns: None,
            bridge_address: None,
            adopt_existing: false,
            arp_count: 5,
            arp_interval_ms: 200,
        }
    }
}

/// Longest bridge name: taps are named BRIDGE-N, within Linux's 15 characters.
pub const MAX_BRIDGE_NAME: usize = 12;

fn plain_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl NetworkConfig {
    pub fn is_bridge(&self) -> bool {
        self.mode == NetworkMode::Bridge
    }

    /// The subnet of the bridge: the bridge address's, else the first node address's.
    pub fn subnet(&self, nodes: &[NodeConfig]) -> Option<Ipv4Net> {
        self.bridge_address
            .or_else(|| nodes.iter().find_map(|n| n.address))
            .map(|a| a.trunc())
    }

    /// Checks the network settings and the nodes' addresses.
    pub fn validate(&self, nodes: &[NodeConfig]) -> Result<(), String> {
        if !self.is_bridge() {
            if let Some(node) = nodes
                .iter()
                .find(|n| n.address.is_some() || n.service_ip.is_some())
            {
                return Err(format!(
                    "node {}: address and service_ip are used only with [network] mode = \"bridge\"",
                    node.name
                ));
            }
            return Ok(());
        }
        if !plain_name(&self.bridge, MAX_BRIDGE_NAME) {
            return Err(format!(
                "network.bridge {:?} must be 1 to {MAX_BRIDGE_NAME} letters, digits, '-' or '_'",
                self.bridge
            ));
        }
        if let Some(netns) = &self.netns
            && !plain_name(netns, 64)
        {
            return Err(format!(
                "network.netns {netns:?} must be 1 to 64 letters, digits, '-' or '_'"
            ));
        }
        if !(1..=100).contains(&self.arp_count) {
            return Err(format!(
                "network.arp_count {} must be from 1 to 100 (clients learn the new holder's MAC from them)",
                self.arp_count
            ));
        }
        if !(1..=10_000).contains(&self.arp_interval_ms) {
            return Err(format!(
                "network.arp_interval_ms {} must be from 1 to 10000",
                self.arp_interval_ms
            ));
        }
        let mut addresses: Vec<(String, Ipv4Net)> = Vec::new();
        if let Some(address) = self.bridge_address {
            addresses.push(("network.bridge_address".to_owned(), address));
        }
        for node in nodes {
            let (Some(address), Some(service_ip)) = (node.address, node.service_ip) else {
                return Err(format!(
                    "node {}: bridge mode needs its address and service_ip (address = \"10.77.0.2/24\", service_ip = \"10.77.0.11/24\")",
                    node.name
                ));
            };
            addresses.push((format!("node {}'s address", node.name), address));
            addresses.push((format!("node {}'s service_ip", node.name), service_ip));
        }
        let Some(subnet) = self.subnet(nodes) else {
            return Ok(());
        };
        for (i, (what, address)) in addresses.iter().enumerate() {
            if address.trunc() != subnet {
                return Err(format!(
                    "{what} {address} is outside the bridge's subnet {subnet}"
                ));
            }
            if address.addr() == subnet.network() || address.addr() == subnet.broadcast() {
                return Err(format!(
                    "{what} {address} is the subnet's network or broadcast address"
                ));
            }
            if let Some((other, _)) = addresses[..i]
                .iter()
                .find(|(_, a)| a.addr() == address.addr())
            {
                return Err(format!(
                    "{what} and {other} are both {}: every address must be unique",
                    address.addr()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const NODES: &str = "[[node]]\nname = \"a\"\nnbd_port = 1\naddress = \"10.77.0.2/24\"\nservice_ip = \"10.77.0.11/24\"\n[[node]]\nname = \"b\"\nnbd_port = 2\naddress = \"10.77.0.3/24\"\nservice_ip = \"10.77.0.12/24\"\n";

    fn error(text: &str) -> String {
        match Config::parse(text).map(|c| c.validate()) {
            Ok(Ok(())) => panic!("accepted: {text}"),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("{e}: {:?}", std::error::Error::source(&e)),
        }
    }

    #[test]
    fn bridge_mode_parses_and_gives_each_agent_its_addresses() {
        let config = Config::parse(&format!(
            "[network]\nmode = \"bridge\"\nnetns = \"ivha\"\nbridge_address = \"10.77.0.1/24\"\n{NODES}"
        ))
        .unwrap();
        config.validate().unwrap();
        let options = config.agent_options_for(1);
        assert_eq!(options.node_address, Some("10.77.0.3/24".parse().unwrap()));
        assert_eq!(
            options.service_ips.to_string(),
            "a=10.77.0.11/24,b=10.77.0.12/24"
        );
        assert_eq!((options.arp_count, options.arp_interval_ms), (5, 200));
        assert!(
            Config::default()
                .agent_options_for(0)
                .service_ips
                .is_empty()
        );
    }

    #[test]
    fn bad_network_settings_get_clear_errors() {
        let bridge = "[network]\nmode = \"bridge\"\n";
        let cases = [
            (
                format!("{bridge}bridge_address = \"10.78.0.1/24\"\n{NODES}"),
                "node a's address 10.77.0.2/24 is outside the bridge's subnet 10.78.0.0/24",
            ),
            (
                format!(
                    "{bridge}{}",
                    NODES.replace("10.77.0.12/24", "10.77.0.11/24")
                ),
                "node b's service_ip and node a's service_ip are both 10.77.0.11",
            ),
            (
                format!("{bridge}{}", NODES.replace("10.77.0.12/24", "10.77.0.2/24")),
                "are both 10.77.0.2",
            ),
            (
                format!(
                    "{bridge}{}",
                    NODES.replace("10.77.0.12/24", "10.77.1.12/24")
                ),
                "outside the bridge's subnet",
            ),
            (
                format!(
                    "{bridge}{}",
                    NODES.replace("10.77.0.12/24", "10.77.0.255/24")
                ),
                "network or broadcast address",
            ),
            (
                format!(
                    "{bridge}{}",
                    NODES.replace("service_ip = \"10.77.0.12/24\"\n", "")
                ),
                "node b: bridge mode needs its address and service_ip",
            ),
            (
                format!("{bridge}bridge = \"a-bridge-name-too-long\"\n{NODES}"),
                "network.bridge",
            ),
            (format!("{bridge}netns = \"a b\"\n{NODES}"), "network.netns"),
            (
                format!("{bridge}arp_interval_ms = 0\n{NODES}"),
                "arp_interval_ms 0",
            ),
            (
                format!("backend = \"process\"\n{bridge}{NODES}"),
                "needs guests",
            ),
            (
                NODES.to_owned(),
                "node a: address and service_ip are used only with [network] mode = \"bridge\"",
            ),
            (
                "[network]\nmode = \"bridged\"\n".to_owned(),
                "unknown variant",
            ),
            (
                format!("{bridge}{}", NODES.replace("10.77.0.12/24", "10.77.0.12")),
                "invalid IP address syntax",
            ),
        ];
        for (text, said) in cases {
            let error = error(&text);
            assert!(error.contains(said), "{text}\n→ {error}");
        }
    }
}
