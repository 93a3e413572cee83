//! Checkpoint of the address space: which areas exist and which of their
//! pages hold data that must be saved.

use crate::error::{Error, Result};
use crate::procfs::{self, MapsEntry};
use crate::shmem::ShmemCollector;
use ferry_protocol::model::{FileMapping, Vma, VmaKind, PAGE_SIZE};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// Pages read from the target per process_vm_readv call.
const READ_CHUNK_PAGES: usize = 1024;

/// Special areas moved into place at restore rather than filled.
pub const SPECIAL_AREAS: [&str; 3] = ["[vvar]", "[vvar_vclock]", "[vdso]"];

/// Turn the maps of `pid` into image areas, refusing what cannot be restored.
/// Shared memory areas get ids of their own (see [`collect_vmas_with`]).
pub fn collect_vmas(pid: i32) -> Result<Vec<Vma>> {
    collect_vmas_with(pid, &mut ShmemCollector::new())
}

/// [`collect_vmas`] with the shared memory objects of a tree: areas that map
/// one get its id in `shmem`.
pub fn collect_vmas_with(pid: i32, shmem: &mut ShmemCollector) -> Result<Vec<Vma>> {
    let mut out = Vec::new();
    for m in procfs::maps(pid)? {
        if let Some(v) = classify(pid, &m, shmem)? {
            out.push(v);
        }
    }
    Ok(out)
}

fn classify(pid: i32, m: &MapsEntry, shmem: &mut ShmemCollector) -> Result<Option<Vma>> {
    let unsupported = |what: String| Error::Unsupported { pid, what };
    let flags = if m.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    } as u32;
    let mut vma = Vma {
        start: m.start,
        end: m.end,
        prot: m.prot(),
        flags,
        kind: VmaKind::Anonymous,
        name: None,
    };
    if let Some((id, offset)) = shmem.vma_object(pid, m)? {
        vma.kind = VmaKind::Shmem { id, offset };
        return Ok(Some(vma));
    }
    match m.path.as_deref() {
        Some("[vsyscall]") => return Ok(None),
        Some(name) if SPECIAL_AREAS.contains(&name) => {
            vma.kind = VmaKind::Special { name: name.into() };
        }
        Some(name @ ("[heap]" | "[stack]")) => {
            if name == "[stack]" {
                vma.flags |= libc::MAP_GROWSDOWN as u32;
            }
            vma.name = Some(name.into());
        }
        Some(name) if name.starts_with("[anon:") && !m.shared => {
            vma.name = Some(name.into());
        }
        Some(name) if name.starts_with('[') => {
            return Err(unsupported(format!(
                "the memory area {name} at {:#x}-{:#x}",
                m.start, m.end
            )))
        }
        Some(path) if path.ends_with(" (deleted)") || path.starts_with("/memfd:") => {
            return Err(unsupported(format!(
                "memory mapped from a deleted or memory-only file ({path}) at {:#x}",
                m.start
            )))
        }
        Some(path) if path.starts_with('/') => {
            let meta =
                std::fs::metadata(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
                    .or_else(|_| std::fs::metadata(path))
                    .map_err(|e| Error::io(format!("stat mapped file {path}"), e))?;
            if !meta.is_file() {
                return Err(unsupported(format!(
                    "a mapping of {path} (not a regular file) at {:#x}",
                    m.start
                )));
            }
            let fm = FileMapping {
                path: path.into(),
                offset: m.offset,
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.size(),
                mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            };
            vma.kind = if m.shared {
                VmaKind::SharedFile(fm)
            } else {
                VmaKind::File(fm)
            };
        }
        Some(other) => {
            return Err(unsupported(format!(
                "the memory area {other:?} at {:#x}",
                m.start
            )))
        }
        None if m.shared => {
            return Err(unsupported(format!(
                "shared anonymous memory at {:#x}-{:#x}",
                m.start, m.end
            )))
        }
        None => {}
    }
    Ok(Some(vma))
}

/// True for areas whose pages are saved (private anonymous and private file).
pub fn has_private_pages(v: &Vma) -> bool {
    matches!(v.kind, VmaKind::Anonymous | VmaKind::File(_))
}

/// Pages (addresses) of `[start, end)` that hold private data, per
/// pagemap, into `keep` (in a private file area, `file_backed`, only
/// copied-on-write ones); with `missing`, the anonymous pages that hold
/// nothing (never touched, or dropped) go there.
fn private_pages(
    pagemap: &File,
    file_backed: bool,
    (start, end): (u64, u64),
    keep: &mut Vec<u64>,
    mut missing: Option<&mut Vec<u64>>,
) -> Result<()> {
    let pages = ((end - start) / PAGE_SIZE) as usize;
    let mut buf = vec![0u8; 8 * pages.min(65536)];
    let mut done = 0usize;
    while done < pages {
        let n = (pages - done).min(65536);
        let b = &mut buf[..n * 8];
        let addr = start + done as u64 * PAGE_SIZE;
        pagemap
            .read_exact_at(b, addr / PAGE_SIZE * 8)
            .map_err(|e| Error::io(format!("read pagemap at {addr:#x}"), e))?;
        for (i, e) in b.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            let page = addr + i as u64 * PAGE_SIZE;
            if file_backed {
                if (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0 {
                    keep.push(page);
                }
            } else if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                keep.push(page);
            } else if let Some(m) = missing.as_deref_mut() {
                m.push(page);
            }
        }
        done += n;
    }
    Ok(())
}

