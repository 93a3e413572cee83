//! SysV shared memory (`shmget`/`shmat`), with key, id, mode and contents.
//!
//! An attachment shows in maps as `/SYSV%08x (deleted)` (the key, in hex)
//! and its inode number is the segment id. Checkpoint asks the kernel about
//! the segment (`IPC_STAT`, in the agent, which must share the tree's IPC
//! namespace) and reads its contents through an attachment of its own.
//! Only whole attachments can be restored (`shmat` maps a segment from its
//! start to its end; a mapping from another offset, or one split by
//! `mprotect`, is refused).
//!
//! Restore finds the segment if it still exists here (the same host after
//! the tree was killed: segments outlive their users) with the same id, key
//! and size, and reuses it; else it makes one with the same id
//! (`kernel.shm_next_id`), key, mode and owner. The agent keeps an
//! attachment for filling until [`super::ShmemHandles::finish`], so after
//! the restore `shm_nattch` counts the tree's attachments only.
//!
//! A segment removed (`IPC_RMID`) while still attached is kept by the
//! kernel until its last detach, with key `IPC_PRIVATE` and `SHM_DEST` in
//! its mode; such a segment is recorded with `SHM_DEST` (0o1000) in
//! `mode`, never reused, and removed again right after the agent attaches
//! the new one: Linux lets the targets still attach it by id, and it goes
//! away with the tree's last detach, as before.
//!
//! `shm_segsz` is kept rounded up to whole pages (the object's size): a
//! process that asks `IPC_STAT` after the restore sees the rounded size.

use super::{Found, Handle, Mapping, Source, Undo};
use crate::dump::PageSink;
use crate::procfs::MapsEntry;
use crate::{Error, Result};
use ferry_protocol::model::{ShmemKind, ShmemObject, PAGE_SIZE};
use std::io;
use std::os::unix::fs::MetadataExt;

/// How maps start the name of an attachment.
pub const PREFIX: &str = "/SYSV";
/// The mode bit of a segment removed while still attached.
pub const SHM_DEST: u32 = 0o1000;
/// Where the id of the next segment is chosen.
const NEXT_ID: &str = "/proc/sys/kernel/shm_next_id";

/// A SysV attachment (`/SYSV%08x (deleted)` in maps).
pub fn recognise(
    pid: i32,
    m: &MapsEntry,
    path: &str,
    md: &std::fs::Metadata,
) -> Result<Option<Found>> {
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return Ok(None);
    };
    let hex = rest.strip_suffix(" (deleted)").unwrap_or(rest);
    let Ok(name_key) = u32::from_str_radix(hex, 16) else {
        return Ok(None);
    };
    if !m.shared || hex.len() != 8 {
        return Ok(None);
    }
    let at = format!("SysV shared memory ({path}) at {:#x}-{:#x}", m.start, m.end);
    let unsupported = |why: String| Error::Unsupported {
        pid,
        what: format!("{at}: {why}"),
    };
    if !same_ipc_namespace(pid)? {
        return Err(unsupported(
            "the process is in another IPC namespace than ferry".into(),
        ));
    }
    if md.blksize() != PAGE_SIZE {
        return Err(unsupported(format!(
            "a segment of {} KiB pages (SHM_HUGETLB)",
            md.blksize() / 1024
        )));
    }
    let shmid = i32::try_from(md.ino())
        .map_err(|_| Error::parse(format!("process {pid}: {at}"), "inode is no segment id"))?;
    let ds = stat(shmid)
        .map_err(|e| Error::io(format!("process {pid}: {at}: shmctl({shmid}, IPC_STAT)"), e))?;
    let mode = u32::from(ds.shm_perm.mode);
    let key = ds.shm_perm.__key;
    if mode & SHM_DEST == 0 && key as u32 != name_key {
        return Err(Error::parse(
            format!("process {pid}: {at}"),
            format!("segment {shmid} has key {key:#x}, maps say {name_key:#x}"),
        ));
    }
    let size = (ds.shm_segsz as u64).next_multiple_of(PAGE_SIZE);
    if m.offset != 0 || m.end - m.start != size {
        return Err(unsupported(format!(
            "a partial attachment of segment {shmid} ({:#x} bytes from offset {:#x} of \
             {size:#x}); only whole attachments can be restored",
            m.end - m.start,
            m.offset
        )));
    }
    Ok(Some(Found {
        kind: ShmemKind::SysV {
            shmid,
            key,
            mode: mode & (0o777 | SHM_DEST),
            uid: ds.shm_perm.uid,
            gid: ds.shm_perm.gid,
        },
        size,
    }))
}

