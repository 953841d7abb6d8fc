//! Property tests of the detector on event sequences recorded from real
//! runtimes (`testdata/runtime_traces.json`: `sigwake trace --pid P
//! --until-exit` on the trio, asyncio, uvloop, Twisted, Python self-pipe,
//! Node and tokio fixtures, healthy, briefly busy and starved, reduced to
//! the events the detector is fed: handler entries, handler writes, drops,
//! the exit).
//!
//! A trace does not carry the fill level the agent polls, so each run models
//! it from what the fixture did: a loop that is not starved drains each
//! wakeup write within a drain delay well inside the window; a starved one
//! drains nothing until it exits. proptest then varies what a real agent
//! cannot control: the timing between events (stretched by jitter), when
//! the 50 ms ticks fall, how long the drain takes, and whether the runtime
//! is known from the start or recognised only at the first wakeup write.
//! Whatever the interleaving:
//! - a healthy (or briefly busy) trace never gets a verdict;
//! - a starved trace is confirmed exactly once and never recovers while its
//!   fd holds bytes;
//! - no trace flaps: a confirmation is never followed by another without a
//!   recovery between, and a recovery is only ever seen with the fd drained.

use proptest::prelude::*;
use serde::Deserialize;

use super::detector::{Detector, Input, Output};
use crate::{actors::registry::Runtime, config::Policy};

const MS: u64 = 1_000_000;

#[derive(Debug, Deserialize)]
struct Trace {
    trace: String,
    runtime: Runtime,
    wakeup_fd: i32,
    starved: bool,
    /// `[t_ns, kind, ...]`: `deliver` sig disposition, `write`/`drop` sig fd
    /// bytes, `exit`.
    events: Vec<Vec<serde_json::Value>>,
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Deliver { sig: i32, handler: bool },
    Write { fd: i32, bytes: u64, ok: bool, sig: i32 },
    Exit,
}

fn traces() -> Vec<Trace> {
    serde_json::from_str(include_str!("testdata/runtime_traces.json")).expect("testdata/runtime_traces.json parses")
}

fn events(t: &Trace) -> Vec<(u64, Ev)> {
    t.events
        .iter()
        .map(|e| {
            let n = |i: usize| e[i].as_i64().unwrap_or_else(|| panic!("{}: bad event {e:?}", t.trace));
            let ev = match e[1].as_str() {
                Some("deliver") => Ev::Deliver { sig: n(2) as i32, handler: e[3] == "handler" },
                Some(k @ ("write" | "drop")) => {
                    Ev::Write { sig: n(2) as i32, fd: n(3) as i32, bytes: n(4) as u64, ok: k == "write" }
                }
                Some("exit") => Ev::Exit,
                _ => panic!("{}: unknown event {e:?}", t.trace),
            };
            (n(0) as u64, ev)
        })
        .collect()
}

/// What one run varies.
#[derive(Clone, Debug)]
struct Timing {
    /// Added to each gap between events (a busier host, later delivery).
    stretch: Vec<u64>,
    /// Where the 50 ms tick grid starts, and each tick's lateness.
    tick_phase: u64,
    tick_late: Vec<u64>,
    /// How long a healthy loop takes to drain a write.
    drain: u64,
    /// The runtime is recognised only at the first wakeup write.
    late_runtime: bool,
}

fn timing() -> impl Strategy<Value = Timing> {
    (
        proptest::collection::vec(0..30 * MS, 128),
        0..50 * MS,
        proptest::collection::vec(0..40 * MS, 256),
        0..400 * MS,
        any::<bool>(),
    )
        .prop_map(|(stretch, tick_phase, tick_late, drain, late_runtime)| Timing {
            stretch,
            tick_phase,
            tick_late,
            drain,
            late_runtime,
        })
}

