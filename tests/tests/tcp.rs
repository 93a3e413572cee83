//! TCP sockets through `migrate checkpoint` and `migrate restore` on one
//! host (loopback): wl-tcp streams sequence-numbered records to and from a
//! client this test runs; the server is checkpointed (and killed) and
//! restored; the client sees no reset, no record lost or repeated either
//! way, and the restored listener accepts a new connection.
//!
//! There is no network lock yet: between the kill and the restore nothing
//! may reach the server's port (a packet there would be answered with a
//! reset, and data that reaches the frozen socket after its queues were
//! read would be lost). So the client pauses around the checkpoint and
//! waits until the connection is quiet: all its own data acknowledged, the
//! server's data stopped by the client's full window (the server's send
//! queue then holds never-sent data and its receive queue unread data).
mod common;

use common::{num, Procs};
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const WL_TCP: &str = env!("CARGO_BIN_EXE_wl-tcp");

/// An int ioctl or getsockopt on the client's socket.
fn ioctl(fd: i32, req: libc::c_ulong) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: these requests write one int into `n`.
    let r = unsafe { libc::ioctl(fd, req, &mut n) };
    assert!(
        r >= 0,
        "ioctl {req:#x}: {}",
        std::io::Error::last_os_error()
    );
    n
}

/// `(tcpi_state, SO_ERROR)` of the client's socket.
fn state(fd: i32) -> (u8, i32) {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: as above.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO");
    let mut err: libc::c_int = 0;
    let mut len = 4;
    // SAFETY: SO_ERROR writes one int.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_ERROR");
    (info.tcpi_state, err)
}

/// The test's client: a writer and a reader thread, each pausable.
struct Client {
    stream: TcpStream,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Result<(), String>>>,
}

impl Client {
    fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to wl-tcp");
        // A fixed, small receive buffer: the server fills the window
        // quickly once the client pauses.
        let size: libc::c_int = 64 << 10;
        // SAFETY: SO_RCVBUF reads one int from `size`.
        let r = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(r, 0, "SO_RCVBUF");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        {
            let (s, paused, stop, sent) = (
                stream.try_clone().expect("clone"),
                paused.clone(),
                stop.clone(),
                sent.clone(),
            );
            threads.push(std::thread::spawn(move || -> Result<(), String> {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if paused.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let batch: Vec<u8> = (n..n + 16).flat_map(|i| i.to_be_bytes()).collect();
                    (&s).write_all(&batch)
                        .map_err(|e| format!("client write: {e}"))?;
                    n += 16;
                    sent.store(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            }));
        }
        {
            let (s, paused, stop, received) = (
                stream.try_clone().expect("clone"),
                paused.clone(),
                stop.clone(),
                received.clone(),
            );
            threads.push(std::thread::spawn(move || -> Result<(), String> {
                let mut next = 0u64;
                let mut rec = [0u8; 8];
                let mut have = 0;
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::SeqCst) {
                    if paused.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let n = match (&s).read(&mut buf) {
                        Ok(0) => return Err("client read: end of file".into()),
                        Ok(n) => n,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            continue
                        }
                        Err(e) => return Err(format!("client read: {e}")),
                    };
                    for &b in &buf[..n] {
                        rec[have] = b;
                        have += 1;
                        if have == 8 {
                            let got = u64::from_be_bytes(rec);
                            if got != next {
                                return Err(format!("record {got} where {next} was due"));
                            }
                            next += 1;
                            have = 0;
                        }
                    }
                    received.store(next, Ordering::SeqCst);
                }
                Ok(())
            }));
        }
        Client {
            stream,
            paused,
            stop,
            sent,
            received,
            threads,
        }
    }

    fn fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    /// Wait until both directions have moved `more` records past where
    /// they are.
    fn advance(&mut self, more: u64) {
        let (s0, r0) = (self.sent(), self.received());
        common::wait_until(Duration::from_secs(20), "records both ways", || {
            self.check_threads();
            (self.sent() >= s0 + more && self.received() >= r0 + more).then_some(())
        });
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// Panics with the error of a thread that ended early.
    fn check_threads(&mut self) {
        if let Some(i) = self.threads.iter().position(|t| t.is_finished()) {
            match self.threads.remove(i).join() {
                Ok(Err(e)) => panic!("client: {e}"),
                Ok(Ok(())) => panic!("a client thread stopped early"),
                Err(_) => panic!("a client thread panicked"),
            }
        }
    }

    /// Pause both threads and wait until the connection is quiet: the
    /// client's data all acknowledged, the server's stopped by the full
    /// window (the receive queue no longer grows).
    fn pause_and_quiesce(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let mut last = -1;
        let mut same = 0;
        common::wait_until(Duration::from_secs(20), "a quiet connection", || {
            std::thread::sleep(Duration::from_millis(50));
            let inq = ioctl(self.fd(), libc::FIONREAD);
            let outq = ioctl(self.fd(), libc::TIOCOUTQ);
            same = if inq == last { same + 1 } else { 0 };
            last = inq;
            (outq == 0 && same >= 4).then_some(())
        });
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Stop both threads; panics with the error of either.
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("client: {e}"),
                Err(_) => panic!("a client thread panicked"),
            }
        }
    }
}

