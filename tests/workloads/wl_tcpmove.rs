//! wl-tcpmove: both ends of a streaming TCP connection, for migrating the
//! server with its service address.
//!
//! `wl-tcpmove server ADDR:PORT`: listens there, prints `ready pid=P`,
//! accepts one client and then, every millisecond, sends up to 4 8-byte
//! big-endian records 0, 1, 2, ... and reads whatever the client sent
//! (which must count 0, 1, 2, ... too). Every further connection is
//! answered with one line `rx=N bad=B eof=E` (records received, 1 if one
//! was out of sequence, 1 once the client closed its side) and closed.
//!
//! `wl-tcpmove client ADDR:PORT STOPFILE`: connects, prints `connected`,
//! and does the same from its side, printing `rx=N tx=M` every 500 records
//! received; once STOPFILE exists it closes its sending side, reads up to
//! the server's end (the server closes once it saw the client's), prints
//! `done tx=T rx=R bad=B gap_ms=G` (G: the longest wait between two
//! received records), then exits 0. Any socket error (a reset) is printed
//! and exits 1.
//!
//! `wl-tcpmove ask ADDR:PORT`: connects, prints the line it gets.
mod shared;

use shared::{die, say};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = |i: usize| -> SocketAddr {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| die("usage: wl-tcpmove server|client|ask ADDR:PORT [STOPFILE]"))
    };
    match args.get(1).map(String::as_str) {
        Some("server") => server(addr(2)),
        Some("client") => {
            let stop = args
                .get(3)
                .unwrap_or_else(|| die("client: no STOPFILE"))
                .clone();
            client(addr(2), &stop)
        }
        Some("ask") => {
            let s = TcpStream::connect(addr(2)).unwrap_or_else(|e| die(&format!("connect: {e}")));
            let mut line = String::new();
            BufReader::new(s)
                .read_line(&mut line)
                .unwrap_or_else(|e| die(&format!("read: {e}")));
            say(line.trim_end());
        }
        _ => die("usage: wl-tcpmove server|client|ask ADDR:PORT [STOPFILE]"),
    }
}

/// One end's view of the stream of records.
#[derive(Default)]
struct Ends {
    tx: u64,
    out: [u8; 8],
    out_at: usize,
    rx: u64,
    bad: u64,
    partial: [u8; 8],
    partial_len: usize,
    eof: bool,
    last_rx: Option<Instant>,
    max_gap: Duration,
}

impl Ends {
    fn new() -> Ends {
        Ends {
            out: 0u64.to_be_bytes(),
            ..Ends::default()
        }
    }

    /// Send up to 4 records, as far as the socket takes them.
    fn send(&mut self, conn: &mut TcpStream) {
        let mut sent = 0;
        while sent < 4 {
            match conn.write(&self.out[self.out_at..]) {
                Ok(n) => {
                    self.out_at += n;
                    if self.out_at == 8 {
                        self.tx += 1;
                        sent += 1;
                        self.out = self.tx.to_be_bytes();
                        self.out_at = 0;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => die(&format!("write: {e}")),
            }
        }
    }

    /// Read what arrived; the number of whole records.
    fn recv(&mut self, conn: &mut TcpStream) -> u64 {
        let mut got = 0;
        let mut buf = [0u8; 64 << 10];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    return got;
                }
                Ok(n) => {
                    for &b in &buf[..n] {
                        self.partial[self.partial_len] = b;
                        self.partial_len += 1;
                        if self.partial_len == 8 {
                            if u64::from_be_bytes(self.partial) != self.rx {
                                self.bad = 1;
                            }
                            self.rx += 1;
                            got += 1;
                            self.partial_len = 0;
                        }
                    }
                    if got > 0 {
                        let now = Instant::now();
                        if let Some(t) = self.last_rx {
                            self.max_gap = self.max_gap.max(now - t);
                        }
                        self.last_rx = Some(now);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return got,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => die(&format!("read: {e}")),
            }
        }
    }
}

fn server(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
    say(&format!("ready pid={}", std::process::id()));
    let (mut conn, _) = listener
        .accept()
        .unwrap_or_else(|e| die(&format!("accept: {e}")));
    conn.set_nonblocking(true)
        .unwrap_or_else(|e| die(&format!("nonblocking: {e}")));
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| die(&format!("nonblocking listener: {e}")));
    say("connected");
    let mut ends = Ends::new();
    loop {
        if !ends.eof {
            ends.send(&mut conn);
            ends.recv(&mut conn);
            if ends.eof {
                // The client's end: close ours too (it reads to the end).
                let _ = conn.shutdown(Shutdown::Write);
            }
        }
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.write_all(
                    format!("rx={} bad={} eof={}\n", ends.rx, ends.bad, ends.eof as u8).as_bytes(),
                );
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => die(&format!("accept: {e}")),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn client(addr: SocketAddr, stop: &str) {
    let mut conn = TcpStream::connect(addr).unwrap_or_else(|e| die(&format!("connect: {e}")));
    conn.set_nonblocking(true)
        .unwrap_or_else(|e| die(&format!("nonblocking: {e}")));
    say("connected");
    let mut ends = Ends::new();
    let mut next_report = 500;
    loop {
        ends.send(&mut conn);
        ends.recv(&mut conn);
        if ends.eof {
            die("the server closed the connection");
        }
        if ends.rx >= next_report {
            say(&format!("rx={} tx={}", ends.rx, ends.tx));
            next_report += 500;
        }
        if std::path::Path::new(stop).exists() && ends.out_at == 0 {
            conn.shutdown(Shutdown::Write)
                .unwrap_or_else(|e| die(&format!("shutdown: {e}")));
            // Read what the server still sends, up to its end.
            while !ends.eof {
                ends.recv(&mut conn);
                std::thread::sleep(Duration::from_millis(1));
            }
            say(&format!(
                "done tx={} rx={} bad={} gap_ms={}",
                ends.tx,
                ends.rx,
                ends.bad,
                ends.max_gap.as_millis()
            ));
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
