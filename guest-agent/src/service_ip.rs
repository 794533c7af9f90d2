//! Service IPs (bridge mode). The node that serves an identity holds the identity's address
//! on the bridge: it adds it to its NIC and announces it with gratuitous ARPs, so clients
//! and switches learn the new MAC at once (as keepalived and Pacemaker's IPaddr2 do). A
//! planned release drops the address before anything else; a fenced node's addresses die
//! with its guest. hostd never touches a guest's network: it asks through the control
//! region, as for every move.
//!
//! The addresses are changed with busybox `ip` and `arping` (the guest image has both): a
//! hand-written netlink client would be more code than the few commands a move needs.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use wire::agent::AgentOptions;
use wire::network::Ipv4Net;

/// Holds and drops identities' service IPs on this node.
pub trait ServiceAddresses: Send + std::fmt::Debug {
    /// Adds identity `name`'s address and announces it; nothing where it has none.
    fn hold(&mut self, name: &str) -> Result<(), AddressError>;
    /// Removes identity `name`'s address; no error if this node did not have it.
    fn drop_address(&mut self, name: &str) -> Result<(), AddressError>;
}

/// User mode and process mode: hostd moves the addresses (QEMU's port forwards) or the
/// agents listen on the identities' ports themselves.
#[derive(Debug, Default)]
pub struct NoServiceAddresses;

impl ServiceAddresses for NoServiceAddresses {
    fn hold(&mut self, _name: &str) -> Result<(), AddressError> {
        Ok(())
    }

    fn drop_address(&mut self, _name: &str) -> Result<(), AddressError> {
        Ok(())
    }
}

/// Errors changing an address.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("cannot start the announcer of {address}")]
    Announcer {
        address: Ipv4Net,
        #[source]
        source: std::io::Error,
    },
}

/// Service IPs on a Linux NIC, changed with `ip` and announced with `arping`.
#[derive(Debug)]
pub struct IpCommand {
    device: String,
    node_address: Option<Ipv4Net>,
    addresses: BTreeMap<String, Ipv4Net>,
    arp_count: u32,
    arp_interval: Duration,
}

impl IpCommand {
    /// Bridge mode, when the settings name service IPs.
    pub fn from_options(options: &AgentOptions) -> Option<Self> {
        (!options.service_ips.is_empty()).then(|| Self {
            device: options.service_dev.clone(),
            node_address: options.node_address,
            addresses: options.service_ips.0.iter().cloned().collect(),
            arp_count: options.arp_count,
            arp_interval: Duration::from_millis(options.arp_interval_ms),
        })
    }

    /// Brings the NIC up with the node's own address, and drops every service IP an earlier
    /// run of the agent may have left on it (the identities this run serves are held again
    /// once it serves them).
    pub fn set_up(&mut self) -> Result<(), AddressError> {
        run(&ip_args(&["link", "set", "dev", &self.device, "up"]), false)?;
        if let Some(address) = self.node_address {
            run(&add_command(address, &self.device), false)?;
        }
        let names: Vec<String> = self.addresses.keys().cloned().collect();
        for name in names {
            self.drop_address(&name)?;
        }
        Ok(())
    }
}

impl ServiceAddresses for IpCommand {
    fn hold(&mut self, name: &str) -> Result<(), AddressError> {
        let Some(address) = self.addresses.get(name).copied() else {
            return Ok(());
        };
        // `replace`: an address an earlier run of this agent left is not an error.
        run(&add_command(address, &self.device), false)?;
        let announce = announce_command(address, &self.device);
        let (count, interval) = (self.arp_count, self.arp_interval);
        // The announcements start at once, from a thread of their own: the takeover's
        // acknowledgement does not wait for them.
        std::thread::Builder::new()
            .name(format!("garp {}", address.addr()))
            .spawn(move || {
                for n in 0..count {
                    if n > 0 {
                        std::thread::sleep(interval);
                    }
                    if let Err(error) = run(&announce, false) {
                        log::warn!(
                            "announcing {address}: {}",
                            wire::error_chain::one_line(&error)
                        );
                    }
                }
            })
            .map_err(|source| AddressError::Announcer { address, source })?;
        log::info!("holding {name}'s service IP {address} on {}", self.device);
        Ok(())
    }

