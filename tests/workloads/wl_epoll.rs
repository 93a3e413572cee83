//! wl-epoll: an epoll event loop over pipes, with a nested epoll instance
//! and a pidfd of its own child.
//!
//! - pipes P1, P2, P3 each hold data nobody has read yet ("one", "two",
//!   "three");
//! - epoll E watches P1's read end level-triggered (data 0xa1), P2's
//!   edge-triggered (0xa2, never reported before the freeze) and P3's,
//!   registered as fd `r3` which was then dup'd to `r3d` and closed
//!   (0xa3);
//! - epoll N watches E (0xb1);
//! - epoll L, the loop's own, watches a control pipe that the SIGUSR1
//!   handler writes to; every 20 ms without an event it prints `tick N`;
//! - a child C (which only pauses, and dies with its parent) and a pidfd of
//!   it (PIDFD_NONBLOCK).
//!
//! Prints `ready pid=.. child=.. e=.. n=.. l=.. pidfd=.. r1=.. r2=.. r3=..
//! r3d=..` and loops. On SIGUSR1 it checks, once (the check consumes what
//! it checks), that epoll reports exactly what was pending, with the right
//! data and masks, that the registrations answer to EPOLL_CTL_MOD/DEL as
//! the kernel keys them, and that the pidfd is C's: readable only after C
//! dies of the SIGTERM sent through it. It prints `verify ok ...` or
//! `verify BAD <what>`.
mod shared;

use shared::{die, errno, on_signal, say};
use std::os::fd::RawFd;

const IN: u32 = libc::EPOLLIN as u32;
const ET: u32 = libc::EPOLLET as u32;

static CTL_W: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_usr1(_sig: libc::c_int) {
    let fd = CTL_W.load(std::sync::atomic::Ordering::SeqCst);
    let b = 1u8;
    // SAFETY: write(2) is async-signal-safe; one byte from a local.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

fn pipe() -> (RawFd, RawFd) {
    let mut p = [-1; 2];
    // SAFETY: pipe writes two fds into `p`.
    if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
        die("pipe");
    }
    (p[0], p[1])
}

fn write_all(fd: RawFd, data: &[u8]) {
    // SAFETY: write from a valid slice.
    if unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) } != data.len() as isize {
        die("write");
    }
}

fn epoll() -> RawFd {
    // SAFETY: no pointers.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        die("epoll_create1");
    }
    ep
}

/// epoll_ctl; Ok or the errno.
fn ctl(ep: RawFd, op: i32, fd: RawFd, events: u32, data: u64) -> Result<(), i32> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: epoll_ctl reads one event from a local.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

fn add(ep: RawFd, fd: RawFd, events: u32, data: u64) {
    if let Err(e) = ctl(ep, libc::EPOLL_CTL_ADD, fd, events, data) {
        die(&format!("epoll_ctl(ADD {fd}): errno {e}"));
    }
}

/// `(data, events)` that `epoll_wait(ep, .., timeout)` reports, sorted.
fn wait(ep: RawFd, timeout: i32) -> Result<Vec<(u64, u32)>, i32> {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
    // SAFETY: epoll_wait writes at most 16 events into `evs`.
    let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 16, timeout) };
    if n < 0 {
        return Err(errno());
    }
    let mut v: Vec<(u64, u32)> = evs[..n as usize]
        .iter()
        .map(|e| (e.u64, e.events))
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Read what is waiting in the pipe `fd` (at most 64 bytes).
fn read_some(fd: RawFd) -> Vec<u8> {
    let mut buf = [0u8; 64];
    // SAFETY: read into a local buffer of its size.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    buf[..n.max(0) as usize].to_vec()
}

/// poll(fd, POLLIN, timeout) > 0.
fn readable(fd: RawFd, timeout: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one local pollfd.
    unsafe { libc::poll(&mut p, 1, timeout) > 0 }
}

struct Fds {
    child: i32,
    e: RawFd,
    n: RawFd,
    pidfd: RawFd,
    r1: RawFd,
    r2: RawFd,
    w2: RawFd,
    r3d: RawFd,
}

