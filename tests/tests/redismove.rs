//! Debian's redis-server with a client on C incrementing a counter over
//! one connection, in a loop, through `migrate --to B` (the service
//! address moves with it): every reply is the previous one plus one (no
//! increment lost or applied twice), the connection never breaks, and the
//! counter read afterwards on B over a new connection is the last reply.
mod common;

use common::hosts::{pair, Hosts};
use common::{field, Procs};
use std::process::Command;
use std::time::Duration;

const REDIS: &str = "/usr/bin/redis-server";
const PYTHON: &str = "/usr/bin/python3";
const SERVICE: &str = "198.18.0.100";
const PORT: &str = "7379";

/// `incr HOST PORT STOPFILE`: INCR over one connection until STOPFILE
/// exists; prints `n=N` every 200 replies and `done last=N` at the end;
/// exits non-zero on a broken connection or a reply that is not the
/// previous one plus one. `get HOST PORT`: prints the counter.
const CLIENT: &str = r#"
import os, socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.create_connection((host, port), timeout=30)
f = s.makefile("rb")
def call(*args):
    req = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    s.sendall(req)
    line = f.readline()
    if not line.endswith(b"\r\n"):
        sys.exit(f"connection broken: {line!r}")
    if line[:1] == b"$":
        n = int(line[1:])
        return b"" if n < 0 else f.read(n + 2)[:-2]
    return line[1:-2]
if mode == "get":
    print(call(b"GET", b"counter").decode())
    sys.exit(0)
prev = int(call(b"INCR", b"counter"))
print(f"n={prev}", flush=True)
while not os.path.exists(sys.argv[4]):
    n = int(call(b"INCR", b"counter"))
    if n != prev + 1:
        sys.exit(f"reply {n} after {prev}")
    prev = n
    if n % 200 == 0:
        print(f"n={n}", flush=True)
print(f"done last={prev}", flush=True)
"#;

/// Wait until the client printed a reply of at least `n` (panics with its
/// output, and why it stopped, after `timeout`).
fn wait_replies(w: &common::Workload, n: u64, timeout: Duration) {
    w.out.wait_for(0, timeout, &format!("a reply of {n}"), |l| {
        let got: u64 = l.strip_prefix("n=")?.parse().ok()?;
        (got >= n).then_some(())
    });
}

fn replies(w: &common::Workload) -> u64 {
    w.out
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix("n=")?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn redis_counter_loop_from_c_survives_migration() {
    let _serial = common::setup();
    for bin in [REDIS, PYTHON] {
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: scripts/setup and .ci/run install it"
        );
    }
    let h = Hosts::up_as("frm", "a");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let data = h.tmp().join("redis");
    std::fs::create_dir_all(&data).expect("mkdir");
    let mut cmd: Command = h.command(&[
        "exec-a",
        REDIS,
        "--port",
        PORT,
        "--bind",
        SERVICE,
        "--save",
        "",
        "--appendonly",
        "no",
        // Clients come from C, not loopback.
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
        "--dir",
        data.to_str().expect("utf-8"),
    ]);
    cmd.env_remove("NOTIFY_SOCKET");
    let server = procs.spawn(cmd, h.tmp(), "redis");
    common::wait_until(common::LINE_TIMEOUT, "redis to listen", || {
        h.exec_c(&[PYTHON, "-c", CLIENT, "get", SERVICE, PORT])
            .status
            .success()
            .then_some(())
    });
    let stop = h.tmp().join("stop-client");
    let client = procs.spawn(
        h.command(&[
            "exec-c",
            PYTHON,
            "-c",
            CLIENT,
            "incr",
            SERVICE,
            PORT,
            stop.to_str().expect("utf-8"),
        ]),
        h.tmp(),
        "client",
    );
    wait_replies(&client, 1000, common::LINE_TIMEOUT);

    h.migrate_with_address(&mut procs, server.pid);

    // The same connection goes on, served by B.
    let after = replies(&client);
    wait_replies(&client, after + 1000, Duration::from_secs(30));
    std::fs::write(&stop, b"").expect("stop the client");
    let (_, done) = client.out.wait_line(0, "done ");
    let status = procs.reap(client.pid).expect("reap the client");
    assert_eq!(
        status.code(),
        Some(0),
        "client: {status}; {}",
        client.out.lines().join("\n")
    );
    let last = field(&done, "last").expect("last=").to_string();
    let got = h.exec_c(&[PYTHON, "-c", CLIENT, "get", SERVICE, PORT]);
    got.assert_ok();
    assert_eq!(
        got.stdout.trim(),
        last,
        "the counter on B against the last reply"
    );
}
