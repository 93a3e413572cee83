//! Checkpoint of a process's open file descriptors.
//!
//! Every entry of `/proc/PID/fd` becomes an [`FdEntry`]: the link text says
//! what it is (`pipe:[INO]`, `socket:[INO]`, `anon_inode:[eventfd]`, a path),
//! `stat` of the magic link says which file, and `/proc/PID/fdinfo/N` gives
//! the position and the status flags. Unread pipe data is copied out with
//! `tee(2)` from a copy of the read end taken with `pidfd_getfd`, so the
//! process keeps it.

use crate::{Error, Result};
use ferry_protocol::model::{FdEntry, FdKind};
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// `O_CLOEXEC` as it appears in the `flags:` line of fdinfo.
const FDINFO_CLOEXEC: u32 = libc::O_CLOEXEC as u32;

/// Kind string for a pipe that has only one end in the process.
const PIPE_PEER_OUTSIDE: &str = "a pipe whose other end is outside the process";

/// Capture every open fd of `pid`, sorted by number.
///
/// All threads of `pid` must be frozen (the caller holds them in ptrace
/// stops) so that nothing changes while the fds are read. Fails with
/// [`Error::UnsupportedFd`] on the first fd of a kind ferry cannot restore
/// (sockets, eventfds, epoll, deleted files, pipes with an end outside the
/// process, ...). Pipe contents are copied without being consumed.
pub fn collect(pid: i32) -> Result<Vec<FdEntry>> {
    let numbers = list_fds(pid)?;
    let mut out: Vec<FdEntry> = Vec::with_capacity(numbers.len());
    // pipe id -> indexes into `out`
    let mut pipes: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for fd in numbers {
        let (raw_flags, pos) = read_fdinfo(pid, fd)?;
        let link = read_link(pid, fd)?;
        let mut kind = classify(pid, fd, &link)?;
        if let FdKind::Pipe { id, write_end, .. } = &mut kind {
            *write_end = raw_flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
            pipes.entry(*id).or_default().push(out.len());
        }
        out.push(FdEntry {
            fd,
            flags: raw_flags & !FDINFO_CLOEXEC,
            cloexec: raw_flags & FDINFO_CLOEXEC != 0,
            pos,
            kind,
        });
    }
    let mut pidfd: Option<OwnedFd> = None;
    for (id, idxs) in &pipes {
        capture_pipe(pid, *id, idxs, &mut out, &mut pidfd)?;
    }
    Ok(out)
}

/// Check that both ends of pipe `id` are in the process, copy its unread
/// data onto the first fd of the pipe, and record its capacity.
fn capture_pipe(
    pid: i32,
    id: u64,
    idxs: &[usize],
    out: &mut [FdEntry],
    pidfd: &mut Option<OwnedFd>,
) -> Result<()> {
    let Some(&first) = idxs.first() else {
        return Ok(());
    };
    let first_fd = out[first].fd;
    let accmode = |i: usize| out[i].flags & libc::O_ACCMODE as u32;
    let reader = idxs
        .iter()
        .copied()
        .find(|&i| accmode(i) != libc::O_WRONLY as u32);
    let has_writer = idxs.iter().any(|&i| accmode(i) != libc::O_RDONLY as u32);
    let Some(reader) = reader.filter(|_| has_writer) else {
        return Err(Error::UnsupportedFd {
            pid,
            fd: first_fd,
            kind: PIPE_PEER_OUTSIDE.to_string(),
        });
    };
    let reader_fd = out[reader].fd;
    let what = |op: &str| format!("fd {reader_fd} of process {pid} (pipe:[{id}]): {op}");
    if pidfd.is_none() {
        *pidfd = Some(sys::pidfd_open(pid).map_err(|e| Error::io(what("pidfd_open"), e))?);
    }
    let Some(pidfd) = pidfd.as_ref() else {
        return Err(Error::parse("pidfd", "missing after pidfd_open"));
    };
    let copy = sys::pidfd_getfd(pidfd.as_fd(), reader_fd)
        .map_err(|e| Error::io(what("pidfd_getfd"), e))?;
    let (capacity, data) = peek_pipe(copy.as_fd()).map_err(|e| Error::io(what("peek"), e))?;
    let mut data = Some(data);
    for &i in idxs {
        if let FdKind::Pipe {
            data: d,
            capacity: c,
            ..
        } = &mut out[i].kind
        {
            *c = capacity;
            *d = data.take();
        }
    }
    Ok(())
}

