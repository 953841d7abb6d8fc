//! Wire types shared by the sigwake kernel programs (`sigwake-ebpf`) and the
//! agent. Everything here is `#[repr(C)]`, fixed width, with explicit padding,
//! so both sides agree on the layout byte for byte.
#![no_std]

/// Stable event kinds. Discriminants are never reused; a new kind gets a new
/// number and old agents count it as an unknown-kind decode error.
pub mod kind {
    /// `signal:signal_generate`: a signal was sent (any result).
    pub const SIGNAL_GENERATE: u32 = 1;
    /// `signal:signal_deliver` with a user handler: the thread enters a handler.
    pub const SIGNAL_DELIVER: u32 = 2;
    /// A `write(2)` issued from inside a signal handler returned.
    pub const HANDLER_WRITE: u32 = 3;
    /// `rt_sigreturn(2)`: the thread left its signal handler.
    pub const HANDLER_RETURN: u32 = 4;
    /// `sched:sched_process_exit` with `group_dead`: a watched or
    /// previously-seen process exited.
    pub const PROCESS_EXIT: u32 = 5;
    /// `sched:sched_process_exec`: a process exec'd (only when
    /// `Config::report_exec` is set; discovery re-examines it).
    pub const PROCESS_EXEC: u32 = 6;
}

/// The calls a handler can send its wakeup byte with (HANDLER_WRITE `call`).
/// Stable numbers, like [`kind`].
pub mod write_call {
    pub const WRITE: u32 = 1;
    pub const WRITEV: u32 = 2;
    /// `send(2)` is `sendto(2)` with no address on every libc.
    pub const SENDTO: u32 = 3;
    pub const SENDMSG: u32 = 4;
}

/// `signal_generate.result` values (`enum trace_signal_result` in
/// include/trace/events/signal.h). Stable kernel ABI since 3.8.
pub mod generate_result {
    pub const DELIVERED: i32 = 0;
    pub const IGNORED: i32 = 1;
    pub const ALREADY_PENDING: i32 = 2;
    pub const OVERFLOW_FAIL: i32 = 3;
    pub const LOSE_INFO: i32 = 4;
}

/// One event on the ring buffer. The fields a kind does not use are zero.
///
/// | field    | GENERATE             | DELIVER        | HANDLER_WRITE         | HANDLER_RETURN | PROCESS_EXIT |
/// |----------|----------------------|----------------|-----------------------|----------------|--------------|
/// | pid/tid  | sender               | receiver       | writer                | thread         | exiting      |
/// | target   | target tid           |                |                       |                |              |
/// | sig      | signal               | signal         | innermost handler sig | signal         |              |
/// | arg0     | code                 | code           | fd                    | handler depth  |              |
/// | arg1     | result               | sa_flags       | byte count            | ns in handler  |              |
/// | arg2     | group (1 = process)  | sa_handler     | return value (i64)    |                |              |
/// | arg3     |                      | sa_restorer    |                       |                |              |
/// | call     |                      |                | [`write_call`]        |                |              |
/// | comm2    | target comm          |                |                       |                |              |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// One of [`kind`].
    pub kind: u32,
    pub sig: i32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Thread-group id (the process id) of the current task.
    pub pid: u32,
    /// Thread id of the current task.
    pub tid: u32,
    /// Target thread id of a generated signal.
    pub target: i32,
    /// HANDLER_WRITE: which call carried the bytes, one of [`write_call`].
    pub call: u32,
    pub arg0: i64,
    pub arg1: i64,
    pub arg2: i64,
    /// DELIVER: the handler's `sa_restorer`, the code it returns into (0:
    /// none, or not read on this tier).
    pub arg3: i64,
    /// Command name of the current task.
    pub comm: [u8; 16],
    /// Command name of the target task (GENERATE only).
    pub comm2: [u8; 16],
}

pub const RAW_EVENT_SIZE: usize = 96;
const _: () = assert!(core::mem::size_of::<RawEvent>() == RAW_EVENT_SIZE);

/// Tracepoint field offsets, read from tracefs by the agent at load time and
/// passed in as a global, because they differ between kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointOffsets {
    pub gen_sig: u32,
    pub gen_code: u32,
    pub gen_comm: u32,
    pub gen_pid: u32,
    pub gen_group: u32,
    pub gen_result: u32,
    pub deliver_sig: u32,
    pub deliver_code: u32,
    pub deliver_sa_handler: u32,
    pub deliver_sa_flags: u32,
    pub write_fd: u32,
    pub write_count: u32,
    pub write_ret: u32,
    pub writev_fd: u32,
    pub writev_vec: u32,
    pub writev_vlen: u32,
    pub sendto_fd: u32,
    pub sendto_len: u32,
    pub sendmsg_fd: u32,
    pub sendmsg_msg: u32,
    pub exit_pid: u32,
    /// Offset of `sched_process_exit.group_dead` (6.16+); only read when
    /// `Config::exit_source` is [`exit_source::FIELD`].
    pub exit_group_dead: u32,
    pub _pad0: u32,
}

