//! sigwake kernel programs.
//!
//! The signal path (`signal_generate`, `signal_deliver`, `rt_sigreturn`,
//! process exit) is rare and reports to the ring buffer. The write path
//! (write, writev, sendto, sendmsg) runs on every such call on the host, so
//! it reads one array slot and returns unless some thread is inside a
//! signal handler, then does one hash lookup on the current tid (an
//! IN_HANDLER window opened by `signal_deliver` and closed by
//! `rt_sigreturn`).
//!
//! # Minimum kernel version
//! 5.8 (BPF ring buffer); the agent requires 5.10, the oldest kernel its
//! matrix runs. Tracepoint field offsets come from tracefs through the
//! OFFSETS global; kernel struct offsets from BTF through CONFIG.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has atomic add but no compare-and-swap, so
// core's AtomicU64::fetch_add is not offered; the intrinsic lowers to
// BPF_ATOMIC add. (Built with RUSTC_BOOTSTRAP=1 anyway, for build-std.)
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics for atomic_xadd, see above")]

use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_func_ret, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::{fentry, fexit, map, raw_tracepoint, tracepoint, uprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, FExitContext, ProbeContext, RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use sigwake_common::{
    Config, HandlerWindow, MAX_HANDLER_DEPTH, PidNamespace, RawEvent, TracepointOffsets, counter, exit_source, kind,
    write_call,
};

#[unsafe(no_mangle)]
static OFFSETS: Global<TracepointOffsets> = Global::new(TracepointOffsets::ZERO);

#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config::DEFAULT);

/// Events to the agent. 4 MiB holds ~43k events: at 100k signals/s the
/// agent may stall ~0.4 s before anything is lost (and losses are counted).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// tid -> the signal handler(s) the thread is running.
#[map]
static IN_HANDLER: HashMap<u32, HandlerWindow> = HashMap::with_max_entries(16384, 0);

/// How many IN_HANDLER entries exist: the write path's first check. It is
/// zero almost all the time, and an array slot is read without a hash
/// lookup, so writes on a host where no thread is in a handler pay only
/// that read. Changed only when an entry is really added or removed, so it
/// never undercounts (an entry left by a handler that never returned keeps
/// it above zero: slower, never wrong).
#[map]
static OPEN_WINDOWS: Array<u64> = Array::with_max_entries(1, 0);

/// tgid -> flags, maintained by the agent from its actor registry.
#[map]
static WATCHED_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// tgids that ran a signal handler, so that their exit is reported even when
/// nothing registered them.
#[map]
static SEEN_PIDS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// MAX_HANDLER_DEPTH is a power of two: `& LEVEL_MASK` bounds an index.
const LEVEL_MASK: usize = MAX_HANDLER_DEPTH - 1;
const _: () = assert!(MAX_HANDLER_DEPTH.is_power_of_two());

const SIG_DFL: u64 = 0;
const SIG_IGN: u64 = 1;

#[inline(always)]
fn bump(slot: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn open_windows_add(delta: u64) {
    if let Some(slot) = OPEN_WINDOWS.get_ptr_mut(0) {
        // SAFETY: a valid, aligned map value; the add is atomic across CPUs
        // (BPF_ATOMIC add) and its result unused.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(slot, delta);
        }
    }
}

/// Removes the thread's handler window, keeping OPEN_WINDOWS in step.
#[inline(always)]
fn close_window(tid: u32) {
    if IN_HANDLER.remove(&tid).is_ok() {
        open_windows_add(u64::MAX); // -1
    }
}

#[inline(always)]
fn no_open_windows() -> bool {
    match OPEN_WINDOWS.get_ptr(0) {
        // SAFETY: valid map value; a racy read only errs towards a lookup.
        Some(slot) => unsafe { core::ptr::read_volatile(slot) == 0 },
        None => false,
    }
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address; offset comes from
    // the tracepoint's own format file.
    unsafe { ctx.read_at::<T>(offset as usize) }.map_err(|e| e as i64)
}

/// (tgid, tid) of the current task in the initial pid namespace: the keys
/// of the programs' own per-thread maps, never reported.
#[inline(always)]
fn current() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// (tgid, tid) of the current task as the agent sees them, or None when the
/// task is outside the agent's pid namespace (nothing is reported about it).
#[inline(always)]
fn visible_current(cfg: &Config) -> Option<(u32, u32)> {
    if cfg.pidns.inum == 0 {
        return Some(current());
    }
    // SAFETY: returns the current task's address; only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    task_ids(task, &cfg.pidns)
}

/// (tgid, tid) of `task` in the agent's pid namespace.
#[inline(always)]
fn task_ids(task: *const u8, ns: &PidNamespace) -> Option<(u32, u32)> {
    let tid = pid_in_agent_ns(read_kernel::<*const u8>(task, ns.task_thread_pid)?, ns)?;
    let leader = read_kernel::<*const u8>(task, ns.task_group_leader)?;
    let tgid = pid_in_agent_ns(read_kernel::<*const u8>(leader, ns.task_thread_pid)?, ns)?;
    Some((tgid, tid))
}

/// The number of a `struct pid` at the level whose namespace is the
/// agent's: `pid->numbers[l].nr` where `numbers[l].ns` has the agent's
/// inode number. A pid that does not reach that namespace (a sibling pod,
/// the host above) has no number there: None.
#[inline(always)]
fn pid_in_agent_ns(pid: *const u8, ns: &PidNamespace) -> Option<u32> {
    let level = read_kernel::<u32>(pid, ns.pid_level)?;
    // Level 0 is the initial namespace, never the agent's when translating.
    let mut l = 1u32;
    while l <= PidNamespace::MAX_LEVEL {
        if l > level {
            return None;
        }
        let upid = pid.wrapping_add((ns.pid_numbers + l * ns.upid_size) as usize);
        let pidns = read_kernel::<*const u8>(upid, ns.upid_ns)?;
        if read_kernel::<u32>(pidns, ns.pidns_inum)? == ns.inum {
            return read_kernel::<i32>(upid, 0).map(|nr| nr as u32);
        }
        l += 1;
    }
    None
}

// x86_64 `struct pt_regs` (arch/x86/include/asm/ptrace.h): 21 words.
const PT_REGS_SIZE: usize = 168;
const PT_REGS_SP: usize = 152;
const PT_REGS_ORIG_AX: usize = 120;
const SA_ONSTACK: u64 = 0x0800_0000;
const SA_RESTORER: u64 = 0x0400_0000;

/// The current task's user registers: the `struct pt_regs` at the top of
/// its kernel stack (`task_pt_regs()`), for hooks that do not run at a
/// syscall's own entry. None where the agent did not find THREAD_SIZE.
#[inline(always)]
fn user_regs(cfg: &Config) -> Option<*const u8> {
    if cfg.thread_size == 0 {
        return None;
    }
    // SAFETY: the current task's address, read only through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let stack = read_kernel::<*const u8>(task, cfg.task_stack_offset)?;
    Some(stack.wrapping_add(cfg.thread_size as usize - PT_REGS_SIZE))
}

#[inline(always)]
fn user_sp(cfg: &Config) -> Option<u64> {
    read_kernel::<u64>(user_regs(cfg)?, PT_REGS_SP as u32)
}

/// The user stack range a handler about to run will use: its alternate
/// signal stack (SA_ONSTACK with one set, and not already on it), else
/// everything below the interrupted stack pointer `sp`. (0, 0): unknown
/// (`sp` 0).
#[inline(always)]
fn handler_stack(cfg: &Config, sa_flags: u64, sp: u64) -> (u64, u64) {
    if sp == 0 {
        return (0, 0);
    }
    if sa_flags & SA_ONSTACK != 0 {
        // SAFETY: as in user_regs.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        let ss_sp = read_kernel::<u64>(task, cfg.task_sas_ss_sp).unwrap_or(0);
        let ss_size = read_kernel::<u64>(task, cfg.task_sas_ss_size).unwrap_or(0);
        let on_it = sp > ss_sp && sp <= ss_sp.wrapping_add(ss_size);
        if ss_size != 0 && !on_it {
            return (ss_sp, ss_sp.wrapping_add(ss_size));
        }
    }
    (0, sp)
}

/// The `sa_restorer` of the current task's action for `sig`: the code its
/// handler returns into (`task->sighand->action[sig - 1].sa.sa_restorer`,
/// offsets from BTF). 0 where the tier does not read it or there is none.
#[inline(always)]
fn handler_restorer(cfg: &Config, sig: i32, sa_flags: u64) -> u64 {
    if cfg.sighand_action == 0 || sa_flags & SA_RESTORER == 0 {
        return 0;
    }
    // SAFETY: as in user_regs.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Some(sighand) = read_kernel::<*const u8>(task, cfg.task_sighand) else { return 0 };
    let slot = (sig.wrapping_sub(1) as u32 & 63) * cfg.k_sigaction_size;
    read_kernel::<u64>(sighand, cfg.sighand_action + slot + cfg.sa_restorer).unwrap_or(0)
}

/// Whether user stack pointer `sp` is on the innermost handler's stack
/// (the range its frames use, recorded at delivery). True when unknown.
#[inline(always)]
fn on_handler_stack(w: &HandlerWindow, sp: u64) -> bool {
    let depth = w.depth as usize;
    let level = depth.wrapping_sub(1) & LEVEL_MASK;
    let (lo, hi) = (w.stack_lo[level], w.stack_hi[level]);
    !(1..=MAX_HANDLER_DEPTH).contains(&depth) || hi == 0 || (sp >= lo && sp < hi)
}

#[inline(always)]
fn read_kernel<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; offsets come from
    // the kernel's BTF.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }.ok()
}

