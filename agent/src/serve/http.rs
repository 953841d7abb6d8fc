//! HTTP endpoint: `/metrics`, `/healthz`, `/readyz`; `/actors` and
//! `/incidents` only with `--serve-state`.
//!
//! Anyone who can connect is served, so by default nothing here names a
//! process: `/actors` and `/incidents` would list every supervised process
//! on the host (pid, name, uid, incidents) to any local user. Users see
//! their own actors with `sigwake actors` (the socket checks who asks) and
//! root reads incidents with `sigwake incidents`.
//!
//! The server is bounded ([`Limits`]): a client must send its request
//! headers within [`Limits::header_timeout`] of connecting (or of its
//! previous response), and at most [`Limits::max_connections`] are open;
//! a new one beyond that closes the oldest connection that is not in a
//! request, so clients that connect and stay silent can neither hold a
//! connection forever nor lock the scraper out.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::serve::metrics::Metrics;

/// What the handlers read.
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    /// True once every kernel program is attached.
    pub ready: AtomicBool,
    pub registry: Arc<std::sync::Mutex<crate::actors::registry::Registry>>,
    pub incidents: Arc<std::sync::Mutex<crate::response::incidents::Store>>,
    /// Serve `/actors` and `/incidents` (`--serve-state`).
    pub serve_state: bool,
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/actors", get(actors))
        .route("/incidents", get(incidents))
        .with_state(state)
}

/// Binds first, so that a taken port is an error at start-up, not later.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics endpoint to {addr}; is another agent running? choose another with --listen")
    })
}

/// How much of the agent HTTP clients may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; a new one beyond closes the oldest that
    /// is not in a request (or, if every one is, is itself closed).
    pub max_connections: usize,
    /// From connecting, or from the previous response, to the end of the
    /// request headers.
    pub header_timeout: Duration,
}

impl Limits {
    pub const DEFAULT: Limits = Limits { max_connections: 64, header_timeout: Duration::from_secs(5) };
}

/// One open connection: whether a request is being handled, and how to
/// close it.
struct Conn {
    in_request: Arc<AtomicBool>,
    abort: tokio::task::AbortHandle,
}

/// Serves until the listener fails for good. Connection errors (a client
/// that resets, EMFILE) never stop it.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>, limits: Limits) -> std::io::Result<()> {
    let app = router(state);
    // By age: the first entry is the oldest.
    let open: Arc<Mutex<BTreeMap<u64, Conn>>> = Arc::default();
    let mut next_id = 0u64;
    let mut warned: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds or memory, or a client that went away while
                // queued: wait a little rather than spin, and go on.
                tracing::debug!("accepting an HTTP connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        let mut conns = crate::lock(&open);
        if conns.len() >= limits.max_connections {
            let idle = conns.iter().find(|(_, c)| !c.in_request.load(Ordering::Acquire)).map(|(id, _)| *id);
            if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                warned = Some(Instant::now());
                tracing::warn!(
                    "the HTTP endpoint has {} connections open, its limit: closing the oldest idle one for each new \
                     one (clients that connect and send nothing?)",
                    conns.len()
                );
            }
            match idle.and_then(|id| conns.remove(&id)) {
                Some(oldest) => oldest.abort.abort(),
                None => continue, // every one is in a request: this one is dropped (closed)
            }
        }
        let in_request = Arc::new(AtomicBool::new(false));
        let service = {
            let (app, in_request) = (app.clone(), in_request.clone());
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                in_request.store(true, Ordering::Release);
                let (app, in_request) = (app.clone(), in_request.clone());
                async move {
                    let response = app.oneshot(req.map(axum::body::Body::new)).await;
                    in_request.store(false, Ordering::Release);
                    response
                }
            })
        };
        let done = open.clone();
        // Spawned under the lock, so that the task cannot remove its entry
        // before it is inserted.
        let task = tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("HTTP connection closed: {e}");
            }
            crate::lock(&done).remove(&id);
        });
        conns.insert(id, Conn { in_request, abort: task.abort_handle() });
    }
}

/// A 404 that says why the endpoint is off and what to use instead.
fn state_endpoint_off(path: &str, instead: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "{path} is off: it would show every supervised process on this host (pid, name, uid) to anyone who can \
             connect here. Use `{instead}` on the host, or run the agent with --serve-state (serve_state = true) on \
             a trusted network only.\n"
        ),
    )
        .into_response()
}

/// Every actor the registry holds (live and recently exited), as JSON.
async fn actors(State(state): State<Arc<HttpState>>) -> Response {
    if !state.serve_state {
        return state_endpoint_off("/actors", "sigwake actors");
    }
    let mut list: Vec<crate::actors::registry::Actor> = {
        let reg = crate::lock(&state.registry);
        reg.all().cloned().collect()
    };
    list.sort_by_key(|a| a.pid);
    axum::Json(list).into_response()
}

/// Current and past incidents, newest first.
async fn incidents(State(state): State<Arc<HttpState>>) -> Response {
    if !state.serve_state {
        return state_endpoint_off("/incidents", "sudo sigwake incidents");
    }
    let list: Vec<crate::response::incidents::Incident> = {
        let store = crate::lock(&state.incidents);
        store.all().rev().cloned().collect()
    };
    axum::Json(list).into_response()
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "kernel programs not attached\n").into_response()
    }
}

/// OpenMetrics when the scraper asks for it (Prometheus does), classic
/// text format otherwise.
async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let text = state.metrics.encode();
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if wants_openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
    } else {
        ([(header::CONTENT_TYPE, CLASSIC_TEXT)], openmetrics_to_classic(&text)).into_response()
    }
}

/// The Prometheus 0.0.4 text format differs from OpenMetrics in what this
/// registry emits by: no `# EOF` and `# UNIT` lines, and counters' `# TYPE`
/// / `# HELP` name the `_total` sample; info metrics become gauges.
pub fn openmetrics_to_classic(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut counters = std::collections::HashSet::new();
    let mut infos = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                match kind {
                    "counter" => drop(counters.insert(name.to_string())),
                    "info" => drop(infos.insert(name.to_string())),
                    _ => {}
                }
            }
        }
    }
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ").or_else(|| line.strip_prefix("# HELP ")) {
            let is_type = line.starts_with("# TYPE ");
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, tail) = if counters.contains(name) {
                (format!("{name}_total"), tail.to_string())
            } else if infos.contains(name) {
                (format!("{name}_info"), if is_type { "gauge".to_string() } else { tail.to_string() })
            } else {
                (name.to_string(), tail.to_string())
            };
            out.push_str(if is_type { "# TYPE " } else { "# HELP " });
            out.push_str(&name);
            out.push(' ');
            out.push_str(&tail);
            out.push('\n');
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_renames_counter_and_info_families() {
        let om = "# HELP sigwake_events Kernel events decoded.\n# TYPE sigwake_events counter\nsigwake_events_total 3\n# HELP sigwake_build Agent build information.\n# TYPE sigwake_build info\nsigwake_build_info{version=\"0.1.0\"} 1\n# EOF\n";
        let classic = openmetrics_to_classic(om);
        assert_eq!(
            classic,
            "# HELP sigwake_events_total Kernel events decoded.\n# TYPE sigwake_events_total counter\nsigwake_events_total 3\n# HELP sigwake_build_info Agent build information.\n# TYPE sigwake_build_info gauge\nsigwake_build_info{version=\"0.1.0\"} 1\n"
        );
    }
}
