//! Escalation engine: finishes the stop a lost signal asked for.
//!
//! For each confirmed starvation it opens an incident and, if the actor
//! has a policy, walks the policy's tiers (diagnostics → SIGTERM → SIGKILL
//! → subtree → notify), each with a timeout. Rules it never breaks:
//! - every signal goes through a pidfd opened *after* re-checking the
//!   process's start time, never to a bare pid;
//! - it stops the moment the actor recovers or exits;
//! - actors without a policy (auto-discovered ones) are only observed;
//! - dry-run sends nothing; a global rate limit and a cap on concurrent
//!   escalations bound what it can do at once;
//! - progress is persisted per tier, so a restarted agent resumes an
//!   incident without repeating what was done.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;

use crate::{
    actors::registry::{self, ActorState, Registry},
    config::{Action, Config, EscalationLimits, Policy},
    lock,
    response::diagnostics::{self, CaptureOptions},
    response::incidents::{Evidence, Incident, Status, Store},
    response::{notify, subtree},
    serve::metrics::{EscalationLabels, Metrics, StageLabels},
    sys::cgroup::PinnedCgroup,
    sys::pidfd::{PidfdError, ProcessHandle},
    sys::procinfo,
};

/// Sliding one-minute window of actions: signals, subtree kills and
/// notifications.
struct RateLimit {
    per_minute: u32,
    sent: VecDeque<Instant>,
}

impl RateLimit {
    fn try_take(&mut self) -> bool {
        let now = Instant::now();
        while self.sent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
            self.sent.pop_front();
        }
        if self.sent.len() < self.per_minute as usize {
            self.sent.push_back(now);
            true
        } else {
            false
        }
    }
}

pub struct Engine {
    pub store: Arc<Mutex<Store>>,
    registry: Arc<Mutex<Registry>>,
    metrics: Arc<Metrics>,
    policies: BTreeMap<String, Policy>,
    dry_run: bool,
    slots: Arc<Semaphore>,
    rate: Mutex<RateLimit>,
    /// incident id → cancel flag of its running ladder.
    running: Mutex<HashMap<u64, Arc<AtomicBool>>>,
}

/// What the detector confirmed.
pub struct Confirmation {
    pub pid: u32,
    pub first_evidence_ns: u64,
    pub confirmed_ns: u64,
    pub drops: u32,
    pub fill: Option<u64>,
    pub signals: Vec<String>,
}

impl Engine {
    pub fn new(
        config: &Config,
        mut store: Store,
        registry: Arc<Mutex<Registry>>,
        metrics: Arc<Metrics>,
    ) -> Arc<Engine> {
        let EscalationLimits { max_concurrent, max_actions_per_minute } = config.limits;
        store.count_write_errors_in(metrics.state_write_errors.clone());
        Arc::new(Engine {
            store: Arc::new(Mutex::new(store)),
            registry,
            metrics,
            policies: config.policies.clone(),
            dry_run: config.dry_run,
            slots: Arc::new(Semaphore::new(max_concurrent)),
            rate: Mutex::new(RateLimit { per_minute: max_actions_per_minute, sent: VecDeque::new() }),
            running: Mutex::new(HashMap::new()),
        })
    }

    fn refresh_active(&self) {
        self.metrics.incidents_active.set(lock(&self.store).active_count() as i64);
    }

