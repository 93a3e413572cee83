//! Dirty tracking with soft-dirty bits: write `4` to `/proc/PID/clear_refs`,
//! then bit 55 of a page's pagemap entry says it was written since.
//!
//! Needs `CONFIG_MEM_SOFT_DIRTY`. On kernels without it, writing to
//! `clear_refs` still succeeds but the bit never gets set, so
//! [`available`] probes for real: it writes a page of its own and looks
//! for the bit.
//!
//! Reading the bits and clearing them are two steps, and a write between
//! them would be lost, so [`SoftDirtyTracker::collect`] holds the process
//! frozen for both (unless the caller already traces it, i.e. has frozen it
//! itself). A page that is neither present nor swapped now but was at the
//! previous pass was dropped (`MADV_DONTNEED`) and is reported too; areas
//! not seen at the previous pass are reported whole.
//!
//! Not verifiable on the project's machines (soft-dirty is compiled out):
//! only [`available`] is tested there.

use super::uffd_raw::{page_size, AnonMapping};
use super::{normalize, subtract, tracked_areas, DirtyTracker, PageRange};
use crate::error::{Error, Result};
use crate::freeze::Frozen;
use ferry_protocol::model::Vma;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

/// Name of this backend in reports.
pub const BACKEND: &str = "soft-dirty";

const PM_SOFT_DIRTY: u64 = 1 << 55;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per call.
const CHUNK: usize = 8192;

/// Whether soft-dirty tracking really works on this kernel: a page of this
/// process, written after `clear_refs`, must show bit 55. Probed once.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| match probe() {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!("soft-dirty probe failed: {e}");
            false
        }
    })
}

fn probe() -> std::io::Result<bool> {
    let map = AnonMapping::new(1)?;
    map.write_page(0, 1);
    clear_refs("self")?;
    map.write_page(0, 2);
    let pm = File::open("/proc/self/pagemap")?;
    let mut e = [0u8; 8];
    pm.read_exact_at(&mut e, map.addr() / page_size() as u64 * 8)?;
    Ok(u64::from_le_bytes(e) & PM_SOFT_DIRTY != 0)
}

/// Write `4` (clear soft-dirty bits) to `/proc/<who>/clear_refs`.
fn clear_refs(who: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{who}/clear_refs"))?;
    f.write_all(b"4")
}

/// The soft-dirty tracker of one process.
pub struct SoftDirtyTracker {
    pid: i32,
    pagemap: File,
    /// The tracked areas at the previous pass.
    known: Vec<PageRange>,
    /// Pages present or swapped at the previous pass.
    populated: Vec<PageRange>,
}

impl SoftDirtyTracker {
    /// Start tracking `pid` (which the caller holds frozen).
    pub fn start(pid: i32) -> Result<SoftDirtyTracker> {
        if !available() {
            return Err(Error::Unsupported {
                pid,
                what: "soft-dirty tracking on this kernel".into(),
            });
        }
        let pm_path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&pm_path).map_err(|e| Error::io(format!("open {pm_path}"), e))?;
        let mut t = SoftDirtyTracker {
            pid,
            pagemap,
            known: Vec::new(),
            populated: Vec::new(),
        };
        t.known = super::private_areas(pid)?;
        let mut dirty = Vec::new();
        let mut populated = Vec::new();
        for a in t.known.clone() {
            t.read_area(a, &mut dirty, &mut populated)?;
        }
        normalize(&mut populated);
        t.populated = populated;
        clear_refs(&pid.to_string())
            .map_err(|e| Error::io(format!("write /proc/{pid}/clear_refs"), e))?;
        Ok(t)
    }

    /// Soft-dirty and populated page runs of `a`.
    fn read_area(
        &self,
        a: PageRange,
        dirty: &mut Vec<PageRange>,
        populated: &mut Vec<PageRange>,
    ) -> Result<()> {
        let page = page_size() as u64;
        let mut buf = vec![0u8; CHUNK * 8];
        let mut addr = a.start;
        while addr < a.end {
            let n = (((a.end - addr) / page) as usize).min(CHUNK);
            let b = &mut buf[..n * 8];
            if let Err(e) = self.pagemap.read_exact_at(b, addr / page * 8) {
                return Err(Error::io(
                    format!("read pagemap of {} at {addr:#x}", self.pid),
                    e,
                ));
            }
            for (i, e) in b.chunks_exact(8).enumerate() {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(e);
                let e = u64::from_le_bytes(raw);
                let p = addr + i as u64 * page;
                let r = PageRange {
                    start: p,
                    end: p + page,
                };
                if e & PM_SOFT_DIRTY != 0 {
                    push(dirty, r);
                }
                if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                    push(populated, r);
                }
            }
            addr += n as u64 * page;
        }
        Ok(())
    }

    fn pass(&mut self, vmas: &[Vma], out: &mut Vec<PageRange>) -> Result<()> {
        let areas = tracked_areas(vmas);
        let mut found = subtract(&areas, &self.known);
        let mut populated = Vec::new();
        for &a in &areas {
            self.read_area(a, &mut found, &mut populated)?;
        }
        normalize(&mut populated);
        // Populated before, in a still tracked area, and not now: dropped.
        let before = subtract(&self.populated, &subtract(&self.populated, &areas));
        found.extend(subtract(&before, &populated));
        let pid = self.pid;
        clear_refs(&pid.to_string())
            .map_err(|e| Error::io(format!("write /proc/{pid}/clear_refs"), e))?;
        self.known = areas;
        self.populated = populated;
        normalize(&mut found);
        out.append(&mut found);
        Ok(())
    }
}

fn push(v: &mut Vec<PageRange>, r: PageRange) {
    match v.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => v.push(r),
    }
}

/// True if `pid` is traced by this process (the caller froze it).
fn traced_by_me(pid: i32) -> bool {
    let me = std::process::id().to_string();
    crate::procfs::read(pid, "status")
        .ok()
        .and_then(|s| crate::procfs::status_field(&s, "TracerPid"))
        .is_some_and(|t| t == me)
}

impl DirtyTracker for SoftDirtyTracker {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn collect(&mut self, vmas: &[Vma], out: &mut Vec<PageRange>) -> Result<()> {
        if traced_by_me(self.pid) {
            return self.pass(vmas, out);
        }
        let frozen = Frozen::freeze(self.pid)?;
        let r = self.pass(vmas, out);
        let t = frozen.thaw();
        r?;
        t
    }

    fn stop(self: Box<Self>) -> Result<()> {
        // Nothing of ours is in the process: no fd, no mapping, and the
        // soft-dirty bits are invisible to it.
        Ok(())
    }
}
