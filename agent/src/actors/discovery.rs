//! Discovery: actors nobody registered.
//!
//! - tractor actors: subactors by their spawn line (`python -m
//!   tractor._child --uid "('name', 'uuid')"`) or the process title
//!   tractor renames them to (`_subactor[name@pid]`), and the root actor
//!   that is their parent ([`tractor_subactor`]);
//! - config selectors (exe, cmdline regex, cgroup, uid, descendant-of);
//! - self-pipe event loops, from a wakeup write made inside a signal
//!   handler (observe only unless a selector gives them a policy), with
//!   their runtime recognised from evidence measured on each real runtime
//!   ([`classify`]).
//!
//! /proc is scanned once a second; only pids not seen before, or whose
//! comm changed (an exec, tractor's rename), are read.

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
        if let Some(sub) = tractor_subactor(&cmdline) {
            // Its parent first, so that the child's parent link names it: a
            // parent that is no subactor itself is the tree's root actor.
            if let Some(ppid) = stat_brief(pid).map(|(_, ppid, _)| ppid).filter(|p| *p > 1)
                && tractor_subactor(&procinfo::cmdline(ppid).unwrap_or_default()).is_none()
            {
                found.push(Found::new(tractor_spec(ppid, None, false, None), Source::Tractor));
            }
            found.push(Found::new(tractor_spec(pid, Some(sub.name), true, sub.uuid), Source::Tractor));
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

    /// A handler wrote what a wakeup write may be (see [`WAKEUP_WRITE_SIZES`]):
    /// worth examining if the process is no actor yet, or one whose runtime
    /// nobody gave (the caller checks that under the registry's lock).
    pub fn wants(&self, w: &HandlerWrite) -> bool {
        // A sigwake agent's start-up self-test child is no event loop to watch.
        WAKEUP_WRITE_SIZES.contains(&w.count) && w.task.comm != crate::kernel::selftest::CHILD_COMM
    }

    /// Whether loops nobody registered or selected become actors (off with
    /// `--no-discovery`); the runtime of a selected actor is recognised
    /// either way.
    pub fn discovers_loops(&self) -> bool {
        self.self_pipe
    }

    /// Examines the process behind a handler write: whether the fd is a
    /// wakeup fd at all, the runtime, and the process's /proc facts. `None`:
    /// the write was no wakeup (a blocking fd, a size that fits no runtime
    /// seen there). I/O: call it without holding the registry.
    pub fn examine_loop(&self, w: &HandlerWrite) -> Option<Found> {
        let runtime = guess_runtime(w.task.pid, w)?;
        let spec =
            ActorSpec { pid: Some(w.task.pid), runtime: Some(runtime), wakeup_fd: Some(w.fd), ..Default::default() };
        Some(Found::new(spec, Source::Discovered))
    }

    /// Records a loop [`Discovery::examine_loop`] found, unless something
    /// registered it meanwhile; an actor a selector made without saying
    /// its runtime gets the runtime and wakeup fd found.
    pub fn apply_loop(&self, found: Found, registry: &mut Registry) {
        let Some(pid) = found.spec.pid else { return };
        if let Some(a) = registry.get(pid) {
            if a.runtime != Runtime::Unknown {
                return;
            }
            let spec = ActorSpec {
                pid: Some(pid),
                runtime: found.spec.runtime,
                wakeup_fd: found.spec.wakeup_fd,
                ..Default::default()
            };
            if let Ok(a) = registry.upsert(&spec, Source::Discovered, None, found.facts) {
                let runtime = a.runtime.as_str();
                tracing::info!(pid, runtime, fd = spec.wakeup_fd, "recognised the event loop of `{}`", a.name);
            }
            return;
        }
        if !self.self_pipe {
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

/// A tractor subactor, as its process shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TractorSubactor {
    pub name: String,
    /// Only the spawn line carries it.
    pub uuid: Option<String>,
}

/// The process title current tractor gives a subactor (tractor
/// `devx/_proctitle.py`: `_subactor[<aid.reprol()>]`, with `reprol()` =
/// `<name>@<pid>`).
const TRACTOR_TITLE_PREFIX: &str = "_subactor[";

/// A tractor subactor from its command line, in every form its process
/// takes (read from tractor's source, `_child.py` and
/// `devx/_proctitle.py`, and measured with py-setproctitle 1.3.8):
/// - the spawn line, `python -m tractor._child --uid "('name', 'uuid')"
///   --parent_addr ... [--asyncio]`, until `_actor_child_main` renames the
///   process (and for its whole life in tractor releases before the
///   rename, or when setproctitle is not installed);
/// - after the rename, `_subactor[name@pid]` (setproctitle overwrites
///   argv: /proc/PID/cmdline is that one string; comm becomes its first 15
///   bytes, `_subactor[fetch`, too short to carry the name).
pub fn tractor_subactor(cmdline: &[String]) -> Option<TractorSubactor> {
    if let Some((name, uuid)) = tractor_identity(cmdline) {
        return Some(TractorSubactor { name, uuid: Some(uuid).filter(|u| !u.is_empty()) });
    }
    let title = cmdline.first()?.trim_end();
    let inner = title.strip_prefix(TRACTOR_TITLE_PREFIX)?.strip_suffix(']')?;
    // The name may hold an '@'; the pid after the last one never does.
    let name = match inner.rsplit_once('@') {
        Some((name, pid)) if pid == "None" || pid.parse::<u32>().is_ok() => name,
        _ => inner,
    };
    (!name.is_empty() && cmdline.len() == 1).then(|| TractorSubactor { name: name.to_string(), uuid: None })
}

/// A tractor actor's spec: subactors by name, the root by its comm (its
/// name lives only in its own memory). The uuid, when the spawn line still
/// shows it, is a label; a renamed subactor's labels are left as they were
/// (the uuid learned from its spawn line stays).
fn tractor_spec(pid: u32, name: Option<String>, subactor: bool, uuid: Option<String>) -> ActorSpec {
    ActorSpec {
        pid: Some(pid),
        name,
        // Subactors run trio (infected-asyncio ones too: trio is the guest
        // that installs the wakeup fd). The root is whatever program opened
        // the tree: recognised from its first wakeup write, and a runtime
        // its registrant gave is not overwritten.
        runtime: subactor.then_some(Runtime::Trio),
        labels: uuid.map(|u| BTreeMap::from([("tractor_uuid".to_string(), u)])),
        ..Default::default()
    }
}

/// Byte counts a signal handler's wakeup write has: 1 (the self-pipe
/// byte: CPython's `trip_signal`, tokio's signal driver), 8 (an eventfd
/// increment: GLib's `g_wakeup_signal`), 16 (libuv's `uv__signal_msg_t`, a
/// handle pointer and the signal number, on 64-bit: Node.js). Anything else
/// a handler writes (a log line to stderr) is not a wakeup.
pub const WAKEUP_WRITE_SIZES: [u64; 3] = [1, 8, LIBUV_SIGNAL_MSG];

/// sizeof(uv__signal_msg_t) on 64-bit (libuv src/unix/signal.c), measured:
/// Node 20's handler does `write(fd, msg, 16)` to the loop's signal pipe.
const LIBUV_SIGNAL_MSG: u64 = 16;

/// What kind of file a wakeup fd is, from its /proc/PID/fd link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    Socket,
    Pipe,
    Eventfd,
    Other,
}

impl FdKind {
    pub fn of_target(target: &str) -> FdKind {
        if target.starts_with("socket:[") {
            FdKind::Socket
        } else if target.starts_with("pipe:[") {
            FdKind::Pipe
        } else if target == "anon_inode:[eventfd]" {
            FdKind::Eventfd
        } else {
            FdKind::Other
        }
    }
}

/// The facts [`classify`] decides on, read from /proc and the wakeup fd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoopEvidence {
    /// The handler write's byte count and call (`sigwake_common::write_call`).
    pub count: u64,
    pub call: u32,
    pub fd_kind: Option<FdKind>,
    /// O_NONBLOCK on the fd (/proc/PID/fdinfo `flags`).
    pub nonblocking: bool,
    /// A CPython interpreter (its exe, or libpython in the maps).
    pub python: bool,
    /// The executable's file name.
    pub exe_name: String,
    /// /proc/PID/maps.
    pub maps: String,
    /// SO_SNDBUF of the wakeup socket, when it is one.
    pub sndbuf: Option<usize>,
    /// The executable carries tokio's signal driver.
    pub tokio_in_exe: bool,
}

