//! Files reached by a path: regular files, directories and character
//! devices. Checkpoint records the path and identity (dev/ino, rdev);
//! restore reopens the path with the saved flags, checks that it is still
//! the same file, and seeks to the saved position.

use super::sys;
use crate::{Error, Result};
use ferry_protocol::model::{FileKind, OpenFile};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// Flags that only make sense when a file is created, never on a reopen.
const CREATE_FLAGS: i32 = libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL;
/// `__O_TMPFILE`: the bit that, with `O_DIRECTORY`, makes `O_TMPFILE`.
const O_TMPFILE_BIT: i32 = 0o20000000;

/// What fd `fd` of `pid`, whose link reads `link` (an absolute path) and
/// whose file has metadata `md`, is.
pub fn classify(pid: i32, fd: i32, link: &str, md: &std::fs::Metadata) -> Result<FileKind> {
    let unsupported = |kind: String| Error::UnsupportedFd { pid, fd, kind };
    // Does the path still lead to this very file?
    let reachable = std::fs::metadata(link)
        .map(|p| p.dev() == md.dev() && p.ino() == md.ino())
        .unwrap_or(false);
    let ft = md.file_type();
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
        Ok(FileKind::Regular {
            path: link.to_string(),
            dev: md.dev(),
            ino: md.ino(),
        })
    } else if ft.is_dir() {
        Ok(FileKind::Directory {
            path: link.to_string(),
        })
    } else if ft.is_char_device() {
        let rdev = md.rdev();
        if is_pty_master(rdev) {
            return Err(unsupported(format!("a pseudo-terminal master ({link})")));
        }
        Ok(FileKind::CharDevice {
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

/// `/dev/ptmx` (5:2) and the legacy pty masters (major 2).
fn is_pty_master(rdev: u64) -> bool {
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    (maj == 5 && min == 2) || maj == 2
}

/// A terminal: a pty slave (136–143), a virtual console or serial line
/// (major 4), `/dev/tty` or `/dev/console` (5:0, 5:1).
pub fn is_terminal(rdev: u64) -> bool {
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    (136..=143).contains(&maj) || maj == 4 || (maj == 5 && min <= 1)
}

/// Open `f` (a regular file, directory or character device) in the agent,
/// checked against the checkpoint and positioned. `d` names it in errors.
pub fn open(f: &OpenFile, d: &str) -> Result<OwnedFd> {
    let io_err = |op: &str, err: io::Error| Error::io(format!("restoring {d}: {op}"), err);
    let saved = f.flags as i32;
    let (path, flags) = match &f.kind {
        FileKind::Regular { path, .. } | FileKind::CharDevice { path, .. } => {
            let mut fl = saved & !CREATE_FLAGS;
            if fl & O_TMPFILE_BIT != 0 {
                fl &= !(O_TMPFILE_BIT | libc::O_DIRECTORY);
            }
            (path, fl)
        }
        FileKind::Directory { path } => (
            path,
            libc::O_DIRECTORY
                | libc::O_RDONLY
                | (saved & (libc::O_PATH | libc::O_NOATIME | libc::O_NONBLOCK)),
        ),
        _ => {
            return Err(Error::parse(
                "open file",
                format!("{d} is not reached by a path"),
            ))
        }
    };
    let cpath = CString::new(path.as_str())
        .map_err(|_| Error::parse("path", format!("{d}: NUL in path")))?;
    let fd = sys::open(&cpath, flags | libc::O_CLOEXEC | libc::O_NOCTTY)
        .map_err(|err| io_err("open", err))?;
    let st = sys::fstat(fd.as_fd()).map_err(|err| io_err("fstat", err))?;
    let fmt = st.st_mode & libc::S_IFMT;
    let same = match &f.kind {
        FileKind::Regular { dev, ino, .. } => {
            fmt == libc::S_IFREG && st.st_dev == *dev && st.st_ino == *ino
        }
        FileKind::Directory { .. } => fmt == libc::S_IFDIR,
        FileKind::CharDevice { rdev, .. } => fmt == libc::S_IFCHR && st.st_rdev == *rdev,
        _ => false,
    };
    if !same {
        let what = match &f.kind {
            FileKind::Directory { .. } => "directory",
            FileKind::CharDevice { .. } => "device",
            _ => "file",
        };
        return Err(Error::Incompatible(format!(
            "{what} {path} was replaced since the checkpoint ({d})"
        )));
    }
    if f.pos != 0 && flags & libc::O_PATH == 0 {
        match sys::seek_set(fd.as_fd(), f.pos) {
            Ok(()) => {}
            // Ttys and the like have no position.
            Err(err)
                if err.raw_os_error() == Some(libc::ESPIPE)
                    && matches!(f.kind, FileKind::CharDevice { .. }) => {}
            Err(err) => return Err(io_err(&format!("lseek to {}", f.pos), err)),
        }
    }
    Ok(fd)
}
