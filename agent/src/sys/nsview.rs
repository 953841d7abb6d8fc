//! Pids as another pid namespace sees them.
//!
//! A registration client in a pod names processes by its own namespace's
//! pids, which are not the agent's when the agent is a node agent
//! (hostPID) or the client sits in a namespace nested below the agent's.
//! The kernel already gives the client's own pid in the agent's namespace
//! (SO_PEERCRED); this maps the pids the client *names* and the pids the
//! agent *replies with*, and makes every process outside the client's
//! namespace invisible to it: it can neither name nor list one.
//!
//! `NSpid` in /proc/PID/status lists a process's pid in the namespace of
//! this /proc (the agent's) and in every namespace below it down to its
//! own. A client at depth `d` (its `NSpid` has `d + 1` entries) sees a
//! process at `NSpid[d]`, provided the process's namespace at that depth is
//! the client's — checked with `NS_GET_PARENT` from the process's own.

use std::{
    fs::File,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
};

use crate::sys::procinfo;

/// How a process (a registration client) sees pids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PidView {
    /// Inode of its pid namespace.
    pidns: u64,
    /// How many namespaces below the agent's it is (0: the agent's own).
    depth: usize,
}

impl PidView {
    /// The agent's own view: pids need no mapping.
    pub const AGENT: PidView = PidView { pidns: 0, depth: 0 };
    /// A view that sees no process (a client gone before it was read).
    pub const NOTHING: PidView = PidView { pidns: 0, depth: usize::MAX };

    /// The view of process `pid` (a pid of the agent's namespace), with its
    /// /proc status read by the caller; None if it is gone.
    pub fn of(pid: u32, status: &procinfo::Status) -> Option<PidView> {
        let depth = status.nspid.len().checked_sub(1)?;
        if depth == 0 {
            return Some(PidView::AGENT);
        }
        Some(PidView { pidns: pidns_inode(pid)?, depth })
    }

    pub fn is_agents(&self) -> bool {
        self.depth == 0
    }

    /// The client's namespace could not be read (it is gone, or /proc of
    /// another user's process is closed to the agent).
    pub fn is_nothing(&self) -> bool {
        *self == PidView::NOTHING
    }

    /// The agent's pid of the process this view calls `pid`, if this view
    /// sees such a process. Scans /proc below the agent's namespace:
    /// registrations are rare, and only clients in nested namespaces pay.
    pub fn to_agent(&self, pid: u32) -> Option<u32> {
        if self.is_agents() {
            return Some(pid);
        }
        procinfo::all_pids()
            .into_iter()
            .find(|&candidate| procinfo::status(candidate).is_some_and(|s| self.sees(candidate, &s.nspid, pid)))
    }

    /// This view's pid for the agent's `pid`, if it sees that process.
    pub fn from_agent(&self, pid: u32) -> Option<u32> {
        if self.is_agents() {
            return Some(pid);
        }
        let nspid = procinfo::status(pid)?.nspid;
        let theirs = *nspid.get(self.depth)?;
        self.sees(pid, &nspid, theirs).then_some(theirs)
    }

    /// Whether process `pid` (agent's pid, with this `NSpid`) is the one
    /// this view calls `theirs`.
    fn sees(&self, pid: u32, nspid: &[u32], theirs: u32) -> bool {
        if nspid.get(self.depth) != Some(&theirs) {
            return false;
        }
        // Its namespace `levels_below` steps under this view's must be
        // this view's namespace, not a sibling's at the same depth.
        let levels_below = nspid.len() - 1 - self.depth;
        ancestor_pidns(pid, levels_below) == Some(self.pidns)
    }
}

/// Inode of this process's own pid namespace (`/proc/self/ns/pid`).
pub fn own_pidns() -> std::io::Result<u64> {
    std::fs::metadata("/proc/self/ns/pid").map(|m| m.ino())
}

/// What `/proc/self` names: this process's pid in the namespace of the
/// mounted /proc (not its own namespace's pid when /proc is another's).
pub fn proc_self() -> std::io::Result<String> {
    std::fs::read_link("/proc/self").map(|p| p.to_string_lossy().into_owned())
}

fn pidns_inode(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok().map(|m| m.ino())
}

/// `NS_GET_PARENT` (include/uapi/linux/nsfs.h): _IO(0xb7, 0x2).
const NS_GET_PARENT: libc::c_ulong = 0xb702;

/// Inode of the pid namespace `up` levels above process `pid`'s own.
fn ancestor_pidns(pid: u32, up: usize) -> Option<u64> {
    let mut ns: OwnedFd = File::open(format!("/proc/{pid}/ns/pid")).ok()?.into();
    for _ in 0..up {
        // SAFETY: ioctl on an fd we own; on success it returns a new fd,
        // which we take ownership of at once.
        let parent = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_PARENT) };
        if parent < 0 {
            return None;
        }
        ns = unsafe { OwnedFd::from_raw_fd(parent) };
    }
    File::from(ns).metadata().ok().map(|m| m.ino())
}

/// Whether `pid` holds CAP_KILL in the agent's user namespace: kill(2)'s
/// override of the uid rule. Root in a container without a user namespace
/// has it unless the runtime dropped it; root in a user namespace has its
/// capabilities only there (and a uid other than 0 as the agent sees it).
pub fn has_cap_kill_here(pid: u32, status: &procinfo::Status) -> bool {
    const CAP_KILL: u32 = 5;
    let same_userns = match (user_ns(pid), user_ns(std::process::id())) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => false,
    };
    same_userns && status.cap_eff & (1 << CAP_KILL) != 0
}

fn user_ns(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/user")).ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_in_the_agents_namespace_needs_no_mapping() {
        let me = std::process::id();
        let view = PidView::of(me, &procinfo::status(me).expect("own status")).expect("own view");
        assert!(view.is_agents());
        assert_eq!((view.to_agent(me), view.from_agent(me)), (Some(me), Some(me)));
    }

    #[test]
    fn root_running_the_tests_holds_cap_kill() {
        // The unit tests run as root on these machines (the agent needs it).
        let me = std::process::id();
        assert!(has_cap_kill_here(me, &procinfo::status(me).expect("own status")));
    }
}
