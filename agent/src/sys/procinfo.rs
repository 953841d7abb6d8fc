//! Reading /proc: process identity and descriptions.
//!
//! Everything here may race with the process exiting; every function returns
//! `None` (or an error) rather than guessing.
//!
//! Why not the `procfs` crate: the identity sweep reads one start time per
//! actor per second (1,000 actors: 2.9 % of a core, BENCHMARKS.md), and
//! procfs's `Process::new(pid)?.stat()?.starttime` cost 13.6–14.5 µs per
//! read against 11.6–11.9 µs for [`read_start_time`] here (3 rounds of
//! 100,000 reads of /proc/self/stat each, release build, this project's
//! 2-vCPU machine, 2026-12-02: a throwaway crate with procfs 0.18 beside a
//! copy of [`parse_stat`]). The whole parser is the ~60 lines below, the
//! only place the agent parses /proc/PID/stat and status.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// CLOCK_MONOTONIC now, in ns: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    clock_ns(rustix::time::ClockId::Monotonic)
}

pub fn realtime_ns() -> u64 {
    clock_ns(rustix::time::ClockId::Realtime)
}

fn clock_ns(clock: rustix::time::ClockId) -> u64 {
    let ts = rustix::time::clock_gettime(clock);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Converts kernel monotonic timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    realtime_minus_mono: i128,
}

impl Clock {
    pub fn now() -> Self {
        let mono = monotonic_ns() as i128;
        let real = realtime_ns() as i128;
        Clock { realtime_minus_mono: real - mono }
    }

    /// Unix time in ns of a monotonic timestamp.
    pub fn unix_ns(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.realtime_minus_mono).max(0) as u64
    }

    /// RFC 3339 with microseconds, UTC.
    pub fn rfc3339(&self, mono_ns: u64) -> String {
        format_rfc3339(self.unix_ns(mono_ns))
    }
}

/// Formats Unix ns as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn format_rfc3339(unix_ns: u64) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

fn proc_path(pid: u32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{file}"))
}

/// The fields of /proc/PID/status the agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub tgid: u32,
    pub ppid: u32,
    /// Real, effective, saved uid.
    pub uids: [u32; 3],
    /// Signals whose disposition is SIG_IGN (`SigIgn`), and those with a
    /// handler (`SigCgt`): bit `n - 1` is signal `n`.
    pub sig_ign: u64,
    pub sig_cgt: u64,
    /// The pid in each pid namespace, from the one of this /proc down to
    /// the process's own (`NSpid`); the last is 1 for a namespace's init.
    pub nspid: Vec<u32>,
    /// Effective capabilities (`CapEff`): bit `n` is capability `n`.
    pub cap_eff: u64,
}

/// Parses /proc/PID/status text: the one place the agent does.
pub fn parse_status(status: &str) -> Option<Status> {
    let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
    let mask = |key: &str| field(key).and_then(|v| u64::from_str_radix(v, 16).ok());
    let mut uids = field("Uid:")?.split_whitespace().map(|v| v.parse::<u32>());
    let tgid = field("Tgid:")?.parse().ok()?;
    Some(Status {
        tgid,
        ppid: field("PPid:")?.parse().ok()?,
        uids: [uids.next()?.ok()?, uids.next()?.ok()?, uids.next()?.ok()?],
        sig_ign: mask("SigIgn:").unwrap_or(0),
        sig_cgt: mask("SigCgt:").unwrap_or(0),
        // Kernels before 4.1 have no NSpid: one namespace, as far as the agent can tell.
        nspid: field("NSpid:")
            .and_then(|v| v.split_whitespace().map(|p| p.parse().ok()).collect::<Option<Vec<u32>>>())
            .unwrap_or_else(|| vec![tgid]),
        cap_eff: mask("CapEff:").unwrap_or(0),
    })
}

pub fn status(pid: u32) -> Option<Status> {
    parse_status(&fs::read_to_string(proc_path(pid, "status")).ok()?)
}

/// The thread-group id of a thread, or `None` if it is gone.
pub fn tgid_of(tid: u32) -> Option<u32> {
    status(tid).map(|s| s.tgid)
}

/// Real uid of a process.
pub fn uid_of(pid: u32) -> Option<u32> {
    status(pid).map(|s| s.uids[0])
}

/// The fields of a /proc/PID/stat (or /proc/PID/task/TID/stat) line the
/// agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    /// `R`, `S`, `D`, `Z`, …
    pub state: String,
    pub ppid: u32,
    /// User and system CPU time, clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Clock ticks since boot: with the pid, the identity of a process.
    pub start_time: u64,
    /// Resident set size, pages.
    pub rss_pages: u64,
}

/// Parses a stat line. This is the one place the agent parses that line.
/// comm (field 2) may contain spaces and parentheses: the fields after it
/// are counted from the *last* ')'.
pub fn parse_stat(stat: &str) -> Option<Stat> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    // After the comm, index 0 is field 3 (proc(5) numbering).
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).copied();
    Some(Stat {
        comm,
        state: field(3)?.to_string(),
        ppid: field(4)?.parse().ok()?,
        utime: field(14)?.parse().ok()?,
        stime: field(15)?.parse().ok()?,
        start_time: field(22)?.parse().ok()?,
        rss_pages: field(24)?.parse().ok()?,
    })
}

