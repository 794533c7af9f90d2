//! A guest's interconnect NICs: found by the MAC hostd gave each (link, peer), brought up
//! and given the node's address of that link with a route to the peer's (busybox `ip`).

use std::path::Path;

use wire::interconnect::{link_address, parse_nic_mac};

use crate::service_ip::{ip_args, run};

/// One interconnect NIC of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub device: String,
    pub link: u16,
    pub peer: u16,
}

/// The NICs under `sys_class_net` (`/sys/class/net`) that are node `me`'s interconnect
/// NICs, in device order. Unreadable entries are skipped: they are not ours.
pub fn find(sys_class_net: &Path, me: u16) -> Vec<Nic> {
    let Ok(entries) = std::fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    let mut nics: Vec<Nic> = entries
        .flatten()
        .filter_map(|entry| {
            let device = entry.file_name().to_str()?.to_owned();
            let text = std::fs::read_to_string(entry.path().join("address")).ok()?;
            let (link, peer) = parse_nic_mac(parse_mac(text.trim())?, me)?;
            Some(Nic { device, link, peer })
        })
        .collect();
    nics.sort_by(|a, b| a.device.cmp(&b.device));
    nics
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| u8::from_str_radix(part, 16).ok())
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

/// The commands that bring `nic` up with node `me`'s address of its link and a route to
/// its peer.
pub fn commands(nic: &Nic, me: u16) -> [Vec<String>; 2] {
    let local = link_address(nic.link, me).to_string();
    let peer = link_address(nic.link, nic.peer).to_string();
    [
        ip_args(&["link", "set", "dev", &nic.device, "up"]),
        ip_args(&["addr", "replace", &local, "peer", &peer, "dev", &nic.device]),
    ]
}

/// Brings every NIC up with its address; a NIC that fails is logged and the others go on
/// (its link is re-opened later, see [`super::transport::Reopen`]).
pub fn set_up(nics: &[Nic], me: u16) {
    for nic in nics {
        let done = commands(nic, me)
            .iter()
            .try_for_each(|command| run(command, false).map(drop));
        if let Err(error) = done {
            log::warn!(
                "interconnect: cannot set up {} (link {} to node {}): {}",
                nic.device,
                nic.link,
                nic.peer,
                wire::error_chain::one_line(&error)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::interconnect::{format_mac, nic_mac};

    #[test]
    fn nics_are_found_by_mac_and_addressed_per_link() {
        let sys = tempfile::tempdir().unwrap();
        let devices = [
            ("eth0", "52:54:00:12:34:56".to_owned()),
            ("eth1", format_mac(nic_mac(0, 1, 0))),
            ("eth2", format_mac(nic_mac(1, 1, 0))),
            ("eth3", format_mac(nic_mac(0, 2, 0))),
            ("lo", "00:00:00:00:00:00".to_owned()),
        ];
        for (device, mac) in &devices {
            std::fs::create_dir(sys.path().join(device)).unwrap();
            std::fs::write(sys.path().join(device).join("address"), format!("{mac}\n")).unwrap();
        }
        let nics = find(sys.path(), 1);
        assert_eq!(
            nics,
            vec![
                Nic {
                    device: "eth1".into(),
                    link: 0,
                    peer: 0
                },
                Nic {
                    device: "eth2".into(),
                    link: 1,
                    peer: 0
                },
            ]
        );
        assert_eq!(
            commands(&nics[1], 1)[1].join(" "),
            "ip addr replace 169.254.101.2 peer 169.254.101.1 dev eth2"
        );
        assert!(find(&sys.path().join("absent"), 1).is_empty());
    }
}
