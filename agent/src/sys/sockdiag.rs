//! NETLINK_SOCK_DIAG for AF_UNIX, by hand (linux/unix_diag.h,
//! linux/sock_diag.h, linux/netlink.h). Every length in a reply is
//! bounds-checked; anything malformed gives `None`.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU32, Ordering};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_HDRLEN: usize = 16;
const UNIX_DIAG_REQ_LEN: usize = 24;
const UNIX_DIAG_MSG_LEN: usize = 16;

pub const SHOW_PEER: u32 = 0x04;
pub const SHOW_RQLEN: u32 = 0x10;
pub const SHOW_MEMINFO: u32 = 0x20;

const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_MEMINFO: u16 = 5;

/// Indices into the UNIX_DIAG_MEMINFO u32 array (SK_MEMINFO_*).
pub const MEMINFO_WMEM_ALLOC: usize = 2;
pub const MEMINFO_SNDBUF: usize = 3;

/// What the kernel told us about one AF_UNIX socket.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UnixDiag {
    pub ino: u32,
    pub sock_type: u8,
    pub state: u8,
    /// Inode of the peer (0: unconnected).
    pub peer: Option<u32>,
    /// (rqueue, wqueue): for a non-listening socket, bytes on its receive
    /// queue and its charged send memory (sk_wmem_alloc, truesize).
    pub rqlen: Option<(u32, u32)>,
    pub meminfo: Option<Vec<u32>>,
}

static SEQ: AtomicU32 = AtomicU32::new(1);

/// Looks up socket inode `ino`. Sockets belong to the network namespace
/// they were created in, and sock_diag only sees its own: if `pid` lives
/// in another netns, ask there first (a diag socket created in a thread
/// that joined the target's netns), then in ours.
pub fn query(pid: u32, ino: u32, show: u32) -> Option<UnixDiag> {
    if ino == 0 {
        return None;
    }
    if !same_netns(pid)
        && let Some(sock) = open_in_netns_of(pid)
        && let Some(d) = query_on(&sock, ino, show)
    {
        return Some(d);
    }
    query_on(&open_socket().ok()?, ino, show)
}

fn same_netns(pid: u32) -> bool {
    match (fs::metadata("/proc/self/ns/net"), fs::metadata(format!("/proc/{pid}/ns/net"))) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        // Cannot tell: querying our own netns is all we can do anyway.
        _ => true,
    }
}

fn open_in_netns_of(pid: u32) -> Option<OwnedFd> {
    let ns = fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
    // setns(CLONE_NEWNET) affects only the calling thread; a netlink
    // socket keeps the netns it was created in. A throwaway thread.
    std::thread::spawn(move || {
        // SAFETY: valid nsfd; the thread ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        open_socket().ok()
    })
    .join()
    .ok()
    .flatten()
}

fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
    // SAFETY: valid option pointer and length.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

/// nlmsghdr + struct unix_diag_req for an exact lookup of `ino`.
pub fn build_request(ino: u32, show: u32, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + UNIX_DIAG_REQ_LEN;
    let mut b = Vec::with_capacity(len);
    // struct nlmsghdr
    b.extend_from_slice(&(len as u32).to_ne_bytes()); // nlmsg_len
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
    b.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes()); // nlmsg_flags
    b.extend_from_slice(&seq.to_ne_bytes()); // nlmsg_seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    // struct unix_diag_req
    b.push(libc::AF_UNIX as u8); // sdiag_family
    b.push(0); // sdiag_protocol
    b.extend_from_slice(&0u16.to_ne_bytes()); // pad
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    b.extend_from_slice(&ino.to_ne_bytes()); // udiag_ino
    b.extend_from_slice(&show.to_ne_bytes()); // udiag_show
    // udiag_cookie: INET_DIAG_NOCOOKIE (~0U, ~0U) skips the cookie check.
    b.extend_from_slice(&u32::MAX.to_ne_bytes());
    b.extend_from_slice(&u32::MAX.to_ne_bytes());
    debug_assert_eq!(b.len(), len);
    b
}

fn query_on(sock: &OwnedFd, ino: u32, show: u32) -> Option<UnixDiag> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let req = build_request(ino, show, seq);
    // SAFETY: zeroed sockaddr_nl is valid; nl_pid 0 is the kernel.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid buffer and address.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent != req.len() as isize {
        return None;
    }
    let mut buf = vec![0u8; 16384];
    // A stray reply to an earlier (timed-out) request could be queued;
    // skip a few of those.
    for _ in 0..4 {
        // SAFETY: valid buffer of buf.len() bytes.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return None;
        }
        match parse_reply(&buf[..n as usize], seq, ino) {
            Reply::Found(d) => return Some(d),
            Reply::Failed => return None,
            Reply::Other => continue,
        }
    }
    None
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Found(UnixDiag),
    /// An error, or the end of the answer without our socket.
    Failed,
    /// Nothing for our request in this datagram.
    Other,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// Parses one datagram of netlink messages.
