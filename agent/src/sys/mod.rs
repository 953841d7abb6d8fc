//! The system layer: every raw syscall and /proc read the agent makes, so
//! the stages above it never parse kernel text or call libc themselves.
//!
//! - `procinfo`: /proc/PID files (the one /proc/PID/stat parser), clocks
//! - `pidfd`: process handles that pin identity; signals go only through them
//! - `fdqueue`: how full a wakeup fd is, never reading it
//! - `sockdiag`: the NETLINK_SOCK_DIAG client `fdqueue` uses
//! - `nsview`: pids as a client in another pid namespace sees them
//! - `cgroup`: cgroup v2 kill
//! - `caps`: dropping capabilities in every thread once the programs are attached
//! - `bpfinfo`: counters of loaded BPF programs aya does not expose
//! - `restorer`: where the signal restorer a handler returns into is
//! - `programs`: where the programs the agent runs are found (a fixed PATH)

pub mod bpfinfo;
pub mod caps;
pub mod cgroup;
pub mod fdqueue;
pub mod nsview;
pub mod pidfd;
pub mod procinfo;
pub mod programs;
pub mod restorer;
pub mod sockdiag;
