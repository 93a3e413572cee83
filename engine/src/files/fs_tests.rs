//! Tests of the filesystem-side kinds: named pipes, file locks, O_PATH fds
//! and directories, renamed files, inotify, and the refusals of the kinds
//! that cannot move. Real processes: a forked child sets its fds up with
//! raw system calls and pauses; restore goes into stubs.

use super::testkit::{frozen, process, ScriptChild, TempDir};
use super::*;
use crate::shmem::ShmemHandles;
use crate::testutil::{with_stub, StubGuard};
use std::ffi::CString;
use std::io::Read;

// ---------------------------------------------------------------- helpers

/// Fork a child that closes every fd, runs `setup` (raw libc calls on data
/// prepared before, returning false on failure) and pauses.
fn child(setup: impl FnOnce() -> bool) -> ScriptChild {
    // SAFETY: the child only makes async-signal-safe libc calls (the
    // closure's and ours) on data prepared before the fork, then pauses
    // forever or `_exit`s.
    let pid = unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
            if !setup() {
                libc::_exit(99);
            }
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
        pid
    };
    assert!(pid > 0, "fork failed");
    let c = ScriptChild { pid };
    for _ in 0..5000 {
        let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if sc.starts_with(&format!("{} ", libc::SYS_pause)) {
            return c;
        }
        let mut st = 0;
        // SAFETY: non-blocking wait of our own child into a valid local.
        if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
            panic!("child set-up failed (status {st:#x})");
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("child {pid} did not reach pause()");
}

/// In a child: `open(path, flags)` moved to fd `at`.
///
/// # Safety
/// Async-signal-safe only; `path` must be valid.
unsafe fn open_at(path: &CString, flags: i32, at: i32) -> bool {
    let fd = libc::open(path.as_ptr(), flags, 0o644);
    if fd < 0 {
        return false;
    }
    if fd != at {
        if libc::dup2(fd, at) < 0 {
            return false;
        }
        libc::close(fd);
    }
    true
}

