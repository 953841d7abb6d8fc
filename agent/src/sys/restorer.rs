//! The signal restorer: the code a handler returns into, which calls
//! rt_sigreturn(2). glibc installs its `__restore_rt` as `sa_restorer` of
//! every handler it sets, so a uprobe there sees every handler return of
//! every process using that libc file, without a syscall hook.

use std::{io, path::PathBuf};

/// Where a restorer is: a file and the offset of the code in it (what a
/// uprobe is attached to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restorer {
    pub path: PathBuf,
    pub offset: u64,
}

/// The restorer of this process's libc, read back from an installed
/// handler (the Rust runtime's SIGSEGV handler, set through glibc's
/// sigaction(2), which fills in `sa_restorer`).
pub fn own() -> io::Result<Restorer> {
    // SAFETY: a query only (no new action); `old` is plain data.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    if unsafe { libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = old.sa_restorer.map_or(0, |f| f as usize as u64);
    // SA_RESTORER (asm/signal.h): libc does not export it.
    const SA_RESTORER: libc::c_int = 0x0400_0000;
    if addr == 0 || old.sa_flags & SA_RESTORER == 0 {
        return Err(io::Error::other("no handler with a restorer is installed in this process"));
    }
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    locate(&maps, addr).ok_or_else(|| io::Error::other(format!("restorer {addr:#x} is in no file mapping")))
}

/// The file and offset of `addr` in a /proc/PID/maps text.
fn locate(maps: &str, addr: u64) -> Option<Restorer> {
    maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (start, end) = f.next()?.split_once('-')?;
        let (start, end) = (u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?);
        let _perms = f.next()?;
        let offset = u64::from_str_radix(f.next()?, 16).ok()?;
        let path = f.nth(2)?;
        (start <= addr && addr < end && path.starts_with('/'))
            .then(|| Restorer { path: path.into(), offset: addr - start + offset })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_located_in_its_file_mapping() {
        let maps = "7f0000000000-7f0000028000 r--p 00000000 08:01 123 /usr/lib/libc.so.6\n\
                    7f0000028000-7f00001bd000 r-xp 00028000 08:01 123 /usr/lib/libc.so.6\n";
        let r = locate(maps, 0x7f0000042de0).expect("in the text mapping");
        assert_eq!((r.path.to_str(), r.offset), (Some("/usr/lib/libc.so.6"), 0x42de0));
        assert_eq!(locate(maps, 0x1000), None);
    }

    #[test]
    fn this_process_has_a_restorer_in_a_file() {
        let r = own().expect("the test harness's libc restorer");
        assert!(r.path.exists(), "{r:?}");
    }
}
