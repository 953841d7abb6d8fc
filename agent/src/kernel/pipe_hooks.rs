//! When the socket tier's on-demand hooks for writes to pipes and eventfds
//! must be attached.
//!
//! The socket tier sees a handler's send to a socket without any syscall
//! hook. A wakeup written to a pipe (Twisted, libuv, a hand-rolled self
//! pipe) or an eventfd (GLib) is seen only through syscall tracepoints,
//! which put every syscall on the host on the slow path while attached. So
//! they are attached only while some live actor's wakeup may be such a
//! write, or always when the operator asks for pipe discovery
//! (`--discover-pipes`: loops nobody registered are found by their writes).

use std::collections::HashMap;

use crate::actors::registry::Runtime;

/// Why the hooks are needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// `--discover-pipes`: every process's pipe writes.
    Discovery,
    /// An actor whose wakeup fd is not a socket, or not known yet.
    Actor { pid: u32, name: String, wakeup: String },
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Need::Discovery => write!(f, "--discover-pipes asks for every process's pipe writes"),
            Need::Actor { pid, name, wakeup } => write!(f, "actor {name} (pid {pid}): {wakeup}"),
        }
    }
}

/// One live actor, as the decision needs it.
pub struct ActorWakeup {
    pub pid: u32,
    /// With the pid, names the process: a reused pid is another one.
    pub start_time: u64,
    pub name: String,
    pub runtime: Runtime,
    pub wakeup_fd: Option<i32>,
}

/// Remembers what each actor's wakeup fd is, and the registry generation
/// it last decided on.
#[derive(Default)]
pub struct PipeHookDemand {
    discovery: bool,
    decided_at: Option<u64>,
    /// (pid, start time, fd) → whether it is a socket, as read once from
    /// /proc.
    kinds: HashMap<(u32, u64, i32), bool>,
}

impl PipeHookDemand {
    pub fn new(discovery: bool) -> Self {
        PipeHookDemand { discovery, ..Default::default() }
    }

    /// Decide again at the next call, changed or not (applying the last
    /// decision failed).
    pub fn retry(&mut self) {
        self.decided_at = None;
    }

    /// Whether the last decision was made at this registry generation
    /// (nothing to decide again).
    pub fn decided_at(&self, generation: u64) -> bool {
        self.decided_at == Some(generation)
    }

    /// `None` when the registry has not changed since the last decision
    /// (`generation`); else whether the hooks are needed, and why.
    /// `is_socket(pid, fd)`: what /proc says the fd is (None: unreadable).
    pub fn decide(
        &mut self,
        generation: u64,
        actors: impl FnOnce() -> Vec<ActorWakeup>,
        is_socket: impl Fn(u32, i32) -> Option<bool>,
    ) -> Option<Option<Need>> {
        if self.decided_at(generation) {
            return None;
        }
        self.decided_at = Some(generation);
        if self.discovery {
            return Some(Some(Need::Discovery));
        }
        let actors = actors();
        self.kinds.retain(|&(pid, start, fd), _| {
            actors.iter().any(|a| a.pid == pid && a.start_time == start && a.wakeup_fd == Some(fd))
        });
        let mut need = None;
        for a in actors {
            let wakeup = match a.wakeup_fd {
                Some(fd) => {
                    let key = (a.pid, a.start_time, fd);
                    let socket = match self.kinds.get(&key) {
                        Some(&known) => Some(known),
                        None => {
                            let read = is_socket(a.pid, fd);
                            if let Some(known) = read {
                                self.kinds.insert(key, known);
                            }
                            read
                        }
                    };
                    match socket {
                        Some(true) => continue,
                        Some(false) => format!("its wakeup fd {fd} is no socket"),
                        // Never guessed: unreadable counts as needing them.
                        None => format!("its wakeup fd {fd} could not be read"),
                    }
                }
                None if socket_runtime(a.runtime) => continue,
                None => format!("a {} loop whose wakeup fd is not known yet", a.runtime.as_str()),
            };
            if need.is_none() {
                need = Some(Need::Actor { pid: a.pid, name: a.name, wakeup });
            }
        }
        Some(need)
    }
}

/// Runtimes whose wakeup is a send to a socketpair (DESIGN §1), which the
/// socket tier sees without syscall hooks.
fn socket_runtime(r: Runtime) -> bool {
    matches!(r, Runtime::Trio | Runtime::Asyncio | Runtime::Uvloop | Runtime::Tornado | Runtime::Tokio)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn actor(pid: u32, runtime: Runtime, fd: Option<i32>) -> ActorWakeup {
        ActorWakeup { pid, start_time: 100, name: format!("a{pid}"), runtime, wakeup_fd: fd }
    }

    #[test]
    fn only_a_wakeup_that_may_not_be_a_socket_needs_the_hooks() {
        let mut d = PipeHookDemand::new(false);
        let sockets = |_: u32, fd: i32| Some(fd != 7);
        // Socket runtimes with no fd yet, and a known socket fd: not needed.
        let idle =
            || vec![actor(1, Runtime::Trio, None), actor(2, Runtime::Tokio, None), actor(3, Runtime::Other, Some(5))];
        assert_eq!(d.decide(1, idle, sockets), Some(None));
        // A pipe wakeup fd: needed, and said why.
        let with_pipe = || vec![actor(1, Runtime::Trio, None), actor(4, Runtime::Twisted, Some(7))];
        let need = d.decide(2, with_pipe, sockets).unwrap().unwrap();
        assert_eq!(need, Need::Actor { pid: 4, name: "a4".into(), wakeup: "its wakeup fd 7 is no socket".into() });
        // A loop of unknown runtime and fd: needed until its fd is known.
        let unknown = || vec![actor(5, Runtime::Unknown, None)];
        assert!(d.decide(3, unknown, sockets).unwrap().is_some());
        // An fd /proc would not show: needed (never guessed).
        assert!(d.decide(4, || vec![actor(6, Runtime::Trio, Some(9))], |_, _| None).unwrap().is_some());
        // No actors: not needed.
        assert_eq!(d.decide(5, Vec::new, sockets), Some(None));
    }

    #[test]
    fn nothing_is_read_again_while_the_registry_is_unchanged() {
        let mut d = PipeHookDemand::new(false);
        let reads = Cell::new(0);
        let is_socket = |_: u32, _: i32| {
            reads.set(reads.get() + 1);
            Some(false)
        };
        assert!(d.decide(1, || vec![actor(1, Runtime::Libuv, Some(3))], is_socket).unwrap().is_some());
        assert_eq!(d.decide(1, || panic!("not asked while unchanged"), is_socket), None);
        // Changed elsewhere: the fd's kind is remembered, not read again.
        assert!(d.decide(2, || vec![actor(1, Runtime::Libuv, Some(3))], is_socket).unwrap().is_some());
        assert_eq!(reads.get(), 1);
    }

    #[test]
    fn pipe_discovery_keeps_them_attached() {
        let mut d = PipeHookDemand::new(true);
        assert_eq!(d.decide(1, Vec::new, |_, _| Some(true)), Some(Some(Need::Discovery)));
    }
}