    /// Opens an incident for a confirmed starvation and starts its ladder.
    pub fn on_confirmed(self: &Arc<Self>, c: Confirmation) {
        let (actor, incident) = {
            let reg = lock(&self.registry);
            let Some(a) = reg.get(c.pid) else { return };
            if lock(&self.store).open_for(a.pid, a.start_time).is_some() {
                return;
            }
            let incident = Incident {
                id: 0,
                actor: a.name.clone(),
                pid: a.pid,
                start_time: a.start_time,
                runtime: a.runtime.as_str().into(),
                policy: a.policy.clone(),
                dry_run: self.dry_run,
                status: Status::Open,
                opened: lock(&self.store).now(),
                closed: None,
                evidence: Evidence {
                    drops: c.drops,
                    fill: c.fill,
                    wakeup_fd: a.wakeup_fd,
                    signals: c.signals.clone(),
                    confirm_ms: c.confirmed_ns.saturating_sub(c.first_evidence_ns) as f64 / 1e6,
                },
                steps: vec![],
                next_tier: 0,
                subtree: vec![],
                subtree_not_permitted: vec![],
                cgroup: None,
                registered_by: a.registered_by,
                first_evidence_mono: c.first_evidence_ns,
                confirmed_mono: c.confirmed_ns,
            };
            (a.clone(), incident)
        };
        self.metrics
            .starvation_incidents
            .get_or_create(&crate::serve::metrics::ActorRuntimeLabels {
                actor: self.metrics.actor_labels.label(Some(&actor.name)),
                runtime: actor.runtime.as_str().into(),
            })
            .inc();
        self.metrics
            .detection_latency
            .get_or_create(&StageLabels { stage: "confirm".into() })
            .observe(incident.evidence.confirm_ms / 1e3);
        let id = lock(&self.store).create(incident);
        tracing::warn!(
            actor = actor.name,
            pid = actor.pid,
            incident = id,
            "starvation confirmed: the event loop did not run within the confirm window after a stop signal"
        );
        lock(&self.registry).set_state(actor.pid, ActorState::Starving);
        self.refresh_active();
        if actor.policy.is_some() {
            self.spawn_ladder(id);
        } else {
            tracing::info!(
                actor = actor.name,
                "no policy: observing only (give it one with a selector or at registration)"
            );
        }
    }

    /// The loop ran again: stop escalating and close the incident.
    pub fn on_recovered(&self, pid: u32) {
        self.finish(pid, Status::Recovered, "the event loop ran again (wakeup fd drained)");
        lock(&self.registry).set_state(pid, ActorState::Healthy);
    }

    /// The client that registered the actor may no longer signal it (an
    /// exec made it another user's process): any escalation stops, and its
    /// incident is closed as failed, saying why.
    pub fn on_rights_lost(&self, pid: u32, why: &str) {
        self.finish(pid, Status::Failed, &format!("escalation stopped: {why}"));
    }

    /// The process exited.
    pub fn on_exited(&self, pid: u32) {
        self.finish(pid, Status::Exited, "the actor exited");
    }

    /// Ends the open incidents of `pid`. On recovery a running ladder is
    /// cancelled. On exit a running ladder is left to close its incident
    /// itself (it sees the exit through its pidfd within 20 ms), so that
    /// the step that ended the actor is recorded before the close.
    fn finish(&self, pid: u32, status: Status, detail: &str) {
        let open: Vec<u64> =
            lock(&self.store).all().filter(|i| i.pid == pid && i.status.is_open()).map(|i| i.id).collect();
        for id in open {
            let running = lock(&self.running).get(&id).cloned();
            match (status, running) {
                (Status::Exited, Some(_)) => continue,
                (_, Some(flag)) => {
                    flag.store(true, Ordering::Release);
                    lock(&self.running).remove(&id);
                }
                (_, None) => {}
            }
            self.close(id, status, detail);
        }
        self.refresh_active();
    }

    /// Closes an incident once, recording its duration.
    fn close(&self, id: u64, status: Status, detail: &str) {
        let mut store = lock(&self.store);
        let Some(i) = store.get(id).cloned() else { return };
        if store.close(id, status, detail) {
            let secs = procinfo::monotonic_ns().saturating_sub(i.first_evidence_mono) as f64 / 1e9;
            self.metrics
                .starvation_duration
                .get_or_create(&crate::serve::metrics::RuntimeLabels { runtime: i.runtime.clone() })
                .observe(secs);
        }
    }

