//! An empty program on a raw tracepoint: the floor of any hook there.
//!
//! The socket tier's cost on an AF_UNIX send is the tracepoint's dispatch
//! plus its program's body. An empty program (`r0 = 0; exit`) attached to
//! the same tracepoint costs the dispatch alone, so the bench measures it
//! as a state of its own: what no program on that hook, however short,
//! can go below on this kernel and machine. bpftrace cannot attach raw
//! tracepoints before 0.18 (Debian 12 has 0.17), so this loads it with two
//! bpf(2) calls.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// The head of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills
/// what a shorter attr leaves out.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `union bpf_attr` for BPF_RAW_TRACEPOINT_OPEN.
#[repr(C)]
struct RawTracepointOpen {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

/// Attached while alive; closing the link fd detaches it.
pub struct EmptyRawTracepoint {
    _link: OwnedFd,
    _prog: OwnedFd,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a valid `union bpf_attr` prefix of the size passed;
    // the kernel reads (and for some commands writes) only that much.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as libc::c_uint) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a successful BPF_PROG_LOAD/RAW_TRACEPOINT_OPEN returns a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl EmptyRawTracepoint {
    pub fn attach(tracepoint: &str) -> Result<EmptyRawTracepoint> {
        // `mov r0, 0` and `exit`, little-endian instruction words.
        let insns: [u64; 2] = [0xb7, 0x95];
        let license = CString::new("GPL").expect("no NUL");
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"empty");
        let mut load = ProgLoad {
            prog_type: BPF_PROG_TYPE_RAW_TRACEPOINT,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
        };
        let prog = bpf(BPF_PROG_LOAD, &mut load).context("loading an empty raw tracepoint program")?;
        let tp = CString::new(tracepoint).context("tracepoint name")?;
        let mut open = RawTracepointOpen { name: tp.as_ptr() as u64, prog_fd: prog.as_raw_fd() as u32, _pad: 0 };
        let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut open)
            .with_context(|| format!("attaching an empty program to the raw tracepoint {tracepoint}"))?;
        Ok(EmptyRawTracepoint { _link: link, _prog: prog })
    }
}
