//! `cargo xtask setup | run | test`: orchestration only. Every step is
//! idempotent, so `run` and `test` call `setup` first and a warm machine
//! pays a few file checks.

mod image;
mod kernels;
mod lint;
mod prometheus;
mod soak;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "sigwake developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready: rust-src, bpf-linker (against rustc's LLVM), the Python test venv, prometheus/promtool.
    Setup,
    /// Set up, build the agent (release) and run `sigwake run` as root; extra args go to sigwake.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run the unit tests and the privileged end-to-end tests (needs root).
    Test {
        /// Extra arguments for the end-to-end test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build the agent (release), then run the bench crate (bench/): overhead, detection latency, footprint (needs root); args go to it (--help).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run `sigwake check` and an end-to-end subset on the host and on Debian's 5.10, 6.1, 6.12 kernels in QEMU (needs root).
    Kernels(kernels::KernelsArgs),
    /// cargo fmt --check and cargo clippy -D warnings on every user-space crate and its tests.
    Lint,
    /// Soak the release agent for a few minutes: signal storms, registrations, restarts; reports RSS, CPU, kernel losses and wrong signals (needs root; not in CI).
    Soak(soak::SoakArgs),
    /// Build the agent's container image offline from Debian packages (localhost/sigwake:<version> and :latest; needs root).
    Image {
        /// Also the test app image (python3, trio, the fixtures) the deploy tests run.
        #[arg(long)]
        app: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup().map(|_| ()),
        Task::Run { args } => run(&args),
        Task::Test { args } => test(&args),
        Task::Bench { args } => bench(&args),
        Task::Kernels(args) => kernels::run(args),
        Task::Lint => lint::run(),
        Task::Soak(args) => soak::run(args),
        Task::Image { app } => image::run(app),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_path_buf()
}

/// Where cargo puts what it builds: CARGO_TARGET_DIR when set (relative to
/// the workspace), else `target/`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

fn step(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

fn output_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output_ok(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

struct Env {
    python: PathBuf,
    /// The tractor venv's python (tests/requirements-tractor.txt says why it is apart).
    tractor_python: PathBuf,
}

const BPF_LINKER_VERSION: &str = "0.13.0";

fn setup() -> Result<Env> {
    let root = workspace_root();

    // 1. rust-src, for -Z build-std=core on the BPF target.
    let sysroot = output_ok(Command::new("rustc").args(["--print", "sysroot"]))
        .context("running rustc; is the Rust toolchain installed (rustup)?")?;
    let sysroot = PathBuf::from(sysroot.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        step("installing rust-src (needed to build core for the BPF target)");
        status(Command::new("rustup").args(["component", "add", "rust-src"])).context(
            "`rustup component add rust-src` failed; it needs network access to the Rust distribution server",
        )?;
    }

    // 2. bpf-linker built against rustc's own LLVM (DESIGN §3).
    let have = output_ok(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        step(&format!("building bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM (about a minute)"));
        let llvm = std::fs::read_dir(sysroot.join("lib"))
            .context("reading the toolchain's lib directory")?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.")))
            .context("rustc's libLLVM.so.* not found in the toolchain; reinstall the stable toolchain with rustup")?;
        let prefix = root.join("target/llvm-prefix");
        std::fs::create_dir_all(prefix.join("lib"))?;
        let link = prefix.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link).context("linking libLLVM.so")?;
        let major = llvm
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("libLLVM.so."))
            .and_then(|v| v.split('.').next())
            .context("cannot read the LLVM version from the library name")?
            .to_string();
        status(
            Command::new("cargo")
                .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--no-default-features"])
                .args(["--features", &format!("llvm-{major}")])
                .env("LLVM_PREFIX", &prefix),
        )
        .context("building bpf-linker failed; it needs crates.io and a C++ compiler (apt-get install g++)")?;
    }

    // 3. Python venv with the test fixtures' dependencies.
    let venv = root.join(".venv");
    let python = venv.join("bin/python");
    let requirements = root.join("tests/requirements.txt");
    let stamp = venv.join(".requirements.installed");
    let wanted = std::fs::read_to_string(&requirements).context("reading tests/requirements.txt")?;
    let installed = std::fs::read_to_string(&stamp).unwrap_or_default();
    if !python.exists() || installed != wanted {
        step("creating the Python venv for the test fixtures (.venv)");
        if !python.exists() {
            status(Command::new("python3").args(["-m", "venv"]).arg(&venv))
                .context("python3 -m venv failed; install Python 3 with venv (apt-get install python3-venv)")?;
        }
        status(Command::new(&python).args(["-m", "pip", "install", "--quiet", "-r"]).arg(&requirements))
            .context("pip install failed; it needs access to PyPI")?;
        std::fs::write(&stamp, wanted)?;
    }

    // 4. Kernel features the agent needs: checked here so that a machine
    // that cannot run it says so before anything is built.
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        step(
            "warning: /sys/kernel/btf/vmlinux is missing: this kernel has no BTF; the agent's tracepoint programs still load, BTF-typed hooks will not",
        );
    }
    prometheus::ensure_prometheus()?;
    let tractor_python = tractor_venv(&root)?;
    ensure_node()?;
    Ok(Env { python, tractor_python })
}

