//! What in the config the agent must trust before running it as root: the
//! file itself (who could have written it) and the programs it names.

use std::path::Path;

use super::ConfigError;
use crate::sys::programs;

/// The program of a notify command, which the agent runs as root: an
/// absolute path to an executable file, or a bare name found in the
/// trusted PATH (never the environment's), resolved once, here.
pub(super) fn resolve_command(program: &str) -> Result<String, String> {
    if program.starts_with('/') {
        return if programs::is_executable(Path::new(program)) {
            Ok(program.to_string())
        } else {
            Err(format!("command `{program}` is not an executable file"))
        };
    }
    if program.contains('/') {
        return Err(format!(
            "command `{program}` is a relative path: give an absolute path (the agent runs it as root)"
        ));
    }
    programs::find(program).map(|p| p.to_string_lossy().into_owned()).ok_or_else(|| {
        format!(
            "command `{program}` is not found in the trusted PATH {}: give an absolute path (the agent's own PATH is \
             never searched)",
            programs::TRUSTED_PATH
        )
    })
}

/// Reads the config file if nobody but root or the agent's own uid can
/// have chosen what it says — it names commands the agent runs as root:
/// the file (after symlinks) is owned by one of them and not writable by
/// group or others, and so is every directory above it, except that a
/// sticky directory (like /tmp) may be writable by all, since there only
/// an entry's owner can replace it. Checked on the file actually opened
/// (fstat, then its path from /proc/self/fd), which is then read.
pub(super) fn read_trusted(path: &Path) -> Result<String, ConfigError> {
    use std::{io::Read as _, os::fd::AsRawFd as _, os::unix::fs::MetadataExt as _};
    let read_err = |source| ConfigError::Read { path: path.to_path_buf(), source };
    let untrusted = |reason: String| ConfigError::Untrusted { path: path.to_path_buf(), reason };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let me = rustix::process::geteuid().as_raw();
    let trusted_owner = |uid: u32| uid == 0 || uid == me;
    if !meta.is_file() {
        return Err(untrusted("it is not a regular file".into()));
    }
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .or_else(|_| std::fs::canonicalize(path))
        .map_err(read_err)?;
    let shown = if real == path { String::new() } else { format!(" (it is {})", real.display()) };
    if !trusted_owner(meta.uid()) {
        return Err(untrusted(format!(
            "it is owned by uid {}{shown}, neither root nor the agent's uid {me}: its owner would choose the commands \
             the agent runs as root. `chown root {}` after checking it",
            meta.uid(),
            real.display()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "it is writable by group or others (mode {:04o}){shown}: they would choose the commands the agent runs as \
             root. `chmod go-w {}` after checking it",
            meta.mode() & 0o7777,
            real.display()
        )));
    }
    for dir in real.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(read_err)?;
        let sticky = m.mode() & 0o1000 != 0;
        if !trusted_owner(m.uid()) || (m.mode() & 0o022 != 0 && !sticky) {
            let why = if trusted_owner(m.uid()) {
                format!("is writable by group or others (mode {:04o})", m.mode() & 0o7777)
            } else {
                format!("is owned by uid {}", m.uid())
            };
            return Err(untrusted(format!(
                "its directory {} {why}{shown}: whoever can write there can replace the file. Keep the config in a \
                 directory only root can write (e.g. /etc/sigwake), or `chmod go-w {}`",
                dir.display(),
                dir.display()
            )));
        }
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read_err)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::{
        super::{Config, Overrides},
        *,
    };

    /// The config names commands the agent runs as root: a file that
    /// anyone but root (or the agent's uid) owns or may write, or that lies
    /// in a directory they could replace it in, is refused, saying what to
    /// do. A root-owned sticky directory (/tmp) lets nobody replace
    /// another's file, so it is no reason to refuse.
    #[test]
    fn a_config_others_could_write_is_refused() {
        use std::os::unix::fs::{PermissionsExt as _, chown};
        let over = Overrides::default();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("etc");
        std::fs::create_dir(&dir).unwrap();
        let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        mode(&dir, 0o755);
        let file = dir.join("sigwake.toml");
        std::fs::write(&file, "dry_run = true\n").unwrap();
        mode(&file, 0o644);
        assert!(Config::load(&file, &over).unwrap().dry_run);
        let refused = |what: &str| {
            let err = Config::load(&file, &over).expect_err(what).to_string();
            assert!(err.starts_with(&format!("refusing config {}: ", file.display())), "{what}: {err}");
            err
        };
        for m in [0o664, 0o646, 0o666] {
            mode(&file, m);
            let err = refused("a file others may write");
            assert!(err.contains("writable by group or others") && err.contains("chmod go-w"), "{err}");
        }
        mode(&file, 0o644);
        chown(&file, Some(65534), None).unwrap();
        let err = refused("a file another uid owns");
        assert!(err.contains("owned by uid 65534") && err.contains("chown root"), "{err}");
        chown(&file, Some(0), None).unwrap();
        mode(&dir, 0o777);
        let err = refused("a directory others may write");
        assert!(err.contains(&format!("directory {}", dir.display())) && err.contains("chmod go-w"), "{err}");
        mode(&dir, 0o1777);
        assert!(Config::load(&file, &over).is_ok(), "a root-owned sticky directory is fine");
        mode(&dir, 0o755);
        chown(&dir, Some(65534), None).unwrap();
        let err = refused("a directory another uid owns");
        assert!(err.contains("owned by uid 65534"), "{err}");
        chown(&dir, Some(0), None).unwrap();
        // Through a symlink, the file it names is what is checked.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        mode(&open, 0o777);
        let target = open.join("real.toml");
        std::fs::write(&target, "dry_run = true\n").unwrap();
        mode(&target, 0o644);
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&target, &file).unwrap();
        let err = refused("a symlink to a file in a directory others may write");
        assert!(err.contains(&format!("directory {}", open.display())), "{err}");
    }
}
