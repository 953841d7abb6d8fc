//! Loader: puts the kernel programs in, attaches them, and hands out the
//! maps the rest of the agent reads (events, watched pids, counters).
//!
//! Dropping [`Probes`] detaches every program and closes every map.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    io,
    os::fd::AsRawFd,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, RawTracePoint, TracePoint, UProbe},
};
use sigwake_common::{Config, TracepointOffsets, counter};

use crate::{
    kernel::events::Event,
    kernel::pidns::{self, PidnsError},
    kernel::selftest::{self, SelfTestReport},
    kernel::tiers::{ExitSource, HookReport, Job, JobReport, Tier},
    kernel::tracefs::{self, TracefsError},
    sys::restorer::{Found, RestorerKey},
};

/// The kernel programs, built by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sigwake"));

/// A hook, as reported at start-up.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Hook {
    /// The program's name in the object (`signal_deliver`, …).
    pub program: &'static str,
    pub job: Job,
    /// `fentry`, `fexit`, `tracepoint` or `syscall_tracepoint`.
    pub tier: &'static str,
    /// What it is attached to (`signal:signal_deliver`, `__x64_sys_write`).
    pub attach_point: String,
}

/// Program name → tracepoint (group, event), always attached, with the
/// job each does in the start-up report.
const TRACEPOINTS: &[(&str, &str, &str, Job)] = &[
    ("signal_generate", "signal", "signal_generate", Job::SignalPath),
    ("signal_deliver", "signal", "signal_deliver", Job::SignalPath),
    ("sched_process_exit", "sched", "sched_process_exit", Job::Exit),
    ("sched_process_exec", "sched", "sched_process_exec", Job::Exec),
];

/// The write path and handler return as syscall tracepoints: the fallback.
/// While any syscall tracepoint is attached, every syscall on the host
/// takes the slow path (TIF_SYSCALL_TRACEPOINT).
const SYSCALL_TRACEPOINTS: &[(&str, &str, &str, Job)] = &[
    ("sys_enter_rt_sigreturn", "syscalls", "sys_enter_rt_sigreturn", Job::HandlerReturn),
    ("sys_enter_write", "syscalls", "sys_enter_write", Job::WritePath),
    ("sys_enter_writev", "syscalls", "sys_enter_writev", Job::WritePath),
    ("sys_enter_sendto", "syscalls", "sys_enter_sendto", Job::WritePath),
    ("sys_enter_sendmsg", "syscalls", "sys_enter_sendmsg", Job::WritePath),
    ("sys_exit_wakeup_write", "syscalls", "sys_exit_write", Job::WritePath),
    ("sys_exit_wakeup_write", "syscalls", "sys_exit_writev", Job::WritePath),
    ("sys_exit_wakeup_write", "syscalls", "sys_exit_sendto", Job::WritePath),
    ("sys_exit_wakeup_write", "syscalls", "sys_exit_sendmsg", Job::WritePath),
];

/// Writes to pipes and eventfds on the socket tier, which no socket hook
/// sees: the raw `sys_exit` tracepoint (write and writev), attached only
/// while something needs it (see [`Probes::set_pipe_write_hooks`]). The
/// program skips sends `sock_send_length` already reported.
const PIPE_WRITE_PROGRAM: &str = "sys_exit_pipe_write";
const PIPE_WRITE_TRACEPOINT: &str = "sys_exit";

/// The same jobs as BTF trampolines on the syscalls' arch entry points,
/// which run only for these calls: preferred. (program, candidate
/// functions in order, is_exit). A function must be in the kernel's BTF to
/// be hooked; some kernels' BTF lacks `__x64_sys_rt_sigreturn` (an alias
/// of `__do_sys_rt_sigreturn`, which takes no arguments either way).
#[cfg(target_arch = "aarch64")]
const BTF_HOOKS: &[(&str, &[&str], bool)] = &[
    ("fentry_rt_sigreturn", &["__arm64_sys_rt_sigreturn", "__do_sys_rt_sigreturn"], false),
    ("fexit_sys_write", &["__arm64_sys_write"], true),
    ("fexit_sys_writev", &["__arm64_sys_writev"], true),
    ("fexit_sys_sendto", &["__arm64_sys_sendto"], true),
    ("fexit_sys_sendmsg", &["__arm64_sys_sendmsg"], true),
];
#[cfg(not(target_arch = "aarch64"))]
const BTF_HOOKS: &[(&str, &[&str], bool)] = &[
    ("fentry_rt_sigreturn", &["__x64_sys_rt_sigreturn", "__do_sys_rt_sigreturn"], false),
    ("fexit_sys_write", &["__x64_sys_write"], true),
    ("fexit_sys_writev", &["__x64_sys_writev"], true),
    ("fexit_sys_sendto", &["__x64_sys_sendto"], true),
    ("fexit_sys_sendmsg", &["__x64_sys_sendmsg"], true),
];

