//! The Prometheus surface: `dashboards/sigwake.json` (Grafana) and
//! `dashboards/prometheus/*.yml` (rules, their unit tests, the example
//! scrape config), checked with promtool, against the live agent's
//! /metrics, and through a real Prometheus server scraping a real agent
//! while a starved trio loop drops SIGINT wakeups.
//!
//! Needs `promtool` and `prometheus` on PATH (`cargo xtask setup` installs
//! Debian's `prometheus` package).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use sigwake_tests::*;

const DROPPED: &str = "sigwake_wakeup_writes_dropped_total";

/// Metrics that have samples once the seed scenario ran (or from start-up:
/// unlabelled counters and gauges). An expression over only these must
/// return data; one over anything else (actors, incidents, escalations,
/// histograms, BPF stats) may legitimately return an empty vector.
const MUST_HAVE_DATA: &[&str] = &[
    DROPPED,
    "sigwake_signals_generated_total",
    "sigwake_signals_delivered_total",
    "sigwake_kernel_lost_events_total",
    "sigwake_starvation_incidents_active",
    "sigwake_actor_labels_folded_total",
    "sigwake_build_info",
    "sigwake_start_time_seconds",
    "sigwake_attached_programs",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "up",
];

/// Label filters that can select nothing even over MUST_HAVE_DATA metrics
/// (the scenario need not make the kernel merge or fail to queue a signal).
const MAY_FILTER_TO_NOTHING: &[&str] = &["already_pending|overflow_fail|lose_info"];

/// Recording rules whose output must exist after the scenario.
const MUST_RECORD: &[&str] = &[
    "sigwake:wakeup_drops:rate5m",
    "sigwake:wakeup_drops:increase5m",
    "sigwake:signals_generated:rate5m",
    "sigwake:kernel_lost_events:increase5m",
];

const ALERTS: &[&str] = &[
    "SigwakeActorStarving",
    "SigwakeSigintDropsRising",
    "SigwakeEscalationFailed",
    "SigwakeLosingEvents",
    "SigwakeAgentDown",
];

/// Grafana's built-in variables, with the values the Prometheus test uses.
const BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__interval_ms", "15000"),
    ("__range", "5m"),
    ("__range_s", "300"),
    ("__range_ms", "300000"),
];

// ---------------------------------------------------------------- files

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_path_buf()
}

fn prom_dir() -> PathBuf {
    repo_root().join("dashboards/prometheus")
}

fn rules_file() -> PathBuf {
    prom_dir().join("sigwake-rules.yml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn dashboard() -> Value {
    let path = repo_root().join("dashboards/sigwake.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

// ---------------------------------------------------------------- expressions

#[derive(Debug, Clone)]
enum Kind {
    PromQl,
    /// A Grafana variable query `label_values(selector, label)`.
    LabelValues {
        selector: String,
        label: String,
    },
}

#[derive(Debug, Clone)]
struct Expr {
    origin: String,
    text: String,
    kind: Kind,
}

/// Every PromQL expression of the dashboard: panel targets (rows included),
/// annotation queries and variable queries.
fn dashboard_exprs(d: &Value) -> Vec<Expr> {
    fn walk(panels: &Value, out: &mut Vec<Expr>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {t}"));
                assert!(!expr.trim().is_empty(), "panel {title:?}: empty expr");
                out.push(Expr {
                    origin: format!("panel {title:?} target {}", t["refId"].as_str().unwrap_or("?")),
                    text: expr.to_string(),
                    kind: Kind::PromQl,
                });
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            out.push(Expr {
                origin: format!("annotation {:?}", a["name"].as_str().unwrap_or("?")),
                text: expr.to_string(),
                kind: Kind::PromQl,
            });
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().unwrap_or("?");
        let q = v["query"]
            .as_str()
            .or_else(|| v["query"]["query"].as_str())
            .unwrap_or_else(|| panic!("variable {name}: no query"));
        let inner = q.trim().strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')).unwrap_or_else(|| {
            panic!("variable {name}: only label_values(selector, label) queries are supported, got {q:?}")
        });
        let (selector, label) =
            inner.rsplit_once(',').unwrap_or_else(|| panic!("variable {name}: label_values needs a selector: {q:?}"));
        out.push(Expr {
            origin: format!("variable ${name}"),
            text: q.to_string(),
            kind: Kind::LabelValues { selector: selector.trim().to_string(), label: label.trim().to_string() },
        });
    }
    out
}

/// The `expr:` fields of a rules file (single-line or `|` / `>` block).
fn rule_exprs(yaml: &str) -> Vec<Expr> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut name = String::from("?");
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start();
        let indent = line.len() - t.len();
        if let Some(n) = t.strip_prefix("- record:").or_else(|| t.strip_prefix("- alert:")) {
            name = n.trim().to_string();
        }
        if let Some(rest) = t.strip_prefix("expr:") {
            let rest = rest.trim();
            let text = if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let nt = next.trim_start();
                    if !nt.is_empty() && next.len() - nt.len() <= indent {
                        break;
                    }
                    block.push(nt);
                    i += 1;
                }
                block.join(if rest.starts_with('|') { "\n" } else { " " }).trim().to_string()
            } else {
                rest.trim_matches(|c| c == '"' || c == '\'').to_string()
            };
            out.push(Expr { origin: format!("rule {name}"), text, kind: Kind::PromQl });
        }
        i += 1;
    }
    out
}

