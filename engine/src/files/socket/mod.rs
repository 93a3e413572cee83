//! Sockets, both directions, one module per kind: [`tcp`] (listening,
//! closed and established TCP over IPv4 and IPv6), [`udp`] (bound and
//! connected UDP; queued datagrams are counted, not carried), [`unix`]
//! (unix domain sockets, dispatched before [`classify`] by the file
//! collector), with the options they share in [`options`]. Every other
//! kind of socket (netlink, raw, packet) is refused, named.
//!
//! ```text
//!  checkpoint  classify(pid, fd)   pidfd_getfd: the agent's copy is the
//!                 target's socket; SO_DOMAIN/SO_TYPE/SO_PROTOCOL pick the kind
//!              tcp::dump           an established socket goes into TCP_REPAIR
//!                 and is held in the tree's RepairSet
//!              FrozenTree::kill    the copies close: the sockets stay in repair
//!                 mode until the process is gone (no FIN, no RST)
//!              FrozenTree::thaw /  every held socket leaves repair mode: the
//!                 a failure          connection goes on
//!  restore     open_all            the agent builds each socket (listeners
//!                 first, so that connections on their port bind after them)
//! ```

pub mod options;
pub(crate) mod sys;
pub mod tcp;
#[cfg(test)]
mod tests;
pub mod udp;
pub mod unix;
pub(crate) mod unix_sys;
#[cfg(test)]
mod unix_tests;

use crate::{Error, Result};
use ferry_protocol::model::{FileId, FileKind, OpenFile};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// Sockets of a frozen tree that a checkpoint put into repair mode (the
/// agent's copies). Shared between the [`super::FileCollector`] that fills
/// it and the frozen tree that decides their fate; if neither decides (the
/// last handle is dropped), they leave repair mode.
#[derive(Clone, Default)]
pub struct RepairSet {
    held: Arc<Mutex<Held>>,
}

/// The copies, each with what names it in messages.
#[derive(Default)]
struct Held(Vec<(OwnedFd, String)>);

impl Drop for Held {
    fn drop(&mut self) {
        leave_all(&mut self.0);
    }
}

/// Take every socket of `held` out of repair mode (the connection goes on;
/// a window probe tells the peer so).
fn leave_all(held: &mut Vec<(OwnedFd, String)>) {
    for (fd, what) in held.drain(..) {
        if let Err(e) = tcp::leave_repair(fd.as_fd()) {
            tracing::error!("{what}: cannot leave TCP repair mode: {e}");
        }
    }
}

impl RepairSet {
    fn with<R>(&self, f: impl FnOnce(&mut Vec<(OwnedFd, String)>) -> R) -> R {
        let mut g = match self.held.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut g.0)
    }

    /// Keep `fd` (a copy of a socket now in repair mode).
    pub(crate) fn hold(&self, fd: OwnedFd, what: String) {
        self.with(|h| h.push((fd, what)));
    }

    /// How many sockets are held in repair mode.
    pub fn len(&self) -> usize {
        self.with(|h| h.len())
    }

    /// True if no socket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The checkpoint failed or the tree goes on: every held socket leaves
    /// repair mode.
    pub fn leave(&self) {
        self.with(leave_all);
    }

    /// The checkpoint took over (the tree is killed): drop the copies and
    /// leave the sockets in repair mode, so that closing them sends nothing.
    pub fn close_in_repair(&self) {
        self.with(|h| h.clear());
    }
}

/// `socket:[...]` fd `fd` of `pid`: what kind of socket it is, and its
/// state if ferry can rebuild it.
pub fn classify(pid: i32, fd: i32, link: &str, repair: &RepairSet) -> Result<FileKind> {
    let io = |op: &str, e: std::io::Error| {
        Error::io(format!("fd {fd} of process {pid} ({link}): {op}"), e)
    };
    let pidfd = super::sys::pidfd_open(pid).map_err(|e| io("pidfd_open", e))?;
    let sock = super::sys::pidfd_getfd(pidfd.as_fd(), fd).map_err(|e| io("pidfd_getfd", e))?;
    let (domain, ty, proto) = kind_of(sock.as_fd()).map_err(|e| io("getsockopt", e))?;
    let unsupported = |kind: String| Error::UnsupportedFd { pid, fd, kind };
    let inet = domain == libc::AF_INET || domain == libc::AF_INET6;
    if inet && ty == libc::SOCK_STREAM && proto == libc::IPPROTO_TCP {
        let what = format!("fd {fd} of process {pid} ({link})");
        let socket = tcp::dump(sock, (pid, fd), &what, repair)?;
        return Ok(FileKind::Tcp {
            socket: Box::new(socket),
        });
    }
    if inet && ty == libc::SOCK_DGRAM && proto == libc::IPPROTO_UDP {
        let what = format!("fd {fd} of process {pid} ({link})");
        let socket = udp::dump(sock, &what)?;
        return Ok(FileKind::Udp {
            socket: Box::new(socket),
        });
    }
    Err(unsupported(format!(
        "{} ({link})",
        describe_kind(domain, ty, proto)
    )))
}

/// `(SO_DOMAIN, SO_TYPE, SO_PROTOCOL)` of a socket.
fn kind_of(fd: BorrowedFd<'_>) -> std::io::Result<(i32, i32, i32)> {
    Ok((
        sys::get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?,
        sys::get_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)?,
        sys::get_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)?,
    ))
}

/// A socket kind in words, for refusals.
fn describe_kind(domain: i32, ty: i32, proto: i32) -> String {
    let ty_name = match ty {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        libc::SOCK_RAW => "raw",
        _ => "other",
    };
    match domain {
        libc::AF_UNIX => format!("a unix {ty_name} socket"),
        libc::AF_INET | libc::AF_INET6 => {
            let v = if domain == libc::AF_INET {
                "IPv4"
            } else {
                "IPv6"
            };
            match (ty, proto) {
                (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => format!("a UDP socket ({v})"),
                (libc::SOCK_RAW, _) => format!("a raw {v} socket (protocol {proto})"),
                _ => format!("an {v} {ty_name} socket of protocol {proto}"),
            }
        }
        libc::AF_NETLINK => format!("a netlink socket (protocol {proto})"),
        libc::AF_PACKET => "a packet socket".to_string(),
        _ => format!("a socket of address family {domain} ({ty_name})"),
    }
}

/// Build every socket of `files` in the agent, listeners first; returns
/// the agent's fd for each, in repair mode no more.
pub fn open_all(
    files: &[&OpenFile],
    describe: &dyn Fn(&OpenFile) -> String,
) -> Result<Vec<(FileId, OwnedFd)>> {
    let (unix, files): (Vec<&OpenFile>, Vec<&OpenFile>) = files
        .iter()
        .partition(|f| matches!(f.kind, FileKind::Unix { .. }));
    let mut order: Vec<&OpenFile> = files.to_vec();
    order.sort_by_key(|f| match &f.kind {
        FileKind::Tcp { socket } => tcp::restore_rank(socket),
        _ => 3,
    });
    let mut out = Vec::with_capacity(order.len());
    for f in order {
        let d = describe(f);
        let fd = match &f.kind {
            FileKind::Tcp { socket } => tcp::open(socket, f.flags, &d)?,
            FileKind::Udp { socket } => udp::open(socket, f.flags, &d)?,
            _ => return Err(Error::parse("image", format!("{d} is not a socket"))),
        };
        out.push((f.id, fd));
    }
    out.extend(unix::open_all(&unix, describe)?);
    Ok(out)
}
