//! Actor registry: who each event belongs to.
//!
//! An actor is a supervised process, identified by pid *and* start time:
//! a pid that is reused never inherits an entry. Entries come from the
//! registration socket, config selectors, tractor command lines and
//! auto-discovery; the watched set is mirrored into the kernel's
//! WATCHED_PIDS map through [`WatchedSink`]. The registry does no I/O:
//! callers read a process's [`ProcFacts`] first. The actor types live in
//! `model.rs` and the /proc facts in `identity.rs`; both are re-exported
//! here, the registry being their one user-facing home.

use std::collections::{HashMap, VecDeque};

pub use super::{identity::*, model::*};
use crate::{
    kernel::{
        events::{Event, EventBody, Signal},
        pipe_hooks::ActorWakeup,
    },
    sys::procinfo,
};

/// Where the registry mirrors its watched set (the kernel map; a fake in tests).
pub trait WatchedSink: Send {
    fn watch(&mut self, pid: u32);
    fn unwatch(&mut self, pid: u32);
}

/// A sink that does nothing (trace-only use, tests).
pub struct NoSink;
impl WatchedSink for NoSink {
    fn watch(&mut self, _: u32) {}
    fn unwatch(&mut self, _: u32) {}
}

pub const MAX_NAME: usize = 128;
/// Exited actors kept for the record at most.
const MAX_HISTORY: usize = 4096;
pub const MAX_LABELS: usize = 32;

fn validate(spec: &ActorSpec) -> Result<(), RegistryError> {
    if let Some(name) = &spec.name
        && (name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control))
    {
        return Err(RegistryError::Invalid(format!("name must be 1-{MAX_NAME} printable characters")));
    }
    if let Some(labels) = &spec.labels
        && (labels.len() > MAX_LABELS || labels.iter().any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 256))
    {
        return Err(RegistryError::Invalid(format!(
            "at most {MAX_LABELS} labels, keys 1-64 bytes, values up to 256 bytes"
        )));
    }
    if let Some(p) = &spec.policy
        && (p.is_empty() || p.len() > 64)
    {
        return Err(RegistryError::Invalid("policy name must be 1-64 bytes".into()));
    }
    if spec.wakeup_fd.is_some_and(|fd| fd < 0) {
        return Err(RegistryError::Invalid("wakeup_fd must be >= 0".into()));
    }
    Ok(())
}

/// A socket registration dropped because its registrant may no longer
/// signal the process ([`Registry::recheck_registrant`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub pid: u32,
    pub name: String,
    pub registrant: u32,
    /// The process's real, effective and saved uids now.
    pub uids: [u32; 3],
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "actor `{}` (pid {}) was registered by uid {}, which may no longer signal it: its real, effective and \
             saved uids are now {:?} (it exec'd a set-uid program?); registration dropped, observed only",
            self.name, self.pid, self.registrant, self.uids
        )
    }
}

pub struct Registry {
    /// Live actors by pid.
    actors: HashMap<u32, Actor>,
    /// Exited and dead actors, kept for the record (`retain_exited_ns`);
    /// separate so that a reused pid can never overwrite or inherit them.
    history: VecDeque<Actor>,
    sink: Box<dyn WatchedSink>,
    clock: procinfo::Clock,
    max_actors: usize,
    /// Exited/dead entries are kept this long for the record.
    retain_exited_ns: u64,
    /// (pid, fd) of wakeup fds learned since the caller last asked, so it
    /// can note what each refers to (I/O, outside the lock).
    learned: Vec<(u32, i32)>,
    /// Moves whenever the set of live actors, a runtime or a wakeup fd may
    /// have changed: whoever derives something from those (which kernel
    /// hooks are needed) recomputes only then.
    generation: u64,
}

impl Registry {
    pub fn new(sink: Box<dyn WatchedSink>, max_actors: usize) -> Self {
        Registry {
            actors: HashMap::new(),
            history: VecDeque::new(),
            sink,
            clock: procinfo::Clock::now(),
            max_actors,
            retain_exited_ns: 300_000_000_000,
            learned: Vec::new(),
            generation: 0,
        }
    }

