//! Unix domain sockets, both directions: stream, datagram and seqpacket;
//! socketpairs and connections between processes of the tree; bound to a
//! path or an abstract name; listening; the messages waiting in each
//! receive queue, with their boundaries and (`SO_PASSCRED`) credentials.
//!
//! ```text
//!  checkpoint  classify    pidfd_getfd copy of the socket; sock_diag by inode
//!                          (state, name, peer inode, queue lengths); the receive
//!                          queue peeked with SO_PEEK_OFF (the process keeps it)
//!              finish      peer inodes become file ids; a peer outside the tree
//!                          is refused, named (path, @abstract or unnamed)
//!  restore     open_all    bound and listening sockets first; both ends in the
//!                          tree: socketpair; a datagram socket connected to a
//!                          bound one: connect; a closed peer: a pair whose other
//!                          end closes after the refill; every queue refilled
//!                          message by message from the end that sent it
//! ```
//!
//! Refused, each named: a listener with connections waiting to be accepted
//! (they cannot be read without accepting them), file descriptors in
//! flight (`SCM_RIGHTS`), a peer outside the tree, a name relative to the
//! working directory. Known differences after restore: an accepted socket
//! (which shows its listener's name) comes back unnamed; datagrams queued
//! on an unconnected socket come back from an unnamed sender.

use super::sys::{self as sock, get_int, set_int};
use super::unix_sys::{self, Diag};
use crate::{Error, Result};
use ferry_protocol::model::{FileId, FileKind, OpenFile};
use ferry_protocol::unix::{UnixMessage, UnixName, UnixSocket, UnixState, UnixType};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// `TCP_ESTABLISHED` and `TCP_LISTEN` as unix sockets use them.
const ESTABLISHED: u8 = 1;
const LISTEN: u8 = 10;
const CLOSE: u8 = 7;
/// `RCV_SHUTDOWN`, `SEND_SHUTDOWN`.
const RCV_SHUTDOWN: u8 = 1;
const SEND_SHUTDOWN: u8 = 2;

/// One unix socket seen at checkpoint.
struct Found {
    file: FileId,
    pid: i32,
    fd: i32,
    ino: u32,
    peer: u32,
    ty: UnixType,
    /// What `getpeername` said, to name a peer outside the tree.
    peer_name: Option<UnixName>,
}

/// The unix sockets of a tree being checkpointed, to join peers.
#[derive(Default)]
pub struct UnixCollector {
    found: Vec<Found>,
}

fn type_name(ty: UnixType) -> &'static str {
    match ty {
        UnixType::Stream => "stream",
        UnixType::Datagram => "datagram",
        UnixType::Seqpacket => "seqpacket",
    }
}

fn raw_type(ty: UnixType) -> i32 {
    match ty {
        UnixType::Stream => libc::SOCK_STREAM,
        UnixType::Datagram => libc::SOCK_DGRAM,
        UnixType::Seqpacket => libc::SOCK_SEQPACKET,
    }
}

/// A name in words: `path`, `@abstract` or "unnamed".
fn name_words(n: &Option<UnixName>) -> String {
    n.as_ref()
        .map_or_else(|| "unnamed".to_string(), ToString::to_string)
}