impl TracepointOffsets {
    /// Placeholder the programs are compiled with; the loader always
    /// overrides it (an all-zero table would read `common_type`).
    pub const ZERO: TracepointOffsets = TracepointOffsets {
        gen_sig: 0,
        gen_code: 0,
        gen_comm: 0,
        gen_pid: 0,
        gen_group: 0,
        gen_result: 0,
        deliver_sig: 0,
        deliver_code: 0,
        deliver_sa_handler: 0,
        deliver_sa_flags: 0,
        write_fd: 0,
        write_count: 0,
        write_ret: 0,
        writev_fd: 0,
        writev_vec: 0,
        writev_vlen: 0,
        sendto_fd: 0,
        sendto_len: 0,
        sendmsg_fd: 0,
        sendmsg_msg: 0,
        exit_pid: 0,
        exit_group_dead: 0,
        _pad0: 0,
    };
}

/// Per-load knobs, passed in as one global so the loader sets them together.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Bit `n` set: report signal `n` (1..=64). Signals outside the mask are
    /// not reported and do not open a handler window.
    pub signal_mask: u64,
    /// A handler window older than this is treated as closed (a handler that
    /// left with `siglongjmp` never calls `rt_sigreturn`).
    pub handler_window_ns: u64,
    /// 1: report only watched processes (WATCHED_PIDS) on the signal path.
    /// 0: report every process (trace and auto-discovery).
    pub watched_only: u32,
    /// 1: report successful handler writes too (auto-discovery of wakeup
    /// fds); 0: only failed ones.
    pub report_ok_writes: u32,
    /// 1: report every exec (discovery re-examines the process).
    pub report_exec: u32,
    /// How `sched_process_exit` learns that the whole process died, one
    /// of [`exit_source`].
    pub exit_source: u32,
    /// Byte offsets of `task_struct.signal` and `signal_struct.live`, from
    /// the kernel's BTF (for [`exit_source::LIVE_COUNT`]).
    pub task_signal_offset: u32,
    pub signal_live_offset: u32,
    /// How pids are reported: see [`PidNamespace`].
    pub pidns: PidNamespace,
    /// Where the current task's user registers are, for hooks that do not
    /// run at a syscall (`sock:sock_send_length`, the restorer uprobe):
    /// `task_struct.stack` (BTF) and the kernel's THREAD_SIZE; the user
    /// `struct pt_regs` sits at the top of the task's kernel stack.
    /// `thread_size` 0: unknown (those hooks are not used).
    pub task_stack_offset: u32,
    pub thread_size: u32,
    /// `task_struct.sas_ss_sp` and `sas_ss_size` (BTF): a handler with
    /// SA_ONSTACK runs on the alternate signal stack when one is set.
    pub task_sas_ss_sp: u32,
    pub task_sas_ss_size: u32,
    /// Where a handler's `sa_restorer` is (BTF): `task_struct.sighand`,
    /// `sighand_struct.action`, `sizeof(struct k_sigaction)` and
    /// `sigaction.sa_restorer` (`k_sigaction.sa` is at 0). `sighand_action`
    /// 0: not read (only the socket tier needs it: it hooks each restorer
    /// it meets with a uprobe).
    pub task_sighand: u32,
    pub sighand_action: u32,
    pub k_sigaction_size: u32,
    pub sa_restorer: u32,
}

/// The agent's pid namespace, so that every pid the programs report is the
/// pid the agent itself sees in /proc, kill(2) and pidfd_open(2).
///
/// BPF helpers report pids of the initial namespace. An agent in a pod's
/// shared pid namespace sees other numbers, and a bystander's namespace pid
/// can equal a target's host pid: reporting host pids there blames (and
/// signals) the wrong process. With `inum` set, the programs walk
/// `task->thread_pid->numbers[]` for the level whose namespace is the
/// agent's, report that number, and report nothing about a task the agent
/// cannot see. Offsets come from the kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PidNamespace {
    /// Inode number of the agent's pid namespace; 0 when it is the initial
    /// one (the kernel's pids are the agent's: nothing to translate).
    pub inum: u32,
    /// `task_struct.thread_pid`, `task_struct.group_leader`, `task_struct.comm`.
    pub task_thread_pid: u32,
    pub task_group_leader: u32,
    pub task_comm: u32,
    /// `pid.level`, `pid.numbers` (an array of `struct upid`).
    pub pid_level: u32,
    pub pid_numbers: u32,
    /// `sizeof(struct upid)` and `upid.ns` (`upid.nr` is at 0).
    pub upid_size: u32,
    pub upid_ns: u32,
    /// `pid_namespace.ns.inum`: offset of `ns` plus `ns_common.inum`.
    pub pidns_inum: u32,
    pub _pad0: u32,
}

