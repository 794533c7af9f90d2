//! An availability probe for comparisons with other HA tools (scripts/compare-keepalived.sh):
//! the time from a fault to the first 4 KiB read through an address, as a fresh client sees
//! it. ivha and its peer are timed by this one client, over the campaign's NBD client.
//!
//! First one read must succeed (the service is up; the client's ARP entry is warm); the
//! probe prints `ready` and waits for the trigger file, which holds the fault's time (seconds
//! since the epoch, as bash's `$EPOCHREALTIME`). From then on a new attempt (its own
//! connection: connect, `NBD_OPT_GO`, one read, disconnect) starts every interval, whether
//! or not the earlier ones have failed yet, so a SYN lost to a dead node does not hold the
//! next attempt back by the connect timeout. It prints `ok MS ATTEMPT` for the first that
//! succeeds: MS from the fault to the end of its read, ATTEMPT its number.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::nbd_client::NbdClient;

/// Arguments of `ivha-campaign probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// The address to read through (IP:PORT).
    pub addr: SocketAddr,
    /// The export to read.
    pub export: String,
    /// The file that appears with the fault's time in it.
    #[arg(long)]
    pub trigger: PathBuf,
    /// Bounds each attempt's connect.
    #[arg(long, default_value_t = 100)]
    pub connect_timeout_ms: u64,
    /// Bounds each read and write of an attempt once connected.
    #[arg(long, default_value_t = 2000)]
    pub io_timeout_ms: u64,
    /// A new attempt starts this often after the fault.
    #[arg(long, default_value_t = 10)]
    pub interval_ms: u64,
    /// Give up this long after the fault (or after the start, before it).
    #[arg(long, default_value_t = 60)]
    pub deadline_s: u64,
}

/// Errors of the probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no read succeeded before the fault within {0:?}")]
    NotReady(Duration),
    #[error("no read succeeded within {0:?} of the fault")]
    Timeout(Duration),
    #[error("the trigger file holds {0:?}, not a time in seconds since the epoch")]
    Trigger(String),
}

/// One attempt: a fresh connection, one 4 KiB read at offset 0, a disconnect.
fn attempt(args: &ProbeArgs) -> std::io::Result<()> {
    let stream =
        TcpStream::connect_timeout(&args.addr, Duration::from_millis(args.connect_timeout_ms))?;
    let io_timeout = Some(Duration::from_millis(args.io_timeout_ms));
    stream.set_read_timeout(io_timeout)?;
    stream.set_write_timeout(io_timeout)?;
    stream.set_nodelay(true)?;
    let mut client = NbdClient::negotiate(stream, &args.export, &args.addr.to_string())?;
    client.read(0, 4096)?;
    client.disconnect();
    Ok(())
}

/// Runs the probe; prints `ready`, then `ok MS ATTEMPT`.
pub fn run(args: &ProbeArgs) -> Result<(), ProbeError> {
    let deadline = Duration::from_secs(args.deadline_s);
    let interval = Duration::from_millis(args.interval_ms);
    let start = Instant::now();
    while attempt(args).is_err() {
        if start.elapsed() > deadline {
            return Err(ProbeError::NotReady(deadline));
        }
        std::thread::sleep(interval);
    }
    println!("ready");
    let fault = loop {
        match std::fs::read_to_string(&args.trigger) {
            Ok(text) if !text.trim().is_empty() => {
                let seconds: f64 = text
                    .trim()
                    .parse()
                    .map_err(|_| ProbeError::Trigger(text.trim().to_owned()))?;
                break seconds;
            }
            _ if start.elapsed() > deadline * 2 => return Err(ProbeError::Timeout(deadline)),
            _ => std::thread::sleep(Duration::from_micros(500)),
        }
    };
    let (done, results) = mpsc::channel::<(u32, f64)>();
    let shared = Arc::new(args.clone());
    let after_fault = Instant::now();
    let mut number = 0;
    loop {
        if let Ok((attempt_number, ms)) = results.try_recv() {
            println!("ok {ms:.0} {attempt_number}");
            return Ok(());
        }
        if after_fault.elapsed() > deadline {
            return Err(ProbeError::Timeout(deadline));
        }
        number += 1;
        let done = done.clone();
        let args = Arc::clone(&shared);
        // Attempts that fail, or succeed after another, end on their own.
        std::thread::spawn(move || {
            if attempt(&args).is_ok() {
                let _ = done.send((number, (unix_seconds() - fault) * 1000.0));
            }
        });
        std::thread::sleep(interval);
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_listening_is_not_ready() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let args = ProbeArgs {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            export: "a".into(),
            trigger: PathBuf::from("/nonexistent/trigger"),
            connect_timeout_ms: 50,
            io_timeout_ms: 50,
            interval_ms: 10,
            deadline_s: 0,
        };
        let error = run(&args).unwrap_err();
        assert!(matches!(error, ProbeError::NotReady(_)), "{error}");
    }
}
