//! The programs the agent runs as root — a notify tier's command, py-spy —
//! are found through a fixed, trusted PATH, never through the PATH of the
//! agent's environment (which whoever started it chose, and which may list
//! a directory others can write), and run with that PATH.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
};

/// Where a program named without a path is looked for, in this order.
pub const TRUSTED_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The first executable file `name` (a bare name, no `/`) in
/// [`TRUSTED_PATH`].
pub fn find(name: &str) -> Option<PathBuf> {
    find_in(name, OsStr::new(TRUSTED_PATH))
}

fn find_in(name: &str, search: &OsStr) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') {
        return None;
    }
    std::env::split_paths(search).map(|d| d.join(name)).find(|p| is_executable(p))
}

/// A regular file (after symlinks) with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_trusted_path_is_searched() {
        let sh = find("sh").expect("sh is in /usr/bin or /bin");
        assert!(sh == Path::new("/usr/bin/sh") || sh == Path::new("/bin/sh"), "{}", sh.display());
        assert_eq!(find("definitely-not-a-binary-sigwake"), None);
        // A name with a slash is no bare name: never looked up.
        assert_eq!(find("./sh"), None);
        assert_eq!(find("bin/sh"), None);
        // The lookup is the trusted PATH's, whatever the environment's:
        // a program that exists only elsewhere is not found.
        let dir = tempfile::tempdir().unwrap();
        let planted = dir.path().join("sigwake-planted-tool");
        std::fs::write(&planted, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&planted, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert_eq!(find_in("sigwake-planted-tool", dir.path().as_os_str()), Some(planted));
        assert_eq!(find("sigwake-planted-tool"), None);
    }
}