    /// See the field: compare with an earlier value to tell whether live
    /// actors, runtimes or wakeup fds may have changed since.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Each live actor's wakeup: runtime and wakeup fd (if known).
    pub fn wakeups(&self) -> Vec<ActorWakeup> {
        self.actors
            .values()
            .filter(|a| a.state.is_live())
            .map(|a| ActorWakeup {
                pid: a.pid,
                start_time: a.start_time,
                name: a.name.clone(),
                runtime: a.runtime,
                wakeup_fd: a.wakeup_fd,
            })
            .collect()
    }

    fn now(&self) -> (u64, String) {
        let mono = procinfo::monotonic_ns();
        (mono, self.clock.rfc3339(mono))
    }

    /// The live actor for `pid`, if any.
    pub fn get(&self, pid: u32) -> Option<&Actor> {
        self.actors.get(&pid).filter(|a| a.state.is_live())
    }

    pub fn get_mut(&mut self, pid: u32) -> Option<&mut Actor> {
        self.actors.get_mut(&pid).filter(|a| a.state.is_live())
    }

    pub fn name_of(&self, pid: u32) -> Option<&str> {
        self.get(pid).map(|a| a.name.as_str())
    }

    /// Live actors, then the record of exited ones.
    pub fn all(&self) -> impl Iterator<Item = &Actor> {
        self.actors.values().chain(self.history.iter())
    }

    pub fn len_live(&self) -> usize {
        self.actors.len()
    }

    /// Moves a live actor to the record with its final state.
    fn retire(&mut self, pid: u32, state: ActorState, mono: u64, now: String) -> Option<&Actor> {
        let mut actor = self.actors.remove(&pid)?;
        self.generation += 1;
        actor.state = state;
        actor.last_seen = now;
        actor.last_seen_mono = mono;
        self.sink.unwatch(pid);
        if self.history.len() >= MAX_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(actor);
        self.history.back()
    }

    /// Actors `caller` may see: those it could signal.
    pub fn visible_to(&self, caller: Caller) -> Vec<Actor> {
        let mut v: Vec<Actor> = self.all().filter(|a| caller.uid == 0 || a.uid == caller.uid).cloned().collect();
        v.sort_by_key(|a| a.pid);
        v
    }

