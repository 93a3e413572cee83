//! Real TCP connections on loopback, dumped through repair mode, closed in
//! repair mode and rebuilt: the peer goes on as if nothing happened.

use super::sys;
use super::tcp;
use super::RepairSet;
use ferry_protocol::net::{TcpState, AF_INET6};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

/// Byte `n` of a test stream.
fn pattern(n: usize, salt: u8) -> u8 {
    ((n % 251) as u8).wrapping_add(salt)
}

fn stream(from: usize, len: usize, salt: u8) -> Vec<u8> {
    (from..from + len).map(|n| pattern(n, salt)).collect()
}

fn q(fd: BorrowedFd<'_>, req: libc::c_ulong) -> i32 {
    sys::ioctl_int(fd, req).expect("queue ioctl")
}

/// Poll `cond` until it holds (the kernel settles in microseconds on
/// loopback; the bound only keeps a broken kernel from hanging the test).
fn settle(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..5000 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("{what} did not happen");
}

/// A connected pair: `(client, server)`, the client with a small receive
/// buffer so that the server's send queue backs up.
fn pair(listen_on: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(listen_on).expect("listen");
    let addr = l.local_addr().expect("addr");
    let domain = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    let c = sys::tcp_socket(domain).expect("socket");
    sys::set_int(c.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 16 << 10).expect("SO_RCVBUF");
    sys::connect(c.as_fd(), &addr, domain).expect("connect");
    let c = TcpStream::from(c);
    let (s, _) = l.accept().expect("accept");
    for t in [&c, &s] {
        t.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
    }
    (c, s)
}

/// Fill the server's send queue (the client does not read) and the
/// server's receive queue (the server does not read); returns the bytes
/// written each way `(to_client, to_server)`.
fn load(c: &TcpStream, s: &TcpStream) -> (usize, usize) {
    let to_server = 40_000;
    (&*c)
        .write_all(&stream(0, to_server, 1))
        .expect("client write");
    settle("client data in the server's receive queue", || {
        q(s.as_fd(), sys::SIOCINQ) as usize == to_server && q(c.as_fd(), sys::SIOCOUTQ) == 0
    });
    s.set_nonblocking(true).expect("nonblocking");
    let mut to_client = 0;
    loop {
        match (&*s).write(&stream(to_client, 4096, 2)) {
            Ok(n) => to_client += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("server write: {e}"),
        }
    }
    s.set_nonblocking(false).expect("blocking");
    // Everything the server could send was acknowledged; the rest waits
    // for the client's window.
    settle("the server's sent data acknowledged", || {
        q(s.as_fd(), sys::SIOCOUTQ) == q(s.as_fd(), sys::SIOCOUTQNSD)
    });
    (to_client, to_server)
}

fn read_exact(mut r: &TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).expect("read");
    buf
}

fn so_error(fd: BorrowedFd<'_>) -> i32 {
    sys::get_int(fd, libc::SOL_SOCKET, libc::SO_ERROR).expect("SO_ERROR")
}

