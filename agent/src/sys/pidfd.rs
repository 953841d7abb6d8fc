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
//! Also here: measuring how full a process's signal wakeup fd is
//! ([`wakeup_fill`]), without ever reading from it, and the blunt instruments
//! for the end of the ladder ([`kill_cgroup`], [`descendants`]).
//!
//! Requires Linux ≥ 5.6 (pidfd_getfd), root or ptrace-attach rights over the
//! target for [`ProcessHandle::get_fd`], and read access to /proc/PID/fd.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

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
        // SAFETY: pidfd_open(pid_t, unsigned int) takes no pointers.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
        if ret < 0 {
            return Err(PidfdError::from_errno("pidfd_open", pid, io::Error::last_os_error()));
        }
        // SAFETY: the syscall returned a fresh descriptor that nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(ret as RawFd) };

        // Read the start time only now: the pidfd pins the pid number, so the
        // process this stat describes is the one the pidfd refers to (or the
        // stat is gone because it was reaped in between).
        let found = match read_start_time(pid) {
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
        // SAFETY: NULL siginfo is allowed (the kernel fills in SI_USER).
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if ret < 0 {
            return Err(PidfdError::from_errno("pidfd_send_signal", self.pid, io::Error::last_os_error()));
        }
        Ok(())
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
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ms: libc::c_int = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so a 0.5 ms remainder does not busy-loop.
                    let ms = left.as_micros().div_ceil(1000);
                    ms.min(libc::c_int::MAX as u128) as libc::c_int
                }
            };
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                return pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
            }
            if n == 0 {
                return false;
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // poll on a valid pidfd does not fail otherwise; say "alive"
                // so nobody concludes an exit that did not happen.
                return false;
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
        // SAFETY: pidfd_getfd(int, int, unsigned int) takes no pointers.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.fd.as_raw_fd(), target_fd, 0u32) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EBADF) {
                return Err(PidfdError::NoSuchFd { pid: self.pid, fd: target_fd });
            }
            return Err(PidfdError::from_errno("pidfd_getfd", self.pid, err));
        }
        // SAFETY: fresh descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
    }
}

impl AsFd for ProcessHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22).
pub fn read_start_time(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat_field(&stat, 22)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))
}

/// Field `n` (1-based, as in proc(5)) of a /proc/PID/stat line, for n ≥ 3.
/// comm (field 2) may contain spaces and parentheses: fields after it are
/// counted from the *last* ')'.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

/// Bytes readable from `fd` (ioctl FIONREAD). For a pipe, either end gives the
/// bytes in the pipe; for a socket, the bytes in *its own* receive queue.
pub fn queued_bytes(fd: BorrowedFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
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
    /// `"sock_diag"` (peer's receive queue via NETLINK_SOCK_DIAG) or
    /// `"fionread"` (pidfd_getfd + FIONREAD).
    pub method: &'static str,
}

