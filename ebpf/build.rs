use which::which;

/// Rebuild the programs when bpf-linker changes: it is not tracked by cargo
/// because it is a linker, not a dependency.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
