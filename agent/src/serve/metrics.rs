//! Metrics: one explicit prometheus-client registry, OpenMetrics text.
//!
//! Labels are bounded: actor name (capped by the registry), signal name,
//! result, errno name — never pid, tid or comm.

use std::{
    collections::HashSet,
    sync::{Mutex, atomic::AtomicU64},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::{Registry, Unit},
};

use crate::{
    kernel::events::{Event, EventBody},
    kernel::probes::{KernelCounters, ProgramStats},
    serve::trace::errno_name,
};

/// Actor label for processes the registry does not know.
pub const NO_ACTOR: &str = "none";
/// Actor label for names beyond the cardinality cap.
pub const OTHER_ACTORS: &str = "_other";

type GaugeF64 = Gauge<f64, AtomicU64>;
type CounterF64 = Counter<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActorLabel {
    pub actor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
    pub runtime: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActorRuntimeLabels {
    pub actor: String,
    pub runtime: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeLabels {
    pub runtime: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EscalationLabels {
    pub actor: String,
    pub tier: String,
    pub action: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

/// A state file (`incidents`: incidents.json, `audit`: audit.jsonl).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabels {
    pub file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub job: String,
    pub tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
}

/// Caps the distinct actor label values; later names fold into `_other`.
pub struct ActorLabelGuard {
    max: usize,
    known: Mutex<HashSet<String>>,
    folded: Counter,
}

impl ActorLabelGuard {
    pub fn label(&self, actor: Option<&str>) -> String {
        let Some(name) = actor else { return NO_ACTOR.to_string() };
        let mut known = crate::lock(&self.known);
        if known.contains(name) {
            return name.to_string();
        }
        if known.len() < self.max {
            known.insert(name.to_string());
            return name.to_string();
        }
        self.folded.inc();
        OTHER_ACTORS.to_string()
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0,
    ]
    .into_iter()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GeneratedLabels {
    pub actor: String,
    pub signal: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveredLabels {
    pub actor: String,
    pub signal: String,
    pub disposition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub actor: String,
    pub runtime: String,
    pub signal: String,
    pub errno: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabels {
    pub signal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub actor_labels: ActorLabelGuard,
    pub actors: Family<StateLabels, Gauge>,
    pub wakeup_fill_ratio: Family<ActorLabel, GaugeF64>,
    pub starvation_incidents: Family<ActorRuntimeLabels, Counter>,
    pub incidents_active: Gauge,
    pub starvation_duration: Family<RuntimeLabels, Histogram>,
    pub escalation_actions: Family<EscalationLabels, Counter>,
    pub detection_latency: Family<StageLabels, Histogram>,
    pub bpf_run_count: Family<ProgramLabels, Counter>,
    pub bpf_recursion_misses: Family<ProgramLabels, Counter>,
    pub bpf_run_time: Family<ProgramLabels, CounterF64>,
    last_bpf: Mutex<std::collections::HashMap<String, ProgramStats>>,
    process_cpu: CounterF64,
    last_cpu_ticks: Mutex<u64>,
    process_rss: Gauge,
    process_fds: Gauge,
    pub signals_generated: Family<GeneratedLabels, Counter>,
    pub signals_delivered: Family<DeliveredLabels, Counter>,
    pub wakeup_writes_dropped: Family<DropLabels, Counter>,
    pub handler_writes: Family<SignalLabels, Counter>,
    pub process_exits: Counter,
    pub events: Counter,
    pub decode_errors: Family<ReasonLabels, Counter>,
    pub kernel_lost_events: Family<KindLabels, Counter>,
    pub state_write_errors: Family<FileLabels, Counter>,
    pub kernel_handler_map_full: Counter,
    pub kernel_stale_windows: Counter,
    pub attached_programs: Gauge,
    pub hook_tier: Family<HookLabels, Gauge>,
    pub kernel_open_windows: Gauge,
    pub syscall_hooks_attached: Gauge,
    pub restorer_uprobes: Gauge,
    last_kernel: std::sync::Mutex<KernelCounters>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_actor_label_cap(200)
    }

    pub fn with_actor_label_cap(max_actor_labels: usize) -> Self {
        let mut root = Registry::default();
        let process_cpu = CounterF64::default();
        root.register_with_unit(
            "process_cpu",
            "Total user and system CPU time spent",
            Unit::Seconds,
            process_cpu.clone(),
        );
        let process_rss = Gauge::default();
        root.register_with_unit("process_resident_memory", "Resident memory size", Unit::Bytes, process_rss.clone());
        let process_fds = Gauge::default();
        root.register("process_open_fds", "Number of open file descriptors", process_fds.clone());
        let process_start = GaugeF64::default();
        process_start.set(process_start_time().unwrap_or(0.0));
        root.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            process_start,
        );
        let registry = root.sub_registry_with_prefix("sigwake");
        let folded = Counter::default();
        registry.register(
            "actor_labels_folded",
            "Actor label values folded into actor=\"_other\" because the distinct-actor cap was reached",
            folded.clone(),
        );
        let actors = Family::default();
        registry.register("actors", "Actors in the registry, by state and runtime", actors.clone());
        let wakeup_fill_ratio = Family::default();
        registry.register(
            "actor_wakeup_fill_ratio",
            "Undrained bytes in the actor's wakeup fd as a fraction of its capacity (1 = full: signals are being lost)",
            wakeup_fill_ratio.clone(),
        );
        let starvation_incidents = Family::default();
        registry.register(
            "starvation_incidents",
            "Confirmed loop starvations (a stop signal the loop did not act on within the confirm window)",
            starvation_incidents.clone(),
        );
        let incidents_active = Gauge::default();
        registry.register(
            "starvation_incidents_active",
            "Starvation incidents not yet resolved",
            incidents_active.clone(),
        );
        let starvation_duration = Family::<RuntimeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0])
        });
        registry.register_with_unit(
            "starvation_duration",
            "Time from the first dropped wakeup to the incident's end (recovery, exit or kill)",
            Unit::Seconds,
            starvation_duration.clone(),
        );
        let escalation_actions = Family::default();
        registry.register(
            "escalation_actions",
            "Escalation steps taken, by tier, action and outcome (ok, failed, skipped, dry_run)",
            escalation_actions.clone(),
        );
        let detection_latency =
            Family::<StageLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register_with_unit(
            "detection_latency",
            "Latency by stage: event (failed write to agent), confirm (first drop to starving confirmed), action (confirmed to first action)",
            Unit::Seconds,
            detection_latency.clone(),
        );
        let bpf_recursion_misses = Family::default();
        registry.register(
            "bpf_program_recursion_misses",
            "Times the kernel skipped a program because it was already running on that CPU: events it never saw",
            bpf_recursion_misses.clone(),
        );
        let bpf_run_count = Family::default();
        registry.register(
            "bpf_program_run_count",
            "Runs of each kernel program (needs sysctl kernel.bpf_stats_enabled=1)",
            bpf_run_count.clone(),
        );
        let bpf_run_time = Family::default();
        registry.register_with_unit(
            "bpf_program_run_time",
            "Time spent in each kernel program (needs sysctl kernel.bpf_stats_enabled=1)",
            Unit::Seconds,
            bpf_run_time.clone(),
        );
        let signals_generated = Family::default();
        registry.register(
            "signals_generated",
            "Signals sent on this host, by signal and the kernel's result (delivered, ignored, already_pending, overflow_fail, lose_info)",
            signals_generated.clone(),
        );
        let signals_delivered = Family::default();
        registry.register(
            "signals_delivered",
            "Signals dequeued by a thread, by disposition (handler, default, ignore)",
            signals_delivered.clone(),
        );
        let wakeup_writes_dropped = Family::default();
        registry.register(
            "wakeup_writes_dropped",
            "Writes from inside a signal handler that failed (the event loop's wakeup byte was lost), by actor, signal and errno",
            wakeup_writes_dropped.clone(),
        );
        let handler_writes = Family::default();
        registry.register(
            "handler_writes",
            "Writes from inside a signal handler that succeeded, by signal",
            handler_writes.clone(),
        );
        let process_exits = Counter::default();
        registry.register(
            "process_exits",
            "Exits of processes that ran a signal handler or are watched",
            process_exits.clone(),
        );
        let events = Counter::default();
        registry.register("events", "Kernel events decoded", events.clone());
        let decode_errors = Family::default();
        registry.register(
            "decode_errors",
            "Kernel event records that could not be decoded, by reason",
            decode_errors.clone(),
        );
        let kernel_lost_events = Family::default();
        registry.register(
            "kernel_lost_events",
            "Events the kernel programs could not put on the ring buffer because it was full, by event kind (handler_write: lost wakeup drops)",
            kernel_lost_events.clone(),
        );
        let state_write_errors = Family::default();
        registry.register(
            "state_write_errors",
            "Failed writes of the state directory's incidents.json and audit.jsonl, by file (full or read-only): detection and escalation go on, but a restarted agent may not know what was done",
            state_write_errors.clone(),
        );
        let kernel_handler_map_full = Counter::default();
        registry.register(
            "kernel_handler_windows_untracked",
            "Signal handler entries not tracked because the in-kernel handler map was full",
            kernel_handler_map_full.clone(),
        );
        let kernel_stale_windows = Counter::default();
        registry.register(
            "kernel_handler_windows_stale",
            "Signal handler windows closed by timeout because no rt_sigreturn was seen",
            kernel_stale_windows.clone(),
        );
        let kernel_open_windows = Gauge::default();
        registry.register(
            "kernel_open_handler_windows",
            "Threads the kernel programs see inside a signal handler now (stuck above 0: a handler that never returned, e.g. siglongjmp)",
            kernel_open_windows.clone(),
        );
        let attached_programs = Gauge::default();
        registry.register("attached_programs", "Kernel programs attached by this agent", attached_programs.clone());
        let syscall_hooks_attached = Gauge::default();
        registry.register(
            "syscall_hooks_attached",
            "1 while a syscall hook of this agent is attached (every syscall on the host then takes the tracing slow path): always on the syscall_tracepoint tier; on the socket tier only while an actor's wakeup is a pipe or eventfd, or with --discover-pipes",
            syscall_hooks_attached.clone(),
        );
        let restorer_uprobes = Gauge::default();
        registry.register(
            "restorer_uprobes",
            "Signal restorer files (a libc each: the host's, one per container image) whose handler returns the socket tier sees through a uprobe; 0 on tiers that see rt_sigreturn itself",
            restorer_uprobes.clone(),
        );
        let hook_tier = Family::default();
        registry.register(
            "hook_tier",
            "1 for the hook tier serving each job (fentry, fexit, raw_tracepoint, uprobe, tracepoint, syscall_tracepoint), chosen and self-tested at start-up",
            hook_tier.clone(),
        );
        let start_time = Gauge::<f64, AtomicU64>::default();
        start_time.set(crate::sys::procinfo::realtime_ns() as f64 / 1e9);
        registry.register("start_time_seconds", "Unix time the agent started", start_time);
        registry.register(
            "build",
            "Agent build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_string())]),
        );
        Metrics {
            registry: root,
            actor_labels: ActorLabelGuard { max: max_actor_labels, known: Mutex::new(HashSet::new()), folded },
            actors,
            wakeup_fill_ratio,
            starvation_incidents,
            incidents_active,
            starvation_duration,
            escalation_actions,
            detection_latency,
            bpf_run_count,
            bpf_recursion_misses,
            bpf_run_time,
            last_bpf: Default::default(),
            process_cpu,
            last_cpu_ticks: Mutex::new(0),
            process_rss,
            process_fds,
            signals_generated,
            signals_delivered,
            wakeup_writes_dropped,
            handler_writes,
            process_exits,
            events,
            decode_errors,
            kernel_lost_events,
            state_write_errors,
            kernel_handler_map_full,
            kernel_stale_windows,
            attached_programs,
            hook_tier,
            kernel_open_windows,
            syscall_hooks_attached,
            restorer_uprobes,
            last_kernel: Default::default(),
        }
    }

    /// Publishes which tier serves each job.
    pub fn set_syscall_hooks(&self, attached: bool) {
        self.syscall_hooks_attached.set(i64::from(attached));
    }

    pub fn set_hooks(&self, report: &crate::kernel::tiers::HookReport) {
        for j in &report.jobs {
            self.hook_tier.get_or_create(&HookLabels { job: j.job.as_str().into(), tier: j.tier.into() }).set(1);
        }
    }

    /// Counts one decoded event. `actor` is the registry's name for the
    /// subject process (None: not an actor), `runtime` its runtime.
    pub fn observe(&self, ev: &Event, actor: Option<&str>, runtime: &str) {
        self.events.inc();
        match &ev.body {
            EventBody::SignalGenerate(g) => {
                self.signals_generated
                    .get_or_create(&GeneratedLabels {
                        actor: self.actor_labels.label(actor),
                        signal: g.signal.name(),
                        result: g.result.as_str().into(),
                    })
                    .inc();
            }
            EventBody::SignalDeliver(d) => {
                self.signals_delivered
                    .get_or_create(&DeliveredLabels {
                        actor: self.actor_labels.label(actor),
                        signal: d.signal.name(),
                        disposition: d.disposition.as_str().into(),
                    })
                    .inc();
            }
            EventBody::HandlerWrite(w) => match w.errno() {
                Some(errno) => {
                    let latency = crate::sys::procinfo::monotonic_ns().saturating_sub(ev.mono_ns) as f64 / 1e9;
                    self.detection_latency.get_or_create(&StageLabels { stage: "event".into() }).observe(latency);
                    self.wakeup_writes_dropped
                        .get_or_create(&DropLabels {
                            actor: self.actor_labels.label(actor),
                            runtime: runtime.to_string(),
                            signal: w.signal.name(),
                            errno: errno_name(errno),
                        })
                        .inc();
                }
                None => {
                    self.handler_writes.get_or_create(&SignalLabels { signal: w.signal.name() }).inc();
                }
            },
            EventBody::HandlerReturn(_) => {}
            EventBody::ProcessExit(_) => {
                self.process_exits.inc();
            }
            EventBody::ProcessExec(_) => {}
        }
    }

    pub fn decode_error(&self, reason: &str) {
        self.decode_errors.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
    }

    /// Moves the kernel-side counters forward to `now` (they are
    /// cumulative in the kernel; only the difference is added).
    pub fn update_kernel_counters(&self, now: KernelCounters) {
        let mut last = crate::lock(&self.last_kernel);
        for (k, (now_lost, last_lost)) in now.lost.iter().zip(last.lost.iter()).enumerate() {
            // Every kind is written, so each series exists (at 0) from the start.
            self.kernel_lost_events
                .get_or_create(&KindLabels { kind: crate::kernel::events::kind_name(k as u32).into() })
                .inc_by(now_lost.saturating_sub(*last_lost));
        }
        self.kernel_handler_map_full.inc_by(now.handler_map_full.saturating_sub(last.handler_map_full));
        self.kernel_stale_windows.inc_by(now.stale_windows.saturating_sub(last.stale_windows));
        *last = now;
    }

    /// Sets the actors-by-state gauge from registry counts; every known
    /// state/runtime pair is written so that emptied states read 0.
    pub fn set_actor_counts(
        &self,
        counts: &std::collections::HashMap<
            (crate::actors::registry::ActorState, crate::actors::registry::Runtime),
            i64,
        >,
    ) {
        use crate::actors::registry::{ActorState, Runtime};
        for state in ActorState::ALL {
            for runtime in Runtime::ALL {
                let n = counts.get(&(state, runtime)).copied().unwrap_or(0);
                let labels = StateLabels { state: state.as_str().into(), runtime: runtime.as_str().into() };
                if n > 0 || self.actors.get(&labels).is_some() {
                    self.actors.get_or_create(&labels).set(n);
                }
            }
        }
    }

    /// Adds the kernel's per-program run counts and times since the last call.
    pub fn update_bpf_stats(&self, stats: &std::collections::HashMap<&'static str, ProgramStats>) {
        let mut last = crate::lock(&self.last_bpf);
        for (name, now) in stats {
            let before = last.get(*name).copied().unwrap_or_default();
            let labels = ProgramLabels { program: name.to_string() };
            self.bpf_run_count.get_or_create(&labels).inc_by(now.run_count.saturating_sub(before.run_count));
            self.bpf_run_time.get_or_create(&labels).inc_by(now.run_ns.saturating_sub(before.run_ns) as f64 / 1e9);
            if let Some(misses) = now.recursion_misses {
                let before = before.recursion_misses.unwrap_or(0);
                self.bpf_recursion_misses.get_or_create(&labels).inc_by(misses.saturating_sub(before));
            }
            last.insert(name.to_string(), *now);
        }
    }

    /// Reads this process's CPU time, RSS and open fds from /proc/self.
    pub fn update_process(&self) {
        if let Ok(stat) = crate::sys::procinfo::stat_at(std::path::Path::new("/proc/self/stat")) {
            let ticks = stat.utime + stat.stime;
            let mut last = crate::lock(&self.last_cpu_ticks);
            self.process_cpu.inc_by(ticks.saturating_sub(*last) as f64 / clock_ticks_per_second());
            *last = ticks;
            let rss_pages = stat.rss_pages as i64;
            // SAFETY: sysconf has no preconditions.
            self.process_rss.set(rss_pages * rustix::param::page_size() as i64);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.process_fds.set(dir.count() as i64);
        }
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

fn clock_ticks_per_second() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// Start time of this process, Unix seconds.
fn process_start_time() -> Option<f64> {
    let ticks = crate::sys::procinfo::start_time(std::process::id())? as f64;
    Some(crate::sys::procinfo::boot_time()? as f64 + ticks / clock_ticks_per_second())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Current value of a counter sample in OpenMetrics text, for tests and
/// the bench: `sample` is the full sample name with labels as written.
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::events::testing::{dropped_wakeup, raw};
    use sigwake_common::kind;

    #[test]
    fn drops_are_counted_by_actor_signal_and_errno() {
        let m = Metrics::new();
        m.observe(&dropped_wakeup(1, 3, 0), Some("fetcher"), "trio");
        m.observe(&dropped_wakeup(1, 3, 0), Some("fetcher"), "trio");
        m.observe(&dropped_wakeup(2, 3, 0), None, "unknown");
        let text = m.encode();
        assert_eq!(
            sample_value(
                &text,
                r#"sigwake_wakeup_writes_dropped_total{actor="fetcher",runtime="trio",signal="SIGINT",errno="EAGAIN"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample_value(
                &text,
                r#"sigwake_wakeup_writes_dropped_total{actor="none",runtime="unknown",signal="SIGINT",errno="EAGAIN"}"#
            ),
            Some(1.0)
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn generate_results_and_deliveries_are_labelled() {
        let m = Metrics::new();
        let mut g = raw(kind::SIGNAL_GENERATE, 2, 1, 1);
        g.arg1 = 2;
        m.observe(&Event::try_from(&g).unwrap(), None, "unknown");
        let mut d = raw(kind::SIGNAL_DELIVER, 15, 1, 1);
        d.arg2 = 0x1000;
        m.observe(&Event::try_from(&d).unwrap(), Some("w"), "trio");
        let text = m.encode();
        assert_eq!(
            sample_value(
                &text,
                r#"sigwake_signals_generated_total{actor="none",signal="SIGINT",result="already_pending"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample_value(&text, r#"sigwake_signals_delivered_total{actor="w",signal="SIGTERM",disposition="handler"}"#),
            Some(1.0)
        );
    }

    #[test]
    fn actor_labels_beyond_the_cap_fold_into_other() {
        let m = Metrics::with_actor_label_cap(2);
        for name in ["a", "b", "c", "d", "a"] {
            m.observe(&dropped_wakeup(1, 3, 0), Some(name), "trio");
        }
        let text = m.encode();
        assert_eq!(
            sample_value(
                &text,
                r#"sigwake_wakeup_writes_dropped_total{actor="_other",runtime="trio",signal="SIGINT",errno="EAGAIN"}"#
            ),
            Some(2.0)
        );
        assert_eq!(sample_value(&text, "sigwake_actor_labels_folded_total"), Some(2.0));
        assert!(text.contains(r#"actor="a""#) && !text.contains(r#"actor="c""#));
    }

    #[test]
    fn process_metrics_are_read() {
        let m = Metrics::new();
        m.update_process();
        let text = m.encode();
        assert!(sample_value(&text, "process_resident_memory_bytes").is_some_and(|v| v > 1e6), "{text}");
        assert!(sample_value(&text, "process_open_fds").is_some_and(|v| v >= 3.0));
        assert!(sample_value(&text, "process_start_time_seconds").is_some_and(|v| v > 1.7e9));
    }

    #[test]
    fn kernel_counters_add_only_the_difference() {
        let m = Metrics::new();
        let mut c = KernelCounters::default();
        c.lost[3] = 5;
        c.lost[1] = 2;
        m.update_kernel_counters(c);
        c.lost[3] = 7;
        m.update_kernel_counters(c);
        let text = m.encode();
        assert!(text.contains(r#"sigwake_kernel_lost_events_total{kind="handler_write"} 7"#), "{text}");
        assert!(text.contains(r#"sigwake_kernel_lost_events_total{kind="signal_generate"} 2"#), "{text}");
        assert!(text.contains(r#"sigwake_kernel_lost_events_total{kind="process_exec"} 0"#), "{text}");
    }
}
