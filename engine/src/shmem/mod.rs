//! Shared memory objects of a process tree, both directions, one module per
//! kind: [`anon`] (`MAP_SHARED|MAP_ANONYMOUS`), [`memfd`], [`posix`] (files in
//! `/dev/shm`) and [`sysv`] (`shmget`).
//!
//! ```text
//!  checkpoint  ShmemCollector::vma_object / fd_object
//!                 identity = (dev, ino) of /proc/PID/map_files/START-END (or
//!                 of the fd): the same object seen from two processes, or
//!                 from a mapping and an fd, gets one ShmemId
//!              ShmemCollector::dump_contents(id)  the object's pages, once,
//!                 into its own page space (offsets into the object)
//!  restore     ShmemHandles::create(tree)  the agent creates every object
//!                 (or finds a SysV segment that still exists), sized
//!              ShmemHandles::fill(id, batch)  pages written once
//!              ShmemHandles::map_source(id)  how a target maps it: open the
//!                 agent's fd through /proc/AGENT/fd/N and mmap it MAP_SHARED,
//!                 or shmat the segment id
//!              ShmemHandles::finish()  memfd seals, then keep what was made
//! ```
//!
//! Because every target maps the one object the agent made, a write by one
//! process is seen by the others after the restore, as before it.

pub mod anon;
pub mod memfd;
pub mod posix;
pub mod sysv;
#[cfg(test)]
mod tests;

use crate::dump::PageSink;
use crate::files::sys;
use crate::procfs::MapsEntry;
use crate::{Error, Result};
use ferry_protocol::model::{OpenFile, ShmemId, ShmemKind, ShmemObject, TreeImage, Vma, PAGE_SIZE};
use ferry_protocol::pages::PageBatch;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// True for a mapping of shared memory (its contents travel with the tree,
/// it is not a file the destination must have).
pub fn is_shmem_mapping(m: &MapsEntry) -> bool {
    let Some(p) = m.path.as_deref() else {
        return false;
    };
    p.starts_with("/memfd:")
        || (m.shared
            && (p == anon::MAPS_NAME || p.starts_with("/SYSV") || p.starts_with("/dev/shm/")))
}

/// Where the contents of an object are read from at checkpoint.
#[derive(Debug, Clone)]
pub enum Source {
    /// A mapping of it: `/proc/PID/map_files/START-END`.
    MapFile { pid: i32, start: u64, end: u64 },
    /// An fd of it: `/proc/PID/fd/FD`.
    Fd { pid: i32, fd: i32 },
}

impl Source {
    /// The magic link that opens the object.
    pub fn path(&self) -> String {
        match self {
            Source::MapFile { pid, start, end } => {
                format!("/proc/{pid}/map_files/{start:x}-{end:x}")
            }
            Source::Fd { pid, fd } => format!("/proc/{pid}/fd/{fd}"),
        }
    }
}

/// One object found at checkpoint.
struct Collected {
    obj: ShmemObject,
    dev: u64,
    ino: u64,
    source: Source,
}

/// What a kind module says about a mapping or fd it recognises.
pub struct Found {
    pub kind: ShmemKind,
    /// Size of the object in bytes.
    pub size: u64,
}

/// Collects the shared memory objects of a frozen tree.
#[derive(Default)]
pub struct ShmemCollector {
    objects: Vec<Collected>,
}

impl ShmemCollector {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// The object and offset of mapping `m` of `pid` if it is a shared
    /// mapping of shared memory; `None` for any other mapping. Refuses kinds
    /// that cannot be restored (a private mapping of a memfd, a partial
    /// SysV attachment, ...).
    pub fn vma_object(&mut self, pid: i32, m: &MapsEntry) -> Result<Option<(ShmemId, u64)>> {
        let Some(path) = m.path.as_deref() else {
            if m.shared {
                // Shared anonymous memory without a name: never seen on
                // Linux (it shows as /dev/zero (deleted)), refuse to guess.
                return Err(Error::Unsupported {
                    pid,
                    what: format!("an unnamed shared mapping at {:#x}-{:#x}", m.start, m.end),
                });
            }
            return Ok(None);
        };
        if !m.shared && !path.starts_with("/memfd:") {
            return Ok(None);
        }
        let source = Source::MapFile {
            pid,
            start: m.start,
            end: m.end,
        };
        let md = std::fs::metadata(source.path())
            .map_err(|e| Error::io(format!("stat {}", source.path()), e))?;
        let found = if let Some(f) = anon::recognise(pid, m, path, &md)? {
            f
        } else if let Some(f) = memfd::recognise_vma(pid, m, path, &md)? {
            f
        } else if let Some(f) = posix::recognise_vma(pid, m, path, &md)? {
            f
        } else if let Some(f) = sysv::recognise(pid, m, path, &md)? {
            f
        } else {
            return Ok(None);
        };
        let id = self.add(found, &md, source);
        Ok(Some((id, m.offset)))
    }

