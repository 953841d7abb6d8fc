//! Builds the kernel programs (`ebpf/`) for bpfel-unknown-none with
//! aya-build and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! `AYA_BUILD_SKIP=1` skips it (user-space checks without the BPF toolchain).
use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let skip = std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true");
    if skip {
        // Leave an empty object so the agent still compiles; the loader
        // refuses it with a clear error at run time.
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("sigwake"), b"").context("writing placeholder object")?;
    }
    if !skip && which::which("bpf-linker").is_err() {
        bail!(
            "bpf-linker is not on PATH, so the eBPF programs cannot be linked. \
             Run `cargo xtask setup` (it builds bpf-linker against rustc's own LLVM), \
             or set AYA_BUILD_SKIP=1 for a user-space-only build."
        );
    }
    // The programs need `-Z build-std=core`; this toolchain is stable, and
    // RUSTC_BOOTSTRAP=1 lets stable take it (DESIGN §3). Only the child
    // cargo that aya-build spawns sees it.
    // SAFETY: the build script is single-threaded here.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf");
    let root = root.canonicalize().context("locating the ebpf crate")?;
    let root = root.to_str().context("ebpf crate path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "sigwake-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Custom("stable"),
    )
}