/// /proc/PID/stat of a process (`self` for this one).
pub fn stat(pid: u32) -> io::Result<Stat> {
    stat_at(&proc_path(pid, "stat"))
}

/// A stat file by path (`/proc/self/stat`, `/proc/PID/task/TID/stat`).
pub fn stat_at(path: &Path) -> io::Result<Stat> {
    let text = fs::read_to_string(path)?;
    parse_stat(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("malformed {}", path.display())))
}

/// Start time of a process in clock ticks since boot (`/proc/PID/stat`
/// field 22): with the pid, the identity of a process.
pub fn start_time(pid: u32) -> Option<u64> {
    read_start_time(pid).ok()
}

/// [`start_time`], saying why it could not be read (`NotFound`: gone).
pub fn read_start_time(pid: u32) -> io::Result<u64> {
    stat(pid).map(|s| s.start_time)
}

/// Parent pid (/proc/PID/stat field 4).
pub fn ppid_of(pid: u32) -> Option<u32> {
    stat(pid).ok().map(|s| s.ppid)
}

pub fn comm(pid: u32) -> Option<String> {
    let c = std::fs::read_to_string(proc_path(pid, "comm")).ok()?;
    Some(c.trim_end_matches('\n').to_string())
}

/// Command-line arguments, NUL-separated in /proc.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(proc_path(pid, "cmdline")).ok()?;
    Some(raw.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

/// Boot time, Unix seconds (`btime` of /proc/stat).
pub fn boot_time() -> Option<u64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

/// The text of /proc/PID/maps (which libraries are loaded).
pub fn maps(pid: u32) -> Option<String> {
    fs::read_to_string(proc_path(pid, "maps")).ok()
}

pub fn exe(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(proc_path(pid, "exe")).ok()
}

/// The cgroup v2 path of a process (`0::/system.slice/x.service`).
pub fn cgroup(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(proc_path(pid, "cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// Every process in this /proc (thread-group ids), in no order.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// All descendants of `pid` (not `pid` itself), deepest first: children come
/// after their own descendants, so killing in this order leaves no orphan to
/// be reparented mid-walk. A snapshot of /proc: it races with forks.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for child in all_pids() {
        if let Some(ppid) = ppid_of(child) {
            children.entry(ppid).or_default().push(child);
        }
    }
    // Breadth-first from pid: parents before children; reversed at the end.
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::from([pid]);
    let mut queue = std::collections::VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        if let Some(kids) = children.get(&p) {
            let mut kids = kids.clone();
            kids.sort_unstable();
            for k in kids {
                if seen.insert(k) {
                    order.push(k);
                    queue.push_back(k);
                }
            }
        }
    }
    order.reverse();
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::pidfd::{ProcessHandle, tests::Reaper};
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[test]
    fn descendants_deepest_first() {
        // sh -> sh -> sleep: a chain of three below the first sh.
        let child = Reaper(Command::new("sh").arg("-c").arg("sh -c 'sleep 30 & wait' & wait").spawn().unwrap());
        let pid = child.0.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut d = descendants(pid);
        while d.len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            d = descendants(pid);
        }
        assert_eq!(d.len(), 2, "{d:?}");
        let comm = |p: u32| fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        assert_eq!(comm(d[0]).trim(), "sleep");
        assert_eq!(comm(d[1]).trim(), "sh");
        for p in d {
            if let Ok(h) = ProcessHandle::open(p, None) {
                let _ = h.send_signal(libc::SIGKILL);
            }
        }
        assert!(descendants(std::process::id()).iter().all(|&p| p != std::process::id()));
    }

    #[test]
    fn stat_parsing_counts_fields_after_the_last_paren() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let s = parse_stat(stat).unwrap();
        assert_eq!((s.comm.as_str(), s.state.as_str(), s.ppid), ("a) b (c)", "S", 1));
        assert_eq!((s.utime, s.stime, s.start_time, s.rss_pages), (1, 2, 987654, 10));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat(")("), None);
        assert_eq!(parse_stat("7 (x) S 1"), None);
    }

    #[test]
    fn status_parsing() {
        let text = "Name:\tx\nTgid:\t10\nPid:\t11\nPPid:\t1\nUid:\t1000\t0\t1000\t0\n";
        let old =
            Status { tgid: 10, ppid: 1, uids: [1000, 0, 1000], sig_ign: 0, sig_cgt: 0, nspid: vec![10], cap_eff: 0 };
        assert_eq!(parse_status(text), Some(old.clone()));
        let text = format!("{text}NSpid:\t4711\t1\nSigBlk:\t0\nSigIgn:\t0000000000004000\nSigCgt:\t0000000180000002\n");
        let s = parse_status(&text).unwrap();
        assert_eq!((s.sig_ign, s.sig_cgt, s.nspid), (1 << (libc::SIGTERM - 1), 0x1_8000_0002, vec![4711, 1]));
        assert_eq!(parse_status("Uid:\t1\n"), None);
    }

    #[test]
    fn own_process_identity_is_readable() {
        let me = std::process::id();
        assert_eq!(tgid_of(me), Some(me));
        assert!(start_time(me).is_some_and(|t| t > 0));
        assert_eq!(uid_of(me), Some(unsafe { libc::getuid() }));
        assert!(cmdline(me).is_some_and(|c| !c.is_empty()));
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_rfc3339(1_795_305_600_123_456_789), "2026-11-22T00:00:00.123456Z");
        assert_eq!(format_rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
    }
}