    /// Adds or refreshes an actor. `caller` is `None` for the agent's own
    /// sources (selectors, tractor, discovery). `facts` are the process's,
    /// read by the caller from /proc *before* taking any lock on the
    /// registry ([`read_facts`]): the registry itself does no I/O.
    pub fn upsert(
        &mut self,
        spec: &ActorSpec,
        source: Source,
        caller: Option<Caller>,
        facts: Option<ProcFacts>,
    ) -> Result<Actor, RegistryError> {
        validate(spec)?;
        self.generation += 1;
        let pid = spec.target_pid(caller).ok_or_else(|| RegistryError::Invalid("pid is required".into()))?;
        let facts = facts.ok_or(RegistryError::NoSuchProcess(pid))?;
        if let Some(c) = caller
            && !may_signal(c.uid, &facts)
        {
            return Err(RegistryError::NotPermitted { pid, caller_uid: c.uid });
        }
        let (mono, now) = self.now();
        // Same pid, other start time: the old process is gone and its pid
        // reused. The old entry goes to the record, never inherited.
        if self.actors.get(&pid).is_some_and(|old| old.start_time != facts.start_time) {
            self.retire(pid, ActorState::Exited, mono, now.clone());
        }
        let parent_pid = spec.parent.or(Some(facts.ppid)).filter(|p| *p > 1);
        let parent = parent_pid.and_then(|p| self.name_of(p).map(str::to_string));
        if let Some(existing) = self.actors.get_mut(&pid).filter(|a| a.state.is_live()) {
            if source == Source::Socket && existing.source == Source::Socket {
                let by = existing.registered_by;
                if caller.is_some_and(|c| Some(c.uid) != by && c.uid != 0) {
                    return Err(RegistryError::AlreadyRegistered { pid, name: existing.name.clone() });
                }
            }
            if source.rank() >= existing.source.rank() {
                if let Some(n) = &spec.name {
                    existing.name = n.clone();
                }
                if spec.policy.is_some() {
                    existing.policy = spec.policy.clone();
                } else if source == Source::Socket && existing.policy.is_none() {
                    // Registering opts in to the default policy, whoever saw the process first.
                    existing.policy = Some("default".to_string());
                }
                existing.source = source;
                if source == Source::Socket {
                    existing.registered_by = caller.map(|c| c.uid);
                }
            }
            if let Some(r) = spec.runtime {
                existing.runtime = r;
            }
            if let Some(l) = &spec.labels {
                existing.labels = l.clone();
            }
            if let Some(fd) = spec.wakeup_fd {
                existing.wakeup_fd = Some(fd);
                self.learned.push((pid, fd));
            }
            if parent.is_some() {
                existing.parent = parent;
                existing.parent_pid = parent_pid;
            }
            existing.last_seen = now;
            existing.last_seen_mono = mono;
            return Ok(existing.clone());
        }
        if self.len_live() >= self.max_actors {
            return Err(RegistryError::Full(self.max_actors));
        }
        let actor = Actor {
            // Unnamed: its comm. The name is the metric label too, so it
            // never carries a pid (unbounded label values); /actors shows
            // the pid beside it.
            name: spec.name.clone().unwrap_or_else(|| facts.comm.clone()),
            pid,
            start_time: facts.start_time,
            uid: facts.uids[0],
            runtime: spec.runtime.unwrap_or(Runtime::Unknown),
            parent,
            parent_pid,
            // A client that registers opts in to the default policy;
            // other sources observe only unless a selector names one.
            policy: spec.policy.clone().or_else(|| (source == Source::Socket).then(|| "default".to_string())),
            labels: spec.labels.clone().unwrap_or_default(),
            wakeup_fd: spec.wakeup_fd,
            source,
            registered_by: if source == Source::Socket { caller.map(|c| c.uid) } else { None },
            state: ActorState::Healthy,
            first_seen: now.clone(),
            last_seen: now,
            last_seen_mono: mono,
            drops: 0,
            recent_drops: VecDeque::new(),
        };
        self.sink.watch(pid);
        if let Some(fd) = actor.wakeup_fd {
            self.learned.push((pid, fd));
        }
        self.actors.insert(pid, actor.clone());
        Ok(actor)
    }

    /// Removes a socket registration (the caller must be allowed to signal it).
    pub fn deregister(&mut self, pid: u32, caller: Caller) -> Result<(), RegistryError> {
        let Some(actor) = self.get(pid) else { return Err(RegistryError::NotRegistered(pid)) };
        if caller.uid != 0 && caller.uid != actor.uid && Some(caller.uid) != actor.registered_by {
            return Err(RegistryError::NotPermitted { pid, caller_uid: caller.uid });
        }
        self.actors.remove(&pid);
        self.generation += 1;
        self.sink.unwatch(pid);
        Ok(())
    }

    /// For the socket's `update`: the actor must exist and be the caller's.
    pub fn update(
        &mut self,
        spec: &ActorSpec,
        caller: Caller,
        facts: Option<ProcFacts>,
    ) -> Result<Actor, RegistryError> {
        let pid = spec.pid.unwrap_or(caller.pid);
        let Some(actor) = self.get(pid) else { return Err(RegistryError::NotRegistered(pid)) };
        if caller.uid != 0 && caller.uid != actor.uid {
            return Err(RegistryError::NotPermitted { pid, caller_uid: caller.uid });
        }
        // Socket outranks every other source, so the update may rename and re-policy.
        self.upsert(&ActorSpec { pid: Some(pid), ..spec.clone() }, Source::Socket, Some(caller), facts)
    }

