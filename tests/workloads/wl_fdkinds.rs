//! wl-fdkinds: holds one of each event fd kind, never touching them until
//! asked to check them (once, on SIGUSR1, which consumes what they hold):
//! - `efd`: an eventfd (EFD_NONBLOCK) counting `EFD_COUNT` (above 32 bits);
//! - `sem`: an EFD_SEMAPHORE eventfd counting `SEM_COUNT`;
//! - `periodic`: a CLOCK_MONOTONIC timerfd firing every `PERIOD_MS`, left
//!   unread for `SETTLE_MS` before `ready`, so at least `MIN_MISSED`
//!   expirations wait in it;
//! - `abs`: an absolute (TFD_TIMER_ABSTIME) CLOCK_MONOTONIC timerfd due
//!   `ABS_S` seconds after it was armed (the expiry is printed as
//!   `abs_expiry_ns`);
//! - `rel`: a relative one-shot CLOCK_MONOTONIC timerfd due in `REL_S` s;
//! - `sfd`: a signalfd (SFD_NONBLOCK) for SIGUSR2 and SIGRTMIN+2, both
//!   blocked, so that those signals wait pending for it.
//!
//! Prints `ready pid=P efd=.. sem=.. periodic=.. abs=.. rel=.. sfd=..
//! abs_expiry_ns=..`, then `tick N` every 20 ms. On SIGUSR1 it checks
//! everything and prints `fdkinds ok missed=N` or `fdkinds BAD <reasons>`:
//! the eventfd counts exactly (and is non-blocking), the semaphore gives
//! `SEM_COUNT` reads of 1, the periodic timer reports at least
//! `MIN_MISSED` expirations and fires again within a period, the absolute
//! timer still expires at its absolute time (within `SLACK_MS`), the
//! relative one has run for at least as long as this process ran before
//! `ready` and no longer than it ran in all, and the signalfd reads one
//! SIGUSR2 and one SIGRTMIN+2 carrying the value `SIGVAL` (sent by the
//! test), and nothing else.
mod shared;

use shared::{die, errno, say};
use std::time::Duration;

const EFD_COUNT: u64 = 0x1_0000_0042;
const SEM_COUNT: u64 = 5;
const PERIOD_MS: i64 = 20;
const SETTLE_MS: i64 = 400;
/// Expirations the periodic timer has missed when `ready` is printed.
const MIN_MISSED: u64 = (SETTLE_MS / PERIOD_MS) as u64 - 1;
const ABS_S: i64 = 120;
const REL_S: i64 = 60;
const SLACK_MS: i64 = 500;
/// The value the test sends with SIGRTMIN+2.
const SIGVAL: i32 = 77;

const NS: i64 = 1_000_000_000;
const MS: i64 = 1_000_000;

fn check(what: &str, r: libc::c_int) -> libc::c_int {
    if r < 0 {
        die(&format!("{what}: errno {}", errno()));
    }
    r
}

fn now_ns() -> i64 {
    // SAFETY: clock_gettime into a zeroed local.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        ts.tv_sec * NS + ts.tv_nsec
    }
}

fn ts(ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: ns / NS,
        tv_nsec: ns % NS,
    }
}

fn timer(flags: libc::c_int, value_ns: i64, interval_ns: i64) -> i32 {
    // SAFETY: timerfd_create/settime with a local itimerspec.
    unsafe {
        let fd = check(
            "timerfd_create",
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC),
        );
        let spec = libc::itimerspec {
            it_interval: ts(interval_ns),
            it_value: ts(value_ns),
        };
        check(
            "timerfd_settime",
            libc::timerfd_settime(fd, flags, &spec, std::ptr::null_mut()),
        );
        fd
    }
}