pub fn parse_reply(buf: &[u8], seq: u32, ino: u32) -> Reply {
    let mut off = 0usize;
    let mut saw_ours = false;
    while buf.len().saturating_sub(off) >= NLMSG_HDRLEN {
        let (Some(len), Some(ty), Some(mseq)) = (u32_at(buf, off), u16_at(buf, off + 4), u32_at(buf, off + 8)) else {
            return Reply::Failed;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() - off {
            return if saw_ours { Reply::Failed } else { Reply::Other };
        }
        let msg = &buf[off..off + len];
        off += align4(len);
        if mseq != seq {
            continue;
        }
        saw_ours = true;
        match ty as libc::c_int {
            libc::NLMSG_ERROR => {
                // struct nlmsgerr { int error; ... }: 0 is an ack.
                match u32_at(msg, NLMSG_HDRLEN) {
                    Some(0) => continue,
                    _ => return Reply::Failed,
                }
            }
            libc::NLMSG_DONE => return Reply::Failed,
            _ if ty == SOCK_DIAG_BY_FAMILY => {
                if let Some(d) = parse_unix_diag_msg(&msg[NLMSG_HDRLEN..])
                    && d.ino == ino
                {
                    return Reply::Found(d);
                }
            }
            _ => {}
        }
    }
    if saw_ours { Reply::Failed } else { Reply::Other }
}

/// struct unix_diag_msg followed by rtattr-framed attributes.
fn parse_unix_diag_msg(p: &[u8]) -> Option<UnixDiag> {
    if p.len() < UNIX_DIAG_MSG_LEN || p[0] != libc::AF_UNIX as u8 {
        return None;
    }
    let mut d = UnixDiag { ino: u32_at(p, 4)?, sock_type: p[1], state: p[2], ..Default::default() };
    let mut off = UNIX_DIAG_MSG_LEN;
    while p.len().saturating_sub(off) >= 4 {
        let alen = u16_at(p, off)? as usize;
        // NLA_F_NESTED / NLA_F_NET_BYTEORDER live in the top two bits.
        let aty = u16_at(p, off + 2)? & 0x3fff;
        if alen < 4 || alen > p.len() - off {
            break;
        }
        let payload = &p[off + 4..off + alen];
        match aty {
            UNIX_DIAG_PEER => d.peer = u32_at(payload, 0),
            UNIX_DIAG_RQLEN => {
                if let (Some(r), Some(w)) = (u32_at(payload, 0), u32_at(payload, 4)) {
                    d.rqlen = Some((r, w));
                }
            }
            UNIX_DIAG_MEMINFO => {
                d.meminfo =
                    Some(payload.chunks_exact(4).filter_map(|c| c.try_into().ok().map(u32::from_ne_bytes)).collect());
            }
            _ => {}
        }
        off += align4(alen);
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_diag_parser_rejects_garbage() {
        assert_eq!(parse_reply(&[], 1, 5), Reply::Other);
        assert_eq!(parse_reply(&[0xff; 7], 1, 5), Reply::Other);
        // nlmsg_len larger than the buffer.
        let mut b = vec![0u8; 16];
        b[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(parse_reply(&b, 1, 5), Reply::Other);
        // nlmsg_len smaller than a header.
        b[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(parse_reply(&b, 1, 5), Reply::Other);
        // A well-formed diag message whose attribute overruns: no panic,
        // attributes ignored.
        let mut m = Vec::new();
        let body_len = 16 + 16 + 8;
        m.extend_from_slice(&(body_len as u32).to_ne_bytes());
        m.extend_from_slice(&20u16.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&7u32.to_ne_bytes()); // seq
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[libc::AF_UNIX as u8, 1, 1, 0]);
        m.extend_from_slice(&5u32.to_ne_bytes()); // ino
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&200u16.to_ne_bytes()); // rta_len overruns
        m.extend_from_slice(&4u16.to_ne_bytes());
        m.extend_from_slice(&[1, 2, 3, 4]);
        match parse_reply(&m, 7, 5) {
            Reply::Found(d) => {
                assert_eq!(d.ino, 5);
                assert_eq!(d.rqlen, None);
            }
            other => panic!("{other:?}"),
        }
        // Wrong seq: not ours.
        assert_eq!(parse_reply(&m, 8, 5), Reply::Other);
        // Every truncation of a valid message must be handled without panic.
        for cut in 0..m.len() {
            let _ = parse_reply(&m[..cut], 7, 5);
        }
        let req = build_request(5, 0x10, 9);
        assert_eq!(req.len(), 40);
    }
}

#[cfg(test)]
mod tmp_bench {
    #[test]
    fn tmp_bench_query() {
        use std::os::unix::fs::MetadataExt;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let ino =
            std::fs::File::from(std::os::fd::OwnedFd::from(a.try_clone().unwrap())).metadata().unwrap().ino() as u32;
        let pid = std::process::id();
        let show = super::SHOW_PEER | super::SHOW_MEMINFO | super::SHOW_RQLEN;
        for _ in 0..200 {
            assert!(super::query(pid, ino, show).is_some());
        }
        for round in 0..3 {
            let t = std::time::Instant::now();
            for _ in 0..10_000 {
                assert!(super::query(pid, ino, show).is_some());
            }
            let el = t.elapsed();
            eprintln!(
                "BENCH round {round}: 10000 queries {:?} = {:.2} us/query",
                el,
                el.as_secs_f64() * 1e6 / 10_000.0
            );
        }
    }
}