/// Read the unread bytes of the pipe whose read end is `src` without
/// consuming them; returns `(capacity, data)`.
fn peek_pipe(src: std::os::fd::BorrowedFd<'_>) -> io::Result<(u32, Vec<u8>)> {
    let capacity = sys::fcntl(src, libc::F_GETPIPE_SZ, 0)?;
    let avail = sys::fionread(src)?;
    if avail == 0 {
        return Ok((capacity as u32, Vec::new()));
    }
    let (ours_r, ours_w) = sys::pipe2(libc::O_CLOEXEC | libc::O_NONBLOCK)?;
    let ours = sys::fcntl(ours_w.as_fd(), libc::F_SETPIPE_SZ, capacity)?;
    if ours < capacity {
        return Err(io::Error::other(format!(
            "could only get a pipe of {ours} bytes to copy a pipe of {capacity}"
        )));
    }
    let n = match sys::tee(src, ours_w.as_fd(), avail, libc::SPLICE_F_NONBLOCK) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => 0,
        Err(e) => return Err(e),
    };
    if n != avail {
        return Err(io::Error::other(format!(
            "tee copied {n} of the {avail} unread bytes"
        )));
    }
    drop(ours_w);
    let mut data = Vec::with_capacity(avail);
    std::fs::File::from(ours_r).read_to_end(&mut data)?;
    if data.len() != avail {
        return Err(io::Error::other(format!(
            "read back {} of the {avail} unread bytes",
            data.len()
        )));
    }
    Ok((capacity as u32, data))
}

/// The fd numbers of `pid`, sorted.
fn list_fds(pid: i32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => Error::NoSuchProcess { pid },
        _ => Error::io(format!("reading {dir}"), e),
    })?;
    let mut fds = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("reading {dir}"), e))?;
        let name = ent.file_name();
        let fd = name
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
            .ok_or_else(|| Error::parse(format!("entry of {dir}"), format!("{name:?}")))?;
        fds.push(fd);
    }
    fds.sort_unstable();
    Ok(fds)
}

/// `(flags, pos)` from `/proc/PID/fdinfo/FD`; flags still include `O_CLOEXEC`.
fn read_fdinfo(pid: i32, fd: i32) -> Result<(u32, u64)> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    parse_fdinfo(&text).map_err(|detail| Error::parse(path, detail))
}

/// Parse the `pos:` and `flags:` lines of an fdinfo file.
fn parse_fdinfo(text: &str) -> std::result::Result<(u32, u64), String> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = Some(
                v.trim()
                    .parse::<u64>()
                    .map_err(|e| format!("pos {v:?}: {e}"))?,
            );
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags =
                Some(u32::from_str_radix(v.trim(), 8).map_err(|e| format!("flags {v:?}: {e}"))?);
        }
    }
    match (flags, pos) {
        (Some(f), Some(p)) => Ok((f, p)),
        _ => Err(format!("no pos:/flags: lines in {text:?}")),
    }
}

/// The target of the magic link `/proc/PID/fd/FD`.
fn read_link(pid: i32, fd: i32) -> Result<String> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let target = std::fs::read_link(&path).map_err(|e| Error::io(format!("readlink {path}"), e))?;
    target
        .into_os_string()
        .into_string()
        .map_err(|s| Error::UnsupportedFd {
            pid,
            fd,
            kind: format!("a file with a non-UTF-8 path ({s:?})"),
        })
}