/// `(value, interval)` of a timerfd, in ns.
fn gettime(fd: i32) -> Result<(i64, i64), String> {
    // SAFETY: timerfd_gettime into a zeroed local.
    unsafe {
        let mut cur: libc::itimerspec = std::mem::zeroed();
        if libc::timerfd_gettime(fd, &mut cur) != 0 {
            return Err(format!("timerfd_gettime({fd}): errno {}", errno()));
        }
        Ok((
            cur.it_value.tv_sec * NS + cur.it_value.tv_nsec,
            cur.it_interval.tv_sec * NS + cur.it_interval.tv_nsec,
        ))
    }
}

/// Read one u64 from an eventfd or timerfd; Ok(None) on EAGAIN.
fn read_u64(fd: i32) -> Result<Option<u64>, String> {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a local u64.
    let r = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    match r {
        8 => Ok(Some(v)),
        _ if errno() == libc::EAGAIN => Ok(None),
        _ => Err(format!("read fd {fd}: {r} (errno {})", errno())),
    }
}

/// Is `fd` readable right now?
fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, a local.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// Wait up to `ms` for `fd` to become readable.
fn wait_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, a local.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

fn settime_flags(fd: i32) -> Result<String, String> {
    let t =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).map_err(|e| e.to_string())?;
    t.lines()
        .find_map(|l| l.strip_prefix("settime flags:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| "no settime flags in fdinfo".to_string())
}

struct Fds {
    efd: i32,
    sem: i32,
    periodic: i32,
    abs: i32,
    rel: i32,
    sfd: i32,
    abs_expiry: i64,
    /// Just before `rel` was armed.
    rel_armed: i64,
    /// How long the process ran after arming `rel`, before `ready` (at
    /// least).
    ran_before_ready: i64,
}

fn rtsig() -> i32 {
    libc::SIGRTMIN() + 2
}

fn verify(f: &Fds) -> (Vec<String>, u64) {
    let mut bad = Vec::new();
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            bad.push(e);
        }
    };
    note((|| {
        // SAFETY: fcntl on our own fd.
        let fl = unsafe { libc::fcntl(f.efd, libc::F_GETFL) };
        if fl & libc::O_NONBLOCK == 0 {
            return Err(format!("eventfd lost O_NONBLOCK ({fl:#o})"));
        }
        match read_u64(f.efd)? {
            Some(EFD_COUNT) => {}
            other => return Err(format!("eventfd read {other:?}, expected {EFD_COUNT}")),
        }
        match read_u64(f.efd)? {
            None => Ok(()),
            Some(v) => Err(format!("eventfd read {v} again")),
        }
    })());
    note((|| {
        for i in 0..SEM_COUNT {
            if !readable(f.sem) {
                return Err(format!("semaphore empty after {i} reads"));
            }
            match read_u64(f.sem)? {
                Some(1) => {}
                other => return Err(format!("semaphore read {i} gave {other:?}")),
            }
        }
        if readable(f.sem) {
            return Err(format!("semaphore holds more than {SEM_COUNT}"));
        }
        Ok(())
    })());
    let mut missed = 0;
    note((|| {
        missed = read_u64(f.periodic)?.ok_or("periodic timer: EAGAIN on a blocking fd")?;
        if missed < MIN_MISSED {
            return Err(format!(
                "periodic timer: {missed} expirations, expected at least {MIN_MISSED}"
            ));
        }
        let (value, interval) = gettime(f.periodic)?;
        if interval != PERIOD_MS * MS || value > PERIOD_MS * MS {
            return Err(format!(
                "periodic timer: value {value} ns, interval {interval} ns"
            ));
        }
        if !wait_readable(f.periodic, 2000) {
            return Err("periodic timer did not fire again within 2 s".into());
        }
        Ok(())
    })());
    note((|| {
        let flags = settime_flags(f.abs)?;
        if flags != "01" {
            return Err(format!("absolute timer: settime flags {flags}"));
        }
        let (value, _) = gettime(f.abs)?;
        let expiry = now_ns() + value;
        if value == 0 || (expiry - f.abs_expiry).abs() > SLACK_MS * MS {
            return Err(format!(
                "absolute timer: expires at {expiry}, armed for {} (value {value})",
                f.abs_expiry
            ));
        }
        Ok(())
    })());
    note((|| {
        let (value, _) = gettime(f.rel)?;
        let ran_total = now_ns() - f.rel_armed;
        let ran = REL_S * NS - value;
        if value == 0 || ran < f.ran_before_ready || ran > ran_total {
            return Err(format!(
                "relative timer: {value} ns left of {REL_S} s; ran {} ns before ready, {ran_total} ns in all",
                f.ran_before_ready
            ));
        }
        Ok(())
    })());
    note((|| {
        let mut got = Vec::new();
        loop {
            // SAFETY: reading signalfd_siginfo records into a zeroed local.
            let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: as above, `size` bytes into `si`.
            let r =
                unsafe { libc::read(f.sfd, (&mut si as *mut libc::signalfd_siginfo).cast(), size) };
            if r < 0 && errno() == libc::EAGAIN {
                break;
            }
            if r != size as isize {
                return Err(format!("signalfd read {r} (errno {})", errno()));
            }
            got.push((si.ssi_signo as i32, si.ssi_int));
        }
        got.sort_unstable();
        let signos: Vec<i32> = got.iter().map(|g| g.0).collect();
        let rt_value = got.iter().find(|g| g.0 == rtsig()).map(|g| g.1);
        if signos != [libc::SIGUSR2, rtsig()] || rt_value != Some(SIGVAL) {
            return Err(format!(
                "signalfd read {got:?}, expected SIGUSR2 and {}/{SIGVAL}",
                rtsig()
            ));
        }
        Ok(())
    })());
    (bad, missed)
}

