//! The engine on real (child) processes and a real state dir: the ladder's
//! bookkeeping, which needs no kernel programs.

use std::{path::Path, process::Command};

use super::*;
use crate::{
    actors::registry::{ActorSpec, Caller, NoSink, RealProc, Source, read_facts},
    config::Overrides,
    sys::pidfd::tests::Reaper,
};

#[test]
fn rate_limit_allows_n_per_minute() {
    let mut r = RateLimit { per_minute: 3, sent: VecDeque::new() };
    assert!(r.try_take() && r.try_take() && r.try_take());
    assert!(!r.try_take());
    r.sent.iter_mut().for_each(|t| *t -= Duration::from_secs(61));
    assert!(r.try_take());
}

/// An engine over a fresh state dir with the config `toml`, and `child`
/// registered (by root, through the socket) as the actor "subject".
struct Rig {
    engine: Arc<Engine>,
    registry: Arc<Mutex<Registry>>,
    pid: u32,
    _child: Reaper,
    _state: tempfile::TempDir,
}

impl Rig {
    fn new(toml: &str, dry_run: bool, child: &mut Command) -> Rig {
        let state = tempfile::tempdir().unwrap();
        let over = Overrides { state_dir: Some(state.path().into()), dry_run, ..Default::default() };
        let config = Config::from_toml(toml, Path::new("test.toml"), &over).unwrap_or_else(|e| panic!("{e}"));
        let child = Reaper(child.spawn().expect("spawning the actor"));
        let pid = child.0.id();
        let registry = Arc::new(Mutex::new(Registry::new(Box::new(NoSink), 16)));
        let spec = ActorSpec { pid: Some(pid), name: Some("subject".into()), ..Default::default() };
        let caller = Caller { pid: std::process::id(), uid: 0 };
        let facts = read_facts(&RealProc, &spec, Some(caller));
        lock(&registry).upsert(&spec, Source::Socket, Some(caller), facts).unwrap();
        let store = Store::open(state.path()).unwrap();
        let engine = Engine::new(&config, store, registry.clone(), Arc::new(Metrics::new()));
        Rig { engine, registry, pid, _child: child, _state: state }
    }

    /// The detector's verdict: starving, now.
    fn confirm(&self) {
        let now = procinfo::monotonic_ns();
        self.engine.on_confirmed(Confirmation {
            pid: self.pid,
            first_evidence_ns: now,
            confirmed_ns: now,
            drops: 1,
            fill: None,
            signals: vec!["SIGINT".into()],
        });
    }

    fn incident(&self) -> Incident {
        lock(&self.engine.store).all().find(|i| i.pid == self.pid).cloned().expect("an incident")
    }

    /// The closing line of the audit log for the incident.
    fn audit_close(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self._state.path().join("audit.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| l["action"].as_str().is_some_and(|a| a.starts_with("closed_")))
            .unwrap_or_else(|| panic!("no close in the audit log:\n{text}"))
    }

    /// Polls the incident until `pred` holds (5 s at most).
    async fn wait(&self, what: &str, pred: impl Fn(&Incident) -> bool) -> Incident {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let i = self.incident();
            if pred(&i) {
                return i;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {i:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn sleeper(secs: &str) -> Command {
    let mut c = Command::new("sleep");
    c.arg(secs);
    c
}

fn actions(i: &Incident) -> Vec<String> {
    i.steps.iter().map(|s| format!("{}:{}", s.action, s.outcome)).collect()
}

/// `max_actions_per_minute` bounds everything the ladder does to or about
/// an actor, notifications included: with one action a minute, the second
/// notify tier waits (deferred) instead of running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_tiers_count_against_the_rate_limit() {
    let toml = r#"
[escalation]
max_actions_per_minute = 1
[policy.default]
tiers = [{ action = "notify", command = ["/bin/true"] }, { action = "notify", command = ["/bin/true"] }]
"#;
    let rig = Rig::new(toml, false, &mut sleeper("30"));
    rig.confirm();
    rig.wait("the first notify", |i| !i.steps.is_empty()).await;
    let i = rig.wait("the second notify to be deferred", |i| i.status == Status::Deferred).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let i2 = rig.incident();
    assert_eq!(actions(&i2), ["notify:ok"], "one action a minute: {i:#?}");
    assert_eq!(i2.status, Status::Deferred, "{i2:#?}");
}

/// A dry run sends nothing, so an actor that exits during a tier's wait
/// exited by itself: the incident says so, and the actor is not `dead`
/// (nobody killed it), whichever tier was waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_actor_that_exits_during_a_wait_exited_by_itself() {
    for tier in ["kill_subtree", "sigterm"] {
        let toml = format!("[policy.default]\ntiers = [{{ action = \"{tier}\", timeout = \"5s\" }}]\n");
        let rig = Rig::new(&toml, true, &mut sleeper("1"));
        rig.confirm();
        let i = rig.wait("the incident to close", |i| !i.status.is_open()).await;
        rig.wait("the ladder to end", |_| lock(&rig.engine.running).is_empty()).await;
        assert_eq!(i.status, Status::Exited, "{i:#?}");
        assert_eq!(actions(&i), [format!("{tier}:dry_run")], "{i:#?}");
        let state = lock(&rig.registry).all().find(|a| a.pid == rig.pid).map(|a| a.state);
        assert_ne!(state, Some(ActorState::Dead), "{tier}: a dry run killed nobody");
        let close = rig.audit_close();
        let detail = close["detail"].as_str().unwrap();
        assert!(detail.contains("by itself") && detail.contains("dry run"), "{tier}: {close}");
        assert!(!detail.contains(&format!("after {tier}")), "{tier}: {close}");
    }
}

/// A user's actor is signalled only while that user could do it, checked
/// before each signal tier (a process can become another user's without
/// an exec: a set-uid program calling setuid(0)): here a root-owned child
/// "registered by" uid 65534 gets no SIGTERM; the ladder stops, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_tier_is_skipped_when_the_registrant_may_no_longer_signal_the_actor() {
    let toml = "[policy.default]\ntiers = [{ action = \"sigterm\", timeout = \"5s\" }]\n";
    let rig = Rig::new(toml, false, &mut sleeper("30"));
    lock(&rig.registry).get_mut(rig.pid).unwrap().registered_by = Some(65534);
    rig.confirm();
    let i = rig.wait("the incident to close", |i| !i.status.is_open()).await;
    assert_eq!(i.status, Status::Failed, "{i:#?}");
    assert_eq!(actions(&i), ["sigterm:not_permitted"], "{i:#?}");
    assert!(i.steps[0].detail.contains("uid 65534"), "{}", i.steps[0].detail);
    assert!(ProcessHandle::open(rig.pid, None).is_ok_and(|h| h.is_alive()), "nothing was sent");
}
