//! Discovery: actors nobody registered.
//!
//! - tractor subactors, by their `python -m tractor._child --uid "('name',
//!   'uuid')"` command line;
//! - config selectors (exe, cmdline regex, cgroup, uid, descendant-of);
//! - self-pipe event loops, from a one-byte write made inside a signal
//!   handler (observe only unless a selector gives them a policy).
//!
//! /proc is scanned once a second; only pids not seen before are read.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::AsFd as _,
    path::PathBuf,
};

use crate::{
    actors::registry::{ActorSpec, ProcFacts, ProcReader, RealProc, Registry, Runtime, Source, tractor_identity},
    config::{Candidate, Selector},
    kernel::events::HandlerWrite,
    sys::procinfo,
    sys::{fdqueue, pidfd::ProcessHandle},
};

/// An actor a scan or a handler write found, with the /proc facts the
/// registry needs, read before the registry is locked.
pub struct Found {
    pub spec: ActorSpec,
    pub source: Source,
    pub facts: Option<ProcFacts>,
}

impl Found {
    fn new(spec: ActorSpec, source: Source) -> Self {
        let facts = spec.pid.and_then(|pid| RealProc.facts(pid));
        Found { spec, source, facts }
    }
}

pub struct Discovery {
    selectors: Vec<Selector>,
    self_pipe: bool,
    /// pid → (start time, comm) of processes already examined. exec(2)
    /// keeps the start time; the kernel reports each exec (PROCESS_EXEC) so
    /// a process that execs into a matching program is examined again
    /// ([`Discovery::on_exec`]); a comm change catches it on the next scan
    /// even if that event was lost.
    examined: HashMap<u32, (u64, String)>,
}

/// From /proc/PID/stat: comm, ppid and start time, in one read.
fn stat_brief(pid: u32) -> Option<(String, u32, u64)> {
    procinfo::stat(pid).ok().map(|s| (s.comm, s.ppid, s.start_time))
}

impl Discovery {
    pub fn new(selectors: Vec<Selector>, self_pipe: bool) -> Self {
        Discovery { selectors, self_pipe, examined: HashMap::new() }
    }

    /// Examines processes that appeared (or exec'd) since the last scan and
    /// returns the actors to add. Reads one stat file per process; only new
    /// ones are read further. `full` re-examines every process: the caller
    /// asks for it when kernel events (execs among them) were lost. Needs
    /// no registry lock.
    pub fn scan(&mut self, full: bool) -> Vec<Found> {
        let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
        let mut pids: Vec<u32> = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
        // Parents usually have lower pids: adding them first lets a child
        // find its parent actor.
        pids.sort_unstable();
        let me = std::process::id();
        let mut found = Vec::new();
        let mut still = HashMap::with_capacity(pids.len());
        for pid in pids {
            if pid == me {
                continue;
            }
            let Some((comm, _, start_time)) = stat_brief(pid) else { continue };
            let key = (start_time, comm);
            if full || self.examined.get(&pid) != Some(&key) {
                self.examine(pid, &mut found);
            }
            still.insert(pid, key);
        }
        self.examined = still;
        found
    }

    /// A process exec'd: examine it now (its command line changed).
    pub fn on_exec(&mut self, pid: u32) -> Vec<Found> {
        let mut found = Vec::new();
        if let Some((comm, _, start_time)) = stat_brief(pid) {
            self.examine(pid, &mut found);
            self.examined.insert(pid, (start_time, comm));
        }
        found
    }