    /// The object fd `fd` of `pid` (link `link`, metadata `md`) opens, if it
    /// is a memfd or a file in `/dev/shm`.
    pub fn fd_object(
        &mut self,
        pid: i32,
        fd: i32,
        link: &str,
        md: &std::fs::Metadata,
    ) -> Result<Option<ShmemId>> {
        let found = if let Some(f) = memfd::recognise_fd(pid, fd, link, md)? {
            f
        } else if let Some(f) = posix::recognise_fd(pid, fd, link, md)? {
            f
        } else {
            return Ok(None);
        };
        Ok(Some(self.add(found, md, Source::Fd { pid, fd })))
    }

    fn add(&mut self, found: Found, md: &std::fs::Metadata, source: Source) -> ShmemId {
        if let Some(c) = self
            .objects
            .iter()
            .find(|c| c.dev == md.dev() && c.ino == md.ino())
        {
            return c.obj.id;
        }
        let id = self.objects.len() as ShmemId + 1;
        self.objects.push(Collected {
            obj: ShmemObject {
                id,
                size: found.size,
                kind: found.kind,
            },
            dev: md.dev(),
            ino: md.ino(),
            source,
        });
        id
    }

    /// Every object found, by id.
    pub fn objects(&self) -> Vec<ShmemObject> {
        self.objects.iter().map(|c| c.obj.clone()).collect()
    }

    /// Send the contents of object `id` to `sink`, addressed by offset into
    /// the object. The processes that use it must be frozen.
    pub fn dump_contents(&self, id: ShmemId, sink: &mut dyn PageSink) -> Result<()> {
        let c = self
            .objects
            .iter()
            .find(|c| c.obj.id == id)
            .ok_or_else(|| Error::parse("shared memory", format!("no object {id}")))?;
        match &c.obj.kind {
            ShmemKind::SysV { shmid, .. } => sysv::dump_contents(*shmid, c.obj.size, sink),
            _ => dump_file_contents(&c.source, c.obj.size, sink),
        }
    }
}

/// Copy the data pages of the shared memory file that `source` opens
/// (`SEEK_DATA`/`SEEK_HOLE` skip what was never written) into `sink`.
pub fn dump_file_contents(source: &Source, size: u64, sink: &mut dyn PageSink) -> Result<()> {
    let path = source.path();
    let fd = sys::open(
        &crate::files::cpath(&path)?,
        libc::O_RDONLY | libc::O_CLOEXEC,
    )
    .map_err(|e| Error::io(format!("open {path}"), e))?;
    let len = size.next_multiple_of(PAGE_SIZE);
    if len == 0 {
        return Ok(());
    }
    let map = Mapping::new(fd.as_fd(), len, libc::PROT_READ)
        .map_err(|e| Error::io(format!("mmap {path}"), e))?;
    let mut off = 0u64;
    while off < len {
        let Some(data) = seek(fd.as_fd(), off, libc::SEEK_DATA) else {
            break;
        };
        let data = data / PAGE_SIZE * PAGE_SIZE;
        let hole = seek(fd.as_fd(), data, libc::SEEK_HOLE)
            .unwrap_or(len)
            .next_multiple_of(PAGE_SIZE)
            .min(len);
        let mut a = data;
        while a < hole {
            let n = (hole - a).min(256 * PAGE_SIZE);
            sink.add(a, map.slice(a, n))?;
            a += n;
        }
        off = hole.max(data + PAGE_SIZE);
    }
    Ok(())
}

/// `lseek(fd, off, whence)`, `None` at the end (ENXIO) or on error.
fn seek(fd: BorrowedFd<'_>, off: u64, whence: libc::c_int) -> Option<u64> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as i64, whence) };
    (r >= 0).then_some(r as u64)
}

