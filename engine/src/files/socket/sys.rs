//! Raw socket calls and the `TCP_REPAIR` UAPI (`include/uapi/linux/tcp.h`):
//! option numbers, repair queues, `struct tcp_repair_opt` and
//! `struct tcp_repair_window`, socket addresses to and from `sockaddr`.
//! Each wrapper owns the fds it returns.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Socket options of `SOL_TCP` for repair mode.
pub const TCP_REPAIR: i32 = 19;
pub const TCP_REPAIR_QUEUE: i32 = 20;
pub const TCP_QUEUE_SEQ: i32 = 21;
pub const TCP_REPAIR_OPTIONS: i32 = 22;
pub const TCP_TIMESTAMP: i32 = 24;
pub const TCP_REPAIR_WINDOW: i32 = 29;

/// Values of `TCP_REPAIR`.
pub const TCP_REPAIR_ON: i32 = 1;
pub const TCP_REPAIR_OFF: i32 = 0;
/// Leave repair mode without sending a window probe.
#[allow(dead_code)]
pub const TCP_REPAIR_OFF_NO_WP: i32 = -1;

/// Values of `TCP_REPAIR_QUEUE`.
pub const TCP_NO_QUEUE: i32 = 0;
pub const TCP_RECV_QUEUE: i32 = 1;
pub const TCP_SEND_QUEUE: i32 = 2;

/// Option codes of `TCP_REPAIR_OPTIONS` (TCP header option kinds).
pub const TCPOPT_MAXSEG: u32 = 2;
pub const TCPOPT_WINDOW: u32 = 3;
pub const TCPOPT_SACK_PERM: u32 = 4;
pub const TCPOPT_TIMESTAMP: u32 = 8;

/// Bits of `tcp_info.tcpi_options`.
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;

/// `tcp_info.tcpi_state` values (`include/net/tcp_states.h`).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;

/// Queue-size ioctls: bytes not yet read, bytes not acknowledged (sent or
/// not), bytes never sent.
pub const SIOCINQ: libc::c_ulong = libc::FIONREAD;
pub const SIOCOUTQ: libc::c_ulong = libc::TIOCOUTQ;
pub const SIOCOUTQNSD: libc::c_ulong = 0x894b;

/// `struct tcp_repair_opt`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpRepairOpt {
    pub opt_code: u32,
    pub opt_val: u32,
}

/// `struct tcp_repair_window`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpRepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

const _: () = assert!(std::mem::size_of::<TcpRepairOpt>() == 8);
const _: () = assert!(std::mem::size_of::<TcpRepairWindow>() == 20);

/// Plain data a socket option may be read into or written from: every bit
/// pattern is a valid value.
///
/// # Safety
/// Implement only for `repr(C)` types without pointers, references or
/// niches.
pub unsafe trait Plain: Copy {}
// SAFETY: integers and repr(C) structs of integers.
unsafe impl Plain for i32 {}
unsafe impl Plain for TcpRepairWindow {}
unsafe impl Plain for libc::tcp_info {}
unsafe impl Plain for libc::linger {}
unsafe impl Plain for libc::timeval {}

/// `getsockopt(fd, level, opt)` into a `T`; fails if the kernel wrote fewer
/// bytes than `min_len`.
pub fn getsockopt<T: Plain>(
    fd: BorrowedFd<'_>,
    level: i32,
    opt: i32,
    min_len: usize,
) -> io::Result<T> {
    // SAFETY: T is Plain, so all-zero is a valid value.
    let mut v: T = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `v`, a valid local
    // of that size, and stores the length written into `len`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&mut v as *mut T).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < min_len {
        return Err(io::Error::other(format!(
            "getsockopt({level}, {opt}) returned {len} bytes, expected {min_len}"
        )));
    }
    Ok(v)
}

/// An int socket option.
pub fn get_int(fd: BorrowedFd<'_>, level: i32, opt: i32) -> io::Result<i32> {
    getsockopt::<i32>(fd, level, opt, 4)
}

/// `setsockopt(fd, level, opt, v)` with the bytes of `v`.
pub fn setsockopt<T: Plain>(fd: BorrowedFd<'_>, level: i32, opt: i32, v: &T) -> io::Result<()> {
    set_bytes(
        fd,
        level,
        opt,
        (v as *const T).cast(),
        std::mem::size_of_val(v),
    )
}

/// `setsockopt` with an array of `TCP_REPAIR_OPTIONS` entries.
pub fn set_repair_options(fd: BorrowedFd<'_>, opts: &[TcpRepairOpt]) -> io::Result<()> {
    set_bytes(
        fd,
        libc::SOL_TCP,
        TCP_REPAIR_OPTIONS,
        opts.as_ptr().cast(),
        std::mem::size_of_val(opts),
    )
}

/// An int socket option.
pub fn set_int(fd: BorrowedFd<'_>, level: i32, opt: i32, v: i32) -> io::Result<()> {
    setsockopt(fd, level, opt, &v)
}

fn set_bytes(
    fd: BorrowedFd<'_>,
    level: i32,
    opt: i32,
    ptr: *const libc::c_void,
    len: usize,
) -> io::Result<()> {
    // SAFETY: `ptr` points to `len` readable bytes (callers pass a
    // reference or a slice); the kernel only reads them.
    let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, opt, ptr, len as libc::socklen_t) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An ioctl that writes one int (`SIOCINQ`, `SIOCOUTQ`, `SIOCOUTQNSD`).
pub fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: these requests write one int into `n`, a valid local.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut n) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n)
    }
}

