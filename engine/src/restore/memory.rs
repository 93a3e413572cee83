//! Rebuilding the address space: vDSO areas moved into place, every area
//! mapped, pages written, final protections set.

use crate::error::{Error, Result};
use crate::procfs;
use crate::shmem::{MapSource, ShmemHandles};
use ferry_parasite::remote::Injector;
use ferry_protocol::model::{Vma, VmaKind, PAGE_SIZE};
use ferry_protocol::pages::PageBatch;
use std::collections::HashMap;

/// Move the stub's `[vvar]`/`[vvar_vclock]`/`[vdso]` to the image's
/// addresses, keeping their relative layout.
pub fn place_special(inj: &mut Injector, pid: i32, vmas: &[Vma], tramp: (u64, u64)) -> Result<()> {
    let want: Vec<(&str, u64, u64)> = vmas
        .iter()
        .filter_map(|v| match &v.kind {
            VmaKind::Special { name } => Some((name.as_str(), v.start, v.end)),
            _ => None,
        })
        .collect();
    let have: Vec<(String, u64, u64)> = procfs::maps(pid)?
        .into_iter()
        .filter_map(|m| match m.path.as_deref() {
            Some(n @ ("[vdso]" | "[vvar]" | "[vvar_vclock]")) => {
                Some((n.to_string(), m.start, m.end))
            }
            _ => None,
        })
        .collect();
    let layout = |v: &[(&str, u64, u64)]| -> Vec<(String, u64)> {
        let mut l: Vec<(String, u64)> = v.iter().map(|(n, s, e)| (n.to_string(), e - s)).collect();
        l.sort();
        l
    };
    let have_ref: Vec<(&str, u64, u64)> =
        have.iter().map(|(n, s, e)| (n.as_str(), *s, *e)).collect();
    if layout(&want) != layout(&have_ref) {
        return Err(Error::Incompatible(format!(
            "the vDSO areas differ: image has {:?}, this kernel {:?}",
            layout(&want),
            layout(&have_ref)
        )));
    }
    if want
        .iter()
        .all(|(n, s, _)| have_ref.iter().any(|(hn, hs, _)| hn == n && hs == s))
    {
        return Ok(());
    }
    // Park the areas somewhere free, then move each to its place:
    // MREMAP_FIXED silently replaces whatever is at the destination.
    let lo = have_ref.iter().map(|h| h.1).min().unwrap_or(0);
    let hi = have_ref.iter().map(|h| h.2).max().unwrap_or(0);
    let mut busy: Vec<(u64, u64)> = vmas.iter().map(|v| (v.start, v.end)).collect();
    busy.push(tramp);
    busy.push((lo, hi));
    let park = crate::restore::stub::find_hole(&busy, hi - lo, 0x1000_0000)
        .ok_or_else(|| Error::Incompatible("no room to move the vDSO".into()))?;
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    for (_, s, e) in &have_ref {
        inj.call(
            "mremap(vdso park)",
            libc::SYS_mremap,
            &[*s, e - s, e - s, flags, park + (s - lo)],
        )?;
    }
    for (n, s, e) in &want {
        let (_, hs, _) = have_ref
            .iter()
            .find(|h| h.0 == *n)
            .ok_or_else(|| Error::Incompatible(format!("no {n} on this kernel")))?;
        inj.call(
            "mremap(vdso)",
            libc::SYS_mremap,
            &[park + (hs - lo), e - s, e - s, flags, *s],
        )?;
    }
    Ok(())
}

/// Map every non-special area at its address, writable for now; shared
/// memory areas map the objects the agent made (`shmem`).
pub fn map_areas(inj: &mut Injector, vmas: &[Vma], shmem: &ShmemHandles) -> Result<()> {
    let mut fds: HashMap<(String, bool), u64> = HashMap::new();
    let result = (|| {
        for v in vmas {
            let (fd, off, mut flags, prot) = match &v.kind {
                VmaKind::Special { .. } => continue,
                VmaKind::Shmem { id, offset } => match shmem.map_source(*id)? {
                    MapSource::SysV(shmid) => {
                        attach_sysv(inj, v, shmid, *offset)?;
                        continue;
                    }
                    MapSource::Path(p) => {
                        let w = v.prot & libc::PROT_WRITE as u32 != 0;
                        (
                            open_in(inj, &mut fds, &p, w)?,
                            *offset,
                            libc::MAP_SHARED,
                            v.prot,
                        )
                    }
                },
                VmaKind::Anonymous => (
                    u64::MAX,
                    0,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    v.prot | libc::PROT_WRITE as u32,
                ),
                VmaKind::File(f) => (
                    open_in(inj, &mut fds, &f.path, false)?,
                    f.offset,
                    libc::MAP_PRIVATE,
                    v.prot | libc::PROT_WRITE as u32,
                ),
                VmaKind::SharedFile(f) => {
                    let w = v.prot & libc::PROT_WRITE as u32 != 0;
                    (
                        open_in(inj, &mut fds, &f.path, w)?,
                        f.offset,
                        libc::MAP_SHARED,
                        v.prot,
                    )
                }
            };
            if v.flags & libc::MAP_GROWSDOWN as u32 != 0 {
                flags |= libc::MAP_GROWSDOWN;
            }
            flags |= libc::MAP_FIXED;
            let got = inj.call(
                "mmap(area)",
                libc::SYS_mmap,
                &[v.start, v.len(), prot as u64, flags as u64, fd, off],
            )?;
            if got != v.start {
                return Err(Error::Incompatible(format!(
                    "area {:#x}-{:#x} landed at {got:#x}",
                    v.start, v.end
                )));
            }
        }
        Ok(())
    })();
    for fd in fds.into_values() {
        let _ = inj.call("close", libc::SYS_close, &[fd]);
    }
    result
}

