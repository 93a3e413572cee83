//! Dirty tracking with userfaultfd write protection in async mode, read and
//! re-armed with the `PAGEMAP_SCAN` ioctl (Linux 6.7+).
//!
//! # Set-up (target frozen by the caller)
//! An injected `userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)`
//! in the main thread creates the fd for the target's mm; the agent takes a
//! copy with `pidfd_open` + `pidfd_getfd` and an injected `close` removes it
//! from the target's fd table again. From then on every ioctl runs in the
//! agent: `UFFDIO_API` with `WP_ASYNC | WP_UNPOPULATED`, then per private
//! area `UFFDIO_REGISTER` (`MODE_WP`) and `UFFDIO_WRITEPROTECT` (with
//! `WP_UNPOPULATED` this also puts markers on pages never touched).
//!
//! # One pass ([`UffdWpTracker::collect`]), per private area
//! 1. Query the pages without async write protection (`PAGE_IS_WPALLOWED`
//!    inverted): areas mapped since the last pass, moved by `mremap` (the
//!    kernel drops the registration of a moved area when the uffd lacks
//!    `EVENT_REMAP`), or unmapped and mapped again. They are registered,
//!    protected and reported whole.
//! 2. Written pages: `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, category
//!    `PAGE_IS_WRITTEN` and not `PAGE_IS_FILE` (a clean page-cache page
//!    mapped by a read is not data of the process): reported and protected
//!    again in the same call. Should an area lose its registration between
//!    step 1 and 2 (`EPERM`), the scan is repeated without the check; the
//!    kernel then skips that area and the next pass reports it whole.
//! 3. Dropped pages: neither present nor swapped (a protected page always is
//!    one of them, markers count as swapped), i.e. zapped since the last
//!    pass by `MADV_DONTNEED`/`MADV_FREE` reclaim: their content changed to
//!    zero (or to the file's), so they are reported, and the same scan puts
//!    markers on them again. (Kernel 6.18 already shows such a page as
//!    `PAGE_IS_WRITTEN`, so step 2 catches it; this scan keeps the tracker
//!    right on kernels that show it as untouched.)
//!
//! Verified by the tests (kernel 6.18): exact written pages in anonymous
//! and private file areas (a read of a file page is not reported); new
//! `mmap` areas, `brk` growth, `mremap` destinations and areas unmapped and
//! mapped again are reported whole once, then exactly, also when they take
//! the place of what was there before (part of a tracked area unmapped and
//! mapped again in place, moved away and back, or moved back next to a
//! tracked neighbour it merges with: the merged area loses its
//! registration and is reported whole); unmapped areas are
//! forgotten without error; `mprotect` (whole area or part, to read-only,
//! `PROT_NONE` and back) keeps the registration and per-page protection;
//! `MADV_DONTNEED`ed pages are reported. Stack growth extends a registered
//! area; its new pages show up as written or dropped (not tested). Threads
//! share the mm, so their creation and exit change nothing here besides
//! their stacks, which are areas like any other.
//!
//! Known limit: `MADV_DONTNEED` of a private *file* page copied before the
//! previous pass and not written since reverts it to the file's content
//! under a kept marker; it is not reported.
//!
//! # Stop
//! `UFFDIO_UNREGISTER` of every area registered with write protection
//! (`uw` in smaps; the target uses no userfaultfd of its own, see
//! [`super::start`]), which also clears the protection bits and markers,
//! then close the fd, and check that no `uw` area is left.

use super::pagemap_scan::{
    self, ScanRequest, PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WPALLOWED,
    PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
};
use super::uffd_raw::{
    self, Uffd, UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED,
    UFFD_USER_MODE_ONLY,
};
use super::{smaps_flags, tracked_areas, DirtyTracker, PageRange};
use crate::error::{Error, Result};
use crate::freeze::Frozen;
use ferry_parasite::remote::{find_syscall_insn, syscall};
use ferry_protocol::model::Vma;
use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Name of this backend in reports.
pub const BACKEND: &str = "uffd-wp";

/// The userfaultfd features this backend needs.
pub const FEATURES: u64 = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;

/// `Ok` when this kernel offers async write protection, else the reason.
pub fn kernel_support() -> std::result::Result<(), String> {
    match uffd_raw::available_features() {
        Ok(f) if f & FEATURES == FEATURES => Ok(()),
        Ok(f) => Err(format!(
            "this kernel's userfaultfd lacks {} (it offers {})",
            uffd_raw::feature_names(FEATURES & !f).join(" and "),
            uffd_raw::feature_names(f).join(" ")
        )),
        Err(e) => Err(format!("userfaultfd is not usable here ({e})")),
    }
}

/// The userfaultfd write-protect tracker of one process.
pub struct UffdWpTracker {
    pid: i32,
    /// `None` once stopped.
    uffd: Option<Uffd>,
    pagemap: File,
    /// Areas that could not be registered at the previous pass (reported
    /// whole each pass).
    untrackable: HashSet<PageRange>,
}

