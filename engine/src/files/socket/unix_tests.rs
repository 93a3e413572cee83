//! Unix sockets of real processes: scripted children hold them (inherited
//! from the test), are frozen and collected; the image is opened by the
//! agent and installed into stubs, whose copies of the sockets must hold
//! every queued byte and boundary and go on talking.

use super::unix_sys;
use crate::files::testkit::{frozen, image, process, Act, ScriptChild, TempDir};
use crate::files::{install, FileCollector, Opened, StdioPolicy};
use crate::shmem::{ShmemCollector, ShmemHandles};
use crate::testutil::{with_stub, StubGuard};
use crate::{Error, Result};
use ferry_protocol::model::{FdEntry, FileKind, OpenFile, TreeImage};
use ferry_protocol::unix::{UnixName, UnixSocket, UnixState, UnixType};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// The files of `pids` (each frozen while read), as one tree.
fn try_collect(pids: &[i32]) -> Result<(Vec<Vec<FdEntry>>, Vec<OpenFile>)> {
    frozen(pids, || {
        let mut files = FileCollector::new();
        let mut shmem = ShmemCollector::new();
        let mut fds = Vec::new();
        for &pid in pids {
            fds.push(files.task(pid, &mut shmem)?);
        }
        let (files, _, _) = files.finish()?;
        Ok((fds, files))
    })
}

fn tree(pids: &[i32], fds: Vec<Vec<FdEntry>>, files: Vec<OpenFile>) -> TreeImage {
    let tasks = pids.iter().zip(fds).map(|(&p, f)| process(p, f)).collect();
    let t = image(tasks, files, vec![]);
    let is_unix = |id| t.file(id).is_some();
    for f in &t.files {
        if let FileKind::Unix { socket } = &f.kind {
            socket.check(is_unix).expect("a valid record");
        }
    }
    t
}

/// The unix socket record of fd `fd` of the `task`-th process.
fn sock<'a>(fds: &[Vec<FdEntry>], files: &'a [OpenFile], task: usize, fd: i32) -> &'a UnixSocket {
    let id = fds[task].iter().find(|e| e.fd == fd).expect("fd").file;
    match &files.iter().find(|f| f.id == id).expect("file").kind {
        FileKind::Unix { socket } => socket,
        other => panic!("fd {fd} is not a unix socket: {other:?}"),
    }
}

fn file_id(fds: &[Vec<FdEntry>], task: usize, fd: i32) -> u32 {
    fds[task].iter().find(|e| e.fd == fd).expect("fd").file
}

/// Restore `t` into one stub per task; returns the stubs.
fn restore(t: &TreeImage, dir: &TempDir) -> Vec<StubGuard> {
    let stdio = StdioPolicy {
        log: dir.path.join("stdio.log"),
    };
    let opened = Opened::open_all(t, &ShmemHandles::default(), &stdio).expect("open_all");
    let mut out = Vec::new();
    for task in &t.tasks {
        let (g, r) = with_stub(true, |_, inj| install(inj, &task.fds, &opened));
        r.expect("install");
        out.push(g);
    }
    out
}

/// A copy of fd `fd` of `pid`.
fn grab(pid: i32, fd: i32) -> OwnedFd {
    let pidfd = crate::files::sys::pidfd_open(pid).expect("pidfd_open");
    crate::files::sys::pidfd_getfd(pidfd.as_fd(), fd).expect("pidfd_getfd")
}

fn send(fd: BorrowedFd<'_>, data: &[u8]) {
    assert_eq!(
        unix_sys::send(fd, data, None, None).expect("send"),
        data.len()
    );
}

/// One message (or stream read) of at most 256 KiB, not waiting.
fn recv(fd: BorrowedFd<'_>) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256 << 10];
    match super::sys::recv(fd, &mut buf, libc::MSG_DONTWAIT) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => None,
        Err(e) => panic!("recv: {e}"),
    }
}

/// Everything a stream socket has queued.
fn drain_stream(fd: BorrowedFd<'_>) -> Vec<u8> {
    let mut all = Vec::new();
    while let Some(b) = recv(fd) {
        if b.is_empty() {
            break;
        }
        all.extend(b);
    }
    all
}

/// Every message queued.
fn drain_messages(fd: BorrowedFd<'_>) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| recv(fd)).collect()
}

fn pattern(n: usize, salt: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i % 251) as u8).wrapping_add(salt))
        .collect()
}

fn keep(from: &OwnedFd, at: i32) -> Act {
    Act::Keep {
        from: from.as_raw_fd(),
        at,
    }
}