/// The socket_fentry tier's trampolines, beside `sock_send_length`: the
/// handler return, and the kernel functions that write to a pipe and an
/// eventfd (what the socket hook cannot see), so that only those writes
/// pay, not every write(2).
const SOCKET_FENTRY_HOOKS: &[(&str, &[&str], bool)] =
    &[BTF_HOOKS[0], ("fexit_pipe_write", &["pipe_write"], true), ("fexit_eventfd_write", &["eventfd_write"], true)];

/// Which hooks carry the write path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HookPreference {
    /// The fastest tier the kernel allows: socket sends and fentry/fexit
    /// on pipe writes and rt_sigreturn (6.12+ with BPF trampolines), else
    /// fentry/fexit on the syscalls, else the socket tier, else syscall
    /// tracepoints.
    #[default]
    Auto,
    /// Syscall tracepoints only.
    Tracepoint,
    /// The socket tier (else syscall tracepoints): socket sends and the
    /// signal restorer, with syscall tracepoints for pipe and eventfd
    /// writes attached only while needed (Linux 6.12+, x86_64).
    Socket,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The agent was built with AYA_BUILD_SKIP=1.
    #[error(
        "this sigwake binary has no kernel programs (built with AYA_BUILD_SKIP=1); rebuild it without AYA_BUILD_SKIP"
    )]
    NoPrograms,
    /// The kernel refused for lack of privilege.
    #[error(
        "the kernel refused to {what}: permission denied. sigwake needs root, or CAP_BPF and \
         CAP_PERFMON to load its programs, and CAP_KILL and CAP_SYS_PTRACE to act on other users' \
         processes (`setcap cap_bpf,cap_perfmon,cap_kill,cap_sys_ptrace+ep sigwake`; README, Deploy)"
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
    /// The agent's pid namespace cannot be translated into.
    #[error(transparent)]
    Pidns(#[from] PidnsError),
    /// The kernel is older than sigwake supports.
    #[error(
        "sigwake needs Linux {major}.{minor} or newer and this is {0}: upgrade the kernel (every LTS kernel from 5.10 up works)",
        major = MIN_KERNEL.0, minor = MIN_KERNEL.1
    )]
    KernelTooOld(String),
    /// Every plan loaded, but none passed the self-test.
    #[error(
        "the start-up self-test failed: a signal handler's failed write to a full socket was not \
         reported ({detail}); tried: {tried}. sigwake cannot see lost wakeups on this kernel; \
         please report it with `uname -r`"
    )]
    SelfTest { detail: String, tried: String },
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

/// A program load that failed. BPF_PROG_LOAD answers EACCES when the
/// *verifier* rejects a program (kernel/bpf/verifier.c) and EPERM for a
/// lack of privilege, so only a load error without EACCES is about rights.
fn classify_load(program: &str, what: String, err: ProgramError) -> LoadError {
    let verifier_rejected = matches!(&err, ProgramError::LoadError { io_error, .. }
        if io_error.raw_os_error() == Some(libc::EACCES));
    if verifier_rejected {
        LoadError::Verifier { program: program.to_string(), source: err }
    } else {
        classify(what, err)
    }
}

/// What the kernel counts for one program. Run count and time only with
/// `kernel.bpf_stats_enabled=1`; recursion misses always (5.12+).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub run_count: u64,
    pub run_ns: u64,
    /// Times the kernel skipped the program (already running on the CPU);
    /// `None` if the kernel would not say.
    pub recursion_misses: Option<u64>,
}

/// Kernel-side counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Events the ring buffer had no room for, by event kind (index =
    /// `kind`; 0 = a kind this agent does not know).
    pub lost: [u64; counter::MAX_KIND as usize + 1],
    pub handler_map_full: u64,
    pub stale_windows: u64,
}

impl KernelCounters {
    /// Lost events of every kind.
    pub fn total_lost(&self) -> u64 {
        self.lost.iter().sum()
    }

    /// Lost events of one kind (`sigwake_common::kind`).
    pub fn lost_of(&self, kind: u32) -> u64 {
        self.lost[counter::lost(kind) as usize - counter::LOST_BASE as usize]
    }
}

