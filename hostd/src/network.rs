//! Bridge mode on the host: the network namespace and bridge the guests' NICs join, and
//! each guest's tap. hostd makes what is missing at `up`, opens a new tap for every start
//! of a guest (inside the namespace, so QEMU itself stays in hostd's), and removes what it
//! made at `down --purge`. What it made is written down in the state directory
//! (`network.json`): a namespace or bridge of the same name that ivha did not make is
//! refused unless `adopt_existing` says to use it, and is never removed.
//!
//! Links and namespaces are changed with iproute2's `ip`, as an operator would.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use wire::network::Ipv4Net;
use wire::state_dir::StateDir;

use crate::config::Config;

/// Errors making the namespace and the bridge ready ([`BridgeNetwork::ensure`]).
#[derive(Debug, thiserror::Error)]
pub enum SetUpError {
    #[error("bridge mode needs root: it creates a bridge, taps and maybe a network namespace")]
    NotRoot,
    #[error("bridge mode needs /dev/net/tun (load the tun module)")]
    NoTun,
    #[error(
        "network namespace {0} exists but ivha did not make it: refusing to use it (name another, remove it, or set network.adopt_existing = true)"
    )]
    ForeignNamespace(String),
    #[error(
        "bridge {0} exists but ivha did not make it: refusing to use it (name another, remove it, or set network.adopt_existing = true)"
    )]
    ForeignBridge(String),
    #[error(
        "{0} is not a bridge (network.bridge must name a Linux bridge, or a name that is free)"
    )]
    NotABridge(String),
    #[error(
        "{} is damaged, so what ivha made is unknown (check the namespace and bridge, then remove the file)",
        path.display()
    )]
    DamagedRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ip(#[from] IpError),
}

/// Errors giving a guest its tap ([`BridgeNetwork::open_tap`]).
#[derive(Debug, thiserror::Error)]
pub enum OpenTapError {
    #[error("cannot open tap {name}")]
    Open {
        name: String,
        #[source]
        source: tap::TapError,
    },
    #[error("cannot put tap {name} on bridge {bridge}")]
    Attach {
        name: String,
        bridge: String,
        #[source]
        source: IpError,
    },
}

/// Errors running `ip`.
#[derive(Debug, thiserror::Error)]
pub enum IpError {
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// What ivha made, so that `down --purge` removes that and nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Made {
    pub netns: Option<String>,
    pub bridge: Option<String>,
    /// The namespace the bridge was made in (None: the host's).
    #[serde(default)]
    pub bridge_netns: Option<String>,
}