impl PidNamespace {
    /// The initial namespace: no translation.
    pub const INITIAL: PidNamespace = PidNamespace {
        inum: 0,
        task_thread_pid: 0,
        task_group_leader: 0,
        task_comm: 0,
        pid_level: 0,
        pid_numbers: 0,
        upid_size: 0,
        upid_ns: 0,
        pidns_inum: 0,
        _pad0: 0,
    };

    /// Pid namespaces nest at most this deep below the initial one for the
    /// programs (the kernel allows 32; the loop must be bounded).
    pub const MAX_LEVEL: u32 = 8;
}

impl Config {
    pub const DEFAULT: Config = Config {
        signal_mask: u64::MAX,
        handler_window_ns: 5_000_000_000,
        watched_only: 0,
        report_ok_writes: 1,
        report_exec: 0,
        exit_source: exit_source::LEADER,
        task_signal_offset: 0,
        signal_live_offset: 0,
        pidns: PidNamespace::INITIAL,
        task_stack_offset: 0,
        thread_size: 0,
        task_sas_ss_sp: 0,
        task_sas_ss_size: 0,
        task_sighand: 0,
        sighand_action: 0,
        k_sigaction_size: 0,
        sa_restorer: 0,
    };
}

/// Ways to tell, at `sched_process_exit`, that the exiting thread was the
/// last of its process. Kernels differ (DESIGN §2), so the agent picks the
/// best one this kernel has at start-up.
pub mod exit_source {
    /// The tracepoint's own `group_dead` field (6.16+).
    pub const FIELD: u32 = 0;
    /// `current->signal->live` read through BTF offsets: do_exit()
    /// decrements it before the tracepoint fires, so 0 means the group is
    /// dead (every kernel with BTF).
    pub const LIVE_COUNT: u32 = 1;
    /// The thread-group leader exited (no BTF): wrong only for a process
    /// whose main thread exits before its other threads; the agent's
    /// liveness sweep catches those.
    pub const LEADER: u32 = 2;
}

/// Nested handlers deeper than this keep only the innermost signals.
pub const MAX_HANDLER_DEPTH: usize = 4;

/// Per-thread handler window, keyed by tid in IN_HANDLER.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandlerWindow {
    /// Entry time of the innermost handler (staleness is judged from it).
    pub entered_ns: u64,
    /// Entry time of each nested handler, outermost at 0, so each level's
    /// own duration is reported when it returns.
    pub entered: [u64; MAX_HANDLER_DEPTH],
    /// Signals of the nested handlers, innermost at `depth - 1`.
    pub sigs: [i32; MAX_HANDLER_DEPTH],
    /// The user stack range each handler's frames live in: below the stack
    /// pointer it interrupted, or its alternate signal stack. A thread whose
    /// stack pointer is outside the innermost range has left that handler
    /// (closes a window where no hook sees the return). 0..0: unknown.
    pub stack_lo: [u64; MAX_HANDLER_DEPTH],
    pub stack_hi: [u64; MAX_HANDLER_DEPTH],
    pub depth: u32,
    /// fd and count of the write in flight (set at the call's entry).
    pub write_fd: i32,
    pub write_count: u64,
    /// Which call is in flight, one of [`write_call`].
    pub write_call: u32,
    /// The last send `sock:sock_send_length` reported (fd, call; call 0:
    /// none), so that the on-demand `sys_exit_write` hook does not report
    /// the same write(2) to a socket again.
    pub socket_sent_fd: i32,
    pub socket_sent_call: u32,
    pub _pad0: u32,
}

/// Kernel-side counters, one slot each in the per-CPU COUNTERS array.
pub mod counter {
    /// Slot 0 is unused (it counted every kind of loss together before
    /// losses were counted per kind).
    pub const UNUSED_0: u32 = 0;
    /// IN_HANDLER full: a handler window could not be tracked.
    pub const HANDLER_MAP_FULL: u32 = 1;
    /// Handler windows discarded as stale (no rt_sigreturn seen).
    pub const STALE_WINDOWS: u32 = 2;
    /// Ring buffer full: an event of kind `k` could not be reserved; slot
    /// `LOST_BASE + k` (kinds are 1..=MAX_KIND; an unknown kind lands in
    /// `LOST_BASE`).
    pub const LOST_BASE: u32 = 8;
    /// The largest [`super::kind`] number.
    pub const MAX_KIND: u32 = 6;
    pub const COUNT: u32 = LOST_BASE + MAX_KIND + 1;

    /// The slot counting lost events of `kind`.
    pub const fn lost(kind: u32) -> u32 {
        if kind >= 1 && kind <= MAX_KIND { LOST_BASE + kind } else { LOST_BASE }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are repr(C), Copy, made only of integers, with explicit
    // padding: every bit pattern is a valid value.
    unsafe impl aya::Pod for super::RawEvent {}
    unsafe impl aya::Pod for super::TracepointOffsets {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::HandlerWindow {}
    unsafe impl aya::Pod for super::PidNamespace {}
}