#[inline(always)]
fn signal_enabled(cfg: &Config, sig: i32) -> bool {
    (1..=64).contains(&sig) && cfg.signal_mask & (1u64 << (sig - 1)) != 0
}

#[inline(always)]
fn is_watched(tgid: u32) -> bool {
    // SAFETY: value is a plain u32 we only test for presence.
    unsafe { WATCHED_PIDS.get(&tgid) }.is_some()
}

/// Reserve, fill and submit one event; a full ring buffer is counted.
#[inline(always)]
fn emit(ev: RawEvent) {
    match EVENTS.reserve::<RawEvent>(0) {
        Some(mut entry) => {
            entry.write(ev);
            entry.submit(0);
        }
        None => bump(counter::lost(ev.kind)),
    }
}

/// An event about the current task, `ids` as the agent sees them.
#[inline(always)]
fn base_event(kind: u32, sig: i32, (pid, tid): (u32, u32)) -> RawEvent {
    RawEvent {
        kind,
        sig,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid,
        tid,
        comm: bpf_get_current_comm().unwrap_or_default(),
        ..RawEvent::default()
    }
}

// ---------------------------------------------------------------- signals

#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    let _ = try_signal_generate(&ctx);
    0
}

fn try_signal_generate(ctx: &TracePointContext) -> Result<(), i64> {
    let off = OFFSETS.load();
    let cfg = CONFIG.load();
    let sig: i32 = read(ctx, off.gen_sig)?;
    if !signal_enabled(&cfg, sig) {
        return Ok(());
    }
    // `pid` is the target *thread*; for kill(2) it is the thread-group id.
    let target: i32 = read(ctx, off.gen_pid)?;
    let sender = current();
    if cfg.watched_only != 0 && !is_watched(target as u32) && !is_watched(sender.0) {
        return Ok(());
    }
    let mut ev = base_event(kind::SIGNAL_GENERATE, sig, sender);
    ev.target = target;
    ev.arg0 = read::<i32>(ctx, off.gen_code)? as i64;
    ev.arg1 = read::<i32>(ctx, off.gen_result)? as i64;
    ev.arg2 = read::<i32>(ctx, off.gen_group)? as i64;
    ev.comm2 = read(ctx, off.gen_comm)?;
    emit(ev);
    Ok(())
}

