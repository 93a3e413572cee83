//! POSIX shared memory: files in `/dev/shm` (`shm_open`, and anything else
//! that puts a file there). `/dev/shm` is local to each host, so their
//! contents travel with the tree.
//!
//! A file is one of these when its path starts with `/dev/shm/`, it is a
//! regular file and it lives on tmpfs. It may have been unlinked while
//! still mapped or open (`sem_open`, Python's multiprocessing: maps show
//! `/dev/shm/sem.XXXX (deleted)`): it is recorded without the suffix, as
//! `deleted`, and restored as an unlinked file too, under its own name
//! first (so maps read the same) or else as an `O_TMPFILE` in `/dev/shm`.
//!
//! A named file is created at its path with its mode and owner, or reused
//! if it is there already (the same host after the tree was killed): then
//! its owner and mode are left as they are and its contents are emptied
//! (hole punched) before the image's pages are written.

use super::{Found, Handle, Mapping, Source, Undo};
use crate::files::{cpath, sys};
use crate::procfs::MapsEntry;
use crate::{Error, Result};
use ferry_protocol::model::{ShmemKind, ShmemObject};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// Where POSIX shared memory lives.
pub const DIR: &str = "/dev/shm/";
const DELETED: &str = " (deleted)";

/// The file system type of `fd` is tmpfs.
pub(super) fn is_tmpfs(fd: BorrowedFd<'_>) -> std::io::Result<bool> {
    // SAFETY: `struct statfs` is plain old data (all-zero is valid) and
    // fstatfs writes at most one of them into `st`.
    let st = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fd.as_raw_fd(), &mut st) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        st
    };
    Ok(st.f_type == libc::TMPFS_MAGIC)
}

/// The object for the `/dev/shm` file at `path` (a maps path or fd link)
/// opened by `source`, if it is one.
fn recognise(
    path: &str,
    md: &std::fs::Metadata,
    source: &Source,
    what: impl Fn() -> String,
) -> Result<Option<Found>> {
    if !path.starts_with(DIR) || !md.is_file() {
        return Ok(None);
    }
    let link = source.path();
    let fd = sys::open(&cpath(&link)?, libc::O_RDONLY | libc::O_CLOEXEC)
        .map_err(|e| Error::io(format!("{}: open {link}", what()), e))?;
    if !is_tmpfs(fd.as_fd()).map_err(|e| Error::io(format!("{}: fstatfs {link}", what()), e))? {
        // /dev/shm that is no tmpfs: a plain shared file.
        return Ok(None);
    }
    let deleted = md.nlink() == 0;
    let path = if deleted {
        path.strip_suffix(DELETED).unwrap_or(path)
    } else {
        path
    };
    Ok(Some(Found {
        kind: ShmemKind::Posix {
            path: path.to_string(),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            deleted,
        },
        size: md.size(),
    }))
}

/// A shared mapping of a file in `/dev/shm`.
pub fn recognise_vma(
    pid: i32,
    m: &MapsEntry,
    path: &str,
    md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    if !m.shared {
        return Ok(None);
    }
    let source = Source::MapFile {
        pid,
        start: m.start,
        end: m.end,
    };
    recognise(path, md, &source, || {
        format!(
            "process {pid}: {path} mapped at {:#x}-{:#x}",
            m.start, m.end
        )
    })
}

/// An fd of a file in `/dev/shm`.
pub fn recognise_fd(
    pid: i32,
    fd: i32,
    link: &str,
    md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    recognise(link, md, &Source::Fd { pid, fd }, || {
        format!("process {pid}: fd {fd} ({link})")
    })
}

/// `path` names a file inside `/dev/shm`: no `.` or `..` components, no
/// empty ones (the image comes from outside; we create files as root).
fn inside_dir(path: &str) -> bool {
    path.strip_prefix(DIR).is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
    })
}

/// Removes a file we created unless disarmed.
struct Created(Option<String>);

impl Drop for Created {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The file of `obj`, created (or reused if it exists and is not
/// deleted), with its size, mapped writable in the agent for filling.
pub fn create(obj: &ShmemObject) -> Result<Handle> {
    let ShmemKind::Posix {
        path,
        mode,
        uid,
        gid,
        deleted,
    } = &obj.kind
    else {
        return Err(Error::Incompatible(format!(
            "shared memory object {} is not POSIX shared memory",
            obj.id
        )));
    };
    let gone = if *deleted { " (deleted)" } else { "" };
    let what = |op: &str| format!("shared memory object {} ({path}{gone}): {op}", obj.id);
    if !inside_dir(path) {
        return Err(Error::Incompatible(what("not a file in /dev/shm")));
    }
    let cp = cpath(path)?;
    let excl = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    let mut guard = Created(None);
    let (fd, made) = if *deleted {
        (
            make_unlinked(&cp).map_err(|e| Error::io(what("creating an unlinked file"), e))?,
            true,
        )
    } else {
        match sys::open_mode(&cp, excl, 0o600) {
            Ok(fd) => {
                guard.0 = Some(path.clone());
                (fd, true)
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let fd = sys::open(&cp, libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW)
                    .map_err(|e| Error::io(what("opening the file that is there"), e))?;
                let st = sys::fstat(fd.as_fd()).map_err(|e| Error::io(what("fstat"), e))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(Error::Incompatible(what(
                        "something that is not a regular file is there",
                    )));
                }
                (fd, false)
            }
            Err(e) => return Err(Error::io(what("create"), e)),
        }
    };
    if made {
        fchmod(fd.as_fd(), mode & 0o7777).map_err(|e| Error::io(what("fchmod"), e))?;
        fchown(fd.as_fd(), *uid, *gid).map_err(|e| Error::io(what("fchown"), e))?;
    }
    super::memfd::ftruncate(fd.as_fd(), obj.size).map_err(|e| Error::io(what("ftruncate"), e))?;
    if !made && obj.size > 0 {
        // What the image does not hold (holes) must read as zero.
        punch_hole(fd.as_fd(), obj.size)
            .map_err(|e| Error::io(what("emptying the existing file"), e))?;
    }
    let map = Mapping::for_fill(fd.as_fd(), obj.size).map_err(|e| Error::io(what("mmap"), e))?;
    let undo = match guard.0.take() {
        Some(p) => Undo::Unlink(p),
        None => Undo::Nothing,
    };
    Ok(Handle {
        id: obj.id,
        fd: Some(fd),
        shmid: None,
        map,
        seals: 0,
        undo,
    })
}

/// A new unlinked file: made under `path` and unlinked at once if that name
/// is free (maps then show `PATH (deleted)` as before), else an `O_TMPFILE`
/// in `/dev/shm`. Mode 0600 until the caller sets it.
fn make_unlinked(path: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    let excl = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    match sys::open_mode(path, excl, 0o600) {
        Ok(fd) => {
            unlink(path)?;
            Ok(fd)
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOENT)) => sys::open_mode(
            c"/dev/shm",
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
        ),
        Err(e) => Err(e),
    }
}

/// `unlink(path)`.
fn unlink(path: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string.
    if unsafe { libc::unlink(path.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `fchmod(fd, mode)`.
fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> std::io::Result<()> {
    // SAFETY: integer arguments only.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `fchown(fd, uid, gid)`.
fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> std::io::Result<()> {
    // SAFETY: integer arguments only.
    if unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Free the first `len` bytes of `fd` (they read as zero), keeping its size.
fn punch_hole(fd: BorrowedFd<'_>, len: u64) -> std::io::Result<()> {
    let len = i64::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: integer arguments only.
    if unsafe { libc::fallocate(fd.as_raw_fd(), mode, 0, len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
