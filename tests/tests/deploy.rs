//! The deployment files end to end: deploy/kubernetes/*.yaml validated
//! against Kubernetes' schemas, deploy/systemd/sigwake.service verified by
//! systemd, and the agent image (`cargo xtask image`) run the way the
//! manifests say — with exactly their capabilities — in both shapes:
//!
//! - DaemonSet: the agent container of daemonset.yaml with the host's pid
//!   namespace (`podman run --pid=host`: podman 4.3's `kube play` ignores
//!   `hostPID` and plays no DaemonSet), beside a workload pod;
//! - sidecar: sidecar-pod.yaml itself, played by `podman kube play`, with
//!   the same workload in it (`shareProcessNamespace`).
//!
//! The workload is the same in both: the manifest's app container (a
//! non-root trio loop registering through the shared socket), starved and
//! sent SIGINTs; a bystander container; and a bystander whose pid in the
//! pod's namespace equals the app's host pid (the collision an agent that
//! mixed up namespaces would hit). Both shapes must give the same verdict:
//! the drops carry the app's actor name, the agent finishes the stop with
//! SIGTERM, and no bystander gets a signal.
//!
//! Each listed capability is shown needed: without BPF or PERFMON the
//! agent cannot load, without KILL its signals to the (non-root) app are
//! refused, without SETPCAP the bounding set keeps what it dropped.
//!
//! `cargo xtask test` builds the images and sets SIGWAKE_AGENT_IMAGE,
//! SIGWAKE_APP_IMAGE and CONTAINERS_CONF (the project's containers.conf:
//! runc and fixed ulimits on these machines).

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sigwake_tests::*;

// ---------------------------------------------------------------------------
// Files and commands
// ---------------------------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_path_buf()
}

fn manifest_path(name: &str) -> PathBuf {
    repo().join("deploy/kubernetes").join(name)
}

fn env_string(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the deploy tests with `cargo xtask test` (as root), which builds the images")
    })
}

fn agent_image() -> String {
    env_string("SIGWAKE_AGENT_IMAGE")
}

fn app_image() -> String {
    env_string("SIGWAKE_APP_IMAGE")
}

/// podman with the project's containers.conf (never the user's).
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", env_string("CONTAINERS_CONF"));
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

/// Runs `cmd`, panics with its output unless it succeeds; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every document of a YAML file, as JSON (PyYAML, in the test venv).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = run_ok(
        Command::new(python())
            .args(["-c", "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"])
            .arg(path),
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not YAML ({e})", path.display()))
}

fn yaml_doc(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

/// The pod spec of a Pod or of a DaemonSet's template.
fn pod_spec(doc: &Value) -> &Value {
    match doc["kind"].as_str() {
        Some("Pod") => &doc["spec"],
        Some("DaemonSet") => &doc["spec"]["template"]["spec"],
        other => panic!("no pod spec in a {other:?}"),
    }
}

fn container<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name:?} in {spec}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// The capabilities the agent container adds (without the CAP_ prefix).
fn listed_caps(agent: &Value) -> Vec<String> {
    strings(&agent["securityContext"]["capabilities"]["add"])
}

fn cap_bit(name: &str) -> u64 {
    let n = match name.trim_start_matches("CAP_") {
        "KILL" => 5,
        "SETPCAP" => 8,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("the test does not know capability {other}: add its number"),
    };
    1u64 << n
}

/// What the agent keeps after attach on this kernel (sys/caps.rs): KILL,
/// SYS_PTRACE, and BPF before 6.5.
/// What the agent keeps after attach: on this kernel, and on its tier (the
/// socket tier keeps CAP_PERFMON to hook the restorer of each libc it
/// meets).
fn kept_after_attach(agent_log: &str) -> u64 {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let v: (u32, u32) = (parts.next().unwrap().parse().unwrap(), parts.next().unwrap().parse().unwrap());
    let mut keep = cap_bit("KILL") | cap_bit("SYS_PTRACE");
    if v < (6, 5) {
        keep |= cap_bit("BPF");
    }
    if agent_log.contains(" hooks attached, socket tier:") {
        keep |= cap_bit("PERFMON");
    }
    keep
}

fn status_mask(status: &str, key: &str) -> u64 {
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in {status}"));
    u64::from_str_radix(line[key.len()..].trim(), 16).unwrap()
}

