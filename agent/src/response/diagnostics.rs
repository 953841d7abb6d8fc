//! Per-incident diagnostics, captured before anything is killed.
//!
//! [`capture`] writes a snapshot of a (possibly starved) process into an
//! incident directory:
//!
//! | file | content |
//! |---|---|
//! | `threads.json` | per thread: tid, comm, state, wchan, kernel stack, syscall |
//! | `fds.json` | fd → readlink target |
//! | `wakeup.json` | the wakeup fd's fill ([`crate::sys::pidfd::wakeup_fill`]), if one was given |
//! | `status.txt` | a copy of /proc/PID/status |
//! | `py-spy.txt` | `py-spy dump --pid PID`, if asked for and py-spy is in the trusted PATH (`sys/programs.rs`) |
//!
//! The directory is created 0700 and every file 0600 (never through a
//! symlink): they describe processes of other users.
//!
//! Every piece is best-effort: the process may exit mid-capture, kernel
//! stacks need root, py-spy may be missing or hang. Such failures are
//! recorded in [`DiagnosticsSummary::errors`]; only failing to create or
//! write the directory itself is an error. Nothing here reads from the
//! process's descriptors or signals it (py-spy, if run, briefly ptrace-stops
//! it).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{
    response::statedir,
    sys::{
        fdqueue::{self, WakeupFill},
        procinfo, programs,
    },
};

/// Where and how to capture.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// The incident directory (created if missing).
    pub dir: PathBuf,
    /// Run `py-spy dump` if py-spy is in the trusted PATH.
    pub py_spy: bool,
    /// Time limit for py-spy (the /proc reads are not bounded by it).
    pub timeout: Duration,
}

