//! The daemon's control socket: hostd registers keys, reserves and preempts here, asks for
//! the reservations' state, and reads and moves the coordinator's owners. One JSON request
//! line, one JSON response line ([`wire::storage`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use wire::storage::{DiskReservationStatus, RegisteredKey, StorageRequest, StorageResponse};

use crate::coordination::Coordination;
use crate::reservation::Change;
use crate::table::{DiskView, Table};

/// Longest request line read; a longer one is refused (no request comes near it).
const MAX_REQUEST: u64 = 64 * 1024;

/// How long a client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    #[error("cannot listen on {}", path.display())]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Listens on `path` (replacing a stale socket file), mode 0600.
pub fn listen(path: &Path) -> Result<UnixListener, ControlSocketError> {
    let bind = || -> std::io::Result<UnixListener> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    };
    bind().map_err(|source| ControlSocketError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Answers requests on `listener` forever, one connection at a time (every request is
/// short; a preemption waits only for the victim's write in progress).
pub fn serve(listener: &UnixListener, table: &Table, coordination: Option<&Coordination>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(error) = answer(stream, table, coordination) {
                    log::warn!("control connection: {error}");
                }
            }
            Err(error) => log::warn!("cannot accept a control connection: {error}"),
        }
    }
}

fn answer(
    stream: UnixStream,
    table: &Table,
    coordination: Option<&Coordination>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let response = match serde_json::from_str::<StorageRequest>(line.trim()) {
        Ok(request) => handle(table, coordination, &request),
        Err(error) => StorageResponse::Error {
            message: format!("malformed request: {error}"),
        },
    };
    let mut out = serde_json::to_string(&response).map_err(std::io::Error::other)?;
    out.push('\n');
    (&stream).write_all(out.as_bytes())
}

/// Carries out one request; `coordination` is the daemon's coordinator, if its plan has one.
pub fn handle(
    table: &Table,
    coordination: Option<&Coordination>,
    request: &StorageRequest,
) -> StorageResponse {
    let (disk, result) = match request {
        StorageRequest::Status => {
            return match table.views() {
                Ok(views) => StorageResponse::Status {
                    pid: std::process::id(),
                    disks: views.into_iter().map(status_of).collect(),
                },
                Err(error) => error_response(&error),
            };
        }
        StorageRequest::Register { disk, node } => {
            (disk, table.change(disk, |d| d.register_next(*node)))
        }
        StorageRequest::Reserve { disk, node } => (disk, table.change(disk, |d| d.reserve(*node))),
        StorageRequest::Preempt { disk, victim, by } => {
            (disk, table.change(disk, |d| d.preempt(*victim, *by)))
        }
        StorageRequest::Coordinator
        | StorageRequest::Assign { .. }
        | StorageRequest::Sync { .. }
        | StorageRequest::Rejoin { .. } => return coordinate(coordination, request),
    };
    match result {
        Ok(change) => {
            log_change(disk, change);
            match table.views() {
                Ok(views) => match views.into_iter().find(|v| &v.name == disk) {
                    Some(view) => StorageResponse::Done {
                        changed: change != Change::None,
                        disk: status_of(view),
                    },
                    None => StorageResponse::Error {
                        message: format!("disk {disk:?} vanished"),
                    },
                },
                Err(error) => error_response(&error),
            }
        }
        Err(error) => error_response(&error),
    }
}

/// The coordinator's requests.
fn coordinate(coordination: Option<&Coordination>, request: &StorageRequest) -> StorageResponse {
    let Some(coordination) = coordination else {
        return StorageResponse::Error {
            message: "this daemon runs no coordinator".into(),
        };
    };
    match request {
        StorageRequest::Coordinator => coordination.state(),
        StorageRequest::Assign {
            identity,
            node,
            generation,
        } => coordination.assign(*identity, *node, *generation),
        StorageRequest::Sync { generation, owners } => coordination.sync(*generation, owners),
        StorageRequest::Rejoin { node } => coordination.rejoin(*node),
        other => StorageResponse::Error {
            message: format!("{other:?} is no coordinator request"),
        },
    }
}

fn error_response(error: &dyn std::error::Error) -> StorageResponse {
    StorageResponse::Error {
        message: wire::error_chain::one_line(error),
    }
}

