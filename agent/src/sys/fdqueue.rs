//! How full a process's signal wakeup fd is, measured without ever reading
//! from it: sock_diag for AF_UNIX sockets, pidfd_getfd + FIONREAD for pipes.

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use serde::Serialize;

use super::{pidfd::ProcessHandle, sockdiag as sock_diag};

/// Bytes readable from `fd` (ioctl FIONREAD). For a pipe, either end gives the
/// bytes in the pipe; for a socket, the bytes in *its own* receive queue.
pub fn queued_bytes(fd: BorrowedFd) -> io::Result<usize> {
    Ok(rustix::io::ioctl_fionread(fd)? as usize)
}

/// SO_SNDBUF of a socket (what the kernel doubled and clamped it to).
pub fn send_buffer_size(fd: BorrowedFd) -> io::Result<usize> {
    Ok(rustix::net::sockopt::socket_send_buffer_size(fd)?)
}

/// How full a process's signal wakeup fd is.
///
/// Measured reference (kernel 6.18, trio 0.32): trio's wakeup socketpair
/// (AF_UNIX stream; SO_RCVBUF=1 on the read end, SO_SNDBUF=1 on the write
/// end — setting both on both ends gives the same) has an effective SO_SNDBUF
/// of 4608 and SO_RCVBUF of 2304 (the kernel minimums). It takes **6**
/// one-byte writes before `EAGAIN`: full is `queued = 6`, with the write end's
/// `sk_wmem_alloc` at 4608 (6 skbs × 768 bytes truesize) = SO_SNDBUF, so
/// `capacity_hint = 6`. The bytes sit on the peer's (read end's) receive
/// queue; the write end's own receive queue stays 0. An os.pipe() wakeup fd
/// (the self-pipe trick) holds 65536 bytes by default (`capacity_hint` from
/// F_GETPIPE_SZ).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WakeupFill {
    /// Bytes written to the wakeup fd and not yet drained by the loop.
    pub queued: u64,
    /// How many bytes fit when full, if known. Pipes: F_GETPIPE_SZ (exact).
    /// Sockets: an estimate for the current write size, from the write end's
    /// charged memory: `queued × SO_SNDBUF / wmem_alloc` (exact for one-byte
    /// writes; `None` while nothing is queued).
    pub capacity_hint: Option<u64>,
    /// `"sock_diag"` (peer's receive queue via NETLINK_SOCK_DIAG),
    /// `"fionread"` (pidfd_getfd + FIONREAD) or `"fdinfo"` (an eventfd's
    /// counter: `queued` is that count, not bytes).
    pub method: &'static str,
    /// What the fd refers to (`socket:[INODE]`, `pipe:[INODE]`): the same
    /// fd number may be closed and reused for something else.
    pub target: String,
}

/// What `pid`'s fd `fd` refers to now (`socket:[INODE]`, `pipe:[INODE]`).
pub fn fd_target(pid: u32, fd: i32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok().map(|t| t.to_string_lossy().into_owned())
}

/// Whether `pid`'s fd `fd` has O_NONBLOCK, from the octal `flags:` line of
/// /proc/PID/fdinfo/FD (proc(5)).
pub fn fd_nonblocking(pid: u32, fd: i32) -> Option<bool> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    let flags = u32::from_str_radix(flags.trim(), 8).ok()?;
    Some(flags & libc::O_NONBLOCK as u32 != 0)
}

/// The counter of `pid`'s eventfd `fd`: the hexadecimal `eventfd-count:`
/// line of /proc/PID/fdinfo/FD (fs/eventfd.c `eventfd_show_fdinfo`).
pub fn eventfd_count(pid: u32, fd: i32) -> Option<u64> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    parse_eventfd_count(&info)
}

fn parse_eventfd_count(fdinfo: &str) -> Option<u64> {
    let count = fdinfo.lines().find_map(|l| l.strip_prefix("eventfd-count:"))?;
    u64::from_str_radix(count.trim(), 16).ok()
}

