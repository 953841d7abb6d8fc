//! Starvation detector: one state machine per actor, driven by kernel
//! events and a clock the caller passes in (so tests fake it).
//!
//! A dropped wakeup is an event; *starvation* is a stop signal (or a
//! dropped wakeup) not followed by the loop running within the confirm
//! window (DESIGN §1). "The loop ran" is seen as its wakeup fd drained
//! (fill level 0, read without touching the queue), for pipes and sockets
//! alike. A handler write that succeeds after drops proves only that there
//! was room for one more byte — a pipe holds 65536 of them, and an
//! undrained one takes writes while its loop starves — so it counts as
//! recovery only for an actor whose fill cannot be measured.
//!
//! Runtime matters: for trio a full wakeup socket is normal and SIGINT is
//! only delayed, so only the confirm window decides; for asyncio (and
//! uvloop, tornado, libuv: [`DropMeaning::Lost`]) every failed byte is a
//! lost callback, reported at once ([`Output::Lost`]).

use std::collections::HashMap;

use crate::actors::registry::{DropMeaning, Runtime};

/// Per-actor inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// A stop signal (SIGINT, SIGTERM, …) entered a handler in the actor.
    StopSignal { sig: i32 },
    /// A handler's wakeup write failed.
    WakeupDropped { sig: i32 },
    /// A handler's wakeup write succeeded.
    WakeupWritten,
    /// The process exited.
    Exited,
}