    /// After a restart: resume open incidents whose process is still the
    /// same one, close the others. Returns the resumed actors (pid,
    /// runtime) for the detector to watch for recovery again.
    pub fn resume(self: &Arc<Self>) -> Vec<(u32, crate::actors::registry::Runtime)> {
        let mut resumed = Vec::new();
        let open: Vec<Incident> = lock(&self.store).all().filter(|i| i.status.is_open()).cloned().collect();
        for i in open {
            match ProcessHandle::open(i.pid, Some(i.start_time)) {
                Ok(_) => {
                    let runtime: Option<crate::actors::registry::Runtime> =
                        serde_json::from_value(serde_json::Value::String(i.runtime.clone())).ok();
                    let spec = crate::actors::registry::ActorSpec {
                        pid: Some(i.pid),
                        name: Some(i.actor.clone()),
                        policy: i.policy.clone(),
                        wakeup_fd: i.evidence.wakeup_fd,
                        runtime,
                        ..Default::default()
                    };
                    let facts = crate::actors::registry::read_facts(&crate::actors::registry::RealProc, &spec, None);
                    let restored =
                        lock(&self.registry).upsert(&spec, crate::actors::registry::Source::Socket, None, facts);
                    if let Err(e) = restored {
                        tracing::warn!("incident {}: cannot restore actor {}: {e}", i.id, i.actor);
                        continue;
                    }
                    {
                        let mut reg = lock(&self.registry);
                        // Still bounded by what its registrant may signal.
                        if let Some(a) = reg.get_mut(i.pid) {
                            a.registered_by = i.registered_by;
                        }
                        reg.set_state(i.pid, ActorState::Starving);
                    }
                    tracing::warn!(
                        incident = i.id,
                        actor = i.actor,
                        next_tier = i.next_tier,
                        "resuming an incident from before the restart"
                    );
                    resumed.push((i.pid, runtime.unwrap_or(crate::actors::registry::Runtime::Unknown)));
                    if i.policy.is_some() {
                        self.spawn_ladder(i.id);
                    }
                }
                Err(_) => {
                    self.close(i.id, Status::Exited, "the actor was gone when the agent restarted");
                }
            }
        }
        self.refresh_active();
        resumed
    }

    fn spawn_ladder(self: &Arc<Self>, id: u64) {
        let cancel = Arc::new(AtomicBool::new(false));
        lock(&self.running).insert(id, cancel.clone());
        let engine = self.clone();
        tokio::spawn(async move {
            engine.ladder(id, cancel).await;
        });
    }

