//! Thin wrappers around the system calls the file kinds need; each owns
//! the fds it returns.

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

/// `kcmp(pid1, pid2, KCMP_FILE, fd1, fd2) == 0`: the two fds refer to the
/// same open file description.
pub fn same_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: integer arguments only; kcmp reads no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r == 0)
    }
}

/// `open(path, flags, mode)` that may create the file.
pub fn open_mode(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: `path` is a valid NUL-terminated string; a successful call
    // returns a new fd that nothing else owns, wrapped exactly once.
    unsafe {
        let r = libc::open(path.as_ptr(), flags, mode);
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(r))
    }
}

/// `ioctl` number of `TFD_IOC_SET_TICKS` (`_IOW('T', 0, __u64)`, needs
/// `CONFIG_CHECKPOINT_RESTORE`): sets a timerfd's unread expirations.
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

/// Own the fd a successful call returned (`r >= 0`), or the error.
fn new_fd(r: libc::c_long) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: only called with the return value of a system call that
    // creates a new fd; nothing else owns it, it is wrapped exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// `eventfd(initval, flags)`.
pub fn eventfd(initval: u32, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::eventfd(initval, flags) };
    new_fd(r as libc::c_long)
}

/// `timerfd_create(clock, flags)`.
pub fn timerfd_create(clock: libc::c_int, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::timerfd_create(clock, flags) };
    new_fd(r as libc::c_long)
}

/// `timerfd_settime(fd, flags, spec, NULL)`.
pub fn timerfd_settime(
    fd: BorrowedFd<'_>,
    flags: libc::c_int,
    spec: &libc::itimerspec,
) -> io::Result<()> {
    // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
    let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), flags, spec, std::ptr::null_mut()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `timerfd_gettime(fd)`. Also brings the timer's expiration count up to
/// date (the kernel counts missed periods lazily, here or on read), so
/// fdinfo's `ticks:` is exact after it; nothing is consumed.
pub fn timerfd_gettime(fd: BorrowedFd<'_>) -> io::Result<libc::itimerspec> {
    // SAFETY: itimerspec is plain old data (all-zero is valid) and the
    // call writes exactly one of them into `cur`.
    unsafe {
        let mut cur: libc::itimerspec = std::mem::zeroed();
        if libc::timerfd_gettime(fd.as_raw_fd(), &mut cur) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cur)
    }
}

/// `ioctl(fd, TFD_IOC_SET_TICKS, &ticks)` (`ticks` must not be 0).
pub fn timerfd_set_ticks(fd: BorrowedFd<'_>, ticks: u64) -> io::Result<()> {
    // SAFETY: the ioctl reads one u64 from `&ticks`, a valid local.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `signalfd4(-1, &mask, 8, flags)`: a new signalfd reading the signals of
/// `mask` (signal n is bit n-1).
pub fn signalfd(mask: u64, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: the kernel reads 8 bytes (its sigset size) from `&mask`, a
    // valid local.
    let r = unsafe { libc::syscall(libc::SYS_signalfd4, -1, &mask, 8usize, flags) };
    new_fd(r)
}

/// `clock_gettime(clock)`.
pub fn clock_gettime(clock: libc::clockid_t) -> io::Result<libc::timespec> {
    // SAFETY: timespec is plain old data (all-zero is valid) and the call
    // writes exactly one of them into `ts`.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        if libc::clock_gettime(clock, &mut ts) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ts)
    }
}

/// Read one u64 (an eventfd's or a timerfd's value).
pub fn read_u64(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into `v`, a valid local.
    let r = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    match r {
        8 => Ok(v),
        r if r < 0 => Err(io::Error::last_os_error()),
        r => Err(io::Error::other(format!("short read of {r} bytes"))),
    }
}

/// Write one u64 (add to an eventfd's counter).
pub fn write_u64(fd: BorrowedFd<'_>, v: u64) -> io::Result<()> {
    // SAFETY: writes the 8 bytes of `v`, a valid local.
    let r = unsafe { libc::write(fd.as_raw_fd(), (&v as *const u64).cast(), 8) };
    match r {
        8 => Ok(()),
        r if r < 0 => Err(io::Error::last_os_error()),
        r => Err(io::Error::other(format!("short write of {r} bytes"))),
    }
}

/// `poll` one fd for `events` for at most `timeout_ms`: the events seen
/// (0 on timeout).
pub fn poll_one(fd: BorrowedFd<'_>, events: libc::c_short, timeout_ms: i32) -> io::Result<i16> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a valid local.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.revents)
    }
}

/// `inotify_init1(flags)`.
pub fn inotify_init1(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: integer argument only; a successful call returns a new fd
    // that nothing else owns, wrapped exactly once.
    unsafe {
        let r = libc::inotify_init1(flags);
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(r))
    }
}

/// `inotify_add_watch(fd, path, mask)`: the watch descriptor.
pub fn inotify_add_watch(fd: BorrowedFd<'_>, path: &CStr, mask: u32) -> io::Result<i32> {
    // SAFETY: `path` is a valid NUL-terminated string.
    let r = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `inotify_rm_watch(fd, wd)`.
pub fn inotify_rm_watch(fd: BorrowedFd<'_>, wd: i32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `open_by_handle_at(mount, handle, flags)` where `handle` is a whole
/// `struct file_handle` (its 8-byte header, then the handle bytes).
pub fn open_by_handle_at(mount: BorrowedFd<'_>, handle: &[u8], flags: i32) -> io::Result<OwnedFd> {
    if handle.len() < 8 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the kernel reads the 8-byte header and then `handle_bytes`
    // (the first u32, which the caller set to `handle.len() - 8`) bytes of
    // `handle`, all inside the slice; a successful call returns a new fd
    // that nothing else owns, wrapped exactly once.
    unsafe {
        let r = libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            handle.as_ptr(),
            flags,
        );
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(r as RawFd))
    }
}

/// `pread(fd, buf, off)` / `pwrite(fd, buf, off)` of one byte at 0.
pub fn touch_byte(fd: BorrowedFd<'_>, write: bool) -> io::Result<()> {
    let mut b = [0u8; 1];
    // SAFETY: one byte read into or written from a valid local.
    let r = unsafe {
        if write {
            libc::pwrite(fd.as_raw_fd(), b.as_ptr().cast(), 1, 0)
        } else {
            libc::pread(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1, 0)
        }
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
