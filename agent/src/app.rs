//! The commands: wire the stages together (probes → source → decoder →
//! consumers) and own the process lifecycle (start-up report, shutdown on
//! SIGINT/SIGTERM, detach on drop).

use std::{
    collections::HashMap,
    io::Write as _,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use sigwake_common::Config as KernelConfig;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    actors::discovery::Discovery,
    actors::registration,
    actors::registry::{ActorState, RealProc, Registry, Runtime, WatchedSink},
    cli::{ActorsArgs, CheckArgs, Format, IncidentsArgs, RunArgs, TraceArgs},
    config::Policy,
    config::{Config, Overrides},
    kernel::events::EventBody,
    kernel::events::{Disposition, Event},
    kernel::probes::{self, HookPreference, Probes},
    kernel::source,
    lock,
    response::detector::{Detector, Input, Output},
    response::escalation::{Confirmation, Engine},
    response::incidents,
    serve::http::{self, HttpState},
    serve::metrics::ActorLabel,
    serve::metrics::Metrics,
    serve::trace::{self, TraceFilter},
    sys::fdqueue,
    sys::procinfo::{self, Clock},
};

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    Ok(tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    })
}

fn load_probes(config: KernelConfig, preference: HookPreference) -> anyhow::Result<Probes> {
    let probes = Probes::load(config, preference)?;
    for line in probes::report_lines(probes.report()) {
        tracing::info!("{line}");
    }
    let hooks: Vec<_> = probes.hooks().iter().map(|h| h.attach_point.as_str()).collect();
    tracing::info!("{} hooks attached, {} tier: {}", hooks.len(), probes.report().tier.as_str(), hooks.join(", "));
    Ok(probes)
}

/// Starts the pipeline's event source: the self-test's backlog, then the
/// ring buffer.
fn start_source(probes: &mut Probes) -> anyhow::Result<tokio::sync::mpsc::Receiver<source::Batch>> {
    let backlog = probes.take_backlog();
    let (batches, _reader) =
        source::spawn_ringbuf_reader(probes.take_events()?, backlog).context("polling the event ring buffer")?;
    Ok(batches)
}

/// `sigwake check`: load, attach, self-test, report, detach.
pub async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let probes = Probes::load(KernelConfig::DEFAULT, args.hooks)?;
    let report = probes.report();
    if args.json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        for line in probes::report_lines(report) {
            println!("{line}");
        }
    }
    Ok(())
}

/// Feeds aya-log records from the kernel programs into `log`/`tracing`.
fn spawn_kernel_logger(probes: &mut Probes) {
    let Some(logger) = probes.take_logger() else { return };
    // SAFETY: the map's fd is owned by `logger`, which the AsyncFd owns and
    // never replaces, so it stays open and the same for the AsyncFd's life.
    let registered = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut fd) = registered else { return };
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