/// Words of `text` (runs of `[A-Za-z0-9_:]` not starting with a digit).
fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':'))
        .collect()
}

/// Metric names an expression refers to: identifiers that start with
/// `sigwake_` or `process_`, and `up`. (Recording-rule outputs contain a
/// colon and are not the agent's.)
fn metric_names(text: &str) -> BTreeSet<String> {
    words(text)
        .into_iter()
        .filter(|w| !w.contains(':') && (w.starts_with("sigwake_") || w.starts_with("process_") || *w == "up"))
        .map(str::to_string)
        .collect()
}

/// Grafana variables an expression refers to (`$name`, `${name}`, `${name:fmt}`).
fn variables(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices('$') {
        let rest = &text[at + 1..];
        let (braced, rest) = match rest.strip_prefix('{') {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            let _ = braced;
            out.push((at, name));
        }
    }
    out
}

/// Replaces Grafana variables by the values the Prometheus test uses:
/// built-ins by fixed durations, template variables by their "All" value.
fn substitute(text: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (inner, consumed) = if let Some(b) = after.strip_prefix('{') {
            let end = b.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {text:?}"));
            (b[..end].split(':').next().unwrap().to_string(), end + 2)
        } else {
            let n: String = after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let len = n.len();
            (n, len)
        };
        let value = values.get(&inner).unwrap_or_else(|| panic!("unknown variable ${inner} in {text:?}"));
        out.push_str(value);
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out
}

/// Template variable name -> the value "All" stands for.
fn template_values(d: &Value) -> BTreeMap<String, String> {
    let mut values: BTreeMap<String, String> = BUILTINS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().expect("a variable without a name").to_string();
        let all = v["allValue"].as_str().unwrap_or(".*").to_string();
        values.insert(name, all);
    }
    values
}

fn expected_result_type(promql: &str) -> &'static str {
    let t = promql.trim();
    if t.starts_with("scalar(") || t == "time()" || t.parse::<f64>().is_ok() { "scalar" } else { "vector" }
}

