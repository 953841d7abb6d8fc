//! The agent inside a pid namespace of its own — the shape of a sidecar in
//! a pod with `shareProcessNamespace: true` — sees other pids than the
//! kernel's. Here the "pod" is a namespace made with `unshare --pid --fork
//! --mount-proc`; the agent, a starved trio actor and bystanders run in it
//! through `nsenter`, as containers of one pod do.
//!
//! The collision is arranged on purpose: a bystander in the namespace gets
//! the namespace pid equal to the actor's host pid (through
//! /proc/sys/kernel/ns_last_pid). An agent that took the kernel's pids for
//! its own blamed, and signalled, that bystander.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use sigwake_tests::*;

const EVENT: Duration = Duration::from_secs(10);

/// A pid namespace held open by its init (`sleep`); everything in it is
/// killed when the init is, on drop.
struct Namespace {
    _holder: Proc,
    /// Host pid of the namespace's pid 1.
    init: u32,
}

impl Namespace {
    fn new() -> Namespace {
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child", "sleep", "3600"]);
        let holder = Proc::spawn("unshare --pid", &mut cmd);
        let children = format!("/proc/{0}/task/{0}/children", holder.pid());
        let mut init = None;
        wait_until("the namespace's init to start", Duration::from_secs(10), || {
            init = std::fs::read_to_string(&children).ok().and_then(|c| c.split_whitespace().next()?.parse().ok());
            init.is_some()
        });
        let init = init.unwrap();
        assert_eq!(nspids(init).last(), Some(&1), "the namespace's first process is its pid 1");
        Namespace { _holder: holder, init }
    }

    /// `nsenter` into the namespace (pid and mount, so /proc is its own).
    fn enter(&self) -> Vec<String> {
        ["nsenter", "--target", &self.init.to_string(), "--pid", "--mount", "--"].map(String::from).to_vec()
    }

    fn command(&self, program: &Path) -> Command {
        let enter = self.enter();
        let mut cmd = Command::new(&enter[0]);
        cmd.args(&enter[1..]).arg(program);
        cmd
    }

    /// Host pid of the process whose pid in this namespace is `nspid`.
    fn host_pid(&self, nspid: u32) -> u32 {
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.init)).expect("the namespace's inode");
        let mut found = None;
        wait_until(&format!("namespace pid {nspid} to appear on the host"), Duration::from_secs(10), || {
            found = std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .find(|&pid: &u32| {
                    std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|l| l == ns)
                        && nspids(pid).last() == Some(&nspid)
                });
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // A namespace's init dying takes every process in it along.
        unsafe { libc::kill(self.init as i32, libc::SIGKILL) };
    }
}

/// `NSpid` of a host pid: its pid at every level, the host's first.
fn nspids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

/// A Python fixture started in `ns`, with its ready line.
fn fixture_in(ns: &Namespace, script: &str, args: &[&str], env: &[(&str, &str)]) -> (Proc, Value) {
    let mut cmd = ns.command(&python());
    // (nsenter --mount starts it at the namespace's root directory: paths
    // are absolute.)
    cmd.arg(fixtures_dir().join(script)).args(args).envs(env.iter().copied());
    let p = Proc::spawn(script, &mut cmd);
    let ready = p.stdout.wait_json(&format!("{script} ready"), scaled(Duration::from_secs(30)), |v| v["ready"] == true);
    (p, ready)
}

fn field_u32(v: &Value, key: &str) -> u32 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}")) as u32
}

/// A bystander in `ns` whose namespace pid is `wanted` (the actor's host
/// pid: what an agent reporting kernel pids would blame), made by setting
/// the namespace's last pid just before forking it. Another task of the
/// namespace (an agent thread) can take the pid first: then it is tried
/// again.
fn colliding_bystander(ns: &Namespace, wanted: u32) -> (Proc, u32) {
    let setup = format!(
        "import subprocess, sys\nopen('/proc/sys/kernel/ns_last_pid', 'w').write('{}')\n\
         sys.exit(subprocess.call([sys.executable, {:?}]))",
        wanted - 1,
        fixtures_dir().join("signal_recorder.py")
    );
    let mut got = Vec::new();
    for _ in 0..5 {
        let mut cmd = ns.command(&python());
        cmd.args(["-c", &setup]);
        let bystander = Proc::spawn("signal_recorder.py", &mut cmd);
        wait_until("the bystander to start", scaled(Duration::from_secs(30)), || {
            bystander.stdout.json().iter().any(|v| v["ready"] == true) || bystander.stdout.closed()
        });
        let ready = bystander.stdout.json().into_iter().find(|v| v["ready"] == true).unwrap_or_else(|| {
            panic!("the bystander did not start: {}", bystander.stderr_text());
        });
        let nspid = field_u32(&ready, "pid");
        if nspid == wanted {
            return (bystander, nspid);
        }
        got.push(nspid);
    }
    panic!("no bystander got namespace pid {wanted} in 5 tries (got {got:?})");
}

