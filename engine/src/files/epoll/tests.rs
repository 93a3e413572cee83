//! Tests of epoll instances and pidfds, both directions, with real
//! processes: a forked child builds the fds a test wants (with raw system
//! calls only) and waits in `pause()`; it is frozen and collected, and the
//! image is restored into a stub whose fds are then inspected.

use super::super::pidfd;
use super::super::sys;
use super::super::testkit::{frozen, image, kill_and_reap, process};
use super::*;
use crate::files::{install, FileCollector, StdioPolicy};
use crate::shmem::{ShmemCollector, ShmemHandles};
use crate::testutil::{with_stub, TempDir};
use ferry_protocol::model::{FdEntry, PipeObject};
use std::os::fd::{AsRawFd, RawFd};

const IN: u32 = libc::EPOLLIN as u32;
const OUT: u32 = libc::EPOLLOUT as u32;
const ET: u32 = libc::EPOLLET as u32;
const ONESHOT: u32 = libc::EPOLLONESHOT as u32;
/// Added by the kernel to every registration.
const ERRHUP: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;

/// One step of a scripted child.
#[derive(Clone, Copy)]
enum Step {
    /// A pipe, read end at `r`, write end at `w`.
    Pipe {
        r: i32,
        w: i32,
    },
    /// `n` bytes written to `fd`.
    Write {
        fd: i32,
        n: usize,
    },
    /// An epoll instance at `at`.
    Epoll {
        at: i32,
    },
    /// `epoll_ctl(ep, EPOLL_CTL_ADD, fd, {events, data})`.
    Add {
        ep: i32,
        fd: i32,
        events: u32,
        data: u64,
    },
    /// `dup2(from, to)`.
    Dup {
        from: i32,
        to: i32,
    },
    Close {
        fd: i32,
    },
    /// A pidfd of the parent (the test) at `at`.
    PidfdOfParent {
        at: i32,
    },
    /// `epoll_wait(ep, .., 0)`.
    Wait {
        ep: i32,
    },
    /// A pidfd of the child itself at `at`, with `flags`.
    PidfdOfSelf {
        at: i32,
        flags: u32,
    },
    /// A grandchild that exits at once (a zombie), with a pidfd at `at`.
    ZombieWithPidfd {
        at: i32,
    },
    /// An fd of the test (inherited), placed at `at`.
    Keep {
        from: RawFd,
        at: i32,
    },
}

/// A scripted child, killed and reaped by PID on drop.
struct Child(i32);

impl Drop for Child {
    fn drop(&mut self) {
        kill_and_reap(self.0);
    }
}

const KEEP_BASE: i32 = 900;

