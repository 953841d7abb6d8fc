//! `sigwake run`: the /metrics endpoint against a real starved trio loop.

use std::{process::Command, time::Duration};

use sigwake_tests::*;

const DROPPED: &str = "sigwake_wakeup_writes_dropped_total";

#[test]
fn dropped_wakeup_counter_moves_by_the_drops_caused() {
    // Other processes on the host may drop wakeups meanwhile: count only
    // this actor's, by its registered name.
    let agent = RunningAgent::start(&["--dry-run"]);
    let addr = agent.addr.clone();
    let name = format!("metrics-test-{}", std::process::id());
    let label = format!(r#"actor="{name}""#);
    let before = agent.metrics();
    assert_eq!(metric_sum(&before, DROPPED, &[&label]), 0.0);

    // The hog starts with the fixture and must outlast the trace's start
    // (load, attach, self-test), which is slow in the matrix's TCG guests.
    let hog = scaled(Duration::from_secs(3)).as_secs().to_string();
    let (mut actor, _) = fixture_with_env(
        "trio_actor.py",
        &["--hog-seconds", &hog, "--register", &name],
        &[("SIGWAKE_SOCKET", agent.socket.to_str().unwrap())],
    );
    let pid = actor.pid().to_string();
    let mut drops = trace(&["--only-drops", "--pid", &pid, "--until-exit"]);
    actor.stdout.wait_json("the GIL hog to start", EVENT, |v| v["hogging"] == true);
    sigint_burst(actor.pid(), 10);
    actor.wait_exit(Duration::from_secs(20));
    assert!(drops.wait_exit(EVENT).success());
    let caused = drops_for(&drops.stdout, actor.pid()).len() as f64;
    assert!(caused >= 1.0, "the fixture should have dropped wakeups");

    let mut last = String::new();
    wait_until(&format!("{DROPPED} to move by {caused}"), EVENT, || {
        last = http_get(&addr, "/metrics", Some("application/openmetrics-text")).unwrap().2;
        metric_sum(&last, DROPPED, &[&label, r#"signal="SIGINT""#, r#"errno="EAGAIN""#]) == caused
    });
    validate_openmetrics(&last);

    // Classic text format for scrapers that do not ask for OpenMetrics.
    let (status, ctype, classic) = http_get(&addr, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    assert!(classic.contains(&format!("# TYPE {DROPPED} counter")), "{classic}");
    assert!(!classic.contains("# EOF"));
    assert_eq!(http_get(&addr, "/healthz", None).unwrap().0, 200);
    agent.stop();
}

/// Parses the text with the reference OpenMetrics parser (Python
/// prometheus_client, installed in the test venv) and checks the families
/// the agent promises.
fn validate_openmetrics(text: &str) {
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
names = {f.name for f in text_string_to_metric_families(sys.stdin.read())}
need = {"sigwake_wakeup_writes_dropped", "sigwake_signals_generated", "sigwake_signals_delivered",
        "sigwake_kernel_lost_events", "sigwake_decode_errors", "sigwake_build"}
missing = need - names
assert not missing, f"missing families: {missing}"
print("ok", len(names))
"#;
    let mut p = Command::new(python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(out.status.success(), "invalid OpenMetrics: {}\n{text}", String::from_utf8_lossy(&out.stderr));
}