impl UnixCollector {
    /// If fd `fd` of `pid` (`link`, stat `md`) is a unix socket: its record,
    /// as open file `file`. `None` for a socket of another family.
    pub fn classify(
        &mut self,
        pid: i32,
        fd: i32,
        link: &str,
        md: &std::fs::Metadata,
        file: FileId,
    ) -> Result<Option<FileKind>> {
        let what = format!("fd {fd} of process {pid} ({link})");
        let io_err = |op: &str, e: io::Error| Error::io(format!("{what}: {op}"), e);
        let pidfd = crate::files::sys::pidfd_open(pid).map_err(|e| io_err("pidfd_open", e))?;
        let sock = crate::files::sys::pidfd_getfd(pidfd.as_fd(), fd)
            .map_err(|e| io_err("pidfd_getfd", e))?;
        let s = sock.as_fd();
        if get_int(s, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(|e| io_err("SO_DOMAIN", e))?
            != libc::AF_UNIX
        {
            return Ok(None);
        }
        let ty =
            match get_int(s, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|e| io_err("SO_TYPE", e))? {
                libc::SOCK_STREAM => UnixType::Stream,
                libc::SOCK_DGRAM => UnixType::Datagram,
                libc::SOCK_SEQPACKET => UnixType::Seqpacket,
                other => {
                    return Err(Error::UnsupportedFd {
                        pid,
                        fd,
                        kind: format!("a unix socket of type {other} ({link})"),
                    })
                }
            };
        let unsupported = |why: String| Error::UnsupportedFd {
            pid,
            fd,
            kind: format!("a unix {} socket {why} ({link})", type_name(ty)),
        };
        let ino = md.ino() as u32;
        let d = unix_sys::diag(ino).map_err(|e| io_err("sock_diag", e))?;
        if let Some(UnixName::Path(p)) = &d.name {
            if !p.starts_with('/') {
                return Err(unsupported(format!(
                    "bound to {p:?}, a path relative to the working directory at bind time"
                )));
            }
        }
        let state = match d.state {
            LISTEN => {
                if d.rqlen.0 > 0 {
                    return Err(unsupported(format!(
                        "listening on {} with {} connections waiting to be accepted (they cannot be \
                         read without accepting them; let the program accept them first)",
                        name_words(&d.name),
                        d.rqlen.0
                    )));
                }
                UnixState::Listening { backlog: d.rqlen.1 }
            }
            // A datagram socket others connected to shows ESTABLISHED too,
            // but has no peer of its own.
            ESTABLISHED
                if ty == UnixType::Datagram
                    && d.peer == 0
                    && unix_sys::peer_name(s)
                        .err()
                        .is_some_and(|e| e.raw_os_error() == Some(libc::ENOTCONN)) =>
            {
                UnixState::Unconnected
            }
            ESTABLISHED => UnixState::Connected { peer: None },
            CLOSE => UnixState::Unconnected,
            other => return Err(unsupported(format!("in state {other}"))),
        };
        // A connection whose other end is gone shows no peer and a full
        // shutdown; no peer without that is a connection not yet accepted.
        if state == (UnixState::Connected { peer: None })
            && ty != UnixType::Datagram
            && d.peer == 0
            && d.shutdown & 3 != 3
        {
            let at = unix_sys::peer_name(s).ok().flatten();
            return Err(unsupported(format!(
                "connected to {} (a connection not yet accepted there), outside the process tree",
                name_words(&at)
            )));
        }
        let passcred = get_int(s, libc::SOL_SOCKET, libc::SO_PASSCRED)
            .map_err(|e| io_err("SO_PASSCRED", e))?
            != 0;
        let sndbuf =
            get_int(s, libc::SOL_SOCKET, libc::SO_SNDBUF).map_err(|e| io_err("SO_SNDBUF", e))?;
        let rcvbuf =
            get_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF).map_err(|e| io_err("SO_RCVBUF", e))?;
        let queue = if matches!(state, UnixState::Listening { .. })
            || (ty != UnixType::Datagram && state == UnixState::Unconnected)
        {
            Vec::new()
        } else {
            match read_queue(s, ty, passcred, &d) {
                Ok(q) => q,
                Err(QueueError::Rights) => {
                    return Err(unsupported(format!(
                        "({}) with file descriptors in flight (SCM_RIGHTS) in its receive queue, \
                         which ferry cannot carry",
                        d.name
                            .as_ref()
                            .map_or_else(|| "unnamed".to_string(), |n| format!("bound to {n}"))
                    )))
                }
                Err(QueueError::Io(e)) => return Err(io_err("reading its receive queue", e)),
            }
        };
        self.found.push(Found {
            file,
            pid,
            fd,
            ino,
            peer: if matches!(state, UnixState::Connected { .. }) {
                d.peer
            } else {
                0
            },
            ty,
            peer_name: unix_sys::peer_name(s).ok().flatten(),
        });
        Ok(Some(FileKind::Unix {
            socket: Box::new(UnixSocket {
                ty,
                name: d.name,
                state,
                shutdown: d.shutdown & 3,
                queue,
                passcred,
                sndbuf,
                rcvbuf,
            }),
        }))
    }

