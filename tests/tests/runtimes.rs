//! Runtimes that are not CPython: tokio, whose signal handler sends its
//! wakeup byte with `sendto(fd, "\1", 1, MSG_NOSIGNAL)` on a socketpair
//! instead of `write(2)` (DESIGN §2). The fixture is the Rust binary
//! tests/fixtures/tokio_actor (`sigwake-tokio-actor`, path in
//! SIGWAKE_TOKIO_ACTOR): a current-thread runtime with a SIGINT stream,
//! whose only thread can be blocked inside the runtime
//! (`--starve-seconds N`) so that nothing drains the wakeup socket.
//!
//! tokio's wakeup socket takes 278 one-byte sends on this project's kernel;
//! the tests send [`FLOOD`] SIGINTs, a fraction of a millisecond apart,
//! while the loop is starved: nearly every one gets its own handler run (a
//! few merge into one still pending when the host is busy) and the last
//! ones find the socket full.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use sigwake_tests::*;

/// SIGINTs sent into a starved loop: well over the 278 one-byte sends
/// tokio's wakeup socketpair holds.
const FLOOD: usize = 500;
/// What the socket holds on this project's kernel (DESIGN §2), for messages.
const TOKIO_WAKEUP_CAPACITY: usize = 278;

/// SIGINTs as fast as the handler takes them (`sigint_burst`: none merged
/// into one still pending), in rounds of `n`, until `dropped()` says a drop
/// was seen (at most ten rounds, and not past the process's end).
fn sigint_flood(p: &mut Proc, n: usize, dropped: impl Fn() -> bool) -> Duration {
    let t = Instant::now();
    for _ in 0..10 {
        sigint_burst(p.pid(), n);
        if dropped() || p.child.try_wait().ok().flatten().is_some() {
            break;
        }
    }
    t.elapsed()
}

/// Handler writes name their syscall (write, writev, sendto, sendmsg):
/// tokio's is sendto.
fn check_syscall(ev: &Value) {
    assert_eq!(ev["syscall"], "sendto", "tokio's handler sends its wakeup byte with sendto(2): {ev}");
}

/// The fixture runs one thread: the one the kernel runs the handler on.
fn check_ready(ready: &Value) {
    assert_eq!(ready["runtime"], "tokio", "{ready}");
    assert_eq!(ready["threads"], 1, "a current-thread runtime has one thread: {ready}");
    assert_eq!(ready["main_tid"], ready["pid"], "{ready}");
    assert!(ready["wakeup_fd"].as_i64().is_some_and(|fd| fd > 2), "{ready}");
}

// ---------------------------------------------------------------------------
// sigwake trace
// ---------------------------------------------------------------------------

#[test]
fn starved_tokio_loop_dropped_sigint_is_reported_with_fd_and_signal() {
    let mut drops = trace(&["--only-drops"]);
    // Long enough for the flood's rounds on a slow guest too.
    let starve = format!("{:.1}", scaled(Duration::from_secs(4)).as_secs_f64());
    let (mut actor, ready) = tokio_actor(&["--starve-seconds", &starve]);
    check_ready(&ready);
    let pid = actor.pid();
    actor.stdout.wait_json("the loop to start starving", EVENT, |v| v["starving"] == true);

    let seen = |v: &Value| v["event"] == "wakeup_write_failed" && v["pid"] == pid;
    let took = sigint_flood(&mut actor, FLOOD, || drops.stdout.json().iter().any(seen));
    assert!(
        !actor.stdout.json().iter().any(|v| v["starved"] == true),
        "the SIGINTs took {took:?}: longer than the {starve} s starvation, so the loop may have drained its socket"
    );

    let first = drops.stdout.wait_for("a dropped wakeup for the starved tokio loop", EVENT, |l| {
        l.json().is_some_and(|v| v["event"] == "wakeup_write_failed" && v["pid"] == pid)
    });
    let ev = first.json().unwrap();
    assert_eq!(ev["tid"], ready["main_tid"], "the handler runs on the runtime's only thread: {ev}");
    assert_eq!(ev["fd"], ready["wakeup_fd"], "the failed send is to tokio's wakeup socket: {ev}");
    assert_eq!(ev["signal"], "SIGINT", "{ev}");
    assert_eq!(ev["errno"], libc::EAGAIN, "{ev}");
    assert_eq!(ev["error"], "EAGAIN", "{ev}");
    assert_eq!(ev["bytes"], 1, "{ev}");
    check_syscall(&ev);
    let latency_ms = (first.read_mono_ns - ev["mono_ns"].as_u64().unwrap()) as f64 / 1e6;
    eprintln!("failed sendto -> trace line read by the test: {latency_ms:.3} ms ({FLOOD} SIGINTs sent in {took:?})");

    // Once the thread is free, the loop polls its signal driver and the
    // (delayed) SIGINT reaches the stream.
    actor
        .stdout
        .wait_json("the SIGINT once the loop runs again", Duration::from_secs(20), |v| v["interrupted"] == true);
    let st = actor.wait_exit(EVENT);
    assert_eq!(st.code(), Some(130), "{st}; stderr:\n{}", actor.stderr_text());
    // The drops already printed; give the last ones a moment to arrive.
    thread::sleep(Duration::from_millis(300));
    let all = drops_for(&drops.stdout, pid);
    eprintln!("{} drops for {FLOOD} SIGINTs into a socket that holds {TOKIO_WAKEUP_CAPACITY} bytes", all.len());
    assert!((1..=FLOOD).contains(&all.len()), "between 1 and {FLOOD} drops expected, got {}", all.len());
    for v in &all {
        assert!(v["fd"] == ready["wakeup_fd"] && v["tid"] == ready["main_tid"] && v["signal"] == "SIGINT", "{v}");
        check_syscall(v);
    }
    stop_agent(&mut drops);
}

