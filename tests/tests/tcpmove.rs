//! A TCP connection survives `migrate --to` and the service address moves
//! with the process, on the three hosts of `scripts/hosts` (A, B and client
//! C on one bridge; the service address starts on A as a secondary
//! address). The server (`wl-tcpmove server`) runs on A, the client
//! (`wl-tcpmove client`) on C; both stream sequence-numbered records to the
//! other and check the sequence they receive, and the client dies on any
//! socket error (a reset). What is checked: nothing lost, repeated or
//! reset either way through the migration, the connection keeps going, a
//! new connection reaches the server on B, the address is on B and gone
//! from A, and no nftables table of ours is left on either host; an
//! address that cannot move is refused before freezing; a dest-agent
//! killed at the switchover leaves the connection going on A, the address
//! back on A and no table behind.
mod common;

use common::hosts::{pair, Hosts, ADDR_B};
use common::{field, Procs, Workload};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

const SERVICE: &str = "198.18.0.100";
const SERVICE6: &str = "2001:2:0:1::100";
const A_OWN: &str = "198.18.0.1";
const BIN: &str = env!("CARGO_BIN_EXE_wl-tcpmove");
/// How long the connection may take to come back after a failed
/// migration (the client's retransmissions back off while it is blocked).
const RECOVER: Duration = Duration::from_secs(60);

