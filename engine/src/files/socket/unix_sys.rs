//! Raw calls for unix domain sockets: the `NETLINK_SOCK_DIAG` query of one
//! socket by inode (`include/uapi/linux/unix_diag.h`), `sockaddr_un` to and
//! from a [`UnixName`], `socketpair`, and `recvmsg`/`sendmsg` with the
//! ancillary data unix sockets carry (`SCM_RIGHTS`, `SCM_CREDENTIALS`).

use ferry_protocol::unix::{UnixCreds, UnixName};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `NETLINK_SOCK_DIAG`.
const NETLINK_SOCK_DIAG: i32 = 4;
/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `UDIAG_SHOW_*`.
const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UDIAG_SHOW_ICONS: u32 = 0x8;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
/// `UNIX_DIAG_*` attributes.
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// `struct unix_diag_req`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UnixDiagReq {
    family: u8,
    protocol: u8,
    pad: u16,
    states: u32,
    ino: u32,
    show: u32,
    cookie: [u32; 2],
}

/// `struct nlmsghdr` + `struct unix_diag_req`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    req: UnixDiagReq,
}

/// What sock_diag says about one unix socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diag {
    /// `TCP_ESTABLISHED` (1), `TCP_CLOSE` (7), `TCP_LISTEN` (10), ...
    pub state: u8,
    pub name: Option<UnixName>,
    /// Inode of the peer (0: none, or closed).
    pub peer: u32,
    /// Receive queue (listener: connections waiting) and send queue
    /// (listener: backlog).
    pub rqlen: (u32, u32),
    /// A listener's waiting connections: the inodes of their peers.
    pub icons: Vec<u32>,
    /// `sk_shutdown`.
    pub shutdown: u8,
}

/// Query sock_diag about the unix socket with inode `ino` (in the
/// agent's network namespace). `ENOENT`: no such unix socket.
pub fn diag(ino: u32) -> io::Result<Diag> {
    // SAFETY: integer arguments; the new fd is wrapped once.
    let nl = unsafe {
        let r = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        );
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(r)
    };
    let req = Request {
        len: std::mem::size_of::<Request>() as u32,
        ty: SOCK_DIAG_BY_FAMILY,
        flags: libc::NLM_F_REQUEST as u16,
        seq: 1,
        pid: 0,
        req: UnixDiagReq {
            family: libc::AF_UNIX as u8,
            protocol: 0,
            pad: 0,
            states: u32::MAX,
            ino,
            show: UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN,
            cookie: [u32::MAX; 2],
        },
    };
    // SAFETY: `req` is a plain repr(C) value of `len` bytes; the kernel
    // only reads it (the address is the kernel, all-zero but the family).
    let r = unsafe {
        let mut to: libc::sockaddr_nl = std::mem::zeroed();
        to.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            nl.as_raw_fd(),
            (&req as *const Request).cast(),
            req.len as usize,
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse(&buf[..n as usize], ino)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parse the answer to a [`diag`] request.
fn parse(b: &[u8], ino: u32) -> io::Result<Diag> {
    let bad = |what: &str| io::Error::other(format!("sock_diag answer for inode {ino}: {what}"));
    let len = u32_at(b, 0).ok_or_else(|| bad("short"))? as usize;
    let ty = u16_at(b, 4).ok_or_else(|| bad("short"))?;
    let msg = b.get(..len).ok_or_else(|| bad("truncated"))?;
    if ty == libc::NLMSG_ERROR as u16 {
        let e = u32_at(msg, 16).ok_or_else(|| bad("short error"))? as i32;
        return Err(io::Error::from_raw_os_error(-e));
    }
    if ty != SOCK_DIAG_BY_FAMILY {
        return Err(bad(&format!("message type {ty}")));
    }
    // nlmsghdr (16) + unix_diag_msg (16: family, type, state, pad, ino, cookie).
    let state = *msg.get(18).ok_or_else(|| bad("short"))?;
    let mut d = Diag {
        state,
        ..Diag::default()
    };
    let mut at = 32;
    while at + 4 <= msg.len() {
        let alen = u16_at(msg, at).ok_or_else(|| bad("attribute"))? as usize;
        let aty = u16_at(msg, at + 2).ok_or_else(|| bad("attribute"))? & 0x3fff;
        if alen < 4 {
            return Err(bad("attribute length"));
        }
        let val = msg.get(at + 4..at + alen).ok_or_else(|| bad("attribute"))?;
        match aty {
            UNIX_DIAG_NAME => d.name = name_from_path_bytes(val),
            UNIX_DIAG_PEER => d.peer = u32_at(val, 0).ok_or_else(|| bad("peer"))?,
            UNIX_DIAG_ICONS => {
                d.icons = val
                    .chunks_exact(4)
                    .filter_map(|c| c.try_into().ok().map(u32::from_ne_bytes))
                    .collect()
            }
            UNIX_DIAG_RQLEN => {
                d.rqlen = (
                    u32_at(val, 0).ok_or_else(|| bad("rqlen"))?,
                    u32_at(val, 4).ok_or_else(|| bad("rqlen"))?,
                )
            }
            UNIX_DIAG_SHUTDOWN => d.shutdown = *val.first().ok_or_else(|| bad("shutdown"))?,
            _ => {}
        }
        at += (alen + 3) & !3;
    }
    Ok(d)
}

/// The name in the bytes of a `sun_path` (abstract if it starts with NUL;
/// a path ends at its first NUL).
fn name_from_path_bytes(p: &[u8]) -> Option<UnixName> {
    match p.split_first() {
        None => None,
        Some((0, rest)) => Some(UnixName::Abstract(rest.to_vec())),
        Some(_) => {
            let end = p.iter().position(|&c| c == 0).unwrap_or(p.len());
            Some(UnixName::Path(
                String::from_utf8_lossy(&p[..end]).into_owned(),
            ))
        }
    }
}

/// A `sockaddr_un` for `name`.
fn to_raw(name: &UnixName) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes: Vec<u8> = match name {
        UnixName::Path(p) => p.as_bytes().to_vec(),
        UnixName::Abstract(n) => std::iter::once(0).chain(n.iter().copied()).collect(),
    };
    if bytes.len() >= sa.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in sa.sun_path.iter_mut().zip(&bytes) {
        *d = *s as libc::c_char;
    }
    let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    let extra = usize::from(matches!(name, UnixName::Path(_)));
    Ok((sa, (base + bytes.len() + extra) as libc::socklen_t))
}