/// Fork a child that runs `steps` and pauses; returns once it pauses.
fn spawn(steps: &[Step]) -> Child {
    // SAFETY: the child only makes raw system calls on data prepared
    // before the fork (no allocation, no locks), then pauses or _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: as above; `run` never returns.
        unsafe { run(steps) }
    }
    let child = Child(pid);
    for _ in 0..5000 {
        let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if sc.starts_with(&format!("{} ", libc::SYS_pause)) {
            return child;
        }
        let mut st = 0;
        // SAFETY: non-blocking waitpid of our own child.
        if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
            panic!(
                "scripted child failed in step {}",
                libc::WEXITSTATUS(st) - 100
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("scripted child {pid} did not reach pause()");
}

/// The child's side of [`spawn`].
///
/// # Safety
/// Only in a freshly forked child.
unsafe fn run(steps: &[Step]) -> ! {
    let fail = |i: usize| -> ! { libc::_exit(100 + i as i32) };
    let mut nkeep = 0;
    for s in steps {
        if let Step::Keep { from, .. } = s {
            if libc::dup2(*from, KEEP_BASE + nkeep) < 0 {
                fail(0);
            }
            nkeep += 1;
        }
    }
    libc::syscall(libc::SYS_close_range, 0u32, (KEEP_BASE - 1) as u32, 0u32);
    libc::syscall(
        libc::SYS_close_range,
        (KEEP_BASE + nkeep) as u32,
        u32::MAX,
        0u32,
    );
    let place = |fd: i32, at: i32, i: usize| {
        if fd < 0 {
            fail(i);
        }
        if fd != at {
            if libc::dup2(fd, at) < 0 {
                fail(i);
            }
            libc::close(fd);
        }
    };
    let mut keep_i = 0;
    let buf = [0x5au8; 256];
    for (i, s) in steps.iter().enumerate() {
        match *s {
            Step::Pipe { r, w } => {
                let mut p = [-1; 2];
                if libc::pipe(p.as_mut_ptr()) < 0 {
                    fail(i);
                }
                let tr = libc::fcntl(p[0], libc::F_DUPFD, 800);
                let tw = libc::fcntl(p[1], libc::F_DUPFD, 800);
                libc::close(p[0]);
                libc::close(p[1]);
                place(tr, r, i);
                place(tw, w, i);
            }
            Step::Write { fd, n } => {
                if libc::write(fd, buf.as_ptr().cast(), n) != n as isize {
                    fail(i);
                }
            }
            Step::Epoll { at } => place(libc::epoll_create1(0), at, i),
            Step::Add {
                ep,
                fd,
                events,
                data,
            } => {
                let mut ev = libc::epoll_event { events, u64: data };
                if libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) < 0 {
                    fail(i);
                }
            }
            Step::Dup { from, to } => {
                if libc::dup2(from, to) < 0 {
                    fail(i);
                }
            }
            Step::Close { fd } => {
                libc::close(fd);
            }
            Step::Wait { ep } => {
                let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
                if libc::epoll_wait(ep, evs.as_mut_ptr(), 8, 0) < 0 {
                    fail(i);
                }
            }
            Step::PidfdOfParent { at } => {
                let fd = libc::syscall(libc::SYS_pidfd_open, libc::getppid(), 0) as i32;
                place(fd, at, i);
            }
            Step::PidfdOfSelf { at, flags } => {
                let fd = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), flags) as i32;
                place(fd, at, i);
            }
            Step::ZombieWithPidfd { at } => {
                let z = libc::fork();
                if z == 0 {
                    libc::_exit(7);
                }
                let fd = libc::syscall(libc::SYS_pidfd_open, z, 0) as i32;
                place(fd, at, i);
                // Wait until it is a zombie (it polls readable then).
                let mut p = libc::pollfd {
                    fd: at,
                    events: libc::POLLIN,
                    revents: 0,
                };
                if libc::poll(&mut p, 1, 5000) != 1 {
                    fail(i);
                }
            }
            Step::Keep { at, .. } => {
                place(KEEP_BASE + keep_i, at, i);
                keep_i += 1;
            }
        }
    }
    loop {
        libc::syscall(libc::SYS_pause);
    }
}

/// Collect the fds of `pid` (frozen meanwhile) as a one-process tree.
fn try_collect(pid: i32) -> Result<(Vec<FdEntry>, Vec<OpenFile>, Vec<PipeObject>)> {
    try_collect_with(pid, &[])
}

/// Collect the fds of `pid` in a tree that also holds `others` (all
/// frozen meanwhile); the fds are `pid`'s.
fn try_collect_with(
    pid: i32,
    others: &[i32],
) -> Result<(Vec<FdEntry>, Vec<OpenFile>, Vec<PipeObject>)> {
    let all: Vec<i32> = std::iter::once(pid).chain(others.iter().copied()).collect();
    frozen(&all, || {
        let mut files = FileCollector::new();
        let mut shmem = ShmemCollector::new();
        let fds = files.task(pid, &mut shmem)?;
        for &p in others {
            files.task(p, &mut shmem)?;
        }
        let (files, pipes, _) = files.finish()?;
        Ok((fds, files, pipes))
    })
}

/// The open file of fd `fd` in `fds`/`files`.
fn file_of<'a>(fds: &[FdEntry], files: &'a [OpenFile], fd: i32) -> &'a OpenFile {
    let id = fds
        .iter()
        .find(|e| e.fd == fd)
        .unwrap_or_else(|| panic!("no fd {fd}: {fds:?}"))
        .file;
    files.iter().find(|f| f.id == id).expect("open file")
}

fn targets_of(f: &OpenFile) -> Vec<EpollTarget> {
    match &f.kind {
        FileKind::Epoll { targets } => {
            let mut t = targets.clone();
            t.sort_by_key(|t| (t.fd, t.data));
            t
        }
        other => panic!("open file {} is {other:?}, not an epoll instance", f.id),
    }
}

/// (tfd, events, data) of every registration in fdinfo of fd `fd` of
/// `pid`, read independently of the code under test, sorted.
fn registrations(pid: i32, fd: i32) -> Vec<(i32, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
    let mut v: Vec<(i32, u32, u64)> = text
        .lines()
        .filter(|l| l.starts_with("tfd:"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
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

/// `(data, events)` of what `epoll_wait(ep, .., 0)` reports now, sorted.
fn wait(ep: &OwnedFd) -> Vec<(u64, u32)> {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
    // SAFETY: epoll_wait writes at most 16 events into `evs`.
    let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), evs.as_mut_ptr(), 16, 0) };
    assert!(n >= 0, "epoll_wait: {}", io::Error::last_os_error());
    let mut v: Vec<(u64, u32)> = evs[..n as usize]
        .iter()
        .map(|e| (e.u64, e.events))
        .collect();
    v.sort_unstable();
    v
}

