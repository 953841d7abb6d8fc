//! Safe process handles for escalation: never signal a bare pid.
//!
//! A [`ProcessHandle`] wraps a pidfd (pidfd_open(2)). Once the pidfd is open
//! it pins the process identity: the kernel cannot hand the pid number to a
//! new process while the pidfd holds a reference to the `struct pid`. So the
//! order in [`ProcessHandle::open`] is: open the pidfd *first*, then read the
//! start time from /proc/PID/stat and compare it with the one the caller
//! recorded. If the pid was reused before the pidfd was opened, the start
//! time differs and we refuse; if it was not, every later signal sent through
//! the pidfd reaches exactly the process the caller meant.
//!
//! Requires Linux ≥ 5.6 (pidfd_getfd), root or ptrace-attach rights over the
//! target for [`ProcessHandle::get_fd`], and read access to /proc/PID/fd.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// Errors from opening, signalling and inspecting a process through a pidfd.
#[derive(Debug, thiserror::Error)]
pub enum PidfdError {
    /// The process does not exist (never did, exited and was reaped, or exited
    /// between open and use).
    #[error("process {pid} has exited (ESRCH)")]
    Exited { pid: u32 },
    /// The pid now belongs to a different process than the caller recorded.
    #[error("pid {pid} was reused: expected start time {expected}, found {found} (refusing to touch it)")]
    Reused { pid: u32, expected: u64, found: u64 },
    /// The caller lacks the rights for this operation (not root, no
    /// CAP_KILL / ptrace-attach rights over the target).
    #[error("permission denied for {op} on pid {pid}: need root or CAP_KILL/ptrace rights over the target")]
    PermissionDenied { op: &'static str, pid: u32 },
    /// The target has no such file descriptor (pidfd_getfd: EBADF).
    #[error("pid {pid} has no file descriptor {fd}")]
    NoSuchFd { pid: u32, fd: i32 },
    /// /proc/PID/stat could not be read or parsed for the start time.
    #[error("cannot read start time of pid {pid} from /proc/{pid}/stat: {reason}")]
    StartTime { pid: u32, reason: String },
    /// Any other system call failure.
    #[error("{op} on pid {pid} failed: {source}")]
    Syscall {
        op: &'static str,
        pid: u32,
        #[source]
        source: io::Error,
    },
}

impl PidfdError {
    fn from_errno(op: &'static str, pid: u32, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ESRCH) => PidfdError::Exited { pid },
            Some(libc::EPERM) | Some(libc::EACCES) => PidfdError::PermissionDenied { op, pid },
            _ => PidfdError::Syscall { op, pid, source: err },
        }
    }
}

/// A process pinned by a pidfd, identity verified by start time.
#[derive(Debug)]
pub struct ProcessHandle {
    pid: u32,
    start_time: u64,
    fd: OwnedFd,
}

impl ProcessHandle {
    /// Opens a pidfd for `pid` and, if `expected_start_time` is given (clock
    /// ticks since boot, /proc/PID/stat field 22), checks that the process
    /// behind the pidfd is the one the caller recorded.
    pub fn open(pid: u32, expected_start_time: Option<u64>) -> Result<Self, PidfdError> {
        if pid == 0 || pid > i32::MAX as u32 {
            return Err(PidfdError::Exited { pid });
        }
        let raw = rustix::process::Pid::from_raw(pid as i32).ok_or(PidfdError::Exited { pid })?;
        let fd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
            .map_err(|e| PidfdError::from_errno("pidfd_open", pid, e.into()))?;

        // Read the start time only now: the pidfd pins the pid number, so the
        // process this stat describes is the one the pidfd refers to (or the
        // stat is gone because it was reaped in between).
        let found = match super::procinfo::read_start_time(pid) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PidfdError::Exited { pid });
            }
            Err(e) => {
                return Err(PidfdError::StartTime { pid, reason: e.to_string() });
            }
        };
        if let Some(expected) = expected_start_time
            && expected != found
        {
            return Err(PidfdError::Reused { pid, expected, found });
        }
        Ok(ProcessHandle { pid, start_time: found, fd })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The start time (clock ticks since boot) read right after opening.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Sends `sig` through the pidfd (pidfd_send_signal(2)). A zombie that has
    /// not been reaped yet still accepts (and ignores) signals.
    pub fn send_signal(&self, sig: i32) -> Result<(), PidfdError> {
        // Only the standard, named signals: the agent sends SIGTERM,
        // SIGKILL, SIGINT, SIGABRT; never a libc-reserved real-time one.
        let signal = rustix::process::Signal::from_named_raw(sig).ok_or_else(|| PidfdError::Syscall {
            op: "pidfd_send_signal",
            pid: self.pid,
            source: io::Error::new(io::ErrorKind::InvalidInput, format!("signal {sig} is not a standard signal")),
        })?;
        rustix::process::pidfd_send_signal(&self.fd, signal)
            .map_err(|e| PidfdError::from_errno("pidfd_send_signal", self.pid, e.into()))
    }

    /// False once the process has exited (a pidfd polls readable on exit,
    /// zombie or reaped).
    pub fn is_alive(&self) -> bool {
        !self.poll_exit(Some(Duration::ZERO))
    }

    /// Waits up to `timeout` for the process to exit; true if it did.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        self.poll_exit(Some(timeout))
    }

    fn poll_exit(&self, timeout: Option<Duration>) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| {
                let left = d.saturating_duration_since(Instant::now());
                Timespec { tv_sec: left.as_secs() as i64, tv_nsec: i64::from(left.subsec_nanos()) }
            });
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match poll(&mut fds, left.as_ref()) {
                Ok(0) => return false,
                Ok(_) => return fds[0].revents().intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR),
                Err(rustix::io::Errno::INTR) => continue,
                // poll on a valid pidfd does not fail otherwise; say "alive"
                // so nobody concludes an exit that did not happen.
                Err(_) => return false,
            }
        }
    }

    /// Duplicates the target's descriptor `target_fd` into this process
    /// (pidfd_getfd(2); needs ptrace-attach rights: root). The result is
    /// close-on-exec.
    ///
    /// Meant only for *inspecting* a descriptor: FIONREAD, getsockopt,
    /// F_GETPIPE_SZ. **Callers must never read from it**: the duplicate
    /// shares the open file (and its queue) with the target. For a wakeup fd
    /// the queued bytes *are* the signals (asyncio reads the signal numbers
    /// out of them); consuming them would lose the signals for good.
    pub fn get_fd(&self, target_fd: i32) -> Result<OwnedFd, PidfdError> {
        rustix::process::pidfd_getfd(&self.fd, target_fd, rustix::process::PidfdGetfdFlags::empty()).map_err(|e| {
            if e == rustix::io::Errno::BADF {
                PidfdError::NoSuchFd { pid: self.pid, fd: target_fd }
            } else {
                PidfdError::from_errno("pidfd_getfd", self.pid, e.into())
            }
        })
    }
}