    fn count(&self, actor: &str, tier: usize, action: &str, outcome: &str) {
        self.metrics
            .escalation_actions
            .get_or_create(&EscalationLabels {
                actor: self.metrics.actor_labels.label(Some(actor)),
                tier: tier.to_string(),
                action: action.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    fn step(&self, i: &Incident, tier: usize, action: &str, outcome: &str, detail: &str) {
        if i.steps.is_empty() {
            let since = procinfo::monotonic_ns().saturating_sub(i.confirmed_mono) as f64 / 1e9;
            self.metrics.detection_latency.get_or_create(&StageLabels { stage: "action".into() }).observe(since);
        }
        tracing::warn!(incident = i.id, actor = i.actor, tier, action, outcome, "{detail}");
        self.count(&i.actor, tier, action, outcome);
        lock(&self.store).record_step(i.id, tier, action, outcome, detail);
    }

    async fn ladder(self: Arc<Self>, id: u64, cancel: Arc<AtomicBool>) {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                lock(&self.store).update(id, |i| i.status = Status::Deferred);
                match self.slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        let _permit = permit;
        if cancel.load(Ordering::Acquire) {
            return;
        }
        let Some(mut inc) = lock(&self.store).get(id).cloned() else { return };
        let Some(policy) = inc.policy.as_ref().and_then(|p| self.policies.get(p)).cloned() else {
            self.close(
                id,
                Status::Failed,
                &format!("policy {:?} is not defined in this agent's configuration", inc.policy),
            );
            lock(&self.running).remove(&id);
            return;
        };
        lock(&self.store).update(id, |i| i.status = Status::Escalating);
        lock(&self.registry).set_state(inc.pid, ActorState::Escalating);
        // Pin the subtree now, while the actor is alive and its children
        // are still its children.
        // Only what the registrant could signal (kill(2)'s rule).
        if inc.subtree.is_empty() {
            let (pinned, refused) = subtree::pin(inc.pid, subtree::registrant(&inc));
            if !refused.is_empty() {
                tracing::warn!(
                    incident = id,
                    actor = inc.actor,
                    "not pinning {} descendants uid {:?}, which registered the actor, may not signal: {refused:?}",
                    refused.len(),
                    inc.registered_by
                );
            }
            // And its cgroup, by inode: never re-read from a pid later.
            let cgroup = crate::app::blocking(|| PinnedCgroup::of(inc.pid));
            lock(&self.store).update(id, |i| {
                i.subtree = pinned.clone();
                i.subtree_not_permitted = refused.clone();
                i.cgroup = cgroup.clone();
            });
            (inc.subtree, inc.subtree_not_permitted, inc.cgroup) = (pinned, refused, cgroup);
        }
        let has_subtree_tier = policy.tiers.iter().any(|t| matches!(t, Action::KillSubtree { .. }));
        // Resumed after a signal tier (agent restart): give the actor what
        // was left of that tier's wait before going further.
        if let Some(Action::Signal { timeout, .. } | Action::KillSubtree { timeout }) =
            inc.next_tier.checked_sub(1).and_then(|t| policy.tiers.get(t))
            && let Ok(h) = ProcessHandle::open(inc.pid, Some(inc.start_time))
            && self.wait_exit(&h, remaining_wait(&inc, *timeout), &cancel).await
        {
            let Some(now) = lock(&self.store).get(id).cloned() else { return };
            self.finish_exited(&now, &policy, has_subtree_tier, "during the resumed wait").await;
            return;
        }
        for tier in inc.next_tier..policy.tiers.len() {
            if cancel.load(Ordering::Acquire) {
                return;
            }
            let Some(current) = lock(&self.store).get(id).cloned() else { return };
            let handle = match ProcessHandle::open(inc.pid, Some(inc.start_time)) {
                Ok(h) => h,
                Err(e) => {
                    self.finish_exited(&current, &policy, has_subtree_tier, &format!("before tier {tier} ({e})")).await;
                    return;
                }
            };
            let action = &policy.tiers[tier];
            let name = action.name();
            // A user's actor is signalled only while that user could do it
            // (a set-uid program may have made it another user's since).
            if matches!(action, Action::Signal { .. } | Action::KillSubtree { .. })
                && let Some(why) = subtree::not_permitted(subtree::registrant(&current), inc.pid)
            {
                self.step(
                    &current,
                    tier,
                    name,
                    "not_permitted",
                    &format!("not sent: {why} (the uid that registered it)"),
                );
                self.close(id, Status::Failed, &format!("escalation stopped: {why} (the uid that registered it)"));
                lock(&self.running).remove(&id);
                self.refresh_active();
                return;
            }
            match action {
                Action::Diagnostics { py_spy } => {
                    let opts = CaptureOptions {
                        dir: lock(&self.store).dir().join("incidents").join(id.to_string()),
                        py_spy: *py_spy,
                        timeout: Duration::from_secs(10),
                    };
                    let (pid, fd) = (inc.pid, inc.evidence.wakeup_fd);
                    let result = tokio::task::spawn_blocking(move || diagnostics::capture(pid, fd, &opts)).await;
                    match result {
                        Ok(Ok(summary)) => {
                            let detail = serde_json::to_string(&summary).unwrap_or_default();
                            self.step(&current, tier, name, "ok", &detail);
                        }
                        Ok(Err(e)) => self.step(&current, tier, name, "failed", &e.to_string()),
                        Err(e) => self.step(&current, tier, name, "failed", &format!("capture task: {e}")),
                    }
                }
                Action::Signal { signal, timeout } => {
                    if !self.take_rate_token(id).await {
                        return;
                    }
                    // Intent first: a restart after this point does not
                    // resend. Only once the token is taken: the wait for
                    // it can last a minute, and an agent killed during it
                    // must still send this tier when it resumes, not skip it.
                    lock(&self.store).update(id, |i| i.next_tier = tier + 1);
                    let sig = crate::kernel::events::Signal(*signal);
                    // What the kernel will do with it, read just before
                    // sending (the pidfd pins the process). It is sent all
                    // the same: the process may change its mind meanwhile.
                    let dropped = procinfo::status(inc.pid).and_then(|st| registry::signal_dropped(&st, *signal));
                    let done = if self.dry_run {
                        Some((
                            "dry_run",
                            match &dropped {
                                Some(why) => {
                                    format!("would send {sig} through a pidfd; the kernel would drop it: {why}")
                                }
                                None => format!("would send {sig} through a pidfd"),
                            },
                        ))
                    } else {
                        match handle.send_signal(*signal) {
                            Ok(()) => Some(match &dropped {
                                Some(why) => (
                                    "ignored",
                                    format!(
                                        "sent {sig} through a pidfd, but the kernel drops it: {why}; on to the next \
                                         tier without waiting"
                                    ),
                                ),
                                None => ("ok", format!("sent {sig} through a pidfd")),
                            }),
                            Err(PidfdError::Exited { .. }) => None,
                            Err(e) => Some(("failed", e.to_string())),
                        }
                    };
                    if let Some((outcome, detail)) = done {
                        self.step(&current, tier, name, outcome, &detail);
                    }
                    // A signal the kernel drops cannot end the process: no wait.
                    let wait = if dropped.is_some() { Duration::ZERO } else { *timeout };
                    if self.wait_exit(&handle, wait, &cancel).await {
                        let Some(now) = lock(&self.store).get(id).cloned() else { return };
                        self.finish_exited(&now, &policy, has_subtree_tier, &format!("during the {name} wait")).await;
                        return;
                    }
                }
                Action::KillSubtree { timeout } => {
                    if !self.take_rate_token(id).await {
                        return;
                    }
                    // As for a signal: intent saved once the token is taken.
                    lock(&self.store).update(id, |i| i.next_tier = tier + 1);
                    let detail = subtree::kill(&current, Some(&handle), self.dry_run);
                    let outcome = if self.dry_run { "dry_run" } else { "ok" };
                    self.step(&current, tier, name, outcome, &detail);
                    if self.wait_exit(&handle, *timeout, &cancel).await {
                        let Some(now) = lock(&self.store).get(id).cloned() else { return };
                        // The subtree was just done (or, in a dry run, not).
                        self.finish_exited(&now, &policy, false, "during the kill_subtree wait").await;
                        return;
                    }
                }
                Action::Notify { command, url } => {
                    // A notification is an action too: rate-limited like a signal.
                    if !self.take_rate_token(id).await {
                        return;
                    }
                    let (outcome, detail) =
                        notify::notify(&current, command.as_deref(), url.as_deref(), self.dry_run).await;
                    self.step(&current, tier, name, outcome, &detail);
                }
            }
        }
        let Some(last) = lock(&self.store).get(id).cloned() else { return };
        if ProcessHandle::open(last.pid, Some(last.start_time)).is_ok_and(|h| h.is_alive()) {
            let detail = if self.dry_run {
                "dry run: nothing was sent; the actor is still starving"
            } else {
                "every tier ran and the actor is still alive"
            };
            self.close(id, Status::Failed, detail);
            self.count(&last.actor, policy.tiers.len(), "ladder", "failed");
        } else {
            self.finish_exited(&last, &policy, false, "after the last tier").await;
        }
        lock(&self.running).remove(&id);
        self.refresh_active();
    }

    async fn take_rate_token(&self, id: u64) -> bool {
        loop {
            if lock(&self.rate).try_take() {
                return true;
            }
            lock(&self.store).update(id, |i| i.status = Status::Deferred);
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !lock(&self.store).get(id).is_some_and(|i| i.status.is_open()) {
                return false;
            }
            lock(&self.store).update(id, |i| i.status = Status::Escalating);
        }
    }

    /// Polls the pidfd until the process exits, the timeout passes, or the
    /// incident is cancelled (recovery). True if it exited.
    async fn wait_exit(&self, handle: &ProcessHandle, timeout: Duration, cancel: &AtomicBool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !handle.is_alive() {
                return true;
            }
            if cancel.load(Ordering::Acquire) || Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The actor is gone (`when`: "during the sigterm wait", …): if a
    /// signal of ours reached it, finish the stop for the pinned subtree
    /// when the policy asks for it and close it as killed; else it exited
    /// by itself, and the record says so.
    async fn finish_exited(&self, inc: &Incident, policy: &Policy, has_subtree_tier: bool, when: &str) {
        // Only signals that took effect count: a dry-run step sent nothing,
        // an ignored one was dropped by the kernel.
        let acted = inc
            .steps
            .iter()
            .rev()
            .find(|s| s.outcome == "ok" && (s.action.starts_with("sig") || s.action == "kill_subtree"))
            .map(|s| s.action.clone());
        let we_acted = acted.is_some();
        let detail = match acted {
            Some(action) => format!("exited {when}, after {action}"),
            None if self.dry_run => format!("exited by itself {when} (dry run: nothing was sent)"),
            None => format!("exited by itself {when} (no signal of the agent's reached it)"),
        };
        let detail = detail.as_str();
        if has_subtree_tier && we_acted && !inc.subtree.is_empty() {
            let tier = policy.tiers.iter().position(|t| matches!(t, Action::KillSubtree { .. })).unwrap_or(0);
            let d = subtree::kill(inc, None, self.dry_run);
            let outcome = if self.dry_run { "dry_run" } else { "ok" };
            self.step(inc, tier, "kill_subtree", outcome, &format!("actor exited; finishing its subtree: {d}"));
        }
        if we_acted {
            self.close_killed(inc, policy, detail).await;
        } else {
            self.close(inc.id, Status::Exited, detail);
            lock(&self.running).remove(&inc.id);
            self.refresh_active();
        }
    }

    /// The actor is gone because of what we sent: run the policy's notify
    /// tiers that have not run yet (a final notify is how people hear of
    /// the kill), then close and mark the actor dead.
    async fn close_killed(&self, inc: &Incident, policy: &Policy, detail: &str) {
        let next = lock(&self.store).get(inc.id).map_or(inc.next_tier, |i| i.next_tier);
        for (tier, action) in policy.tiers.iter().enumerate().skip(next) {
            if let Action::Notify { command, url } = action {
                if !self.take_rate_token(inc.id).await {
                    break;
                }
                let current = lock(&self.store).get(inc.id).cloned().unwrap_or_else(|| inc.clone());
                let (outcome, detail) =
                    notify::notify(&current, command.as_deref(), url.as_deref(), self.dry_run).await;
                self.step(&current, tier, "notify", outcome, &detail);
            }
        }
        self.close(inc.id, Status::Exited, detail);
        lock(&self.registry).set_state(inc.pid, ActorState::Dead);
        lock(&self.running).remove(&inc.id);
        self.refresh_active();
    }
}

/// What is left of the wait after the incident's last step, measured on
/// the wall clock (the agent may have been down in between); none after a
/// signal the kernel dropped.
fn remaining_wait(inc: &Incident, timeout: Duration) -> Duration {
    let Some(last) = inc.steps.last().filter(|s| s.unix_ms > 0) else { return timeout };
    if last.outcome == "ignored" {
        return Duration::ZERO;
    }
    let elapsed_ms = (procinfo::realtime_ns() / 1_000_000).saturating_sub(last.unix_ms);
    timeout.saturating_sub(Duration::from_millis(elapsed_ms))
}

#[cfg(test)]
mod tests;
