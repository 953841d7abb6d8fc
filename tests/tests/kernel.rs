//! The hook tiers on the running kernel: `sigwake check` loads, attaches
//! and proves the programs with the self-test child, and reports which
//! mechanism serves each job. Run on every kernel of the matrix
//! (`cargo xtask kernels`), which sets SIGWAKE_EXPECT_TIER to the tier that
//! kernel must get (fentry where the kernel allows trampolines).

use std::process::Command;

use serde_json::Value;
use sigwake_tests::*;

fn check(args: &[&str]) -> Value {
    // The run's tier (SIGWAKE_TEST_HOOKS), unless the test asks for one.
    let run_tier = if args.contains(&"--hooks") { Vec::new() } else { hooks_args() };
    let out = Command::new(sigwake_bin())
        .arg("check")
        .arg("--json")
        .args(run_tier)
        .args(args)
        .output()
        .expect("running sigwake check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sigwake check failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\nstderr: {stderr}"))
}

fn job<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["job"] == name))
        .unwrap_or_else(|| panic!("no job {name} in {report:#}"))
}

fn assert_self_test_passed(report: &Value) {
    let t = &report["self_test"];
    assert_eq!(t["calls"], serde_json::json!(["write", "writev", "sendto", "sendmsg"]), "{report:#}");
    assert_eq!(t["pipe"], true, "a failed write to a pipe, on every tier: {report:#}");
    assert_eq!(t["eventfd"], true, "a failed write to an eventfd, on every tier: {report:#}");
    assert_eq!(t["handler_return"], true, "{report:#}");
    assert_eq!(t["exit"], true, "{report:#}");
}

#[test]
fn check_proves_every_job_on_this_kernel() {
    let report = check(&[]);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(report["kernel"], release.trim());
    assert_self_test_passed(&report);
    let tier = report["tier"].as_str().unwrap();
    if let Ok(want) = std::env::var("SIGWAKE_EXPECT_TIER") {
        assert_eq!(tier, want, "this kernel must get the {want} tier: {report:#}");
    }
    let (write_tier, return_tier) = match tier {
        "fentry" => ("fexit", "fentry"),
        "syscall_tracepoint" => ("syscall_tracepoint", "syscall_tracepoint"),
        "socket" => ("raw_tracepoint", "uprobe"),
        "socket_fentry" => ("raw_tracepoint", "fentry"),
        other => panic!("unknown tier {other}: {report:#}"),
    };
    assert_eq!(job(&report, "write_path")["tier"], write_tier);
    assert_eq!(job(&report, "handler_return")["tier"], return_tier);
    assert_eq!(job(&report, "signal_path")["tier"], "tracepoint");
    assert_eq!(job(&report, "exit")["tier"], "tracepoint");
    assert_eq!(job(&report, "exec")["tier"], "tracepoint");
    // Every call a handler can send its byte with has a hook.
    let points = job(&report, "write_path")["attach_points"].to_string();
    // The socket tiers have one hook for every call that sends on a socket
    // (and the pipe and eventfd writes apart).
    let calls: &[&str] = if tier.starts_with("socket") { &[] } else { &["write", "writev", "sendto", "sendmsg"] };
    if tier == "socket_fentry" {
        assert!(points.contains("raw:sock_send_length") && points.contains("pipe_write"), "{points}");
    }
    for call in calls {
        assert!(
            points.contains(&format!("sys_{call}\"")) || points.contains(&format!("sys_exit_{call}\"")),
            "{call}: {points}"
        );
    }
    // Without group_dead (before 6.16) the exit job says how it decides.
    let has_group_dead = std::fs::read_to_string("/sys/kernel/tracing/events/sched/sched_process_exit/format")
        .map(|f| f.contains("group_dead"))
        .unwrap_or(false);
    assert_eq!(report["exit_source"] == "group_dead_field", has_group_dead, "{report:#}");
    if !has_group_dead {
        assert_eq!(report["exit_source"], "live_count", "kernels with BTF read task->signal->live: {report:#}");
    }
}

