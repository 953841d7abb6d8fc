//! `cargo xtask kernels`: the kernel matrix.
//!
//! Runs `sigwake check` and a named subset of the privileged end-to-end tests
//! ([`SUBSET`]) on the host's kernel and on Debian's stock 5.10, 6.1 and 6.12
//! kernels, each booted with virtme-ng under QEMU, one after the other (two
//! cores). QEMU runs with TCG: KVM guests hang in early boot on these
//! machines (DESIGN §8). A guest shares the host's root filesystem, so it
//! runs the binaries built here; `xtask/guest/run-matrix.sh` does the work
//! inside and leaves files in a directory shared read-write with the host,
//! and those files are all a row is judged by: vng exits 255 whether or not
//! the command inside succeeded.
//!
//! Set-up, idempotent and cached: Debian packages (QEMU, kmod for depmod,
//! busybox for virtme-ng's initramfs, two libraries to build virtiofsd), a
//! venv with virtme-ng (`target/vng-venv`), virtiofsd from crates.io
//! (`target/virtiofsd`), and the kernel packages, resolved through apt at
//! every run (the newest ABI the archive offers) and downloaded and unpacked
//! once per package version into `target/kernels/NAME/`; bullseye's come
//! through a private apt configuration under `target/kernels/apt-bullseye/`.
//! Every row runs the same release build of the agent and the debug test
//! binaries, built before the first kernel boots.
//!
//! Output: a table, `target/kernels/results.json`, and README.md's section
//! between the `kernels:begin` and `kernels:end` markers, rewritten from the
//! deterministic part of the results (kernel, package, hooks, tests passed);
//! `--check` fails when that section was stale.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::{cargo, output_ok, require_root, setup, status, step, workspace_root};

/// The end-to-end tests every kernel runs: (test binary, test function).
/// Each name is checked against the built binary's `--list` before any
/// kernel boots, so a renamed test fails the run instead of vanishing.
pub const SUBSET: &[(&str, &str)] = &[
    // `sigwake check` proves every job; SIGWAKE_EXPECT_TIER pins the tier.
    ("kernel", "check_proves_every_job_on_this_kernel"),
    ("kernel", "check_passes_in_a_pid_namespace_of_its_own"),
    // The socket tier where the kernel has sock:sock_send_length (6.12+),
    // the announced fallback elsewhere.
    ("kernel", "socket_tier_is_proven_where_the_kernel_has_sock_send_length"),
    ("kernel", "forced_syscall_tracepoints_pass_the_self_test_too"),
    ("kernel", "metrics_name_the_tier_serving_each_job"),
    // Pipe wakeups on every tier; on the socket tier through its on-demand
    // syscall hook, attached only while an actor needs it.
    ("kernel", "pipe_wakeups_are_seen_and_the_syscall_hook_is_attached_only_while_an_actor_needs_it"),
    ("trace", "starved_trio_loop_dropped_sigint_is_reported_with_fd_and_signal"),
    ("trace", "healthy_trio_loop_reports_no_drop_and_exits_on_sigint"),
    ("trace", "ordinary_eagain_writes_outside_handlers_report_nothing"),
    // Handler return at depth: each nested handler's own time.
    ("trace", "nested_handlers_each_report_their_own_duration"),
    // A failed *send*: tokio's handler uses sendto(2).
    ("runtimes", "starved_tokio_loop_dropped_sigint_is_reported_with_fd_and_signal"),
    // Exec: a process that execs into a selected command line.
    ("registry", "config_selector_matches_a_process_that_execs_into_a_matching_command_line"),
    ("metrics", "dropped_wakeup_counter_moves_by_the_drops_caused"),
    ("escalation", "seed_scenario_starved_trio_actor_is_stopped_by_sigterm_and_everything_is_recorded"),
    // A sidecar's view: pids translated into the agent's own namespace.
    ("pidns", "agent_in_a_shared_pid_namespace_blames_and_stops_the_starved_actor_never_the_colliding_bystander"),
];

/// The harness's deadlines are multiplied by this inside the guests
/// (`SIGWAKE_TEST_TIME_SCALE`): TCG runs the guest several times slower.
const GUEST_TIME_SCALE: &str = "4";

/// virtme-ng from PyPI, the version this matrix was verified with.
const VIRTME_NG_VERSION: &str = "1.42";

/// The Rust virtiofsd from crates.io (Debian 12 has no package of it). With
/// it virtme-ng shares the root filesystem over virtio-fs instead of 9p, and
/// file-heavy work in the guest (Python importing trio, loading the agent)
/// runs 2-3 times faster under TCG. virtme-ng refuses QEMU's own C virtiofsd.
const VIRTIOFSD_VERSION: &str = "1.14.0";

/// Debian packages the guests need, with a binary each must provide.
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("kmod", "/usr/sbin/depmod"),
    // virtme-ng builds its initramfs around a static busybox and refuses to
    // boot without one ("initramfs is needed, and no busybox was found").
    ("busybox-static", "/bin/busybox"),
    // To build virtiofsd.
    ("libcap-ng-dev", "/usr/include/cap-ng.h"),
    ("libseccomp-dev", "/usr/include/seccomp.h"),
];

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const README_BEGIN: &str = "<!-- kernels:begin -->";
const README_END: &str = "<!-- kernels:end -->";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The running kernel; no VM.
    Host,
    /// The machine's own apt sources (bookworm, bookworm-security).
    Machine,
    /// bullseye and bullseye-security through a private apt configuration.
    Bullseye,
}

