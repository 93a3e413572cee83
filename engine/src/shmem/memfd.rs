//! memfds (`memfd_create`), with their name, size and seals, mapped shared
//! or only held by an fd.
//!
//! Maps and fd links name a memfd `/memfd:NAME (deleted)`. Checkpoint reads
//! its seals (`F_GET_SEALS`) through `/proc/PID/map_files/START-END` or
//! `/proc/PID/fd/FD`, and its contents through the same link
//! ([`super::dump_file_contents`]). Restore makes a new memfd with the same
//! name and size in the agent, always with `MFD_ALLOW_SEALING`, and adds
//! the seals only in [`super::ShmemHandles::finish`], once every process has
//! mapped it and the agent's own writable mapping is gone:
//!
//! - a memfd made without `MFD_ALLOW_SEALING` reads back `F_SEAL_SEAL`, and
//!   gets exactly that;
//! - `F_SEAL_EXEC` comes from `MFD_NOEXEC_SEAL` (which also drops the exec
//!   bits of the mode), so it is asked for at creation;
//! - `F_SEAL_WRITE` can only be added while no writable shared mapping
//!   exists (`EBUSY`), and once it is there no writable shared mapping can
//!   be made. So every shared mapping of a memfd that had it was read-only,
//!   and [`crate::restore::memory::map_areas`] opens the object `O_RDONLY`
//!   for a mapping without `PROT_WRITE`: such a mapping has no
//!   `VM_MAYWRITE`, does not count as writable, and the seal goes on;
//! - `F_SEAL_FUTURE_WRITE` only forbids new writable mappings and writes:
//!   writable mappings made before it was added (and restored before it is
//!   added again) keep working, as they did.
//!
//! A private mapping of a memfd is refused: its copy-on-write pages would
//! need the object and the private pages both.

use super::{posix, Found, Handle, Mapping, Source, Undo};
use crate::files::sys;
use crate::procfs::MapsEntry;
use crate::{Error, Result};
use ferry_protocol::model::{ShmemKind, ShmemObject};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// How maps and fd links start the name of a memfd.
pub const PREFIX: &str = "/memfd:";
const DELETED: &str = " (deleted)";

/// Every seal this module knows how to restore.
const KNOWN_SEALS: u32 = (libc::F_SEAL_SEAL
    | libc::F_SEAL_SHRINK
    | libc::F_SEAL_GROW
    | libc::F_SEAL_WRITE
    | libc::F_SEAL_FUTURE_WRITE
    | libc::F_SEAL_EXEC) as u32;

/// The name given to `memfd_create` from a maps path or fd link
/// (`/memfd:NAME (deleted)` → `NAME`), `None` if it is no memfd.
pub fn name_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(PREFIX)?;
    Some(rest.strip_suffix(DELETED).unwrap_or(rest))
}

/// A mapping of a memfd: shared ones are objects, private ones refused.
pub fn recognise_vma(
    pid: i32,
    m: &MapsEntry,
    path: &str,
    md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    let Some(name) = name_of(path) else {
        return Ok(None);
    };
    let what = format!("memfd {path:?} mapped at {:#x}-{:#x}", m.start, m.end);
    if !m.shared {
        return Err(Error::Unsupported {
            pid,
            what: format!("a private (copy-on-write) mapping of {what}"),
        });
    }
    let source = Source::MapFile {
        pid,
        start: m.start,
        end: m.end,
    };
    let seals = read_seals(&source, || Error::Unsupported {
        pid,
        what: format!("{what}, which is not on tmpfs (a hugetlbfs memfd?)"),
    })
    .map_err(|e| in_process(pid, &what, e))?;
    Ok(Some(Found {
        kind: ShmemKind::Memfd {
            name: name.to_string(),
            seals,
        },
        size: md.size(),
    }))
}

/// An fd of a memfd.
pub fn recognise_fd(
    pid: i32,
    fd: i32,
    link: &str,
    md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    let Some(name) = name_of(link) else {
        return Ok(None);
    };
    let seals = read_seals(&Source::Fd { pid, fd }, || Error::UnsupportedFd {
        pid,
        fd,
        kind: format!("a memfd ({link}) that is not on tmpfs (a hugetlbfs memfd?)"),
    })
    .map_err(|e| in_process(pid, &format!("fd {fd} (memfd {link:?})"), e))?;
    Ok(Some(Found {
        kind: ShmemKind::Memfd {
            name: name.to_string(),
            seals,
        },
        size: md.size(),
    }))
}

/// Name the process and the mapping or fd in an I/O error.
fn in_process(pid: i32, what: &str, e: Error) -> Error {
    match e {
        Error::Io { what: op, source } => Error::io(format!("process {pid}: {what}: {op}"), source),
        other => other,
    }
}

