//! Socket options every kind of IP socket carries: address reuse, buffer
//! sizes, type of service, `IPV6_V6ONLY`, timeouts, broadcast. The kinds
//! ([`super::tcp`], [`super::udp`]) add their own.

use super::sys::{self, get_int, set_int};
use ferry_protocol::net::{SocketOptions, AF_INET6};
use std::io;
use std::os::fd::BorrowedFd;

const SOL_SOCKET: i32 = libc::SOL_SOCKET;

fn timeout_us(fd: BorrowedFd<'_>, opt: i32) -> io::Result<u64> {
    let tv: libc::timeval = sys::getsockopt(fd, SOL_SOCKET, opt, 16)?;
    Ok(tv.tv_sec.max(0) as u64 * 1_000_000 + tv.tv_usec.max(0) as u64)
}

/// The common options of `fd` (the kind's own are left at their defaults).
pub fn read_common(fd: BorrowedFd<'_>, family: u16) -> io::Result<SocketOptions> {
    let v6 = family == AF_INET6;
    let flag = |level, opt| get_int(fd, level, opt).map(|v| v != 0);
    Ok(SocketOptions {
        reuseaddr: flag(SOL_SOCKET, libc::SO_REUSEADDR)?,
        reuseport: flag(SOL_SOCKET, libc::SO_REUSEPORT)?,
        sndbuf: get_int(fd, SOL_SOCKET, libc::SO_SNDBUF)?,
        rcvbuf: get_int(fd, SOL_SOCKET, libc::SO_RCVBUF)?,
        tos: if v6 {
            get_int(fd, libc::IPPROTO_IPV6, libc::IPV6_TCLASS)?
        } else {
            get_int(fd, libc::IPPROTO_IP, libc::IP_TOS)?
        },
        v6only: v6 && flag(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?,
        rcvtimeo_us: timeout_us(fd, libc::SO_RCVTIMEO)?,
        sndtimeo_us: timeout_us(fd, libc::SO_SNDTIMEO)?,
        broadcast: flag(SOL_SOCKET, libc::SO_BROADCAST)?,
        ..SocketOptions::default()
    })
}

/// Set the common options of `o` but `SO_REUSEADDR` (the kind sets it when
/// it fits) and `IPV6_V6ONLY` (which must come before bind: see
/// [`set_v6only`]).
pub fn write_common(fd: BorrowedFd<'_>, family: u16, o: &SocketOptions) -> io::Result<()> {
    set_int(fd, SOL_SOCKET, libc::SO_REUSEPORT, o.reuseport as i32)?;
    set_buffers(fd, o.sndbuf, o.rcvbuf)?;
    if family == AF_INET6 {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, o.tos)?;
    } else {
        set_int(fd, libc::IPPROTO_IP, libc::IP_TOS, o.tos)?;
    }
    for (opt, us) in [
        (libc::SO_RCVTIMEO, o.rcvtimeo_us),
        (libc::SO_SNDTIMEO, o.sndtimeo_us),
    ] {
        let tv = libc::timeval {
            tv_sec: (us / 1_000_000) as libc::time_t,
            tv_usec: (us % 1_000_000) as libc::suseconds_t,
        };
        sys::setsockopt(fd, SOL_SOCKET, opt, &tv)?;
    }
    set_int(fd, SOL_SOCKET, libc::SO_BROADCAST, o.broadcast as i32)
}

/// `IPV6_V6ONLY` of an IPv6 socket (a no-op for IPv4).
pub fn set_v6only(fd: BorrowedFd<'_>, family: u16, o: &SocketOptions) -> io::Result<()> {
    if family == AF_INET6 {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, o.v6only as i32)?;
    }
    Ok(())
}

/// Set `SO_SNDBUF`/`SO_RCVBUF` to what they read (`sndbuf`, `rcvbuf`):
/// the kernel doubles what is set and reports the doubled value; the FORCE
/// forms pass the limits of net.core.[rw]mem_max, as the program (or the
/// kernel's tuning) had it. 0 leaves a buffer as it is.
pub fn set_buffers(fd: BorrowedFd<'_>, sndbuf: i32, rcvbuf: i32) -> io::Result<()> {
    if sndbuf > 0 {
        set_int(fd, SOL_SOCKET, libc::SO_SNDBUFFORCE, sndbuf / 2)?;
    }
    if rcvbuf > 0 {
        set_int(fd, SOL_SOCKET, libc::SO_RCVBUFFORCE, rcvbuf / 2)?;
    }
    Ok(())
}