/// What the caller must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// First dropped wakeup of an episode (state: dropped_wakeup).
    Dropped {
        pid: u32,
    },
    /// asyncio and the like ([`DropMeaning::Lost`]): the byte was a signal
    /// callback, and it is gone.
    Lost {
        pid: u32,
        sig: i32,
    },
    /// The loop did not run within the window: starving, confirmed.
    Confirmed {
        pid: u32,
        first_evidence_ns: u64,
        confirmed_ns: u64,
        drops: u32,
        fill: Option<u64>,
    },
    /// The loop ran again; any escalation must stop.
    Recovered {
        pid: u32,
        at_ns: u64,
    },
    Exited {
        pid: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// Evidence seen at `since`; decide at `deadline`.
    Watching {
        since: u64,
        deadline: u64,
        drops: u32,
        last_sig: i32,
    },
    /// Confirmed; escalation owns the actor until it recovers or exits.
    Starving {
        since: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Track {
    runtime: Runtime,
    window_ns: u64,
    phase: Phase,
    /// A handler write succeeded since the last drop: recovery evidence
    /// when (and only when) the fill level is unknown.
    written: bool,
    /// A stop signal entered a handler and its wakeup write has not been
    /// seen yet: an empty fd then says nothing about the loop (the byte is
    /// not written yet; a tick can fall between the two events, which may
    /// arrive in different batches).
    awaiting_write: bool,
}

#[derive(Default)]
pub struct Detector {
    tracks: HashMap<u32, Track>,
}

impl Detector {
    pub fn phase(&self, pid: u32) -> Phase {
        self.tracks.get(&pid).map_or(Phase::Idle, |t| t.phase)
    }

    /// Re-arms an actor whose incident was resumed after a restart, so that
    /// its recovery (wakeup fd drained) still cancels the escalation.
    pub fn resume_starving(&mut self, pid: u32, runtime: Runtime, window_ns: u64, now: u64) {
        let track =
            Track { runtime, window_ns, phase: Phase::Starving { since: now }, written: false, awaiting_write: false };
        self.tracks.insert(pid, track);
    }

    pub fn forget(&mut self, pid: u32) {
        self.tracks.remove(&pid);
    }

    /// Nothing watched or starving: the caller need not tick.
    pub fn is_idle(&self) -> bool {
        self.tracks.values().all(|t| t.phase == Phase::Idle)
    }

    /// Pids currently watched or starving (their fill level is worth polling).
    pub fn active(&self) -> Vec<u32> {
        self.tracks.iter().filter(|(_, t)| t.phase != Phase::Idle).map(|(p, _)| *p).collect()
    }

    /// Feeds one input for actor `pid`, whose runtime and confirm window
    /// the caller looks up (they may change while it lives).
    pub fn input(&mut self, pid: u32, runtime: Runtime, window_ns: u64, now: u64, input: Input, out: &mut Vec<Output>) {
        let t = self.tracks.entry(pid).or_insert(Track {
            runtime,
            window_ns,
            phase: Phase::Idle,
            written: false,
            awaiting_write: false,
        });
        if matches!(input, Input::WakeupDropped { .. }) {
            t.written = false;
        }
        match input {
            Input::StopSignal { .. } => t.awaiting_write = true,
            Input::WakeupDropped { .. } | Input::WakeupWritten => t.awaiting_write = false,
            Input::Exited => {}
        }
        t.runtime = runtime;
        t.window_ns = window_ns;
        // The runtime may be recognised only after the first evidence (the
        // stop signal enters the handler before the wakeup write that
        // identifies the loop): the window is the runtime's, from the first
        // evidence.
        if let Phase::Watching { since, ref mut deadline, .. } = t.phase {
            *deadline = since + window_ns;
        }
        match (input, t.phase) {
            (Input::Exited, _) => {
                self.tracks.remove(&pid);
                out.push(Output::Exited { pid });
            }
            (Input::StopSignal { sig }, Phase::Idle) => {
                t.phase = Phase::Watching { since: now, deadline: now + window_ns, drops: 0, last_sig: sig };
            }
            (Input::StopSignal { sig }, Phase::Watching { since, deadline, drops, .. }) => {
                t.phase = Phase::Watching { since, deadline, drops, last_sig: sig };
            }
            (Input::WakeupDropped { sig }, Phase::Idle) => {
                t.phase = Phase::Watching { since: now, deadline: now + window_ns, drops: 1, last_sig: sig };
                out.push(Output::Dropped { pid });
                if runtime.drop_meaning() == DropMeaning::Lost {
                    out.push(Output::Lost { pid, sig });
                }
            }
            (Input::WakeupDropped { sig }, Phase::Watching { since, deadline, drops, .. }) => {
                if drops == 0 {
                    out.push(Output::Dropped { pid });
                }
                t.phase = Phase::Watching { since, deadline, drops: drops + 1, last_sig: sig };
                if runtime.drop_meaning() == DropMeaning::Lost {
                    out.push(Output::Lost { pid, sig });
                }
            }
            (Input::WakeupDropped { sig }, Phase::Starving { .. }) if runtime.drop_meaning() == DropMeaning::Lost => {
                out.push(Output::Lost { pid, sig });
            }
            // Room for a byte again after drops: the next tick decides,
            // from the fill level if it can be measured.
            (Input::WakeupWritten, Phase::Watching { drops, .. }) if drops > 0 => t.written = true,
            (Input::WakeupWritten, Phase::Starving { .. }) => t.written = true,
            _ => {}
        }
        // Only non-idle actors are kept: the caller stops ticking when none are.
        if self.tracks.get(&pid).is_some_and(|t| t.phase == Phase::Idle) {
            self.tracks.remove(&pid);
        }
    }

    /// Advances time. `fill(pid)` is the wakeup fd's undrained byte count
    /// (None: unknown). A drained fd is recovery (or, when the fill is
    /// unknown, a successful write since the last drop); at the deadline,
    /// a fd still holding bytes — or, when the fill is unknown, drops with
    /// no successful write since — confirms starvation.
    pub fn tick(&mut self, now: u64, fill: &mut dyn FnMut(u32) -> Option<u64>, out: &mut Vec<Output>) {
        for (&pid, t) in self.tracks.iter_mut() {
            match t.phase {
                Phase::Idle => {}
                Phase::Watching { since, deadline, drops, .. } => {
                    let f = fill(pid);
                    let drained = f == Some(0) || (f.is_none() && t.written && drops > 0);
                    if drained && !t.awaiting_write {
                        t.phase = Phase::Idle;
                        out.push(Output::Recovered { pid, at_ns: now });
                    } else if now >= deadline && (f.is_some_and(|f| f > 0) || drops > 0) {
                        t.phase = Phase::Starving { since: now };
                        out.push(Output::Confirmed {
                            pid,
                            first_evidence_ns: since,
                            confirmed_ns: now,
                            drops,
                            fill: f,
                        });
                    } else if now >= deadline {
                        // A stop signal, fill unknown (or empty while its write
                        // never came) and no drop: no evidence either way.
                        t.phase = Phase::Idle;
                    }
                }
                Phase::Starving { .. } => {
                    let f = fill(pid);
                    if f == Some(0) || (f.is_none() && t.written) {
                        t.phase = Phase::Idle;
                        out.push(Output::Recovered { pid, at_ns: now });
                    }
                }
            }
        }
        self.tracks.retain(|_, t| t.phase != Phase::Idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 2_000_000_000;
    const MS: u64 = 1_000_000;

    fn run(d: &mut Detector, pid: u32, rt: Runtime, now: u64, i: Input) -> Vec<Output> {
        let mut out = vec![];
        d.input(pid, rt, W, now, i, &mut out);
        out
    }

    fn tick(d: &mut Detector, now: u64, fill: Option<u64>) -> Vec<Output> {
        let mut out = vec![];
        d.tick(now, &mut |_| fill, &mut out);
        out
    }

    #[test]
    fn trio_starved_past_the_window_is_confirmed() {
        let mut d = Detector::default();
        assert!(run(&mut d, 7, Runtime::Trio, 0, Input::StopSignal { sig: 2 }).is_empty());
        assert_eq!(
            run(&mut d, 7, Runtime::Trio, 10 * MS, Input::WakeupDropped { sig: 2 }),
            vec![Output::Dropped { pid: 7 }]
        );
        assert!(tick(&mut d, W - 1, Some(6)).is_empty(), "not before the deadline");
        assert_eq!(
            tick(&mut d, W, Some(6)),
            vec![Output::Confirmed { pid: 7, first_evidence_ns: 0, confirmed_ns: W, drops: 1, fill: Some(6) }]
        );
        assert_eq!(d.phase(7), Phase::Starving { since: W });
        // Starving stays starving while the fd stays full.
        assert!(tick(&mut d, 3 * W, Some(6)).is_empty());
    }

    #[test]
    fn trio_briefly_busy_drains_within_the_window_and_is_never_confirmed() {
        let mut d = Detector::default();
        run(&mut d, 7, Runtime::Trio, 0, Input::WakeupDropped { sig: 2 });
        assert_eq!(tick(&mut d, 500 * MS, Some(0)), vec![Output::Recovered { pid: 7, at_ns: 500 * MS }]);
        assert_eq!(d.phase(7), Phase::Idle);
        assert!(tick(&mut d, 10 * W, Some(6)).is_empty());
    }

    #[test]
    fn a_successful_write_after_drops_is_recovery_only_when_the_fill_is_unknown() {
        let mut d = Detector::default();
        run(&mut d, 7, Runtime::Other, 0, Input::WakeupDropped { sig: 2 });
        assert!(run(&mut d, 7, Runtime::Other, MS, Input::WakeupWritten).is_empty(), "the tick decides");
        assert_eq!(tick(&mut d, 2 * MS, None), vec![Output::Recovered { pid: 7, at_ns: 2 * MS }]);
        // A successful write without drops means nothing.
        run(&mut d, 8, Runtime::Trio, 0, Input::StopSignal { sig: 2 });
        assert!(run(&mut d, 8, Runtime::Trio, MS, Input::WakeupWritten).is_empty());
        assert!(tick(&mut d, 2 * MS, None).is_empty());
    }

    /// A pipe wakeup fd (Twisted): 65536 bytes, so handler writes succeed
    /// into an undrained pipe while the loop starves. Seen before: the
    /// incident was confirmed, "recovered" 2 ms later at fill 2543/4096,
    /// then reopened.
    #[test]
    fn writes_into_an_undrained_pipe_are_not_recovery() {
        let mut d = Detector::default();
        run(&mut d, 7, Runtime::Other, 0, Input::StopSignal { sig: 2 });
        run(&mut d, 7, Runtime::Other, MS, Input::WakeupWritten);
        assert!(tick(&mut d, W / 2, Some(2543)).is_empty());
        assert!(matches!(tick(&mut d, W, Some(2543))[..], [Output::Confirmed { pid: 7, fill: Some(2543), .. }]));
        for i in 1..=5 {
            assert!(run(&mut d, 7, Runtime::Other, W + i * MS, Input::WakeupWritten).is_empty());
            assert!(tick(&mut d, W + i * MS + 1, Some(2543 + i)).is_empty(), "no flapping");
        }
        assert_eq!(d.phase(7), Phase::Starving { since: W });
        assert_eq!(tick(&mut d, 2 * W, Some(0)), vec![Output::Recovered { pid: 7, at_ns: 2 * W }]);
    }

    #[test]
    fn starved_loop_that_recovers_cancels() {
        let mut d = Detector::default();
        run(&mut d, 7, Runtime::Trio, 0, Input::WakeupDropped { sig: 2 });
        tick(&mut d, W, Some(6));
        assert_eq!(tick(&mut d, 2 * W, Some(0)), vec![Output::Recovered { pid: 7, at_ns: 2 * W }]);
        run(&mut d, 9, Runtime::Other, 0, Input::WakeupDropped { sig: 2 });
        tick(&mut d, W, None);
        assert!(run(&mut d, 9, Runtime::Other, W + 1, Input::WakeupWritten).is_empty());
        assert_eq!(tick(&mut d, W + 2, None), vec![Output::Recovered { pid: 9, at_ns: W + 2 }]);
    }

    #[test]
    fn a_runtime_recognised_after_the_first_evidence_gets_its_own_window() {
        // The stop signal enters the handler while the runtime is unknown
        // (2 s); its wakeup write then identifies a 1 s runtime.
        let mut d = Detector::default();
        let mut out = vec![];
        d.input(7, Runtime::Unknown, W, 0, Input::StopSignal { sig: 2 }, &mut out);
        d.input(7, Runtime::Uvloop, W / 2, MS, Input::WakeupWritten, &mut out);
        assert!(tick(&mut d, W / 2 - MS, Some(1)).is_empty(), "not before the runtime's window");
        let out = tick(&mut d, W / 2, Some(1));
        assert!(
            matches!(out[..], [Output::Confirmed { first_evidence_ns: 0, confirmed_ns, .. }] if confirmed_ns == W / 2),
            "{out:?}"
        );
    }

    #[test]
    fn an_empty_fd_before_the_stop_signals_write_is_no_recovery() {
        // Found by the recorded-trace property test: a tick between the
        // handler's entry and its wakeup write saw an empty fd, called it
        // drained, and the only evidence of a starved pipe loop was gone.
        let mut d = Detector::default();
        run(&mut d, 7, Runtime::Twisted, 0, Input::StopSignal { sig: 2 });
        assert!(tick(&mut d, MS, Some(0)).is_empty(), "the byte is not written yet");
        run(&mut d, 7, Runtime::Twisted, 2 * MS, Input::WakeupWritten);
        assert!(tick(&mut d, W / 2, Some(1)).is_empty());
        assert!(matches!(tick(&mut d, W, Some(1))[..], [Output::Confirmed { first_evidence_ns: 0, .. }]));
        // A handler that never writes: no verdict either way.
        let mut d = Detector::default();
        run(&mut d, 8, Runtime::Twisted, 0, Input::StopSignal { sig: 2 });
        assert!(tick(&mut d, W, Some(0)).is_empty());
        assert_eq!(d.phase(8), Phase::Idle);
    }

    #[test]
    fn asyncio_reports_each_lost_byte_at_once() {
        let mut d = Detector::default();
        assert_eq!(
            run(&mut d, 5, Runtime::Asyncio, 0, Input::WakeupDropped { sig: 2 }),
            vec![Output::Dropped { pid: 5 }, Output::Lost { pid: 5, sig: 2 }]
        );
        assert_eq!(
            run(&mut d, 5, Runtime::Asyncio, 1, Input::WakeupDropped { sig: 15 }),
            vec![Output::Lost { pid: 5, sig: 15 }]
        );
        // trio's drops are not losses.
        assert_eq!(run(&mut d, 6, Runtime::Trio, 0, Input::WakeupDropped { sig: 2 }), vec![Output::Dropped { pid: 6 }]);
    }

    #[test]
    fn stop_signal_with_undrained_fd_and_no_drop_is_starvation() {
        // The fd was not full yet, so the write succeeded, but the loop never read it.
        let mut d = Detector::default();
        run(&mut d, 7, Runtime::Trio, 0, Input::StopSignal { sig: 2 });
        run(&mut d, 7, Runtime::Trio, 1, Input::WakeupWritten);
        assert_eq!(
            tick(&mut d, W, Some(1)),
            vec![Output::Confirmed { pid: 7, first_evidence_ns: 0, confirmed_ns: W, drops: 0, fill: Some(1) }]
        );
    }

    #[test]
    fn unknown_fill_confirms_on_drops_only() {
        let mut d = Detector::default();
        run(&mut d, 7, Runtime::Other, 0, Input::StopSignal { sig: 15 });
        assert!(tick(&mut d, W, None).is_empty(), "no evidence: stop signal only");
        assert_eq!(d.phase(7), Phase::Idle);
        run(&mut d, 8, Runtime::Other, 0, Input::WakeupDropped { sig: 15 });
        assert!(matches!(tick(&mut d, W, None)[..], [Output::Confirmed { pid: 8, drops: 1, fill: None, .. }]));
    }

    #[test]
    fn idle_detector_keeps_nothing_and_needs_no_tick() {
        let mut d = Detector::default();
        assert!(d.is_idle());
        assert!(run(&mut d, 7, Runtime::Trio, 0, Input::WakeupWritten).is_empty());
        assert!(d.is_idle() && d.tracks.is_empty());
        run(&mut d, 7, Runtime::Trio, 0, Input::StopSignal { sig: 2 });
        assert!(!d.is_idle());
    }

    #[test]
    fn resumed_starving_actor_recovers_when_drained() {
        let mut d = Detector::default();
        d.resume_starving(7, Runtime::Trio, W, 0);
        assert_eq!(d.active(), vec![7]);
        assert!(tick(&mut d, 10, Some(3)).is_empty());
        assert_eq!(tick(&mut d, 20, Some(0)), vec![Output::Recovered { pid: 7, at_ns: 20 }]);
    }

    #[test]
    fn exit_ends_tracking_in_every_phase() {
        let mut d = Detector::default();
        run(&mut d, 7, Runtime::Trio, 0, Input::WakeupDropped { sig: 2 });
        tick(&mut d, W, Some(6));
        assert_eq!(run(&mut d, 7, Runtime::Trio, W + 1, Input::Exited), vec![Output::Exited { pid: 7 }]);
        assert_eq!(d.phase(7), Phase::Idle);
        assert!(d.active().is_empty());
    }
}