/// The seals of the memfd `source` opens; `not_tmpfs` is the error for a
/// memfd we cannot restore (hugetlbfs).
fn read_seals(source: &Source, not_tmpfs: impl FnOnce() -> Error) -> Result<u32> {
    let path = source.path();
    let fd = sys::open(
        &crate::files::cpath(&path)?,
        libc::O_RDONLY | libc::O_CLOEXEC,
    )
    .map_err(|e| Error::io(format!("open {path}"), e))?;
    if !posix::is_tmpfs(fd.as_fd()).map_err(|e| Error::io(format!("fstatfs {path}"), e))? {
        return Err(not_tmpfs());
    }
    let seals = sys::fcntl(fd.as_fd(), libc::F_GET_SEALS, 0)
        .map_err(|e| Error::io(format!("F_GET_SEALS on {path}"), e))?;
    Ok(seals as u32)
}

/// `memfd_create(name, flags)`.
fn memfd_create(name: &CString, flags: libc::c_uint) -> std::io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; a successful call
    // returns a new fd that nothing else owns, wrapped exactly once.
    unsafe {
        let r = libc::memfd_create(name.as_ptr(), flags);
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(r))
    }
}

/// `ftruncate(fd, len)`.
pub(super) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> std::io::Result<()> {
    let len = i64::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: integer arguments only.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A new memfd for `obj`, with its name and size, sealable, mapped
/// writable in the agent for filling; its seals are added by
/// [`add_seals`] once every process has mapped it.
pub fn create(obj: &ShmemObject) -> Result<Handle> {
    let ShmemKind::Memfd { name, seals } = &obj.kind else {
        return Err(Error::Incompatible(format!(
            "shared memory object {} is not a memfd",
            obj.id
        )));
    };
    let what = |op: &str| format!("shared memory object {} (memfd {name:?}): {op}", obj.id);
    let unknown = seals & !KNOWN_SEALS;
    if unknown != 0 {
        return Err(Error::Incompatible(what(&format!(
            "unknown seals {unknown:#x}"
        ))));
    }
    let cname = CString::new(name.as_str())
        .map_err(|_| Error::Incompatible(what("the name holds a NUL byte")))?;
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    let exec = if *seals & libc::F_SEAL_EXEC as u32 != 0 {
        libc::MFD_NOEXEC_SEAL
    } else {
        libc::MFD_EXEC
    };
    let fd = match memfd_create(&cname, base | exec) {
        Ok(fd) => fd,
        // Before 6.3 the kernel knows neither exec flag (and has no exec
        // seal to give).
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            memfd_create(&cname, base).map_err(|e| Error::io(what("memfd_create"), e))?
        }
        // vm.memfd_noexec = 2 forbids executable memfds: the object keeps
        // working, only exec (and chmod +x) of it fails.
        Err(e) if e.raw_os_error() == Some(libc::EACCES) && exec == libc::MFD_EXEC => {
            tracing::warn!(
                "{}",
                what("this host forbids executable memfds (vm.memfd_noexec): made non-executable")
            );
            memfd_create(&cname, base | libc::MFD_NOEXEC_SEAL)
                .map_err(|e| Error::io(what("memfd_create"), e))?
        }
        Err(e) => return Err(Error::io(what("memfd_create"), e)),
    };
    ftruncate(fd.as_fd(), obj.size).map_err(|e| Error::io(what("ftruncate"), e))?;
    let map = Mapping::for_fill(fd.as_fd(), obj.size).map_err(|e| Error::io(what("mmap"), e))?;
    Ok(Handle {
        id: obj.id,
        fd: Some(fd),
        shmid: None,
        map,
        seals: *seals,
        undo: Undo::Nothing,
    })
}

/// Add `seals` to the memfd `fd` (those it does not have yet). Every
/// writable shared mapping of it must be gone if `seals` holds
/// `F_SEAL_WRITE` (see the module doc).
pub fn add_seals(fd: BorrowedFd<'_>, seals: u32) -> Result<()> {
    let what = |op: &str| format!("memfd seals {seals:#x}: {op}");
    let have =
        sys::fcntl(fd, libc::F_GET_SEALS, 0).map_err(|e| Error::io(what("F_GET_SEALS"), e))? as u32;
    let add = seals & !have;
    if add == 0 {
        return Ok(());
    }
    match sys::fcntl(fd, libc::F_ADD_SEALS, add as libc::c_int) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(Error::Incompatible(what(
            "F_SEAL_WRITE refused: a writable shared mapping of the memfd exists",
        ))),
        Err(e) => Err(Error::io(what(&format!("F_ADD_SEALS {add:#x}")), e)),
    }
}
