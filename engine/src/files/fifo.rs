//! Named pipes (FIFOs), both directions. A FIFO is a pipe reached by a
//! path: checkpoint records the path and identity (dev/ino) of every
//! description and copies the FIFO's unread data once, without consuming
//! it (`tee` from a `pidfd_getfd` copy of a read end of the tree, or, if
//! the tree only writes to it, from a read end the agent opens with
//! `O_NONBLOCK`, which never blocks). The data travels as a
//! [`PipeObject`], shared by every description of the FIFO.
//!
//! Restore opens the path once with `O_RDWR | O_NONBLOCK` (a reader and a
//! writer at once: neither this open nor the later opens for writing block
//! or fail with `ENXIO`), checks that it is the same FIFO, refills it, then
//! opens each description with its own access mode and sets its status
//! flags. If the FIFO already holds exactly the saved data, it is the same
//! pipe still kept open by someone (the frozen source of a migration on the
//! same kernel): it is not filled twice. Any other contents are refused.

use super::{pipe, sys};
use crate::{Error, Result};
use ferry_protocol::model::{FileId, FileKind, OpenFile, PipeId, PipeObject};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// Status flags of a FIFO description that `F_SETFL` sets.
const FIFO_SETFL: i32 = libc::O_NONBLOCK | libc::O_DIRECT;

/// One FIFO seen in the tree.
struct Seen {
    id: PipeId,
    path: String,
    /// A description of the tree that reads it (to copy the data from).
    reader: Option<(i32, i32)>,
}

/// The FIFOs of a tree being checkpointed, by (dev, ino).
#[derive(Default)]
pub struct FifoCollector {
    seen: BTreeMap<(u64, u64), Seen>,
}

impl FifoCollector {
    /// How many FIFOs were seen (their ids are taken from the pipe ids).
    pub fn count(&self) -> usize {
        self.seen.len()
    }

    /// Fd `fd` of `pid` is a FIFO at `link` with metadata `md` and status
    /// flags `flags`; `next` is the pipe id to give it if it is new.
    pub fn classify(
        &mut self,
        pid: i32,
        fd: i32,
        flags: u32,
        link: &str,
        md: &std::fs::Metadata,
        next: PipeId,
    ) -> Result<FileKind> {
        let reachable = std::fs::metadata(link)
            .map(|p| p.dev() == md.dev() && p.ino() == md.ino())
            .unwrap_or(false);
        if !reachable {
            return Err(Error::UnsupportedFd {
                pid,
                fd,
                kind: format!("a named pipe that is no longer reachable at its path ({link})"),
            });
        }
        let s = self.seen.entry((md.dev(), md.ino())).or_insert(Seen {
            id: next,
            path: link.to_string(),
            reader: None,
        });
        let path_only = flags & libc::O_PATH as u32 != 0;
        if !path_only
            && flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32
            && s.reader.is_none()
        {
            s.reader = Some((pid, fd));
        }
        Ok(FileKind::Fifo {
            path: link.to_string(),
            dev: md.dev(),
            ino: md.ino(),
            pipe: s.id,
        })
    }

    /// Copy the unread data of every FIFO, leaving it in place.
    pub fn finish(self) -> Result<Vec<PipeObject>> {
        let mut out = Vec::with_capacity(self.seen.len());
        for ((dev, ino), s) in self.seen {
            let what = |op: &str| format!("named pipe {}: {op}", s.path);
            let src = match s.reader {
                Some((pid, fd)) => {
                    let pidfd = sys::pidfd_open(pid)
                        .map_err(|e| Error::io(format!("pidfd_open of process {pid}"), e))?;
                    sys::pidfd_getfd(pidfd.as_fd(), fd).map_err(|e| {
                        Error::io(what(&format!("pidfd_getfd of fd {fd} of {pid}")), e)
                    })?
                }
                None => open_checked(&s.path, libc::O_RDONLY | libc::O_NONBLOCK, dev, ino)
                    .map_err(|e| match e {
                        Opening::Io(op, err) => Error::io(what(op), err),
                        Opening::Replaced => Error::Incompatible(what("replaced while frozen")),
                    })?,
            };
            let (capacity, data) =
                pipe::peek_pipe(src.as_fd()).map_err(|e| Error::io(what("peek"), e))?;
            out.push(PipeObject {
                id: s.id,
                capacity,
                data,
            });
        }
        Ok(out)
    }
}

