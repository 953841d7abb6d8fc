//! `sigwake run`: the agent. Wiring and the event loop; each kind of wake-up
//! is one [`Pipeline`] method.
//!
//! Locking rule: the registry's lock is never held across I/O. /proc reads,
//! pidfd_getfd and sock_diag happen first, without it (under [`blocking`],
//! off the async workers); the registry then takes the results in one short
//! critical section. Its watched set reaches the kernel map through a queue
//! (kernel/watched.rs).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use sigwake_common::Config as KernelConfig;
use tokio::sync::Notify;

use super::{blocking, load_probes, shutdown_signal, spawn_kernel_logger, start_source};
use crate::{
    actors::{
        discovery::{Discovery, Found},
        registration,
        registry::{self, ActorState, ProcReader as _, RealProc, Registry, Runtime, WatchedSink},
    },
    cli::RunArgs,
    config::{Config, Overrides, Policy},
    kernel::{
        events::{Disposition, Event, EventBody, HandlerWrite},
        pipe_hooks::PipeHookDemand,
        probes::Probes,
        restorer_hooks::{self, RestorerDemand},
        source::Batch,
        watched::WatchedPids,
    },
    lock,
    response::{
        detector::{Detector, Input, Output},
        escalation::{Confirmation, Engine},
        incidents,
    },
    serve::{
        http::{self, HttpState},
        metrics::{ActorLabel, Metrics},
    },
    sys::{fdqueue, procinfo},
};

/// The registry's watched set, mirrored into the kernel map by its thread;
/// a new actor also wakes the event loop (`added`), which then decides at
/// once whether its wakeup needs the on-demand pipe hooks.
struct KernelWatched {
    pids: WatchedPids,
    added: Arc<Notify>,
}

impl WatchedSink for KernelWatched {
    fn watch(&mut self, pid: u32) {
        self.pids.watch(pid);
        self.added.notify_one();
    }
    fn unwatch(&mut self, pid: u32) {
        self.pids.unwatch(pid);
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        serve_state: args.serve_state,
        socket: args.socket.clone(),
        state_dir: args.state_dir.clone(),
        dry_run: args.dry_run,
        no_discovery: args.no_discovery,
        discover_pipes: args.discover_pipes,
    };
    let config = match &args.config {
        Some(path) => Config::load(path, &overrides)?,
        None => Config::defaults(&overrides),
    };
    // Before anything is loaded: a state dir that is not the agent's own
    // stops it at once.
    let store = incidents::Store::open(&config.state_dir)?;
    let listener = http::bind(config.listen).await?;
    let (socket, _socket_guard) = registration::bind(&config.socket).await?;
    let metrics = Arc::new(Metrics::with_actor_label_cap(config.max_actor_labels));

    // Without self-pipe discovery only registered and selected actors
    // matter: the kernel then skips the signal path of every other process.
    let kernel_config =
        KernelConfig { watched_only: u32::from(!config.discovery), report_exec: 1, ..KernelConfig::DEFAULT };
    let mut probes = load_probes(kernel_config, args.hooks)?;
    spawn_kernel_logger(&mut probes);
    metrics.attached_programs.set(probes.hooks().len() as i64);
    metrics.set_hooks(probes.report());
    metrics.set_syscall_hooks(probes.syscall_tracepoints_attached());
    metrics.restorer_uprobes.set(probes.restorers_hooked() as i64);
    let added = Arc::new(Notify::new());
    let watched = KernelWatched {
        pids: WatchedPids::spawn(probes.take_watched_pids()?).context("starting the watched-set thread")?,
        added: added.clone(),
    };
    let registry = Arc::new(Mutex::new(Registry::new(Box::new(watched), config.max_actors)));
    let mut discovery = Discovery::new(config.selectors.clone(), config.discovery);
    let found = blocking(|| discovery.scan(false));
    Discovery::apply(found, &mut lock(&registry));
    let engine = Engine::new(&config, store, registry.clone(), metrics.clone());
    let mut detector = Detector::default();
    let default_policy = config.policies.get("default").cloned().unwrap_or_else(Policy::builtin_default);
    for (pid, runtime) in engine.resume() {
        let window = default_policy.confirm_window(runtime).as_nanos() as u64;
        detector.resume_starving(pid, runtime, window, procinfo::monotonic_ns());
    }
    if config.dry_run {
        tracing::warn!("dry run: escalation will log what it would do and signal nothing");
    }

