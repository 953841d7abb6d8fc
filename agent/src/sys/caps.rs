//! Capabilities: once the kernel programs are attached and their maps are
//! open, the agent keeps only what it needs from then on and drops the rest
//! from every thread's effective, permitted and inheritable sets (and from
//! the bounding set when it holds `CAP_SETPCAP`, so that the programs it
//! runs — py-spy, notify commands — cannot regain them by exec as root).
//!
//! Capabilities are per thread in Linux (capset(2) changes only the calling
//! thread), and by the time the programs are attached the agent already runs
//! the tokio workers, the blocking pool and the watched-set thread. So, like
//! libpsx and glibc's set*id broadcast, the calling thread drops its own and
//! then signals every other thread (one real-time signal, [`signal_number`])
//! whose handler makes the same two syscalls; the caller re-reads
//! `/proc/self/task/*/status` until every thread shows the target sets
//! (a thread born meanwhile of a thread that had not dropped yet is
//! signalled in the next round).
//!
//! Kept after attach: `CAP_KILL` (signal tiers: other users' processes),
//! `CAP_SYS_PTRACE` (pidfd_getfd of wakeup fds, /proc/PID/fd and exe of
//! other users' processes, py-spy), and `CAP_BPF` only on kernels before
//! 6.5, where every bpf(2) command — map updates of WATCHED_PIDS and the
//! counter reads of a scrape included — needs it while
//! `kernel.unprivileged_bpf_disabled` is set (6.5 moved the check to map
//! creation and program load: commit c8644cd0efe7, "bpf: Move unprivileged
//! checks into map_create() and bpf_prog_load()"). On the socket tier
//! also `CAP_PERFMON`: it hooks the signal restorer of each libc it meets
//! (a container's is another file than the agent's) with a uprobe, and a
//! uprobe is a perf event that needs it (kernel/restorer_hooks.rs).

use std::{
    io,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

pub const CAP_SETPCAP: u32 = 8;
pub const CAP_KILL: u32 = 5;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// Capability names by number (capability.h), for logs and errors.
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The names of the capabilities in `mask` (`cap_N` for one this build does
/// not know).
pub fn names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|i| mask & (1u64 << i) != 0)
        .map(|i| NAMES.get(i).map_or_else(|| format!("cap_{i}"), |n| n.to_string()))
        .collect()
}

/// A thread's capability sets as capget(2) reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's sets.
pub fn current() -> io::Result<Sets> {
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: a v3 header and two data structs, as capget(2) requires.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(Sets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// What [`drop_after_attach`] did.
#[derive(Debug)]
pub struct Outcome {
    /// Effective and permitted from now on.
    pub kept: u64,
    /// Dropped from effective and permitted.
    pub dropped: u64,
    /// Dropped from the bounding set too (empty without `CAP_SETPCAP`).
    pub dropped_bounding: u64,
    /// Threads that were made to drop.
    pub threads: usize,
}

// What the signal handler applies: set once before it is installed.
static TARGET_PERMITTED: AtomicU64 = AtomicU64::new(0);
static TARGET_INHERITABLE: AtomicU64 = AtomicU64::new(0);
static BOUNDING_DROP: AtomicU64 = AtomicU64::new(0);
/// The last errno a handler met (0: none).
static HANDLER_ERRNO: AtomicU32 = AtomicU32::new(0);

/// The real-time signal that makes a thread drop: SIGRTMIN+6 (glibc keeps
/// the first two for itself; tokio and aya use none).
pub fn signal_number() -> i32 {
    libc::SIGRTMIN() + 6
}

/// Drops from this thread what the statics say. Async-signal-safe: raw
/// syscalls and atomics only.
fn apply_here() -> Result<(), i32> {
    let bounding = BOUNDING_DROP.load(Ordering::Relaxed);
    for cap in 0..64u32 {
        // A thread signalled twice (the caller re-signals those whose
        // status it read before they ran the handler) has already dropped
        // CAP_SETPCAP, and PR_CAPBSET_DROP would fail: drop only what is
        // still there.
        // SAFETY: prctl with integer arguments.
        if bounding & (1u64 << cap) != 0
            && unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) } == 1
            && unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0
        {
            return Err(errno());
        }
    }
    let permitted = TARGET_PERMITTED.load(Ordering::Relaxed);
    let inheritable = TARGET_INHERITABLE.load(Ordering::Relaxed);
    let mut header = Header { version: VERSION_3, pid: 0 };
    let data = [
        Data { effective: permitted as u32, permitted: permitted as u32, inheritable: inheritable as u32 },
        Data {
            effective: (permitted >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: (inheritable >> 32) as u32,
        },
    ];
    // SAFETY: a v3 header and two data structs, as capset(2) requires.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) } != 0 {
        return Err(errno());
    }
    Ok(())
}

fn errno() -> i32 {
    // SAFETY: the thread's errno location is always valid.
    unsafe { *libc::__errno_location() }
}