pub struct Probes {
    // Field order is drop order: links go with `ebpf`; the logger's map
    // must outlive nothing else, but keep it alive as long as programs run.
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    hooks: Vec<Hook>,
    report: Option<HookReport>,
    counters: PerCpuArray<MapData, u64>,
    open_windows: aya::maps::Array<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    watched: Option<HashMap<MapData, u32, u32>>,
    /// Events the self-test read that were not its own, for the pipeline.
    backlog: Vec<Event>,
    pipe_writes: PipeWrites,
    /// The socket tier's restorer uprobes, by file (None on tiers that
    /// see rt_sigreturn itself).
    restorers: Option<HashSet<RestorerKey>>,
}

/// At most this many restorer files are hooked: a host has a few libcs
/// (the host's, one per container image); the addresses come from the
/// processes, so the count must not be theirs to grow.
pub const MAX_RESTORER_HOOKS: usize = 64;

/// How writes to pipes and eventfds (not sockets) are seen.
#[derive(Debug)]
enum PipeWrites {
    /// By the tier's own write hooks, always.
    Always,
    /// By syscall tracepoints attached on demand (the socket tier): the
    /// links while attached.
    OnDemand(Option<aya::programs::raw_trace_point::RawTracePointLinkId>),
}

/// The oldest kernel sigwake runs on: the oldest its kernel matrix proves
/// (the programs themselves need 5.8 for the BPF ring buffer).
pub const MIN_KERNEL: (u32, u32) = (5, 10);

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// `6.1.0-47-amd64` → (6, 1).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn check_kernel_version(release: &str) -> Result<(), LoadError> {
    match parse_release(release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        _ => Err(LoadError::KernelTooOld(release.to_string())),
    }
}

/// One way to load the programs: a tier for the syscall hooks and a way
/// to detect process exits.
#[derive(Clone, Copy, Debug)]
struct Plan {
    tier: Tier,
    exit: ExitSource,
}