    let state = Arc::new(HttpState {
        metrics: metrics.clone(),
        ready: false.into(),
        registry: registry.clone(),
        incidents: engine.store.clone(),
        serve_state: config.serve_state,
    });
    let server = tokio::spawn(http::serve(listener, state.clone(), http::Limits::DEFAULT));
    tokio::spawn(registration::serve(socket, registry.clone()));
    tracing::info!(
        "serving /metrics, /healthz, /readyz{} on http://{}; registration socket {}; state in {}",
        if config.serve_state { ", /actors and /incidents (--serve-state: to anyone who can connect)" } else { "" },
        config.listen,
        config.socket.display(),
        config.state_dir.display()
    );
    let mut pipe_demand = PipeHookDemand::new(config.discover_pipes);
    announce_pipe_hooks(&probes, config.discover_pipes);
    // Before the capabilities go: attaching them later needs none (a raw
    // tracepoint), but the first decision may as well be made here.
    refresh_pipe_hooks(&mut pipe_demand, &registry, &mut probes, &metrics);
    let mut batches = start_source(&mut probes)?;
    // Every program is attached and every map fd open: from here on the
    // agent keeps only what it still uses (sys/caps.rs), before it says
    // it is ready.
    super::drop_capabilities(&probes)?;
    state.ready.store(true, Ordering::Release);

    let mut pipeline = Pipeline {
        registry,
        discovery,
        detector,
        engine,
        metrics,
        config,
        default_policy,
        outputs: Vec::new(),
        fd_ids: HashMap::new(),
        restorers: RestorerDemand::default(),
    };
    let mut lost_seen = 0u64;
    let on_wake = |pipeline: &mut Pipeline, wake: Wake| {
        if wake == Wake::Tick {
            // Lost exec events: look at every process again (only
            // then; a flood of other kinds costs no /proc rescan).
            let lost = probes.counters().lost_of(sigwake_common::kind::PROCESS_EXEC);
            pipeline.on_tick(&probes, lost > lost_seen);
            lost_seen = lost;
        }
        // Cheap unless the registry changed (its generation).
        refresh_pipe_hooks(&mut pipe_demand, &pipeline.registry, &mut probes, &pipeline.metrics);
        if pipeline.restorers.is_pending() {
            let hooked = blocking(|| pipeline.restorers.hook_pending(&mut probes));
            restorer_hooks::log(&hooked);
            pipeline.metrics.restorer_uprobes.set(probes.restorers_hooked() as i64);
            pipeline.metrics.attached_programs.set(probes.hooks().len() as i64);
        }
    };
    let ended =
        event_loop(&mut pipeline, &mut batches, shutdown_signal(), &added, on_wake, || !server.is_finished()).await;
    state.ready.store(false, Ordering::Release);
    drop(probes);
    ended
}

/// The agent's event loop, until SIGINT/SIGTERM (`shutdown`: Ok) or an
/// error: the event source ended (the ring-buffer reader died: an agent
/// that sees no more kernel events must not look healthy, nor exit 0 so a
/// supervisor leaves it down), or the metrics endpoint stopped
/// (`server_alive` false).
async fn event_loop(
    pipeline: &mut Pipeline,
    batches: &mut tokio::sync::mpsc::Receiver<Batch>,
    shutdown: impl std::future::Future<Output = anyhow::Result<&'static str>>,
    actor_added: &Notify,
    mut on_wake: impl FnMut(&mut Pipeline, Wake),
    server_alive: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The detector decides at confirm deadlines; 50 ms keeps that decision
    // within 50 ms of the deadline. It runs only while some actor is
    // watched or starving, so an idle agent wakes once a second, not twenty
    // times.
    let mut detect_tick = tokio::time::interval(Duration::from_millis(50));
    detect_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            why = &mut shutdown => { tracing::info!("{}: detaching and stopping", why?); return Ok(()); }
            _ = detect_tick.tick(), if !pipeline.detector.is_idle() => pipeline.on_detect_tick(),
            _ = tick.tick() => on_wake(pipeline, Wake::Tick),
            _ = actor_added.notified() => on_wake(pipeline, Wake::ActorAdded),
            batch = batches.recv() => {
                let Some(batch) = batch else { return Err(super::source_ended()) };
                pipeline.on_batch(batch);
                on_wake(pipeline, Wake::Batch);
            }
        }
        if !server_alive() {
            anyhow::bail!("the metrics endpoint stopped unexpectedly");
        }
    }
}

