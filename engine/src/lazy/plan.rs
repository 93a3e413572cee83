//! The source's split of the memory at a lazy switchover: which pages go
//! with the frozen pass ("eager") and which stay owed, to be fetched by the
//! destination on fault or pushed in the background.
//!
//! Only private anonymous areas can be served lazily (userfaultfd's missing
//! mode does not cover private file mappings), so copied-on-write pages of
//! private file mappings always go eagerly. So do the pages the kernel
//! itself writes while the destination builds the process before the
//! userfaultfd is armed (each thread's rseq area), and the pages around each
//! thread's stack pointer, which it touches first anyway.
//!
//! Owed pages are coalesced into spans: a gap of a few pages between two
//! owed pages is owed too (the destination drops each span with one
//! `madvise`, and the source serves a page that was never populated as
//! zeros), which keeps the span count small for scattered dirty sets.

use crate::dump::memory::{has_private_pages, populated_anon_pages};
use crate::error::{Error, Result};
use crate::track::PageRange;
use ferry_protocol::model::{ThreadState, Vma, VmaKind, PAGE_SIZE};
use std::fs::File;

/// Largest gap (pages) merged into a span at first.
const FIRST_GAP: u64 = 64;
/// Spans the plan aims to stay under (the gap doubles until it does).
const TARGET_SPANS: usize = 4096;
/// Pages around a thread's stack pointer sent eagerly (each side).
const STACK_PAGES: u64 = 2;

/// The split of a frozen process's memory for a lazy switchover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LazyPlan {
    /// Ranges to send with the frozen pass (sorted, disjoint).
    pub eager: Vec<PageRange>,
    /// Spans owed by the source, as `(addr, pages)` (sorted, disjoint);
    /// each lies inside one private anonymous area.
    pub owed: Vec<(u64, u64)>,
}

impl LazyPlan {
    /// Pages owed in all.
    pub fn owed_pages(&self) -> u64 {
        self.owed.iter().map(|s| s.1).sum()
    }
}

/// Plan the switchover of frozen process `pid` with layout `vmas`.
/// `dirty` is what the destination lacks: the pages written since the last
/// pre-copy pass, or `None` when no pass ran (then everything populated).
pub fn plan(
    pid: i32,
    vmas: &[Vma],
    dirty: Option<&[PageRange]>,
    threads: &[ThreadState],
) -> Result<LazyPlan> {
    let hot = hot_pages(vmas, threads);
    let pm_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pm_path).map_err(|e| Error::io(format!("open {pm_path}"), e))?;
    let mut eager = Vec::new();
    let mut owed_areas: Vec<Vec<PageRange>> = Vec::new();
    for v in vmas.iter().filter(|v| has_private_pages(v)) {
        let area = PageRange {
            start: v.start,
            end: v.end,
        };
        let wanted: Vec<PageRange> = match dirty {
            Some(d) => intersect(d, area),
            None => vec![area],
        };
        if !matches!(v.kind, VmaKind::Anonymous) {
            eager.extend(wanted);
            continue;
        }
        let pages: Vec<PageRange> = match dirty {
            // Everything written since the last pass is owed, populated or
            // not (a page dropped since must be dropped there too).
            Some(_) => wanted,
            None => {
                let mut p = Vec::new();
                populated_anon_pages(&pagemap, (v.start, v.end), &mut p)?;
                to_ranges(&p)
            }
        };
        owed_areas.push(pages);
    }
    let mut gap = FIRST_GAP;
    let owed = loop {
        let spans: Vec<PageRange> = owed_areas.iter().flat_map(|a| coalesce(a, gap)).collect();
        if spans.len() <= TARGET_SPANS || gap >= 1 << 20 {
            break spans;
        }
        gap *= 2;
    };
    let owed = subtract(&owed, &hot);
    // Hot pages that would have been owed go eagerly instead.
    for h in &hot {
        let in_owed = owed_areas.iter().flatten().any(|r| overlaps(r, h));
        if in_owed || dirty.is_none() {
            eager.push(*h);
        }
    }
    crate::track::normalize(&mut eager);
    Ok(LazyPlan {
        eager,
        owed: owed
            .iter()
            .map(|r| (r.start, r.pages()))
            .filter(|s| s.1 > 0)
            .collect(),
    })
}