pub async fn trace(args: TraceArgs) -> anyhow::Result<()> {
    let mut config = KernelConfig::DEFAULT;
    if !args.signals.is_empty() {
        // Filter in the kernel too: fewer events cross the ring buffer.
        config.signal_mask = args.signals.iter().fold(0u64, |m, s| m | 1u64 << (s.0 - 1));
    }
    let mut probes = load_probes(config, args.hooks)?;
    spawn_kernel_logger(&mut probes);
    let mut batches = start_source(&mut probes)?;
    // The kernel reports exits of watched processes; mark the --pid ones
    // before checking which are alive, so that no exit falls in between.
    let mut watched = probes.take_watched_pids()?;
    for pid in &args.pids {
        watched.insert(pid, 0, 0).with_context(|| format!("watching pid {pid}"))?;
    }
    // With --until-exit: the --pid processes still alive.
    let mut alive: Vec<u32> = args.pids.iter().copied().filter(|p| procinfo::start_time(*p).is_some()).collect();
    if args.until_exit && alive.is_empty() {
        return Ok(());
    }
    let filter = TraceFilter { pids: args.pids, signals: args.signals, only_drops: args.only_drops };
    let clock = Clock::now();
    let stdout = std::io::stdout();
    let mut decode_errors = 0u64;
    let mut reported_lost = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    eprintln!("sigwake: tracing; stop with Ctrl-C");
    if args.format == Format::Text {
        println!("{}", trace::TEXT_HEADER);
    }
    loop {
        tokio::select! {
            why = &mut shutdown => { tracing::info!("{}: stopping", why?); break; }
            _ = tick.tick() => {
                let lost = probes.counters().ringbuf_lost;
                if lost > reported_lost {
                    tracing::warn!("{} events lost in the kernel (ring buffer full)", lost - reported_lost);
                    reported_lost = lost;
                }
            }
            batch = batches.recv() => {
                let Some(batch) = batch else { break };
                let mut out = stdout.lock();
                for item in batch {
                    let ev = match item {
                        Ok(ev) => ev,
                        Err(e) => {
                            decode_errors += 1;
                            tracing::debug!("undecodable event: {e}");
                            continue;
                        }
                    };
                    if let EventBody::ProcessExit(e) = &ev.body {
                        alive.retain(|p| *p != e.task.pid);
                    }
                    // The target's process is a /proc read: only for events
                    // that can still be shown.
                    let target_pid = match &ev.body {
                        EventBody::SignalGenerate(g) if filter.matches_except_pids(&ev) => procinfo::tgid_of(g.target_tid),
                        _ => None,
                    };
                    if !filter.matches(&ev, target_pid) {
                        continue;
                    }
                    let line = match args.format {
                        Format::Json => trace::to_json(&ev, &clock, target_pid, None).to_string(),
                        Format::Text => trace::to_text(&ev, &clock, target_pid, None),
                    };
                    // A closed stdout (`| head`) ends the trace quietly.
                    if writeln!(out, "{line}").is_err() {
                        return Ok(());
                    }
                }
                if out.flush().is_err() || (args.until_exit && alive.is_empty()) {
                    return Ok(());
                }
            }
        }
    }
    if decode_errors > 0 {
        tracing::warn!("{decode_errors} kernel events could not be decoded");
    }
    Ok(())
}

/// The kernel's WATCHED_PIDS map as the registry's watched-set mirror.
struct KernelWatched(aya::maps::HashMap<aya::maps::MapData, u32, u32>);

