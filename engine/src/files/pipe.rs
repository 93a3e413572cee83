//! Pipes whose ends are all inside the tree (or whose other end nobody
//! holds any more: [`capture_widowed`]). Checkpoint copies the unread
//! data with `tee(2)` from a copy of a read end taken with `pidfd_getfd`, so
//! the process keeps it; restore creates the pipe afresh, sets its capacity,
//! refills it, and gives each open file description of it an agent fd (the
//! first of each end is the pipe's own end, others are reopened through
//! `/proc/self/fd` so that their status flags stay apart).

use super::sys;
use crate::{Error, Result};
use ferry_protocol::model::{FileId, OpenFile, PipeObject};
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Status flags of a pipe end that can be set with `F_SETFL`.
const PIPE_SETFL: i32 = libc::O_NONBLOCK | libc::O_DIRECT;

/// Copy the unread data of the pipe whose read end is fd `fd` of `pid`.
pub fn capture(pid: i32, fd: i32, pidfd: BorrowedFd<'_>, id: u64) -> Result<(u32, Vec<u8>)> {
    let what = |op: &str| format!("fd {fd} of process {pid} (pipe:[{id}]): {op}");
    let copy = sys::pidfd_getfd(pidfd, fd).map_err(|e| Error::io(what("pidfd_getfd"), e))?;
    peek_pipe(copy.as_fd()).map_err(|e| Error::io(what("peek"), e))
}

/// A pipe of which the tree holds only one kind of end, and whose other
/// end nobody holds any more (a supervisor's pipe the service inherited
/// and its parent closed, a reader that went away): it needs nothing
/// outside the tree, and comes back as a pipe whose other end is closed
/// (reads drain what is left, then see end of file; writes get EPIPE).
/// `Some((capacity, data))` for such a pipe, `None` if the other end is
/// still open somewhere outside the tree.
pub fn capture_widowed(
    pid: i32,
    fd: i32,
    pidfd: BorrowedFd<'_>,
    id: u64,
) -> Result<Option<(u32, Vec<u8>)>> {
    let what = |op: &str| format!("fd {fd} of process {pid} (pipe:[{id}]): {op}");
    let copy = sys::pidfd_getfd(pidfd, fd).map_err(|e| Error::io(what("pidfd_getfd"), e))?;
    // The copy is the same open file description: it adds no reader or
    // writer. A read end reports POLLHUP once no writer is left, a write
    // end POLLERR once no reader is.
    let revents = sys::poll_one(copy.as_fd(), libc::POLLIN | libc::POLLOUT, 0)
        .map_err(|e| Error::io(what("poll"), e))?;
    let acc = sys::fcntl(copy.as_fd(), libc::F_GETFL, 0)
        .map_err(|e| Error::io(what("F_GETFL"), e))?
        & libc::O_ACCMODE;
    if acc == libc::O_WRONLY {
        if revents & libc::POLLERR == 0 {
            return Ok(None);
        }
        // What is in it can never be read by anyone.
        let capacity = sys::fcntl(copy.as_fd(), libc::F_GETPIPE_SZ, 0)
            .map_err(|e| Error::io(what("F_GETPIPE_SZ"), e))?;
        return Ok(Some((capacity as u32, Vec::new())));
    }
    if revents & libc::POLLHUP == 0 {
        return Ok(None);
    }
    peek_pipe(copy.as_fd())
        .map(Some)
        .map_err(|e| Error::io(what("peek"), e))
}

