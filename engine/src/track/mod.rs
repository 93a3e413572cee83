//! Dirty-page tracking of a running process, for iterative pre-copy.
//!
//! ```text
//!   start(pid, &mut frozen) ──► Box<dyn DirtyTracker>
//!        │  uffd-wp    (userfaultfd WP_ASYNC + PAGEMAP_SCAN; kernel 6.7+)
//!        │  soft-dirty (clear_refs + pagemap bit 55; CONFIG_MEM_SOFT_DIRTY)
//!        ▼
//!   collect(&vmas, &mut out)   pages written since the previous collect,
//!        │                      areas new since then in full; re-arms
//!   stop()                     leaves the target as it was
//! ```
//!
//! The backend is chosen at run time ([`start`]): userfaultfd write-protect
//! when the kernel offers `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED`
//! and the target does not use userfaultfd itself; otherwise soft-dirty if a
//! real probe ([`soft_dirty::available`]) shows that bit 55 gets set;
//! otherwise [`Error::Unsupported`] naming the reason.
//!
//! The caller re-reads the address space before each pass
//! ([`crate::dump::memory::collect_vmas`]) and hands it to
//! [`DirtyTracker::collect`]; only areas with private pages
//! ([`has_private_pages`]) are tracked, the others are ignored.

pub mod pagemap_scan;
pub mod soft_dirty;
pub mod uffd_raw;
pub mod uffd_wp;

#[cfg(test)]
mod tests;

use crate::dump::memory::has_private_pages;
use crate::error::{Error, Result};
use crate::freeze::Frozen;
use ferry_protocol::model::Vma;

/// A run of whole pages `[start, end)` (page aligned, `end` exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl PageRange {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True when the range holds no page.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len() / uffd_raw::page_size() as u64
    }
}

/// Follows which pages of a process are written between passes.
pub trait DirtyTracker: Send {
    /// The backend's name as shown in reports: `"uffd-wp"` or `"soft-dirty"`.
    fn backend(&self) -> &'static str;

    /// Append to `out` the pages inside `vmas` (the process's current areas,
    /// as re-read by the caller) that were written since the previous
    /// `collect` (or since [`start`]), sorted and merged, and re-arm
    /// tracking. Areas (or parts of areas) that were not tracked before are
    /// reported whole and tracked from now on; areas gone are forgotten.
    /// Areas without private pages (shared, special) are ignored.
    fn collect(&mut self, vmas: &[Vma], out: &mut Vec<PageRange>) -> Result<()>;

    /// Begin tracking every private area. Called once after [`start`], with
    /// the process running again: protecting the whole address space takes
    /// time in proportion to its size, which the process need not spend
    /// frozen. Writes from before this call are not reported, so the first
    /// full copy must begin after it.
    fn arm(&mut self) -> Result<()> {
        Ok(())
    }

    /// Stop tracking and leave the process as it was (no fd, no mapping,
    /// no write protection of ours).
    fn stop(self: Box<Self>) -> Result<()>;
}

/// Start tracking `pid`, which the caller holds frozen, with the best
/// backend this kernel and this process allow. Thaw the process afterwards
/// and call [`DirtyTracker::arm`]; the first [`DirtyTracker::collect`]
/// reports the pages written since then.
pub fn start(pid: i32, frozen: &mut Frozen) -> Result<Box<dyn DirtyTracker>> {
    let uffd_reason = match uffd_wp::kernel_support() {
        Ok(()) => match target_userfaultfd(pid)? {
            None => return Ok(Box::new(uffd_wp::UffdWpTracker::start(pid, frozen)?)),
            Some(why) => why,
        },
        Err(why) => why,
    };
    if soft_dirty::available() {
        tracing::info!("dirty tracking of {pid} with soft-dirty: {uffd_reason}");
        return Ok(Box::new(soft_dirty::SoftDirtyTracker::start(pid)?));
    }
    Err(Error::Unsupported {
        pid,
        what: format!(
            "dirty-page tracking: {uffd_reason}, and soft-dirty is not available on this \
             kernel (bit 55 of pagemap never gets set; CONFIG_MEM_SOFT_DIRTY is off)"
        ),
    })
}

/// Name of the backend [`start`] would pick for `pid` now, or the reason
/// none is available (for `migrate check` and reports).
pub fn backend_for(pid: i32) -> Result<&'static str> {
    let uffd = match uffd_wp::kernel_support() {
        Ok(()) => target_userfaultfd(pid)?.map_or(Ok(()), Err),
        Err(why) => Err(why),
    };
    match uffd {
        Ok(()) => Ok(uffd_wp::BACKEND),
        Err(_) if soft_dirty::available() => Ok(soft_dirty::BACKEND),
        Err(why) => Err(Error::Unsupported {
            pid,
            what: format!("dirty-page tracking: {why}, and soft-dirty is not available"),
        }),
    }
}