/// Metric names in an exposition (OpenMetrics or classic), as PromQL sees
/// them: counters as `_total`, histograms as `_bucket`/`_sum`/`_count`,
/// info as `_info`, and every sample name present.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
            match kind {
                "counter" => {
                    names.insert(if name.ends_with("_total") { name.to_string() } else { format!("{name}_total") });
                }
                "histogram" | "gaugehistogram" => {
                    for s in ["_bucket", "_sum", "_count", "_gsum", "_gcount"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
                "summary" => {
                    for s in ["", "_sum", "_count"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
                "info" => {
                    names.insert(format!("{name}_info"));
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

// ---------------------------------------------------------------- processes

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool").args(args).current_dir(prom_dir()).output().unwrap_or_else(|e| {
        panic!("running promtool {args:?}: {e}; run `cargo xtask setup` (it installs Debian's prometheus package)")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed ({}):\n{text}", out.status);
    text
}

/// A Prometheus server on a free loopback port scraping one agent every
/// second with the sigwake rules loaded. Stopped (SIGTERM, then SIGKILL)
/// and its data removed on drop.
struct Prometheus {
    proc: Proc,
    addr: String,
    _dir: TempDir,
}

impl Prometheus {
    fn start(agent_addr: &str) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        let yaml = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: sigwake\n    static_configs:\n      - targets: ['{agent_addr}']\n",
            rules = rules_file().display()
        );
        std::fs::write(&config, yaml).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let mut proc = Proc::spawn("prometheus", &mut cmd);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http10_get(&addr, "/-/ready") {
                break;
            }
            if let Ok(Some(st)) = proc.child.try_wait() {
                panic!("prometheus exited ({st}) before it was ready:\n{}", proc.stderr_text());
            }
            if Instant::now() > deadline {
                panic!("prometheus not ready on {addr} within 60 s:\n{}", proc.stderr_text());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Prometheus { proc, addr, _dir: dir }
    }

    /// GET an API path; the parsed JSON body (error bodies included).
    fn api(&self, path: &str) -> Value {
        let (status, body) = http10_get(&self.addr, path).unwrap_or_else(|e| panic!("GET {path} from prometheus: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| {
            panic!("GET {path}: HTTP {status}, not JSON ({e}):\n{body}\nprometheus log:\n{}", self.proc.stderr_text())
        })
    }

    fn query(&self, promql: &str) -> Value {
        self.api(&format!("/api/v1/query?query={}", urlencode(promql)))
    }

    /// Polls `promql` until `pred` holds for its (successful) response.
    fn query_until(&self, what: &str, promql: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.query(promql);
            if v["status"] == "success" && pred(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {what}; last answer to {promql:?}: {v}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Ok(None) = self.proc.child.try_wait() {
            // SAFETY: kill(2) on our own, unreaped child.
            unsafe { libc::kill(self.proc.pid() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.proc.child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
        } // Proc's own Drop SIGKILLs it if it is still running.
    }
}

/// HTTP/1.0 GET (no chunked encoding to undo); (status, body).
fn http10_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn result_len(v: &Value) -> usize {
    match &v["data"]["result"] {
        Value::Array(a) => a.len(),
        Value::Null => 0,
        _ => 1, // a scalar or string result
    }
}

fn scalar_sum(v: &Value) -> f64 {
    v["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
        .sum()
}

/// Causes SIGINT wakeup drops: the seed incident (a trio loop starved by a
/// GIL hog gets 10 SIGINTs 20 ms apart). The loop registers with `agent` as
/// `name`, so that its series are told apart from whatever else runs on the
/// host. Returns once the fixture exited (on its KeyboardInterrupt, or
/// ended by the agent's escalation).
fn seed_scenario(agent: &RunningAgent, name: &str) {
    let mut cmd = Command::new(python());
    cmd.arg(fixtures_dir().join("trio_actor.py"))
        .args(["--hog-seconds", "3", "--register", name])
        .current_dir(fixtures_dir())
        .env("SIGWAKE_SOCKET", &agent.socket);
    let mut actor = Proc::spawn("trio_actor.py", &mut cmd);
    let reg = actor.stdout.wait_json("the fixture to register", Duration::from_secs(30), |v| {
        v.get("registered").is_some() || v.get("register_error").is_some()
    });
    assert_eq!(reg["registered"]["name"], name, "registration failed: {reg}");
    actor.stdout.wait_json("the fixture to be ready", Duration::from_secs(30), |v| v["ready"] == true);
    actor.stdout.wait_json("the GIL hog to start", EVENT, |v| v["hogging"] == true);
    sigint_burst(actor.pid(), 10);
    actor.wait_exit(Duration::from_secs(20));
}

// ---------------------------------------------------------------- tests

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let check = promtool(&["check", "rules", "sigwake-rules.yml"]);
    println!("{check}");
    assert!(check.contains("SUCCESS"), "{check}");
    let tests = promtool(&["test", "rules", "sigwake-rules.test.yml"]);
    println!("{tests}");
    assert!(tests.contains("SUCCESS") && !tests.contains("FAILED"), "{tests}");
    let config = promtool(&["check", "config", "prometheus.example.yml"]);
    println!("{config}");

    // Every alert and every recording rule is covered by the unit tests.
    let rules = read(&rules_file());
    let unit = read(&prom_dir().join("sigwake-rules.test.yml"));
    let mut uncovered = Vec::new();
    for line in rules.lines().map(str::trim) {
        if let Some(alert) = line.strip_prefix("- alert:") {
            let alert = alert.trim();
            let cases = unit.matches(&format!("alertname: {alert}\n")).count();
            let firing = unit
                .split(&format!("alertname: {alert}\n"))
                .skip(1)
                .filter(|c| !c.trim_start().starts_with("exp_alerts: []"))
                .count();
            if cases < 2 || firing == 0 || firing == cases {
                uncovered.push(format!(
                    "alert {alert}: {cases} case(s), {firing} firing (need a firing and a not-firing case)"
                ));
            }
        }
        if let Some(record) = line.strip_prefix("- record:") {
            let record = record.trim();
            if !unit.contains(&format!("- expr: {record}")) {
                uncovered.push(format!("recording rule {record}: no promql_expr_test"));
            }
        }
    }
    assert!(uncovered.is_empty(), "rules without unit tests:\n{}", uncovered.join("\n"));
    for alert in ALERTS {
        assert!(rules.contains(&format!("- alert: {alert}\n")), "{alert} is missing from the rules");
    }
}

#[test]
fn dashboard_uses_only_metrics_the_agent_exports() {
    let d = dashboard();

    // Shape: what an operator imports into Grafana.
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion: {}", d["schemaVersion"]);
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name} variable"));
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("instance")["type"], "query");
    assert_eq!(var("actor")["type"], "query");
    let rows: Vec<&str> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for want in ["Host overview", "Per-actor drill-down", "Incident timeline", "Agent health"] {
        assert!(rows.iter().any(|r| r.starts_with(want)), "no row {want:?}; rows: {rows:?}");
    }
    let mut ids = BTreeSet::new();
    fn each_panel(panels: &Value, f: &mut dyn FnMut(&Value)) {
        for p in panels.as_array().into_iter().flatten() {
            f(p);
            each_panel(&p["panels"], f);
        }
    }
    each_panel(&d["panels"], &mut |p| {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().unwrap_or_else(|| panic!("panel {title:?} has no id"))),
            "duplicate panel id in {title:?}"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "panel {title:?} has no gridPos");
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?} must use the $datasource variable");
            for t in p["targets"].as_array().into_iter().flatten() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title:?}: a target not on $datasource");
            }
        }
    });

    let exprs = dashboard_exprs(&d);
    let rules = rule_exprs(&read(&rules_file()));
    assert!(exprs.len() >= 20, "only {} dashboard expressions found", exprs.len());
    assert!(rules.len() >= 15, "only {} rule expressions found", rules.len());

    // Variables: every one referenced is defined (or a Grafana built-in);
    // multi-value ones are only used with a regex matcher.
    let defined: BTreeMap<&str, &Value> = vars.iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
    let mut problems = Vec::new();
    for e in &exprs {
        for (at, name) in variables(&e.text) {
            if BUILTINS.iter().any(|(b, _)| *b == name) {
                continue;
            }
            match defined.get(name.as_str()) {
                None => problems.push(format!("{}: ${name} is not defined in templating: {}", e.origin, e.text)),
                Some(v) if v["multi"] == true || v["includeAll"] == true => {
                    if !e.text[..at].ends_with("=~\"") {
                        problems.push(format!(
                            "{}: multi-value ${name} used outside a =~\"...\" matcher: {}",
                            e.origin, e.text
                        ));
                    }
                }
                Some(_) => {}
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Metric names against the real agent.
    let agent = RunningAgent::start(&[]);
    let exported = exported_names(&agent.metrics());
    agent.stop();
    assert!(exported.contains(DROPPED), "the agent does not export {DROPPED}: {exported:?}");

    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut referenced = BTreeSet::new();
    for e in exprs.iter().chain(&rules) {
        for name in metric_names(&e.text) {
            referenced.insert(name.clone());
            if name != "up" && !exported.contains(&name) {
                missing.entry(name).or_default().push(e.origin.clone());
            }
        }
    }
    println!("referenced metrics: {referenced:?}");
    assert!(referenced.contains(DROPPED) && referenced.contains("up"));
    assert!(
        missing.is_empty(),
        "the dashboard or the rules use metrics the live agent does not export ({} missing: {:?}):\n{}\nexported: {exported:?}",
        missing.len(),
        missing.keys().collect::<Vec<_>>(),
        missing.iter().map(|(m, o)| format!("  {m}: {}", o.join(", "))).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn every_query_runs_on_a_real_prometheus_scraping_the_agent() {
    let d = dashboard();
    let values = template_values(&d);
    let exprs = dashboard_exprs(&d);

    let agent = RunningAgent::start(&[]);
    let prom = Prometheus::start(&agent.addr);
    prom.query_until("Prometheus to scrape the agent", r#"up{job="sigwake"} == 1"#, Duration::from_secs(30), |v| {
        result_len(v) == 1
    });

    let name = format!("dashboards-{}", std::process::id());
    seed_scenario(&agent, &name);
    let ours = format!(r#"actor="{name}""#);

    prom.query_until(&format!("Prometheus to scrape {DROPPED}"), DROPPED, Duration::from_secs(30), |v| {
        result_len(v) > 0
    });

    // The birth-aware increase counts the burst that created the series:
    // Prometheus's 5-minute SIGINT drop count for our actor equals the
    // agent's counter (the agent started within the last 5 minutes).
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let recorded =
            scalar_sum(&prom.query(&format!(r#"sum(sigwake:wakeup_drops:increase5m{{signal="SIGINT",{ours}}})"#)));
        let counted = metric_sum(&agent.metrics(), DROPPED, &[r#"signal="SIGINT""#, &ours]);
        if counted > 0.0 && recorded == counted {
            break (recorded, counted);
        }
        assert!(
            Instant::now() < deadline,
            "sigwake:wakeup_drops:increase5m (SIGINT) never matched the agent's counter within 30 s: recorded {recorded}, agent {counted}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    println!("SIGINT drops: agent {} = Prometheus sigwake:wakeup_drops:increase5m {}", last.1, last.0);

    // The drops alert fires for our actor (it has no `for`); the agent-down
    // one does not (a scrape that times out on a loaded host may make the
    // scrape_failed rule pending, never firing within its 2 minutes).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alerts = prom.api("/api/v1/alerts");
        let list = alerts["data"]["alerts"].as_array().cloned().unwrap_or_default();
        assert!(
            !list.iter().any(|a| a["labels"]["alertname"] == "SigwakeAgentDown"
                && (a["state"] == "firing" || a["labels"]["cause"] == "no_target")),
            "SigwakeAgentDown is active while the agent is up: {alerts}"
        );
        if list.iter().any(|a| {
            a["labels"]["alertname"] == "SigwakeSigintDropsRising"
                && a["state"] == "firing"
                && a["labels"]["job"] == "sigwake"
                && a["labels"]["actor"] == name.as_str()
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "SigwakeSigintDropsRising did not fire within 30 s: {alerts}");
        thread::sleep(Duration::from_millis(200));
    }

    let mut failures = Vec::new();
    let mut checked = 0;

    // Every dashboard expression, with the variables set to "All".
    for e in &exprs {
        let text = substitute(&e.text, &values);
        match &e.kind {
            Kind::LabelValues { selector, label } => {
                let selector = substitute(selector, &values);
                let path = format!("/api/v1/label/{label}/values?match%5B%5D={}", urlencode(&selector));
                let v = prom.api(&path);
                checked += 1;
                if v["status"] != "success" {
                    failures.push(format!("{}: {text}: {v}", e.origin));
                } else if v["data"].as_array().is_none_or(|a| a.is_empty()) {
                    failures.push(format!("{}: {text}: no values ({v})", e.origin));
                } else if label == "actor" && !v["data"].as_array().unwrap().iter().any(|a| *a == name.as_str()) {
                    failures
                        .push(format!("{}: {text}: the scenario's actor {name} is not among {}", e.origin, v["data"]));
                } else {
                    println!("ok {} -> {}", e.origin, v["data"]);
                }
            }
            Kind::PromQl => {
                let must = metric_names(&e.text).iter().all(|m| MUST_HAVE_DATA.contains(&m.as_str()))
                    && !MAY_FILTER_TO_NOTHING.iter().any(|f| e.text.contains(f));
                check_query(&prom, &e.origin, &text, must, &mut failures);
                checked += 1;
            }
        }
    }

    // Every rule, as Prometheus loaded it: evaluated without error, and its
    // expression answers a query with a vector.
    let file_rules = rule_exprs(&read(&rules_file()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let v = prom.api("/api/v1/rules");
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown");
        if evaluated {
            break rules;
        }
        assert!(Instant::now() < deadline, "rules not all evaluated within 30 s: {v}");
        thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        rules.len(),
        file_rules.len(),
        "Prometheus loaded {} rules, the file has {}",
        rules.len(),
        file_rules.len()
    );
    for alert in ALERTS {
        assert!(rules.iter().any(|r| r["name"] == *alert && r["type"] == "alerting"), "alert {alert} not loaded");
    }
    for r in &rules {
        let name = r["name"].as_str().unwrap_or("?");
        let query = r["query"].as_str().unwrap_or_else(|| panic!("rule {name} has no query: {r}"));
        if r["health"] != "ok" {
            failures.push(format!("rule {name}: health {} ({})", r["health"], r["lastError"]));
        }
        let must = match r["type"].as_str() {
            Some("recording") => MUST_RECORD.contains(&name),
            _ => name == "SigwakeSigintDropsRising",
        };
        check_query(&prom, &format!("{} rule {name}", r["type"].as_str().unwrap_or("?")), query, must, &mut failures);
        checked += 1;
        if r["type"] == "recording" && MUST_RECORD.contains(&name) {
            check_query(&prom, &format!("recorded series {name}"), name, true, &mut failures);
        }
    }
    for name in MUST_RECORD {
        assert!(rules.iter().any(|r| r["name"] == *name), "recording rule {name} not loaded");
    }

    println!("{checked} expressions checked against Prometheus");
    drop(prom);
    agent.stop();
    assert!(failures.is_empty(), "{} of {checked} queries failed:\n{}", failures.len(), failures.join("\n"));
}

/// Runs `promql` as an instant query: status success and the expected result
/// type; when `must_have_data`, waits (up to 20 s: rate() needs two scrapes)
/// for a non-empty result. Records failures instead of panicking so that one
/// run reports every broken query.
fn check_query(prom: &Prometheus, origin: &str, promql: &str, must_have_data: bool, failures: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = prom.query(promql);
        if v["status"] != "success" {
            failures.push(format!("{origin}: {promql}\n    -> {} {}", v["errorType"], v["error"]));
            return;
        }
        let want = expected_result_type(promql);
        if v["data"]["resultType"] != want {
            failures
                .push(format!("{origin}: {promql}\n    -> result type {} (expected {want})", v["data"]["resultType"]));
            return;
        }
        let n = result_len(&v);
        if !must_have_data || n > 0 {
            println!("ok {origin}: {} {} result(s){}", want, n, if must_have_data { " (required)" } else { "" });
            return;
        }
        if Instant::now() > deadline {
            failures.push(format!("{origin}: {promql}\n    -> empty, but the scenario must give it data"));
            return;
        }
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn expression_helpers() {
    assert_eq!(
        metric_names(
            r#"sum by (instance) (rate(sigwake_x_total{job=~"$job"}[$__rate_interval])) / up + sigwake:rec:rate5m + process_open_fds offset 5m"#
        ),
        ["process_open_fds", "sigwake_x_total", "up"].into_iter().map(String::from).collect()
    );
    let values: BTreeMap<String, String> =
        [("job", ".*"), ("__rate_interval", "1m")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(substitute(r#"rate(a{job=~"$job"}[${__rate_interval}])"#, &values), r#"rate(a{job=~".*"}[1m])"#);
    let rules = rule_exprs(
        "  - record: a:b\n    expr: sum(x)\n  - alert: A\n    expr: |\n      x > 0\n      or\n      y > 0\n    for: 1m\n",
    );
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[1].text, "x > 0\nor\ny > 0");
    assert_eq!(rules[1].origin, "rule A");
    let names = exported_names("# TYPE a counter\n# TYPE h histogram\n# TYPE b info\nb_info{version=\"1\"} 1\n# EOF\n");
    for n in ["a_total", "h_bucket", "h_sum", "h_count", "b_info"] {
        assert!(names.contains(n), "{n} in {names:?}");
    }
    assert_eq!(urlencode("a{b=\"c\"} [1m]"), "a%7Bb%3D%22c%22%7D%20%5B1m%5D");
}