// ---------------------------------------------------------------------------
// Containers
// ---------------------------------------------------------------------------

/// Removes pods and containers (podman arguments, e.g. `pod rm -f -t 0
/// NAME`) on drop.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Twice: a pod whose container podman is restarting can survive
        // the first `pod rm -f`.
        for _ in 0..2 {
            for args in &self.0 {
                let argv: Vec<&str> = args.split(' ').collect();
                let _ = podman().args(&argv).output();
            }
        }
    }
}

fn host_pid(container: &str) -> u32 {
    let pid = run_ok(podman().args(["inspect", "--format", "{{.State.Pid}}", container]));
    pid.trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .unwrap_or_else(|| panic!("{container} is not running (pid {pid:?}); its log:\n{}", logs_text(container)))
}

fn logs_text(container: &str) -> String {
    let out = run(podman().args(["logs", container]));
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The JSON lines a container printed on stdout.
fn log_json(container: &str) -> Vec<Value> {
    let out = run(podman().args(["logs", container]));
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn wait_log_json(container: &str, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if let Some(v) = log_json(container).into_iter().find(|v| pred(v)) {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what} from {container}; its log:\n{}", logs_text(container));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// GET `path` from the agent's port inside the network namespace of the
/// process `pid`: a thread joins that namespace (network namespaces are
/// per thread) and connects to loopback there, so no port is published.
fn http_in_netns(pid: u32, port: u16, path: &str) -> std::io::Result<(u16, String, String)> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let path = path.to_string();
    thread::spawn(move || {
        // SAFETY: setns on this thread only, with an fd we own.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        http_get(&format!("127.0.0.1:{port}"), &path, Some("application/openmetrics-text"))
    })
    .join()
    .expect("the netns HTTP thread panicked")
}

fn metrics_port(agent: &Value) -> u16 {
    agent["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "metrics"))
        .and_then(|p| p["containerPort"].as_u64())
        .expect("the agent container has a port named metrics") as u16
}

/// Waits for /readyz of the agent in container `name`.
fn wait_ready(name: &str, port: u16) -> u32 {
    let deadline = Instant::now() + scaled(AGENT_START);
    loop {
        let state = run(podman().args(["inspect", "--format", "{{.State.Status}}", name]));
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        if state == "running" {
            let pid = host_pid(name);
            if matches!(http_in_netns(pid, port, "/readyz"), Ok((200, _, _))) {
                return pid;
            }
        }
        if Instant::now() > deadline || state == "exited" {
            panic!("the agent in {name} did not become ready (state {state:?}); its log:\n{}", logs_text(name));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `podman run` arguments for a manifest's container: its security
/// context, env, image and args, and its volume mounts with each volume's
/// hostPath (or `host_paths[volume]`, for the test's own directories).
fn podman_run_args(spec: &Value, c: &Value, host_paths: &BTreeMap<&str, PathBuf>, caps: &[String]) -> Vec<String> {
    let sc = &c["securityContext"];
    let mut args: Vec<String> = Vec::new();
    for cap in strings(&sc["capabilities"]["drop"]) {
        args.push(format!("--cap-drop={cap}"));
    }
    for cap in caps {
        args.push(format!("--cap-add={cap}"));
    }
    if sc["readOnlyRootFilesystem"] == true {
        args.push("--read-only".into());
    }
    if sc["allowPrivilegeEscalation"] == false {
        args.push("--security-opt=no-new-privileges".into());
    }
    if sc["seccompProfile"]["type"] == "Unconfined" {
        args.push("--security-opt=seccomp=unconfined".into());
    }
    if let Some(uid) = sc["runAsUser"].as_u64() {
        args.push(format!("--user={uid}"));
    }
    for e in c["env"].as_array().into_iter().flatten() {
        args.push(format!("--env={}={}", e["name"].as_str().unwrap(), e["value"].as_str().unwrap()));
    }
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vol = m["name"].as_str().unwrap();
        let host = host_paths.get(vol).cloned().unwrap_or_else(|| {
            let v = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == vol).unwrap();
            PathBuf::from(v["hostPath"]["path"].as_str().unwrap_or_else(|| panic!("volume {vol} is not a hostPath")))
        });
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        args.push(format!("--volume={}:{}{ro}", host.display(), m["mountPath"].as_str().unwrap()));
    }
    args
}

/// The agent container of daemonset.yaml, started with `podman run`
/// --pid=host (the DaemonSet shape) and `caps` instead of the manifest's
/// list; `command` replaces its args (None: the manifest's). Network: its
/// own namespace (none), reached through [`http_in_netns`].
fn run_daemonset_agent(name: &str, dir: &TempDir, caps: &[String], command: Option<&[&str]>, detach: bool) -> Output {
    let ds = yaml_doc(&manifest_path("daemonset.yaml"));
    let spec = pod_spec(&ds);
    assert_eq!(spec["hostPID"], true, "the DaemonSet must run in the host's pid namespace");
    let agent = container(spec, "sigwake");
    let mut host_paths = BTreeMap::new();
    for vol in ["socket", "state"] {
        let p = dir.0.join(vol);
        std::fs::create_dir_all(&p).unwrap();
        host_paths.insert(vol, p);
    }
    let mut cmd = podman();
    cmd.arg("run").arg(format!("--name={name}")).args(["--pid=host", "--network=none"]);
    if detach {
        cmd.arg("--detach");
    } else {
        cmd.arg("--rm");
    }
    cmd.args(podman_run_args(spec, agent, &host_paths, caps)).arg(agent_image());
    match command {
        Some(c) => cmd.args(c),
        None => cmd.args(strings(&agent["args"])),
    };
    run(&mut cmd)
}

// ---------------------------------------------------------------------------
// The manifests and the unit
// ---------------------------------------------------------------------------

#[test]
fn manifests_are_valid_kubernetes_and_agree() {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "expected the DaemonSet, the sidecar pod, the app example and the PodMonitor: {files:?}");
    let validate = python().with_file_name("kubernetes-validate");
    let out = run_ok(Command::new(&validate).arg("--strict").args(&files));
    for f in &files {
        let doc = yaml_doc(f);
        let kind = doc["kind"].as_str().unwrap();
        if kind == "PodMonitor" {
            continue; // a CRD: no schema offline; checked by hand below
        }
        assert!(
            out.lines().any(|l| l.contains(f.to_str().unwrap()) && l.contains("passed")),
            "kubernetes-validate did not pass {}:\n{out}",
            f.display()
        );
    }

    let ds = yaml_doc(&manifest_path("daemonset.yaml"));
    let sidecar = yaml_doc(&manifest_path("sidecar-pod.yaml"));
    let example = yaml_doc(&manifest_path("app-with-daemonset.yaml"));
    assert_eq!(pod_spec(&ds)["hostPID"], true);
    assert_eq!(pod_spec(&sidecar)["shareProcessNamespace"], true);
    let ds_agent = container(pod_spec(&ds), "sigwake");
    let sc_agent = container(pod_spec(&sidecar), "sigwake");
    assert_eq!(listed_caps(ds_agent), listed_caps(sc_agent), "the two shapes must grant the same capabilities");
    for agent in [ds_agent, sc_agent] {
        let sc = &agent["securityContext"];
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{sc}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
        assert_eq!(sc["privileged"], false, "{sc}");
        let mounts: Vec<&str> =
            agent["volumeMounts"].as_array().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
        assert!(mounts.contains(&"/run/sigwake") && mounts.contains(&"/var/lib/sigwake"), "{mounts:?}");
    }
    // The app containers mount the socket's volume at /run/sigwake too.
    for (doc, app) in [(&sidecar, "app"), (&example, "app")] {
        let c = container(pod_spec(doc), app);
        assert!(
            c["volumeMounts"].as_array().unwrap().iter().any(|m| m["mountPath"] == "/run/sigwake"),
            "{app} of {} does not mount /run/sigwake",
            doc["metadata"]["name"]
        );
    }
    assert!(
        pod_spec(&sidecar)["volumes"].as_array().unwrap().iter().any(|v| v.get("emptyDir").is_some()),
        "the sidecar pod shares its socket through an emptyDir"
    );

    // Every capability line says why, on the same line.
    for f in ["daemonset.yaml", "sidecar-pod.yaml"] {
        let text = std::fs::read_to_string(manifest_path(f)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let add = lines.iter().position(|l| l.trim() == "add:").unwrap_or_else(|| panic!("{f}: no capabilities add"));
        let items: Vec<&str> =
            lines[add + 1..].iter().take_while(|l| l.trim_start().starts_with("- ")).copied().collect();
        assert_eq!(items.len(), listed_caps(ds_agent).len(), "{f}: {items:?}");
        for l in items {
            let why = l.split_once(" # ").map(|(_, why)| why.trim()).unwrap_or("");
            assert!(why.len() > 10, "{f}: capability without a comment saying why: {l:?}");
        }
    }

    // Prometheus: the annotations name the metrics port, and the
    // PodMonitor selects both agents' pods on it.
    for (doc, meta) in [(&ds, &ds["spec"]["template"]["metadata"]), (&sidecar, &sidecar["metadata"])] {
        let a = &meta["annotations"];
        assert_eq!(a["prometheus.io/scrape"], "true", "{}", doc["metadata"]["name"]);
        let agent = container(pod_spec(doc), "sigwake");
        assert_eq!(a["prometheus.io/port"], metrics_port(agent).to_string());
        assert_eq!(a["prometheus.io/path"], "/metrics");
    }
    let pm = yaml_doc(&manifest_path("podmonitor.yaml"));
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
    let expr = &pm["spec"]["selector"]["matchExpressions"][0];
    assert_eq!(expr["key"], "app.kubernetes.io/name");
    let selected = strings(&expr["values"]);
    for labels in [&ds["spec"]["template"]["metadata"]["labels"], &sidecar["metadata"]["labels"]] {
        let name = labels["app.kubernetes.io/name"].as_str().unwrap().to_string();
        assert!(selected.contains(&name), "the PodMonitor does not select {name}: {selected:?}");
    }

    // The systemd unit grants the same capabilities.
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/sigwake.service")).unwrap();
    let mut from_manifest: Vec<String> = listed_caps(ds_agent).iter().map(|c| format!("CAP_{c}")).collect();
    from_manifest.sort();
    for key in ["CapabilityBoundingSet=", "AmbientCapabilities="] {
        let line = unit.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("the unit has no {key}"));
        let mut caps: Vec<String> = line[key.len()..].split_whitespace().map(str::to_string).collect();
        caps.sort();
        assert_eq!(caps, from_manifest, "the unit's {key} differs from the manifests' list");
    }
}

#[test]
fn systemd_unit_verifies() {
    // systemd-analyze verify checks ExecStart's binary and the units the
    // service depends on: give it a root with both, the unit as shipped.
    let root = TempDir::new("deploy-systemd");
    let unit_dir = root.0.join("etc/systemd/system");
    std::fs::create_dir_all(&unit_dir).unwrap();
    std::fs::create_dir_all(root.0.join("usr/local/bin")).unwrap();
    std::fs::create_dir_all(root.0.join("usr/lib/systemd")).unwrap();
    run_ok(Command::new("cp").arg("-r").arg("/usr/lib/systemd/system").arg(root.0.join("usr/lib/systemd/")));
    std::fs::copy(sigwake_bin(), root.0.join("usr/local/bin/sigwake")).unwrap();
    std::fs::copy(repo().join("deploy/systemd/sigwake.service"), unit_dir.join("sigwake.service")).unwrap();
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.0.display()))
        .arg("sigwake.service"));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify ({}):\n{said}", out.status);

    let unit = std::fs::read_to_string(repo().join("deploy/systemd/sigwake.service")).unwrap();
    for want in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ProtectHome=yes",
        "StateDirectory=sigwake",
        "StateDirectoryMode=0700",
        "RuntimeDirectory=sigwake",
        "ExecStart=/usr/local/bin/sigwake run --socket=/run/sigwake/registry.sock --state-dir=/var/lib/sigwake",
    ] {
        assert!(unit.lines().any(|l| l == want), "the unit lacks {want}");
    }
    // These would break the agent (see the unit's comments).
    for never in ["ProtectProc=invisible", "ProcSubset=pid", "ProtectControlGroups=yes", "PrivateNetwork=yes"] {
        assert!(!unit.lines().any(|l| l == never), "the unit must not set {never}");
    }
}

