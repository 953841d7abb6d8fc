//! sigwake: eBPF-assisted signal-delivery observability.
//!
//! The data flow, one folder per stage:
//!
//! ```text
//! kernel/   tracefs + BTF offsets ─► probes (tiers, self-test) ─► source (ring buffer) ─► events (decode)
//! actors/   registry ◄─ registration socket, config selectors, self-pipe discovery
//! response/ detector (starving?) ─► escalation (ladder) ─► incidents + diagnostics
//! serve/    metrics ─► http; trace (the `trace` command's output)
//! sys/      the /proc reads and raw syscalls every stage above uses
//! ```
//! `app` wires the stages for each command; `main.rs` only parses and runs.

pub mod actors;
pub mod app;
pub mod cli;
pub mod config;
pub mod kernel;
pub mod response;
pub mod serve;
pub mod sys;