impl Probes {
    /// Loads the programs with this kernel's offsets, attaching the fastest
    /// hooks the kernel allows, and proves them with a self-test: a child
    /// whose handler writes to a full socket must be reported. A plan that
    /// loads but fails the self-test (a hook that never fires) is detached
    /// and the next one tried.
    pub fn load(config: Config, preference: HookPreference) -> Result<Self, LoadError> {
        if PROGRAMS.is_empty() {
            return Err(LoadError::NoPrograms);
        }
        let kernel = kernel_release();
        check_kernel_version(&kernel)?;
        let mut config = config;
        // The kernel's BTF (megabytes) is parsed at most once, by whichever
        // of the pid translation, the exit detection and the socket tier
        // needs it first.
        let parsed = std::cell::OnceCell::new();
        let kernel_btf = || {
            parsed
                .get_or_init(crate::kernel::btf::Btf::from_sys_fs)
                .as_ref()
                .map_err(|e| format!("no usable kernel BTF ({e})"))
        };
        config.pidns = pidns::own_namespace(kernel_btf)?;
        raise_memlock_limit();
        let root = tracefs::tracefs_root()?;
        let formats = tracefs::read_offsets(&root)?;
        let mut fallbacks = Vec::new();
        // Ways to tell a process exit from a thread exit, best first.
        let mut exits = Vec::new();
        if formats.has_exit_group_dead {
            exits.push(ExitSource::GroupDeadField);
        } else {
            match kernel_btf().and_then(exit_offsets) {
                Ok((signal, live)) => {
                    config.task_signal_offset = signal;
                    config.signal_live_offset = live;
                    exits.push(ExitSource::LiveCount);
                }
                Err(why) => fallbacks.push(format!("exit: no group_dead field, and {why}")),
            }
        }
        exits.push(ExitSource::Leader);
        let tiers: &[Tier] = match preference {
            HookPreference::Auto => &[Tier::SocketFentry, Tier::Fentry, Tier::Socket, Tier::SyscallTracepoint],
            HookPreference::Tracepoint => &[Tier::SyscallTracepoint],
            HookPreference::Socket => &[Tier::Socket, Tier::SyscallTracepoint],
        };
        // What the socket tiers need (the tracepoint, where the user
        // registers are; the socket tier also the restorer), looked for
        // when a plan first asks (not when a faster tier was proven first).
        let mut socket_inputs: Option<bool> = None;
        let mut restorer: Option<Option<Found>> = None;
        let plans = tiers.iter().flat_map(|&tier| exits.iter().map(move |&exit| Plan { tier, exit }));
        let mut last_failure = None;
        // Tiers the kernel refused at load or attach: no second try with
        // another exit source.
        let mut refused: Vec<Tier> = Vec::new();
        for plan in plans {
            if refused.contains(&plan.tier) {
                continue;
            }
            if matches!(plan.tier, Tier::Socket | Tier::SocketFentry)
                && !*socket_inputs.get_or_insert_with(|| {
                    match kernel_btf().and_then(|btf| socket_tier_inputs(&root, btf, &mut config)) {
                        Ok(()) => true,
                        Err(why) => {
                            fallbacks.push(format!("socket sends not hooked: {why}"));
                            false
                        }
                    }
                })
            {
                continue;
            }
            if plan.tier == Tier::Socket
                && restorer
                    .get_or_insert_with(|| match crate::sys::restorer::own() {
                        Ok(r) => Some(r),
                        Err(e) => {
                            fallbacks
                                .push(format!("{}cannot find the signal restorer: {e}", Tier::Socket.refused_prefix()));
                            None
                        }
                    })
                    .is_none()
            {
                continue;
            }
            let mut cfg = config;
            cfg.exit_source = plan.exit.raw();
            // Only the socket tier hooks restorers; socket_fentry shares its
            // inputs but sees rt_sigreturn itself, so its deliveries do not
            // read them.
            if plan.tier != Tier::Socket {
                cfg.sighand_action = 0;
            }
            let mut probes = match Self::attach(
                cfg,
                formats.offsets,
                plan.tier,
                restorer.as_ref().and_then(Option::as_ref),
            ) {
                Ok(p) => p,
                Err(e) if plan.tier != Tier::SyscallTracepoint => {
                    let trampolines = matches!(plan.tier, Tier::Fentry | Tier::SocketFentry);
                    let line = match &e {
                        // No trampolines at all: every tier built on them
                        // is refused the same way, and said once.
                        LoadError::Permission { what, .. } if trampolines => {
                            refused.extend([Tier::Fentry, Tier::SocketFentry]);
                            format!(
                                "fentry/fexit refused: {what}: permission denied (this kernel forbids BPF trampolines \
                                 to root: lockdown or a security policy)"
                            )
                        }
                        // A verifier log can run to pages: its start names
                        // the program, its end the reason.
                        _ => {
                            tracing::debug!("{} tier refused: {}", plan.tier.as_str(), error_chain(&e));
                            format!("{}{}", plan.tier.refused_prefix(), shorten(&error_chain(&e)))
                        }
                    };
                    fallbacks.push(line);
                    refused.push(plan.tier);
                    continue;
                }
                Err(e) => return Err(e),
            };
            // The self-test proves the on-demand pipe hooks too (and that a
            // write(2) to a socket is then reported once, not twice).
            let tested = probes.set_pipe_write_hooks(true).map_err(|e| e.to_string()).and_then(|_| {
                let tested = probes.self_test(&config);
                probes.set_pipe_write_hooks(false).map_err(|e| e.to_string())?;
                tested
            });
            match tested {
                Ok(self_test) => {
                    let jobs = probes.job_reports(plan);
                    probes.report = Some(HookReport {
                        kernel,
                        tier: plan.tier,
                        exit_source: plan.exit,
                        jobs,
                        fallbacks,
                        self_test,
                        pid_namespace: (config.pidns.inum != 0).then_some(config.pidns.inum),
                    });
                    return Ok(probes);
                }
                Err(failed) => {
                    fallbacks.push(format!(
                        "{} hooks with exit detection by {}: self-test failed: {failed}",
                        plan.tier.as_str(),
                        plan.exit.describe()
                    ));
                    last_failure = Some(failed);
                }
            }
        }
        Err(LoadError::SelfTest { detail: last_failure.unwrap_or_default(), tried: fallbacks.join("; ") })
    }

