//! What the agent shows: Prometheus metrics, the HTTP endpoints, and the
//! trace command's output.

pub mod http;
pub mod metrics;
pub mod trace;