// ---------------------------------------------------------------------------
// Capabilities
// ---------------------------------------------------------------------------

#[test]
fn agent_runs_with_exactly_the_listed_capabilities_and_drops_them_after_attach() {
    let ds = yaml_doc(&manifest_path("daemonset.yaml"));
    let agent = container(pod_spec(&ds), "sigwake");
    let caps = listed_caps(agent);
    let port = metrics_port(agent);
    let dir = TempDir::new("deploy-caps");
    let name = format!("sigwake-test-caps-{}", std::process::id());
    let _cleanup = Cleanup(vec![format!("rm -f -t 0 {name}")]);
    let out = run_daemonset_agent(&name, &dir, &caps, None, true);
    assert!(out.status.success(), "podman run: {}", String::from_utf8_lossy(&out.stderr));
    let pid = wait_ready(&name, port);

    // Every thread, not just the main one: capabilities are per thread.
    let log = logs_text(&name);
    let kept = kept_after_attach(&log);
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(tasks.len() > 1, "the agent runs threads");
    for t in &tasks {
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        for key in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(
                status_mask(&status, key),
                kept,
                "{} {key}: expected only {kept:#x} after attach; status:\n{status}",
                t.display()
            );
        }
        assert_eq!(status_mask(&status, "CapAmb:"), 0);
    }
    assert!(log.contains("capabilities after attach: kept CAP_KILL,CAP_SYS_PTRACE"), "{log}");

    // Each load-time capability is needed: without it the agent cannot
    // load or attach (`sigwake check`), and says so.
    for missing in ["BPF", "PERFMON"] {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let out = run_daemonset_agent(&format!("{name}-no-{missing}"), &dir, &fewer, Some(&["check"]), false);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "sigwake check succeeded without CAP_{missing}:\n{err}");
        assert!(err.contains("permission denied") || err.contains("Operation not permitted"), "{err}");
    }
    // Without SETPCAP the agent still runs but cannot empty the bounding
    // set: BPF stays there for whatever it executes.
    let fewer: Vec<String> = caps.iter().filter(|c| *c != "SETPCAP").cloned().collect();
    let no_setpcap = format!("{name}-no-SETPCAP");
    let _cleanup2 = Cleanup(vec![format!("rm -f -t 0 {no_setpcap}")]);
    // Kept to the end: the running agent's socket and state dirs are in it
    // (a temporary dropped at the end of the statement removed them under
    // the agent as it started: `binding /run/sigwake/registry.sock: No such
    // file or directory`, now and then).
    let dir2 = TempDir::new("deploy-caps2");
    let out = run_daemonset_agent(&no_setpcap, &dir2, &fewer, None, true);
    assert!(out.status.success(), "podman run: {}", String::from_utf8_lossy(&out.stderr));
    let pid = wait_ready(&no_setpcap, port);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_mask(&status, "CapEff:"), kept, "{status}");
    assert_ne!(status_mask(&status, "CapBnd:") & cap_bit("BPF"), 0, "{status}");
    let log = logs_text(&no_setpcap);
    assert!(log.contains("dropped from the bounding set: none (no CAP_SETPCAP)"), "{log}");
}

