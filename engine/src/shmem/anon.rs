//! `MAP_SHARED|MAP_ANONYMOUS` memory, shared across `fork`. The kernel backs
//! it with an unlinked shmem file that maps show as `/dev/zero (deleted)`.
//! Checkpoint reads it through `/proc/PID/map_files`; restore makes a new
//! one in the agent (an anonymous shared mapping of the agent's own, opened
//! through `/proc/self/map_files`), so that every target maps the same file
//! and maps still show `/dev/zero (deleted)`.

use super::{Found, Handle, Mapping, Undo};
use crate::files::{cpath, sys};
use crate::procfs::MapsEntry;
use crate::{Error, Result};
use ferry_protocol::model::{ShmemKind, ShmemObject, PAGE_SIZE};
use std::os::unix::fs::MetadataExt;

/// How maps name the file behind shared anonymous memory.
pub const MAPS_NAME: &str = "/dev/zero (deleted)";

/// A shared mapping named [`MAPS_NAME`]: its object and size.
pub fn recognise(
    _pid: i32,
    m: &MapsEntry,
    path: &str,
    md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    if !m.shared || path != MAPS_NAME {
        return Ok(None);
    }
    let mapped_end = m.offset + (m.end - m.start);
    Ok(Some(Found {
        kind: ShmemKind::Anonymous,
        size: md.size().max(mapped_end).next_multiple_of(PAGE_SIZE),
    }))
}

/// A new, zeroed object of `obj.size` bytes, mapped writable in the agent.
pub fn create(obj: &ShmemObject) -> Result<Handle> {
    let what = |op: &str| format!("shared anonymous memory object {}: {op}", obj.id);
    let len = obj.size.max(PAGE_SIZE);
    // SAFETY: a fresh mapping chosen by the kernel; adopted by `Mapping`
    // below, which alone unmaps it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::io(what("mmap"), std::io::Error::last_os_error()));
    }
    // SAFETY: `p..p+len` is the mapping just made, used by nothing else.
    let map = unsafe { Mapping::adopt(p.cast(), len) };
    let start = p as u64;
    let path = format!("/proc/self/map_files/{start:x}-{:x}", start + len);
    let fd = sys::open(&cpath(&path)?, libc::O_RDWR | libc::O_CLOEXEC)
        .map_err(|e| Error::io(what("opening it through map_files"), e))?;
    Ok(Handle {
        id: obj.id,
        fd: Some(fd),
        shmid: None,
        map: Some(map),
        seals: 0,
        undo: Undo::Nothing,
    })
}