/// A mapping of a file into the agent, unmapped on drop.
pub struct Mapping {
    addr: *mut u8,
    len: u64,
}

impl Mapping {
    /// `mmap(NULL, len, prot, MAP_SHARED, fd, 0)`.
    pub fn new(fd: BorrowedFd<'_>, len: u64, prot: libc::c_int) -> std::io::Result<Mapping> {
        // SAFETY: a fresh mapping chosen by the kernel; nothing else of ours
        // is at the returned address, and we own it until drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: p.cast(),
            len,
        })
    }

    /// The agent's writable mapping of a shared memory file of `size`
    /// bytes, to fill it (none for an empty one).
    pub fn for_fill(fd: BorrowedFd<'_>, size: u64) -> std::io::Result<Option<Mapping>> {
        let len = size.next_multiple_of(PAGE_SIZE);
        if len == 0 {
            return Ok(None);
        }
        Mapping::new(fd, len, libc::PROT_READ | libc::PROT_WRITE).map(Some)
    }

    /// A mapping the caller made (e.g. with `shmat`) and `release` unmaps.
    ///
    /// # Safety
    /// `addr..addr+len` must be a mapping nothing else uses or unmaps.
    pub unsafe fn adopt(addr: *mut u8, len: u64) -> Mapping {
        Mapping { addr, len }
    }

    /// `len` bytes at `off` (within the mapping; clamped to it).
    pub fn slice(&self, off: u64, len: u64) -> &[u8] {
        let off = off.min(self.len);
        let len = len.min(self.len - off);
        // SAFETY: the range lies inside our live mapping; shared memory may
        // change under us only while the tree runs, and it is frozen.
        unsafe { std::slice::from_raw_parts(self.addr.add(off as usize), len as usize) }
    }

    /// Copy `data` to `off` (within the mapping).
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        if off
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(Error::parse(
                "shared memory pages",
                format!(
                    "{} bytes at offset {off:#x} run past {:#x}",
                    data.len(),
                    self.len
                ),
            ));
        }
        // SAFETY: bounds checked above; the mapping is writable and ours.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(off as usize), data.len())
        };
        Ok(())
    }

    /// Zero `len` bytes at `off`.
    pub fn zero(&mut self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Error::parse(
                "shared memory pages",
                format!(
                    "{len} zero bytes at offset {off:#x} run past {:#x}",
                    self.len
                ),
            ));
        }
        // SAFETY: bounds checked above; the mapping is writable and ours.
        unsafe { std::ptr::write_bytes(self.addr.add(off as usize), 0, len as usize) };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.addr.cast(), self.len as usize) };
    }
}

/// How a target maps an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapSource {
    /// Open this path (the agent's fd of the object, through /proc) and mmap
    /// it `MAP_SHARED`.
    Path(String),
    /// `shmat` this SysV segment id.
    SysV(i32),
}

/// One object made on the restoring side.
pub struct Handle {
    pub id: ShmemId,
    /// The agent's fd of it (none for SysV).
    pub fd: Option<OwnedFd>,
    /// SysV segment id.
    pub shmid: Option<i32>,
    /// The agent's writable mapping, for filling.
    pub map: Option<Mapping>,
    /// Seals to add once every process has mapped it (memfd).
    pub seals: u32,
    /// Undo on failure: what to remove if the restore does not complete.
    pub undo: Undo,
}

/// What to remove if a restore fails after creating an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// Nothing outlives the agent's fds.
    Nothing,
    /// A `/dev/shm` file we created.
    Unlink(String),
    /// A SysV segment we created.
    RemoveSegment(i32),
}

/// The objects of a tree being restored.
#[derive(Default)]
pub struct ShmemHandles {
    handles: Vec<Handle>,
    committed: bool,
}

impl ShmemHandles {
    /// Create every shared memory object of `tree`, empty and sized.
    pub fn create(tree: &TreeImage) -> Result<ShmemHandles> {
        Self::create_objects(&tree.shmem)
    }

    fn get(&self, id: ShmemId) -> Result<&Handle> {
        self.handles
            .iter()
            .find(|h| h.id == id)
            .ok_or_else(|| Error::parse("image", format!("shared memory object {id} not created")))
    }