/// Node.js for the libuv end-to-end tests (tests/fixtures/node_actor.js):
/// Debian's `nodejs` when no `node` is on PATH.
fn ensure_node() -> Result<()> {
    let found = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    if found {
        return Ok(());
    }
    step("installing Node.js (apt-get install nodejs) for the libuv tests");
    status(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed: the Debian mirror must be reachable")?;
    status(Command::new("apt-get").args(["install", "-y", "-qq", "nodejs"]).env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get install nodejs failed: install Node.js so that `node` is on PATH")
}

/// The venv of the real tractor tree fixture (`.venv-tractor`): the
/// dependencies from tests/requirements-tractor.txt, then tractor itself
/// without its own (tests/requirements-tractor-nodeps.txt). Reinstalled
/// when either file changes.
fn tractor_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join(".venv-tractor");
    let python = venv.join("bin/python");
    let deps = root.join("tests/requirements-tractor.txt");
    let nodeps = root.join("tests/requirements-tractor-nodeps.txt");
    let stamp = venv.join(".requirements.installed");
    let wanted = std::fs::read_to_string(&deps).context("reading tests/requirements-tractor.txt")?
        + &std::fs::read_to_string(&nodeps).context("reading tests/requirements-tractor-nodeps.txt")?;
    if python.exists() && std::fs::read_to_string(&stamp).unwrap_or_default() == wanted {
        return Ok(python);
    }
    step("creating the Python venv for the tractor fixture (.venv-tractor)");
    if !python.exists() {
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("python3 -m venv failed; install Python 3 with venv (apt-get install python3-venv)")?;
    }
    status(Command::new(&python).args(["-m", "pip", "install", "--quiet", "-r"]).arg(&deps))
        .context("pip install of tractor's dependencies failed; it needs access to PyPI")?;
    status(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--no-deps", "-r"]).arg(&nodeps))
        .context("pip install of tractor failed; it needs access to PyPI")?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}

/// Some end-to-end tests run fixtures as `nobody` (rights are what they
/// test), from this checkout: its directories must be searchable by others.
/// A checkout under `mktemp -d` (0700) is not, so add the search bit (o+x:
/// reach a known path, not list) to the checkout and each directory above it
/// that lacks it, and say so.
fn let_others_traverse(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for dir in root.ancestors() {
        let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            step(&format!(
                "{}: adding o+x (search only) so that tests running as nobody reach the fixtures",
                dir.display()
            ));
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
                .with_context(|| format!("chmod o+x {}", dir.display()))?;
        }
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} loads eBPF programs and needs root: run it with sudo (or as root)");
    }
    Ok(())
}

/// `cargo xtask bench`: set-up and the release agent, then the bench crate.
fn bench(args: &[String]) -> Result<()> {
    setup()?;
    require_root("`cargo xtask bench`")?;
    let root = workspace_root();
    step("building the agent (release)");
    status(cargo().current_dir(&root).args(["build", "--release", "--package", "sigwake"]))?;
    status(cargo().current_dir(&root).args(["run", "--release", "--package", "sigwake-bench", "--"]).args(args))
}

fn run(args: &[String]) -> Result<()> {
    setup()?;
    require_root("`cargo xtask run`")?;
    status(cargo().current_dir(workspace_root()).args(["build", "--release", "--package", "sigwake"]))?;
    let bin = workspace_root().join("target/release/sigwake");
    let mut args = args.to_vec();
    if args.first().is_none_or(|a| a.starts_with('-')) {
        args.insert(0, "run".into());
    }
    status(Command::new(bin).args(&args))
}

