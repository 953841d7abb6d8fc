//! The start-up self-test: proof that the attached hooks see a lost wakeup.
//!
//! A hook can attach and never fire (a kernel function inlined into its
//! callers, a tracepoint compiled out), and then sigwake would be silent
//! exactly when it matters. So after attaching, the agent runs a child of
//! its own (`sigwake __self-test-child`) that fills a non-blocking
//! socketpair, a pipe and an eventfd, installs a handler that sends one
//! byte to the socket with each of write, writev, sendto and sendmsg and
//! writes to the pipe and the eventfd, and signals itself. The kernel
//! programs must report those six failed handler writes, each once, with
//! the right call, fd and signal,
//! the handler's return, and the child's exit. Anything else on the ring
//! buffer meanwhile is kept and handed to the pipeline, not lost.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicI32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData, RingBuf};
use sigwake_common::write_call;

use crate::kernel::events::{Event, EventBody};

/// The hidden subcommand the agent runs itself as.
pub const CHILD_ARG: &str = "__self-test-child";

/// The child's comm, so that other agents' discovery does not record a
/// self-test child as an event loop (it is one, for a few milliseconds).
pub const CHILD_COMM: &str = "sigwake-selftst";

/// How long the whole test may take. Generous: kernels under software
/// emulation (the project's own kernel matrix) are ~20x slower.
const DEADLINE: Duration = Duration::from_secs(20);

/// What the self-test saw, for the start-up report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SelfTestReport {
    pub signal: String,
    /// The calls whose failed handler write to a socket was reported.
    pub calls: Vec<&'static str>,
    /// The failed handler write to a pipe was reported.
    pub pipe: bool,
    /// The failed handler write to an eventfd was reported.
    pub eventfd: bool,
    pub handler_return: bool,
    pub exit: bool,
    pub elapsed_ms: u64,
}

pub struct Outcome {
    pub result: Result<SelfTestReport, String>,
    /// Events of other processes read meanwhile.
    pub others: Vec<Event>,
}

pub fn call_name(call: u32) -> &'static str {
    match call {
        write_call::WRITE => "write",
        write_call::WRITEV => "writev",
        write_call::SENDTO => "sendto",
        write_call::SENDMSG => "sendmsg",
        _ => "unknown",
    }
}

const CALLS: [u32; 4] = [write_call::WRITE, write_call::WRITEV, write_call::SENDTO, write_call::SENDMSG];

/// A signal the kernel programs report under this mask: SIGUSR1 if it is
/// in, else the lowest signal that is (`trace --signal INT` gets SIGINT).
pub fn pick_signal(mask: u64) -> i32 {
    let usr1 = libc::SIGUSR1;
    if mask & (1u64 << (usr1 - 1)) != 0 {
        return usr1;
    }
    // Never SIGKILL or SIGSTOP: they cannot have handlers.
    (1..=64)
        .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
        .find(|&s| mask & (1u64 << (s - 1)) != 0)
        .unwrap_or(usr1)
}

/// Spawns the child, lets it run, and reads the ring buffer until every
/// expected event was seen or the deadline passed.
pub fn run(ring: &mut RingBuf<MapData>, watched: &mut HashMap<MapData, u32, u32>, signal: i32) -> Outcome {
    let mut others = Vec::new();
    let result = run_inner(ring, watched, signal, &mut others);
    Outcome { result, others }
}