    fn examine(&self, pid: u32, found: &mut Vec<Found>) {
        let cmdline = procinfo::cmdline(pid).unwrap_or_default();
        if let Some((name, uuid)) = tractor_identity(&cmdline) {
            let mut labels = BTreeMap::new();
            labels.insert("tractor_uuid".to_string(), uuid);
            found.push(Found::new(
                ActorSpec {
                    pid: Some(pid),
                    name: Some(name),
                    // tractor actors run trio (infected-asyncio ones too, on top).
                    runtime: Some(Runtime::Trio),
                    labels: Some(labels),
                    ..Default::default()
                },
                Source::Tractor,
            ));
        }
        if self.selectors.is_empty() {
            return;
        }
        let Some(uid) = procinfo::uid_of(pid) else { return };
        let exe: Option<PathBuf> = procinfo::exe(pid);
        let cgroup = procinfo::cgroup(pid);
        let mut ancestors = vec![pid];
        let mut cur = pid;
        while let Some((_, ppid, _)) = stat_brief(cur).filter(|(_, p, _)| *p > 0 && ancestors.len() < 64) {
            ancestors.push(ppid);
            if ppid == 1 {
                break;
            }
            cur = ppid;
        }
        let candidate = Candidate {
            pid,
            exe: exe.as_deref(),
            cmdline: &cmdline,
            cgroup: cgroup.as_deref(),
            uid,
            ancestors: &ancestors,
        };
        if let Some(sel) = self.selectors.iter().find(|s| s.matches(&candidate)) {
            found.push(Found::new(
                ActorSpec {
                    pid: Some(pid),
                    name: sel.name.clone(),
                    runtime: sel.runtime,
                    policy: sel.policy.clone(),
                    ..Default::default()
                },
                Source::Selector,
            ));
        }
    }

    /// Adds what a scan found. No I/O: the facts were read with the scan.
    pub fn apply(found: Vec<Found>, registry: &mut Registry) {
        for f in found {
            if let Err(e) = registry.upsert(&f.spec, f.source, None, f.facts) {
                tracing::debug!("{:?} match pid {:?}: {e}", f.source, f.spec.pid);
            }
        }
    }

    /// A handler wrote one byte: the self-pipe trick, if the process is no
    /// actor yet (the caller checks that under the registry's lock).
    pub fn wants(&self, w: &HandlerWrite) -> bool {
        // A sigwake agent's start-up self-test child is no event loop to watch.
        self.self_pipe && w.count == 1 && w.task.comm != crate::kernel::selftest::CHILD_COMM
    }

    /// Examines the process behind a self-pipe write: its runtime (through
    /// its wakeup fd) and its /proc facts. I/O: call it without holding the
    /// registry.
    pub fn examine_loop(&self, w: &HandlerWrite) -> Found {
        let runtime = guess_runtime(w.task.pid, w.fd);
        let spec =
            ActorSpec { pid: Some(w.task.pid), runtime: Some(runtime), wakeup_fd: Some(w.fd), ..Default::default() };
        Found::new(spec, Source::Discovered)
    }

    /// Records a loop [`Discovery::examine_loop`] found, unless something
    /// registered it meanwhile.
    pub fn apply_loop(found: Found, registry: &mut Registry) {
        let Some(pid) = found.spec.pid else { return };
        if registry.get(pid).is_some() {
            return;
        }
        match registry.upsert(&found.spec, Source::Discovered, None, found.facts) {
            Ok(a) => tracing::info!(
                pid = a.pid,
                fd = found.spec.wakeup_fd,
                runtime = a.runtime.as_str(),
                "discovered an event loop using the self-pipe trick (`{}`), observing it",
                a.name
            ),
            Err(e) => tracing::debug!("discovering pid {pid}: {e}"),
        }
    }
}

/// What the process's memory map and wakeup fd say about its runtime:
/// asyncio loads its C accelerator `_asyncio`; trio shrinks its wakeup
/// socket's send buffer to the minimum (SO_SNDBUF=1). Reading a socket
/// option through a pidfd_getfd duplicate never touches the queue.
pub fn guess_runtime(pid: u32, wakeup_fd: i32) -> Runtime {
    let exe = procinfo::exe(pid).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let maps = procinfo::maps(pid).unwrap_or_default();
    let python = exe.contains("python") || maps.contains("libpython");
    if !python {
        return Runtime::Unknown;
    }
    if maps.contains("/_asyncio.") {
        return Runtime::Asyncio;
    }
    let small_sndbuf = ProcessHandle::open(pid, None)
        .and_then(|h| h.get_fd(wakeup_fd))
        .ok()
        .and_then(|fd| fdqueue::send_buffer_size(fd.as_fd()).ok())
        .is_some_and(|v| v < 16 * 1024);
    if small_sndbuf { Runtime::Trio } else { Runtime::Other }
}
