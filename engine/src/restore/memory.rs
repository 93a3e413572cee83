//! Rebuilding the address space: vDSO areas moved into place, every area
//! mapped, pages written, final protections set.

use crate::error::{Error, Result};
use crate::procfs;
use ferry_parasite::remote::Injector;
use ferry_protocol::model::{Vma, VmaKind, PAGE_SIZE};
use ferry_protocol::pages::PageReader;
use std::collections::HashMap;
use std::path::Path;

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

/// Map every non-special area at its address, writable for now.
pub fn map_areas(inj: &mut Injector, vmas: &[Vma]) -> Result<()> {
    let mut fds: HashMap<(String, bool), u64> = HashMap::new();
    let result = (|| {
        for v in vmas {
            let (fd, off, mut flags, prot) = match &v.kind {
                VmaKind::Special { .. } => continue,
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

/// Write the saved pages into the stub. Returns the number of pages written.
pub fn fill(pid: i32, vmas: &[Vma], dir: &Path) -> Result<u64> {
    let zeros = vec![0u8; 256 * PAGE_SIZE as usize];
    let mut reader = PageReader::open(dir)?;
    let mut written = 0u64;
    let mut vi = 0usize;
    let private: Vec<&Vma> = vmas
        .iter()
        .filter(|v| crate::dump::memory::has_private_pages(v))
        .collect();
    while let Some(batch) = reader.next_batch()? {
        let mut pieces: Vec<(u64, &[u8])> = Vec::with_capacity(batch.runs.len());
        let mut off = 0usize;
        for run in &batch.runs {
            let len = run.pages as u64 * PAGE_SIZE;
            // Runs come sorted by address; find the area holding this one.
            if private.get(vi).is_none_or(|v| !v.contains(run.addr, len)) {
                vi = private
                    .iter()
                    .position(|v| v.contains(run.addr, len))
                    .ok_or_else(|| {
                        Error::Incompatible(format!(
                            "the image holds pages at {:#x} (+{len}) outside its private memory areas",
                            run.addr
                        ))
                    })?;
            }
            if run.zero {
                if matches!(private[vi].kind, VmaKind::File(_)) {
                    let mut a = run.addr;
                    let end = run.addr + len;
                    while a < end {
                        let n = (end - a).min(zeros.len() as u64);
                        pieces.push((a, &zeros[..n as usize]));
                        a += n;
                    }
                }
            } else {
                let data = batch
                    .data
                    .get(off..off + len as usize)
                    .ok_or_else(|| Error::parse("page batch", "data shorter than its runs"))?;
                pieces.push((run.addr, data));
                off += len as usize;
            }
            written += run.pages as u64;
        }
        ferry_parasite::mem::write_many(pid, &pieces)?;
    }
    Ok(written)
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
