//! Each node's socket to the coordinator: the node is the socket's, never what a request
//! says. A guest's QEMU connects as a client (a virtio-serial port on a chardev with
//! `reconnect=1`) and stays connected for its whole life; a process-backend agent connects
//! itself. Several connections may come and go, each served by a thread of its own.
//! Where a claim kills its victim's process, the process at the other end of each
//! connection (its peer credentials) is noted as the node's once it asks something.
//!
//! One JSON [`NodeRequest`] per line, one JSON [`NodeAnswer`] line back, until the peer
//! closes. A line that is no request, or longer than [`MAX_LINE`], is answered with
//! `Error` and the connection goes on.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use wire::coordinator::{NodeAnswer, NodeRequest};

use crate::coordination::Coordination;
use crate::stonith::PeerProcess;

/// Longest request line read (no request comes near it).
pub const MAX_LINE: usize = 64 * 1024;

/// How long a peer may leave an answer unread before its connection is dropped (an agent
/// asks again after it reconnects; a claim is answered as the first time).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed accept (out of file descriptors, say) is tried again after this.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Accepts connections on node `node`'s socket forever, each served by a thread of its own.
pub fn serve(listener: &UnixListener, node: u32, coordination: &Arc<Coordination>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let coordination = Arc::clone(coordination);
                let spawned = thread::Builder::new()
                    .name(format!("coordinator-{node}"))
                    .spawn(move || {
                        log::debug!("node {node} connected to the coordinator");
                        let peer = peer(&stream, node, &coordination);
                        let answer = |request: &NodeRequest| {
                            // Only a process that asks is taken for the node's.
                            if let Some(process) = peer {
                                coordination.note_process(node, process);
                            }
                            coordination.answer(node, request)
                        };
                        match converse(&stream, answer) {
                            Ok(()) => log::debug!("node {node} left the coordinator"),
                            Err(error) => {
                                log::info!("node {node}'s coordinator connection ended: {error}");
                            }
                        }
                    });
                if let Err(error) = spawned {
                    log::warn!("cannot serve node {node}'s coordinator connection: {error}");
                }
            }
            Err(error) => {
                log::warn!("cannot accept node {node}'s coordinator connection: {error}");
                thread::sleep(ACCEPT_RETRY);
            }
        }
    }
}

/// The process at the other end of node `node`'s connection, where a claim kills its
/// victim's process (else not asked).
fn peer(stream: &UnixStream, node: u32, coordination: &Coordination) -> Option<PeerProcess> {
    let stonith = coordination.stonith()?;
    match stonith.peer(stream) {
        Ok(process) => Some(process),
        Err(error) => {
            log::warn!(
                "node {node}'s coordinator connection: {}; a claim of node {node} cannot kill \
                 this process",
                wire::error_chain::one_line(&error)
            );
            None
        }
    }
}

/// Answers `stream`'s request lines with `answer` until the peer closes it.
pub fn converse(
    stream: &UnixStream,
    answer: impl Fn(&NodeRequest) -> NodeAnswer,
) -> std::io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    let mut writer = stream;
    loop {
        let mut line = Vec::new();
        let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
        if reader.by_ref().take(limit).read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let reply = if line.len() > MAX_LINE && !line.ends_with(b"\n") {
            skip_line(&mut reader)?;
            NodeAnswer::Error {
                message: format!("request line longer than {MAX_LINE} bytes"),
            }
        } else {
            match serde_json::from_slice::<NodeRequest>(&line) {
                Ok(request) => answer(&request),
                Err(error) => NodeAnswer::Error {
                    message: format!("malformed request: {error}"),
                },
            }
        };
        let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        out.push(b'\n');
        writer.write_all(&out)?;
    }
}

/// Reads up to and including the next newline (or the end), keeping nothing.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(());
        }
        match buffer.iter().position(|&b| b == b'\n') {
            Some(end) => {
                reader.consume(end + 1);
                return Ok(());
            }
            None => {
                let all = buffer.len();
                reader.consume(all);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use wire::coordinator::CoordinatorState;

    use super::*;

    fn state_answer(_: &NodeRequest) -> NodeAnswer {
        NodeAnswer::State {
            state: CoordinatorState::default(),
        }
    }

    fn answers(input: &[u8]) -> Vec<NodeAnswer> {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || converse(&ours, state_answer));
        let writer = {
            let mut theirs = theirs.try_clone().unwrap();
            let input = input.to_vec();
            thread::spawn(move || {
                theirs.write_all(&input).unwrap();
                theirs.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let lines: Vec<NodeAnswer> = BufReader::new(&theirs)
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
            .collect();
        writer.join().unwrap();
        server.join().unwrap().unwrap();
        lines
    }

    fn is_error(answer: &NodeAnswer, starting: &str) -> bool {
        matches!(answer, NodeAnswer::Error { message } if message.starts_with(starting))
    }

    #[test]
    fn every_line_gets_one_answer_and_garbage_does_not_end_the_connection() {
        let mut input = Vec::new();
        input.extend_from_slice(b"{\"request\":\"state\"}\n");
        input.extend_from_slice(b"\xff\xfe not json at all\n");
        input.extend_from_slice(b"\n");
        input.extend_from_slice(b"{\"request\":\"claim\",\"victim\":1}\n");
        input.extend_from_slice(b"{\"request\":\"state\"}");
        let answers = answers(&input);
        assert_eq!(answers.len(), 5, "{answers:?}");
        assert!(matches!(answers[0], NodeAnswer::State { .. }));
        for answer in &answers[1..4] {
            assert!(is_error(answer, "malformed request"), "{answer:?}");
        }
        assert!(
            matches!(answers[4], NodeAnswer::State { .. }),
            "a last line without newline"
        );
    }

    #[test]
    fn an_over_long_line_is_refused_whole_and_the_next_is_answered() {
        let mut input = vec![b'x'; 3 * MAX_LINE];
        input.push(b'\n');
        input.extend_from_slice(b"{\"request\":\"state\"}\n");
        // A line exactly at the limit, newline included, is read (and is no request).
        input.extend(std::iter::repeat_n(b' ', MAX_LINE - 1));
        input.push(b'\n');
        let answers = answers(&input);
        assert_eq!(answers.len(), 3, "{answers:?}");
        assert!(
            is_error(&answers[0], "request line longer than"),
            "{:?}",
            answers[0]
        );
        assert!(matches!(answers[1], NodeAnswer::State { .. }));
        assert!(
            is_error(&answers[2], "malformed request"),
            "{:?}",
            answers[2]
        );
    }
}