/// The runtime behind a handler's wakeup write, from evidence that tells
/// them apart (each measured on the real runtime, CPython 3.11, Node 20):
///
/// | runtime | wakeup fd | handler write | evidence |
/// |---|---|---|---|
/// | trio | socketpair, SO_SNDBUF shrunk (reads back 4608) | `write` 1 B | the send buffer |
/// | uvloop | socketpair | `write` 1 B | `uvloop/loop.cpython*.so` in the maps |
/// | tornado | asyncio's socketpair | `write` 1 B | `tornado/speedups*.so` in the maps |
/// | asyncio | socketpair | `write` 1 B | `_asyncio` in the maps |
/// | Twisted | the reactor's waker, an `os.pipe()` | `write` 1 B | a pipe, and zope.interface's C module in the maps (Twisted needs it; Twisted also loads `_asyncio`) |
/// | Python self-pipe loop | `os.pipe()` | `write` 1 B | a pipe, nothing above |
/// | tokio | socketpair (mio UnixStream) | `sendto` 1 B, MSG_NOSIGNAL | tokio's signal driver in the executable |
/// | libuv (Node) | the loop's signal pipe | `write` 16 B | the message size, and `node` or libuv |
/// | eventfd (GLib) | eventfd | `write` 8 B | the fd kind |
///
/// A wakeup fd is non-blocking (CPython refuses a blocking one; a handler
/// must not block): Node's handler also writes one byte to libuv's global
/// signal *lock* pipe, a blocking one, which is no wakeup fd. `None`: not a
/// wakeup write.
pub fn classify(e: &LoopEvidence) -> Option<Runtime> {
    use sigwake_common::write_call;
    let kind = e.fd_kind?;
    if !e.nonblocking && kind != FdKind::Eventfd {
        return None;
    }
    let has = |needle: &str| e.maps.contains(needle);
    match (e.count, kind) {
        (8, FdKind::Eventfd) => Some(Runtime::Eventfd),
        (LIBUV_SIGNAL_MSG, FdKind::Pipe) if e.exe_name == "node" || e.exe_name == "nodejs" || has("/libuv.so") => {
            Some(Runtime::Libuv)
        }
        (1, FdKind::Socket) if e.python => Some(if e.sndbuf.is_some_and(|b| b < 16 * 1024) {
            Runtime::Trio
        } else if has("/uvloop/loop.") {
            Runtime::Uvloop
        } else if has("/tornado/speedups.") {
            Runtime::Tornado
        } else if has("/_asyncio.") {
            Runtime::Asyncio
        } else {
            Runtime::Other
        }),
        (1, FdKind::Pipe) if e.python => Some(if has("/zope/interface/_zope_interface_coptimizations.") {
            Runtime::Twisted
        } else {
            Runtime::SelfPipe
        }),
        (1, FdKind::Socket) if e.call == write_call::SENDTO && e.tokio_in_exe => Some(Runtime::Tokio),
        (1, FdKind::Socket | FdKind::Pipe) => Some(Runtime::SelfPipe),
        _ => None,
    }
}