/// A `struct flock`.
fn flock_of(ty: i32, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: ty as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

/// Collect the files of the frozen `pids`.
fn try_collect(pids: &[i32]) -> Result<TreeImage> {
    frozen(pids, || {
        let mut files = FileCollector::new();
        let mut shmem = ShmemCollector::new();
        let mut tasks = Vec::new();
        for &pid in pids {
            tasks.push(process(pid, files.task(pid, &mut shmem)?));
        }
        let locks = files.locks();
        let (files, pipes, deleted) = files.finish()?;
        Ok(TreeImage {
            host: crate::host::host_info(),
            tasks,
            zombies: vec![],
            files,
            pipes,
            shmem: vec![],
            deleted,
            locks,
        })
    })
}

fn collect(pids: &[i32]) -> TreeImage {
    try_collect(pids).expect("collect")
}

fn policy(dir: &TempDir) -> StdioPolicy {
    StdioPolicy {
        log: dir.path.join("stdio.log"),
    }
}

/// Open the files of `tree` and install those of its first task in a stub.
fn try_restore(tree: &TreeImage, dir: &TempDir) -> Result<StubGuard> {
    let mut opened = Opened::open_all(tree, &ShmemHandles::default(), &policy(dir))?;
    let (guard, r) = with_stub(true, |pid, inj| {
        // The stub stands for the first task (a real restore gives it
        // that task's PID).
        for l in &mut opened.locks {
            if l.owner
                == (LockOwner::Posix {
                    pid: tree.tasks[0].pid,
                })
            {
                l.owner = LockOwner::Posix { pid };
            }
        }
        install(inj, &tree.tasks[0].fds, &opened)
    });
    r?;
    Ok(guard)
}

fn restore(tree: &TreeImage, dir: &TempDir) -> StubGuard {
    try_restore(tree, dir).expect("restore")
}

/// A copy of fd `fd` of `pid` (the same open file description).
fn copy_fd(pid: i32, fd: i32) -> std::fs::File {
    let pidfd = sys::pidfd_open(pid).expect("pidfd_open");
    std::fs::File::from(sys::pidfd_getfd(pidfd.as_fd(), fd).expect("pidfd_getfd"))
}

/// The `flags:` of fdinfo (with O_CLOEXEC).
fn fdflags(pid: i32, fd: i32) -> u32 {
    let t = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
    parse_fdinfo(&t).expect("fdinfo").0
}

/// `F_GETLK` (or `F_OFD_GETLK` with `ofd`) from a fresh description of
/// `path`: the lock that blocks a write lock on `start`+`len`.
fn conflicting(path: &str, ofd: bool, start: i64, len: i64) -> libc::flock {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut fl = flock_of(libc::F_WRLCK, start, len);
    let cmd = if ofd {
        locks::F_OFD_GETLK
    } else {
        libc::F_GETLK
    };
    // SAFETY: F_GETLK reads and writes one `struct flock`, a valid local.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    assert_eq!(r, 0, "F_GETLK: {}", io::Error::last_os_error());
    fl
}

/// Does a fresh description get `flock(LOCK_EX | LOCK_NB)` on `path`?
fn flock_free(path: &str) -> bool {
    let f = std::fs::File::open(path).expect("open");
    // SAFETY: integer arguments only.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

// ------------------------------------------------------------------ FIFOs

/// A child with FIFO `path` open with O_PATH at fd 2, read-write at fd 3
/// (holding `data`) and write-only, non-blocking at fd 4.
fn fifo_child(path: &str, data: &'static [u8]) -> ScriptChild {
    let c = cs(path);
    child(move || {
        // SAFETY: raw calls on prepared data.
        unsafe {
            open_at(&c, libc::O_PATH, 2)
                && open_at(&c, libc::O_RDWR, 3)
                && open_at(&c, libc::O_WRONLY | libc::O_NONBLOCK, 4)
                && libc::write(3, data.as_ptr().cast(), data.len()) == data.len() as isize
        }
    })
}

fn cs(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn mkfifo(path: &str) {
    // SAFETY: a valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(cs(path).as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo: {}", io::Error::last_os_error());
}

/// Bytes waiting in the FIFO at fd `fd` of `pid`, consumed.
fn drain(pid: i32, fd: i32) -> Vec<u8> {
    let mut f = copy_fd(pid, fd);
    let n = sys::fionread(f.as_fd()).expect("FIONREAD");
    let mut buf = vec![0u8; n];
    f.read_exact(&mut buf).expect("read");
    buf
}

#[test]
fn fifo_with_unread_data_round_trips() {
    const DATA: &[u8] = b"unread bytes in a named pipe";
    let dir = TempDir::new("fifo");
    let path = dir.file("ff");
    mkfifo(&path);
    let c = fifo_child(&path, DATA);
    let tree = collect(&[c.pid]);
    let md = std::fs::metadata(&path).expect("stat");
    let kinds: Vec<&FileKind> = tree.files.iter().map(|f| &f.kind).collect();
    let want = FileKind::Fifo {
        path: path.clone(),
        dev: md.dev(),
        ino: md.ino(),
        pipe: 1,
    };
    assert_eq!(
        kinds,
        vec![&want, &want, &want],
        "one FIFO, three descriptions"
    );
    assert_eq!(tree.pipes.len(), 1);
    assert_eq!(tree.pipes[0].data, DATA);
    // The capture left the data in place.
    let f = copy_fd(c.pid, 3);
    assert_eq!(sys::fionread(f.as_fd()).expect("FIONREAD"), DATA.len());
    drop(f);
    let path_flags = fdflags(c.pid, 2);
    assert_ne!(path_flags & libc::O_PATH as u32, 0);
    // The holder dies, and the FIFO's buffer with it.
    drop(c);
    let s = restore(&tree, &dir);
    assert_eq!(fdflags(s.0, 2), path_flags, "the O_PATH fd");
    assert_eq!(fdflags(s.0, 3) & 0o3, libc::O_RDWR as u32);
    let fl4 = fdflags(s.0, 4);
    assert_eq!(fl4 & 0o3, libc::O_WRONLY as u32);
    assert_ne!(fl4 & libc::O_NONBLOCK as u32, 0, "fd 4 stays non-blocking");
    assert_eq!(fdflags(s.0, 3) & libc::O_NONBLOCK as u32, 0, "fd 3 blocks");
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/fd/4", s.0)).expect("link"),
        std::path::Path::new(&path)
    );
    assert_eq!(drain(s.0, 3), DATA);
}

#[test]
fn fifo_still_holding_its_data_is_not_filled_twice() {
    const DATA: &[u8] = b"still there";
    let dir = TempDir::new("fifo-kept");
    let path = dir.file("ff");
    mkfifo(&path);
    let c = fifo_child(&path, DATA);
    let tree = collect(&[c.pid]);
    // The source is still alive (a migration on one kernel).
    let s = restore(&tree, &dir);
    drop(c);
    assert_eq!(drain(s.0, 3), DATA);
}

#[test]
fn fifo_with_other_data_is_refused() {
    let dir = TempDir::new("fifo-other");
    let path = dir.file("ff");
    mkfifo(&path);
    let c = fifo_child(&path, b"saved");
    let tree = collect(&[c.pid]);
    let mut w = copy_fd(c.pid, 4);
    std::io::Write::write_all(&mut w, b"more").expect("write");
    match try_restore(&tree, &dir) {
        Err(Error::Incompatible(m)) => {
            assert!(m.contains(&path) && m.contains("not the 5 bytes"), "{m}")
        }
        other => panic!("expected Incompatible, got {:?}", other.map(|g| g.0)),
    }
}

#[test]
fn fifo_written_only_is_captured_through_the_path() {
    const DATA: &[u8] = b"for a reader that is gone";
    let dir = TempDir::new("fifo-w");
    let path = dir.file("ff");
    mkfifo(&path);
    // A reader of ours so that the child's open for writing succeeds.
    let reader = sys::open(&cs(&path), libc::O_RDONLY | libc::O_NONBLOCK).expect("open");
    let c = {
        let p = cs(&path);
        child(move || {
            // SAFETY: raw calls on prepared data.
            unsafe {
                open_at(&p, libc::O_WRONLY, 5)
                    && libc::write(5, DATA.as_ptr().cast(), DATA.len()) == DATA.len() as isize
            }
        })
    };
    drop(reader);
    let tree = collect(&[c.pid]);
    assert_eq!(tree.pipes[0].data, DATA);
    drop(c);
    let s = restore(&tree, &dir);
    assert_eq!(fdflags(s.0, 5) & 0o3, libc::O_WRONLY as u32);
    // The restored writer kept the data for the next reader.
    let mut r = std::fs::File::from(
        sys::open(&cs(&path), libc::O_RDONLY | libc::O_NONBLOCK).expect("open"),
    );
    let mut buf = vec![0u8; 100];
    let n = r.read(&mut buf).expect("read");
    assert_eq!(&buf[..n], DATA);
}

#[test]
fn replaced_fifo_is_incompatible() {
    let dir = TempDir::new("fifo-replaced");
    let path = dir.file("ff");
    mkfifo(&path);
    let c = fifo_child(&path, b"x");
    let tree = collect(&[c.pid]);
    drop(c);
    // Another FIFO (made while the first exists: another inode) takes its name.
    let other = dir.file("other");
    mkfifo(&other);
    std::fs::rename(&other, &path).expect("rename");
    match try_restore(&tree, &dir) {
        Err(Error::Incompatible(m)) => assert!(m.contains("replaced"), "{m}"),
        other => panic!("expected Incompatible, got {:?}", other.map(|g| g.0)),
    }
}

// ------------------------------------------------------------------ locks

/// A child holding: flock(LOCK_EX) through fd 3, a POSIX write lock on
/// bytes 10..20 through fd 4, an OFD read lock on 100.. through fd 5, all
/// on `path`.
fn lock_child(path: &str) -> ScriptChild {
    let p = cs(path);
    let posix = flock_of(libc::F_WRLCK, 10, 10);
    let ofd = flock_of(libc::F_RDLCK, 100, 0);
    child(move || {
        // SAFETY: raw calls on prepared data.
        unsafe {
            open_at(&p, libc::O_RDWR, 3)
                && open_at(&p, libc::O_RDWR, 4)
                && open_at(&p, libc::O_RDWR, 5)
                && libc::flock(3, libc::LOCK_EX | libc::LOCK_NB) == 0
                && libc::fcntl(4, libc::F_SETLK, &posix) == 0
                && libc::fcntl(5, locks::F_OFD_SETLK, &ofd) == 0
        }
    })
}

#[test]
fn flock_posix_and_ofd_locks_are_held_again_after_restore() {
    let dir = TempDir::new("locks");
    let path = dir.file("locked");
    std::fs::write(&path, vec![0u8; 200]).expect("write");
    let c = lock_child(&path);
    let tree = collect(&[c.pid]);
    let fid = |fd: i32| {
        tree.tasks[0]
            .fds
            .iter()
            .find(|e| e.fd == fd)
            .expect("fd")
            .file
    };
    let mut got = tree.locks.clone();
    got.sort_by_key(|l| l.file);
    let want = vec![
        FileLock {
            file: fid(3),
            owner: LockOwner::Flock,
            write: true,
            start: 0,
            len: 0,
        },
        FileLock {
            file: fid(4),
            owner: LockOwner::Posix { pid: c.pid },
            write: true,
            start: 10,
            len: 10,
        },
        FileLock {
            file: fid(5),
            owner: LockOwner::Ofd,
            write: false,
            start: 100,
            len: 0,
        },
    ];
    assert_eq!(got, want);
    // While the child lives, they are taken.
    assert!(!flock_free(&path));
    drop(c);
    assert!(flock_free(&path), "the child's death freed the flock");
    let s = restore(&tree, &dir);
    assert!(!flock_free(&path), "flock held again");
    let fl = conflicting(&path, false, 12, 1);
    assert_eq!(fl.l_type, libc::F_WRLCK as libc::c_short, "POSIX lock held");
    assert_eq!((fl.l_start, fl.l_len), (10, 10));
    assert_eq!(fl.l_pid, s.0, "held by the restored process");
    let fl = conflicting(&path, true, 150, 1);
    assert_eq!(fl.l_type, libc::F_RDLCK as libc::c_short, "OFD lock held");
    assert_eq!((fl.l_start, fl.l_len), (100, 0));
    assert_eq!(fl.l_pid, -1, "an OFD lock");
    // Nothing else is locked.
    let fl = conflicting(&path, false, 30, 10);
    assert_eq!(fl.l_type, libc::F_UNLCK as libc::c_short);
    // And a checkpoint of the restored process finds the same locks.
    let again = collect(&[s.0]);
    let mut locks = again.locks.clone();
    locks.sort_by_key(|l| l.file);
    let owners: Vec<LockOwner> = locks.iter().map(|l| l.owner).collect();
    assert_eq!(
        owners,
        vec![
            LockOwner::Flock,
            LockOwner::Posix { pid: s.0 },
            LockOwner::Ofd
        ]
    );
}

#[test]
fn a_lock_held_by_someone_else_fails_the_restore() {
    let dir = TempDir::new("locks-held");
    let path = dir.file("locked");
    std::fs::write(&path, vec![0u8; 200]).expect("write");
    let c = lock_child(&path);
    let tree = collect(&[c.pid]);
    // The original holder still holds them.
    match try_restore(&tree, &dir) {
        Err(Error::Incompatible(m)) => {
            assert!(m.contains("held by another process"), "{m}");
            assert!(m.contains(&path), "{m}");
        }
        other => panic!("expected Incompatible, got {:?}", other.map(|g| g.0)),
    }
    drop(c);
}

// --------------------------------------------------------------- refusals

/// Collecting a child that made one fd with `make` fails naming `needle`.
fn refused(make: fn() -> bool, needle: &str) {
    let c = child(make);
    match try_collect(&[c.pid]) {
        Err(e @ Error::UnsupportedFd { .. }) => {
            let m = e.to_string();
            assert!(m.contains(needle), "{m}");
        }
        other => panic!("expected UnsupportedFd, got {other:?}"),
    }
}

#[test]
fn io_uring_userfaultfd_perf_and_fanotify_are_refused_by_name() {
    refused(
        || {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup reads and writes one 120-byte params struct.
            unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) >= 0 }
        },
        "io_uring",
    );
    refused(
        // SAFETY: integer arguments only.
        || unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) >= 0 },
        "userfaultfd",
    );
    refused(
        // SAFETY: integer arguments only.
        || unsafe { libc::syscall(libc::SYS_fanotify_init, 0u32, libc::O_RDONLY as u32) >= 0 },
        "fanotify",
    );
    refused(
        || {
            // A software clock event of this process.
            let mut attr = [0u8; 128];
            attr[0..4].copy_from_slice(&1u32.to_ne_bytes()); // PERF_TYPE_SOFTWARE
            attr[4..8].copy_from_slice(&128u32.to_ne_bytes()); // size
                                                               // config 0 = PERF_COUNT_SW_CPU_CLOCK; disabled | exclude_kernel | exclude_hv
            attr[40..48].copy_from_slice(&(1u64 | 1 << 5 | 1 << 6).to_ne_bytes());
            // SAFETY: perf_event_open reads one 128-byte attr struct.
            unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0u64) >= 0 }
        },
        "perf event",
    );
}