/// Pages (addresses) of `[start, end)`, in anonymous memory of the process
/// whose pagemap this is, that are present or swapped.
pub fn populated_anon_pages(pagemap: &File, span: (u64, u64), out: &mut Vec<u64>) -> Result<()> {
    private_pages(pagemap, false, span, out, None)
}

/// Save the private pages of every area into `sink`.
pub fn dump_pages(pid: i32, vmas: &[Vma], sink: &mut dyn super::PageSink) -> Result<()> {
    dump_pages_in(pid, vmas, None, sink)
}

/// Save the private pages of every area, or only those inside `ranges`
/// (sorted; e.g. the pages written since the last pre-copy pass), into
/// `sink`. With `ranges`, anonymous pages that hold nothing any more are
/// sent as zero pages, so that the copy drops what it had. Pages that
/// vanish while the process runs are skipped.
pub fn dump_pages_in(
    pid: i32,
    vmas: &[Vma],
    ranges: Option<&[crate::track::PageRange]>,
    sink: &mut dyn super::PageSink,
) -> Result<()> {
    let pm_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pm_path).map_err(|e| Error::io(format!("open {pm_path}"), e))?;
    let mut pages = Vec::new();
    let mut missing = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK_PAGES * PAGE_SIZE as usize];
    for vma in vmas.iter().filter(|v| has_private_pages(v)) {
        let file_backed = matches!(vma.kind, VmaKind::File(_));
        pages.clear();
        missing.clear();
        match ranges {
            None => private_pages(
                &pagemap,
                file_backed,
                (vma.start, vma.end),
                &mut pages,
                None,
            )?,
            Some(rs) => {
                let first = rs.partition_point(|r| r.end <= vma.start);
                for r in rs[first..].iter().take_while(|r| r.start < vma.end) {
                    let span = (r.start.max(vma.start), r.end.min(vma.end));
                    private_pages(&pagemap, file_backed, span, &mut pages, Some(&mut missing))?;
                }
            }
        }
        for run in runs(&missing, usize::MAX) {
            sink.add_zero(run.0, run.1 as u64)?;
        }
        let readable = vma.prot & libc::PROT_READ as u32 != 0;
        for (start, n) in runs(&pages, READ_CHUNK_PAGES) {
            let b = &mut buf[..n * PAGE_SIZE as usize];
            let r = if readable {
                ferry_parasite::mem::read(pid, start, b)
                    .or_else(|_| ferry_parasite::mem::read_forced(pid, start, b))
            } else {
                ferry_parasite::mem::read_forced(pid, start, b)
            };
            match r {
                Ok(()) => sink.add(start, b)?,
                // Unmapped meanwhile (the process runs during pre-copy):
                // the next pass's layout says what happened.
                Err(_) if ranges.is_some() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Contiguous runs `(first page, count)` of sorted page addresses, at most
/// `max` pages each.
fn runs(pages: &[u64], max: usize) -> impl Iterator<Item = (u64, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let start = *pages.get(i)?;
        let mut n = 1;
        while i + n < pages.len() && n < max && pages[i + n] == start + n as u64 * PAGE_SIZE {
            n += 1;
        }
        i += n;
        Some((start, n))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::PageRange;

    #[derive(Default)]
    struct Collect {
        data: Vec<(u64, u8)>,
        zero: Vec<u64>,
    }

    impl super::super::PageSink for Collect {
        fn add(&mut self, addr: u64, data: &[u8]) -> Result<()> {
            for (i, p) in data.chunks(PAGE_SIZE as usize).enumerate() {
                self.data.push((addr + i as u64 * PAGE_SIZE, p[0]));
            }
            Ok(())
        }
        fn add_zero(&mut self, addr: u64, pages: u64) -> Result<()> {
            self.zero.extend((0..pages).map(|i| addr + i * PAGE_SIZE));
            Ok(())
        }
    }

    /// Only pages inside the ranges are sent; untouched anonymous pages
    /// inside them go as zero pages.
    #[test]
    fn dump_pages_in_ranges() {
        let len = 8 * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as u64;
        for i in [0u64, 2, 5] {
            // SAFETY: inside the mapping made above.
            unsafe { *((base + i * PAGE_SIZE) as *mut u8) = 0x10 + i as u8 };
        }
        let child = crate::testutil::spawn_stub();
        let pid = child.0;
        let result = (|| {
            let vmas = collect_vmas(pid)?;
            let ranges = [
                PageRange {
                    start: base,
                    end: base + 4 * PAGE_SIZE,
                },
                PageRange {
                    start: base + 5 * PAGE_SIZE,
                    end: base + 6 * PAGE_SIZE,
                },
            ];
            let mut sink = Collect::default();
            dump_pages_in(pid, &vmas, Some(&ranges), &mut sink)?;
            Ok::<Collect, Error>(sink)
        })();
        drop(child);
        // SAFETY: unmap our own mapping, made above.
        unsafe { libc::munmap(base as *mut libc::c_void, len) };
        let sink = result.expect("dump");
        let p = |i: u64| base + i * PAGE_SIZE;
        assert_eq!(sink.data, vec![(p(0), 0x10), (p(2), 0x12), (p(5), 0x15)]);
        assert_eq!(sink.zero, vec![p(1), p(3)]);
    }
}
