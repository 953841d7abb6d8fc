//! Which pid namespace the agent runs in, and what the kernel programs
//! need to report pids in it.
//!
//! The BPF helpers give pids of the initial namespace. As a sidecar in a
//! pod with `shareProcessNamespace: true`, the agent sees other numbers in
//! /proc, kill(2) and pidfd_open(2), and a bystander's namespace pid can be
//! a target's host pid. So when the agent's namespace is not the initial
//! one, the programs translate every pid into it (see
//! `sigwake_common::PidNamespace`), using struct offsets from the kernel's
//! BTF; without BTF the agent refuses to start rather than blame the wrong
//! process.

use sigwake_common::PidNamespace;

use crate::{
    kernel::btf::{Btf, BtfError},
    sys::nsview,
};

/// `PROC_PID_INIT_INO` (include/linux/proc_ns.h): the initial pid
/// namespace's inode number, fixed since 3.8.
pub const INITIAL_PIDNS_INUM: u64 = 0xEFFF_FFFC;

#[derive(Debug, thiserror::Error)]
pub enum PidnsError {
    #[error("cannot read sigwake's own pid namespace ({path}): {source}; is /proc mounted?")]
    Unreadable {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "/proc belongs to another pid namespace than sigwake runs in (/proc/self is {proc_self:?}, getpid() is \
         {getpid}): pids read from it would name other processes. Mount a /proc for sigwake's own namespace \
         (`unshare --pid --fork --mount-proc`, or let the container runtime do it)"
    )]
    ForeignProc { proc_self: String, getpid: u32 },
    #[error(
        "sigwake runs in a pid namespace of its own (inode {inum}: a pod with shareProcessNamespace, or \
         `unshare --pid`) and must translate the kernel's pids into it, which needs the kernel's BTF: {why}. \
         Run it in the host's pid namespace (Kubernetes: hostPID: true) or on a kernel built with \
         CONFIG_DEBUG_INFO_BTF"
    )]
    NoBtf { inum: u64, why: String },
}

/// The agent's pid namespace as the kernel programs need it; `btf` gives
/// the kernel's BTF, read only when the namespace is not the initial one.
pub fn own_namespace<'a>(btf: impl FnOnce() -> Result<&'a Btf, String>) -> Result<PidNamespace, PidnsError> {
    check_proc_is_ours()?;
    let inum = nsview::own_pidns().map_err(|source| PidnsError::Unreadable { path: "/proc/self/ns/pid", source })?;
    if inum == INITIAL_PIDNS_INUM {
        return Ok(PidNamespace::INITIAL);
    }
    let no_btf = |why: String| PidnsError::NoBtf { inum, why };
    let btf = btf().map_err(no_btf)?;
    let inum = u32::try_from(inum).map_err(|_| no_btf(format!("inode number {inum} does not fit 32 bits")))?;
    offsets(btf, inum).map_err(|e| no_btf(e.to_string()))
}

/// The offsets of the structs the programs walk, for namespace `inum`.
pub fn offsets(btf: &Btf, inum: u32) -> Result<PidNamespace, BtfError> {
    let upid_ns = btf.member_offset("upid", "ns")?;
    if btf.member_offset("upid", "nr")? != 0 {
        // The programs read `nr` at the start of each entry.
        return Err(BtfError::Malformed("struct upid does not start with nr"));
    }
    Ok(PidNamespace {
        inum,
        task_thread_pid: btf.member_offset("task_struct", "thread_pid")?,
        task_group_leader: btf.member_offset("task_struct", "group_leader")?,
        task_comm: btf.member_offset("task_struct", "comm")?,
        pid_level: btf.member_offset("pid", "level")?,
        pid_numbers: btf.member_offset("pid", "numbers")?,
        // struct upid { int nr; struct pid_namespace *ns; }: the pointer
        // is its last member, so the entry ends right after it.
        upid_size: upid_ns + std::mem::size_of::<usize>() as u32,
        upid_ns,
        pidns_inum: btf.member_offset("pid_namespace", "ns")? + btf.member_offset("ns_common", "inum")?,
        _pad0: 0,
    })
}

/// /proc must be the agent's own namespace's: every pid the programs report
/// is looked up there.
fn check_proc_is_ours() -> Result<(), PidnsError> {
    let getpid = std::process::id();
    let proc_self = nsview::proc_self().map_err(|source| PidnsError::Unreadable { path: "/proc/self", source })?;
    if proc_self.parse::<u32>() != Ok(getpid) {
        return Err(PidnsError::ForeignProc { proc_self, getpid });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This kernel's BTF has every member the translation walks.
    #[test]
    fn offsets_are_found_in_this_kernels_btf() {
        let Ok(btf) = Btf::from_sys_fs() else {
            panic!("this machine's kernel has BTF (DESIGN §2); /sys/kernel/btf/vmlinux could not be read");
        };
        let ns = offsets(&btf, 7).expect("offsets");
        assert_eq!(ns.inum, 7);
        assert_eq!(ns.upid_size, 16, "struct upid is an int and a pointer on 64-bit");
        assert_eq!(ns.upid_ns, 8);
        assert!(ns.task_thread_pid > 0 && ns.task_group_leader > 0 && ns.task_comm > 0);
        assert!(ns.pid_numbers > ns.pid_level);
    }

    #[test]
    fn the_test_process_sees_its_own_proc() {
        check_proc_is_ours().expect("the test runs with the host's /proc");
    }
}
