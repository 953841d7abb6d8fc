//! Helpers of the escalation and faults suites: an agent with a config
//! file or at a fixed state dir (to restart it), registered starved
//! actors, the incidents and audit lines they leave, processes pinned by
//! (pid, start time), and bystanders that record the signals they get.

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::*;

/// An agent started with a config file (kept alive as long as the agent).
pub struct Agent {
    pub agent: RunningAgent,
    _config_dir: Option<TempDir>,
}

impl std::ops::Deref for Agent {
    type Target = RunningAgent;
    fn deref(&self) -> &RunningAgent {
        &self.agent
    }
}

impl Agent {
    /// `sigwake run --no-discovery [--config FILE with `config`] EXTRA`.
    pub fn start(config: Option<&str>, extra: &[&str]) -> Agent {
        let mut args: Vec<String> = vec!["--no-discovery".into()];
        let dir = config.map(|text| {
            let dir = TempDir::new("escalation-config");
            let path = dir.0.join("sigwake.toml");
            std::fs::write(&path, text).expect("writing the test config");
            args.push("--config".into());
            args.push(path.to_str().unwrap().into());
            dir
        });
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent { agent: RunningAgent::start(&refs), _config_dir: dir }
    }

    pub fn stop(self) {
        self.agent.stop();
    }

    pub fn stderr_tail(&self) -> String {
        self.agent.stderr_tail(40)
    }
}

/// A policy named `default` (what socket-registered actors get) with the
/// given trio confirm window and tiers (TOML inline tables).
pub fn default_policy(confirm: &str, tiers: &[&str]) -> String {
    format!("[policy.default]\nconfirm = \"{confirm}\"\ntiers = [\n  {}\n]\n", tiers.join(",\n  "))
}

pub const DIAG: &str = r#"{ action = "diagnostics", py_spy = false }"#;

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Spawns a fixture that registers with the agent at `socket`, waits for
/// its ready line and checks the registration went through.
pub fn spawn_actor(socket: &Path, script: &str, args: &[&str]) -> (Proc, Value) {
    spawn_actor_with(socket, script, args, |_| {})
}

/// [`spawn_actor`], with `prepare` applied to the command first (a
/// `pre_exec` that moves it into a cgroup, say).
pub fn spawn_actor_with(
    socket: &Path,
    script: &str,
    args: &[&str],
    prepare: impl FnOnce(&mut Command),
) -> (Proc, Value) {
    let mut cmd = Command::new(python());
    cmd.arg(fixtures_dir().join(script)).args(args).current_dir(fixtures_dir()).env("SIGWAKE_SOCKET", socket);
    prepare(&mut cmd);
    let name = format!("{script} {}", args.join(" "));
    let p = Proc::spawn(&name, &mut cmd);
    let ready = p.stdout.wait_json(&format!("{name} ready"), Duration::from_secs(30), |v| v["ready"] == true);
    let reg = p
        .stdout
        .json()
        .into_iter()
        .find(|v| v.get("registered").is_some() || v.get("register_error").is_some())
        .unwrap_or_else(|| panic!("{name}: no registration line before its ready line; stdout: {:?}", p.stdout.json()));
    assert!(reg.get("registered").is_some(), "{name} could not register: {reg}");
    assert_eq!(reg["registered"]["pid"], p.pid(), "{name}: registered as another pid: {reg}");
    (p, ready)
}

/// When the first SIGINT was sent.
pub struct SentAt {
    pub mono_ns: u64,
    pub unix_ns: u64,
    pub instant: Instant,
}

/// Waits for the hog, then sends 10 SIGINTs 20 ms apart (the seed
/// scenario). Returns the hog line and the time of the first SIGINT.
pub fn starve(actor: &Proc) -> (Value, SentAt) {
    let hog = actor.stdout.wait_json("the GIL hog to start", EVENT, |v| v["hogging"] == true);
    let at = SentAt {
        mono_ns: monotonic_ns(),
        unix_ns: SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64,
        instant: Instant::now(),
    };
    sigint_burst(actor.pid(), 10);
    (hog, at)
}

/// GET /incidents, only those of `pid`.
pub fn incidents_of(agent: &RunningAgent, pid: u32) -> Vec<Value> {
    agent.entries_for("/incidents", pid)
}

/// Polls /incidents until an incident of `pid` satisfies `pred`.
pub fn wait_incident(agent: &Agent, what: &str, timeout: Duration, pid: u32, pred: impl Fn(&Value) -> bool) -> Value {
    agent.wait_entry("/incidents", what, timeout, pid, pred)
}

pub fn has_step(incident: &Value, action: &str) -> bool {
    incident["steps"].as_array().is_some_and(|s| s.iter().any(|s| s["action"] == action))
}

