//! The destination's userfaultfd of a restored process: created inside the
//! stub by an injected `userfaultfd(2)` (the uffd belongs to the mm of the
//! process that creates it), taken out with `pidfd_getfd`, closed in the
//! stub again; after the handshake every ioctl runs in the agent.
//!
//! It is created while the stub still has the agent's credentials: a
//! userfaultfd that also catches faults taken inside system calls (a
//! `read(2)` into a missing page) needs `CAP_SYS_PTRACE` at creation unless
//! `UFFD_USER_MODE_ONLY` is set, and a lazily restored process must have
//! those served too, not turned into `EFAULT`.

use crate::error::{Error, Result};
use crate::track::uffd_raw::{
    self, UFFDIO_REGISTER_MODE_MISSING, UFFD_FEATURE_EVENT_FORK, UFFD_FEATURE_EVENT_REMAP,
    UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EVENT_UNMAP,
};
use ferry_parasite::remote::Injector;
use ferry_protocol::model::PAGE_SIZE;
use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

/// The events a lazily restored process is followed through.
pub const FEATURES: u64 = UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP;

/// `Ok` when this kernel's userfaultfd can serve lazy pages, else why not.
pub fn kernel_support() -> std::result::Result<(), String> {
    match uffd_raw::available_features() {
        Ok(f) if f & FEATURES == FEATURES => Ok(()),
        Ok(f) => Err(format!(
            "this kernel's userfaultfd lacks {}",
            uffd_raw::feature_names(FEATURES & !f).join(" and ")
        )),
        Err(e) => Err(format!("userfaultfd is not usable here ({e})")),
    }
}

/// Create a userfaultfd for the mm of the process `inj` controls (`pid`)
/// and return the agent's copy; the process keeps no fd of it.
pub fn create_in(inj: &mut Injector, pid: i32) -> Result<OwnedFd> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let remote = inj.call("userfaultfd", libc::SYS_userfaultfd, &[flags])?;
    let taken = crate::track::uffd_wp::pidfd_getfd(pid, remote as i32);
    let closed = inj.call("close(userfaultfd)", libc::SYS_close, &[remote]);
    let fd = taken?;
    closed?;
    Ok(fd)
}

/// Handshake ([`FEATURES`]) and register `ranges` (`(start, end)`, page
/// aligned) for missing-page faults; returns the fd, ready to serve.
pub fn arm(pid: i32, fd: OwnedFd, ranges: &[(u64, u64)]) -> Result<userfaultfd::Uffd> {
    arm_with(pid, fd, ranges, FEATURES)
}

/// [`arm`] with these userfaultfd `features`.
fn arm_with(
    pid: i32,
    fd: OwnedFd,
    ranges: &[(u64, u64)],
    features: u64,
) -> Result<userfaultfd::Uffd> {
    let raw = uffd_raw::Uffd::from_owned(fd);
    let info = raw
        .api(features)
        .map_err(|e| Error::io(format!("UFFDIO_API on the userfaultfd of {pid}"), e))?;
    if info.features & features != features {
        return Err(Error::Unsupported {
            pid,
            what: "lazy pages: userfaultfd without fork/remap/remove/unmap events".into(),
        });
    }
    for &(start, end) in ranges {
        raw.register(start, end - start, UFFDIO_REGISTER_MODE_MISSING)
            .map_err(|e| {
                Error::io(
                    format!("registering {start:#x}-{end:#x} of {pid} for lazy pages"),
                    e,
                )
            })?;
    }
    let fd = raw.into_owned().into_raw_fd();
    // SAFETY: `fd` is a userfaultfd we own (just released from its OwnedFd);
    // the returned Uffd takes over closing it.
    Ok(unsafe { userfaultfd::Uffd::from_raw_fd(fd) })
}

/// Check that no page of `ranges` is populated in `pid` (they must all
/// fault, or a page would keep stale contents instead of the source's).
pub fn check_missing(pid: i32, ranges: &[(u64, u64)]) -> Result<()> {
    let path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&path).map_err(|e| Error::io(format!("open {path}"), e))?;
    let mut populated = Vec::new();
    for &span in ranges {
        crate::dump::memory::populated_anon_pages(&pagemap, span, &mut populated)?;
        if let Some(page) = populated.first() {
            return Err(Error::Incompatible(format!(
                "page {page:#x} of process {pid} was populated before lazy pages were armed"
            )));
        }
    }
    Ok(())
}

/// Serve one real missing-page fault in this process through the same
/// path a lazy restore uses ([`arm`], `UFFDIO_COPY`): a thread reads a
/// registered page, this thread answers with a pattern, the reader must see
/// it. `Ok` says what was verified.
pub fn probe() -> std::result::Result<String, String> {
    kernel_support()?;
    let map = crate::track::uffd_raw::AnonMapping::new(1).map_err(|e| format!("mmap: {e}"))?;
    let fd = uffd_raw::Uffd::new()
        .map_err(|e| format!("userfaultfd: {e}"))?
        .into_owned();
    let (start, end) = (map.addr(), map.addr() + map.len());
    // Without the fork event: with it, a fork by any other thread of this
    // process would wait until this probe reads the event (and a fork
    // holding a lock this thread needs would never end). The features
    // themselves were checked above.
    let features = FEATURES & !UFFD_FEATURE_EVENT_FORK;
    let uffd = arm_with(std::process::id() as i32, fd, &[(start, end)], features)
        .map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || {
        // SAFETY: the page belongs to `map`, alive until the join below;
        // this read faults and waits for the copy.
        unsafe { std::ptr::read_volatile(start as *const u64) }
    });
    let page = vec![0x5au8; PAGE_SIZE as usize];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let served = loop {
        match uffd.read_event() {
            Ok(Some(userfaultfd::Event::Pagefault { addr, .. })) if addr as u64 == start => {
                // SAFETY: `page` is a live PAGE_SIZE buffer; the copy writes
                // only the registered page of `map`.
                let r = unsafe {
                    uffd.copy(
                        page.as_ptr() as *const libc::c_void,
                        start as *mut libc::c_void,
                        PAGE_SIZE as usize,
                        true,
                    )
                };
                break r.map_err(|e| format!("UFFDIO_COPY: {e}"));
            }
            Ok(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            Ok(_) => break Err("no fault within 5 s".to_string()),
            Err(e) => break Err(format!("reading the userfaultfd: {e}")),
        }
    };
    if let Err(e) = served {
        // Release the reader: closing the uffd lets its fault complete.
        drop(uffd);
        let _ = reader.join();
        return Err(e);
    }
    let got = reader
        .join()
        .map_err(|_| "the reader panicked".to_string())?;
    drop(uffd);
    drop(map);
    if got == u64::from_ne_bytes([0x5a; 8]) {
        Ok("a missing-page fault of another thread was served with UFFDIO_COPY".into())
    } else {
        Err(format!("the reader saw {got:#x}"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_fault_is_served_through_the_lazy_path() {
        // Root (or CAP_SYS_PTRACE) is needed for the fork event; the CI runs as root.
        let r = super::probe();
        assert!(r.is_ok(), "{r:?}");
    }
}
