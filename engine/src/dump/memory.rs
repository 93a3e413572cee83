//! Checkpoint of the address space: which areas exist and which of their
//! pages hold data that must be saved.

use crate::error::{Error, Result};
use crate::procfs::{self, MapsEntry};
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
pub fn collect_vmas(pid: i32) -> Result<Vec<Vma>> {
    let mut out = Vec::new();
    for m in procfs::maps(pid)? {
        if let Some(v) = classify(pid, &m)? {
            out.push(v);
        }
    }
    Ok(out)
}

fn classify(pid: i32, m: &MapsEntry) -> Result<Option<Vma>> {
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

/// Page numbers (addresses) in `vma` that hold private data, per pagemap.
fn private_pages(pagemap: &File, vma: &Vma, out: &mut Vec<u64>) -> Result<()> {
    let file_backed = matches!(vma.kind, VmaKind::File(_));
    let pages = (vma.len() / PAGE_SIZE) as usize;
    let mut buf = vec![0u8; 8 * pages.min(65536)];
    let mut done = 0usize;
    while done < pages {
        let n = (pages - done).min(65536);
        let b = &mut buf[..n * 8];
        let addr = vma.start + done as u64 * PAGE_SIZE;
        pagemap
            .read_exact_at(b, addr / PAGE_SIZE * 8)
            .map_err(|e| Error::io(format!("read pagemap at {addr:#x}"), e))?;
        for (i, e) in b.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            let keep = if file_backed {
                (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0
            } else {
                e & (PM_PRESENT | PM_SWAPPED) != 0
            };
            if keep {
                out.push(addr + i as u64 * PAGE_SIZE);
            }
        }
        done += n;
    }
    Ok(())
}

/// Save the private pages of every area into `writer`.
pub fn dump_pages(pid: i32, vmas: &[Vma], writer: &mut dyn super::PageSink) -> Result<()> {
    let pm_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pm_path).map_err(|e| Error::io(format!("open {pm_path}"), e))?;
    let mut pages = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK_PAGES * PAGE_SIZE as usize];
    for vma in vmas.iter().filter(|v| has_private_pages(v)) {
        pages.clear();
        private_pages(&pagemap, vma, &mut pages)?;
        let readable = vma.prot & libc::PROT_READ as u32 != 0;
        // Contiguous runs, at most READ_CHUNK_PAGES each.
        let mut i = 0;
        while i < pages.len() {
            let start = pages[i];
            let mut n = 1;
            while i + n < pages.len()
                && n < READ_CHUNK_PAGES
                && pages[i + n] == start + n as u64 * PAGE_SIZE
            {
                n += 1;
            }
            let b = &mut buf[..n * PAGE_SIZE as usize];
            let r = if readable {
                ferry_parasite::mem::read(pid, start, b)
                    .or_else(|_| ferry_parasite::mem::read_forced(pid, start, b))
            } else {
                ferry_parasite::mem::read_forced(pid, start, b)
            };
            r?;
            writer.add(start, b)?;
            i += n;
        }
    }
    Ok(())
}
