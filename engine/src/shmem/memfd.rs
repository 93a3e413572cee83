//! memfds (`memfd_create`), with their name, size and seals, mapped or only
//! held by an fd.

use super::{Found, Handle};
use crate::procfs::MapsEntry;
use crate::{Error, Result};
use ferry_protocol::model::ShmemObject;
use std::os::fd::BorrowedFd;

/// A mapping of a memfd.
pub fn recognise_vma(
    pid: i32,
    m: &MapsEntry,
    path: &str,
    _md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    if path.starts_with("/memfd:") {
        return Err(Error::Unsupported {
            pid,
            what: format!("memory mapped from a memfd ({path}) at {:#x}", m.start),
        });
    }
    Ok(None)
}

/// An fd of a memfd.
pub fn recognise_fd(
    pid: i32,
    fd: i32,
    link: &str,
    _md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    if link.starts_with("/memfd:") {
        return Err(Error::UnsupportedFd {
            pid,
            fd,
            kind: format!("a memfd ({link})"),
        });
    }
    Ok(None)
}

/// A new memfd for `obj`.
pub fn create(obj: &ShmemObject) -> Result<Handle> {
    Err(Error::Incompatible(format!(
        "shared memory object {}: memfds cannot be restored yet",
        obj.id
    )))
}

/// Add `seals` to the memfd `fd`.
pub fn add_seals(_fd: BorrowedFd<'_>, seals: u32) -> Result<()> {
    Err(Error::Incompatible(format!(
        "memfd seals {seals:#x} cannot be restored yet"
    )))
}