extern "C" fn on_drop_signal(_: libc::c_int) {
    // SAFETY: the thread's errno location is always valid; restored so the
    // interrupted code sees its own errno.
    let saved = unsafe { *libc::__errno_location() };
    if let Err(e) = apply_here() {
        HANDLER_ERRNO.store(e as u32, Ordering::Relaxed);
    }
    unsafe { *libc::__errno_location() = saved };
}

/// The capabilities the agent keeps after attach, on this kernel, with or
/// without uprobes to attach later (see the module doc).
pub fn needed_after_attach(kernel_release: &str, later_uprobes: bool) -> u64 {
    let mut keep = (1u64 << CAP_KILL) | (1u64 << CAP_SYS_PTRACE);
    if !bpf_commands_unprivileged(kernel_release) {
        keep |= 1u64 << CAP_BPF;
    }
    if later_uprobes {
        keep |= 1u64 << CAP_PERFMON;
    }
    keep
}

/// Whether bpf(2) commands on an open map fd need no capability (6.5+).
fn bpf_commands_unprivileged(release: &str) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 5)
}

/// Keeps `keep` (of what the agent has) in every thread and drops the rest;
/// see the module doc. Returns once every thread shows the new sets.
pub fn drop_after_attach(keep: u64) -> io::Result<Outcome> {
    let before = current()?;
    let kept = keep & before.permitted;
    let bounding = read_bounding()?;
    let dropped_bounding = if before.effective & (1u64 << CAP_SETPCAP) != 0 { bounding & !kept } else { 0 };
    TARGET_PERMITTED.store(kept, Ordering::Relaxed);
    TARGET_INHERITABLE.store(before.inheritable & kept, Ordering::Relaxed);
    BOUNDING_DROP.store(dropped_bounding, Ordering::Relaxed);
    HANDLER_ERRNO.store(0, Ordering::Relaxed);

    let sig = signal_number();
    // SAFETY: a zeroed sigaction with a plain handler, SA_RESTART so that
    // interrupted syscalls of the other threads go on.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_drop_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    apply_here().map_err(io::Error::from_raw_os_error)?;
    // SAFETY: plain syscalls.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut pending = Vec::new();
        let mut threads = 0;
        for entry in std::fs::read_dir("/proc/self/task")? {
            let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            threads += 1;
            if tid == me {
                continue;
            }
            let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
                continue; // the thread exited
            };
            let done = status_mask(&status, "CapPrm:") == Some(kept)
                && status_mask(&status, "CapEff:") == Some(kept)
                && status_mask(&status, "CapBnd:").is_some_and(|b| b & dropped_bounding == 0);
            if !done {
                pending.push(tid);
            }
        }
        let errno = HANDLER_ERRNO.load(Ordering::Relaxed);
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(errno as i32));
        }
        if pending.is_empty() {
            return Ok(Outcome { kept, dropped: before.permitted & !kept, dropped_bounding, threads });
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("threads {pending:?} still hold the capabilities to drop after 5 s of signalling them"),
            ));
        }
        for tid in pending {
            // SAFETY: tgkill on a thread of this process; ESRCH (it exited)
            // is fine.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The bounding set, from this thread's status.
fn read_bounding() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    status_mask(&status, "CapBnd:")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no CapBnd line in /proc/thread-self/status"))
}

/// A hex capability mask line of /proc/…/status (`CapEff:\t000001ffffffffff`).
pub fn status_mask(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    u64::from_str_radix(line[key.len()..].trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_by_number() {
        assert_eq!(
            names((1 << CAP_KILL) | (1 << CAP_SYS_PTRACE) | (1 << CAP_BPF)),
            ["CAP_KILL", "CAP_SYS_PTRACE", "CAP_BPF"]
        );
        assert_eq!(names(1 << 50), ["cap_50"]);
    }

    #[test]
    fn cap_bpf_kept_before_6_5_only() {
        let bpf = 1u64 << CAP_BPF;
        assert_ne!(needed_after_attach("5.10.0-35-amd64", false) & bpf, 0);
        assert_ne!(needed_after_attach("6.1.0-37-amd64", false) & bpf, 0);
        assert_eq!(needed_after_attach("6.5.0", false) & bpf, 0);
        assert_eq!(needed_after_attach("6.18.44-fc-v1045", false) & bpf, 0);
        assert_eq!(needed_after_attach("6.12.48+deb12-amd64", false) & bpf, 0);
    }

    #[test]
    fn cap_perfmon_kept_only_for_later_uprobes() {
        let perfmon = 1u64 << CAP_PERFMON;
        assert_eq!(needed_after_attach("6.18.44-fc-v1045", false) & perfmon, 0);
        assert_ne!(needed_after_attach("6.18.44-fc-v1045", true) & perfmon, 0);
        assert_eq!(names(1 << CAP_PERFMON), ["CAP_PERFMON"]);
    }

    #[test]
    fn status_lines() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t00000000000000a0\n";
        assert_eq!(status_mask(s, "CapEff:"), Some(0xa0));
        assert_eq!(status_mask(s, "CapBnd:"), None);
    }
}
