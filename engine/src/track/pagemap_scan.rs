//! Safe wrapper for the `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap`
//! (Linux 6.7+).
//!
//! The machine's C headers predate the ioctl, so the UAPI of
//! `include/uapi/linux/fs.h` (`struct pm_scan_arg`, `struct page_region`,
//! `PAGE_IS_*`, `PM_SCAN_*`) is defined here with sizes and the ioctl number
//! checked at compile time.
//!
//! # Dirty tracking with async userfaultfd write protection
//!
//! 1. In the target, create a userfaultfd with `UFFD_FEATURE_WP_ASYNC |
//!    UFFD_FEATURE_WP_UNPOPULATED` and register each VMA with
//!    `UFFDIO_REGISTER_MODE_WP`.
//! 2. Arm: [`scan`] the range with [`PM_SCAN_WP_MATCHING`] (plus
//!    [`PM_SCAN_CHECK_WPASYNC`]) and `category_mask = PAGE_IS_WRITTEN`, or
//!    `UFFDIO_WRITEPROTECT` the whole range.
//! 3. Each pass: the same scan returns the pages written since the previous
//!    pass *and* write-protects them again, atomically per page.
//!
//! [`ScanRequest::written_and_reprotect`] builds exactly that request.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// The page has asynchronous userfaultfd write protection enabled.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// The page was written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// The page is file backed.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// The page is present in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// The page is swapped out.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// The page maps the zero page.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// The page is part of a THP or hugetlb page.
pub const PAGE_IS_HUGE: u64 = 1 << 6;
/// The page is soft-dirty (needs `CONFIG_MEM_SOFT_DIRTY`).
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;
/// The page is a guard region (`MADV_GUARD_INSTALL`, Linux 6.14+).
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// Write-protect the matched pages (re-arms dirty tracking).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with `EPERM` on a page without async write protection enabled.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// One run of pages with equal categories, as filled in by the kernel
/// (`struct page_region`). `end` is exclusive.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte address of the run.
    pub start: u64,
    /// One past the last byte of the run.
    pub end: u64,
    /// `PAGE_IS_*` bits, restricted to the request's `return_mask`.
    pub categories: u64,
}

impl PageRegion {
    /// Length of the run in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the run is empty (never the case for kernel output).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u32 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u32) << 16) | ((b'f' as u32) << 8) | 16;

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

/// Regions fetched per ioctl call by [`scan`].
const CHUNK: usize = 512;

/// What to scan and how. Field meanings follow `struct pm_scan_arg`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanRequest {
    /// Start address (page aligned).
    pub start: u64,
    /// End address, exclusive.
    pub end: u64,
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Categories that match when *clear* instead of set.
    pub category_inverted: u64,
    /// Pages must match all of these categories.
    pub category_mask: u64,
    /// Pages must match at least one of these (0: no constraint).
    pub category_anyof_mask: u64,
    /// Categories reported in [`PageRegion::categories`].
    pub return_mask: u64,
    /// Stop after this many pages were reported (0: no limit).
    pub max_pages: u64,
}

impl ScanRequest {
    /// The dirty-tracking pass: report pages written since the last pass in
    /// `[start, end)` and write-protect them again in the same call. Fails
    /// with `EPERM` if part of the range is not registered for async WP.
    pub fn written_and_reprotect(start: u64, end: u64) -> Self {
        Self {
            start,
            end,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Self::default()
        }
    }

    /// Read-only query: report pages in `[start, end)` having any of
    /// `anyof`, returning the categories in `return_mask`.
    pub fn query(start: u64, end: u64, anyof: u64, return_mask: u64) -> Self {
        Self {
            start,
            end,
            category_anyof_mask: anyof,
            return_mask,
            ..Self::default()
        }
    }
}