/// `shmat` SysV segment `shmid` at `v.start`: the whole segment only.
fn attach_sysv(inj: &mut Injector, v: &Vma, shmid: i32, offset: u64) -> Result<()> {
    if offset != 0 {
        return Err(Error::Incompatible(format!(
            "area {:#x}-{:#x} maps SysV segment {shmid} from offset {offset:#x}: only whole \
             attachments can be restored",
            v.start, v.end
        )));
    }
    let mut flg = 0u64;
    if v.prot & libc::PROT_WRITE as u32 == 0 {
        flg |= libc::SHM_RDONLY as u64;
    }
    if v.prot & libc::PROT_EXEC as u32 != 0 {
        flg |= 0o100000; // SHM_EXEC
    }
    let got = inj.call("shmat", libc::SYS_shmat, &[shmid as u64, v.start, flg])?;
    if got != v.start {
        return Err(Error::Incompatible(format!(
            "SysV segment {shmid} attached at {got:#x} instead of {:#x}",
            v.start
        )));
    }
    Ok(())
}

fn open_in(
    inj: &mut Injector,
    fds: &mut HashMap<(String, bool), u64>,
    path: &str,
    write: bool,
) -> Result<u64> {
    if let Some(fd) = fds.get(&(path.to_string(), write)) {
        return Ok(*fd);
    }
    let p = inj.put_cstr(0, path)?;
    let mode = if write { libc::O_RDWR } else { libc::O_RDONLY };
    let fd = inj
        .call(
            "openat(mapped file)",
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, p, (mode | libc::O_CLOEXEC) as u64, 0],
        )
        .map_err(|e| Error::Incompatible(format!("cannot open mapped file {path}: {e}")))?;
    fds.insert((path.to_string(), write), fd);
    Ok(fd)
}

/// Writes page batches into the process being built, checking that every
/// page lies inside one of its private memory areas.
pub struct PageFiller {
    pid: i32,
    /// The private areas (anonymous and private file), sorted by address.
    private: Vec<Vma>,
    /// Index of the area that held the previous run (runs come sorted).
    cursor: usize,
    zeros: Vec<u8>,
    /// Pages written so far.
    pub pages: u64,
}

impl PageFiller {
    /// A filler for process `pid` whose address space is `vmas`.
    pub fn new(pid: i32, vmas: &[Vma]) -> Self {
        let mut f = PageFiller {
            pid,
            private: Vec::new(),
            cursor: 0,
            zeros: vec![0u8; 256 * PAGE_SIZE as usize],
            pages: 0,
        };
        f.set_layout(vmas);
        f
    }

    /// The address space changed to `vmas`.
    pub fn set_layout(&mut self, vmas: &[Vma]) {
        self.private = vmas
            .iter()
            .filter(|v| crate::dump::memory::has_private_pages(v))
            .cloned()
            .collect();
        self.cursor = 0;
    }

    /// Index of the private area holding `[addr, addr+len)`.
    fn area_of(&mut self, addr: u64, len: u64) -> Result<usize> {
        if self
            .private
            .get(self.cursor)
            .is_some_and(|v| v.contains(addr, len))
        {
            return Ok(self.cursor);
        }
        let i = self
            .private
            .partition_point(|v| v.end <= addr)
            .min(self.private.len());
        match self.private.get(i) {
            Some(v) if v.contains(addr, len) => {
                self.cursor = i;
                Ok(i)
            }
            _ => Err(Error::Incompatible(format!(
                "pages at {addr:#x} (+{len} bytes) lie outside the private memory areas"
            ))),
        }
    }