    /// Loads the object and attaches one plan's programs.
    fn attach(
        config: Config,
        offsets: TracepointOffsets,
        tier: Tier,
        restorer: Option<&Found>,
    ) -> Result<Self, LoadError> {
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
        let mut own_restorer = None;
        let tracepoints: Vec<_> = match tier {
            Tier::SocketFentry => {
                hooks.push(attach_raw_tracepoint(&mut ebpf, "sock_send_length", "sock_send_length", Job::WritePath)?);
                hooks.extend(attach_btf_hooks(&mut ebpf, SOCKET_FENTRY_HOOKS)?);
                TRACEPOINTS.to_vec()
            }
            Tier::Fentry => {
                hooks.extend(attach_btf_hooks(&mut ebpf, BTF_HOOKS)?);
                TRACEPOINTS.to_vec()
            }
            Tier::Socket => {
                let restorer = restorer.ok_or_else(|| LoadError::Other {
                    what: "the socket tier".into(),
                    source: "no signal restorer was found".into(),
                })?;
                hooks.push(attach_raw_tracepoint(&mut ebpf, "sock_send_length", "sock_send_length", Job::WritePath)?);
                hooks.push(attach_restorer(&mut ebpf, restorer)?);
                own_restorer = Some(restorer.key);
                // Loaded now (a verifier rejection refuses the tier), attached
                // on demand.
                let prog: &mut RawTracePoint = program_of(&mut ebpf, PIPE_WRITE_PROGRAM)?;
                prog.load().map_err(|e| {
                    classify_load(PIPE_WRITE_PROGRAM, format!("load program `{PIPE_WRITE_PROGRAM}`"), e)
                })?;
                TRACEPOINTS.to_vec()
            }
            Tier::SyscallTracepoint => TRACEPOINTS.iter().chain(SYSCALL_TRACEPOINTS).copied().collect(),
        };
        // In a pid namespace of its own, signal_generate comes from the raw
        // tracepoint, which passes the target task to translate.
        let translate = config.pidns.inum != 0;
        let tracepoints = tracepoints.into_iter().filter(|&(program, ..)| !(translate && program == "signal_generate"));
        if translate {
            hooks.push(attach_raw_tracepoint(&mut ebpf, "signal_generate_ns", "signal_generate", Job::SignalPath)?);
        }
        for (program, group, event, job) in tracepoints {
            let prog: &mut TracePoint = program_of(&mut ebpf, program)?;
            // One program may serve several tracepoints: load it once.
            if prog.fd().is_err() {
                prog.load().map_err(|e| match e {
                    e @ ProgramError::LoadError { .. } if !is_permission_denied(&e) => {
                        LoadError::Verifier { program: program.to_string(), source: e }
                    }
                    e => classify_load(program, format!("load program `{program}`"), e),
                })?;
            }
            prog.attach(group, event)
                .map_err(|e| classify(format!("attach `{program}` to tracepoint {group}:{event}"), e))?;
            let kind = if group == "syscalls" { "syscall_tracepoint" } else { "tracepoint" };
            hooks.push(Hook { program, job, tier: kind, attach_point: format!("{group}:{event}") });
        }
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").ok_or_else(|| missing_map("COUNTERS"))?)
            .map_err(|e| classify("opening map COUNTERS", e))?;
        let open_windows =
            aya::maps::Array::try_from(ebpf.take_map("OPEN_WINDOWS").ok_or_else(|| missing_map("OPEN_WINDOWS"))?)
                .map_err(|e| classify("opening map OPEN_WINDOWS", e))?;
        let events = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or_else(|| missing_map("EVENTS"))?)
            .map_err(|e| classify("opening map EVENTS", e))?;
        let watched = HashMap::try_from(ebpf.take_map("WATCHED_PIDS").ok_or_else(|| missing_map("WATCHED_PIDS"))?)
            .map_err(|e| classify("opening map WATCHED_PIDS", e))?;
        Ok(Probes {
            ebpf,
            logger,
            hooks,
            report: None,
            counters,
            open_windows,
            events: Some(events),
            watched: Some(watched),
            backlog: Vec::new(),
            pipe_writes: if tier == Tier::Socket { PipeWrites::OnDemand(None) } else { PipeWrites::Always },
            restorers: own_restorer.map(|key| HashSet::from([key])),
        })
    }

    /// Whether this tier sees handler returns through restorer uprobes
    /// (and so needs one on each libc whose handlers run).
    pub fn hooks_restorers(&self) -> bool {
        self.restorers.is_some()
    }

    /// How many restorer files are hooked.
    pub fn restorers_hooked(&self) -> usize {
        self.restorers.as_ref().map_or(0, HashSet::len)
    }

    /// Hooks the restorer `found` in another process's file, unless it is
    /// hooked already; returns whether a uprobe was attached. The uprobe
    /// is attached through the open file (`/proc/self/fd/N`): the file
    /// checked is the file hooked.
    pub fn hook_restorer(&mut self, found: &Found) -> Result<bool, LoadError> {
        let Some(hooked) = &self.restorers else { return Ok(false) };
        if hooked.contains(&found.key) {
            return Ok(false);
        }
        if hooked.len() >= MAX_RESTORER_HOOKS {
            return Err(LoadError::Other {
                what: format!("hooking the restorer in {}", found.path.display()),
                source: format!("{MAX_RESTORER_HOOKS} restorer files are hooked already, the most this agent hooks")
                    .into(),
            });
        }
        let hook = attach_restorer(&mut self.ebpf, found)?;
        self.hooks.push(hook);
        self.restorers.get_or_insert_with(HashSet::new).insert(found.key);
        Ok(true)
    }

    /// Attaches (`on`) or detaches the syscall tracepoints that see writes
    /// to pipes and eventfds on the socket tier; returns whether anything
    /// changed. While they are attached every syscall on the host takes
    /// the tracing slow path, so the agent attaches them only while an
    /// actor needs them. Other tiers see those writes always: no-op.
    pub fn set_pipe_write_hooks(&mut self, on: bool) -> Result<bool, LoadError> {
        let PipeWrites::OnDemand(link) = &mut self.pipe_writes else { return Ok(false) };
        if on == link.is_some() {
            return Ok(false);
        }
        let prog: &mut RawTracePoint = program_of(&mut self.ebpf, PIPE_WRITE_PROGRAM)?;
        match link.take() {
            None => {
                *link = Some(prog.attach(PIPE_WRITE_TRACEPOINT).map_err(|e| {
                    classify(format!("attach `{PIPE_WRITE_PROGRAM}` to raw tracepoint {PIPE_WRITE_TRACEPOINT}"), e)
                })?)
            }
            Some(id) => prog.detach(id).map_err(|e| classify(format!("detach `{PIPE_WRITE_PROGRAM}`"), e))?,
        }
        Ok(true)
    }

    /// Whether a syscall hook is attached right now (every syscall on the
    /// host then takes the tracing slow path).
    pub fn syscall_tracepoints_attached(&self) -> bool {
        match &self.pipe_writes {
            PipeWrites::OnDemand(link) => link.is_some(),
            PipeWrites::Always => self.hooks.iter().any(|h| h.tier == "syscall_tracepoint"),
        }
    }

    /// Whether writes to pipes and eventfds are seen right now, and how:
    /// `None` when the tier sees them always, else whether the on-demand
    /// syscall tracepoints are attached.
    pub fn pipe_write_hooks_attached(&self) -> Option<bool> {
        match &self.pipe_writes {
            PipeWrites::Always => None,
            PipeWrites::OnDemand(link) => Some(link.is_some()),
        }
    }

    /// Runs the self-test child and reads what the kernel reported about it.
    fn self_test(&mut self, config: &Config) -> Result<SelfTestReport, String> {
        let (Some(ring), Some(watched)) = (self.events.as_mut(), self.watched.as_mut()) else {
            return Err("maps already handed out".into());
        };
        let signal = selftest::pick_signal(config.signal_mask);
        let outcome = selftest::run(ring, watched, signal);
        self.backlog.extend(outcome.others);
        outcome.result
    }

    fn job_reports(&self, plan: Plan) -> Vec<JobReport> {
        let mut jobs: Vec<JobReport> = Vec::new();
        for hook in &self.hooks {
            match jobs.iter_mut().find(|j| j.job == hook.job) {
                Some(j) => j.attach_points.push(hook.attach_point.clone()),
                None => jobs.push(JobReport {
                    job: hook.job,
                    tier: hook.tier,
                    attach_points: vec![hook.attach_point.clone()],
                    note: None,
                }),
            }
        }
        for j in &mut jobs {
            if j.job == Job::Exit {
                j.note = Some(plan.exit.describe().to_string());
            }
            if j.job == Job::WritePath && plan.tier == Tier::Socket {
                j.note = Some(format!(
                    "pipe and eventfd writes: raw:{PIPE_WRITE_TRACEPOINT} (every syscall pays while attached), \
                     attached only while an actor needs it"
                ));
            }
        }
        jobs.sort_by_key(|j| j.job);
        jobs
    }

    /// The hooks in use.
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    /// What was attached and why, for the start-up report and /metrics.
    pub fn report(&self) -> &HookReport {
        self.report.as_ref().expect("Probes::load sets the report before returning")
    }

    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        self.events.take().ok_or_else(|| missing_map("EVENTS"))
    }

    /// Events read during the self-test that belong to the pipeline, in
    /// order: feed them before the ring buffer's.
    pub fn take_backlog(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.backlog)
    }

    /// The watched-process map (tgid → flags); can be taken once.
    pub fn take_watched_pids(&mut self) -> Result<HashMap<MapData, u32, u32>, LoadError> {
        self.watched.take().ok_or_else(|| missing_map("WATCHED_PIDS"))
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
        let sum = |slot: u32| -> u64 { self.counters.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        KernelCounters {
            lost: std::array::from_fn(|k| sum(counter::LOST_BASE + k as u32)),
            handler_map_full: sum(counter::HANDLER_MAP_FULL),
            stale_windows: sum(counter::STALE_WINDOWS),
        }
    }

    /// Per-program run count and run time (ns), when the kernel collects
    /// them (`kernel.bpf_stats_enabled=1`).
    pub fn program_stats(&self) -> StdHashMap<&'static str, ProgramStats> {
        use std::os::fd::AsFd as _;
        let mut out = StdHashMap::new();
        for name in self.hooks.iter().map(|h| h.program) {
            let Some(prog) = self.ebpf.program(name) else { continue };
            let Ok(info) = prog.info() else { continue };
            let recursion_misses = prog.fd().ok().and_then(|fd| crate::sys::bpfinfo::recursion_misses(fd.as_fd()).ok());
            out.insert(
                name,
                ProgramStats {
                    run_count: info.run_count(),
                    run_ns: info.run_time().as_nanos() as u64,
                    recursion_misses,
                },
            );
        }
        out
    }
}