/// The step with this action (the first one).
pub fn step<'a>(incident: &'a Value, action: &str) -> &'a Value {
    incident["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["action"] == action))
        .unwrap_or_else(|| panic!("no {action} step in {incident:#}"))
}

/// Audit lines of one incident.
pub fn audit_of(state_dir: &Path, incident: u64) -> Vec<Value> {
    audit_lines(state_dir).into_iter().filter(|l| l["incident"] == incident).collect()
}

pub fn actions(lines: &[Value]) -> Vec<String> {
    lines.iter().map(|l| l["action"].as_str().unwrap_or("?").to_string()).collect()
}

/// `sigwake incidents --state-dir DIR --json`, the real binary.
pub fn cli_incidents(state_dir: &Path) -> Vec<Value> {
    let stdout = sigwake_cli(&["incidents".as_ref(), "--json".as_ref(), "--state-dir".as_ref(), state_dir.as_os_str()]);
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("sigwake incidents --json is not JSON ({e}): {stdout}"));
    v.as_array().unwrap_or_else(|| panic!("sigwake incidents --json is not an array: {stdout}")).clone()
}

/// /proc/PID/stat: (state letter, start time), None if there is no such pid.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let mut f = after.split_whitespace();
    let state = f.next()?.chars().next()?;
    let start = f.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The process (pid, start time) is gone: no such pid, a zombie, or the
/// pid now belongs to another process.
pub fn is_gone(pid: u32, start: u64) -> bool {
    match proc_stat(pid) {
        None => true,
        Some((state, s)) => s != start || state == 'Z' || state == 'X',
    }
}

/// The process (pid, start time) is running (not a zombie, not stopped).
pub fn is_running(pid: u32, start: u64) -> bool {
    proc_stat(pid).is_some_and(|(state, s)| s == start && !matches!(state, 'Z' | 'X' | 'T' | 't'))
}

/// Takes pid `want` for a new process (it must be free): sets
/// ns_last_pid to want-1 and spawns, retrying while other processes on
/// the host take it first. Pids are those of the initial namespace, the
/// agent's view.
pub fn spawn_with_pid(want: u32, make: impl Fn() -> Command, name: &str) -> Proc {
    let mut seen = Vec::new();
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (want - 1).to_string())
            .expect("writing /proc/sys/kernel/ns_last_pid");
        let mut cmd = make();
        let p = Proc::spawn(name, &mut cmd);
        if p.pid() == want {
            return p;
        }
        seen.push(p.pid());
        drop(p); // killed and reaped
    }
    panic!("could not get pid {want} for {name} in 50 attempts (got {seen:?}): another process keeps taking it");
}

pub fn recorder_cmd() -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(fixtures_dir().join("signal_recorder.py")).current_dir(fixtures_dir());
    cmd
}

/// Signals the bystander recorded.
pub fn recorded_signals(p: &Proc) -> Vec<Value> {
    p.stdout.json().into_iter().filter(|v| v.get("signal").is_some()).collect()
}

/// Kills leftover processes (pid, start time) when a test ends, pass or fail.
pub struct KillOnDrop(pub Vec<(u32, u64)>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &(pid, start) in &self.0 {
            if proc_stat(pid).is_some_and(|(_, s)| s == start) {
                // SAFETY: kill(2); the start time was just checked.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// `sigwake run --serve-state` with a fixed state dir, socket and config;
/// ready.
pub fn start_agent_at(addr: &str, socket: &Path, state_dir: &Path, config: &Path) -> Proc {
    start_agent_env(addr, socket, state_dir, config, &[])
}

/// [`start_agent_at`] with extra environment variables.
pub fn start_agent_env(addr: &str, socket: &Path, state_dir: &Path, config: &Path, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(sigwake_bin());
    cmd.envs(env.iter().copied());
    cmd.args(["run", "--no-discovery", "--serve-state", "--listen", addr])
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info");
    let proc = Proc::spawn("sigwake run", &mut cmd);
    let deadline = Instant::now() + scaled(AGENT_START);
    while !matches!(http_get(addr, "/readyz", None), Ok((200, _, _))) {
        if Instant::now() > deadline || proc.stderr.closed() {
            panic!("sigwake run did not become ready; stderr:\n{}", proc.stderr_text());
        }
        thread::sleep(Duration::from_millis(20));
    }
    proc
}

pub fn incidents_at(addr: &str, pid: u32) -> Vec<Value> {
    let (status, _, body) = http_get(addr, "/incidents", None).expect("GET /incidents");
    assert_eq!(status, 200, "GET /incidents: {body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/incidents is not JSON ({e}): {body}"));
    v.as_array().unwrap().iter().filter(|i| i["pid"] == pid).cloned().collect()
}