/// `pid` and ferry see the same SysV segments.
fn same_ipc_namespace(pid: i32) -> Result<bool> {
    let ns = |p: &str| {
        std::fs::metadata(p)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| Error::io(format!("stat {p}"), e))
    };
    Ok(ns(&format!("/proc/{pid}/ns/ipc"))? == ns("/proc/self/ns/ipc")?)
}

/// The contents of segment `shmid` of `size` bytes, read through an
/// attachment of the agent's own. Pages never written are holes of the
/// segment's file and are skipped (reading them through the attachment
/// would allocate them).
pub fn dump_contents(shmid: i32, size: u64, sink: &mut dyn PageSink) -> Result<()> {
    if size == 0 {
        return Ok(());
    }
    let map = attach(shmid, size, libc::SHM_RDONLY)
        .map_err(|e| Error::io(format!("SysV segment {shmid}: shmat to save it"), e))?;
    let start = map.addr as u64;
    let source = Source::MapFile {
        pid: std::process::id() as i32,
        start,
        end: start + size,
    };
    super::dump_file_contents(&source, size, sink)
}

/// The segment of `obj`: the one that still exists, or a new one with its
/// id, attached writable in the agent for filling.
pub fn create(obj: &ShmemObject) -> Result<Handle> {
    let ShmemKind::SysV {
        shmid,
        key,
        mode,
        uid,
        gid,
    } = &obj.kind
    else {
        return Err(Error::Incompatible(format!(
            "shared memory object {} is not a SysV segment",
            obj.id
        )));
    };
    let (shmid, key, size) = (*shmid, *key, obj.size);
    let what = |op: &str| {
        format!(
            "shared memory object {} (SysV segment {shmid}, key {key:#x}, {size:#x} bytes): {op}",
            obj.id
        )
    };
    if shmid < 0 || size == 0 || size % PAGE_SIZE != 0 {
        return Err(Error::Incompatible(what("not a valid segment")));
    }
    let destroyed = mode & SHM_DEST != 0;
    let existing = match stat(shmid) {
        Ok(ds) => Some(ds),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EIDRM)) => None,
        Err(e) => return Err(Error::io(what("shmctl(IPC_STAT)"), e)),
    };
    if let Some(ds) = existing {
        let (k, n) = (ds.shm_perm.__key, ds.shm_segsz as u64);
        if destroyed || k != key || n.next_multiple_of(PAGE_SIZE) != size {
            return Err(Error::Incompatible(what(&format!(
                "id {shmid} is taken here by another segment (key {k:#x}, {n:#x} bytes)"
            ))));
        }
        if ds.shm_nattch != 0 {
            tracing::warn!(
                "{}",
                what(&format!(
                    "reusing the segment that is there, attached {} times",
                    ds.shm_nattch
                ))
            );
        }
        let mut map = attach(shmid, size, 0).map_err(|e| Error::io(what("shmat"), e))?;
        // What the image does not hold (holes) must read as zero.
        remove_pages(&mut map).map_err(|e| Error::io(what("emptying the segment"), e))?;
        return Ok(handle(obj, shmid, map, Undo::Nothing));
    }
    let made = make(shmid, key, size, *mode, &what)?;
    let mut ds = stat(shmid).map_err(|e| Error::io(what("shmctl(IPC_STAT)"), e))?;
    ds.shm_perm.uid = *uid;
    ds.shm_perm.gid = *gid;
    ds.shm_perm.mode = (mode & 0o777) as libc::c_ushort;
    set(shmid, &ds).map_err(|e| Error::io(what("shmctl(IPC_SET) of owner and mode"), e))?;
    let map = attach(shmid, size, 0).map_err(|e| Error::io(what("shmat"), e))?;
    let undo = if destroyed {
        // Attached by us, it lives on; the targets attach it by id.
        rmid(shmid).map_err(|e| Error::io(what("shmctl(IPC_RMID) as it was"), e))?;
        Undo::Nothing
    } else {
        Undo::RemoveSegment(shmid)
    };
    made.keep();
    Ok(handle(obj, shmid, map, undo))
}

