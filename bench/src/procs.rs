//! Processes the bench starts, and the clocks and /proc readings it takes.
//!
//! Every child runs in its own process group, with a parent-death signal, and
//! is owned by a guard that stops the whole group on drop: an error, a panic
//! or Ctrl-C (which sets a flag every wait loop checks) leaves nothing behind.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM only set a flag: the bench then unwinds through its guards.
pub fn install_interrupt_handler() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; stopping everything the bench started");
    }
    Ok(())
}

/// Sleeps in short slices so that Ctrl-C is noticed.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupt()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns() and of the helpers.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn nproc() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// How a child's stdout/stderr is kept.
pub enum Out {
    Null,
    /// Appended to a log file.
    File(PathBuf),
    /// Lines, each stamped with CLOCK_MONOTONIC when the bench read it.
    Lines,
    /// Collected whole (for short commands).
    Collect,
}

pub struct Spawn {
    pub name: String,
    pub stdin: bool,
    pub stdout: Out,
    pub stderr: Out,
    /// Sent to the process itself first (SIGINT lets the agent detach).
    pub stop_signal: i32,
    pub grace: Duration,
    pub cpu: Option<usize>,
}

impl Spawn {
    pub fn new(name: &str) -> Self {
        Spawn {
            name: name.to_string(),
            stdin: false,
            stdout: Out::Null,
            stderr: Out::Null,
            stop_signal: libc::SIGTERM,
            grace: Duration::from_secs(3),
            cpu: None,
        }
    }
}

pub type Line = (u64, String);

/// A running child and its process group; stopped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    pgid: i32,
    stop_signal: i32,
    grace: Duration,
    pub stdin: Option<ChildStdin>,
    pub stdout_lines: Option<Receiver<Line>>,
    pub stderr_lines: Option<Receiver<Line>>,
    collected: Vec<thread::JoinHandle<Vec<u8>>>,
    status: Option<ExitStatus>,
}

fn stdio_for(out: &Out) -> Result<Stdio> {
    Ok(match out {
        Out::Null => Stdio::null(),
        Out::File(p) => {
            let f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?;
            Stdio::from(f)
        }
        Out::Lines | Out::Collect => Stdio::piped(),
    })
}

