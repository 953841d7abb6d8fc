//! Loader: puts the kernel programs in, attaches them, and hands out the
//! maps the rest of the agent reads (events, watched pids, counters).
//!
//! Dropping [`Probes`] detaches every program and closes every map.

use std::{collections::HashMap as StdHashMap, io};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, TracePoint},
};
use sigwake_common::{Config, TracepointOffsets, counter};

use crate::tracefs::{self, TracefsError};

/// The kernel programs, built by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sigwake"));

/// A hook, as reported at start-up.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Hook {
    /// The program's name in the object (`signal_deliver`, …).
    pub program: &'static str,
    /// What it is attached to (`tracepoint signal:signal_deliver`).
    pub attach_point: String,
}

/// Program name → tracepoint (group, event), always attached.
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("signal_generate", "signal", "signal_generate"),
    ("signal_deliver", "signal", "signal_deliver"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("sched_process_exec", "sched", "sched_process_exec"),
];

/// The write path and handler return as syscall tracepoints: the fallback.
/// While any syscall tracepoint is attached, every syscall on the host
/// takes the slow path (TIF_SYSCALL_TRACEPOINT).
const SYSCALL_TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("sys_enter_rt_sigreturn", "syscalls", "sys_enter_rt_sigreturn"),
    ("sys_enter_write", "syscalls", "sys_enter_write"),
    ("sys_exit_write", "syscalls", "sys_exit_write"),
];

/// The same, as BTF trampolines that run only for these calls: preferred.
#[cfg(target_arch = "aarch64")]
const BTF_HOOKS: &[(&str, &str, bool)] =
    &[("fexit_ksys_write", "ksys_write", true), ("fentry_rt_sigreturn", "__arm64_sys_rt_sigreturn", false)];
#[cfg(not(target_arch = "aarch64"))]
const BTF_HOOKS: &[(&str, &str, bool)] =
    &[("fexit_ksys_write", "ksys_write", true), ("fentry_rt_sigreturn", "__x64_sys_rt_sigreturn", false)];

/// Which hooks carry the write path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HookPreference {
    /// fentry/fexit when the kernel allows them, else syscall tracepoints.
    #[default]
    Auto,
    /// Syscall tracepoints only.
    Tracepoint,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The agent was built with AYA_BUILD_SKIP=1.
    #[error("this sigwake binary has no kernel programs (built with AYA_BUILD_SKIP=1); rebuild it without AYA_BUILD_SKIP")]
    NoPrograms,
    /// The kernel refused for lack of privilege.
    #[error(
        "the kernel refused to {what}: permission denied. sigwake needs root, or CAP_BPF and \
         CAP_PERFMON (grant them with `setcap cap_bpf,cap_perfmon,cap_sys_admin+ep sigwake`)"
    )]
    Permission {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The verifier rejected a program; the log is in the message.
    #[error("the kernel verifier rejected program `{program}`: {source}")]
    Verifier {
        program: String,
        #[source]
        source: ProgramError,
    },
    /// Tracepoint formats could not be read.
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    /// Anything else the loader or kernel refused.
    #[error("{what} failed")]
    Other {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn is_permission_denied(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return true;
        }
        if let Some(aya::sys::SyscallError { io_error, .. }) = e.downcast_ref::<aya::sys::SyscallError>()
            && matches!(io_error.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

fn classify<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>, err: E) -> LoadError {
    let what = what.into();
    if is_permission_denied(&err) {
        LoadError::Permission { what, source: Box::new(err) }
    } else {
        LoadError::Other { what, source: Box::new(err) }
    }
}

/// Kernel-side counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub ringbuf_lost: u64,
    pub handler_map_full: u64,
    pub stale_windows: u64,
}

pub struct Probes {
    // Field order is drop order: links go with `ebpf`; the logger's map
    // must outlive nothing else, but keep it alive as long as programs run.
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    hooks: Vec<Hook>,
    counters: PerCpuArray<MapData, u64>,
    open_windows: aya::maps::Array<MapData, u64>,
}

impl Probes {
    /// Loads the programs with this kernel's tracepoint offsets and
    /// attaches all of them.
    pub fn load(config: Config, preference: HookPreference) -> Result<Self, LoadError> {
        if PROGRAMS.is_empty() {
            return Err(LoadError::NoPrograms);
        }
        raise_memlock_limit();
        let root = tracefs::tracefs_root()?;
        let offsets: TracepointOffsets = tracefs::read_offsets(&root)?;
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .override_global("CONFIG", &config, true)
            .load(PROGRAMS)
            .map_err(|e| classify("load the eBPF object (create maps)", e))?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!("kernel-side log messages unavailable: {e}");
                None
            }
        };
        let mut hooks = Vec::new();
        let btf_hooks = match preference {
            HookPreference::Auto => match attach_btf_hooks(&mut ebpf) {
                Ok(h) => Some(h),
                Err(why) => {
                    tracing::info!(
                        "fentry/fexit hooks refused ({why}); falling back to syscall tracepoints, \
                         which put every syscall on this host on the tracing slow path"
                    );
                    None
                }
            },
            HookPreference::Tracepoint => None,
        };
        let tracepoints: Vec<_> = match &btf_hooks {
            Some(_) => TRACEPOINTS.to_vec(),
            None => TRACEPOINTS.iter().chain(SYSCALL_TRACEPOINTS).copied().collect(),
        };
        hooks.extend(btf_hooks.unwrap_or_default());
        for (program, group, event) in tracepoints {
            let prog: &mut TracePoint = ebpf
                .program_mut(program)
                .ok_or_else(|| LoadError::Other {
                    what: format!("finding program `{program}` in the object"),
                    source: "missing from the embedded object".into(),
                })?
                .try_into()
                .map_err(|e| classify(format!("program `{program}`"), e))?;
            prog.load().map_err(|e| match e {
                e @ ProgramError::LoadError { .. } if !is_permission_denied(&e) => {
                    LoadError::Verifier { program: program.to_string(), source: e }
                }
                e => classify(format!("load program `{program}`"), e),
            })?;
            prog.attach(group, event)
                .map_err(|e| classify(format!("attach `{program}` to tracepoint {group}:{event}"), e))?;
            hooks.push(Hook { program, attach_point: format!("tracepoint {group}:{event}") });
        }
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS").ok_or_else(|| missing_map("COUNTERS"))?,
        )
        .map_err(|e| classify("opening map COUNTERS", e))?;
        let open_windows = aya::maps::Array::try_from(
            ebpf.take_map("OPEN_WINDOWS").ok_or_else(|| missing_map("OPEN_WINDOWS"))?,
        )
        .map_err(|e| classify("opening map OPEN_WINDOWS", e))?;
        Ok(Probes { ebpf, logger, hooks, counters, open_windows })
    }

    /// The hooks in use, for the start-up report and `/readyz`.
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self.ebpf.take_map("EVENTS").ok_or_else(|| missing_map("EVENTS"))?;
        RingBuf::try_from(map).map_err(|e| classify("opening map EVENTS", e))
    }

    /// The watched-process map (tgid → flags); can be taken once.
    pub fn take_watched_pids(&mut self) -> Result<HashMap<MapData, u32, u32>, LoadError> {
        let map = self.ebpf.take_map("WATCHED_PIDS").ok_or_else(|| missing_map("WATCHED_PIDS"))?;
        HashMap::try_from(map).map_err(|e| classify("opening map WATCHED_PIDS", e))
    }

    /// The kernel log ring buffer reader, for the agent to drive.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Threads the kernel believes are inside a signal handler right now.
    pub fn open_windows(&self) -> u64 {
        self.open_windows.get(&0, 0).unwrap_or(0)
    }

    pub fn counters(&self) -> KernelCounters {
        let sum = |slot: u32| -> u64 {
            self.counters.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0)
        };
        KernelCounters {
            ringbuf_lost: sum(counter::RINGBUF_LOST),
            handler_map_full: sum(counter::HANDLER_MAP_FULL),
            stale_windows: sum(counter::STALE_WINDOWS),
        }
    }

    /// Per-program run count and run time (ns), when the kernel collects
    /// them (`kernel.bpf_stats_enabled=1`).
    pub fn program_stats(&self) -> StdHashMap<&'static str, (u64, u64)> {
        let mut out = StdHashMap::new();
        for name in self.hooks.iter().map(|h| h.program) {
            if let Some(info) = self.ebpf.program(name).and_then(|p| p.info().ok()) {
                out.insert(name, (info.run_count(), info.run_time().as_nanos() as u64));
            }
        }
        out
    }
}