/// A copy of fd `fd` of `pid`.
fn copy_fd(pid: i32, fd: i32) -> OwnedFd {
    let p = sys::pidfd_open(pid).expect("pidfd_open");
    sys::pidfd_getfd(p.as_fd(), fd).expect("pidfd_getfd")
}

fn fdinfo_field(pid: i32, fd: i32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .trim()
        .to_string()
}

// ------------------------------------------------------------------ tests

#[test]
fn fdinfo_parsing() {
    let text = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\n\
        tfd:        4 events: 4000001c data:                7  pos:0 ino:1afd sdev:f\n\
        tfd:        3 events: 80000019 data: 1122334455667788  pos:0 ino:1afd sdev:f\n\
        tfd:        4 events:       19 data:                9  pos:0 ino:40e sdev:10\n";
    let r = parse(text).expect("parse");
    assert_eq!(
        r,
        vec![
            Registration {
                tfd: 4,
                events: 0x4000_001c,
                data: 7,
                ino: 0x1afd,
                toff: 0
            },
            Registration {
                tfd: 3,
                events: 0x8000_0019,
                data: 0x1122_3344_5566_7788,
                ino: 0x1afd,
                toff: 0
            },
            Registration {
                tfd: 4,
                events: 0x19,
                data: 9,
                ino: 0x40e,
                toff: 1
            },
        ]
    );
    assert_eq!(parse("pos:\t0\nflags:\t02\n"), Ok(vec![]));
    assert!(parse("tfd: 3 events: zz data: 1 ino:1\n").is_err());
    assert!(parse("tfd: 3 events: 1 ino:1\n").is_err());
    assert_eq!(
        pidfd::parse("pos:\t0\nflags:\t02\nPid:\t77\nNSpid:\t77\n"),
        Ok(77)
    );
    assert_eq!(pidfd::parse("Pid:\t-1\n"), Ok(-1));
    assert!(pidfd::parse("pos:\t0\n").is_err());
}

/// Two pipes with data; epoll E (at 7) watches A's read end edge-triggered,
/// B's write end one-shot and B's read end, registered as 5 and then
/// dup'd to 9 and closed; epoll F (at 10) watches E; a non-blocking pidfd
/// of the child itself at 11; epoll G (at 12) with a one-shot
/// registration of A's write end that fired.
fn scene() -> Vec<Step> {
    vec![
        Step::Pipe { r: 3, w: 4 },
        Step::Pipe { r: 5, w: 6 },
        Step::Write { fd: 4, n: 10 },
        Step::Write { fd: 6, n: 20 },
        Step::Epoll { at: 7 },
        Step::Add {
            ep: 7,
            fd: 3,
            events: IN | ET,
            data: 0x11,
        },
        Step::Add {
            ep: 7,
            fd: 6,
            events: OUT | ONESHOT,
            data: 0x22,
        },
        Step::Add {
            ep: 7,
            fd: 5,
            events: IN,
            data: 0x1122_3344_5566_7733,
        },
        Step::Dup { from: 5, to: 9 },
        Step::Close { fd: 5 },
        Step::Epoll { at: 10 },
        Step::Add {
            ep: 10,
            fd: 7,
            events: IN,
            data: 0x44,
        },
        Step::PidfdOfSelf {
            at: 11,
            flags: libc::O_NONBLOCK as u32,
        },
        Step::Epoll { at: 12 },
        Step::Add {
            ep: 12,
            fd: 4,
            events: OUT | ONESHOT,
            data: 0x66,
        },
        Step::Wait { ep: 12 },
    ]
}

