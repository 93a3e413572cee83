//! POSIX shared memory: files in `/dev/shm` (`shm_open`). `/dev/shm` is
//! local to each host, so their contents travel with the tree.

use super::{Found, Handle};
use crate::procfs::MapsEntry;
use crate::Result;
use ferry_protocol::model::ShmemObject;

/// A shared mapping of a file in `/dev/shm`.
pub fn recognise_vma(
    _pid: i32,
    _m: &MapsEntry,
    _path: &str,
    _md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    Ok(None)
}

/// An fd of a file in `/dev/shm`.
pub fn recognise_fd(
    _pid: i32,
    _fd: i32,
    _link: &str,
    _md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    Ok(None)
}

/// The file of `obj`, created or reused, sized.
pub fn create(obj: &ShmemObject) -> Result<Handle> {
    Err(crate::Error::Incompatible(format!(
        "shared memory object {}: POSIX shared memory cannot be restored yet",
        obj.id
    )))
}
