//! The HTTP endpoint: `GET /metrics` on a thread of its own.
//!
//! Prometheus text (0.0.4) by default, OpenMetrics text when the scraper asks for it (as
//! Prometheus does): the same metrics, both encoded by prometheus-client. Each scrape is
//! encoded into memory first, so the daemon's metrics are read for microseconds and never
//! wait on a client's socket.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::registry::Registry;
use tiny_http::{Header, Method, Request, Response};

use super::Metrics;
use crate::config::MetricsSettings;

/// The content type of OpenMetrics text, which prometheus-client encodes.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The path the metrics are served at.
const METRICS_PATH: &str = "/metrics";
/// How long the thread pauses after a failed accept (descriptors exhausted, say), so as
/// not to spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long a stopping server waits for its address to be free.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors starting the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve HTTP on {address}")]
    Http {
        address: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

/// The running endpoint; dropping it stops its thread and frees the address.
pub struct MetricsServer {
    server: Option<Arc<tiny_http::Server>>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    address: SocketAddr,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// The address it listens on (the configured one; its port if that was 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(server) = &self.server {
            server.unblock();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The last reference: tiny_http's accept thread closes the listener after this
        // returns. Wait for that, so that the next hostd of this state directory finds
        // the address free.
        drop(self.server.take());
        let mut probe = self.address;
        if probe.ip().is_unspecified() {
            probe.set_ip(match probe {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while Instant::now() < deadline && TcpStream::connect_timeout(&probe, CLOSE_TIMEOUT).is_ok()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Serves `metrics` as `settings` say. A failure is logged and said in `hostd status`,
/// not fatal: the pair matters more than its metrics.
pub fn start(settings: &MetricsSettings, metrics: &mut Metrics) -> Option<MetricsServer> {
    if !settings.enabled {
        metrics.set_endpoint("off (metrics.enabled = false)".into());
        return None;
    }
    match serve(settings.listen, metrics.registry()) {
        Ok(server) => {
            let address = server.address();
            log::info!("serving metrics at http://{address}{METRICS_PATH}");
            if !address.ip().is_loopback() {
                log::warn!(
                    "metrics are served beyond this host ({address}): whoever reaches it can read them"
                );
            }
            metrics.set_endpoint(format!("http://{address}{METRICS_PATH}"));
            Some(server)
        }
        Err(error) => {
            let chain = wire::error_chain::one_line(&error);
            log::error!("metrics are not served: {chain}; the pair runs without them");
            metrics.set_endpoint(format!("not served: {chain}"));
            None
        }
    }
}

/// Serves `registry` at `address` until the returned server is dropped.
pub fn serve(address: SocketAddr, registry: Registry) -> Result<MetricsServer, ServeError> {
    let listener =
        TcpListener::bind(address).map_err(|source| ServeError::Listen { address, source })?;
    let address = listener.local_addr().unwrap_or(address);
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|source| ServeError::Http { address, source })?;
    let server = Arc::new(server);
    let stopping = Arc::new(AtomicBool::new(false));
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn({
            let server = Arc::clone(&server);
            let stopping = Arc::clone(&stopping);
            move || {
                loop {
                    match server.recv() {
                        Ok(request) => answer(request, &registry),
                        Err(_) if stopping.load(Ordering::Acquire) => return,
                        Err(error) => {
                            log::warn!("metrics endpoint: {error}");
                            std::thread::sleep(ACCEPT_RETRY);
                        }
                    }
                }
            }
        })
        .map_err(ServeError::Thread)?;
    Ok(MetricsServer {
        server: Some(server),
        stopping,
        thread: Some(thread),
        address,
    })
}

fn answer(request: Request, registry: &Registry) {
    let openmetrics = request.headers().iter().any(|header| {
        header.field.equiv("Accept")
            && header
                .value
                .as_str()
                .contains("application/openmetrics-text")
    });
    let reply = reply(request.method(), request.url(), openmetrics, registry);
    let mut response = Response::from_string(reply.body).with_status_code(reply.status);
    let headers = [
        Some(("Content-Type", reply.content_type)),
        reply.allow.then_some(("Allow", "GET, HEAD")),
    ];
    for (field, value) in headers.into_iter().flatten() {
        // Constant ASCII: cannot fail.
        if let Ok(header) = Header::from_bytes(field, value) {
            response.add_header(header);
        }
    }
    if let Err(error) = request.respond(response) {
        log::debug!("metrics endpoint: cannot answer a client: {error}");
    }
}

/// What a request gets.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    /// Whether to say which methods the path allows (405).
    allow: bool,
}

impl Reply {
    fn plain(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
            allow: false,
        }
    }
}

/// The reply to `method` on `url`: the metrics at `/metrics`, in OpenMetrics text if
/// `openmetrics`, else in Prometheus text.
fn reply(method: &Method, url: &str, openmetrics: bool, registry: &Registry) -> Reply {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    if path != METRICS_PATH {
        return Reply::plain(404, format!("not found: metrics are at {METRICS_PATH}\n"));
    }
    if !matches!(method, Method::Get | Method::Head) {
        return Reply {
            allow: true,
            ..Reply::plain(405, format!("{method} is not allowed: use GET\n"))
        };
    }
    let mut body = String::new();
    let (encoded, content_type) = if openmetrics {
        (text::encode(&mut body, registry), OPENMETRICS_CONTENT_TYPE)
    } else {
        (
            prometheus_text::encode(&mut body, registry),
            prometheus_text::CONTENT_TYPE,
        )
    };
    match encoded {
        Ok(()) => Reply {
            status: 200,
            content_type,
            body,
            allow: false,
        },
        Err(std::fmt::Error) => Reply::plain(500, "cannot encode the metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Metrics::default().registry()
    }

    #[test]
    fn metrics_are_served_at_their_path_only_and_to_get_only() {
        let registry = registry();
        let ok = reply(&Method::Get, "/metrics", false, &registry);
        assert_eq!(ok.status, 200);
        assert_eq!(ok.content_type, prometheus_text::CONTENT_TYPE);
        assert!(ok.body.contains("# TYPE ivha_epoch gauge"), "{}", ok.body);
        assert_eq!(
            reply(&Method::Get, "/metrics?x=1", false, &registry).status,
            200
        );
        assert_eq!(
            reply(&Method::Head, "/metrics", false, &registry).status,
            200
        );
        for path in ["/", "/metric", "/metrics/x", ""] {
            assert_eq!(
                reply(&Method::Get, path, false, &registry).status,
                404,
                "{path}"
            );
        }
        let post = reply(&Method::Post, "/metrics", false, &registry);
        assert_eq!((post.status, post.allow), (405, true));
    }

    #[test]
    fn openmetrics_is_served_to_who_asks_for_it() {
        let reply = reply(&Method::Get, "/metrics", true, &registry());
        assert_eq!(reply.content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(reply.body.ends_with("# EOF\n"), "{}", reply.body);
    }

    #[test]
    fn a_taken_address_is_an_error_that_names_it() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap();
        let error = serve(address, registry()).unwrap_err();
        let message = wire::error_chain::one_line(&error);
        assert!(message.contains(&address.to_string()), "{message}");
        assert!(matches!(error, ServeError::Listen { .. }));
    }

    #[test]
    fn a_served_endpoint_answers_over_http_and_stops_when_dropped() {
        use std::io::{Read, Write};
        let server = serve("127.0.0.1:0".parse().unwrap(), registry()).unwrap();
        let address = server.address();
        let get = |request: &str| {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            answer
        };
        let ok = get("GET /metrics HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        assert!(ok.contains("ivha_epoch"), "{ok}");
        let bad = get("DELETE /metrics HTTP/1.0\r\n\r\n");
        assert!(bad.starts_with("HTTP/1.0 405"), "{bad}");
        let garbage = get("\u{1}\u{2} nonsense\r\n\r\n");
        assert!(!garbage.contains("ivha_epoch"), "{garbage}");
        drop(server);
        // The address is free again.
        TcpListener::bind(address).unwrap();
    }
}
