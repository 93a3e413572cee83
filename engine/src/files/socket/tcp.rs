//! TCP sockets, both directions.
//!
//! Checkpoint reads a listener's address and backlog, a closed socket's
//! address, and an established connection through `TCP_REPAIR` (queues
//! with their sequence numbers, MSS, window scale, SACK, timestamps, the
//! window), with the options the program may have set. The connection
//! stays in repair mode (held in a [`RepairSet`]); its whole send queue is
//! first counted as sent without being transmitted, so that the kernel
//! cannot send new data once the checkpoint has read it.
//!
//! Restore follows the order the kernel enforces: socket, options,
//! `TCP_REPAIR` on, bind, `TCP_QUEUE_SEQ` of both queues (the sequences
//! where the queues *start*), `TCP_MAXSEG`, connect (no SYN in repair mode),
//! `TCP_REPAIR_OPTIONS` (before anything is queued), `TCP_TIMESTAMP`, the
//! receive queue, the sent-but-unacknowledged part of the send queue,
//! `TCP_REPAIR_WINDOW`, repair off (a window probe), `SO_REUSEADDR`, then
//! the never-sent tail of the send queue is sent normally.
//!
//! Not yet: half-closed connections (FIN_WAIT*, CLOSE_WAIT, ...) and
//! connections still being opened are refused naming their state; a
//! listener with connections waiting to be accepted is refused.

use super::options::{self, set_buffers};
use super::sys::{self, get_int, set_int};
use super::RepairSet;
use crate::{Error, Result};
use ferry_protocol::net::{
    SocketOptions, TcpConnection, TcpSocket, TcpState, TcpWindow, AF_INET, AF_INET6,
};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

const SOL_TCP: i32 = libc::SOL_TCP;
const SOL_SOCKET: i32 = libc::SOL_SOCKET;
/// Largest `TCP_MAXSEG` the kernel takes (`MAX_TCP_WINDOW`).
const MAX_USER_MSS: u32 = 32767;
/// Chunk the receive queue is refilled in (halved on `ENOMEM`).
const RECV_CHUNK: usize = 256 << 10;

/// Name of a `tcpi_state`.
fn state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "an unknown state",
    }
}

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // Up to tcpi_sacked (the listener's backlog) at least.
    sys::getsockopt(fd, SOL_TCP, libc::TCP_INFO, 32)
}

/// Read socket `sock` (the agent's copy of `what`). An established
/// connection is left in repair mode, held in `repair`.
pub fn dump(
    sock: OwnedFd,
    (pid, fdnum): (i32, i32),
    what: &str,
    repair: &RepairSet,
) -> Result<TcpSocket> {
    let io_err = |op: &str, e: io::Error| Error::io(format!("{what}: {op}"), e);
    let refuse = |kind: String| Error::UnsupportedFd {
        pid,
        fd: fdnum,
        kind,
    };
    let fd = sock.as_fd();
    let family =
        match get_int(fd, SOL_SOCKET, libc::SO_DOMAIN).map_err(|e| io_err("SO_DOMAIN", e))? {
            libc::AF_INET => AF_INET,
            libc::AF_INET6 => AF_INET6,
            other => return Err(refuse(format!("a TCP socket of address family {other}"))),
        };
    let options = read_options(fd, family).map_err(|e| io_err("reading its options", e))?;
    let info = tcp_info(fd).map_err(|e| io_err("TCP_INFO", e))?;
    let local = || {
        sys::name(fd, false)
            .map_err(|e| io_err("getsockname", e))?
            .ok_or_else(|| Error::parse(format!("{what}: getsockname"), "not an IP address"))
    };
    let state = match info.tcpi_state {
        sys::TCP_LISTEN => {
            if info.tcpi_unacked > 0 {
                return Err(refuse(format!(
                    "a listening TCP socket with {} connections waiting to be accepted",
                    info.tcpi_unacked
                )));
            }
            TcpState::Listen {
                addr: local()?,
                backlog: info.tcpi_sacked,
            }
        }
        sys::TCP_CLOSE => {
            let a = local()?;
            TcpState::Closed {
                bound: (a.port() != 0).then_some(a),
            }
        }
        sys::TCP_ESTABLISHED => {
            set_int(fd, SOL_TCP, sys::TCP_REPAIR, sys::TCP_REPAIR_ON)
                .map_err(|e| io_err("TCP_REPAIR on", e))?;
            let copy = sock.try_clone().map_err(|e| io_err("dup", e))?;
            repair.hold(copy, what.to_string());
            let conn = dump_connection(fd, &info).map_err(|e| io_err("reading it in repair mode", e))?;
            TcpState::Established(Box::new(conn))
        }
        s => {
            return Err(refuse(format!(
                "a TCP socket in state {} (only listening, closed and established TCP sockets move today)",
                state_name(s)
            )))
        }
    };
    Ok(TcpSocket {
        family,
        state,
        options,
    })
}

