//! The guest agent's settings, as hostd hands them over: one typed definition, rendered as
//! command-line flags for an agent process and as `ivha.*` kernel arguments for a guest,
//! and parsed back by the agent from either.
//!
//! In a guest, `/init` knows none of these: it passes the kernel command line to the agent
//! (`--kernel-cmdline /proc/cmdline`), which reads every `ivha.KEY=VALUE` (or bare
//! `ivha.KEY` for a switch) as the flag `--KEY VALUE` with `_` for `-`. The few keys
//! `/init` itself uses ([`INIT_KEYS`]) are left to it.

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::interconnect::InterconnectOptions;
use crate::network::{Ipv4Net, ServiceIps};

/// Kernel arguments `/init` reads itself; the agent ignores them.
pub const INIT_KEYS: [&str; 3] = ["node", "debug", "selftest"];

/// When a logged write may leave the NVRAM log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Release {
    /// Once the disk holds it as durably as the log: written, where the disk's page cache
    /// is the host's (process mode); synced, in a guest (its page cache dies with it).
    #[default]
    Host,
    /// Once synced to the disk's media, everywhere.
    Media,
}

impl Release {
    pub fn as_str(self) -> &'static str {
        match self {
            Release::Host => "host",
            Release::Media => "media",
        }
    }
}

/// What hostd tells every agent of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct AgentOptions {
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub heartbeat_ms: u64,

    /// NBD: after answering, poll the socket this long for the next request before
    /// blocking (saves a wakeup per request at queue depth 1; 0 blocks at once).
    #[arg(long, default_value_t = 0, value_name = "MICROSECONDS",
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub nbd_poll_us: u64,

    /// NBD: most connections one export serves at once; a client over the limit is
    /// refused (`NBD_OPT_GO` answered with a policy error) and counted.
    #[arg(long, default_value_t = 128, value_name = "CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub nbd_max_connections: u32,

    /// NBD: most connections still negotiating (no export chosen yet) at once; more are
    /// closed as soon as they are accepted, and counted.
    #[arg(long, default_value_t = 32, value_name = "CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub nbd_max_negotiating: u32,

    /// NBD: close a connection that sends no request for this long (0: never). Clients
    /// that reconnect (QEMU's `reconnect-delay`) carry on; others see the connection end.
    #[arg(long, default_value_t = 0, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub nbd_idle_timeout_s: u64,

    /// Flusher: wait this long before each batch (keeps records unflushed for a while).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub flush_delay_ms: u64,

    /// Flusher: never flush (writes stay in the log; they block once it is full).
    /// `--flush-paused` alone means on; a value (1/0, true/false) may follow.
    #[arg(long, num_args = 0..=1, default_missing_value = "true",
          default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "ON")]
    pub flush_paused: bool,

    /// When a logged write leaves the log: `host` once the disk holds it as durably as the
    /// log (process mode: written to the host's page cache; in a guest: synced, since the
    /// guest's page cache dies with the guest), `media` once synced to the disk's media.
    #[arg(long, value_enum, default_value_t = Release::Host, value_name = "WHEN")]
    pub release: Release,

    /// With `--release host` in process mode: sync the disks to their media this often.
    #[arg(long, default_value_t = 1000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub sync_interval_ms: u64,

    /// Bridge mode: each identity's service IP (`a=10.77.0.11/24,b=...`). The agent adds
    /// the address of every identity it serves and announces it with gratuitous ARPs;
    /// empty (user mode): hostd moves the addresses.
    #[arg(long, default_value = "", value_name = "NAME=ADDRESS/PREFIX,...")]
    pub service_ips: ServiceIps,

    /// Bridge mode: this node's own fixed address, set up when the agent starts.
    #[arg(long, value_name = "ADDRESS/PREFIX")]
    pub node_address: Option<Ipv4Net>,

    /// Bridge mode: the network device the addresses go on.
    #[arg(long, default_value = "eth0", value_name = "DEVICE")]
    pub service_dev: String,

    /// Bridge mode: how many gratuitous ARPs announce a service IP taken (IPaddr2's 5).
    #[arg(long, default_value_t = 5, value_name = "COUNT",
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub arp_count: u32,

    /// Bridge mode: the time between two announcements (IPaddr2's 200 ms).
    #[arg(long, default_value_t = 200, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub arp_interval_ms: u64,

    /// The interconnect between the agents.
    #[command(flatten)]
    pub interconnect: InterconnectOptions,

    /// Where the coordinator is, for takeovers while hostd is away: `virtio` (a guest's
    /// virtio-serial port named `ivha.coordinator`) or the path of the node's coordinator
    /// socket (process mode). Unset: the agent never takes over without hostd.
    #[arg(long, value_name = "virtio|PATH")]
    pub coordinator: Option<CoordinatorAddress>,

    /// Process mode: the host port of each identity's address (`a=10809,b=10810`). An
    /// agent that takes an identity over without hostd listens on it.
    #[arg(long, default_value = "", value_name = "NAME=PORT,...")]
    pub identity_ports: IdentityPorts,
}