/// signal_generate for an agent in a pid namespace: the raw tracepoint
/// passes the target task itself (`TP_PROTO(int sig, struct kernel_siginfo
/// *info, struct task_struct *task, int group, int result)`, unchanged
/// since 3.8), whose pid in the agent's namespace the plain tracepoint's
/// record does not carry. Attached instead of `signal_generate`.
#[raw_tracepoint(tracepoint = "signal_generate")]
pub fn signal_generate_ns(ctx: RawTracePointContext) -> u32 {
    let _ = try_signal_generate_ns(&ctx);
    0
}

fn try_signal_generate_ns(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = CONFIG.load();
    let sig: i32 = ctx.arg::<u64>(0) as i32;
    if !signal_enabled(&cfg, sig) {
        return None;
    }
    let task: *const u8 = ctx.arg(2);
    // A target outside the agent's namespace is none of its business.
    let (target_pid, target_tid) = task_ids(task, &cfg.pidns)?;
    // A sender outside it (the node's kubelet, the host's init) is
    // reported as pid 0: the signal still reached a process the agent sees.
    let sender = visible_current(&cfg).unwrap_or((0, 0));
    if cfg.watched_only != 0 && !is_watched(target_pid) && (sender.0 == 0 || !is_watched(sender.0)) {
        return None;
    }
    // TP_STORE_SIGINFO: SEND_SIG_NOINFO (0) is SI_USER, SEND_SIG_PRIV (1)
    // SI_KERNEL; otherwise si_code, at byte 8 of the ABI's siginfo.
    let info: u64 = ctx.arg(1);
    let code = match info {
        0 => 0,
        1 => 0x80,
        _ => read_kernel::<i32>(info as *const u8, 8).unwrap_or(0),
    };
    let mut ev = base_event(kind::SIGNAL_GENERATE, sig, sender);
    ev.target = target_tid as i32;
    ev.arg0 = code as i64;
    ev.arg1 = ctx.arg::<u64>(4) as i32 as i64;
    ev.arg2 = ctx.arg::<u64>(3) as i32 as i64;
    ev.comm2 = read_kernel(task, cfg.pidns.task_comm).unwrap_or_default();
    emit(ev);
    Some(())
}

/// Fires in get_signal() when the current thread dequeues a signal, for a
/// handler, SIG_DFL or SIG_IGN alike (kernel/signal.c). For a user handler
/// the thread is about to run it: open its handler window.
#[tracepoint]
pub fn signal_deliver(ctx: TracePointContext) -> u32 {
    let _ = try_signal_deliver(&ctx);
    0
}