// ---------------------------------------------------------------------------
// The two shapes, one workload
// ---------------------------------------------------------------------------

const APP_ACTOR: &str = "deploy-app";

/// The workload's containers: the manifest's app container, starved by a
/// GIL hog and registering as APP_ACTOR, and a bystander recording every
/// signal it gets (its stdin stays open: `sleep` feeds it).
fn workload_containers(sidecar: &Value) -> Vec<Value> {
    let mut app = container(pod_spec(sidecar), "app").clone();
    app["image"] = json!(app_image());
    let command = strings(&app["command"]);
    let script = command
        .last()
        .expect("the app's command")
        .replace("trio_actor.py --register example", &format!("trio_actor.py --register {APP_ACTOR} --hog-seconds 30"));
    assert!(script.contains(APP_ACTOR), "the manifest's app command changed: {command:?}");
    app["command"] = json!(["sh", "-c", script]);
    let mut bystander = app.clone();
    bystander["name"] = json!("bystander");
    bystander["command"] = json!(["sh", "-c", "sleep infinity | exec python3 signal_recorder.py"]);
    vec![app, bystander]
}

/// The agent as the scenario sees it: where to read metrics and incidents.
struct AgentUnderTest {
    container: String,
    pid: u32,
    port: u16,
}

impl AgentUnderTest {
    fn metrics(&self) -> String {
        http_in_netns(self.pid, self.port, "/metrics").expect("GET /metrics").2
    }