impl AsFd for ProcessHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use std::process::{Child, Command};

    /// Kills and reaps the child when the test ends, pass or fail.
    pub(crate) struct Reaper(pub(crate) Child);

    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    pub(crate) fn sleeper() -> Reaper {
        Reaper(Command::new("sleep").arg("30").spawn().expect("spawn sleep"))
    }

    #[test]
    fn open_signal_wait_exit() {
        let child = sleeper();
        let pid = child.0.id();
        let start = crate::sys::procinfo::read_start_time(pid).unwrap();
        let h = ProcessHandle::open(pid, Some(start)).unwrap();
        assert_eq!(h.pid(), pid);
        assert_eq!(h.start_time(), start);
        assert!(h.is_alive());
        assert!(!h.wait_exit(Duration::from_millis(50)));
        h.send_signal(libc::SIGTERM).unwrap();
        // Exit (zombie, not yet reaped) makes the pidfd readable.
        assert!(h.wait_exit(Duration::from_secs(5)));
        assert!(!h.is_alive());
    }

    #[test]
    fn wrong_start_time_is_reuse() {
        let child = sleeper();
        let pid = child.0.id();
        let start = crate::sys::procinfo::read_start_time(pid).unwrap();
        match ProcessHandle::open(pid, Some(start + 1)) {
            Err(PidfdError::Reused { pid: p, expected, found }) => {
                assert_eq!((p, expected, found), (pid, start + 1, start));
            }
            other => panic!("expected Reused, got {other:?}"),
        }
        // Nothing was signalled.
        let h = ProcessHandle::open(pid, None).unwrap();
        assert!(h.is_alive());
    }

    #[test]
    fn exited_process() {
        let mut child = sleeper();
        let pid = child.0.id();
        let h = ProcessHandle::open(pid, None).unwrap();
        h.send_signal(libc::SIGKILL).unwrap();
        child.0.wait().unwrap(); // reaped: the pid is released
        assert!(!h.is_alive());
        assert!(matches!(h.send_signal(libc::SIGTERM), Err(PidfdError::Exited { pid: p }) if p == pid));
        assert!(matches!(h.get_fd(0), Err(PidfdError::Exited { .. })));
        // Opening a reaped pid (unless already reused, which is unlikely
        // within microseconds) fails the same way.
        if std::fs::metadata(format!("/proc/{pid}")).is_err() {
            assert!(matches!(ProcessHandle::open(pid, None), Err(PidfdError::Exited { .. })));
        }
    }

    #[test]
    fn get_fd_missing_fd() {
        use std::os::unix::fs::MetadataExt;
        // The child's fd 0 is a file only this test has: the duplicate must
        // be that very file (an OwnedFd is never negative, so checking the
        // number would prove nothing).
        let file = tempfile::tempfile().unwrap();
        let want = file.metadata().unwrap();
        let child = Reaper(Command::new("sleep").arg("30").stdin(file).spawn().expect("spawn sleep"));
        let h = ProcessHandle::open(child.0.id(), None).unwrap();
        assert!(matches!(h.get_fd(987), Err(PidfdError::NoSuchFd { fd: 987, .. })));
        // fd 0 exists: get a duplicate and inspect it without reading.
        let got = std::fs::File::from(h.get_fd(0).unwrap()).metadata().unwrap();
        assert_eq!((got.dev(), got.ino()), (want.dev(), want.ino()), "the duplicate is the child's fd 0");
    }
}
