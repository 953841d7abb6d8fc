//! What a local user without privileges can get out of (or do to) a
//! running agent: its state directory and its HTTP endpoint.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command, thread, time::Duration};

use serde_json::json;
use sigwake_tests::*;

/// `sigwake run` with its own port and socket and the given state dir and
/// config; not waited for.
fn spawn_agent(dir: &TempDir, state_dir: &Path, config: &Path, extra: &[&str]) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(sigwake_bin());
    cmd.args(["run", "--no-discovery", "--listen", &addr])
        .arg("--socket")
        .arg(dir.0.join("registry.sock"))
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--config")
        .arg(config)
        .args(extra)
        .env("RUST_LOG", "info");
    (Proc::spawn("sigwake run", &mut cmd), addr)
}

fn wait_ready(agent: &Proc, addr: &str) {
    wait_until("the agent to be ready", AGENT_START, || {
        assert!(!agent.stderr.closed(), "the agent exited; stderr:\n{}", agent.stderr_text());
        matches!(http_get(addr, "/readyz", None), Ok((200, _, _)))
    });
}

/// An incident a previous agent "left", open and escalating, naming the
/// process `pid` (with its real start time): resuming it runs the policy's
/// first tier (SIGKILL) on that process.
fn open_incident_for(pid: u32) -> Vec<u8> {
    let incident = json!({
        "id": 1, "actor": "planted", "pid": pid, "start_time": start_time(pid), "runtime": "other",
        "policy": "default", "dry_run": false, "status": "escalating", "opened": "2026-01-01T00:00:00Z",
        "closed": null, "evidence": {"drops": 1, "fill": null, "wakeup_fd": null, "signals": [], "confirm_ms": 0.0},
        "steps": [], "next_tier": 0
    });
    serde_json::to_vec(&json!([incident])).unwrap()
}

const KILL_POLICY: &str = "[policy.default]\nconfirm = \"1s\"\ntiers = [{ action = \"sigkill\", timeout = \"1s\" }]\n";

/// Resuming an incident signals the pid and start time `incidents.json`
/// names, so that file is trusted only if it is the agent's own and not
/// writable by others. The control run (the same file, root's, 0600) shows
/// the planted incident would otherwise kill the process.
/// What a case does to the planted state file.
type Tamper = dyn Fn(&Path);

#[test]
fn a_state_file_the_agent_does_not_own_is_not_resumed_and_signals_nothing() {
    let dir = TempDir::new("hardening-state");
    let config = dir.0.join("sigwake.toml");
    std::fs::write(&config, KILL_POLICY).unwrap();
    let cases: [(&str, Box<Tamper>); 3] = [
        ("root's own, 0600 (control: resumed)", Box::new(|_| {})),
        ("owned by nobody", Box::new(|p| std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap())),
        (
            "root's, world-writable",
            Box::new(|p| std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).unwrap()),
        ),
    ];
    for (i, (what, plant)) in cases.iter().enumerate() {
        let state = dir.0.join(format!("state-{i}"));
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut victim = Proc::spawn("sleep 60", Command::new("sleep").arg("60"));
        let file = state.join("incidents.json");
        std::fs::write(&file, open_incident_for(victim.pid())).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        plant(&file);
        let (mut agent, addr) = spawn_agent(&dir, &state, &config, &[]);
        wait_ready(&agent, &addr);
        if i == 0 {
            let st = victim.wait_exit(Duration::from_secs(10));
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&st),
                Some(libc::SIGKILL),
                "{what}: the control must be resumed and kill; agent stderr:\n{}",
                agent.stderr_text()
            );
        } else {
            // Past the resumed ladder's SIGKILL in the control.
            thread::sleep(Duration::from_secs(3));
            assert!(
                victim.child.try_wait().unwrap().is_none(),
                "{what}: the planted incident was resumed and its process signalled; agent stderr:\n{}",
                agent.stderr_text()
            );
            let err = agent.stderr_text();
            assert!(err.contains("cannot be trusted") && err.contains("none is resumed"), "{what}: says why: {err}");
            let aside = std::fs::read_dir(&state)
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("incidents.json.untrusted-"));
            assert!(aside, "{what}: the untrusted file is kept aside");
        }
        stop_agent(&mut agent);
    }
}

/// A state directory another uid owns, or others can write, is refused at
/// start-up (exit non-zero, saying why); one others can only read is
/// tightened to 0700.
#[test]
fn a_state_dir_that_is_not_the_agents_own_is_refused_and_a_readable_one_tightened() {
    let dir = TempDir::new("hardening-statedir");
    let config = dir.0.join("sigwake.toml");
    std::fs::write(&config, "").unwrap();
    let state = dir.0.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    for (what, want) in
        [("owned by nobody", "belongs to uid 65534"), ("world-writable", "group or others can write it")]
    {
        if what == "world-writable" {
            std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
            std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let (mut agent, _) = spawn_agent(&dir, &state, &config, &[]);
        let st = agent.wait_exit(AGENT_START);
        let err = agent.stderr_text();
        assert!(!st.success(), "{what}: must refuse to start: {err}");
        assert!(err.contains(want), "{what}: says why: {err}");
    }
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mut agent, addr) = spawn_agent(&dir, &state, &config, &[]);
    wait_ready(&agent, &addr);
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "tightened");
    assert!(agent.stderr_text().contains("tightened to 0700"), "{}", agent.stderr_text());
    stop_agent(&mut agent);
}

// ---------------------------------------------------------------------------
// The HTTP endpoint
// ---------------------------------------------------------------------------

