//! Hook tiers: what each group of kernel programs is for, which mechanism
//! serves it on this kernel, and the start-up report that says so.

use sigwake_common::exit_source;

use super::selftest::SelfTestReport;

/// What a group of hooks is for, as reported at start-up and on /metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Job {
    /// Signal generation and delivery (opens handler windows).
    SignalPath,
    /// The handler's return (closes handler windows).
    HandlerReturn,
    /// Writes and sends made inside a handler.
    WritePath,
    /// Process exits.
    Exit,
    /// Process execs (discovery).
    Exec,
}

impl Job {
    pub fn as_str(self) -> &'static str {
        match self {
            Job::SignalPath => "signal_path",
            Job::HandlerReturn => "handler_return",
            Job::WritePath => "write_path",
            Job::Exit => "exit",
            Job::Exec => "exec",
        }
    }
}

/// How the write path and handler return are hooked, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Socket sends on `sock:sock_send_length` (raw tracepoint), writes to
    /// pipes and eventfds by fexit on `pipe_write` and `eventfd_write`, the
    /// handler return by fentry on rt_sigreturn: only socket sends, pipe
    /// and eventfd writes and handler returns pay (Linux 6.12+ where BPF
    /// trampolines are allowed).
    SocketFentry,
    /// fentry/fexit on the syscalls' entry points: only those calls pay.
    Fentry,
    /// `sock:sock_send_length` as a raw tracepoint for the write path and a
    /// uprobe on the signal restorer for the return (the agent's libc's at
    /// start, each other libc's when a handler there first runs): no
    /// syscall pays, only socket sends and handler returns. Writes to pipes and eventfds need
    /// syscall tracepoints, attached only while an actor needs them.
    Socket,
    /// `syscalls:*` tracepoints: every syscall on the host pays while attached.
    SyscallTracepoint,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::SocketFentry => "socket_fentry",
            Tier::Fentry => "fentry",
            Tier::Socket => "socket",
            Tier::SyscallTracepoint => "syscall_tracepoint",
        }
    }
}

/// How the exit hook tells that a process (not just a thread) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitSource {
    /// `sched_process_exit.group_dead` (6.16+).
    GroupDeadField,
    /// `current->signal->live`, offsets from BTF.
    LiveCount,
    /// The thread-group leader exited.
    Leader,
}

impl ExitSource {
    pub(crate) fn raw(self) -> u32 {
        match self {
            ExitSource::GroupDeadField => exit_source::FIELD,
            ExitSource::LiveCount => exit_source::LIVE_COUNT,
            ExitSource::Leader => exit_source::LEADER,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            ExitSource::GroupDeadField => "last thread from the tracepoint's group_dead field",
            ExitSource::LiveCount => "last thread from task->signal->live (BTF offsets)",
            ExitSource::Leader => "thread-group leader exit (no group_dead field, no BTF)",
        }
    }
}

/// One job in the start-up report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct JobReport {
    pub job: Job,
    /// `fentry`, `fexit`, `tracepoint`, `syscall_tracepoint`.
    pub tier: &'static str,
    pub attach_points: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What was attached, why faster choices were not, and the self-test.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HookReport {
    /// `uname -r`.
    pub kernel: String,
    pub tier: Tier,
    pub exit_source: ExitSource,
    pub jobs: Vec<JobReport>,
    /// Each faster plan that was tried and given up, with the reason.
    pub fallbacks: Vec<String>,
    pub self_test: SelfTestReport,
    /// Inode of sigwake's pid namespace when it is not the host's (a pod's
    /// shared namespace): every pid is reported as seen from it, and tasks
    /// outside it are not seen at all.
    pub pid_namespace: Option<u32>,
}

/// The start-up report as lines: a table of jobs, why faster plans were
/// not used, and what the self-test proved.
pub fn report_lines(r: &HookReport) -> Vec<String> {
    let mut lines = vec![format!("kernel {}: hooks by job", r.kernel)];
    lines.push(format!("  {:<15} {:<19} attached to", "job", "tier"));
    for j in &r.jobs {
        let mut line = format!("  {:<15} {:<19} {}", j.job.as_str(), j.tier, j.attach_points.join(", "));
        if let Some(note) = &j.note {
            line.push_str(&format!(" ({note})"));
        }
        lines.push(line);
    }
    if r.tier == Tier::SyscallTracepoint {
        lines.push(
            "  syscall tracepoints put every syscall on this host on the tracing slow path while attached".into(),
        );
    }
    if let Some(inum) = r.pid_namespace {
        lines.push(format!(
            "  pids: as seen from sigwake's own pid namespace (inode {inum}), translated in the kernel; processes \
             outside it are not seen"
        ));
    }
    for f in &r.fallbacks {
        lines.push(format!("  fell back: {f}"));
    }
    let t = &r.self_test;
    lines.push(format!(
        "  self-test: failed {}{} from a {} handler reported once each, handler return and exit seen, in {} ms",
        t.calls.join("/"),
        match (t.pipe, t.eventfd) {
            (true, true) => " to a socket and writes to a pipe and an eventfd",
            (true, false) => " to a socket and write to a pipe",
            _ => "",
        },
        t.signal,
        t.elapsed_ms
    ));
    lines
}