fn try_signal_deliver(ctx: &TracePointContext) -> Result<(), i64> {
    let off = OFFSETS.load();
    let cfg = CONFIG.load();
    let sig: i32 = read(ctx, off.deliver_sig)?;
    if !signal_enabled(&cfg, sig) {
        return Ok(());
    }
    let (pid, tid) = current();
    let Some(ids) = visible_current(&cfg) else { return Ok(()) };
    if cfg.watched_only != 0 && !is_watched(ids.0) {
        return Ok(());
    }
    let handler: u64 = read(ctx, off.deliver_sa_handler)?;
    let sa_flags = read::<u64>(ctx, off.deliver_sa_flags)?;
    let mut ev = base_event(kind::SIGNAL_DELIVER, sig, ids);
    ev.arg0 = read::<i32>(ctx, off.deliver_code)? as i64;
    ev.arg1 = sa_flags as i64;
    ev.arg2 = handler as i64;
    let user_handler = handler != SIG_DFL && handler != SIG_IGN;
    if user_handler {
        ev.arg3 = handler_restorer(&cfg, sig, sa_flags) as i64;
    }
    let now = ev.ts_ns;
    emit(ev);

    if !user_handler {
        return Ok(());
    }
    let mut window = HandlerWindow { entered_ns: now, write_fd: -1, ..HandlerWindow::default() };
    // The interrupted user stack pointer (the signal frame is not pushed
    // yet), read once: 0 where the tier does not know where it is. (A plain
    // number: an Option here compiled to a register the verifier refused
    // as uninitialised on one path.)
    let sp = user_sp(&cfg).unwrap_or(0);
    // SAFETY: read-only copy of the thread's own entry.
    // (Read in place: a second copy of the window would not fit the
    // 512-byte stack next to the event.)
    let existed = IN_HANDLER.get_ptr(&tid);
    if let Some(prev) = existed.map(|p| unsafe { &*p }) {
        // A signal that interrupts code off the open handler's stack came
        // after that handler returned, unseen (a restorer not hooked yet, a
        // siglongjmp): a fresh window, not a nested one.
        let still_inside = sp == 0 || on_handler_stack(prev, sp);
        if still_inside && now.wrapping_sub(prev.entered_ns) <= cfg.handler_window_ns {
            window = *prev;
            window.entered_ns = now;
            window.write_fd = -1;
            window.socket_sent_call = 0;
        } else {
            bump(counter::STALE_WINDOWS);
        }
    }
    let depth = window.depth as usize;
    let (lo, hi) = handler_stack(&cfg, sa_flags, sp);
    // Deeper nesting: keep the innermost signal on top.
    let level = if depth < MAX_HANDLER_DEPTH { depth } else { MAX_HANDLER_DEPTH - 1 } & LEVEL_MASK;
    window.sigs[level] = sig;
    window.entered[level] = now;
    window.stack_lo[level] = lo;
    window.stack_hi[level] = hi;
    if depth < MAX_HANDLER_DEPTH {
        window.depth += 1;
    }
    if IN_HANDLER.insert(&tid, &window, 0).is_err() {
        bump(counter::HANDLER_MAP_FULL);
        warn!(ctx, "sigwake: handler window map full; tid {} not tracked", tid);
    } else if existed.is_none() {
        open_windows_add(1);
    }
    let _ = SEEN_PIDS.insert(&pid, &1, 0);
    Ok(())
}

/// rt_sigreturn(2) is how a handler returns to the interrupted code; it
/// closes the innermost handler window of the thread.
#[tracepoint]
pub fn sys_enter_rt_sigreturn(_ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter_rt_sigreturn();
    0
}

fn try_sys_enter_rt_sigreturn() -> Result<(), i64> {
    let (_, tid) = current();
    let Some(window) = IN_HANDLER.get_ptr_mut(&tid) else {
        return Ok(());
    };
    // SAFETY: the entry belongs to the current thread; only it updates it.
    let window = unsafe { &mut *window };
    let depth = window.depth as usize;
    // Indexes are masked, not only range-checked: the compiler may compute
    // an address before the check, and the verifier must see it bounded.
    let level = depth.wrapping_sub(1) & LEVEL_MASK;
    let (sig, entered) = if (1..=MAX_HANDLER_DEPTH).contains(&depth) {
        (window.sigs[level], window.entered[level])
    } else {
        (0, window.entered_ns)
    };
    let ids = visible_current(&CONFIG.load());
    let mut ev = base_event(kind::HANDLER_RETURN, sig, ids.unwrap_or_default());
    ev.arg0 = depth as i64;
    // This level's own time, from its own entry (not the innermost's).
    ev.arg1 = ev.ts_ns.wrapping_sub(entered) as i64;
    if depth <= 1 {
        close_window(tid);
    } else {
        window.depth -= 1;
        window.write_fd = -1;
        window.socket_sent_call = 0;
        // The outer handler runs again: staleness counts from its entry.
        if (2..=MAX_HANDLER_DEPTH).contains(&depth) {
            window.entered_ns = window.entered[depth.wrapping_sub(2) & LEVEL_MASK];
        }
    }
    // A window is opened only for a task the agent sees; its namespace
    // cannot change while it runs a handler.
    if ids.is_some() {
        emit(ev);
    }
    Ok(())
}

