//! timerfds, both directions.
//!
//! Checkpoint takes a copy of the fd (`pidfd_getfd`) and calls
//! `timerfd_gettime` on it: the kernel counts the missed periods of an
//! expired periodic timer only lazily (on read or gettime), so before that
//! call fdinfo shows `ticks: 1` and `it_value: (0, 0)` however many periods
//! went by; after it, `ticks:` is exact and the value is the time to the
//! next expiry. Nothing is consumed. fdinfo gives the clock, the settime
//! flags and the ticks; the clock is read alongside the value, so that an
//! absolute timer's expiry is known (`now + value`).
//!
//! Restore creates the timer in the agent (`timerfd_create`), arms it with
//! `timerfd_settime` and puts the unread expirations back with
//! `TFD_IOC_SET_TICKS` (settime clears them). A relative timer gets the
//! time it had left (time does not run for a checkpointed process). An
//! absolute timer keeps its absolute expiry where its clock reads the same
//! as on the source (`CLOCK_REALTIME`, or the same boot for
//! `CLOCK_MONOTONIC`/`CLOCK_BOOTTIME`); on another boot, whose monotonic
//! clocks differ, it gets the same time left, as an absolute time on this
//! host's clock, with the same flags.

use super::{fdinfo_field, fdinfo_text, sys};
use crate::{Error, Result};
use ferry_protocol::model::{FileKind, OpenFile, TimerFd, Timespec, TFD_TIMER_ABSTIME};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

const NSEC_PER_SEC: i64 = 1_000_000_000;
/// How often the capture is retried when the timer fires while read.
const CAPTURE_TRIES: usize = 10;

/// `clockid:`, `ticks:` and `settime flags:` of a timerfd's fdinfo.
fn parse(text: &str) -> std::result::Result<(i32, u64, u32), String> {
    let get = |k: &str| fdinfo_field(text, k).ok_or_else(|| format!("no {k} line in {text:?}"));
    let clock = get("clockid:")?;
    let clock = clock
        .parse::<i32>()
        .map_err(|e| format!("clockid {clock:?}: {e}"))?;
    let ticks = get("ticks:")?;
    let ticks = ticks
        .parse::<u64>()
        .map_err(|e| format!("ticks {ticks:?}: {e}"))?;
    let flags = get("settime flags:")?;
    let flags =
        u32::from_str_radix(flags, 8).map_err(|e| format!("settime flags {flags:?}: {e}"))?;
    Ok((clock, ticks, flags))
}

/// The clock to read for a timer on `clock` (alarm clocks tick like their
/// base clocks).
fn readable_clock(clock: i32) -> libc::clockid_t {
    match clock {
        libc::CLOCK_REALTIME_ALARM => libc::CLOCK_REALTIME,
        libc::CLOCK_BOOTTIME_ALARM => libc::CLOCK_BOOTTIME,
        c => c,
    }
}

fn to_model(ts: libc::timespec) -> Timespec {
    Timespec {
        sec: ts.tv_sec,
        nsec: ts.tv_nsec,
    }
}

fn to_libc(ts: Timespec) -> libc::timespec {
    libc::timespec {
        tv_sec: ts.sec,
        tv_nsec: ts.nsec,
    }
}

/// `a + b` (both valid, non-negative).
fn add(a: Timespec, b: Timespec) -> Timespec {
    let nsec = a.nsec + b.nsec;
    Timespec {
        sec: a.sec.saturating_add(b.sec) + nsec / NSEC_PER_SEC,
        nsec: nsec % NSEC_PER_SEC,
    }
}

/// This host's boot id.
pub(crate) fn boot_id() -> Result<String> {
    const PATH: &str = "/proc/sys/kernel/random/boot_id";
    std::fs::read_to_string(PATH)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::io(format!("reading {PATH}"), e))
}

/// Capture timerfd `fd` of the frozen process `pid`.
pub fn capture(pid: i32, fd: i32) -> Result<FileKind> {
    let what = |op: &str| format!("fd {fd} of process {pid} (a timerfd): {op}");
    let pidfd = sys::pidfd_open(pid).map_err(|e| Error::io(what("pidfd_open"), e))?;
    let copy =
        sys::pidfd_getfd(pidfd.as_fd(), fd).map_err(|e| Error::io(what("pidfd_getfd"), e))?;
    let boot_id = boot_id()?;
    let read = || -> Result<(i32, u64, u32)> {
        let (path, text) = fdinfo_text(pid, fd)?;
        parse(&text).map_err(|d| Error::parse(path, d))
    };
    let gettime = || sys::timerfd_gettime(copy.as_fd()).map_err(|e| Error::io(what("gettime"), e));
    for _ in 0..CAPTURE_TRIES {
        // Count the missed periods, then read the state twice around a
        // second gettime: equal ticks mean the timer did not fire (nor
        // count more periods) in between, so value and ticks agree.
        gettime()?;
        let (clock, ticks, settime_flags) = read()?;
        let cur = gettime()?;
        let now = sys::clock_gettime(readable_clock(clock))
            .map_err(|e| Error::io(what(&format!("clock_gettime({clock})")), e))?;
        let (_, again, _) = read()?;
        if again != ticks {
            continue;
        }
        return Ok(FileKind::TimerFd(TimerFd {
            clock,
            settime_flags,
            value: to_model(cur.it_value),
            interval: to_model(cur.it_interval),
            ticks,
            now: to_model(now),
            boot_id,
        }));
    }
    Err(Error::Unsupported {
        pid,
        what: format!(
            "fd {fd} (a timerfd) fired every time it was read ({CAPTURE_TRIES} tries): \
             its period is too short to capture"
        ),
    })
}

