//! Epoll instances and pidfds survive checkpoint/restore and migration:
//! wl-epoll (tests/workloads/wl_epoll.rs) runs an epoll event loop over
//! pipes with data pending at the freeze, a nested epoll instance, level-
//! and edge-triggered registrations, one registered under an fd that was
//! then dup'd and closed, and a pidfd of its child. After the restore (on
//! this host, or on host B) the kernel lists the same registrations (fd
//! number, events, data) and the pidfd names the same PID; then wl-epoll's
//! own check (on SIGUSR1) sees the pending events with the right data and
//! masks, and kills and reaps its child through the pidfd.
//!
//! Cleanup: `Procs` kills and reaps wl-epoll and its child by PID (the
//! child also dies with its parent: PR_SET_PDEATHSIG); this test process is
//! a child subreaper, so the child of a killed source copy is reaped here.
mod common;

use common::hosts::{pair, verify_line, Hosts, ADDR_B};
use common::{field, num, Procs, Workload};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

const WL_EPOLL: &str = env!("CARGO_BIN_EXE_wl-epoll");

/// The fds of wl-epoll's ready line.
#[derive(Debug)]
struct Ready {
    pid: i32,
    child: i32,
    e: u64,
    n: u64,
    pidfd: u64,
    r1: u64,
    r2: u64,
    r3: u64,
}

impl Ready {
    fn parse(line: &str) -> Ready {
        Ready {
            pid: num(line, "pid") as i32,
            child: num(line, "child") as i32,
            e: num(line, "e"),
            n: num(line, "n"),
            pidfd: num(line, "pidfd"),
            r1: num(line, "r1"),
            r2: num(line, "r2"),
            r3: num(line, "r3"),
        }
    }
}

/// What the kernel says about wl-epoll's epoll instances and pidfd, from
/// the text of their fdinfo files (`read(fd)` gives one).
#[derive(Debug, PartialEq)]
struct State {
    /// fd -> sorted (tfd, events, data) of each registration.
    epolls: BTreeMap<u64, Vec<(i64, u32, u64)>>,
    /// The pidfd's `Pid:` and status flags (octal).
    pidfd: (String, String),
}

fn registrations(text: &str) -> Vec<(i64, u32, u64)> {
    let mut v: Vec<(i64, u32, u64)> = text
        .lines()
        .filter(|l| l.starts_with("tfd:"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert!(w.len() >= 6, "fdinfo line {l:?}");
            (
                w[1].parse().expect("tfd"),
                u32::from_str_radix(w[3], 16).expect("events"),
                u64::from_str_radix(w[5], 16).expect("data"),
            )
        })
        .collect();
    v.sort_unstable();
    v
}

fn line_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {text:?}"))
        .trim()
        .to_string()
}

fn state(r: &Ready, fdinfo: impl Fn(u64) -> String) -> State {
    let epolls = [r.e, r.n]
        .iter()
        .map(|&fd| (fd, registrations(&fdinfo(fd))))
        .collect();
    let p = fdinfo(r.pidfd);
    State {
        epolls,
        pidfd: (line_value(&p, "Pid:"), line_value(&p, "flags:")),
    }
}

fn local_fdinfo(pid: i32) -> impl Fn(u64) -> String {
    move |fd| {
        std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .unwrap_or_else(|e| panic!("fdinfo {fd} of {pid}: {e}"))
    }
}

/// The registrations the workload made, as the kernel shows them.
fn assert_expected(r: &Ready, s: &State, when: &str) {
    let errhup = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
    let inn = libc::EPOLLIN as u32 | errhup;
    let et = libc::EPOLLET as u32;
    let mut want_e = vec![
        (r.r1 as i64, inn, 0xa1),
        (r.r2 as i64, inn | et, 0xa2),
        (r.r3 as i64, inn, 0xa3),
    ];
    want_e.sort_unstable();
    assert_eq!(s.epolls[&r.e], want_e, "epoll E {when}");
    assert_eq!(
        s.epolls[&r.n],
        vec![(r.e as i64, inn, 0xb1)],
        "epoll N {when}"
    );
    assert_eq!(s.pidfd.0, r.child.to_string(), "the pidfd's PID {when}");
    let flags = u32::from_str_radix(&s.pidfd.1, 8).expect("octal flags");
    assert_ne!(
        flags & libc::O_NONBLOCK as u32,
        0,
        "PIDFD_NONBLOCK {when}: {flags:o}"
    );
}

