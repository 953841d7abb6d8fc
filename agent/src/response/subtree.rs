//! The subtree tier: the actor's descendants, pinned when escalation
//! began, or its cgroup when it has one of its own.
//!
//! An actor a user registered takes down only what that user could kill
//! (kill(2)'s rule, on each process's uids when it is pinned and again
//! when it is killed): a descendant that became another user's (a set-uid
//! program) is left alone, and the cgroup is killed only if every process
//! in it is one the user could signal; otherwise the per-process path is
//! taken, and the step's detail says why.

use std::collections::HashSet;

use crate::{
    actors::registry::uid_may_signal,
    response::incidents::Incident,
    sys::{cgroup::PinnedCgroup, pidfd::ProcessHandle, procinfo},
};

/// The uid whose rights bound what the ladder may signal for `inc`: the
/// client that registered the actor, unless that was root (or nobody: the
/// agent's own config).
pub fn registrant(inc: &Incident) -> Option<u32> {
    inc.registered_by.filter(|u| *u != 0)
}

/// Why `registrant` may not signal `pid` now, if it may not (its uids read
/// from /proc now). A process that is gone is no refusal: there is nothing
/// to signal.
pub fn not_permitted(registrant: Option<u32>, pid: u32) -> Option<String> {
    let uid = registrant?;
    let uids = procinfo::status(pid)?.uids;
    (!uid_may_signal(uid, uids)).then(|| format!("pid {pid} (uids {uids:?}) is not one uid {uid} may signal"))
}

/// Processes by identity: (pid, start time).
pub type Pinned = Vec<(u32, u64)>;

/// The actor's descendants now, deepest first, with their start times:
/// those `registrant` may signal (to pin), and those it may not.
pub fn pin(pid: u32, registrant: Option<u32>) -> (Pinned, Pinned) {
    let (mut pinned, mut refused) = (Vec::new(), Vec::new());
    for d in procinfo::descendants(pid) {
        let Ok(start) = procinfo::read_start_time(d) else { continue };
        if not_permitted(registrant, d).is_some() {
            refused.push((d, start));
        } else {
            pinned.push((d, start));
        }
    }
    (pinned, refused)
}

/// Kills the actor's cgroup when it has one of its own (and, for a user's
/// actor, every process in it is one the user may signal), else SIGKILLs
/// the pinned descendants (and the actor) the registrant may signal,
/// through pidfds. Returns the step's detail.
pub fn kill(inc: &Incident, actor: Option<&ProcessHandle>, dry_run: bool) -> String {
    let registrant = registrant(inc);
    let mut done = Vec::new();
    match own_cgroup(inc, registrant) {
        Cgroup::Own(cg) => {
            let dir = cg.dir.display();
            if dry_run {
                return format!("would write 1 to {dir}/cgroup.kill");
            }
            match cg.kill() {
                Ok(()) => return format!("wrote 1 to {dir}/cgroup.kill"),
                Err(e) => done.push(format!("cgroup.kill on {dir} failed ({e}); killing processes one by one")),
            }
        }
        Cgroup::Refused(why) => done.push(format!("cgroup.kill not used: {why}; killing processes one by one")),
        Cgroup::NotOwn => {}
    }
    let (mut killed, mut gone, mut refused) = (0, 0, inc.subtree_not_permitted.len());
    for &(pid, start) in &inc.subtree {
        match ProcessHandle::open(pid, Some(start)) {
            // Pinned as signalable, but it may have changed hands since (an exec).
            Ok(_) if not_permitted(registrant, pid).is_some() => refused += 1,
            Ok(_) if dry_run => killed += 1,
            Ok(h) => match h.send_signal(libc::SIGKILL) {
                Ok(()) => killed += 1,
                Err(_) => gone += 1,
            },
            Err(_) => gone += 1,
        }
    }
    if let Some(h) = actor
        && !dry_run
        && not_permitted(registrant, inc.pid).is_none()
    {
        let _ = h.send_signal(libc::SIGKILL);
    }
    let verb = if dry_run { "would SIGKILL" } else { "SIGKILLed" };
    done.push(format!("{verb} {killed} pinned descendants through pidfds ({gone} already gone)"));
    if let Some(uid) = registrant.filter(|_| refused > 0) {
        let noun = if refused == 1 { "descendant" } else { "descendants" };
        done.push(format!("left alone {refused} {noun} uid {uid} may not signal (it registered the actor)"));
    }
    done.join("; ")
}

