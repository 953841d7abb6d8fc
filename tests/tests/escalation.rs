//! Escalation end to end: the real agent (`sigwake run`), real starved trio
//! loops registered through the socket, real signals through pidfds.
//!
//! Every test starts its own agent (own port, socket and state dir) with
//! `--no-discovery`, so that the loops of tests running in parallel are
//! not observed (nor counted in histograms) by this test's agent. Every
//! assertion is about pids and actor names the test owns.
//!
//! The seed scenario: a trio actor whose main thread is starved (a thread
//! holds the GIL in a C call) gets 10 SIGINTs 20 ms apart; its wakeup
//! socket fills, the wakeups are dropped, nothing drains the fd within the
//! confirm window: the agent confirms starvation and walks the policy's
//! tiers.

use std::{
    collections::HashSet,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use sigwake_tests::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Parses the agent's `YYYY-MM-DDTHH:MM:SS.ffffffZ` into Unix ns.
fn rfc3339_ns(text: &str) -> u64 {
    try_rfc3339_ns(text).unwrap_or_else(|| panic!("`{text}` is not YYYY-MM-DDTHH:MM:SS[.f]Z"))
}

fn try_rfc3339_ns(text: &str) -> Option<u64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let d: Vec<i64> = date.split('-').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if d.len() != 3 || h.len() != 3 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m, day) = (if d[1] <= 2 { d[0] - 1 } else { d[0] }, d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h[0] * 3600 + h[1] * 60 + h[2];
    let frac_ns: u64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    Some(u64::try_from(secs).ok()? * 1_000_000_000 + frac_ns)
}

#[test]
fn rfc3339_parser_matches_the_agent_format() {
    assert_eq!(rfc3339_ns("1970-01-01T00:00:00.000000Z"), 0);
    assert_eq!(rfc3339_ns("2026-11-22T00:00:00.123456Z"), 1_795_305_600_123_456_000);
    assert_eq!(rfc3339_ns("2000-02-29T00:00:00.000000Z"), 951_782_400_000_000_000);
}

fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    (to_ns as f64 - from_ns as f64) / 1e6
}

fn field_u64(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no integer `{key}` in {v}"))
}