/// Why the event loop calls back between its own stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// Once a second.
    Tick,
    /// A new actor (registration, a selector, discovery).
    ActorAdded,
    /// A batch of kernel events went through the pipeline.
    Batch,
}

/// Says at start-up how writes to pipes and eventfds are seen, when the
/// tier needs on-demand hooks for them.
fn announce_pipe_hooks(probes: &Probes, discover_pipes: bool) {
    if probes.pipe_write_hooks_attached().is_none() {
        return;
    }
    if discover_pipes {
        tracing::warn!(
            "--discover-pipes: the syscall hook for pipe and eventfd writes stays attached, so every syscall on this \
             host takes the tracing slow path"
        );
    } else {
        tracing::info!(
            "writes to pipes and eventfds (Twisted, libuv, GLib, self-pipe loops) are seen through a syscall hook \
             attached only while a registered or selected actor's wakeup fd is one (or not known yet); loops of that \
             kind nobody registered are not discovered (--discover-pipes would, at the cost of every syscall)"
        );
    }
}

/// Attaches or detaches the socket tier's pipe-write hooks as the live
/// actors need them, and says so. A failure leaves them as they were and
/// is logged; the next change tries again.
fn refresh_pipe_hooks(demand: &mut PipeHookDemand, registry: &Mutex<Registry>, probes: &mut Probes, metrics: &Metrics) {
    let Some(attached) = probes.pipe_write_hooks_attached() else { return };
    let generation = lock(registry).generation();
    // Called after every batch: out before handing the worker's tasks away
    // (`blocking`) unless the registry changed.
    if demand.decided_at(generation) {
        return;
    }
    // /proc reads, off the async workers, without the registry's lock.
    let decided = blocking(|| {
        demand.decide(
            generation,
            || lock(registry).wakeups(),
            |pid, fd| fdqueue::fd_target(pid, fd).map(|t| t.starts_with("socket:")),
        )
    });
    let Some(need) = decided else { return };
    if need.is_some() == attached {
        return;
    }
    match probes.set_pipe_write_hooks(need.is_some()) {
        Ok(_) => match &need {
            Some(why) => tracing::info!("attached the syscall hook for pipe and eventfd writes: {why}"),
            None => tracing::info!("detached the syscall hook for pipe and eventfd writes: no actor needs it"),
        },
        Err(e) => {
            tracing::error!("could not change the syscall hook for pipe and eventfd writes: {e:#}");
            demand.retry();
        }
    }
    metrics.set_syscall_hooks(probes.syscall_tracepoints_attached());
}

/// The stages after the decoder, fed by the event loop.
struct Pipeline {
    registry: Arc<Mutex<Registry>>,
    discovery: Discovery,
    detector: Detector,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    config: Config,
    default_policy: Policy,
    outputs: Vec<Output>,
    /// What each actor's wakeup fd referred to when it was learned:
    /// pid → (fd, `socket:[INODE]`/`pipe:[INODE]`).
    fd_ids: HashMap<u32, (i32, String)>,
    /// Restorers met in deliveries, for the socket tier's uprobes.
    restorers: RestorerDemand,
}

