#![no_std]
// Present so the agent's build-dependency on this crate has a library
// target to depend on; the programs live in the `sigwake` binary target.
