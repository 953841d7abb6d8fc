//! The signal restorer: the code a handler returns into, which calls
//! rt_sigreturn(2). glibc installs its `__restore_rt` as `sa_restorer` of
//! every handler it sets, so a uprobe there sees every handler return of
//! every process using that libc file, without a syscall hook.
//!
//! A process in a container uses its image's libc: another file, whose
//! restorer the agent meets only when the kernel reports a delivery to a
//! handler there (with its `sa_restorer`). [`in_process`] finds that code's
//! file, and hooks it only if the code really is a restorer (it calls
//! rt_sigreturn at once): the address comes from the process, and a uprobe
//! on, say, `memcpy` would slow every process on the host.

use std::{
    fs::File,
    io,
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::PathBuf,
};

/// Where a restorer is in a process's map: a file (by the path that
/// process sees) and the offset of the code in it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Restorer {
    path: PathBuf,
    offset: u64,
}

/// The restorer of this process's libc, read back from an installed
/// handler (the Rust runtime's SIGSEGV handler, set through glibc's
/// sigaction(2), which fills in `sa_restorer`), found and checked the way
/// any other process's is.
pub fn own() -> io::Result<Found> {
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
    in_process(std::process::id(), addr).map_err(|e| io::Error::other(e.to_string()))
}

/// The file and offset of `addr` in a /proc/PID/maps text, if it is in
/// an executable file mapping (`in_process` takes the two steps apart, to
/// tell a gone image from anonymous code).
#[cfg(test)]
fn locate(maps: &str, addr: u64) -> Option<Restorer> {
    mapping_holding(maps, addr).and_then(|line| file_code(line, addr))
}

/// The line of a /proc/PID/maps text whose range holds `addr` (mappings do
/// not overlap: at most one).
fn mapping_holding(maps: &str, addr: u64) -> Option<&str> {
    maps.lines().find(|line| {
        let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
        range.is_some_and(|(start, end)| {
            let (start, end) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16));
            matches!((start, end), (Ok(s), Ok(e)) if s <= addr && addr < e)
        })
    })
}

/// The file and offset of `addr` in its mapping's `line`, if that mapping
/// is executable and of a file some path still leads to.
fn file_code(line: &str, addr: u64) -> Option<Restorer> {
    let mut f = line.split_whitespace();
    let start = u64::from_str_radix(f.next()?.split_once('-')?.0, 16).ok()?;
    let perms = f.next()?;
    let offset = u64::from_str_radix(f.next()?, 16).ok()?;
    let path = f.nth(2)?;
    // One more field: " (deleted)", a file no path leads to any more.
    (perms.contains('x') && path.starts_with('/') && f.next().is_none())
        .then(|| Restorer { path: path.into(), offset: addr - start + offset })
}

/// The memory map of process `pid`; Gone when it has exited (or is a
/// zombie, whose map is empty).
fn maps_of(pid: u32) -> Result<String, NotHooked> {
    match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(maps) if maps.is_empty() => Err(NotHooked::Gone),
        Ok(maps) => Ok(maps),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => Err(NotHooked::Gone),
        Err(e) => Err(NotHooked::Maps(e)),
    }
}

/// Which file a restorer is in, as the kernel knows it (uprobes are per
/// inode): device, inode, and the offset in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RestorerKey {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
}

/// A restorer found in a process: its file, open (a uprobe is attached
/// through `/proc/self/fd/N`, so no path can be swapped in between the
/// check and the attach), checked to hold a restorer.
#[derive(Debug)]
pub struct Found {
    pub file: File,
    pub key: RestorerKey,
    /// The file's path as that process sees it (for the log).
    pub path: PathBuf,
}

/// Why a process's restorer is not hooked.
#[derive(Debug, thiserror::Error)]
pub enum NotHooked {
    /// The image that took the signal is gone: the process exited (or is
    /// a zombie, whose map is empty), or it exec'd since, and the address
    /// is in no mapping of the new image (a shell's child between fork
    /// and exec takes a SIGCHLD often). Nothing to hook, nothing to say:
    /// its next delivery names its new restorer.
    #[error("the process is gone")]
    Gone,
    #[error("cannot read its memory map: {0}")]
    Maps(io::Error),
    #[error("address {0:#x} is in no executable file mapping")]
    NoFile(u64),
    #[error("cannot open {path} through /proc/{pid}/root: {err}")]
    Open { pid: u32, path: PathBuf, err: io::Error },
    #[error("the code at {path}+{offset:#x} is not a signal restorer (it does not call rt_sigreturn at once)")]
    NotARestorer { path: PathBuf, offset: u64 },
}

/// The restorer at `addr` in process `pid` (a pid of the agent's own
/// namespace), its file opened through the process's root (a container's
/// libc is in its own mount namespace).
pub fn in_process(pid: u32, addr: u64) -> Result<Found, NotHooked> {
    let maps = maps_of(pid)?;
    // In no mapping at all: the image that took the signal is gone.
    let line = mapping_holding(&maps, addr).ok_or(NotHooked::Gone)?;
    // Anonymous or non-executable memory: code no uprobe can sit on.
    let Restorer { path, offset } = file_code(line, addr).ok_or(NotHooked::NoFile(addr))?;
    let file_path = PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(&path));
    let (file, meta) = open_checked(&file_path, offset).map_err(|e| match e {
        // Its /proc/PID/root went with it.
        Checked::Io(_) if matches!(maps_of(pid), Err(NotHooked::Gone)) => NotHooked::Gone,
        Checked::Io(err) => NotHooked::Open { pid, path: path.clone(), err },
        Checked::NotARestorer => NotHooked::NotARestorer { path: path.clone(), offset },
    })?;
    Ok(Found { file, key: RestorerKey { dev: meta.dev(), ino: meta.ino(), offset }, path })
}

