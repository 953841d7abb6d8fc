//! The state directory (`--state-dir`): the agent's own and private.
//!
//! It holds what the agent trusts on a restart (`incidents.json`: which
//! pid and start time to go on signalling) and what it captured about
//! other users' processes (`incidents/<id>/`: fds, kernel stacks, py-spy
//! dumps). So:
//!
//! - the directory is the agent's uid's, never group- or world-writable
//!   ([`prepare`] refuses it otherwise), and mode 0700 (an existing one
//!   that is readable by others is tightened, with a warning);
//! - everything created in it is 0700 (directories) or 0600 (files),
//!   whatever the umask;
//! - nothing in it is opened through a symlink (`O_NOFOLLOW`), and the
//!   state file is replaced through a fresh, uniquely named temporary
//!   file (`O_EXCL`), never a fixed name someone could have planted;
//! - the state file is read only if it is the agent's own regular file,
//!   not writable by group or others ([`open_trusted`]).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot create or read the state directory {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the state directory {} is not a directory", dir.display())]
    NotADir { dir: PathBuf },
    #[error(
        "the state directory {} belongs to uid {owner}, not to the agent's uid {me}: refusing to trust or write \
         incident state there (another user could plant state that makes the agent signal any process); \
         `chown {me} {}` if it is yours, or give another with --state-dir",
        dir.display(),
        dir.display()
    )]
    NotOwned { dir: PathBuf, owner: u32, me: u32 },
    #[error(
        "the state directory {} has mode {mode:04o}: group or others can write it, so its incident state cannot be \
         trusted (it names processes the agent goes on signalling); `chmod 700 {}` after checking its contents, or \
         give another with --state-dir",
        dir.display(),
        dir.display()
    )]
    WritableByOthers { dir: PathBuf, mode: u32 },
}

/// Makes `dir` the agent's private state directory: creates it 0700 if
/// missing (its parents as usual), refuses one owned by another uid or
/// writable by group or others, and tightens one readable by others to
/// 0700. Returns the warning to log when it tightened a mode.
pub fn prepare(dir: &Path) -> Result<Option<String>, StateDirError> {
    let io_err = |source| StateDirError::Io { dir: dir.to_path_buf(), source };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err)?;
    }
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {
            // The umask may have taken bits away; set exactly 0700.
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(io_err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(e)),
    }
    // The directory itself may be a symlink the administrator made
    // (/var/lib/sigwake -> /data/sigwake): what it points to is checked.
    let meta = fs::metadata(dir).map_err(io_err)?;
    if !meta.is_dir() {
        return Err(StateDirError::NotADir { dir: dir.to_path_buf() });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(StateDirError::NotOwned { dir: dir.to_path_buf(), owner: meta.uid(), me });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(StateDirError::WritableByOthers { dir: dir.to_path_buf(), mode });
    }
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(io_err)?;
    Ok(Some(format!(
        "the state directory {} had mode {mode:04o}: tightened to 0700 (its diagnostics hold other processes' fds, \
         kernel stacks and py-spy dumps)",
        dir.display()
    )))
}

/// Creates `dir` and any missing parents, each 0700 whatever the umask.
/// Existing components are left as they are; a symlink in the last one
/// is refused.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.as_os_str().is_empty() && !p.exists()).collect();
    for p in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(DIR_MODE).create(p) {
            Ok(()) => fs::set_permissions(p, fs::Permissions::from_mode(DIR_MODE))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    if !fs::symlink_metadata(dir)?.is_dir() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a directory (or is a symlink)"));
    }
    Ok(())
}

fn nofollow(opts: &mut fs::OpenOptions) -> &mut fs::OpenOptions {
    opts.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).mode(FILE_MODE)
}

/// Creates or truncates `path` for writing, 0600, never through a symlink.
pub fn create_private(path: &Path) -> io::Result<fs::File> {
    let f = nofollow(fs::OpenOptions::new().write(true).create(true).truncate(true)).open(path)?;
    f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// [`create_private`] and write `bytes`.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    create_private(path)?.write_all(bytes)
}

/// Opens `path` for appending (created 0600), never through a symlink.
pub fn append_private(path: &Path) -> io::Result<fs::File> {
    let f = nofollow(fs::OpenOptions::new().append(true).create(true)).open(path)?;
    f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Replaces `dir/name` with `bytes`, durably: written to a new temporary
/// file with a unique name (created `O_EXCL`, 0600) in `dir`, synced, then
/// renamed over `name`.
pub fn replace_private(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = tempfile::Builder::new().prefix(&format!(".{name}.")).suffix(".tmp").tempfile_in(dir)?;
    tmp.as_file().set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    // The rename itself is durable once the directory is synced.
    fs::File::open(dir)?.sync_all()
}

/// Why a state file is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    #[error("it is a symlink")]
    Symlink,
    #[error("it is not a regular file")]
    NotAFile,
    #[error("it belongs to uid {owner}, not to the agent's uid {me}")]
    NotOwned { owner: u32, me: u32 },
    #[error("its mode {mode:04o} lets group or others write it")]
    WritableByOthers { mode: u32 },
    #[error("it has {links} hard links")]
    Linked { links: u64 },
    #[error(transparent)]
    Io(io::Error),
}