/// `bind` or `connect` (same signature) of `fd` to `name`.
fn with_name(
    fd: BorrowedFd<'_>,
    name: &UnixName,
    call: unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int,
) -> io::Result<()> {
    let (sa, len) = to_raw(name)?;
    // SAFETY: `call` is bind or connect; `sa` is a valid sockaddr_un of
    // `len` bytes that outlives the call.
    let r = unsafe {
        call(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `bind(fd, name)`.
pub fn bind(fd: BorrowedFd<'_>, name: &UnixName) -> io::Result<()> {
    with_name(fd, name, libc::bind)
}

/// `connect(fd, name)`.
pub fn connect(fd: BorrowedFd<'_>, name: &UnixName) -> io::Result<()> {
    with_name(fd, name, libc::connect)
}

/// `getpeername(fd)`: the name of the socket `fd` is connected to (`None`:
/// unnamed).
pub fn peer_name(fd: BorrowedFd<'_>) -> io::Result<Option<UnixName>> {
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `sa`.
    let r = unsafe {
        libc::getpeername(
            fd.as_raw_fd(),
            (&mut sa as *mut libc::sockaddr_un).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    let n = (len as usize).saturating_sub(base).min(sa.sun_path.len());
    let bytes: Vec<u8> = sa.sun_path[..n].iter().map(|&c| c as u8).collect();
    Ok(name_from_path_bytes(&bytes))
}

/// `socketpair(AF_UNIX, ty | SOCK_CLOEXEC)`.
pub fn socketpair(ty: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut sv = [-1; 2];
    // SAFETY: the kernel writes two fds into `sv`, each wrapped once.
    unsafe {
        if libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])))
    }
}

/// `shutdown(fd, how)`.
pub fn shutdown(fd: BorrowedFd<'_>, how: i32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    if unsafe { libc::shutdown(fd.as_raw_fd(), how) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What one [`peek`] saw.
pub struct Peeked {
    /// What `recvmsg` returned (with `MSG_TRUNC`, a datagram's remaining
    /// length).
    pub len: usize,
    pub creds: Option<UnixCreds>,
    /// File descriptors were in flight (`SCM_RIGHTS`, or control data cut
    /// short).
    pub rights: bool,
}

/// `recvmsg(fd, buf, MSG_PEEK | MSG_DONTWAIT | extra)` with room for
/// ancillary data; fds in flight that the peek duplicated are closed.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8], extra: i32) -> io::Result<Peeked> {
    let mut ctl = vec![0u64; 1024];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.as_mut_ptr().cast();
    msg.msg_controllen = ctl.len() * 8;
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC | extra;
    // SAFETY: `msg` points at `iov` (over `buf`) and `ctl`, both alive and
    // of the sizes given; the kernel writes within them.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Peeked {
        len: n as usize,
        creds: None,
        rights: msg.msg_flags & libc::MSG_CTRUNC != 0,
    };
    // SAFETY: the CMSG macros walk the control buffer the kernel filled
    // (`msg_controllen` was updated to what it wrote); each data read is
    // within its cmsg's length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            let dlen = (*c).cmsg_len as usize - (data as usize - c as usize);
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                out.rights = true;
                for i in 0..dlen / 4 {
                    let fd = std::ptr::read_unaligned(data.cast::<i32>().add(i));
                    drop(OwnedFd::from_raw_fd(fd));
                }
            } else if (*c).cmsg_level == libc::SOL_SOCKET
                && (*c).cmsg_type == libc::SCM_CREDENTIALS
                && dlen >= std::mem::size_of::<libc::ucred>()
            {
                let u = std::ptr::read_unaligned(data.cast::<libc::ucred>());
                out.creds = Some(UnixCreds {
                    pid: u.pid,
                    uid: u.uid,
                    gid: u.gid,
                });
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(out)
}