/// Measures the undrained bytes of `pid`'s wakeup fd `wakeup_fd` (the fd
/// given to `signal.set_wakeup_fd`: the *write* end). Never reads from it.
/// `None` if the process or fd is gone, or the fd is a socket we cannot find
/// in sock_diag, or not a pipe-like fd FIONREAD understands.
pub fn wakeup_fill(pid: u32, wakeup_fd: i32) -> Option<WakeupFill> {
    let target = fs::read_link(format!("/proc/{pid}/fd/{wakeup_fd}")).ok()?;
    let target = target.to_string_lossy();
    if let Some(ino) = socket_inode(&target) {
        // Data of a connected AF_UNIX socket sits on the receiving end's
        // queue: ask for the write end's peer, then for the peer's rqueue.
        let diag = sock_diag::query(pid, ino, sock_diag::SHOW_PEER | sock_diag::SHOW_MEMINFO)?;
        let peer = diag.peer.filter(|&p| p != 0)?;
        let peer_diag = sock_diag::query(pid, peer, sock_diag::SHOW_RQLEN)?;
        let (rqueue, _) = peer_diag.rqlen?;
        let queued = rqueue as u64;
        let capacity_hint = diag.meminfo.as_ref().and_then(|m| {
            let wmem = *m.get(sock_diag::MEMINFO_WMEM_ALLOC)? as u64;
            let sndbuf = *m.get(sock_diag::MEMINFO_SNDBUF)? as u64;
            (queued > 0 && wmem > 0).then(|| (queued * sndbuf).div_ceil(wmem))
        });
        return Some(WakeupFill { queued, capacity_hint, method: "sock_diag" });
    }
    let handle = ProcessHandle::open(pid, None).ok()?;
    let fd = handle.get_fd(wakeup_fd).ok()?;
    let queued = queued_bytes(fd.as_fd()).ok()? as u64;
    let capacity_hint = if target.starts_with("pipe:[") {
        // SAFETY: F_GETPIPE_SZ takes no argument.
        let sz = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
        (sz > 0).then_some(sz as u64)
    } else {
        None
    };
    Some(WakeupFill { queued, capacity_hint, method: "fionread" })
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

/// NETLINK_SOCK_DIAG for AF_UNIX, by hand (linux/unix_diag.h,
/// linux/sock_diag.h, linux/netlink.h). Every length in a reply is
/// bounds-checked; anything malformed gives `None`.
mod sock_diag {
    use std::fs;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicU32, Ordering};

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_HDRLEN: usize = 16;
    const UNIX_DIAG_REQ_LEN: usize = 24;
    const UNIX_DIAG_MSG_LEN: usize = 16;

    pub const SHOW_PEER: u32 = 0x04;
    pub const SHOW_RQLEN: u32 = 0x10;
    pub const SHOW_MEMINFO: u32 = 0x20;

    const UNIX_DIAG_PEER: u16 = 2;
    const UNIX_DIAG_RQLEN: u16 = 4;
    const UNIX_DIAG_MEMINFO: u16 = 5;

    /// Indices into the UNIX_DIAG_MEMINFO u32 array (SK_MEMINFO_*).
    pub const MEMINFO_WMEM_ALLOC: usize = 2;
    pub const MEMINFO_SNDBUF: usize = 3;

    /// What the kernel told us about one AF_UNIX socket.
    #[derive(Debug, Default, PartialEq, Eq)]
    pub struct UnixDiag {
        pub ino: u32,
        pub sock_type: u8,
        pub state: u8,
        /// Inode of the peer (0: unconnected).
        pub peer: Option<u32>,
        /// (rqueue, wqueue): for a non-listening socket, bytes on its receive
        /// queue and its charged send memory (sk_wmem_alloc, truesize).
        pub rqlen: Option<(u32, u32)>,
        pub meminfo: Option<Vec<u32>>,
    }

    static SEQ: AtomicU32 = AtomicU32::new(1);

    /// Looks up socket inode `ino`. Sockets belong to the network namespace
    /// they were created in, and sock_diag only sees its own: if `pid` lives
    /// in another netns, ask there first (a diag socket created in a thread
    /// that joined the target's netns), then in ours.
    pub fn query(pid: u32, ino: u32, show: u32) -> Option<UnixDiag> {
        if ino == 0 {
            return None;
        }
        if !same_netns(pid)
            && let Some(sock) = open_in_netns_of(pid)
            && let Some(d) = query_on(&sock, ino, show)
        {
            return Some(d);
        }
        query_on(&open_socket().ok()?, ino, show)
    }

    fn same_netns(pid: u32) -> bool {
        match (fs::metadata("/proc/self/ns/net"), fs::metadata(format!("/proc/{pid}/ns/net"))) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            // Cannot tell: querying our own netns is all we can do anyway.
            _ => true,
        }
    }

    fn open_in_netns_of(pid: u32) -> Option<OwnedFd> {
        let ns = fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
        // setns(CLONE_NEWNET) affects only the calling thread; a netlink
        // socket keeps the netns it was created in. A throwaway thread.
        std::thread::spawn(move || {
            // SAFETY: valid nsfd; the thread ends right after.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            open_socket().ok()
        })
        .join()
        .ok()
        .flatten()
    }

    fn open_socket() -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2).
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
        // SAFETY: valid option pointer and length.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(fd)
    }

    /// nlmsghdr + struct unix_diag_req for an exact lookup of `ino`.
    pub fn build_request(ino: u32, show: u32, seq: u32) -> Vec<u8> {
        let len = NLMSG_HDRLEN + UNIX_DIAG_REQ_LEN;
        let mut b = Vec::with_capacity(len);
        // struct nlmsghdr
        b.extend_from_slice(&(len as u32).to_ne_bytes()); // nlmsg_len
        b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
        b.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes()); // nlmsg_flags
        b.extend_from_slice(&seq.to_ne_bytes()); // nlmsg_seq
        b.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        // struct unix_diag_req
        b.push(libc::AF_UNIX as u8); // sdiag_family
        b.push(0); // sdiag_protocol
        b.extend_from_slice(&0u16.to_ne_bytes()); // pad
        b.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
        b.extend_from_slice(&ino.to_ne_bytes()); // udiag_ino
        b.extend_from_slice(&show.to_ne_bytes()); // udiag_show
        // udiag_cookie: INET_DIAG_NOCOOKIE (~0U, ~0U) skips the cookie check.
        b.extend_from_slice(&u32::MAX.to_ne_bytes());
        b.extend_from_slice(&u32::MAX.to_ne_bytes());
        debug_assert_eq!(b.len(), len);
        b
    }

    fn query_on(sock: &OwnedFd, ino: u32, show: u32) -> Option<UnixDiag> {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let req = build_request(ino, show, seq);
        // SAFETY: zeroed sockaddr_nl is valid; nl_pid 0 is the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid buffer and address.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent != req.len() as isize {
            return None;
        }
        let mut buf = vec![0u8; 16384];
        // A stray reply to an earlier (timed-out) request could be queued;
        // skip a few of those.
        for _ in 0..4 {
            // SAFETY: valid buffer of buf.len() bytes.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                return None;
            }
            match parse_reply(&buf[..n as usize], seq, ino) {
                Reply::Found(d) => return Some(d),
                Reply::Failed => return None,
                Reply::Other => continue,
            }
        }
        None
    }

    #[derive(Debug, PartialEq, Eq)]
    pub enum Reply {
        Found(UnixDiag),
        /// An error, or the end of the answer without our socket.
        Failed,
        /// Nothing for our request in this datagram.
        Other,
    }

    fn u16_at(b: &[u8], off: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(off..off.checked_add(2)?)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], off: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
    }

    fn align4(n: usize) -> usize {
        n.saturating_add(3) & !3
    }

    /// Parses one datagram of netlink messages.
    pub fn parse_reply(buf: &[u8], seq: u32, ino: u32) -> Reply {
        let mut off = 0usize;
        let mut saw_ours = false;
        while buf.len().saturating_sub(off) >= NLMSG_HDRLEN {
            let (Some(len), Some(ty), Some(mseq)) = (u32_at(buf, off), u16_at(buf, off + 4), u32_at(buf, off + 8))
            else {
                return Reply::Failed;
            };
            let len = len as usize;
            if len < NLMSG_HDRLEN || len > buf.len() - off {
                return if saw_ours { Reply::Failed } else { Reply::Other };
            }
            let msg = &buf[off..off + len];
            off += align4(len);
            if mseq != seq {
                continue;
            }
            saw_ours = true;
            match ty as libc::c_int {
                libc::NLMSG_ERROR => {
                    // struct nlmsgerr { int error; ... }: 0 is an ack.
                    match u32_at(msg, NLMSG_HDRLEN) {
                        Some(0) => continue,
                        _ => return Reply::Failed,
                    }
                }
                libc::NLMSG_DONE => return Reply::Failed,
                _ if ty == SOCK_DIAG_BY_FAMILY => {
                    if let Some(d) = parse_unix_diag_msg(&msg[NLMSG_HDRLEN..])
                        && d.ino == ino
                    {
                        return Reply::Found(d);
                    }
                }
                _ => {}
            }
        }
        if saw_ours { Reply::Failed } else { Reply::Other }
    }

    /// struct unix_diag_msg followed by rtattr-framed attributes.
    fn parse_unix_diag_msg(p: &[u8]) -> Option<UnixDiag> {
        if p.len() < UNIX_DIAG_MSG_LEN || p[0] != libc::AF_UNIX as u8 {
            return None;
        }
        let mut d = UnixDiag { ino: u32_at(p, 4)?, sock_type: p[1], state: p[2], ..Default::default() };
        let mut off = UNIX_DIAG_MSG_LEN;
        while p.len().saturating_sub(off) >= 4 {
            let alen = u16_at(p, off)? as usize;
            // NLA_F_NESTED / NLA_F_NET_BYTEORDER live in the top two bits.
            let aty = u16_at(p, off + 2)? & 0x3fff;
            if alen < 4 || alen > p.len() - off {
                break;
            }
            let payload = &p[off + 4..off + alen];
            match aty {
                UNIX_DIAG_PEER => d.peer = u32_at(payload, 0),
                UNIX_DIAG_RQLEN => {
                    if let (Some(r), Some(w)) = (u32_at(payload, 0), u32_at(payload, 4)) {
                        d.rqlen = Some((r, w));
                    }
                }
                UNIX_DIAG_MEMINFO => {
                    d.meminfo = Some(
                        payload.chunks_exact(4).filter_map(|c| c.try_into().ok().map(u32::from_ne_bytes)).collect(),
                    );
                }
                _ => {}
            }
            off += align4(alen);
        }
        Some(d)
    }
}