impl Pipeline {
    /// A batch of kernel events: discovery's I/O first, without the
    /// registry; then every event in order under one short lock.
    fn on_batch(&mut self, batch: Batch) {
        let mut events = Vec::with_capacity(batch.len());
        for item in batch {
            match item {
                Ok(ev) => {
                    self.restorers.note(&ev);
                    events.push(ev);
                }
                Err(e) => self.metrics.decode_error(e.reason()),
            }
        }
        let found = self.examine_new_processes(&events);
        let exec_facts = self.read_exec_facts(&events);
        let mut reg = lock(&self.registry);
        let mut found = found.into_iter();
        let mut revoked = Vec::new();
        for ev in &events {
            match &ev.body {
                EventBody::ProcessExec(e) => {
                    if let Some(Examined::Exec(f)) = found.next() {
                        Discovery::apply(f, &mut reg);
                    }
                    if let Some(facts) = exec_facts.get(&e.task.pid)
                        && let Some(r) = reg.recheck_registrant(e.task.pid, facts)
                    {
                        revoked.push(r);
                    }
                    continue;
                }
                EventBody::HandlerWrite(w) if self.discovery.wants(w) => {
                    if let Some(Examined::Loop(Some(f))) = found.next() {
                        self.discovery.apply_loop(f, &mut reg);
                    }
                }
                _ => {}
            }
            let actor = reg.observe(ev);
            let runtime = reg.get(ev.subject_pid()).map_or("unknown", |a| a.runtime.as_str());
            self.metrics.observe(ev, actor.as_deref(), runtime);
            if actor.is_some() {
                feed_detector(&mut self.detector, &reg, &self.config, &self.default_policy, ev, &mut self.outputs);
            }
            if let EventBody::HandlerWrite(w) = &ev.body
                && w.is_dropped_wakeup()
            {
                tracing::warn!(
                    pid = w.task.pid, tid = w.task.tid, fd = w.fd, syscall = w.call_name(),
                    signal = %w.signal, errno = w.errno().unwrap_or(0),
                    actor = actor.as_deref().unwrap_or("-"),
                    "signal handler could not write its wakeup byte: the event loop did not see {}",
                    w.signal
                );
            }
        }
        let learned = reg.take_learned();
        drop(reg);
        for r in revoked {
            tracing::warn!(pid = r.pid, actor = r.name, registrant = r.registrant, "{r}");
            self.engine.on_rights_lost(r.pid, &r.to_string());
        }
        // What each newly learned wakeup fd is, to tell later whether the
        // same number still is that fd.
        if !learned.is_empty() {
            let ids: Vec<_> = blocking(|| {
                learned.into_iter().filter_map(|(pid, fd)| Some((pid, fd, fdqueue::fd_target(pid, fd)?))).collect()
            });
            for (pid, fd, target) in ids {
                self.fd_ids.insert(pid, (fd, target));
            }
        }
        self.apply_detector_outputs();
    }

    /// The /proc facts of the actors in `events` that exec'd and that a
    /// user registered, read without the registry's lock: an exec may have
    /// made one a process its registrant may not signal (a set-uid
    /// program), which [`Registry::recheck_registrant`] then decides.
    fn read_exec_facts(&self, events: &[Event]) -> HashMap<u32, registry::ProcFacts> {
        let execs = events.iter().filter_map(|ev| match &ev.body {
            EventBody::ProcessExec(e) => Some(e.task.pid),
            _ => None,
        });
        let pids = lock(&self.registry).registered_by_users(execs);
        if pids.is_empty() {
            return HashMap::new();
        }
        blocking(|| pids.into_iter().filter_map(|p| Some((p, RealProc.facts(p)?))).collect())
    }