pub(crate) fn log_change(disk: &str, change: Change) {
    match change {
        Change::None => {}
        Change::Registered { key } => log::info!(
            "disk {disk}: node {} registered (generation {})",
            key.node,
            key.generation
        ),
        Change::Reserved { node } => log::info!("disk {disk}: node {node} holds the reservation"),
        Change::Preempted {
            victim,
            by,
            took_reservation,
        } => log::warn!(
            "disk {disk}: node {by} preempted node {} (generation {}){}",
            victim.node,
            victim.generation,
            if took_reservation {
                " and holds the reservation"
            } else {
                ""
            }
        ),
    }
}

fn status_of(view: DiskView) -> DiskReservationStatus {
    DiskReservationStatus {
        name: view.name,
        holder: view.holder,
        registered: view
            .registered
            .into_iter()
            .map(|k| RegisteredKey {
                node: k.node,
                generation: k.generation,
            })
            .collect(),
        generation: view.generation,
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    fn table(dir: &Path) -> Table {
        Table::load(&dir.join("r.json"), &["a".to_owned(), "b".to_owned()]).unwrap()
    }

    fn register(disk: &str, node: u32) -> StorageRequest {
        StorageRequest::Register {
            disk: disk.into(),
            node,
        }
    }

    #[test]
    fn register_reserve_preempt_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let table = table(dir.path());
        for node in [0, 1] {
            assert!(matches!(
                handle(&table, None, &register("a", node)),
                StorageResponse::Done { changed: true, .. }
            ));
        }
        let reserved = handle(
            &table,
            None,
            &StorageRequest::Reserve {
                disk: "a".into(),
                node: 0,
            },
        );
        let StorageResponse::Done { disk, .. } = reserved else {
            panic!("{reserved:?}");
        };
        assert_eq!(disk.holder, Some(0));
        let preempted = handle(
            &table,
            None,
            &StorageRequest::Preempt {
                disk: "a".into(),
                victim: 0,
                by: 1,
            },
        );
        let StorageResponse::Done { changed, disk } = preempted else {
            panic!("{preempted:?}");
        };
        assert!(changed);
        assert_eq!(disk.holder, Some(1));
        assert_eq!(
            disk.registered,
            vec![RegisteredKey {
                node: 1,
                generation: 1
            }]
        );
        let StorageResponse::Status { disks, .. } = handle(&table, None, &StorageRequest::Status)
        else {
            panic!("no status");
        };
        assert_eq!(disks.len(), 2);
        assert!(disks[1].registered.is_empty());
    }

    #[test]
    fn refusals_and_unknown_disks_answer_errors() {
        let dir = tempfile::tempdir().unwrap();
        let table = table(dir.path());
        let StorageResponse::Error { message } = handle(
            &table,
            None,
            &StorageRequest::Reserve {
                disk: "a".into(),
                node: 0,
            },
        ) else {
            panic!("reserved without a key");
        };
        assert_eq!(message, "disk a: node 0 is not registered");
        let StorageResponse::Error { message } = handle(&table, None, &register("zz", 0)) else {
            panic!("registered on a disk that does not exist");
        };
        assert_eq!(message, "there is no disk named \"zz\"");
    }

    #[test]
    fn the_socket_answers_requests_and_malformed_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = listen(&path).unwrap();
        let table = table(dir.path());
        thread::scope(|scope| {
            scope.spawn(|| {
                for stream in listener.incoming().take(3) {
                    answer(stream.unwrap(), &table, None).unwrap();
                }
            });
            let timeout = Duration::from_secs(5);
            let done = wire::storage::call(&path, &register("b", 2), timeout).unwrap();
            assert!(matches!(done, StorageResponse::Done { changed: true, .. }));
            let status = wire::storage::call(&path, &StorageRequest::Status, timeout).unwrap();
            assert!(matches!(status, StorageResponse::Status { .. }));
            let mut raw = UnixStream::connect(&path).unwrap();
            raw.write_all(b"{\"request\":\"format_everything\"}\n")
                .unwrap();
            let mut answer = String::new();
            BufReader::new(raw).read_line(&mut answer).unwrap();
            let answer: StorageResponse = serde_json::from_str(&answer).unwrap();
            assert!(
                matches!(&answer, StorageResponse::Error { message } if message.starts_with("malformed request")),
                "{answer:?}"
            );
        });
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
