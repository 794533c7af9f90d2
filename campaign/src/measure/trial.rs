//! One takeover trial: fill a's log, kill a, probe a's address until it serves the right
//! bytes, read the takeover from hostd's events, verify everything, give a back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use wire::control::{ClusterStatus, KillSignal, MoveReport, NodeState, Request, Response};
use wire::events::Event;
use wire::state_dir::StateDir;

use super::{MeasureArgs, MeasureError};
use crate::hostd::Hostd;
use crate::nbd_client::NbdClient;
use crate::rng::splitmix64;

/// The node that is killed, and whose address the probe reads through.
const VICTIM: &str = "a";
/// Bytes the probe reads per attempt.
const PROBE_LEN: u32 = 4096;
/// Connect and I/O timeout of each probe attempt.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// Least time between two probe attempts (refused connects return at once: do not spin on
/// a 2-core host whose CPU the surviving guest needs).
const PROBE_PAUSE: Duration = Duration::from_millis(2);
/// Timeout for the bulk writes and the verification reads.
const BULK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a trial may wait for the pair to be ready (a giveback boots a again).
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the pair idles before each fault: more than the survivor's fast polling after
/// a command (see the agent's failover monitor).
const SETTLE: Duration = Duration::from_secs(3);
/// How long the probe waits for a's address to work again after the fault was injected,
/// beyond the heartbeat timeout for hangs.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// What one trial measured (times in ms).
#[derive(Debug, Clone, Default)]
pub struct Trial {
    /// t1 - t0: kill request sent until the first correct read through a's address.
    pub first_read: f64,
    /// a's `node_state` → down event, after t0.
    pub detection: Option<f64>,
    /// The fault_injected event, after t0 (the cost of the kill request itself).
    pub injected: Option<f64>,
    /// The takeover's timeline, in ms after detection: the taker scanned the log and
    /// acknowledged, the address led to it, and (later) its background replay finished.
    pub fenced: Option<f64>,
    pub scanned: Option<f64>,
    pub serving: Option<f64>,
    pub replayed: Option<f64>,
    pub records: u64,
    /// Probe attempts until the first correct read.
    pub(super) attempts: u64,
    /// Failed attempts: refused, timed out (connect, handshake or read), other errors.
    pub(super) refused: u64,
    pub(super) timed_out: u64,
    pub(super) other_errors: u64,
    /// The first other error, with its time after t0.
    pub(super) first_other: Option<(f64, String)>,
    /// Time to write the unflushed data.
    pub(super) write_ms: f64,
    /// Records in a's log that were not flushed when it was killed.
    pub(super) unflushed_records: u64,
    /// Time `hostd giveback a` took.
    pub(super) giveback_ms: f64,
    /// t0 on the host clock (µs since the epoch), for the timeline figure.
    pub t0_unix_us: u64,
    /// hostd's report of the takeover.
    pub takeover: Option<MoveReport>,
}

impl Trial {
    /// The trial in one line.
    pub fn line(&self) -> String {
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        let mut line = format!(
            "kill→read {:>6.0} ms | detect {:>5} | fenced +{} scanned +{} serving +{} replayed +{} \
             | {} records replayed ({} unflushed) | probes: {} ({} refused, {} timed out, {} other) \
             | write {:.0} ms | giveback {:.1} s",
            self.first_read,
            opt(self.detection),
            opt(self.fenced),
            opt(self.scanned),
            opt(self.serving),
            opt(self.replayed),
            self.records,
            self.unflushed_records,
            self.attempts,
            self.refused,
            self.timed_out,
            self.other_errors,
            self.write_ms,
            self.giveback_ms / 1000.0,
        );
        if let Some((at, error)) = &self.first_other {
            line.push_str(&format!(
                " | first other probe error at +{at:.0} ms: {error}"
            ));
        }
        line
    }
}

/// The measurement's view of the pair.
#[derive(Debug)]
pub struct Probe {
    hostd: Hostd,
    write_len: usize,
    kill_via_cli: bool,
    timeout_ms: u64,
    seed: u64,
}

fn failed(message: impl Into<String>) -> MeasureError {
    MeasureError::Failed(message.into())
}