/// Registers `pid` as `name` over the agent's socket (as root).
fn register(socket: &Path, pid: u32, name: &str) {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connecting to the registration socket");
    writeln!(s, "{}", json!({"op": "register", "pid": pid, "name": name})).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["ok"], true, "root registers {pid}: {reply}");
}

/// GET `path` from `addr` as `nobody` (setpriv, no capabilities), with
/// Python's urllib: (status, body).
fn get_as_nobody(addr: &str, path: &str) -> (u16, String) {
    const SCRIPT: &str = r#"
import json, os, sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen("http://" + sys.argv[1] + sys.argv[2], timeout=10)
    status, body = r.status, r.read().decode()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read().decode()
print(json.dumps({"uid": os.getuid(), "status": status, "body": body}))
"#;
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"])
        .arg(python())
        .args(["-c", SCRIPT, addr, path])
        .current_dir("/")
        .output()
        .expect("running setpriv (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: stdout {text:?}, stderr {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["uid"], 65534, "runs as nobody: {v}");
    (v["status"].as_u64().unwrap() as u16, v["body"].as_str().unwrap().to_string())
}

/// By default, /actors and /incidents answer nobody's curl with no actor
/// data (they would list every supervised process on the host: pid,
/// name, uid); `sigwake actors` over the socket is the way for users, and
/// `--serve-state` turns the endpoints on (documented for trusted networks
/// only), which this test also checks as its control.
#[test]
fn an_unprivileged_local_client_gets_no_actor_or_incident_data_over_http() {
    let agent = RunningAgent::start_default(&[]);
    let root_proc = Proc::spawn("sleep 60", Command::new("sleep").arg("60"));
    let pid = root_proc.pid().to_string();
    register(&agent.socket, root_proc.pid(), "rootd-secret");
    for path in ["/actors", "/incidents"] {
        let (status, body) = get_as_nobody(&agent.addr, path);
        assert_eq!(status, 404, "GET {path} as nobody: {body}");
        assert!(!body.contains(&pid) && !body.contains("rootd-secret"), "GET {path} leaks the actor: {body}");
        assert!(body.contains("--serve-state") && body.contains("sigwake"), "{path} says what to use instead: {body}");
    }
    let (status, metrics) = get_as_nobody(&agent.addr, "/metrics");
    assert_eq!(status, 200, "/metrics stays public: {metrics}");
    assert!(metrics.contains("sigwake_build_info"), "{metrics}");
    let out = Command::new(sigwake_bin()).args(["actors", "--json", "--socket"]).arg(&agent.socket).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("rootd-secret"), "root still lists it with `sigwake actors`");
    agent.stop();

    let agent = RunningAgent::start_default(&["--serve-state"]);
    register(&agent.socket, root_proc.pid(), "rootd-secret");
    let (status, body) = get_as_nobody(&agent.addr, "/actors");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("rootd-secret"), "--serve-state serves every actor to anyone: {body}");
    agent.stop();
}

/// The endpoint's limits, as documented (README, `sigwake run --help`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;

/// True once the server has closed `s` (EOF or reset).
fn closed_by_server(s: &std::net::TcpStream) -> bool {
    use std::io::Read as _;
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let closed = match (&mut &*s).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// A client that connects and never sends a request is disconnected once
/// the header timeout has passed, not held forever.
#[test]
fn a_silent_client_is_disconnected_after_the_header_timeout() {
    use std::io::Read as _;
    let agent = RunningAgent::start_default(&[]);
    let mut s = std::net::TcpStream::connect(&agent.addr).unwrap();
    let t0 = std::time::Instant::now();
    s.set_read_timeout(Some(HEADER_TIMEOUT * 3)).unwrap();
    let mut buf = [0u8; 256];
    let res = s.read(&mut buf);
    let held = t0.elapsed();
    eprintln!("a silent client was held {:.2} s ({res:?})", held.as_secs_f64());
    assert!(
        matches!(res, Ok(0)) || res.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the server must close a silent connection; read gave {res:?} after {held:?}"
    );
    assert!(
        held < HEADER_TIMEOUT + Duration::from_secs(2),
        "held {held:?}, longer than the {HEADER_TIMEOUT:?} timeout"
    );
    agent.stop();
}

/// More silent clients than the connection cap: the agent holds at most
/// the cap (the oldest idle ones are closed to make room), and /metrics
/// answers at once, without waiting for the header timeout.
#[test]
fn more_silent_clients_than_the_cap_do_not_stop_metrics() {
    let agent = RunningAgent::start_default(&[]);
    let extra = 36;
    let silent: Vec<std::net::TcpStream> =
        (0..MAX_CONNECTIONS + extra).map(|_| std::net::TcpStream::connect(&agent.addr).unwrap()).collect();
    let t0 = std::time::Instant::now();
    let (status, _, body) = http_get(&agent.addr, "/metrics", None).expect("GET /metrics");
    let answered = t0.elapsed();
    eprintln!("/metrics answered in {:.0} ms behind {} silent clients", answered.as_secs_f64() * 1e3, silent.len());
    assert_eq!(status, 200, "{body}");
    assert!(answered < Duration::from_secs(1), "/metrics waited {answered:?} behind silent clients");
    let mut closed = 0;
    wait_until("the agent to close the silent clients beyond its cap", Duration::from_secs(2), || {
        closed = silent.iter().filter(|s| closed_by_server(s)).count();
        closed >= extra
    });
    eprintln!("{closed} of {} silent clients closed before the header timeout", silent.len());
    agent.stop();
}
