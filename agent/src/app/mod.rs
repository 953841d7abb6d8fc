//! The commands: each wires the stages together for its job and owns the
//! process lifecycle (start-up report, shutdown on SIGINT/SIGTERM, detach on
//! drop).
//!
//! - `run`: the agent — kernel events through the registry, the detector
//!   and the escalation engine, served as metrics ([`run::run`])
//! - `trace`: kernel events printed as they come ([`trace::trace`])
//! - `check`: load, self-test, report, detach ([`check`])
//! - `actors`, `incidents`: clients of a running agent ([`client`])

mod client;
mod run;
mod trace;

use anyhow::Context as _;
use sigwake_common::Config as KernelConfig;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

pub use client::{actors, incidents};
pub use run::run;
pub use trace::trace;

use crate::{
    cli::CheckArgs,
    kernel::{
        probes::{HookPreference, Probes},
        source, tiers,
    },
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
    for line in tiers::report_lines(probes.report()) {
        tracing::info!("{line}");
    }
    let hooks: Vec<_> = probes.hooks().iter().map(|h| h.attach_point.as_str()).collect();
    tracing::info!("{} hooks attached, {} tier: {}", hooks.len(), probes.report().tier.as_str(), hooks.join(", "));
    Ok(probes)
}

/// Starts the pipeline's event source: the self-test's backlog, then the
/// ring buffer.
fn start_source(probes: &mut Probes) -> anyhow::Result<tokio::sync::mpsc::Receiver<source::Batch>> {
    use source::EventSource as _;
    let ring = source::RingSource { ring: probes.take_events()?, backlog: probes.take_backlog() };
    ring.start().context("polling the event ring buffer")
}

/// Drops every capability the agent no longer needs once its programs are
/// attached (sys/caps.rs says which it keeps and why), in every thread, and
/// logs what it kept and dropped.
fn drop_capabilities(probes: &Probes) -> anyhow::Result<()> {
    use crate::sys::caps;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").context("reading the kernel release")?;
    let outcome = caps::drop_after_attach(caps::needed_after_attach(release.trim(), probes.hooks_restorers()))
        .context(
            "dropping the capabilities not needed after attach failed; the agent does not run with more than it needs: \
         report this with the kernel version",
        )?;
    tracing::info!(
        "capabilities after attach: kept {} ; dropped {} ; dropped from the bounding set: {} ({} threads)",
        list(caps::names(outcome.kept)),
        list(caps::names(outcome.dropped)),
        if outcome.dropped_bounding == 0 {
            "none (no CAP_SETPCAP)".to_string()
        } else {
            list(caps::names(outcome.dropped_bounding))
        },
        outcome.threads
    );
    Ok(())
}

fn list(names: Vec<String>) -> String {
    if names.is_empty() { "none".into() } else { names.join(",") }
}

/// The error of a command whose event source ended while it ran: the
/// ring-buffer reader stops only when polling the ring buffer failed (the
/// reason is logged just before) or it panicked.
fn source_ended() -> anyhow::Error {
    anyhow::anyhow!(
        "the kernel event reader stopped (see the error logged above): no more kernel events can be seen, so \
         sigwake stops instead of running blind; restart it (for `sigwake run` under systemd, Restart=on-failure \
         does that) and report the logged error if it happens again"
    )
}

/// `sigwake check`: load, attach, self-test, report, detach.
pub async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let probes = Probes::load(KernelConfig::DEFAULT, args.hooks)?;
    let report = probes.report();
    if args.json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        for line in tiers::report_lines(report) {
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

/// Runs blocking work (/proc walks, fsync, syscalls that may wait) without
/// stalling the async workers: on the multi-threaded runtime the worker
/// hands its other tasks to a fresh one first. Elsewhere (unit tests, the
/// current-thread runtime) it simply runs.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