/// Pages the kernel writes during the restore (rseq areas) and the pages
/// around each stack pointer, clipped to private anonymous areas.
fn hot_pages(vmas: &[Vma], threads: &[ThreadState]) -> Vec<PageRange> {
    let mut hot = Vec::new();
    let page = |a: u64| a & !(PAGE_SIZE - 1);
    for t in threads {
        if let Some(r) = t.rseq.filter(|r| r.abi_pointer != 0) {
            let last = r.abi_pointer.saturating_add(u64::from(r.len.max(1)) - 1);
            hot.push(PageRange {
                start: page(r.abi_pointer),
                end: page(last).saturating_add(PAGE_SIZE),
            });
        }
        let sp = page(t.regs.rsp);
        hot.push(PageRange {
            start: sp.saturating_sub(STACK_PAGES * PAGE_SIZE),
            end: sp.saturating_add((STACK_PAGES + 1) * PAGE_SIZE),
        });
    }
    let mut out = Vec::new();
    for h in hot {
        for v in vmas.iter().filter(|v| matches!(v.kind, VmaKind::Anonymous)) {
            let (s, e) = (h.start.max(v.start), h.end.min(v.end));
            if s < e {
                out.push(PageRange { start: s, end: e });
            }
        }
    }
    crate::track::normalize(&mut out);
    out
}

fn overlaps(a: &PageRange, b: &PageRange) -> bool {
    a.start < b.end && b.start < a.end
}

/// The parts of sorted `ranges` inside `area`.
fn intersect(ranges: &[PageRange], area: PageRange) -> Vec<PageRange> {
    let first = ranges.partition_point(|r| r.end <= area.start);
    ranges[first..]
        .iter()
        .take_while(|r| r.start < area.end)
        .map(|r| PageRange {
            start: r.start.max(area.start),
            end: r.end.min(area.end),
        })
        .filter(|r| r.start < r.end)
        .collect()
}

/// Sorted page addresses as ranges.
fn to_ranges(pages: &[u64]) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some(r) if r.end == p => r.end += PAGE_SIZE,
            _ => out.push(PageRange {
                start: p,
                end: p + PAGE_SIZE,
            }),
        }
    }
    out
}

/// Merge sorted ranges whose gap is at most `gap` pages.
fn coalesce(ranges: &[PageRange], gap: u64) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(l) if r.start <= l.end.saturating_add(gap * PAGE_SIZE) => l.end = l.end.max(r.end),
            _ => out.push(*r),
        }
    }
    out
}

/// `ranges` minus `holes` (both sorted and disjoint).
fn subtract(ranges: &[PageRange], holes: &[PageRange]) -> Vec<PageRange> {
    let mut out = Vec::new();
    let mut h = 0;
    for r in ranges {
        let mut start = r.start;
        while h < holes.len() && holes[h].end <= start {
            h += 1;
        }
        let mut k = h;
        while k < holes.len() && holes[k].start < r.end {
            if holes[k].start > start {
                out.push(PageRange {
                    start,
                    end: holes[k].start,
                });
            }
            start = start.max(holes[k].end);
            k += 1;
        }
        if start < r.end {
            out.push(PageRange { start, end: r.end });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn r(a: u64, b: u64) -> PageRange {
        PageRange {
            start: a * P,
            end: b * P,
        }
    }

    #[test]
    fn coalesce_merges_small_gaps_only() {
        let rs = [r(0, 1), r(3, 4), r(100, 101)];
        assert_eq!(coalesce(&rs, 2), vec![r(0, 4), r(100, 101)]);
        assert_eq!(coalesce(&rs, 1), rs.to_vec());
        assert_eq!(coalesce(&rs, 1000), vec![r(0, 101)]);
    }

    #[test]
    fn subtract_cuts_holes() {
        let rs = [r(0, 10), r(20, 30)];
        let holes = [r(2, 3), r(9, 21), r(25, 40)];
        assert_eq!(subtract(&rs, &holes), vec![r(0, 2), r(3, 9), r(21, 25)]);
        assert_eq!(subtract(&rs, &[]), rs.to_vec());
    }

    #[test]
    fn intersect_clips_to_the_area() {
        let rs = [r(0, 5), r(8, 12), r(20, 22)];
        assert_eq!(intersect(&rs, r(4, 10)), vec![r(4, 5), r(8, 10)]);
        assert!(intersect(&rs, r(12, 20)).is_empty());
    }

    #[test]
    fn to_ranges_joins_adjacent_pages() {
        assert_eq!(to_ranges(&[0, P, 2 * P, 5 * P]), vec![r(0, 3), r(5, 6)]);
    }
}