impl Made {
    /// The record; an empty one where there is none.
    fn load(path: &Path) -> Result<Self, SetUpError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| SetUpError::DamagedRecord {
                path: path.to_owned(),
                source,
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(SetUpError::Record {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the record whole or not at all.
    fn save(&self, path: &Path) -> Result<(), SetUpError> {
        crate::daemon::records::write_json(path, self).map_err(|source| SetUpError::Record {
            path: path.to_owned(),
            source,
        })
    }
}

/// The record of what ivha made, in the state directory.
pub fn record_path(state: &StateDir) -> PathBuf {
    state.root().join("network.json")
}

/// A cluster's bridge network.
#[derive(Debug, Clone)]
pub struct BridgeNetwork {
    netns: Option<String>,
    bridge: String,
    bridge_address: Option<Ipv4Net>,
    adopt_existing: bool,
    /// Two bytes that tell this cluster's MACs from another's on a shared bridge.
    tag: u16,
    record: PathBuf,
}

impl BridgeNetwork {
    /// The bridge network of `config`, None in user mode.
    pub fn from_config(config: &Config, state: &StateDir) -> Option<Self> {
        let network = &config.network;
        network.is_bridge().then(|| Self {
            netns: network.netns.clone(),
            bridge: network.bridge.clone(),
            bridge_address: network.bridge_address,
            adopt_existing: network.adopt_existing,
            // However the state directory was spelled: a restarted hostd finds the same MACs.
            tag: crc32c::crc32c(
                std::fs::canonicalize(state.root())
                    .unwrap_or_else(|_| state.root().to_owned())
                    .as_os_str()
                    .as_encoded_bytes(),
            ) as u16,
            record: record_path(state),
        })
    }

    /// Makes the namespace and the bridge if missing, and brings the bridge up with its
    /// address.
    pub fn ensure(&self) -> Result<(), SetUpError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(SetUpError::NotRoot);
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err(SetUpError::NoTun);
        }
        let mut made = Made::load(&self.record)?;
        if let Some(netns) = &self.netns {
            let ours = made.netns.as_ref() == Some(netns);
            if netns_path(netns).exists() {
                if !ours && !self.adopt_existing {
                    return Err(SetUpError::ForeignNamespace(netns.clone()));
                }
            } else {
                if let Some(earlier) = made.netns.as_ref().filter(|e| *e != netns) {
                    log::warn!(
                        "network namespace {earlier}, made for an earlier configuration, stays (remove it with `ip netns del {earlier}`)"
                    );
                }
                ip(None, &["netns", "add", netns])?;
                made.netns = Some(netns.clone());
                made.save(&self.record)?;
                log::info!("made network namespace {netns}");
            }
            self.ip(&["link", "set", "lo", "up"])?;
        }
        let ours = made.bridge.as_ref() == Some(&self.bridge) && made.bridge_netns == self.netns;
        // A bridge without an address of its own takes the lowest of its ports', and a
        // tap's changes with every start of its guest: each change flushes the bridge's
        // neighbour entries, and the survivor would answer clients at a MAC gone stale
        // until its ARP entry times out (5 s). ivha's bridges get a fixed MAC.
        let mac = self.bridge_mac();
        if let Ok(link) = self.ip(&["-d", "link", "show", "dev", &self.bridge]) {
            if !ours && !self.adopt_existing {
                return Err(SetUpError::ForeignBridge(self.bridge.clone()));
            }
            if !link.split_whitespace().any(|word| word == "bridge") {
                return Err(SetUpError::NotABridge(self.bridge.clone()));
            }
            // One an older hostd made gets it now; setting it again would flush the
            // neighbours for nothing.
            if ours && !link.contains(&mac) {
                self.ip(&["link", "set", "dev", &self.bridge, "address", &mac])?;
            }
        } else {
            self.ip(&[
                "link",
                "add",
                &self.bridge,
                "address",
                &mac,
                "type",
                "bridge",
            ])?;
            made.bridge = Some(self.bridge.clone());
            made.bridge_netns = self.netns.clone();
            made.save(&self.record)?;
            log::info!("made bridge {}{}", self.bridge, self.namespace_suffix());
        }
        self.ip(&["link", "set", "dev", &self.bridge, "up"])?;
        if let Some(address) = self.bridge_address {
            self.ip(&["addr", "replace", &address.to_string(), "dev", &self.bridge])?;
        }
        Ok(())
    }

    /// Opens a new tap for node `index`, on the bridge and up. QEMU gets the descriptor;
    /// the tap goes when the QEMU does.
    pub fn open_tap(&self, index: usize) -> Result<OwnedFd, OpenTapError> {
        let name = self.tap_name(index);
        let netns = self.netns.as_deref().map(netns_path);
        let fd = tap::open(netns.as_deref(), &name).map_err(|source| OpenTapError::Open {
            name: name.clone(),
            source,
        })?;
        // The host's side of the tap gets a high, fixed MAC (as libvirt gives its taps):
        // never the lowest port of a bridge whose own MAC is not pinned (one ivha did not
        // make), so a guest's restart does not change the bridge's MAC.
        self.ip(&["link", "set", "dev", &name, "address", &self.tap_mac(index)])
            .and_then(|_| self.ip(&["link", "set", "dev", &name, "master", &self.bridge]))
            .and_then(|_| self.ip(&["link", "set", "dev", &name, "up"]))
            .map_err(|source| OpenTapError::Attach {
                name,
                bridge: self.bridge.clone(),
                source,
            })?;
        Ok(fd)
    }

    /// Node `index`'s tap: the bridge's name and the node's position.
    pub fn tap_name(&self, index: usize) -> String {
        format!("{}-{index}", self.bridge)
    }

    /// Node `index`'s MAC address on the bridge (its guest's NIC).
    pub fn mac(&self, index: usize) -> String {
        self.mac_with(0x52, index as u8)
    }

    /// The host's side of node `index`'s tap.
    fn tap_mac(&self, index: usize) -> String {
        self.mac_with(0xfe, index as u8)
    }

    /// The bridge's own MAC, when ivha made it.
    fn bridge_mac(&self) -> String {
        self.mac_with(0x52, 0xff)
    }

    /// `FIRST:54:TAG:TAG:77:LAST`: locally administered (0x52, 0xfe), the cluster's tag
    /// (so clusters sharing a bridge differ), and what it belongs to.
    fn mac_with(&self, first: u8, last: u8) -> String {
        let [high, low] = self.tag.to_be_bytes();
        format!("{first:02x}:54:{high:02x}:{low:02x}:77:{last:02x}")
    }

    fn namespace_suffix(&self) -> String {
        self.netns
            .as_ref()
            .map_or(String::new(), |ns| format!(" in network namespace {ns}"))
    }

    fn ip(&self, args: &[&str]) -> Result<String, IpError> {
        ip(self.netns.as_deref(), args)
    }
}

/// Removes what the record says ivha made (the bridge, then the namespace) and the
/// record. Returns whether everything went; what could not be removed is logged.
pub fn purge(state: &StateDir) -> bool {
    let path = record_path(state);
    let made = match Made::load(&path) {
        Ok(made) => made,
        Err(error) => {
            log::warn!("{}", wire::error_chain::one_line(&error));
            return false;
        }
    };
    let mut ok = true;
    if let Some(bridge) = &made.bridge {
        let netns = made.bridge_netns.as_deref();
        let gone = ip(netns, &["link", "show", "dev", bridge]).is_err();
        if !gone && let Err(error) = ip(netns, &["link", "del", "dev", bridge]) {
            log::warn!("cannot remove bridge {bridge}: {error}");
            ok = false;
        }
    }
    if let Some(netns) = &made.netns
        && netns_path(netns).exists()
        && let Err(error) = ip(None, &["netns", "del", netns])
    {
        log::warn!("cannot remove network namespace {netns}: {error}");
        ok = false;
    }
    if let Err(error) = std::fs::remove_file(&path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        log::warn!("cannot remove {}: {error}", path.display());
        ok = false;
    }
    ok
}

/// Where `ip netns` keeps a namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs `ip [-n NETNS] ARGS`; returns its output.
fn ip(netns: Option<&str>, args: &[&str]) -> Result<String, IpError> {
    let mut argv: Vec<&str> = Vec::new();
    if let Some(netns) = netns {
        argv.extend(["-n", netns]);
    }
    argv.extend(args);
    let command = format!("ip {}", argv.join(" "));
    let output = Command::new("ip")
        .args(&argv)
        .output()
        .map_err(|source| IpError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(IpError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge_config(netns: &str) -> Config {
        Config::parse(&format!(
            r#"
[network]
mode = "bridge"
bridge = "ivt{netns}"
netns = "ivha-test-{netns}"
bridge_address = "10.79.0.1/24"
[[node]]
name = "a"
nbd_port = 1
address = "10.79.0.2/24"
service_ip = "10.79.0.11/24"
[[node]]
name = "b"
nbd_port = 2
address = "10.79.0.3/24"
service_ip = "10.79.0.12/24"
"#
        ))
        .unwrap()
    }

    #[test]
    fn user_mode_has_no_bridge_and_names_follow_the_bridge() {
        let state = StateDir::new("/tmp/ivha-x");
        assert!(BridgeNetwork::from_config(&Config::default(), &state).is_none());
        let config = bridge_config("1");
        config.validate().unwrap();
        let network = BridgeNetwork::from_config(&config, &state).unwrap();
        assert_eq!(network.tap_name(3), "ivt1-3");
        assert_ne!(network.mac(0), network.mac(1));
        let tag = &network.mac(2)[6..11];
        assert_eq!(network.mac(2), format!("52:54:{tag}:77:02"));
        assert_eq!(network.tap_mac(2), format!("fe:54:{tag}:77:02"));
        assert_eq!(network.bridge_mac(), format!("52:54:{tag}:77:ff"));
        let other = BridgeNetwork::from_config(&config, &StateDir::new("/tmp/ivha-y")).unwrap();
        assert_ne!(network.mac(0), other.mac(0), "clusters differ");
    }

    /// Needs root (it makes a namespace): what ivha made goes at purge, and a namespace it
    /// did not make is refused and left alone.
    #[test]
    fn made_is_purged_and_foreign_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI runs as root"
            );
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let tag = std::process::id() % 100_000;
        let config = bridge_config(&tag.to_string());
        let network = BridgeNetwork::from_config(&config, &state).unwrap();
        network.ensure().unwrap();
        network.ensure().unwrap();
        let tap = network.open_tap(0).unwrap();
        let netns = config.network.netns.clone().unwrap();
        let links = ip(Some(&netns), &["link", "show", "master", &network.bridge]).unwrap();
        assert!(links.contains(&network.tap_name(0)), "{links}");
        assert!(links.contains(&network.tap_mac(0)), "{links}");
        let bridge = || ip(Some(&netns), &["link", "show", "dev", &network.bridge]).unwrap();
        assert!(bridge().contains(&network.bridge_mac()), "{}", bridge());
        drop(tap);
        let _other = network.open_tap(1).unwrap();
        assert!(
            bridge().contains(&network.bridge_mac()),
            "pinned: {}",
            bridge()
        );
        assert!(purge(&state));
        assert!(!netns_path(&netns).exists());

        ip(None, &["netns", "add", &netns]).unwrap();
        let error = network.ensure().unwrap_err();
        assert!(matches!(error, SetUpError::ForeignNamespace(_)), "{error}");
        assert!(purge(&state));
        assert!(netns_path(&netns).exists(), "not ivha's: left alone");
        ip(None, &["netns", "del", &netns]).unwrap();
    }
}
