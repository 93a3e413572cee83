//! wl-tcp: a TCP server on 127.0.0.1. Listens (port chosen by the kernel),
//! prints `ready pid=P port=X`, accepts one client and then, in one loop:
//! sends 8-byte big-endian records 0, 1, 2, ... (up to 64 a round) while
//! the socket takes them, reads the client's records (which must also
//! count 0, 1, 2, ...) one a round, so that they queue up (64 KiB a round
//! after a SIGUSR1), and answers every further connection to the listener
//! with one line `rx=N bad=B` (records received, and 1 if one was out of
//! sequence) before closing it. Dies on any socket error. With the argument
//! `unix` it also holds a unix datagram socketpair with a file descriptor
//! in flight on it (which checkpoint refuses).
mod shared;

use shared::{die, install_sigusr1, say, take_sigusr1};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

fn main() {
    install_sigusr1();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| die(&format!("bind: {e}")));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| die(&format!("local_addr: {e}")))
        .port();
    say(&format!("ready pid={} port={port}", std::process::id()));
    let (conn, _) = listener
        .accept()
        .unwrap_or_else(|e| die(&format!("accept: {e}")));
    conn.set_nonblocking(true)
        .unwrap_or_else(|e| die(&format!("nonblocking connection: {e}")));
    conn.set_nodelay(true)
        .unwrap_or_else(|e| die(&format!("nodelay: {e}")));
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| die(&format!("nonblocking listener: {e}")));
    // `wl-tcp unix`: also hold a unix socket (a kind checkpoint refuses),
    // opened after the connection.
    let _unix = (std::env::args().nth(1).as_deref() == Some("unix")).then(|| {
        let (a, b) = std::os::unix::net::UnixDatagram::pair()
            .unwrap_or_else(|e| die(&format!("unix socket: {e}")));
        // A file descriptor in flight on it: refused.
        if !shared::send_fd_in_flight(a.as_raw_fd(), 0) {
            die("sendmsg(SCM_RIGHTS)");
        }
        (a, b)
    });
    say("connected");
    serve(&listener, conn);
}

fn serve(listener: &TcpListener, mut conn: TcpStream) {
    let mut next_out: u64 = 0;
    // Bytes of the record being written, and how many are already out.
    let mut out = next_out.to_be_bytes();
    let mut out_at = 0;
    let mut rx: u64 = 0;
    let mut bad = 0;
    let mut partial = [0u8; 8];
    let mut partial_len = 0;
    let mut fast = false;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: conn.as_raw_fd(),
                events: libc::POLLIN | libc::POLLOUT,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll reads and writes the two pollfds of `fds`.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            die(&format!("poll: {e}"));
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            die("the connection failed");
        }
        // Writes: up to 64 records, as many as the socket takes.
        for _ in 0..64 {
            match conn.write(&out[out_at..]) {
                Ok(n) => {
                    out_at += n;
                    if out_at == 8 {
                        next_out += 1;
                        out = next_out.to_be_bytes();
                        out_at = 0;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => die(&format!("write: {e}")),
            }
        }
        // Reads: one record, so that data waits in the receive queue, until
        // told to hurry.
        fast |= take_sigusr1();
        let mut buf = [0u8; 64 << 10];
        let piece = if fast { buf.len() } else { 8 };
        match conn.read(&mut buf[..piece]) {
            Ok(0) => die("the client closed the connection"),
            Ok(n) => {
                for &b in &buf[..n] {
                    partial[partial_len] = b;
                    partial_len += 1;
                    if partial_len == 8 {
                        if u64::from_be_bytes(partial) != rx {
                            bad = 1;
                        }
                        rx += 1;
                        partial_len = 0;
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => die(&format!("read: {e}")),
        }
        // A new connection: report and close.
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.write_all(format!("rx={rx} bad={bad}\n").as_bytes());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => die(&format!("accept: {e}")),
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