// ------------------------------------------------- O_PATH, directories, renames

#[test]
fn o_path_fds_directories_and_renamed_files_round_trip() {
    let dir = TempDir::new("opath");
    let file = dir.file("f");
    let sub = dir.file("sub");
    let old = dir.file("old");
    std::fs::write(&file, b"x").expect("write");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::write(&old, b"renamed").expect("write");
    let (f, s, o) = (cs(&file), cs(&sub), cs(&old));
    let c = child(move || {
        // SAFETY: raw calls on prepared data.
        unsafe {
            open_at(&f, libc::O_PATH, 3)
                && open_at(&s, libc::O_PATH | libc::O_DIRECTORY, 4)
                && open_at(&s, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK, 5)
                && open_at(&o, libc::O_RDWR, 6)
                && libc::lseek(6, 3, libc::SEEK_SET) == 3
        }
    });
    // Renamed while open: the link names the new path.
    let new = dir.file("new");
    std::fs::rename(&old, &new).expect("rename");
    let tree = collect(&[c.pid]);
    let kind = |fd: i32| {
        let id = tree.tasks[0]
            .fds
            .iter()
            .find(|e| e.fd == fd)
            .expect("fd")
            .file;
        tree.file(id).expect("file").kind.clone()
    };
    assert!(matches!(kind(3), FileKind::Regular { path, .. } if path == file));
    assert!(matches!(kind(4), FileKind::Directory { path } if path == sub));
    assert!(matches!(kind(6), FileKind::Regular { path, .. } if path == new));
    let s = restore(&tree, &dir);
    for fd in 3..=6 {
        assert_eq!(fdflags(s.0, fd), fdflags(c.pid, fd), "flags of fd {fd}");
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/fd/{fd}", s.0)).expect("link"),
            std::fs::read_link(format!("/proc/{}/fd/{fd}", c.pid)).expect("link"),
            "fd {fd}"
        );
    }
    let mut f6 = copy_fd(s.0, 6);
    let mut rest = String::new();
    f6.read_to_string(&mut rest).expect("read");
    assert_eq!(rest, "amed", "renamed file at its offset");
}

