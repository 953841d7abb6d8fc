//! Configuration: an optional TOML file, merged under command-line flags,
//! validated once into [`Config`] — a plain type the rest of the agent
//! uses without re-checking.
//!
//! Every error names the file, the line and the reason.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

use crate::actors::registry::{DropMeaning, Runtime};

mod trust;
use trust::{read_trusted, resolve_command};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
pub const DEFAULT_SOCKET: &str = "/run/sigwake/registry.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sigwake";

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    serve_state: Option<bool>,
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    discovery: Option<bool>,
    discover_pipes: Option<bool>,
    dry_run: Option<bool>,
    max_actors: Option<usize>,
    max_actor_labels: Option<usize>,
    escalation: Option<FileEscalation>,
    #[serde(default)]
    policy: BTreeMap<String, Spanned<FilePolicy>>,
    #[serde(default)]
    selector: Vec<Spanned<FileSelector>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileEscalation {
    max_concurrent: Option<usize>,
    max_actions_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    /// How long the loop may stay starved after a stop signal before
    /// sigwake acts, per runtime.
    confirm: Option<String>,
    confirm_trio: Option<String>,
    confirm_asyncio: Option<String>,
    tiers: Vec<FileTier>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTier {
    action: String,
    timeout: Option<String>,
    py_spy: Option<bool>,
    command: Option<Vec<String>>,
    url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSelector {
    name: Option<String>,
    exe: Option<String>,
    cmdline: Option<String>,
    cgroup: Option<String>,
    uid: Option<u32>,
    descendant_of: Option<u32>,
    runtime: Option<Runtime>,
    policy: Option<String>,
}

/// One step of an escalation ladder.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Capture thread states, stacks, fds, wakeup fill, py-spy dump.
    Diagnostics { py_spy: bool },
    /// Send a signal through the pidfd, then wait `timeout` for exit.
    Signal { signal: i32, timeout: Duration },
    /// Kill the actor's cgroup (when it has its own) or its descendants.
    KillSubtree { timeout: Duration },
    /// Run a command or POST a URL with the incident as JSON.
    Notify { command: Option<Vec<String>>, url: Option<String> },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Diagnostics { .. } => "diagnostics",
            Self::Signal { signal, .. } if *signal == libc::SIGTERM => "sigterm",
            Self::Signal { signal, .. } if *signal == libc::SIGKILL => "sigkill",
            Self::Signal { signal, .. } if *signal == libc::SIGABRT => "sigabrt",
            Self::Signal { .. } => "signal",
            Self::KillSubtree { .. } => "kill_subtree",
            Self::Notify { .. } => "notify",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub name: String,
    pub confirm_trio: Duration,
    pub confirm_asyncio: Duration,
    pub confirm_other: Duration,
    pub tiers: Vec<Action>,
}

impl Policy {
    pub fn confirm_window(&self, runtime: Runtime) -> Duration {
        // By what a dropped wakeup means: `confirm_asyncio` is the window of
        // every runtime whose lost byte is a lost callback (asyncio, uvloop,
        // tornado, libuv), `confirm_trio` trio's.
        match (runtime, runtime.drop_meaning()) {
            (Runtime::Trio, _) => self.confirm_trio,
            (_, DropMeaning::Lost) => self.confirm_asyncio,
            _ => self.confirm_other,
        }
    }

    /// The built-in `default` policy: confirm for 2 s (1 s for asyncio,
    /// whose lost byte is already a lost callback), capture diagnostics,
    /// SIGTERM and wait 3 s, SIGKILL and wait 2 s, then the subtree.
    /// Anchored on tractor's 0.5 s cancel + 1.6 s hard kill and systemd's
    /// TERM → KILL, with room for a loaded host.
    pub fn builtin_default() -> Policy {
        Policy {
            name: "default".into(),
            confirm_trio: Duration::from_secs(2),
            confirm_asyncio: Duration::from_secs(1),
            confirm_other: Duration::from_secs(2),
            tiers: vec![
                Action::Diagnostics { py_spy: true },
                Action::Signal { signal: libc::SIGTERM, timeout: Duration::from_secs(3) },
                Action::Signal { signal: libc::SIGKILL, timeout: Duration::from_secs(2) },
                Action::KillSubtree { timeout: Duration::from_secs(2) },
            ],
        }
    }
}

#[derive(Clone, Debug)]
pub struct Selector {
    pub name: Option<String>,
    pub exe: Option<String>,
    pub cmdline: Option<Regex>,
    pub cgroup: Option<String>,
    pub uid: Option<u32>,
    pub descendant_of: Option<u32>,
    pub runtime: Option<Runtime>,
    pub policy: Option<String>,
}

/// What a selector looks at, for one process.
pub struct Candidate<'a> {
    pub pid: u32,
    pub exe: Option<&'a Path>,
    pub cmdline: &'a [String],
    pub cgroup: Option<&'a str>,
    pub uid: u32,
    /// pid, parent, grandparent … up to 1.
    pub ancestors: &'a [u32],
}