fn nbd(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MeasureError {
    let what = what.into();
    move |source| MeasureError::Nbd { what, source }
}

impl Probe {
    pub fn new(args: &MeasureArgs, hostd: PathBuf) -> Self {
        Probe {
            hostd: Hostd {
                binary: hostd,
                state_dir: args.state_dir.clone(),
            },
            write_len: args.write_kib as usize * 1024,
            kill_via_cli: args.kill_via_cli,
            timeout_ms: args.timeout_ms,
            seed: wire::time::now_unix_us(),
        }
    }

    /// Waits until every node is up and each serves its own identity, giving a its
    /// identity back if another node holds it. Returns the status and how long a giveback
    /// took (ms).
    fn ready_with_giveback(&self) -> Result<(ClusterStatus, f64), MeasureError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut giveback_ms = 0.0;
        loop {
            let status = self.hostd.status()?;
            let victim = Hostd::node(&status, VICTIM)
                .ok_or_else(|| failed(format!("hostd status shows no node {VICTIM}")))?;
            if Hostd::healthy(&status) {
                return Ok((status, giveback_ms));
            }
            let holder_up = victim.served_by.as_deref().is_some_and(|holder| {
                holder != VICTIM
                    && Hostd::node(&status, holder).is_some_and(|h| h.state == NodeState::Up)
            });
            if holder_up {
                let started = Instant::now();
                let text = self.hostd.run(&["giveback", VICTIM, "--json"])?;
                let report: MoveReport = serde_json::from_str(&text).map_err(|e| {
                    failed(format!("`hostd giveback --json` printed {text:?}: {e}"))
                })?;
                giveback_ms += ms(started.elapsed());
                if report.to != VICTIM {
                    return Err(failed(format!(
                        "giveback moved {} to {}",
                        report.node, report.to
                    )));
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "the pair is not ready after {READY_TIMEOUT:?}: {}",
                    crate::hostd::summary(&status)
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn ready(&self) -> Result<ClusterStatus, MeasureError> {
        self.ready_with_giveback().map(|(status, _)| status)
    }

    /// Writes `unflushed_mib` MiB (one block for 0: an empty log but for the probe's
    /// block) to a's export, then kills a with `signal` and measures.
    pub fn trial(
        &self,
        index: usize,
        signal: KillSignal,
        unflushed_mib: u64,
    ) -> Result<Trial, MeasureError> {
        let bytes = (unflushed_mib << 20).max(u64::from(PROBE_LEN));
        let mut trial = Trial::default();
        let status = self.ready()?;
        let victim = Hostd::node(&status, VICTIM)
            .ok_or_else(|| failed(format!("hostd status shows no node {VICTIM}")))?;
        let addr = nbd_addr(&victim.nbd)?;
        let seed = splitmix64(self.seed.wrapping_add(index as u64));

        // The unflushed writes.
        let started = Instant::now();
        let mut client = NbdClient::connect(addr, VICTIM, BULK_TIMEOUT)
            .map_err(nbd(format!("connect to {addr} (export {VICTIM})")))?;
        if client.size() < bytes {
            return Err(failed(format!(
                "export {VICTIM} has {} bytes, fewer than the {bytes} to write",
                client.size(),
            )));
        }
        let mut buf = vec![0u8; self.write_len];
        let mut offset = 0;
        while offset < bytes {
            let len = (bytes - offset).min(self.write_len as u64) as usize;
            pattern(seed, offset, &mut buf[..len]);
            client
                .write(offset, &buf[..len], false)
                .map_err(nbd(format!("write at {offset}")))?;
            offset += len as u64;
        }
        client.disconnect();
        trial.write_ms = ms(started.elapsed());
        let after = self.hostd.status()?;
        let a = Hostd::node(&after, VICTIM)
            .ok_or_else(|| failed(format!("hostd status shows no node {VICTIM}")))?;
        match a.head_seq.zip(a.flushed_seq) {
            Some((head, flushed)) if head > flushed => trial.unflushed_records = head - flushed,
            _ => {
                return Err(failed(format!(
                    "a's log holds no unflushed records after the writes (head {:?}, flushed {:?}): \
                     start the pair with [flusher] paused = true",
                    a.head_seq, a.flushed_seq
                )));
            }
        }

        // The block the probe reads: the last one written (the end of the replay), and a
        // few samples checked by checksum once a's address answers again.
        let probe_offset = (bytes - u64::from(PROBE_LEN)) / 4096 * 4096;
        let mut expected = vec![0u8; PROBE_LEN as usize];
        pattern(seed, probe_offset, &mut expected);
        let samples = sample_offsets(seed, bytes);
        let sample_sums: Vec<u64> = samples
            .iter()
            .map(|&o| {
                let mut block = vec![0u8; PROBE_LEN as usize];
                pattern(seed, o, &mut block);
                fnv1a(&block)
            })
            .collect();

        // An idle survivor polls its commands less often than one that just handled one (a
        // giveback before this trial): let it settle, so every trial and size measures the
        // same, usual case.
        std::thread::sleep(SETTLE);

        // The fault, with an idle client connected, then the probe.
        let idle = NbdClient::connect(addr, VICTIM, Duration::from_secs(5))
            .map_err(nbd("connect the idle client"))?;
        trial.t0_unix_us = wire::time::now_unix_us();
        let t0_unix_ms = trial.t0_unix_us as f64 / 1000.0;
        let t0 = Instant::now();
        self.kill(signal)?;
        let limit = TAKEOVER_TIMEOUT
            + match signal {
                KillSignal::Stop => Duration::from_millis(self.timeout_ms),
                _ => Duration::ZERO,
            };
        let mut last_error;
        loop {
            let attempt = Instant::now();
            trial.attempts += 1;
            match NbdClient::connect(addr, VICTIM, PROBE_TIMEOUT)
                .and_then(|mut c| c.read(probe_offset, PROBE_LEN).map(|data| (c, data)))
            {
                Ok((c, data)) if data == expected => {
                    trial.first_read = ms(t0.elapsed());
                    c.disconnect();
                    break;
                }
                Ok((_, data)) => {
                    return Err(failed(format!(
                        "a read through a's address after the {signal:?} returned wrong data at offset {probe_offset} \
                         (first bad byte at +{}): stale or lost writes",
                        first_difference(&data, &expected)
                    )));
                }
                Err(error) => {
                    use std::io::ErrorKind;
                    match error.kind() {
                        ErrorKind::ConnectionRefused => trial.refused += 1,
                        ErrorKind::TimedOut | ErrorKind::WouldBlock => trial.timed_out += 1,
                        _ => {
                            trial.other_errors += 1;
                            trial
                                .first_other
                                .get_or_insert_with(|| (ms(t0.elapsed()), error.to_string()));
                        }
                    }
                    last_error = error.to_string();
                }
            }
            if t0.elapsed() > limit {
                return Err(failed(format!(
                    "a's address did not serve a correct read within {limit:?} of the {signal:?} \
                     ({} attempts; last error: {last_error})",
                    trial.attempts
                )));
            }
            std::thread::sleep(PROBE_PAUSE.saturating_sub(attempt.elapsed()));
        }
        drop(idle);

        // What hostd recorded.
        let seen = self.wait_for_takeover(t0_unix_ms)?;
        trial.injected = seen.injected.map(|t| t - t0_unix_ms);
        trial.detection = seen
            .down
            .or(Some(seen.takeover.detected_unix_ms as f64))
            .map(|t| t - t0_unix_ms);
        let timeline = &seen.takeover.timeline_ms;
        (trial.fenced, trial.scanned, trial.serving) =
            (timeline.fenced, timeline.scanned, timeline.serving);
        trial.records = seen.takeover.replayed_records;
        if !seen.takeover.replay_complete {
            return Err(failed(
                "the takeover's scan of a's log was incomplete (see the survivor's console)",
            ));
        }

        // Every byte, through a's address (another node serves it now).
        let mut client =
            NbdClient::connect(addr, VICTIM, BULK_TIMEOUT).map_err(nbd("connect to verify"))?;
        for (&o, &sum) in samples.iter().zip(&sample_sums) {
            let block = client
                .read(o, PROBE_LEN)
                .map_err(nbd(format!("read the sample at {o}")))?;
            if fnv1a(&block) != sum {
                return Err(failed(format!(
                    "sampled block at offset {o} has the wrong checksum"
                )));
            }
        }
        let mut offset = 0;
        while offset < bytes {
            let len = (bytes - offset).min(self.write_len as u64) as usize;
            pattern(seed, offset, &mut buf[..len]);
            let data = client
                .read(offset, len as u32)
                .map_err(nbd(format!("verification read at {offset}")))?;
            if data != buf[..len] {
                return Err(failed(format!(
                    "DATA MISMATCH after takeover: byte {} differs (read through a's address)",
                    offset + first_difference(&data, &buf[..len]) as u64
                )));
            }
            offset += len as u64;
        }
        client.disconnect();
        // The background replay's end, from hostd's events (the reads above may have run
        // while it went on).
        let replayed = self.wait_for_replay(t0_unix_ms)?;
        trial.replayed = Some(replayed - seen.takeover.detected_unix_ms as f64);

        trial.takeover = Some(seen.takeover);
        // a gets its identity back (hostd restarts its QEMU first).
        trial.giveback_ms = self.ready_with_giveback()?.1;
        Ok(trial)
    }

    fn kill(&self, signal: KillSignal) -> Result<(), MeasureError> {
        let name = match signal {
            KillSignal::Kill => "kill",
            KillSignal::Stop => "stop",
            KillSignal::Panic => "panic",
            KillSignal::Agent => "agent",
        };
        if self.kill_via_cli {
            self.hostd.run(&["kill", VICTIM, "--signal", name])?;
            return Ok(());
        }
        let request = Request::Kill {
            node: VICTIM.to_owned(),
            signal,
        };
        let socket = StateDir::new(&self.hostd.state_dir).control_socket();
        match wire::control::call(&socket, &request, Duration::from_secs(10))
            .map_err(MeasureError::Socket)?
        {
            Response::Killed { .. } => Ok(()),
            Response::Error { message } => Err(MeasureError::KillRefused(message)),
            _ => Err(failed("hostd answered a kill request with something else")),
        }
    }

    /// Reads the events after `t0_unix_ms` until the end of the replay of a's log is there;
    /// returns its time (Unix ms).
    fn wait_for_replay(&self, t0_unix_ms: f64) -> Result<f64, MeasureError> {
        let deadline = Instant::now() + BULK_TIMEOUT;
        loop {
            for line in self.hostd.events()? {
                let time = line.time_us() as f64 / 1000.0;
                if time + 1.0 < t0_unix_ms || line.event.node() != Some(VICTIM) {
                    continue;
                }
                if let Event::Replayed { complete, .. } = line.event {
                    if !complete {
                        return Err(failed(
                            "the replay of a's log stopped at a bad record (see the survivor's console)",
                        ));
                    }
                    return Ok(time);
                }
            }
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "hostd's events have no end of the replay of a's log within {BULK_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reads the events after `t0_unix_ms` until the takeover of a is there.
    fn wait_for_takeover(&self, t0_unix_ms: f64) -> Result<Seen, MeasureError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (mut injected, mut down, mut takeover) = (None, None, None);
            for line in self.hostd.events()? {
                let time = line.time_unix_ms as f64;
                // Event times are whole milliseconds (truncated).
                if time + 1.0 < t0_unix_ms || line.event.node() != Some(VICTIM) {
                    continue;
                }
                match line.event {
                    Event::FaultInjected { .. } => {
                        injected.get_or_insert(time);
                    }
                    Event::NodeState {
                        to: NodeState::Down,
                        ..
                    } => {
                        down.get_or_insert(time);
                    }
                    Event::Takeover(report) => takeover = Some(report),
                    Event::MoveFailed { error, .. } => {
                        return Err(failed(format!(
                            "hostd could not move a's identity: {error}"
                        )));
                    }
                    _ => {}
                }
            }
            if let Some(takeover) = takeover {
                return Ok(Seen {
                    injected,
                    down,
                    takeover,
                });
            }
            if Instant::now() >= deadline {
                return Err(failed(
                    "a's address works again, but hostd's events have no takeover for it",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What `events.jsonl` says about one fault (times in Unix ms).
#[derive(Debug)]
struct Seen {
    injected: Option<f64>,
    down: Option<f64>,
    takeover: MoveReport,
}

/// "nbd://127.0.0.1:PORT/NAME" → 127.0.0.1:PORT.
fn nbd_addr(uri: &str) -> Result<SocketAddr, MeasureError> {
    let rest = uri
        .strip_prefix("nbd://")
        .ok_or_else(|| failed(format!("not an nbd:// address: {uri:?}")))?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    host_port
        .parse()
        .map_err(|e| failed(format!("bad NBD address {uri:?}: {e}")))
}

/// Offsets of 8 sampled 4 KiB blocks among the first `bytes`.
fn sample_offsets(seed: u64, bytes: u64) -> Vec<u64> {
    let blocks = (bytes / 4096).max(1);
    (0..8u64)
        .map(|i| splitmix64(seed ^ (i + 1).wrapping_mul(0x9e37_79b9)) % blocks * 4096)
        .collect()
}

/// Fills `buf` with the pattern of `seed` at `offset` (a multiple of 8; each 8-byte word
/// depends on the seed and its own offset, so any range can be regenerated).
fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let value = splitmix64(seed ^ (offset / 8 + i as u64)).to_le_bytes();
        word.copy_from_slice(&value[..word.len()]);
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_of_the_pattern_regenerates() {
        let mut whole = vec![0u8; 64];
        pattern(7, 0, &mut whole);
        let mut tail = vec![0u8; 32];
        pattern(7, 32, &mut tail);
        assert_eq!(&whole[32..], &tail[..]);
        let mut other = vec![0u8; 64];
        pattern(8, 0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn samples_stay_inside_the_written_range() {
        for offset in sample_offsets(3, 1 << 20) {
            assert!(offset + 4096 <= 1 << 20 && offset % 4096 == 0);
        }
        assert_eq!(
            nbd_addr("nbd://127.0.0.1:10809/a").unwrap(),
            "127.0.0.1:10809".parse().unwrap()
        );
        assert!(nbd_addr("http://x").is_err());
    }
}