/// A matrix row. The package name is `PREFIX<N>SUFFIX` with N a number (the
/// ABI or the upstream patch level); the highest N apt offers is used.
pub struct Kernel {
    name: &'static str,
    series: &'static str,
    source: Source,
    prefix: &'static str,
    suffix: &'static str,
    /// The tier `sigwake check` must choose there (SIGWAKE_EXPECT_TIER for
    /// tests/tests/kernel.rs); None: whatever the kernel allows.
    expect_tier: Option<&'static str>,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        name: "host",
        series: "this machine's kernel",
        source: Source::Host,
        prefix: "",
        suffix: "",
        expect_tier: None,
    },
    Kernel {
        name: "5.10",
        series: "Debian 11 bullseye",
        source: Source::Bullseye,
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64",
        // Measured: fexit on __x64_sys_sendto is rejected by 5.10's verifier
        // (its BTF has `struct pt_regs` only as a forward declaration), so
        // the agent falls back to syscall tracepoints; not pinned.
        expect_tier: None,
    },
    Kernel {
        name: "6.1",
        series: "Debian 12 bookworm",
        source: Source::Machine,
        // The generic flavour: the -cloud- one has no 9p modules.
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
        expect_tier: Some("fentry"),
    },
    Kernel {
        name: "6.12",
        series: "Debian 12 bookworm-security",
        source: Source::Machine,
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
        // sock:sock_send_length and BPF trampolines: socket sends, pipe
        // writes by fexit on pipe_write, returns by fentry.
        expect_tier: Some("socket_fentry"),
    },
];

#[derive(Debug, clap::Args)]
pub struct KernelsArgs {
    /// Only this kernel (repeatable): host, 5.10, 6.1, 6.12 [default: all]. README.md is rewritten only by a full run.
    #[arg(long = "kernel", value_name = "NAME",
          value_parser = clap::builder::PossibleValuesParser::new(KERNELS.iter().map(|k| k.name)))]
    pub kernels: Vec<String>,
    /// Also fail if README.md's kernel table differs from what this run produced (for CI).
    #[arg(long)]
    pub check: bool,
    /// Keep every kernel's work directory (target/kernels/run/NAME); failed rows always keep theirs.
    #[arg(long)]
    pub keep: bool,
    /// Wall-clock limit per kernel, in seconds; the VM (or the host run) is killed after it.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
    /// Also run the hot-path bench (`sigwake-bench --quick --only hot`) in each kernel, after its tests, and print
    /// its ratios to the no-agent baseline (under TCG absolute times mean little; the ratios, paired with
    /// interleaved baselines in the same guest, are what compares). Adds up to 30 minutes per kernel; results in
    /// target/kernels/bench.json.
    #[arg(long, conflicts_with = "check")]
    pub bench: bool,
}

/// What every row runs: the end-to-end test binaries by name, and with
/// --bench the bench.
struct Built {
    tests: BTreeMap<String, PathBuf>,
    bench: Option<PathBuf>,
}

/// Added to each kernel's time limit with --bench.
const BENCH_LIMIT: Duration = Duration::from_secs(1800);

/// The bench rows `--bench` reports per kernel: (column, figure in the
/// bench's table).
const BENCH_FIGURES: &[(&str, &str)] = &[
    ("write idle", "write(fd, 1 B) to /dev/null: sigwake run, nothing watched"),
    ("write 1,000 actors", "write(fd, 1 B) to /dev/null: sigwake run, 1,000 actors"),
    ("write +pipe actor", "write(fd, 1 B) to /dev/null: sigwake run, 1,000 actors + 1 pipe-wakeup actor"),
    ("getppid idle", "getppid(): sigwake run, nothing watched"),
    ("getppid 1,000 actors", "getppid(): sigwake run, 1,000 actors"),
    ("AF_UNIX idle", "AF_UNIX send+recv 1 B: sigwake run, nothing watched"),
    ("AF_UNIX 1,000 actors", "AF_UNIX send+recv 1 B: sigwake run, 1,000 actors"),
    ("write, bpftrace peer", "write(fd, 1 B) to /dev/null: bpftrace peer (bench/peer.bt)"),
];

/// An unpacked kernel package.
#[derive(Clone)]
struct Image {
    package: String,
    version: String,
    suite: String,
    release: String,
    root: PathBuf,
}

impl Image {
    fn vmlinuz(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.release))
    }

    fn to_json(&self) -> Value {
        json!({ "package": self.package, "version": self.version, "suite": self.suite, "release": self.release })
    }
}

struct TestResult {
    binary: &'static str,
    test: &'static str,
    /// `ok`, `FAILED`, `ignored` or `not run`.
    outcome: String,
    /// Where and why a failed test panicked.
    why: Option<String>,
}

struct Row {
    kernel: &'static Kernel,
    image: Option<Image>,
    release: Option<String>,
    check: std::result::Result<Value, String>,
    tests: Vec<TestResult>,
    binaries: Vec<Value>,
    /// Why the row failed; empty when it passed.
    failures: Vec<String>,
    /// Last lines of the guest console (or the host run's output) on failure.
    console_tail: String,
    wall: Duration,
    workdir: PathBuf,
    /// With --bench: the ratios, or why there are none.
    bench: Option<std::result::Result<Vec<(&'static str, String)>, String>>,
}

impl Row {
    fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn passed_tests(&self) -> usize {
        self.tests.iter().filter(|t| t.outcome == "ok").count()
    }

    /// `job: tier` per hook `sigwake check` reported, or why there are none.
    fn hooks(&self) -> Vec<String> {
        match &self.check {
            // `jobs` is what `sigwake check --json` prints; `hooks` is accepted too.
            Ok(v) => match v["jobs"].as_array().or(v["hooks"].as_array()) {
                Some(hooks) => hooks
                    .iter()
                    .map(|h| match (h["job"].as_str(), h["tier"].as_str()) {
                        (Some(job), Some(tier)) => format!("{job}: {tier}"),
                        _ => h.to_string(),
                    })
                    .collect(),
                None => vec![format!("(no `jobs` array in check output: {})", short(&v.to_string(), 80))],
            },
            Err(_) => vec!["(`sigwake check` failed)".to_string()],
        }
    }