    /// Records what an event says about its actor; returns the actor's
    /// name for labels and output.
    pub fn observe(&mut self, ev: &Event) -> Option<String> {
        let clock = self.clock;
        match &ev.body {
            EventBody::ProcessExit(e) => {
                let pid = e.task.pid;
                let actor = self.retire(pid, ActorState::Exited, ev.mono_ns, clock.rfc3339(ev.mono_ns))?;
                Some(actor.name.clone())
            }
            EventBody::HandlerWrite(w) => {
                let (learned, generation) = (&mut self.learned, &mut self.generation);
                let actor = self.actors.get_mut(&w.task.pid).filter(|a| a.state.is_live())?;
                actor.last_seen = clock.rfc3339(ev.mono_ns);
                actor.last_seen_mono = ev.mono_ns;
                // A one-byte write from a handler is the wakeup write (libuv's
                // is its 16-byte message; its one-byte write is to its signal
                // lock pipe): learn the fd.
                let wakeup_size = if actor.runtime == Runtime::Libuv { 16 } else { 1 };
                if w.count == wakeup_size && w.task.tid == w.task.pid && actor.wakeup_fd.is_none() {
                    actor.wakeup_fd = Some(w.fd);
                    learned.push((w.task.pid, w.fd));
                    *generation += 1;
                }
                if let Some(errno) = w.errno() {
                    actor.drops += 1;
                    if actor.recent_drops.len() == RECENT_DROPS {
                        actor.recent_drops.pop_front();
                    }
                    actor.recent_drops.push_back(DropRecord {
                        time: clock.rfc3339(ev.mono_ns),
                        mono_ns: ev.mono_ns,
                        signal: w.signal.name(),
                        fd: w.fd,
                        errno,
                    });
                }
                Some(actor.name.clone())
            }
            EventBody::SignalGenerate(g) => self.name_of(g.target_tid).map(str::to_string),
            _ => {
                let pid = ev.subject_pid();
                self.name_of(pid).map(str::to_string)
            }
        }
    }

    /// Wakeup fds learned since the last call.
    pub fn take_learned(&mut self) -> Vec<(u32, i32)> {
        std::mem::take(&mut self.learned)
    }

    /// Forgets an actor's wakeup fd that no longer refers to what was
    /// learned (closed and reused): the next one-byte handler write
    /// teaches it again.
    pub fn forget_wakeup_fd(&mut self, pid: u32, fd: i32) {
        if let Some(a) = self.actors.get_mut(&pid).filter(|a| a.wakeup_fd == Some(fd)) {
            a.wakeup_fd = None;
            self.generation += 1;
        }
    }

    /// Among `pids`, the live actors a non-root client registered through
    /// the socket: those whose registrant's right to signal them must be
    /// checked again after an exec (their uids may have changed).
    pub fn registered_by_users(&self, pids: impl Iterator<Item = u32>) -> Vec<u32> {
        pids.filter(|p| self.get(*p).is_some_and(|a| a.registered_by.is_some_and(|u| u != 0))).collect()
    }

    /// After an exec: whether the client that registered `pid` could still
    /// signal it, by kill(2)'s rule on its uids now (`facts`, read without
    /// the lock). If not, the registration is dropped: the actor stays,
    /// observed only (no policy, source `discovered`), under its new uid.
    /// Returns why, for the log and for any escalation under way.
    pub fn recheck_registrant(&mut self, pid: u32, facts: &ProcFacts) -> Option<Revoked> {
        let actor = self.actors.get_mut(&pid).filter(|a| a.state.is_live() && a.start_time == facts.start_time)?;
        let registrant = actor.registered_by.filter(|u| *u != 0)?;
        if may_signal(registrant, facts) {
            actor.uid = facts.uids[0];
            return None;
        }
        actor.policy = None;
        actor.registered_by = None;
        actor.source = Source::Discovered;
        actor.uid = facts.uids[0];
        Some(Revoked { pid, name: actor.name.clone(), registrant, uids: facts.uids })
    }

    /// Every live actor's identity, for the sweep to check against /proc
    /// without holding the registry.
    pub fn identities(&self) -> Vec<(u32, u64)> {
        self.actors.values().map(|a| (a.pid, a.start_time)).collect()
    }