    /// Join every connected socket to the open file of its peer; a peer
    /// outside the tree is refused, named.
    pub fn finish(&self, files: &mut [OpenFile]) -> Result<()> {
        let by_ino: HashMap<u32, FileId> = self.found.iter().map(|f| (f.ino, f.file)).collect();
        for f in self.found.iter().filter(|f| f.peer != 0) {
            let Some(&peer) = by_ino.get(&f.peer) else {
                let name = f
                    .peer_name
                    .clone()
                    .or_else(|| unix_sys::diag(f.peer).ok().and_then(|d| d.name));
                let addr = match name {
                    Some(n) => format!("{n}"),
                    None => format!("an unnamed socket (socket:[{}])", f.peer),
                };
                return Err(Error::UnsupportedFd {
                    pid: f.pid,
                    fd: f.fd,
                    kind: format!(
                        "a unix {} socket connected to {addr}, outside the process tree",
                        type_name(f.ty)
                    ),
                });
            };
            if let Some(OpenFile {
                kind: FileKind::Unix { socket },
                ..
            }) = files.iter_mut().find(|o| o.id == f.file)
            {
                socket.state = UnixState::Connected { peer: Some(peer) };
            }
        }
        Ok(())
    }
}

/// Why a receive queue could not be read.
enum QueueError {
    /// File descriptors in flight.
    Rights,
    Io(io::Error),
}

impl From<io::Error> for QueueError {
    fn from(e: io::Error) -> Self {
        QueueError::Io(e)
    }
}

/// The receive queue of `s`, peeked from offset 0 with `SO_PEEK_OFF` (the
/// socket's own offset is put back).
fn read_queue(
    s: BorrowedFd<'_>,
    ty: UnixType,
    passcred: bool,
    d: &Diag,
) -> std::result::Result<Vec<UnixMessage>, QueueError> {
    let saved = get_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF)?;
    set_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)?;
    let r = peek_all(s, ty, passcred, d);
    let back = set_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, saved);
    let q = r?;
    back?;
    Ok(q)
}

fn peek_all(
    s: BorrowedFd<'_>,
    ty: UnixType,
    passcred: bool,
    d: &Diag,
) -> std::result::Result<Vec<UnixMessage>, QueueError> {
    let mut buf = vec![0u8; 64 << 10];
    let mut out: Vec<UnixMessage> = Vec::new();
    let mut bytes = 0usize;
    let keep = |c| if passcred { c } else { None };
    if ty == UnixType::Stream {
        loop {
            let p = match unix_sys::peek(s, &mut buf, 0) {
                Ok(p) => p,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            };
            if p.rights {
                return Err(QueueError::Rights);
            }
            if p.len == 0 {
                break; // end of file: the peer is gone or shut down
            }
            let creds = keep(p.creds);
            match out.last_mut() {
                Some(m) if m.creds == creds => m.data.extend_from_slice(&buf[..p.len]),
                _ => out.push(UnixMessage {
                    data: buf[..p.len].to_vec(),
                    creds,
                }),
            }
            bytes += p.len;
            bound(bytes, out.len())?;
        }
        return Ok(out);
    }
    // Datagrams and records: with MSG_TRUNC, recvmsg says how much of the
    // current one is left; a piece that fits ends it.
    let mut cur: Option<UnixMessage> = None;
    loop {
        let p = match unix_sys::peek(s, &mut buf, libc::MSG_TRUNC) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && cur.is_none() => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) && cur.is_none() => break,
            Err(e) => return Err(e.into()),
        };
        if p.rights {
            return Err(QueueError::Rights);
        }
        // A seqpacket socket whose peer shut down reads 0 at the end.
        if p.len == 0
            && cur.is_none()
            && ty == UnixType::Seqpacket
            && d.shutdown & RCV_SHUTDOWN != 0
            && bytes >= d.rqlen.0 as usize
        {
            break;
        }
        let m = cur.get_or_insert_with(|| UnixMessage {
            data: Vec::new(),
            creds: keep(p.creds),
        });
        let piece = p.len.min(buf.len());
        m.data.extend_from_slice(&buf[..piece]);
        bytes += piece;
        if p.len <= buf.len() {
            out.extend(cur.take());
        }
        bound(bytes, out.len())?;
    }
    Ok(out)
}