    /// The /proc and fd reads discovery needs for `events`, one entry per
    /// exec and per self-pipe candidate write, in event order. Only
    /// processes that are not actors yet are examined.
    fn examine_new_processes(&mut self, events: &[Event]) -> Vec<Examined> {
        let candidates: Vec<u32> = events
            .iter()
            .filter_map(|ev| match &ev.body {
                EventBody::HandlerWrite(w) if self.discovery.wants(w) => Some(w.task.pid),
                _ => None,
            })
            .collect();
        if candidates.is_empty() && !events.iter().any(|e| matches!(e.body, EventBody::ProcessExec(_))) {
            return Vec::new();
        }
        // Actors whose runtime is known need no look (nor, with
        // --no-discovery, processes that are no actor); one a selector made
        // without a runtime gets it from its first wakeup write.
        let known: HashSet<u32> = {
            let reg = lock(&self.registry);
            let discovers = self.discovery.discovers_loops();
            candidates
                .into_iter()
                .filter(|p| reg.get(*p).map_or(!discovers, |a| a.runtime != Runtime::Unknown))
                .collect()
        };
        let discovery = &mut self.discovery;
        blocking(|| {
            let mut examined_loops = HashSet::new();
            events
                .iter()
                .filter_map(|ev| match &ev.body {
                    EventBody::ProcessExec(e) => Some(Examined::Exec(discovery.on_exec(e.task.pid))),
                    EventBody::HandlerWrite(w) if discovery.wants(w) => {
                        // Once per process and batch: a burst of handler
                        // writes needs one look.
                        let new = !known.contains(&w.task.pid) && examined_loops.insert(w.task.pid);
                        Some(Examined::Loop(new.then(|| discovery.examine_loop(w)).flatten()))
                    }
                    _ => None,
                })
                .collect()
        })
    }

    /// Once a second: discovery's scan, the identity sweep (exits the
    /// kernel could not report), and the metrics that are read, not
    /// counted.
    fn on_tick(&mut self, probes: &Probes, events_lost: bool) {
        let identities = lock(&self.registry).identities();
        let discovery = &mut self.discovery;
        let (found, gone) = blocking(|| (discovery.scan(events_lost), registry::gone(&RealProc, &identities)));
        let mut reg = lock(&self.registry);
        Discovery::apply(found, &mut reg);
        // Exits the kernel could not report end incidents too.
        for pid in reg.sweep(&gone) {
            self.detector.forget(pid);
            self.engine.on_exited(pid);
        }
        self.metrics.set_actor_counts(&reg.counts());
        drop(reg);
        self.metrics.update_kernel_counters(probes.counters());
        self.metrics.kernel_open_windows.set(probes.open_windows() as i64);
        self.metrics.update_bpf_stats(&probes.program_stats());
        self.metrics.update_process();
    }

    /// Every 50 ms while an actor is watched: how full each watched
    /// wakeup fd is, for the detector's verdicts.
    fn on_detect_tick(&mut self) {
        let now = procinfo::monotonic_ns();
        let active = self.detector.active();
        let fds: HashMap<u32, (Option<i32>, Option<String>)> = {
            let reg = lock(&self.registry);
            active
                .iter()
                .map(|p| (*p, reg.get(*p).map_or((None, None), |a| (a.wakeup_fd, Some(a.name.clone())))))
                .collect()
        };
        // What each fd refers to now, and how full it is.
        let (targets, mut fills): (HashMap<u32, String>, HashMap<u32, fdqueue::WakeupFill>) = blocking(|| {
            let targets =
                fds.iter().filter_map(|(pid, (fd, _))| Some((*pid, fdqueue::fd_target(*pid, (*fd)?)?))).collect();
            let fills =
                fds.iter().filter_map(|(pid, (fd, _))| Some((*pid, fdqueue::wakeup_fill(*pid, (*fd)?)?))).collect();
            (targets, fills)
        });
        // A wakeup fd that was closed and its number reused (another pipe,
        // maybe with data in it) says nothing about the loop: forget it.
        for (pid, (fd, _)) in &fds {
            let (Some(fd), Some(target)) = (fd, targets.get(pid)) else { continue };
            match self.fd_ids.get(pid) {
                Some((known_fd, known)) if known_fd == fd && known != target => {
                    tracing::warn!(
                        pid,
                        fd,
                        "wakeup fd {fd} now refers to {target} (was {known}): closed and reused; forgetting it"
                    );
                    fills.remove(pid);
                    self.fd_ids.remove(pid);
                    lock(&self.registry).forget_wakeup_fd(*pid, *fd);
                }
                Some((known_fd, _)) if known_fd == fd => {}
                _ => {
                    self.fd_ids.insert(*pid, (*fd, target.clone()));
                }
            }
        }
        let metrics = &self.metrics;
        let mut probe = |pid: u32| -> Option<u64> {
            let fill = fills.get(&pid)?;
            if let Some(cap) = fill.capacity_hint.filter(|c| *c > 0) {
                let name = fds.get(&pid).and_then(|(_, n)| n.as_deref());
                metrics
                    .wakeup_fill_ratio
                    .get_or_create(&ActorLabel { actor: metrics.actor_labels.label(name) })
                    .set((fill.queued as f64 / cap as f64).min(1.0));
            }
            Some(fill.queued)
        };
        self.detector.tick(now, &mut probe, &mut self.outputs);
        self.apply_detector_outputs();
    }

