//! Tests of eventfds, timerfds and signalfds, both directions, with real
//! processes: the test makes the objects, a scripted child holds them
//! ([`Act::Keep`]) and is frozen while a [`FileCollector`] reads them; the
//! collected image is opened by the agent ([`Opened::open_all`]) and
//! installed into a stub, whose fds are then inspected through fdinfo and
//! `pidfd_getfd` copies.

use super::testkit::{frozen, image, process, Act, ScriptChild};
use super::*;
use crate::testutil::{with_stub, StubGuard};
use ferry_protocol::model::{TimerFd, Timespec};
use std::time::Duration;

const NONBLOCK: u32 = libc::O_NONBLOCK as u32;

/// Collect the fds of `pid` while it is frozen.
fn collect(pid: i32) -> (Vec<FdEntry>, Vec<OpenFile>) {
    frozen(&[pid], || {
        let mut files = FileCollector::new();
        let mut shmem = ShmemCollector::new();
        let fds = files.task(pid, &mut shmem)?;
        let (files, _, _) = files.finish()?;
        Ok::<_, Error>((fds, files))
    })
    .expect("collect")
}

/// Open `tree` in the agent and install its only task's fds into a stub.
fn restore(tree: &TreeImage) -> Result<StubGuard> {
    let stdio = StdioPolicy {
        log: std::env::temp_dir().join("ferry-event-tests-unused.log"),
    };
    let opened = Opened::open_all(tree, &ShmemHandles::default(), &stdio)?;
    let (guard, r) = with_stub(true, |_, inj| install(inj, &tree.tasks[0].fds, &opened));
    r.map(|()| guard)
}

/// The kind and flags of the file of fd `fd`.
fn file_of<'a>(fds: &[FdEntry], files: &'a [OpenFile], fd: i32) -> &'a OpenFile {
    let e = fds.iter().find(|e| e.fd == fd).expect("fd collected");
    files
        .iter()
        .find(|f| f.id == e.file)
        .expect("file collected")
}

/// A field of fdinfo of fd `fd` of `pid`, read independently of the code
/// under test.
fn info(pid: i32, fd: i32, key: &str) -> String {
    let t = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
    t.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {t}"))
        .trim()
        .to_string()
}

/// A copy of fd `fd` of `pid` (the same open file description).
fn copy_fd(pid: i32, fd: i32) -> OwnedFd {
    let pidfd = sys::pidfd_open(pid).expect("pidfd_open");
    sys::pidfd_getfd(pidfd.as_fd(), fd).expect("pidfd_getfd")
}

fn keep(from: &OwnedFd, at: i32) -> Act {
    Act::Keep {
        from: from.as_raw_fd(),
        at,
    }
}

fn ns(t: Timespec) -> i128 {
    t.sec as i128 * 1_000_000_000 + t.nsec as i128
}

fn ns_libc(t: libc::timespec) -> i128 {
    t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128
}

const MS: i128 = 1_000_000;

#[test]
fn eventfds_keep_counter_mode_and_flags() {
    let plain = sys::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).expect("eventfd");
    sys::write_u64(plain.as_fd(), 300).expect("write");
    let sem = sys::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE).expect("eventfd");
    sys::write_u64(sem.as_fd(), (1 << 33) + 2).expect("write");
    let child = ScriptChild::spawn(&[
        keep(&plain, 3),
        keep(&sem, 4),
        Act::Dup {
            from: 3,
            at: 5,
            cloexec: true,
        },
    ]);
    let (fds, files) = collect(child.pid);
    let f3 = file_of(&fds, &files, 3);
    assert_eq!(
        f3.kind,
        FileKind::EventFd {
            count: 300,
            semaphore: false
        }
    );
    assert_ne!(f3.flags & NONBLOCK, 0);
    let f4 = file_of(&fds, &files, 4);
    assert_eq!(
        f4.kind,
        FileKind::EventFd {
            count: (1 << 33) + 2,
            semaphore: true
        }
    );
    assert_eq!(f4.flags & NONBLOCK, 0);
    assert_eq!(file_of(&fds, &files, 5).id, f3.id, "a dup is the same file");
    // Capture consumed nothing.
    assert_eq!(info(child.pid, 3, "eventfd-count:"), "12c");
    assert_eq!(info(child.pid, 4, "eventfd-count:"), "200000002");

    let tree = image(vec![process(child.pid, fds)], files, vec![]);
    let stub = restore(&tree).expect("restore");
    let pid = stub.0;
    assert_eq!(info(pid, 3, "eventfd-count:"), "12c");
    assert_eq!(info(pid, 3, "eventfd-semaphore:"), "0");
    assert_eq!(info(pid, 3, "flags:"), "04002");
    assert_eq!(info(pid, 4, "eventfd-count:"), "200000002");
    assert_eq!(info(pid, 4, "eventfd-semaphore:"), "1");
    assert_eq!(info(pid, 4, "flags:"), "02");
    assert!(sys::same_file(pid, 3, pid, 5).expect("kcmp"), "dup kept");
    assert!(
        !sys::same_file(pid, 3, child.pid, 3).expect("kcmp"),
        "a new eventfd"
    );
    // They count as before: a semaphore read takes 1, a plain one all.
    assert_eq!(sys::read_u64(copy_fd(pid, 4).as_fd()).expect("read"), 1);
    assert_eq!(info(pid, 4, "eventfd-count:"), "200000001");
    assert_eq!(sys::read_u64(copy_fd(pid, 3).as_fd()).expect("read"), 300);
    let again = sys::read_u64(copy_fd(pid, 3).as_fd());
    assert_eq!(
        again.err().and_then(|e| e.raw_os_error()),
        Some(libc::EAGAIN),
        "non-blocking and empty"
    );
}

