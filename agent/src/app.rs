//! The commands: wire the stages together (probes → source → decoder →
//! consumers) and own the process lifecycle (start-up report, shutdown on
//! SIGINT/SIGTERM, detach on drop).

use std::{
    io::Write as _,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use sigwake_common::Config;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    cli::{Format, RunArgs, TraceArgs},
    events::EventBody,
    http::{self, HttpState},
    metrics::{Metrics, NO_ACTOR},
    probes::Probes,
    procinfo::{self, Clock},
    source,
    trace::{self, TraceFilter},
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

fn load_probes(config: Config) -> anyhow::Result<Probes> {
    let probes = Probes::load(config)?;
    let hooks: Vec<_> = probes.hooks().iter().map(|h| h.attach_point.as_str()).collect();
    tracing::info!("{} hooks attached: {}", hooks.len(), hooks.join(", "));
    tracing::info!(
        "using tracepoints (kprobe/fentry hooks are not used: tracepoints are stable across kernels and load everywhere)"
    );
    Ok(probes)
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
    let mut config = Config::DEFAULT;
    if !args.signals.is_empty() {
        // Filter in the kernel too: fewer events cross the ring buffer.
        config.signal_mask = args.signals.iter().fold(0u64, |m, s| m | 1u64 << (s.0 - 1));
    }
    let mut probes = load_probes(config)?;
    spawn_kernel_logger(&mut probes);
    let (mut batches, _reader) =
        source::spawn_ringbuf_reader(probes.take_events()?).context("polling the event ring buffer")?;
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
                    let target_pid = match &ev.body {
                        EventBody::SignalGenerate(g) => procinfo::tgid_of(g.target_tid),
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

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.config {
        anyhow::bail!(
            "--config {}: configuration files are not supported by this version yet; run without it",
            path.display()
        );
    }
    let listener = http::bind(args.listen).await?;
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(HttpState { metrics: metrics.clone(), ready: false.into() });
    let server = tokio::spawn(http::serve(listener, state.clone()));
    tracing::info!("serving /metrics, /healthz and /readyz on http://{}", args.listen);

    let mut probes = load_probes(Config::DEFAULT)?;
    spawn_kernel_logger(&mut probes);
    metrics.attached_programs.set(probes.hooks().len() as i64);
    let (mut batches, _reader) =
        source::spawn_ringbuf_reader(probes.take_events()?).context("polling the event ring buffer")?;
    state.ready.store(true, Ordering::Release);

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            why = &mut shutdown => { tracing::info!("{}: detaching and stopping", why?); break; }
            _ = tick.tick() => metrics.update_kernel_counters(probes.counters()),
            batch = batches.recv() => {
                let Some(batch) = batch else { break };
                for item in batch {
                    match item {
                        Ok(ev) => {
                            metrics.observe(&ev, NO_ACTOR);
                            if let EventBody::HandlerWrite(w) = &ev.body
                                && w.is_dropped_wakeup()
                            {
                                tracing::warn!(
                                    pid = w.task.pid, tid = w.task.tid, fd = w.fd,
                                    signal = %w.signal, errno = w.errno().unwrap_or(0),
                                    "signal handler could not write its wakeup byte: the event loop did not see {}",
                                    w.signal
                                );
                            }
                        }
                        Err(e) => metrics.decode_error(e.reason()),
                    }
                }
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