// ------------------------------------------------------------- write path
//
// A handler can send its wakeup byte with write(2) (CPython), sendto(2)
// (tokio: `send` is sendto without an address), sendmsg(2) or writev(2).
// Each call's entry records fd, byte count and which call it is in the
// thread's window; one exit program, attached to all four exits, reports
// the result. Everything past the first check runs only for a thread that
// is inside a handler.

/// The window of the current thread if it is inside a handler.
#[inline(always)]
fn handler_window() -> Option<(u32, *mut HandlerWindow)> {
    // Hot path: out at once while no thread on the host is in a handler.
    if no_open_windows() {
        return None;
    }
    let (_, tid) = current();
    // Then one lookup, and out for every thread not in a handler.
    IN_HANDLER.get_ptr_mut(&tid).map(|w| (tid, w))
}

#[inline(always)]
fn begin_write(window: *mut HandlerWindow, call: u32, fd: u64, count: u64) {
    // SAFETY: the entry belongs to the current thread; only it updates it.
    unsafe {
        (*window).write_fd = fd as i32;
        (*window).write_count = count;
        (*window).write_call = call;
    }
}

/// Up to this many iovecs are summed for a writev/sendmsg byte count; a
/// wakeup write has one.
const MAX_IOVECS: u64 = 4;

/// Total length of the first iovecs of a user `struct iovec[]`.
#[inline(always)]
fn iov_bytes(vec: u64, vlen: u64) -> u64 {
    let mut total = 0u64;
    for i in 0..MAX_IOVECS {
        if i >= vlen {
            break;
        }
        // struct iovec { void *iov_base; size_t iov_len; }: 16 bytes.
        let len = (vec + i * 16 + 8) as *const u64;
        // SAFETY: bpf_probe_read_user checks the address.
        total += unsafe { bpf_probe_read_user(len) }.unwrap_or(0);
    }
    total
}

/// Byte count of a user `struct user_msghdr`'s iovecs.
#[inline(always)]
fn msghdr_bytes(msg: u64) -> u64 {
    // struct user_msghdr { void *msg_name; int msg_namelen; (pad)
    //   struct iovec *msg_iov; size_t msg_iovlen; ... }: iov at 16, len at 24.
    // SAFETY: bpf_probe_read_user checks the address.
    let fields =
        unsafe { (bpf_probe_read_user((msg + 16) as *const u64), bpf_probe_read_user((msg + 24) as *const u64)) };
    match fields {
        (Ok(iov), Ok(iovlen)) => iov_bytes(iov, iovlen),
        _ => 0,
    }
}

#[tracepoint]
pub fn sys_enter_write(ctx: TracePointContext) -> u32 {
    let Some((_, window)) = handler_window() else { return 0 };
    let off = OFFSETS.load();
    if let (Ok(fd), Ok(count)) = (read::<u64>(&ctx, off.write_fd), read::<u64>(&ctx, off.write_count)) {
        begin_write(window, write_call::WRITE, fd, count);
    }
    0
}

#[tracepoint]
pub fn sys_enter_writev(ctx: TracePointContext) -> u32 {
    let Some((_, window)) = handler_window() else { return 0 };
    let off = OFFSETS.load();
    if let (Ok(fd), Ok(vec), Ok(vlen)) =
        (read::<u64>(&ctx, off.writev_fd), read::<u64>(&ctx, off.writev_vec), read::<u64>(&ctx, off.writev_vlen))
    {
        begin_write(window, write_call::WRITEV, fd, iov_bytes(vec, vlen));
    }
    0
}

#[tracepoint]
pub fn sys_enter_sendto(ctx: TracePointContext) -> u32 {
    let Some((_, window)) = handler_window() else { return 0 };
    let off = OFFSETS.load();
    if let (Ok(fd), Ok(len)) = (read::<u64>(&ctx, off.sendto_fd), read::<u64>(&ctx, off.sendto_len)) {
        begin_write(window, write_call::SENDTO, fd, len);
    }
    0
}

#[tracepoint]
pub fn sys_enter_sendmsg(ctx: TracePointContext) -> u32 {
    let Some((_, window)) = handler_window() else { return 0 };
    let off = OFFSETS.load();
    if let (Ok(fd), Ok(msg)) = (read::<u64>(&ctx, off.sendmsg_fd), read::<u64>(&ctx, off.sendmsg_msg)) {
        begin_write(window, write_call::SENDMSG, fd, msghdr_bytes(msg));
    }
    0
}