/// Dump the server end, close it in repair mode, rebuild it, and check
/// that both directions go on exactly.
fn move_server_end(listen_on: &str) {
    let (c, s) = pair(listen_on);
    sys::set_int(s.as_fd(), libc::SOL_TCP, libc::TCP_NODELAY, 1).expect("NODELAY");
    sys::set_int(s.as_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).expect("KEEPALIVE");
    sys::set_int(s.as_fd(), libc::SOL_TCP, libc::TCP_KEEPIDLE, 77).expect("KEEPIDLE");
    let (to_client, to_server) = load(&c, &s);

    let repair = RepairSet::default();
    let copy = s.as_fd().try_clone_to_owned().expect("dup");
    let image = tcp::dump(copy, (0, 0), "the server end", &repair).expect("dump");
    image.check().expect("a valid record");
    assert_eq!(repair.len(), 1);
    let TcpState::Established(conn) = &image.state else {
        panic!("not established: {image:?}");
    };
    assert_eq!(conn.recv_queue, stream(0, to_server, 1), "receive queue");
    // Data the server could not send yet is counted as sent (never
    // transmitted; retransmitted after the rebuild).
    assert_eq!(conn.unsent_len, 0, "{conn:?}");
    assert!(conn.send_queue.len() > 100_000, "{}", conn.send_queue.len());
    assert_eq!(
        conn.send_queue,
        stream(to_client - conn.send_queue.len(), conn.send_queue.len(), 2)
    );
    assert_eq!(conn.local, s.local_addr().expect("addr"));
    assert_eq!(conn.peer, c.local_addr().expect("addr"));
    assert!(image.options.nodelay && image.options.keepalive);
    assert_eq!(image.options.keepidle, 77);
    if listen_on.starts_with('[') {
        assert_eq!(image.family, AF_INET6);
    }

    // The source goes away in repair mode: nothing reaches the client.
    repair.close_in_repair();
    drop(s);
    assert_eq!(so_error(c.as_fd()), 0, "the client saw an error");

    let fd = tcp::open(&image, 0, "the server end").expect("rebuild");
    let s2 = TcpStream::from(fd);
    s2.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let again = tcp::dump(
        s2.as_fd().try_clone_to_owned().expect("dup"),
        (0, 0),
        "x",
        &RepairSet::default(),
    )
    .expect("dump the rebuilt socket");
    let TcpState::Established(c2) = &again.state else {
        panic!("rebuilt socket not established");
    };
    assert_eq!(c2.recv_seq, conn.recv_seq);
    assert_eq!(c2.mss, conn.mss);
    let info = |fd| -> libc::tcp_info {
        sys::getsockopt(fd, libc::SOL_TCP, libc::TCP_INFO, 32).expect("TCP_INFO")
    };
    let (mss, peer_mss) = (info(s2.as_fd()).tcpi_snd_mss, info(c.as_fd()).tcpi_snd_mss);
    assert!(
        mss >= peer_mss.min(32767) - 40,
        "segments of {mss} bytes, not the default 536 (the peer sends {peer_mss})"
    );
    assert_eq!(c2.wscale, conn.wscale);
    assert_eq!((c2.sack, c2.timestamps), (conn.sack, conn.timestamps));
    assert!(again.options.nodelay && again.options.keepalive);
    assert_eq!(again.options.keepidle, 77);
    // (dumping it put it in repair mode, and dropping that set took it out)

    // Both directions continue where they were: no byte lost or repeated.
    let more = 30_000;
    let writer = {
        let s2w = s2.try_clone().expect("clone");
        std::thread::spawn(move || {
            (&s2w)
                .write_all(&stream(to_client, more, 2))
                .expect("server write after rebuild");
        })
    };
    assert_eq!(
        read_exact(&c, to_client + more),
        stream(0, to_client + more, 2)
    );
    writer.join().expect("writer");
    (&c).write_all(&stream(to_server, more, 1))
        .expect("client write after rebuild");
    assert_eq!(
        read_exact(&s2, to_server + more),
        stream(0, to_server + more, 1)
    );
    assert_eq!(so_error(c.as_fd()), 0);

    // And it closes cleanly: the client sees end of file.
    drop(s2);
    let mut rest = Vec::new();
    (&c).read_to_end(&mut rest)
        .expect("end of file, not a reset");
    assert!(rest.is_empty());
}

#[test]
fn established_ipv4_connection_moves_with_data_in_flight_both_ways() {
    move_server_end("127.0.0.1:0");
}

#[test]
fn established_ipv6_connection_moves_with_data_in_flight_both_ways() {
    move_server_end("[::1]:0");
}

#[test]
fn a_failed_checkpoint_leaves_repair_mode_and_the_connection_goes_on() {
    let (c, s) = pair("127.0.0.1:0");
    let repair = RepairSet::default();
    let copy = s.as_fd().try_clone_to_owned().expect("dup");
    tcp::dump(copy, (0, 0), "the server end", &repair).expect("dump");
    // In repair mode a plain read is refused.
    let mut b = [0u8; 1];
    let e = sys::recv(s.as_fd(), &mut b, libc::MSG_DONTWAIT).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    drop(repair); // no decision: the sockets leave repair mode
    (&c).write_all(b"ping").expect("write");
    assert_eq!(read_exact(&s, 4), b"ping");
    (&s).write_all(b"pong").expect("write");
    assert_eq!(read_exact(&c, 4), b"pong");
}

#[test]
fn listener_comes_back_on_its_port_with_its_backlog() {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = l.local_addr().expect("addr");
    let repair = RepairSet::default();
    let copy = l.as_fd().try_clone_to_owned().expect("dup");
    let image = tcp::dump(copy, (0, 0), "listener", &repair).expect("dump");
    assert!(repair.is_empty(), "a listener is not put in repair mode");
    let TcpState::Listen { addr: a, backlog } = image.state else {
        panic!("not listening: {image:?}");
    };
    assert_eq!(a, addr);
    assert_eq!(backlog, 128, "std listens with a backlog of 128");
    drop(l);
    let fd = tcp::open(&image, libc::O_NONBLOCK as u32, "listener").expect("rebuild");
    let l2 = TcpListener::from(fd);
    let c = TcpStream::connect(addr).expect("connect to the rebuilt listener");
    l2.set_nonblocking(false).expect("blocking");
    let (s, peer) = l2.accept().expect("accept");
    assert_eq!(peer, c.local_addr().expect("addr"));
    (&c).write_all(b"hi").expect("write");
    assert_eq!(read_exact(&s, 2), b"hi");
}