fn handle(obj: &ShmemObject, shmid: i32, map: Mapping, undo: Undo) -> Handle {
    Handle {
        id: obj.id,
        fd: None,
        shmid: Some(shmid),
        map: Some(map),
        seals: 0,
        undo,
    }
}

/// A segment we made, removed on drop unless kept.
struct Made(i32, bool);

impl Made {
    fn keep(mut self) {
        self.1 = true;
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        if !self.1 {
            remove(self.0);
        }
    }
}

/// `shmget(key, size, IPC_CREAT|IPC_EXCL|mode)` with id `shmid`.
fn make(shmid: i32, key: i32, size: u64, mode: u32, what: &dyn Fn(&str) -> String) -> Result<Made> {
    std::fs::write(NEXT_ID, shmid.to_string())
        .map_err(|e| Error::io(what(&format!("writing {shmid} to {NEXT_ID}")), e))?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as libc::c_int;
    let got = match shmget(key, size, flags) {
        Ok(id) => Made(id, false),
        Err(e) => {
            // The id was not used: do not leave it to the next creator.
            let _ = std::fs::write(NEXT_ID, "-1");
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Err(Error::Incompatible(what(&format!(
                    "key {key:#x} is taken here by another segment"
                ))));
            }
            return Err(Error::io(what("shmget"), e));
        }
    };
    if got.0 != shmid {
        return Err(Error::Incompatible(what(&format!(
            "the kernel gave id {} (the index is taken here, or another process made a \
             segment at the same moment)",
            got.0
        ))));
    }
    Ok(got)
}

/// Remove segment `shmid` (a restore that made it failed). It goes away at
/// once, or with its last detach.
pub fn remove(shmid: i32) {
    let _ = rmid(shmid);
}

/// `shmat(shmid, NULL, flags)`, as a [`Mapping`] of `size` bytes whose drop
/// detaches it (`munmap` of an attachment is `shmdt`).
fn attach(shmid: i32, size: u64, flags: libc::c_int) -> io::Result<Mapping> {
    // SAFETY: the kernel chooses the address of a fresh attachment.
    let p = unsafe { libc::shmat(shmid, std::ptr::null(), flags) };
    if p as isize == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `p..p+size` is the attachment just made (a segment of `size`
    // bytes, page aligned), used by nothing else and unmapped by the
    // Mapping alone.
    Ok(unsafe { Mapping::adopt(p.cast(), size) })
}

/// `madvise(MADV_REMOVE)` over the whole of `map`: free its pages and their
/// backing store, they read as zero.
fn remove_pages(map: &mut Mapping) -> io::Result<()> {
    // SAFETY: the range is exactly our writable shared mapping; its pages
    // are dropped from the segment, which nothing reads meanwhile.
    let r = unsafe { libc::madvise(map.addr.cast(), map.len as usize, libc::MADV_REMOVE) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `shmget(key, size, flags)`.
fn shmget(key: i32, size: u64, flags: libc::c_int) -> io::Result<i32> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::shmget(key, size as usize, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// `shmctl(shmid, IPC_STAT)`.
fn stat(shmid: i32) -> io::Result<libc::shmid_ds> {
    // SAFETY: `shmid_ds` is plain old data (all-zero is valid) and IPC_STAT
    // writes at most one of them into `ds`.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(shmid, libc::IPC_STAT, &mut ds) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ds)
    }
}

/// `shmctl(shmid, IPC_SET, ds)`: owner and mode.
fn set(shmid: i32, ds: &libc::shmid_ds) -> io::Result<()> {
    let mut ds = *ds;
    // SAFETY: IPC_SET reads one `shmid_ds`, a valid local.
    if unsafe { libc::shmctl(shmid, libc::IPC_SET, &mut ds) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `shmctl(shmid, IPC_RMID)`.
fn rmid(shmid: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer.
    if unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
