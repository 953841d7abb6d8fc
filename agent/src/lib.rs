//! sigwake: eBPF-assisted signal-delivery observability.
//!
//! Data flow, one module per stage:
//!
//! ```text
//! tracefs ─► probes (load, attach) ─► source (ring buffer) ─► events (decode)
//!        ─► trace (render) | metrics ─► http
//! ```
//! `app` wires the stages for each command; `main.rs` only parses and runs.

pub mod app;
pub mod btf;
pub mod cli;
pub mod config;
pub mod detector;
pub mod discovery;
pub mod diagnostics;
pub mod escalation;
pub mod events;
pub mod http;
pub mod incidents;
pub mod metrics;
pub mod pidfd;
pub mod probes;
pub mod procinfo;
pub mod registration;
pub mod registry;
pub mod selftest;
pub mod source;
pub mod trace;
pub mod tracefs;
