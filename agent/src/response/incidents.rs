//! Incidents and the audit log.
//!
//! An incident is one confirmed starvation of one actor and everything done
//! about it. The store is written to `<state_dir>/incidents.json` (atomic
//! rename) after every change, so an agent restarted mid-incident knows
//! which tiers already ran and neither repeats nor forgets them. Every
//! action is also appended to `<state_dir>/audit.jsonl`.
//!
//! The state dir is private and the agent's own ([`statedir`]): a state
//! file the agent cannot trust (another uid's, writable by others, a
//! symlink) is moved aside and nothing in it is resumed, because resuming
//! an incident signals the pid and start time it names.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::{
    response::statedir,
    serve::metrics::FileLabels,
    sys::{cgroup::PinnedCgroup, procinfo},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Confirmed; escalation not started (observe-only actors stay here until the end).
    Open,
    /// Working through the policy's tiers.
    Escalating,
    /// Waiting for an escalation slot or the rate limit.
    Deferred,
    /// The loop ran again.
    Recovered,
    /// The actor exited (on its own or from a signal we sent).
    Exited,
    /// The ladder ran out and the actor is still alive.
    Failed,
}

impl Status {
    pub fn is_open(self) -> bool {
        matches!(self, Self::Open | Self::Escalating | Self::Deferred)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Index in the policy's tiers.
    pub tier: usize,
    pub action: String,
    /// ok, failed, skipped, dry_run, ignored (sent, but the kernel drops
    /// it: SIG_IGN, or a namespace init without a handler), not_permitted
    /// (not sent: the user who registered the actor may not signal it)
    pub outcome: String,
    pub detail: String,
    pub time: String,
    /// Unix ms of `time`, to resume an interrupted wait after a restart.
    #[serde(default)]
    pub unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub drops: u32,
    /// Undrained bytes in the wakeup fd at confirmation.
    pub fill: Option<u64>,
    pub wakeup_fd: Option<i32>,
    pub signals: Vec<String>,
    /// ms from first evidence (stop signal or drop) to confirmation.
    pub confirm_ms: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub id: u64,
    pub actor: String,
    pub pid: u32,
    pub start_time: u64,
    pub runtime: String,
    /// None: observe only.
    pub policy: Option<String>,
    pub dry_run: bool,
    pub status: Status,
    pub opened: String,
    pub closed: Option<String>,
    pub evidence: Evidence,
    pub steps: Vec<Step>,
    /// Next tier to run; tiers before it are done.
    pub next_tier: usize,
    /// Descendants pinned when escalation started, for the subtree tier.
    #[serde(default)]
    pub subtree: Vec<(u32, u64)>,
    /// Descendants the registrant could not signal when escalation
    /// started: never pinned, never killed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subtree_not_permitted: Vec<(u32, u64)>,
    /// The actor's cgroup v2, pinned by inode when escalation started, for
    /// the subtree tier's cgroup.kill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PinnedCgroup>,
    /// uid of the client that registered the actor; the ladder signals
    /// only what that uid could (kill(2)'s rule). None: root or the agent's
    /// own config.
    #[serde(default)]
    pub registered_by: Option<u32>,
    #[serde(default)]
    pub first_evidence_mono: u64,
    #[serde(default)]
    pub confirmed_mono: u64,
}

pub struct Store {
    dir: PathBuf,
    incidents: BTreeMap<u64, Incident>,
    next_id: u64,
    clock: procinfo::Clock,
    /// Failed writes of `incidents.json` and `audit.jsonl`, by file
    /// (`sigwake_state_write_errors_total`); detached until
    /// [`Store::count_write_errors_in`].
    write_errors: Family<FileLabels, Counter>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory is not usable.
    #[error("state directory {dir}: {source}; give a writable one with --state-dir")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state directory is not private to the agent.
    #[error(transparent)]
    Untrusted(#[from] statedir::StateDirError),
}

const KEEP_CLOSED: usize = 500;

impl Store {
    /// Counts failed writes of the state files in `family` (the agent's
    /// `sigwake_state_write_errors_total`).
    pub fn count_write_errors_in(&mut self, family: Family<FileLabels, Counter>) {
        // Both at 0 from the start: an alert can tell "none" from "no data".
        for file in ["incidents", "audit"] {
            let _ = family.get_or_create(&FileLabels { file: file.into() });
        }
        self.write_errors = family;
    }