    /// Retires the actors whose process the sweep found gone or reused
    /// (exits the kernel could not report), if the entry is still that
    /// process, and expires old exited entries. Returns the retired pids.
    pub fn sweep(&mut self, gone: &[(u32, u64)]) -> Vec<u32> {
        let (mono, now) = self.now();
        let mut retired = Vec::new();
        for &(pid, start_time) in gone {
            if self.actors.get(&pid).is_some_and(|a| a.start_time == start_time) {
                self.retire(pid, ActorState::Exited, mono, now.clone());
                retired.push(pid);
            }
        }
        let retain = self.retain_exited_ns;
        self.history.retain(|a| mono.saturating_sub(a.last_seen_mono) < retain);
        retired
    }

    /// Sets a live actor's state; `Dead` on an exited one updates its record.
    pub fn set_state(&mut self, pid: u32, state: ActorState) {
        if !state.is_live() && self.actors.contains_key(&pid) {
            let (mono, now) = self.now();
            self.retire(pid, state, mono, now);
        } else if let Some(a) = self.actors.get_mut(&pid) {
            a.state = state;
        } else if state == ActorState::Dead
            && let Some(a) = self.history.iter_mut().rev().find(|a| a.pid == pid)
        {
            a.state = state;
        }
    }

    /// Counts of live and recorded actors by (state, runtime).
    pub fn counts(&self) -> HashMap<(ActorState, Runtime), i64> {
        let mut out = HashMap::new();
        for a in self.all() {
            *out.entry((a.state, a.runtime)).or_insert(0) += 1;
        }
        out
    }