/// Only the incident directory itself can fail a capture.
#[derive(Debug, thiserror::Error)]
pub enum DiagnosticsError {
    /// The incident directory could not be created.
    #[error("cannot create incident directory {}: {source}", dir.display())]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file in the incident directory could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Threads listed in the summary at most; `threads.json` has them all.
const SUMMARY_THREADS: usize = 16;
/// Errors listed in the summary at most.
const SUMMARY_ERRORS: usize = 8;

/// What was captured: small enough to embed in one audit-log line.
#[derive(Clone, Debug, Serialize)]
pub struct DiagnosticsSummary {
    pub dir: PathBuf,
    pub threads: ThreadsSummary,
    /// The wakeup fd's fill, if a wakeup fd was given and could be measured.
    pub wakeup: Option<WakeupFill>,
    /// `"captured"`, `"not installed"`, `"not requested"` or `"failed: …"`.
    pub py_spy: String,
    /// Best-effort pieces that failed, capped (a final "… N more").
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ThreadsSummary {
    pub count: usize,
    /// The first few threads (by tid); `threads.json` has all of them.
    pub list: Vec<ThreadBrief>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ThreadBrief {
    pub tid: u32,
    pub state: String,
    pub wchan: Option<String>,
}

/// One thread, as written to `threads.json`.
#[derive(Clone, Debug, Serialize)]
pub struct ThreadInfo {
    pub tid: u32,
    pub comm: Option<String>,
    /// One letter from /proc/…/stat (R, S, D, T, t, Z, …).
    pub state: Option<String>,
    /// Kernel function the thread sleeps in; `None` if running or unknown.
    pub wchan: Option<String>,
    /// Kernel stack frames (/proc/…/stack, root only).
    pub stack: Option<Vec<String>>,
    /// /proc/…/syscall: number and arguments, "running", or "-1 …" (none).
    pub syscall: Option<String>,
    /// What could not be read for this thread.
    pub errors: Vec<String>,
}

/// Captures diagnostics for `pid` into `opts.dir`. See the module docs.
pub fn capture(
    pid: u32,
    wakeup_fd: Option<i32>,
    opts: &CaptureOptions,
) -> Result<DiagnosticsSummary, DiagnosticsError> {
    // Never through the environment's PATH: the agent runs it as root.
    let py_spy = if opts.py_spy { Some(programs::find("py-spy")) } else { None };
    capture_with(pid, wakeup_fd, opts, py_spy)
}

/// `py_spy`: `None` not requested, `Some(None)` not installed,
/// `Some(Some(path))` run that binary.
fn capture_with(
    pid: u32,
    wakeup_fd: Option<i32>,
    opts: &CaptureOptions,
    py_spy: Option<Option<PathBuf>>,
) -> Result<DiagnosticsSummary, DiagnosticsError> {
    let dir = &opts.dir;
    // Other users' fds, stacks and dumps: readable by the agent's uid only.
    statedir::create_private_dir_all(dir).map_err(|source| DiagnosticsError::CreateDir { dir: dir.clone(), source })?;
    let mut errors = Vec::new();

    // Threads first: they are what changes fastest.
    let threads = read_threads(pid, &mut errors);
    write_json(&dir.join("threads.json"), &threads)?;

    let fds = read_fds(pid, &mut errors);
    write_json(&dir.join("fds.json"), &fds)?;

    let mut wakeup = None;
    if let Some(fd) = wakeup_fd {
        wakeup = fdqueue::wakeup_fill(pid, fd);
        if wakeup.is_none() {
            errors.push(format!("wakeup: cannot measure fd {fd} of pid {pid}"));
        }
        #[derive(Serialize)]
        struct WakeupFile<'a> {
            pid: u32,
            fd: i32,
            target: Option<&'a String>,
            fill: &'a Option<WakeupFill>,
        }
        let target = u32::try_from(fd).ok().and_then(|f| fds.get(&f));
        write_json(&dir.join("wakeup.json"), &WakeupFile { pid, fd, target, fill: &wakeup })?;
    }

    match fs::read(format!("/proc/{pid}/status")) {
        Ok(status) => write_file(&dir.join("status.txt"), &status)?,
        Err(e) => errors.push(format!("status: /proc/{pid}/status: {e}")),
    }

    let py_spy = match py_spy {
        None => "not requested".to_string(),
        Some(None) => "not installed".to_string(),
        Some(Some(bin)) => run_py_spy(&bin, pid, &dir.join("py-spy.txt"), opts.timeout)?,
    };

    let mut list: Vec<ThreadBrief> = threads
        .iter()
        .take(SUMMARY_THREADS)
        .map(|t| ThreadBrief {
            tid: t.tid,
            state: t.state.clone().unwrap_or_else(|| "?".into()),
            wchan: t.wchan.clone(),
        })
        .collect();
    list.shrink_to_fit();
    if errors.len() > SUMMARY_ERRORS {
        let more = errors.len() - (SUMMARY_ERRORS - 1);
        errors.truncate(SUMMARY_ERRORS - 1);
        errors.push(format!("… {more} more"));
    }
    Ok(DiagnosticsSummary {
        dir: dir.clone(),
        threads: ThreadsSummary { count: threads.len(), list },
        wakeup,
        py_spy,
        errors,
    })
}

fn read_threads(pid: u32, errors: &mut Vec<String>) -> Vec<ThreadInfo> {
    let task_dir = format!("/proc/{pid}/task");
    let mut tids: Vec<u32> = match fs::read_dir(&task_dir) {
        Ok(d) => d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect(),
        Err(e) => {
            errors.push(format!("threads: {task_dir}: {e}"));
            return Vec::new();
        }
    };
    tids.sort_unstable();
    let threads: Vec<ThreadInfo> = tids.into_iter().map(|tid| read_thread(pid, tid)).collect();
    // One summary line per kind of failure, not one per thread.
    let mut by_kind: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
    for t in &threads {
        for e in &t.errors {
            let kind = e.split(':').next().unwrap_or("");
            by_kind.entry(kind).or_insert((0, e)).0 += 1;
        }
    }
    for (kind, (n, first)) in by_kind {
        errors.push(format!("threads: {kind} unreadable for {n} of {} threads ({first})", threads.len()));
    }
    threads
}

fn read_thread(pid: u32, tid: u32) -> ThreadInfo {
    let base = format!("/proc/{pid}/task/{tid}");
    let mut errors = Vec::new();
    let mut read = |name: &str| match fs::read_to_string(format!("{base}/{name}")) {
        Ok(s) => Some(s),
        Err(e) => {
            errors.push(format!("{name}: {e}"));
            None
        }
    };
    let stat = read("stat");
    let wchan = read("wchan");
    let stack = read("stack");
    let syscall = read("syscall");
    let (comm, state) = match stat.as_deref().and_then(procinfo::parse_stat) {
        Some(s) => (Some(s.comm), Some(s.state)),
        None => (None, None),
    };
    ThreadInfo {
        tid,
        comm,
        state,
        // "0" (or empty) means not sleeping in the kernel.
        wchan: wchan.map(|w| w.trim().to_string()).filter(|w| !w.is_empty() && w != "0"),
        stack: stack.map(|s| s.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()),
        syscall: syscall.map(|s| s.trim().to_string()),
        errors,
    }
}

/// comm and state from a /proc/…/stat line: comm is between the first '('
/// and the *last* ')' (it may contain both); state follows.
fn read_fds(pid: u32, errors: &mut Vec<String>) -> BTreeMap<u32, String> {
    let fd_dir = format!("/proc/{pid}/fd");
    let mut fds = BTreeMap::new();
    match fs::read_dir(&fd_dir) {
        Ok(d) => {
            for e in d.flatten() {
                let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                // Closed between listing and readlink: skip silently.
                if let Ok(target) = fs::read_link(e.path()) {
                    fds.insert(fd, target.to_string_lossy().into_owned());
                }
            }
        }
        Err(e) => errors.push(format!("fds: {fd_dir}: {e}")),
    }
    fds
}

/// Runs `py-spy dump --pid PID` with output into `out`, killing it after
/// `timeout`. Never fails the capture, except for not being able to create
/// `out` in the incident directory.
fn run_py_spy(bin: &Path, pid: u32, out: &Path, timeout: Duration) -> Result<String, DiagnosticsError> {
    let write_err = |source| DiagnosticsError::Write { path: out.to_path_buf(), source };
    let file = statedir::create_private(out).map_err(write_err)?;
    let file2 = file.try_clone().map_err(write_err)?;
    let mut child = match Command::new(bin)
        .args(["dump", "--pid", &pid.to_string()])
        .env("PATH", programs::TRUSTED_PATH)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(file2)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Ok(format!("failed: cannot run {}: {e}", bin.display())),
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(format!("failed: timed out after {:.1}s", timeout.as_secs_f64()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(format!("failed: {e}"));
            }
        }
    };
    if status.success() {
        return Ok("captured".to_string());
    }
    let last = fs::read_to_string(out)
        .ok()
        .and_then(|s| s.lines().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_string()))
        .map(|l| format!(": {}", truncate(&l, 200)))
        .unwrap_or_default();
    Ok(format!("failed: {status}{last}"))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), DiagnosticsError> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| DiagnosticsError::Write { path: path.to_path_buf(), source: io::Error::other(e) })?;
    bytes.push(b'\n');
    write_file(path, &bytes)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), DiagnosticsError> {
    statedir::write_private(path, bytes).map_err(|source| DiagnosticsError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::pidfd::tests::Reaper;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Barrier};

    fn opts(dir: &Path, py_spy: bool) -> CaptureOptions {
        CaptureOptions { dir: dir.to_path_buf(), py_spy, timeout: Duration::from_secs(2) }
    }

    fn read_json(path: &Path) -> serde_json::Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    /// Waits until the child sleeps in nanosleep (not still in exec or the
    /// dynamic loader), so state, wchan and stack are deterministic.
    fn wait_sleeping(pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let stat = procinfo::stat(pid).ok();
            let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            if stat.is_some_and(|s| s.comm == "sleep" && s.state == "S") && wchan.contains("sleep") {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("pid {pid} never went to sleep");
    }

    #[test]
    fn sleep_child() {
        let child = Reaper(Command::new("sleep").arg("30").stdin(Stdio::null()).spawn().unwrap());
        let pid = child.0.id();
        wait_sleeping(pid);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("incident-1"); // created by capture
        let s = capture_with(pid, Some(0), &opts(&dir, false), None).unwrap();

        assert_eq!(s.dir, dir);
        assert_eq!(s.threads.count, 1);
        assert_eq!(s.threads.list[0].tid, pid);
        assert_eq!(s.threads.list[0].state, "S");
        assert!(s.threads.list[0].wchan.is_some(), "{s:?}");
        assert_eq!(s.py_spy, "not requested");

        let threads = read_json(&dir.join("threads.json"));
        let t = &threads[0];
        assert_eq!(t["tid"], pid);
        assert_eq!(t["comm"], "sleep");
        assert_eq!(t["state"], "S");
        // Running as root: the kernel stack is readable and shows the sleep.
        if unsafe { libc::geteuid() } == 0 {
            let stack = t["stack"].as_array().unwrap();
            assert!(!stack.is_empty(), "{t}");
            assert!(stack.iter().any(|f| f.as_str().unwrap().contains("sleep")), "{t}");
            // clock_nanosleep is syscall 230 on x86_64, 115 on aarch64.
            assert!(t["syscall"].as_str().is_some_and(|s| !s.is_empty()), "{t}");
            assert!(!s.errors.iter().any(|e| e.starts_with("threads:")), "{:?}", s.errors);
        }

        let fds = read_json(&dir.join("fds.json"));
        assert!(fds.get("0").is_some() && fds.get("1").is_some() && fds.get("2").is_some(), "{fds}");

        let status = fs::read_to_string(dir.join("status.txt")).unwrap();
        assert!(status.starts_with("Name:\tsleep"), "{status}");

        // fd 0 is /dev/null: FIONREAD fails there, recorded, not fatal.
        let wakeup = read_json(&dir.join("wakeup.json"));
        assert_eq!(wakeup["fd"], 0);
        assert_eq!(wakeup["target"], "/dev/null");
        assert!(s.wakeup.is_none());
        assert_eq!(s.errors, vec![format!("wakeup: cannot measure fd 0 of pid {pid}")]);

        // The summary fits one log line.
        let line = serde_json::to_string(&s).unwrap();
        assert!(line.len() < 2000, "{line}");
    }

    #[test]
    fn this_process_with_threads() {
        const EXTRA: usize = 3;
        let barrier = Arc::new(Barrier::new(EXTRA + 1));
        let done = Arc::new(Barrier::new(EXTRA + 1));
        let mut tids = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let handles: Vec<_> = (0..EXTRA)
            .map(|_| {
                let (b, d, tx) = (barrier.clone(), done.clone(), tx.clone());
                std::thread::spawn(move || {
                    tx.send(unsafe { libc::gettid() } as u32).unwrap();
                    b.wait();
                    d.wait();
                })
            })
            .collect();
        barrier.wait();
        for _ in 0..EXTRA {
            tids.push(rx.recv().unwrap());
        }
        let tmp = tempfile::tempdir().unwrap();
        let s = capture_with(std::process::id(), None, &opts(tmp.path(), true), Some(None)).unwrap();
        done.wait();
        for h in handles {
            h.join().unwrap();
        }

        assert!(s.threads.count > EXTRA, "{s:?}");
        assert_eq!(s.py_spy, "not installed");
        assert!(s.wakeup.is_none());
        assert!(!tmp.path().join("wakeup.json").exists());
        assert!(!tmp.path().join("py-spy.txt").exists());
        let threads = read_json(&tmp.path().join("threads.json"));
        let listed: Vec<u64> = threads.as_array().unwrap().iter().map(|t| t["tid"].as_u64().unwrap()).collect();
        assert_eq!(listed.len(), s.threads.count);
        assert!(listed.contains(&(std::process::id() as u64)));
        for tid in tids {
            assert!(listed.contains(&(tid as u64)), "tid {tid} missing from {listed:?}");
        }
        assert!(s.threads.list.len() <= SUMMARY_THREADS);
    }

    #[test]
    fn gone_process_is_recorded_not_fatal() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let s = capture_with(pid, Some(3), &opts(tmp.path(), false), None).unwrap();
        assert_eq!(s.threads.count, 0);
        assert!(s.errors.iter().any(|e| e.starts_with("threads:")), "{:?}", s.errors);
        assert!(s.errors.iter().any(|e| e.starts_with("status:")), "{:?}", s.errors);
        assert!(s.errors.iter().any(|e| e.starts_with("wakeup:")), "{:?}", s.errors);
    }

    #[test]
    fn unwritable_dir_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a-file");
        fs::write(&file, b"x").unwrap();
        let r = capture(std::process::id(), None, &opts(&file.join("sub"), false));
        assert!(matches!(r, Err(DiagnosticsError::CreateDir { .. })), "{r:?}");
    }

    fn fake_py_spy(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("py-spy");
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn py_spy_runner() {
        let bin_dir = tempfile::tempdir().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();

        let ok = fake_py_spy(bin_dir.path(), r#"echo "Thread $3 (idle)""#);
        let s = capture_with(me, None, &opts(tmp.path(), true), Some(Some(ok))).unwrap();
        assert_eq!(s.py_spy, "captured");
        assert_eq!(fs::read_to_string(tmp.path().join("py-spy.txt")).unwrap(), format!("Thread {me} (idle)\n"));

        let bad = fake_py_spy(bin_dir.path(), "echo 'Error: Permission denied' >&2; exit 1");
        let s = capture_with(me, None, &opts(tmp.path(), true), Some(Some(bad))).unwrap();
        assert!(s.py_spy.starts_with("failed: exit status: 1"), "{}", s.py_spy);
        assert!(s.py_spy.ends_with("Error: Permission denied"), "{}", s.py_spy);

        let hang = fake_py_spy(bin_dir.path(), "exec sleep 30");
        let mut o = opts(tmp.path(), true);
        o.timeout = Duration::from_millis(200);
        let t0 = Instant::now();
        let s = capture_with(me, None, &o, Some(Some(hang))).unwrap();
        assert!(s.py_spy.starts_with("failed: timed out"), "{}", s.py_spy);
        assert!(t0.elapsed() < Duration::from_secs(5));

        let s = capture_with(me, None, &opts(tmp.path(), true), Some(Some(bin_dir.path().join("nope")))).unwrap();
        assert!(s.py_spy.starts_with("failed: cannot run"), "{}", s.py_spy);
    }

    /// Diagnostics describe other users' processes: the incident dir (and
    /// `incidents/` above it) are 0700, each file 0600, whatever the umask,
    /// and a file planted as a symlink is not written through.
    #[test]
    fn the_capture_is_private_whatever_the_umask_and_never_follows_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let bin_dir = tempfile::tempdir().unwrap();
        let py_spy = fake_py_spy(bin_dir.path(), "echo dumped");
        let dir = tmp.path().join("incidents").join("1");
        crate::response::statedir::tests::with_umask_0(|| {
            capture_with(std::process::id(), Some(0), &opts(&dir, true), Some(Some(py_spy))).unwrap();
        });
        let mode = crate::response::statedir::tests::mode;
        assert_eq!(mode(&tmp.path().join("incidents")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        for f in ["threads.json", "fds.json", "wakeup.json", "status.txt", "py-spy.txt"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious\n").unwrap();
        let again = tmp.path().join("incidents").join("2");
        fs::create_dir(&again).unwrap();
        std::os::unix::fs::symlink(&victim, again.join("threads.json")).unwrap();
        let r = capture_with(std::process::id(), None, &opts(&again, false), None);
        assert!(matches!(r, Err(DiagnosticsError::Write { .. })), "{r:?}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious\n");
    }
}