#[test]
fn stream_socketpair_across_two_processes_keeps_data_both_ways() {
    let (a, b) = unix_sys::socketpair(libc::SOCK_STREAM).expect("pair");
    let to_b = pattern(100_000, 1);
    let to_a = pattern(3000, 2);
    send(a.as_fd(), &to_b);
    send(b.as_fd(), &to_a);
    let c1 = ScriptChild::spawn(&[keep(&a, 3)]);
    let c2 = ScriptChild::spawn(&[keep(&b, 5)]);
    drop((a, b));
    let pids = [c1.pid, c2.pid];
    let (fds, files) = try_collect(&pids).expect("collect");
    let sa = sock(&fds, &files, 0, 3);
    let sb = sock(&fds, &files, 1, 5);
    assert_eq!(sa.ty, UnixType::Stream);
    assert_eq!(
        sa.state,
        UnixState::Connected {
            peer: Some(file_id(&fds, 1, 5))
        }
    );
    assert_eq!(
        sb.state,
        UnixState::Connected {
            peer: Some(file_id(&fds, 0, 3))
        }
    );
    let bytes = |s: &UnixSocket| {
        s.queue
            .iter()
            .flat_map(|m| m.data.clone())
            .collect::<Vec<u8>>()
    };
    assert_eq!(bytes(sa), to_a);
    assert_eq!(bytes(sb), to_b);

    let dir = TempDir::new("unix-stream");
    let t = tree(&pids, fds, files);
    let stubs = restore(&t, &dir);
    let (ra, rb) = (grab(stubs[0].0, 3), grab(stubs[1].0, 5));
    assert_eq!(drain_stream(rb.as_fd()), to_b);
    assert_eq!(drain_stream(ra.as_fd()), to_a);
    // Only the stubs hold the connection: they talk to each other.
    send(ra.as_fd(), b"after");
    assert_eq!(recv(rb.as_fd()).expect("data"), b"after");
    // The originals still hold every byte (peeking consumed nothing).
    let (oa, ob) = (grab(c1.pid, 3), grab(c2.pid, 5));
    assert_eq!(drain_stream(ob.as_fd()), to_b);
    assert_eq!(drain_stream(oa.as_fd()), to_a);
    assert_eq!(
        super::sys::get_int(oa.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF).expect("peek off"),
        -1
    );
}

/// Datagram and seqpacket pairs keep every message and its boundary,
/// empty ones and ones larger than the peek buffer included.
fn messages_keep_their_boundaries(ty: i32) {
    let (a, b) = unix_sys::socketpair(ty).expect("pair");
    let msgs: Vec<Vec<u8>> = vec![
        b"one".to_vec(),
        vec![],
        pattern(70_000, 3),
        b"x".to_vec(),
        pattern(1000, 4),
    ];
    // More than net.unix.max_dgram_qlen (10) messages one way.
    let many: Vec<Vec<u8>> = (0..25u8).map(|i| vec![i; i as usize + 1]).collect();
    for m in &msgs {
        send(a.as_fd(), m);
    }
    for m in &many {
        send(b.as_fd(), m);
    }
    let c = ScriptChild::spawn(&[keep(&a, 3), keep(&b, 4)]);
    drop((a, b));
    let (fds, files) = try_collect(&[c.pid]).expect("collect");
    let got: Vec<Vec<u8>> = sock(&fds, &files, 0, 4)
        .queue
        .iter()
        .map(|m| m.data.clone())
        .collect();
    assert_eq!(got, msgs);
    assert_eq!(sock(&fds, &files, 0, 3).queue.len(), many.len());
    let dir = TempDir::new("unix-msgs");
    let t = tree(&[c.pid], fds, files);
    let stubs = restore(&t, &dir);
    let (ra, rb) = (grab(stubs[0].0, 3), grab(stubs[0].0, 4));
    assert_eq!(drain_messages(rb.as_fd()), msgs);
    assert_eq!(drain_messages(ra.as_fd()), many);
    send(rb.as_fd(), b"back");
    assert_eq!(drain_messages(ra.as_fd()), vec![b"back".to_vec()]);
    // The original still holds them all.
    assert_eq!(drain_messages(grab(c.pid, 4).as_fd()), msgs);
}

#[test]
fn datagram_pair_keeps_messages_and_boundaries() {
    messages_keep_their_boundaries(libc::SOCK_DGRAM);
}

#[test]
fn seqpacket_pair_keeps_records_and_boundaries() {
    messages_keep_their_boundaries(libc::SOCK_SEQPACKET);
}