    /// True for a stop signal: SIGINT, SIGTERM, SIGQUIT. Not SIGHUP: a
    /// daemon reloads on it, and one busy during a reload is not a stop
    /// that went unheard (judging it so would end a reload in a kill).
    pub fn is_stop_signal(sig: Signal) -> bool {
        matches!(sig.0, libc::SIGINT | libc::SIGTERM | libc::SIGQUIT)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::kernel::events::testing::{dropped_wakeup, raw};
    use sigwake_common::kind;

    /// A fake /proc: pid → facts, shared so tests can change it.
    #[derive(Clone, Default)]
    pub struct FakeProc(pub Arc<Mutex<HashMap<u32, ProcFacts>>>);
    impl FakeProc {
        pub fn add(&self, pid: u32, start: u64, uid: u32, ppid: u32) {
            self.0.lock().unwrap().insert(
                pid,
                ProcFacts { start_time: start, uids: [uid; 3], ppid, comm: "python".into(), cmdline: vec![] },
            );
        }
    }
    impl ProcReader for FakeProc {
        fn facts(&self, pid: u32) -> Option<ProcFacts> {
            self.0.lock().unwrap().get(&pid).cloned()
        }
    }

    #[derive(Clone, Default)]
    pub struct FakeSink(pub Arc<Mutex<std::collections::BTreeSet<u32>>>);
    impl WatchedSink for FakeSink {
        fn watch(&mut self, pid: u32) {
            self.0.lock().unwrap().insert(pid);
        }
        fn unwatch(&mut self, pid: u32) {
            self.0.lock().unwrap().remove(&pid);
        }
    }

    pub fn registry() -> (Registry, FakeProc, FakeSink) {
        let p = FakeProc::default();
        let s = FakeSink::default();
        (Registry::new(Box::new(s.clone()), 100), p, s)
    }

    /// `upsert` with the facts read from the fake /proc, as callers do.
    pub fn up(
        r: &mut Registry,
        p: &FakeProc,
        spec: &ActorSpec,
        source: Source,
        caller: Option<Caller>,
    ) -> Result<Actor, RegistryError> {
        r.upsert(spec, source, caller, read_facts(p, spec, caller))
    }

    fn sweep(r: &mut Registry, p: &FakeProc) -> Vec<u32> {
        let gone = gone(p, &r.identities());
        r.sweep(&gone)
    }

    fn spec(pid: u32, name: &str) -> ActorSpec {
        ActorSpec { pid: Some(pid), name: Some(name.into()), ..Default::default() }
    }

    const ALICE: Caller = Caller { pid: 50, uid: 1000 };
    const BOB: Caller = Caller { pid: 60, uid: 1001 };
    const ROOT: Caller = Caller { pid: 1, uid: 0 };

    #[test]
    fn owner_may_register_and_is_watched_in_the_kernel() {
        let (mut r, p, s) = registry();
        p.add(100, 5, 1000, 1);
        let a = up(&mut r, &p, &spec(100, "fetcher"), Source::Socket, Some(ALICE)).unwrap();
        assert_eq!((a.name.as_str(), a.pid, a.start_time, a.uid), ("fetcher", 100, 5, 1000));
        assert!(s.0.lock().unwrap().contains(&100));
        assert_eq!(r.name_of(100), Some("fetcher"));
    }

    #[test]
    fn another_user_may_not_register_or_see_a_process() {
        let (mut r, p, _) = registry();
        p.add(100, 5, 0, 1);
        let err = up(&mut r, &p, &spec(100, "x"), Source::Socket, Some(ALICE)).unwrap_err();
        assert_eq!(err, RegistryError::NotPermitted { pid: 100, caller_uid: 1000 });
        assert_eq!(err.code(), "not_permitted");
        up(&mut r, &p, &spec(100, "rootd"), Source::Socket, Some(ROOT)).unwrap();
        assert!(r.visible_to(ALICE).is_empty());
        assert_eq!(r.visible_to(ROOT).len(), 1);
        assert_eq!(r.deregister(100, ALICE), Err(RegistryError::NotPermitted { pid: 100, caller_uid: 1000 }));
    }

    #[test]
    fn missing_pid_and_double_registration_are_specific_errors() {
        let (mut r, p, _) = registry();
        assert_eq!(
            up(&mut r, &p, &spec(9, "x"), Source::Socket, Some(ROOT)).unwrap_err(),
            RegistryError::NoSuchProcess(9)
        );
        p.add(100, 5, 1000, 1);
        p.add(101, 5, 1001, 1);
        up(&mut r, &p, &spec(100, "a"), Source::Socket, Some(ALICE)).unwrap();
        // Same uid re-registering is an update; a different (non-root) uid
        // that could signal it is refused.
        assert_eq!(up(&mut r, &p, &spec(100, "a2"), Source::Socket, Some(ALICE)).unwrap().name, "a2");
        p.add(100, 5, 1001, 1);
        let err = up(&mut r, &p, &spec(100, "b"), Source::Socket, Some(BOB)).unwrap_err();
        assert!(matches!(err, RegistryError::AlreadyRegistered { .. }), "{err:?}");
    }

    #[test]
    fn reused_pid_never_inherits_the_old_entry() {
        let (mut r, p, s) = registry();
        p.add(100, 5, 1000, 1);
        up(&mut r, &p, &spec(100, "fetcher"), Source::Socket, Some(ALICE)).unwrap();
        // The actor exits without the kernel telling us; an unrelated
        // process gets pid 100.
        p.add(100, 999, 1000, 1);
        assert_eq!(sweep(&mut r, &p), vec![100]);
        assert_eq!(r.name_of(100), None);
        assert!(!s.0.lock().unwrap().contains(&100));
        assert_eq!(r.observe(&dropped_wakeup(100, 3, 1)), None, "the new process is not the actor");
        // Registering the new process makes a new entry with the new identity,
        // and the old one stays on record.
        let a = up(&mut r, &p, &spec(100, "other"), Source::Socket, Some(ALICE)).unwrap();
        assert_eq!((a.start_time, a.drops), (999, 0));
        let old: Vec<_> = r.all().filter(|a| a.pid == 100 && a.start_time == 5).collect();
        assert_eq!(old.len(), 1);
        assert_eq!((old[0].name.as_str(), old[0].state), ("fetcher", ActorState::Exited));
    }

    #[test]
    fn an_unnamed_actor_is_named_by_its_comm_never_its_pid() {
        let (mut r, p, _) = registry();
        p.add(4242, 5, 1000, 1);
        let a = up(&mut r, &p, &ActorSpec { pid: Some(4242), ..Default::default() }, Source::Discovered, None).unwrap();
        assert_eq!(a.name, "python");
        assert!(!a.name.contains("4242"));
    }

    #[test]
    fn registering_a_discovered_process_gives_it_the_default_policy() {
        let (mut r, p, _) = registry();
        p.add(100, 5, 1000, 1);
        let a = up(&mut r, &p, &ActorSpec { pid: Some(100), ..Default::default() }, Source::Discovered, None).unwrap();
        assert_eq!(a.policy, None);
        let a = up(&mut r, &p, &spec(100, "fetcher"), Source::Socket, Some(ALICE)).unwrap();
        assert_eq!(a.policy.as_deref(), Some("default"));
    }

    #[test]
    fn drops_are_attributed_and_the_wakeup_fd_learned() {
        let (mut r, p, _) = registry();
        p.add(100, 5, 1000, 1);
        up(&mut r, &p, &spec(100, "fetcher"), Source::Socket, Some(ALICE)).unwrap();
        assert_eq!(r.observe(&dropped_wakeup(100, 7, 10)).as_deref(), Some("fetcher"));
        let a = r.get(100).unwrap();
        assert_eq!((a.drops, a.wakeup_fd), (1, Some(7)));
        assert_eq!(a.recent_drops[0].errno, libc::EAGAIN);
    }

    #[test]
    fn exit_event_marks_exited_and_unwatches() {
        let (mut r, p, s) = registry();
        p.add(100, 5, 1000, 1);
        up(&mut r, &p, &spec(100, "fetcher"), Source::Socket, Some(ALICE)).unwrap();
        let exit = Event::try_from(&raw(kind::PROCESS_EXIT, 0, 100, 100)).unwrap();
        assert_eq!(r.observe(&exit).as_deref(), Some("fetcher"));
        assert_eq!(r.name_of(100), None);
        assert!(r.all().any(|a| a.pid == 100 && a.state == ActorState::Exited));
        assert!(!s.0.lock().unwrap().contains(&100));
    }

    #[test]
    fn parent_actor_is_resolved_by_ppid() {
        let (mut r, p, _) = registry();
        p.add(100, 5, 1000, 1);
        p.add(101, 6, 1000, 100);
        up(&mut r, &p, &spec(100, "root"), Source::Socket, Some(ALICE)).unwrap();
        let child = up(&mut r, &p, &spec(101, "child"), Source::Socket, Some(ALICE)).unwrap();
        assert_eq!(child.parent.as_deref(), Some("root"));
        assert_eq!(child.parent_pid, Some(100));
    }

    #[test]
    fn weaker_sources_do_not_rename_a_registered_actor() {
        let (mut r, p, _) = registry();
        p.add(100, 5, 1000, 1);
        up(&mut r, &p, &spec(100, "fetcher"), Source::Socket, Some(ALICE)).unwrap();
        let a = up(&mut r, &p, &spec(100, "python-100"), Source::Discovered, None).unwrap();
        assert_eq!(a.name, "fetcher");
        assert_eq!(a.source, Source::Socket);
    }

    #[test]
    fn bad_fields_are_refused() {
        let (mut r, p, _) = registry();
        p.add(100, 5, 1000, 1);
        for bad in [
            ActorSpec { pid: Some(100), name: Some(String::new()), ..Default::default() },
            ActorSpec { pid: Some(100), name: Some("x".repeat(200)), ..Default::default() },
            ActorSpec { pid: Some(100), name: Some("a\nb".into()), ..Default::default() },
            ActorSpec { pid: Some(100), wakeup_fd: Some(-3), ..Default::default() },
        ] {
            assert_eq!(up(&mut r, &p, &bad, Source::Socket, Some(ALICE)).unwrap_err().code(), "bad_request");
        }
    }

    #[test]
    fn registry_is_bounded() {
        let p = FakeProc::default();
        let mut r = Registry::new(Box::new(NoSink), 2);
        for pid in 1..=3 {
            p.add(pid + 100, 1, 0, 1);
        }
        up(&mut r, &p, &spec(101, "a"), Source::Socket, Some(ROOT)).unwrap();
        up(&mut r, &p, &spec(102, "b"), Source::Socket, Some(ROOT)).unwrap();
        assert_eq!(up(&mut r, &p, &spec(103, "c"), Source::Socket, Some(ROOT)).unwrap_err(), RegistryError::Full(2));
    }

    /// A process registered by a user that later becomes root (it exec'd
    /// a set-uid program that made every uid 0) is no longer one its
    /// registrant could signal: the registration is dropped, the actor kept
    /// observe-only (no policy), and the reason returned. A set-uid exec
    /// that leaves the real uid the registrant's keeps it (kill(2) allows
    /// that signal), and so does anything registered by root or the agent.
    #[test]
    fn a_registrant_that_may_no_longer_signal_the_process_loses_the_registration() {
        let (mut r, p, s) = registry();
        p.add(100, 5, 1000, 1);
        p.add(200, 6, 1000, 1);
        p.add(300, 7, 1000, 1);
        up(&mut r, &p, &spec(100, "becomes-root"), Source::Socket, Some(ALICE)).unwrap();
        up(&mut r, &p, &spec(200, "setuid-exec"), Source::Socket, Some(ALICE)).unwrap();
        up(&mut r, &p, &spec(300, "roots-own"), Source::Socket, Some(ROOT)).unwrap();
        assert_eq!(r.registered_by_users([100, 200, 300, 999].into_iter()), vec![100, 200]);
        let root = ProcFacts { start_time: 5, uids: [0, 0, 0], ppid: 1, comm: "sleep".into(), cmdline: vec![] };
        let lost = r.recheck_registrant(100, &root).expect("alice may not signal a root process");
        let why = lost.to_string();
        assert!(why.contains("uid 1000") && why.contains("becomes-root") && why.contains("[0, 0, 0]"), "{why}");
        let a = r.get(100).expect("still observed");
        assert_eq!((a.policy.as_deref(), a.registered_by, a.uid, a.source), (None, None, 0, Source::Discovered));
        assert!(s.0.lock().unwrap().contains(&100), "still watched");
        assert!(r.visible_to(ALICE).iter().all(|a| a.pid != 100), "alice no longer sees it");
        assert_eq!(r.registered_by_users([100].into_iter()), Vec::<u32>::new());
        // Real uid still alice's (a plain set-uid exec): kill(2) allows it.
        let suid = ProcFacts { start_time: 6, uids: [1000, 0, 0], ..root.clone() };
        assert_eq!(r.recheck_registrant(200, &suid), None);
        assert_eq!(r.get(200).unwrap().policy.as_deref(), Some("default"));
        // Registered by root: nothing to re-check. Another process (start time): not this entry.
        assert_eq!(r.recheck_registrant(300, &ProcFacts { start_time: 7, ..root.clone() }), None);
        assert_eq!(r.recheck_registrant(200, &ProcFacts { start_time: 99, ..root }), None);
        assert_eq!(r.get(200).unwrap().registered_by, Some(1000));
    }

    /// A daemon busy during a reload (SIGHUP into its handler) is not a
    /// stop that went unheard: only SIGINT, SIGTERM and SIGQUIT start a
    /// starvation verdict, so a reload can never end in a kill.
    #[test]
    fn only_sigint_sigterm_and_sigquit_are_stop_signals() {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT] {
            assert!(Registry::is_stop_signal(Signal(sig)), "{}", Signal(sig));
        }
        for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGCHLD, libc::SIGWINCH] {
            assert!(!Registry::is_stop_signal(Signal(sig)), "{}", Signal(sig));
        }
    }

    #[test]
    fn tractor_cmdline_gives_name_and_uuid() {
        let cmd: Vec<String> =
            ["python", "-m", "tractor._child", "--uid", "('fetcher', '1b2c-3d')", "--parent_addr", "x"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        assert_eq!(tractor_identity(&cmd), Some(("fetcher".into(), "1b2c-3d".into())));
        let not: Vec<String> = ["python", "app.py", "--uid", "('a','b')"].iter().map(|s| s.to_string()).collect();
        assert_eq!(tractor_identity(&not), None);
        let bad: Vec<String> =
            ["python", "-m", "tractor._child", "--uid", "garbage"].iter().map(|s| s.to_string()).collect();
        assert_eq!(tractor_identity(&bad), None);
    }
}