/// Why the target's own use of userfaultfd rules out the uffd-wp backend:
/// an `anon_inode:[userfaultfd]` fd, or areas registered with a userfaultfd
/// (held by someone else) in smaps. `Ok(None)` when it does not use it.
pub fn target_userfaultfd(pid: i32) -> Result<Option<String>> {
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(format!("read {dir}"), e))?;
    for ent in rd.flatten() {
        let Ok(target) = std::fs::read_link(ent.path()) else {
            continue; // closed meanwhile
        };
        if target.to_string_lossy() == "anon_inode:[userfaultfd]" {
            return Ok(Some(format!(
                "the process uses userfaultfd itself (fd {} is anon_inode:[userfaultfd]), \
                 which the userfaultfd write-protect backend would conflict with",
                ent.file_name().to_string_lossy()
            )));
        }
    }
    if let Some(r) = uffd_registered_areas(pid)?.first() {
        return Ok(Some(format!(
            "the process's memory at {:#x}-{:#x} is registered with a userfaultfd \
             (smaps VmFlags), which the userfaultfd write-protect backend would conflict with",
            r.start, r.end
        )));
    }
    Ok(None)
}

/// Areas of `pid` registered with any userfaultfd (`um`, `uw` or `ui` in
/// the VmFlags of /proc/PID/smaps).
pub fn uffd_registered_areas(pid: i32) -> Result<Vec<PageRange>> {
    Ok(smaps_flags(pid)?
        .into_iter()
        .filter(|(_, f)| f.iter().any(|f| matches!(f.as_str(), "um" | "uw" | "ui")))
        .map(|(r, _)| r)
        .collect())
}

/// Each area of /proc/PID/smaps with its VmFlags mnemonics.
pub(crate) fn smaps_flags(pid: i32) -> Result<Vec<(PageRange, Vec<String>)>> {
    let text = crate::procfs::read(pid, "smaps")?;
    let mut out: Vec<(PageRange, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.1 = flags.split_whitespace().map(str::to_owned).collect();
            }
            continue;
        }
        let Some(range) = line.split(' ').next() else {
            continue;
        };
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
            out.push((PageRange { start, end }, Vec::new()));
        }
    }
    Ok(out)
}

/// The private areas of `pid` now, as tracked (like
/// [`crate::dump::memory::collect_vmas`] + [`has_private_pages`], but
/// without refusing areas the dump cannot handle: that is the dump's call).
pub(crate) fn private_areas(pid: i32) -> Result<Vec<PageRange>> {
    let mut v: Vec<PageRange> = crate::procfs::maps(pid)?
        .into_iter()
        .filter(|m| !m.shared && m.end > m.start)
        .filter(|m| match m.path.as_deref() {
            Some(p) if p.starts_with('[') => {
                p == "[heap]" || p == "[stack]" || p.starts_with("[anon:")
            }
            _ => true,
        })
        .map(|m| PageRange {
            start: m.start,
            end: m.end,
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The ranges of `vmas` whose pages are tracked, sorted.
pub(crate) fn tracked_areas(vmas: &[Vma]) -> Vec<PageRange> {
    let mut v: Vec<PageRange> = vmas
        .iter()
        .filter(|v| has_private_pages(v) && !v.is_empty())
        .map(|v| PageRange {
            start: v.start,
            end: v.end,
        })
        .collect();
    v.sort();
    v
}

/// Sort `ranges` and merge overlapping or adjacent ones.
pub fn normalize(ranges: &mut Vec<PageRange>) {
    ranges.retain(|r| !r.is_empty());
    ranges.sort();
    let mut out: Vec<PageRange> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    *ranges = out;
}

/// The parts of `areas` not covered by `known` (both sorted, merged).
pub(crate) fn subtract(areas: &[PageRange], known: &[PageRange]) -> Vec<PageRange> {
    let mut out = Vec::new();
    for a in areas {
        let mut cur = a.start;
        for k in known {
            if k.end <= cur {
                continue;
            }
            if k.start >= a.end {
                break;
            }
            if k.start > cur {
                out.push(PageRange {
                    start: cur,
                    end: k.start,
                });
            }
            cur = cur.max(k.end);
            if cur >= a.end {
                break;
            }
        }
        if cur < a.end {
            out.push(PageRange {
                start: cur,
                end: a.end,
            });
        }
    }
    out
}