/// Measures the undrained bytes of `pid`'s wakeup fd `wakeup_fd` (the fd
/// given to `signal.set_wakeup_fd`: the *write* end). Never reads from it.
/// `None` if the process or fd is gone, or the fd is a socket we cannot find
/// in sock_diag, or not a pipe-like fd FIONREAD understands.
pub fn wakeup_fill(pid: u32, wakeup_fd: i32) -> Option<WakeupFill> {
    let target = fd_target(pid, wakeup_fd)?;
    if let Some(ino) = socket_inode(&target) {
        // Data of a connected AF_UNIX socket sits on the receiving end's
        // queue: ask for the write end's peer, then for the peer's rqueue.
        // The write end's RQLEN carries its sk_wmem_alloc, MEMINFO its SNDBUF.
        let diag = sock_diag::query(pid, ino, sock_diag::SHOW_PEER | sock_diag::SHOW_RQLEN | sock_diag::SHOW_MEMINFO)?;
        let peer = diag.peer.filter(|&p| p != 0)?;
        let peer_diag = sock_diag::query(pid, peer, sock_diag::SHOW_RQLEN)?;
        let (rqueue, _) = peer_diag.rqlen?;
        let queued = rqueue as u64;
        let capacity_hint = diag.rqlen.zip(diag.sndbuf).and_then(|((_, wmem), sndbuf)| {
            let (wmem, sndbuf) = (wmem as u64, sndbuf as u64);
            (queued > 0 && wmem > 0).then(|| (queued * sndbuf).div_ceil(wmem))
        });
        return Some(WakeupFill { queued, capacity_hint, method: "sock_diag", target });
    }
    if target == "anon_inode:[eventfd]" {
        // An eventfd is a counter (FIONREAD does not apply): its value,
        // from fdinfo, is what the loop has not read yet. It cannot fill.
        let queued = eventfd_count(pid, wakeup_fd)?;
        return Some(WakeupFill { queued, capacity_hint: None, method: "fdinfo", target });
    }
    let handle = ProcessHandle::open(pid, None).ok()?;
    let fd = handle.get_fd(wakeup_fd).ok()?;
    let queued = queued_bytes(fd.as_fd()).ok()? as u64;
    let capacity_hint = if target.starts_with("pipe:[") {
        rustix::pipe::fcntl_getpipe_size(&fd).ok().filter(|s| *s > 0).map(|s| s as u64)
    } else {
        None
    };
    Some(WakeupFill { queued, capacity_hint, method: "fionread", target })
}

/// Receive queue (bytes) and inode of the AF_UNIX socket `fd` of `pid`, via
/// NETLINK_SOCK_DIAG. This is that socket's *own* receive queue: for the
/// write end of a socketpair it is normally 0 (see [`wakeup_fill`]).
pub fn unix_socket_recv_queue(pid: u32, fd: i32) -> Option<(u32, u32)> {
    let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let ino = socket_inode(&target.to_string_lossy())?;
    let diag = sock_diag::query(pid, ino, sock_diag::SHOW_RQLEN)?;
    Some((diag.rqlen?.0, ino))
}