/// Reads the evidence [`classify`] needs for `w` and decides. Reading a
/// socket option through a pidfd_getfd duplicate never touches the queue.
pub fn guess_runtime(pid: u32, w: &HandlerWrite) -> Option<Runtime> {
    let target = fdqueue::fd_target(pid, w.fd)?;
    let fd_kind = FdKind::of_target(&target);
    let exe = procinfo::exe(pid).unwrap_or_default();
    let exe_name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let maps = procinfo::maps(pid).unwrap_or_default();
    let python = exe_name.starts_with("python") || maps.contains("libpython");
    let sndbuf = if fd_kind == FdKind::Socket && w.count == 1 {
        ProcessHandle::open(pid, None)
            .and_then(|h| h.get_fd(w.fd))
            .ok()
            .and_then(|fd| fdqueue::send_buffer_size(fd.as_fd()).ok())
    } else {
        None
    };
    let sendto = w.call == sigwake_common::write_call::SENDTO;
    let tokio_in_exe = !python && w.count == 1 && sendto && exe_has_tokio_signal(pid);
    let evidence = LoopEvidence {
        count: w.count,
        call: w.call,
        fd_kind: Some(fd_kind),
        nonblocking: fdqueue::fd_nonblocking(pid, w.fd).unwrap_or(false),
        python,
        exe_name,
        maps,
        sndbuf,
        tokio_in_exe,
    };
    classify(&evidence)
}

/// Whether the process's executable has tokio's signal driver compiled
/// in: its panic locations (`…/tokio-1.54.1/src/signal/unix.rs`) stay in
/// stripped binaries too (measured on the tokio fixture). Read once per
/// discovered loop, through /proc/PID/exe: the very file running.
fn exe_has_tokio_signal(pid: u32) -> bool {
    static NEEDLE: std::sync::LazyLock<regex::bytes::Regex> = std::sync::LazyLock::new(|| {
        regex::bytes::Regex::new(r"tokio-1\.[0-9]+\.[0-9]+/src/signal/").expect("a valid pattern")
    });
    // Bounded: a huge executable is read at most once per loop, but not without limit.
    const MAX_EXE: u64 = 1 << 30;
    let path = format!("/proc/{pid}/exe");
    std::fs::metadata(&path).is_ok_and(|m| m.len() <= MAX_EXE)
        && std::fs::read(&path).is_ok_and(|bytes| NEEDLE.is_match(&bytes))
}

#[cfg(test)]
mod tests {
    use sigwake_common::write_call;

    use super::*;

    fn python(maps: &str, kind: FdKind, sndbuf: Option<usize>) -> LoopEvidence {
        LoopEvidence {
            count: 1,
            call: write_call::WRITE,
            fd_kind: Some(kind),
            nonblocking: true,
            python: true,
            exe_name: "python3.11".into(),
            maps: maps.into(),
            sndbuf,
            tokio_in_exe: false,
        }
    }