#[test]
fn healthy_tokio_loop_reports_no_drop() {
    let (mut actor, ready) = tokio_actor(&[]);
    check_ready(&ready);
    let pid = actor.pid().to_string();
    let mut all = trace(&["--pid", &pid, "--until-exit"]);
    let mut drops = trace(&["--only-drops", "--pid", &pid, "--until-exit"]);
    actor.signal(libc::SIGINT);
    actor.stdout.wait_json("the SIGINT stream to yield", EVENT, |v| v["interrupted"] == true);
    let st = actor.wait_exit(EVENT);
    assert_eq!(st.code(), Some(130), "{st}; stderr:\n{}", actor.stderr_text());

    // Positive evidence the agent watched it: the handler entered, and its
    // wakeup send succeeded.
    let deliver = all
        .stdout
        .wait_json("SIGINT handler entry", EVENT, |v| v["event"] == "signal_deliver" && v["signal"] == "SIGINT");
    assert_eq!(deliver["disposition"], "handler", "{deliver}");
    let ok = all.stdout.wait_json("the successful wakeup send", EVENT, |v| v["event"] == "handler_write");
    assert_eq!(ok["fd"], ready["wakeup_fd"], "{ok}");
    assert_eq!(ok["tid"], ready["main_tid"], "{ok}");
    assert_eq!(ok["signal"], "SIGINT", "{ok}");
    assert_eq!(ok["written"], 1, "{ok}");
    check_syscall(&ok);
    assert!(all.wait_exit(EVENT).success(), "{}", all.stderr_text());
    // --until-exit: the trace ends after the exit event, so everything
    // before it has been printed.
    assert!(drops.wait_exit(EVENT).success(), "{}", drops.stderr_text());
    assert_eq!(drops.stdout.snapshot().len(), 0, "no drops expected: {:?}", drops.stdout.snapshot());
    let writes: Vec<Value> = all.stdout.json().into_iter().filter(|v| v["event"] == "handler_write").collect();
    assert_eq!(writes.len(), 1, "one SIGINT, one wakeup send: {writes:?}");
    assert!(all.stdout.json().iter().all(|v| v["event"] != "wakeup_write_failed"));
}

// ---------------------------------------------------------------------------
// sigwake run: a selector makes the fixture an actor; the ladder stops it
// ---------------------------------------------------------------------------