    /// Write a batch of pages (addressed by offset) into object `id`.
    pub fn fill(&mut self, id: ShmemId, batch: &PageBatch) -> Result<()> {
        let h = self
            .handles
            .iter_mut()
            .find(|h| h.id == id)
            .ok_or_else(|| {
                Error::parse("image", format!("shared memory object {id} not created"))
            })?;
        let map = h.map.as_mut().ok_or_else(|| {
            Error::parse(
                "image",
                format!("shared memory object {id} cannot be filled"),
            )
        })?;
        for (run, data) in batch.iter() {
            match data {
                Some(d) => map.write(run.addr, d)?,
                None => map.zero(run.addr, run.len_bytes())?,
            }
        }
        Ok(())
    }

    /// How a target maps object `id`.
    pub fn map_source(&self, id: ShmemId) -> Result<MapSource> {
        let h = self.get(id)?;
        if let Some(shmid) = h.shmid {
            return Ok(MapSource::SysV(shmid));
        }
        let fd = h
            .fd
            .as_ref()
            .ok_or_else(|| Error::parse("image", format!("shared memory object {id} has no fd")))?;
        Ok(MapSource::Path(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            fd.as_raw_fd()
        )))
    }

    /// A new open file description of object `id` for the open file `f`
    /// (flags, position), made in the agent.
    pub fn reopen(&self, id: ShmemId, f: &OpenFile, d: &str) -> Result<OwnedFd> {
        let h = self.get(id)?;
        let fd = h.fd.as_ref().ok_or_else(|| {
            Error::Incompatible(format!(
                "{d}: shared memory object {id} cannot be opened as a file"
            ))
        })?;
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_NOATIME;
        let flags = (f.flags as i32 & keep) | libc::O_CLOEXEC;
        let new = sys::open(&crate::files::cpath(&path)?, flags)
            .map_err(|e| Error::io(format!("restoring {d}: reopening the object"), e))?;
        if f.pos != 0 {
            sys::seek_set(new.as_fd(), f.pos)
                .map_err(|e| Error::io(format!("restoring {d}: lseek to {}", f.pos), e))?;
        }
        Ok(new)
    }

    /// Create the objects of a layout (see [`ShmemHandles::create`]).
    pub fn create_objects(objects: &[ShmemObject]) -> Result<ShmemHandles> {
        let mut out = ShmemHandles::default();
        out.add_objects(objects)?;
        Ok(out)
    }

    /// Create more objects (that appeared during pre-copy).
    pub fn add_objects(&mut self, objects: &[ShmemObject]) -> Result<()> {
        for obj in objects {
            let h = match &obj.kind {
                ShmemKind::Anonymous => anon::create(obj)?,
                ShmemKind::Memfd { .. } => memfd::create(obj)?,
                ShmemKind::Posix { .. } => posix::create(obj)?,
                ShmemKind::SysV { .. } => sysv::create(obj)?,
            };
            self.handles.push(h);
        }
        Ok(())
    }

    /// Every process has mapped its objects: add the memfd seals and drop
    /// the agent's mappings.
    pub fn finish(&mut self) -> Result<()> {
        for h in &mut self.handles {
            h.map = None;
            if h.seals != 0 {
                if let Some(fd) = &h.fd {
                    memfd::add_seals(fd.as_fd(), h.seals)?;
                }
            }
        }
        Ok(())
    }

    /// The restored tree runs: keep what was created (until then, dropping
    /// the handles removes the `/dev/shm` files and SysV segments made).
    pub fn commit(&mut self) {
        self.committed = true;
    }
}

impl Drop for ShmemHandles {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for h in &self.handles {
            match &h.undo {
                Undo::Nothing => {}
                Undo::Unlink(p) => {
                    let _ = std::fs::remove_file(p);
                }
                Undo::RemoveSegment(id) => sysv::remove(*id),
            }
        }
    }
}

/// The shared areas of `vmas` and the objects they map.
pub fn shmem_areas(vmas: &[Vma]) -> impl Iterator<Item = (&Vma, ShmemId, u64)> {
    vmas.iter().filter_map(|v| match v.kind {
        ferry_protocol::model::VmaKind::Shmem { id, offset } => Some((v, id, offset)),
        _ => None,
    })
}