#[test]
fn a_file_renamed_over_after_the_checkpoint_is_incompatible() {
    let dir = TempDir::new("renamed-over");
    let path = dir.file("f");
    std::fs::write(&path, b"one").expect("write");
    let p = cs(&path);
    // SAFETY: raw calls on prepared data.
    let c = child(move || unsafe { open_at(&p, libc::O_RDONLY, 3) });
    let tree = collect(&[c.pid]);
    drop(c);
    let other = dir.file("other");
    std::fs::write(&other, b"two").expect("write");
    std::fs::rename(&other, &path).expect("rename");
    match try_restore(&tree, &dir) {
        Err(Error::Incompatible(m)) => assert!(m.contains("replaced") && m.contains(&path), "{m}"),
        other => panic!("expected Incompatible, got {:?}", other.map(|g| g.0)),
    }
}

// ----------------------------------------------------------------- inotify

/// A child with an inotify instance at fd 3 (non-blocking) watching `a`
/// (wd 1, IN_CREATE) and `c` (wd 3, IN_MODIFY | IN_ONESHOT), wd 2 (on `b`)
/// removed. With `drain`, the IN_IGNORED of wd 2 is read away; with
/// `touch`, a file is then created in `a` (an event waits).
fn inotify_child(a: &str, b: &str, c: &str, drain: bool, touch: &str) -> ScriptChild {
    let (a, b, c) = (cs(a), cs(b), cs(c));
    let t = cs(touch);
    let touch = !touch.is_empty();
    child(move || {
        // SAFETY: raw calls on prepared data.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK);
            if fd < 0 || libc::dup2(fd, 3) < 0 {
                return false;
            }
            if fd != 3 {
                libc::close(fd);
            }
            if libc::inotify_add_watch(3, a.as_ptr(), libc::IN_CREATE) != 1
                || libc::inotify_add_watch(3, b.as_ptr(), libc::IN_MODIFY) != 2
                || libc::inotify_add_watch(3, c.as_ptr(), libc::IN_MODIFY | libc::IN_ONESHOT) != 3
                || libc::inotify_rm_watch(3, 2) != 0
            {
                return false;
            }
            let mut buf = [0u8; 256];
            if drain && libc::read(3, buf.as_mut_ptr().cast(), buf.len()) <= 0 {
                return false;
            }
            if touch {
                let f = libc::open(t.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600);
                if f < 0 {
                    return false;
                }
                libc::close(f);
            }
            true
        }
    })
}