enum Checked {
    Io(io::Error),
    NotARestorer,
}

/// Opens `path` and checks that it is a regular file with a restorer's
/// code at `offset`. The path is the process's to change after it mapped
/// the file (a bind mount in its own mount namespace): a FIFO there must
/// not block the agent (O_NONBLOCK), a symlink must not lead it elsewhere
/// (O_NOFOLLOW), and only a regular file is read.
fn open_checked(path: &std::path::Path, offset: u64) -> Result<(File, std::fs::Metadata), Checked> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(Checked::Io)?;
    let meta = file.metadata().map_err(Checked::Io)?;
    if !meta.is_file() {
        return Err(Checked::NotARestorer);
    }
    let mut code = [0u8; 9];
    let n = file.read_at(&mut code, offset).unwrap_or(0);
    if !is_restorer_code(&code[..n]) {
        return Err(Checked::NotARestorer);
    }
    Ok((file, meta))
}

/// Whether `code` starts with rt_sigreturn(2) called at once: x86_64's
/// `mov $15, %rax; syscall` (glibc's and musl's `__restore_rt`) or `mov
/// $15, %eax; syscall` (Go's), aarch64's `mov x8, #139; svc #0`.
pub fn is_restorer_code(code: &[u8]) -> bool {
    const X86_64_MOVQ: &[u8] = &[0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];
    const X86_64_MOVL: &[u8] = &[0xb8, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];
    const AARCH64: &[u8] = &[0x68, 0x11, 0x80, 0xd2, 0x01, 0x00, 0x00, 0xd4];
    if cfg!(target_arch = "aarch64") {
        code.starts_with(AARCH64)
    } else {
        code.starts_with(X86_64_MOVQ) || code.starts_with(X86_64_MOVL)
    }
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
    fn a_deleted_file_or_a_data_mapping_is_not_a_restorer_file() {
        let maps = "7f0000028000-7f00001bd000 r--p 00028000 08:01 123 /usr/lib/libc.so.6\n\
                    7f1000028000-7f10001bd000 r-xp 00028000 08:01 124 /tmp/libc.so.6 (deleted)\n";
        assert_eq!(locate(maps, 0x7f0000042de0), None);
        assert_eq!(locate(maps, 0x7f1000042de0), None);
    }

    #[test]
    fn this_process_has_a_restorer_in_a_file() {
        let r = own().expect("the test harness's libc restorer");
        // The file opened through /proc/self/root is the one at the path
        // the map names, and the offset is that of the code sigaction
        // reported.
        let meta = std::fs::metadata(&r.path).expect("the restorer's path exists");
        assert_eq!((r.key.dev, r.key.ino), (meta.dev(), meta.ino()), "{r:?}");
        // SAFETY: a query only, as in own().
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut old) }, 0);
        let addr = old.sa_restorer.map_or(0, |f| f as usize as u64);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert_eq!(locate(&maps, addr).map(|l| l.offset), Some(r.key.offset));
    }

    #[test]
    fn an_unmapped_address_is_a_gone_image_and_anonymous_code_is_said() {
        let me = std::process::id();
        // Below mmap_min_addr: in no mapping, as an exec'd process's old
        // libc address is.
        assert!(matches!(in_process(me, 0x1000), Err(NotHooked::Gone)));
        // SAFETY: a fresh anonymous mapping, unmapped below; nothing runs it.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        let r = in_process(me, page as u64 + 16);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(page, 4096) };
        assert!(matches!(r, Err(NotHooked::NoFile(_))), "{r:?}");
    }

    #[test]
    fn a_fifo_or_a_symlink_at_the_mapped_path_neither_blocks_nor_is_followed() {
        // What a process could put at its mapped file's path (a bind mount
        // in its own mount namespace): the look returns at once, refusing.
        let dir = std::env::temp_dir().join(format!("sigwake-restorer-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stub = dir.join("stub.so");
        std::fs::write(&stub, [0x48u8, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05]).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let link = dir.join("link.so");
        std::os::unix::fs::symlink(&stub, &link).unwrap();

        let started = std::time::Instant::now();
        assert!(matches!(open_checked(&fifo, 0), Err(Checked::NotARestorer)), "a FIFO is no restorer file");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "opening the FIFO blocked");
        assert!(
            matches!(open_checked(&link, 0), Err(Checked::Io(e)) if e.raw_os_error() == Some(libc::ELOOP)),
            "a symlink is not followed"
        );
        if cfg!(target_arch = "x86_64") {
            assert!(open_checked(&stub, 0).is_ok(), "the regular file with a restorer's code is");
            assert!(matches!(open_checked(&stub, 1), Err(Checked::NotARestorer)));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_code_that_calls_rt_sigreturn_at_once_is_a_restorer() {
        if cfg!(target_arch = "x86_64") {
            assert!(is_restorer_code(&[0x48, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05, 0x0f]));
            assert!(is_restorer_code(&[0xb8, 0x0f, 0, 0, 0, 0x0f, 0x05]));
            // mov $1 (write), a prologue, a short read.
            assert!(!is_restorer_code(&[0x48, 0xc7, 0xc0, 0x01, 0, 0, 0, 0x0f, 0x05]));
            assert!(!is_restorer_code(&[0x55, 0x48, 0x89, 0xe5]));
            assert!(!is_restorer_code(&[0x48, 0xc7, 0xc0]));
        }
        // A function that is not a restorer, in this very process's libc.
        let memcpy = libc::memcpy as *const () as usize as u64;
        assert!(matches!(in_process(std::process::id(), memcpy), Err(NotHooked::NotARestorer { .. })));
    }
}
