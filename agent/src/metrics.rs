//! Metrics: one explicit prometheus-client registry, OpenMetrics text.
//!
//! Labels are bounded: actor name (capped by the registry), signal name,
//! result, errno name — never pid, tid or comm.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use crate::{
    events::{Event, EventBody},
    probes::KernelCounters,
    trace::errno_name,
};

/// Actor label for processes the registry does not know.
pub const NO_ACTOR: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GeneratedLabels {
    pub signal: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveredLabels {
    pub signal: String,
    pub disposition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub actor: String,
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
    pub signals_generated: Family<GeneratedLabels, Counter>,
    pub signals_delivered: Family<DeliveredLabels, Counter>,
    pub wakeup_writes_dropped: Family<DropLabels, Counter>,
    pub handler_writes: Family<SignalLabels, Counter>,
    pub process_exits: Counter,
    pub events: Counter,
    pub decode_errors: Family<ReasonLabels, Counter>,
    pub kernel_lost_events: Counter,
    pub kernel_handler_map_full: Counter,
    pub kernel_stale_windows: Counter,
    pub attached_programs: Gauge,
    start_time: Gauge<f64, AtomicU64>,
    last_kernel: std::sync::Mutex<KernelCounters>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sigwake");
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
        let kernel_lost_events = Counter::default();
        registry.register(
            "kernel_lost_events",
            "Events the kernel programs could not put on the ring buffer because it was full",
            kernel_lost_events.clone(),
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
        let attached_programs = Gauge::default();
        registry.register(
            "attached_programs",
            "Kernel programs attached by this agent",
            attached_programs.clone(),
        );
        let start_time = Gauge::<f64, AtomicU64>::default();
        start_time.set(crate::procinfo::realtime_ns() as f64 / 1e9);
        registry.register(
            "start_time_seconds",
            "Unix time the agent started",
            start_time.clone(),
        );
        registry.register(
            "build",
            "Agent build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_string())]),
        );
        Metrics {
            registry,
            signals_generated,
            signals_delivered,
            wakeup_writes_dropped,
            handler_writes,
            process_exits,
            events,
            decode_errors,
            kernel_lost_events,
            kernel_handler_map_full,
            kernel_stale_windows,
            attached_programs,
            start_time,
            last_kernel: Default::default(),
        }
    }

    /// Counts one decoded event. `actor` is the registry's name for the
    /// subject process, or [`NO_ACTOR`].
    pub fn observe(&self, ev: &Event, actor: &str) {
        self.events.inc();
        match &ev.body {
            EventBody::SignalGenerate(g) => {
                self.signals_generated
                    .get_or_create(&GeneratedLabels {
                        signal: g.signal.name(),
                        result: g.result.as_str().into(),
                    })
                    .inc();
            }
            EventBody::SignalDeliver(d) => {
                self.signals_delivered
                    .get_or_create(&DeliveredLabels {
                        signal: d.signal.name(),
                        disposition: d.disposition.as_str().into(),
                    })
                    .inc();
            }
            EventBody::HandlerWrite(w) => match w.errno() {
                Some(errno) => {
                    self.wakeup_writes_dropped
                        .get_or_create(&DropLabels {
                            actor: actor.to_string(),
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
        }
    }

    pub fn decode_error(&self, reason: &str) {
        self.decode_errors.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
    }

    /// Moves the kernel-side counters forward to `now` (they are
    /// cumulative in the kernel; only the difference is added).
    pub fn update_kernel_counters(&self, now: KernelCounters) {
        let mut last = self.last_kernel.lock().unwrap_or_else(|e| e.into_inner());
        self.kernel_lost_events.inc_by(now.ringbuf_lost.saturating_sub(last.ringbuf_lost));
        self.kernel_handler_map_full.inc_by(now.handler_map_full.saturating_sub(last.handler_map_full));
        self.kernel_stale_windows.inc_by(now.stale_windows.saturating_sub(last.stale_windows));
        *last = now;
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn start_time_seconds(&self) -> f64 {
        self.start_time.get()
    }
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
    use crate::events::testing::{dropped_wakeup, raw};
    use sigwake_common::kind;

    #[test]
    fn drops_are_counted_by_actor_signal_and_errno() {
        let m = Metrics::new();
        m.observe(&dropped_wakeup(1, 3, 0), "fetcher");
        m.observe(&dropped_wakeup(1, 3, 0), "fetcher");
        m.observe(&dropped_wakeup(2, 3, 0), NO_ACTOR);
        let text = m.encode();
        assert_eq!(
            sample_value(&text, r#"sigwake_wakeup_writes_dropped_total{actor="fetcher",signal="SIGINT",errno="EAGAIN"}"#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample_value(&text, r#"sigwake_wakeup_writes_dropped_total{actor="none",signal="SIGINT",errno="EAGAIN"}"#),
            Some(1.0)
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn generate_results_and_deliveries_are_labelled() {
        let m = Metrics::new();
        let mut g = raw(kind::SIGNAL_GENERATE, 2, 1, 1);
        g.arg1 = 2;
        m.observe(&Event::try_from(&g).unwrap(), NO_ACTOR);
        let mut d = raw(kind::SIGNAL_DELIVER, 15, 1, 1);
        d.arg2 = 0x1000;
        m.observe(&Event::try_from(&d).unwrap(), NO_ACTOR);
        let text = m.encode();
        assert_eq!(
            sample_value(&text, r#"sigwake_signals_generated_total{signal="SIGINT",result="already_pending"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample_value(&text, r#"sigwake_signals_delivered_total{signal="SIGTERM",disposition="handler"}"#),
            Some(1.0)
        );
    }

    #[test]
    fn kernel_counters_add_only_the_difference() {
        let m = Metrics::new();
        m.update_kernel_counters(KernelCounters { ringbuf_lost: 5, ..Default::default() });
        m.update_kernel_counters(KernelCounters { ringbuf_lost: 7, ..Default::default() });
        assert_eq!(sample_value(&m.encode(), "sigwake_kernel_lost_events_total"), Some(7.0));
    }
}