    /// The row's result as it goes into README.md: deterministic words only.
    fn result_word(&self) -> String {
        let (n, total) = (self.passed_tests(), self.tests.len());
        if self.release.is_none() {
            return "failed: did not boot".to_string();
        }
        if self.passed() { format!("passed {n}/{total}") } else { format!("failed ({n}/{total} tests passed)") }
    }
}

pub fn run(args: KernelsArgs) -> Result<()> {
    let root = workspace_root();
    let full = args.kernels.is_empty();
    if args.check && !full {
        bail!("--check compares README.md's whole kernel table: run it without --kernel");
    }
    let selected: Vec<&'static Kernel> =
        KERNELS.iter().filter(|k| full || args.kernels.iter().any(|n| n == k.name)).collect();
    let limit = Duration::from_secs(args.timeout) + if args.bench { BENCH_LIMIT } else { Duration::ZERO };
    let t_all = Instant::now();

    // 1. Set-up: the project's own (toolchain, bpf-linker, test venv), then
    // the matrix's (QEMU, virtme-ng, kernel images).
    let env = setup()?;
    require_root("`cargo xtask kernels`")?;
    let vms: Vec<&Kernel> = selected.iter().copied().filter(|k| k.source != Source::Host).collect();
    let mut images = BTreeMap::new();
    let mut vm = None;
    if !vms.is_empty() {
        ensure_host_packages()?;
        vm = Some(VmTools { vng: ensure_virtme_ng(&root)?.join("vng"), virtiofsd: ensure_virtiofsd(&root)? });
        for k in &vms {
            let img = ensure_kernel(&root, k).with_context(|| format!("setting up the {} kernel", k.name))?;
            step(&format!(
                "kernel {}: {} {} ({}), release {}",
                k.name, img.package, img.version, img.suite, img.release
            ));
            images.insert(k.name, img);
        }
    }

    // 2. The binaries every row runs, built here, before any VM boots. The
    // agent is the release build: under TCG the debug build takes 10-20 s
    // to load its programs (`sigwake check`), the release build under 1 s,
    // and the subset starts the agent a dozen times per kernel.
    step("building the agent (release) and the end-to-end test binaries");
    status(cargo().current_dir(&root).args(["build", "--release", "--package", "sigwake"]))?;
    // The tokio fixture of the send-based test (runtimes.rs).
    status(cargo().current_dir(&root).args(["build", "--release", "--package", "sigwake-tokio-actor"]))?;
    let executables = build_test_binaries(&root)?;
    verify_subset(&executables)?;
    let bench = if args.bench {
        status(cargo().current_dir(&root).args(["build", "--release", "--package", "sigwake-bench"]))?;
        Some(super::target_dir().join("release/sigwake-bench"))
    } else {
        None
    };
    let built = Built { tests: executables, bench };

    // 3. The rows, one at a time.
    let mut rows = Vec::new();
    for k in &selected {
        let img = images.get(k.name).cloned();
        step(&format!(
            "kernel {}: {}",
            k.name,
            match &img {
                Some(i) => format!("booting {} under QEMU (TCG), limit {} s", i.release, limit.as_secs()),
                None => format!("running on the host, limit {} s", limit.as_secs()),
            }
        ));
        let row = run_row(&root, k, img, vm.as_ref(), &env.python, &built, limit)?;
        step(&format!(
            "kernel {}: {} in {:.0} s",
            k.name,
            if row.passed() { "passed".to_string() } else { format!("FAILED: {}", row.failures.join("; ")) },
            row.wall.as_secs_f64()
        ));
        if row.passed() && !args.keep {
            let _ = fs::remove_dir_all(&row.workdir);
        }
        rows.push(row);
    }
    let total = t_all.elapsed();

    // 4. Report.
    print_table(&rows, total);
    let results = root.join("target/kernels/results.json");
    fs::create_dir_all(results.parent().unwrap())?;
    fs::write(&results, serde_json::to_string_pretty(&results_json(&rows, total))? + "\n")
        .with_context(|| format!("writing {}", results.display()))?;
    eprintln!("results: {}", results.display());

    let mut errors = Vec::new();
    if full {
        let readme = root.join("README.md");
        let changed = update_readme(&readme, &readme_section(&rows))?;
        if changed {
            eprintln!("README.md: the kernel table was rewritten from this run");
            if args.check {
                errors.push(
                    "README.md's kernel table was stale (it differed from this run's results); it has been rewritten: commit it"
                        .to_string(),
                );
            }
        } else {
            eprintln!("README.md: the kernel table is up to date");
        }
    } else {
        eprintln!("README.md: not touched (its table lists the whole matrix; run without --kernel to rewrite it)");
    }
    let failed: Vec<&str> = rows.iter().filter(|r| !r.passed()).map(|r| r.kernel.name).collect();
    if !failed.is_empty() {
        errors.push(format!(
            "{} of {} kernels failed: {} (work directories kept under target/kernels/run/)",
            failed.len(),
            rows.len(),
            failed.join(", ")
        ));
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------

fn dpkg_installed(package: &str) -> bool {
    output_ok(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", package]))
        .is_some_and(|s| s.starts_with("ii"))
}

fn apt_get(args: &[&str]) -> Result<()> {
    status(
        Command::new("apt-get")
            .args(["-q", "-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn ensure_host_packages() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES.iter().map(|(p, _)| *p).filter(|p| !dpkg_installed(p)).collect();
    if !missing.is_empty() {
        step(&format!("installing Debian packages for the kernel matrix: {}", missing.join(" ")));
        let install = |m: &[&str]| {
            let mut a = vec!["install", "-y", "--no-install-recommends"];
            a.extend_from_slice(m);
            apt_get(&a)
        };
        if install(&missing).is_err() {
            step("apt-get install failed; running apt-get update and retrying");
            apt_get(&["update"]).context("apt-get update failed: the kernel matrix needs Debian's package mirrors")?;
            install(&missing).with_context(|| {
                format!(
                    "installing {} failed; the kernel matrix needs them (QEMU to boot the kernels, depmod, busybox for the initramfs): \
                     install them with `apt-get install --no-install-recommends {}` (as root)",
                    missing.join(", "),
                    missing.join(" ")
                )
            })?;
        }
    }
    for (package, bin) in HOST_PACKAGES {
        if !Path::new(bin).exists() {
            bail!(
                "{bin} is missing although Debian's `{package}` package is installed; reinstall it (apt-get install --reinstall {package})"
            );
        }
    }
    Ok(())
}

/// A venv under target/ with virtme-ng; returns its bin directory.
fn ensure_virtme_ng(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/vng-venv");
    let bin = venv.join("bin");
    let want = format!("virtme-ng {VIRTME_NG_VERSION}");
    let have = output_ok(Command::new(bin.join("vng")).arg("--version")).unwrap_or_default();
    if have.trim() != want {
        step(&format!("installing virtme-ng {VIRTME_NG_VERSION} into target/vng-venv"));
        if !bin.join("python").exists() {
            status(Command::new("python3").args(["-m", "venv"]).arg(&venv))
                .context("python3 -m venv failed; install Python 3 with venv (apt-get install python3-venv)")?;
        }
        status(
            Command::new(bin.join("python"))
                .args(["-m", "pip", "install", "--quiet"])
                .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
        )
        .context("pip install virtme-ng failed; it needs access to PyPI")?;
        let have = output_ok(Command::new(bin.join("vng")).arg("--version")).unwrap_or_default();
        if have.trim() != want {
            bail!("target/vng-venv/bin/vng --version says {:?} after installing {want}", have.trim());
        }
    }
    Ok(bin)
}

/// virtiofsd built from crates.io into target/virtiofsd; its path.
fn ensure_virtiofsd(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/virtiofsd");
    let bin = dir.join("bin/virtiofsd");
    let have = output_ok(Command::new(&bin).arg("--version")).unwrap_or_default();
    if !have.contains(VIRTIOFSD_VERSION) {
        step(&format!(
            "building virtiofsd {VIRTIOFSD_VERSION} from crates.io into target/virtiofsd (a few minutes, once)"
        ));
        status(cargo().args(["install", "--locked", &format!("virtiofsd@{VIRTIOFSD_VERSION}"), "--root"]).arg(&dir))
            .context(
                "building virtiofsd failed; it needs crates.io and the libcap-ng-dev and libseccomp-dev packages",
            )?;
    }
    Ok(bin)
}

/// What boots a kernel: vng, and the virtiofsd it finds on PATH.
struct VmTools {
    vng: PathBuf,
    virtiofsd: PathBuf,
}

/// apt, either as the machine has it or with a private configuration.
struct Apt {
    opts: Vec<String>,
    what: String,
}

impl Apt {
    fn for_kernel(root: &Path, k: &Kernel) -> Result<Apt> {
        match k.source {
            Source::Host => unreachable!("the host row has no package"),
            Source::Machine => Ok(Apt { opts: Vec::new(), what: "the machine's apt sources".to_string() }),
            Source::Bullseye => Apt::bullseye(root),
        }
    }

    /// bullseye and bullseye-security, from the archive host the machine's
    /// own apt sources use, through lists and a cache of their own.
    fn bullseye(root: &Path) -> Result<Apt> {
        if !Path::new(KEYRING).exists() {
            bail!("{KEYRING} is missing: install Debian's archive keys (apt-get install debian-archive-keyring)");
        }
        let (main, security) = debian_archive_uris();
        let dir = root.join("target/kernels/apt-bullseye");
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let list = dir.join("sources.list");
        let text = format!(
            "# written by `cargo xtask kernels`: bullseye's kernels for the kernel matrix\n\
             deb [signed-by={KEYRING}] {main} bullseye main\n\
             deb [signed-by={KEYRING}] {security} bullseye-security main\n"
        );
        if fs::read_to_string(&list).ok().as_deref() != Some(text.as_str()) {
            fs::write(&list, &text)?;
            // Lists from other URIs are no longer right.
            let _ = fs::remove_dir_all(dir.join("lists"));
            fs::create_dir_all(dir.join("lists/partial"))?;
        }
        let o = |k: &str, v: &Path| ["-o".to_string(), format!("{k}={}", v.display())];
        let mut opts = Vec::new();
        opts.extend(o("Dir::Etc::SourceList", &list));
        opts.extend(o("Dir::Etc::SourceParts", Path::new("/dev/null")));
        opts.extend(o("Dir::State::Lists", &dir.join("lists")));
        opts.extend(o("Dir::Cache", &dir.join("cache")));
        Ok(Apt { opts, what: format!("bullseye and bullseye-security from {main} and {security}") })
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.args(&self.opts);
        c
    }

    fn update(&self) -> Result<()> {
        step(&format!("apt-get update ({})", self.what));
        status(self.cmd("apt-get").args(["-q", "-o", "DPkg::Lock::Timeout=300", "update"]))
            .with_context(|| format!("apt-get update failed for {}: it needs Debian's package mirrors", self.what))
    }

    /// The newest `PREFIX<N>SUFFIX` package apt offers: (name, version, suite).
    fn resolve(&self, k: &Kernel) -> Result<(String, String, String)> {
        let pattern = format!("^{}", k.prefix.replace('.', "\\.").replace('+', "\\+"));
        let out = output_ok(self.cmd("apt-cache").args(["search", "--names-only", &pattern]))
            .with_context(|| format!("apt-cache search {pattern} failed ({})", self.what))?;
        let package = out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|name| {
                let n = name.strip_prefix(k.prefix)?.strip_suffix(k.suffix)?;
                (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| (n.parse::<u64>().ok(), name))
            })
            .max()
            .map(|(_, name)| name.to_string())
            .with_context(|| format!("no package named {}<N>{} in {}", k.prefix, k.suffix, self.what))?;
        let show = output_ok(self.cmd("apt-cache").args(["show", "--no-all-versions", &package]))
            .with_context(|| format!("apt-cache show {package} failed"))?;
        let version = show
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .with_context(|| format!("apt-cache show {package} printed no Version"))?
            .trim()
            .to_string();
        // ` pkg | version | URI suite/component arch Packages`
        let suite = output_ok(self.cmd("apt-cache").args(["madison", &package]))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('|').map(str::trim).collect();
                (f.len() == 3 && f[1] == version)
                    .then(|| f[2].split_whitespace().nth(1)?.split('/').next().map(String::from))?
            })
            .next()
            .unwrap_or_else(|| "?".to_string());
        Ok((package, version, suite))
    }

    /// `apt-get download PACKAGE=VERSION` into `dir`; the .deb's path.
    fn download(&self, package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        status(
            self.cmd("apt-get")
                .args(["-q", "-o", "APT::Sandbox::User=root", "download", &format!("{package}={version}")])
                .current_dir(dir),
        )?;
        fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb in {}", dir.display()))
    }
}

/// The `…/debian` and `…/debian-security` URIs of the machine's apt sources
/// (deb822 `.sources` and one-line `.list` files); deb.debian.org if none.
fn debian_archive_uris() -> (String, String) {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "sources" || e == "list"))
            .collect();
        more.sort();
        files.extend(more);
    }
    let mut uris = Vec::new();
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else { continue };
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(String::from));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // `deb [options] URI suite components`
                let rest = match rest.trim_start().strip_prefix('[') {
                    Some(r) => r.split_once(']').map_or("", |(_, after)| after),
                    None => rest,
                };
                uris.extend(rest.split_whitespace().next().map(String::from));
            }
        }
    }
    let clean = |u: &String| u.trim_end_matches('/').to_string();
    let main = uris.iter().map(clean).find(|u| u.ends_with("/debian"));
    let security = uris.iter().map(clean).find(|u| u.ends_with("/debian-security"));
    match (main, security) {
        (Some(m), Some(s)) => (m, s),
        (Some(m), None) => {
            let s = format!("{m}-security");
            (m, s)
        }
        (None, _) => {
            step("no …/debian URI in the machine's apt sources; using deb.debian.org for bullseye");
            ("http://deb.debian.org/debian".to_string(), "http://deb.debian.org/debian-security".to_string())
        }
    }
}