/// Runs one trace through the detector as the agent does (inputs as
/// `app/run.rs` `feed_detector` makes them, ticks with the modelled fill);
/// returns the outputs, each with the fill its tick saw.
fn replay(t: &Trace, timing: &Timing) -> Vec<(Output, Option<u64>)> {
    let policy = Policy::builtin_default();
    let mut at = 0;
    let evs: Vec<(u64, Ev)> = events(t)
        .into_iter()
        .enumerate()
        .map(|(i, (t_ns, ev))| {
            at += timing.stretch.get(i).copied().unwrap_or(0);
            (t_ns + at, ev)
        })
        .collect();
    let end = evs.last().map_or(0, |e| e.0);
    // Bytes written to the wakeup fd and when each is drained.
    let mut writes: Vec<(u64, u64)> = Vec::new();
    let mut d = Detector::default();
    let mut out = Vec::new();
    let mut seen = Vec::new();
    let mut known = !timing.late_runtime;
    let mut tick_no = 0;
    let mut next_tick = timing.tick_phase;
    let fill_at = |writes: &[(u64, u64)], now: u64| -> u64 {
        writes.iter().filter(|(written, _)| *written <= now).filter(|(_, drained)| *drained > now).count() as u64
    };
    for (now, ev) in evs {
        while next_tick < now {
            let f = fill_at(&writes, next_tick);
            d.tick(next_tick, &mut |_| Some(f), &mut out);
            seen.extend(out.drain(..).map(|o| (o, Some(f))));
            next_tick += 50 * MS + timing.tick_late.get(tick_no % 256).copied().unwrap_or(0);
            tick_no += 1;
        }
        let input = match ev {
            Ev::Exit => Some(Input::Exited),
            Ev::Deliver { sig, handler } if handler && [2, 3, 15].contains(&sig) => Some(Input::StopSignal { sig }),
            Ev::Deliver { .. } => None,
            Ev::Write { fd, bytes, ok, sig } if fd == t.wakeup_fd => {
                known = true;
                if ok {
                    // A starved loop drains only once it runs again: at its exit here.
                    let drained = if t.starved { end } else { now + timing.drain };
                    writes.extend(std::iter::repeat_n((now, drained), bytes.min(64) as usize));
                    Some(Input::WakeupWritten)
                } else {
                    Some(Input::WakeupDropped { sig })
                }
            }
            Ev::Write { .. } => None,
        };
        if let Some(input) = input {
            let runtime = if known { t.runtime } else { Runtime::Unknown };
            let window = policy.confirm_window(runtime).as_nanos() as u64;
            d.input(1, runtime, window, now, input, &mut out);
            seen.extend(out.drain(..).map(|o| (o, None)));
        }
    }
    seen
}

fn check(t: &Trace, outs: &[(Output, Option<u64>)]) -> Result<(), TestCaseError> {
    let confirmed = outs.iter().filter(|(o, _)| matches!(o, Output::Confirmed { .. })).count();
    let mut open = false;
    for (o, fill) in outs {
        match o {
            Output::Confirmed { .. } => {
                prop_assert!(!open, "{}: confirmed again without recovering: {outs:?}", t.trace);
                open = true;
            }
            Output::Recovered { .. } => {
                prop_assert_eq!(*fill, Some(0), "{}: recovered with bytes in the fd: {:?}", t.trace, outs);
                prop_assert!(!t.starved, "{}: a starved loop recovered before it ran: {:?}", t.trace, outs);
                open = false;
            }
            _ => {}
        }
    }
    if t.starved {
        prop_assert_eq!(confirmed, 1, "{}: a starved loop is confirmed once: {:?}", t.trace, outs);
    } else {
        prop_assert_eq!(confirmed, 0, "{}: a healthy or briefly busy loop gets no verdict: {:?}", t.trace, outs);
    }
    Ok(())
}

#[test]
fn the_recorded_traces_cover_every_runtime_healthy_and_starved() {
    let all = traces();
    for rt in [Runtime::Trio, Runtime::Uvloop, Runtime::Twisted, Runtime::Libuv, Runtime::Tokio] {
        assert!(all.iter().any(|t| t.runtime == rt && t.starved), "no starved {rt:?} trace");
    }
    assert!(all.iter().filter(|t| !t.starved).count() >= 5);
    // Drops too: trio's six-byte socket fills under the flood.
    assert!(all.iter().any(|t| t.events.iter().any(|e| e[1] == "drop")));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn recorded_runtimes_never_flap_and_healthy_ones_get_no_verdict(timing in timing()) {
        for t in traces() {
            check(&t, &replay(&t, &timing))?;
        }
    }
}