/// The stdlib registration client's unit tests, run by the venv's Python.
/// Finding none is a failure: before Python 3.12, unittest passes an empty
/// run.
fn python_client_tests(python: &Path, root: &Path) -> Result<()> {
    const RUN: &str = "import sys, unittest\n\
        suite = unittest.defaultTestLoader.discover(sys.argv[1])\n\
        if suite.countTestCases() == 0:\n    sys.exit('no tests found in ' + sys.argv[1])\n\
        sys.exit(not unittest.TextTestRunner(verbosity=1).run(suite).wasSuccessful())\n";
    status(Command::new(python).args(["-c", RUN]).arg(root.join("clients/python/tests")).current_dir(root))
}

/// Cases per fuzz target in CI: the unit tests above ran 256 each; this
/// many takes about 40 s for all of them on 2 cores.
const FUZZ_CASES: u32 = 4000;

/// The fuzz targets (the `fuzz_*` property tests of the ring-buffer
/// decoder, the registration protocol and framing, and the config loader)
/// again, with FUZZ_CASES cases each. A failure prints the minimal input;
/// proptest saves it under agent/proptest-regressions/, commit that file
/// (it is replayed first from then on) and add a named regression test.
fn fuzz() -> Result<()> {
    step(&format!("fuzz targets, {FUZZ_CASES} cases each"));
    let started = std::time::Instant::now();
    status(
        cargo()
            .current_dir(workspace_root())
            .args(["test", "--package", "sigwake", "--lib", "--", "fuzz_"])
            .env("PROPTEST_CASES", FUZZ_CASES.to_string()),
    )?;
    step(&format!("fuzz targets passed in {:.0} s", started.elapsed().as_secs_f64()));
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    // A shell without job control starts a background job (`cargo xtask
    // test &`, nohup, some CI runners) with SIGINT and SIGQUIT ignored, and
    // every fixture would inherit that: Python then installs no SIGINT
    // handler at all, and no event loop could see the SIGINTs the tests
    // send. The tests need the defaults.
    for sig in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: resets a disposition before any thread of ours handles it.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    let env = setup()?;
    let root = workspace_root();
    step("unit tests");
    status(cargo().current_dir(&root).args([
        "test",
        "--workspace",
        "--exclude",
        "sigwake-ebpf",
        "--exclude",
        "sigwake-tests",
    ]))?;
    fuzz()?;
    step("Python client unit tests (clients/python)");
    python_client_tests(&env.python, &root)?;
    // The end-to-end tests must run, not skip: without root they cannot.
    require_root("the end-to-end tests")?;
    let_others_traverse(&root)?;
    // The deploy suite runs these images: built once per run (the Debian
    // root filesystems are cached under the target dir).
    let images = image::build(true)?;
    step("privileged end-to-end tests");
    status(cargo().current_dir(&root).args(["build", "--package", "sigwake", "--package", "sigwake-tokio-actor"]))?;
    // tier: (`--hooks` value, the tier `sigwake check` must then report).
    let e2e = |extra: &[&str], tier: Option<(&str, &str)>| {
        let mut cmd = cargo();
        cmd.current_dir(&root)
            .args(["test", "--package", "sigwake-tests"])
            .args(extra)
            .arg("--")
            .args(args)
            .env("SIGWAKE_BIN", target_dir().join("debug/sigwake"))
            .env("SIGWAKE_TOKIO_ACTOR", target_dir().join("debug/sigwake-tokio-actor"))
            .env("SIGWAKE_AGENT_IMAGE", &images.agent)
            .env("SIGWAKE_APP_IMAGE", images.app.as_deref().expect("built with the app image"))
            .env("CONTAINERS_CONF", &images.containers_conf)
            .env("SIGWAKE_PYTHON", &env.python)
            .env("SIGWAKE_TRACTOR_PYTHON", &env.tractor_python)
            .env("SIGWAKE_FIXTURES", root.join("tests/fixtures"));
        if let Some((hooks, tier)) = tier {
            cmd.env("SIGWAKE_TEST_HOOKS", hooks).env("SIGWAKE_EXPECT_TIER", tier);
        }
        status(&mut cmd)
    };
    e2e(&[], None)?;
    // The default pass ran on the fastest tier this kernel allows (on a
    // kernel that refuses fentry and has sock:sock_send_length, the socket
    // tier). The syscall tracepoints every kernel falls back to run the
    // suites of the write path again, with every runtime.
    step("end-to-end suites again on the syscall tracepoints (--hooks tracepoint)");
    for suite in FALLBACK_TIER_SUITES {
        e2e(&["--test", suite], Some(("tracepoint", "syscall_tracepoint")))?;
    }
    Ok(())
}

/// The suites that run a second time on the fallback tier.
const FALLBACK_TIER_SUITES: &[&str] = &["kernel", "trace", "metrics", "pidns", "escalation", "runtimes"];
