//! SysV shared memory (`shmget`/`shmat`), with key, id, mode and contents.

use super::{Found, Handle};
use crate::dump::PageSink;
use crate::procfs::MapsEntry;
use crate::{Error, Result};
use ferry_protocol::model::ShmemObject;

/// A SysV attachment (`/SYSV%08x (deleted)` in maps).
pub fn recognise(
    pid: i32,
    m: &MapsEntry,
    path: &str,
    _md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    if path.starts_with("/SYSV") {
        return Err(Error::Unsupported {
            pid,
            what: format!("SysV shared memory ({path}) at {:#x}", m.start),
        });
    }
    Ok(None)
}

/// The contents of segment `shmid` of `size` bytes.
pub fn dump_contents(shmid: i32, _size: u64, _sink: &mut dyn PageSink) -> Result<()> {
    Err(Error::Incompatible(format!(
        "SysV segment {shmid} cannot be saved yet"
    )))
}

/// The segment of `obj`: the one that still exists, or a new one with its id.
pub fn create(obj: &ShmemObject) -> Result<Handle> {
    Err(Error::Incompatible(format!(
        "shared memory object {}: SysV shared memory cannot be restored yet",
        obj.id
    )))
}

/// Remove segment `shmid` (a restore that made it failed).
pub fn remove(shmid: i32) {
    let _ = shmid;
}