/// Opens `path` for reading if it is the agent's own regular file, not
/// writable by group or others and not linked elsewhere; `Ok(None)` when
/// it does not exist.
pub fn open_trusted(path: &Path) -> Result<Option<fs::File>, Untrusted> {
    let f = match fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(Untrusted::Symlink),
        Err(e) => return Err(Untrusted::Io(e)),
    };
    let meta = f.metadata().map_err(Untrusted::Io)?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_file() {
        return Err(Untrusted::NotAFile);
    }
    if meta.uid() != me {
        return Err(Untrusted::NotOwned { owner: meta.uid(), me });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Untrusted::WritableByOthers { mode });
    }
    if meta.nlink() > 1 {
        return Err(Untrusted::Linked { links: meta.nlink() });
    }
    Ok(Some(f))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Set in the child process a umask test re-runs itself in.
    const UMASK_CHILD: &str = "SIGWAKE_TEST_UMASK_0";

    /// Runs the calling test under umask 0 (the most permissive) without
    /// changing the umask of this multi-threaded test process, where other
    /// tests create files meanwhile: the test is re-run alone in a child
    /// process that sets umask 0 and runs `f` and the test's checks, and it
    /// must pass there. Here `f` then runs under the usual umask, so the
    /// rest of the test has what it expects.
    pub(crate) fn with_umask_0<T>(f: impl FnOnce() -> T) -> T {
        if std::env::var_os(UMASK_CHILD).is_some() {
            rustix::process::umask(rustix::fs::Mode::empty());
            return f();
        }
        let name = std::thread::current().name().expect("libtest names each test's thread").to_string();
        let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args([name.as_str(), "--exact", "--test-threads=1"])
            .env(UMASK_CHILD, "1")
            .output()
            .expect("re-running the test in a child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{name} under umask 0 (child process): {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        f()
    }

    pub(crate) fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_state_dir_and_its_files_are_private_whatever_the_umask() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        with_umask_0(|| {
            assert_eq!(prepare(&dir).unwrap(), None);
            create_private_dir_all(&dir.join("incidents").join("1")).unwrap();
            write_private(&dir.join("incidents/1/a.json"), b"{}").unwrap();
            append_private(&dir.join("audit.jsonl")).unwrap();
            replace_private(&dir, "incidents.json", b"[]").unwrap();
        });
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("incidents")), 0o700);
        assert_eq!(mode(&dir.join("incidents/1")), 0o700);
        assert_eq!(mode(&dir.join("incidents/1/a.json")), 0o600);
        assert_eq!(mode(&dir.join("audit.jsonl")), 0o600);
        assert_eq!(mode(&dir.join("incidents.json")), 0o600);
        let left: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")), "no temporary file left: {left:?}");
    }

    #[test]
    fn an_existing_readable_state_dir_is_tightened_saying_so() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let warning = prepare(tmp.path()).unwrap().expect("a warning");
        assert!(warning.contains("0755") && warning.contains("tightened to 0700"), "{warning}");
        assert_eq!(mode(tmp.path()), 0o700);
        assert_eq!(prepare(tmp.path()).unwrap(), None, "nothing to say the second time");
    }

    #[test]
    fn a_state_dir_writable_by_others_or_owned_by_another_uid_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare(tmp.path()).unwrap_err();
        assert!(matches!(err, StateDirError::WritableByOthers { mode: 0o777, .. }), "{err}");
        assert_eq!(mode(tmp.path()), 0o777, "refused, not changed");
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
        // Needs root (CAP_CHOWN), like the agent.
        std::os::unix::fs::chown(tmp.path(), Some(65534), None).expect("chown to nobody (run the tests as root)");
        let err = prepare(tmp.path()).unwrap_err();
        assert!(matches!(err, StateDirError::NotOwned { owner: 65534, .. }), "{err}");
        assert!(err.to_string().contains("refusing"), "{err}");
    }

    #[test]
    fn private_files_are_never_opened_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::write(&outside, b"precious\n").unwrap();
        for (name, open) in [
            ("w", create_private as fn(&Path) -> io::Result<fs::File>),
            ("a", append_private as fn(&Path) -> io::Result<fs::File>),
        ] {
            let link = tmp.path().join(name);
            symlink(&outside, &link).unwrap();
            let err = open(&link).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{name}: {err}");
        }
        assert!(matches!(open_trusted(&tmp.path().join("w")), Err(Untrusted::Symlink)));
        assert_eq!(fs::read(&outside).unwrap(), b"precious\n");
    }

    #[test]
    fn only_the_agents_own_unshared_file_is_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("incidents.json");
        assert!(open_trusted(&p).unwrap().is_none(), "missing: nothing to trust, no error");
        fs::write(&p, b"[]").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(open_trusted(&p).unwrap().is_some());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o620)).unwrap();
        assert!(matches!(open_trusted(&p), Err(Untrusted::WritableByOthers { mode: 0o620 })));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open_trusted(&p).unwrap().is_some(), "readable by others is not a reason to distrust it");
        fs::hard_link(&p, tmp.path().join("other-name")).unwrap();
        assert!(matches!(open_trusted(&p), Err(Untrusted::Linked { links: 2 })));
        fs::remove_file(tmp.path().join("other-name")).unwrap();
        std::os::unix::fs::chown(&p, Some(65534), None).expect("chown to nobody (run the tests as root)");
        assert!(matches!(open_trusted(&p), Err(Untrusted::NotOwned { owner: 65534, .. })));
        fs::remove_file(&p).unwrap();
        fs::create_dir(&p).unwrap();
        assert!(matches!(open_trusted(&p), Err(Untrusted::NotAFile)));
    }
}