/// Attached to the exit tracepoint of each call above: every
/// `syscalls:sys_exit_*` record has the same layout, so `ret` is at the
/// same offset in all of them.
#[tracepoint]
pub fn sys_exit_wakeup_write(ctx: TracePointContext) -> u32 {
    let Some((tid, window)) = handler_window() else { return 0 };
    // SAFETY: the entry belongs to the current thread.
    if unsafe { (*window).write_fd } < 0 {
        return 0;
    }
    if let Ok(ret) = read::<i64>(&ctx, OFFSETS.load().write_ret) {
        finish_write(tid, window, ret);
    }
    0
}

/// Reports the write in flight of a thread inside a handler, if it should be.
#[inline(always)]
fn finish_write(tid: u32, window: *mut HandlerWindow, ret: i64) {
    // SAFETY: the entry belongs to the current thread.
    let window = unsafe { &mut *window };
    if window.write_fd < 0 {
        return;
    }
    let cfg = CONFIG.load();
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(window.entered_ns) > cfg.handler_window_ns {
        close_window(tid);
        bump(counter::STALE_WINDOWS);
        return;
    }
    let fd = window.write_fd;
    let count = window.write_count;
    let call = window.write_call;
    window.write_fd = -1;
    if ret >= 0 && cfg.report_ok_writes == 0 {
        return;
    }
    let depth = window.depth as usize;
    let sig =
        if (1..=MAX_HANDLER_DEPTH).contains(&depth) { window.sigs[depth.wrapping_sub(1) & LEVEL_MASK] } else { 0 };
    let Some(ids) = visible_current(&cfg) else { return };
    let mut ev = base_event(kind::HANDLER_WRITE, sig, ids);
    ev.ts_ns = now;
    ev.arg0 = fd as i64;
    ev.arg1 = count as i64;
    ev.arg2 = ret;
    ev.call = call;
    emit(ev);
}

// ------------------------------------------- BTF hooks (preferred, if allowed)
//
// Syscall tracepoints set TIF_SYSCALL_TRACEPOINT on every task, so every
// syscall on the host takes the slow path while they are attached. fexit on
// the syscalls' own entry points runs only for those calls. They are the
// arch wrappers (`__x64_sys_write`, …), which every kernel since 4.17 has
// as real functions called through the syscall table, so they cannot be
// inlined away; their one argument is the user's `struct pt_regs`. Some
// kernels refuse fentry/fexit (lockdown, no BTF, missing JIT trampolines);
// the loader then falls back to the tracepoints above, and a start-up
// self-test proves whichever it chose.
//
// # Minimum kernel version
// 5.5 (BPF trampolines), with BTF.

/// Byte offset of syscall argument `n` in the user `struct pt_regs`
/// (arch/x86/include/asm/ptrace.h: di, si, dx; arm64: regs[n]).
#[cfg(not(bpf_target_arch = "aarch64"))]
const SYSCALL_ARG_OFFSETS: [usize; 3] = [112, 104, 96];
#[cfg(bpf_target_arch = "aarch64")]
const SYSCALL_ARG_OFFSETS: [usize; 3] = [0, 8, 16];

/// Syscall argument `n` from a user `struct pt_regs` (the wrapper's
/// argument, or the one at the top of the task's kernel stack).
#[inline(always)]
fn syscall_arg(regs: *const u8, n: usize) -> u64 {
    read_kernel::<u64>(regs, SYSCALL_ARG_OFFSETS[n] as u32).unwrap_or(0)
}

/// The byte count of a write-path call, from its syscall arguments.
#[inline(always)]
fn call_bytes(regs: *const u8, call: u32) -> u64 {
    match call {
        write_call::WRITEV => iov_bytes(syscall_arg(regs, 1), syscall_arg(regs, 2)),
        write_call::SENDMSG => msghdr_bytes(syscall_arg(regs, 1)),
        // write(fd, buf, count), sendto(fd, buf, len, …)
        _ => syscall_arg(regs, 2),
    }
}

#[inline(always)]
fn fexit_write_call(ctx: &FExitContext, call: u32) -> u32 {
    let Some((tid, window)) = handler_window() else { return 0 };
    let regs: *const u8 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    begin_write(window, call, syscall_arg(regs, 0), call_bytes(regs, call));
    finish_write(tid, window, ret);
    0
}

#[cfg_attr(not(bpf_target_arch = "aarch64"), fexit(function = "__x64_sys_write"))]
#[cfg_attr(bpf_target_arch = "aarch64", fexit(function = "__arm64_sys_write"))]
pub fn fexit_sys_write(ctx: FExitContext) -> u32 {
    fexit_write_call(&ctx, write_call::WRITE)
}