fn bound(bytes: usize, n: usize) -> std::result::Result<(), QueueError> {
    use ferry_protocol::unix::{MAX_UNIX_MESSAGES, MAX_UNIX_QUEUE};
    if bytes > MAX_UNIX_QUEUE || n > MAX_UNIX_MESSAGES {
        return Err(QueueError::Io(io::Error::other(format!(
            "more than {MAX_UNIX_QUEUE} bytes or {MAX_UNIX_MESSAGES} messages queued"
        ))));
    }
    Ok(())
}

// ------------------------------------------------------------- restore

/// Build every unix socket of `files` in the agent; `d` names each.
pub fn open_all(
    files: &[&OpenFile],
    d: &dyn Fn(&OpenFile) -> String,
) -> Result<Vec<(FileId, OwnedFd)>> {
    let sock_of = |f: &OpenFile| match &f.kind {
        FileKind::Unix { socket } => Some(socket.as_ref().clone()),
        _ => None,
    };
    let all: Vec<(&OpenFile, UnixSocket)> = files
        .iter()
        .filter_map(|f| sock_of(f).map(|s| (*f, s)))
        .collect();
    let by_id: HashMap<FileId, &UnixSocket> = all.iter().map(|(f, s)| (f.id, s)).collect();
    // How many sockets hold each name (an accepted socket shares its
    // listener's: it cannot be bound again).
    let mut names: HashMap<&UnixName, usize> = HashMap::new();
    for (_, s) in &all {
        if let Some(n) = &s.name {
            *names.entry(n).or_default() += 1;
        }
    }
    fn own<'a>(names: &HashMap<&UnixName, usize>, s: &'a UnixSocket) -> Option<&'a UnixName> {
        s.name.as_ref().filter(|n| names.get(n) == Some(&1))
    }
    let own_name = |s| own(&names, s);
    let mut fds: HashMap<FileId, OwnedFd> = HashMap::new();
    // Writers for queues whose sender is no longer there, closed at the end.
    let mut orphans: HashMap<FileId, OwnedFd> = HashMap::new();

    // Bound, listening and unconnected sockets first: others connect to them.
    for (f, s) in all
        .iter()
        .filter(|(_, s)| !matches!(s.state, UnixState::Connected { .. }))
    {
        let at = |step: &str| {
            let w = format!("restoring {}: {step}", d(f));
            move |e: io::Error| Error::io(w, e)
        };
        let fd = sock::socket(libc::AF_UNIX, raw_type(s.ty)).map_err(at("socket"))?;
        set_options(fd.as_fd(), s).map_err(at("setting its options"))?;
        if let Some(n) = own_name(s) {
            bind_again(fd.as_fd(), n, s.ty, &d(f))?;
        }
        if let UnixState::Listening { backlog } = s.state {
            sock::listen(fd.as_fd(), backlog as i32).map_err(at("listen"))?;
        }
        fds.insert(f.id, fd);
    }
    // Both ends in the tree (or the other end closed): a socketpair.
    for (f, s) in &all {
        let UnixState::Connected { peer } = s.state else {
            continue;
        };
        if fds.contains_key(&f.id) {
            continue;
        }
        let mutual = peer.filter(|p| {
            by_id.get(p).is_some_and(|ps| {
                ps.state == UnixState::Connected { peer: Some(f.id) } && !fds.contains_key(p)
            })
        });
        if peer.is_some() && mutual.is_none() {
            continue; // connected to a bound socket: below
        }
        let at = |step: &str| {
            let w = format!("restoring {}: {step}", d(f));
            move |e: io::Error| Error::io(w, e)
        };
        let (a, b) = unix_sys::socketpair(raw_type(s.ty)).map_err(at("socketpair"))?;
        set_options(a.as_fd(), s).map_err(at("setting its options"))?;
        if let Some(n) = own_name(s) {
            bind_again(a.as_fd(), n, s.ty, &d(f))?;
        }
        match mutual {
            Some(p) => {
                if let Some(ps) = by_id.get(&p) {
                    set_options(b.as_fd(), ps).map_err(at("setting its peer's options"))?;
                    if let Some(n) = own_name(ps) {
                        bind_again(b.as_fd(), n, ps.ty, &d(f))?;
                    }
                }
                fds.insert(p, b);
            }
            None => {
                let big = s
                    .queue
                    .iter()
                    .map(|m| m.data.len() * 2 + 1024)
                    .sum::<usize>();
                super::options::set_buffers(b.as_fd(), (big.max(1 << 16)) as i32 * 2, 0)
                    .map_err(at("sizing the writer of its queue"))?;
                orphans.insert(f.id, b);
            }
        }
        fds.insert(f.id, a);
    }
    // Datagram sockets connected to a bound socket of the tree.
    for (f, s) in &all {
        let UnixState::Connected { peer: Some(p) } = s.state else {
            continue;
        };
        if fds.contains_key(&f.id) {
            continue;
        }
        let target = by_id
            .get(&p)
            .and_then(|ps| ps.name.as_ref())
            .ok_or_else(|| {
                Error::Incompatible(format!(
                    "{}: connected to open file {p}, which has no name to connect to",
                    d(f)
                ))
            })?;
        let at = |step: &str| {
            let w = format!("restoring {}: {step}", d(f));
            move |e: io::Error| Error::io(w, e)
        };
        let fd = sock::socket(libc::AF_UNIX, raw_type(s.ty)).map_err(at("socket"))?;
        set_options(fd.as_fd(), s).map_err(at("setting its options"))?;
        if let Some(n) = own_name(s) {
            bind_again(fd.as_fd(), n, s.ty, &d(f))?;
        }
        unix_sys::connect(fd.as_fd(), target).map_err(at(&format!("connect to {target}")))?;
        fds.insert(f.id, fd);
    }
    // Refill every queue from the end that sent it.
    for (f, s) in &all {
        if s.queue.is_empty() {
            continue;
        }
        let (writer, to): (OwnedFd, Option<&UnixName>) = match s.state {
            UnixState::Connected { peer: None } => (dup(orphans.get(&f.id), f, d)?, None),
            UnixState::Connected { peer: Some(p) }
                if by_id
                    .get(&p)
                    .is_some_and(|ps| ps.state == UnixState::Connected { peer: Some(f.id) }) =>
            {
                (dup(fds.get(&p), f, d)?, None)
            }
            UnixState::Connected { peer: Some(p) } => {
                // Only its peer may send to it, by its name.
                let name = s.name.as_ref().ok_or_else(|| {
                    Error::Incompatible(format!(
                        "{}: datagrams queued on an unnamed socket connected to open file {p}",
                        d(f)
                    ))
                })?;
                (dup(fds.get(&p), f, d)?, Some(name))
            }
            _ => {
                let name = s.name.as_ref().ok_or_else(|| {
                    Error::Incompatible(format!(
                        "{}: datagrams queued on an unnamed unconnected socket",
                        d(f)
                    ))
                })?;
                let w = sock::socket(libc::AF_UNIX, raw_type(s.ty))
                    .map_err(|e| Error::io(format!("restoring {}: a writer", d(f)), e))?;
                (w, Some(name))
            }
        };
        refill(writer.as_fd(), to, s, &d(f))?;
    }
    drop(orphans);
    // Shutdowns and status flags.
    let mut out = Vec::with_capacity(all.len());
    for (f, s) in &all {
        let fd = fds
            .remove(&f.id)
            .ok_or_else(|| Error::parse("image", format!("{} was not rebuilt", d(f))))?;
        let at = |step: &str| {
            let w = format!("restoring {}: {step}", d(f));
            move |e: io::Error| Error::io(w, e)
        };
        let peer_gone = s.state == UnixState::Connected { peer: None };
        if !peer_gone || s.ty == UnixType::Datagram {
            for (bit, how) in [
                (SEND_SHUTDOWN, libc::SHUT_WR),
                (RCV_SHUTDOWN, libc::SHUT_RD),
            ] {
                if s.shutdown & bit != 0 {
                    unix_sys::shutdown(fd.as_fd(), how).map_err(at("shutdown"))?;
                }
            }
        }
        let status = f.flags as i32 & libc::O_NONBLOCK;
        if status != 0 {
            crate::files::sys::fcntl(fd.as_fd(), libc::F_SETFL, status).map_err(at("F_SETFL"))?;
        }
        out.push((f.id, fd));
    }
    Ok(out)
}