enum Cgroup {
    /// It holds nothing but the actor and its descendants: killing it
    /// kills exactly the subtree.
    Own(PinnedCgroup),
    /// Its own, but holding a process the registrant may not signal.
    Refused(String),
    NotOwn,
}

/// The actor's cgroup, if it holds nothing but the actor and its
/// descendants (so killing it kills exactly the subtree) and every one of
/// them is a process the registrant may signal.
fn own_cgroup(inc: &Incident, registrant: Option<u32>) -> Cgroup {
    let Some(cg) = &inc.cgroup else { return Cgroup::NotOwn };
    let procs = match cg.procs() {
        Ok(procs) => procs,
        Err(e) => return Cgroup::Refused(format!("the pinned cgroup: {e}")),
    };
    let ours: HashSet<u32> =
        std::iter::once(inc.pid).chain(inc.subtree.iter().chain(&inc.subtree_not_permitted).map(|(p, _)| *p)).collect();
    if !procs.iter().all(|p| ours.contains(p)) || !cg.can_kill() {
        return Cgroup::NotOwn;
    }
    let uids: Vec<(u32, Option<[u32; 3]>)> = procs.iter().map(|p| (*p, procinfo::status(*p).map(|s| s.uids))).collect();
    match refuse_cgroup(&uids, registrant) {
        Some(why) => Cgroup::Refused(format!("{} holds {why}", cg.dir.display())),
        None => Cgroup::Own(cg.clone()),
    }
}

/// The first process of a cgroup (pid, uids; `None`: gone) that
/// `registrant` may not signal, said as a reason.
fn refuse_cgroup(procs: &[(u32, Option<[u32; 3]>)], registrant: Option<u32>) -> Option<String> {
    let uid = registrant?;
    procs.iter().find_map(|(pid, uids)| match uids {
        Some(ids) if !uid_may_signal(uid, *ids) => {
            Some(format!("pid {pid} (uids {ids:?}), which uid {uid} may not signal"))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::pidfd::tests::sleeper;

    #[test]
    fn a_cgroup_is_killed_only_if_the_registrant_may_signal_all_of_it() {
        let mine = [(10, Some([1000, 1000, 1000])), (11, Some([1000, 0, 0])), (12, None)];
        assert_eq!(refuse_cgroup(&mine, Some(1000)), None, "its own, a set-uid one it started, a gone one");
        let mixed = [(10, Some([1000, 1000, 1000])), (13, Some([0, 0, 0]))];
        let why = refuse_cgroup(&mixed, Some(1000)).expect("a root process in it");
        assert!(why.contains("pid 13") && why.contains("uid 1000 may not signal"), "{why}");
        assert_eq!(refuse_cgroup(&mixed, None), None, "root's or the agent's actor: anything");
    }

    #[test]
    fn only_what_the_registrant_may_signal_is_pinned() {
        // This test runs as root: its child is no process uid 65534 may signal.
        let child = sleeper();
        let me = std::process::id();
        let kid = child.0.id();
        let (pinned, refused) = pin(me, Some(65534));
        assert!(
            refused.iter().any(|(p, _)| *p == kid) && pinned.iter().all(|(p, _)| *p != kid),
            "{pinned:?} {refused:?}"
        );
        let (pinned, refused) = pin(me, None);
        assert!(pinned.iter().any(|(p, _)| *p == kid) && refused.is_empty(), "{pinned:?} {refused:?}");
        assert!(not_permitted(Some(65534), kid).is_some_and(|w| w.contains("uid 65534")));
        assert_eq!(not_permitted(Some(0), kid), None);
        assert_eq!(not_permitted(None, kid), None);
    }
}