/// Spawned wl-epoll's ready line, once it ticks.
fn ready(w: &Workload) -> Ready {
    let (_, line) = w.out.wait_line(0, "ready ");
    let r = Ready::parse(&line);
    assert_eq!(r.pid, w.pid, "{line}");
    w.out.wait_tick_above(3);
    r
}

/// wl-epoll's verify line says it all worked, and its child is the one.
fn check_verify(line: &str, r: &Ready) {
    assert!(
        line.starts_with("verify ok "),
        "wl-epoll's own check failed: {line}"
    );
    assert_eq!(field(line, "child"), Some(r.child.to_string().as_str()));
}

/// Reap `pid`, a source copy's child that was re-parented to us (or is
/// gone), within 10 s.
fn reap_gone(procs: &mut Procs, pid: i32) {
    let _ = procs.reap(pid);
    assert!(
        !common::pid_exists(pid),
        "the child (pid {pid}) of the killed source copy still exists here"
    );
}

#[test]
fn epoll_and_pidfd_survive_checkpoint_restore() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let w = procs.workload(WL_EPOLL, &[], tmp.path(), "epoll");
    let r = ready(&w);
    procs.adopt(r.child);
    let before = state(&r, local_fdinfo(r.pid));
    assert_expected(&r, &before, "before the checkpoint");

    let img = tmp.path().join("img");
    common::checkpoint(r.pid, &img, false).assert_ok();
    let status = procs
        .reap(r.pid)
        .unwrap_or_else(|e| panic!("checkpoint should have killed wl-epoll ({}): {e}", r.pid));
    assert!(status.signal().is_some(), "checkpointed wl-epoll: {status}");
    reap_gone(&mut procs, r.child);
    let last = w.out.last_tick().expect("ticks");

    let rs = common::restore(&img);
    rs.assert_ok();
    assert_eq!(
        rs.stdout.split_whitespace().next(),
        Some(r.pid.to_string().as_str()),
        "{}",
        rs.stderr
    );
    procs.adopt(r.pid);
    procs.adopt(r.child);
    common::assert_running_untraced(r.pid);
    common::assert_running_untraced(r.child);
    assert_eq!(
        state(&r, local_fdinfo(r.pid)),
        before,
        "the kernel's view after the restore"
    );
    w.out.wait_tick_above(last + 3);

    let from = w.out.lines().len();
    common::signal(r.pid, libc::SIGUSR1);
    let (_, line) = w.out.wait_line(from, "verify ");
    check_verify(&line, &r);
    // wl-epoll reaped its child through the pidfd.
    common::wait_until(Duration::from_secs(5), "the child to be gone", || {
        (!common::pid_exists(r.child)).then_some(())
    });
    let _ = procs.reap(r.child);
    w.out.wait_tick_above(w.out.last_tick().unwrap_or(0) + 2);
    procs
        .kill(r.pid)
        .expect("the restored wl-epoll is reaped by the test process");
}

#[test]
fn epoll_and_pidfd_migrate_to_host_b() {
    let _serial = common::setup();
    let h = Hosts::up_as("fepoll", "m");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let cmd = h.command(&["exec-a", WL_EPOLL]);
    let w = procs.spawn(cmd, h.tmp(), "epoll");
    let r = ready(&w);
    procs.adopt(r.child);
    let before = state(&r, local_fdinfo(r.pid));
    assert_expected(&r, &before, "on host A");

    let pid = r.pid.to_string();
    h.migrate("a", &["--to", ADDR_B, &pid]).assert_ok();
    let status = procs.reap(r.pid).expect("reap the source copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy: {status}"
    );
    reap_gone(&mut procs, r.child);

    let on_b = |fd: u64| {
        let run = h.exec_b(&["cat", &format!("/proc/{}/fdinfo/{fd}", r.pid)]);
        run.assert_ok();
        run.stdout.clone()
    };
    assert_eq!(state(&r, on_b), before, "the kernel's view on host B");
    assert!(h.exists_on_b(r.child), "the child on host B");
    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last + 3);
    check_verify(&verify_line(&h, &w, true), &r);
    common::wait_until(Duration::from_secs(5), "the child to end on B", || {
        (!h.exists_on_b(r.child)).then_some(())
    });
    h.exec_b(&["kill", "-KILL", &pid]).assert_ok();
    common::wait_until(Duration::from_secs(10), "wl-epoll to end on B", || {
        let st = h.exec_b(&["cat", &format!("/proc/{pid}/stat")]);
        let gone = !st.status.success() || st.stdout.contains(") Z ");
        gone.then_some(())
    });
}