/// `(wd, ino, mask)` of each watch in the fdinfo of fd `fd` of `pid`.
fn watch_lines(pid: i32, fd: i32) -> Vec<(i32, u64, u32)> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
    t.lines()
        .filter_map(|l| l.strip_prefix("inotify "))
        .map(|l| {
            let get = |k: &str| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k))
                    .map(|v| u64::from_str_radix(v, 16).expect("hex"))
                    .expect("field")
            };
            (get("wd:") as i32, get("ino:"), get("mask:") as u32)
        })
        .collect()
}

/// The events waiting on fd `fd` of `pid`: `(wd, mask, name)`.
fn events(pid: i32, fd: i32) -> Vec<(i32, u32, String)> {
    let mut f = copy_fd(pid, fd);
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    let n = match f.read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
        Err(e) => panic!("read: {e}"),
    };
    let mut off = 0;
    while off + 16 <= n {
        let word =
            |i: usize| u32::from_ne_bytes(buf[off + i..off + i + 4].try_into().expect("4 bytes"));
        let len = word(12) as usize;
        let name = String::from_utf8_lossy(&buf[off + 16..off + 16 + len])
            .trim_end_matches('\0')
            .to_string();
        out.push((word(0) as i32, word(4), name));
        off += 16 + len;
    }
    out
}

