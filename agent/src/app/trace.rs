//! `sigwake trace`: kernel events printed as they come, filtered.

use std::{io::Write as _, time::Duration};

use anyhow::Context as _;
use sigwake_common::Config as KernelConfig;

use super::{load_probes, shutdown_signal, spawn_kernel_logger, start_source};
use crate::{
    cli::{Format, TraceArgs},
    kernel::{
        events::EventBody,
        restorer_hooks::{self, RestorerDemand},
    },
    serve::trace::{self, TraceFilter},
    sys::procinfo::{self, Clock},
};

pub async fn trace(args: TraceArgs) -> anyhow::Result<()> {
    let mut config = KernelConfig::DEFAULT;
    if !args.signals.is_empty() {
        // Filter in the kernel too: fewer events cross the ring buffer.
        config.signal_mask = args.signals.iter().fold(0u64, |m, s| m | 1u64 << (s.0 - 1));
    }
    let mut probes = load_probes(config, args.hooks)?;
    // A trace shows every process's lost wakeups, pipes' too: on the socket
    // tier that takes its on-demand syscall hook, for the whole trace.
    if probes.set_pipe_write_hooks(true).context("attaching the hook for pipe and eventfd writes")? {
        tracing::info!(
            "the syscall hook for pipe and eventfd writes is attached while tracing (every syscall on this host takes \
             the tracing slow path meanwhile)"
        );
    }
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
    // Restorers of libcs other than the agent's, hooked as they show up.
    let mut restorers = RestorerDemand::default();
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
                let counters = probes.counters();
                let lost = counters.total_lost();
                if lost > reported_lost {
                    let drops = counters.lost_of(sigwake_common::kind::HANDLER_WRITE);
                    tracing::warn!(
                        "{} events lost in the kernel (ring buffer full), {drops} of them handler writes so far",
                        lost - reported_lost
                    );
                    reported_lost = lost;
                }
            }
            batch = batches.recv() => {
                let Some(batch) = batch else { return Err(super::source_ended()) };
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
                    if filter.covers_process(ev.subject_pid()) {
                        restorers.note(&ev);
                    }
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
                drop(out);
                if restorers.is_pending() {
                    restorer_hooks::log(&super::blocking(|| restorers.hook_pending(&mut probes)));
                }
            }
        }
    }
    if decode_errors > 0 {
        tracing::warn!("{decode_errors} kernel events could not be decoded");
    }
    Ok(())
}