/// `recv(fd, buf, flags)`: bytes read.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `send(fd, buf, flags)`: bytes taken.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8], flags: i32) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `buf.len()` bytes of `buf`.
    let r = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `socket(domain, SOCK_STREAM | SOCK_CLOEXEC, 0)`.
pub fn tcp_socket(domain: i32) -> io::Result<OwnedFd> {
    socket(domain, libc::SOCK_STREAM)
}

/// `socket(domain, ty | SOCK_CLOEXEC, 0)`.
pub fn socket(domain: i32, ty: i32) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments; a new fd that nothing else owns, wrapped
    // exactly once.
    unsafe {
        let r = libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0);
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(r))
    }
}

/// `listen(fd, backlog)`.
pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::listen(fd.as_raw_fd(), backlog) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A socket address as the kernel takes it; `family` picks the form (an
/// IPv4 address in an `AF_INET6` socket becomes `::ffff:a.b.c.d`).
fn to_raw(addr: &SocketAddr, family: i32) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let v6 = |ip: Ipv6Addr, port: u16, flow: u32, scope: u32| libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: port.to_be(),
        sin6_flowinfo: flow,
        sin6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        sin6_scope_id: scope,
    };
    let len = match (addr, family) {
        (SocketAddr::V4(a), libc::AF_INET) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every
            // sockaddr type.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        (SocketAddr::V4(a), _) => {
            let sin6 = v6(a.ip().to_ipv6_mapped(), a.port(), 0, 0);
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
        (SocketAddr::V6(a), _) => {
            let sin6 = v6(*a.ip(), a.port(), a.flowinfo(), a.scope_id());
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A `sockaddr` the kernel wrote, as a `SocketAddr` (`None` for a family
/// other than IPv4 and IPv6).
fn from_raw(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `bind(fd, addr)` in the form of `family`.
pub fn bind(fd: BorrowedFd<'_>, addr: &SocketAddr, family: i32) -> io::Result<()> {
    let (ss, len) = to_raw(addr, family);
    // SAFETY: `ss` holds a valid sockaddr of `len` bytes; the kernel reads it.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `connect(fd, addr)` in the form of `family`.
pub fn connect(fd: BorrowedFd<'_>, addr: &SocketAddr, family: i32) -> io::Result<()> {
    let (ss, len) = to_raw(addr, family);
    // SAFETY: `ss` holds a valid sockaddr of `len` bytes; the kernel reads it.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `getsockname` (`peer`: `getpeername`); `None` for a family other than
/// IPv4 and IPv6. An IPv4-mapped IPv6 address stays IPv6.
pub fn name(fd: BorrowedFd<'_>, peer: bool) -> io::Result<Option<SocketAddr>> {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast();
    // SAFETY: the kernel writes at most `len` bytes into `ss`.
    let r = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(fd.as_raw_fd(), p, &mut len)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(from_raw(&ss))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn uapi_numbers_match_libc() {
        assert_eq!(TCP_REPAIR, libc::TCP_REPAIR);
        assert_eq!(TCP_QUEUE_SEQ, libc::TCP_QUEUE_SEQ);
        assert_eq!(TCP_REPAIR_OPTIONS, libc::TCP_REPAIR_OPTIONS);
        assert_eq!(TCP_TIMESTAMP, libc::TCP_TIMESTAMP);
        assert_eq!(TCP_REPAIR_WINDOW, libc::TCP_REPAIR_WINDOW);
        assert_eq!(SIOCOUTQNSD, libc::SIOCOUTQNSD);
    }

    /// A real loopback connection: repair mode reads what the kernel holds
    /// (queue sizes, sequence numbers, window) and is refused on a listener.
    #[test]
    fn repair_mode_on_a_loopback_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = l.local_addr().expect("addr");
        let c = std::net::TcpStream::connect(addr).expect("connect");
        let (s, _) = l.accept().expect("accept");
        use std::io::Write;
        (&c).write_all(b"hello").expect("write");
        // Wait until the data is in the server's receive queue.
        let mut got = 0;
        for _ in 0..1000 {
            got = ioctl_int(s.as_fd(), SIOCINQ).expect("SIOCINQ");
            if got == 5 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got, 5);
        let err = set_int(l.as_fd(), libc::SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");

        let fd = s.as_fd();
        set_int(fd, libc::SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON).expect("repair on");
        set_int(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).expect("queue");
        let rseq = get_int(fd, libc::SOL_TCP, TCP_QUEUE_SEQ).expect("seq");
        let mut buf = [0u8; 6];
        let n = recv(fd, &mut buf, libc::MSG_PEEK | libc::MSG_DONTWAIT).expect("peek");
        assert_eq!(&buf[..n], b"hello");
        // The client's send sequence is where the server's receive one is.
        let cfd = c.as_fd();
        set_int(cfd, libc::SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON).expect("repair on");
        set_int(cfd, libc::SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).expect("queue");
        let cseq = get_int(cfd, libc::SOL_TCP, TCP_QUEUE_SEQ).expect("seq");
        assert_eq!(cseq, rseq);
        let w: TcpRepairWindow =
            getsockopt(fd, libc::SOL_TCP, TCP_REPAIR_WINDOW, 20).expect("window");
        assert!(w.rcv_wnd > 0 && w.snd_wnd > 0, "{w:?}");
        assert_eq!(
            name(fd, false).expect("name"),
            Some(addr),
            "getsockname of the accepted socket"
        );
        for f in [fd, cfd] {
            set_int(f, libc::SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP).expect("repair off");
        }
    }
}
