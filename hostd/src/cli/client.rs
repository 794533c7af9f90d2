//! Talking to a running daemon.

use std::time::Duration;

use crate::state_dir::StateDir;
use wire::control::call as socket_call;
use wire::control::{Request, Response};

/// Errors reaching the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no hostd is running for state directory {state_dir} (start one with `hostd up`)")]
    NotRunning { state_dir: String },
    #[error("cannot talk to hostd at {socket}")]
    Io {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hostd says: {0}")]
    Refused(String),
}

/// Sends a request; maps "nobody listening" to a clear error.
pub fn call(
    state: &StateDir,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let socket = state.control_socket();
    match socket_call(&socket, request, timeout) {
        Ok(Response::Error { message }) => Err(ClientError::Refused(message)),
        Ok(response) => Ok(response),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(ClientError::NotRunning {
                state_dir: state.root().display().to_string(),
            })
        }
        Err(source) => Err(ClientError::Io {
            socket: socket.display().to_string(),
            source,
        }),
    }
}