impl Tier {
    fn refused_prefix(self) -> &'static str {
        match self {
            Tier::SocketFentry => "socket sends with fentry/fexit refused: ",
            Tier::Fentry => "fentry/fexit refused: ",
            Tier::Socket => "socket sends and restorer uprobe not used: ",
            Tier::SyscallTracepoint => "syscall tracepoints refused: ",
        }
    }
}

/// At most ~600 characters: the first 200 and the last 400.
fn shorten(text: &str) -> String {
    if text.chars().count() <= 600 {
        return text.to_string();
    }
    let head: String = text.chars().take(200).collect();
    let tail: String = text.chars().rev().take(400).collect::<Vec<_>>().into_iter().rev().collect();
    format!("{head} … {tail}")
}

/// An error and its causes on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        text.push_str(&format!(": {cause}"));
        cur = cause.source();
    }
    text
}

/// Offsets of `task_struct.signal` and `signal_struct.live` from BTF.
fn exit_offsets(btf: &crate::kernel::btf::Btf) -> Result<(u32, u32), String> {
    let signal = btf.member_offset("task_struct", "signal").map_err(|e| e.to_string())?;
    let live = btf.member_offset("signal_struct", "live").map_err(|e| e.to_string())?;
    Ok((signal, live))
}

/// Program `name` of the object, as its type (`TracePoint`, `UProbe`, …).
fn program_of<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| LoadError::Other {
            what: format!("finding program `{name}` in the object"),
            source: "missing from the embedded object".into(),
        })?
        .try_into()
        .map_err(|e| classify(format!("program `{name}`"), e))
}