#[test]
fn epoll_registrations_are_collected_with_their_files() {
    let child = spawn(&scene());
    let (fds, files, _) = try_collect(child.0).expect("collect");
    let id = |fd| file_of(&fds, &files, fd).id;
    let t = |fd, file, events, data| EpollTarget {
        fd,
        file,
        events,
        data,
    };
    assert_eq!(
        targets_of(file_of(&fds, &files, 7)),
        vec![
            t(3, id(3), IN | ET | ERRHUP, 0x11),
            t(5, id(9), IN | ERRHUP, 0x1122_3344_5566_7733),
            t(6, id(6), OUT | ONESHOT | ERRHUP, 0x22),
        ],
        "the registration of fd 5 is the pipe now at 9"
    );
    assert_eq!(
        targets_of(file_of(&fds, &files, 10)),
        vec![t(7, id(7), IN | ERRHUP, 0x44)]
    );
    assert_eq!(
        targets_of(file_of(&fds, &files, 12)),
        vec![t(4, id(4), ONESHOT, 0x66)],
        "a one-shot registration that fired keeps only its flag bits"
    );
    let pf = file_of(&fds, &files, 11);
    assert_eq!(pf.kind, FileKind::Pidfd { pid: child.0 });
    assert_ne!(pf.flags & libc::O_NONBLOCK as u32, 0, "PIDFD_NONBLOCK kept");
}

#[test]
fn epoll_round_trip_into_a_stub() {
    let child = spawn(&scene());
    let (fds, files, pipes) = try_collect(child.0).expect("collect");
    let tree = image(vec![process(child.0, fds.clone())], files.clone(), pipes);
    assert_eq!(
        ferry_protocol::validate::epoll_order(&tree.files).map(|o| o.len()),
        Ok(3)
    );
    let dir = TempDir::new("epoll");
    let stdio = StdioPolicy {
        log: dir.path.join("stdio.log"),
    };
    let opened = Opened::open_all(&tree, &ShmemHandles::default(), &stdio).expect("open_all");
    // In the stub: the registrations, its fds, then EPOLL_CTL_MOD/DEL by
    // the stub's own fd numbers.
    let (guard, r) = with_stub(true, |_, inj| -> Result<(i64, i64)> {
        register_all(inj, &tree, &opened)?;
        install(inj, &tree.tasks[0].fds, &opened)?;
        let mut ev = [0u8; 12];
        ev[..4].copy_from_slice(&(IN | ET).to_le_bytes());
        ev[4..].copy_from_slice(&0x11u64.to_le_bytes());
        let ev = inj.put(64, &ev)?;
        let mut ctl = |op: i32, fd: i32| {
            inj.call_raw(libc::SYS_epoll_ctl, &[7, op as u64, fd as u64, ev])
                .map(|(r, _)| r)
        };
        // The registration of 3 is found by fd 3 (the same file)...
        let mod3 = ctl(libc::EPOLL_CTL_MOD, 3)?;
        // ...the one of 5 not by 9, as before the checkpoint: its key is
        // (the file, 5).
        let del9 = ctl(libc::EPOLL_CTL_DEL, 9)?;
        Ok((mod3, del9))
    });
    let (mod3, del9) = r.expect("restore into the stub");
    drop(opened);
    let pid = guard.0;
    assert_eq!(mod3, 0, "EPOLL_CTL_MOD of fd 3 in the restored process");
    assert_eq!(del9, -(libc::ENOENT as i64), "EPOLL_CTL_DEL of fd 9");

    // The kernel lists the same registrations, and collecting the stub
    // gives the same image of them.
    for ep in [7, 10] {
        assert_eq!(
            registrations(pid, ep),
            registrations(child.0, ep),
            "fd {ep}"
        );
    }
    // A one-shot registration that fired comes back disabled, but with the
    // EPOLLERR|EPOLLHUP that every EPOLL_CTL_ADD adds (see the module).
    assert_eq!(registrations(child.0, 12), vec![(4, ONESHOT, 0x66)]);
    assert_eq!(registrations(pid, 12), vec![(4, ONESHOT | ERRHUP, 0x66)]);
    let (fds2, files2, _) = try_collect_with(pid, &[child.0]).expect("collect the stub");
    for ep in [7, 10] {
        assert_eq!(
            targets_of(file_of(&fds2, &files2, ep)),
            targets_of(file_of(&fds, &files, ep)),
            "fd {ep}"
        );
    }

    // What they report: the data pending at the freeze, once for the
    // edge-triggered and the one-shot registrations, on every wait for the
    // level-triggered one; the outer instance sees the inner one ready; a
    // one-shot that had fired stays disabled.
    let e = copy_fd(pid, 7);
    let f = copy_fd(pid, 10);
    let g = copy_fd(pid, 12);
    assert_eq!(wait(&f), vec![(0x44, IN)], "the nested instance");
    assert_eq!(
        wait(&e),
        vec![(0x11, IN), (0x22, OUT), (0x1122_3344_5566_7733, IN)]
    );
    assert_eq!(wait(&e), vec![(0x1122_3344_5566_7733, IN)]);
    assert_eq!(wait(&g), vec![], "a one-shot registration that fired");

    // The pidfd: the same process, non-blocking.
    assert_eq!(fdinfo_field(pid, 11, "Pid:"), child.0.to_string());
    let flags = u32::from_str_radix(&fdinfo_field(pid, 11, "flags:"), 8).expect("flags");
    assert_ne!(
        flags & libc::O_NONBLOCK as u32,
        0,
        "PIDFD_NONBLOCK: {flags:o}"
    );
}

