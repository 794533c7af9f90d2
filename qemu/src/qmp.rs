//! A QMP client: commands with matched responses, and asynchronous events.
//!
//! A reader thread owns the receiving half of the connection. It parses every line QEMU
//! sends and routes it: events go to an unbounded event channel (so none is lost while a
//! command waits for its response, and none blocks the reader), responses go to the
//! command waiting in [`QmpClient::execute`]. Commands carry an `id`; a late response to a
//! command that already timed out is recognised by its id and dropped.
//!
//! Anything that is not valid QMP (not JSON, not an object, neither greeting, return,
//! error nor event) ends the connection with [`QmpError::Malformed`]: after that the
//! stream cannot be trusted, and every later call reports that the connection is closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::{Map, Value};

/// Longest QMP line accepted (`query-qmp-schema` is a few hundred KiB).
const MAX_LINE: u64 = 64 << 20;

/// Why a QMP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket exists but refused the connection for a reason other than not being ready.
    #[error("cannot connect to the QMP socket {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The socket did not appear or accept a connection in time.
    #[error("the QMP socket {} accepted no connection within {timeout:?}", path.display())]
    ConnectTimeout {
        /// The socket path.
        path: PathBuf,
        /// How long we tried.
        timeout: Duration,
        /// What the last try said (the socket is missing, or refuses).
        source: std::io::Error,
    },
    /// Reading from or writing to the connection failed.
    #[error("QMP I/O failed while {context}")]
    Io {
        /// What the client was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The first message was not a QMP greeting.
    #[error("QEMU sent no valid QMP greeting: {0}")]
    Greeting(String),
    /// No greeting arrived in time.
    #[error("no QMP greeting arrived within {0:?} (is another client holding the monitor?)")]
    GreetingTimeout(Duration),
    /// QEMU sent something that is not QMP.
    #[error("QEMU sent a malformed QMP message: {0}")]
    Malformed(String),
    /// The connection ended.
    #[error("the QMP connection closed {0}")]
    Closed(String),
    /// A command got no response in time.
    #[error("QEMU did not answer `{command}` within {timeout:?}")]
    Timeout {
        /// The command sent.
        command: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// QEMU answered a command with an error.
    #[error("the QMP command failed: {class}: {desc}")]
    Command {
        /// QMP error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// A command succeeded but returned something the client did not expect.
    #[error("`{command}` returned an unexpected value: {value}")]
    UnexpectedReturn {
        /// The command sent.
        command: String,
        /// What came back.
        value: Value,
    },
    /// A command could not be encoded as JSON.
    #[error("cannot encode a QMP command: {0}")]
    Encode(#[from] serde_json::Error),
}

/// An asynchronous QMP event, e.g. `STOP`, `SHUTDOWN`, `GUEST_PANICKED`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name.
    pub name: String,
    /// The event's `data` member; `Value::Null` when QEMU sent none.
    pub data: Value,
    /// QEMU's timestamp as (seconds, microseconds) since the Unix epoch.
    pub timestamp: (u64, u64),
}

/// One parsed message from QEMU.
#[derive(Debug, Clone, PartialEq)]
enum Message {
    Greeting(Value),
    Response {
        id: Option<Value>,
        outcome: Result<Value, (String, String)>,
    },
    Event(QmpEvent),
}

/// What the reader thread hands to the waiting command.
#[derive(Debug)]
enum Incoming {
    Greeting(Value),
    Response {
        id: Option<Value>,
        outcome: Result<Value, (String, String)>,
    },
    /// The last message: the reader has stopped.
    Failed(ReaderFailure),
}

#[derive(Debug)]
enum ReaderFailure {
    Eof,
    Io(std::io::Error),
    Malformed(String),
    BadGreeting(String),
}

/// A connected, capability-negotiated QMP session.
pub struct QmpClient {
    writer: Box<dyn Write + Send>,
    incoming: Receiver<Incoming>,
    events: Receiver<QmpEvent>,
    /// A handle to shut the socket down on drop, which ends the reader thread.
    shutdown: Option<UnixStream>,
    greeting: Value,
    next_id: u64,
    timeout: Duration,
    /// Set once the reader stopped: why the connection is unusable.
    dead: Option<String>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("greeting", &self.greeting)
            .field("next_id", &self.next_id)
            .field("timeout", &self.timeout)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

impl QmpClient {
    /// Connects to QEMU's QMP Unix socket, retrying until it appears, and negotiates
    /// capabilities. `timeout` bounds the whole connect and handshake, and becomes the
    /// default timeout of [`Self::execute`].
    pub fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = connect_retry(path, deadline, timeout)?;
        let io_err = |source| QmpError::Io {
            context: "setting up the socket".to_owned(),
            source,
        };
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let reader = stream.try_clone().map_err(io_err)?;
        let shutdown = stream.try_clone().map_err(io_err)?;
        Self::handshake(
            Box::new(BufReader::new(reader)),
            Box::new(stream),
            Some(shutdown),
            deadline,
            timeout,
        )
    }

    /// Runs QMP over an already-open byte stream pair, e.g. the stdio of a QEMU started
    /// with `-qmp stdio`. The reader thread ends when `reader` reaches EOF.
    pub fn from_streams<R, W>(
        reader: R,
        writer: W,
        timeout: Duration,
    ) -> Result<QmpClient, QmpError>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let deadline = Instant::now() + timeout;
        Self::handshake(
            Box::new(BufReader::new(reader)),
            Box::new(writer),
            None,
            deadline,
            timeout,
        )
    }

    fn handshake(
        reader: Box<dyn BufRead + Send>,
        writer: Box<dyn Write + Send>,
        shutdown: Option<UnixStream>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<QmpClient, QmpError> {
        let (incoming_tx, incoming) = crossbeam_channel::unbounded();
        let (events_tx, events) = crossbeam_channel::unbounded();
        thread::Builder::new()
            .name("qmp-reader".to_owned())
            .spawn(move || reader_loop(reader, &incoming_tx, &events_tx))
            .map_err(|source| QmpError::Io {
                context: "starting the reader thread".to_owned(),
                source,
            })?;
        let mut client = QmpClient {
            writer,
            incoming,
            events,
            shutdown,
            greeting: Value::Null,
            next_id: 0,
            timeout,
            dead: None,
        };
        client.greeting = match client.incoming.recv_deadline(deadline) {
            Ok(Incoming::Greeting(g)) => g,
            Ok(Incoming::Failed(ReaderFailure::Eof)) => {
                return Err(QmpError::Greeting(
                    "the connection closed before the greeting".to_owned(),
                ));
            }
            Ok(Incoming::Failed(f)) => return Err(failure_error(f, "the greeting")),
            Ok(Incoming::Response { .. }) => {
                return Err(QmpError::Greeting(
                    "a response arrived before the greeting".to_owned(),
                ));
            }
            Err(RecvTimeoutError::Timeout) => return Err(QmpError::GreetingTimeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(QmpError::Closed("before the greeting".to_owned()));
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let ret = client.execute_with_timeout("qmp_capabilities", None, remaining)?;
        if ret != Value::Object(Map::new()) {
            return Err(QmpError::UnexpectedReturn {
                command: "qmp_capabilities".to_owned(),
                value: ret,
            });
        }
        log::debug!("QMP session ready: {}", client.greeting);
        Ok(client)
    }

    /// The greeting's `QMP` member (QEMU version and capabilities).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The default timeout of [`Self::execute`].
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the default timeout of [`Self::execute`].
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// A receiver of every event QEMU sends, in order. Receivers are clones of one queue:
    /// each event goes to exactly one receiver. The channel disconnects when the connection
    /// ends; events nobody receives accumulate until the client is dropped.
    pub fn events(&self) -> Receiver<QmpEvent> {
        self.events.clone()
    }

    /// Runs `command` with optional `arguments` and returns its `return` member.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, self.timeout)
    }

    /// Like [`Self::execute`] with an explicit timeout for this command.
    pub fn execute_with_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if let Some(reason) = &self.dead {
            return Err(QmpError::Closed(format!(
                "earlier ({reason}); cannot run `{command}`"
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".to_owned(), Value::from(command));
        if let Some(arguments) = arguments {
            msg.insert("arguments".to_owned(), arguments);
        }
        msg.insert("id".to_owned(), Value::from(id));
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        log::trace!("QMP -> {}", String::from_utf8_lossy(&line).trim_end());
        if let Err(source) = self
            .writer
            .write_all(&line)
            .and_then(|()| self.writer.flush())
        {
            return Err(QmpError::Io {
                context: format!("sending `{command}`"),
                source,
            });
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.incoming.recv_deadline(deadline) {
                Ok(Incoming::Response { id: rid, outcome }) => {
                    if rid.as_ref().is_some_and(|r| r.as_u64() != Some(id)) {
                        log::warn!(
                            "dropping a late QMP response (id {rid:?}) while waiting for `{command}`"
                        );
                        continue;
                    }
                    return outcome.map_err(|(class, desc)| QmpError::Command { class, desc });
                }
                Ok(Incoming::Greeting(_)) => {
                    let e = QmpError::Malformed("a second greeting arrived".to_owned());
                    self.dead = Some(wire::error_chain::one_line(&e));
                    return Err(e);
                }
                Ok(Incoming::Failed(f)) => {
                    let e = failure_error(f, &format!("the response to `{command}`"));
                    self.dead = Some(wire::error_chain::one_line(&e));
                    return Err(e);
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(QmpError::Timeout {
                        command: command.to_owned(),
                        timeout,
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let e = QmpError::Closed(format!("while waiting for `{command}`"));
                    self.dead = Some(wire::error_chain::one_line(&e));
                    return Err(e);
                }
            }
        }
    }

    /// Runs a human monitor (HMP) command such as `info pci` or
    /// `hostfwd_add n0 tcp:127.0.0.1:10809-:10809` and returns its text output.
    pub fn human_monitor_command(&mut self, cmd: &str) -> Result<String, QmpError> {
        let mut args = Map::new();
        args.insert("command-line".to_owned(), Value::from(cmd));
        match self.execute("human-monitor-command", Some(Value::Object(args)))? {
            Value::String(s) => Ok(s),
            value => Err(QmpError::UnexpectedReturn {
                command: "human-monitor-command".to_owned(),
                value,
            }),
        }
    }

    /// Asks QEMU to exit. The connection closing right after the command was sent counts
    /// as success, since that is what a quitting QEMU does.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        if let Some(sock) = &self.shutdown {
            // Ends the reader thread's blocking read; an error means it is closed already.
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn connect_retry(
    path: &Path,
    deadline: Instant,
    timeout: Duration,
) -> Result<UnixStream, QmpError> {
    let mut pause = Duration::from_millis(5);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                let now = Instant::now();
                if now >= deadline {
                    return Err(QmpError::ConnectTimeout {
                        path: path.to_owned(),
                        timeout,
                        source: e,
                    });
                }
                thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(QmpError::Connect {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}

fn failure_error(f: ReaderFailure, waiting_for: &str) -> QmpError {
    match f {
        ReaderFailure::Eof => QmpError::Closed(format!("while waiting for {waiting_for}")),
        ReaderFailure::Io(source) => QmpError::Io {
            context: format!("waiting for {waiting_for}"),
            source,
        },
        ReaderFailure::Malformed(m) => QmpError::Malformed(m),
        ReaderFailure::BadGreeting(m) => QmpError::Greeting(m),
    }
}

fn reader_loop(
    mut reader: Box<dyn BufRead + Send>,
    incoming: &Sender<Incoming>,
    events: &Sender<QmpEvent>,
) {
    let mut first = true;
    let failure = loop {
        let line = match read_line(&mut reader) {
            Ok(Some(line)) => line,
            Ok(None) => break ReaderFailure::Eof,
            Err(ReadError::Io(e)) => break ReaderFailure::Io(e),
            Err(ReadError::Malformed(m)) => break ReaderFailure::Malformed(m),
        };
        if line.trim().is_empty() {
            continue;
        }
        log::trace!("QMP <- {}", line.trim_end());
        let msg = match parse_message(&line, first) {
            Ok(msg) => msg,
            Err(m) if first => break ReaderFailure::BadGreeting(m),
            Err(m) => break ReaderFailure::Malformed(m),
        };
        first = false;
        let sent = match msg {
            Message::Event(ev) => {
                // Nobody listening for events is fine; keep routing responses.
                let _ = events.send(ev);
                Ok(())
            }
            Message::Greeting(g) => incoming.send(Incoming::Greeting(g)),
            Message::Response { id, outcome } => incoming.send(Incoming::Response { id, outcome }),
        };
        if sent.is_err() {
            return; // The client is gone.
        }
    };
    log::debug!("QMP reader stopped: {failure:?}");
    let _ = incoming.send(Incoming::Failed(failure));
}

enum ReadError {
    Io(std::io::Error),
    Malformed(String),
}

/// Runs the reader over `input` as if QEMU had sent it, to its end, without a thread: what
/// the greeting, responses and events parse to and why the reader stopped. For the fuzz
/// targets (`fuzz/`); not part of the API.
#[doc(hidden)]
pub fn read_all_for_fuzzing(input: &[u8]) -> (Vec<QmpEvent>, usize, String) {
    let (incoming_tx, incoming) = crossbeam_channel::unbounded();
    let (events_tx, events) = crossbeam_channel::unbounded();
    reader_loop(
        Box::new(std::io::Cursor::new(input.to_vec())),
        &incoming_tx,
        &events_tx,
    );
    let mut messages = 0;
    let mut ended = String::new();
    for message in incoming.try_iter() {
        match message {
            Incoming::Failed(failure) => ended = format!("{failure:?}"),
            Incoming::Greeting(_) | Incoming::Response { .. } => messages += 1,
        }
    }
    (events.try_iter().collect(), messages, ended)
}

/// Reads one line, bounded by [`MAX_LINE`]; `None` at a clean EOF.
fn read_line(reader: &mut dyn BufRead) -> Result<Option<String>, ReadError> {
    let mut buf = Vec::new();
    let n = reader
        .take(MAX_LINE)
        .read_until(b'\n', &mut buf)
        .map_err(ReadError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if n as u64 >= MAX_LINE {
            return Err(ReadError::Malformed(format!(
                "a line longer than {MAX_LINE} bytes"
            )));
        }
        return Err(ReadError::Malformed(format!(
            "the connection closed in the middle of a message: {}",
            excerpt(&String::from_utf8_lossy(&buf))
        )));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| ReadError::Malformed("a line that is not UTF-8".to_owned()))
}

fn excerpt(s: &str) -> String {
    const MAX: usize = 200;
    let s = s.trim_end();
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// Classifies one line from QEMU. The first message of a session must be the greeting.
fn parse_message(line: &str, expect_greeting: bool) -> Result<Message, String> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {}", excerpt(line)))?;
    let Value::Object(mut obj) = value else {
        return Err(format!("not a JSON object: {}", excerpt(line)));
    };
    if expect_greeting {
        return match obj.remove("QMP") {
            Some(g @ Value::Object(_)) => Ok(Message::Greeting(g)),
            Some(_) => Err(format!(
                "its QMP member is not an object: {}",
                excerpt(line)
            )),
            None => Err(format!(
                "the first message has no QMP member: {}",
                excerpt(line)
            )),
        };
    }
    if obj.contains_key("QMP") {
        return Err(format!("a second greeting: {}", excerpt(line)));
    }
    let id = obj.remove("id");
    if let Some(ret) = obj.remove("return") {
        return Ok(Message::Response {
            id,
            outcome: Ok(ret),
        });
    }
    if let Some(err) = obj.remove("error") {
        let class = err.get("class").and_then(Value::as_str);
        let desc = err.get("desc").and_then(Value::as_str);
        return match (class, desc) {
            (Some(class), Some(desc)) => Ok(Message::Response {
                id,
                outcome: Err((class.to_owned(), desc.to_owned())),
            }),
            _ => Err(format!(
                "an error without class and desc: {}",
                excerpt(line)
            )),
        };
    }
    if let Some(name) = obj.remove("event") {
        let Value::String(name) = name else {
            return Err(format!(
                "an event name that is not a string: {}",
                excerpt(line)
            ));
        };
        let ts = obj.get("timestamp");
        let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_u64);
        let usecs = ts
            .and_then(|t| t.get("microseconds"))
            .and_then(Value::as_u64);
        let (Some(secs), Some(usecs)) = (secs, usecs) else {
            return Err(format!(
                "an event without a valid timestamp: {}",
                excerpt(line)
            ));
        };
        return Ok(Message::Event(QmpEvent {
            name,
            data: obj.remove("data").unwrap_or(Value::Null),
            timestamp: (secs, usecs),
        }));
    }
    Err(format!(
        "neither a greeting, a return, an error nor an event: {}",
        excerpt(line)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    const T: Duration = Duration::from_secs(5);
    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#;

    /// The server side of a fake QMP connection.
    struct Peer {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    }

    impl Peer {
        fn send(&mut self, line: &str) {
            self.writer.write_all(line.as_bytes()).unwrap();
            self.writer.write_all(b"\n").unwrap();
        }

        /// Reads one command and returns (execute, id, arguments).
        fn recv(&mut self) -> (String, Value, Value) {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            (
                v["execute"].as_str().unwrap().to_owned(),
                v["id"].clone(),
                v.get("arguments").cloned().unwrap_or(Value::Null),
            )
        }

        /// Greets and answers qmp_capabilities.
        fn handshake(&mut self) {
            self.send(GREETING);
            let (cmd, id, _) = self.recv();
            assert_eq!(cmd, "qmp_capabilities");
            self.send(&json!({"return": {}, "id": id}).to_string());
        }
    }

    /// Starts a fake QMP server running `script` on the first connection.
    fn fake(
        script: impl FnOnce(Peer) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let peer = Peer {
                reader: BufReader::new(stream.try_clone().unwrap()),
                writer: stream,
            };
            script(peer);
        });
        (dir, path, handle)
    }

    #[test]
    fn handshake_execute_and_event_between_command_and_response() {
        let (_dir, path, server) = fake(|mut p| {
            p.handshake();
            let (cmd, id, args) = p.recv();
            assert_eq!(cmd, "query-status");
            assert_eq!(args, Value::Null);
            p.send(r#"{"timestamp": {"seconds": 10, "microseconds": 20}, "event": "STOP"}"#);
            p.send(r#"{"timestamp": {"seconds": 11, "microseconds": 21}, "event": "RESUME", "data": {"x": 1}}"#);
            p.send(
                &json!({"return": {"status": "paused", "running": false}, "id": id}).to_string(),
            );
            let (cmd, id, args) = p.recv();
            assert_eq!(cmd, "human-monitor-command");
            assert_eq!(args, json!({"command-line": "info pci"}));
            p.send(&json!({"return": "Bus 0\r\n", "id": id}).to_string());
        });
        let mut c = QmpClient::connect(&path, T).unwrap();
        assert_eq!(c.greeting()["version"]["qemu"]["major"], 7);
        let events = c.events();
        let status = c.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "paused");
        let stop = events.try_recv().unwrap();
        assert_eq!(
            stop,
            QmpEvent {
                name: "STOP".to_owned(),
                data: Value::Null,
                timestamp: (10, 20)
            }
        );
        let resume = events.try_recv().unwrap();
        assert_eq!(resume.name, "RESUME");
        assert_eq!(resume.data, json!({"x": 1}));
        assert_eq!(resume.timestamp, (11, 21));
        assert_eq!(c.human_monitor_command("info pci").unwrap(), "Bus 0\r\n");
        server.join().unwrap();
        // The server hung up: the event channel disconnects once the reader sees EOF.
        assert!(events.recv_timeout(T).is_err());
    }

    #[test]
    fn command_error_is_reported_and_session_continues() {
        let (_dir, path, server) = fake(|mut p| {
            p.handshake();
            let (_, id, _) = p.recv();
            p.send(&json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": id}).to_string());
            let (_, id, _) = p.recv();
            p.send(&json!({"return": {}, "id": id}).to_string());
        });
        let mut c = QmpClient::connect(&path, T).unwrap();
        let err = c.execute("nope", None).unwrap_err();
        match &err {
            QmpError::Command { class, desc } => {
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("nope"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("CommandNotFound"), "{err}");
        assert_eq!(c.execute("stop", None).unwrap(), json!({}));
        server.join().unwrap();
    }

    fn expect_malformed(bad: &'static str, needle: &str) {
        let (_dir, path, server) = fake(move |mut p| {
            p.handshake();
            let _ = p.recv();
            p.send(bad);
            // Keep the socket open until the client hangs up: the error must come from
            // the bad line, not from EOF.
            let mut rest = String::new();
            let _ = p.reader.read_line(&mut rest);
        });
        let mut c = QmpClient::connect(&path, T).unwrap();
        let err = c.execute("query-status", None).unwrap_err();
        assert!(matches!(err, QmpError::Malformed(_)), "{bad}: {err:?}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        // The session is dead from now on, with a message saying why.
        let again = c.execute("query-status", None).unwrap_err();
        assert!(matches!(again, QmpError::Closed(_)), "{again:?}");
        assert!(again.to_string().contains("malformed"), "{again}");
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn non_json_line_is_malformed() {
        expect_malformed("this is not json", "not JSON");
    }

    #[test]
    fn json_of_no_known_kind_is_malformed() {
        expect_malformed(r#"{"hello": 1}"#, "neither a greeting");
    }

    #[test]
    fn non_object_json_is_malformed() {
        expect_malformed("[1, 2]", "not a JSON object");
    }

    #[test]
    fn error_without_class_is_malformed() {
        expect_malformed(r#"{"error": {"desc": "x"}, "id": 1}"#, "without class");
    }

    #[test]
    fn second_greeting_is_malformed() {
        expect_malformed(GREETING, "second greeting");
    }

    #[test]
    fn greeting_without_qmp_member() {
        let (_dir, path, server) = fake(|mut p| {
            p.send(r#"{"return": {}}"#);
        });
        let err = QmpClient::connect(&path, T).unwrap_err();
        assert!(matches!(err, QmpError::Greeting(_)), "{err:?}");
        assert!(err.to_string().contains("no QMP member"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn eof_before_greeting() {
        let (_dir, path, server) = fake(|_p| {});
        let err = QmpClient::connect(&path, T).unwrap_err();
        assert!(matches!(err, QmpError::Greeting(_)), "{err:?}");
        server.join().unwrap();
    }

    #[test]
    fn no_greeting_times_out() {
        let (_dir, path, server) = fake(|mut p| {
            // Hold the connection without greeting until the client gives up.
            let mut line = String::new();
            let _ = p.reader.read_line(&mut line);
        });
        let err = QmpClient::connect(&path, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, QmpError::GreetingTimeout(_)), "{err:?}");
        server.join().unwrap();
    }

    #[test]
    fn eof_mid_command() {
        let (_dir, path, server) = fake(|mut p| {
            p.handshake();
            let _ = p.recv();
        });
        let mut c = QmpClient::connect(&path, T).unwrap();
        let err = c.execute("query-status", None).unwrap_err();
        assert!(matches!(err, QmpError::Closed(_)), "{err:?}");
        assert!(err.to_string().contains("query-status"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn partial_line_then_eof() {
        let (_dir, path, server) = fake(|mut p| {
            p.handshake();
            let _ = p.recv();
            p.writer.write_all(br#"{"return": {"#).unwrap();
        });
        let mut c = QmpClient::connect(&path, T).unwrap();
        let err = c.execute("query-status", None).unwrap_err();
        assert!(matches!(err, QmpError::Malformed(_)), "{err:?}");
        assert!(err.to_string().contains("middle of a message"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn timeout_then_late_response_is_dropped() {
        let (_dir, path, server) = fake(|mut p| {
            p.handshake();
            let (_, slow_id, _) = p.recv();
            let (_, id, _) = p.recv();
            // Answer the timed-out command first: the client must skip it.
            p.send(&json!({"return": "late", "id": slow_id}).to_string());
            p.send(&json!({"return": "second", "id": id}).to_string());
        });
        let mut c = QmpClient::connect(&path, T).unwrap();
        let err = c
            .execute_with_timeout("slow", None, Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("`slow`"), "{err}");
        assert_eq!(c.execute("second", None).unwrap(), "second");
        server.join().unwrap();
    }

    #[test]
    fn response_without_id_goes_to_the_waiting_command() {
        let (_dir, path, server) = fake(|mut p| {
            p.handshake();
            let _ = p.recv();
            p.send(r#"{"return": 42}"#);
        });
        let mut c = QmpClient::connect(&path, T).unwrap();
        assert_eq!(c.execute("x", None).unwrap(), 42);
        server.join().unwrap();
    }

    #[test]
    fn hmp_non_string_return() {
        let (_dir, path, server) = fake(|mut p| {
            p.handshake();
            let (_, id, _) = p.recv();
            p.send(&json!({"return": {}, "id": id}).to_string());
        });
        let mut c = QmpClient::connect(&path, T).unwrap();
        let err = c.human_monitor_command("info pci").unwrap_err();
        assert!(matches!(err, QmpError::UnexpectedReturn { .. }), "{err:?}");
        server.join().unwrap();
    }

    #[test]
    fn quit_accepts_return_or_hangup() {
        let (_dir, path, server) = fake(|mut p| {
            p.handshake();
            let (cmd, _, _) = p.recv();
            assert_eq!(cmd, "quit");
        });
        let mut c = QmpClient::connect(&path, T).unwrap();
        c.quit().unwrap();
        server.join().unwrap();
    }

    #[test]
    fn connect_waits_for_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.sock");
        let p2 = path.clone();
        let server = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            let listener = UnixListener::bind(&p2).unwrap();
            let (stream, _) = listener.accept().unwrap();
            let mut p = Peer {
                reader: BufReader::new(stream.try_clone().unwrap()),
                writer: stream,
            };
            p.handshake();
        });
        let started = Instant::now();
        QmpClient::connect(&path, T).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        server.join().unwrap();
    }

    #[test]
    fn connect_times_out_without_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("never.sock");
        let err = QmpClient::connect(&path, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, QmpError::ConnectTimeout { .. }), "{err:?}");
        assert!(err.to_string().contains("never.sock"), "{err}");
    }

    #[test]
    fn drop_ends_the_reader() {
        let (_dir, path, server) = fake(|mut p| {
            p.handshake();
            // Block until the client hangs up.
            let mut line = String::new();
            assert_eq!(p.reader.read_line(&mut line).unwrap(), 0);
        });
        let c = QmpClient::connect(&path, T).unwrap();
        let events = c.events();
        drop(c);
        assert!(events.recv_timeout(T).is_err());
        server.join().unwrap();
    }

    #[test]
    fn works_over_plain_streams() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut p = Peer {
                reader: BufReader::new(b.try_clone().unwrap()),
                writer: b,
            };
            p.handshake();
        });
        let c = QmpClient::from_streams(a.try_clone().unwrap(), a, T).unwrap();
        assert!(c.greeting().get("capabilities").is_some());
        server.join().unwrap();
    }

    #[test]
    fn parse_message_kinds() {
        assert!(matches!(
            parse_message(GREETING, true),
            Ok(Message::Greeting(_))
        ));
        assert!(parse_message(r#"{"QMP": 1}"#, true).is_err());
        assert_eq!(
            parse_message(r#"{"return": [], "id": 3}"#, false),
            Ok(Message::Response {
                id: Some(json!(3)),
                outcome: Ok(json!([]))
            })
        );
        assert_eq!(
            parse_message(r#"{"error": {"class": "C", "desc": "d"}}"#, false),
            Ok(Message::Response {
                id: None,
                outcome: Err(("C".to_owned(), "d".to_owned()))
            })
        );
        for bad in [
            r#"{"event": 5, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
            r#"{"event": "X"}"#,
            r#"{"event": "X", "timestamp": {"seconds": -1, "microseconds": 2}}"#,
            "",
            "null",
            "{",
        ] {
            assert!(parse_message(bad, false).is_err(), "{bad}");
        }
        let long = "x".repeat(1000);
        let err = parse_message(&long, false).unwrap_err();
        assert!(err.len() < 400, "error text is bounded: {}", err.len());
    }
}
