//! A real server: Debian's redis-server (event loop on epoll, a listening
//! TCP socket, established client connections, background threads, pipes
//! it inherited) checkpointed with clients connected and restored on the
//! same host. The clients keep their connections: a counter incremented
//! over one connection goes on from where it was, a 1 MiB value written
//! before comes back byte for byte, and a new connection is accepted.
//!
//! As in tests/tcp.rs there is no network lock on one host yet: the
//! clients are quiet (every reply read, their delayed ACKs sent) during the
//! checkpoint. Through `migrate --to` the block of engine/src/net covers
//! this (tests/redismove.rs).
mod common;

use common::Procs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

const REDIS: &str = "/usr/bin/redis-server";

/// One client connection speaking RESP.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(port: u16) -> std::io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Client {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    /// Send one command (as a RESP array) and read one reply: a simple
    /// string, error or integer as its text, a bulk string as its bytes.
    fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&req).expect("send a command to redis");
        let mut line = String::new();
        self.r
            .read_line(&mut line)
            .expect("read a reply from redis");
        assert!(line.ends_with("\r\n"), "reply line {line:?}");
        let line = line.trim_end().to_string();
        match line.as_bytes().first() {
            Some(b'+' | b':') => line.as_bytes()[1..].to_vec(),
            Some(b'$') => {
                let n: usize = line[1..].parse().expect("bulk length");
                let mut buf = vec![0u8; n + 2];
                self.r.read_exact(&mut buf).expect("bulk string");
                buf.truncate(n);
                buf
            }
            _ => panic!("unexpected reply from redis: {line:?}"),
        }
    }

    fn incr(&mut self) -> u64 {
        let v = self.call(&[b"INCR", b"counter"]);
        String::from_utf8_lossy(&v).parse().expect("INCR reply")
    }
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr").port()
}

fn value() -> Vec<u8> {
    (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[test]
fn redis_keeps_its_data_and_its_clients_through_checkpoint_and_restore() {
    let _serial = common::setup();
    assert!(
        std::path::Path::new(REDIS).exists(),
        "{REDIS} is missing: install Debian's redis-server (scripts/setup and .ci/run do)"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let port = free_port();
    let mut cmd = Command::new(REDIS);
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
    ])
    .arg(tmp.path());
    let server = procs.spawn(cmd, tmp.path(), "redis");
    let pid = server.pid;
    let start = Instant::now();
    let mut a = loop {
        match Client::connect(port) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    start.elapsed() < common::LINE_TIMEOUT,
                    "redis never listened on {port}: {e}; its log:\n{}",
                    server.out.lines().join("\n")
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let mut b = Client::connect(port).expect("second client");
    let big = value();
    assert_eq!(a.call(&[b"SET", b"big", &big]), b"OK");
    for i in 1..=100 {
        assert_eq!(a.incr(), i);
    }
    assert_eq!(b.call(&[b"GET", b"big"]), big);
    // Quiet: every reply was read; let the client's delayed ACKs (at most
    // 200 ms) go out before the server's sockets disappear, or the kernel
    // would answer them with a reset (no network lock on one host yet).
    std::thread::sleep(Duration::from_millis(300));

    common::checkpoint_kill_restore(&mut procs, pid, &tmp.path().join("img"));

    // The same connections go on where they were.
    for i in 101..=200 {
        assert_eq!(a.incr(), i, "the counter over the restored connection");
    }
    assert_eq!(b.call(&[b"GET", b"big"]), big, "the value after restore");
    assert_eq!(b.incr(), 201);
    // And the listener accepts a new client.
    let mut c = Client::connect(port).expect("a new client after restore");
    assert_eq!(c.call(&[b"DBSIZE"]), b"2");
    assert_eq!(c.incr(), 202);
    common::assert_running_untraced(pid);
    procs
        .kill(pid)
        .expect("the restored redis must be reaped by the test process");
}
