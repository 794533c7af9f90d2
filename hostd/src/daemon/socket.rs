//! The control socket: accepts clients, passes their requests to the main loop.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use wire::control::{Request, Response};

/// A request from the socket or a signal, with where to send the answer.
pub struct Envelope {
    pub request: Request,
    pub reply: Option<Sender<Response>>,
    /// Disconnects once the answer is written to the client: the daemon waits for it
    /// before exiting after `down`, or the client would get nothing.
    pub written: Option<Receiver<()>>,
}

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request, and the main loop to answer it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the socket (mode 0600) and serves it on a thread. Dropping the returned listener
/// handle does not stop the thread; the process exits soon after anyway.
pub fn serve(path: &Path, requests: Sender<Envelope>) -> std::io::Result<UnixListener> {
    // The caller holds the state directory's lock, so a socket file left here belongs to a
    // dead daemon.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let accepting = listener.try_clone()?;
    std::thread::Builder::new()
        .name("control-socket".into())
        .spawn(move || {
            for stream in accepting.incoming() {
                match stream {
                    Ok(stream) => {
                        let requests = requests.clone();
                        let _ = std::thread::Builder::new()
                            .name("control-client".into())
                            .spawn(move || serve_client(stream, &requests));
                    }
                    Err(error) => log::warn!("control socket accept failed: {error}"),
                }
            }
        })?;
    Ok(listener)
}

fn serve_client(mut stream: UnixStream, requests: &Sender<Envelope>) {
    // Dropped only after the answer is written (see `Envelope::written`).
    let (answer_written, written) = crossbeam_channel::bounded::<()>(0);
    let response = match authorize(&stream).and_then(|()| read_request(&stream)) {
        Ok(request) => {
            let (reply, answer) = crossbeam_channel::bounded(1);
            if requests
                .send(Envelope {
                    request,
                    reply: Some(reply),
                    written: Some(written),
                })
                .is_err()
            {
                return;
            }
            match answer.recv_timeout(CLIENT_TIMEOUT) {
                Ok(response) => response,
                Err(_) => Response::Error {
                    message: "hostd did not answer in time".into(),
                },
            }
        }
        Err(message) => Response::Error { message },
    };
    if let Ok(mut line) = serde_json::to_string(&response) {
        line.push('\n');
        let _ = stream.write_all(line.as_bytes());
    }
    drop(answer_written);
}

/// Only root and the daemon's own user may control it.
fn authorize(stream: &UnixStream) -> Result<(), String> {
    let credentials = getsockopt(stream, PeerCredentials)
        .map_err(|e| format!("cannot read the client's credentials: {e}"))?;
    let ours = nix::unistd::geteuid().as_raw();
    if credentials.uid() == 0 || credentials.uid() == ours {
        Ok(())
    } else {
        log::warn!(
            "refused control connection from uid {} (pid {})",
            credentials.uid(),
            credentials.pid()
        );
        Err(format!(
            "uid {} may not control this hostd",
            credentials.uid()
        ))
    }
}

fn read_request(stream: &UnixStream) -> Result<Request, String> {
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST))
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    serde_json::from_str(line.trim()).map_err(|e| format!("malformed request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::control::call;

    #[test]
    fn requests_round_trip_and_garbage_gets_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (tx, rx) = crossbeam_channel::unbounded::<Envelope>();
        let _listener = serve(&path, tx).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::thread::spawn(move || {
            for envelope in rx {
                if let Some(reply) = envelope.reply {
                    let _ = reply.send(Response::Error {
                        message: format!("echo {:?}", envelope.request),
                    });
                }
            }
        });
        let answer = call(
            &path,
            &Request::Down { purge: true },
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(
            matches!(answer, Response::Error { message } if message == "echo Down { purge: true }")
        );

        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(b"{not json\n").unwrap();
        let mut text = String::new();
        BufReader::new(raw).read_line(&mut text).unwrap();
        assert!(text.contains("malformed request"), "{text}");
    }
}