/// Decide what fd `fd` (whose link reads `link`) is.
fn classify(pid: i32, fd: i32, link: &str) -> Result<FdKind> {
    let unsupported = |kind: String| Error::UnsupportedFd { pid, fd, kind };
    if let Some(rest) = link.strip_prefix("pipe:[") {
        let id = rest
            .strip_suffix(']')
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Error::parse(format!("link of fd {fd} of process {pid}"), link))?;
        return Ok(FdKind::Pipe {
            id,
            write_end: false, // set below from the access mode
            data: None,
            capacity: 0,
        });
    }
    if link.starts_with("socket:[") {
        return Err(unsupported(format!("a socket ({link})")));
    }
    if let Some(rest) = link.strip_prefix("anon_inode:") {
        let what = match rest {
            "[eventfd]" => "an eventfd".to_string(),
            "[eventpoll]" => "an epoll instance".to_string(),
            "[signalfd]" => "a signalfd".to_string(),
            "[timerfd]" => "a timerfd".to_string(),
            "inotify" => "an inotify instance".to_string(),
            "[fanotify]" => "a fanotify instance".to_string(),
            "[userfaultfd]" => "a userfaultfd".to_string(),
            "[pidfd]" => "a pidfd".to_string(),
            "[io_uring]" => "an io_uring instance".to_string(),
            other => format!("an anonymous-inode fd ({other})"),
        };
        return Err(unsupported(what));
    }
    if link.starts_with("/memfd:") {
        return Err(unsupported(format!("a memfd ({link})")));
    }
    if !link.starts_with('/') {
        return Err(unsupported(format!(
            "an fd of an unsupported kind ({link})"
        )));
    }
    let magic = format!("/proc/{pid}/fd/{fd}");
    let md = std::fs::metadata(&magic).map_err(|e| Error::io(format!("stat {magic}"), e))?;
    // Does the path still lead to this very file?
    let reachable = std::fs::metadata(link)
        .map(|p| p.dev() == md.dev() && p.ino() == md.ino())
        .unwrap_or(false);
    let ft = md.file_type();
    use std::os::unix::fs::FileTypeExt;
    if link.ends_with(" (deleted)") && (!reachable || md.nlink() == 0) {
        let what = if ft.is_dir() {
            "a deleted directory"
        } else {
            "a deleted file"
        };
        return Err(unsupported(format!("{what} ({link})")));
    }
    if (ft.is_file() || ft.is_dir() || ft.is_char_device()) && !reachable {
        return Err(unsupported(format!(
            "a file that is no longer reachable at its path ({link})"
        )));
    }
    if ft.is_file() {
        Ok(FdKind::Regular {
            path: link.to_string(),
            dev: md.dev(),
            ino: md.ino(),
        })
    } else if ft.is_dir() {
        Ok(FdKind::Directory {
            path: link.to_string(),
        })
    } else if ft.is_char_device() {
        let rdev = md.rdev();
        if libc::major(rdev) == 5 && libc::minor(rdev) == 2 {
            return Err(unsupported(format!("a pseudo-terminal master ({link})")));
        }
        Ok(FdKind::CharDevice {
            path: link.to_string(),
            rdev,
        })
    } else if ft.is_block_device() {
        Err(unsupported(format!("a block device ({link})")))
    } else if ft.is_fifo() {
        Err(unsupported(format!("a named pipe ({link})")))
    } else if ft.is_socket() {
        Err(unsupported(format!(
            "a Unix socket path opened with O_PATH ({link})"
        )))
    } else {
        Err(unsupported(format!(
            "an fd of an unsupported kind ({link})"
        )))
    }
}

/// Thin wrappers around the system calls this module and the restore side
/// need; each owns the fds it returns.
pub(crate) mod sys {
    use std::ffi::CStr;
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

