//! cgroup v2 helpers for the end of the escalation ladder.

use std::{fs, io, io::Write as _, os::unix::fs::MetadataExt as _, path::PathBuf};

use rustix::fs::{Mode, OFlags};

/// A process's cgroup v2 directory, pinned by inode when escalation
/// starts. The kill tier acts on this directory, never on a path read
/// again from a pid later: by then the actor may be gone and its pid
/// another process's, or the cgroup removed and a new one made at the
/// same path.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinnedCgroup {
    pub dir: PathBuf,
    pub ino: u64,
}

impl PinnedCgroup {
    /// The cgroup `pid` is in now, unless it is the root (or not v2).
    pub fn of(pid: u32) -> Option<PinnedCgroup> {
        let rel = crate::sys::procinfo::cgroup(pid).filter(|r| r != "/" && !r.is_empty())?;
        let dir = v2_dir(&rel)?;
        let ino = fs::metadata(&dir).ok()?.ino();
        Some(PinnedCgroup { dir, ino })
    }

    /// The directory, if it is still the pinned one.
    fn open(&self) -> io::Result<rustix::fd::OwnedFd> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let dir = rustix::fs::open(&self.dir, flags, Mode::empty())?;
        let ino = rustix::fs::fstat(&dir)?.st_ino;
        if ino != self.ino {
            return Err(io::Error::other(format!(
                "{} is another cgroup than when escalation started (inode {ino}, pinned {})",
                self.dir.display(),
                self.ino
            )));
        }
        Ok(dir)
    }

    fn open_file(&self, name: &str, flags: OFlags) -> io::Result<fs::File> {
        let dir = self.open()?;
        Ok(rustix::fs::openat(&dir, name, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?.into())
    }

    /// The processes in it now.
    pub fn procs(&self) -> io::Result<Vec<u32>> {
        let text = io::read_to_string(self.open_file("cgroup.procs", OFlags::RDONLY)?)?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Whether the kernel offers cgroup.kill there (Linux 5.14+).
    pub fn can_kill(&self) -> bool {
        self.open()
            .is_ok_and(|dir| rustix::fs::statat(&dir, "cgroup.kill", rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok())
    }

    /// Kills every process in it (writes "1" to its `cgroup.kill`).
    pub fn kill(&self) -> io::Result<()> {
        self.open_file("cgroup.kill", OFlags::WRONLY)?.write_all(b"1")
    }
}

/// The directory of the cgroup v2 `rel` (a path from the `0::` line of
/// `/proc/PID/cgroup`), wherever this host mounts the v2 hierarchy: not
/// only `/sys/fs/cgroup` (the unified layout) but also
/// `/sys/fs/cgroup/unified` (systemd's hybrid layout, where
/// `/sys/fs/cgroup` is a tmpfs of v1 controllers) or anywhere else.
/// `None` when no cgroup2 filesystem is mounted, or the mount does not
/// reach `rel`.
pub fn v2_dir(rel: &str) -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    v2_dir_in(&mountinfo, rel)
}

/// [`v2_dir`] on the text of a mountinfo file (proc(5)): the first
/// cgroup2 mount whose root (field 4) contains `rel`.
fn v2_dir_in(mountinfo: &str, rel: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, after) = line.split_once(" - ")?;
        if after.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut f = fields.split(' ');
        let root = unescape(f.nth(3)?);
        let mount_point = unescape(f.next()?);
        // /proc/PID/cgroup and the mount's root are both relative to the
        // reader's cgroup namespace; a mount of a sub-tree (root other than
        // "/") serves only the paths under that root.
        let below = if root == "/" {
            rel.trim_start_matches('/')
        } else {
            let rest = rel.strip_prefix(root.as_str())?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            rest.trim_start_matches('/')
        };
        Some(PathBuf::from(mount_point).join(below))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`,
/// `\134`) in a path field.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup removed and made again at the same path (a new inode) is
    /// not the pinned one: nothing is killed through it.
    #[test]
    fn a_pinned_cgroup_made_anew_at_its_path_is_refused() {
        let root = v2_dir("/").expect("a cgroup2 mount on this machine");
        let dir = root.join(format!("sigwake-unit-{}", std::process::id()));
        fs::create_dir(&dir).expect("mkdir in the cgroup2 mount (the unit tests run as root)");
        let pinned = PinnedCgroup { dir: dir.clone(), ino: fs::metadata(&dir).unwrap().ino() };
        assert_eq!(pinned.procs().expect("an empty cgroup's procs"), Vec::<u32>::new());
        assert!(pinned.can_kill(), "this kernel has cgroup.kill (5.14+)");
        fs::remove_dir(&dir).unwrap();
        fs::create_dir(&dir).unwrap();
        let err = pinned.kill().expect_err("a new cgroup at the pinned path");
        fs::remove_dir(&dir).unwrap();
        assert!(err.to_string().contains("another cgroup than when escalation started"), "{err}");
        assert!(PinnedCgroup { dir: "/nonexistent-sigwake-cgroup".into(), ino: 1 }.kill().is_err());
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v2_is_found_under_the_hybrid_layouts_unified_mount() {
        assert_eq!(v2_dir_in(HYBRID, "/app/x.service"), Some(PathBuf::from("/sys/fs/cgroup/unified/app/x.service")));
    }

    #[test]
    fn v2_is_found_at_the_unified_layouts_mount() {
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(v2_dir_in(unified, "/a/b"), Some(PathBuf::from("/sys/fs/cgroup/a/b")));
        assert_eq!(v2_dir_in(unified, "/"), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn no_v2_mount_or_one_that_does_not_reach_the_path_is_none() {
        let v1_only: String = HYBRID.lines().filter(|l| !l.contains("cgroup2")).map(|l| format!("{l}\n")).collect();
        assert_eq!(v2_dir_in(&v1_only, "/a"), None);
        let sub = "50 23 0:26 /kube/pod1 /mnt/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(v2_dir_in(sub, "/kube/pod1/c"), Some(PathBuf::from("/mnt/cg/c")));
        assert_eq!(v2_dir_in(sub, "/kube/pod10"), None, "a sibling sharing a prefix is not under the root");
        assert_eq!(v2_dir_in(sub, "/other"), None);
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        let spaced = "50 23 0:26 / /mnt/cg\\040v2 rw - cgroup2 cgroup2 rw\n";
        assert_eq!(v2_dir_in(spaced, "/a"), Some(PathBuf::from("/mnt/cg v2/a")));
    }
}
