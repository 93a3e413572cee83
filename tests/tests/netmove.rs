//! The network side of a migration, on the three hosts of `scripts/hosts`
//! (A, B and client C on one bridge; the service address starts on A as a
//! secondary address): the service address moves from A to B and C reaches
//! it on B at once (the announcement updated C's neighbour entry); its
//! guards put it back on A when the move fails; addresses that cannot move
//! are refused with the reason; the nftables block drops TCP to the service
//! (no reset: the client's SYN goes unanswered and its retransmission gets
//! through once the block is gone) and leaves no table behind.
//!
//! The engine's functions act in the network namespace of the calling
//! thread: each call runs on a thread that entered the host's namespace.
mod common;

use common::hosts::Hosts;
use ferry_engine::net::{addr, block, NetError};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

const A_OWN: &str = "198.18.0.1";
const SERVICE: &str = "198.18.0.100";
const SERVICE6: &str = "2001:2:0:1::100";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The network namespaces of one topology.
struct Net {
    a: String,
    b: String,
    c: String,
}

impl Net {
    fn of(h: &Hosts) -> Net {
        Net {
            a: format!("{}-a", h.prefix),
            b: format!("{}-b", h.prefix),
            c: format!("{}-c", h.prefix),
        }
    }
}

/// Run `f` on a thread in network namespace `netns` (of `ip netns`).
fn in_ns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns with an open namespace fd; it changes only this
        // thread's network namespace.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// `ip -n NETNS ARGS`; its stdout.
fn ip_cmd(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", netns])
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {netns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The addresses (without prefix length) on `dev` in `netns`, and whether
/// each is secondary.
fn addrs_on(netns: &str, dev: &str) -> Vec<(IpAddr, bool)> {
    ip_cmd(netns, &["-o", "addr", "show", "dev", dev])
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|x| *x == "inet" || *x == "inet6")?;
            let a = w.get(at + 1)?.split('/').next()?.parse().ok()?;
            Some((a, w[at + 2..].contains(&"secondary")))
        })
        .collect()
}

fn has(netns: &str, dev: &str, a: IpAddr) -> bool {
    addrs_on(netns, dev).iter().any(|(x, _)| *x == a)
}

/// The hardware address of `dev` in `netns`.
fn mac(netns: &str, dev: &str) -> String {
    let out = ip_cmd(netns, &["-o", "link", "show", "dev", dev]);
    let w: Vec<&str> = out.split_whitespace().collect();
    let at = w
        .iter()
        .position(|x| *x == "link/ether")
        .unwrap_or_else(|| panic!("no link/ether in {out:?}"));
    w[at + 1].to_string()
}

/// The hardware address C's neighbour entry for `a` has (None without one).
fn neigh_of_c(net: &Net, a: IpAddr) -> Option<String> {
    let out = ip_cmd(&net.c, &["neigh", "show", &a.to_string(), "dev", "veth-c"]);
    let w: Vec<&str> = out.split_whitespace().collect();
    let at = w.iter().position(|x| *x == "lladdr")?;
    Some(w.get(at + 1)?.to_string())
}

/// Wait (up to 5 s) until `f` holds.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A listener on `a` (port chosen by the kernel) in `netns`.
fn listen(netns: &str, a: IpAddr) -> TcpListener {
    in_ns(netns, move || {
        TcpListener::bind(SocketAddr::new(a, 0)).unwrap_or_else(|e| panic!("bind {a}: {e}"))
    })
}

/// C connects to `to` (timeout `timeout`).
fn connect_from_c(net: &Net, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    in_ns(&net.c, move || TcpStream::connect_timeout(&to, timeout))
}