fn verify(f: &Fds) -> Result<String, String> {
    let expect = |what: &str, got: Result<Vec<(u64, u32)>, i32>, want: &[(u64, u32)]| match got {
        Ok(v) if v == want => Ok(()),
        other => Err(format!("{what}: got {other:?}, want {want:?}")),
    };
    expect("nested epoll", wait(f.n, 0), &[(0xb1, IN)])?;
    expect(
        "first wait",
        wait(f.e, 0),
        &[(0xa1, IN), (0xa2, IN), (0xa3, IN)],
    )?;
    expect(
        "second wait (edge-triggered reported once)",
        wait(f.e, 0),
        &[(0xa1, IN), (0xa3, IN)],
    )?;
    ctl(f.e, libc::EPOLL_CTL_MOD, f.r1, IN, 0xa1)
        .map_err(|e| format!("EPOLL_CTL_MOD of r1: errno {e}"))?;
    match ctl(f.e, libc::EPOLL_CTL_DEL, f.r3d, 0, 0) {
        Err(libc::ENOENT) => {}
        other => return Err(format!("EPOLL_CTL_DEL of r3d: {other:?}, want ENOENT")),
    }
    for (fd, want) in [(f.r1, "one"), (f.r2, "two"), (f.r3d, "three")] {
        let got = read_some(fd);
        if got != want.as_bytes() {
            return Err(format!(
                "pipe data: {:?}, want {want:?}",
                String::from_utf8_lossy(&got)
            ));
        }
    }
    expect("after reading", wait(f.e, 0), &[])?;
    expect("nested after reading", wait(f.n, 0), &[])?;
    write_all(f.w2, b"x");
    expect("a new edge", wait(f.e, 0), &[(0xa2, IN)])?;
    let _ = read_some(f.r2);

    // The pidfd: C's, non-blocking; readable once C is dead.
    // SAFETY: F_GETFL takes no pointer.
    let fl = unsafe { libc::fcntl(f.pidfd, libc::F_GETFL) };
    if fl < 0 || fl & libc::O_NONBLOCK == 0 {
        return Err(format!("pidfd flags {fl:#o}: no O_NONBLOCK"));
    }
    if readable(f.pidfd, 0) {
        return Err("pidfd readable while the child lives".into());
    }
    // SAFETY: pidfd_send_signal without siginfo.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, f.pidfd, libc::SIGTERM, 0, 0) };
    if r != 0 {
        return Err(format!("pidfd_send_signal: errno {}", errno()));
    }
    if !readable(f.pidfd, 10_000) {
        return Err("pidfd not readable after SIGTERM".into());
    }
    // SAFETY: waitid into a zeroed siginfo.
    let (r, info) = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PIDFD,
            f.pidfd as libc::id_t,
            &mut info,
            libc::WEXITED,
        );
        (r, info)
    };
    if r != 0 {
        return Err(format!("waitid(P_PIDFD): errno {}", errno()));
    }
    // SAFETY: waitid filled in a SIGCHLD siginfo.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid != f.child || info.si_code != libc::CLD_KILLED || status != libc::SIGTERM {
        return Err(format!(
            "waitid: pid {pid} code {} status {status}, want {} killed by SIGTERM",
            info.si_code, f.child
        ));
    }
    Ok(format!("child={} reaped=sigterm", f.child))
}

fn main() {
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    // SAFETY: fork; the child only pauses (and dies with its parent).
    let child = unsafe { libc::fork() };
    if child < 0 {
        die("fork");
    }
    if child == 0 {
        // SAFETY: prctl and pause take no pointers.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != me {
                libc::_exit(1);
            }
            loop {
                libc::pause();
            }
        }
    }
    // SAFETY: pidfd_open of our child.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child, libc::O_NONBLOCK) } as RawFd;
    if pidfd < 0 {
        die("pidfd_open");
    }
    let (r1, w1) = pipe();
    let (r2, w2) = pipe();
    let (r3, w3) = pipe();
    write_all(w1, b"one");
    write_all(w2, b"two");
    write_all(w3, b"three");
    let e = epoll();
    add(e, r1, IN, 0xa1);
    add(e, r2, IN | ET, 0xa2);
    add(e, r3, IN, 0xa3);
    // SAFETY: dup and close of our own fd.
    let r3d = unsafe { libc::dup(r3) };
    // SAFETY: as above.
    if r3d < 0 || unsafe { libc::close(r3) } != 0 {
        die("dup/close r3");
    }
    let n = epoll();
    add(n, e, IN, 0xb1);
    let (ctl_r, ctl_w) = pipe();
    CTL_W.store(ctl_w, std::sync::atomic::Ordering::SeqCst);
    let l = epoll();
    add(l, ctl_r, IN, 0xc1);
    on_signal(libc::SIGUSR1, on_usr1);
    let fds = Fds {
        child,
        e,
        n,
        pidfd,
        r1,
        r2,
        w2,
        r3d,
    };
    say(&format!(
        "ready pid={me} child={child} e={e} n={n} l={l} pidfd={pidfd} r1={r1} r2={r2} r3={r3} r3d={r3d}"
    ));
    let mut tick = 0u64;
    let mut verified = false;
    loop {
        match wait(l, 20) {
            Ok(v) if v.is_empty() => {
                tick += 1;
                say(&format!("tick {tick}"));
            }
            Ok(_) => {
                let _ = read_some(ctl_r);
                if verified {
                    say("verify BAD already verified once");
                    continue;
                }
                verified = true;
                match verify(&fds) {
                    Ok(s) => say(&format!("verify ok {s}")),
                    Err(s) => say(&format!("verify BAD {s}")),
                }
            }
            Err(libc::EINTR) => {}
            Err(e) => die(&format!("epoll_wait: errno {e}")),
        }
    }
}