/// How an agent reaches the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorAddress {
    /// The guest's virtio-serial port named [`crate::coordinator::PORT_NAME`].
    Virtio,
    /// A Unix stream socket (process mode).
    Socket(std::path::PathBuf),
}

impl std::str::FromStr for CoordinatorAddress {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "" => Err("the coordinator's address is empty (virtio, or a socket path)".into()),
            "virtio" => Ok(CoordinatorAddress::Virtio),
            path if path.starts_with('/') => Ok(CoordinatorAddress::Socket(path.into())),
            other => Err(format!(
                "{other:?} is no coordinator address: virtio, or an absolute socket path"
            )),
        }
    }
}

impl std::fmt::Display for CoordinatorAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CoordinatorAddress::Virtio => f.write_str("virtio"),
            CoordinatorAddress::Socket(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The host port of each identity's address, by identity name (process mode).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityPorts(pub Vec<(String, u16)>);

impl IdentityPorts {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The port of identity `name`.
    pub fn port(&self, name: &str) -> Option<u16> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, port)| *port)
    }
}

impl std::str::FromStr for IdentityPorts {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut ports = Vec::new();
        for item in value.split(',').filter(|item| !item.is_empty()) {
            let (name, port) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not NAME=PORT"))?;
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|port| *port > 0)
                .ok_or_else(|| format!("{port:?} is no port (1 to 65535) in {item:?}"))?;
            if name.is_empty() || ports.iter().any(|(n, _)| n == name) {
                return Err(format!("{item:?}: the name is empty or given twice"));
            }
            ports.push((name.to_owned(), port));
        }
        Ok(Self(ports))
    }
}

impl std::fmt::Display for IdentityPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|(name, port)| format!("{name}={port}"))
            .collect();
        f.write_str(&items.join(","))
    }
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            nbd_poll_us: 0,
            nbd_max_connections: 128,
            nbd_max_negotiating: 32,
            nbd_idle_timeout_s: 0,
            flush_delay_ms: 0,
            flush_paused: false,
            release: Release::Host,
            sync_interval_ms: 1000,
            service_ips: ServiceIps::default(),
            node_address: None,
            service_dev: "eth0".to_owned(),
            arp_count: 5,
            arp_interval_ms: 200,
            interconnect: InterconnectOptions::default(),
            coordinator: None,
            identity_ports: IdentityPorts::default(),
        }
    }
}

/// Parses the options alone, for [`AgentOptions::from_kernel_args`]. A setting given twice
/// takes its last value, as kernel arguments do (a node's own `kernel_args` come after
/// hostd's settings).
#[derive(Debug, Parser)]
#[command(
    name = "ivha kernel arguments",
    no_binary_name = true,
    args_override_self = true
)]
struct OptionsOnly {
    #[command(flatten)]
    options: AgentOptions,
}

impl AgentOptions {
    /// Each option as its flag (without `--`) and value (None for a switch that is on);
    /// switches that are off are left out.
    fn flags(&self) -> Vec<(&'static str, Option<String>)> {
        let mut flags = vec![
            ("heartbeat-ms", Some(self.heartbeat_ms.to_string())),
            ("nbd-poll-us", Some(self.nbd_poll_us.to_string())),
            (
                "nbd-max-connections",
                Some(self.nbd_max_connections.to_string()),
            ),
            (
                "nbd-max-negotiating",
                Some(self.nbd_max_negotiating.to_string()),
            ),
            (
                "nbd-idle-timeout-s",
                Some(self.nbd_idle_timeout_s.to_string()),
            ),
            ("flush-delay-ms", Some(self.flush_delay_ms.to_string())),
            ("release", Some(self.release.as_str().to_owned())),
            ("sync-interval-ms", Some(self.sync_interval_ms.to_string())),
        ];
        if self.flush_paused {
            flags.push(("flush-paused", None));
        }
        // User mode leaves the network settings out (their defaults).
        if !self.service_ips.is_empty() {
            flags.extend([
                ("service-ips", Some(self.service_ips.to_string())),
                ("service-dev", Some(self.service_dev.clone())),
                ("arp-count", Some(self.arp_count.to_string())),
                ("arp-interval-ms", Some(self.arp_interval_ms.to_string())),
            ]);
        }
        if let Some(address) = self.node_address {
            flags.push(("node-address", Some(address.to_string())));
        }
        flags.extend(self.interconnect.flags());
        if let Some(coordinator) = &self.coordinator {
            flags.push(("coordinator", Some(coordinator.to_string())));
        }
        if !self.identity_ports.is_empty() {
            flags.push(("identity-ports", Some(self.identity_ports.to_string())));
        }
        flags
    }