    /// `pidfd_open(pid, 0)`.
    pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes two integers; on success it returns a new
        // fd that nothing else owns, which we wrap exactly once.
        unsafe {
            let r = libc::syscall(libc::SYS_pidfd_open, pid, 0);
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(OwnedFd::from_raw_fd(r as RawFd))
        }
    }

    /// `pidfd_getfd(pidfd, fd, 0)`: a copy (close-on-exec) of another
    /// process's fd.
    pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: i32) -> io::Result<OwnedFd> {
        // SAFETY: integer arguments only; a successful call returns a new fd
        // that nothing else owns, which we wrap exactly once.
        unsafe {
            let r = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(OwnedFd::from_raw_fd(r as RawFd))
        }
    }

    /// `fcntl(fd, cmd, arg)` for commands taking and returning an int.
    pub fn fcntl(fd: BorrowedFd<'_>, cmd: libc::c_int, arg: libc::c_int) -> io::Result<i32> {
        // SAFETY: only called with commands whose argument is an int.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, arg) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// Bytes waiting in a pipe (`FIONREAD`).
    pub fn fionread(fd: BorrowedFd<'_>) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into `n`, a valid local.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n.max(0) as usize)
        }
    }

    /// `pipe2(flags)`: `(read end, write end)`.
    pub fn pipe2(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [-1 as libc::c_int; 2];
        // SAFETY: pipe2 writes two ints into `fds`; on success both are new
        // fds that nothing else owns, wrapped exactly once.
        unsafe {
            if libc::pipe2(fds.as_mut_ptr(), flags) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
        }
    }

    /// `tee(fd_in, fd_out, len, flags)`: bytes copied.
    pub fn tee(
        fd_in: BorrowedFd<'_>,
        fd_out: BorrowedFd<'_>,
        len: usize,
        flags: libc::c_uint,
    ) -> io::Result<usize> {
        // SAFETY: integer arguments only.
        let r = unsafe { libc::tee(fd_in.as_raw_fd(), fd_out.as_raw_fd(), len, flags) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// `open(path, flags)` (no mode: never creates).
    pub fn open(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
        // SAFETY: `path` is a valid NUL-terminated string; a successful call
        // returns a new fd that nothing else owns, wrapped exactly once.
        unsafe {
            let r = libc::open(path.as_ptr(), flags);
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(OwnedFd::from_raw_fd(r))
        }
    }

    /// `lseek(fd, pos, SEEK_SET)`.
    pub fn seek_set(fd: BorrowedFd<'_>, pos: u64) -> io::Result<()> {
        let pos = i64::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: integer arguments only.
        let r = unsafe { libc::lseek(fd.as_raw_fd(), pos, libc::SEEK_SET) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `fstat(fd)`.
    pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
        // SAFETY: `struct stat` is plain old data (all-zero is valid) and
        // fstat writes at most one of them into `st`.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(st)
        }
    }
}

/// Test helpers shared with the restore tests: a forked child that sets up
/// exactly the fds it is told to, then waits in `pause()`.
#[cfg(test)]
pub(crate) mod testkit {
    use std::ffi::CString;
    use std::os::fd::RawFd;

    /// One thing the child sets up.
    pub enum Act {
        /// `open(path, flags)` placed at fd `at`, then `lseek(seek)`.
        Open {
            path: CString,
            flags: i32,
            at: i32,
            seek: i64,
            cloexec: bool,
        },
        /// A pipe with `data` written into it; read end at `r` (status
        /// flags `r_flags`), write end at `w` (`w_flags`).
        Pipe {
            r: i32,
            w: i32,
            r_flags: i32,
            w_flags: i32,
            r_cloexec: bool,
            w_cloexec: bool,
            data: Vec<u8>,
        },
        /// A Unix stream socket at `at`.
        Socket { at: i32 },
        /// An fd inherited from the test, placed at `at`.
        Keep { from: RawFd, at: i32 },
    }

    /// A forked child killed and reaped (by PID) on drop.
    pub struct ScriptChild {
        pub pid: i32,
    }

    /// Temporary fds sit at `TMP_BASE..` before moving to their place.
    const TMP_BASE: i32 = 700;
    const KEEP_BASE: i32 = 900;

    impl ScriptChild {
        /// Fork a child that closes every inherited fd, sets up `acts` in
        /// order and waits in `pause()`; returns once it is there.
        pub fn spawn(acts: &[Act]) -> ScriptChild {
            let pid = fork_child(acts);
            assert!(pid > 0, "fork failed");
            let child = ScriptChild { pid };
            for _ in 0..5000 {
                let sc =
                    std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
                if sc.starts_with(&format!("{} ", libc::SYS_pause)) {
                    return child;
                }
                if let Some(code) = exited(pid) {
                    panic!("scripted child failed in step {}", code - 100);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            panic!("scripted child {pid} did not reach pause()");
        }
    }

    impl Drop for ScriptChild {
        fn drop(&mut self) {
            kill_and_reap(self.pid);
        }
    }

    pub use crate::testutil::kill_and_reap;

    /// The exit code of our child if it has exited.
    fn exited(pid: i32) -> Option<i32> {
        let mut st = 0;
        // SAFETY: non-blocking waitpid of our own child into a valid local.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG | libc::__WALL) };
        (r == pid).then(|| libc::WEXITSTATUS(st))
    }

    /// fork; the child runs `acts` with raw system calls only and never
    /// returns.
    fn fork_child(acts: &[Act]) -> i32 {
        // SAFETY: the child only makes async-signal-safe libc calls on data
        // prepared before the fork (no allocation, no locks), then pauses
        // forever or `_exit`s.
        unsafe {
            let pid = libc::fork();
            if pid != 0 {
                return pid;
            }
            fn fail(step: usize) -> ! {
                // SAFETY: _exit is async-signal-safe and ends the child.
                unsafe { libc::_exit(100 + step as i32) }
            }
            // Park inherited fds we keep, close everything else.
            let mut nkeep = 0;
            for a in acts {
                if let Act::Keep { from, .. } = a {
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
            // Move a fresh fd to TMP_BASE.. so it cannot clobber a target.
            let park = |fd: i32, step: usize| -> i32 {
                let t = libc::fcntl(fd, libc::F_DUPFD, TMP_BASE);
                if t < 0 {
                    fail(step);
                }
                libc::close(fd);
                t
            };
            let place = |tmp: i32, at: i32, cloexec: bool, step: usize| {
                let fl = if cloexec { libc::O_CLOEXEC } else { 0 };
                if libc::dup3(tmp, at, fl) < 0 {
                    fail(step);
                }
                libc::close(tmp);
            };
            let mut keep_i = 0;
            for (step, a) in acts.iter().enumerate() {
                match a {
                    Act::Open {
                        path,
                        flags,
                        at,
                        seek,
                        cloexec,
                    } => {
                        let fd = libc::open(path.as_ptr(), *flags, 0o644);
                        if fd < 0 {
                            fail(step);
                        }
                        let t = park(fd, step);
                        place(t, *at, *cloexec, step);
                        if *seek != 0 && libc::lseek(*at, *seek, libc::SEEK_SET) < 0 {
                            fail(step);
                        }
                    }
                    Act::Pipe {
                        r,
                        w,
                        r_flags,
                        w_flags,
                        r_cloexec,
                        w_cloexec,
                        data,
                    } => {
                        let mut p = [-1; 2];
                        if libc::pipe(p.as_mut_ptr()) < 0 {
                            fail(step);
                        }
                        let (tr, tw) = (park(p[0], step), park(p[1], step));
                        if !data.is_empty()
                            && libc::write(tw, data.as_ptr().cast(), data.len())
                                != data.len() as isize
                        {
                            fail(step);
                        }
                        if libc::fcntl(tr, libc::F_SETFL, *r_flags) < 0
                            || libc::fcntl(tw, libc::F_SETFL, *w_flags) < 0
                        {
                            fail(step);
                        }
                        place(tr, *r, *r_cloexec, step);
                        place(tw, *w, *w_cloexec, step);
                    }
                    Act::Socket { at } => {
                        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                        if s < 0 {
                            fail(step);
                        }
                        let t = park(s, step);
                        place(t, *at, false, step);
                    }
                    Act::Keep { at, .. } => {
                        place(KEEP_BASE + keep_i, *at, false, step);
                        keep_i += 1;
                    }
                }
            }
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
    }

    pub use crate::testutil::TempDir;

    /// The standard scene used by the dump and round-trip tests.
    pub fn scene(dir: &TempDir) -> (Vec<Act>, Vec<u8>) {
        let a = dir.file("a");
        let b = dir.file("b");
        std::fs::write(&a, vec![b'a'; 10_000]).expect("write a");
        std::fs::write(&b, b"0123456789").expect("write b");
        let data = pattern(1000);
        let acts = vec![
            Act::Open {
                path: cs("/dev/null"),
                flags: libc::O_RDONLY,
                at: 0,
                seek: 0,
                cloexec: false,
            },
            Act::Open {
                path: cs(&a),
                flags: libc::O_RDONLY,
                at: 3,
                seek: 1234,
                cloexec: true,
            },
            Act::Open {
                path: cs(&b),
                flags: libc::O_WRONLY | libc::O_APPEND,
                at: 4,
                seek: 7,
                cloexec: false,
            },
            Act::Open {
                path: cs(&dir.path.to_string_lossy()),
                flags: libc::O_RDONLY | libc::O_DIRECTORY,
                at: 5,
                seek: 0,
                cloexec: false,
            },
            Act::Pipe {
                r: 9,
                w: 7,
                r_flags: 0,
                w_flags: libc::O_NONBLOCK,
                r_cloexec: false,
                w_cloexec: true,
                data: data.clone(),
            },
            Act::Open {
                path: cs(&a),
                flags: libc::O_RDWR,
                at: 10,
                seek: 5,
                cloexec: false,
            },
        ];
        (acts, data)
    }

    /// A CString from a test string.
    pub fn cs(s: &str) -> CString {
        CString::new(s).expect("no NUL in test path")
    }

    /// 1000 bytes of a recognisable pattern.
    pub fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::{cs, scene, Act, ScriptChild, TempDir};
    use super::*;
    use ferry_parasite::Tracee;
    use std::os::fd::AsRawFd;

    /// The kernel's `O_LARGEFILE` (libc says 0 on x86-64, fdinfo shows it).
    const LARGEFILE: u32 = 0o100000;

    #[test]
    fn fdinfo_parsing() {
        let t = "pos:\t1234\nflags:\t02100002\nmnt_id:\t25\nino:\t77\n";
        assert_eq!(parse_fdinfo(t), Ok((0o2100002, 1234)));
        assert!(parse_fdinfo("pos:\t1\n").is_err());
        assert!(parse_fdinfo("pos:\tx\nflags:\t0\n").is_err());
        assert!(parse_fdinfo("pos:\t1\nflags:\t9\n").is_err());
    }

    #[test]
    fn collect_files_dirs_devices_and_pipe() {
        let dir = TempDir::new("dump");
        let (acts, data) = scene(&dir);
        let child = ScriptChild::spawn(&acts);
        let mut t = Tracee::seize(child.pid).expect("seize");
        t.interrupt().expect("interrupt");
        let got = collect(child.pid).expect("collect");
        t.detach().expect("detach");

        let nums: Vec<i32> = got.iter().map(|e| e.fd).collect();
        assert_eq!(nums, vec![0, 3, 4, 5, 7, 9, 10]);
        let by = |fd: i32| got.iter().find(|e| e.fd == fd).expect("fd present");
        let a_md = std::fs::metadata(dir.file("a")).expect("stat a");
        let b_md = std::fs::metadata(dir.file("b")).expect("stat b");
        let null_md = std::fs::metadata("/dev/null").expect("stat null");

        let e = by(0);
        assert_eq!(
            e.kind,
            FdKind::CharDevice {
                path: "/dev/null".into(),
                rdev: null_md.rdev()
            }
        );
        assert_eq!(e.flags & !LARGEFILE, libc::O_RDONLY as u32);
        assert!(!e.cloexec);

        let e = by(3);
        assert_eq!(
            e.kind,
            FdKind::Regular {
                path: dir.file("a"),
                dev: a_md.dev(),
                ino: a_md.ino()
            }
        );
        assert_eq!((e.pos, e.cloexec), (1234, true));
        assert_eq!(e.flags & !LARGEFILE, libc::O_RDONLY as u32);

        let e = by(4);
        assert_eq!(
            e.kind,
            FdKind::Regular {
                path: dir.file("b"),
                dev: b_md.dev(),
                ino: b_md.ino()
            }
        );
        assert_eq!((e.pos, e.cloexec), (7, false));
        assert_eq!(
            e.flags & !LARGEFILE,
            (libc::O_WRONLY | libc::O_APPEND) as u32
        );

        let e = by(5);
        assert_eq!(
            e.kind,
            FdKind::Directory {
                path: dir.path.to_string_lossy().into_owned()
            }
        );
        assert_ne!(e.flags & libc::O_DIRECTORY as u32, 0);

        let (e7, e9) = (by(7), by(9));
        let FdKind::Pipe {
            id: id7,
            write_end: w7,
            data: d7,
            capacity: c7,
        } = &e7.kind
        else {
            panic!("fd 7 not a pipe: {e7:?}")
        };
        let FdKind::Pipe {
            id: id9,
            write_end: w9,
            data: d9,
            capacity: c9,
        } = &e9.kind
        else {
            panic!("fd 9 not a pipe: {e9:?}")
        };
        assert_eq!(id7, id9);
        assert!(*w7 && !*w9);
        assert_eq!((*c7, *c9), (65536, 65536));
        assert_eq!(d7.as_deref(), Some(&data[..]), "data goes on the lowest fd");
        assert_eq!(d9, &None);
        assert!(e7.cloexec && !e9.cloexec);
        assert_eq!(
            e7.flags & !LARGEFILE,
            (libc::O_WRONLY | libc::O_NONBLOCK) as u32
        );
        assert_eq!(e9.flags & !LARGEFILE, libc::O_RDONLY as u32);

        let e = by(10);
        assert_eq!((e.pos, e.flags & !LARGEFILE), (5, libc::O_RDWR as u32));

        // The child's pipe still holds every byte.
        let pidfd = sys::pidfd_open(child.pid).expect("pidfd_open");
        let r = sys::pidfd_getfd(pidfd.as_fd(), 9).expect("pidfd_getfd");
        assert_eq!(sys::fionread(r.as_fd()).expect("FIONREAD"), 1000);
        let (_, again) = peek_pipe(r.as_fd()).expect("peek");
        assert_eq!(again, data);
        let mut buf = vec![0u8; 2000];
        let mut f = std::fs::File::from(r);
        let n = f.read(&mut buf).expect("read");
        assert_eq!(&buf[..n], &data[..]);
        // No fd of ours was left behind in the child.
        assert_eq!(list_fds(child.pid).expect("list"), nums);
    }

    fn expect_unsupported(acts: &[Act], fd: i32, needle: &str) {
        let child = ScriptChild::spawn(acts);
        let mut t = Tracee::seize(child.pid).expect("seize");
        t.interrupt().expect("interrupt");
        let r = collect(child.pid);
        t.detach().expect("detach");
        let msg = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
        match r {
            Err(Error::UnsupportedFd { pid, fd: efd, kind }) => {
                assert_eq!((pid, efd), (child.pid, fd));
                assert!(kind.contains(needle), "{kind:?} lacks {needle:?}");
                assert!(msg.contains(&format!("fd {fd} ")), "{msg}");
            }
            other => panic!("expected UnsupportedFd for fd {fd}, got {other:?}"),
        }
    }

    #[test]
    fn socket_is_refused() {
        let acts = [
            Act::Open {
                path: cs("/dev/null"),
                flags: libc::O_RDONLY,
                at: 0,
                seek: 0,
                cloexec: false,
            },
            Act::Socket { at: 3 },
        ];
        expect_unsupported(&acts, 3, "socket");
    }

    #[test]
    fn pipe_with_peer_outside_is_refused() {
        let (r, w) = sys::pipe2(libc::O_CLOEXEC).expect("pipe");
        let acts = [Act::Keep {
            from: w.as_raw_fd(),
            at: 4,
        }];
        expect_unsupported(&acts, 4, "other end is outside");
        drop(r);
    }

    #[test]
    fn deleted_file_is_refused() {
        let dir = TempDir::new("deleted");
        let p = dir.file("gone");
        std::fs::write(&p, b"x").expect("write");
        let acts = [Act::Open {
            path: cs(&p),
            flags: libc::O_RDONLY,
            at: 3,
            seek: 0,
            cloexec: false,
        }];
        let child = ScriptChild::spawn(&acts);
        std::fs::remove_file(&p).expect("unlink");
        let mut t = Tracee::seize(child.pid).expect("seize");
        t.interrupt().expect("interrupt");
        let r = collect(child.pid);
        t.detach().expect("detach");
        match r {
            Err(Error::UnsupportedFd { fd: 3, kind, .. }) => {
                assert!(kind.contains("a deleted file"), "{kind}")
            }
            other => panic!("expected a deleted file, got {other:?}"),
        }
    }

    #[test]
    fn missing_process() {
        assert!(matches!(
            collect(i32::MAX - 1),
            Err(Error::NoSuchProcess { .. })
        ));
    }
}