/// Loads and attaches the fentry/fexit programs, all or none.
fn attach_btf_hooks(ebpf: &mut Ebpf) -> Result<Vec<Hook>, String> {
    use aya::{
        Btf,
        programs::{FEntry, FExit},
    };
    let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
    // Detachers of what is attached so far, for all-or-none.
    type Detach = Box<dyn FnOnce(&mut Ebpf)>;
    let mut links: Vec<Detach> = Vec::new();
    let mut hooks = Vec::new();
    let result = (|| -> Result<(), String> {
        for &(program, function, is_exit) in BTF_HOOKS {
            let prog = ebpf.program_mut(program).ok_or_else(|| format!("{program} missing from the object"))?;
            if is_exit {
                let p: &mut FExit = prog.try_into().map_err(|e| format!("{program}: {e}"))?;
                p.load(function, &btf).map_err(|e| format!("loading fexit {function}: {e}"))?;
                let link = p.attach().map_err(|e| format!("attaching fexit {function}: {e}"))?;
                links.push(Box::new(move |ebpf: &mut Ebpf| {
                    if let Some(Ok(p)) = ebpf.program_mut(program).map(<&mut FExit>::try_from) {
                        let _ = p.detach(link);
                    }
                }));
                hooks.push(Hook { program, attach_point: format!("fexit {function}") });
            } else {
                let p: &mut FEntry = prog.try_into().map_err(|e| format!("{program}: {e}"))?;
                p.load(function, &btf).map_err(|e| format!("loading fentry {function}: {e}"))?;
                let link = p.attach().map_err(|e| format!("attaching fentry {function}: {e}"))?;
                links.push(Box::new(move |ebpf: &mut Ebpf| {
                    if let Some(Ok(p)) = ebpf.program_mut(program).map(<&mut FEntry>::try_from) {
                        let _ = p.detach(link);
                    }
                }));
                hooks.push(Hook { program, attach_point: format!("fentry {function}") });
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(hooks),
        Err(e) => {
            // All or none: a write path on fexit with rt_sigreturn missing
            // would leave handler windows open.
            for detach in links {
                detach(ebpf);
            }
            Err(e)
        }
    }
}

fn missing_map(name: &str) -> LoadError {
    LoadError::Other {
        what: format!("finding map {name} in the object"),
        source: "missing from the embedded object".into(),
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones use
/// the memory cgroup. Raising it can fail without CAP_SYS_RESOURCE, which
/// only matters on old kernels, so failure is a warning.
fn raise_memlock_limit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels >= 5.11, which account BPF memory to the cgroup",
            io::Error::last_os_error()
        );
    }
}
