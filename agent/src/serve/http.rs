//! HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::serve::metrics::Metrics;

/// What the handlers read.
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    /// True once every kernel program is attached.
    pub ready: AtomicBool,
    pub registry: Arc<std::sync::Mutex<crate::actors::registry::Registry>>,
    pub incidents: Arc<std::sync::Mutex<crate::response::incidents::Store>>,
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

pub async fn serve(listener: TcpListener, state: Arc<HttpState>) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

/// Every actor the registry holds (live and recently exited), as JSON.
async fn actors(State(state): State<Arc<HttpState>>) -> Response {
    let mut list: Vec<crate::actors::registry::Actor> = {
        let reg = crate::lock(&state.registry);
        reg.all().cloned().collect()
    };
    list.sort_by_key(|a| a.pid);
    axum::Json(list).into_response()
}

/// Current and past incidents, newest first.
async fn incidents(State(state): State<Arc<HttpState>>) -> Response {
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