fn line_reader<R: std::io::Read + Send + 'static>(r: R) -> Receiver<Line> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = String::new();
        loop {
            buf.clear();
            match r.read_line(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let at = mono_ns();
                    if tx.send((at, buf.trim_end_matches('\n').to_string())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

fn collector<R: std::io::Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

impl Proc {
    pub fn spawn(mut cmd: Command, opts: Spawn) -> Result<Proc> {
        cmd.stdin(if opts.stdin { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(stdio_for(&opts.stdout)?);
        cmd.stderr(stdio_for(&opts.stderr)?);
        cmd.process_group(0);
        let death = if opts.stop_signal == libc::SIGINT { libc::SIGINT } else { libc::SIGKILL };
        let cpu = opts.cpu;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, death as libc::c_ulong, 0, 0, 0);
                if let Some(cpu) = cpu {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let shown = format!("{cmd:?}");
        let mut child = cmd.spawn().with_context(|| format!("starting {} ({shown})", opts.name))?;
        let pgid = child.id() as i32;
        let mut collected = Vec::new();
        let stdout_lines = match opts.stdout {
            Out::Lines => child.stdout.take().map(line_reader),
            Out::Collect => {
                collected.push(collector(child.stdout.take().expect("piped")));
                None
            }
            _ => None,
        };
        let stderr_lines = match opts.stderr {
            Out::Lines => child.stderr.take().map(line_reader),
            Out::Collect => {
                collected.push(collector(child.stderr.take().expect("piped")));
                None
            }
            _ => None,
        };
        let stdin = child.stdin.take();
        Ok(Proc {
            name: opts.name,
            child,
            pgid,
            stop_signal: opts.stop_signal,
            grace: opts.grace,
            stdin,
            stdout_lines,
            stderr_lines,
            collected,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin not piped")?;
        stdin.write_all(line.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// The next stdout line, within `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<Option<Line>> {
        let end = Instant::now() + timeout;
        let rx = self.stdout_lines.as_ref().context("stdout not captured as lines")?;
        loop {
            check_interrupt()?;
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(l) => return Ok(Some(l)),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            }
        }
    }

    /// Waits for a line on stdout or stderr that satisfies `pred`.
    pub fn wait_for_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let end = Instant::now() + timeout;
        loop {
            check_interrupt()?;
            for rx in [&self.stdout_lines, &self.stderr_lines].into_iter().flatten() {
                while let Ok((_, l)) = rx.try_recv() {
                    if pred(&l) {
                        return Ok(l);
                    }
                }
            }
            if let Some(st) = self.exited() {
                bail!("{} exited ({st}) before it was ready", self.name);
            }
            if Instant::now() >= end {
                bail!("{} was not ready within {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            check_interrupt()?;
            if let Some(st) = self.exited() {
                return Ok(st);
            }
            if Instant::now() >= end {
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Collected stdout and stderr (for `Out::Collect`), after exit.
    pub fn take_output(&mut self) -> (String, String) {
        let mut v: Vec<String> = self
            .collected
            .drain(..)
            .map(|h| String::from_utf8_lossy(&h.join().unwrap_or_default()).into_owned())
            .collect();
        let err = if v.len() > 1 { v.pop().unwrap_or_default() } else { String::new() };
        (v.pop().unwrap_or_default(), err)
    }

    /// Stop signal to the process, then SIGKILL to its group after the grace period.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.exited().is_none() {
            // SAFETY: plain syscalls on our own child.
            unsafe { libc::kill(self.child.id() as i32, self.stop_signal) };
            let end = Instant::now() + self.grace;
            while self.exited().is_none() && Instant::now() < end {
                thread::sleep(Duration::from_millis(10));
            }
        }
        // Whatever is left in its group (forked helpers), and the leader if it ignored us.
        // SAFETY: as above.
        unsafe { libc::killpg(self.pgid, libc::SIGKILL) };
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
        self.stdin = None;
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a short command to completion within `timeout`, output collected.
pub fn run_bounded(cmd: Command, name: &str, timeout: Duration, cpu: Option<usize>) -> Result<(String, String)> {
    let mut opts = Spawn::new(name);
    opts.stdout = Out::Collect;
    opts.stderr = Out::Collect;
    opts.cpu = cpu;
    let mut p = Proc::spawn(cmd, opts)?;
    let st = p.wait(timeout)?;
    let (out, err) = p.take_output();
    if !st.success() {
        bail!("{name} failed ({st}): {}", err.trim());
    }
    Ok((out, err))
}

/// What a sleeper holds at [`Sleepers::WAKEUP_FD`].
#[derive(Clone, Copy)]
pub enum Wakeup {
    /// A socket: a Python or tokio loop's wakeup socketpair.
    Socket,
    /// A pipe: a Twisted, libuv or self-pipe loop's.
    Pipe,
}

/// Many trivial long-lived processes (`sleep`) in one process group, killed
/// on drop. Each holds a wakeup fd at [`Sleepers::WAKEUP_FD`], registered as
/// such.
pub struct Sleepers {
    children: Vec<Child>,
    pgid: i32,
}

impl Sleepers {
    pub const WAKEUP_FD: i32 = 3;

    pub fn spawn(n: usize, seconds: u64) -> Result<Sleepers> {
        Self::spawn_with(n, seconds, Wakeup::Socket)
    }

    pub fn spawn_with(n: usize, seconds: u64, wakeup: Wakeup) -> Result<Sleepers> {
        use std::os::fd::{AsRawFd as _, OwnedFd};
        let mut s = Sleepers { children: Vec::with_capacity(n), pgid: 0 };
        for _ in 0..n {
            check_interrupt()?;
            let (mine, theirs): (OwnedFd, OwnedFd) = match wakeup {
                Wakeup::Socket => {
                    let (a, b) = std::os::unix::net::UnixStream::pair().context("socketpair for a sleeper")?;
                    (a.into(), b.into())
                }
                Wakeup::Pipe => {
                    let (r, w) = std::io::pipe().context("pipe for a sleeper")?;
                    (r.into(), w.into())
                }
            };
            let theirs_fd = theirs.as_raw_fd();
            let mut cmd = Command::new("sleep");
            cmd.arg(seconds.to_string()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
            cmd.process_group(s.pgid);
            // SAFETY: async-signal-safe calls only.
            unsafe {
                cmd.pre_exec(move || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                    // dup2 clears FD_CLOEXEC on the copy: it survives exec
                    // (dup2 of an fd onto itself changes nothing: clear it).
                    let rc = if theirs_fd == Self::WAKEUP_FD {
                        libc::fcntl(theirs_fd, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(theirs_fd, Self::WAKEUP_FD)
                    };
                    if rc < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().context("starting `sleep`")?;
            // The sleeper keeps its end; ours closes (1,000 would not fit
            // the default fd limit).
            drop((mine, theirs));
            if s.pgid == 0 {
                s.pgid = child.id() as i32;
            }
            s.children.push(child);
        }
        Ok(s)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Sleepers {
    fn drop(&mut self) {
        if self.pgid > 0 {
            // SAFETY: our own process group.
            unsafe { libc::killpg(self.pgid, libc::SIGKILL) };
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("sigwake-bench-{}-{tag}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Sets a sysctl for the guard's lifetime and restores the old value.
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    pub fn set(name: &str, value: &str) -> Result<Sysctl> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let old = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        fs::write(&path, value).with_context(|| format!("setting {name}={value}"))?;
        Ok(Sysctl { path, old: old.trim().to_string() })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(&self.path, &self.old);
    }
}

/// CPU time of a process (all its threads, including finished ones) and its memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcUsage {
    pub cpu_ns: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn usage(pid: u32) -> Option<ProcUsage> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let stat_ns = ticks * 1_000_000_000 / hz;
    // Per-thread schedstat is ns-precise but forgets exited threads: take the larger.
    let mut sched_ns = 0u64;
    if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("schedstat")) {
                sched_ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(ProcUsage { cpu_ns: stat_ns.max(sched_ns), rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:") })
}

/// One loaded BPF program, as its owner's fdinfo (and bpftool) report it.
#[derive(Clone, Debug, Default)]
pub struct Prog {
    pub id: u32,
    pub prog_type: u32,
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub owners: Vec<(u32, String)>,
}

fn fdinfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok())
}

/// BPF programs held open by `pids` (all processes when `None`), by id.
/// (name, runs, ns) of each program that ran between two snapshots of
/// [`bpf_progs`], sorted by name.
pub fn programs_ran(before: &HashMap<u32, Prog>, after: &HashMap<u32, Prog>) -> Vec<(String, u64, u64)> {
    let mut rows: Vec<(String, u64, u64)> = after
        .values()
        .filter_map(|a| {
            let b = before.get(&a.id)?;
            let runs = a.run_cnt.saturating_sub(b.run_cnt);
            (runs > 0).then(|| (a.name.clone(), runs, a.run_time_ns.saturating_sub(b.run_time_ns)))
        })
        .collect();
    rows.sort();
    rows
}

pub fn bpf_progs(pids: Option<&[u32]>) -> HashMap<u32, Prog> {
    let pids: Vec<u32> = match pids {
        Some(p) => p.to_vec(),
        None => fs::read_dir("/proc")
            .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default(),
    };
    let mut progs: HashMap<u32, Prog> = HashMap::new();
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).ok().and_then(|l| l.to_str().map(|s| s == "anon_inode:bpf-prog")) != Some(true)
            {
                continue;
            }
            let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()))
            else {
                continue;
            };
            let Some(id) = fdinfo_field(&info, "prog_id:") else { continue };
            let p = progs.entry(id as u32).or_insert_with(|| Prog {
                id: id as u32,
                prog_type: fdinfo_field(&info, "prog_type:").unwrap_or(0) as u32,
                name: format!("prog#{id}"),
                run_cnt: fdinfo_field(&info, "run_cnt:").unwrap_or(0),
                run_time_ns: fdinfo_field(&info, "run_time_ns:").unwrap_or(0),
                owners: Vec::new(),
            });
            if !p.owners.iter().any(|(o, _)| *o == pid) {
                p.owners.push((pid, comm.clone()));
            }
        }
    }
    progs
}

/// Fills in program names (and the same counters) from `bpftool prog show`, when installed.
pub fn name_progs(progs: &mut HashMap<u32, Prog>) -> bool {
    let Ok(out) = Command::new("bpftool").args(["prog", "show", "-j"]).stderr(Stdio::null()).output() else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return false };
    for p in v.as_array().into_iter().flatten() {
        let Some(id) = p["id"].as_u64() else { continue };
        if let Some(prog) = progs.get_mut(&(id as u32)) {
            if let Some(n) = p["name"].as_str() {
                prog.name = n.to_string();
            }
            if let Some(c) = p["run_cnt"].as_u64() {
                prog.run_cnt = c;
            }
            if let Some(t) = p["run_time_ns"].as_u64() {
                prog.run_time_ns = t;
            }
        }
    }
    true
}

/// BPF program types that hook tracing points: kprobe, tracepoint, raw tracepoint, tracing.
pub fn is_tracing_prog(t: u32) -> bool {
    matches!(t, 2 | 5 | 17 | 26)
}