/// `sendmsg(fd, data)` to `to` (or the peer), with `creds` as
/// `SCM_CREDENTIALS` if given; `MSG_DONTWAIT | MSG_NOSIGNAL`. Bytes sent.
pub fn send(
    fd: BorrowedFd<'_>,
    data: &[u8],
    to: Option<&UnixName>,
    creds: Option<UnixCreds>,
) -> io::Result<usize> {
    let addr = to.map(to_raw).transpose()?;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut ctl = [0u64; 8];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some((sa, len)) = &addr {
        msg.msg_name = (sa as *const libc::sockaddr_un) as *mut libc::c_void;
        msg.msg_namelen = *len;
    }
    if let Some(c) = creds {
        let u = libc::ucred {
            pid: c.pid,
            uid: c.uid,
            gid: c.gid,
        };
        // SAFETY: `ctl` (64 bytes) holds one cmsg of a ucred (12 bytes of
        // data, 32 with its header); the macros write within it.
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32) as usize;
            msg.msg_control = ctl.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_CREDENTIALS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::ucred>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::ucred>(), u);
        }
    }
    // SAFETY: `msg` points at live `iov` (over `data`), `addr` and `ctl`;
    // the kernel only reads them.
    let n = unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    fn ino(fd: BorrowedFd<'_>) -> u32 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .expect("stat")
            .ino() as u32
    }

    #[test]
    fn diag_finds_the_peer_and_the_queue() {
        let (a, b) = socketpair(libc::SOCK_STREAM).expect("pair");
        assert_eq!(send(a.as_fd(), b"hello", None, None).expect("send"), 5);
        let d = diag(ino(b.as_fd())).expect("diag");
        assert_eq!(d.state, 1);
        assert_eq!(d.peer, ino(a.as_fd()));
        assert_eq!(d.rqlen.0, 5);
        assert_eq!(d.name, None);
        let e = diag(1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }

    #[test]
    fn names_round_trip_through_bind_and_diag() {
        let name = UnixName::Abstract(format!("ferry-sys-{}", std::process::id()).into_bytes());
        let s = super::super::sys::socket(libc::AF_UNIX, libc::SOCK_DGRAM).expect("socket");
        bind(s.as_fd(), &name).expect("bind");
        assert_eq!(diag(ino(s.as_fd())).expect("diag").name, Some(name));
    }
}