/// `(tx_queue, rx_queue)` of the connection from 127.0.0.1:`local` to
/// `peer` in /proc/net/tcp.
fn queues(local: u16, peer: u16) -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap_or(""), 16).ok();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 4 && port(f[1]) == Some(local) && port(f[2]) == Some(peer) {
            let (tx, rx) = f[4].split_once(':').expect("tx:rx");
            return (
                u64::from_str_radix(tx, 16).expect("tx"),
                u64::from_str_radix(rx, 16).expect("rx"),
            );
        }
    }
    panic!("no connection {local} -> {peer} in /proc/net/tcp");
}

/// `rx=N bad=B` from a new connection to the listener.
fn report(port: u16) -> (u64, u64) {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("a new connection to the listener");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut line = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut line)
        .expect("the server's report");
    (num(&line, "rx"), num(&line, "bad"))
}

/// Wait until the server has received more than `records` records, all in
/// sequence; on a timeout, show the connection's state.
fn server_reads_past(port: u16, records: u64) {
    let start = std::time::Instant::now();
    loop {
        let (rx, bad) = report(port);
        assert_eq!(bad, 0, "the server saw a record out of sequence");
        if rx > records {
            return;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let ss = std::process::Command::new("ss")
                .args(["-tinmoe", "sport", "=", &format!(":{port}")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            panic!("the server received {rx} records, not more than {records}:\n{ss}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(
    procs: &mut Procs,
    dir: &std::path::Path,
    args: &[&str],
) -> (common::Workload, u16, Client) {
    let wl = procs.workload(WL_TCP, args, dir, "tcp");
    let (_, ready) = wl.out.wait_line(0, "ready ");
    let port = num(&ready, "port") as u16;
    let mut client = Client::connect(port);
    wl.out.wait_line(0, "connected");
    client.advance(2000);
    (wl, port, client)
}

#[test]
fn tcp_connection_and_listener_survive_checkpoint_and_restore() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (wl, port, mut client) = start(&mut procs, tmp.path(), &[]);

    client.pause_and_quiesce();
    let (sent, received) = (client.sent(), client.received());
    // Data in flight both ways: the server's records wait in its send
    // queue (the client's window is full), the client's in its receive
    // queue (it reads one record a round).
    let me = client.stream.local_addr().expect("addr").port();
    let (tx, rx) = queues(port, me);
    assert!(
        tx > 0 && rx > 0,
        "server queues before the checkpoint: send {tx}, receive {rx}"
    );
    let dir = tmp.path().join("img");
    let cp = common::checkpoint(wl.pid, &dir, false);
    cp.assert_ok();
    procs.reap(wl.pid).expect("checkpoint killed the server");
    // The server is gone, its sockets closed in repair mode: the client
    // got neither a FIN nor a reset.
    assert_eq!(
        state(client.fd()),
        (1, 0),
        "client state (ESTABLISHED, no error)"
    );

    let rs = common::restore(&dir);
    rs.assert_ok();
    procs.adopt(wl.pid);
    common::assert_running_untraced(wl.pid);

    common::signal(wl.pid, libc::SIGUSR1); // the server reads at full speed
    client.resume();
    client.advance(3000);
    assert!(client.sent() > sent && client.received() > received);
    // The server reads past everything sent before the checkpoint, every
    // record in sequence (the new connections go to the restored listener).
    server_reads_past(port, sent + 1000);
    assert_eq!(state(client.fd()), (1, 0));
    client.stop();
    let _ = procs.kill(wl.pid);
}

#[test]
fn tcp_connection_goes_on_after_checkpoint_leave_running() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (wl, port, mut client) = start(&mut procs, tmp.path(), &[]);

    // Streaming goes on during the checkpoint: the sockets leave repair
    // mode when the tree is let go.
    let cp = common::checkpoint(wl.pid, &tmp.path().join("img"), true);
    cp.assert_ok();
    common::assert_running_untraced(wl.pid);
    let sent = client.sent();
    common::signal(wl.pid, libc::SIGUSR1);
    client.advance(2000);
    server_reads_past(port, sent);
    assert_eq!(state(client.fd()), (1, 0));
    client.stop();
    let _ = procs.kill(wl.pid);
}

#[test]
fn a_failed_checkpoint_takes_the_connection_out_of_repair_mode() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (wl, port, mut client) = start(&mut procs, tmp.path(), &["unix"]);

    // The TCP connection (a lower fd) is read in repair mode before the
    // unix socket is refused: the failed checkpoint must let it go.
    let cp = common::checkpoint(wl.pid, &tmp.path().join("img"), false);
    cp.assert_error(&["unix datagram socket"]);
    common::assert_running_untraced(wl.pid);
    let sent = client.sent();
    common::signal(wl.pid, libc::SIGUSR1);
    client.advance(2000);
    server_reads_past(port, sent);
    assert_eq!(state(client.fd()), (1, 0));
    client.stop();
    let _ = procs.kill(wl.pid);
}