fn attach_raw_tracepoint(ebpf: &mut Ebpf, program: &'static str, event: &str, job: Job) -> Result<Hook, LoadError> {
    let prog: &mut RawTracePoint = program_of(ebpf, program)?;
    prog.load().map_err(|e| classify_load(program, format!("load program `{program}`"), e))?;
    prog.attach(event).map_err(|e| classify(format!("attach `{program}` to raw tracepoint {event}"), e))?;
    Ok(Hook { program, job, tier: "raw_tracepoint", attach_point: format!("raw:{event}") })
}

/// The uprobe on a signal restorer: every handler return of a process
/// using that file's restorer. Attached through the open file
/// (`/proc/self/fd/N`): the file checked is the file hooked. The program is
/// loaded with the first.
fn attach_restorer(ebpf: &mut Ebpf, found: &Found) -> Result<Hook, LoadError> {
    let program = "signal_restorer";
    let prog: &mut UProbe = program_of(ebpf, program)?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| classify_load(program, format!("load program `{program}`"), e))?;
    }
    let at = format!("{}+{:#x}", found.path.display(), found.key.offset);
    prog.attach(
        aya::programs::uprobe::UProbeAttachLocation::AbsoluteOffset(found.key.offset),
        format!("/proc/self/fd/{}", found.file.as_raw_fd()),
        aya::programs::uprobe::UProbeScope::AllProcesses,
    )
    .map_err(|e| classify(format!("attach `{program}` to {at}"), e))?;
    Ok(Hook { program, job: Job::HandlerReturn, tier: "uprobe", attach_point: format!("uprobe:{at}") })
}

/// What the socket tiers need beyond the tracepoints: the
/// `sock:sock_send_length` event (6.12+) and where the user registers are
/// (task_struct.stack from BTF; x86_64's THREAD_SIZE).
fn socket_tier_inputs(
    tracefs: &std::path::Path,
    btf: &crate::kernel::btf::Btf,
    config: &mut Config,
) -> Result<(), String> {
    if !cfg!(target_arch = "x86_64") {
        return Err("only built for x86_64's register layout".into());
    }
    if !tracefs.join("events/sock/sock_send_length").exists() {
        return Err("this kernel has no sock:sock_send_length tracepoint (Linux 6.12+)".into());
    }
    let member = |s: &str, m: &str| btf.member_offset(s, m).map_err(|e| e.to_string());
    config.task_stack_offset = member("task_struct", "stack")?;
    config.task_sas_ss_sp = member("task_struct", "sas_ss_sp")?;
    config.task_sas_ss_size = member("task_struct", "sas_ss_size")?;
    // Each handler's restorer, so that the agent can hook the restorer of
    // every libc it meets (a container's is another file than its own).
    config.task_sighand = member("task_struct", "sighand")?;
    config.sighand_action = member("sighand_struct", "action")?;
    config.k_sigaction_size = btf.struct_size("k_sigaction").map_err(|e| e.to_string())?;
    config.sa_restorer = member("sigaction", "sa_restorer")?;
    // THREAD_SIZE on x86_64 (16 KiB; 32 KiB with KASAN): a wrong guess
    // reads garbage registers, and the self-test then refuses the tier.
    config.thread_size = 16 * 1024;
    Ok(())
}

