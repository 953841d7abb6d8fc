use which::which;

/// Rebuild the programs when bpf-linker changes: it is not tracked by cargo
/// because it is a linker, not a dependency.
fn main() {
    // aya-build passes --cfg bpf_target_arch="..." when building the programs.
    println!(
        "cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"aarch64\", \"arm\", \"loongarch64\", \"mips\", \"mips64\", \"powerpc64\", \"riscv64\", \"s390x\", \"x86_64\"))"
    );
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
