//! The subtree tier: the actor's descendants, pinned when escalation
//! began, or its cgroup when it has one of its own.

use std::path::PathBuf;

use crate::{
    response::incidents::Incident,
    sys::{cgroup, pidfd::ProcessHandle, procinfo},
};

/// Kills the actor's cgroup when it has one of its own, else SIGKILLs
/// the pinned descendants (and the actor) through pidfds. Returns the
/// step's detail.
pub fn kill(inc: &Incident, actor: Option<&ProcessHandle>, dry_run: bool) -> String {
    let mut done = Vec::new();
    if let Some(cg) = own_cgroup(inc) {
        if dry_run {
            return format!("would write 1 to {}/cgroup.kill", cg.display());
        }
        match cgroup::kill_cgroup(&cg) {
            Ok(()) => return format!("wrote 1 to {}/cgroup.kill", cg.display()),
            Err(e) => done.push(format!("cgroup.kill on {} failed ({e}); killing processes one by one", cg.display())),
        }
    }
    let mut killed = 0;
    let mut gone = 0;
    for &(pid, start) in &inc.subtree {
        match ProcessHandle::open(pid, Some(start)) {
            Ok(h) if dry_run => {
                let _ = h;
                killed += 1;
            }
            Ok(h) => match h.send_signal(libc::SIGKILL) {
                Ok(()) => killed += 1,
                Err(_) => gone += 1,
            },
            Err(_) => gone += 1,
        }
    }
    if let Some(h) = actor
        && !dry_run
    {
        let _ = h.send_signal(libc::SIGKILL);
    }
    let verb = if dry_run { "would SIGKILL" } else { "SIGKILLed" };
    done.push(format!("{verb} {killed} pinned descendants through pidfds ({gone} already gone)"));
    done.join("; ")
}

/// The actor's cgroup, if it holds nothing but the actor and its pinned
/// descendants (so killing it kills exactly the subtree).
fn own_cgroup(inc: &Incident) -> Option<PathBuf> {
    let rel = procinfo::cgroup(inc.pid)?;
    if rel == "/" || rel.is_empty() {
        return None;
    }
    let dir = PathBuf::from("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    let ours: std::collections::HashSet<u32> =
        std::iter::once(inc.pid).chain(inc.subtree.iter().map(|(p, _)| *p)).collect();
    let all_ours = procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()).all(|p| ours.contains(&p));
    (all_ours && dir.join("cgroup.kill").exists()).then_some(dir)
}