/// An established connection in repair mode.
fn dump_connection(fd: BorrowedFd<'_>, before: &libc::tcp_info) -> io::Result<TcpConnection> {
    let info = tcp_info(fd)?;
    if info.tcpi_state != sys::TCP_ESTABLISHED {
        return Err(io::Error::other(format!(
            "it went to {} while being read",
            state_name(info.tcpi_state)
        )));
    }
    let local = sys::name(fd, false)?.ok_or_else(|| io::Error::other("local address is not IP"))?;
    let peer = sys::name(fd, true)?.ok_or_else(|| io::Error::other("peer address is not IP"))?;
    let len = |req, name: &str| -> io::Result<u32> {
        let n = sys::ioctl_int(fd, req)?;
        u32::try_from(n).map_err(|_| io::Error::other(format!("{name} returned {n}")))
    };
    mark_all_sent(fd)?;
    // The peer's packets are still processed while the process is frozen:
    // its data may grow the receive queue and its acknowledgements shrink
    // the send queue (write_seq, where the send queue ends, stays put).
    let (recv_seq, recv_queue) = read_recv_queue(fd, &len)?;
    let outq = len(sys::SIOCOUTQ, "SIOCOUTQ")?;
    let (send_seq, send_queue) = read_queue(fd, sys::TCP_SEND_QUEUE, outq)?;
    let outq = send_queue.len() as u32;
    let unsent = len(sys::SIOCOUTQNSD, "SIOCOUTQNSD")?;
    let inq = recv_queue.len() as u32;
    set_int(fd, SOL_TCP, sys::TCP_REPAIR_QUEUE, sys::TCP_NO_QUEUE)?;
    let mss = get_int(fd, SOL_TCP, libc::TCP_MAXSEG)? as u32;
    let timestamp = get_int(fd, SOL_TCP, sys::TCP_TIMESTAMP)? as u32;
    let w: sys::TcpRepairWindow = sys::getsockopt(fd, SOL_TCP, sys::TCP_REPAIR_WINDOW, 20)?;
    let opts = before.tcpi_options;
    let ws = before.tcpi_snd_rcv_wscale;
    Ok(TcpConnection {
        local,
        peer,
        send_seq,
        recv_seq,
        send_queue_len: outq,
        unsent_len: unsent.min(outq),
        send_queue,
        recv_queue_len: inq,
        recv_queue,
        mss,
        wscale: (opts & sys::TCPI_OPT_WSCALE != 0).then_some((ws & 0xf, ws >> 4)),
        sack: opts & sys::TCPI_OPT_SACK != 0,
        timestamps: opts & sys::TCPI_OPT_TIMESTAMPS != 0,
        timestamp,
        window: TcpWindow {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        },
    })
}

/// Count every byte of the send queue as sent, without sending it: in
/// repair mode with the send queue selected, a push moves the whole queue
/// past `snd_nxt` with no network transmission (toggling `TCP_NODELAY`
/// pushes). Otherwise the socket, still live in the kernel until its
/// process is gone, could send new data after it was read (on an ACK that
/// opens the window, a persist probe), the peer would acknowledge bytes the
/// image says were never sent, and the rebuilt socket would drop every
/// segment of the peer as acknowledging unsent data. Now the peer can never
/// acknowledge past what the image holds; what it lacks is retransmitted.
fn mark_all_sent(fd: BorrowedFd<'_>) -> io::Result<()> {
    let nodelay = get_int(fd, SOL_TCP, libc::TCP_NODELAY)?;
    set_int(fd, SOL_TCP, sys::TCP_REPAIR_QUEUE, sys::TCP_SEND_QUEUE)?;
    set_int(fd, SOL_TCP, libc::TCP_NODELAY, 1)?;
    set_int(fd, SOL_TCP, libc::TCP_NODELAY, nodelay)
}

