//! Reading /proc: process identity and descriptions.
//!
//! Everything here may race with the process exiting; every function returns
//! `None` (or an error) rather than guessing.

use std::{fs, io, path::PathBuf};

/// CLOCK_MONOTONIC now, in ns: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
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

/// The thread-group id of a thread, or `None` if it is gone.
pub fn tgid_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_path(tid, "status")).ok()?;
    status_field(&status, "Tgid:")?.parse().ok()
}

/// Real uid of a process.
pub fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_path(pid, "status")).ok()?;
    status_field(&status, "Uid:")?.parse().ok()
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next())
}

/// Start time of a process in clock ticks since boot (`/proc/PID/stat`
/// field 22): with the pid, the identity of a process.
pub fn start_time(pid: u32) -> Option<u64> {
    read_start_time(pid).ok()
}

/// [`start_time`], saying why it could not be read (`NotFound`: gone).
pub fn read_start_time(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(proc_path(pid, "stat"))?;
    parse_stat_start_time(&stat).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))
}

/// Field 22 of a /proc/PID/stat line.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    stat_field(stat, 22)?.parse().ok()
}

/// Parent pid (/proc/PID/stat field 4).
pub fn ppid_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(proc_path(pid, "stat")).ok()?;
    stat_field(&stat, 4)?.parse().ok()
}

/// Field `n` (1-based, as in proc(5)) of a /proc/PID/stat line, for n ≥ 3.
/// This is the one place the agent parses that line. comm (field 2) may
/// contain spaces and parentheses: fields after it are counted from the
/// *last* ')'.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)
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

pub fn exe(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(proc_path(pid, "exe")).ok()
}

/// The cgroup v2 path of a process (`0::/system.slice/x.service`).
pub fn cgroup(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(proc_path(pid, "cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// All descendants of `pid` (not `pid` itself), deepest first: children come
/// after their own descendants, so killing in this order leaves no orphan to
/// be reparented mid-walk. A snapshot of /proc: it races with forks.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
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
    fn stat_parsing() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(stat_field(stat, 3), Some("S"));
        assert_eq!(stat_field(stat, 4), Some("1"));
        assert_eq!(stat_field(stat, 22), Some("987654"));
        assert_eq!(stat_field("garbage", 22), None);
        assert_eq!(stat_field(stat, 2), None);
    }

    #[test]
    fn start_time_skips_comm_with_spaces_and_parens() {
        let stat = "1234 (we ird) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat_start_time(stat), Some(987654));
        assert_eq!(parse_stat_start_time("garbage"), None);
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
