//! `cargo xtask lint`: the checks that keep the code base as it is —
//! formatting (`cargo fmt --check`, rustfmt.toml) and clippy with warnings
//! as errors on every user-space crate and its tests. The eBPF crate is
//! left out of clippy: it builds only for the BPF target, through
//! agent/build.rs, which clippy on the agent runs anyway.

use anyhow::{Context as _, Result};

use crate::{cargo, status, step, workspace_root};

pub fn run() -> Result<()> {
    let root = workspace_root();
    step("cargo fmt --check");
    status(cargo().current_dir(&root).args(["fmt", "--all", "--check"]))
        .context("formatting differs from rustfmt.toml: run `cargo fmt --all` and commit the result")?;
    step("cargo clippy -D warnings");
    status(cargo().current_dir(&root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "sigwake-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found warnings: fix them (or, where a lint is wrong here, #[expect] it with a reason)")
}