/// The kernel package `k` names today, downloaded and unpacked into
/// target/kernels/NAME/root (once per package version), with its modules
/// under /lib/modules.
fn ensure_kernel(root: &Path, k: &Kernel) -> Result<Image> {
    let dir = root.join("target/kernels").join(k.name);
    fs::create_dir_all(&dir)?;
    let apt = Apt::for_kernel(root, k)?;
    let stamp = dir.join("kernel.json");
    let mut updated = false;
    let img = loop {
        // Lists that are missing (a fresh private list) or stale (a package
        // gone from the mirror) get one apt-get update.
        let (package, version, suite) = match apt.resolve(k) {
            Ok(r) => r,
            Err(e) if !updated => {
                step(&format!("{e:#}; updating the package lists"));
                apt.update()?;
                updated = true;
                continue;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "cannot find the {} kernel package after apt-get update; the archive may have renamed it: \
                     update KERNELS in xtask/src/kernels.rs",
                    k.name
                )));
            }
        };
        let cached: Option<Value> = fs::read_to_string(&stamp).ok().and_then(|t| serde_json::from_str(&t).ok());
        if let Some(c) = cached.filter(|c| c["package"] == package.as_str() && c["version"] == version.as_str()) {
            let img = Image {
                package: package.clone(),
                version: version.clone(),
                suite: suite.clone(),
                release: c["release"].as_str().unwrap_or_default().to_string(),
                root: dir.join("root"),
            };
            if img.vmlinuz().is_file() {
                break img;
            }
        }
        step(&format!("kernel {}: downloading {package} {version} ({suite})", k.name));
        let deb = match apt.download(&package, &version, &dir.join("download")) {
            Ok(deb) => deb,
            Err(e) if !updated => {
                step(&format!("{e:#}; updating the package lists and retrying"));
                apt.update()?;
                updated = true;
                continue;
            }
            Err(e) => return Err(e.context(format!("downloading {package} {version} from {}", apt.what))),
        };
        let img = unpack(&dir, &deb, package, version, suite)?;
        fs::write(&stamp, serde_json::to_string_pretty(&img.to_json())? + "\n")?;
        let _ = fs::remove_dir_all(dir.join("download"));
        break img;
    };
    install_modules(&img)?;
    Ok(img)
}

