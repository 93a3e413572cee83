//! wl-blocked MODE: a process that spends nearly all its time blocked in a
//! system call, and checks each completed wait.
//! - `sleep`: the main thread sleeps 2 s at a time (relative
//!   clock_nanosleep on CLOCK_MONOTONIC, retried with the remaining time on
//!   EINTR like a real program would); prints
//!   `slept n=N elapsed_ms=E eintr=K ok|BAD` (ok when E >= 2000 and every
//!   error was EINTR).
//! - `read`: the main thread blocks in read(2) on a pipe; a second thread
//!   writes a 16-byte message `msg NNNNNNNNNNN\n` every 2 s; prints
//!   `read n=N eintr=K ok|BAD` (ok when the message is the next in sequence).
//! - `futex`: the main thread waits (FUTEX_WAIT_PRIVATE, no timeout) on a
//!   word that a second thread increments and wakes every 2 s; prints
//!   `futex n=N value=V eintr=K ok|BAD` (ok when V grew by exactly 1).
//!
//! Every mode first prints `ready pid=P tid=T` (T: the blocked thread).
mod shared;

use shared::{die, errno, say};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PERIOD: Duration = Duration::from_secs(2);

fn ready() {
    say(&format!(
        "ready pid={} tid={}",
        std::process::id(),
        shared::gettid()
    ));
}

fn sleep_mode() -> ! {
    ready();
    let mut eintr = 0u64;
    for n in 1u64.. {
        let start = Instant::now();
        let mut req = libc::timespec {
            tv_sec: PERIOD.as_secs() as libc::time_t,
            tv_nsec: 0,
        };
        let mut other_error = None;
        loop {
            let mut rem = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: plain clock_nanosleep with local timespecs; it returns
            // the error number directly.
            let r = unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &req, &mut rem) };
            match r {
                0 => break,
                libc::EINTR => {
                    eintr += 1;
                    // Recompute from the deadline: `rem` may not have been
                    // written by a restored system call.
                    let left = PERIOD.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    req = libc::timespec {
                        tv_sec: left.as_secs() as libc::time_t,
                        tv_nsec: left.subsec_nanos() as libc::c_long,
                    };
                }
                e => {
                    other_error = Some(e);
                    break;
                }
            }
        }
        let elapsed = start.elapsed();
        let verdict = if other_error.is_none() && elapsed >= PERIOD {
            "ok"
        } else {
            "BAD"
        };
        say(&format!(
            "slept n={n} elapsed_ms={} eintr={eintr} error={} {verdict}",
            elapsed.as_millis(),
            other_error.unwrap_or(0)
        ));
    }
    unreachable!()
}

fn message(n: u64) -> [u8; 16] {
    let mut m = [0u8; 16];
    let s = format!("msg {n:011}\n");
    m.copy_from_slice(&s.as_bytes()[..16]);
    m
}

fn read_mode() -> ! {
    let mut p = [0i32; 2];
    // SAFETY: pipe into a local array.
    if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
        die("pipe failed");
    }
    let (rfd, wfd) = (p[0], p[1]);
    let writer = std::thread::Builder::new().spawn(move || {
        for n in 1u64.. {
            std::thread::sleep(PERIOD);
            let m = message(n);
            // SAFETY: writing a local buffer to our own pipe.
            let r = unsafe { libc::write(wfd, m.as_ptr().cast(), m.len()) };
            if r != m.len() as isize {
                die("pipe write failed");
            }
        }
    });
    if writer.is_err() {
        die("cannot spawn the writer thread");
    }
    ready();
    let mut eintr = 0u64;
    for n in 1u64.. {
        let mut buf = [0u8; 16];
        let mut got = 0usize;
        let mut error = 0;
        while got < buf.len() {
            // SAFETY: reading into a local buffer within bounds.
            let r = unsafe { libc::read(rfd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
            if r > 0 {
                got += r as usize;
            } else if r < 0 && errno() == libc::EINTR {
                eintr += 1;
            } else {
                error = if r == 0 { -1 } else { errno() };
                break;
            }
        }
        let verdict = if error == 0 && buf == message(n) {
            "ok"
        } else {
            "BAD"
        };
        say(&format!(
            "read n={n} eintr={eintr} error={error} got={:?} {verdict}",
            String::from_utf8_lossy(&buf[..got]).trim_end()
        ));
    }
    unreachable!()
}

fn futex_mode() -> ! {
    let word = Arc::new(AtomicU32::new(0));
    let w2 = Arc::clone(&word);
    let waker = std::thread::Builder::new().spawn(move || loop {
        std::thread::sleep(PERIOD);
        w2.fetch_add(1, Ordering::SeqCst);
        // SAFETY: FUTEX_WAKE on a word that outlives the process.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                w2.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            );
        }
    });
    if waker.is_err() {
        die("cannot spawn the waker thread");
    }
    ready();
    let mut eintr = 0u64;
    let mut seen = word.load(Ordering::SeqCst);
    for n in 1u64.. {
        let mut error = 0;
        while word.load(Ordering::SeqCst) == seen {
            // SAFETY: FUTEX_WAIT on our own word, no timeout.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    word.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    seen,
                    std::ptr::null::<libc::timespec>(),
                )
            };
            if r != 0 {
                match errno() {
                    libc::EAGAIN => {}
                    libc::EINTR => eintr += 1,
                    e => {
                        error = e;
                        break;
                    }
                }
            }
        }
        let value = word.load(Ordering::SeqCst);
        let verdict = if error == 0 && value == seen + 1 {
            "ok"
        } else {
            "BAD"
        };
        say(&format!(
            "futex n={n} value={value} eintr={eintr} error={error} {verdict}"
        ));
        seen = value;
    }
    unreachable!()
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("sleep") => sleep_mode(),
        Some("read") => read_mode(),
        Some("futex") => futex_mode(),
        _ => die("usage: wl-blocked sleep|read|futex"),
    }
}
