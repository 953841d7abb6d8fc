//! `cargo xtask image`: the agent's container image, built offline from
//! Debian packages (no container registry is involved): mmdebstrap makes a
//! Debian bookworm root filesystem, `podman import` turns it into a base
//! image, and `podman build` adds the release binary
//! (deploy/image/Containerfile). With `--app`, also the test app image
//! (python3 + trio from Debian, the fixtures and the Python client) that
//! tests/tests/deploy.rs runs beside the agent.
//!
//! The base tarballs are cached under `<target>/sigwake-image/`, named by a
//! hash of what goes into them (suite, variant, packages, the host's apt
//! sources), and so are the base images in podman's store: a warm run, or
//! a fresh clone on a machine that built them once, only copies the binary
//! in.
//!
//! podman runs with the project's own containers.conf (CONTAINERS_CONF,
//! written beside the tarballs), never the user's: runc, because these
//! machines have a hybrid cgroup v1 hierarchy crun refuses, and fixed
//! default ulimits, because podman's defaults need CAP_SYS_RESOURCE to set.

use std::{
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, output_ok, status, step, target_dir, workspace_root};

/// What the images are called.
pub struct Images {
    /// `localhost/sigwake:<version>` (also tagged `:latest`).
    pub agent: String,
    /// `localhost/sigwake-test-app:latest`, when asked for.
    pub app: Option<String>,
    /// The containers.conf every podman command of the project uses.
    pub containers_conf: PathBuf,
}

const SUITE: &str = "bookworm";
/// The app image's packages: the fixtures' runtime (Debian's trio is 0.22;
/// the fixtures use nothing newer) and `ps` for debugging a failed run.
const APP_PACKAGES: &[&str] = &["python3", "python3-trio", "procps"];
/// Podman and what `podman kube play` needs here: runc (see the module
/// doc) and catatonit (the pod's pause process, built into a local image).
const HOST_PACKAGES: &[&str] = &["podman", "runc", "mmdebstrap", "catatonit"];

pub fn run(app: bool) -> Result<()> {
    crate::require_root("`cargo xtask image`")?;
    let images = build(app)?;
    step(&format!("built {}{}", images.agent, images.app.map(|a| format!(" and {a}")).unwrap_or_default()));
    step(&format!("podman commands of the project use CONTAINERS_CONF={}", images.containers_conf.display()));
    Ok(())
}

/// Builds the agent image (and the app image with `app`); idempotent.
pub fn build(app: bool) -> Result<Images> {
    let root = workspace_root();
    let dir = target_dir().join("sigwake-image");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    install_host_packages()?;
    let containers_conf = write_containers_conf(&dir)?;
    let podman = || {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &containers_conf);
        c
    };

    step("building the agent (release) for the image");
    status(cargo().current_dir(&root).args(["build", "--release", "--package", "sigwake"]))?;
    let bin = target_dir().join("release/sigwake");
    let version = output_ok(Command::new(&bin).arg("--version"))
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .with_context(|| format!("{} --version gave no version", bin.display()))?;

    let sources = apt_sources()?;
    let mut wanted = vec![("agent", Vec::new())];
    if app {
        wanted.push(("app", APP_PACKAGES.to_vec()));
    }
    // Both root filesystems at once: most of mmdebstrap's time is waiting
    // on the mirror.
    let bases = std::thread::scope(|scope| {
        let jobs: Vec<_> = wanted
            .iter()
            .map(|(name, packages)| scope.spawn(|| base_image(&dir, name, packages, &sources, &containers_conf)))
            .collect();
        jobs.into_iter().map(|j| j.join().expect("the base image thread panicked")).collect::<Result<Vec<_>>>()
    })?;

    let context = dir.join("agent-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&bin, context.join("sigwake")).context("copying the agent into the build context")?;
    // The release profile keeps debug info (for the benchmarks' profiles):
    // ~60 MB the image does not need.
    status(Command::new("strip").arg("--strip-debug").arg(context.join("sigwake")))
        .context("strip (binutils) failed on the agent binary: apt-get install binutils")?;
    let agent = format!("localhost/sigwake:{version}");
    let before = image_id(&podman, &agent);
    step(&format!("podman build {agent}"));
    status(
        podman()
            .args(["build", "--quiet", "--pull=never", "--build-arg"])
            .arg(format!("BASE={}", bases[0]))
            .arg("--file")
            .arg(root.join("deploy/image/Containerfile"))
            .args(["--tag", &agent, "--tag", "localhost/sigwake:latest"])
            .arg(&context),
    )
    .context("podman build of the agent image failed")?;
    remove_if_replaced(&podman, &agent, before);

    let app = if app {
        let context = dir.join("app-context");
        let _ = std::fs::remove_dir_all(&context);
        copy_tree(&root.join("tests/fixtures"), &context.join("tests/fixtures"), &|p| {
            p.extension().is_some_and(|e| e == "py")
        })?;
        copy_tree(&root.join("clients/python/sigwake_client"), &context.join("clients/python/sigwake_client"), &|p| {
            p.extension().is_some_and(|e| e == "py")
        })?;
        let app = "localhost/sigwake-test-app:latest".to_string();
        let before = image_id(&podman, &app);
        step(&format!("podman build {app}"));
        status(
            podman()
                .args(["build", "--quiet", "--pull=never", "--build-arg"])
                .arg(format!("BASE={}", bases[1]))
                .arg("--file")
                .arg(root.join("tests/image/Containerfile"))
                .args(["--tag", &app])
                .arg(&context),
        )
        .context("podman build of the test app image failed")?;
        remove_if_replaced(&podman, &app, before);
        Some(app)
    } else {
        None
    };
    Ok(Images { agent, app, containers_conf })
}