/// Runs the ioctl on `fd` with `arg`.
///
/// # Safety
/// `arg.vec`/`arg.vec_len` must describe a writable array of `PageRegion`
/// that stays alive for the call.
unsafe fn pagemap_scan_ioctl(fd: RawFd, arg: &mut PmScanArg) -> io::Result<usize> {
    // SAFETY: `arg` is a live `struct pm_scan_arg`; the caller guarantees its
    // output vector is valid, which is all the kernel writes besides `arg`.
    let rc = unsafe { libc::ioctl(fd, PAGEMAP_SCAN as libc::Ioctl, arg as *mut PmScanArg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        usize::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// One `PAGEMAP_SCAN` call: fills `buf` from its start and returns the
/// number of regions written and the kernel's `walk_end` (where the walk
/// stopped; `< req.end` when `buf` or `max_pages` ran out).
pub fn scan_once(
    pagemap: &File,
    req: &ScanRequest,
    buf: &mut [PageRegion],
) -> io::Result<(usize, u64)> {
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: req.flags,
        start: req.start,
        end: req.end,
        walk_end: 0,
        vec: buf.as_mut_ptr() as u64,
        vec_len: buf.len() as u64,
        max_pages: req.max_pages,
        category_inverted: req.category_inverted,
        category_mask: req.category_mask,
        category_anyof_mask: req.category_anyof_mask,
        return_mask: req.return_mask,
    };
    // SAFETY: `vec/vec_len` describe `buf`, exclusively borrowed for the call.
    let n = unsafe { pagemap_scan_ioctl(pagemap.as_raw_fd(), &mut arg) }?;
    if n > buf.len() {
        return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
    }
    Ok((n, arg.walk_end))
}

/// Scans `[req.start, req.end)` completely, appending the regions to `out`
/// (adjacent regions with equal categories are merged, also across calls).
/// Loops from `walk_end` whenever the kernel's output buffer filled up.
/// Returns the final `walk_end`: `req.end`, or less if `req.max_pages` was
/// reached.
///
/// With [`PM_SCAN_WP_MATCHING`] only the pages actually reported are
/// write-protected, so a partial walk never loses a dirty page.
pub fn scan(pagemap: &File, req: &ScanRequest, out: &mut Vec<PageRegion>) -> io::Result<u64> {
    let mut buf = vec![PageRegion::default(); CHUNK];
    let mut cur = *req;
    let mut pages_left = req.max_pages;
    let page = super::uffd_raw::page_size() as u64;
    loop {
        let (n, walk_end) = scan_once(pagemap, &cur, &mut buf)?;
        for r in &buf[..n] {
            if req.max_pages != 0 {
                pages_left = pages_left.saturating_sub(r.len() / page);
            }
            match out.last_mut() {
                Some(last) if last.end == r.start && last.categories == r.categories => {
                    last.end = r.end;
                }
                _ => out.push(*r),
            }
        }
        if walk_end >= cur.end {
            return Ok(walk_end);
        }
        let limit_hit = req.max_pages != 0 && pages_left == 0;
        // No progress and nothing returned: stop rather than spin.
        let stuck = n == 0 && walk_end <= cur.start;
        if limit_hit || stuck {
            return Ok(walk_end);
        }
        cur.start = walk_end;
        cur.max_pages = pages_left;
    }
}

/// Opens `/proc/<pid>/pagemap` (or `/proc/self/pagemap` for `None`) for
/// scanning.
pub fn open_pagemap(pid: Option<i32>) -> io::Result<File> {
    match pid {
        Some(p) => File::open(format!("/proc/{p}/pagemap")),
        None => File::open("/proc/self/pagemap"),
    }
}

/// Expands regions into page indices relative to `base` (helper for tests
/// and small reports).
pub fn page_indices(regions: &[PageRegion], base: u64) -> Vec<u64> {
    let page = super::uffd_raw::page_size() as u64;
    let mut v = Vec::new();
    for r in regions {
        let mut a = r.start;
        while a < r.end {
            v.push((a - base) / page);
            a += page;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::super::uffd_raw::{
        available_features, AnonMapping, Uffd, UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_WP_ASYNC,
        UFFD_FEATURE_WP_UNPOPULATED,
    };
    use super::*;

    /// Sets up `pages` pages registered for async WP; None if unsupported.
    fn tracked(pages: usize) -> Option<(AnonMapping, Uffd, File)> {
        let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        if available_features().expect("uffd features") & want != want {
            return None;
        }
        let map = AnonMapping::new(pages).expect("mmap");
        let uffd = Uffd::new().expect("userfaultfd");
        uffd.api(want).expect("UFFDIO_API");
        uffd.register(map.addr(), map.len(), UFFDIO_REGISTER_MODE_WP)
            .expect("register");
        let pm = open_pagemap(None).expect("open pagemap");
        Some((map, uffd, pm))
    }

    fn dirty_pass(pm: &File, map: &AnonMapping) -> Vec<u64> {
        let mut out = Vec::new();
        let req = ScanRequest::written_and_reprotect(map.addr(), map.addr() + map.len());
        let end = scan(pm, &req, &mut out).expect("scan");
        assert_eq!(end, map.addr() + map.len());
        page_indices(&out, map.addr())
    }

    #[test]
    fn written_pages_are_exact() {
        let Some((map, _uffd, pm)) = tracked(8) else {
            return;
        };
        // Arm: protect everything (WP_UNPOPULATED covers untouched pages).
        dirty_pass(&pm, &map);
        assert!(dirty_pass(&pm, &map).is_empty());
        map.write_page(1, 1);
        map.write_page(3, 3);
        assert_eq!(dirty_pass(&pm, &map), vec![1, 3]);
        // Re-protected by the previous pass; no writes since.
        assert!(dirty_pass(&pm, &map).is_empty());
        map.write_page(5, 5);
        assert_eq!(dirty_pass(&pm, &map), vec![5]);
        assert!(dirty_pass(&pm, &map).is_empty());
        assert_eq!(map.read_page(3), Some(3));
    }

    #[test]
    fn uffdio_writeprotect_arms_too() {
        let Some((map, uffd, pm)) = tracked(8) else {
            return;
        };
        uffd.writeprotect(map.addr(), map.len(), true)
            .expect("writeprotect");
        map.write_page(0, 9);
        map.write_page(7, 9);
        assert_eq!(dirty_pass(&pm, &map), vec![0, 7]);
    }

    #[test]
    fn loops_when_output_buffer_fills() {
        // 3 * CHUNK isolated written pages need several ioctl calls.
        let pages = 6 * CHUNK + 2;
        let Some((map, _uffd, pm)) = tracked(pages) else {
            return;
        };
        dirty_pass(&pm, &map);
        let mut expect = Vec::new();
        for i in (0..pages).step_by(2) {
            map.write_page(i, 1);
            expect.push(i as u64);
        }
        assert_eq!(dirty_pass(&pm, &map), expect);
        assert!(dirty_pass(&pm, &map).is_empty());
    }

    #[test]
    fn scan_once_stops_at_full_buffer() {
        let Some((map, _uffd, pm)) = tracked(8) else {
            return;
        };
        dirty_pass(&pm, &map);
        for i in [0, 2, 4, 6] {
            map.write_page(i, 1);
        }
        let req = ScanRequest::written_and_reprotect(map.addr(), map.addr() + map.len());
        let mut buf = [PageRegion::default(); 2];
        let (n, walk_end) = scan_once(&pm, &req, &mut buf).expect("scan_once");
        assert_eq!(n, 2);
        assert!(walk_end > map.page_addr(2) && walk_end <= map.page_addr(4));
        assert_eq!(page_indices(&buf[..n], map.addr()), vec![0, 2]);
        assert_eq!(dirty_pass(&pm, &map), vec![4, 6]);
    }

    #[test]
    fn max_pages_limits_and_keeps_rest_dirty() {
        let Some((map, _uffd, pm)) = tracked(8) else {
            return;
        };
        dirty_pass(&pm, &map);
        for i in [0, 2, 4, 6] {
            map.write_page(i, 1);
        }
        let mut req = ScanRequest::written_and_reprotect(map.addr(), map.addr() + map.len());
        req.max_pages = 2;
        let mut out = Vec::new();
        let end = scan(&pm, &req, &mut out).expect("scan");
        assert!(end < map.addr() + map.len());
        assert_eq!(page_indices(&out, map.addr()), vec![0, 2]);
        // The pages beyond the limit were not re-protected: still reported.
        assert_eq!(dirty_pass(&pm, &map), vec![4, 6]);
    }

    #[test]
    fn check_wpasync_rejects_unregistered_memory() {
        let map = AnonMapping::new(2).expect("mmap");
        let pm = open_pagemap(None).expect("pagemap");
        let req = ScanRequest::written_and_reprotect(map.addr(), map.addr() + map.len());
        let err = scan(&pm, &req, &mut Vec::new()).expect_err("must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn present_query_without_uffd() {
        let map = AnonMapping::new(4).expect("mmap");
        map.write_page(2, 1);
        let pm = open_pagemap(None).expect("pagemap");
        let req = ScanRequest::query(
            map.addr(),
            map.addr() + map.len(),
            PAGE_IS_PRESENT,
            PAGE_IS_PRESENT,
        );
        let mut out = Vec::new();
        scan(&pm, &req, &mut out).expect("scan");
        assert_eq!(page_indices(&out, map.addr()), vec![2]);
    }
}