/// The actions of `<state_dir>/audit.jsonl` for one incident, in order.
fn audit_actions(state_dir: &Path, incident: u64) -> Vec<String> {
    audit_lines(state_dir)
        .iter()
        .filter(|l| l["incident"] == incident)
        .map(|l| l["action"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Modelled on escalation.rs's seed scenario, with the tokio fixture: a
/// config selector (no registration: the fixture has no client) gives the
/// process the built-in `default` policy; a SIGINT flood into its starved
/// loop teaches the agent its wakeup fd (from the handler's sendto) and
/// drops wakeups; nothing drains the socket within the confirm window (2 s
/// for runtimes other than trio and asyncio), so the ladder captures
/// diagnostics and SIGTERMs it — tokio leaves SIGTERM at its default
/// action (only SIGINT has a handler), so that ends it.
#[test]
fn starved_tokio_actor_selected_by_config_is_escalated() {
    let t0 = Instant::now();
    let tag = format!("tokio-escalation-{}", std::process::id());
    let name = "tokio-fetcher";
    let dir = TempDir::new("runtimes-config");
    let config = dir.0.join("sigwake.toml");
    std::fs::write(
        &config,
        format!(
            "# written by tests/tests/runtimes.rs\n\
             [[selector]]\n\
             name = \"{name}\"\n\
             cmdline = \"sigwake-tokio-actor .*--tag {tag}\"\n\
             policy = \"default\"\n"
        ),
    )
    .unwrap();
    // --no-discovery: the loops of tests running in parallel are not this
    // agent's business; the selector is what makes the fixture an actor.
    let agent = RunningAgent::start(&["--no-discovery", "--config", config.to_str().unwrap()]);
    let (mut actor, ready) = tokio_actor(&["--starve-seconds", "60", "--tag", &tag]);
    check_ready(&ready);
    let pid = actor.pid();
    let start = start_time(pid);
    actor.stdout.wait_json("the loop to start starving", EVENT, |v| v["starving"] == true);
    let a = agent.wait_entry("/actors", "the selector to match the tokio fixture", Duration::from_secs(5), pid, |a| {
        a["source"] == "selector"
    });
    assert_eq!(a["name"], name, "{a}");
    assert_eq!(a["policy"], "default", "{a}");
    assert_eq!(a["start_time"], start, "{a}");
    // The watched set reaches the kernel map right after the scan.
    thread::sleep(Duration::from_millis(200));

    let sent = Instant::now();
    let dropped = || agent.entries_for("/actors", pid).iter().any(|a| a["drops"].as_u64().is_some_and(|d| d > 0));
    let took = sigint_flood(&mut actor, FLOOD, dropped);

    // The wakeup fd is learned from the handler's sends, and the failed
    // ones are counted against the actor.
    let a = agent.wait_entry("/actors", "the wakeup fd to be learned and drops counted", EVENT, pid, |a| {
        a["wakeup_fd"] == ready["wakeup_fd"] && a["drops"].as_u64().is_some_and(|d| d >= 1)
    });
    let recent = a["recent_drops"].as_array().cloned().unwrap_or_default();
    assert!(
        recent.iter().all(|d| d["fd"] == ready["wakeup_fd"] && d["signal"] == "SIGINT" && d["errno"] == libc::EAGAIN),
        "{a:#}"
    );

    // Gone within confirm (2 s) + diagnostics + a margin of the first
    // SIGINT, by SIGTERM.
    let budget = Duration::from_secs(10);
    let status = actor.wait_exit(budget.saturating_sub(sent.elapsed()));
    let exit_ms = sent.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "the actor should have been ended by SIGTERM, got {status}");

    let inc =
        agent.wait_entry("/incidents", "the incident to close as exited", EVENT, pid, |i| i["status"] == "exited");
    let id = inc["id"].as_u64().expect("incident id");
    thread::sleep(Duration::from_millis(300));
    let inc = agent.entries_for("/incidents", pid).into_iter().find(|i| i["id"] == id).expect("the incident");
    let confirm_ms = inc["evidence"]["confirm_ms"].as_f64().expect("evidence.confirm_ms");
    eprintln!(
        "[tokio] {FLOOD} SIGINTs in {took:?}; confirmed {confirm_ms:.0} ms after the first evidence; exit {exit_ms:.0} ms after the first SIGINT; evidence {}",
        inc["evidence"]
    );
    assert_eq!(inc["actor"], name, "{inc:#}");
    assert_eq!(inc["policy"], "default", "{inc:#}");
    assert_eq!(inc["start_time"], start, "{inc:#}");
    assert_eq!(inc["dry_run"], false, "{inc:#}");
    assert_eq!(inc["evidence"]["wakeup_fd"], ready["wakeup_fd"], "{inc:#}");
    assert!(inc["evidence"]["drops"].as_u64().is_some_and(|d| d >= 1), "evidence.drops should be ≥ 1: {inc:#}");
    assert!(inc["evidence"]["signals"].as_array().is_some_and(|s| s.iter().any(|x| x == "SIGINT")), "{inc:#}");
    assert!(
        (2000.0..3500.0).contains(&confirm_ms),
        "confirmed {confirm_ms} ms after the first evidence; the window is 2 s: {inc:#}"
    );
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok"], "{inc:#}");
    assert_eq!(agent.entries_for("/incidents", pid).len(), 1, "one incident for the actor");
    assert_eq!(audit_actions(&agent.state_dir, id), ["opened", "diagnostics", "sigterm", "closed_exited"]);

    // Diagnostics, captured while the loop was starving: its one thread,
    // and the wakeup socket's fill measured through the peer's queue.
    let diag = agent.state_dir.join("incidents").join(id.to_string());
    let read = |f: &str| -> Value {
        let text = std::fs::read_to_string(diag.join(f)).unwrap_or_else(|e| panic!("{}: {e}", diag.join(f).display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{f} is not JSON ({e}): {text}"))
    };
    let threads = read("threads.json");
    assert!(threads.as_array().is_some_and(|t| t.iter().any(|t| t["tid"] == ready["main_tid"])), "{threads:#}");
    let wakeup = read("wakeup.json");
    eprintln!("[tokio] wakeup.json: {wakeup}");
    assert_eq!(wakeup["fd"], ready["wakeup_fd"], "{wakeup:#}");
    assert!(
        wakeup["fill"]["queued"].as_u64().is_some_and(|q| q >= 1),
        "the starved loop's socket should hold bytes: {wakeup:#}"
    );

    // Metrics: this actor's drops, incident and action.
    let exited = agent.wait_entry("/actors", "the actor to be retired", EVENT, pid, |a| {
        a["state"] == "exited" || a["state"] == "dead"
    });
    let drops = exited["drops"].as_u64().expect("drops") as f64;
    eprintln!("[tokio] the actor dropped {drops} wakeups; the incident's evidence counts {}", inc["evidence"]["drops"]);
    let label = format!(r#"actor="{name}""#);
    let mut m = String::new();
    wait_until(
        &format!("sigwake_wakeup_writes_dropped_total{{{label}}} to reach the actor's {drops} drops"),
        EVENT,
        || {
            m = agent.metrics();
            metric_sum(&m, "sigwake_wakeup_writes_dropped_total", &[&label, r#"signal="SIGINT""#, r#"errno="EAGAIN""#])
                == drops
        },
    );
    assert_eq!(metric_sum(&m, "sigwake_starvation_incidents_total", &[&label]), 1.0, "{m}");
    assert_eq!(
        metric_sum(&m, "sigwake_escalation_actions_total", &[&label, r#"action="sigterm""#, r#"outcome="ok""#]),
        1.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "sigwake_escalation_actions_total", &[&label, r#"action="sigkill""#]), 0.0, "{m}");
    agent.stop();
    eprintln!("[tokio escalation] done in {:.1} s", t0.elapsed().as_secs_f64());
}

/// Nobody registers or selects the tokio loop: its first handler `sendto`
/// of one byte is the self-pipe trick, and discovery records it, as it does
/// a CPython loop's `write` (observe only, with its wakeup fd); its drops
/// are then attributed to it by name.
#[test]
fn unregistered_tokio_loop_is_discovered_from_its_sendto_and_its_drops_attributed() {
    let agent = RunningAgent::start(&[]);
    let starve = format!("{:.1}", scaled(Duration::from_secs(3)).as_secs_f64());
    let (mut actor, ready) = tokio_actor(&["--starve-seconds", &starve]);
    check_ready(&ready);
    let pid = actor.pid();
    assert!(agent.entries_for("/actors", pid).is_empty(), "nothing registered it yet");
    actor.stdout.wait_json("the loop to start starving", EVENT, |v| v["starving"] == true);
    let dropped = || agent.entries_for("/actors", pid).iter().any(|a| a["drops"].as_u64().is_some_and(|d| d > 0));
    sigint_flood(&mut actor, FLOOD, dropped);
    let a = agent.wait_entry("/actors", "the tokio loop to be discovered", EVENT, pid, |a| {
        a["source"] == "discovered" && a["drops"].as_u64().is_some_and(|d| d > 0)
    });
    assert_eq!(a["wakeup_fd"], ready["wakeup_fd"], "the fd its handler sends to: {a}");
    assert_eq!(a["runtime"], "tokio", "tokio's signal driver is in the executable, and its handler sends: {a}");
    assert!(a["policy"].is_null(), "discovered loops are observed only: {a}");
    assert_eq!(a["start_time"], start_time(pid), "{a}");
    let name = a["name"].as_str().unwrap().to_string();
    let text = agent.metrics();
    let counted = metric_sum(&text, "sigwake_wakeup_writes_dropped_total", &[&format!("actor=\"{name}\"")]);
    assert!(counted >= 1.0, "drops counted for actor {name}: {counted}\n{text}");
    // The loop recovers by itself (trio-like delay, not loss: tokio
    // coalesces) and exits on the SIGINT it finally sees.
    actor.stdout.wait_json("the SIGINT once the loop runs", Duration::from_secs(20), |v| v["interrupted"] == true);
    assert_eq!(actor.wait_exit(EVENT).code(), Some(130));
    agent.wait_entry("/actors", "the discovered loop to be exited", EVENT, pid, |a| a["state"] == "exited");
    agent.stop();
}

// ---------------------------------------------------------------------------
// One test per runtime: recognised, drops attributed, starvation judged
// ---------------------------------------------------------------------------

/// A runtime the suite runs for real, and what the agent must make of it.
struct Case {
    /// `runtime` in /actors and in metric labels.
    runtime: &'static str,
    /// The default policy's confirm window for it (README's table).
    window: Duration,
    /// SIGINTs that fill its wakeup fd (and so drop) where that takes few;
    /// sent in rounds until a drop is counted (at most ten times this). One
    /// where a fill takes too many (a pipe of one-byte writes: 65536) or
    /// none overflows (an eventfd): the verdict comes from the undrained fill.
    flood: usize,
    /// How the ladder ends the starved process: its SIGTERM handler is
    /// Python code that cannot run while the GIL is held (Twisted) or the
    /// default action ends it.
    ended_by: i32,
}

/// The Node fixture (tests/fixtures/node_actor.js) with `args`, and its
/// ready line. `node` comes from PATH (SIGWAKE_NODE overrides).
fn node_actor(args: &[&str]) -> (Proc, Value) {
    let node = std::env::var_os("SIGWAKE_NODE").unwrap_or_else(|| "node".into());
    let mut cmd = std::process::Command::new(&node);
    cmd.arg(fixtures_dir().join("node_actor.js")).args(args);
    let p = Proc::spawn("node node_actor.js", &mut cmd);
    let ready = p.stdout.wait_json("node_actor.js ready", Duration::from_secs(30), |v| v["ready"] == true);
    (p, ready)
}

/// The fixture for `case`: loop_actor.py for the Python runtimes, the Node
/// program for libuv. `busy`: seconds its loop is kept from running once it
/// is ready (a thread holding the GIL; a JavaScript busy loop).
fn loop_fixture(case: &Case, busy: &str, exit_after: &str, tag: &str, c_bin: Option<&Path>) -> (Proc, Value) {
    if let Some(bin) = c_bin {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["--busy-seconds", busy, "--exit-after", exit_after, "--tag", tag]);
        let p = Proc::spawn("eventfd_loop", &mut cmd);
        let ready = p.stdout.wait_json("eventfd_loop ready", Duration::from_secs(30), |v| v["ready"] == true);
        return (p, ready);
    }
    if case.runtime == "tokio" {
        tokio_actor(&["--starve-seconds", busy, "--exit-after", exit_after, "--tag", tag])
    } else if case.runtime == "libuv" {
        node_actor(&["--busy-seconds", busy, "--exit-after", exit_after, "--tag", tag])
    } else {
        let rt = if case.runtime == "self_pipe" { "pipe" } else { case.runtime };
        fixture("loop_actor.py", &["--runtime", rt, "--hog-seconds", busy, "--exit-after", exit_after, "--tag", tag])
    }
}

/// Waits for the fixture's loop to be kept busy (its line says so).
fn wait_busy(p: &Proc) {
    p.stdout.wait_json("the loop to be kept busy", EVENT, |v| {
        v["hogging"] == true || v["busy"] == true || v["starving"] == true
    });
}

/// The runtime's three verdicts under one agent, whose config selects two
/// fixtures (no runtime given: the agent must recognise it) with the
/// built-in `default` policy:
/// - starved (its loop kept busy for a minute): named with its runtime,
///   its drops attributed to it, confirmed within its window, diagnostics
///   and the ladder end it;
/// - briefly busy (a fraction of its window) and then healthy: the SIGINT
///   is handled late, no incident; a second SIGINT is handled at once and
///   ends it (exit 130), still no incident.
fn judge(case: Case) {
    let t0 = Instant::now();
    let rt = case.runtime;
    let tag = format!("{rt}-verdicts-{}", std::process::id());
    let (starved_name, busy_name) = (format!("{rt}-starved"), format!("{rt}-busy"));
    let dir = TempDir::new("runtimes-verdicts");
    let config = dir.0.join("sigwake.toml");
    std::fs::write(
        &config,
        format!(
            "# written by tests/tests/runtimes.rs\n\
             [[selector]]\nname = \"{starved_name}\"\ncmdline = \"--tag {tag}-starved$\"\npolicy = \"default\"\n\
             [[selector]]\nname = \"{busy_name}\"\ncmdline = \"--tag {tag}-busy$\"\npolicy = \"default\"\n"
        ),
    )
    .unwrap();
    // --no-discovery: other tests' loops are not this agent's business;
    // the runtime of the selected ones is recognised all the same.
    // The eventfd loop is C (tests/fixtures/eventfd_loop.c), built here.
    let c_bin = (rt == "eventfd").then(|| c_fixture(&dir, "eventfd_loop"));
    let agent = RunningAgent::start(&["--no-discovery", "--config", config.to_str().unwrap()]);
    let (mut starved, _) = loop_fixture(&case, "60", "1", &format!("{tag}-starved"), c_bin.as_deref());
    let (mut busy, _) = loop_fixture(&case, "0.3", "2", &format!("{tag}-busy"), c_bin.as_deref());
    let (sp, bp) = (starved.pid(), busy.pid());
    for (pid, name) in [(sp, &starved_name), (bp, &busy_name)] {
        let a = agent
            .wait_entry("/actors", "the selector to match", Duration::from_secs(5), pid, |a| a["source"] == "selector");
        assert_eq!(&a["name"], name.as_str(), "{a}");
    }
    // The watched set reaches the kernel map right after the scan.
    thread::sleep(Duration::from_millis(200));

    wait_busy(&busy);
    let busy_sigint = Instant::now();
    busy.signal(libc::SIGINT);
    wait_busy(&starved);
    let sent = Instant::now();
    if case.flood > 1 {
        // In rounds until the agent counts a drop: on a busy host SIGINTs
        // merge into one still pending, so a fixed count may not fill the fd.
        let dropped = |agent: &RunningAgent| {
            agent.entries_for("/actors", sp).iter().any(|a| a["drops"].as_u64().is_some_and(|d| d > 0))
        };
        let mut sent = 0;
        while sent < 10 * case.flood && starved.child.try_wait().unwrap().is_none() && !dropped(&agent) {
            // Stops early if the ladder ends it while the flood is under way.
            sigint_burst(starved.pid(), case.flood.min(100));
            sent += case.flood.min(100);
        }
    } else {
        sigint_burst(starved.pid(), 1);
    }

    // Named with its runtime, from its first wakeup write.
    for pid in [sp, bp] {
        let a = agent.wait_entry("/actors", &format!("the runtime to be recognised as {rt}"), EVENT, pid, |a| {
            a["runtime"] != "unknown"
        });
        assert_eq!(a["runtime"], rt, "{a:#}");
        assert!(a["wakeup_fd"].as_i64().is_some_and(|fd| fd > 2), "the wakeup fd is learned: {a:#}");
    }

    // Starved: the ladder ends it.
    let status = starved.wait_exit(Duration::from_secs(20));
    let exit_ms = sent.elapsed().as_secs_f64() * 1e3;
    assert_eq!(
        status.signal(),
        Some(case.ended_by),
        "{rt}: the starved loop should be ended by the ladder, got {status}"
    );
    let inc = agent.wait_entry("/incidents", "the incident to close", EVENT, sp, |i| i["status"] == "exited");
    let confirm_ms = inc["evidence"]["confirm_ms"].as_f64().expect("evidence.confirm_ms");
    eprintln!(
        "[{rt}] confirmed {confirm_ms:.0} ms after the first evidence; ended {exit_ms:.0} ms after the first SIGINT; evidence {}",
        inc["evidence"]
    );
    assert_eq!(inc["actor"], starved_name.as_str(), "{inc:#}");
    assert_eq!(inc["runtime"], rt, "{inc:#}");
    let window_ms = case.window.as_secs_f64() * 1e3;
    assert!(
        // Under a second late: a runtime recognised only at its first
        // wakeup write must still get its own window, not the unknown one.
        (window_ms..window_ms + 900.0).contains(&confirm_ms),
        "{rt}: confirmed {confirm_ms} ms after the first evidence; its window is {window_ms} ms: {inc:#}"
    );
    let steps = incident_steps(&inc);
    assert_eq!(steps.first().map(String::as_str), Some("diagnostics:ok"), "{inc:#}");
    let last = if case.ended_by == libc::SIGKILL { "sigkill:ok" } else { "sigterm:ok" };
    assert_eq!(steps.last().map(String::as_str), Some(last), "{inc:#}");

    // Its drops are counted against it, under its runtime.
    let gone = agent.wait_entry("/actors", "the starved actor to be retired", EVENT, sp, |a| {
        a["state"] == "exited" || a["state"] == "dead"
    });
    let drops = gone["drops"].as_u64().expect("drops");
    if case.flood > 1 {
        assert!(drops >= 1, "{rt}: {} SIGINTs into a starved loop should overflow its wakeup fd: {gone:#}", case.flood);
    }
    let (actor, runtime) = (format!(r#"actor="{starved_name}""#), format!(r#"runtime="{rt}""#));
    let mut m = String::new();
    wait_until(&format!("the metrics to count {starved_name}'s {drops} drops and incident"), EVENT, || {
        m = agent.metrics();
        metric_sum(&m, "sigwake_wakeup_writes_dropped_total", &[&actor, &runtime]) == drops as f64
            && metric_sum(&m, "sigwake_starvation_incidents_total", &[&actor, &runtime]) == 1.0
    });

    // Briefly busy: handled once the loop ran, and left alone.
    busy.stdout.wait_json("the delayed SIGINT to be handled", EVENT, |v| v["sigint_callback"] == 1);
    let settle = (busy_sigint + case.window + Duration::from_millis(500)).saturating_duration_since(Instant::now());
    thread::sleep(settle);
    let a = agent.entries_for("/actors", bp).pop().expect("the busy actor");
    assert!(agent.entries_for("/incidents", bp).is_empty(), "{rt}: a loop busy for 0.3 s is no starvation: {a:#}");
    assert_eq!(a["state"], "healthy", "{a:#}");
    // Healthy: the next SIGINT is handled at once.
    busy.signal(libc::SIGINT);
    let st = busy.wait_exit(EVENT);
    assert_eq!(st.code(), Some(130), "{st}; stderr:\n{}", busy.stderr_text());
    agent.wait_entry("/actors", "the healthy actor to exit", EVENT, bp, |a| a["state"] == "exited");
    assert!(agent.entries_for("/incidents", bp).is_empty(), "{rt}: a healthy loop has no incident");
    let m = agent.metrics();
    let busy_label = format!(r#"actor="{busy_name}""#);
    assert_eq!(metric_sum(&m, "sigwake_starvation_incidents_total", &[&busy_label]), 0.0, "{m}");
    agent.stop();
    eprintln!("[{rt} verdicts] done in {:.1} s", t0.elapsed().as_secs_f64());
}

/// tokio coalesces: a drop loses nothing, but the loop is starved all the same.
#[test]
fn tokio_is_recognised_and_judged() {
    judge(Case { runtime: "tokio", window: Duration::from_secs(2), flood: 400, ended_by: libc::SIGTERM });
}

/// trio's wakeup socket holds 6 bytes: a few SIGINTs fill it.
#[test]
fn trio_is_recognised_and_judged() {
    judge(Case { runtime: "trio", window: Duration::from_secs(2), flood: 20, ended_by: libc::SIGTERM });
}

#[test]
fn asyncio_is_recognised_and_judged() {
    judge(Case { runtime: "asyncio", window: Duration::from_secs(1), flood: 400, ended_by: libc::SIGTERM });
}

#[test]
fn uvloop_is_recognised_and_judged() {
    judge(Case { runtime: "uvloop", window: Duration::from_secs(1), flood: 400, ended_by: libc::SIGTERM });
}

#[test]
fn tornado_is_recognised_and_judged() {
    judge(Case { runtime: "tornado", window: Duration::from_secs(1), flood: 400, ended_by: libc::SIGTERM });
}

/// Twisted's waker is a pipe (65536 one-byte writes): one SIGINT, judged
/// by the undrained pipe; its SIGTERM handler is Python code that cannot
/// run while the loop is starved, so the ladder goes on to SIGKILL.
#[test]
fn twisted_is_recognised_and_judged() {
    judge(Case { runtime: "twisted", window: Duration::from_secs(2), flood: 1, ended_by: libc::SIGKILL });
}

#[test]
fn python_self_pipe_loop_is_recognised_and_judged() {
    judge(Case { runtime: "self_pipe", window: Duration::from_secs(2), flood: 1, ended_by: libc::SIGTERM });
}

/// An eventfd loop (GLib's way) cannot overflow: no drop, ever; its
/// starvation shows as an unread counter (fdinfo `eventfd-count`).
#[test]
fn eventfd_loop_is_recognised_and_judged() {
    judge(Case { runtime: "eventfd", window: Duration::from_secs(2), flood: 1, ended_by: libc::SIGTERM });
}

/// libuv's signal pipe takes 4096 of its 16-byte messages, more than fit
/// in its 1 s window here: one SIGINT, judged by the undrained pipe (drops:
/// [`node_libuv_lost_messages_are_attributed`]). Node's SIGTERM handler
/// (node.cc SignalExit) is C and ends it even while JavaScript spins.
#[test]
fn node_libuv_is_recognised_and_judged() {
    judge(Case { runtime: "libuv", window: Duration::from_secs(1), flood: 1, ended_by: libc::SIGTERM });
}

/// libuv's handler writes a 16-byte message per signal to its signal pipe
/// (65536 bytes: 4096 messages); once full, the write fails and libuv does
/// not retry: that listener call is lost. Nobody registers or selects the
/// Node program: discovery names it from the message write (not from the
/// one-byte write to libuv's blocking signal-lock pipe that follows it),
/// and its lost messages are counted against it under `runtime="libuv"`.
/// A pipe loop nobody registered is discovered with `--discover-pipes`
/// (on the socket tier it keeps the syscall hook for pipe writes on).
#[test]
fn node_libuv_lost_messages_are_attributed() {
    // Well over the 4096 messages the pipe holds: some SIGINTs merge into
    // one still pending on a busy host, so the flood goes on, in rounds,
    // until the agent counts a drop.
    const MAX_SIGINTS: usize = 12_000;
    let agent = RunningAgent::start(&["--discover-pipes"]);
    let mut drops = trace(&["--only-drops"]);
    let (mut node, _) = node_actor(&["--busy-seconds", "20"]);
    let pid = node.pid();
    wait_busy(&node);
    let t = Instant::now();
    let mut sent = 0;
    let dropped = |agent: &RunningAgent| {
        agent.entries_for("/actors", pid).iter().any(|a| a["drops"].as_u64().is_some_and(|d| d > 0))
    };
    while sent < MAX_SIGINTS && !dropped(&agent) {
        sigint_burst(node.pid(), 1000);
        sent += 1000;
    }
    let took = t.elapsed();
    assert!(
        node.stdout.json().iter().all(|v| v["busy_done"] != true),
        "the {sent} SIGINTs took {took:?}: longer than the 20 s busy loop, so the loop may have drained its pipe"
    );
    let a = agent.wait_entry("/actors", "the Node loop to be discovered with drops", EVENT, pid, |a| {
        a["source"] == "discovered" && a["drops"].as_u64().is_some_and(|d| d > 0)
    });
    assert_eq!(a["runtime"], "libuv", "{a:#}");
    assert!(a["policy"].is_null(), "discovered loops are observed only: {a:#}");
    let fd = a["wakeup_fd"].clone();
    let first = drops
        .stdout
        .wait_json("a failed message write", EVENT, |v| v["event"] == "wakeup_write_failed" && v["pid"] == pid);
    assert_eq!(first["fd"], fd, "the failed write is to the fd discovery learned: {first}");
    assert_eq!(first["bytes"], 16, "libuv writes a 16-byte uv__signal_msg_t: {first}");
    assert_eq!(first["syscall"], "write", "{first}");
    assert_eq!(first["error"], "EAGAIN", "{first}");
    assert!(
        a["recent_drops"].as_array().is_some_and(|d| d.iter().all(|d| d["fd"] == fd && d["signal"] == "SIGINT")),
        "{a:#}"
    );
    let name = a["name"].as_str().unwrap().to_string();
    let text = agent.metrics();
    let counted = metric_sum(
        &text,
        "sigwake_wakeup_writes_dropped_total",
        &[&format!(r#"actor="{name}""#), r#"runtime="libuv""#, r#"errno="EAGAIN""#],
    );
    assert!(counted >= 1.0, "drops counted for {name} under runtime libuv: {counted}\n{text}");
    // Done: Node's SIGTERM handler is C (node.cc SignalExit) and ends it
    // while JavaScript still spins.
    node.signal(libc::SIGTERM);
    assert_eq!(node.wait_exit(EVENT).signal(), Some(libc::SIGTERM), "{}", node.stderr_text());
    eprintln!("[libuv] {sent} SIGINTs in {took:?}; {} drops", a["drops"]);
    stop_agent(&mut drops);
    agent.stop();
}