/// The inode of a `socket:[INODE]` readlink target.
fn socket_inode(target: &str) -> Option<u32> {
    target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::pidfd::tests::{Reaper, sleeper};
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::MetadataExt;
    use std::process::{Command, Stdio};

    /// A Python process that fills a wakeup-like fd until EAGAIN, then
    /// prints "PID WRITE_FD BYTES_WRITTEN" and sleeps.
    /// A missing python3 fails the test: these tests cover the measurement
    /// the detector depends on and must never pass without running.
    fn python_filler(script: &str) -> (Reaper, u32, i32, u64) {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("python3 is needed to fill a wakeup fd for this test and cannot run: {e}"));
        let stdout = child.stdout.take().unwrap();
        let reaper = Reaper(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 3, "unexpected python output {line:?}");
        (reaper, f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
    }

    const TRIO_LIKE: &str = r#"
import os, socket, time
r, w = socket.socketpair()
for s in (r, w):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
r.setblocking(False); w.setblocking(False)
n = 0
try:
    while True:
        w.send(b"\0"); n += 1
except BlockingIOError:
    pass
print(os.getpid(), w.fileno(), n, flush=True)
time.sleep(30)
"#;

    const PIPE: &str = r#"
import os, time
r, w = os.pipe()
os.set_blocking(w, False)
n = 0
try:
    while True:
        n += os.write(w, b"\0" * 4096)
except BlockingIOError:
    pass
print(os.getpid(), w, n, flush=True)
time.sleep(30)
"#;

    #[test]
    fn wakeup_fill_trio_socketpair() {
        let (_child, pid, wfd, written) = python_filler(TRIO_LIKE);
        let fill = wakeup_fill(pid, wfd).expect("wakeup_fill");
        eprintln!("trio-like socketpair: {written} one-byte writes until EAGAIN; fill {fill:?}");
        assert_eq!(fill.method, "sock_diag");
        assert!(fill.queued > 0);
        assert_eq!(fill.queued, written);
        // Full: the estimate says exactly what is queued.
        assert_eq!(fill.capacity_hint, Some(written));
        // The write end's own receive queue is empty: the bytes are on the peer.
        let (rq, ino) = unix_socket_recv_queue(pid, wfd).expect("recv queue");
        assert_eq!(rq, 0);
        assert!(ino > 0);
        // Never consumed anything: measuring again gives the same.
        assert_eq!(wakeup_fill(pid, wfd).unwrap().queued, written);
    }

    /// A socket created in another network namespace (a container) is only
    /// visible to sock_diag from inside that namespace.
    #[test]
    fn wakeup_fill_other_netns() {
        // Needs root (CAP_SYS_ADMIN): a machine where this cannot run fails
        // the test rather than skipping the one case sock_diag gets wrong.
        let probe = Command::new("unshare").args(["-n", "true"]).status();
        assert!(
            probe.as_ref().is_ok_and(|s| s.success()),
            "`unshare -n true` failed ({probe:?}): this test needs root and util-linux's unshare"
        );
        let mut child = Command::new("unshare")
            .args(["-n", "python3", "-c", TRIO_LIKE])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let _reaper = Reaper(child); // unshare execs python: same pid
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        let (pid, wfd, written): (u32, i32, u64) =
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap());
        assert_ne!(
            fs::metadata("/proc/self/ns/net").unwrap().ino(),
            fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino()
        );
        let fill = wakeup_fill(pid, wfd).expect("wakeup_fill across netns");
        assert_eq!((fill.queued, fill.method), (written, "sock_diag"));
    }

    #[test]
    fn wakeup_fill_pipe() {
        let (_child, pid, wfd, written) = python_filler(PIPE);
        let fill = wakeup_fill(pid, wfd).expect("wakeup_fill");
        eprintln!("pipe: {written} bytes until EAGAIN; fill {fill:?}");
        assert_eq!(fill.method, "fionread");
        assert!(fill.queued > 0);
        assert_eq!(fill.queued, written);
        assert_eq!(fill.capacity_hint, Some(65536));
        assert_eq!(wakeup_fill(pid, wfd).unwrap().queued, written);
    }

    #[test]
    fn wakeup_fill_eventfd_is_its_counter() {
        assert_eq!(parse_eventfd_count("pos:\t0\nflags:\t02004002\neventfd-count:                a\n"), Some(10));
        assert_eq!(parse_eventfd_count("pos:\t0\n"), None);
        // SAFETY: plain syscalls on a fd this test owns.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(efd >= 0, "eventfd: {}", io::Error::last_os_error());
        let one: u64 = 3;
        // SAFETY: writes 8 bytes from a u64 to the eventfd.
        assert_eq!(unsafe { libc::write(efd, (&one as *const u64).cast(), 8) }, 8);
        let fill = wakeup_fill(std::process::id(), efd).expect("wakeup_fill of an eventfd");
        assert_eq!((fill.queued, fill.method, fill.target.as_str()), (3, "fdinfo", "anon_inode:[eventfd]"));
        // SAFETY: closes the fd opened above.
        unsafe { libc::close(efd) };
    }

    #[test]
    fn wakeup_fill_missing() {
        let child = sleeper();
        assert_eq!(wakeup_fill(child.0.id(), 999), None);
        assert_eq!(unix_socket_recv_queue(child.0.id(), 0), None); // not a socket
    }
}