#[test]
fn inotify_watches_come_back_on_their_descriptors() {
    let dir = TempDir::new("inotify");
    let (a, b, c) = (dir.file("a"), dir.file("b"), dir.file("c"));
    std::fs::create_dir(&a).expect("mkdir");
    std::fs::write(&b, b"").expect("write");
    std::fs::write(&c, b"").expect("write");
    let ch = inotify_child(&a, &b, &c, true, "");
    let before = watch_lines(ch.pid, 3);
    let tree = collect(&[ch.pid]);
    let FileKind::Inotify { watches, queued } = &tree.files[0].kind else {
        panic!("not inotify: {:?}", tree.files[0].kind);
    };
    assert!(!queued, "nothing was waiting");
    let got: Vec<(i32, &str)> = watches.iter().map(|w| (w.wd, w.path.as_str())).collect();
    assert_eq!(got, vec![(1, a.as_str()), (3, c.as_str())]);
    drop(ch);
    let s = restore(&tree, &dir);
    assert_eq!(watch_lines(s.0, 3), before, "same wds, inodes and masks");
    assert_ne!(fdflags(s.0, 3) & libc::O_NONBLOCK as u32, 0);
    assert_eq!(
        events(s.0, 3),
        vec![],
        "no stray events (the gap's IN_IGNORED)"
    );
    std::fs::write(format!("{a}/new"), b"").expect("create");
    assert_eq!(
        events(s.0, 3),
        vec![(1, libc::IN_CREATE, "new".to_string())]
    );
}

#[test]
fn inotify_events_waiting_at_the_freeze_become_an_overflow() {
    let dir = TempDir::new("inotify-q");
    let (a, b, c) = (dir.file("a"), dir.file("b"), dir.file("c"));
    std::fs::create_dir(&a).expect("mkdir");
    std::fs::write(&b, b"").expect("write");
    std::fs::write(&c, b"").expect("write");
    let ch = inotify_child(&a, &b, &c, true, &format!("{a}/early"));
    let tree = collect(&[ch.pid]);
    assert!(matches!(
        &tree.files[0].kind,
        FileKind::Inotify { queued: true, .. }
    ));
    // The original still holds its event.
    assert_eq!(
        events(ch.pid, 3),
        vec![(1, libc::IN_CREATE, "early".to_string())]
    );
    drop(ch);
    let s = restore(&tree, &dir);
    assert_eq!(
        events(s.0, 3),
        vec![(-1, inotify::IN_Q_OVERFLOW, String::new())],
        "the lost event is reported"
    );
    std::fs::write(format!("{a}/late"), b"").expect("create");
    assert_eq!(
        events(s.0, 3),
        vec![(1, libc::IN_CREATE, "late".to_string())]
    );
}