/// Sequence number (where it ends) and contents of one queue, at most
/// `len` bytes long. One peek reads it whole (the send queue can only be
/// peeked from its start), with a byte to spare.
fn read_queue(fd: BorrowedFd<'_>, queue: i32, len: u32) -> io::Result<(u32, Vec<u8>)> {
    set_int(fd, SOL_TCP, sys::TCP_REPAIR_QUEUE, queue)?;
    let seq = get_int(fd, SOL_TCP, sys::TCP_QUEUE_SEQ)? as u32;
    if len == 0 {
        return Ok((seq, Vec::new()));
    }
    let mut buf = vec![0u8; len as usize + 1];
    let n = match sys::recv(fd, &mut buf, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => 0,
        Err(e) => return Err(e),
    };
    if n > len as usize {
        return Err(io::Error::other(format!(
            "the queue holds more than the {len} bytes it had"
        )));
    }
    buf.truncate(n);
    Ok((seq, buf))
}

/// The receive queue, read until its size, end and contents agree (data
/// the peer sends meanwhile moves them; a few tries are enough unless the
/// peer floods).
fn read_recv_queue(
    fd: BorrowedFd<'_>,
    len: &dyn Fn(libc::c_ulong, &str) -> io::Result<u32>,
) -> io::Result<(u32, Vec<u8>)> {
    for _ in 0..20 {
        let inq = len(sys::SIOCINQ, "SIOCINQ")?;
        let (seq, data) = read_queue(fd, sys::TCP_RECV_QUEUE, inq.saturating_add(1 << 16))?;
        let again = get_int(fd, SOL_TCP, sys::TCP_QUEUE_SEQ)? as u32;
        let inq2 = len(sys::SIOCINQ, "SIOCINQ")?;
        if again == seq && inq2 as usize == data.len() {
            return Ok((seq, data));
        }
    }
    Err(io::Error::other(
        "the receive queue kept changing while it was read (the peer keeps sending)",
    ))
}

/// Leave repair mode on a socket a checkpoint put in it.
pub fn leave_repair(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(fd, SOL_TCP, sys::TCP_REPAIR_QUEUE, sys::TCP_NO_QUEUE)?;
    set_int(fd, SOL_TCP, sys::TCP_REPAIR, sys::TCP_REPAIR_OFF)
}

/// The options ferry carries: those of every socket, then TCP's.
fn read_options(fd: BorrowedFd<'_>, family: u16) -> io::Result<SocketOptions> {
    let mut o = options::read_common(fd, family)?;
    let linger: libc::linger = sys::getsockopt(fd, SOL_SOCKET, libc::SO_LINGER, 8)?;
    o.keepalive = get_int(fd, SOL_SOCKET, libc::SO_KEEPALIVE)? != 0;
    o.keepidle = get_int(fd, SOL_TCP, libc::TCP_KEEPIDLE)?;
    o.keepintvl = get_int(fd, SOL_TCP, libc::TCP_KEEPINTVL)?;
    o.keepcnt = get_int(fd, SOL_TCP, libc::TCP_KEEPCNT)?;
    o.nodelay = get_int(fd, SOL_TCP, libc::TCP_NODELAY)? != 0;
    o.linger = (linger.l_onoff != 0).then_some(linger.l_linger);
    Ok(o)
}

/// Set the options of `o` (all but `SO_REUSEADDR`, which repair mode
/// overrides and which is set last).
fn write_options(fd: BorrowedFd<'_>, family: u16, o: &SocketOptions) -> io::Result<()> {
    options::write_common(fd, family, o)?;
    set_int(fd, SOL_SOCKET, libc::SO_KEEPALIVE, o.keepalive as i32)?;
    for (opt, v) in [
        (libc::TCP_KEEPIDLE, o.keepidle),
        (libc::TCP_KEEPINTVL, o.keepintvl),
        (libc::TCP_KEEPCNT, o.keepcnt),
    ] {
        if v > 0 {
            set_int(fd, SOL_TCP, opt, v)?;
        }
    }
    set_int(fd, SOL_TCP, libc::TCP_NODELAY, o.nodelay as i32)?;
    let linger = libc::linger {
        l_onoff: o.linger.is_some() as i32,
        l_linger: o.linger.unwrap_or(0),
    };
    sys::setsockopt(fd, SOL_SOCKET, libc::SO_LINGER, &linger)
}

/// A buffer size (as `getsockopt` reads it) with room for `queue` bytes:
/// the kernel counts each queued buffer's overhead too, so a queue refilled
/// in other pieces than it was built from may need more than it had.
fn room_for(queue: usize, recorded: i32) -> i32 {
    let want = queue.saturating_mul(2).saturating_add(1 << 20);
    (want.min(i32::MAX as usize / 2) as i32).max(recorded)
}