    /// Opens the store, reading incidents a previous run left. The state
    /// dir is made private first (or refused: [`statedir::prepare`]). A
    /// corrupt file, or one the agent cannot trust, is moved aside (never
    /// silently lost) and the store starts empty.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        if let Some(warning) = statedir::prepare(dir)? {
            tracing::warn!("{warning}");
        }
        let path = dir.join("incidents.json");
        let mut incidents = BTreeMap::new();
        let aside = |why: &str| {
            let aside = dir.join(format!("incidents.json.{why}-{}", procinfo::realtime_ns()));
            let _ = std::fs::rename(&path, &aside);
            aside
        };
        match statedir::open_trusted(&path) {
            Ok(Some(mut file)) => {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes).map_err(|source| StoreError::Dir { dir: dir.into(), source })?;
                match serde_json::from_slice::<Vec<Incident>>(&bytes) {
                    Ok(list) => incidents.extend(list.into_iter().map(|i| (i.id, i))),
                    Err(e) => {
                        let aside = aside("corrupt");
                        tracing::error!(
                            "{} is not valid ({e}); moved to {} and starting empty",
                            path.display(),
                            aside.display()
                        );
                    }
                }
            }
            Ok(None) => {}
            Err(statedir::Untrusted::Io(source)) => return Err(StoreError::Dir { dir: dir.into(), source }),
            Err(why) => {
                let aside = aside("untrusted");
                tracing::error!(
                    "{} cannot be trusted: {why}. Someone other than the agent may have written it, and resuming \
                     its incidents would signal the processes it names: none is resumed; moved to {} and starting \
                     empty",
                    path.display(),
                    aside.display()
                );
            }
        }
        let next_id = incidents.keys().next_back().map_or(1, |k| k + 1);
        Ok(Store {
            dir: dir.to_path_buf(),
            incidents,
            next_id,
            clock: procinfo::Clock::now(),
            write_errors: Family::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn now(&self) -> String {
        self.clock.rfc3339(procinfo::monotonic_ns())
    }

    pub fn get(&self, id: u64) -> Option<&Incident> {
        self.incidents.get(&id)
    }

    pub fn all(&self) -> impl DoubleEndedIterator<Item = &Incident> {
        self.incidents.values()
    }

    /// The open incident of this process, if any.
    pub fn open_for(&self, pid: u32, start_time: u64) -> Option<&Incident> {
        self.incidents.values().find(|i| i.pid == pid && i.start_time == start_time && i.status.is_open())
    }

    pub fn active_count(&self) -> usize {
        self.incidents.values().filter(|i| i.status.is_open()).count()
    }

    pub fn create(&mut self, mut incident: Incident) -> u64 {
        incident.id = self.next_id;
        self.next_id += 1;
        let id = incident.id;
        // Saved before it is logged, here and for every step: an agent
        // killed in between then finds the incident (or the step) in its
        // state and neither loses it nor does it twice; at worst the audit
        // log misses that one line.
        self.incidents.insert(id, incident.clone());
        self.save();
        self.audit(
            &incident,
            "opened",
            None,
            "ok",
            &format!(
                "starving: {} drops, fill {:?}, confirmed after {:.0} ms",
                incident.evidence.drops, incident.evidence.fill, incident.evidence.confirm_ms
            ),
        );
        id
    }

    /// Applies `f` to incident `id` and persists.
    pub fn update(&mut self, id: u64, f: impl FnOnce(&mut Incident)) {
        if let Some(i) = self.incidents.get_mut(&id) {
            f(i);
        }
        self.save();
    }

    /// Records a step: appended to the incident and the audit log. A
    /// closed incident takes no more steps.
    pub fn record_step(&mut self, id: u64, tier: usize, action: &str, outcome: &str, detail: &str) {
        let time = self.now();
        let Some(i) = self.incidents.get_mut(&id).filter(|i| i.status.is_open()) else { return };
        let unix_ms = procinfo::realtime_ns() / 1_000_000;
        i.steps.push(Step {
            tier,
            action: action.into(),
            outcome: outcome.into(),
            detail: detail.into(),
            time,
            unix_ms,
        });
        i.next_tier = i.next_tier.max(tier + 1);
        let snapshot = i.clone();
        self.save();
        self.audit(&snapshot, action, Some(tier), outcome, detail);
    }

    /// Closes an open incident; false if it was closed already.
    pub fn close(&mut self, id: u64, status: Status, detail: &str) -> bool {
        let now = self.now();
        let Some(i) = self.incidents.get_mut(&id) else { return false };
        if !i.status.is_open() {
            return false;
        }
        i.status = status;
        i.closed = Some(now);
        let snapshot = i.clone();
        self.prune();
        self.save();
        let outcome = match status {
            Status::Failed => "failed",
            _ => "ok",
        };
        self.audit(
            &snapshot,
            &format!(
                "closed_{}",
                serde_json::to_value(status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
            ),
            None,
            outcome,
            detail,
        );
        true
    }

    fn prune(&mut self) {
        let closed: Vec<u64> = self.incidents.values().filter(|i| !i.status.is_open()).map(|i| i.id).collect();
        if closed.len() > KEEP_CLOSED {
            for id in &closed[..closed.len() - KEEP_CLOSED] {
                self.incidents.remove(id);
            }
        }
    }

    /// One JSON line per action: actor, evidence, tier, action, result, time.
    fn audit(&self, i: &Incident, action: &str, tier: Option<usize>, outcome: &str, detail: &str) {
        let line = serde_json::json!({
            "time": self.now(),
            "incident": i.id,
            "actor": i.actor,
            "pid": i.pid,
            "start_time": i.start_time,
            "runtime": i.runtime,
            "policy": i.policy,
            "dry_run": i.dry_run,
            "tier": tier,
            "action": action,
            "outcome": outcome,
            "detail": detail,
            "evidence": i.evidence,
        });
        let path = self.dir.join("audit.jsonl");
        // One write(2) of the whole line (O_APPEND): writeln! on the file
        // wrote a JSON value piece by piece, so a reader could see half a
        // line and an agent killed mid-line left one in the log.
        let text = format!("{line}\n");
        let res =
            crate::app::blocking(|| statedir::append_private(&path).and_then(|mut f| f.write_all(text.as_bytes())));
        if let Err(e) = res {
            self.write_errors.get_or_create(&FileLabels { file: "audit".into() }).inc();
            tracing::error!(
                "cannot append to the audit log {}: {e}; escalation goes on, but this action ({action} of incident \
                 {}) is not in the log: free space or make the state directory writable",
                path.display(),
                i.id
            );
        }
    }

    fn save(&self) {
        let path = self.dir.join("incidents.json");
        let list: Vec<&Incident> = self.incidents.values().collect();
        // Written and synced before the caller goes on (a restarted agent
        // must never repeat a tier it already ran), off the async workers.
        let res = serde_json::to_vec_pretty(&list)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::app::blocking(|| statedir::replace_private(&self.dir, "incidents.json", &bytes)));
        if let Err(e) = res {
            self.write_errors.get_or_create(&FileLabels { file: "incidents".into() }).inc();
            tracing::error!(
                "cannot save incidents to {}: {e}; detection and escalation go on, but an agent restarted now \
                 would not know what was done since the last save (it could repeat a tier): free space or make \
                 the state directory writable",
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn incident(pid: u32) -> Incident {
        Incident {
            id: 0,
            actor: "fetcher".into(),
            pid,
            start_time: 42,
            runtime: "trio".into(),
            policy: Some("default".into()),
            dry_run: false,
            status: Status::Open,
            opened: "t".into(),
            closed: None,
            evidence: Evidence {
                drops: 3,
                fill: Some(6),
                wakeup_fd: Some(7),
                signals: vec!["SIGINT".into()],
                confirm_ms: 2000.0,
            },
            steps: vec![],
            next_tier: 0,
            subtree: vec![],
            subtree_not_permitted: vec![],
            cgroup: None,
            registered_by: None,
            first_evidence_mono: 0,
            confirmed_mono: 0,
        }
    }

    #[test]
    fn survives_a_restart_with_steps_and_next_tier() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let id = s.create(incident(10));
        s.update(id, |i| i.status = Status::Escalating);
        s.record_step(id, 0, "diagnostics", "ok", "captured");
        s.record_step(id, 1, "sigterm", "ok", "sent");
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let i = s.open_for(10, 42).expect("open incident after restart");
        assert_eq!((i.id, i.next_tier, i.steps.len(), i.status), (id, 2, 2, Status::Escalating));
        assert!(s.open_for(10, 43).is_none(), "other start time: other process");
        let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["action"], "sigterm");
        assert_eq!(lines[2]["tier"], 1);
        assert_eq!(lines[2]["actor"], "fetcher");
        assert_eq!(lines[2]["evidence"]["drops"], 3);
    }

    #[test]
    fn ids_continue_after_restart_and_closing_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let a = s.create(incident(1));
        assert!(s.close(a, Status::Recovered, "drained"));
        assert!(!s.close(a, Status::Failed, "late"));
        s.record_step(a, 3, "sigkill", "ok", "after close");
        assert!(s.get(a).unwrap().steps.is_empty(), "no steps after close");
        assert_eq!(s.get(a).unwrap().status, Status::Recovered);
        drop(s);
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.create(incident(2)), a + 1);
        assert_eq!(s.active_count(), 1);
    }

    #[test]
    fn a_corrupt_file_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("incidents.json"), b"{nope").unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.all().count(), 0);
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("incidents.json.corrupt-"));
        assert!(aside);
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_state_dir_and_files_are_private_whatever_the_umask() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        statedir::tests::with_umask_0(|| {
            let mut s = Store::open(&dir).unwrap();
            s.create(incident(10));
        });
        assert_eq!(mode(&dir), 0o700, "the state dir");
        assert_eq!(mode(&dir.join("incidents.json")), 0o600);
        assert_eq!(mode(&dir.join("audit.jsonl")), 0o600);
    }

    #[test]
    fn an_existing_state_dir_readable_by_others_is_tightened() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Store::open(tmp.path()).unwrap();
        assert_eq!(mode(tmp.path()), 0o700);
    }

    #[test]
    fn a_state_dir_writable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Store::open(tmp.path()).err().expect("refused");
        assert!(err.to_string().contains("group or others can write it"), "{err}");
    }

    /// A state file another uid owns, or group/others may write, is not
    /// resumed: it would name the process the agent goes on signalling.
    /// It is moved aside, not deleted.
    #[test]
    fn a_state_file_the_agent_cannot_trust_is_not_resumed() {
        use std::os::unix::fs::PermissionsExt as _;
        let planted = serde_json::to_vec(&vec![Incident { id: 7, ..incident(1) }]).unwrap();
        type Plant = fn(&Path);
        let cases: [(&str, Plant); 3] = [
            ("owned by nobody", |p| std::os::unix::fs::chown(p, Some(65534), None).expect("chown (run as root)")),
            ("world-writable", |p| std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).unwrap()),
            ("a symlink", |p| {
                let target = p.with_file_name("elsewhere.json");
                std::fs::rename(p, &target).unwrap();
                std::os::unix::fs::symlink(&target, p).unwrap();
            }),
        ];
        for (what, plant) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("incidents.json");
            std::fs::write(&path, &planted).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            plant(&path);
            let s = Store::open(tmp.path()).unwrap();
            assert!(s.open_for(1, 42).is_none(), "{what}: the planted incident must not be resumed");
            assert_eq!(s.all().count(), 0, "{what}");
            let aside = std::fs::read_dir(tmp.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("incidents.json.untrusted-"));
            assert!(aside, "{what}: moved aside, not lost");
        }
    }

    /// The old fixed temporary name, planted as a symlink, is not followed.
    #[test]
    fn saving_never_writes_through_a_planted_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious\n").unwrap();
        let dir = tmp.path().join("state");
        let mut s = Store::open(&dir).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("incidents.json.tmp")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("audit.jsonl")).unwrap();
        let id = s.create(incident(10));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n", "the symlinks' target is untouched");
        drop(s);
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.get(id).map(|i| i.pid), Some(10), "saved all the same");
        assert!(std::fs::symlink_metadata(dir.join("audit.jsonl")).unwrap().file_type().is_symlink());
    }
}