/// Arm a new timerfd on `clock`.
fn timer(clock: i32, flags: i32, settime: i32, value: i128, interval: i128) -> OwnedFd {
    let fd = sys::timerfd_create(clock, libc::TFD_CLOEXEC | flags).expect("timerfd_create");
    let ts = |v: i128| libc::timespec {
        tv_sec: (v / 1_000_000_000) as i64,
        tv_nsec: (v % 1_000_000_000) as i64,
    };
    let spec = libc::itimerspec {
        it_interval: ts(interval),
        it_value: ts(value),
    };
    sys::timerfd_settime(fd.as_fd(), settime, &spec).expect("settime");
    fd
}

fn now(clock: i32) -> i128 {
    ns_libc(sys::clock_gettime(clock).expect("clock_gettime"))
}

#[test]
fn timerfds_keep_clock_times_and_missed_expirations() {
    // Periodic, 20 ms, left to expire about 12 times unread.
    let periodic = timer(
        libc::CLOCK_MONOTONIC,
        libc::TFD_NONBLOCK,
        0,
        20 * MS,
        20 * MS,
    );
    // Absolute on the wall clock, 100 s from now, cancelled if the clock
    // is set.
    let expiry = now(libc::CLOCK_REALTIME) + 100_000 * MS;
    let abs = timer(
        libc::CLOCK_REALTIME,
        0,
        libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET,
        expiry,
        0,
    );
    // One-shot on CLOCK_BOOTTIME in 50 s; and a disarmed one.
    let oneshot = timer(libc::CLOCK_BOOTTIME, 0, 0, 50_000 * MS, 0);
    let idle = timer(libc::CLOCK_MONOTONIC, 0, 0, 0, 0);
    std::thread::sleep(Duration::from_millis(250));
    let child = ScriptChild::spawn(&[
        keep(&periodic, 3),
        keep(&abs, 4),
        keep(&oneshot, 5),
        keep(&idle, 6),
    ]);
    // Before any gettime, fdinfo shows the single expiry the kernel counted.
    assert_eq!(info(child.pid, 3, "ticks:"), "1");
    let (fds, files) = collect(child.pid);

    let FileKind::TimerFd(p) = &file_of(&fds, &files, 3).kind else {
        panic!("fd 3 is not a timerfd: {files:?}")
    };
    assert_ne!(file_of(&fds, &files, 3).flags & NONBLOCK, 0);
    assert_eq!((p.clock, p.settime_flags), (libc::CLOCK_MONOTONIC, 0));
    assert!(p.ticks >= 10, "missed expirations: {p:?}");
    assert_eq!(ns(p.interval), 20 * MS);
    assert!(ns(p.value) > 0 && ns(p.value) <= 20 * MS, "{p:?}");
    let FileKind::TimerFd(a) = &file_of(&fds, &files, 4).kind else {
        panic!("fd 4 is not a timerfd: {files:?}")
    };
    assert_eq!(
        (a.clock, a.settime_flags, a.ticks),
        (libc::CLOCK_REALTIME, 3, 0)
    );
    let seen = ns(a.now) + ns(a.value);
    assert!(
        (seen - expiry).abs() < 1000 * MS,
        "absolute expiry {seen} vs {expiry}"
    );
    let FileKind::TimerFd(o) = &file_of(&fds, &files, 5).kind else {
        panic!("fd 5 is not a timerfd: {files:?}")
    };
    assert_eq!(
        (o.clock, o.settime_flags, o.ticks),
        (libc::CLOCK_BOOTTIME, 0, 0)
    );
    assert!(
        ns(o.value) > 45_000 * MS && ns(o.value) <= 50_000 * MS,
        "{o:?}"
    );
    let FileKind::TimerFd(i) = &file_of(&fds, &files, 6).kind else {
        panic!("fd 6 is not a timerfd: {files:?}")
    };
    assert!(
        i.value.is_zero() && i.interval.is_zero() && i.ticks == 0,
        "{i:?}"
    );

    let tree = image(vec![process(child.pid, fds.clone())], files.clone(), vec![]);
    let stub = restore(&tree).expect("restore");
    let pid = stub.0;
    for fd in 3..=6 {
        for key in ["clockid:", "settime flags:", "flags:"] {
            assert_eq!(
                info(pid, fd, key),
                info(child.pid, fd, key),
                "fd {fd} {key}"
            );
        }
    }
    // The missed expirations are there to read (and more may have come).
    let ticks = sys::read_u64(copy_fd(pid, 3).as_fd()).expect("read periodic");
    assert!(ticks >= p.ticks, "read {ticks}, captured {}", p.ticks);
    let cur = sys::timerfd_gettime(copy_fd(pid, 3).as_fd()).expect("gettime");
    assert_eq!(ns_libc(cur.it_interval), 20 * MS);
    // The absolute timer expires when it did.
    let cur = sys::timerfd_gettime(copy_fd(pid, 4).as_fd()).expect("gettime");
    let restored = now(libc::CLOCK_REALTIME) + ns_libc(cur.it_value);
    assert!(
        (restored - expiry).abs() < 1000 * MS,
        "restored expiry {restored} vs {expiry}"
    );
    // The relative one has the time it had left.
    let cur = sys::timerfd_gettime(copy_fd(pid, 5).as_fd()).expect("gettime");
    assert!(
        (ns_libc(cur.it_value) - ns(o.value)).abs() < 1000 * MS,
        "{cur:?} vs {o:?}"
    );
    let cur = sys::timerfd_gettime(copy_fd(pid, 6).as_fd()).expect("gettime");
    assert_eq!(
        (ns_libc(cur.it_value), ns_libc(cur.it_interval)),
        (0, 0),
        "still disarmed"
    );
    assert_eq!(info(pid, 6, "ticks:"), "0");
}

