//! Which node accepted a client's connection: only that node can answer the operations sent
//! on it, so the checker can tell which node acknowledged a write.
//!
//! - **Process backend, QEMU user networking** ([`Attribution::SocketOwner`]): the server's
//!   end of the connection is a socket of the node's agent process (process backend) or of
//!   its QEMU, whose user network accepted it and passes it to its guest. Found in
//!   `/proc/net/tcp` (the socket whose addresses mirror the client's) and in the file
//!   descriptors of each node's process (hostd's `run/NODE.json` names it). Exact: a socket
//!   never moves to another process.
//! - **Bridge mode** ([`Attribution::Neighbour`]): the server is in a guest. The service IP
//!   resolves to the MAC address of one guest's NIC (hostd's `52:54:T:T:77:INDEX`); the node
//!   is the one the neighbour table named just before the connection was made and just after
//!   its handshake (both the same, or nothing before). Any other node that gets the
//!   connection's packets resets it (or drops them: it has no such connection), so an
//!   operation answered on it was answered by that node unless the table moved away and back
//!   again during the handshake.
//!
//! Anything else (the lookup failed, the two reads differ) is unknown: the operation then
//! names no server.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use wire::records::RunRecord;

use crate::nbd_client::NbdClient;

/// How to tell which node accepted a connection.
#[derive(Debug, Clone)]
pub enum Attribution {
    /// It cannot be told.
    Unknown,
    /// The node whose process holds the server's socket (`run_dir`: hostd's records of the
    /// node processes; `nodes`: the names, in configuration order).
    SocketOwner {
        run_dir: PathBuf,
        nodes: Vec<String>,
    },
    /// The node whose NIC the neighbour table names for the address (bridge mode).
    Neighbour { nodes: Vec<String> },
}

impl Attribution {
    /// Connects to `export` at `address` as [`NbdClient::connect`] does; also returns the
    /// node that accepted the connection, when it can be told.
    pub fn connect(
        &self,
        address: SocketAddr,
        export: &str,
        timeout: Duration,
    ) -> std::io::Result<(NbdClient, Option<String>)> {
        let before = match self {
            Attribution::Neighbour { .. } => neighbour_mac(address.ip()),
            _ => None,
        };
        let client = NbdClient::connect(address, export, timeout)?;
        let server = match self {
            Attribution::Unknown => None,
            Attribution::SocketOwner { run_dir, nodes } => client
                .addresses()
                .ok()
                .and_then(|(local, peer)| socket_owner(run_dir, nodes, local, peer)),
            Attribution::Neighbour { nodes } => {
                let after = neighbour_mac(address.ip());
                after
                    .filter(|after| before.is_none_or(|before| before == *after))
                    .and_then(|mac| node_of_mac(mac, nodes))
            }
        };
        Ok((client, server))
    }
}

/// The node among `nodes` whose process holds the server's end of the connection from
/// `local` to `peer`.
fn socket_owner(
    run_dir: &std::path::Path,
    nodes: &[String],
    local: SocketAddr,
    peer: SocketAddr,
) -> Option<String> {
    // The server's socket: its local address is our peer, its remote address is us.
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .into_iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|table| socket_inode(&table, peer, local))?;
    let link = format!("socket:[{inode}]");
    nodes.iter().find_map(|node| {
        let record = std::fs::read(run_dir.join(format!("{node}.json"))).ok()?;
        let pid = serde_json::from_slice::<RunRecord>(&record).ok()?.pid;
        holds(pid, &link).then(|| node.clone())
    })
}

/// Whether process `pid` has a file descriptor on `link` (`socket:[INODE]`).
fn holds(pid: u32, link: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == link))
}

/// The inode of the socket in a `/proc/net/tcp` or `tcp6` table whose local address is
/// `local` and remote address is `remote` (IPv4 addresses also match their IPv6-mapped form).
pub fn socket_inode(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(l), Some(r), Some(inode)) = (fields.get(1), fields.get(2), fields.get(9)) else {
            return None;
        };
        (same(parse_address(l)?, local) && same(parse_address(r)?, remote))
            .then(|| inode.parse().ok())
            .flatten()
            .filter(|&inode| inode != 0)
    })
}