fn abstract_name(tag: &str) -> UnixName {
    UnixName::Abstract(format!("ferry-test-{tag}-{}", std::process::id()).into_bytes())
}

fn unix_socket(ty: i32) -> OwnedFd {
    super::sys::socket(libc::AF_UNIX, ty).expect("socket")
}

/// Listeners on a path and on an abstract name, and a bound datagram
/// server with datagrams queued: they come back bound (the stale socket
/// file replaced), listening, and the datagrams are there.
#[test]
fn listeners_and_a_bound_datagram_server_come_back_bound() {
    let dir = TempDir::new("unix-listen");
    let path = UnixName::Path(dir.file("l.sock"));
    let abs = abstract_name("listen");
    let lp = unix_socket(libc::SOCK_STREAM);
    unix_sys::bind(lp.as_fd(), &path).expect("bind path");
    super::sys::listen(lp.as_fd(), 7).expect("listen");
    let la = unix_socket(libc::SOCK_SEQPACKET);
    unix_sys::bind(la.as_fd(), &abs).expect("bind abstract");
    super::sys::listen(la.as_fd(), 3).expect("listen");
    let dname = abstract_name("dgram");
    let srv = unix_socket(libc::SOCK_DGRAM);
    unix_sys::bind(srv.as_fd(), &dname).expect("bind dgram");
    let client = unix_socket(libc::SOCK_DGRAM);
    for m in [&b"d1"[..], b"d2"] {
        unix_sys::send(client.as_fd(), m, Some(&dname), None).expect("sendto");
    }
    let c = ScriptChild::spawn(&[keep(&lp, 3), keep(&la, 4), keep(&srv, 5)]);
    drop((lp, la, srv));
    let (fds, files) = try_collect(&[c.pid]).expect("collect");
    let s3 = sock(&fds, &files, 0, 3);
    assert_eq!(s3.name, Some(path.clone()));
    assert_eq!(s3.state, UnixState::Listening { backlog: 7 });
    let s4 = sock(&fds, &files, 0, 4);
    assert_eq!((s4.ty, &s4.name), (UnixType::Seqpacket, &Some(abs.clone())));
    assert_eq!(s4.state, UnixState::Listening { backlog: 3 });
    assert_eq!(sock(&fds, &files, 0, 5).queue.len(), 2);
    let t = tree(&[c.pid], fds, files);
    // The checkpointed process goes away; its socket file stays behind.
    drop(c);
    let stubs = restore(&t, &dir);
    let pid = stubs[0].0;
    let cl = unix_socket(libc::SOCK_STREAM);
    unix_sys::connect(cl.as_fd(), &path).expect("connect to the restored path listener");
    let cl2 = unix_socket(libc::SOCK_SEQPACKET);
    unix_sys::connect(cl2.as_fd(), &abs).expect("connect to the restored abstract listener");
    let d = unix_sys::diag(
        std::fs::metadata(format!("/proc/{pid}/fd/3"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)
            .expect("stat"),
    )
    .expect("diag");
    assert_eq!(
        (d.state, d.rqlen),
        (10, (1, 7)),
        "listening, backlog 7, one waiting"
    );
    assert_eq!(
        drain_messages(grab(pid, 5).as_fd()),
        vec![b"d1".to_vec(), b"d2".to_vec()]
    );
    unix_sys::send(client.as_fd(), b"d3", Some(&dname), None).expect("sendto the restored");
    assert_eq!(drain_messages(grab(pid, 5).as_fd()), vec![b"d3".to_vec()]);
}

fn refused(pids: &[i32], needles: &[&str]) -> (i32, i32) {
    match try_collect(pids) {
        Err(Error::UnsupportedFd { pid, fd, kind }) => {
            for n in needles {
                assert!(kind.contains(n), "{kind:?} lacks {n:?}");
            }
            (pid, fd)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_listener_with_a_connection_waiting_is_refused() {
    let name = abstract_name("pending");
    let l = unix_socket(libc::SOCK_STREAM);
    unix_sys::bind(l.as_fd(), &name).expect("bind");
    super::sys::listen(l.as_fd(), 4).expect("listen");
    let cl = unix_socket(libc::SOCK_STREAM);
    unix_sys::connect(cl.as_fd(), &name).expect("connect");
    let c = ScriptChild::spawn(&[keep(&l, 6)]);
    let (pid, fd) = refused(
        &[c.pid],
        &[
            "listening on @ferry-test-pending",
            "1 connections waiting to be accepted",
        ],
    );
    assert_eq!((pid, fd), (c.pid, 6));
}

#[test]
fn a_peer_outside_the_tree_is_refused_by_its_address() {
    // A datagram socket connected to a named one held outside.
    let name = abstract_name("outside");
    let srv = unix_socket(libc::SOCK_DGRAM);
    unix_sys::bind(srv.as_fd(), &name).expect("bind");
    let d = unix_socket(libc::SOCK_DGRAM);
    unix_sys::connect(d.as_fd(), &name).expect("connect");
    let c = ScriptChild::spawn(&[keep(&d, 3)]);
    let (pid, fd) = refused(
        &[c.pid],
        &[
            "a unix datagram socket connected to @ferry-test-outside",
            "outside the process tree",
        ],
    );
    assert_eq!((pid, fd), (c.pid, 3));
    // A stream connection to a path listener outside: the peer (the
    // accepted end) shows the listener's path.
    let dir = TempDir::new("unix-outside");
    let path = UnixName::Path(dir.file("daemon.sock"));
    let l = unix_socket(libc::SOCK_STREAM);
    unix_sys::bind(l.as_fd(), &path).expect("bind");
    super::sys::listen(l.as_fd(), 1).expect("listen");
    let cl = unix_socket(libc::SOCK_STREAM);
    unix_sys::connect(cl.as_fd(), &path).expect("connect");
    let c2 = ScriptChild::spawn(&[keep(&cl, 4)]);
    refused(
        &[c2.pid],
        &[&format!(
            "stream socket connected to {path} (a connection not yet accepted"
        )],
    );
    // An unnamed peer (one end of a pair) says so.
    let (a, _b) = unix_sys::socketpair(libc::SOCK_SEQPACKET).expect("pair");
    let c3 = ScriptChild::spawn(&[keep(&a, 3)]);
    refused(
        &[c3.pid],
        &["seqpacket socket connected to an unnamed socket"],
    );
    // And the refused processes go on: their sockets work.
    send(a.as_fd(), b"still");
    assert_eq!(recv(_b.as_fd()).expect("data"), b"still");
}

/// Send `fd` over `over` with SCM_RIGHTS.
fn send_fd(over: BorrowedFd<'_>, fd: BorrowedFd<'_>) {
    let mut data = *b"f";
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut ctl = [0u64; 4];
    // SAFETY: a msghdr over live locals; one cmsg of one int fits in `ctl`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd.as_raw_fd());
        assert_eq!(libc::sendmsg(over.as_raw_fd(), &msg, 0), 1);
    }
}

#[test]
fn fds_in_flight_are_refused_and_left_in_place() {
    for ty in [libc::SOCK_STREAM, libc::SOCK_DGRAM] {
        let (a, b) = unix_sys::socketpair(ty).expect("pair");
        send(a.as_fd(), b"before");
        let (r, _w) = crate::files::sys::pipe2(libc::O_CLOEXEC).expect("pipe");
        send_fd(a.as_fd(), r.as_fd());
        let c = ScriptChild::spawn(&[keep(&a, 3), keep(&b, 4)]);
        let (_, fd) = refused(&[c.pid], &["file descriptors in flight (SCM_RIGHTS)"]);
        assert_eq!(fd, 4);
        // Nothing was taken from the queue.
        let got = recv(b.as_fd()).expect("data");
        assert!(got.starts_with(b"before"), "{got:?}");
    }
}

/// `SO_PASSCRED`: the queued messages keep the credentials they carried.
#[test]
fn credentials_of_queued_messages_are_kept() {
    let (a, b) = unix_sys::socketpair(libc::SOCK_DGRAM).expect("pair");
    super::sys::set_int(b.as_fd(), libc::SOL_SOCKET, libc::SO_PASSCRED, 1).expect("passcred");
    send(a.as_fd(), b"who");
    let c = ScriptChild::spawn(&[keep(&a, 3), keep(&b, 4)]);
    drop((a, b));
    let (fds, files) = try_collect(&[c.pid]).expect("collect");
    let s = sock(&fds, &files, 0, 4);
    assert!(s.passcred);
    let creds = s.queue[0].creds.expect("credentials recorded");
    assert_eq!(
        creds.pid,
        std::process::id() as i32,
        "the sender was the test"
    );
    let dir = TempDir::new("unix-creds");
    let t = tree(&[c.pid], fds, files);
    let stubs = restore(&t, &dir);
    let rb = grab(stubs[0].0, 4);
    let mut buf = [0u8; 16];
    let p = unix_sys::peek(rb.as_fd(), &mut buf, 0).expect("peek");
    assert_eq!(&buf[..p.len], b"who");
    assert_eq!(p.creds, Some(creds));
}
