//! Kernel side, user half: tracepoint formats and BTF offsets, loading and
//! attaching the programs by tier (proven by the self-test), the ring-buffer
//! event source and the decoder into typed events.

pub mod btf;
pub mod events;
pub mod pidns;
pub mod pipe_hooks;
pub mod probes;
pub mod restorer_hooks;
pub mod selftest;
pub mod source;
pub mod tiers;
pub mod tracefs;
pub mod watched;