impl Selector {
    /// All given criteria must hold.
    pub fn matches(&self, c: &Candidate<'_>) -> bool {
        self.exe.as_ref().is_none_or(|e| c.exe.is_some_and(|x| x == Path::new(e)))
            && self.cmdline.as_ref().is_none_or(|re| re.is_match(&c.cmdline.join(" ")))
            && self.cgroup.as_ref().is_none_or(|g| {
                c.cgroup.is_some_and(|cg| cg == g || cg.starts_with(&format!("{}/", g.trim_end_matches('/'))))
            })
            && self.uid.is_none_or(|u| u == c.uid)
            && self.descendant_of.is_none_or(|d| c.pid != d && c.ancestors.contains(&d))
    }
}

#[derive(Clone, Debug)]
pub struct EscalationLimits {
    pub max_concurrent: usize,
    pub max_actions_per_minute: u32,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Serve `/actors` and `/incidents` over HTTP: to anyone who can
    /// connect, so for trusted networks only.
    pub serve_state: bool,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub discovery: bool,
    /// Discovery sees pipe and eventfd wakeups too (`--discover-pipes`):
    /// the socket tier's syscall hooks for them stay attached.
    pub discover_pipes: bool,
    pub dry_run: bool,
    pub max_actors: usize,
    pub max_actor_labels: usize,
    pub limits: EscalationLimits,
    pub policies: BTreeMap<String, Policy>,
    pub selectors: Vec<Selector>,
}

/// Flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub serve_state: bool,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub dry_run: bool,
    pub no_discovery: bool,
    pub discover_pipes: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax or schema error, with the place.
    #[error("{path}:{line}: {reason}")]
    Invalid { path: PathBuf, line: usize, reason: String },
    /// Someone other than root (or the agent's uid) could have chosen what
    /// the file says: its owner, its mode, or its directory's.
    #[error("refusing config {path}: {reason}")]
    Untrusted { path: PathBuf, reason: String },
}

