//! Raw socket calls the announcements need (libc has the types, no crate
//! wraps packet sockets and raw ICMPv6 sends), and setns for the guards.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A socket(2), owned.
pub fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with integer arguments; a non-negative result is a
    // new descriptor that nothing else owns.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// setsockopt(2) with an int value.
pub fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value points to a live c_int of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// sendto(2) of `buf` to the socket address `addr` (a `sockaddr_*`).
pub fn sendto<A>(fd: &OwnedFd, buf: &[u8], addr: &A) -> io::Result<()> {
    // SAFETY: buf and addr are live for the call, with their true sizes;
    // A is one of libc's sockaddr structs.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (addr as *const A).cast(),
            std::mem::size_of::<A>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(io::Error::other(format!("sent {n} of {} bytes", buf.len())));
    }
    Ok(())
}

/// bind(2) to the socket address `addr` (a `sockaddr_*`).
pub fn bind<A>(fd: &OwnedFd, addr: &A) -> io::Result<()> {
    // SAFETY: addr is live for the call with its true size; A is one of
    // libc's sockaddr structs.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (addr as *const A).cast(),
            std::mem::size_of::<A>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Move the calling thread into the network namespace `ns` (an open
/// /proc/…/ns/net).
pub fn setns_net(ns: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: setns(2) on an open namespace fd; it changes only the calling
    // thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
