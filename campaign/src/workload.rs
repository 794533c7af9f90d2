//! The workload: several NBD clients, each writing and reading its own blocks of one
//! identity's export, recording every operation in the history as invoked, then ok, fail
//! or unknown.
//!
//! A client has one operation in flight. Any error other than a definite refusal from the
//! server (the operation may or may not have happened: a timeout, a connection cut by a
//! fault) is `unknown`, and the client reconnects to the identity's unchanged address.
//! Each operation names the node that accepted its connection, when that can be told
//! ([`Attribution`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::attribution::Attribution;
use crate::block::{self, BLOCK_SIZE};
use crate::history::{
    Action, Entry, ErrorCompletion, HistoryWriter, Invoke, OkCompletion, WriterSpec,
};
use crate::nbd_client::{NbdClient, reply_errno};
use crate::rng::Rng;

/// How long one operation may take before it counts as unknown.
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// Errnos by which an NBD server says it did not do the request.
const DEFINITE_ERRNOS: [(u32, &str); 3] = [(1, "EPERM"), (22, "EINVAL"), (28, "ENOSPC")];

/// One writer's parameters.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub spec: WriterSpec,
    pub address: SocketAddr,
    pub run_id: u64,
    pub seed: u64,
    /// Percentage of operations that are reads.
    pub read_percent: u64,
    /// How to tell which node accepted a connection.
    pub attribution: Attribution,
}

/// The running writers.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    acked: Arc<AtomicU64>,
    progress: Arc<IdentityAcks>,
}

/// Per identity, the newest invocation time of an acknowledged operation: the nemesis
/// waits on it for clients to be served again after a fault.
#[derive(Debug, Default)]
pub struct IdentityAcks {
    identities: Vec<(String, AtomicU64)>,
}

impl IdentityAcks {
    /// Nothing acknowledged yet on any of `identities`.
    pub fn new(identities: impl IntoIterator<Item = String>) -> Self {
        let mut this = Self::default();
        for identity in identities {
            if !this.identities.iter().any(|(known, _)| *known == identity) {
                this.identities.push((identity, AtomicU64::new(0)));
            }
        }
        this
    }

    /// Notes an acknowledged operation on `identity` invoked at `invoked` (µs).
    pub fn note(&self, identity: &str, invoked: u64) {
        if let Some((_, newest)) = self.identities.iter().find(|(i, _)| i == identity) {
            newest.fetch_max(invoked, Ordering::Relaxed);
        }
    }

    /// The newest invocation time (µs) of an acknowledged operation on `identity`; 0 if none.
    pub fn newest_invoked(&self, identity: &str) -> u64 {
        self.identities
            .iter()
            .find(|(i, _)| i == identity)
            .map_or(0, |(_, newest)| newest.load(Ordering::Relaxed))
    }
}

/// Op ids shared by all writers of a run.
#[derive(Debug, Default)]
pub struct OpIds(AtomicU64);

impl OpIds {
    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl Workload {
    /// Starts one thread per writer.
    pub fn start(writers: Vec<WriterConfig>, history: Arc<HistoryWriter>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(OpIds::default());
        let acked = Arc::new(AtomicU64::new(0));
        let progress = Arc::new(IdentityAcks::new(
            writers.iter().map(|config| config.spec.identity.clone()),
        ));
        let mut threads = Vec::new();
        for config in writers {
            let counters = Counters {
                ops: ops.clone(),
                acked: acked.clone(),
                progress: progress.clone(),
            };
            let shared = (stop.clone(), history.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("writer-{}", config.spec.writer))
                .spawn(move || {
                    let (stop, history) = shared;
                    run_writer(&config, &history, &counters, &stop);
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    // No half-started workload: stop the writers already running.
                    Workload {
                        stop,
                        threads,
                        acked,
                        progress,
                    }
                    .stop();
                    return Err(error);
                }
            }
        }
        Ok(Workload {
            stop,
            threads,
            acked,
            progress,
        })
    }

    /// Acknowledged operations so far (all writers).
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// What has been acknowledged on each identity.
    pub fn acks(&self) -> Arc<IdentityAcks> {
        self.progress.clone()
    }

    /// Stops every writer after its current operation and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

fn record(history: &HistoryWriter, entry: &Entry) {
    if let Err(error) = history.append(entry) {
        // A history that misses entries cannot be checked: say so loudly.
        log::error!("cannot record {entry:?}: {error}");
    }
}

/// What the writers share.
struct Counters {
    ops: Arc<OpIds>,
    acked: Arc<AtomicU64>,
    progress: Arc<IdentityAcks>,
}

fn run_writer(
    config: &WriterConfig,
    history: &HistoryWriter,
    counters: &Counters,
    stop: &AtomicBool,
) {
    let spec = &config.spec;
    let mut rng = Rng::new(config.seed, 1000 + u64::from(spec.writer));
    let mut client: Option<NbdClient> = None;
    // The node that accepted the connection, when known.
    let mut server: Option<String> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            match config
                .attribution
                .connect(config.address, &spec.identity, OP_TIMEOUT)
            {
                Ok((connected, accepted_by)) => {
                    client = Some(connected);
                    server = accepted_by;
                }
                Err(_) => {
                    // The address is moving or the node restarting: try again shortly.
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let Some(connection) = client.as_mut() else {
            continue;
        };
        let block = spec.first_block + rng.below(spec.blocks);
        let op = counters.ops.next();
        let offset = block * BLOCK_SIZE as u64;
        let read = rng.percent(config.read_percent);
        let invoke = Invoke {
            t: wire::time::now_unix_us(),
            op,
            writer: spec.writer,
            action: if read { Action::Read } else { Action::Write },
            block,
            seq: (!read).then(|| {
                seq += 1;
                seq
            }),
            server: server.clone(),
        };
        let invoked = invoke.t;
        let data = invoke
            .seq
            .map(|seq| block::encode(config.run_id, spec.writer, seq, block));
        record(history, &Entry::Invoke(invoke));
        let result = match &data {
            Some(data) => connection.write(offset, data, false).map(|()| None),
            None => connection
                .read(offset, BLOCK_SIZE as u32)
                .map(|bytes| Some(block::decode(&bytes, config.run_id, block))),
        };
        let t = wire::time::now_unix_us();
        match result {
            Ok(value) => {
                counters.acked.fetch_add(1, Ordering::Relaxed);
                counters.progress.note(&spec.identity, invoked);
                record(history, &Entry::Ok(OkCompletion { t, op, value }));
            }
            Err(error) => {
                let definite = reply_errno(&error)
                    .and_then(|errno| DEFINITE_ERRNOS.iter().find(|(e, _)| *e == errno));
                match definite {
                    Some((_, name)) => record(
                        history,
                        &Entry::Fail(ErrorCompletion {
                            t,
                            op,
                            error: (*name).to_owned(),
                        }),
                    ),
                    None => {
                        record(
                            history,
                            &Entry::Unknown(ErrorCompletion {
                                t,
                                op,
                                error: error.to_string(),
                            }),
                        );
                        // The connection's state is unknown too: start afresh.
                        client = None;
                    }
                }
            }
        }
    }
    if let Some(client) = client {
        client.disconnect();
    }
}