    /// Write one batch. Zero runs are written into file-backed areas; in
    /// anonymous areas they are only listed in `anon_zero` as
    /// `(addr, len)` (fresh anonymous memory is already zero; memory filled
    /// by an earlier pass must be dropped by the caller).
    pub fn write_batch(
        &mut self,
        batch: &PageBatch,
        anon_zero: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        // Where each piece's bytes come from: our zero buffer, or the batch.
        enum Src {
            Zeros(usize),
            Data(usize, usize),
        }
        let mut plan: Vec<(u64, Src)> = Vec::with_capacity(batch.runs.len());
        let mut off = 0usize;
        for run in &batch.runs {
            let len = run.pages as u64 * PAGE_SIZE;
            let vi = self.area_of(run.addr, len)?;
            if run.zero {
                if !matches!(self.private[vi].kind, VmaKind::File(_)) {
                    anon_zero.push((run.addr, len));
                } else {
                    let end = run.addr + len;
                    let mut a = run.addr;
                    while a < end {
                        let n = (end - a).min(self.zeros.len() as u64);
                        plan.push((a, Src::Zeros(n as usize)));
                        a += n;
                    }
                }
            } else {
                if off + len as usize > batch.data.len() {
                    return Err(Error::parse("page batch", "data shorter than its runs"));
                }
                plan.push((run.addr, Src::Data(off, len as usize)));
                off += len as usize;
            }
            self.pages += run.pages as u64;
        }
        let pieces: Vec<(u64, &[u8])> = plan
            .iter()
            .map(|(a, src)| match *src {
                Src::Zeros(n) => (*a, &self.zeros[..n]),
                Src::Data(o, n) => (*a, &batch.data[o..o + n]),
            })
            .collect();
        ferry_parasite::mem::write_many(self.pid, &pieces)?;
        Ok(())
    }
}

/// The areas of layout `new` that [`relayout`] maps afresh, empty, when the
/// address space goes from layout `old` to `new`: every area (special ones
/// aside) that is not exactly the same — start, end, protection, flags,
/// kind — in `old`. That includes areas whose pages did not change on the
/// source at all: an area split in two by an `munmap`/`mmap` or `mprotect`
/// of a part, two areas merged into one, an area moved back to where it was
/// before. The source must therefore send these areas again in full (a
/// dirty tracker does not report them), and must not skip a page because
/// it sent the same bytes at that address before: the destination no
/// longer has them.
pub fn remapped(old: &[Vma], new: &[Vma]) -> Vec<Vma> {
    new.iter()
        .filter(|v| !matches!(v.kind, VmaKind::Special { .. }) && !old.contains(v))
        .cloned()
        .collect()
}

/// Move the address space from layout `old` to layout `new` (between
/// pre-copy passes): areas that are not exactly the same in both are
/// unmapped and mapped afresh ([`remapped`]; the source sends their pages
/// again in full); the others keep their pages. Special areas cannot
/// change.
pub fn relayout(inj: &mut Injector, old: &[Vma], new: &[Vma]) -> Result<()> {
    relayout_with(inj, old, new, &ShmemHandles::default())
}

/// [`relayout`] for areas that may map the shared memory objects of
/// `shmem`.
pub fn relayout_with(
    inj: &mut Injector,
    old: &[Vma],
    new: &[Vma],
    shmem: &ShmemHandles,
) -> Result<()> {
    let special = |v: &&Vma| matches!(v.kind, VmaKind::Special { .. });
    let olds: Vec<&Vma> = old.iter().filter(special).collect();
    let news: Vec<&Vma> = new.iter().filter(special).collect();
    if olds != news {
        return Err(Error::Incompatible(
            "the vDSO areas moved between passes".into(),
        ));
    }
    unmap_gone(inj, old, new)?;
    map_areas(inj, &remapped(old, new), shmem)
}

/// Unmap every area of `old` (but the vDSO areas) that `new` does not have
/// exactly.
pub fn unmap_gone(inj: &mut Injector, old: &[Vma], new: &[Vma]) -> Result<()> {
    let special = |v: &&Vma| matches!(v.kind, VmaKind::Special { .. });
    for v in old.iter().filter(|v| !special(v) && !new.contains(v)) {
        inj.call("munmap(area)", libc::SYS_munmap, &[v.start, v.len()])?;
    }
    Ok(())
}

/// Give every area its final protection.
pub fn protect(inj: &mut Injector, vmas: &[Vma]) -> Result<()> {
    for v in vmas {
        let added_write = matches!(v.kind, VmaKind::Anonymous | VmaKind::File(_))
            && v.prot & libc::PROT_WRITE as u32 == 0;
        if added_write {
            inj.call(
                "mprotect",
                libc::SYS_mprotect,
                &[v.start, v.len(), v.prot as u64],
            )?;
        }
    }
    Ok(())
}
