//! The system layer: every raw syscall and /proc read the agent makes.

pub mod pidfd;
pub mod procinfo;