/// The id of the image `name` refers to, if any.
fn image_id(podman: &dyn Fn() -> Command, name: &str) -> Option<String> {
    output_ok(podman().args(["image", "inspect", "--format", "{{.Id}}", name])).map(|s| s.trim().to_string())
}

/// Removes the image `name` referred to before a rebuild, if the rebuild
/// moved the name: each build would otherwise leave an untagged image
/// behind. Only that image, never a prune of the whole store; one still in
/// use by a container stays.
fn remove_if_replaced(podman: &dyn Fn() -> Command, name: &str, before: Option<String>) {
    if let Some(old) = before
        && image_id(podman, name).as_deref() != Some(old.as_str())
    {
        let _ = podman().args(["rmi", &old]).output();
    }
}

/// Installs podman, runc, mmdebstrap and catatonit with apt when one is
/// missing.
fn install_host_packages() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output_ok(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {} with apt", missing.join(", ")));
    status(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed: the Debian mirror must be reachable")?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("apt-get install {} failed", missing.join(" ")))
}

/// The project's containers.conf (see the module doc).
fn write_containers_conf(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("containers.conf");
    let text = "# Written by `cargo xtask image`; used through CONTAINERS_CONF by the project's\n\
                # own podman commands only. runc: crun refuses this hybrid cgroup v1 layout.\n\
                # default_ulimits: podman's defaults need CAP_SYS_RESOURCE to set.\n\
                [containers]\n\
                default_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
                [engine]\n\
                runtime = \"runc\"\n";
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path)
}

/// The host's Debian apt sources (files under /etc/apt that name this
/// suite), handed to mmdebstrap as its mirrors.
fn apt_sources() -> Result<Vec<PathBuf>> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let found: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources") || p.ends_with("sources.list"))
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(SUITE) && t.contains("debian")))
        .collect();
    if found.is_empty() {
        bail!(
            "no apt source for Debian {SUITE} under /etc/apt/sources.list(.d): mmdebstrap needs a Debian mirror; \
             add one (e.g. deb http://deb.debian.org/debian {SUITE} main)"
        );
    }
    Ok(found)
}

/// The base image `localhost/sigwake-base-NAME:<hash>`, from a cached
/// mmdebstrap tarball; both are made only when their inputs changed.
fn base_image(
    dir: &Path,
    name: &str,
    packages: &[&str],
    sources: &[PathBuf],
    containers_conf: &Path,
) -> Result<String> {
    let podman = || {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", containers_conf);
        c
    };
    // The essential variant has no apt: the images are built, never updated.
    let mut args: Vec<String> = vec!["--variant=essential".into(), "--format=tar".into(), "--quiet".into()];
    for path in ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*"] {
        args.push(format!("--dpkgopt=path-exclude={path}"));
    }
    if !packages.is_empty() {
        args.push(format!("--include={}", packages.join(",")));
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    args.hash(&mut hasher);
    SUITE.hash(&mut hasher);
    for s in sources {
        std::fs::read_to_string(s).unwrap_or_default().hash(&mut hasher);
    }
    let key = format!("{:016x}", hasher.finish());
    let image = format!("localhost/sigwake-base-{name}:{key}");
    // podman's image store outlives checkouts and target dirs (CI clones
    // afresh each run): an imported base of the same inputs is reused.
    if podman().args(["image", "exists", &image]).status().is_ok_and(|s| s.success()) {
        return Ok(image);
    }
    let tarball = dir.join(format!("base-{name}-{key}.tar"));
    if !tarball.exists() {
        step(&format!("mmdebstrap: Debian {SUITE} ({name}) root filesystem, cached as {}", tarball.display()));
        let partial = tarball.with_extension("tar.partial");
        status(Command::new("mmdebstrap").args(&args).arg(SUITE).arg(&partial).args(sources))
            .context("mmdebstrap failed: it needs the Debian mirror of /etc/apt/sources.list(.d)")?;
        std::fs::rename(&partial, &tarball)?;
        // Older tarballs of this image are stale now.
        for e in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("base-{name}-")) && e.path() != tarball {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    step(&format!("podman import {image}"));
    status(
        podman()
            .arg("import")
            .args(["--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
            .arg(&tarball)
            .arg(&image),
    )
    .context("podman import failed")?;
    Ok(image)
}

/// Copies the files under `from` that `keep` selects, keeping the layout.
fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = e?.path();
        if path.is_dir() {
            continue;
        }
        if keep(&path) {
            std::fs::copy(&path, to.join(path.file_name().unwrap()))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}