    fn incidents(&self) -> Vec<Value> {
        let out = run_ok(podman().args([
            "exec",
            &self.container,
            "sigwake",
            "incidents",
            "--json",
            "--state-dir",
            "/var/lib/sigwake",
        ]));
        if out.starts_with("no incidents") {
            return Vec::new();
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("sigwake incidents --json: not JSON ({e}): {out}"))
    }
}

/// A bystander in the pid namespace of `pod_pid` whose pid there is
/// `wanted` (the app's host pid): ns_last_pid is set to one below, then
/// the recorder is forked into the namespace. Threads of the pod can take
/// the number first, so this retries.
fn colliding_bystander(pod_pid: u32, wanted: u32) -> Proc {
    for _ in 0..10 {
        run_ok(
            Command::new("nsenter")
                .arg(format!("--target={pod_pid}"))
                .args(["--pid", "--", "sh", "-c"])
                .arg(format!("echo {} > /proc/sys/kernel/ns_last_pid", wanted - 1)),
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={pod_pid}"))
            .args(["--pid", "--"])
            .arg(python())
            .arg(fixtures_dir().join("signal_recorder.py"))
            .current_dir(fixtures_dir());
        let p = Proc::spawn("colliding bystander", &mut cmd);
        let ready = p.stdout.wait_json("the colliding bystander ready", EVENT, |v| v["ready"] == true);
        if ready["pid"] == wanted {
            return p;
        }
    }
    panic!("could not start a bystander with pid {wanted} in the pod's pid namespace in 10 tries");
}

/// What the agent must make of the starved app.
#[derive(PartialEq)]
enum Verdict {
    /// It finishes the stop: SIGTERM ends the app.
    Stopped,
    /// Its signals are refused (no CAP_KILL): the incident fails, the app
    /// lives on.
    Refused,
}

/// The scenario both shapes run; returns the incident's steps.
fn starve_and_judge(agent: &AgentUnderTest, pod: &str, shares_agent_pidns: bool, verdict: Verdict) -> Vec<String> {
    let app = format!("{pod}-app");
    let bystander = format!("{pod}-bystander");
    let registered = wait_log_json(&app, "the app's registration", Duration::from_secs(30), |v| {
        v.get("registered").is_some() || v.get("register_error").is_some()
    });
    assert!(
        registered.get("registered").is_some(),
        "the app could not register: {registered}; agent log:\n{}",
        logs_text(&agent.container)
    );
    assert_eq!(registered["registered"]["name"], APP_ACTOR, "{registered}");
    let ready = wait_log_json(&app, "the app ready", EVENT, |v| v["ready"] == true);
    let app_host_pid = host_pid(&app);
    let app_ns_pid = ready["pid"].as_u64().unwrap() as u32;
    assert_ne!(app_host_pid, app_ns_pid, "the app must run in the pod's own pid namespace");
    wait_log_json(&bystander, "the bystander ready", EVENT, |v| v["ready"] == true);
    // After the hog thread exists: it takes a pid of the namespace too.
    wait_log_json(&app, "the GIL hog", EVENT, |v| v["hogging"] == true);
    let collider = colliding_bystander(app_host_pid, app_host_pid);
    sigint_burst(app_host_pid, 10);

    // The agent confirms starvation and finishes the stop (or fails to).
    let status = if verdict == Verdict::Stopped { "exited" } else { "failed" };
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    let incident = loop {
        let found = agent.incidents().into_iter().find(|i| i["actor"] == APP_ACTOR && i["status"] == status);
        if let Some(i) = found {
            break i;
        }
        if Instant::now() > deadline {
            panic!(
                "no incident of {APP_ACTOR} closed as {status} within 30 s; incidents: {:#?}\nagent log:\n{}\napp log:\n{}",
                agent.incidents(),
                logs_text(&agent.container),
                logs_text(&app)
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    // The agent names the app by the pid it sees: the pod's in a sidecar,
    // the host's for a node agent.
    let seen_pid = if shares_agent_pidns { app_ns_pid } else { app_host_pid };
    assert_eq!(incident["pid"], seen_pid, "{incident:#}");
    assert!(incident["evidence"]["drops"].as_u64().unwrap_or(0) > 0, "{incident:#}");
    let state = || run_ok(podman().args(["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", &app]));
    let sigterm_outcome = if verdict == Verdict::Stopped {
        // podman notes the exit a moment after the kernel's exit event.
        wait_until("podman to see the app exit", EVENT, || state().starts_with("exited"));
        assert_eq!(state().trim(), "exited 143", "the app must have been ended by the agent's SIGTERM");
        "ok"
    } else {
        assert!(state().starts_with("running"), "the app must live on: {}", state());
        "failed"
    };

    let metrics = agent.metrics();
    // The app's libc is its image's, another file than the agent's own: on
    // the socket tier the agent hooks that file's signal restorer too, when
    // the app's first handler runs, and so sees its handler returns.
    let log = logs_text(&agent.container);
    if log.contains(" hooks attached, socket tier:") {
        assert!(
            log.contains("hooked the signal restorer at /usr/lib/x86_64-linux-gnu/libc.so.6+0x"),
            "the app's restorer hooked:\n{log}"
        );
        assert!(metric_sum(&metrics, "sigwake_restorer_uprobes", &[]) >= 2.0, "{metrics}");
    }
    let actor = format!("actor=\"{APP_ACTOR}\"");
    assert!(metric_sum(&metrics, "sigwake_wakeup_writes_dropped_total", &[&actor]) > 0.0, "{metrics}");
    let outcome = format!("outcome=\"{sigterm_outcome}\"");
    assert!(
        metric_sum(&metrics, "sigwake_escalation_actions_total", &[&actor, "action=\"sigterm\"", &outcome]) >= 1.0,
        "{metrics}"
    );

    // Nobody else got anything.
    let got: Vec<Value> = log_json(&bystander).into_iter().filter(|v| v.get("signal").is_some()).collect();
    assert!(got.is_empty(), "the bystander container was signalled: {got:?}");
    let got: Vec<Value> = collider.stdout.json().into_iter().filter(|v| v.get("signal").is_some()).collect();
    assert!(got.is_empty(), "the bystander with pid {app_host_pid} in the pod was signalled: {got:?}");
    assert!(run_ok(podman().args(["inspect", "--format", "{{.State.Status}}", &bystander])).trim() == "running");
    incident_steps(&incident)
}

/// Plays `pod` (JSON, which YAML parsers take) with `podman kube play`.
/// Its restart policy becomes Never: the test watches the app end, and
/// podman, like a kubelet, would restart it. No port is published: the
/// test reaches the agent through its network namespace.
fn kube_play(pod: &Value, dir: &TempDir) {
    let mut pod = pod.clone();
    pod["spec"]["restartPolicy"] = json!("Never");
    let file = dir.0.join("pod.json");
    std::fs::write(&file, serde_json::to_string_pretty(&pod).unwrap()).unwrap();
    run_ok(podman().args(["kube", "play"]).arg(&file));
}

/// The DaemonSet shape: the manifest's agent container with `caps`
/// (podman run --pid=host), and beside it the workload pod, the same as
/// the sidecar test's without the agent; the socket comes from the node
/// (the DaemonSet's hostPath). Returns the incident's steps.
fn daemonset_scenario(tag: &str, caps: &[String], verdict: Verdict) -> Vec<String> {
    let dir = TempDir::new(tag);
    let id = std::process::id();
    let agent_name = format!("sigwake-test-{tag}-{id}");
    let pod = format!("sigwake-test-{tag}-workload-{id}");
    let _cleanup = Cleanup(vec![format!("pod rm -f -t 0 {pod}"), format!("rm -f -t 0 {agent_name}")]);
    let ds = yaml_doc(&manifest_path("daemonset.yaml"));
    let agent_spec = container(pod_spec(&ds), "sigwake");
    let out = run_daemonset_agent(&agent_name, &dir, caps, None, true);
    assert!(out.status.success(), "podman run: {}", String::from_utf8_lossy(&out.stderr));
    let port = metrics_port(agent_spec);
    let pid = wait_ready(&agent_name, port);
    let agent = AgentUnderTest { container: agent_name, pid, port };

    let sidecar = yaml_doc(&manifest_path("sidecar-pod.yaml"));
    let mut workload = sidecar.clone();
    workload["metadata"]["name"] = json!(pod);
    workload["spec"]["containers"] = json!(workload_containers(&sidecar));
    workload["spec"]["volumes"] =
        json!([{ "name": "sigwake-socket", "hostPath": { "path": dir.0.join("socket"), "type": "Directory" } }]);
    kube_play(&workload, &dir);
    starve_and_judge(&agent, &pod, false, verdict)
}

#[test]
fn daemonset_shape_finishes_the_stop_and_spares_bystanders() {
    let ds = yaml_doc(&manifest_path("daemonset.yaml"));
    let caps = listed_caps(container(pod_spec(&ds), "sigwake"));
    let steps = daemonset_scenario("ds", &caps, Verdict::Stopped);
    assert_eq!(steps, ["diagnostics:ok", "sigterm:ok"]);
}

/// CAP_KILL is what lets the agent (root) signal the app (uid 65534):
/// without it every signal tier is refused and the app lives on.
#[test]
fn without_cap_kill_the_agent_cannot_stop_another_users_app() {
    let ds = yaml_doc(&manifest_path("daemonset.yaml"));
    let caps: Vec<String> =
        listed_caps(container(pod_spec(&ds), "sigwake")).into_iter().filter(|c| c != "KILL").collect();
    let steps = daemonset_scenario("nokill", &caps, Verdict::Refused);
    assert!(
        steps.contains(&"sigterm:failed".to_string()) && steps.contains(&"sigkill:failed".to_string()),
        "{steps:?}"
    );
}

#[test]
fn sidecar_shape_finishes_the_stop_and_spares_bystanders() {
    let dir = TempDir::new("deploy-sidecar");
    let pod = format!("sigwake-test-sidecar-{}", std::process::id());
    let _cleanup = Cleanup(vec![format!("pod rm -f -t 0 {pod}")]);
    let mut manifest = yaml_doc(&manifest_path("sidecar-pod.yaml"));
    let agent_spec = container(pod_spec(&manifest), "sigwake").clone();
    let mut agent_container = agent_spec.clone();
    agent_container["image"] = json!(agent_image());
    // In the manifest's order: the agent first.
    let mut containers = vec![agent_container];
    containers.extend(workload_containers(&manifest));
    manifest["metadata"]["name"] = json!(pod);
    manifest["spec"]["containers"] = json!(containers);
    // Kubernetes makes an emptyDir a fresh 0777 directory; podman's kube
    // play chowns its volume to whichever container mounts it first, and
    // the agent (root, without CAP_DAC_OVERRIDE) could not create the
    // socket in the app's (65534) directory. A 0777 directory it is.
    let socket_dir = dir.0.join("socket");
    std::fs::create_dir(&socket_dir).unwrap();
    std::fs::set_permissions(&socket_dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    for v in manifest["spec"]["volumes"].as_array_mut().unwrap() {
        if v["name"] == "sigwake-socket" {
            assert!(v.get("emptyDir").is_some(), "the sidecar's socket volume is an emptyDir: {v}");
            *v = json!({ "name": "sigwake-socket", "hostPath": { "path": socket_dir, "type": "Directory" } });
        }
    }
    // podman 4.3's kube play ignores securityContext.seccompProfile and
    // reads only the older per-container annotation: say the same there.
    assert_eq!(agent_spec["securityContext"]["seccompProfile"]["type"], "Unconfined");
    manifest["metadata"]["annotations"]["container.seccomp.security.alpha.kubernetes.io/sigwake"] = json!("unconfined");
    kube_play(&manifest, &dir);

    let name = format!("{pod}-sigwake");
    let port = metrics_port(&agent_spec);
    let pid = wait_ready(&name, port);
    // One pid namespace for the pod, as in Kubernetes.
    let agent_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    let app_ns = std::fs::read_link(format!("/proc/{}/ns/pid", host_pid(&format!("{pod}-app")))).unwrap();
    assert_eq!(agent_ns, app_ns, "shareProcessNamespace: the agent and the app share a pid namespace");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_mask(&status, "CapEff:"), kept_after_attach(&logs_text(&name)), "{status}");
    let agent = AgentUnderTest { container: name, pid, port };

    let steps = starve_and_judge(&agent, &pod, true, Verdict::Stopped);
    assert_eq!(steps, ["diagnostics:ok", "sigterm:ok"], "the same verdict as the DaemonSet shape");
}