/// Read the unread bytes of the pipe whose read end is `src` without
/// consuming them; returns `(capacity, data)`.
pub(crate) fn peek_pipe(src: std::os::fd::BorrowedFd<'_>) -> io::Result<(u32, Vec<u8>)> {
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

/// Create `pipe`, fill it with its saved data, and open each of `users` (the
/// open file descriptions of it, with `d(file)` naming them in errors).
pub fn open(
    pipe: &PipeObject,
    users: &[&OpenFile],
    d: &dyn Fn(&OpenFile) -> String,
) -> Result<Vec<(FileId, OwnedFd)>> {
    let Some(first) = users.first() else {
        return Ok(Vec::new());
    };
    let dfirst = d(first);
    let io_err = |op: &str, err: io::Error| Error::io(format!("restoring {dfirst}: {op}"), err);
    let (r, w) =
        sys::pipe2(libc::O_CLOEXEC | libc::O_NONBLOCK).map_err(|err| io_err("pipe2", err))?;
    let cur =
        sys::fcntl(w.as_fd(), libc::F_GETPIPE_SZ, 0).map_err(|err| io_err("F_GETPIPE_SZ", err))?;
    let mut actual = cur as u32;
    let capacity = pipe.capacity;
    if capacity != 0 && capacity != actual {
        match i32::try_from(capacity)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
            .and_then(|c| sys::fcntl(w.as_fd(), libc::F_SETPIPE_SZ, c))
        {
            Ok(n) => actual = n as u32,
            Err(err) => tracing::warn!(
                "{dfirst}: cannot set the pipe capacity to {capacity} bytes ({err}); it stays {actual}"
            ),
        }
    }
    let data = &pipe.data;
    if data.len() > actual as usize {
        return Err(Error::Incompatible(format!(
            "{dfirst}: the pipe holds {} unread bytes but its capacity here is only {actual} bytes",
            data.len()
        )));
    }
    if !data.is_empty() {
        let mut f = std::fs::File::from(w.try_clone().map_err(|err| io_err("dup", err))?);
        f.write_all(data)
            .map_err(|err| io_err("writing the unread data", err))?;
    }
    let (r_raw, w_raw) = (r.as_raw_fd(), w.as_raw_fd());
    let (mut r, mut w) = (Some(r), Some(w));
    let mut out = Vec::with_capacity(users.len());
    for f in users {
        let acc = f.flags as i32 & libc::O_ACCMODE;
        let write_end = matches!(
            f.kind,
            ferry_protocol::model::FileKind::Pipe {
                write_end: true,
                ..
            }
        );
        let fd = match (acc == libc::O_RDWR, write_end) {
            (false, false) if r.is_some() => r.take(),
            (false, true) if w.is_some() => w.take(),
            _ => None,
        };
        let fd = match fd {
            Some(fd) => fd,
            None => {
                // Another description of the same pipe.
                let (src, mode) = match (acc == libc::O_RDWR, write_end) {
                    (true, _) => (r_raw, libc::O_RDWR),
                    (false, true) => (w_raw, libc::O_WRONLY),
                    (false, false) => (r_raw, libc::O_RDONLY),
                };
                let p = CString::new(format!("/proc/self/fd/{src}"))
                    .map_err(|_| Error::parse("path", "NUL"))?;
                sys::open(&p, mode | libc::O_CLOEXEC | libc::O_NONBLOCK).map_err(|err| {
                    Error::io(format!("restoring {}: reopening the pipe", d(f)), err)
                })?
            }
        };
        let status = f.flags as i32 & PIPE_SETFL;
        set_status(fd.as_fd(), status)
            .map_err(|err| Error::io(format!("restoring {}: F_SETFL {status:#o}", d(f)), err))?;
        out.push((f.id, fd));
    }
    // Unclaimed ends (kept alive until every reopen was done) close here.
    drop((r, w));
    Ok(out)
}

/// Set the `F_SETFL`-settable status flags of a pipe end to exactly `status`.
fn set_status(fd: BorrowedFd<'_>, status: i32) -> io::Result<()> {
    let cur = sys::fcntl(fd, libc::F_GETFL, 0)?;
    let new = (cur & !PIPE_SETFL) | status;
    if new != cur {
        sys::fcntl(fd, libc::F_SETFL, new)?;
    }
    Ok(())
}
