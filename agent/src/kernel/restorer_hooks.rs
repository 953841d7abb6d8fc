//! The socket tier's restorer uprobes, attached as libcs show up.
//!
//! On the socket tier a handler's return is seen by a uprobe on the code it
//! returns into, the restorer, which is per file: the agent's own libc is
//! hooked at start, and a process using another file (a container's libc,
//! a copied or static runtime) would run its handlers with no return seen,
//! leaving its windows to the stack rule and the staleness limit. Each
//! delivery to a handler carries its restorer's address, so the first
//! delivery in a process whose restorer file is not hooked yet makes the
//! agent hook it: from the next handler on, returns are seen.
//!
//! The addresses come from the processes: a (pid, address) pair is looked
//! at once, a few per batch, and only code that calls rt_sigreturn is
//! hooked (sys/restorer.rs), at most MAX_RESTORER_HOOKS files.

use std::collections::HashSet;

use crate::{
    kernel::{
        events::{Disposition, Event, EventBody},
        probes::{MAX_RESTORER_HOOKS, Probes},
    },
    sys::restorer::{self, NotHooked},
};

/// Looked at per batch at most (each is a /proc/PID/maps read); the rest
/// is seen again at its next delivery.
const PER_BATCH: usize = 16;
/// (pid, address) pairs remembered; past this the memory starts over.
const REMEMBERED: usize = 16_384;

/// Restorers seen in deliveries and not looked at yet.
#[derive(Debug, Default)]
pub struct RestorerDemand {
    seen: HashSet<(u32, u64)>,
    pending: Vec<(u32, u64)>,
    /// The limit of hooked files was reached and said.
    said_full: bool,
}

/// What one look at the pending restorers did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Hooked {
    /// Newly hooked: (pid it was found in, the file and offset).
    pub attached: Vec<(u32, String)>,
    /// Not hooked, and why (said once per pid and address).
    pub refused: Vec<(u32, String)>,
}

impl RestorerDemand {
    /// Notes the restorer of a delivery to a handler, if not seen before.
    /// An exec or exit of that process before it is looked at forgets it:
    /// the new image maps other files (a shell's child that took a
    /// SIGCHLD and then exec'd would otherwise be warned about as having
    /// "no executable file mapping" at the old address).
    pub fn note(&mut self, ev: &Event) {
        if let EventBody::ProcessExec(t) | EventBody::ProcessExit(t) = &ev.body {
            self.pending.retain(|(pid, _)| *pid != t.task.pid);
            return;
        }
        let EventBody::SignalDeliver(d) = &ev.body else { return };
        if d.restorer == 0 || !matches!(d.disposition, Disposition::Handler(_)) {
            return;
        }
        let key = (d.task.pid, d.restorer);
        if self.pending.len() < PER_BATCH && !self.seen.contains(&key) && !self.pending.contains(&key) {
            self.pending.push(key);
        }
    }

    /// Whether some restorer waits to be looked at.
    pub fn is_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Looks at each pending restorer and hooks the files not hooked yet.
    /// Blocking (/proc reads): call it off the async workers.
    pub fn hook_pending(&mut self, probes: &mut Probes) -> Hooked {
        let mut out = Hooked::default();
        if self.seen.len() + self.pending.len() > REMEMBERED {
            self.seen.clear();
        }
        for (pid, addr) in std::mem::take(&mut self.pending) {
            self.seen.insert((pid, addr));
            if !probes.hooks_restorers() {
                continue;
            }
            match restorer::in_process(pid, addr) {
                Ok(found) => match probes.hook_restorer(&found) {
                    Ok(true) => out.attached.push((pid, format!("{}+{:#x}", found.path.display(), found.key.offset))),
                    Ok(false) => {}
                    // Said once: past the limit every new file would say it.
                    Err(_) if probes.restorers_hooked() >= MAX_RESTORER_HOOKS => {
                        if !std::mem::replace(&mut self.said_full, true) {
                            out.refused.push((
                                pid,
                                format!(
                                    "{MAX_RESTORER_HOOKS} restorer files are hooked already, the most this agent \
                                     hooks (said once)"
                                ),
                            ));
                        }
                    }
                    Err(e) => out.refused.push((pid, format!("{e:#}"))),
                },
                // Gone before it was looked at: nothing to hook.
                Err(NotHooked::Gone) => {}
                Err(e) => out.refused.push((pid, e.to_string())),
            }
        }
        out
    }
}

/// Logs what [`RestorerDemand::hook_pending`] did.
pub fn log(hooked: &Hooked) {
    for (pid, at) in &hooked.attached {
        tracing::info!(
            "hooked the signal restorer at {at} (pid {pid}'s; every process using that file): its handler returns are \
             seen from now on"
        );
    }
    for (pid, why) in &hooked.refused {
        tracing::warn!(
            "the signal restorer of pid {pid} is not hooked: {why}; its handler returns are not seen (its handler \
             windows close by the stack rule or after the staleness limit)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::events::{Signal, SignalDeliver, Task};

    fn deliver(pid: u32, disposition: Disposition, restorer: u64) -> Event {
        Event {
            mono_ns: 1,
            body: EventBody::SignalDeliver(SignalDeliver {
                task: Task { pid, tid: pid, comm: "x".into() },
                signal: Signal(10),
                code: 0,
                sa_flags: 0x0400_0000,
                disposition,
                restorer,
            }),
        }
    }

    #[test]
    fn an_exec_or_exit_before_the_look_forgets_the_process() {
        let mut d = RestorerDemand::default();
        d.note(&deliver(7, Disposition::Handler(0x1000), 0x2000));
        d.note(&deliver(8, Disposition::Handler(0x1000), 0x2000));
        d.note(&deliver(9, Disposition::Handler(0x1000), 0x2000));
        let task = |pid| crate::kernel::events::ProcessTask { task: Task { pid, tid: pid, comm: "x".into() } };
        d.note(&Event { mono_ns: 2, body: EventBody::ProcessExec(task(7)) });
        d.note(&Event { mono_ns: 2, body: EventBody::ProcessExit(task(9)) });
        assert_eq!(d.pending, vec![(8, 0x2000)]);
        // Its new image's restorer is noted again at its next delivery.
        d.note(&deliver(7, Disposition::Handler(0x1000), 0x3000));
        assert_eq!(d.pending, vec![(8, 0x2000), (7, 0x3000)]);
    }

    #[test]
    fn each_pid_and_address_is_noted_once_and_only_for_handlers() {
        let mut d = RestorerDemand::default();
        d.note(&deliver(7, Disposition::Handler(0x1000), 0x2000));
        d.note(&deliver(7, Disposition::Handler(0x1000), 0x2000));
        d.note(&deliver(8, Disposition::Default, 0x2000));
        d.note(&deliver(9, Disposition::Handler(0x1000), 0));
        assert_eq!(d.pending, vec![(7, 0x2000)]);
        for pid in 100..200 {
            d.note(&deliver(pid, Disposition::Handler(0x1000), 0x2000));
        }
        assert_eq!(d.pending.len(), PER_BATCH, "a flood waits for the next batch");
    }
}