/// The socket tier — socket sends on `sock:sock_send_length` and handler
/// returns on a uprobe at the signal restorer, no syscall tracepoint — is
/// proven where the kernel has that tracepoint (6.12+); elsewhere asking
/// for it falls back to the syscall tracepoints and says why.
#[test]
fn socket_tier_is_proven_where_the_kernel_has_sock_send_length() {
    let report = check(&["--hooks", "socket"]);
    assert_self_test_passed(&report);
    if std::path::Path::new("/sys/kernel/tracing/events/sock/sock_send_length").exists() {
        assert_eq!(report["tier"], "socket", "{report:#}");
        assert_eq!(job(&report, "write_path")["attach_points"], serde_json::json!(["raw:sock_send_length"]));
        let ret = job(&report, "handler_return");
        assert_eq!(ret["tier"], "uprobe", "{report:#}");
        assert!(ret["attach_points"][0].as_str().is_some_and(|p| p.starts_with("uprobe:/")), "{report:#}");
    } else {
        assert_eq!(report["tier"], "syscall_tracepoint", "{report:#}");
        assert!(report["fallbacks"].to_string().contains("sock_send_length"), "{report:#}");
    }
}

#[test]
fn forced_syscall_tracepoints_pass_the_self_test_too() {
    let report = check(&["--hooks", "tracepoint"]);
    assert_eq!(report["tier"], "syscall_tracepoint");
    assert_self_test_passed(&report);
}