fn run_inner(
    ring: &mut RingBuf<MapData>,
    watched: &mut HashMap<MapData, u32, u32>,
    signal: i32,
    others: &mut Vec<Event>,
) -> Result<SelfTestReport, String> {
    let started = Instant::now();
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the sigwake binary to run the self-test: {e}"))?;
    let mut child = Command::new(exe)
        .arg(CHILD_ARG)
        .arg(signal.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the self-test child: {e}"))?;
    let pid = child.id();
    let _reap = KillOnDrop(&mut child);
    // Watched: reported even with --no-discovery, and its exit is reported.
    watched.insert(pid, 0, 0).map_err(|e| format!("watching the self-test child: {e}"))?;
    let result = (|| {
        let stdout = _reap.0.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let ready = rx.recv_timeout(DEADLINE).map_err(|_| "the self-test child did not start".to_string())?;
        let fds: Vec<i32> = ready
            .strip_prefix("ready ")
            .map(|f| f.split(' ').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default();
        let &[fd, pipe_fd, eventfd_fd] = fds.as_slice() else {
            return Err(format!("the self-test child said `{ready}`"));
        };
        let mut stdin = _reap.0.stdin.take().ok_or("no stdin")?;
        stdin.write_all(b"go\n").map_err(|e| format!("starting the self-test: {e}"))?;
        drop(stdin);
        let mut calls = BTreeSet::new();
        let (mut pipe, mut eventfd, mut handler_return, mut exit) = (false, false, false, false);
        // Each failed write must be reported once: two hooks that both see
        // one write (a socket send and the on-demand pipe hook) would
        // count one lost wakeup twice.
        let mut twice = Vec::new();
        let deadline = started + DEADLINE;
        while Instant::now() < deadline && !(calls.len() == CALLS.len() && pipe && eventfd && handler_return && exit) {
            let mut got = false;
            while let Some(item) = ring.next() {
                got = true;
                let Ok(ev) = Event::try_from(&*item) else { continue };
                if ev.subject_pid() != pid && !matches!(&ev.body, EventBody::SignalGenerate(g) if g.sender.pid == pid) {
                    others.push(ev);
                    continue;
                }
                match &ev.body {
                    EventBody::HandlerWrite(w) if w.signal.0 == signal && w.errno() == Some(libc::EAGAIN) => {
                        // Whether this failed write was reported before.
                        let (again, what) = if w.fd == fd {
                            (!calls.insert(w.call), format!("the failed {} to the socket", call_name(w.call)))
                        } else if w.fd == pipe_fd && w.call == write_call::WRITE {
                            (std::mem::replace(&mut pipe, true), "the failed write to the pipe".to_string())
                        } else if w.fd == eventfd_fd && w.call == write_call::WRITE {
                            (std::mem::replace(&mut eventfd, true), "the failed write to the eventfd".to_string())
                        } else {
                            continue;
                        };
                        if again {
                            twice.push(what);
                        }
                    }
                    EventBody::HandlerReturn(r) if r.signal.0 == signal => handler_return = true,
                    EventBody::ProcessExit(_) => exit = true,
                    _ => {}
                }
            }
            if !got {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let report = SelfTestReport {
            signal: crate::kernel::events::Signal(signal).name(),
            calls: CALLS.iter().filter(|c| calls.contains(c)).map(|&c| call_name(c)).collect(),
            pipe,
            eventfd,
            handler_return,
            exit,
            elapsed_ms: started.elapsed().as_millis() as u64,
        };
        let missing: Vec<String> = CALLS
            .iter()
            .filter(|c| !calls.contains(c))
            .map(|&c| format!("a failed {}", call_name(c)))
            .chain((!pipe).then(|| "a failed write to a pipe".to_string()))
            .chain((!eventfd).then(|| "a failed write to an eventfd".to_string()))
            .chain((!handler_return).then(|| "the handler's return".to_string()))
            .chain((!exit).then(|| "the child's exit".to_string()))
            .collect();
        if !twice.is_empty() {
            Err(format!("reported twice: {}", twice.join(", ")))
        } else if missing.is_empty() {
            Ok(report)
        } else {
            Err(format!("not reported within {} s: {}", DEADLINE.as_secs(), missing.join(", ")))
        }
    })();
    let _ = watched.remove(&pid);
    result
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ------------------------------------------------------------------ child

static WAKEUP_FD: AtomicI32 = AtomicI32::new(-1);
static WAKEUP_PIPE: AtomicI32 = AtomicI32::new(-1);
static WAKEUP_EVENTFD: AtomicI32 = AtomicI32::new(-1);

/// The handler: one byte with each call, as event loops' handlers do, to
/// the socket, and one write to the pipe (Twisted's and libuv's way).
/// Only async-signal-safe calls.
extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = WAKEUP_FD.load(Ordering::Relaxed);
    let pipe = WAKEUP_PIPE.load(Ordering::Relaxed);
    let eventfd = WAKEUP_EVENTFD.load(Ordering::Relaxed);
    let one = 1u64.to_ne_bytes();
    let byte = [1u8];
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    let mut iov = libc::iovec { iov_base: byte.as_ptr() as *mut libc::c_void, iov_len: 1 };
    // SAFETY: plain syscalls on our own fd with valid buffers.
    unsafe {
        libc::write(fd, byte.as_ptr().cast(), 1);
        libc::writev(fd, &iov, 1);
        libc::sendto(fd, byte.as_ptr().cast(), 1, flags, std::ptr::null(), 0);
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        libc::sendmsg(fd, &msg, flags);
        libc::write(pipe, byte.as_ptr().cast(), 1);
        libc::write(eventfd, one.as_ptr().cast(), 8);
    }
}

/// `sigwake __self-test-child SIGNO`: fill a socket, a pipe and an eventfd,
/// install the handler, say `ready SOCKET_FD PIPE_FD EVENTFD`, wait for `go`
/// on stdin, signal itself, exit.
pub fn child_main(signal: &str) -> std::process::ExitCode {
    match child(signal) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sigwake self-test child: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn child(signal: &str) -> Result<(), String> {
    let signal: i32 = signal.parse().map_err(|_| format!("bad signal `{signal}`"))?;
    let comm = std::ffi::CString::new(CHILD_COMM).expect("no NUL");
    rustix::thread::set_name(&comm).map_err(|e| format!("naming the self-test child: {e}"))?;
    let mut fds = [0; 2];
    // SAFETY: valid out-pointer for two fds.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(format!("socketpair: {}", std::io::Error::last_os_error()));
    }
    let small: libc::c_int = 1;
    // SAFETY: valid option value; the kernel rounds it up to its minimum.
    unsafe {
        libc::setsockopt(fds[0], libc::SOL_SOCKET, libc::SO_SNDBUF, (&small as *const libc::c_int).cast(), 4);
    }
    // Fill it (a few KiB at most with the minimum buffer): big writes,
    // then single bytes, until even one byte does not fit.
    let chunk = [0u8; 512];
    for len in [chunk.len(), 1] {
        for _ in 0..100_000 {
            // SAFETY: valid buffer of at least `len` bytes.
            if unsafe { libc::write(fds[0], chunk.as_ptr().cast(), len) } < 0 {
                break;
            }
        }
    }
    WAKEUP_FD.store(fds[0], Ordering::Relaxed);
    let mut pipe = [0; 2];
    // SAFETY: valid out-pointer for two fds.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // One page (the least a pipe can hold), then full.
    // SAFETY: fcntl on our own pipe; failure leaves the default size.
    unsafe { libc::fcntl(pipe[1], libc::F_SETPIPE_SZ, 4096) };
    for len in [chunk.len(), 1] {
        for _ in 0..100_000 {
            // SAFETY: valid buffer of at least `len` bytes.
            if unsafe { libc::write(pipe[1], chunk.as_ptr().cast(), len) } < 0 {
                break;
            }
        }
    }
    WAKEUP_PIPE.store(pipe[1], Ordering::Relaxed);
    // An eventfd one short of its limit (2^64 - 2): adding 1 would
    // overflow, so a non-blocking write of 1 fails with EAGAIN.
    // SAFETY: plain syscalls on our own fd with a valid buffer.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
    }
    let near_full = (u64::MAX - 1).to_ne_bytes();
    // SAFETY: as above.
    if unsafe { libc::write(efd, near_full.as_ptr().cast(), 8) } != 8 {
        return Err(format!("filling the eventfd: {}", std::io::Error::last_os_error()));
    }
    WAKEUP_EVENTFD.store(efd, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction with our handler is valid.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        if libc::sigaction(signal, &sa, std::ptr::null_mut()) != 0 {
            return Err(format!("sigaction: {}", std::io::Error::last_os_error()));
        }
    }
    let mut out = std::io::stdout();
    writeln!(out, "ready {} {} {efd}", fds[0], pipe[1]).and_then(|()| out.flush()).map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| e.to_string())?;
    // SAFETY: signals ourselves; the handler runs before kill returns.
    unsafe { libc::kill(libc::getpid(), signal) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_usr1_or_the_lowest_reported_signal() {
        assert_eq!(pick_signal(u64::MAX), libc::SIGUSR1);
        assert_eq!(pick_signal(1 << (libc::SIGINT - 1)), libc::SIGINT);
        let term_and_kill = 1 << (libc::SIGTERM - 1) | 1 << (libc::SIGKILL - 1);
        assert_eq!(pick_signal(term_and_kill), libc::SIGTERM);
    }
}