/// Why [`open_checked`] failed.
enum Opening {
    Io(&'static str, io::Error),
    /// The path leads to something else now.
    Replaced,
}

/// Open the FIFO at `path` with `flags` (plus `O_CLOEXEC`) and check that
/// it is FIFO (`dev`, `ino`).
fn open_checked(
    path: &str,
    flags: i32,
    dev: u64,
    ino: u64,
) -> std::result::Result<OwnedFd, Opening> {
    let c = CString::new(path).map_err(|_| {
        Opening::Io(
            "path",
            io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"),
        )
    })?;
    let fd = sys::open(&c, flags | libc::O_CLOEXEC | libc::O_NOCTTY)
        .map_err(|e| Opening::Io("open", e))?;
    let st = sys::fstat(fd.as_fd()).map_err(|e| Opening::Io("fstat", e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO || st.st_dev != dev || st.st_ino != ino {
        return Err(Opening::Replaced);
    }
    Ok(fd)
}

/// Open FIFO `pipe` for each of `users` (its descriptions; `d` names them
/// in errors), refilled with its saved data.
pub fn open(
    pipe: &PipeObject,
    users: &[&OpenFile],
    d: &dyn Fn(&OpenFile) -> String,
) -> Result<Vec<(FileId, OwnedFd)>> {
    let Some(first) = users.first() else {
        return Ok(Vec::new());
    };
    let FileKind::Fifo { path, dev, ino, .. } = &first.kind else {
        return Err(Error::parse(
            "open file",
            format!("{} is not a named pipe", d(first)),
        ));
    };
    let dfirst = d(first);
    let checked = |f: &OpenFile, flags: i32| {
        open_checked(path, flags, *dev, *ino).map_err(|e| match e {
            Opening::Io(op, err) => Error::io(format!("restoring {}: {op}", d(f)), err),
            Opening::Replaced => Error::Incompatible(format!(
                "named pipe {path} was replaced since the checkpoint ({})",
                d(f)
            )),
        })
    };
    let io_err = |op: &str, err: io::Error| Error::io(format!("restoring {dfirst}: {op}"), err);
    // Both a reader and a writer: no open below blocks or fails.
    let hold = checked(first, libc::O_RDWR | libc::O_NONBLOCK)?;
    let (capacity, present) = pipe::peek_pipe(hold.as_fd()).map_err(|e| io_err("peek", e))?;
    if present.is_empty() {
        let mut actual = capacity;
        if pipe.capacity != 0 && pipe.capacity != capacity {
            match i32::try_from(pipe.capacity)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
                .and_then(|c| sys::fcntl(hold.as_fd(), libc::F_SETPIPE_SZ, c))
            {
                Ok(n) => actual = n as u32,
                Err(err) => tracing::warn!(
                    "{dfirst}: cannot set the FIFO's capacity to {} bytes ({err}); it stays {actual}",
                    pipe.capacity
                ),
            }
        }
        if pipe.data.len() > actual as usize {
            return Err(Error::Incompatible(format!(
                "{dfirst}: the named pipe holds {} unread bytes but its capacity here is only {actual} bytes",
                pipe.data.len()
            )));
        }
        if !pipe.data.is_empty() {
            let mut w = std::fs::File::from(hold.try_clone().map_err(|e| io_err("dup", e))?);
            w.write_all(&pipe.data)
                .map_err(|e| io_err("writing the unread data", e))?;
        }
    } else if present != pipe.data {
        return Err(Error::Incompatible(format!(
            "named pipe {path} already holds {} unread bytes that are not the {} bytes saved at the checkpoint ({dfirst})",
            present.len(),
            pipe.data.len()
        )));
    } else {
        tracing::debug!("{dfirst}: the named pipe still holds its data (kept open elsewhere)");
    }
    let mut out = Vec::with_capacity(users.len());
    for f in users {
        let acc = f.flags as i32 & libc::O_ACCMODE;
        if f.flags as i32 & libc::O_PATH != 0 {
            out.push((f.id, checked(f, libc::O_PATH)?));
            continue;
        }
        let fd = checked(f, acc | libc::O_NONBLOCK)?;
        let status = f.flags as i32 & FIFO_SETFL;
        set_status(fd.as_fd(), status)
            .map_err(|err| Error::io(format!("restoring {}: F_SETFL {status:#o}", d(f)), err))?;
        out.push((f.id, fd));
    }
    // The descriptions of the tree now keep the FIFO (and its data) alive.
    drop(hold);
    Ok(out)
}

/// Set the `F_SETFL`-settable status flags of a FIFO description to `status`.
fn set_status(fd: BorrowedFd<'_>, status: i32) -> io::Result<()> {
    let cur = sys::fcntl(fd, libc::F_GETFL, 0)?;
    let new = (cur & !FIFO_SETFL) | status;
    if new != cur {
        sys::fcntl(fd, libc::F_SETFL, new)?;
    }
    Ok(())
}