/// In a pid namespace of its own (a pod's shared namespace), and in one
/// nested below another, the programs translate pids through the kernel's
/// BTF and take signal_generate from its raw tracepoint; the self-test
/// child, forked inside the namespace, must be reported at its namespace
/// pid for the check to pass.
#[test]
fn check_passes_in_a_pid_namespace_of_its_own() {
    let unshare = ["unshare", "--pid", "--fork", "--mount-proc"];
    for depth in 1..=2 {
        let mut cmd = Command::new(unshare[0]);
        cmd.args(&unshare[1..]);
        for _ in 1..depth {
            cmd.args(unshare);
        }
        let out = cmd.arg(sigwake_bin()).args(["check", "--json"]).output().expect("running sigwake check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "sigwake check failed {depth} namespace(s) down: {stderr}");
        let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
        assert_self_test_passed(&report);
        let points = job(&report, "signal_path")["attach_points"].to_string();
        assert!(points.contains("raw:signal_generate"), "signal_generate must come from the raw tracepoint: {points}");
        assert!(report["pid_namespace"].as_u64().is_some(), "the report names the namespace: {report:#}");
    }
}

#[test]
fn metrics_name_the_tier_serving_each_job() {
    let agent = RunningAgent::start(&[]);
    let text = agent.metrics();
    let tier = ["fexit", "raw_tracepoint"]
        .into_iter()
        .find(|t| text.contains(&format!(r#"sigwake_hook_tier{{job="write_path",tier="{t}"}} 1"#)))
        .unwrap_or("syscall_tracepoint");
    for (job, want) in [("write_path", tier), ("signal_path", "tracepoint"), ("exit", "tracepoint")] {
        let line = format!(r#"sigwake_hook_tier{{job="{job}",tier="{want}"}} 1"#);
        assert!(text.contains(&line), "missing `{line}` in /metrics:\n{text}");
    }
    // Loss is counted per kind from the start, and the kernel's recursion
    // misses are read for every program (a series only once read).
    wait_until("the first once-a-second update", EVENT, || {
        agent.metrics().contains(r#"sigwake_bpf_program_recursion_misses_total{program="signal_deliver"}"#)
    });
    let text = agent.metrics();
    for kind in ["handler_write", "signal_generate", "process_exit"] {
        let line = format!(r#"sigwake_kernel_lost_events_total{{kind="{kind}"}} "#);
        assert!(text.contains(&line), "missing `{line}` in /metrics:\n{text}");
    }
    agent.stop();
}

/// The hook tier serving `job`, from /metrics.
fn tier_of(metrics: &str, job: &str) -> &'static str {
    ["fexit", "fentry", "raw_tracepoint", "uprobe", "syscall_tracepoint"]
        .into_iter()
        .find(|t| metrics.contains(&format!(r#"sigwake_hook_tier{{job="{job}",tier="{t}"}} 1"#)))
        .unwrap_or_else(|| panic!("no {job} tier in /metrics:\n{metrics}"))
}

/// Writes to pipes (Twisted, libuv, self-pipe loops) are seen on every
/// tier. On the socket tier they need a syscall hook, which puts every
/// syscall on the host on the slow path, so the agent attaches it only
/// while a live actor's wakeup fd is a pipe or not known yet, and says so
/// in `sigwake_syscall_hooks_attached`: not for an agent with only socket
/// actors, at once for an actor of unknown wakeup, kept while its learned
/// wakeup fd is a pipe, and gone when it exits. Other tiers: always (the
/// syscall tracepoints) or never (fentry) attached, pipes seen all the same.
#[test]
fn pipe_wakeups_are_seen_and_the_syscall_hook_is_attached_only_while_an_actor_needs_it() {
    let agent = RunningAgent::start(&["--dry-run", "--no-discovery"]);
    let tier = tier_of(&agent.metrics(), "write_path");
    let attached = || metric_sum(&agent.metrics(), "sigwake_syscall_hooks_attached", &[]);
    // The socket tier (its handler return a uprobe) attaches the pipe hook
    // on demand; socket_fentry's fexit on pipe_write costs nothing else.
    let on_demand = tier == "raw_tracepoint" && tier_of(&agent.metrics(), "handler_return") == "uprobe";
    let always = if tier == "syscall_tracepoint" { 1.0 } else { 0.0 };
    assert_eq!(attached(), always, "an agent with no actor ({tier})");

    // A socket wakeup (trio registers itself, its wakeup fd detected).
    let env = [("SIGWAKE_SOCKET", agent.socket.to_str().unwrap())];
    let (trio, _) = fixture_with_env("trio_actor.py", &["--register", "sockets-only"], &env);
    let (mut pipe_loop, ready) = fixture("loop_actor.py", &["--runtime", "pipe"]);
    let pid = pipe_loop.pid();
    assert_eq!(ready["wakeup_kind"], "pipe", "{ready}");
    // The trio actor is in the registry before the pipe loop is registered.
    agent.wait_entry("/actors", "the trio actor", EVENT, trio.pid(), |a| a["wakeup_fd"].is_number());
    assert_eq!(attached(), always, "a socket actor needs no syscall hook ({tier})");

    // Registered with no runtime and no wakeup fd: the hook goes on at once
    // (its wakeup may be a pipe)…
    register_pid(&agent.socket, "piper", pid);
    if on_demand {
        wait_until("the hook attached for an actor of unknown wakeup", EVENT, || attached() == 1.0);
        let log = agent.proc.stderr_text();
        assert!(log.contains("attached the syscall hook for pipe and eventfd writes: actor piper"), "{log}");
    }
    // …and its handler's write to the pipe is seen through it: the agent
    // learns the wakeup fd and the runtime from that write.
    pipe_loop.signal(libc::SIGINT);
    let a = agent.wait_entry("/actors", "the wakeup fd learned from the handler's write", EVENT, pid, |a| {
        a["wakeup_fd"] == ready["wakeup_fd"]
    });
    assert_eq!(a["runtime"], "self_pipe", "{a}");
    // The SIGINT ends the loop (exit 130); with no actor left whose wakeup
    // is a pipe the hook goes.
    pipe_loop.wait_exit(EVENT);
    agent.wait_entry("/actors", "the pipe loop's exit", EVENT, pid, |a| a["state"] == "exited");
    if on_demand {
        wait_until("the hook detached once no actor needs it", EVENT, || attached() == 0.0);
        assert!(agent.proc.stderr_text().contains("detached the syscall hook for pipe and eventfd writes"));
    }
    assert_eq!(attached(), always, "only the socket actor is left ({tier})");
    agent.stop();
}