    const SITE: &str = "/venv/lib/python3.11/site-packages";

    #[test]
    fn each_runtime_from_its_evidence() {
        let asyncio = "/usr/lib/python3.11/lib-dynload/_asyncio.cpython-311-x86_64-linux-gnu.so\n".to_string();
        // trio: the shrunk send buffer decides, even with asyncio imported.
        assert_eq!(classify(&python(&asyncio, FdKind::Socket, Some(4608))), Some(Runtime::Trio));
        assert_eq!(classify(&python(&asyncio, FdKind::Socket, Some(212_992))), Some(Runtime::Asyncio));
        let uvloop = format!("{asyncio}{SITE}/uvloop/loop.cpython-311-x86_64-linux-gnu.so\n");
        assert_eq!(classify(&python(&uvloop, FdKind::Socket, Some(212_992))), Some(Runtime::Uvloop));
        let tornado = format!("{asyncio}{SITE}/tornado/speedups.abi3.so\n");
        assert_eq!(classify(&python(&tornado, FdKind::Socket, Some(212_992))), Some(Runtime::Tornado));
        // Twisted imports asyncio too: its pipe and zope.interface decide.
        let twisted =
            format!("{asyncio}{SITE}/zope/interface/_zope_interface_coptimizations.cpython-311-x86_64-linux-gnu.so\n");
        assert_eq!(classify(&python(&twisted, FdKind::Pipe, None)), Some(Runtime::Twisted));
        assert_eq!(classify(&python(&asyncio, FdKind::Pipe, None)), Some(Runtime::SelfPipe));
        assert_eq!(classify(&python("", FdKind::Socket, Some(212_992))), Some(Runtime::Other));

        let native = |count, call, kind, exe: &str, tokio| LoopEvidence {
            count,
            call,
            fd_kind: Some(kind),
            nonblocking: true,
            exe_name: exe.into(),
            tokio_in_exe: tokio,
            ..Default::default()
        };
        let tokio = native(1, write_call::SENDTO, FdKind::Socket, "server", true);
        assert_eq!(classify(&tokio), Some(Runtime::Tokio));
        assert_eq!(classify(&LoopEvidence { tokio_in_exe: false, ..tokio }), Some(Runtime::SelfPipe));
        assert_eq!(classify(&native(16, write_call::WRITE, FdKind::Pipe, "node", false)), Some(Runtime::Libuv));
        // 16 bytes from something that is not libuv: no wakeup known.
        assert_eq!(classify(&native(16, write_call::WRITE, FdKind::Pipe, "server", false)), None);
        let glib =
            LoopEvidence { nonblocking: false, ..native(8, write_call::WRITE, FdKind::Eventfd, "gnome-shell", false) };
        assert_eq!(classify(&glib), Some(Runtime::Eventfd));
    }

    #[test]
    fn tractor_subactors_in_every_form() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let spawn = argv(&[
            "/venv/bin/python",
            "-m",
            "tractor._child",
            "--uid",
            "('fetcher', 'd9ed878a')",
            "--parent_addr",
            "('127.0.0.1', 1616)",
        ]);
        let sub = |name: &str, uuid: Option<&str>| {
            Some(TractorSubactor { name: name.into(), uuid: uuid.map(str::to_string) })
        };
        assert_eq!(tractor_subactor(&spawn), sub("fetcher", Some("d9ed878a")));
        assert_eq!(tractor_subactor(&argv(&["_subactor[fetcher@7555]"])), sub("fetcher", None));
        assert_eq!(tractor_subactor(&argv(&["_subactor[svc@eu@7555]"])), sub("svc@eu", None));
        assert_eq!(tractor_subactor(&argv(&["_subactor[early@None]"])), sub("early", None));
        // Not tractor's: a title that merely starts alike, a program's argument.
        assert_eq!(tractor_subactor(&argv(&["_subactor[]"])), None);
        assert_eq!(tractor_subactor(&argv(&["_subactor[x@1]", "--flag"])), None);
        assert_eq!(tractor_subactor(&argv(&["/usr/bin/grep", "_subactor[x@1]"])), None);
        assert_eq!(tractor_subactor(&argv(&["python", "tree.py"])), None);
    }

    #[test]
    fn a_blocking_fd_is_no_wakeup_fd() {
        // Node's handler ends with write(lock pipe, "*", 1): libuv's global
        // signal lock, a blocking pipe.
        let lock = LoopEvidence {
            count: 1,
            call: write_call::WRITE,
            fd_kind: Some(FdKind::Pipe),
            nonblocking: false,
            exe_name: "node".into(),
            ..Default::default()
        };
        assert_eq!(classify(&lock), None);
        assert_eq!(classify(&LoopEvidence { nonblocking: true, ..lock }), Some(Runtime::SelfPipe));
    }
}
