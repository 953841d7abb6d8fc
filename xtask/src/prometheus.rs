//! Prometheus for the dashboard/rules end-to-end tests: `promtool` checks
//! and unit-tests `dashboards/prometheus/*.yml`, and a real `prometheus`
//! server scrapes the agent. Both come from Debian's `prometheus` package.
//!
//! The package's postinst enables and starts a system-wide Prometheus
//! service (listening on :9090, scraping localhost). We only want the
//! binaries, so after installing we stop and disable that service again.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

const PACKAGE: &str = "prometheus";
const BINARIES: [&str; 2] = ["promtool", "prometheus"];

/// Installs Debian's `prometheus` package when `promtool` or `prometheus`
/// is missing; does nothing when both are on `PATH`.
pub fn ensure_prometheus() -> Result<()> {
    let missing: Vec<&str> = BINARIES.iter().copied().filter(|b| find_in_path(b).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing Debian's `{PACKAGE}` package ({} missing; the dashboard tests need them)",
        missing.join(" and ")
    );
    if find_in_path("apt-get").is_none() {
        bail!(
            "{} not found and apt-get is not available to install it: install Prometheus 2.x \
             so that `promtool` and `prometheus` are on PATH (e.g. from your distribution or \
             https://prometheus.io/download/), then re-run",
            missing.join(" and ")
        );
    }

    // Try with the package lists as they are; refresh them only if that fails
    // (a fresh machine or container often has none, or stale ones).
    if apt_get(&["install", "-y", "--no-install-recommends", PACKAGE]).is_err() {
        eprintln!("xtask: apt-get install {PACKAGE} failed; running apt-get update and retrying");
        apt_get(&["update"]).context("apt-get update failed; installing Prometheus needs Debian's package mirrors")?;
        apt_get(&["install", "-y", "--no-install-recommends", PACKAGE]).with_context(|| {
            format!("apt-get install {PACKAGE} failed (needs root and access to Debian's package mirrors)")
        })?;
    }
    stop_packaged_service();

    let still: Vec<&str> = BINARIES.iter().copied().filter(|b| find_in_path(b).is_none()).collect();
    if !still.is_empty() {
        bail!("installed the `{PACKAGE}` package but {} is still not on PATH", still.join(" and "));
    }
    Ok(())
}

fn apt_get(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args([
        "-q",
        "-o",
        "DPkg::Lock::Timeout=300",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ])
    .args(args)
    .env("DEBIAN_FRONTEND", "noninteractive")
    .env("NEEDRESTART_MODE", "a");
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st}){}", if is_root() { "" } else { "; apt-get needs root: run with sudo" });
    }
    Ok(())
}

/// The package starts `prometheus.service` (systemd) or `/etc/init.d/prometheus`
/// (sysvinit) from its postinst, unless policy-rc.d forbids it (containers).
/// Stop it and keep it from starting at boot: the tests run their own server
/// on a free loopback port, and a stray system-wide Prometheus on :9090 is
/// not something `cargo xtask setup` should leave behind.
fn stop_packaged_service() {
    if Path::new("/run/systemd/system").is_dir() && find_in_path("systemctl").is_some() {
        // systemd is PID 1: disable --now stops it and removes it from boot.
        quiet(Command::new("systemctl").args(["disable", "--now", "prometheus.service"]));
    } else if Path::new("/etc/init.d/prometheus").exists() {
        quiet(Command::new("/etc/init.d/prometheus").arg("stop"));
        if find_in_path("update-rc.d").is_some() {
            quiet(Command::new("update-rc.d").args(["prometheus", "disable"]));
        }
    }
    eprintln!("xtask: the packaged prometheus service is stopped and disabled; the tests start their own");
}

fn quiet(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "xtask: warning: {shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("xtask: warning: {shown}: {e}"),
    }
}

fn is_root() -> bool {
    // The effective uid, from /proc (xtask does not link libc).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        // Debian installs into /usr/bin; also look in the sbin dirs a
        // non-login root shell may lack.
        .chain(["/usr/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