#[cfg_attr(not(bpf_target_arch = "aarch64"), fexit(function = "__x64_sys_writev"))]
#[cfg_attr(bpf_target_arch = "aarch64", fexit(function = "__arm64_sys_writev"))]
pub fn fexit_sys_writev(ctx: FExitContext) -> u32 {
    fexit_write_call(&ctx, write_call::WRITEV)
}

#[cfg_attr(not(bpf_target_arch = "aarch64"), fexit(function = "__x64_sys_sendto"))]
#[cfg_attr(bpf_target_arch = "aarch64", fexit(function = "__arm64_sys_sendto"))]
pub fn fexit_sys_sendto(ctx: FExitContext) -> u32 {
    fexit_write_call(&ctx, write_call::SENDTO)
}

#[cfg_attr(not(bpf_target_arch = "aarch64"), fexit(function = "__x64_sys_sendmsg"))]
#[cfg_attr(bpf_target_arch = "aarch64", fexit(function = "__arm64_sys_sendmsg"))]
pub fn fexit_sys_sendmsg(ctx: FExitContext) -> u32 {
    fexit_write_call(&ctx, write_call::SENDMSG)
}

#[cfg(bpf_target_arch = "aarch64")]
#[fentry(function = "__arm64_sys_rt_sigreturn")]
pub fn fentry_rt_sigreturn(_ctx: FEntryContext) -> u32 {
    let _ = try_sys_enter_rt_sigreturn();
    0
}

#[cfg(not(bpf_target_arch = "aarch64"))]
#[fentry(function = "__x64_sys_rt_sigreturn")]
pub fn fentry_rt_sigreturn(_ctx: FEntryContext) -> u32 {
    let _ = try_sys_enter_rt_sigreturn();
    0
}

// ------------------------------------- socket sends and the signal restorer
//
// Hooks that put no syscall on the slow path: `sock:sock_send_length`
// (6.12+) runs inside every socket send, whichever call made it, and the
// signal restorer (`__restore_rt`, what a handler returns into) is hooked
// with a uprobe. The call, fd and byte count come from the user registers
// the syscall saved, so events are the same as from the syscall hooks.

/// x86_64 syscall numbers of the calls a handler sends its byte with.
const NR_WRITE: u64 = 1;
const NR_WRITEV: u64 = 20;
const NR_SENDTO: u64 = 44;
const NR_SENDMSG: u64 = 46;

/// The window of the current thread if it is inside a handler and still on
/// that handler's stack (`regs`: its user registers). The thread may have
/// left its handler without the return being seen (a binary whose restorer
/// is not hooked): a stack pointer out of the range the handler's frames
/// use means out of the handler, and closes the window.
#[inline(always)]
fn handler_window_on_stack(tid: u32, window: *mut HandlerWindow, regs: *const u8) -> bool {
    if let Some(sp) = read_kernel::<u64>(regs, PT_REGS_SP as u32) {
        // SAFETY: the entry belongs to the current thread.
        if !on_handler_stack(unsafe { &*window }, sp) {
            close_window(tid);
            bump(counter::STALE_WINDOWS);
            return false;
        }
    }
    true
}

/// The write-path call a syscall number names, or None for any other.
#[inline(always)]
fn write_call_of(regs: *const u8) -> Option<u32> {
    match read_kernel::<u64>(regs, PT_REGS_ORIG_AX as u32).unwrap_or(0) {
        NR_WRITE => Some(write_call::WRITE),
        NR_SENDTO => Some(write_call::SENDTO),
        NR_WRITEV => Some(write_call::WRITEV),
        NR_SENDMSG => Some(write_call::SENDMSG),
        // sendmmsg, io_uring: not how a handler sends its wakeup byte.
        _ => None,
    }
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length(ctx: RawTracePointContext) -> u32 {
    // The result is read only past the hot path's first check.
    if let Some((window, call, fd)) = write_in_handler(|| ctx.arg::<u64>(1) as i32 as i64) {
        // SAFETY: the entry belongs to the current thread. (finish_write may
        // have closed a stale window: then this updates nothing that is read.)
        unsafe {
            (*window).socket_sent_fd = fd as i32;
            (*window).socket_sent_call = call;
        }
    }
    0
}

/// Reports the current syscall's write as a handler write returning
/// `ret`, if the thread is inside a handler and on its stack, from the
/// user registers the syscall saved (for hooks that run inside the kernel
/// function, not at the syscall). Returns the window, call and fd.
#[inline(always)]
fn write_in_handler(ret: impl FnOnce() -> i64) -> Option<(*mut HandlerWindow, u32, u64)> {
    let (tid, window) = handler_window()?;
    let regs = user_regs(&CONFIG.load())?;
    if !handler_window_on_stack(tid, window, regs) {
        return None;
    }
    let call = write_call_of(regs)?;
    let fd = syscall_arg(regs, 0);
    begin_write(window, call, fd, call_bytes(regs, call));
    finish_write(tid, window, ret());
    Some((window, call, fd))
}

/// write(2) and writev(2) to pipes and eventfds, which no socket hook sees
/// (Twisted's, libuv's and GLib's wakeups), at the raw `sys_exit`
/// tracepoint (args: the user registers, the return value). Like any
/// syscall tracepoint it puts every syscall on the host on the slow path,
/// so the agent attaches it only while something needs it (an actor with
/// such a wakeup fd, or `--discover-pipes`). A raw tracepoint, unlike a
/// perf one, attaches without CAP_PERFMON, which the agent has dropped by
/// then. A write to a socket was already reported by `sock_send_length`
/// and is skipped here.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit_pipe_write(ctx: RawTracePointContext) -> u32 {
    let Some((tid, window)) = handler_window() else { return 0 };
    let regs: *const u8 = ctx.arg(0);
    let Some(call) = write_call_of(regs) else { return 0 };
    if call != write_call::WRITE && call != write_call::WRITEV {
        return 0;
    }
    if !handler_window_on_stack(tid, window, regs) {
        return 0;
    }
    let fd = syscall_arg(regs, 0);
    // SAFETY: the entry belongs to the current thread.
    let w = unsafe { &mut *window };
    if w.socket_sent_call == call && w.socket_sent_fd == fd as i32 {
        w.socket_sent_call = 0;
        return 0;
    }
    let ret: i64 = ctx.arg(1);
    begin_write(window, call, fd, call_bytes(regs, call));
    finish_write(tid, window, ret);
    0
}