/// C connects to a listener on `a` in `netns` and they exchange a line:
/// `netns` is where `a` answers.
fn served_by(net: &Net, netns: &str, a: IpAddr) {
    let l = listen(netns, a);
    let to = l.local_addr().unwrap();
    let mut s = connect_from_c(net, to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("C cannot connect to {to} (listener in {netns}): {e}"));
    l.set_nonblocking(false).unwrap();
    let (mut conn, peer) = l.accept().expect("accept");
    assert_eq!(
        peer,
        s.local_addr().unwrap(),
        "the listener in {netns} accepted someone else"
    );
    s.write_all(b"ping").unwrap();
    let mut buf = [0; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

/// Our nftables tables in `netns`.
fn tables(netns: &str) -> Vec<String> {
    in_ns(netns, || block::tables().expect("list tables"))
}

/// Nothing of ours left: the service addresses on A only, no table on A or B.
fn assert_clean(net: &Net) {
    for a in [ip(SERVICE), ip(SERVICE6)] {
        assert!(has(&net.a, "veth-a", a), "{a} is not back on A");
        assert!(!has(&net.b, "veth-b", a), "{a} is left on B");
    }
    assert_eq!(tables(&net.a), Vec::<String>::new(), "tables left on A");
    assert_eq!(tables(&net.b), Vec::<String>::new(), "tables left on B");
}

/// `down`, then no namespace of the topology is left.
fn down_and_check(h: Hosts) {
    let prefix = format!("{}-", h.prefix);
    drop(h);
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    assert_eq!(left, Vec::<String>::new(), "namespaces left after down");
}

#[test]
fn the_service_address_moves_from_a_to_b_and_c_reaches_it_there() {
    let _serial = common::setup();
    let h = Hosts::up_as("fnm", "m");
    let net = Net::of(&h);
    let (mac_a, mac_b) = (mac(&net.a, "veth-a"), mac(&net.b, "veth-b"));
    for (service, plen) in [(ip(SERVICE), 24), (ip(SERVICE6), 64)] {
        // C talks to the service on A: its neighbour entry is A's.
        served_by(&net, &net.a, service);
        assert_eq!(neigh_of_c(&net, service), Some(mac_a.clone()), "{service}");

        let moving = in_ns(&net.a, move || addr::movable(&[service]).expect("movable"));
        assert_eq!(moving.len(), 1, "{moving:?}");
        let h_a = moving[0].clone();
        assert_eq!(
            (h_a.addr, h_a.prefix_len, h_a.dev.as_str()),
            (service, plen, "veth-a")
        );

        let removed = in_ns(&net.a, move || addr::remove(&h_a).expect("remove on A"));
        assert!(!has(&net.a, "veth-a", service), "{service} still on A");
        // The switchover order on B: block, add, (sockets), announce,
        // unblock. While blocked, B does not answer C (a reset would kill
        // a migrated connection whose socket is not there yet).
        let guard = in_ns(&net.b, move || {
            block::install("sw", &[service], &[]).expect("block on B")
        });
        let added = in_ns(&net.b, move || {
            addr::add(service, plen, None).expect("add on B")
        });
        assert_eq!(
            added.addr().dev,
            "veth-b",
            "put on the interface with the subnet"
        );
        assert!(has(&net.b, "veth-b", service), "{service} not on B");
        // Nothing else tells C: only the announcement moves its entry.
        added.announce().expect("announce on B");
        wait_for(
            &format!(
                "C's neighbour entry for {service} is not B's ({mac_b}) after the announcement"
            ),
            || neigh_of_c(&net, service).as_deref() == Some(mac_b.as_str()),
        );
        let probe = SocketAddr::new(service, 9);
        let e = connect_from_c(&net, probe, Duration::from_millis(800))
            .expect_err("B answered port 9 while blocked");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "B answered: {e}");
        assert!(guard.dropped().expect("counters") >= 1, "{service}");
        guard.remove().expect("unblock B");
        let e = connect_from_c(&net, probe, Duration::from_secs(5)).expect_err("port 9 on B");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        served_by(&net, &net.b, service);
        removed.commit();
        added.commit();
        // Committed: the address stays on B (secondary there too: B's own
        // address keeps the subnet), gone from A.
        assert!(!has(&net.a, "veth-a", service), "{service} came back to A");
        if service.is_ipv4() {
            assert!(
                addrs_on(&net.b, "veth-b").contains(&(service, true)),
                "{service} is not a secondary address on B"
            );
        }
        // So it can move on from B, and C reaches it there.
        let again = in_ns(&net.b, move || {
            addr::movable(&[service]).expect("movable on B")
        });
        assert_eq!(again.len(), 1);
        served_by(&net, &net.b, service);
    }
    assert_eq!(tables(&net.a), Vec::<String>::new());
    assert_eq!(tables(&net.b), Vec::<String>::new());
    down_and_check(h);
}

#[test]
fn a_failed_move_puts_the_address_back_on_a() {
    let _serial = common::setup();
    let h = Hosts::up_as("fnm", "f");
    let net = Net::of(&h);
    let mac_a = mac(&net.a, "veth-a");
    let service = ip(SERVICE);
    served_by(&net, &net.a, service);

    // An address that is already here is not added again (nor taken off
    // by the failed add's guard).
    let err = in_ns(&net.a, move || addr::add(service, 24, None)).expect_err("added twice");
    assert!(
        matches!(err, NetError::AlreadyHere { ref dev, .. } if dev == "veth-a"),
        "{err}"
    );
    assert!(has(&net.a, "veth-a", service));

    // A move that fails after A gave the address up: dropping the guards
    // uncommitted takes it off B and puts it back on A, which announces it.
    let h_a = in_ns(&net.a, move || {
        addr::movable(&[service]).expect("movable").remove(0)
    });
    let removed = in_ns(&net.a, move || addr::remove(&h_a).expect("remove on A"));
    let bad = in_ns(&net.b, move || addr::add(service, 24, Some("nosuch0")));
    assert!(
        matches!(bad, Err(NetError::NoSuchDevice { ref dev }) if dev == "nosuch0"),
        "{bad:?}"
    );
    let added = in_ns(&net.b, move || {
        addr::add(service, 24, None).expect("add on B")
    });
    added.announce().expect("announce on B");
    wait_for("C's entry did not move to B", || {
        neigh_of_c(&net, service) != Some(mac_a.clone())
    });
    drop(added);
    assert!(
        !has(&net.b, "veth-b", service),
        "the Added guard left it on B"
    );
    drop(removed);
    assert!(
        addrs_on(&net.a, "veth-a").contains(&(service, true)),
        "not back on A as a secondary address"
    );
    wait_for("C's entry did not come back to A", || {
        neigh_of_c(&net, service) == Some(mac_a.clone())
    });
    served_by(&net, &net.a, service);

    // An address for which B has no subnet, and one that is not A's.
    let other = ip("198.19.0.100");
    let bad = in_ns(&net.b, move || addr::add(other, 24, None));
    assert!(matches!(bad, Err(NetError::NoSubnet { .. })), "{bad:?}");
    let bad = in_ns(&net.a, move || {
        addr::remove(&addr::HostAddr {
            addr: other,
            prefix_len: 24,
            dev: "veth-a".into(),
            index: 0,
        })
    });
    assert!(
        bad.is_err(),
        "removing an address A does not have succeeded"
    );
    assert_clean(&net);
    down_and_check(h);
}

#[test]
fn addresses_that_cannot_move_are_refused_with_the_reason() {
    let _serial = common::setup();
    let h = Hosts::up_as("fnm", "r");
    let net = Net::of(&h);
    let addrs = [
        ip(A_OWN),
        ip("127.0.0.1"),
        ip("::ffff:198.18.0.100"),
        ip("0.0.0.0"),
        ip("198.18.0.7"),
        ip(SERVICE6),
    ];
    let verdicts = in_ns(&net.a, move || addr::classify(&addrs).expect("classify"));
    let got: Vec<String> = verdicts
        .iter()
        .map(|(a, v)| match v {
            addr::Verdict::Move(h) => format!("{a} moves from {}", h.dev),
            addr::Verdict::Wildcard => format!("{a} wildcard"),
            addr::Verdict::Refuse(r) => format!("{a} refused: {:?}", r.why),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            "198.18.0.1 refused: Primary { dev: \"veth-a\", prefix_len: 24 }".to_string(),
            "127.0.0.1 refused: Loopback".into(),
            "198.18.0.100 moves from veth-a".into(),
            "0.0.0.0 wildcard".into(),
            "198.18.0.7 refused: NotHere".into(),
            "2001:2:0:1::100 moves from veth-a".into(),
        ]
    );
    let err = in_ns(&net.a, move || addr::movable(&addrs)).expect_err("movable accepted A's own");
    let msg = err.to_string();
    for needle in [
        "198.18.0.1 is the primary address",
        "127.0.0.1 is a loopback address",
        "198.18.0.7 is not an address of this host",
        "address of its own",
        "--drop-connections",
    ] {
        assert!(msg.contains(needle), "no {needle:?} in: {msg}");
    }
    // On B its only IPv4 address cannot move either.
    let err = in_ns(&net.b, || addr::movable(&[ip("198.18.0.2")])).expect_err("B's own");
    assert!(
        err.to_string().contains("198.18.0.2 is the only address"),
        "{err}"
    );
    // Refusing touched nothing.
    assert_clean(&net);
    down_and_check(h);
}

#[test]
fn the_block_drops_tcp_to_the_service_without_reset_and_is_gone_after() {
    let _serial = common::setup();
    let h = Hosts::up_as("fnm", "b");
    let net = Net::of(&h);
    let service = ip(SERVICE);
    let short = Duration::from_millis(800);

    // A listener on every address of A, and a port with no listener (its
    // listener is closed again): refused (an RST) without the block.
    let l = listen(&net.a, ip("0.0.0.0"));
    let port = l.local_addr().unwrap().port();
    let closed = {
        let l = listen(&net.a, service);
        l.local_addr().unwrap()
    };
    let e = connect_from_c(&net, closed, Duration::from_secs(5)).expect_err("closed port");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // The block covers the service address on both ports.
    let ports = [port, closed.port()];
    let b = in_ns(&net.a, move || {
        block::install("t1", &[service], &ports).expect("install")
    });
    assert_eq!(tables(&net.a), vec!["ferry_t1".to_string()]);
    // Blocked: no answer at all, neither from the closed port (no RST) nor
    // from the listener; the rule counted the dropped SYNs.
    let e = connect_from_c(&net, closed, short).expect_err("blocked closed port answered");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::TimedOut,
        "an answer came: {e}"
    );
    let e = connect_from_c(&net, SocketAddr::new(service, port), short)
        .expect_err("blocked listener answered");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::TimedOut,
        "an answer came: {e}"
    );
    let dropped = b.dropped().expect("counters");
    assert!(dropped >= 2, "the rule counted {dropped} packets");
    // Only the service address is blocked: A's own address answers.
    connect_from_c(
        &net,
        SocketAddr::new(ip(A_OWN), port),
        Duration::from_secs(5),
    )
    .expect("A's own address is blocked too");
    l.set_nonblocking(false).unwrap();
    l.accept().expect("accept on A's own address");

    // A client that connects during the block gets through once it is
    // removed: its SYN retransmission reaches the listener.
    let before = b.dropped().unwrap();
    let client = {
        let c = net.c.clone();
        std::thread::spawn(move || {
            in_ns(&c, move || {
                TcpStream::connect_timeout(&SocketAddr::new(service, port), Duration::from_secs(20))
            })
        })
    };
    wait_for("the client's SYN was not dropped", || {
        b.dropped().unwrap() > before
    });
    b.remove().expect("remove the block");
    assert_eq!(
        tables(&net.a),
        Vec::<String>::new(),
        "table left after remove"
    );
    let s = client
        .join()
        .unwrap()
        .expect("the connection made during the block failed");
    let (_, peer) = l.accept().expect("accept after the block");
    assert_eq!(peer, s.local_addr().unwrap());
    let e = connect_from_c(&net, closed, Duration::from_secs(5)).expect_err("closed port");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // Dropped uncommitted (a failure), the guard deletes its table; both
    // families and every port when none is named.
    let g = in_ns(&net.a, move || {
        block::install("t2", &[service, ip(SERVICE6)], &[]).expect("install")
    });
    assert_eq!(tables(&net.a), vec!["ferry_t2".to_string()]);
    let e = connect_from_c(&net, SocketAddr::new(ip(SERVICE6), closed.port()), short)
        .expect_err("blocked IPv6");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    drop(g);
    assert_eq!(
        tables(&net.a),
        Vec::<String>::new(),
        "the guard left its table"
    );

    // The same tag twice is refused, clearly.
    let g = in_ns(&net.a, move || {
        block::install("t3", &[service], &[]).expect("install")
    });
    let again = in_ns(&net.a, move || block::install("t3", &[service], &[]));
    let e = again.expect_err("a second table with the same tag");
    assert!(e.to_string().contains("already exists"), "{e}");
    // A crashed agent's table: cleanup removes it.
    std::mem::forget(g);
    assert_eq!(tables(&net.a), vec!["ferry_t3".to_string()]);
    let removed = in_ns(&net.a, || block::cleanup().expect("cleanup"));
    assert_eq!(removed, vec!["ferry_t3".to_string()]);
    assert_clean(&net);
    down_and_check(h);
}