/// Where an absolute timer `t` is to expire on this host, with its own
/// clock `here` (a function, read only when needed).
fn absolute_expiry(
    t: &TimerFd,
    local_boot: &str,
    here: impl FnOnce() -> std::io::Result<Timespec>,
) -> std::io::Result<Timespec> {
    let same_clock = matches!(t.clock, libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_ALARM)
        || t.boot_id == local_boot;
    let base = if same_clock { t.now } else { here()? };
    Ok(add(base, t.value))
}

/// A new timerfd for `f`, armed as `t` says.
pub fn open(f: &OpenFile, t: &TimerFd, d: &str) -> Result<OwnedFd> {
    let what = |op: &str| format!("restoring {d}: {op}");
    let mut flags = libc::TFD_CLOEXEC;
    if f.flags & libc::O_NONBLOCK as u32 != 0 {
        flags |= libc::TFD_NONBLOCK;
    }
    let fd = sys::timerfd_create(t.clock, flags)
        .map_err(|e| Error::io(what(&format!("timerfd_create(clock {})", t.clock)), e))?;
    let value = if t.settime_flags & TFD_TIMER_ABSTIME != 0 && !t.value.is_zero() {
        let local = boot_id()?;
        absolute_expiry(t, &local, || {
            sys::clock_gettime(readable_clock(t.clock)).map(to_model)
        })
        .map_err(|e| Error::io(what(&format!("clock_gettime({})", t.clock)), e))?
    } else {
        t.value
    };
    let spec = libc::itimerspec {
        it_interval: to_libc(t.interval),
        it_value: to_libc(value),
    };
    sys::timerfd_settime(fd.as_fd(), t.settime_flags as libc::c_int, &spec).map_err(|e| {
        Error::io(
            what(&format!(
                "timerfd_settime(flags {:#o}, value {value:?}, interval {:?})",
                t.settime_flags, t.interval
            )),
            e,
        )
    })?;
    if t.ticks > 0 {
        let ticks = t.ticks + fired_since_set(&fd, t).map_err(|e| Error::io(what("gettime"), e))?;
        sys::timerfd_set_ticks(fd.as_fd(), ticks).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::ENOTTY) {
                " (this kernel lacks CONFIG_CHECKPOINT_RESTORE)"
            } else {
                ""
            };
            Error::io(
                what(&format!(
                    "TFD_IOC_SET_TICKS({ticks}) to keep its unread expirations{hint}"
                )),
                e,
            )
        })?;
    }
    Ok(fd)
}

/// How many times the new timer `fd`, armed as `t`, fired since it was
/// set. An absolute timer whose expiry went by while the process was
/// checkpointed fires at once: wait for that (the kernel does it
/// asynchronously), so that no expiry is lost when the ticks are set.
fn fired_since_set(fd: &OwnedFd, t: &TimerFd) -> std::io::Result<u64> {
    if t.value.is_zero() {
        return Ok(0);
    }
    let cur = sys::timerfd_gettime(fd.as_fd())?;
    if cur.it_value.tv_sec == 0 && cur.it_value.tv_nsec == 0 {
        sys::poll_one(fd.as_fd(), libc::POLLIN, 1000)?;
        sys::timerfd_gettime(fd.as_fd())?;
    }
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&path)?;
    parse(&text)
        .map(|(_, ticks, _)| ticks)
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo() {
        let t = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\nclockid: 1\nticks: 6\n\
                 settime flags: 03\nit_value: (0, 19540586)\nit_interval: (0, 50000000)\n";
        assert_eq!(parse(t), Ok((1, 6, 3)));
        assert!(parse("clockid: 1\nticks: 6\n").is_err());
        assert!(parse("clockid: x\nticks: 6\nsettime flags: 0\n").is_err());
        assert!(parse("clockid: 1\nticks: 6\nsettime flags: 9\n").is_err());
    }

    #[test]
    fn adds_times() {
        let a = Timespec {
            sec: 5,
            nsec: 700_000_000,
        };
        let b = Timespec {
            sec: 1,
            nsec: 400_000_000,
        };
        assert_eq!(
            add(a, b),
            Timespec {
                sec: 7,
                nsec: 100_000_000
            }
        );
    }

    #[test]
    fn absolute_expiry_follows_the_clock() {
        let t = |clock: i32, boot: &str| TimerFd {
            clock,
            settime_flags: TFD_TIMER_ABSTIME,
            value: Timespec { sec: 3, nsec: 0 },
            interval: Timespec::default(),
            ticks: 0,
            now: Timespec { sec: 100, nsec: 0 },
            boot_id: boot.into(),
        };
        let here = || Ok(Timespec { sec: 7, nsec: 0 });
        let at = |t: &TimerFd| absolute_expiry(t, "this boot", here).expect("expiry").sec;
        // Same boot, or the wall clock: the same absolute expiry.
        assert_eq!(at(&t(libc::CLOCK_MONOTONIC, "this boot")), 103);
        assert_eq!(at(&t(libc::CLOCK_REALTIME, "other boot")), 103);
        assert_eq!(at(&t(libc::CLOCK_REALTIME_ALARM, "other boot")), 103);
        // Another boot: the same time left on this host's clock.
        assert_eq!(at(&t(libc::CLOCK_MONOTONIC, "other boot")), 10);
        assert_eq!(at(&t(libc::CLOCK_BOOTTIME, "other boot")), 10);
        assert_eq!(at(&t(libc::CLOCK_BOOTTIME_ALARM, "other boot")), 10);
    }
}