/// A write(2) or writev(2) to a pipe or an eventfd, from the kernel
/// function that does it (`pipe_write`, `eventfd_write`): the socket tier's
/// pipe path where the kernel allows fexit. Only those writes run it (no
/// syscall is put on the slow path); fd and count come from the user
/// registers the syscall saved, as for `sock_send_length`.
#[inline(always)]
fn pipe_like_write(ret: i64) -> u32 {
    let _ = write_in_handler(|| ret);
    0
}

/// The traced function's return value, wherever its argument count puts it
/// (`bpf_get_func_ret`, 5.17+): `eventfd_write`'s arguments are not the
/// same on every kernel.
#[inline(always)]
fn func_ret(ctx: &FExitContext) -> Option<i64> {
    let mut ret = 0u64;
    // SAFETY: the helper writes one u64 to a valid stack slot.
    (unsafe { bpf_get_func_ret(ctx.as_ptr(), &mut ret) } == 0).then_some(ret as i64)
}

#[fexit(function = "pipe_write")]
pub fn fexit_pipe_write(ctx: FExitContext) -> u32 {
    func_ret(&ctx).map_or(0, pipe_like_write)
}

#[fexit(function = "eventfd_write")]
pub fn fexit_eventfd_write(ctx: FExitContext) -> u32 {
    func_ret(&ctx).map_or(0, pipe_like_write)
}

/// The signal restorer: a handler returns into it, and it calls
/// rt_sigreturn. Attached by file offset to each restorer the agent knows.
#[uprobe]
pub fn signal_restorer(_ctx: ProbeContext) -> u32 {
    let _ = try_sys_enter_rt_sigreturn();
    0
}

// ------------------------------------------------------------------ exits

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exit(&ctx);
    0
}

fn try_sched_process_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let (pid, tid) = current();
    close_window(tid);
    let cfg = CONFIG.load();
    let group_dead = match cfg.exit_source {
        exit_source::FIELD => read::<u8>(ctx, OFFSETS.load().exit_group_dead)? != 0,
        exit_source::LIVE_COUNT => live_threads(&cfg).ok_or(-1i64)? == 0,
        _ => pid == tid,
    };
    if !group_dead {
        return Ok(());
    }
    let Some(ids) = visible_current(&cfg) else { return Ok(()) };
    // SAFETY: presence test only.
    let seen = unsafe { SEEN_PIDS.get(&pid) }.is_some();
    if !seen && !is_watched(ids.0) {
        return Ok(());
    }
    let _ = SEEN_PIDS.remove(&pid);
    emit(base_event(kind::PROCESS_EXIT, 0, ids));
    Ok(())
}

/// `current->signal->live`: do_exit() decrements it before
/// sched_process_exit fires (kernel/exit.c), so the last thread sees 0.
/// Offsets come from the kernel's BTF through CONFIG.
#[inline(always)]
fn live_threads(cfg: &Config) -> Option<i32> {
    // SAFETY: the current task's address, read only through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    read_kernel::<i32>(read_kernel::<*const u8>(task, cfg.task_signal_offset)?, cfg.signal_live_offset)
}

/// Tells discovery a process exec'd (its command line changed).
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let cfg = CONFIG.load();
    if cfg.report_exec != 0
        && let Some(ids) = visible_current(&cfg)
    {
        emit(base_event(kind::PROCESS_EXEC, 0, ids));
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