/// `host:port` for an address (IPv6 in brackets).
fn sock(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// The addresses of host `side` ("a", "b") on its veth, as `ip -o addr`
/// prints them.
fn addrs(h: &Hosts, side: &str) -> String {
    let r = h.run(&[
        &format!("exec-{side}"),
        "ip",
        "-o",
        "addr",
        "show",
        "dev",
        &format!("veth-{side}"),
    ]);
    r.assert_ok();
    r.stdout
}

fn has_addr(h: &Hosts, side: &str, addr: &str) -> bool {
    addrs(h, side)
        .split_whitespace()
        .any(|w| w.split('/').next() == Some(addr))
}

/// Our nftables tables on host `side`.
fn ferry_tables(h: &Hosts, side: &str) -> Vec<String> {
    let r = h.run(&[&format!("exec-{side}"), "nft", "list", "tables"]);
    r.assert_ok();
    r.stdout
        .lines()
        .filter(|l| l.contains("ferry"))
        .map(str::to_string)
        .collect()
}

/// The server on A and the client on C, connected and streaming.
struct Pair {
    server: Workload,
    client: Workload,
    stop: std::path::PathBuf,
    at: String,
}

fn start_pair(h: &Hosts, procs: &mut Procs, addr: &str, port: u16) -> Pair {
    let at = sock(addr, port);
    let server = procs.spawn(
        h.command(&["exec-a", BIN, "server", &at]),
        h.tmp(),
        "server",
    );
    let (_, ready) = server.out.wait_line(0, "ready ");
    assert_eq!(
        field(&ready, "pid"),
        Some(server.pid.to_string().as_str()),
        "the spawned PID is not the server's"
    );
    let stop = h.tmp().join("stop-client");
    let client = procs.spawn(
        h.command(&["exec-c", BIN, "client", &at, stop.to_str().unwrap()]),
        h.tmp(),
        "client",
    );
    client.out.wait_line(0, "connected");
    server.out.wait_line(0, "connected");
    let p = Pair {
        server,
        client,
        stop,
        at,
    };
    // Streaming both ways.
    keeps_going(&p, 1000, common::LINE_TIMEOUT);
    p
}

/// Records the client received, from its last `rx=` line.
fn client_rx(p: &Pair) -> u64 {
    p.client
        .out
        .lines()
        .iter()
        .filter_map(|l| {
            l.strip_prefix("rx=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Wait until the client received `more` records beyond what it had.
fn keeps_going(p: &Pair, more: u64, timeout: Duration) {
    let from = client_rx(p);
    p.client
        .out
        .wait_for(0, timeout, "more records at the client", |l| {
            let n: u64 = l
                .strip_prefix("rx=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            (n >= from + more).then_some(())
        });
}

/// `wl-tcpmove ask` from C: the server's `rx=N bad=B eof=E` line.
fn ask(h: &Hosts, at: &str) -> String {
    let r = h.exec_c(&[BIN, "ask", at]);
    r.assert_ok();
    r.stdout.trim().to_string()
}

/// Stop the client; check that neither side lost, repeated or reordered a
/// record (the client's `done` line and the server's count after it saw
/// the client's end).
fn finish(h: &Hosts, procs: &mut Procs, p: &Pair) {
    std::fs::write(&p.stop, b"").unwrap();
    let (_, done) = p.client.out.wait_line(0, "done ");
    let status = procs.reap(p.client.pid).expect("reap the client");
    assert_eq!(status.code(), Some(0), "client: {status}; {done}");
    assert_eq!(field(&done, "bad"), Some("0"), "server → client: {done}");
    let tx = field(&done, "tx").unwrap().to_string();
    let line = common::wait_until(
        Duration::from_secs(10),
        "the server to see the client's end",
        || {
            let l = ask(h, &p.at);
            (field(&l, "eof") == Some("1")).then_some(l)
        },
    );
    assert_eq!(field(&line, "bad"), Some("0"), "client → server: {line}");
    assert_eq!(
        field(&line, "rx"),
        Some(tx.as_str()),
        "the server received every record the client sent, once: {line} / {done}"
    );
}

fn migrates_with_its_address(tag: &str, addr: &str, port: u16) {
    let _serial = common::setup();
    let h = Hosts::up_as("tcpm", tag);
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let p = start_pair(&h, &mut procs, addr, port);
    let pid = p.server.pid.to_string();

    // The client keeps streaming throughout.
    let r = h.migrate("a", &["--to", ADDR_B, &pid, "--json"]);
    r.assert_ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", r.stdout));
    let moved = v["addresses_moved"].as_array().expect("addresses_moved");
    assert_eq!(moved.len(), 1, "{v}");
    assert!(
        moved[0].as_str().unwrap().starts_with(&format!("{addr}/")),
        "{v}"
    );

    // Gone from A, running on B with the same PID.
    let status = procs.reap(p.server.pid).expect("reap the source copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy: {status}"
    );
    let comm = h.exec_b(&["cat", &format!("/proc/{pid}/comm")]);
    comm.assert_ok();
    assert_eq!(comm.stdout.trim(), "wl-tcpmove");

    // The address moved; no rule is left.
    assert!(has_addr(&h, "b", addr), "B: {}", addrs(&h, "b"));
    assert!(!has_addr(&h, "a", addr), "A: {}", addrs(&h, "a"));
    assert_eq!(ferry_tables(&h, "a"), Vec::<String>::new());
    assert_eq!(ferry_tables(&h, "b"), Vec::<String>::new());

    // The connection goes on (the client dies on a reset), and a new
    // connection to the address is accepted by the server on B.
    keeps_going(&p, 1000, Duration::from_secs(20));
    let line = ask(&h, &p.at);
    assert_eq!(field(&line, "bad"), Some("0"), "{line}");
    assert_eq!(field(&line, "eof"), Some("0"), "{line}");
    finish(&h, &mut procs, &p);
}

#[test]
fn connection_and_address_move_to_b() {
    migrates_with_its_address("4", SERVICE, 7070);
}

#[test]
fn ipv6_connection_and_address_move_to_b() {
    migrates_with_its_address("6", SERVICE6, 7071);
}

#[test]
fn primary_address_is_refused_before_freezing() {
    let _serial = common::setup();
    let h = Hosts::up_as("tcpm", "p");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let p = start_pair(&h, &mut procs, A_OWN, 7072);
    let pid = p.server.pid.to_string();

    let r = h.migrate("a", &["--to", ADDR_B, &pid]);
    r.assert_error(&[A_OWN, "primary address", "not touched"]);
    common::assert_running_untraced(p.server.pid);
    assert!(has_addr(&h, "a", A_OWN));
    assert_eq!(ferry_tables(&h, "a"), Vec::<String>::new());
    keeps_going(&p, 1000, Duration::from_secs(20));
    finish(&h, &mut procs, &p);
}

#[test]
fn dest_agent_killed_at_switchover_leaves_the_connection_on_a() {
    let _serial = common::setup();
    let h = Hosts::up_as("tcpm", "k");
    let mut procs = Procs::new();
    pair(&h);
    let agent = h.start_agent(
        &mut procs,
        "b",
        7420,
        &[("FERRY_DEST_PAUSE_AT", "switchover")],
        "dest-paused",
    );
    let p = start_pair(&h, &mut procs, SERVICE, 7073);
    let pid = p.server.pid.to_string();

    let m = h.migrate_bg("a", &["--to", ADDR_B, &pid], "migrate");
    agent.wait_log("pausing at switchover", Duration::from_secs(30));
    // Mid-switchover: the address left A (and is not on B yet), A blocks it.
    assert!(!has_addr(&h, "a", SERVICE), "A: {}", addrs(&h, "a"));
    assert!(!has_addr(&h, "b", SERVICE), "B: {}", addrs(&h, "b"));
    assert_eq!(ferry_tables(&h, "a").len(), 1, "the block on A");
    agent.kill(&mut procs);
    let r = m.wait(Duration::from_secs(60));
    assert_eq!(r.status.code(), Some(1), "migrate: {}", r.stderr);
    assert!(r.stderr.contains("resumed on this host"), "{}", r.stderr);

    // Back on A as before.
    common::assert_running_untraced(p.server.pid);
    assert!(has_addr(&h, "a", SERVICE), "A: {}", addrs(&h, "a"));
    assert!(!has_addr(&h, "b", SERVICE), "B: {}", addrs(&h, "b"));
    assert_eq!(ferry_tables(&h, "a"), Vec::<String>::new());
    assert_eq!(ferry_tables(&h, "b"), Vec::<String>::new());
    keeps_going(&p, 1000, RECOVER);
    finish(&h, &mut procs, &p);
}