/// Kills every process in a cgroup v2 (writes "1" to `<cgroup>/cgroup.kill`,
/// Linux ≥ 5.14). `cgroup_path` is the cgroup's directory, e.g.
/// `/sys/fs/cgroup/system.slice/foo.service`.
pub fn kill_cgroup(cgroup_path: &Path) -> io::Result<()> {
    fs::write(cgroup_path.join("cgroup.kill"), b"1")
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
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        if let Some(ppid) = stat_field(&stat, 4).and_then(|f| f.parse::<u32>().ok()) {
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
pub(crate) mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::MetadataExt;
    use std::process::{Child, Command, Stdio};

    /// Kills and reaps the child when the test ends, pass or fail.
    pub(crate) struct Reaper(pub(crate) Child);

    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sleeper() -> Reaper {
        Reaper(Command::new("sleep").arg("30").spawn().expect("spawn sleep"))
    }

    #[test]
    fn open_signal_wait_exit() {
        let child = sleeper();
        let pid = child.0.id();
        let start = read_start_time(pid).unwrap();
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
        let start = read_start_time(pid).unwrap();
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
        if fs::metadata(format!("/proc/{pid}")).is_err() {
            assert!(matches!(ProcessHandle::open(pid, None), Err(PidfdError::Exited { .. })));
        }
    }

    #[test]
    fn get_fd_missing_fd() {
        let child = sleeper();
        let h = ProcessHandle::open(child.0.id(), None).unwrap();
        assert!(matches!(h.get_fd(987), Err(PidfdError::NoSuchFd { fd: 987, .. })));
        // fd 0 exists: get a duplicate and inspect it without reading.
        let fd = h.get_fd(0).unwrap();
        assert!(fd.as_raw_fd() >= 0);
    }

    /// A Python process that fills a wakeup-like fd until EAGAIN, then
    /// prints "PID WRITE_FD BYTES_WRITTEN" and sleeps.
    fn python_filler(script: &str) -> Option<(Reaper, u32, i32, u64)> {
        let mut child =
            match Command::new("python3").arg("-c").arg(script).stdout(Stdio::piped()).stdin(Stdio::null()).spawn() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("skipping: python3 not runnable: {e}");
                    return None;
                }
            };
        let stdout = child.stdout.take().unwrap();
        let reaper = Reaper(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 3, "unexpected python output {line:?}");
        Some((reaper, f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap()))
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
        let Some((_child, pid, wfd, written)) = python_filler(TRIO_LIKE) else {
            return;
        };
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
        let probe = Command::new("unshare").args(["-n", "true"]).status();
        if !probe.is_ok_and(|s| s.success()) {
            eprintln!("skipping: cannot unshare a network namespace here");
            return;
        }
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
        let Some((_child, pid, wfd, written)) = python_filler(PIPE) else {
            return;
        };
        let fill = wakeup_fill(pid, wfd).expect("wakeup_fill");
        eprintln!("pipe: {written} bytes until EAGAIN; fill {fill:?}");
        assert_eq!(fill.method, "fionread");
        assert!(fill.queued > 0);
        assert_eq!(fill.queued, written);
        assert_eq!(fill.capacity_hint, Some(65536));
        assert_eq!(wakeup_fill(pid, wfd).unwrap().queued, written);
    }

    #[test]
    fn wakeup_fill_missing() {
        let child = sleeper();
        assert_eq!(wakeup_fill(child.0.id(), 999), None);
        assert_eq!(unix_socket_recv_queue(child.0.id(), 0), None); // not a socket
    }

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
    fn kill_cgroup_missing_dir_is_error() {
        assert!(kill_cgroup(Path::new("/nonexistent-sigwake-cgroup")).is_err());
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
    fn sock_diag_parser_rejects_garbage() {
        use sock_diag::{Reply, parse_reply};
        assert_eq!(parse_reply(&[], 1, 5), Reply::Other);
        assert_eq!(parse_reply(&[0xff; 7], 1, 5), Reply::Other);
        // nlmsg_len larger than the buffer.
        let mut b = vec![0u8; 16];
        b[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(parse_reply(&b, 1, 5), Reply::Other);
        // nlmsg_len smaller than a header.
        b[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(parse_reply(&b, 1, 5), Reply::Other);
        // A well-formed diag message whose attribute overruns: no panic,
        // attributes ignored.
        let mut m = Vec::new();
        let body_len = 16 + 16 + 8;
        m.extend_from_slice(&(body_len as u32).to_ne_bytes());
        m.extend_from_slice(&20u16.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&7u32.to_ne_bytes()); // seq
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[libc::AF_UNIX as u8, 1, 1, 0]);
        m.extend_from_slice(&5u32.to_ne_bytes()); // ino
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&200u16.to_ne_bytes()); // rta_len overruns
        m.extend_from_slice(&4u16.to_ne_bytes());
        m.extend_from_slice(&[1, 2, 3, 4]);
        match parse_reply(&m, 7, 5) {
            Reply::Found(d) => {
                assert_eq!(d.ino, 5);
                assert_eq!(d.rqlen, None);
            }
            other => panic!("{other:?}"),
        }
        // Wrong seq: not ours.
        assert_eq!(parse_reply(&m, 8, 5), Reply::Other);
        // Every truncation of a valid message must be handled without panic.
        for cut in 0..m.len() {
            let _ = parse_reply(&m[..cut], 7, 5);
        }
        let req = sock_diag::build_request(5, 0x10, 9);
        assert_eq!(req.len(), 40);
    }
}