fn done(t0: Instant, test: &str) {
    eprintln!("[{test}] done in {:.1} s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------
// 1. The seed scenario, with the built-in default policy
// ---------------------------------------------------------------------------

#[test]
fn seed_scenario_starved_trio_actor_is_stopped_by_sigterm_and_everything_is_recorded() {
    let t0 = Instant::now();
    // The built-in policy: confirm 2 s (trio), diagnostics, SIGTERM (3 s)…
    let agent = Agent::start(None, &[]);
    let (mut actor, ready) =
        spawn_actor(&agent.socket, "trio_actor.py", &["--register", "fetcher", "--hog-seconds", "60"]);
    let pid = actor.pid();
    let start = start_time(pid);
    let main_tid = field_u64(&ready, "main_tid");
    let (hog, sent) = starve(&actor);
    let hog_tid = field_u64(&hog, "tid");

    // Gone within confirm (2 s) + 5 s of the first SIGINT, by SIGTERM
    // (trio leaves SIGTERM at its default action).
    let budget = Duration::from_secs(7);
    let status = actor.wait_exit(budget.saturating_sub(sent.instant.elapsed()));
    let exit_ms = sent.instant.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "the actor should have been ended by SIGTERM, got {status}");

    let inc = wait_incident(&agent, "the incident to close as exited", EVENT, pid, |i| i["status"] == "exited");
    let id = inc["id"].as_u64().expect("incident id");
    // Give a late step (if any) time to land before reading everything.
    thread::sleep(Duration::from_millis(300));
    let inc = incidents_of(&agent, pid).into_iter().find(|i| i["id"] == id).expect("the incident");
    let lines = audit_of(&agent.state_dir, id);
    let m = agent.metrics();

    // Latencies, for the record (printed before any assertion can fail).
    let audit_time =
        |action: &str| lines.iter().find(|l| l["action"] == action).and_then(|l| l["time"].as_str()).map(rfc3339_ns);
    let first_evidence = field_u64(&inc, "first_evidence_mono");
    let confirmed = field_u64(&inc, "confirmed_mono");
    let opened_unix = rfc3339_ns(inc["opened"].as_str().expect("incident.opened"));
    let confirm_ms = inc["evidence"]["confirm_ms"].as_f64().expect("confirm_ms");
    let lat = |stage: &str, part: &str| {
        metric_sum(&m, &format!("sigwake_detection_latency_seconds_{part}"), &[&format!("stage=\"{stage}\"")])
    };
    let (confirm_sum, confirm_n) = (lat("confirm", "sum"), lat("confirm", "count"));
    let (action_sum, action_n) = (lat("action", "sum"), lat("action", "count"));
    let since = |from: u64, to: Option<u64>| to.map_or("-".to_string(), |t| format!("{:.1} ms", ms_between(from, t)));
    eprintln!("[seed] latencies (built-in default policy, trio confirm window 2 s):");
    eprintln!(
        "[seed]   first SIGINT -> first evidence (stop signal in handler, kernel time): {:.1} ms",
        ms_between(sent.mono_ns, first_evidence)
    );
    eprintln!(
        "[seed]   first SIGINT -> starvation confirmed (incident.confirmed_mono):     {:.1} ms",
        ms_between(sent.mono_ns, confirmed)
    );
    eprintln!(
        "[seed]   first SIGINT -> incident opened (incident.opened, wall clock):      {:.1} ms",
        ms_between(sent.unix_ns, opened_unix)
    );
    eprintln!(
        "[seed]   first SIGINT -> audit `opened` line:                                {}",
        since(sent.unix_ns, audit_time("opened"))
    );
    eprintln!(
        "[seed]   incident opened -> audit `diagnostics` line:                        {}",
        since(opened_unix, audit_time("diagnostics"))
    );
    eprintln!(
        "[seed]   incident opened -> audit `sigterm` line:                            {}",
        since(opened_unix, audit_time("sigterm"))
    );
    eprintln!("[seed]   first SIGINT -> process exit seen by the test:                      {exit_ms:.1} ms");
    eprintln!("[seed]   evidence.confirm_ms: {confirm_ms:.1} ms, drops: {}", inc["evidence"]["drops"]);
    eprintln!(
        "[seed]   sigwake_detection_latency_seconds{{stage=\"confirm\"}}: sum {confirm_sum:.4} s, count {confirm_n} (mean {:.1} ms)",
        if confirm_n > 0.0 { confirm_sum / confirm_n * 1e3 } else { f64::NAN }
    );
    eprintln!(
        "[seed]   sigwake_detection_latency_seconds{{stage=\"action\"}}:  sum {action_sum:.4} s, count {action_n} (mean {:.1} ms)",
        if action_n > 0.0 { action_sum / action_n * 1e3 } else { f64::NAN }
    );
    eprintln!(
        "[seed]   sigwake_starvation_duration_seconds{{runtime=\"trio\"}}: sum {:.4} s, count {}",
        metric_sum(&m, "sigwake_starvation_duration_seconds_sum", &[r#"runtime="trio""#]),
        metric_sum(&m, "sigwake_starvation_duration_seconds_count", &[r#"runtime="trio""#])
    );

    // The incident.
    assert_eq!(inc["actor"], "fetcher", "{inc:#}");
    assert_eq!(inc["runtime"], "trio", "{inc:#}");
    assert_eq!(inc["policy"], "default", "{inc:#}");
    assert_eq!(inc["dry_run"], false, "{inc:#}");
    assert_eq!(inc["start_time"], start, "{inc:#}");
    assert!(inc["evidence"]["drops"].as_u64().is_some_and(|d| d >= 1), "evidence.drops should be ≥ 1: {inc:#}");
    assert!(inc["evidence"]["signals"].as_array().is_some_and(|s| s.iter().any(|x| x == "SIGINT")), "{inc:#}");
    assert!(
        (2000.0..3000.0).contains(&confirm_ms),
        "confirmed {confirm_ms} ms after the first evidence; the window is 2 s: {inc:#}"
    );
    let opened_after = ms_between(sent.unix_ns, opened_unix);
    assert!(
        (1900.0..4000.0).contains(&opened_after),
        "incident opened {opened_after:.0} ms after the first SIGINT; window 2 s"
    );
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok"], "{inc:#}");
    assert!(inc["closed"].is_string(), "{inc:#}");
    assert_eq!(incidents_of(&agent, pid).len(), 1, "one incident for the actor");

    // The CLI reads the same state.
    let from_cli: Vec<Value> = cli_incidents(&agent.state_dir).into_iter().filter(|i| i["id"] == id).collect();
    assert_eq!(from_cli.len(), 1, "sigwake incidents --json should list incident {id}");
    assert_eq!(from_cli[0]["status"], "exited", "{:#}", from_cli[0]);
    assert_eq!(from_cli[0]["pid"], pid);
    assert_eq!(incident_steps(&from_cli[0]), ["diagnostics:ok", "sigterm:ok"]);

    // Diagnostics, captured while the actor was starving.
    let diag = agent.state_dir.join("incidents").join(id.to_string());
    for f in ["threads.json", "fds.json", "wakeup.json", "status.txt"] {
        assert!(diag.join(f).is_file(), "{} is missing; the dir has: {:?}", diag.join(f).display(), list_dir(&diag));
    }
    let threads: Value = serde_json::from_str(&std::fs::read_to_string(diag.join("threads.json")).unwrap())
        .expect("threads.json is JSON");
    let tids: HashSet<u64> =
        threads.as_array().expect("threads.json is an array").iter().filter_map(|t| t["tid"].as_u64()).collect();
    assert!(tids.contains(&main_tid), "threads.json should list the main thread {main_tid}: {threads:#}");
    assert!(tids.contains(&hog_tid), "threads.json should list the hog thread {hog_tid}: {threads:#}");

    // Metrics.
    assert_eq!(confirm_n, 1.0, "one confirmation observed (this agent has one actor):\n{m}");
    assert_eq!(action_n, 1.0, "one first action observed:\n{m}");
    assert!(
        (confirm_sum - confirm_ms / 1e3).abs() < 0.01,
        "the confirm histogram holds evidence.confirm_ms: {confirm_sum} vs {confirm_ms}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "sigwake_escalation_actions_total",
            &[r#"actor="fetcher""#, r#"action="sigterm""#, r#"outcome="ok""#]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "sigwake_escalation_actions_total", &[r#"actor="fetcher""#, r#"action="sigkill""#]),
        0.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "sigwake_starvation_incidents_total", &[r#"actor="fetcher""#]), 1.0, "{m}");

    // The audit log: one line per action, in order, about this actor.
    for l in &lines {
        assert_eq!(l["pid"], pid, "{l}");
        assert_eq!(l["actor"], "fetcher", "{l}");
        assert_eq!(l["start_time"], start, "{l}");
        assert!(l["time"].is_string() && l["evidence"]["drops"].as_u64().is_some_and(|d| d >= 1), "{l}");
    }
    assert_eq!(
        actions(&lines),
        ["opened", "diagnostics", "sigterm", "closed_exited"],
        "audit lines of incident {id} (the close must come after the action that caused the exit): {lines:#?}"
    );
    assert_eq!(lines[1]["tier"], 0);
    assert_eq!(lines[2]["tier"], 1);
    assert!(lines[2]["detail"].as_str().is_some_and(|d| d.contains("SIGTERM") && d.contains("pidfd")), "{}", lines[2]);
    // One incident ended: one starvation duration observed.
    assert_eq!(
        metric_sum(&m, "sigwake_starvation_duration_seconds_count", &[r#"runtime="trio""#]),
        1.0,
        "one incident, one sigwake_starvation_duration_seconds observation:\n{m}"
    );
    agent.stop();
    done(t0, "seed");
}

fn list_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// 2. Briefly busy: the loop drains within the window
// ---------------------------------------------------------------------------

#[test]
fn briefly_busy_loop_that_drains_within_the_window_gets_no_incident_and_exits_by_itself() {
    let t0 = Instant::now();
    let config = default_policy(
        "3s",
        &[DIAG, r#"{ action = "sigterm", timeout = "1s" }"#, r#"{ action = "sigkill", timeout = "1s" }"#],
    );
    let agent = Agent::start(Some(&config), &[]);
    let (mut actor, _) = spawn_actor(&agent.socket, "trio_actor.py", &["--register", "briefly", "--hog-seconds", "1"]);
    let pid = actor.pid();
    let (_, sent) = starve(&actor);

    // The hog ends after 1 s; trio then sees the SIGINT and exits 130 on
    // its own: sigwake did not kill it.
    let status = actor.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "the actor should exit by KeyboardInterrupt (130), got {status}");
    actor.stdout.wait_json("the interrupted line", EVENT, |v| v["interrupted"] == true);

    // The SIGINTs during the hog did drop wakeups (otherwise this test
    // would prove nothing).
    let mut m = String::new();
    wait_until("the agent to count the dropped wakeups of `briefly`", EVENT, || {
        m = agent.metrics();
        metric_sum(&m, "sigwake_wakeup_writes_dropped_total", &[r#"actor="briefly""#]) >= 1.0
    });

    // Past the confirm deadline (3 s after the first SIGINT), with margin.
    let settle = Duration::from_millis(4000);
    if let Some(left) = settle.checked_sub(sent.instant.elapsed()) {
        thread::sleep(left);
    }
    let list = incidents_of(&agent, pid);
    assert!(list.is_empty(), "no incident for a loop that drained within the window: {list:#?}");
    let audit_lines: Vec<Value> = audit_lines(&agent.state_dir).into_iter().filter(|l| l["pid"] == pid).collect();
    assert!(audit_lines.is_empty(), "no audit line for pid {pid}: {audit_lines:#?}");
    let m = agent.metrics();
    assert_eq!(metric_sum(&m, "sigwake_escalation_actions_total", &[r#"actor="briefly""#]), 0.0, "{m}");
    assert_eq!(metric_sum(&m, "sigwake_starvation_incidents_total", &[r#"actor="briefly""#]), 0.0, "{m}");
    agent.stop();
    done(t0, "briefly busy");
}

// ---------------------------------------------------------------------------
// 3. SIGTERM survived or dropped: the SIGKILL tier ends it
// ---------------------------------------------------------------------------

/// SIGTERM is delivered (a handler catches it) and survived: the SIGTERM
/// tier's wait is kept, then SIGKILL.
#[test]
fn actor_that_survives_sigterm_is_killed_at_the_sigkill_tier() {
    let t0 = Instant::now();
    let config = default_policy(
        "1s",
        &[
            DIAG,
            r#"{ action = "sigterm", timeout = "1s" }"#,
            r#"{ action = "sigkill", timeout = "2s" }"#,
            r#"{ action = "kill_subtree", timeout = "1s" }"#,
        ],
    );
    let agent = Agent::start(Some(&config), &[]);
    let (mut actor, _) = spawn_actor(
        &agent.socket,
        "escalation_actor.py",
        &["--register", "stubborn", "--survive-sigterm", "--hog-seconds", "60"],
    );
    let pid = actor.pid();
    let (_, sent) = starve(&actor);

    // confirm 1 s + SIGTERM wait 1 s + SIGKILL, with margin.
    let status = actor.wait_exit(Duration::from_secs(8));
    let exit_ms = sent.instant.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the actor should have been killed by signal 9, got {status}");
    assert!(
        exit_ms >= 2000.0,
        "killed {exit_ms:.0} ms after the first SIGINT: before confirm (1 s) + SIGTERM wait (1 s)?"
    );

    let inc = wait_incident(&agent, "the incident to close as exited", EVENT, pid, |i| i["status"] == "exited");
    let id = inc["id"].as_u64().unwrap();
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok", "sigkill:ok"], "{inc:#}");
    let term = rfc3339_ns(step(&inc, "sigterm")["time"].as_str().unwrap());
    let kill = rfc3339_ns(step(&inc, "sigkill")["time"].as_str().unwrap());
    let waited = ms_between(term, kill);
    assert!(waited >= 950.0, "SIGKILL came {waited:.0} ms after SIGTERM: the SIGTERM tier's 1 s wait was not kept");
    assert_eq!(step(&inc, "sigkill")["tier"], 2);
    let lines = audit_of(&agent.state_dir, id);
    assert_eq!(actions(&lines), ["opened", "diagnostics", "sigterm", "sigkill", "closed_exited"], "{lines:#?}");
    assert!(lines.iter().all(|l| l["pid"] == pid && l["actor"] == "stubborn"), "{lines:#?}");
    let m = agent.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "sigwake_escalation_actions_total",
            &[r#"actor="stubborn""#, r#"action="sigkill""#, r#"outcome="ok""#]
        ),
        1.0,
        "{m}"
    );
    eprintln!("[stubborn] SIGTERM -> SIGKILL {waited:.0} ms; first SIGINT -> exit {exit_ms:.0} ms");
    agent.stop();
    done(t0, "stubborn");
}

/// What the kernel would drop, read from /proc/PID/status before sending.
/// SIGTERM set to SIG_IGN: the step says `ignored` and why, and the ladder
/// goes straight on to SIGKILL instead of waiting out a SIGTERM tier that
/// cannot work.
#[test]
fn sigterm_the_actor_ignores_is_recorded_ignored_and_the_ladder_moves_straight_on() {
    let t0 = Instant::now();
    let config = default_policy(
        "1s",
        &[r#"{ action = "sigterm", timeout = "10s" }"#, r#"{ action = "sigkill", timeout = "2s" }"#],
    );
    let agent = Agent::start(Some(&config), &[]);
    let (mut actor, _) = spawn_actor(
        &agent.socket,
        "escalation_actor.py",
        &["--register", "deaf", "--ignore-sigterm", "--hog-seconds", "60"],
    );
    let pid = actor.pid();
    starve(&actor);
    let status = actor.wait_exit(Duration::from_secs(8));
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "killed by the SIGKILL tier, well before the 10 s SIGTERM wait: {status}"
    );
    let inc = wait_incident(&agent, "the incident to close as exited", EVENT, pid, |i| i["status"] == "exited");
    assert_eq!(incident_steps(&inc), ["sigterm:ignored", "sigkill:ok"], "{inc:#}");
    let detail = step(&inc, "sigterm")["detail"].as_str().unwrap();
    assert!(detail.contains("SIG_IGN"), "the reason, from SigIgn: {detail}");
    let waited = ms_between(
        rfc3339_ns(step(&inc, "sigterm")["time"].as_str().unwrap()),
        rfc3339_ns(step(&inc, "sigkill")["time"].as_str().unwrap()),
    );
    assert!(waited < 1000.0, "SIGKILL came {waited:.0} ms after a SIGTERM the kernel drops: the 10 s wait was kept");
    let m = agent.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "sigwake_escalation_actions_total",
            &[r#"actor="deaf""#, r#"action="sigterm""#, r#"outcome="ignored""#]
        ),
        1.0,
        "{m}"
    );
    agent.stop();
    done(t0, "sigterm ignored");
}

/// The kernel drops every signal a pid namespace's init has no handler
/// for, except SIGKILL from an ancestor namespace: a trio loop running as
/// pid 1 of its own namespace (SIGTERM left at SIG_DFL) never gets the
/// agent's SIGTERM. The step says `ignored`, saying why, and SIGKILL (which
/// does reach it: the agent is in an ancestor namespace) follows at once.
#[test]
fn sigterm_to_a_pid_namespace_init_without_a_handler_is_recorded_ignored() {
    let t0 = Instant::now();
    let config = default_policy(
        "1s",
        &[r#"{ action = "sigterm", timeout = "10s" }"#, r#"{ action = "sigkill", timeout = "2s" }"#],
    );
    let agent = Agent::start(Some(&config), &[]);
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child"])
        .arg(python())
        .arg(fixtures_dir().join("trio_actor.py"))
        .args(["--register", "nsinit", "--hog-seconds", "60"])
        .current_dir(fixtures_dir())
        .env("SIGWAKE_SOCKET", &agent.socket);
    let mut outer = Proc::spawn("unshare --pid --fork trio_actor.py", &mut cmd);
    let ready = outer
        .stdout
        .wait_json("trio_actor.py (pid 1 of its namespace) ready", Duration::from_secs(30), |v| v["ready"] == true);
    assert_eq!(ready["pid"], 1, "the loop is its namespace's init: {ready}");
    let reg =
        outer.stdout.json().into_iter().find(|v| v.get("registered").is_some() || v.get("register_error").is_some());
    let reg = reg.unwrap_or_else(|| panic!("no registration line; stdout: {:?}", outer.stdout.json()));
    // The reply speaks the client's pids (it is its own namespace's 1); the
    // agent knows it by its host pid, unshare's child.
    assert_eq!(reg["registered"]["pid"], 1, "the reply names the loop as its namespace sees it: {reg}");
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", outer.pid())).unwrap();
    let pid: u32 = children.split_whitespace().next().and_then(|p| p.parse().ok()).expect("unshare's child");
    let start = start_time(pid);
    let _cleanup = KillOnDrop(vec![(pid, start)]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap().split_whitespace().collect::<Vec<_>>();
    assert_eq!(nspid, [pid.to_string().as_str(), "1"], "{status}");
    outer.stdout.wait_json("the GIL hog to start", EVENT, |v| v["hogging"] == true);
    sigint_burst(pid, 10);
    let inc = wait_incident(&agent, "the incident to close as exited", Duration::from_secs(20), pid, |i| {
        i["status"] == "exited"
    });
    assert_eq!(incident_steps(&inc), ["sigterm:ignored", "sigkill:ok"], "{inc:#}");
    let detail = step(&inc, "sigterm")["detail"].as_str().unwrap();
    assert!(detail.contains("pid 1 of its pid namespace"), "the reason: {detail}");
    let waited = ms_between(
        rfc3339_ns(step(&inc, "sigterm")["time"].as_str().unwrap()),
        rfc3339_ns(step(&inc, "sigkill")["time"].as_str().unwrap()),
    );
    assert!(waited < 1000.0, "SIGKILL came {waited:.0} ms after a SIGTERM the kernel drops: the 10 s wait was kept");
    outer.wait_exit(EVENT);
    assert!(is_gone(pid, start), "{:?}", proc_stat(pid));
    agent.stop();
    done(t0, "pid namespace init");
}

// ---------------------------------------------------------------------------
// 4. An actor with children loses its whole subtree
// ---------------------------------------------------------------------------

#[test]
fn actor_with_children_loses_its_whole_subtree() {
    let t0 = Instant::now();
    let config = default_policy(
        "1s",
        &[
            DIAG,
            r#"{ action = "sigterm", timeout = "1s" }"#,
            r#"{ action = "sigkill", timeout = "1s" }"#,
            r#"{ action = "kill_subtree", timeout = "1s" }"#,
        ],
    );
    let agent = Agent::start(Some(&config), &[]);
    let (mut actor, _) = spawn_actor(
        &agent.socket,
        "escalation_actor.py",
        &["--register", "parent", "--children", "2", "--grandchild", "--hog-seconds", "60"],
    );
    let pid = actor.pid();
    let tree = actor.stdout.json().into_iter().find(|v| v.get("children").is_some()).expect("the children line");
    let pids: Vec<u32> = ["children", "grandchildren"]
        .iter()
        .flat_map(|k| tree[*k].as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as u32).collect::<Vec<_>>())
        .collect();
    assert_eq!(pids.len(), 4, "2 sleeps, a sh and its sleep: {tree}");
    let subtree: Vec<(u32, u64)> = pids.iter().map(|p| (*p, start_time(*p))).collect();
    let _cleanup = KillOnDrop(subtree.clone());
    for &(p, s) in &subtree {
        assert!(is_running(p, s), "descendant {p} should be running before the test starts: {:?}", proc_stat(p));
    }
    let (_, _sent) = starve(&actor);

    let status = actor.wait_exit(Duration::from_secs(8));
    assert!(status.signal().is_some(), "the actor should have been ended by a signal, got {status}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<_> = subtree.iter().filter(|(p, s)| !is_gone(*p, *s)).map(|(p, _)| (*p, proc_stat(*p))).collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let inc = incidents_of(&agent, pid);
            panic!(
                "descendants still alive 5 s after the actor exited: {left:?}\nincidents: {inc:#?}\nagent stderr (tail):\n{}",
                agent.stderr_tail()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }

    let inc = wait_incident(&agent, "the incident to close as exited", EVENT, pid, |i| i["status"] == "exited");
    assert!(has_step(&inc, "kill_subtree"), "the incident should have a kill_subtree step: {inc:#}");
    assert_eq!(step(&inc, "kill_subtree")["outcome"], "ok", "{inc:#}");
    let pinned: HashSet<(u32, u64)> = inc["subtree"]
        .as_array()
        .expect("incident.subtree")
        .iter()
        .map(|e| (e[0].as_u64().unwrap() as u32, e[1].as_u64().unwrap()))
        .collect();
    let want: HashSet<(u32, u64)> = subtree.iter().copied().collect();
    assert_eq!(pinned, want, "the pinned subtree should be exactly the 4 descendants: {inc:#}");
    let detail = step(&inc, "kill_subtree")["detail"].as_str().unwrap_or("");
    assert!(detail.contains("SIGKILLed 4 pinned descendants"), "kill_subtree detail: {detail}");
    // The subtree is finished before the incident is closed.
    let lines = audit_of(&agent.state_dir, inc["id"].as_u64().unwrap());
    assert_eq!(
        actions(&lines),
        ["opened", "diagnostics", "sigterm", "kill_subtree", "closed_exited"],
        "audit lines of the incident (the subtree step must come before the close): {lines:#?}"
    );
    assert_eq!(inc["steps"].as_array().unwrap().last().unwrap()["action"], "kill_subtree", "{inc:#}");
    agent.stop();
    done(t0, "subtree");
}

/// A user's actor takes down only what that user could kill: `nobody`
/// registers its own starved loop, which has two children — a `sleep` of
/// its own, and one a set-uid helper made root's. The kill tiers end the
/// loop and its own child; the root child is never pinned nor signalled,
/// and the step says so.
#[test]
fn a_users_actor_loses_only_the_descendants_that_user_could_signal() {
    use std::os::unix::fs::PermissionsExt as _;
    let t0 = Instant::now();
    let config = default_policy(
        "1s",
        &[r#"{ action = "sigkill", timeout = "2s" }"#, r#"{ action = "kill_subtree", timeout = "1s" }"#],
    );
    let agent = Agent::start(Some(&config), &[]);
    std::fs::set_permissions(agent.socket.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = TempDir::new("users-subtree");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let helper = setuid_root_helper(&dir);
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(python())
        .arg(fixtures_dir().join("escalation_actor.py"))
        .args(["--register", "users-own", "--children", "1", "--hog-seconds", "60", "--child"])
        .arg(format!("{} /bin/sleep 300", helper.display()))
        .current_dir(fixtures_dir())
        .env("SIGWAKE_SOCKET", &agent.socket)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let mut actor = Proc::spawn("escalation_actor.py as nobody", &mut cmd);
    actor.stdout.wait_json("the actor (nobody) ready", Duration::from_secs(30), |v| v["ready"] == true);
    let reg =
        actor.stdout.json().into_iter().find(|v| v.get("registered").is_some() || v.get("register_error").is_some());
    let reg = reg.unwrap_or_else(|| panic!("no registration line: {:?}\n{}", actor.stdout.json(), actor.stderr_text()));
    assert_eq!(reg["registered"]["uid"], 65534, "registered by nobody, its own process: {reg}");
    let pid = actor.pid();
    let tree = actor.stdout.json().into_iter().find(|v| v.get("children").is_some()).expect("the children line");
    let kids: Vec<u32> = tree["children"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as u32).collect();
    let (own, rooted) = (kids[0], kids[1]);
    wait_until("the helper's child to be root's", EVENT, || {
        std::fs::read_to_string(format!("/proc/{rooted}/status")).is_ok_and(|s| {
            s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().skip(1).all(|u| u == "0"))
                && s.lines().any(|l| l == "Name:\tsleep")
        })
    });
    let (own_start, rooted_start) = (start_time(own), start_time(rooted));
    let _cleanup = KillOnDrop(vec![(own, own_start), (rooted, rooted_start)]);
    starve(&actor);
    let status = actor.wait_exit(Duration::from_secs(8));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let inc = wait_incident(&agent, "the incident to close with its subtree step", EVENT, pid, |i| {
        i["status"] == "exited" && has_step(i, "kill_subtree")
    });
    wait_until("nobody's own child to be gone", EVENT, || is_gone(own, own_start));
    thread::sleep(Duration::from_millis(300));
    assert!(is_running(rooted, rooted_start), "the root child must be left alone: {:?}\n{inc:#}", proc_stat(rooted));
    let pinned: Vec<(u64, u64)> =
        inc["subtree"].as_array().unwrap().iter().map(|e| (e[0].as_u64().unwrap(), e[1].as_u64().unwrap())).collect();
    assert_eq!(pinned, [(u64::from(own), own_start)], "only what nobody could signal is pinned: {inc:#}");
    let detail = step(&inc, "kill_subtree")["detail"].as_str().unwrap();
    assert!(detail.contains("SIGKILLed 1 pinned descendants"), "{detail}");
    assert!(detail.contains("1 descendant uid 65534 may not signal"), "says what was left alone: {detail}");
    agent.stop();
    done(t0, "user's subtree");
}

// ---------------------------------------------------------------------------
// 5. Dry run: the whole ladder, nothing sent
// ---------------------------------------------------------------------------

#[test]
fn dry_run_walks_the_ladder_and_signals_nothing() {
    let t0 = Instant::now();
    // The built-in policy: confirm 2 s, diagnostics, SIGTERM 3 s, SIGKILL 2 s, subtree 2 s.
    let agent = Agent::start(None, &["--dry-run"]);
    let (mut actor, _) = spawn_actor(&agent.socket, "trio_actor.py", &["--register", "dry", "--hog-seconds", "60"]);
    let pid = actor.pid();
    let start = start_time(pid);
    let (_, sent) = starve(&actor);

    // The ladder takes ≈ 2 + 3 + 2 + 2 = 9 s; then the incident closes failed.
    let inc = wait_incident(&agent, "the dry-run ladder to finish", Duration::from_secs(20), pid, |i| {
        !matches!(i["status"].as_str(), Some("open" | "escalating" | "deferred"))
    });
    let ladder_ms = sent.instant.elapsed().as_secs_f64() * 1e3;
    assert_eq!(inc["dry_run"], true, "{inc:#}");
    assert_eq!(inc["status"], "failed", "a dry run leaves the actor starving: {inc:#}");
    assert_eq!(
        incident_steps(&inc),
        ["diagnostics:ok", "sigterm:dry_run", "sigkill:dry_run", "kill_subtree:dry_run"],
        "{inc:#}"
    );
    assert!(
        ladder_ms >= 8500.0,
        "the dry-run ladder should still keep each tier's wait (≈9 s), took {ladder_ms:.0} ms"
    );
    assert!(actor.child.try_wait().unwrap().is_none(), "the actor must still be alive after a dry run");
    assert!(is_running(pid, start), "the actor must still be running: {:?}", proc_stat(pid));
    let lines = audit_of(&agent.state_dir, inc["id"].as_u64().unwrap());
    assert!(lines.iter().all(|l| l["dry_run"] == true), "{lines:#?}");
    assert!(
        lines.iter().filter(|l| l["tier"].is_u64() && l["action"] != "diagnostics").all(|l| l["outcome"] == "dry_run"),
        "{lines:#?}"
    );
    let m = agent.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "sigwake_escalation_actions_total",
            &[r#"actor="dry""#, r#"outcome="ok""#, r#"action="sigterm""#]
        ),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "sigwake_escalation_actions_total", &[r#"actor="dry""#, r#"outcome="dry_run""#]),
        3.0,
        "{m}"
    );

    // Still alive a moment later; then we end it ourselves.
    thread::sleep(Duration::from_millis(500));
    assert!(actor.child.try_wait().unwrap().is_none(), "the actor must still be alive after a dry run");
    actor.signal(libc::SIGKILL);
    let st = actor.wait_exit(Duration::from_secs(5));
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    eprintln!("[dry run] ladder finished {ladder_ms:.0} ms after the first SIGINT");
    agent.stop();
    done(t0, "dry run");
}

// ---------------------------------------------------------------------------
// 6. A reused pid is never signalled
// ---------------------------------------------------------------------------

/// The actor dies (we SIGKILL it) while the agent waits out its SIGTERM
/// tier; a bystander takes its pid at once. The ladder's next tier
/// (SIGKILL) and the subtree tier must never reach the bystander.
#[test]
fn pid_reused_during_escalation_is_never_signalled() {
    let t0 = Instant::now();
    let config = default_policy(
        "1s",
        &[
            DIAG,
            r#"{ action = "sigterm", timeout = "4s" }"#,
            r#"{ action = "sigkill", timeout = "1s" }"#,
            r#"{ action = "kill_subtree", timeout = "1s" }"#,
        ],
    );
    let agent = Agent::start(Some(&config), &[]);
    let (mut actor, _) = spawn_actor(
        &agent.socket,
        "escalation_actor.py",
        &["--register", "victim", "--survive-sigterm", "--hog-seconds", "60"],
    );
    let pid = actor.pid();
    let a_start = start_time(pid);
    starve(&actor);
    let inc = wait_incident(&agent, "the SIGTERM step", Duration::from_secs(10), pid, |i| has_step(i, "sigterm"));
    let id = inc["id"].as_u64().unwrap();
    let term_at = Instant::now();

    // A dies mid-ladder; B takes its pid.
    actor.signal(libc::SIGKILL);
    let st = actor.wait_exit(Duration::from_secs(5));
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    let mut bystander = spawn_with_pid(pid, recorder_cmd, "signal_recorder.py");
    let b_start = start_time(pid);
    assert_ne!(a_start, b_start);
    bystander.stdout.wait_json("the bystander's ready line", Duration::from_secs(30), |v| v["ready"] == true);
    let reused_after = term_at.elapsed();

    // Past the rest of the ladder: SIGTERM wait (4 s) + SIGKILL (1 s) + subtree (1 s).
    let settle = Duration::from_secs(7);
    if let Some(left) = settle.checked_sub(term_at.elapsed()) {
        thread::sleep(left);
    }
    assert!(
        bystander.child.try_wait().unwrap().is_none() && is_running(pid, b_start),
        "the bystander on the reused pid {pid} was killed or stopped: {:?}; stdout {:?}\nagent stderr (tail):\n{}",
        proc_stat(pid),
        bystander.stdout.json(),
        agent.stderr_tail()
    );
    let got = recorded_signals(&bystander);
    assert!(got.is_empty(), "the bystander on the reused pid {pid} received signals: {got:?}");

    let inc =
        wait_incident(&agent, "the incident to close", EVENT, pid, |i| i["id"] == id && i["status"] != "escalating");
    assert_eq!(inc["status"], "exited", "{inc:#}");
    assert_eq!(inc["start_time"], a_start, "{inc:#}");
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok"], "nothing after SIGTERM may be sent: {inc:#}");
    let everything = agent.get_json("/incidents");
    let about_b: Vec<&Value> =
        everything.as_array().unwrap().iter().filter(|i| i["pid"] == pid && i["start_time"] == b_start).collect();
    assert!(about_b.is_empty(), "no incident may be about the bystander: {about_b:#?}");
    let lines = audit_of(&agent.state_dir, id);
    assert_eq!(actions(&lines), ["opened", "diagnostics", "sigterm", "closed_exited"], "{lines:#?}");
    assert!(
        audit_lines(&agent.state_dir).iter().all(|l| l["start_time"] != b_start),
        "an audit line names the bystander"
    );
    let m = agent.metrics();
    assert_eq!(
        metric_sum(&m, "sigwake_escalation_actions_total", &[r#"actor="victim""#, r#"action="sigkill""#]),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "sigwake_escalation_actions_total", &[r#"actor="victim""#, r#"action="kill_subtree""#]),
        0.0,
        "{m}"
    );
    eprintln!(
        "[reuse during escalation] pid {pid} reused {:.0} ms after the SIGTERM step was seen",
        reused_after.as_secs_f64() * 1e3
    );
    bystander.close_stdin();
    bystander.wait_exit(Duration::from_secs(5));
    agent.stop();
    done(t0, "reuse during escalation");
}

/// The actor dies after dropping wakeups, before the confirm deadline; a
/// bystander takes its pid at once. Nothing may be confirmed about either.
#[test]
fn pid_reused_before_confirmation_is_never_confirmed_nor_signalled() {
    let t0 = Instant::now();
    let config = default_policy(
        "3s",
        &[DIAG, r#"{ action = "sigterm", timeout = "1s" }"#, r#"{ action = "sigkill", timeout = "1s" }"#],
    );
    let agent = Agent::start(Some(&config), &[]);
    let (mut actor, _) = spawn_actor(&agent.socket, "trio_actor.py", &["--register", "early", "--hog-seconds", "60"]);
    let pid = actor.pid();
    let (_, sent) = starve(&actor);
    // The agent has seen the drops: the actor is in its confirm window.
    wait_until("the agent to count the dropped wakeups of `early`", Duration::from_secs(2), || {
        metric_sum(&agent.metrics(), "sigwake_wakeup_writes_dropped_total", &[r#"actor="early""#]) >= 1.0
    });
    actor.signal(libc::SIGKILL);
    actor.wait_exit(Duration::from_secs(5));
    let mut bystander = spawn_with_pid(pid, recorder_cmd, "signal_recorder.py");
    let b_start = start_time(pid);
    let reused_ms = sent.instant.elapsed().as_secs_f64() * 1e3;
    assert!(
        reused_ms < 2500.0,
        "the pid was reused {reused_ms:.0} ms after the first SIGINT: too late for this test (window 3 s)"
    );
    bystander.stdout.wait_json("the bystander's ready line", Duration::from_secs(30), |v| v["ready"] == true);

    // Past the confirm deadline and what the ladder would take.
    let settle = Duration::from_secs(6);
    if let Some(left) = settle.checked_sub(sent.instant.elapsed()) {
        thread::sleep(left);
    }
    assert!(
        bystander.child.try_wait().unwrap().is_none() && is_running(pid, b_start),
        "the bystander on the reused pid {pid} was killed or stopped: {:?}",
        proc_stat(pid)
    );
    let got = recorded_signals(&bystander);
    assert!(got.is_empty(), "the bystander on the reused pid {pid} received signals: {got:?}");
    let list = incidents_of(&agent, pid);
    assert!(
        list.is_empty(),
        "an actor that exited before its confirm deadline has no incident, nor does the bystander: {list:#?}"
    );
    let m = agent.metrics();
    assert_eq!(metric_sum(&m, "sigwake_escalation_actions_total", &[r#"actor="early""#]), 0.0, "{m}");
    eprintln!("[reuse before confirmation] pid {pid} reused {reused_ms:.0} ms after the first SIGINT");
    bystander.close_stdin();
    bystander.wait_exit(Duration::from_secs(5));
    agent.stop();
    done(t0, "reuse before confirmation");
}

// ---------------------------------------------------------------------------
// 7. Restart mid-incident
// ---------------------------------------------------------------------------

#[test]
fn restarted_agent_resumes_the_incident_without_repeating_a_tier() {
    let t0 = Instant::now();
    let dir = TempDir::new("escalation-restart");
    let socket: PathBuf = dir.0.join("registry.sock");
    let state_dir: PathBuf = dir.0.join("state");
    let config = dir.0.join("sigwake.toml");
    std::fs::write(
        &config,
        default_policy(
            "1s",
            &[DIAG, r#"{ action = "sigterm", timeout = "8s" }"#, r#"{ action = "sigkill", timeout = "2s" }"#],
        ),
    )
    .unwrap();

    let addr1 = format!("127.0.0.1:{}", free_port());
    let mut agent1 = start_agent_at(&addr1, &socket, &state_dir, &config);
    let (mut actor, _) = spawn_actor(
        &socket,
        "escalation_actor.py",
        &["--register", "survivor", "--survive-sigterm", "--hog-seconds", "60"],
    );
    let pid = actor.pid();
    let start = start_time(pid);
    starve(&actor);

    // The SIGTERM tier is recorded (and survived); its 20 s wait is running.
    let deadline = Instant::now() + Duration::from_secs(10);
    let inc = loop {
        if let Some(i) = incidents_at(&addr1, pid).into_iter().find(|i| has_step(i, "sigterm")) {
            break i;
        }
        if Instant::now() > deadline {
            panic!("no sigterm step within 10 s; agent stderr:\n{}", tail(&agent1.stderr_text(), 40));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let id = inc["id"].as_u64().unwrap();
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok"], "{inc:#}");
    stop_agent(&mut agent1);
    let stopped_at = Instant::now();
    assert!(is_running(pid, start), "the actor survives SIGTERM: it must still be running when the agent stops");
    let on_disk = cli_incidents(&state_dir).into_iter().find(|i| i["id"] == id).expect("the incident on disk");
    assert!(
        matches!(on_disk["status"].as_str(), Some("escalating" | "deferred" | "open")),
        "the incident stays open across the stop: {on_disk:#}"
    );

    // A new agent, same state dir, config and socket.
    let addr2 = format!("127.0.0.1:{}", free_port());
    let mut agent2 = start_agent_at(&addr2, &socket, &state_dir, &config);
    let status = actor.wait_exit(Duration::from_secs(10));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the resumed ladder should SIGKILL the actor, got {status}");
    let resumed_ms = stopped_at.elapsed().as_secs_f64() * 1e3;

    let deadline = Instant::now() + EVENT;
    let inc = loop {
        let list = incidents_at(&addr2, pid);
        if let Some(i) = list.iter().find(|i| i["status"] == "exited") {
            assert_eq!(list.len(), 1, "the new agent must resume the incident, not open another: {list:#?}");
            break i.clone();
        }
        if Instant::now() > deadline {
            panic!(
                "the incident did not close as exited: {list:#?}\nagent stderr:\n{}",
                tail(&agent2.stderr_text(), 40)
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(inc["id"], id, "same incident: {inc:#}");
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok", "sigkill:ok"], "no tier repeated: {inc:#}");
    // The new agent waited out what was left of the 8 s SIGTERM wait.
    let at = |action: &str| {
        inc["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["action"] == action)
            .and_then(|s| s["unix_ms"].as_u64())
            .unwrap()
    };
    let waited = at("sigkill") - at("sigterm");
    assert!(
        waited >= 7_800,
        "SIGKILL came {waited} ms after SIGTERM; the 8 s wait must be honoured across the restart"
    );
    let lines = audit_of(&state_dir, id);
    assert_eq!(actions(&lines), ["opened", "diagnostics", "sigterm", "sigkill", "closed_exited"], "{lines:#?}");
    assert_eq!(lines.iter().filter(|l| l["action"] == "sigterm").count(), 1, "one sigterm line in the audit log");
    assert!(is_gone(pid, start), "the actor must be dead: {:?}", proc_stat(pid));
    eprintln!(
        "[restart] agent stopped mid-SIGTERM-wait; actor killed {resumed_ms:.0} ms after the stop (includes the new agent's start-up)"
    );
    // The new agent restored the actor as it was registered.
    let (status, _, body) = http_get(&addr2, "/actors", None).expect("GET /actors");
    assert_eq!(status, 200, "{body}");
    let actors: Value = serde_json::from_str(&body).expect("/actors is JSON");
    let restored = actors.as_array().unwrap().iter().find(|a| a["pid"] == pid && a["start_time"] == start).cloned();
    let restored = restored.unwrap_or_else(|| panic!("the new agent has no record of actor {pid}: {body}"));
    assert_eq!(restored["name"], "survivor", "{restored:#}");
    assert_eq!(restored["policy"], "default", "{restored:#}");
    assert_eq!(restored["runtime"], "trio", "the resumed actor should keep its runtime: {restored:#}");
    stop_agent(&mut agent2);
    done(t0, "restart");
}

// ---------------------------------------------------------------------------
// 8. Recovery stops the ladder (with and without a restart)
// ---------------------------------------------------------------------------

/// The loop is starved long enough to be confirmed and SIGTERMed (which
/// it survives), then the hog ends and the loop drains its wakeup fd and
/// keeps running: the agent must see the recovery, close the incident as
/// recovered and never reach the SIGKILL tier.
#[test]
fn loop_that_recovers_mid_ladder_stops_the_escalation() {
    let t0 = Instant::now();
    let config = default_policy(
        "1s",
        &[DIAG, r#"{ action = "sigterm", timeout = "6s" }"#, r#"{ action = "sigkill", timeout = "1s" }"#],
    );
    let agent = Agent::start(Some(&config), &[]);
    let (mut actor, _) = spawn_actor(
        &agent.socket,
        "escalation_actor.py",
        &["--register", "comeback", "--survive-sigterm", "--catch-sigint", "--hog-seconds", "3"],
    );
    let pid = actor.pid();
    let start = start_time(pid);
    let (_, sent) = starve(&actor);
    wait_incident(&agent, "the SIGTERM step", Duration::from_secs(5), pid, |i| has_step(i, "sigterm"));
    // The hog ends 3 s after it started: the loop runs and sees a SIGINT.
    actor.stdout.wait_json("the loop to see a SIGINT", EVENT, |v| v.get("sigint").is_some());
    let inc = wait_incident(&agent, "the incident to close as recovered", Duration::from_secs(5), pid, |i| {
        i["status"] != "escalating"
    });
    let recovered_ms = sent.instant.elapsed().as_secs_f64() * 1e3;
    assert_eq!(inc["status"], "recovered", "{inc:#}");
    // Past where SIGKILL would have been sent: 1 s + 6 s after the first SIGINT.
    let settle = Duration::from_millis(8500);
    if let Some(left) = settle.checked_sub(sent.instant.elapsed()) {
        thread::sleep(left);
    }
    assert!(
        actor.child.try_wait().unwrap().is_none() && is_running(pid, start),
        "the recovered actor was killed: {:?}",
        proc_stat(pid)
    );
    let inc = incidents_of(&agent, pid).into_iter().find(|i| i["id"] == inc["id"]).unwrap();
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigterm:ok"], "nothing after the recovery: {inc:#}");
    assert_eq!(incidents_of(&agent, pid).len(), 1, "one incident");
    let lines = audit_of(&agent.state_dir, inc["id"].as_u64().unwrap());
    assert_eq!(actions(&lines), ["opened", "diagnostics", "sigterm", "closed_recovered"], "{lines:#?}");
    eprintln!("[recovery] incident closed as recovered {recovered_ms:.0} ms after the first SIGINT (hog: 3 s)");
    actor.signal(libc::SIGKILL);
    actor.wait_exit(Duration::from_secs(5));
    agent.stop();
    done(t0, "recovery");
}

/// As above, but the agent is restarted mid-ladder first: the resumed
/// incident must still stop when the loop recovers.
#[test]
fn resumed_incident_stops_when_the_loop_recovers_after_a_restart() {
    let t0 = Instant::now();
    let dir = TempDir::new("escalation-restart-recover");
    let socket: PathBuf = dir.0.join("registry.sock");
    let state_dir: PathBuf = dir.0.join("state");
    let config = dir.0.join("sigwake.toml");
    // Two SIGTERM tiers: the agent is stopped during the first one's wait,
    // so the resumed ladder starts with the second (8 s wait) while the
    // hog (5 s) is still running.
    std::fs::write(
        &config,
        default_policy(
            "1s",
            &[
                DIAG,
                r#"{ action = "sigterm", timeout = "3s" }"#,
                r#"{ action = "sigterm", timeout = "8s" }"#,
                r#"{ action = "sigkill", timeout = "1s" }"#,
            ],
        ),
    )
    .unwrap();
    let addr1 = format!("127.0.0.1:{}", free_port());
    let mut agent1 = start_agent_at(&addr1, &socket, &state_dir, &config);
    let (mut actor, _) = spawn_actor(
        &socket,
        "escalation_actor.py",
        &["--register", "phoenix", "--survive-sigterm", "--catch-sigint", "--hog-seconds", "5"],
    );
    let pid = actor.pid();
    let start = start_time(pid);
    let (_, sent) = starve(&actor);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !incidents_at(&addr1, pid).iter().any(|i| has_step(i, "sigterm")) {
        if Instant::now() > deadline {
            panic!("no sigterm step within 5 s; agent stderr:\n{}", tail(&agent1.stderr_text(), 40));
        }
        thread::sleep(Duration::from_millis(20));
    }
    stop_agent(&mut agent1);
    let addr2 = format!("127.0.0.1:{}", free_port());
    let mut agent2 = start_agent_at(&addr2, &socket, &state_dir, &config);
    let restarted_ms = sent.instant.elapsed().as_secs_f64() * 1e3;
    assert!(
        restarted_ms < 4000.0,
        "the new agent was ready {restarted_ms:.0} ms after the first SIGINT: too late for this test"
    );

    actor.stdout.wait_json("the loop to see a SIGINT (the hog ended)", EVENT, |v| v.get("sigint").is_some());
    // Past where the resumed ladder would SIGKILL: second SIGTERM + 8 s.
    let settle = Duration::from_millis(restarted_ms as u64 + 9500);
    if let Some(left) = settle.checked_sub(sent.instant.elapsed()) {
        thread::sleep(left);
    }
    let list = incidents_at(&addr2, pid);
    assert!(
        actor.child.try_wait().unwrap().is_none() && is_running(pid, start),
        "the actor recovered (its loop ran and drained the wakeup fd) but the resumed ladder killed it: {:?}\nincidents: {list:#?}\nagent stderr:\n{}",
        proc_stat(pid),
        tail(&agent2.stderr_text(), 40)
    );
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["status"], "recovered", "the resumed incident should close as recovered: {:#}", list[0]);
    assert!(!has_step(&list[0], "sigkill"), "{:#}", list[0]);
    actor.signal(libc::SIGKILL);
    actor.wait_exit(Duration::from_secs(5));
    stop_agent(&mut agent2);
    done(t0, "recovery after restart");
}

/// The notify tier after the kill tiers runs once the actor is gone: the
/// command gets the incident JSON on stdin and the URL gets it POSTed.
#[test]
fn notify_hooks_run_after_the_kill_with_the_incident_json() {
    let t0 = Instant::now();
    let out = TempDir::new("notify");
    let file = out.0.join("hook.json");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let config = default_policy(
        "1s",
        &[
            r#"{ action = "sigkill", timeout = "2s" }"#,
            &format!(r#"{{ action = "notify", command = ["sh", "-c", "cat > {}"], url = "{url}" }}"#, file.display()),
        ],
    );
    // A tiny HTTP server that records one request and answers 204.
    let server = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf).unwrap();
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len || n == 0 {
                    break;
                }
            }
        }
        conn.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").unwrap();
        String::from_utf8_lossy(&req).into_owned()
    });
    let agent = Agent::start(Some(&config), &[]);
    let (mut actor, _) =
        spawn_actor(&agent.socket, "escalation_actor.py", &["--register", "notified", "--hog-seconds", "60"]);
    let pid = actor.pid();
    starve(&actor);
    let status = actor.wait_exit(Duration::from_secs(10));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let inc = wait_incident(&agent, "the incident to close with its notify step", EVENT, pid, |i| {
        i["status"] == "exited" && has_step(i, "notify")
    });
    assert_eq!(incident_steps(&inc), ["sigkill:ok", "notify:ok"], "{inc:#}");
    let hooked: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("the command wrote its stdin")).unwrap();
    assert_eq!(hooked["actor"], "notified");
    assert_eq!(hooked["pid"], pid);
    assert_eq!(hooked["id"], inc["id"]);
    let request = server.join().expect("the HTTP hook was called");
    assert!(request.starts_with("POST /hook HTTP/1.1"), "{request}");
    assert!(request.to_ascii_lowercase().contains("content-type: application/json"), "{request}");
    let body: Value = serde_json::from_str(request.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["actor"], "notified");
    done(t0, "notify");
}

/// Programs the agent runs as root are found through a fixed, trusted
/// PATH, never through its environment's: an agent whose PATH starts with
/// a directory holding a planted `sh` and `py-spy` runs neither. The notify
/// command `sh` is the system's, and py-spy (in no trusted directory here)
/// is "not installed".
#[test]
fn notify_command_and_py_spy_are_never_found_through_the_agents_path() {
    use std::os::unix::fs::PermissionsExt as _;
    let t0 = Instant::now();
    let dir = TempDir::new("planted-path");
    let planted = dir.0.join("bin");
    std::fs::create_dir(&planted).unwrap();
    let marker = dir.0.join("planted-ran");
    for name in ["sh", "py-spy"] {
        let p = planted.join(name);
        std::fs::write(&p, format!("#!/bin/dash\necho {name} >> {}\n", marker.display())).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let hooked = dir.0.join("hook.json");
    let config_text = default_policy(
        "1s",
        &[
            r#"{ action = "diagnostics", py_spy = true }"#,
            r#"{ action = "sigkill", timeout = "2s" }"#,
            &format!(r#"{{ action = "notify", command = ["sh", "-c", "cat > {}"] }}"#, hooked.display()),
        ],
    );
    let config = dir.0.join("sigwake.toml");
    std::fs::write(&config, config_text).unwrap();
    let (socket, state_dir) = (dir.0.join("registry.sock"), dir.0.join("state"));
    let addr = format!("127.0.0.1:{}", free_port());
    let path = format!("{}:{}", planted.display(), std::env::var("PATH").unwrap_or_default());
    let mut agent = start_agent_env(&addr, &socket, &state_dir, &config, &[("PATH", &path)]);
    let (mut actor, _) =
        spawn_actor(&socket, "escalation_actor.py", &["--register", "pathless", "--hog-seconds", "60"]);
    let pid = actor.pid();
    starve(&actor);
    let status = actor.wait_exit(Duration::from_secs(10));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let inc = loop {
        let list = incidents_at(&addr, pid);
        if let Some(i) = list.iter().find(|i| i["status"] == "exited" && has_step(i, "notify")) {
            break i.clone();
        }
        assert!(Instant::now() < deadline, "no closed incident with a notify step: {list:#?}\n{}", agent.stderr_text());
        thread::sleep(Duration::from_millis(50));
    };
    let ran = std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(ran.is_empty(), "a program planted in the agent's PATH ran as root: {ran}");
    assert_eq!(incident_steps(&inc), ["diagnostics:ok", "sigkill:ok", "notify:ok"], "{inc:#}");
    let notify = step(&inc, "notify")["detail"].as_str().unwrap();
    assert!(notify == "ran /usr/bin/sh" || notify == "ran /bin/sh", "the system's sh: {notify}");
    let hook: Value =
        serde_json::from_str(&std::fs::read_to_string(&hooked).expect("the real sh ran the hook")).unwrap();
    assert_eq!(hook["actor"], "pathless");
    let diag: Value = serde_json::from_str(step(&inc, "diagnostics")["detail"].as_str().unwrap()).unwrap();
    assert_eq!(diag["py_spy"], "not installed", "{diag:#}");
    stop_agent(&mut agent);
    done(t0, "trusted PATH");
}
