//! Service IPs (bridge mode): each identity's address on the cluster's bridge, which the
//! identity's holder adds and announces. One typed list, written by hostd into the agents'
//! settings (`a=10.77.0.11/24,b=10.77.0.12/24`) and read back by the agent.

use std::fmt;
use std::str::FromStr;

pub use ipnet::Ipv4Net;

/// The port the agent's NBD server listens on in a guest, on every address it has.
pub const GUEST_NBD_PORT: u16 = 10809;

/// Identity name → service IP (with the bridge's prefix length), in configuration order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceIps(pub Vec<(String, Ipv4Net)>);

/// Errors parsing a [`ServiceIps`] list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceIpsError {
    #[error("{0:?} is not NAME=ADDRESS/PREFIX")]
    NotAnEntry(String),
    #[error("{entry:?}: {address:?} is not an IPv4 address with a prefix length (10.77.0.11/24)")]
    Address { entry: String, address: String },
    #[error("{0} is named twice")]
    Twice(String),
}

impl ServiceIps {
    /// The service IP of identity `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<Ipv4Net> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, ip)| *ip)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for ServiceIps {
    type Err = ServiceIpsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut ips: Vec<(String, Ipv4Net)> = Vec::new();
        for entry in text.split(',').filter(|e| !e.is_empty()) {
            let Some((name, address)) = entry.split_once('=').filter(|(n, _)| !n.is_empty()) else {
                return Err(ServiceIpsError::NotAnEntry(entry.to_owned()));
            };
            let ip = address
                .parse::<Ipv4Net>()
                .map_err(|_| ServiceIpsError::Address {
                    entry: entry.to_owned(),
                    address: address.to_owned(),
                })?;
            if ips.iter().any(|(n, _)| n == name) {
                return Err(ServiceIpsError::Twice(name.to_owned()));
            }
            ips.push((name.to_owned(), ip));
        }
        Ok(Self(ips))
    }
}

impl fmt::Display for ServiceIps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, (name, ip)) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{name}={ip}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_back_to_themselves() {
        let ips: ServiceIps = "a=10.77.0.11/24,b=10.77.0.12/24".parse().unwrap();
        assert_eq!(ips.get("b"), Some("10.77.0.12/24".parse().unwrap()));
        assert_eq!(ips.get("c"), None);
        assert_eq!(ips.to_string().parse::<ServiceIps>().unwrap(), ips);
        assert_eq!("".parse::<ServiceIps>().unwrap(), ServiceIps::default());
    }

    #[test]
    fn bad_lists_name_the_entry() {
        for (text, said) in [
            ("a", "\"a\" is not NAME=ADDRESS/PREFIX"),
            ("=10.0.0.1/24", "is not NAME=ADDRESS/PREFIX"),
            ("a=10.0.0.1", "is not an IPv4 address with a prefix length"),
            ("a=10.0.0.300/24", "is not an IPv4 address"),
            ("a=10.0.0.1/24,a=10.0.0.2/24", "a is named twice"),
        ] {
            let error = text.parse::<ServiceIps>().unwrap_err().to_string();
            assert!(error.contains(said), "{text}: {error}");
        }
    }
}
