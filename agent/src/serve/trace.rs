//! `sigwake trace`: filters and renders events, one JSON object per line or
//! a readable table.

use serde_json::{Value, json};

use crate::{
    kernel::events::{Disposition, Event, EventBody, Signal},
    sys::procinfo::Clock,
};

/// Which events `trace` shows.
#[derive(Clone, Debug, Default)]
pub struct TraceFilter {
    /// Show only events whose sender, receiver or target is one of these
    /// processes (empty: all).
    pub pids: Vec<u32>,
    /// Show only these signals (empty: all). Process exits always pass.
    pub signals: Vec<Signal>,
    /// Show only losses: failed handler writes and lossy generate results.
    pub only_drops: bool,
}

impl TraceFilter {
    /// `target_pid` is the resolved process of a generate event's target
    /// thread, when known.
    pub fn matches(&self, ev: &Event, target_pid: Option<u32>) -> bool {
        self.matches_except_pids(ev) && self.matches_pids(ev, target_pid)
    }

    /// The criteria that need no /proc look-up: callers resolve a target's
    /// process only for events that pass these.
    pub fn matches_except_pids(&self, ev: &Event) -> bool {
        if self.only_drops && !ev.is_drop() {
            return false;
        }
        self.signals.is_empty() || ev.signal().is_none_or(|s| self.signals.contains(&s))
    }

    /// Whether events of process `pid` can be shown at all (the --pid
    /// list), whatever their kind: its handler returns matter to how its
    /// drops are judged even when only drops are shown.
    pub fn covers_process(&self, pid: u32) -> bool {
        self.pids.is_empty() || self.pids.contains(&pid)
    }

    fn matches_pids(&self, ev: &Event, target_pid: Option<u32>) -> bool {
        if !self.pids.is_empty() {
            let mut pids = vec![ev.subject_pid()];
            if let EventBody::SignalGenerate(g) = &ev.body {
                pids.push(g.sender.pid);
                pids.extend(target_pid);
            }
            if !pids.iter().any(|p| self.pids.contains(p)) {
                return false;
            }
        }
        true
    }
}

/// Name of the event in output; a failed handler write is what sigwake
/// exists for, so it gets its own name.
pub fn event_name(ev: &Event) -> &'static str {
    match &ev.body {
        EventBody::SignalGenerate(_) => "signal_generate",
        EventBody::SignalDeliver(_) => "signal_deliver",
        EventBody::HandlerWrite(w) if w.is_dropped_wakeup() => "wakeup_write_failed",
        EventBody::HandlerWrite(_) => "handler_write",
        EventBody::HandlerReturn(_) => "handler_return",
        EventBody::ProcessExit(_) => "process_exit",
        EventBody::ProcessExec(_) => "process_exec",
    }
}

pub fn errno_name(errno: i32) -> String {
    match errno {
        libc::EAGAIN => "EAGAIN".into(),
        libc::EBADF => "EBADF".into(),
        libc::EPIPE => "EPIPE".into(),
        libc::EINTR => "EINTR".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::ENOSPC => "ENOSPC".into(),
        libc::EIO => "EIO".into(),
        libc::ECONNRESET => "ECONNRESET".into(),
        n => format!("E{n}"),
    }
}