fn unpack(dir: &Path, deb: &Path, package: String, version: String, suite: String) -> Result<Image> {
    let fresh = dir.join("root.new");
    let _ = fs::remove_dir_all(&fresh);
    status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&fresh))?;
    let release = fs::read_dir(fresh.join("boot"))
        .with_context(|| format!("{} has no /boot", deb.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("vmlinuz-").map(String::from))
        .next()
        .with_context(|| format!("{} has no boot/vmlinuz-*", deb.display()))?;
    if !fresh.join("lib/modules").join(&release).is_dir() {
        bail!("{} has no lib/modules/{release}", deb.display());
    }
    let _ = fs::remove_dir_all(dir.join("root"));
    fs::rename(&fresh, dir.join("root"))?;
    Ok(Image { package, version, suite, release, root: dir.join("root") })
}

/// virtme-ng's initramfs loads the 9p/virtio modules; the package's modules
/// go to /lib/modules/RELEASE (marked as ours, so that a newer build of the
/// same release replaces them, and a kernel installed by dpkg is left alone).
fn install_modules(img: &Image) -> Result<()> {
    let dest = Path::new("/lib/modules").join(&img.release);
    let marker = dest.join(".sigwake-kernels");
    let ours = format!("{} {}\n", img.package, img.version);
    let current = fs::read_to_string(&marker).ok();
    let copy = if !dest.exists() {
        true
    } else if current.as_deref() == Some(ours.as_str()) || current.is_none() {
        // Ours and current, or installed by someone else (dpkg): keep.
        false
    } else {
        fs::remove_dir_all(&dest).with_context(|| format!("removing the outdated {}", dest.display()))?;
        true
    };
    if copy {
        step(&format!("copying {}'s modules to {}", img.package, dest.display()));
        fs::create_dir_all("/lib/modules")?;
        status(Command::new("cp").arg("-a").arg(img.root.join("lib/modules").join(&img.release)).arg(&dest))?;
        fs::write(&marker, &ours)?;
    }
    if !dest.join("modules.dep").exists() {
        status(Command::new("depmod").arg(&img.release)).context("depmod failed (Debian package kmod)")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Test binaries
// ---------------------------------------------------------------------------

/// `cargo test -p sigwake-tests --no-run`: test target name → executable.
fn build_test_binaries(root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let out = cargo()
        .current_dir(root)
        .args(["test", "--package", "sigwake-tests", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the end-to-end test binaries failed ({})", out.status);
    }
    let mut exes = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let is_test = v["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (is_test, v["target"]["name"].as_str(), v["executable"].as_str()) {
            exes.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    Ok(exes)
}

/// Every test in [`SUBSET`] exists in its binary.
fn verify_subset(exes: &BTreeMap<String, PathBuf>) -> Result<()> {
    let binaries: BTreeSet<&str> = SUBSET.iter().map(|(b, _)| *b).collect();
    for bin in binaries {
        let exe = exes.get(bin).with_context(|| {
            format!(
                "the matrix's subset names test binary `{bin}`, which sigwake-tests does not build (has: {:?})",
                exes.keys()
            )
        })?;
        let list = output_ok(Command::new(exe).args(["--list", "--format", "terse"]))
            .with_context(|| format!("{} --list failed", exe.display()))?;
        let names: BTreeSet<&str> = list.lines().filter_map(|l| l.strip_suffix(": test")).collect();
        for (_, test) in SUBSET.iter().filter(|(b, _)| *b == bin) {
            if !names.contains(test) {
                bail!(
                    "the matrix's subset names `{bin}::{test}`, which does not exist (renamed?): update SUBSET in xtask/src/kernels.rs"
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// One row
// ---------------------------------------------------------------------------

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn run_row(
    root: &Path,
    k: &'static Kernel,
    image: Option<Image>,
    vm: Option<&VmTools>,
    python: &Path,
    built: &Built,
    limit: Duration,
) -> Result<Row> {
    let (exes, bench) = (&built.tests, built.bench.as_deref());
    // The work directory: the plan in, the results out. Its path is the
    // same in the guest (--rwdir maps it read-write at the same place).
    let w = root.join("target/kernels/run").join(k.name);
    let _ = fs::remove_dir_all(&w);
    fs::create_dir_all(&w)?;
    let scale = if image.is_some() { GUEST_TIME_SCALE } else { "1" };
    let host_path = std::env::var("PATH").unwrap_or_default();
    // The binaries just built, wherever CARGO_TARGET_DIR put them.
    let release = super::target_dir().join("release");
    let mut env: Vec<(&str, String)> = vec![
        ("SIGWAKE_BIN", release.join("sigwake").display().to_string()),
        ("SIGWAKE_PYTHON", python.display().to_string()),
        ("SIGWAKE_FIXTURES", root.join("tests/fixtures").display().to_string()),
        ("SIGWAKE_TOKIO_ACTOR", release.join("sigwake-tokio-actor").display().to_string()),
        ("SIGWAKE_TEST_TIME_SCALE", scale.to_string()),
        ("RUST_BACKTRACE", "1".to_string()),
        ("PATH", host_path.clone()),
        ("HOME", std::env::var("HOME").unwrap_or_else(|_| "/root".to_string())),
        ("LANG", "C.UTF-8".to_string()),
    ];
    if let Some(tier) = k.expect_tier {
        env.push(("SIGWAKE_EXPECT_TIER", tier.to_string()));
    }
    if let Some(bench) = bench {
        env.push(("SIGWAKE_BENCH", format!("{} --quick --only hot", bench.display())));
    }
    let plan_env: String = env.iter().map(|(k, v)| format!("export {k}={}\n", shell_quote(v))).collect();
    fs::write(w.join("plan.env"), plan_env)?;
    let mut plan = String::new();
    let binaries: Vec<&str> = SUBSET.iter().map(|(b, _)| *b).fold(Vec::new(), |mut acc, b| {
        if !acc.contains(&b) {
            acc.push(b);
        }
        acc
    });
    for bin in &binaries {
        let tests: Vec<&str> = SUBSET.iter().filter(|(b, _)| b == bin).map(|(_, t)| *t).collect();
        plan.push_str(&format!("{bin} {} {}\n", exes[*bin].display(), tests.join(" ")));
    }
    fs::write(w.join("plan.txt"), plan)?;

    let script = root.join("xtask/guest/run-matrix.sh");
    let console = w.join("console.log");
    let mut cmd = match (&image, vm) {
        (Some(img), Some(vm)) => {
            let mut c = Command::new(&vm.vng);
            c.arg("-v")
                .arg("-r")
                .arg(img.vmlinuz())
                .args(["--disable-kvm", "--user", "root", "--memory", "2G", "--cpus", "2"])
                .arg("--rwdir")
                .arg(&w)
                .arg("--")
                .arg(format!(
                    "sh {} {}",
                    shell_quote(&script.display().to_string()),
                    shell_quote(&w.display().to_string())
                ))
                .env("PATH", format!("{}:{}:{host_path}", dir_of(&vm.vng), dir_of(&vm.virtiofsd)));
            c
        }
        _ => {
            let mut c = Command::new("sh");
            c.arg(&script).arg(&w);
            c
        }
    };
    cmd.current_dir(&w);
    let t0 = Instant::now();
    let mut outcome = run_limited(&mut cmd, &console, limit)?;
    // Judge by the files the script wrote.
    let read = |p: &str| fs::read_to_string(w.join(p)).ok();
    // A guest kernel can panic while it boots under TCG, before anything
    // of ours runs (seen once on 6.12: an int3 in sched_clock_cpu while
    // CPU 1 came up). That says nothing about sigwake: boot it once more,
    // and keep the first console.
    if image.is_some() && read("uname").is_none() && fs::read_to_string(&console)?.contains("Kernel panic") {
        fs::rename(&console, w.join("console-boot1.log"))?;
        step(&format!(
            "kernel {}: the guest kernel panicked while booting, before the script (console-boot1.log); booting it \
             once more",
            k.name
        ));
        outcome = run_limited(&mut cmd, &console, limit)?;
    }
    let wall = t0.elapsed();
    let release = read("uname").map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let mut failures = Vec::new();
    if outcome.is_none() {
        failures.push(format!("timed out after {} s and was killed", limit.as_secs()));
    }
    if release.is_none() {
        failures.push(if image.is_some() {
            "the guest did not boot or did not start the script (no uname written)".to_string()
        } else {
            "the script did not start (no uname written)".to_string()
        });
    } else if read("done").is_none() && outcome.is_some() {
        failures.push("the script did not finish (no `done` written)".to_string());
    }

    let check = match (read("check.status"), read("check.json")) {
        (None, _) => Err("not run".to_string()),
        (Some(st), out) => {
            let st = st.trim().to_string();
            let out = out.unwrap_or_default();
            let parsed = serde_json::from_str::<Value>(out.trim()).ok().or_else(|| {
                out.lines().rev().find(|l| !l.trim().is_empty()).and_then(|l| serde_json::from_str(l).ok())
            });
            match parsed {
                Some(v) if st == "0" => Ok(v),
                _ => {
                    let err = read("check.err").unwrap_or_default();
                    // The error line if there is one (clap and anyhow say `error: …`), else the last line.
                    let lines: Vec<&str> = err.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                    let said = lines
                        .iter()
                        .find(|l| l.to_ascii_lowercase().starts_with("error"))
                        .or(lines.last())
                        .copied()
                        .unwrap_or("(nothing on stderr)");
                    Err(format!("exit status {st}: {}", short(said, 200)))
                }
            }
        }
    };
    if let (Err(e), Some(_)) = (&check, &release) {
        failures.push(format!("`sigwake check` {e}"));
    }

    let mut tests = Vec::new();
    let mut binaries_json = Vec::new();
    for bin in &binaries {
        let log = read(&format!("tests/{bin}.log")).unwrap_or_default();
        let st = read(&format!("tests/{bin}.status")).map(|s| s.trim().to_string());
        let secs = read(&format!("tests/{bin}.secs")).and_then(|s| s.trim().parse::<u64>().ok());
        binaries_json.push(json!({ "binary": bin, "status": st, "secs": secs }));
        for (b, test) in SUBSET.iter().filter(|(b, _)| b == bin) {
            let outcome = log
                .lines()
                .find_map(|l| l.strip_prefix(&format!("test {test} ... ")))
                .map_or("not run".to_string(), |o| o.trim().to_string());
            let why = if outcome == "FAILED" { panic_message(&log, test) } else { None };
            tests.push(TestResult { binary: b, test, outcome, why });
        }
    }
    let bad: Vec<String> = tests
        .iter()
        .filter(|t| t.outcome != "ok")
        .map(|t| match &t.why {
            Some(why) => format!("{}::{} ({}: {why})", t.binary, t.test, t.outcome),
            None => format!("{}::{} ({})", t.binary, t.test, t.outcome),
        })
        .collect();
    if !bad.is_empty() && release.is_some() {
        failures.push(format!(
            "{}/{} tests passed; not passed: {}",
            tests.len() - bad.len(),
            tests.len(),
            bad.join(", ")
        ));
    }
    // The console says why a guest did not boot or the script did not end;
    // a failed test says it in its own output (above).
    let finished = outcome.is_some() && read("done").is_some();
    let console_tail = if finished { String::new() } else { tail(&console, 15) };
    let bench = bench.map(|_| bench_ratios(&w));
    Ok(Row {
        kernel: k,
        image,
        release,
        check,
        tests,
        binaries: binaries_json,
        failures,
        console_tail,
        wall,
        workdir: w,
        bench,
    })
}

/// The bench's ratio for each of [`BENCH_FIGURES`] from the row's
/// bench.json (`1.015×` of `1.015× (+2.7 ns) [0.99–1.09, n=5]`), or why
/// there is none.
fn bench_ratios(w: &Path) -> std::result::Result<Vec<(&'static str, String)>, String> {
    let status = fs::read_to_string(w.join("bench.status")).map(|s| s.trim().to_string());
    let Ok(text) = fs::read_to_string(w.join("bench.json")) else {
        let log = tail(&w.join("bench.log"), 5);
        return Err(format!("no bench.json (exit status {}): {log}", status.unwrap_or_else(|_| "none".into())));
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("bench.json: {e}"))?;
    let rows = v["table"].as_array().ok_or("bench.json has no table")?;
    Ok(BENCH_FIGURES
        .iter()
        .map(|(col, figure)| {
            let ratio = rows
                .iter()
                .find(|r| r["figure"] == *figure)
                .and_then(|r| r["ratio"].as_str().or(r["value"].as_str()))
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("—")
                .to_string();
            (*col, ratio)
        })
        .collect())
}

/// Runs `cmd` with stdout and stderr into `log`; kills it and everything it
/// started (vng → virtme-run → qemu) after `limit`. None when it timed out.
fn run_limited(cmd: &mut Command, log: &Path, limit: Duration) -> Result<Option<ExitStatus>> {
    let f = fs::File::create(log)?;
    cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if t0.elapsed() > limit {
            kill_tree(child.id());
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILL to `pid` and all its descendants, found through /proc.
fn kill_tree(pid: u32) {
    let mut parent_of = BTreeMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.filter_map(|e| e.ok()) {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces.
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else { continue };
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if let Some(pp) = ppid {
                parent_of.insert(p, pp);
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|&(_, &pp)| pp == p).map(|(&c, _)| c));
        i += 1;
    }
    for p in tree.iter().rev() {
        // SAFETY: kill(2) with a pid we found and a valid signal number.
        unsafe {
            libc::kill(*p as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// `panicked at FILE:LINE:COL: first line of the message` for `test`, from
/// libtest's report (`thread 'TEST' (TID) panicked at …`, then the message).
fn panic_message(log: &str, test: &str) -> Option<String> {
    let head = format!("thread '{test}'");
    let mut lines = log.lines();
    let line = lines.find(|l| l.starts_with(&head) && l.contains(" panicked at "))?;
    let at = line.split_once(" panicked at ")?.1.trim_end_matches(':');
    let msg = lines.next().unwrap_or("").trim();
    Some(format!("panicked at {at}: {}", short(msg, 300)))
}

fn dir_of(p: &Path) -> String {
    p.parent().map(|d| d.display().to_string()).unwrap_or_default()
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { s.chars().take(n).collect::<String>() + "…" }
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn print_table(rows: &[Row], total: Duration) {
    let header = ["kernel", "uname -r", "hooks (sigwake check)", "tests", "verdict", "wall"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.kernel.name.to_string(),
                r.release.clone().unwrap_or_else(|| "-".to_string()),
                r.hooks().join("; "),
                format!("{}/{}", r.passed_tests(), r.tests.len()),
                if r.passed() { "passed".to_string() } else { "FAILED".to_string() },
                format!("{:.0} s", r.wall.as_secs_f64()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for c in &cells {
        for (w, s) in widths.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        c.iter().zip(widths).map(|(s, w)| format!("{s:<w$}")).collect::<Vec<_>>().join(" | ").trim_end().to_string()
    };
    println!();
    println!("{}", line(&header.map(String::from)));
    println!("{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-|-"));
    for c in &cells {
        println!("{}", line(c));
    }
    println!("total: {:.0} s ({:.1} min)", total.as_secs_f64(), total.as_secs_f64() / 60.0);
    for r in rows {
        if let Some(img) = &r.image {
            println!("{}: {} {} ({})", r.kernel.name, img.package, img.version, img.suite);
        }
    }
    print_bench(rows);
    for r in rows.iter().filter(|r| !r.passed()) {
        println!("\n{} FAILED ({}):", r.kernel.name, r.workdir.display());
        for f in &r.failures {
            println!("  - {f}");
        }
        if !r.console_tail.is_empty() {
            println!("  last lines of {}:", r.workdir.join("console.log").display());
            for l in r.console_tail.lines() {
                println!("    {l}");
            }
        }
    }
}

/// With --bench: each kernel's tier and hot-path ratios, as a Markdown table.
fn print_bench(rows: &[Row]) {
    let benched: Vec<&Row> = rows.iter().filter(|r| r.bench.is_some()).collect();
    if benched.is_empty() {
        return;
    }
    println!(
        "\nhot path in each kernel (sigwake-bench --quick --only hot: ns per call, ratio to the interleaved no-agent \
         baseline in the same kernel; guests run under QEMU without KVM)"
    );
    let cols: Vec<&str> = BENCH_FIGURES.iter().map(|(c, _)| *c).collect();
    println!("| kernel | tier | {} |", cols.join(" | "));
    println!("|---|---|{}", "---|".repeat(cols.len()));
    for r in benched {
        let tier = r.check.as_ref().ok().and_then(|c| c["tier"].as_str()).unwrap_or("-");
        match r.bench.as_ref().expect("benched") {
            Ok(ratios) => {
                let cells: Vec<&str> = ratios.iter().map(|(_, v)| v.as_str()).collect();
                println!("| {} | {tier} | {} |", r.kernel.name, cells.join(" | "));
            }
            Err(why) => println!("| {} | {tier} | no figures: {} |", r.kernel.name, short(why, 300)),
        }
    }
}

fn results_json(rows: &[Row], total: Duration) -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    json!({
        "generated_unix": now,
        "total_secs": total.as_secs_f64(),
        "guest_time_scale": GUEST_TIME_SCALE,
        "virtme_ng": VIRTME_NG_VERSION,
        "subset": SUBSET.iter().map(|(b, t)| json!({ "binary": b, "test": t })).collect::<Vec<_>>(),
        "kernels": rows.iter().map(|r| json!({
            "name": r.kernel.name,
            "series": r.kernel.series,
            "package": r.image.as_ref().map(Image::to_json),
            "release": r.release,
            "verdict": if r.passed() { "passed" } else { "failed" },
            "failures": r.failures,
            "check": match &r.check { Ok(v) => v.clone(), Err(e) => json!({ "error": e }) },
            "hooks": r.hooks(),
            "tests": r.tests.iter().map(|t| json!({ "binary": t.binary, "test": t.test, "outcome": t.outcome, "why": t.why })).collect::<Vec<_>>(),
            "passed": r.passed_tests(),
            "total": r.tests.len(),
            "binaries": r.binaries,
            "wall_secs": r.wall.as_secs_f64(),
            "console_tail": r.console_tail,
            "bench": match &r.bench {
                None => Value::Null,
                Some(Ok(ratios)) => ratios.iter().map(|(c, v)| (c.to_string(), json!(v))).collect::<serde_json::Map<_, _>>().into(),
                Some(Err(e)) => json!({ "error": e }),
            },
        })).collect::<Vec<_>>(),
    })
}

/// README.md's kernel table: only what is the same every time the same
/// kernels give the same results (no times, no dates).
fn readme_section(rows: &[Row]) -> String {
    // The exact package (its ABI number moves with Debian's security
    // updates) and `uname -r` are in target/kernels/results.json and the
    // printed table; here only what stays true until the code changes.
    let mut s =
        String::from("| kernel | from | hook per job (`sigwake check`) | end-to-end subset |\n|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.kernel.name,
            r.kernel.series,
            r.hooks().join("<br>"),
            r.result_word()
        ));
    }
    s
}

/// Replaces what is between the markers; true if that changed the file.
fn update_readme(readme: &Path, section: &str) -> Result<bool> {
    let text = fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let new = replace_section(&text, section).with_context(|| readme.display().to_string())?;
    if new == text {
        return Ok(false);
    }
    fs::write(readme, new).with_context(|| format!("writing {}", readme.display()))?;
    Ok(true)
}

fn replace_section(text: &str, section: &str) -> Result<String> {
    let (Some(b), Some(e)) = (text.find(README_BEGIN), text.find(README_END)) else {
        bail!("no `{README_BEGIN}` … `{README_END}` markers for the kernel table");
    };
    if e < b {
        bail!("`{README_END}` comes before `{README_BEGIN}`");
    }
    Ok(format!("{}{README_BEGIN}\n{section}{}", &text[..b], &text[e..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_between_the_markers_is_replaced_and_nothing_else() {
        let text = format!("intro\n{README_BEGIN}\nold row\n{README_END}\noutro\n");
        let new = replace_section(&text, "| a |\n").unwrap();
        assert_eq!(new, format!("intro\n{README_BEGIN}\n| a |\n{README_END}\noutro\n"));
        assert_eq!(replace_section(&new, "| a |\n").unwrap(), new, "a second run changes nothing");
        assert!(replace_section("no markers", "x").is_err());
        assert!(replace_section(&format!("{README_END}{README_BEGIN}"), "x").is_err());
    }

    #[test]
    fn a_failed_test_is_explained_by_its_panic() {
        let log = "test m::a ... FAILED\n\nfailures:\n\n---- a stdout ----\n\n\
                   thread 'a' (212) panicked at tests/tests/metrics.rs:35:5:\n\
                   the fixture should have dropped wakeups\nstack backtrace:\n";
        assert_eq!(
            panic_message(log, "a").as_deref(),
            Some("panicked at tests/tests/metrics.rs:35:5: the fixture should have dropped wakeups")
        );
        assert_eq!(panic_message(log, "b"), None);
    }
}
