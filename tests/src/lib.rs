//! Harness for the privileged end-to-end tests: spawn the real agent and
//! real Python fixtures, collect their output lines, and wait on
//! conditions with deadlines. Failures panic with what was seen.
//!
//! Run through `cargo xtask test` (as root): it sets SIGWAKE_BIN,
//! SIGWAKE_PYTHON and SIGWAKE_FIXTURES.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

mod ladder;
mod sock;
pub use ladder::*;
pub use sock::*;

/// `timeout` times SIGWAKE_TEST_TIME_SCALE (default 1), for every deadline
/// the harness enforces: slow machines (the TCG guests of `cargo xtask
/// kernels`) set it instead of the tests growing their own margins.
pub fn scaled(timeout: Duration) -> Duration {
    static SCALE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let scale = *SCALE.get_or_init(|| match std::env::var("SIGWAKE_TEST_TIME_SCALE") {
        Err(_) => 1.0,
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or_else(|| panic!("SIGWAKE_TEST_TIME_SCALE={v:?}: expected a positive number")),
    });
    timeout.mul_f64(scale)
}

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is not set: run the end-to-end tests with `cargo xtask test` (as root)"))
}

pub fn sigwake_bin() -> PathBuf {
    env_path("SIGWAKE_BIN")
}

pub fn python() -> PathBuf {
    env_path("SIGWAKE_PYTHON")
}

pub fn fixtures_dir() -> PathBuf {
    env_path("SIGWAKE_FIXTURES")
}

/// CLOCK_MONOTONIC in ns: the clock of the agent's `mono_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A line and the CLOCK_MONOTONIC time the harness read it.
#[derive(Clone, Debug)]
pub struct Line {
    pub text: String,
    pub read_mono_ns: u64,
}

impl Line {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.text).ok()
    }
}

/// Lines of a pipe, collected by a thread as they arrive.
#[derive(Clone, Default)]
pub struct Lines {
    inner: Arc<Mutex<(Vec<Line>, bool)>>,
}

impl Lines {
    fn collect(pipe: impl Read + Send + 'static) -> Self {
        let lines = Lines::default();
        let sink = lines.inner.clone();
        thread::spawn(move || {
            for text in BufReader::new(pipe).lines() {
                let Ok(text) = text else { break };
                let read_mono_ns = monotonic_ns();
                sink.lock().unwrap().0.push(Line { text, read_mono_ns });
            }
            sink.lock().unwrap().1 = true;
        });
        lines
    }

    pub fn snapshot(&self) -> Vec<Line> {
        self.inner.lock().unwrap().0.clone()
    }

    pub fn closed(&self) -> bool {
        self.inner.lock().unwrap().1
    }

    pub fn json(&self) -> Vec<Value> {
        self.snapshot().iter().filter_map(Line::json).collect()
    }