/// Loads and attaches the fentry/fexit programs. On error the caller drops
/// the whole object, which detaches whatever was attached: all or none (a
/// write path on fexit with rt_sigreturn missing would leave handler
/// windows open).
fn attach_btf_hooks(ebpf: &mut Ebpf, wanted: &[(&'static str, &[&'static str], bool)]) -> Result<Vec<Hook>, LoadError> {
    use aya::{
        Btf,
        programs::{FEntry, FExit},
    };
    let btf = Btf::from_sys_fs().map_err(|e| classify("reading kernel BTF for fentry/fexit", e))?;
    let mut hooks = Vec::new();
    for &(program, functions, is_exit) in wanted {
        let prog = ebpf.program_mut(program).ok_or_else(|| LoadError::Other {
            what: format!("finding program `{program}` in the object"),
            source: "missing from the embedded object".into(),
        })?;
        let (tier, job) = if is_exit { ("fexit", Job::WritePath) } else { ("fentry", Job::HandlerReturn) };
        // The first candidate in this kernel's BTF.
        let function = functions
            .iter()
            .copied()
            .find(|f| btf.id_by_type_name_kind(f, aya_obj::btf::BtfKind::Func).is_ok())
            .ok_or_else(|| LoadError::Other {
                what: format!("finding {} in the kernel's BTF", functions.join(" or ")),
                source: "not there: this kernel cannot hook it with fentry/fexit".into(),
            })?;
        let attached = if is_exit {
            let p: &mut FExit = prog.try_into().map_err(|e| classify(format!("program `{program}`"), e))?;
            p.load(function, &btf)
                .map_err(|e| classify_load(program, format!("load fexit {function}"), e))
                .and_then(|()| p.attach().map(drop).map_err(|e| classify(format!("attach fexit {function}"), e)))
        } else {
            let p: &mut FEntry = prog.try_into().map_err(|e| classify(format!("program `{program}`"), e))?;
            p.load(function, &btf)
                .map_err(|e| classify_load(program, format!("load fentry {function}"), e))
                .and_then(|()| p.attach().map(drop).map_err(|e| classify(format!("attach fentry {function}"), e)))
        };
        attached?;
        hooks.push(Hook { program, job, tier, attach_point: function.to_string() });
    }
    Ok(hooks)
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
    let unlimited = rustix::process::Rlimit { current: None, maximum: None };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Memlock, unlimited) {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({e}); fine on kernels >= 5.11, which account BPF memory to the cgroup"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(errno: i32) -> ProgramError {
        ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new("121: R3 unbounded memory access".into()),
        }
    }

    #[test]
    fn a_verifier_rejection_is_not_called_a_permission_problem() {
        // EACCES from BPF_PROG_LOAD: the verifier said no; its log is kept.
        let e = classify_load("p", "load program `p`".into(), load_error(libc::EACCES));
        assert!(matches!(e, LoadError::Verifier { .. }), "{e:?}");
        assert!(error_chain(&e).contains("unbounded memory access"), "{}", error_chain(&e));
        // EPERM: no rights.
        let e = classify_load("p", "load program `p`".into(), load_error(libc::EPERM));
        assert!(matches!(e, LoadError::Permission { .. }), "{e:?}");
    }

    #[test]
    fn kernel_releases_parse_and_old_ones_are_refused_in_one_sentence() {
        assert_eq!(parse_release("6.1.0-47-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.10.0-35-amd64"), Some((5, 10)));
        assert_eq!(parse_release("6.18.44-fc-v1045"), Some((6, 18)));
        assert_eq!(parse_release("4.19.0-27-amd64"), Some((4, 19)));
        assert_eq!(parse_release("garbage"), None);
        assert!(check_kernel_version("5.10.0-35-amd64").is_ok());
        assert!(check_kernel_version("6.12.57+deb12-amd64").is_ok());
        let err = check_kernel_version("5.4.0-216-generic").unwrap_err().to_string();
        assert!(err.starts_with("sigwake needs Linux 5.10 or newer and this is 5.4.0-216-generic"), "{err}");
        assert!(check_kernel_version("").is_err());
    }
}