/// Parses a duration: `500ms`, `2s`, `1.5s`, `1m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t.find(|c: char| c.is_ascii_alphabetic()).map_or((t, ""), |i| t.split_at(i));
    let n: f64 = num.trim().parse().map_err(|_| format!("`{text}` is not a duration like 500ms, 2s or 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{text}`: unit must be ms, s or m")),
    };
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("`{text}` is out of range (0 to 1h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Config {
    /// Built-in defaults with the flags applied (no file).
    pub fn defaults(over: &Overrides) -> Config {
        Self::from_toml("", Path::new("<built-in>"), over).expect("built-in defaults are valid")
    }

    /// Reads and validates the file, which must be the agent's to trust:
    /// see [`read_trusted`].
    pub fn load(path: &Path, over: &Overrides) -> Result<Config, ConfigError> {
        let text = read_trusted(path)?;
        Self::from_toml(&text, path, over)
    }

    pub fn from_toml(text: &str, path: &Path, over: &Overrides) -> Result<Config, ConfigError> {
        let invalid = |offset: usize, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of(text, offset),
            reason,
        };
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            // Some syntax errors (a bare carriage return) come with an
            // empty message: say what the parser saw instead of nothing.
            let reason = match e.message().trim() {
                "" => format!("not valid TOML here: {}", e.to_string().lines().next().unwrap_or("syntax error")),
                m => m.to_string(),
            };
            invalid(offset, reason)
        })?;
        let listen = match (over.listen, &file.listen) {
            (Some(l), _) => l,
            (None, Some(l)) => {
                l.parse().map_err(|_| invalid(0, format!("listen: `{l}` is not an address like 127.0.0.1:9464")))?
            }
            (None, None) => DEFAULT_LISTEN.parse().expect("valid default"),
        };
        let mut policies = BTreeMap::new();
        policies.insert("default".to_string(), Policy::builtin_default());
        for (name, spanned) in &file.policy {
            let at = spanned.span().start;
            let p = spanned.get_ref();
            let dur = |field: &str, v: &Option<String>, default: Duration| -> Result<Duration, ConfigError> {
                v.as_deref()
                    .map(parse_duration)
                    .transpose()
                    .map_err(|e| invalid(at, format!("policy.{name}.{field}: {e}")))
                    .map(|d| d.unwrap_or(default))
            };
            let confirm = dur("confirm", &p.confirm, Duration::from_secs(2))?;
            let mut tiers = Vec::new();
            for (i, t) in p.tiers.iter().enumerate() {
                let field = format!("tiers[{i}]");
                let timeout = dur(&format!("{field}.timeout"), &t.timeout, Duration::from_secs(2))?;
                let action = match t.action.as_str() {
                    "diagnostics" => Action::Diagnostics { py_spy: t.py_spy.unwrap_or(true) },
                    "sigterm" => Action::Signal { signal: libc::SIGTERM, timeout },
                    "sigkill" => Action::Signal { signal: libc::SIGKILL, timeout },
                    "sigabrt" => Action::Signal { signal: libc::SIGABRT, timeout },
                    "sigint" => Action::Signal { signal: libc::SIGINT, timeout },
                    "kill_subtree" => Action::KillSubtree { timeout },
                    "notify" => {
                        if t.command.is_none() && t.url.is_none() {
                            return Err(invalid(at, format!("policy.{name}.{field}: notify needs `command` or `url`")));
                        }
                        if let Some(u) = &t.url
                            && !u.starts_with("http://")
                        {
                            return Err(invalid(
                                at,
                                format!("policy.{name}.{field}: url must be http://host:port/path"),
                            ));
                        }
                        if t.command.as_ref().is_some_and(|c| c.is_empty()) {
                            return Err(invalid(at, format!("policy.{name}.{field}: command must not be empty")));
                        }
                        let command = t
                            .command
                            .clone()
                            .map(|mut cmd| {
                                cmd[0] = resolve_command(&cmd[0])?;
                                Ok(cmd)
                            })
                            .transpose()
                            .map_err(|e: String| invalid(at, format!("policy.{name}.{field}: {e}")))?;
                        Action::Notify { command, url: t.url.clone() }
                    }
                    other => {
                        return Err(invalid(
                            at,
                            format!(
                                "policy.{name}.{field}: unknown action `{other}` (diagnostics, sigterm, sigkill, sigabrt, sigint, kill_subtree, notify)"
                            ),
                        ));
                    }
                };
                tiers.push(action);
            }
            policies.insert(
                name.clone(),
                Policy {
                    name: name.clone(),
                    confirm_trio: dur("confirm_trio", &p.confirm_trio, confirm)?,
                    confirm_asyncio: dur("confirm_asyncio", &p.confirm_asyncio, confirm)?,
                    confirm_other: confirm,
                    tiers,
                },
            );
        }
        let mut selectors = Vec::new();
        for spanned in &file.selector {
            let at = spanned.span().start;
            let s = spanned.get_ref();
            let cmdline = s
                .cmdline
                .as_deref()
                .map(Regex::new)
                .transpose()
                .map_err(|e| invalid(at, format!("selector cmdline: bad regex: {e}")))?;
            if s.exe.is_none()
                && cmdline.is_none()
                && s.cgroup.is_none()
                && s.uid.is_none()
                && s.descendant_of.is_none()
            {
                return Err(invalid(
                    at,
                    "selector needs at least one of exe, cmdline, cgroup, uid, descendant_of".into(),
                ));
            }
            if let Some(cg) = &s.cgroup {
                let Some(dir) = crate::sys::cgroup::v2_dir(cg) else {
                    return Err(invalid(
                        at,
                        format!(
                            "selector cgroup `{cg}`: no cgroup v2 hierarchy is mounted here (no cgroup2 line in /proc/self/mountinfo); mount one or drop the cgroup key"
                        ),
                    ));
                };
                if let Err(e) = std::fs::metadata(&dir) {
                    return Err(invalid(at, format!("selector cgroup `{cg}`: cannot read {}: {e}", dir.display())));
                }
            }
            if let Some(p) = &s.policy
                && !policies.contains_key(p)
            {
                return Err(invalid(at, format!("selector policy `{p}` is not defined (add a [policy.{p}] table)")));
            }
            selectors.push(Selector {
                name: s.name.clone(),
                exe: s.exe.clone(),
                cmdline,
                cgroup: s.cgroup.clone(),
                uid: s.uid,
                descendant_of: s.descendant_of,
                runtime: s.runtime,
                policy: s.policy.clone(),
            });
        }
        let esc = file.escalation.unwrap_or_default();
        Ok(Config {
            listen,
            serve_state: over.serve_state || file.serve_state.unwrap_or(false),
            socket: over.socket.clone().or(file.socket).unwrap_or_else(|| DEFAULT_SOCKET.into()),
            state_dir: over.state_dir.clone().or(file.state_dir).unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            discovery: !over.no_discovery && file.discovery.unwrap_or(true),
            discover_pipes: !over.no_discovery
                && file.discovery.unwrap_or(true)
                && (over.discover_pipes || file.discover_pipes.unwrap_or(false)),
            dry_run: over.dry_run || file.dry_run.unwrap_or(false),
            max_actors: file.max_actors.unwrap_or(10_000).clamp(1, 60_000),
            max_actor_labels: file.max_actor_labels.unwrap_or(200).max(1),
            limits: EscalationLimits {
                max_concurrent: esc.max_concurrent.unwrap_or(4).max(1),
                max_actions_per_minute: esc.max_actions_per_minute.unwrap_or(30).max(1),
            },
            policies,
            selectors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("sigwake.toml"), &Overrides::default())
    }

    #[test]
    fn defaults_have_the_builtin_policy() {
        let c = Config::defaults(&Overrides::default());
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.policies["default"], Policy::builtin_default());
        assert!(c.discovery && !c.dry_run);
        assert!(!c.serve_state, "/actors and /incidents are off unless asked for");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../examples/sigwake.toml");
        let c = parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.policies.contains_key("fast"));
        assert!(!c.selectors.is_empty());
    }

    #[test]
    fn unknown_keys_name_file_and_line() {
        let err = parse("listen = \"127.0.0.1:1\"\n\n[escalation]\nmax_concurent = 3\n").unwrap_err().to_string();
        assert!(err.starts_with("sigwake.toml:4: "), "{err}");
        assert!(err.contains("max_concurent"), "{err}");
    }

    #[test]
    fn bad_regex_and_unknown_policy_are_refused_with_line() {
        let err = parse("\n[[selector]]\ncmdline = \"([a-\"\n").unwrap_err().to_string();
        assert!(err.starts_with("sigwake.toml:2: selector cmdline: bad regex"), "{err}");
        let err = parse("[[selector]]\nuid = 5\npolicy = \"nope\"\n").unwrap_err().to_string();
        assert!(err.contains("policy `nope` is not defined"), "{err}");
        let err = parse("[[selector]]\ncgroup = \"/no/such/cgroup-xyz\"\n").unwrap_err().to_string();
        // Under the cgroup2 mount, wherever this host has it (hybrid hosts:
        // /sys/fs/cgroup/unified).
        assert!(err.contains("cannot read /") && err.contains("/no/such/cgroup-xyz: No such file"), "{err}");
        let err = parse("[[selector]]\nname = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("at least one of"), "{err}");
    }

    #[test]
    fn policy_tiers_parse_and_bad_ones_are_refused() {
        let c = parse(
            "[policy.p]\nconfirm = \"500ms\"\nconfirm_trio = \"1s\"\ntiers = [{action = \"sigterm\", timeout = \"1s\"}, {action = \"notify\", command = [\"/bin/true\"]}]\n",
        )
        .unwrap();
        let p = &c.policies["p"];
        assert_eq!(p.confirm_window(Runtime::Trio), Duration::from_secs(1));
        assert_eq!(p.confirm_window(Runtime::Asyncio), Duration::from_millis(500));
        assert_eq!(p.tiers[0], Action::Signal { signal: libc::SIGTERM, timeout: Duration::from_secs(1) });
        assert!(
            parse("[policy.p]\ntiers = [{action = \"nuke\"}]\n")
                .unwrap_err()
                .to_string()
                .contains("unknown action `nuke`")
        );
        assert!(parse("[policy.p]\ntiers = [{action = \"notify\"}]\n").is_err());
        assert!(
            parse("[policy.p]\nconfirm = \"soon\"\ntiers = []\n").unwrap_err().to_string().contains("not a duration")
        );
    }

    /// A notify command runs as root: a bare name is resolved at load
    /// through the trusted PATH (never the environment's), an absolute path
    /// must be an executable file, and a relative path is refused; each
    /// error names the file and line.
    #[test]
    fn notify_commands_are_absolute_or_found_in_the_trusted_path() {
        let with = |prog: &str| {
            parse(&format!("[policy.p]\ntiers = [{{action = \"notify\", command = [\"{prog}\", \"x\"]}}]\n"))
        };
        let first = |c: &Config| match &c.policies["p"].tiers[0] {
            Action::Notify { command: Some(cmd), .. } => cmd.clone(),
            other => panic!("{other:?}"),
        };
        let cmd = first(&with("sh").unwrap());
        assert!(cmd[0] == "/usr/bin/sh" || cmd[0] == "/bin/sh", "{cmd:?}");
        assert_eq!(cmd[1], "x");
        assert_eq!(first(&with("/bin/true").unwrap())[0], "/bin/true");
        for relative in ["./hook.sh", "bin/hook"] {
            let err = with(relative).unwrap_err().to_string();
            assert!(err.starts_with("sigwake.toml:1: policy.p.tiers[0]: "), "{err}");
            assert!(err.contains("absolute path"), "{err}");
        }
        let err = with("sigwake-no-such-hook").unwrap_err().to_string();
        assert!(err.contains(crate::sys::programs::TRUSTED_PATH) && err.contains("absolute path"), "{err}");
        let err = with("/no/such/hook").unwrap_err().to_string();
        assert!(err.contains("not an executable file"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let over = Overrides {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            dry_run: true,
            no_discovery: true,
            ..Default::default()
        };
        let c = Config::from_toml("listen = \"127.0.0.1:2\"\ndiscovery = true\n", Path::new("f"), &over).unwrap();
        assert_eq!(c.listen.port(), 1);
        assert!(c.dry_run && !c.discovery);
        assert!(!c.serve_state);
        assert!(parse("serve_state = true\n").unwrap().serve_state);
        let over = Overrides { serve_state: true, ..Default::default() };
        assert!(Config::from_toml("serve_state = false\n", Path::new("f"), &over).unwrap().serve_state);
    }

    #[test]
    fn selectors_match_on_every_given_criterion() {
        let s = Selector {
            name: None,
            exe: Some("/usr/bin/python3".into()),
            cmdline: Some(Regex::new("worker\\.py").unwrap()),
            cgroup: Some("/system.slice/app.service".into()),
            uid: Some(1000),
            descendant_of: Some(10),
            runtime: None,
            policy: None,
        };
        let cmd = vec!["python3".to_string(), "worker.py".to_string()];
        let mut c = Candidate {
            pid: 12,
            exe: Some(Path::new("/usr/bin/python3")),
            cmdline: &cmd,
            cgroup: Some("/system.slice/app.service/sub"),
            uid: 1000,
            ancestors: &[12, 11, 10, 1],
        };
        assert!(s.matches(&c));
        c.uid = 0;
        assert!(!s.matches(&c));
        c.uid = 1000;
        c.cgroup = Some("/system.slice/app.service2");
        assert!(!s.matches(&c));
        c.cgroup = Some("/system.slice/app.service");
        c.ancestors = &[12, 1];
        assert!(!s.matches(&c));
    }

    /// Found by the config fuzz target: a bare carriage return gave an
    /// error with an empty reason ("fuzz.toml:1: ").
    #[test]
    fn a_bare_carriage_return_is_an_error_that_says_something() {
        let Err(ConfigError::Invalid { line, reason, .. }) = parse("\ra") else { panic!("\\ra must not load") };
        assert_eq!(line, 1);
        assert!(!reason.trim().is_empty() && reason.contains("TOML"), "{reason:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}

/// Fuzz target of the config loader (property tests, stable toolchain):
/// any text, and TOML built from the real keys with values of any type,
/// either loads into a config that keeps the documented bounds or is an
/// error naming the file and a line of it — never a panic. `cargo xtask
/// test` runs these with many more cases (PROPTEST_CASES).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    const PATH: &str = "/etc/sigwake/fuzz.toml";

    /// A TOML value: durations (good and bad), numbers, strings, arrays.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            (any::<f64>(), prop_oneof![Just("ms"), Just("s"), Just("m"), Just("h"), Just("")])
                .prop_map(|(n, u)| format!("\"{n}{u}\"")),
            (0u32..5000, prop_oneof![Just("ms"), Just("s"), Just("m")]).prop_map(|(n, u)| format!("\"{n}{u}\"")),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            "[ -~]{0,16}".prop_map(|s| format!("{:?}", s)),
            Just("\"127.0.0.1:0\"".to_string()),
            Just("[\"/bin/true\", \"x\"]".to_string()),
            Just("[]".to_string()),
            Just("\"(\"".to_string()),
        ]
    }

    fn tier() -> impl Strategy<Value = String> {
        let action = prop_oneof![
            Just("diagnostics"),
            Just("sigterm"),
            Just("sigkill"),
            Just("sigabrt"),
            Just("sigint"),
            Just("kill_subtree"),
            Just("notify"),
            Just("explode"),
        ];
        let key = prop_oneof![Just("timeout"), Just("py_spy"), Just("command"), Just("url"), Just("bogus")];
        (action, proptest::collection::vec((key, value()), 0..3)).prop_map(|(a, kv)| {
            let mut t = format!("{{ action = \"{a}\"");
            for (k, v) in kv {
                t.push_str(&format!(", {k} = {v}"));
            }
            t + " }"
        })
    }

    fn document() -> impl Strategy<Value = String> {
        let top = prop_oneof![
            Just("listen"),
            Just("serve_state"),
            Just("socket"),
            Just("state_dir"),
            Just("discovery"),
            Just("discover_pipes"),
            Just("dry_run"),
            Just("max_actors"),
            Just("max_actor_labels"),
            Just("unknown_key"),
        ];
        let policy_key = prop_oneof![Just("confirm"), Just("confirm_trio"), Just("confirm_asyncio")];
        let sel_key = prop_oneof![
            Just("name"),
            Just("exe"),
            Just("cmdline"),
            Just("uid"),
            Just("descendant_of"),
            Just("runtime"),
            Just("policy"),
        ];
        (
            proptest::collection::vec((top, value()), 0..4),
            proptest::collection::vec((value(), value()), 0..3),
            proptest::collection::vec(
                (
                    prop_oneof![Just("default"), Just("p1")],
                    proptest::collection::vec((policy_key, value()), 0..3),
                    proptest::collection::vec(tier(), 0..4),
                ),
                0..3,
            ),
            proptest::collection::vec(proptest::collection::vec((sel_key, value()), 0..3), 0..2),
        )
            .prop_map(|(top, esc, policies, selectors)| {
                let mut doc = String::new();
                for (k, v) in top {
                    doc.push_str(&format!("{k} = {v}\n"));
                }
                doc.push_str("[escalation]\n");
                for (i, (a, b)) in esc.into_iter().enumerate() {
                    let k = if i % 2 == 0 { "max_concurrent" } else { "max_actions_per_minute" };
                    doc.push_str(&format!("{k} = {}\n", if i < 2 { a } else { b }));
                }
                for (name, kv, tiers) in policies {
                    doc.push_str(&format!("[policy.{name}]\n"));
                    for (k, v) in kv {
                        doc.push_str(&format!("{k} = {v}\n"));
                    }
                    doc.push_str(&format!("tiers = [{}]\n", tiers.join(", ")));
                }
                for kv in selectors {
                    doc.push_str("[[selector]]\n");
                    for (k, v) in kv {
                        doc.push_str(&format!("{k} = {v}\n"));
                    }
                }
                doc
            })
    }

    fn check(text: &str) -> Result<(), TestCaseError> {
        match Config::from_toml(text, Path::new(PATH), &Overrides::default()) {
            Ok(c) => {
                prop_assert!(c.policies.contains_key("default"));
                let hour = Duration::from_secs(3600);
                for p in c.policies.values() {
                    prop_assert!(p.confirm_trio <= hour && p.confirm_asyncio <= hour && p.confirm_other <= hour);
                    for t in &p.tiers {
                        if let Action::Signal { timeout, .. } | Action::KillSubtree { timeout } = t {
                            prop_assert!(*timeout <= hour);
                        }
                    }
                }
                prop_assert!(c.limits.max_concurrent >= 1 && c.limits.max_actions_per_minute >= 1);
                prop_assert!((1..=60_000).contains(&c.max_actors) && c.max_actor_labels >= 1);
            }
            Err(ConfigError::Invalid { path, line, reason }) => {
                prop_assert_eq!(path, PathBuf::from(PATH));
                prop_assert!(line >= 1 && line <= text.lines().count() + 1, "line {} of {:?}", line, text);
                prop_assert!(!reason.is_empty());
            }
            Err(e) => prop_assert!(false, "from_toml reads no file: {e}"),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn fuzz_config_any_text(text in "(?s).{0,200}") {
            check(&text)?;
        }

        #[test]
        fn fuzz_config_documents_of_real_keys(doc in document()) {
            check(&doc)?;
        }

        #[test]
        fn fuzz_parse_duration_any_text(text in "[-+0-9.eEinfaNms ]{0,12}") {
            if let Ok(d) = parse_duration(&text) {
                prop_assert!(d <= Duration::from_secs(3600));
            }
        }
    }
}