    fn drop_address(&mut self, name: &str) -> Result<(), AddressError> {
        let Some(address) = self.addresses.get(name).copied() else {
            return Ok(());
        };
        if run(&delete_command(address, &self.device), true)? {
            log::info!("dropped {name}'s service IP {address}");
        }
        Ok(())
    }
}

pub(crate) fn ip_args(args: &[&str]) -> Vec<String> {
    std::iter::once("ip")
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect()
}

fn add_command(address: Ipv4Net, device: &str) -> Vec<String> {
    ip_args(&["addr", "replace", &address.to_string(), "dev", device])
}

fn delete_command(address: Ipv4Net, device: &str) -> Vec<String> {
    ip_args(&["addr", "del", &address.to_string(), "dev", device])
}

/// One unsolicited ARP request (sender and target the service IP): every host on the
/// segment that knows the address updates its entry to this NIC's MAC. busybox `arping -U
/// -c 1` sends it and exits at once.
fn announce_command(address: Ipv4Net, device: &str) -> Vec<String> {
    let ip = address.addr().to_string();
    [
        "arping", "-q", "-U", "-c", "1", "-I", device, "-s", &ip, &ip,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// Runs `argv`. With `absent_ok`, the kernel's "no such address" (`ip addr del` of an
/// address not there) counts as done: returns whether anything changed.
pub(crate) fn run(argv: &[String], absent_ok: bool) -> Result<bool, AddressError> {
    let command = argv.join(" ");
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|source| AddressError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    // EADDRNOTAVAIL, as glibc and musl word it.
    let absent = ["Cannot assign requested address", "Address not available"];
    if absent_ok && absent.iter().any(|text| stderr.contains(text)) {
        return Ok(false);
    }
    Err(AddressError::Failed {
        command,
        status: output.status,
        stderr,
    })
}

#[cfg(test)]
pub mod double {
    //! A test double that records what the monitor asked for.

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::{AddressError, ServiceAddresses};

    /// `hold`/`drop` calls, in order, shared with the test; `hold` fails while
    /// `refuse_holds` is set.
    #[derive(Debug, Default, Clone)]
    pub struct Recorded {
        calls: Arc<Mutex<Vec<String>>>,
        pub refuse_holds: Arc<AtomicBool>,
    }

    impl Recorded {
        pub fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl ServiceAddresses for Recorded {
        fn hold(&mut self, name: &str) -> Result<(), AddressError> {
            self.calls.lock().unwrap().push(format!("hold {name}"));
            if self.refuse_holds.load(Ordering::Relaxed) {
                return Err(AddressError::Spawn {
                    command: format!("ip addr replace {name}"),
                    source: std::io::Error::other("refused by the test"),
                });
            }
            Ok(())
        }

        fn drop_address(&mut self, name: &str) -> Result<(), AddressError> {
            self.calls.lock().unwrap().push(format!("drop {name}"));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_name_the_address_and_the_device() {
        let ip: Ipv4Net = "10.77.0.11/24".parse().unwrap();
        assert_eq!(
            add_command(ip, "eth0").join(" "),
            "ip addr replace 10.77.0.11/24 dev eth0"
        );
        assert_eq!(
            delete_command(ip, "eth0").join(" "),
            "ip addr del 10.77.0.11/24 dev eth0"
        );
        assert_eq!(
            announce_command(ip, "eth0").join(" "),
            "arping -q -U -c 1 -I eth0 -s 10.77.0.11 10.77.0.11"
        );
    }

    #[test]
    fn user_mode_has_no_addresses_to_move() {
        assert!(IpCommand::from_options(&AgentOptions::default()).is_none());
        let options = AgentOptions {
            service_ips: "a=10.77.0.11/24".parse().unwrap(),
            ..AgentOptions::default()
        };
        let ips = IpCommand::from_options(&options).unwrap();
        assert_eq!(ips.addresses.len(), 1);
        assert_eq!(ips.arp_interval, Duration::from_millis(200));
    }

    #[test]
    fn a_missing_tool_is_an_error_that_names_the_command() {
        let error = run(&["/nonexistent/ip".to_owned(), "addr".to_owned()], true).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/ip addr"),
            "{error}"
        );
    }
}
