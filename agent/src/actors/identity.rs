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
    uid_may_signal(caller_uid, target.uids)
}

/// [`may_signal`] on the target's real, effective and saved uids.
pub fn uid_may_signal(caller_uid: u32, uids: [u32; 3]) -> bool {
    caller_uid == 0 || caller_uid == uids[0] || caller_uid == uids[2]
}

/// Why the kernel drops `sig` sent by the agent to a process with this
/// /proc `status`, if it does (`kernel/signal.c` `sig_task_ignored`):
/// - its disposition for `sig` is SIG_IGN (SIGKILL and SIGSTOP cannot be
///   ignored);
/// - it is the init (pid 1) of a pid namespace and has no handler for
///   `sig`: a namespace's init gets only the signals it handles, except
///   SIGKILL and SIGSTOP sent from an ancestor namespace (the agent's,
///   when the process's `NSpid` has more than one entry).
///
/// Read just before sending: a process may change its dispositions at any
/// time, so this is what the kernel would do now, not a promise.
pub fn signal_dropped(status: &procinfo::Status, sig: i32) -> Option<String> {
    if !(1..=64).contains(&sig) {
        return None;
    }
    let bit = 1u64 << (sig - 1);
    let name = crate::kernel::events::Signal(sig);
    let kernel_only = sig == libc::SIGKILL || sig == libc::SIGSTOP;
    if !kernel_only && status.sig_ign & bit != 0 {
        return Some(format!("its disposition for {name} is SIG_IGN (SigIgn in /proc/PID/status)"));
    }
    let ns_init = status.nspid.last() == Some(&1);
    let from_ancestor = status.nspid.len() > 1;
    if ns_init && status.sig_cgt & bit == 0 && !(kernel_only && from_ancestor) {
        return Some(format!(
            "it is pid 1 of its pid namespace (NSpid {:?}) and has no handler for {name}: the kernel drops \
             such a signal to a namespace's init",
            status.nspid
        ));
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(sig_ign: u64, sig_cgt: u64, nspid: &[u32]) -> procinfo::Status {
        procinfo::Status { tgid: 1, ppid: 0, uids: [0; 3], sig_ign, sig_cgt, nspid: nspid.to_vec(), cap_eff: 0 }
    }

    const fn bit(sig: i32) -> u64 {
        1 << (sig - 1)
    }

    #[test]
    fn what_the_kernel_drops() {
        let (term, kill) = (libc::SIGTERM, libc::SIGKILL);
        // An ordinary process, default disposition: delivered.
        assert_eq!(signal_dropped(&status(0, 0, &[4711]), term), None);
        // SIG_IGN: dropped, saying so; never SIGKILL.
        let why = signal_dropped(&status(bit(term), 0, &[4711]), term).unwrap();
        assert!(why.contains("SIG_IGN") && why.contains("SIGTERM"), "{why}");
        assert_eq!(signal_dropped(&status(u64::MAX, 0, &[4711]), kill), None);
        // pid 1 of a child namespace: only what it handles, and SIGKILL from here.
        let why = signal_dropped(&status(0, bit(libc::SIGINT), &[4711, 1]), term).unwrap();
        assert!(why.contains("pid 1 of its pid namespace"), "{why}");
        assert_eq!(signal_dropped(&status(0, bit(term), &[4711, 1]), term), None);
        assert_eq!(signal_dropped(&status(0, 0, &[4711, 1]), kill), None);
        // The init of the agent's own namespace: not even SIGKILL.
        assert!(signal_dropped(&status(0, 0, &[1]), kill).is_some());
        // pid 1 deeper down is still a namespace's init; pid 1 elsewhere in NSpid is not.
        assert!(signal_dropped(&status(0, 0, &[4711, 30, 1]), term).is_some());
        assert_eq!(signal_dropped(&status(0, 0, &[1, 4711]), term), None);
    }
}
