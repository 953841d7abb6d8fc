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

/// Locks a mutex, recovering from poisoning: a panicking task cannot leave
/// any of the agent's shared state half-updated (each critical section is a
/// plain update), and a monitoring agent must keep running.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