fn dup(fd: Option<&OwnedFd>, f: &OpenFile, d: &dyn Fn(&OpenFile) -> String) -> Result<OwnedFd> {
    fd.ok_or_else(|| Error::parse("image", format!("{}: its peer was not rebuilt", d(f))))?
        .try_clone()
        .map_err(|e| Error::io(format!("restoring {}: dup", d(f)), e))
}

/// `SO_PASSCRED` and the buffer sizes of `s`.
fn set_options(fd: BorrowedFd<'_>, s: &UnixSocket) -> io::Result<()> {
    super::options::set_buffers(fd, s.sndbuf, s.rcvbuf)?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_PASSCRED, s.passcred as i32)
}

/// Bind `fd` to `name` again. A socket file already at the path is
/// removed only if it is a socket nobody listens on (what a checkpointed
/// process leaves behind); anything else there is an error.
fn bind_again(fd: BorrowedFd<'_>, name: &UnixName, ty: UnixType, d: &str) -> Result<()> {
    if let UnixName::Path(p) = name {
        if let Ok(md) = std::fs::symlink_metadata(p) {
            if !md.file_type().is_socket() {
                return Err(Error::Incompatible(format!(
                    "{d}: cannot bind {p} again: something other than a socket is there"
                )));
            }
            let probe = sock::socket(libc::AF_UNIX, raw_type(ty))
                .map_err(|e| Error::io(format!("restoring {d}: probing {p}"), e))?;
            match unix_sys::connect(probe.as_fd(), name) {
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    std::fs::remove_file(p).map_err(|e| {
                        Error::io(format!("restoring {d}: removing the stale socket {p}"), e)
                    })?;
                }
                _ => {
                    return Err(Error::Incompatible(format!(
                        "{d}: cannot bind {p} again: another socket is in use there"
                    )))
                }
            }
        }
    }
    unix_sys::bind(fd, name)
        .map_err(|e| Error::Incompatible(format!("{d}: cannot bind {name} again: {e}")))
}

/// Send the queued messages of `s` from `writer` (to `to`, or its peer).
fn refill(writer: BorrowedFd<'_>, to: Option<&UnixName>, s: &UnixSocket, d: &str) -> Result<()> {
    for (i, m) in s.queue.iter().enumerate() {
        let mut creds = m.creds.filter(|c| c.pid > 0);
        let mut at = 0;
        loop {
            match unix_sys::send(writer, &m.data[at..], to, creds) {
                Ok(n) => at += n,
                Err(e) if creds.is_some() && matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EPERM)) => {
                    tracing::warn!(
                        "{d}: message {i} cannot carry its credentials (pid {}) here: {e}; it carries the agent's",
                        creds.map_or(0, |c| c.pid)
                    );
                    creds = None;
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    return Err(Error::Incompatible(format!(
                        "{d}: the receive queue is full after {i} of its {} messages (net.unix.max_dgram_qlen \
                         or the buffer sizes are smaller here)",
                        s.queue.len()
                    )))
                }
                Err(e) => {
                    return Err(Error::io(format!("restoring {d}: refilling message {i}"), e))
                }
            }
            if at >= m.data.len() || s.ty != UnixType::Stream {
                break;
            }
        }
    }
    Ok(())
}