#[test]
fn listener_with_connections_waiting_is_refused() {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let _c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    settle("the connection in the accept queue", || {
        let info: libc::tcp_info =
            sys::getsockopt(l.as_fd(), libc::SOL_TCP, libc::TCP_INFO, 32).expect("info");
        info.tcpi_unacked == 1
    });
    let copy = l.as_fd().try_clone_to_owned().expect("dup");
    let e = tcp::dump(copy, (5, 6), "listener", &RepairSet::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("1 connections waiting to be accepted"),
        "{msg}"
    );
    assert!(msg.contains("fd 6 of process 5"), "{msg}");
}

#[test]
fn half_closed_connection_is_refused_naming_its_state() {
    let (c, s) = pair("127.0.0.1:0");
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    settle("the FIN", || {
        let info: libc::tcp_info =
            sys::getsockopt(s.as_fd(), libc::SOL_TCP, libc::TCP_INFO, 32).expect("info");
        info.tcpi_state == 8
    });
    let repair = RepairSet::default();
    let copy = s.as_fd().try_clone_to_owned().expect("dup");
    let msg = tcp::dump(copy, (1, 2), "s", &repair)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("CLOSE_WAIT"), "{msg}");
    assert!(repair.is_empty());
}

#[test]
fn other_sockets_are_refused_by_kind() {
    let (u, _v) = std::os::unix::net::UnixDatagram::pair().expect("pair");
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let me = std::process::id() as i32;
    for (fd, needle) in [
        (u.as_raw_fd(), "a unix datagram socket"),
        (a.as_raw_fd(), "a unix stream socket"),
    ] {
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).expect("link");
        let link = link.to_string_lossy().into_owned();
        let msg = super::classify(me, fd, &link, &RepairSet::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains(needle), "{msg}");
        assert!(msg.contains(&format!("fd {fd} ")), "{msg}");
    }
}

#[test]
fn an_image_of_an_unsupported_family_is_refused_on_restore() {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let copy = l.as_fd().try_clone_to_owned().expect("dup");
    let mut image = tcp::dump(copy, (0, 0), "l", &RepairSet::default()).expect("dump");
    image.family = 1;
    let msg = tcp::open(&image, 0, "open file 3").unwrap_err().to_string();
    assert!(msg.contains("unsupported address family 1"), "{msg}");
}

/// A UDP socket bound and connected, with options and two datagrams
/// queued: the datagrams are counted (and left to the process), the
/// socket comes back bound and connected with its options.
#[test]
fn udp_socket_comes_back_bound_and_connected() {
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("peer");
    let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    u.connect(peer.local_addr().expect("addr"))
        .expect("connect");
    u.set_broadcast(true).expect("broadcast");
    sys::set_int(u.as_fd(), libc::IPPROTO_IP, libc::IP_TOS, 0x10).expect("tos");
    let addr = u.local_addr().expect("addr");
    for m in [&b"one"[..], b"two"] {
        peer.send_to(m, addr).expect("send");
    }
    settle("two datagrams queued", || q(u.as_fd(), sys::SIOCINQ) == 3);
    let image = super::udp::dump(u.as_fd().try_clone_to_owned().expect("dup"), "u").expect("dump");
    image.check().expect("valid");
    assert_eq!(image.dropped, 2);
    assert_eq!(image.bound, Some(addr));
    assert_eq!(image.peer, Some(peer.local_addr().expect("addr")));
    assert!(image.options.broadcast);
    assert_eq!(image.options.tos, 0x10);
    // Counting consumed nothing and left the peek offset as it was.
    let mut buf = [0u8; 8];
    assert_eq!(u.peek(&mut buf).expect("peek"), 3);
    assert_eq!(&buf[..3], b"one");
    assert_eq!(
        sys::get_int(u.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF).expect("peek off"),
        -1
    );
    drop(u);

    let fd = super::udp::open(&image, 0, "u").expect("rebuild");
    let u2 = std::net::UdpSocket::from(fd);
    assert_eq!(u2.local_addr().expect("addr"), addr);
    assert!(u2.broadcast().expect("broadcast"));
    u2.send(b"back").expect("send on the connected socket");
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let (n, from) = peer.recv_from(&mut buf).expect("recv");
    assert_eq!((&buf[..n], from), (&b"back"[..], addr));
    peer.send_to(b"again", addr).expect("send");
    u2.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let n = u2.recv(&mut buf).expect("recv");
    assert_eq!(&buf[..n], b"again");
}