/// Listeners first, then closed sockets, then connections: connections on
/// a listener's port are bound after it.
pub fn restore_rank(s: &TcpSocket) -> u8 {
    match s.state {
        TcpState::Listen { .. } => 0,
        TcpState::Closed { .. } => 1,
        TcpState::Established(_) => 2,
    }
}

/// Build socket `s` (status flags `flags`) in the agent; `d` names it.
pub fn open(s: &TcpSocket, flags: u32, d: &str) -> Result<OwnedFd> {
    let domain = match s.family {
        AF_INET => libc::AF_INET,
        AF_INET6 => libc::AF_INET6,
        other => {
            return Err(Error::Incompatible(format!(
                "{d}: TCP socket of unsupported address family {other}"
            )))
        }
    };
    let at =
        |step: &'static str| move |e: io::Error| Error::io(format!("restoring {d}: {step}"), e);
    let sock = sys::tcp_socket(domain).map_err(at("socket"))?;
    let fd = sock.as_fd();
    options::set_v6only(fd, s.family, &s.options).map_err(at("IPV6_V6ONLY"))?;
    write_options(fd, s.family, &s.options).map_err(at("setting its options"))?;
    match &s.state {
        TcpState::Closed { bound } => {
            if let Some(a) = bound {
                set_int(fd, SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(at("SO_REUSEADDR"))?;
                sys::bind(fd, a, domain).map_err(at("bind"))?;
            }
        }
        TcpState::Listen { addr, backlog } => {
            // Bound with SO_REUSEADDR (connections of the old listener may
            // linger in TIME_WAIT), which never takes a port someone listens on.
            set_int(fd, SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(at("SO_REUSEADDR"))?;
            sys::bind(fd, addr, domain).map_err(|e| {
                Error::Incompatible(format!("{d}: cannot listen on {addr} again: {e}"))
            })?;
            let backlog = i32::try_from(*backlog).unwrap_or(libc::SOMAXCONN);
            sys::listen(fd, backlog).map_err(at("listen"))?;
        }
        TcpState::Established(c) => restore_connection(fd, domain, c, d)?,
    }
    set_int(
        fd,
        SOL_SOCKET,
        libc::SO_REUSEADDR,
        s.options.reuseaddr as i32,
    )
    .map_err(at("SO_REUSEADDR"))?;
    if let TcpState::Established(c) = &s.state {
        send_unsent(fd, c).map_err(at("sending the never-sent data"))?;
        // Back to the recorded sizes (a queue above them drains as usual).
        set_buffers(fd, s.options.sndbuf, s.options.rcvbuf).map_err(at("buffer sizes"))?;
    }
    let status = flags as i32 & libc::O_NONBLOCK;
    if status != 0 {
        crate::files::sys::fcntl(fd, libc::F_SETFL, status).map_err(at("F_SETFL"))?;
    }
    Ok(sock)
}

/// Everything of an established connection up to leaving repair mode.
fn restore_connection(fd: BorrowedFd<'_>, domain: i32, c: &TcpConnection, d: &str) -> Result<()> {
    let at =
        |step: &'static str| move |e: io::Error| Error::io(format!("restoring {d}: {step}"), e);
    let sent = c.send_queue.len() - c.unsent_len as usize;
    set_int(fd, SOL_TCP, sys::TCP_REPAIR, sys::TCP_REPAIR_ON).map_err(at("TCP_REPAIR on"))?;
    sys::bind(fd, &c.local, domain)
        .map_err(|e| Error::Incompatible(format!("{d}: cannot bind {} again: {e}", c.local)))?;
    // The queues are refilled below: their sequences start before them.
    let starts = [
        (
            sys::TCP_RECV_QUEUE,
            c.recv_seq.wrapping_sub(c.recv_queue.len() as u32),
        ),
        (
            sys::TCP_SEND_QUEUE,
            c.send_seq.wrapping_sub(c.send_queue.len() as u32),
        ),
    ];
    for (q, seq) in starts {
        set_int(fd, SOL_TCP, sys::TCP_REPAIR_QUEUE, q).map_err(at("TCP_REPAIR_QUEUE"))?;
        set_int(fd, SOL_TCP, sys::TCP_QUEUE_SEQ, seq as i32).map_err(at("TCP_QUEUE_SEQ"))?;
    }
    // connect() sizes segments from the MSS clamp it finds (536 unless
    // the user set one); TCP_REPAIR_OPTIONS sets the clamp later but does
    // not resize them. TCP_MAXSEG takes at most MAX_TCP_WINDOW.
    let user_mss = c.mss.min(MAX_USER_MSS) as i32;
    set_int(fd, SOL_TCP, libc::TCP_MAXSEG, user_mss).map_err(at("TCP_MAXSEG"))?;
    sys::connect(fd, &c.peer, domain).map_err(at("connect in repair mode"))?;
    set_buffers(
        fd,
        room_for(c.send_queue.len(), 0),
        room_for(c.recv_queue.len(), 0),
    )
    .map_err(at("making room for the queues"))?;
    let mut opts = vec![sys::TcpRepairOpt {
        opt_code: sys::TCPOPT_MAXSEG,
        opt_val: c.mss,
    }];
    if let Some((snd, rcv)) = c.wscale {
        opts.push(sys::TcpRepairOpt {
            opt_code: sys::TCPOPT_WINDOW,
            opt_val: snd as u32 | (rcv as u32) << 16,
        });
    }
    if c.sack {
        opts.push(sys::TcpRepairOpt {
            opt_code: sys::TCPOPT_SACK_PERM,
            opt_val: 0,
        });
    }
    if c.timestamps {
        opts.push(sys::TcpRepairOpt {
            opt_code: sys::TCPOPT_TIMESTAMP,
            opt_val: 0,
        });
    }
    sys::set_repair_options(fd, &opts).map_err(at("TCP_REPAIR_OPTIONS"))?;
    if c.timestamps {
        set_int(fd, SOL_TCP, sys::TCP_TIMESTAMP, c.timestamp as i32)
            .map_err(at("TCP_TIMESTAMP"))?;
    }
    set_int(fd, SOL_TCP, sys::TCP_REPAIR_QUEUE, sys::TCP_RECV_QUEUE)
        .map_err(at("TCP_REPAIR_QUEUE"))?;
    fill_recv(fd, &c.recv_queue).map_err(at("refilling the receive queue"))?;
    set_int(fd, SOL_TCP, sys::TCP_REPAIR_QUEUE, sys::TCP_SEND_QUEUE)
        .map_err(at("TCP_REPAIR_QUEUE"))?;
    send_all(fd, &c.send_queue[..sent], 0).map_err(at("refilling the send queue"))?;
    set_int(fd, SOL_TCP, sys::TCP_REPAIR_QUEUE, sys::TCP_NO_QUEUE)
        .map_err(at("TCP_REPAIR_QUEUE"))?;
    let w = sys::TcpRepairWindow {
        snd_wl1: c.window.snd_wl1,
        snd_wnd: c.window.snd_wnd,
        max_window: c.window.max_window,
        rcv_wnd: c.window.rcv_wnd,
        rcv_wup: c.window.rcv_wup,
    };
    sys::setsockopt(fd, SOL_TCP, sys::TCP_REPAIR_WINDOW, &w).map_err(at("TCP_REPAIR_WINDOW"))?;
    // A window probe: the peer answers with its acknowledgement and window.
    set_int(fd, SOL_TCP, sys::TCP_REPAIR, sys::TCP_REPAIR_OFF).map_err(at("TCP_REPAIR off"))?;
    Ok(())
}

/// Put `data` into the receive queue (repair mode, receive queue
/// selected), in chunks the socket's memory accepts.
fn fill_recv(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    let mut chunk = RECV_CHUNK;
    let mut off = 0;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        match sys::send(fd, &data[off..end], libc::MSG_DONTWAIT) {
            Ok(0) => return Err(io::Error::other("the receive queue took nothing")),
            Ok(n) => off += n,
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && chunk > 1024 => chunk /= 2,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Send all of `data` without blocking (the buffer was sized for it).
fn send_all(fd: BorrowedFd<'_>, data: &[u8], flags: i32) -> io::Result<()> {
    let mut off = 0;
    while off < data.len() {
        match sys::send(
            fd,
            &data[off..],
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | flags,
        ) {
            Ok(0) => return Err(io::Error::other("the send queue took nothing")),
            Ok(n) => off += n,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{} of {} bytes queued: {e}", off, data.len()),
                ))
            }
        }
    }
    Ok(())
}

/// The never-sent tail of the send queue, sent the normal way.
fn send_unsent(fd: BorrowedFd<'_>, c: &TcpConnection) -> io::Result<()> {
    let sent = c.send_queue.len() - c.unsent_len as usize;
    send_all(fd, &c.send_queue[sent..], 0)
}
