//! Unix domain sockets survive a checkpoint and restore: wl-unix
//! (tests/workloads/wl_unix.rs), a parent and a child with stream,
//! seqpacket and datagram socketpairs between them, a datagram server on
//! an abstract name and a listener on a path, all with data queued at the
//! freeze. After the restore both processes check every byte and boundary
//! and go on talking, and the listener accepts a new connection from the
//! test. A unix socket connected outside the tree is refused, naming the
//! peer, and the process goes on.
mod common;

use common::{field, num, Procs};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

const WL_UNIX: &str = env!("CARGO_BIN_EXE_wl-unix");

/// Wait until `pid` is gone (reaped by us, as its subreaper, if it is a
/// zombie of ours).
fn wait_gone(pid: i32) -> bool {
    let start = Instant::now();
    while common::pid_exists(pid) {
        let mut st = 0;
        // SAFETY: waitpid on one PID with a local status.
        unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG | libc::__WALL) };
        if start.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Kills the child of the tree (by PID) when the test ends, however.
struct Kid(Option<i32>);

impl Drop for Kid {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill of the workload's child, by PID, while it exists.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if !wait_gone(pid) {
                eprintln!("child {pid} of the workload did not go away");
            }
        }
    }
}

#[test]
fn unix_sockets_survive_checkpoint_and_restore_with_queued_data() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_str().expect("utf-8").to_string();
    // Dropped after `procs` (which ends the root): the child is ours then.
    let mut kid = Kid(None);
    let mut procs = Procs::new();
    let w = procs.workload(WL_UNIX, &[&dir], tmp.path(), "unix");
    let pid = w.pid;
    let (_, ready) = w.out.wait_line(0, "ready ");
    let child = num(&ready, "child") as i32;
    kid.0 = Some(child);
    let path = field(&ready, "listen").expect("listen=").to_string();
    w.out.wait_tick_above(2);

    let img = tmp.path().join("img");
    common::checkpoint(pid, &img, false).assert_ok();
    let status = procs
        .reap(pid)
        .unwrap_or_else(|e| panic!("checkpoint should have killed {pid}: {e}"));
    assert!(status.signal().is_some(), "checkpointed {pid}: {status}");
    assert!(
        wait_gone(child),
        "the checkpointed child {child} is still there"
    );
    kid.0 = None;
    // The listener's socket file stays behind, as after any crash.
    assert!(std::path::Path::new(&path).exists());

    let rs = common::restore(&img);
    rs.assert_ok();
    assert_eq!(rs.stdout, format!("{pid}\n"), "stderr: {}", rs.stderr);
    procs.adopt(pid);
    kid.0 = Some(child);
    common::assert_running_untraced(pid);
    common::assert_running_untraced(child);

    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last);
    common::signal(pid, libc::SIGUSR1);
    let mut c = UnixStream::connect(&path).expect("connect to the restored listener");
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    c.write_all(b"hello").expect("write");
    let mut echo = [0u8; 5];
    if let Err(e) = c.read_exact(&mut echo) {
        panic!(
            "no echo ({e}); workload said: {:?} {:?}",
            w.out.lines(),
            std::fs::read_to_string(tmp.path().join("unix.err"))
        );
    }
    assert_eq!(&echo, b"hello");
    let (_, line) = w.out.wait_line(0, "child verify ");
    assert_eq!(line, "child verify ok");
    let (_, line) = w.out.wait_line(0, "verify ");
    assert_eq!(line, "verify ok");
    procs.kill(pid).expect("reap the restored process");
}

#[test]
fn a_unix_socket_connected_outside_the_tree_is_refused_naming_the_peer() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("daemon.sock");
    let daemon = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let mut procs = Procs::new();
    // A process of its own connected to the "daemon" (the test) and
    // ticking.
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\nprint('ready',flush=True)\nn=0\nwhile True:\n  n+=1\n  print('tick',n,flush=True)\n  time.sleep(0.02)\n",
        path.to_str().expect("utf-8")
    );
    let w = procs.workload("/usr/bin/python3", &["-c", &script], tmp.path(), "outside");
    w.out.wait_line(0, "ready");
    let (_conn, _) = daemon.accept().expect("accept");
    w.out.wait_tick_above(2);
    let run = common::checkpoint(w.pid, &tmp.path().join("img"), false);
    run.assert_error(&[
        "unix stream socket connected to",
        path.to_str().expect("utf-8"),
        "outside the process tree",
    ]);
    common::assert_running_untraced(w.pid);
    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last + 2);
    procs.kill(w.pid).expect("reap");
}
