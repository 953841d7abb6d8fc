//! cgroup v2 helpers for the end of the escalation ladder.

use std::{fs, io, path::Path};

/// Kills every process in a cgroup v2 (writes "1" to `<cgroup>/cgroup.kill`,
/// Linux ≥ 5.14). `cgroup_path` is the cgroup's directory, e.g.
/// `/sys/fs/cgroup/system.slice/foo.service`.
pub fn kill_cgroup(cgroup_path: &Path) -> io::Result<()> {
    fs::write(cgroup_path.join("cgroup.kill"), b"1")
}

/// The processes in a cgroup v2 (`<cgroup>/cgroup.procs`).
pub fn procs(cgroup_path: &Path) -> io::Result<Vec<u32>> {
    let text = fs::read_to_string(cgroup_path.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_cgroup_missing_dir_is_error() {
        assert!(kill_cgroup(Path::new("/nonexistent-sigwake-cgroup")).is_err());
    }
}