fn main() {
    // SAFETY: blocking two signals of our own, with a local sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::sigaddset(&mut set, rtsig());
        check(
            "sigprocmask",
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
        );
    }
    shared::install_sigusr1();
    // SAFETY: eventfd/write/signalfd with locals.
    let (efd, sem, sfd) = unsafe {
        let efd = check(
            "eventfd",
            libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
        );
        let v = EFD_COUNT;
        if libc::write(efd, (&v as *const u64).cast(), 8) != 8 {
            die("eventfd write");
        }
        let sem = check(
            "eventfd(sem)",
            libc::eventfd(SEM_COUNT as u32, libc::EFD_SEMAPHORE),
        );
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::sigaddset(&mut set, rtsig());
        let sfd = check(
            "signalfd",
            libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC),
        );
        (efd, sem, sfd)
    };
    let periodic = timer(0, PERIOD_MS * MS, PERIOD_MS * MS);
    let abs_expiry = now_ns() + ABS_S * NS;
    let abs = timer(libc::TFD_TIMER_ABSTIME, abs_expiry, 0);
    let before_rel = now_ns();
    let rel = timer(0, REL_S * NS, 0);
    let after_rel = now_ns();
    std::thread::sleep(Duration::from_millis(SETTLE_MS as u64));
    let fds = Fds {
        efd,
        sem,
        periodic,
        abs,
        rel,
        sfd,
        abs_expiry,
        rel_armed: before_rel,
        ran_before_ready: now_ns() - after_rel,
    };
    say(&format!(
        "ready pid={} efd={efd} sem={sem} periodic={periodic} abs={abs} rel={rel} sfd={sfd} \
         abs_expiry_ns={abs_expiry} min_missed={MIN_MISSED} rtsig={}",
        std::process::id(),
        rtsig()
    ));
    let mut tick = 0u64;
    loop {
        tick += 1;
        say(&format!("tick {tick}"));
        if shared::take_sigusr1() {
            let (bad, missed) = verify(&fds);
            if bad.is_empty() {
                say(&format!("fdkinds ok missed={missed}"));
            } else {
                say(&format!("fdkinds BAD {}", bad.join("; ")));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