impl UffdWpTracker {
    /// Set up tracking of `pid`, frozen by the caller: take a userfaultfd
    /// of its mm. [`DirtyTracker::arm`] then protects every private area.
    /// On error nothing of ours is left in the target.
    pub fn start(pid: i32, frozen: &mut Frozen) -> Result<UffdWpTracker> {
        kernel_support().map_err(|what| Error::Unsupported {
            pid,
            what: format!("dirty tracking with userfaultfd: {what}"),
        })?;
        let uffd = Uffd::from_owned(take_userfaultfd(pid, frozen)?);
        let info = uffd
            .api(FEATURES)
            .map_err(|e| Error::io(format!("UFFDIO_API on the userfaultfd of {pid}"), e))?;
        if info.features & FEATURES != FEATURES {
            return Err(Error::Unsupported {
                pid,
                what: "userfaultfd without WP_ASYNC/WP_UNPOPULATED".into(),
            });
        }
        let pm_path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&pm_path).map_err(|e| Error::io(format!("open {pm_path}"), e))?;
        Ok(UffdWpTracker {
            pid,
            uffd: Some(uffd),
            pagemap,
            untrackable: HashSet::new(),
        })
    }

    fn uffd(&self) -> Result<&Uffd> {
        self.uffd.as_ref().ok_or_else(|| Error::Unsupported {
            pid: self.pid,
            what: "using a stopped dirty tracker".into(),
        })
    }

    /// Register `r` for write protection and protect all its pages.
    fn protect_range(&self, r: PageRange) -> io::Result<()> {
        let uffd = self.uffd.as_ref().ok_or(io::ErrorKind::NotConnected)?;
        uffd.register(r.start, r.len(), UFFDIO_REGISTER_MODE_WP)?;
        uffd.writeprotect(r.start, r.len(), true)
    }

    fn scan(&self, req: &ScanRequest, out: &mut Vec<PageRange>) -> io::Result<()> {
        let mut regions = Vec::new();
        pagemap_scan::scan(&self.pagemap, req, &mut regions)?;
        out.extend(regions.iter().map(|r| PageRange {
            start: r.start,
            end: r.end,
        }));
        Ok(())
    }

    /// Ranges of `a` that are not registered with async write protection.
    fn unprotected(&self, a: PageRange) -> io::Result<Vec<PageRange>> {
        let mut out = Vec::new();
        let req = ScanRequest {
            start: a.start,
            end: a.end,
            category_inverted: PAGE_IS_WPALLOWED,
            category_mask: PAGE_IS_WPALLOWED,
            return_mask: PAGE_IS_WPALLOWED,
            ..ScanRequest::default()
        };
        self.scan(&req, &mut out)?;
        super::normalize(&mut out);
        Ok(out)
    }

    /// Written pages of `a`, protected again.
    fn written(&self, a: PageRange, out: &mut Vec<PageRange>) -> io::Result<()> {
        let mut req = ScanRequest {
            start: a.start,
            end: a.end,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            category_inverted: PAGE_IS_FILE,
            category_mask: PAGE_IS_WRITTEN | PAGE_IS_FILE,
            return_mask: PAGE_IS_WRITTEN,
            ..ScanRequest::default()
        };
        let mut got = Vec::new();
        match self.scan(&req, &mut got) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                tracing::debug!(
                    "{:#x}-{:#x} of {} changed during the pass; rescanning",
                    a.start,
                    a.end,
                    self.pid
                );
                req.flags = PM_SCAN_WP_MATCHING;
                got.clear();
                self.scan(&req, &mut got)?;
            }
            r => r?,
        }
        out.append(&mut got);
        Ok(())
    }

    /// Pages of `a` neither present nor swapped (zapped since the last
    /// pass), marked protected again.
    fn dropped(&self, a: PageRange, out: &mut Vec<PageRange>) -> io::Result<()> {
        let req = ScanRequest {
            start: a.start,
            end: a.end,
            flags: PM_SCAN_WP_MATCHING,
            category_inverted: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            category_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT,
            ..ScanRequest::default()
        };
        self.scan(&req, out)
    }

    fn unregister_all(&mut self) -> Result<()> {
        let Some(uffd) = self.uffd.take() else {
            return Ok(());
        };
        let pid = self.pid;
        let mut first: Option<Error> = None;
        match smaps_flags(pid) {
            Ok(areas) => {
                for (r, flags) in areas {
                    if !flags.iter().any(|f| f == "uw") {
                        continue;
                    }
                    if let Err(e) = uffd.unregister(r.start, r.len()) {
                        tracing::debug!("UFFDIO_UNREGISTER {:#x}-{:#x}: {e}", r.start, r.end);
                        first.get_or_insert(Error::io(
                            format!("UFFDIO_UNREGISTER {:#x}-{:#x} of {pid}", r.start, r.end),
                            e,
                        ));
                    }
                }
            }
            // The process is gone: nothing to leave clean.
            Err(_) if !crate::procfs::exists(pid) => return Ok(()),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        // Closing the last reference drops every registration left (for an
        // area that changed between reading smaps and unregistering).
        drop(uffd);
        if !crate::procfs::exists(pid) {
            return Ok(());
        }
        let left: Vec<PageRange> = smaps_flags(pid)?
            .into_iter()
            .filter(|(_, f)| f.iter().any(|f| f == "uw"))
            .map(|(r, _)| r)
            .collect();
        if let Some(r) = left.first() {
            return Err(Error::Unsupported {
                pid,
                what: format!(
                    "write protection left at {:#x}-{:#x} after stopping dirty tracking",
                    r.start, r.end
                ),
            });
        }
        if let Some(e) = first {
            tracing::debug!("unregistering {pid} needed the close of the userfaultfd: {e}");
        }
        Ok(())
    }
}