    fn apply_detector_outputs(&mut self) {
        let (registry, engine, metrics) = (&self.registry, &self.engine, &self.metrics);
        for o in self.outputs.drain(..) {
            match o {
                Output::Dropped { pid } => lock(registry).set_state(pid, ActorState::DroppedWakeup),
                Output::Lost { pid, sig } => {
                    let (name, runtime) = lock(registry)
                        .get(pid)
                        .map_or(("-".to_string(), "unknown"), |a| (a.name.clone(), a.runtime.as_str()));
                    tracing::warn!(
                        actor = name,
                        pid,
                        runtime,
                        "{runtime} lost a {} callback: its wakeup write was dropped",
                        crate::kernel::events::Signal(sig)
                    );
                }
                Output::Confirmed { pid, first_evidence_ns, confirmed_ns, drops, fill } => {
                    let signals = lock(registry)
                        .get(pid)
                        .map(|a| {
                            let mut s: Vec<String> = a.recent_drops.iter().map(|d| d.signal.clone()).collect();
                            s.dedup();
                            s
                        })
                        .unwrap_or_default();
                    engine.on_confirmed(Confirmation { pid, first_evidence_ns, confirmed_ns, drops, fill, signals });
                }
                Output::Recovered { pid, .. } => {
                    engine.on_recovered(pid);
                    let name = lock(registry).name_of(pid).map(str::to_string);
                    metrics
                        .wakeup_fill_ratio
                        .remove(&ActorLabel { actor: metrics.actor_labels.label(name.as_deref()) });
                }
                Output::Exited { pid } => engine.on_exited(pid),
            }
        }
    }
}

/// What discovery read for one event of a batch.
enum Examined {
    /// A process exec'd: the actors it now matches.
    Exec(Vec<Found>),
    /// A self-pipe write; `None` when the process is an actor already or
    /// was examined earlier in the batch.
    Loop(Option<Found>),
}

/// Turns an actor's event into a detector input.
fn feed_detector(
    detector: &mut Detector,
    reg: &Registry,
    config: &Config,
    default_policy: &Policy,
    ev: &Event,
    out: &mut Vec<Output>,
) {
    let pid = ev.subject_pid();
    // An exit needs no actor (the registry has already moved it to its
    // record); everything else is about a live actor, found in O(1).
    if let EventBody::ProcessExit(_) = ev.body {
        detector.input(pid, Runtime::Unknown, 0, ev.mono_ns, Input::Exited, out);
        return;
    }
    let Some(actor) = reg.get(pid) else { return };
    // The write to its wakeup fd once known (libuv's is a 16-byte message,
    // and its handler's one-byte write goes to a lock pipe), else a
    // one-byte write.
    let to_wakeup = |w: &HandlerWrite| actor.wakeup_fd.map_or(w.count == 1, |fd| w.fd == fd);
    let input = match &ev.body {
        EventBody::SignalDeliver(d)
            if matches!(d.disposition, Disposition::Handler(_)) && Registry::is_stop_signal(d.signal) =>
        {
            Input::StopSignal { sig: d.signal.0 }
        }
        EventBody::HandlerWrite(w) if to_wakeup(w) && w.is_dropped_wakeup() => Input::WakeupDropped { sig: w.signal.0 },
        EventBody::HandlerWrite(w) if to_wakeup(w) => Input::WakeupWritten,
        _ => return,
    };
    let policy = actor.policy.as_ref().and_then(|p| config.policies.get(p)).unwrap_or(default_policy);
    let window = policy.confirm_window(actor.runtime).as_nanos() as u64;
    detector.input(pid, actor.runtime, window, ev.mono_ns, input, out);
}