impl WatchedSink for KernelWatched {
    fn watch(&mut self, pid: u32) {
        if let Err(e) = self.0.insert(pid, 0, 0) {
            tracing::warn!("cannot add pid {pid} to the kernel's watched set: {e}");
        }
    }
    fn unwatch(&mut self, pid: u32) {
        let _ = self.0.remove(&pid);
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        socket: args.socket.clone(),
        state_dir: args.state_dir.clone(),
        dry_run: args.dry_run,
        no_discovery: args.no_discovery,
    };
    let config = match &args.config {
        Some(path) => Config::load(path, &overrides)?,
        None => Config::defaults(&overrides),
    };
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
    let watched = KernelWatched(probes.take_watched_pids()?);
    let registry = Arc::new(Mutex::new(Registry::new(Box::new(watched), Box::new(RealProc), config.max_actors)));
    let mut discovery = Discovery::new(config.selectors.clone(), config.discovery);
    Discovery::apply(discovery.scan(false), &mut lock(&registry));
    let mut lost_seen = 0u64;
    let store = incidents::Store::open(&config.state_dir)?;
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
    });
    let server = tokio::spawn(http::serve(listener, state.clone()));
    tokio::spawn(registration::serve(socket, registry.clone()));
    tracing::info!(
        "serving /metrics, /healthz, /readyz, /actors and /incidents on http://{}; registration socket {}; state in {}",
        config.listen,
        config.socket.display(),
        config.state_dir.display()
    );
    let mut batches = start_source(&mut probes)?;
    state.ready.store(true, Ordering::Release);

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The detector decides at confirm deadlines; 50 ms keeps that decision
    // within 50 ms of the deadline.
    // It runs only while some actor is watched or starving, so an idle
    // agent wakes once a second, not twenty times.
    let mut detect_tick = tokio::time::interval(Duration::from_millis(50));
    detect_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outputs = Vec::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            why = &mut shutdown => { tracing::info!("{}: detaching and stopping", why?); break; }
            _ = detect_tick.tick(), if !detector.is_idle() => {
                let now = procinfo::monotonic_ns();
                let active = detector.active();
                let fds: HashMap<u32, Option<i32>> = {
                    let reg = lock(&registry);
                    active.iter().map(|p| (*p, reg.get(*p).and_then(|a| a.wakeup_fd))).collect()
                };
                let mut probe = |pid: u32| -> Option<u64> {
                    let fill = fdqueue::wakeup_fill(pid, fds.get(&pid).copied().flatten()?)?;
                    if let Some(cap) = fill.capacity_hint.filter(|c| *c > 0) {
                        let name = lock(&registry).name_of(pid).map(str::to_string);
                        metrics.wakeup_fill_ratio
                            .get_or_create(&ActorLabel { actor: metrics.actor_labels.label(name.as_deref()) })
                            .set((fill.queued as f64 / cap as f64).min(1.0));
                    }
                    Some(fill.queued)
                };
                detector.tick(now, &mut probe, &mut outputs);
                apply_detector_outputs(&mut outputs, &registry, &engine, &metrics);
            }
            _ = tick.tick() => {
                let counters = probes.counters();
                // Lost events may include execs: look at everything again.
                let found = discovery.scan(counters.ringbuf_lost > lost_seen);
                lost_seen = counters.ringbuf_lost;
                let mut reg = lock(&registry);
                Discovery::apply(found, &mut reg);
                // Exits the kernel could not report (lost events) end
                // incidents too.
                let gone = reg.sweep();
                for pid in gone {
                    detector.forget(pid);
                    engine.on_exited(pid);
                }
                metrics.set_actor_counts(&reg.counts());
                drop(reg);
                metrics.update_kernel_counters(counters);
                metrics.kernel_open_windows.set(probes.open_windows() as i64);
                metrics.update_bpf_stats(&probes.program_stats());
                metrics.update_process();
            }
            batch = batches.recv() => {
                let Some(batch) = batch else { break };
                let mut reg = lock(&registry);
                for item in batch {
                    let ev = match item {
                        Ok(ev) => ev,
                        Err(e) => { metrics.decode_error(e.reason()); continue; }
                    };
                    match &ev.body {
                        EventBody::HandlerWrite(w) => discovery.on_handler_write(&mut reg, w),
                        EventBody::ProcessExec(e) => {
                            let found = discovery.on_exec(e.task.pid);
                            Discovery::apply(found, &mut reg);
                            continue;
                        }
                        _ => {}
                    }
                    let actor = reg.observe(&ev);
                    let runtime = reg.get(ev.subject_pid()).map_or("unknown", |a| a.runtime.as_str());
                    metrics.observe(&ev, actor.as_deref(), runtime);
                    if actor.is_some() {
                        feed_detector(&mut detector, &reg, &config, &default_policy, &ev, &mut outputs);
                    }
                    if let EventBody::HandlerWrite(w) = &ev.body
                        && w.is_dropped_wakeup()
                    {
                        tracing::warn!(
                            pid = w.task.pid, tid = w.task.tid, fd = w.fd,
                            signal = %w.signal, errno = w.errno().unwrap_or(0),
                            actor = actor.as_deref().unwrap_or("-"),
                            "signal handler could not write its wakeup byte: the event loop did not see {}",
                            w.signal
                        );
                    }
                }
                drop(reg);
                apply_detector_outputs(&mut outputs, &registry, &engine, &metrics);
            }
        }
        if server.is_finished() {
            anyhow::bail!("the metrics endpoint stopped unexpectedly");
        }
    }
    state.ready.store(false, Ordering::Release);
    drop(probes);
    Ok(())
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
    let input = match &ev.body {
        EventBody::SignalDeliver(d)
            if matches!(d.disposition, Disposition::Handler(_)) && Registry::is_stop_signal(d.signal) =>
        {
            Input::StopSignal { sig: d.signal.0 }
        }
        EventBody::HandlerWrite(w) if w.count == 1 && w.is_dropped_wakeup() => Input::WakeupDropped { sig: w.signal.0 },
        EventBody::HandlerWrite(w) if w.count == 1 => Input::WakeupWritten,
        _ => return,
    };
    let policy = actor.policy.as_ref().and_then(|p| config.policies.get(p)).unwrap_or(default_policy);
    let window = policy.confirm_window(actor.runtime).as_nanos() as u64;
    detector.input(pid, actor.runtime, window, ev.mono_ns, input, out);
}

