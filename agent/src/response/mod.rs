//! What the agent does about a starving actor: the detector's verdict, the
//! escalation ladder, incidents kept across restarts, and diagnostics, all
//! kept in a private state directory.

pub mod detector;
#[cfg(test)]
mod detector_traces;
pub mod diagnostics;
pub mod escalation;
pub mod incidents;
pub mod notify;
pub mod statedir;
pub mod subtree;
