//! The control port: report lines out to the host, a `stop` line in from it.
//!
//! In the client VM both are the second serial port (`/dev/ttyS1`, raw, no echo), which the
//! host's side of QEMU connects to a Unix socket; on a host, standard output and any file.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::record::Line;

/// Errors on the control port.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot open the control port {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write to the control port")]
    Write(#[source] std::io::Error),
    #[error("cannot start the thread that waits for `stop`")]
    Thread(#[source] std::io::Error),
}

/// Where report lines go.
pub struct Reporter {
    out: Box<dyn Write + Send>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reporter")
    }
}

impl Reporter {
    /// Reports to `path`, or to standard output when `None`.
    pub fn open(path: Option<&Path>) -> Result<Self, ControlError> {
        let out: Box<dyn Write + Send> = match path {
            None => Box::new(std::io::stdout()),
            Some(path) => Box::new(
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .map_err(|source| ControlError::Open {
                        path: path.to_owned(),
                        source,
                    })?,
            ),
        };
        Ok(Reporter { out })
    }

    /// Sends one line; it has left when this returns.
    pub fn send(&mut self, line: &Line) -> Result<(), ControlError> {
        writeln!(self.out, "{line}")
            .and_then(|()| self.out.flush())
            .map_err(ControlError::Write)
    }
}

/// Whether the host asked the workload to stop.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// A signal set by the first `stop` line read from `path` (in a thread of its own); one
    /// that is never set when `path` is `None`.
    pub fn listen(path: Option<&Path>) -> Result<Self, ControlError> {
        let signal = StopSignal::default();
        let Some(path) = path else {
            return Ok(signal);
        };
        let input = File::open(path).map_err(|source| ControlError::Open {
            path: path.to_owned(),
            source,
        })?;
        let flag = signal.0.clone();
        std::thread::Builder::new()
            .name("stop-listener".into())
            .spawn(move || {
                for line in BufReader::new(input).lines() {
                    match line {
                        Ok(line) if line.trim() == "stop" => {
                            flag.store(true, Ordering::SeqCst);
                            return;
                        }
                        Ok(_) => {}
                        Err(error) => {
                            // The host then cannot stop the run; it says so when it times out.
                            eprintln!("ivha-client-load: cannot read the control port: {error}");
                            return;
                        }
                    }
                }
            })
            .map_err(ControlError::Thread)?;
        Ok(signal)
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