/// One event as a JSON object. `actor` is the registry's name for the
/// subject process, when it has one.
pub fn to_json(ev: &Event, clock: &Clock, target_pid: Option<u32>, actor: Option<&str>) -> Value {
    let mut v = json!({
        "time": clock.rfc3339(ev.mono_ns),
        "mono_ns": ev.mono_ns,
        "event": event_name(ev),
    });
    let o = v.as_object_mut().expect("object");
    let put_task = |o: &mut serde_json::Map<String, Value>, t: &crate::kernel::events::Task| {
        o.insert("pid".into(), t.pid.into());
        o.insert("tid".into(), t.tid.into());
        o.insert("comm".into(), t.comm.clone().into());
    };
    if let Some(sig) = ev.signal() {
        o.insert("signal".into(), sig.name().into());
        o.insert("signo".into(), sig.0.into());
    }
    match &ev.body {
        EventBody::SignalGenerate(g) => {
            put_task(o, &g.sender);
            o.insert("target_tid".into(), g.target_tid.into());
            o.insert("target_pid".into(), target_pid.map_or(Value::Null, Value::from));
            o.insert("target_comm".into(), g.target_comm.clone().into());
            o.insert("code".into(), g.code.into());
            o.insert("group".into(), g.group.into());
            o.insert("result".into(), g.result.as_str().into());
        }
        EventBody::SignalDeliver(d) => {
            put_task(o, &d.task);
            o.insert("code".into(), d.code.into());
            o.insert("disposition".into(), d.disposition.as_str().into());
            if let Disposition::Handler(addr) = d.disposition {
                o.insert("handler".into(), format!("{addr:#x}").into());
            }
            o.insert("sa_flags".into(), format!("{:#x}", d.sa_flags).into());
        }
        EventBody::HandlerWrite(w) => {
            put_task(o, &w.task);
            o.insert("syscall".into(), w.call_name().into());
            o.insert("fd".into(), w.fd.into());
            o.insert("bytes".into(), w.count.into());
            match w.errno() {
                Some(errno) => {
                    o.insert("errno".into(), errno.into());
                    o.insert("error".into(), errno_name(errno).into());
                }
                None => {
                    o.insert("written".into(), w.ret.into());
                }
            }
        }
        EventBody::HandlerReturn(r) => {
            put_task(o, &r.task);
            o.insert("depth".into(), r.depth.into());
            o.insert("handler_ns".into(), r.duration_ns.into());
        }
        EventBody::ProcessExit(e) | EventBody::ProcessExec(e) => put_task(o, &e.task),
    }
    if let Some(actor) = actor {
        o.insert("actor".into(), actor.into());
    }
    v
}

pub const TEXT_HEADER: &str =
    "TIME                        EVENT                PID     TID     COMM             SIGNAL    DETAIL";

/// `text` with its control characters escaped (`\n`, `\u{1b}`): a
/// process names itself (prctl(PR_SET_NAME) takes any bytes), so a comm
/// or an actor name could otherwise end a row early, forge another one or
/// send escape sequences to the terminal reading `sigwake trace`.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| if c.is_control() { c.escape_default().collect() } else { c.to_string() })
        .collect::<String>()
        .into()
}

