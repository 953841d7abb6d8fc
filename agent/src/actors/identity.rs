//! Who a process is and who may act on it: facts read from /proc (the
//! registry's only input about a process, read before its lock is taken)
//! and kill(2)'s permission rule.

use super::model::{ActorSpec, Caller};
use crate::sys::procinfo;

/// Facts about a live process, read from /proc; a seam for tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcFacts {
    pub start_time: u64,
    /// Real, effective, saved uid.
    pub uids: [u32; 3],
    pub ppid: u32,
    pub comm: String,
    pub cmdline: Vec<String>,
}

/// The identities among `identities` whose process is gone or reused.
/// Reads /proc: call it without holding the registry.
pub fn gone(proc: &dyn ProcReader, identities: &[(u32, u64)]) -> Vec<(u32, u64)> {
    identities.iter().copied().filter(|&(pid, start)| proc.start_time(pid) != Some(start)).collect()
}

/// The facts [`Registry::upsert`] needs for `spec`. Reads /proc: call it
/// without holding the registry.
pub fn read_facts(proc: &dyn ProcReader, spec: &ActorSpec, caller: Option<Caller>) -> Option<ProcFacts> {
    proc.facts(spec.target_pid(caller)?)
}

pub trait ProcReader: Send + Sync {
    fn facts(&self, pid: u32) -> Option<ProcFacts>;

    /// Just the start time: what the once-a-second identity sweep needs.
    fn start_time(&self, pid: u32) -> Option<u64> {
        self.facts(pid).map(|f| f.start_time)
    }
}

/// Reads the real /proc.
pub struct RealProc;
impl ProcReader for RealProc {
    fn facts(&self, pid: u32) -> Option<ProcFacts> {
        let status = procinfo::status(pid)?;
        Some(ProcFacts {
            start_time: procinfo::start_time(pid)?,
            uids: status.uids,
            ppid: status.ppid,
            comm: procinfo::comm(pid).unwrap_or_default(),
            cmdline: procinfo::cmdline(pid).unwrap_or_default(),
        })
    }

    fn start_time(&self, pid: u32) -> Option<u64> {
        procinfo::start_time(pid)
    }
}

/// kill(2)'s permission rule: root, or the caller's uid is the target's
/// real or saved uid.
pub fn may_signal(caller_uid: u32, target: &ProcFacts) -> bool {
    caller_uid == 0 || caller_uid == target.uids[0] || caller_uid == target.uids[2]
}

/// Parses tractor's `--uid "('name', 'uuid')"` from a subactor cmdline
/// (`python -m tractor._child --uid ... --parent_addr ...`).
pub fn tractor_identity(cmdline: &[String]) -> Option<(String, String)> {
    let is_child = cmdline.windows(2).any(|w| w[0] == "-m" && w[1] == "tractor._child");
    if !is_child {
        return None;
    }
    let uid = cmdline.windows(2).find(|w| w[0] == "--uid").map(|w| w[1].as_str())?;
    // ('name', 'uuid') with either quote style.
    let inner = uid.trim().strip_prefix('(')?.strip_suffix(')')?;
    let mut parts = inner.splitn(2, ',').map(|p| p.trim().trim_matches(['\'', '"']).to_string());
    let name = parts.next().filter(|n| !n.is_empty())?;
    let uuid = parts.next().unwrap_or_default();
    Some((name, uuid))
}