#[cfg(test)]
mod tests {
    use sigwake_common::kind;

    use super::*;
    use crate::{
        actors::registry::{ActorSpec, Caller, NoSink, Source, read_facts},
        config::Overrides,
        kernel::{
            events::testing::{dropped_wakeup, raw},
            source::{EventSource, FakeSource},
        },
    };

    /// A dry-run pipeline over a fresh state dir, with this test process
    /// registered as the actor "wired".
    fn wired_pipeline(state: &std::path::Path) -> Pipeline {
        let over = Overrides { state_dir: Some(state.into()), dry_run: true, no_discovery: true, ..Default::default() };
        let config = Config::defaults(&over);
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Mutex::new(Registry::new(Box::new(NoSink), 16)));
        let me = std::process::id();
        let spec = ActorSpec { pid: Some(me), name: Some("wired".into()), ..Default::default() };
        let caller = Caller { pid: me, uid: 0 };
        let facts = read_facts(&RealProc, &spec, Some(caller));
        lock(&registry).upsert(&spec, Source::Socket, Some(caller), facts).unwrap();
        let store = incidents::Store::open(state).unwrap();
        let engine = Engine::new(&config, store, registry.clone(), metrics.clone());
        Pipeline {
            registry,
            discovery: Discovery::new(Vec::new(), false),
            detector: Detector::default(),
            engine,
            metrics,
            default_policy: Policy::builtin_default(),
            config,
            outputs: Vec::new(),
            fd_ids: HashMap::new(),
            restorers: RestorerDemand::default(),
        }
    }

    /// The pipeline's wiring, end to end, from a fake source: a drop of a
    /// registered actor is attributed to it, counted in the metrics, moves
    /// it to dropped_wakeup, and its exit retires it; an undecodable record
    /// is counted; another process's drop is not blamed on the actor.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fake_source_drives_attribution_metrics_and_state() {
        let state = tempfile::tempdir().unwrap();
        let mut pipeline = wired_pipeline(state.path());
        let (registry, metrics) = (pipeline.registry.clone(), pipeline.metrics.clone());
        let me = std::process::id();
        let stranger = me.wrapping_add(1_000_000);
        let exit = Event::try_from(&raw(kind::PROCESS_EXIT, 0, me, me)).unwrap();
        let source = FakeSource(vec![
            vec![Ok(dropped_wakeup(me, 7, 10)), Ok(dropped_wakeup(stranger, 7, 11))],
            vec![Err(crate::kernel::events::DecodeError::UnknownKind(99)), Ok(dropped_wakeup(me, 7, 12))],
        ]);
        let mut batches = source.start().unwrap();
        while let Ok(batch) = batches.try_recv() {
            pipeline.on_batch(batch);
        }
        // Registered without a runtime: the agent recognises it from the
        // wakeup write (here whatever this test process's fd 7 is).
        let runtime = {
            let reg = lock(&registry);
            let actor = reg.get(me).expect("still an actor");
            assert_eq!((actor.drops, actor.wakeup_fd, actor.state), (2, Some(7), ActorState::DroppedWakeup));
            assert!(reg.get(stranger).is_none());
            actor.runtime.as_str()
        };
        let text = metrics.encode();
        let dropped = format!(
            r#"sigwake_wakeup_writes_dropped_total{{actor="wired",runtime="{runtime}",signal="SIGINT",errno="EAGAIN"}} 2"#
        );
        assert!(text.contains(&dropped), "{text}");
        assert!(text.contains(r#"sigwake_decode_errors_total{reason="unknown_kind"} 1"#), "{text}");
        pipeline.on_batch(vec![Ok(exit)]);
        assert!(lock(&registry).get(me).is_none(), "the exit retires the actor");
    }

    /// An exec re-checks, outside the registry's lock, that the client
    /// that registered the process could still signal it: this process
    /// (root), as if a user (uid 1000) had registered it before it became
    /// root, loses its registration on its exec event and is observed only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_exec_drops_a_registration_the_registrant_may_no_longer_signal() {
        let state = tempfile::tempdir().unwrap();
        let mut pipeline = wired_pipeline(state.path());
        let me = std::process::id();
        lock(&pipeline.registry).get_mut(me).unwrap().registered_by = Some(1000);
        let exec = Event::try_from(&raw(kind::PROCESS_EXEC, 0, me, me)).unwrap();
        pipeline.on_batch(vec![Ok(exec)]);
        let reg = lock(&pipeline.registry);
        let a = reg.get(me).expect("still an actor, observed");
        assert_eq!((a.policy.as_deref(), a.registered_by, a.uid), (None, None, 0), "{a:?}");
    }

    /// The event source ending on its own (the ring-buffer reader died) is
    /// an error, so that `sigwake run` exits non-zero and a supervisor
    /// restarts it; the batches before the end are still handled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_event_loop_fails_when_the_source_ends() {
        let state = tempfile::tempdir().unwrap();
        let mut pipeline = wired_pipeline(state.path());
        let me = std::process::id();
        let mut batches = FakeSource(vec![vec![Ok(dropped_wakeup(me, 7, 10))]]).start().unwrap();
        let ended =
            event_loop(&mut pipeline, &mut batches, std::future::pending(), &Notify::new(), |_, _| {}, || true).await;
        let err = ended.expect_err("a source that ends must stop the agent with an error");
        let text = format!("{err:#}");
        assert!(text.contains("kernel event reader stopped"), "says what happened: {text}");
        assert!(text.contains("restart"), "says what to do: {text}");
        assert_eq!(lock(&pipeline.registry).get(me).map(|a| a.drops), Some(1), "the last batch was handled");
    }

    /// SIGINT/SIGTERM is the clean stop: Ok, while the source is still open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_event_loop_stops_cleanly_on_shutdown() {
        let state = tempfile::tempdir().unwrap();
        let mut pipeline = wired_pipeline(state.path());
        let (_tx, mut batches) = tokio::sync::mpsc::channel::<Batch>(1);
        let shutdown = async { Ok("SIGTERM") };
        event_loop(&mut pipeline, &mut batches, shutdown, &Notify::new(), |_, _| {}, || true)
            .await
            .expect("a clean stop");
        let (_tx, mut batches) = tokio::sync::mpsc::channel::<Batch>(1);
        let err = event_loop(&mut pipeline, &mut batches, std::future::pending(), &Notify::new(), |_, _| {}, || false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("metrics endpoint stopped"), "{err}");
    }

    /// A learned wakeup fd that is closed and its number reused by a pipe
    /// with data in it says nothing about the loop: it is not measured as
    /// undrained, and it is forgotten (the next handler write re-teaches it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reused_wakeup_fd_number_is_forgotten_not_measured() {
        use std::os::fd::AsRawFd as _;
        let state = tempfile::tempdir().unwrap();
        let mut pipeline = wired_pipeline(state.path());
        let me = std::process::id();
        let (wakeup, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = wakeup.as_raw_fd();
        // An undrained byte: the loop stays watched, its fd measured.
        std::io::Write::write_all(&mut &wakeup, b"\x02").unwrap();
        pipeline.on_batch(vec![Ok(dropped_wakeup(me, fd, 10))]);
        assert_eq!(lock(&pipeline.registry).get(me).unwrap().wakeup_fd, Some(fd), "learned");
        pipeline.on_detect_tick();
        assert_eq!(lock(&pipeline.registry).get(me).unwrap().wakeup_fd, Some(fd), "still the same socket");
        // The socket is closed and a pipe holding data gets its number.
        // dup2 does both at once, so the number is never free for another
        // test thread to take; `wakeup` still owns (and finally closes) it.
        let (r, w) = rustix::pipe::pipe().unwrap();
        rustix::io::write(&w, b"not a wakeup byte").unwrap();
        // SAFETY: fd stays owned by `wakeup`; only what it refers to changes.
        assert_eq!(unsafe { libc::dup2(r.as_raw_fd(), fd) }, fd);
        pipeline.on_detect_tick();
        assert_eq!(lock(&pipeline.registry).get(me).unwrap().wakeup_fd, None, "forgotten, not measured");
        drop(wakeup);
    }
}
