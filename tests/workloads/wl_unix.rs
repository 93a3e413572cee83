//! wl-unix DIR: a parent P and its child C talking over unix sockets, with
//! data queued both ways at the checkpoint:
//!
//! - a stream socketpair (50000 bytes C->P, 30000 P->C, unread),
//! - a seqpacket socketpair (15 records C->P, one empty; 12 P->C),
//! - a datagram socketpair (20 datagrams C->P, more than
//!   net.unix.max_dgram_qlen; 5 P->C),
//! - P's datagram server bound to the abstract name `ferry-wl-unix-PID`,
//!   with 4 datagrams queued from C's socket connected to it,
//! - P's stream listener on DIR/wl-unix.sock.
//!
//! Prints `ready pid=P child=C listen=PATH` once everything is queued, then
//! ticks. On SIGUSR1 P reads every queued byte and checks every boundary,
//! then signals C, which does the same and asks one more question on each
//! pair that P answers; C prints `child verify ok|BAD ...`; P accepts one
//! connection on its listener, echoes 5 bytes and prints `verify ok|BAD
//! ...`.
mod shared;

use shared::{die, say};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::FromRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static GO: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    GO.store(true, Ordering::SeqCst);
}

fn p2c(i: usize) -> u8 {
    ((i * 17 + 5) % 251) as u8
}
fn c2p(i: usize) -> u8 {
    ((i * 13 + 1) % 251) as u8
}
const C2P_STREAM: usize = 50_000;
const P2C_STREAM: usize = 30_000;
fn c2p_records() -> Vec<Vec<u8>> {
    (0..15u8).map(|k| vec![k; k as usize * 100]).collect()
}
fn p2c_records() -> Vec<Vec<u8>> {
    (0..12u8).map(|k| vec![k + 50; k as usize + 1]).collect()
}
fn c2p_dgrams() -> Vec<Vec<u8>> {
    (0..20u8)
        .map(|k| vec![k + 100; k as usize * 37 + 1])
        .collect()
}
fn p2c_dgrams() -> Vec<Vec<u8>> {
    (0..5u8).map(|k| vec![k + 200; 999 + k as usize]).collect()
}
fn srv_dgrams() -> Vec<Vec<u8>> {
    (0..4).map(|k| format!("srv-{k}").into_bytes()).collect()
}

fn seqpacket_pair() -> (UnixDatagram, UnixDatagram) {
    let mut sv = [-1; 2];
    // SAFETY: socketpair writes two new fds into `sv`, each wrapped once.
    unsafe {
        if libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, sv.as_mut_ptr()) < 0 {
            die("socketpair(SOCK_SEQPACKET)");
        }
        (
            UnixDatagram::from_raw_fd(sv[0]),
            UnixDatagram::from_raw_fd(sv[1]),
        )
    }
}

fn wait_go() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
}

/// Read every queued message of `s` (nonblocking) and compare.
fn check_messages(s: &UnixDatagram, want: &[Vec<u8>], what: &str, bad: &mut Vec<String>) {
    s.set_nonblocking(true)
        .unwrap_or_else(|e| die(&format!("{e}")));
    let mut buf = vec![0u8; 1 << 16];
    let mut got = Vec::new();
    loop {
        match s.recv(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => {
                bad.push(format!("{what}: recv: {e}"));
                return;
            }
        }
    }
    if got != want {
        let lens: Vec<usize> = got.iter().map(Vec::len).collect();
        bad.push(format!(
            "{what}: got {} messages of lengths {lens:?}",
            got.len()
        ));
    }
    s.set_nonblocking(false)
        .unwrap_or_else(|e| die(&format!("{e}")));
}

fn check_stream(
    s: &mut UnixStream,
    n: usize,
    f: fn(usize) -> u8,
    what: &str,
    bad: &mut Vec<String>,
) {
    let mut buf = vec![0u8; n];
    if let Err(e) = s.read_exact(&mut buf) {
        bad.push(format!("{what}: read: {e}"));
        return;
    }
    if buf.iter().enumerate().any(|(i, &b)| b != f(i)) {
        bad.push(format!("{what}: wrong bytes"));
    }
    s.set_nonblocking(true)
        .unwrap_or_else(|e| die(&format!("{e}")));
    let mut extra = [0u8; 16];
    match s.read(&mut extra) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => bad.push(format!("{what}: more than {n} bytes queued: {other:?}")),
    }
    s.set_nonblocking(false)
        .unwrap_or_else(|e| die(&format!("{e}")));
}