/// Whether two socket addresses are the same, an IPv4 one and its IPv6-mapped form alike.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// `0100007F:2A29` (IPv4) or 32 hex digits and a port (IPv6): the address words as the
/// kernel holds them (network order), printed as host-order numbers.
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::from(word(ip)?),
        32 => {
            let mut bytes = [0u8; 16];
            for (chunk, out) in bytes.chunks_mut(4).enumerate() {
                out.copy_from_slice(&word(ip.get(chunk * 8..chunk * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The MAC address the neighbour table holds for `ip` (complete entries only).
fn neighbour_mac(ip: IpAddr) -> Option<[u8; 6]> {
    let table = std::fs::read_to_string("/proc/net/arp").ok()?;
    arp_mac(&table, ip)
}

/// The MAC address of `ip` in a `/proc/net/arp` table, if its entry is complete.
pub fn arp_mac(table: &str, ip: IpAddr) -> Option<[u8; 6]> {
    const COMPLETE: u32 = 0x2;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let entry_ip: IpAddr = fields.first()?.parse().ok()?;
        let flags = u32::from_str_radix(fields.get(2)?.trim_start_matches("0x"), 16).ok()?;
        if entry_ip != ip || flags & COMPLETE == 0 {
            return None;
        }
        parse_mac(fields.get(3)?)
    })
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The node whose bridge NIC has `mac`: hostd gives node N `52:54:T:T:77:N`.
pub fn node_of_mac(mac: [u8; 6], nodes: &[String]) -> Option<String> {
    let [0x52, 0x54, _, _, 0x77, index] = mac else {
        return None;
    };
    nodes.get(usize::from(index)).cloned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_server_socket_is_the_mirror_of_the_client() {
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let server: SocketAddr = "127.0.0.1:10809".parse().unwrap();
        let local = |a: SocketAddr| {
            let ip = match a.ip() {
                IpAddr::V4(v4) => u32::from_ne_bytes(v4.octets()),
                IpAddr::V6(_) => 0,
            };
            format!("{ip:08X}:{:04X}", a.port())
        };
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {} 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000 0 111 1 0\n\
             1: {} {} 01 00000000:00000000 00:00000000 00000000  1000 0 222 1 0\n\
             2: {} {} 01 00000000:00000000 00:00000000 00000000  1000 0 333 1 0\n",
            local(server),
            local(client),
            local(server),
            local(server),
            local(client),
        );
        // The client's own socket is 222, the server's 333.
        assert_eq!(socket_inode(&table, server, client), Some(333));
        assert_eq!(socket_inode(&table, client, server), Some(222));
        assert_eq!(
            socket_inode(&table, server, "127.0.0.1:40001".parse().unwrap()),
            None
        );
        // An IPv4 connection accepted by a dual-stack listener shows in tcp6, mapped.
        let mapped = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: 0000000000000000FFFF00000100007F:2A39 0000000000000000FFFF00000100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000 0 444 1 0\n";
        assert_eq!(socket_inode(mapped, server, client), Some(444));
    }

    #[test]
    fn a_live_connection_is_found_in_the_tables() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap();
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let inode = socket_inode(&table, server, local).unwrap();
        // This process holds it.
        assert!(holds(std::process::id(), &format!("socket:[{inode}]")));
        assert!(!holds(std::process::id(), "socket:[0]"));
    }

    #[test]
    fn the_node_whose_process_holds_the_socket_accepted_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap();
        let run_dir = tempfile::tempdir().unwrap();
        let record = |name: &str, pid: u32| {
            let text = format!(r#"{{"pid":{pid},"start_time":0}}"#);
            std::fs::write(run_dir.path().join(format!("{name}.json")), text).unwrap();
        };
        // a is some other process (pid 1 holds no socket of ours); b is this one; c has no
        // record.
        record("a", 1);
        record("b", std::process::id());
        let nodes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(
            socket_owner(run_dir.path(), &nodes, local, server).as_deref(),
            Some("b")
        );
        // No node's process holds it: unknown.
        record("b", 1);
        assert_eq!(socket_owner(run_dir.path(), &nodes, local, server), None);
    }

    #[test]
    fn bridge_macs_name_nodes() {
        let nodes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     10.79.0.11       0x1         0x2         52:54:00:2a:77:01     *        ivc1\n\
                     10.79.0.12       0x1         0x0         52:54:00:2a:77:02     *        ivc1\n\
                     10.79.0.13       0x1         0x2         52:54:00:2a:77:ff     *        ivc1\n";
        let mac = arp_mac(table, "10.79.0.11".parse().unwrap()).unwrap();
        assert_eq!(node_of_mac(mac, &nodes).as_deref(), Some("b"));
        // Incomplete entries say nothing; the bridge's own MAC is no node.
        assert_eq!(arp_mac(table, "10.79.0.12".parse().unwrap()), None);
        let bridge = arp_mac(table, "10.79.0.13".parse().unwrap()).unwrap();
        assert_eq!(node_of_mac(bridge, &nodes), None);
        assert_eq!(node_of_mac([2, 0, 0, 0, 0x77, 0], &nodes), None);
        assert_eq!(parse_mac("52:54:00"), None);
    }
}
