//! Faults end to end: the agent SIGKILLed in the middle of each step of
//! an incident and started again, its ring buffer overflowed by a signal
//! storm, its state directory full or read-only, and the subtree tier's
//! cgroup.kill on this host's cgroup layout (v2 wherever it is mounted).
//! Abuse of the registration socket is in registry.rs (garbage, silent
//! clients, floods) and hardening.rs (the HTTP endpoint).
//!
//! Every test starts its own agent (own port, socket and state dir) with
//! `--no-discovery`, and asserts only about processes it started.

use std::{
    ffi::CString,
    os::unix::{
        ffi::OsStrExt as _,
        process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sigwake_tests::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// An agent at a fixed socket, state dir and config, which a test can
/// SIGKILL and start again: the restarted agent finds what the killed one
/// saved, and nothing else.
struct Restartable {
    dir: TempDir,
    addr: String,
    proc: Proc,
}

impl Restartable {
    fn start(tag: &str, config: &str) -> Restartable {
        let dir = TempDir::new(tag);
        std::fs::write(dir.0.join("sigwake.toml"), config).expect("writing the test config");
        let addr = format!("127.0.0.1:{}", free_port());
        let proc = Self::spawn(&dir, &addr);
        Restartable { dir, addr, proc }
    }

    fn spawn(dir: &TempDir, addr: &str) -> Proc {
        start_agent_at(addr, &dir.0.join("registry.sock"), &dir.0.join("state"), &dir.0.join("sigwake.toml"))
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join("registry.sock")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.0.join("state")
    }

    /// SIGKILL: no clean-up of any kind (the socket file stays behind).
    fn kill9(&mut self) {
        self.proc.signal(libc::SIGKILL);
        let st = self.proc.wait_exit(Duration::from_secs(10));
        assert_eq!(st.signal(), Some(libc::SIGKILL), "the agent should have died of SIGKILL: {st}");
    }

    /// A new agent on the same socket, state dir and config (a new port).
    fn restart(&mut self) {
        self.addr = format!("127.0.0.1:{}", free_port());
        self.proc = Self::spawn(&self.dir, &self.addr);
    }

    /// Polls /incidents until an incident of `pid` satisfies `pred`.
    fn wait_incident(&self, what: &str, timeout: Duration, pid: u32, pred: impl Fn(&Value) -> bool) -> Value {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            let list = incidents_at(&self.addr, pid);
            if let Some(i) = list.iter().find(|i| pred(i)) {
                return i.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what} (pid {pid}): {list:#?}\nagent stderr (tail):\n{}",
                    tail(&self.proc.stderr_text(), 40)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        stop_agent(&mut self.proc);
    }
}

fn sigterm_tier(timeout: &str) -> String {
    format!(r#"{{ action = "sigterm", timeout = "{timeout}" }}"#)
}

/// At most one action a minute: the second signal tier of an incident
/// waits (status `deferred`) for most of a minute, a window in which a
/// test can kill the agent in the middle of that tier.
const ONE_ACTION_A_MINUTE: &str = "[escalation]\nmax_actions_per_minute = 1\n";

/// The incidents of `pid` in the state dir, as `sigwake incidents` reads them.
fn saved_incidents(state_dir: &Path, pid: u32) -> Vec<Value> {
    cli_incidents(state_dir).into_iter().filter(|i| i["pid"] == pid).collect()
}

/// How many audit lines of incident `id` have `action`.
fn audit_count(state_dir: &Path, id: u64, action: &str) -> usize {
    audit_of(state_dir, id).iter().filter(|l| l["action"] == action).count()
}

/// The pids on the `children` and `grandchildren` line of escalation_actor.py.
fn descendants_of(actor: &Proc) -> Vec<(u32, u64)> {
    let tree = actor.stdout.json().into_iter().find(|v| v.get("children").is_some()).expect("the children line");
    ["children", "grandchildren"]
        .iter()
        .flat_map(|k| tree[*k].as_array().cloned().unwrap_or_default())
        .map(|p| {
            let p = p.as_u64().unwrap() as u32;
            (p, start_time(p))
        })
        .collect()
}

fn wait_all_gone(what: &str, procs: &[(u32, u64)]) {
    wait_until(what, Duration::from_secs(10), || procs.iter().all(|&(p, s)| is_gone(p, s)));
}

// ---------------------------------------------------------------------------
// (a) The agent SIGKILLed in the middle of each step, then restarted
// ---------------------------------------------------------------------------

/// Killed during the confirm window: nothing was saved (no incident yet),
/// so the restarted agent starts from scratch. Once the actor is
/// registered again (as a supervisor would) and starves on, exactly one
/// incident is opened and its ladder runs once.
#[test]
fn agent_killed_in_the_confirm_wait_opens_exactly_one_incident_after_the_restart() {
    let mut agent = Restartable::start("faults-confirm", &default_policy("5s", &[DIAG, &sigterm_tier("5s")]));
    let (mut actor, ready) =
        spawn_actor(&agent.socket(), "escalation_actor.py", &["--register", "confirm-victim", "--hog-seconds", "60"]);
    let pid = actor.pid();
    let (_, sent) = starve(&actor);
    agent.kill9();
    let killed_after = sent.instant.elapsed();
    assert!(
        saved_incidents(&agent.state_dir(), pid).is_empty(),
        "the agent was killed {killed_after:?} after the first SIGINT, inside the 5 s confirm window: no incident may be saved yet"
    );

    agent.restart();
    let reply = sock_request(
        &agent.socket(),
        &json!({"op": "register", "pid": pid, "name": "confirm-victim", "runtime": "trio", "wakeup_fd": ready["wakeup_fd"]}),
    );
    assert_eq!(reply["ok"], true, "registering the actor again with the new agent: {reply}");
    starve(&actor);
    let status = actor.wait_exit(Duration::from_secs(20));
    assert_eq!(status.signal(), Some(libc::SIGTERM), "the new agent's ladder should end the actor with SIGTERM");
    let inc = agent.wait_incident("the incident to close as exited", EVENT, pid, |i| i["status"] == "exited");
    let saved = saved_incidents(&agent.state_dir(), pid);
    assert_eq!(saved.len(), 1, "one incident for the actor across both agents: {saved:#?}");
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok"], "{inc:#}");
    let id = inc["id"].as_u64().unwrap();
    assert_eq!(audit_count(&agent.state_dir(), id, "opened"), 1, "{:#?}", audit_of(&agent.state_dir(), id));
    agent.stop();
}

/// Killed as soon as the incident is saved — before or while its
/// diagnostics are captured (they take milliseconds; where the kill lands
/// is printed): the restarted agent resumes the incident and captures the
/// diagnostics once, into the same incident directory, then goes on.
#[test]
fn agent_killed_as_the_incident_opens_captures_diagnostics_once_after_the_restart() {
    let mut agent = Restartable::start("faults-diag", &default_policy("1s", &[DIAG, &sigterm_tier("5s")]));
    let (mut actor, _) =
        spawn_actor(&agent.socket(), "escalation_actor.py", &["--register", "diag-victim", "--hog-seconds", "60"]);
    let pid = actor.pid();
    starve(&actor);
    let state = agent.state_dir();
    // Complete lines only: this reads while the agent appends.
    let opened = || {
        let text = std::fs::read_to_string(state.join("audit.jsonl")).unwrap_or_default();
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| l["pid"] == pid && l["action"] == "opened")
    };
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while !opened() {
        assert!(
            Instant::now() < deadline,
            "no incident opened; agent stderr:\n{}",
            tail(&agent.proc.stderr_text(), 40)
        );
        thread::sleep(Duration::from_millis(1));
    }
    agent.kill9();
    let before =
        audit_lines(&state).iter().filter(|l| l["pid"] == pid).map(|l| l["action"].clone()).collect::<Vec<_>>();
    eprintln!("[diagnostics] agent killed with the audit log at {before:?}");
    assert!(!before.iter().any(|a| a == "sigterm"), "killed too late to test this: {before:?}");

    agent.restart();
    let inc = agent
        .wait_incident("the incident to close as exited", Duration::from_secs(20), pid, |i| i["status"] == "exited");
    let status = actor.wait_exit(Duration::from_secs(5));
    assert_eq!(status.signal(), Some(libc::SIGTERM), "the resumed ladder should end the actor with SIGTERM");
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok"], "each step once: {inc:#}");
    let id = inc["id"].as_u64().unwrap();
    for action in ["opened", "diagnostics", "sigterm"] {
        assert_eq!(audit_count(&state, id, action), 1, "{action}: {:#?}", audit_of(&state, id));
    }
    let dir = state.join("incidents").join(id.to_string());
    assert!(dir.join("threads.json").exists(), "the diagnostics should be in {}", dir.display());
    agent.stop();
}

/// Killed in the SIGTERM wait, and the actor dies and its pid is taken by
/// a bystander before the restart: the restarted agent closes the
/// incident (the process it names is gone) and signals nobody.
#[test]
fn agent_killed_in_the_sigterm_wait_never_signals_the_pids_next_owner() {
    let config = default_policy("1s", &[DIAG, &sigterm_tier("10s"), r#"{ action = "sigkill", timeout = "2s" }"#]);
    let mut agent = Restartable::start("faults-sigterm", &config);
    let (mut actor, _) = spawn_actor(
        &agent.socket(),
        "escalation_actor.py",
        &["--register", "sigterm-victim", "--survive-sigterm", "--hog-seconds", "60"],
    );
    let pid = actor.pid();
    starve(&actor);
    let inc = agent.wait_incident("the SIGTERM step", Duration::from_secs(10), pid, |i| has_step(i, "sigterm"));
    let id = inc["id"].as_u64().unwrap();
    agent.kill9();

    actor.signal(libc::SIGKILL);
    actor.wait_exit(Duration::from_secs(10));
    let bystander = spawn_with_pid(pid, recorder_cmd, "bystander on the actor's pid");
    bystander.stdout.wait_json("the bystander ready", Duration::from_secs(30), |v| v["ready"] == true);
    let bystander_start = start_time(pid);
    let _cleanup = KillOnDrop(vec![(pid, bystander_start)]);

    agent.restart();
    let inc = agent.wait_incident("the incident to close", EVENT, pid, |i| i["id"] == id && i["status"] == "exited");
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok"], "no tier after the restart: {inc:#}");
    let closed = audit_of(&agent.state_dir(), id).into_iter().find(|l| l["action"] == "closed_exited");
    let closed =
        closed.unwrap_or_else(|| panic!("no closed_exited audit line: {:#?}", audit_of(&agent.state_dir(), id)));
    assert!(
        closed["detail"].as_str().unwrap_or_default().contains("gone when the agent restarted"),
        "the audit line should say why it closed: {closed:#}"
    );
    // The incident is closed: nothing of it can reach the bystander now.
    assert!(recorded_signals(&bystander).is_empty(), "the bystander got {:?}", recorded_signals(&bystander));
    assert!(is_running(pid, bystander_start), "the bystander must be running: {:?}", proc_stat(pid));
    assert_eq!(audit_count(&agent.state_dir(), id, "sigkill"), 0, "{:#?}", audit_of(&agent.state_dir(), id));
    agent.stop();
}

/// The SIGKILL tier waits for a rate token (one action a minute: SIGTERM
/// took it) and the agent is killed meanwhile. The restarted agent sends
/// the SIGKILL it had not sent — it neither skips the tier nor repeats
/// SIGTERM. (It used to save "SIGKILL tier done" before waiting for the
/// token: the restarted agent skipped the tier and closed the incident as
/// failed with the actor alive.)
#[test]
fn agent_killed_while_the_sigkill_tier_waits_for_its_rate_token_sends_it_after_the_restart() {
    let config = format!(
        "{ONE_ACTION_A_MINUTE}{}",
        default_policy("1s", &[DIAG, &sigterm_tier("1s"), r#"{ action = "sigkill", timeout = "3s" }"#])
    );
    let mut agent = Restartable::start("faults-sigkill", &config);
    let (mut actor, _) = spawn_actor(
        &agent.socket(),
        "escalation_actor.py",
        &["--register", "sigkill-victim", "--survive-sigterm", "--hog-seconds", "60"],
    );
    let pid = actor.pid();
    starve(&actor);
    let inc = agent.wait_incident("the SIGKILL tier waiting for its rate token", Duration::from_secs(15), pid, |i| {
        has_step(i, "sigterm") && i["status"] == "deferred"
    });
    let id = inc["id"].as_u64().unwrap();
    agent.kill9();
    assert!(actor.child.try_wait().unwrap().is_none(), "the actor survives SIGTERM and got no SIGKILL yet");

    agent.restart();
    let status = actor.wait_exit(Duration::from_secs(15));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the restarted agent should send the SIGKILL tier");
    let inc = agent.wait_incident("the incident to close as exited", EVENT, pid, |i| i["status"] == "exited");
    assert_eq!(inc["id"], id, "{inc:#}");
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok", "sigkill:ok"], "{inc:#}");
    for action in ["sigterm", "sigkill"] {
        assert_eq!(audit_count(&agent.state_dir(), id, action), 1, "{action}: {:#?}", audit_of(&agent.state_dir(), id));
    }
    agent.stop();
}

/// As above for the subtree tier: killed while it waits for its rate
/// token, the restarted agent kills the subtree once.
#[test]
fn agent_killed_while_the_subtree_tier_waits_for_its_rate_token_kills_the_subtree_after_the_restart() {
    let config = format!(
        "{ONE_ACTION_A_MINUTE}{}",
        default_policy("1s", &[DIAG, &sigterm_tier("1s"), r#"{ action = "kill_subtree", timeout = "3s" }"#])
    );
    let mut agent = Restartable::start("faults-subtree", &config);
    let (mut actor, _) = spawn_actor(
        &agent.socket(),
        "escalation_actor.py",
        &["--register", "subtree-victim", "--survive-sigterm", "--children", "2", "--hog-seconds", "60"],
    );
    let pid = actor.pid();
    let subtree = descendants_of(&actor);
    assert_eq!(subtree.len(), 2, "two sleep children: {subtree:?}");
    let _cleanup = KillOnDrop(subtree.clone());
    starve(&actor);
    let inc = agent.wait_incident("the subtree tier waiting for its rate token", Duration::from_secs(15), pid, |i| {
        has_step(i, "sigterm") && i["status"] == "deferred"
    });
    let id = inc["id"].as_u64().unwrap();
    agent.kill9();

    agent.restart();
    let status = actor.wait_exit(Duration::from_secs(15));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the restarted agent should kill the subtree and the actor");
    wait_all_gone("the pinned children to be killed", &subtree);
    let inc = agent.wait_incident("the incident to close as exited", EVENT, pid, |i| i["status"] == "exited");
    assert_eq!(inc["id"], id, "{inc:#}");
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok", "kill_subtree:ok"], "{inc:#}");
    assert_eq!(audit_count(&agent.state_dir(), id, "kill_subtree"), 1, "{:#?}", audit_of(&agent.state_dir(), id));
    agent.stop();
}

// ---------------------------------------------------------------------------
// cgroup.kill on this host's cgroup v2 mount
// ---------------------------------------------------------------------------

/// Where cgroup2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on a hybrid layout), from /proc/self/mountinfo.
fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("reading /proc/self/mountinfo");
    info.lines()
        .find(|l| l.split_once(" - ").is_some_and(|(_, fs)| fs.starts_with("cgroup2 ")))
        .and_then(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no cgroup2 filesystem is mounted: this test needs one (mount -t cgroup2 none DIR)"))
}

/// A cgroup v2 of the test's own, removed (once empty) on drop.
struct OwnCgroup(PathBuf);

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let procs = self.0.join("cgroup.procs");
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&procs).is_ok_and(|t| !t.trim().is_empty()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// An actor that owns a cgroup v2 (it and its children are all that is in
/// it) is ended by the subtree tier writing `cgroup.kill` — found under
/// this host's v2 mount, which on a hybrid layout is not /sys/fs/cgroup.
/// (The agent used to look only under /sys/fs/cgroup, found nothing, and
/// killed the descendants one by one.)
#[test]
fn an_actor_owning_a_v2_cgroup_is_stopped_with_cgroup_kill() {
    let cg = OwnCgroup(cgroup2_mount().join(format!("sigwake-faults-{}", std::process::id())));
    std::fs::create_dir(&cg.0).unwrap_or_else(|e| panic!("creating the cgroup {}: {e}", cg.0.display()));
    let agent =
        Agent::start(Some(&default_policy("1s", &[DIAG, r#"{ action = "kill_subtree", timeout = "3s" }"#])), &[]);
    let procs = CString::new(cg.0.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    let (mut actor, _) = spawn_actor_with(
        &agent.socket,
        "escalation_actor.py",
        &["--register", "cgroup-owner", "--children", "2", "--hog-seconds", "60"],
        move |cmd| {
            let join = move || -> std::io::Result<()> {
                // Between fork and exec: no allocation. "0" is the writer itself.
                // SAFETY: open/write/close on a C string we own.
                unsafe {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if n == 1 { Ok(()) } else { Err(err) }
                }
            };
            // SAFETY: the closure only makes async-signal-safe calls.
            unsafe { cmd.pre_exec(join) };
        },
    );
    let pid = actor.pid();
    let rel = format!("/{}", cg.0.file_name().unwrap().to_str().unwrap());
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(own.lines().any(|l| l == format!("0::{rel}")), "the actor should be in {rel}: {own}");
    let subtree = descendants_of(&actor);
    let _cleanup = KillOnDrop(subtree.clone());
    let members = std::fs::read_to_string(cg.0.join("cgroup.procs")).unwrap();
    assert_eq!(members.lines().count(), 3, "the actor and its two children, nothing else: {members}");

    starve(&actor);
    let status = actor.wait_exit(Duration::from_secs(15));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "cgroup.kill SIGKILLs the actor");
    wait_all_gone("the children to die with the cgroup", &subtree);
    let inc = wait_incident(&agent, "the incident to close as exited", EVENT, pid, |i| i["status"] == "exited");
    let detail = step(&inc, "kill_subtree")["detail"].as_str().unwrap_or_default().to_string();
    let want = format!("wrote 1 to {}/cgroup.kill", cg.0.display());
    assert!(detail.contains(&want), "the subtree tier should have used cgroup.kill ({want}); it says: {detail}");
    agent.stop();
}

// ---------------------------------------------------------------------------
// (b) Ring buffer overflow under a signal storm
// ---------------------------------------------------------------------------

fn metric(agent: &RunningAgent, family: &str, labels: &[&str]) -> f64 {
    metric_sum(&agent.metrics(), family, labels)
}

/// The agent is stopped (SIGSTOP: a reader that cannot keep up) while a
/// watched process gets 60,000 SIGUSR1s: each is a `signal_generate`
/// event, 104 bytes on the ring with its header, so the 4 MiB ring
/// overflows after about 40,000 (no smaller ring is needed). Every event is accounted for — the
/// ones read plus the ones counted lost by kind — and the agent, once
/// resumed, still detects a starved loop.
#[test]
fn ring_buffer_overflow_is_counted_by_kind_and_the_agent_still_detects_afterwards() {
    const STORM: u64 = 60_000;
    let agent = RunningAgent::start(&["--no-discovery", "--dry-run"]);
    let (storm, _) = fixture("signal_recorder.py", &[]);
    let target = storm.pid();
    let reply = sock_request(&agent.socket, &json!({"op": "register", "pid": target, "name": "storm-target"}));
    assert_eq!(reply["ok"], true, "{reply}");
    // Watched once one SIGUSR1 is counted for it.
    let generated = |a: &RunningAgent| {
        metric(a, "sigwake_signals_generated_total", &[r#"actor="storm-target""#, r#"signal="SIGUSR1""#])
    };
    let lost =
        |a: &RunningAgent, kind: &str| metric(a, "sigwake_kernel_lost_events_total", &[&format!(r#"kind="{kind}""#)]);
    wait_until("the storm target to be watched", EVENT, || {
        storm.signal(libc::SIGUSR1);
        thread::sleep(Duration::from_millis(50));
        generated(&agent) >= 1.0
    });
    let (g0, l0) = (generated(&agent), lost(&agent, "signal_generate"));

    agent.proc.signal(libc::SIGSTOP);
    for _ in 0..STORM {
        // SAFETY: kill(2) on our own child.
        let rc = unsafe { libc::kill(target as i32, libc::SIGUSR1) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }
    agent.proc.signal(libc::SIGCONT);

    let mut seen = (0.0, 0.0);
    wait_until("every SIGUSR1 of the storm to be read or counted lost", Duration::from_secs(30), || {
        seen = (generated(&agent) - g0, lost(&agent, "signal_generate") - l0);
        seen.0 + seen.1 >= STORM as f64
    });
    let (read, dropped) = seen;
    eprintln!("[overflow] {STORM} signals: {read} read, {dropped} counted lost");
    assert_eq!(read + dropped, STORM as f64, "each signal exactly once, read or lost");
    assert!(dropped > 0.0, "a stopped reader and a 4 MiB ring: the storm must overflow it");
    let text = agent.metrics();
    for kind in ["signal_generate", "signal_deliver", "handler_write", "handler_return", "process_exit"] {
        assert!(
            text.contains(&format!("sigwake_kernel_lost_events_total{{kind=\"{kind}\"}}")),
            "lost events of kind {kind} are exported (0 or more):\n{text}"
        );
    }

    // The agent reads on and still detects a starved loop.
    let (actor, _) =
        spawn_actor(&agent.socket, "escalation_actor.py", &["--register", "after-storm", "--hog-seconds", "60"]);
    starve(&actor);
    wait_until("a dropped wakeup of the actor after the storm", EVENT, || {
        metric(&agent, "sigwake_wakeup_writes_dropped_total", &[r#"actor="after-storm""#]) >= 1.0
    });
    agent.wait_entry("/incidents", "an incident after the storm", EVENT, actor.pid(), |_| true);
    agent.stop();
}

// ---------------------------------------------------------------------------
// (c) The state directory full or read-only
// ---------------------------------------------------------------------------

/// A small tmpfs mounted at a directory, unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "sigwake-test"])
            .arg(at)
            .status()
            .expect("running mount");
        assert!(st.success(), "mounting a tmpfs at {}: {st}", at.display());
        Tmpfs(at.to_path_buf())
    }

    /// Fills it: writes until the filesystem says ENOSPC.
    fn fill(&self) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.0.join("filler")).expect("creating the filler");
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.0.display()),
            }
        }
        let _ = f.sync_all();
    }

    fn remount_read_only(&self) {
        let st = Command::new("mount").args(["-o", "remount,ro"]).arg(&self.0).status().expect("running mount");
        assert!(st.success(), "remounting {} read-only: {st}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The agent's state dir is on `fs`, broken by `break_it` after the agent
/// started: it still detects and escalates (the actor is stopped), says
/// so in its log (`expect_error` in it) and counts the failed writes.
fn state_dir_fault(tag: &str, break_it: impl FnOnce(&Tmpfs), expect_error: &str) {
    let dir = TempDir::new(tag);
    let fs = Tmpfs::mount(&dir.0.join("mnt"), "1m");
    let config = dir.0.join("sigwake.toml");
    std::fs::write(&config, default_policy("1s", &[DIAG, &sigterm_tier("5s")])).unwrap();
    let (addr, socket, state) = (format!("127.0.0.1:{}", free_port()), dir.0.join("registry.sock"), fs.0.join("state"));
    let mut agent = start_agent_at(&addr, &socket, &state, &config);
    break_it(&fs);

    let (mut actor, _) =
        spawn_actor(&socket, "escalation_actor.py", &["--register", &format!("{tag}-victim"), "--hog-seconds", "60"]);
    let pid = actor.pid();
    starve(&actor);
    let status = actor.wait_exit(Duration::from_secs(20));
    assert_eq!(status.signal(), Some(libc::SIGTERM), "escalation goes on without a state dir; stderr:\n{}", {
        tail(&agent.stderr_text(), 30)
    });
    let deadline = Instant::now() + scaled(EVENT);
    let inc = loop {
        if let Some(i) = incidents_at(&addr, pid).into_iter().find(|i| i["status"] == "exited") {
            break i;
        }
        assert!(Instant::now() < deadline, "no closed incident in memory; stderr:\n{}", tail(&agent.stderr_text(), 30));
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(incident_steps(&inc)[1..], ["sigterm:ok"], "{inc:#}");
    assert!(incident_steps(&inc)[0].starts_with("diagnostics:"), "{inc:#}");
    let log = agent.stderr_text();
    assert!(
        log.contains("cannot save incidents") && log.contains(expect_error),
        "the agent must say it cannot save its state, and why ({expect_error}):\n{}",
        tail(&log, 30)
    );
    let (_, _, text) = http_get(&addr, "/metrics", None).expect("GET /metrics");
    let failed = metric_sum(&text, "sigwake_state_write_errors_total", &[r#"file="incidents""#]);
    assert!(failed >= 1.0, "failed saves are counted: {failed}\n{text}");
    stop_agent(&mut agent);
}

#[test]
fn a_full_state_dir_neither_stops_detection_nor_escalation_and_is_reported() {
    state_dir_fault("faults-full", Tmpfs::fill, "No space left on device");
}

#[test]
fn a_read_only_state_dir_neither_stops_detection_nor_escalation_and_is_reported() {
    state_dir_fault("faults-ro", Tmpfs::remount_read_only, "Read-only file system");
}

// ---------------------------------------------------------------------------
// (d) Registration socket: what registry.rs does not cover
// ---------------------------------------------------------------------------

/// Run as `nobody`: opens 40 connections and says nothing on any of them.
/// Prints how many the agent kept (no reply within 0.5 s) and how many it
/// answered `busy`, then waits on the kept ones for the agent's idle
/// timeout: each must get a `timeout` reply and be closed.
const SILENT_FLOOD: &str = r#"
import json, socket, sys, time
path = sys.argv[1]
held, busy = [], 0
for _ in range(40):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(0.5)
    try:
        data = s.recv(4096)
        if b'"busy"' in data:
            busy += 1
        else:
            print(json.dumps({"unexpected": data.decode(errors="replace")}), flush=True)
    except socket.timeout:
        held.append(s)
print(json.dumps({"held": len(held), "busy": busy}), flush=True)
t0 = time.monotonic()
timed_out = 0
for s in held:
    s.settimeout(120)
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    closed = s.recv(4096) == b""
    if b'"timeout"' in data and closed:
        timed_out += 1
print(json.dumps({"timed_out": timed_out, "after_s": time.monotonic() - t0}), flush=True)
"#;

/// One user's flood of silent connections takes at most its share of the
/// socket (32 of 256 slots) and each is dropped after the idle timeout
/// (30 s) with a `timeout` reply; meanwhile root is served. Then an
/// unpaced connect-and-close flood from four threads: the agent's memory
/// stays flat and a good client is served as soon as the flood ends.
#[test]
fn a_users_silent_flood_takes_only_its_share_and_times_out_and_a_connection_flood_leaves_memory_flat() {
    use std::os::unix::fs::PermissionsExt as _;
    let agent = RunningAgent::start(&["--no-discovery"]);
    std::fs::set_permissions(agent.socket.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"]).arg(python()).args(["-c", SILENT_FLOOD]);
    cmd.arg(&agent.socket);
    let mut nobody = Proc::spawn("silent flood as nobody", &mut cmd);
    wait_until("nobody's connection counts", Duration::from_secs(60), || {
        nobody.stdout.json().iter().any(|v| v.get("held").is_some()) || nobody.stdout.closed()
    });
    let counts = nobody.stdout.json().into_iter().find(|v| v.get("held").is_some());
    let counts = counts.unwrap_or_else(|| panic!("the flood as nobody failed: {}", nobody.stderr_text()));
    assert_eq!(counts["held"], 32, "one user holds at most 32 connections: {counts}\n{}", nobody.stderr_text());
    assert_eq!(counts["busy"], 8, "the rest are told `busy`: {counts}");
    let ping = sock_request(&agent.socket, &json!({"op": "ping"}));
    assert_eq!(ping["ok"], true, "root is served while nobody holds its 32: {ping}");

    // The connection flood, while the silent ones wait for their timeout.
    // Three rounds: memory may rise to a high-water mark in the first
    // (allocator arenas), but a per-connection leak grows it every round.
    let flood = |socket: &Path| -> u32 {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let socket = socket.to_path_buf();
                thread::spawn(move || {
                    (0..5_000).filter(|_| std::os::unix::net::UnixStream::connect(&socket).is_ok()).count() as u32
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    };
    let mut rss = vec![rss_kib(agent.proc.pid())];
    for round in 0..3 {
        let connected = flood(&agent.socket);
        assert!(
            connected >= 19_000,
            "round {round}: the flood should have connected (most of) 20,000 times: {connected}"
        );
        let mut reply = Value::Null;
        wait_until("a good client to be served after the flood", Duration::from_secs(10), || {
            reply = SockClient::connect(&agent.socket, Duration::from_secs(5))
                .and_then(|mut c| c.call_raw(r#"{"op":"ping"}"#))
                .unwrap_or(Value::Null);
            reply["ok"] == true
        });
        rss.push(rss_kib(agent.proc.pid()));
    }
    eprintln!("[flood] 3 x 20,000 connections; agent RSS (KiB) before and after each: {rss:?}");
    // The first flood may set a high-water mark (the blocking threads it
    // starts); it was ~90 MiB with a thread per connection up to tokio's
    // 512 and ~40 MiB with one malloc arena per thread. After it, a leak of
    // more than ~200 bytes a connection would show.
    assert!(
        rss[1] < rss[0] + 24 * 1024,
        "a connection flood took the agent from {} to {} KiB (all rounds: {rss:?})",
        rss[0],
        rss[1]
    );
    assert!(
        rss[3] < rss[1] + 8 * 1024,
        "the agent's memory grows with every connection flood (KiB: {rss:?}): a leak per connection"
    );

    let done = nobody
        .stdout
        .wait_json("the silent connections to time out", Duration::from_secs(60), |v| v.get("timed_out").is_some());
    assert_eq!(done["timed_out"], 32, "every silent connection gets `timeout` and is closed: {done}");
    nobody.wait_exit(Duration::from_secs(5));
    agent.stop();
}
