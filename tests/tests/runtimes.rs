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

/// Sends `n` SIGINTs as fast as the handler can take them (a tiny gap, so
/// that each one is dequeued before the next and none is merged).
fn sigint_flood(p: &Proc, n: usize) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        p.signal(libc::SIGINT);
        thread::sleep(Duration::from_micros(200));
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
    let (mut actor, ready) = tokio_actor(&["--starve-seconds", "4"]);
    check_ready(&ready);
    let pid = actor.pid();
    actor.stdout.wait_json("the loop to start starving", EVENT, |v| v["starving"] == true);

    let took = sigint_flood(&actor, FLOOD);
    assert!(
        !actor.stdout.json().iter().any(|v| v["starved"] == true),
        "the {FLOOD} SIGINTs took {took:?}: longer than the 4 s starvation, so the loop may have drained its socket"
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
    let took = sigint_flood(&actor, FLOOD);

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
    let (mut actor, ready) = tokio_actor(&["--starve-seconds", "3"]);
    check_ready(&ready);
    let pid = actor.pid();
    assert!(agent.entries_for("/actors", pid).is_empty(), "nothing registered it yet");
    actor.stdout.wait_json("the loop to start starving", EVENT, |v| v["starving"] == true);
    sigint_flood(&actor, FLOOD);
    let a = agent.wait_entry("/actors", "the tokio loop to be discovered", EVENT, pid, |a| {
        a["source"] == "discovered" && a["drops"].as_u64().is_some_and(|d| d > 0)
    });
    assert_eq!(a["wakeup_fd"], ready["wakeup_fd"], "the fd its handler sends to: {a}");
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