fn report(prefix: &str, bad: &[String]) {
    if bad.is_empty() {
        say(&format!("{prefix} ok"));
    } else {
        say(&format!("{prefix} BAD {}", bad.join("; ")));
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| die("usage: wl-unix DIR"));
    let path = format!("{dir}/wl-unix.sock");
    let name = format!("ferry-wl-unix-{}", std::process::id());
    let addr =
        SocketAddr::from_abstract_name(name.as_bytes()).unwrap_or_else(|e| die(&format!("{e}")));
    let srv = UnixDatagram::bind_addr(&addr).unwrap_or_else(|e| die(&format!("bind {name}: {e}")));
    let listener = UnixListener::bind(&path).unwrap_or_else(|e| die(&format!("bind {path}: {e}")));
    let (mut sp, mut sc) = UnixStream::pair().unwrap_or_else(|e| die(&format!("{e}")));
    let (qp, qc) = seqpacket_pair();
    let (dp, dc) = UnixDatagram::pair().unwrap_or_else(|e| die(&format!("{e}")));
    let (mut done_r, mut done_w) = {
        let mut p = [-1; 2];
        // SAFETY: pipe writes two new fds, each wrapped once.
        unsafe {
            if libc::pipe(p.as_mut_ptr()) < 0 {
                die("pipe");
            }
            (
                std::fs::File::from_raw_fd(p[0]),
                std::fs::File::from_raw_fd(p[1]),
            )
        }
    };
    wait_go();
    // SAFETY: fork; the child only uses its own copies of the sockets.
    let child = unsafe { libc::fork() };
    if child < 0 {
        die("fork");
    }
    if child == 0 {
        drop((sp, qp, dp, srv, listener, done_r));
        let to_srv = UnixDatagram::unbound().unwrap_or_else(|e| die(&format!("{e}")));
        to_srv
            .connect_addr(&addr)
            .unwrap_or_else(|e| die(&format!("connect {name}: {e}")));
        let data: Vec<u8> = (0..C2P_STREAM).map(c2p).collect();
        sc.write_all(&data)
            .unwrap_or_else(|e| die(&format!("stream: {e}")));
        for r in c2p_records() {
            qc.send(&r)
                .unwrap_or_else(|e| die(&format!("seqpacket: {e}")));
        }
        for d in c2p_dgrams() {
            dc.send(&d).unwrap_or_else(|e| die(&format!("dgram: {e}")));
        }
        for d in srv_dgrams() {
            to_srv
                .send(&d)
                .unwrap_or_else(|e| die(&format!("to server: {e}")));
        }
        done_w
            .write_all(b"x")
            .unwrap_or_else(|e| die(&format!("{e}")));
        drop(done_w);
        while !GO.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut bad = Vec::new();
        check_stream(&mut sc, P2C_STREAM, p2c, "child stream", &mut bad);
        check_messages(&qc, &p2c_records(), "child seqpacket", &mut bad);
        check_messages(&dc, &p2c_dgrams(), "child dgram", &mut bad);
        // One more round on each pair: C asks, P (done with its checks)
        // answers.
        let mut b = [0u8; 4];
        let _ = sc.write_all(b"ping");
        if sc.read_exact(&mut b).is_err() || &b != b"pong" {
            bad.push("child stream pong".into());
        }
        for (s, what) in [(&qc, "seqpacket"), (&dc, "dgram")] {
            let _ = s.send(b"ping");
            match s.recv(&mut b) {
                Ok(4) if &b == b"pong" => {}
                other => bad.push(format!("child {what} pong: {other:?}")),
            }
        }
        report("child verify", &bad);
        loop {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop((sc, qc, dc, done_w));
    let data: Vec<u8> = (0..P2C_STREAM).map(p2c).collect();
    sp.write_all(&data)
        .unwrap_or_else(|e| die(&format!("stream: {e}")));
    for r in p2c_records() {
        qp.send(&r)
            .unwrap_or_else(|e| die(&format!("seqpacket: {e}")));
    }
    for d in p2c_dgrams() {
        dp.send(&d).unwrap_or_else(|e| die(&format!("dgram: {e}")));
    }
    let mut x = [0u8; 1];
    done_r
        .read_exact(&mut x)
        .unwrap_or_else(|e| die(&format!("child done: {e}")));
    drop(done_r);
    say(&format!(
        "ready pid={} child={child} listen={path}",
        std::process::id()
    ));
    let mut tick = 0u64;
    while !GO.load(Ordering::SeqCst) {
        tick += 1;
        say(&format!("tick {tick}"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut bad = Vec::new();
    check_stream(&mut sp, C2P_STREAM, c2p, "stream", &mut bad);
    check_messages(&qp, &c2p_records(), "seqpacket", &mut bad);
    check_messages(&dp, &c2p_dgrams(), "dgram", &mut bad);
    check_messages(&srv, &srv_dgrams(), "dgram server", &mut bad);
    // Now the child checks its side, then asks on each pair.
    // SAFETY: kill of our own child by PID.
    unsafe { libc::kill(child, libc::SIGUSR1) };
    let mut b = [0u8; 4];
    if sp.read_exact(&mut b).is_err() || &b != b"ping" {
        bad.push("stream ping".into());
    }
    let _ = sp.write_all(b"pong");
    for (s, what) in [(&qp, "seqpacket"), (&dp, "dgram")] {
        match s.recv(&mut b) {
            Ok(4) if &b == b"ping" => {
                let _ = s.send(b"pong");
            }
            other => bad.push(format!("{what} ping: {other:?}")),
        }
    }
    match listener.accept() {
        Ok((mut c, _)) => {
            let mut m = [0u8; 5];
            if c.read_exact(&mut m).and_then(|_| c.write_all(&m)).is_err() {
                bad.push("echo on the accepted connection".into());
            }
        }
        Err(e) => bad.push(format!("accept: {e}")),
    }
    report("verify", &bad);
    loop {
        std::thread::sleep(Duration::from_millis(100));
    }
}