/// One event as a table row under [`TEXT_HEADER`].
pub fn to_text(ev: &Event, clock: &Clock, target_pid: Option<u32>, actor: Option<&str>) -> String {
    let (task, detail) = match &ev.body {
        EventBody::SignalGenerate(g) => (
            &g.sender,
            format!(
                "-> {}{} ({}) result={} code={}",
                target_pid.map_or(String::new(), |p| format!("pid {p} ")),
                format_args!("tid {}", g.target_tid),
                printable(&g.target_comm),
                g.result.as_str(),
                g.code
            ),
        ),
        EventBody::SignalDeliver(d) => (
            &d.task,
            match d.disposition {
                Disposition::Handler(a) => format!("handler={a:#x} flags={:#x}", d.sa_flags),
                other => format!("disposition={}", other.as_str()),
            },
        ),
        EventBody::HandlerWrite(w) => (
            &w.task,
            match w.errno() {
                Some(e) => format!("{}(fd {}, {} B) = -{}", w.call_name(), w.fd, w.count, errno_name(e)),
                None => format!("{}(fd {}, {} B) = {}", w.call_name(), w.fd, w.count, w.ret),
            },
        ),
        EventBody::HandlerReturn(r) => (&r.task, format!("depth={} in handler {} ns", r.depth, r.duration_ns)),
        EventBody::ProcessExit(e) | EventBody::ProcessExec(e) => (&e.task, String::new()),
    };
    let detail = match actor {
        Some(a) => format!("{detail} actor={}", printable(a)),
        None => detail,
    };
    format!(
        "{:<27} {:<20} {:<7} {:<7} {:<16} {:<9} {}",
        clock.rfc3339(ev.mono_ns),
        event_name(ev),
        task.pid,
        task.tid,
        printable(&task.comm),
        ev.signal().map_or("-".into(), |s| s.name()),
        detail
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::events::testing::{dropped_wakeup, raw};
    use sigwake_common::kind;

    fn generate(target: i32, result: i64, sender: u32) -> Event {
        let mut r = raw(kind::SIGNAL_GENERATE, 2, sender, sender);
        r.target = target;
        r.arg1 = result;
        Event::try_from(&r).unwrap()
    }

    /// Found by the decoder's fuzz target: a comm with a newline split
    /// the row in two (and one with ESC reached the terminal raw).
    #[test]
    fn a_comm_with_control_characters_stays_on_one_escaped_row() {
        let mut r = raw(kind::SIGNAL_GENERATE, 2, 7, 7);
        r.comm = *b"ev\nil\x1b[2J\0\0\0\0\0\0\0";
        r.comm2[..4].copy_from_slice(b"a\rb\t");
        let ev = Event::try_from(&r).unwrap();
        let row = to_text(&ev, &Clock::now(), None, Some("x\ny"));
        assert!(!row.chars().any(char::is_control), "{row:?}");
        assert!(row.contains("ev\\nil\\u{1b}[2J"), "{row}");
        assert!(row.contains("(a\\rb\\t)") && row.contains("actor=x\\ny"), "{row}");
    }

    #[test]
    fn only_drops_keeps_failed_writes_and_lossy_results() {
        let f = TraceFilter { only_drops: true, ..Default::default() };
        assert!(f.matches(&dropped_wakeup(10, 3, 0), None));
        assert!(f.matches(&generate(10, 2, 1), None));
        assert!(!f.matches(&generate(10, 0, 1), None));
        let mut ok = raw(kind::HANDLER_WRITE, 2, 10, 10);
        ok.arg2 = 1;
        assert!(!f.matches(&Event::try_from(&ok).unwrap(), None));
    }

    #[test]
    fn pid_filter_matches_sender_target_and_resolved_target() {
        let f = TraceFilter { pids: vec![42], ..Default::default() };
        assert!(f.matches(&generate(42, 0, 1), None));
        assert!(f.matches(&generate(7, 0, 42), None));
        assert!(f.matches(&generate(43, 0, 1), Some(42)));
        assert!(!f.matches(&generate(43, 0, 1), Some(44)));
        assert!(f.matches(&dropped_wakeup(42, 3, 0), None));
        assert!(!f.matches(&dropped_wakeup(41, 3, 0), None));
    }

    #[test]
    fn signal_filter_lets_exits_through() {
        let f = TraceFilter { signals: vec![Signal::TERM], ..Default::default() };
        assert!(!f.matches(&dropped_wakeup(1, 3, 0), None));
        let exit = Event::try_from(&raw(kind::PROCESS_EXIT, 0, 1, 1)).unwrap();
        assert!(f.matches(&exit, None));
    }

    #[test]
    fn json_of_a_dropped_wakeup_names_fd_signal_and_errno() {
        let v = to_json(&dropped_wakeup(100, 37, 5), &Clock::now(), None, Some("fetcher"));
        assert_eq!(v["event"], "wakeup_write_failed");
        assert_eq!(v["pid"], 100);
        assert_eq!(v["fd"], 37);
        assert_eq!(v["signal"], "SIGINT");
        assert_eq!(v["errno"], 11);
        assert_eq!(v["error"], "EAGAIN");
        assert_eq!(v["actor"], "fetcher");
        assert_eq!(v["mono_ns"], 5);
    }

    #[test]
    fn text_row_shows_the_failed_write() {
        let row = to_text(&dropped_wakeup(100, 37, 5), &Clock::now(), None, None);
        assert!(row.contains("wakeup_write_failed"), "{row}");
        assert!(row.contains("write(fd 37, 1 B) = -EAGAIN"), "{row}");
    }
}