    /// The options as an agent process's flags.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, value) in self.flags() {
            args.push(format!("--{flag}"));
            args.extend(value);
        }
        args
    }

    /// The options as kernel arguments: `ivha.heartbeat_ms=100 ... ivha.flush_paused`.
    pub fn to_kernel_args(&self) -> String {
        self.flags()
            .into_iter()
            .map(|(flag, value)| {
                let key = flag.replace('-', "_");
                match value {
                    Some(value) => format!("ivha.{key}={value}"),
                    None => format!("ivha.{key}"),
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether the agent accepts these options (its flags' limits).
    pub fn validate(&self) -> Result<(), clap::Error> {
        OptionsOnly::try_parse_from(self.to_args()).map(drop)
    }

    /// Reads the options from a kernel command line: every `ivha.*` word but
    /// [`INIT_KEYS`]; anything else is the kernel's. Options not given keep their
    /// defaults; an unknown `ivha.*` key or a bad value is an error that names it.
    pub fn from_kernel_args(cmdline: &str) -> Result<Self, clap::Error> {
        let mut args = Vec::new();
        for word in cmdline.split_whitespace() {
            let Some(setting) = word.strip_prefix("ivha.") else {
                continue;
            };
            let (key, value) = match setting.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (setting, None),
            };
            if INIT_KEYS.contains(&key) {
                continue;
            }
            args.push(format!("--{}", key.replace('_', "-")));
            args.extend(value.map(str::to_owned));
        }
        OptionsOnly::try_parse_from(args).map(|parsed| parsed.options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unusual() -> AgentOptions {
        AgentOptions {
            heartbeat_ms: 37,
            nbd_poll_us: 5,
            nbd_max_connections: 3,
            nbd_max_negotiating: 2,
            nbd_idle_timeout_s: 600,
            flush_delay_ms: 200,
            flush_paused: true,
            release: Release::Media,
            sync_interval_ms: 250,
            service_ips: "a=10.77.0.11/24,b=10.77.0.12/24".parse().unwrap(),
            node_address: Some("10.77.0.2/24".parse().unwrap()),
            service_dev: "eth1".into(),
            arp_count: 3,
            arp_interval_ms: 50,
            interconnect: InterconnectOptions {
                links: 2,
                mailbox: true,
                heartbeat_ms: 20,
                mailbox_poll_ms: 3,
                peers: vec![0, 2],
                stream_ms: 1,
                ping_ms: 10,
                bulk: 2,
            },
            coordinator: Some(CoordinatorAddress::Virtio),
            identity_ports: "a=10809,b=10810".parse().unwrap(),
        }
    }

    #[test]
    fn coordinator_addresses_and_identity_ports_are_checked() {
        assert_eq!(
            "/s/coord-a.sock".parse::<CoordinatorAddress>(),
            Ok(CoordinatorAddress::Socket("/s/coord-a.sock".into()))
        );
        assert!("relative.sock".parse::<CoordinatorAddress>().is_err());
        assert!("".parse::<CoordinatorAddress>().is_err());
        let ports: IdentityPorts = "a=1,b=2".parse().unwrap();
        assert_eq!(ports.port("b"), Some(2));
        assert_eq!(ports.to_string(), "a=1,b=2");
        for bad in ["a", "a=0", "a=x", "a=1,a=2", "=3"] {
            assert!(bad.parse::<IdentityPorts>().is_err(), "{bad}");
        }
        assert_eq!("".parse::<IdentityPorts>(), Ok(IdentityPorts::default()));
    }

    #[test]
    fn flags_parse_back_to_the_same_options() {
        for options in [AgentOptions::default(), unusual()] {
            let parsed = OptionsOnly::try_parse_from(options.to_args()).map(|p| p.options);
            assert_eq!(parsed.ok(), Some(options));
        }
    }

    #[test]
    fn kernel_arguments_parse_back_to_the_same_options() {
        for options in [AgentOptions::default(), unusual()] {
            let cmdline = format!(
                "console=ttyS0 panic=-1 ivha.node=a {} ivha.debug=1 quiet",
                options.to_kernel_args()
            );
            let parsed = AgentOptions::from_kernel_args(&cmdline);
            assert_eq!(parsed.ok(), Some(options), "{cmdline}");
        }
        assert_eq!(
            AgentOptions::from_kernel_args("console=ttyS0").ok(),
            Some(AgentOptions::default())
        );
    }

    #[test]
    fn the_last_setting_wins_and_switches_take_values() {
        let base = AgentOptions::default().to_kernel_args();
        let cmdline = format!("{base} ivha.heartbeat_ms=50 ivha.flush_paused=1");
        let parsed = AgentOptions::from_kernel_args(&cmdline).unwrap();
        assert_eq!(parsed.heartbeat_ms, 50);
        assert!(parsed.flush_paused);
        let off = AgentOptions::from_kernel_args("ivha.flush_paused ivha.flush_paused=0").unwrap();
        assert!(!off.flush_paused);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let unknown = AgentOptions::from_kernel_args("ivha.flush_pasued").unwrap_err();
        assert!(unknown.to_string().contains("flush-pasued"), "{unknown}");
        let bad = AgentOptions::from_kernel_args("ivha.heartbeat_ms=fast").unwrap_err();
        assert!(bad.to_string().contains("fast"), "{bad}");
        assert!(AgentOptions::from_kernel_args("ivha.heartbeat_ms=0").is_err());
    }
}
