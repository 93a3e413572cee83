//! UDP sockets, both directions: the address a socket is bound to, the one
//! it is connected to, and its options. Datagrams queued at the checkpoint
//! are counted (peeked with `SO_PEEK_OFF`, so the process keeps them if it
//! runs on) but not carried: UDP allows loss, and the checkpoint says how
//! many were dropped.

use super::options;
use super::sys::{self, get_int, set_int};
use crate::{Error, Result};
use ferry_protocol::net::{UdpSocket, AF_INET, AF_INET6};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Most datagrams counted (beyond that the count says "at least").
const MAX_COUNTED: u32 = 1 << 20;

/// Read UDP socket `sock` (the agent's copy of `what`).
pub fn dump(sock: OwnedFd, what: &str) -> Result<UdpSocket> {
    let io_err = |op: &str, e: io::Error| Error::io(format!("{what}: {op}"), e);
    let fd = sock.as_fd();
    let family =
        match get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(|e| io_err("SO_DOMAIN", e))? {
            libc::AF_INET => AF_INET,
            _ => AF_INET6,
        };
    let options = options::read_common(fd, family).map_err(|e| io_err("reading its options", e))?;
    let bound = sys::name(fd, false)
        .map_err(|e| io_err("getsockname", e))?
        .filter(|a| a.port() != 0);
    let peer = match sys::name(fd, true) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => None,
        Err(e) => return Err(io_err("getpeername", e)),
    };
    let dropped = count_queued(fd).map_err(|e| io_err("counting queued datagrams", e))?;
    if dropped > 0 {
        tracing::warn!(
            "{what}: {dropped} datagrams queued at the checkpoint are not carried (UDP allows loss)"
        );
    }
    Ok(UdpSocket {
        family,
        bound,
        peer,
        options,
        dropped,
    })
}

/// Datagrams waiting in the receive queue, peeked one after the other
/// (`SO_PEEK_OFF` moves past each); the socket's own peek offset is put
/// back.
fn count_queued(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let saved = get_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF)?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)?;
    let mut n = 0;
    let mut buf = [0u8; 1];
    let counted = loop {
        if n == MAX_COUNTED {
            break Ok(n);
        }
        match sys::recv(
            fd,
            &mut buf,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC,
        ) {
            Ok(_) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break Ok(n),
            Err(e) => break Err(e),
        }
    };
    set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, saved)?;
    counted
}

/// Build UDP socket `s` (status flags `flags`) in the agent; `d` names it.
pub fn open(s: &UdpSocket, flags: u32, d: &str) -> Result<OwnedFd> {
    let domain = match s.family {
        AF_INET => libc::AF_INET,
        AF_INET6 => libc::AF_INET6,
        other => {
            return Err(Error::Incompatible(format!(
                "{d}: UDP socket of unsupported address family {other}"
            )))
        }
    };
    let at =
        |step: &'static str| move |e: io::Error| Error::io(format!("restoring {d}: {step}"), e);
    let sock = sys::socket(domain, libc::SOCK_DGRAM).map_err(at("socket"))?;
    let fd = sock.as_fd();
    options::set_v6only(fd, s.family, &s.options).map_err(at("IPV6_V6ONLY"))?;
    options::write_common(fd, s.family, &s.options).map_err(at("setting its options"))?;
    set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        s.options.reuseaddr as i32,
    )
    .map_err(at("SO_REUSEADDR"))?;
    if let Some(a) = &s.bound {
        sys::bind(fd, a, domain)
            .map_err(|e| Error::Incompatible(format!("{d}: cannot bind {a} again: {e}")))?;
    }
    if let Some(p) = &s.peer {
        sys::connect(fd, p, domain).map_err(at("connect"))?;
    }
    let status = flags as i32 & libc::O_NONBLOCK;
    if status != 0 {
        crate::files::sys::fcntl(fd, libc::F_SETFL, status).map_err(at("F_SETFL"))?;
    }
    Ok(sock)
}