#[test]
fn epoll_target_held_only_outside_the_tree_is_refused() {
    let (r, _w) = sys::pipe2(libc::O_CLOEXEC).expect("pipe");
    let child = spawn(&[
        Step::Keep {
            from: r.as_raw_fd(),
            at: 3,
        },
        Step::Epoll { at: 4 },
        Step::Add {
            ep: 4,
            fd: 3,
            events: IN,
            data: 1,
        },
        Step::Close { fd: 3 },
    ]);
    match try_collect(child.0) {
        Err(e @ Error::UnsupportedFd { pid, fd: 4, .. }) if pid == child.0 => {
            let msg = e.to_string();
            assert!(
                msg.contains("an epoll instance watching fd 3")
                    && msg.contains("an open file that no process of the tree holds"),
                "{msg}"
            );
        }
        other => panic!("expected the epoll at fd 4 refused, got {other:?}"),
    }
}

#[test]
fn pidfd_outside_the_tree_is_refused_of_a_zombie_is_kept() {
    let child = spawn(&[Step::PidfdOfParent { at: 3 }]);
    match try_collect(child.0) {
        Err(e @ Error::UnsupportedFd { pid, fd: 3, .. }) if pid == child.0 => {
            let msg = e.to_string();
            let me = std::process::id();
            assert!(
                msg.contains(&format!("a pidfd of process {me} ("))
                    && msg.contains("outside the process tree"),
                "{msg}"
            );
        }
        other => panic!("expected the pidfd at fd 3 refused, got {other:?}"),
    }
    let child = spawn(&[Step::ZombieWithPidfd { at: 3 }]);
    let (fds, files, _) = try_collect(child.0).expect("a pidfd of a zombie child");
    let FileKind::Pidfd { pid: z } = file_of(&fds, &files, 3).kind else {
        panic!("not a pidfd: {files:?}");
    };
    assert_eq!(crate::procfs::stat(z).map(|s| s.state()).ok(), Some('Z'));
}

#[test]
fn pidfd_restore_refers_to_the_process() {
    let child = spawn(&[]);
    let dir = TempDir::new("pidfd");
    let stdio = StdioPolicy {
        log: dir.path.join("stdio.log"),
    };
    let pidfd = |pid| OpenFile {
        id: 1,
        flags: (libc::O_RDWR | libc::O_NONBLOCK) as u32,
        pos: 0,
        kind: FileKind::Pidfd { pid },
    };
    let entry = FdEntry {
        fd: 5,
        cloexec: false,
        file: 1,
    };
    let tree = image(
        vec![process(child.0, vec![entry])],
        vec![pidfd(child.0)],
        vec![],
    );
    let opened = Opened::open_all(&tree, &ShmemHandles::default(), &stdio).expect("open_all");
    let (guard, r) = with_stub(true, |_, inj| install(inj, &tree.tasks[0].fds, &opened));
    r.expect("install");
    assert_eq!(fdinfo_field(guard.0, 5, "Pid:"), child.0.to_string());
    // It is the child's: a signal sent through it reaches the child.
    let copy = copy_fd(guard.0, 5);
    // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            copy.as_raw_fd(),
            libc::SIGKILL,
            0,
            0,
        )
    };
    assert_eq!(r, 0, "pidfd_send_signal: {}", io::Error::last_os_error());
    let mut st = 0;
    // SAFETY: waitpid of our own child.
    assert_eq!(unsafe { libc::waitpid(child.0, &mut st, 0) }, child.0);
    assert!(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL);
    drop(child);
    // A process that does not exist here: a clear error.
    let gone = image(
        vec![process(guard.0, vec![entry])],
        vec![pidfd(i32::MAX - 1)],
        vec![],
    );
    match Opened::open_all(&gone, &ShmemHandles::default(), &stdio) {
        Err(e @ Error::Incompatible(_)) => {
            assert!(e.to_string().contains("does not exist here"), "{e}")
        }
        Err(other) => panic!("expected Incompatible, got {other}"),
        Ok(_) => panic!("a pidfd of a missing process was made"),
    }
}