#[test]
fn agent_in_a_shared_pid_namespace_blames_and_stops_the_starved_actor_never_the_colliding_bystander() {
    let ns = Namespace::new();
    let agent = RunningAgent::start_via(&ns.enter().iter().map(String::as_str).collect::<Vec<_>>(), &["--serve-state"]);
    let socket = agent.socket.to_str().unwrap().to_string();

    // The actor registers over the socket from inside the namespace.
    let (actor, ready) = fixture_in(
        &ns,
        "escalation_actor.py",
        &["--register", "nsfetcher", "--hog-seconds", "60"],
        &[("SIGWAKE_SOCKET", &socket)],
    );
    let actor_nspid = field_u32(&ready, "pid");
    let actor_host = ns.host_pid(actor_nspid);
    assert_ne!(actor_nspid, actor_host, "the actor must have different pids in and out of the namespace");

    // The hog first: its thread takes a pid too, and must not take the
    // bystander's.
    actor.stdout.wait_json("the GIL hog to start", EVENT, |v| v["hogging"] == true);
    let (bystander, by_nspid) = colliding_bystander(&ns, actor_host);

    // The seed scenario: 10 SIGINTs to the starved loop.
    sigint_burst(actor_host, 10);
    let mut actor = actor;
    let status = actor.wait_exit(scaled(Duration::from_secs(10)));
    assert_eq!(status.signal(), Some(libc::SIGTERM), "the sidecar should have stopped the actor with SIGTERM");

    // The incident names the actor by its namespace pid and name.
    let inc = agent
        .wait_entry("/incidents", "the actor's incident to close", EVENT, actor_nspid, |i| i["status"] == "exited");
    assert_eq!(inc["actor"], "nsfetcher", "{inc:#}");
    let m = agent.metrics();
    assert!(
        metric_sum(&m, "sigwake_wakeup_writes_dropped_total", &[r#"actor="nsfetcher""#]) >= 1.0,
        "the drops must be the actor's: {m}"
    );
    assert!(agent.entries_for("/incidents", by_nspid).is_empty(), "no incident for the bystander");

    // The bystander got nothing and lives.
    thread::sleep(Duration::from_millis(300));
    let signals: Vec<Value> = bystander.stdout.json().into_iter().filter(|v| v.get("signal").is_some()).collect();
    assert!(signals.is_empty(), "the bystander was signalled: {signals:?}");
    assert!(Path::new(&format!("/proc/{}", ns.host_pid(by_nspid))).exists(), "the bystander must be alive");
    // The agent goes with the namespace (nsenter does not pass SIGINT on).
    drop(ns);
}

/// A process outside the agent's namespace — a starved trio loop on the
/// host — is never listed, attributed or signalled by it.
#[test]
fn agent_in_a_pid_namespace_never_sees_processes_outside_it() {
    let ns = Namespace::new();
    let enter = ns.enter();
    let trace = Proc::spawn(
        "sigwake trace in the namespace",
        Command::new(&enter[0]).args(&enter[1..]).arg(sigwake_bin()).args(["trace", "--only-drops"]),
    );
    trace.stderr.wait_for("trace to start", scaled(Duration::from_secs(30)), |l| l.text.contains("tracing"));

    // Drops on the host: invisible to the agent in the namespace…
    let (host_actor, _) = fixture("trio_actor.py", &["--hog-seconds", "3"]);
    host_actor.stdout.wait_json("the host actor's hog", EVENT, |v| v["hogging"] == true);
    sigint_burst(host_actor.pid(), 10);
    // …while the same scenario inside it is seen, at its namespace pid.
    let (inner, ready) = fixture_in(&ns, "trio_actor.py", &["--hog-seconds", "3"], &[]);
    let inner_nspid = field_u32(&ready, "pid");
    let inner_host = ns.host_pid(inner_nspid);
    inner.stdout.wait_json("the inner actor's hog", EVENT, |v| v["hogging"] == true);
    sigint_burst(inner_host, 10);
    let drop = trace.stdout.wait_json("the inner actor's drop", EVENT, |v| v["event"] == "wakeup_write_failed");
    assert_eq!(drop["pid"], inner_nspid, "reported at its namespace pid: {drop}");
    // Give any stray host event time to arrive, then check there is none.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let pids: Vec<u64> = trace.stdout.json().iter().filter_map(|v| v["pid"].as_u64()).collect();
    assert!(pids.iter().all(|&p| p == inner_nspid as u64), "only the namespace's actor may appear: {pids:?}");
    trace.signal(libc::SIGINT);
}

/// A client speaking the registration protocol: sends each request line,
/// prints {"child": pid, "replies": [...]} where `child` is a `sleep` it
/// started (so it has a process of its own namespace to name).
const CLIENT: &str = r#"
import json, socket, subprocess, sys
child = subprocess.Popen(["sleep", "60"])
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
replies = []
for req in sys.argv[2:]:
    f.write(req.replace("CHILD", str(child.pid)) + "\n")
    f.flush()
    replies.append(json.loads(f.readline()))
print(json.dumps({"ready": True, "child": child.pid, "replies": replies}), flush=True)
sys.stdin.read()
"#;

fn client_in(ns: Option<&Namespace>, launcher: &[&str], socket: &Path, requests: &[&str]) -> (Proc, Value) {
    let mut cmd = match ns {
        Some(ns) => ns.command(Path::new(launcher[0])),
        None => Command::new(launcher[0]),
    };
    cmd.args(&launcher[1..]).arg(python()).args(["-c", CLIENT]).arg(socket).args(requests);
    let p = Proc::spawn("registration client", &mut cmd);
    let out = p.stdout.wait_json("the client's replies", scaled(Duration::from_secs(20)), |v| v["ready"] == true);
    (p, out)
}

/// The node-agent shape (the agent in the host's namespace, hostPID): a
/// client in a pod's namespace names processes by its own pids, is told its
/// own pids back, and cannot name a process outside its namespace.
#[test]
fn a_client_in_a_nested_pid_namespace_registers_by_its_own_pids_and_sees_nothing_outside() {
    let ns = Namespace::new();
    let agent = RunningAgent::start(&[]);
    // The test's own pid is a host process that the namespace does not
    // contain (its pids are small), but that a pid-blind agent would take.
    let outside = std::process::id();
    let (client, out) = client_in(
        Some(&ns),
        &["env"],
        &agent.socket,
        &[
            r#"{"op": "register", "pid": CHILD, "name": "nschild"}"#,
            &format!(r#"{{"op": "register", "pid": {outside}, "name": "outside"}}"#),
            r#"{"op": "list"}"#,
        ],
    );
    let child_nspid = field_u32(&out, "child");
    let child_host = ns.host_pid(child_nspid);
    let replies = out["replies"].as_array().expect("replies");
    assert_eq!(replies[0]["ok"], true, "{out:#}");
    assert_eq!(replies[0]["actor"]["pid"], child_nspid, "the reply speaks the client's pids: {out:#}");
    assert_eq!(replies[1]["code"], "no_such_process", "a host process is not the client's to name: {out:#}");
    let listed: Vec<&Value> = replies[2]["actors"].as_array().expect("actors").iter().collect();
    assert!(
        listed.iter().all(|a| a["pid"] == child_nspid),
        "the client lists only what it sees, by its own pids: {listed:?}"
    );
    // The agent keeps the actor at the pid it sees.
    let actor = agent.wait_entry("/actors", "the registered child", EVENT, child_host, |a| a["name"] == "nschild");
    assert_eq!(actor["pid"], child_host);
    assert!(agent.entries_for("/actors", outside).is_empty(), "nothing registered outside the client's namespace");
    drop(client);
    drop(ns);
    agent.stop();
}

/// uid 0 counts as root at the socket only with CAP_KILL: a container that
/// dropped it cannot register another user's process.
#[test]
fn root_without_cap_kill_may_register_only_itself() {
    let agent = RunningAgent::start(&[]);
    let mut sleeper = Proc::spawn(
        "sleep as nobody",
        Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"]),
    );
    let victim = sleeper.pid();
    let drop_kill = ["setpriv", "--inh-caps=-kill", "--bounding-set=-kill", "--"];
    let (_client, out) = client_in(
        None,
        &drop_kill,
        &agent.socket,
        &[
            &format!(r#"{{"op": "register", "pid": {victim}, "name": "notyours"}}"#),
            r#"{"op": "register", "name": "me"}"#,
        ],
    );
    let replies = out["replies"].as_array().expect("replies");
    assert_eq!(replies[0]["code"], "not_permitted", "{out:#}");
    assert_eq!(replies[1]["ok"], true, "registering itself needs no privilege: {out:#}");
    assert!(agent.entries_for("/actors", victim).is_empty());
    sleeper.child.kill().ok();
    agent.stop();
}