#[test]
fn absolute_monotonic_timer_from_another_boot_keeps_its_time_left() {
    let t = |boot_id: String| TimerFd {
        clock: libc::CLOCK_MONOTONIC,
        settime_flags: ferry_protocol::model::TFD_TIMER_ABSTIME,
        value: Timespec { sec: 30, nsec: 0 },
        interval: Timespec::default(),
        ticks: 2,
        // Long ago on this boot's clock.
        now: Timespec { sec: 1, nsec: 0 },
        boot_id,
    };
    let left = |boot_id: String| {
        let files = vec![OpenFile {
            id: 1,
            flags: libc::O_RDWR as u32,
            pos: 0,
            kind: FileKind::TimerFd(t(boot_id)),
        }];
        let fds = vec![FdEntry {
            fd: 3,
            cloexec: false,
            file: 1,
        }];
        let stub = restore(&image(vec![process(4242, fds)], files, vec![])).expect("restore");
        assert_eq!(info(stub.0, 3, "settime flags:"), "01");
        let cur = sys::timerfd_gettime(copy_fd(stub.0, 3).as_fd()).expect("gettime");
        (ns_libc(cur.it_value), info(stub.0, 3, "ticks:"))
    };
    // Another boot: 30 s left here too, and the 2 unread expirations.
    let (other, ticks) = left("not-this-boot".into());
    assert!(other > 25_000 * MS && other <= 30_000 * MS, "{other}");
    assert_eq!(ticks, "2");
    // This boot: its absolute expiry (31 s after boot) went by while it
    // was away: it has expired once more.
    let (here, ticks) = left(timerfd::boot_id().expect("boot id"));
    assert_eq!(here, 0, "expired at its absolute time");
    assert_eq!(ticks, "3");
}

#[test]
fn signalfd_keeps_its_mask() {
    let mask: u64 = (1 << (libc::SIGUSR2 - 1)) | (1 << (libc::SIGRTMIN() + 1 - 1));
    let sfd = sys::signalfd(mask, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK).expect("signalfd");
    let child = ScriptChild::spawn(&[keep(&sfd, 7)]);
    let (fds, files) = collect(child.pid);
    let f = file_of(&fds, &files, 7);
    assert_eq!(f.kind, FileKind::SignalFd { mask });
    assert_ne!(f.flags & NONBLOCK, 0);
    let stub = restore(&image(vec![process(child.pid, fds)], files, vec![])).expect("restore");
    assert_eq!(info(stub.0, 7, "sigmask:"), info(child.pid, 7, "sigmask:"));
    assert_eq!(info(stub.0, 7, "flags:"), "04002");
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/fd/7", stub.0))
            .expect("link")
            .to_string_lossy(),
        "anon_inode:[signalfd]"
    );
}

#[test]
fn a_timer_on_a_clock_timerfds_do_not_have_is_refused_clearly() {
    let files = vec![OpenFile {
        id: 1,
        flags: libc::O_RDWR as u32,
        pos: 0,
        kind: FileKind::TimerFd(TimerFd {
            clock: libc::CLOCK_PROCESS_CPUTIME_ID,
            settime_flags: 0,
            value: Timespec::default(),
            interval: Timespec::default(),
            ticks: 0,
            now: Timespec::default(),
            boot_id: String::new(),
        }),
    }];
    let fds = vec![FdEntry {
        fd: 3,
        cloexec: false,
        file: 1,
    }];
    match restore(&image(vec![process(4242, fds)], files, vec![])) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("fd 3 of process 4242") && msg.contains("timerfd_create(clock 2)"),
                "{msg}"
            );
        }
        Ok(_) => panic!("a timerfd on CLOCK_PROCESS_CPUTIME_ID was restored"),
    }
}