fn apply_detector_outputs(out: &mut Vec<Output>, registry: &Mutex<Registry>, engine: &Arc<Engine>, metrics: &Metrics) {
    for o in out.drain(..) {
        match o {
            Output::Dropped { pid } => lock(registry).set_state(pid, ActorState::DroppedWakeup),
            Output::Lost { pid, sig } => {
                let name = lock(registry).name_of(pid).unwrap_or("-").to_string();
                tracing::warn!(
                    actor = name,
                    pid,
                    "asyncio lost a {} callback: its wakeup byte was dropped",
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
                metrics.wakeup_fill_ratio.remove(&ActorLabel { actor: metrics.actor_labels.label(name.as_deref()) });
            }
            Output::Exited { pid } => engine.on_exited(pid),
        }
    }
}

/// `sigwake actors`: asks the running agent over its socket.
pub fn actors(args: ActorsArgs) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut stream = std::os::unix::net::UnixStream::connect(&args.socket).with_context(|| {
        format!(
            "connecting to the agent at {}; is `sigwake run` running (or does it use another --socket)?",
            args.socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"{\"op\":\"list\"}\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).context("reading the agent's reply")?;
    let reply: serde_json::Value = serde_json::from_str(&line).context("the agent's reply is not JSON")?;
    if reply["ok"] != true {
        anyhow::bail!("the agent refused: {}", reply["error"]);
    }
    let actors = reply["actors"].as_array().cloned().unwrap_or_default();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&actors)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:<10} {:<15} {:<11} {:<9} {:<6} {:<16} PARENT",
        "NAME", "PID", "RUNTIME", "STATE", "SOURCE", "POLICY", "DROPS", "LAST SEEN"
    );
    for a in actors {
        let s = |k: &str| {
            a[k].as_str()
                .map(str::to_string)
                .unwrap_or_else(|| if a[k].is_null() { "-".into() } else { a[k].to_string() })
        };
        println!(
            "{:<24} {:<8} {:<10} {:<15} {:<11} {:<9} {:<6} {:<16} {}",
            s("name"),
            s("pid"),
            s("runtime"),
            s("state"),
            s("source"),
            s("policy"),
            s("drops"),
            s("last_seen").get(11..19).unwrap_or("-"),
            s("parent")
        );
    }
    Ok(())
}

/// `sigwake incidents`: reads the incident state the agent keeps.
pub fn incidents(args: IncidentsArgs) -> anyhow::Result<()> {
    let path = args.state_dir.join("incidents.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no incidents recorded in {}", args.state_dir.display());
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let list: Vec<incidents::Incident> =
        serde_json::from_str(&text).with_context(|| format!("{} is not an incident list", path.display()))?;
    let list: Vec<_> = list.into_iter().filter(|i| !args.open || i.status.is_open()).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<5} {:<20} {:<8} {:<8} {:<11} {:<9} {:<6} {:<27} STEPS",
        "ID", "ACTOR", "PID", "RUNTIME", "STATUS", "POLICY", "DROPS", "OPENED"
    );
    for i in list.iter().rev() {
        let steps: Vec<String> = i.steps.iter().map(|s| format!("{}:{}", s.action, s.outcome)).collect();
        let status = serde_json::to_value(i.status)?.as_str().unwrap_or("-").to_string();
        println!(
            "{:<5} {:<20} {:<8} {:<8} {:<11} {:<9} {:<6} {:<27} {}",
            i.id,
            i.actor,
            i.pid,
            i.runtime,
            status,
            i.policy.as_deref().unwrap_or("observe"),
            i.evidence.drops,
            i.opened,
            steps.join(" → ")
        );
    }
    Ok(())
}