impl DirtyTracker for UffdWpTracker {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn collect(&mut self, vmas: &[Vma], out: &mut Vec<PageRange>) -> Result<()> {
        self.uffd()?;
        let pid = self.pid;
        let scan_err = |what: &str, a: PageRange, e: io::Error| {
            Error::io(
                format!("PAGEMAP_SCAN ({what}) {:#x}-{:#x} of {pid}", a.start, a.end),
                e,
            )
        };
        let mut found = Vec::new();
        let mut untrackable = HashSet::new();
        for a in tracked_areas(vmas) {
            for u in self.unprotected(a).map_err(|e| scan_err("new", a, e))? {
                // New areas are reported whole. One that cannot be
                // registered (changed under us while the process runs, or
                // MAP_DROPPABLE memory) is reported whole on every pass.
                found.push(u);
                if let Err(e) = self.protect_range(u) {
                    if !self.untrackable.contains(&u) {
                        tracing::debug!(
                            "{:#x}-{:#x} of {pid} cannot be tracked ({e}): sent whole each pass",
                            u.start,
                            u.end
                        );
                    }
                    untrackable.insert(u);
                }
            }
            self.written(a, &mut found)
                .map_err(|e| scan_err("written", a, e))?;
            self.dropped(a, &mut found)
                .map_err(|e| scan_err("dropped", a, e))?;
        }
        self.untrackable = untrackable;
        super::normalize(&mut found);
        out.append(&mut found);
        Ok(())
    }

    fn arm(&mut self) -> Result<()> {
        let pid = self.pid;
        // On a later error, dropping the tracker unregisters what was
        // registered.
        for a in super::private_areas(pid)? {
            // A failure here (an area changing under us while the process
            // runs, or MAP_DROPPABLE memory) leaves the area unprotected:
            // `collect` then reports it whole and tries again.
            if let Err(e) = self.protect_range(a) {
                tracing::info!(
                    "{:#x}-{:#x} of {pid} cannot be write-protected yet ({e}): sent whole",
                    a.start,
                    a.end
                );
            }
        }
        Ok(())
    }

    fn stop(mut self: Box<Self>) -> Result<()> {
        self.unregister_all()
    }
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        if let Err(e) = self.unregister_all() {
            tracing::error!("stopping dirty tracking of {}: {e}", self.pid);
        }
    }
}

/// Create a userfaultfd inside frozen `pid` and move it into this process:
/// the target's fd table is as before on return (also on error).
fn take_userfaultfd(pid: i32, frozen: &mut Frozen) -> Result<OwnedFd> {
    let maps = crate::procfs::maps(pid)?;
    let vdso = maps
        .iter()
        .find(|m| m.path.as_deref() == Some("[vdso]"))
        .ok_or_else(|| Error::Unsupported {
            pid,
            what: "a process without a [vdso] area".into(),
        })?;
    let ip = find_syscall_insn(pid, vdso.start, vdso.end)?.ok_or_else(|| Error::Unsupported {
        pid,
        what: "a vDSO without a syscall instruction".into(),
    })?;
    let main = frozen
        .threads()
        .first_mut()
        .ok_or(Error::NoSuchProcess { pid })?;
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    let remote_fd = syscall(
        main,
        ip,
        "userfaultfd",
        libc::SYS_userfaultfd,
        &[flags as u64],
    )?;
    let taken = pidfd_getfd(pid, remote_fd as i32);
    let closed = syscall(main, ip, "close", libc::SYS_close, &[remote_fd]);
    let fd = taken?;
    closed?;
    Ok(fd)
}

/// A copy of fd `fd` of process `pid` (`pidfd_open` + `pidfd_getfd`).
pub(crate) fn pidfd_getfd(pid: i32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(Error::io(
            format!("pidfd_open {pid}"),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: the kernel just returned this fd; nobody else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&pidfd);
    // SAFETY: pidfd_getfd takes three integers and returns a new fd or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, raw, fd, 0) };
    if got < 0 {
        return Err(Error::io(
            format!("pidfd_getfd of fd {fd} of {pid}"),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: as above, a fresh fd (O_CLOEXEC is set by pidfd_getfd).
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}