    /// The first line matching `pred`, waiting up to `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Line) -> bool) -> Line {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.snapshot().into_iter().find(|l| pred(l)) {
                return l;
            }
            if Instant::now() > deadline || self.closed() {
                if let Some(l) = self.snapshot().into_iter().find(|l| pred(l)) {
                    return l;
                }
                panic!(
                    "timed out after {timeout:?} (or the stream closed) waiting for {what}; lines so far:\n{}",
                    self.snapshot().iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first JSON line where `pred` holds.
    pub fn wait_json(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(what, timeout, |l| l.json().is_some_and(|v| pred(&v))).json().unwrap()
    }

    pub fn wait_closed(&self, what: &str, timeout: Duration) {
        wait_until(what, timeout, || self.closed());
    }
}

/// Polls `cond` every 10 ms until it holds; panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let timeout = scaled(timeout);
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A child process with collected stdout and stderr; killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        // SIGINT/SIGQUIT ignored by a background launch of the tests would
        // be inherited (see xtask's `test`): a fixture starts with the
        // defaults, as from a terminal.
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                Ok(())
            })
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        let stdout = Lines::collect(child.stdout.take().unwrap());
        let stderr = Lines::collect(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        Proc { name: name.to_string(), child, stdin, stdout, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child, which we have not reaped.
        let rc = unsafe { libc::kill(self.pid() as i32, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed: {}", self.pid(), std::io::Error::last_os_error());
    }

    pub fn write_stdin(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).expect("writing to fixture stdin");
        stdin.flush().unwrap();
    }

    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Waits for exit; returns the exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr.snapshot().iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.snapshot().iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How long an agent may take to load and attach.
pub const AGENT_START: Duration = Duration::from_secs(30);
/// How long an event may take to show up.
pub const EVENT: Duration = Duration::from_secs(10);

/// `--hooks TIER` when SIGWAKE_TEST_HOOKS names one: `cargo xtask test`
/// runs suites a second time on another tier (the socket tier where the
/// kernel has it). When set, the agent must get that tier, not fall back:
/// `hook_tier_is_the_one_asked_for` checks it.
pub fn hooks_args() -> Vec<String> {
    std::env::var("SIGWAKE_TEST_HOOKS").map(|t| vec!["--hooks".to_string(), t]).unwrap_or_default()
}

/// `sigwake trace --format json ARGS`, returned once attached.
pub fn trace(args: &[&str]) -> Proc {
    let mut cmd = Command::new(sigwake_bin());
    cmd.arg("trace").args(hooks_args()).args(args).env("RUST_LOG", "info");
    let p = Proc::spawn("sigwake trace", &mut cmd);
    p.stderr.wait_for("sigwake trace to attach", AGENT_START, |l| l.text.contains("tracing; stop with"));
    p
}

/// Stops an agent with SIGINT and checks it exits cleanly.
pub fn stop_agent(agent: &mut Proc) {
    agent.signal(libc::SIGINT);
    let st = agent.wait_exit(Duration::from_secs(15));
    assert!(st.success(), "{} exited with {st}; stderr:\n{}", agent.name, agent.stderr_text());
}

/// `sigwake ARGS`, the real binary, run to completion; its stdout, which
/// must come with success.
pub fn sigwake_cli(args: &[&OsStr]) -> String {
    let out = Command::new(sigwake_bin()).args(args).output().expect("running sigwake");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sigwake {args:?} failed ({}): stdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A Python fixture from tests/fixtures, returned with its ready line.
pub fn fixture(script: &str, args: &[&str]) -> (Proc, Value) {
    fixture_with_env(script, args, &[])
}

/// [`fixture`] with extra environment variables (e.g. SIGWAKE_SOCKET).
pub fn fixture_with_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> (Proc, Value) {
    let mut cmd = Command::new(python());
    cmd.arg(fixtures_dir().join(script)).args(args).current_dir(fixtures_dir());
    cmd.envs(env.iter().copied());
    let p = Proc::spawn(script, &mut cmd);
    let ready = p.stdout.wait_json(&format!("{script} ready"), Duration::from_secs(30), |v| v["ready"] == true);
    (p, ready)
}

/// The tokio fixture binary (tests/fixtures/tokio_actor, package
/// `sigwake-tokio-actor`), built by `cargo xtask test`, which sets
/// SIGWAKE_TOKIO_ACTOR to its path.
pub fn tokio_actor_bin() -> PathBuf {
    env_path("SIGWAKE_TOKIO_ACTOR")
}

/// The tokio fixture with `args`, returned with its ready line (`pid`,
/// `main_tid`, `wakeup_fd`: the fd its signal handler sends to).
pub fn tokio_actor(args: &[&str]) -> (Proc, Value) {
    let mut cmd = Command::new(tokio_actor_bin());
    cmd.args(args);
    let p = Proc::spawn("sigwake-tokio-actor", &mut cmd);
    let ready = p.stdout.wait_json("sigwake-tokio-actor ready", Duration::from_secs(30), |v| v["ready"] == true);
    (p, ready)
}

/// Drop events (what `--only-drops` prints) for `pid`.
pub fn drops_for(lines: &Lines, pid: u32) -> Vec<Value> {
    lines.json().into_iter().filter(|v| v["event"] == "wakeup_write_failed" && v["pid"] == pid).collect()
}

/// A minimal HTTP/1.1 GET; returns (status, content-type, body).
pub fn http_get(addr: &str, path: &str, accept: Option<&str>) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let ctype = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    Ok((status, ctype, body.to_string()))
}

/// A running `sigwake run` with its own port, socket and state dir.
pub struct RunningAgent {
    pub proc: Proc,
    /// host:port of its HTTP endpoint.
    pub addr: String,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    _dir: TempDir,
}

impl RunningAgent {
    /// Starts `sigwake run --serve-state` with `extra` args and waits for
    /// /readyz: the tests read /actors and /incidents.
    pub fn start(extra: &[&str]) -> RunningAgent {
        let mut args = vec!["--serve-state"];
        args.extend_from_slice(extra);
        Self::start_default(&args)
    }

    /// Starts `sigwake run` with only `extra` args (no `--serve-state`).
    pub fn start_default(extra: &[&str]) -> RunningAgent {
        Self::start_via(&[], extra)
    }

    /// Starts `sigwake run` through a launcher (`prefix`, e.g. `nsenter
    /// --target PID --pid --mount`), with `extra` args.
    pub fn start_via(prefix: &[&str], extra: &[&str]) -> RunningAgent {
        let dir = TempDir::new("agent");
        let addr = format!("127.0.0.1:{}", free_port());
        let socket = dir.0.join("registry.sock");
        let state_dir = dir.0.join("state");
        let mut cmd = match prefix.split_first() {
            Some((launcher, args)) => {
                let mut cmd = Command::new(launcher);
                cmd.args(args).arg(sigwake_bin());
                cmd
            }
            None => Command::new(sigwake_bin()),
        };
        cmd.args(["run", "--listen", &addr])
            .args(hooks_args())
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(extra)
            .env("RUST_LOG", "info");
        let proc = Proc::spawn("sigwake run", &mut cmd);
        let deadline = Instant::now() + scaled(AGENT_START);
        while !matches!(http_get(&addr, "/readyz", None), Ok((200, _, _))) {
            if Instant::now() > deadline || proc.stderr.closed() {
                panic!("sigwake run did not become ready; stderr:\n{}", proc.stderr_text());
            }
            thread::sleep(Duration::from_millis(20));
        }
        RunningAgent { proc, addr, socket, state_dir, _dir: dir }
    }

    pub fn metrics(&self) -> String {
        http_get(&self.addr, "/metrics", Some("application/openmetrics-text")).expect("GET /metrics").2
    }

    pub fn get_json(&self, path: &str) -> Value {
        let (status, _, body) = http_get(&self.addr, path, None).expect("GET");
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
    }

    /// The entries of a JSON-array endpoint (`/actors`, `/incidents`) for `pid`.
    pub fn entries_for(&self, path: &str, pid: u32) -> Vec<Value> {
        let all = self.get_json(path);
        all.as_array()
            .unwrap_or_else(|| panic!("{path} is not a JSON array: {all}"))
            .iter()
            .filter(|e| e["pid"] == pid)
            .cloned()
            .collect()
    }

    /// Polls `path` until an entry for `pid` satisfies `pred`; returns it.
    pub fn wait_entry(
        &self,
        path: &str,
        what: &str,
        timeout: Duration,
        pid: u32,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            let entries = self.entries_for(path, pid);
            if let Some(e) = entries.iter().find(|e| pred(e)) {
                return e.clone();
            }
            if Instant::now() > deadline {
                let err = self.stderr_tail(40);
                panic!(
                    "timed out after {timeout:?} waiting for {what} (pid {pid}); {path} entries for it: {entries:#?}\nagent stderr (tail):\n{err}"
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr_tail(&self, n: usize) -> String {
        let lines = self.proc.stderr.snapshot();
        lines[lines.len().saturating_sub(n)..].iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join("\n")
    }

    pub fn stop(mut self) {
        stop_agent(&mut self.proc);
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("sigwake-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sum of the samples of `family` (e.g. `sigwake_wakeup_writes_dropped_total`)
/// whose label text contains every one of `labels`.
pub fn metric_sum(text: &str, family: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A set-uid-root helper that makes every uid 0 (as `su` or `sudo` do)
/// and execs its arguments, compiled into `dir` (root-owned, mode 4755;
/// `dir` must be on a filesystem that honours set-uid bits).
pub fn setuid_root_helper(dir: &TempDir) -> PathBuf {
    let src = dir.0.join("become_root.c");
    std::fs::write(
        &src,
        "#define _GNU_SOURCE\n#include <unistd.h>\n\
         int main(int argc, char **argv) { (void)argc; if (setresuid(0, 0, 0)) return 111; \
         execv(argv[1], argv + 1); return 112; }\n",
    )
    .unwrap();
    let bin = dir.0.join("become_root");
    let cc = Command::new("cc").arg("-o").arg(&bin).arg(&src).status().expect("running cc");
    assert!(cc.success(), "compiling {}", src.display());
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    bin
}

/// Compiles the C fixture `tests/fixtures/NAME.c` with `cc -O2` into
/// `dir`; returns the binary's path.
pub fn c_fixture(dir: &TempDir, name: &str) -> PathBuf {
    let bin = dir.0.join(name);
    let src = fixtures_dir().join(format!("{name}.c"));
    let cc = Command::new("cc").arg("-O2").arg("-o").arg(&bin).arg(&src).status().expect("running cc (gcc)");
    assert!(cc.success(), "compiling {}", src.display());
    bin
}

/// Sends `n` SIGINTs to `pid`, each once the previous one has been taken
/// off the pending set (its handler is running or has run), and returns how
/// many were taken. kill(2) of a signal still pending is merged into it: on
/// a busy host or a TCG guest a fixed burst with a fixed gap may reach the
/// handler only once or twice and never fill a wakeup socket. Stops early
/// when the process is gone or leaves one pending for `scaled(5 s)` (it
/// blocked SIGINT, or a test's ladder is ending it).
pub fn sigint_burst(pid: u32, n: usize) -> usize {
    let sigint_bit = 1u64 << (libc::SIGINT - 1);
    // SigPnd (the main thread's own) and ShdPnd (the process's), as hex
    // masks; None once the process is gone or a zombie.
    let pending = || -> Option<bool> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        if status.lines().any(|l| l.starts_with("State:") && l.contains("zombie")) {
            return None;
        }
        let mask = |key: &str| {
            status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        Some((mask("SigPnd:")? | mask("ShdPnd:")?) & sigint_bit != 0)
    };
    let patience = scaled(Duration::from_secs(5));
    for taken in 0..n {
        // SAFETY: kill(2) of a test's own fixture, alive as of the last read.
        if unsafe { libc::kill(pid as i32, libc::SIGINT) } != 0 {
            return taken;
        }
        let deadline = Instant::now() + patience;
        loop {
            match pending() {
                None => return taken,
                Some(false) => break,
                Some(true) if Instant::now() > deadline => return taken,
                Some(true) => thread::sleep(Duration::from_micros(100)),
            }
        }
    }
    n
}

/// Registers process `pid` as actor `name` with the agent at `socket`
/// through the Python client, as the test (root) may; no runtime and no
/// wakeup fd given, so the agent learns both. Returns the reply's actor.
pub fn register_pid(socket: &std::path::Path, name: &str, pid: u32) -> Value {
    let client = fixtures_dir().join("../../clients/python");
    let script = "import json, sys\nsys.path.insert(0, sys.argv[1])\nimport sigwake_client\n\
                  with sigwake_client.Client(sys.argv[2]) as c:\n    \
                  print(json.dumps(c.register(sys.argv[3], pid=int(sys.argv[4]))))\n";
    let out = Command::new(python())
        .args(["-c", script])
        .arg(&client)
        .arg(socket)
        .args([name, &pid.to_string()])
        .output()
        .expect("running the Python client");
    assert!(out.status.success(), "registering pid {pid}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the client prints the actor as JSON")
}

/// `/proc/PID/stat` field 22: the start time the agent pins a process by.
/// Panics if the process is gone.
pub fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"));
    let after = &stat[stat.rfind(')').expect("comm in /proc/PID/stat") + 1..];
    after.split_whitespace().nth(19).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no field 22 in {stat}"))
}

/// "action:outcome" of each step of an incident (`/incidents` JSON).
pub fn incident_steps(incident: &Value) -> Vec<String> {
    incident["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("incident without steps: {incident}"))
        .iter()
        .map(|s| format!("{}:{}", s["action"].as_str().unwrap_or("?"), s["outcome"].as_str().unwrap_or("?")))
        .collect()
}

/// `<state_dir>/audit.jsonl`, every line parsed.
pub fn audit_lines(state_dir: &std::path::Path) -> Vec<Value> {
    let path = state_dir.join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: a line is not JSON ({e}): {l}", path.display()))
        })
        .collect()
}
