//! eventfds, both directions. Checkpoint reads the counter from fdinfo
//! (`eventfd-count:`, in hex) and the semaphore mode from
//! `eventfd-semaphore:` (kernel 6.5+); on an older kernel the mode is found
//! by a read through a copy of the fd, after which the counter is put back.
//! Restore makes a new eventfd in the agent with the same mode and
//! non-blocking flag and adds the counter with one write (`eventfd(2)`'s
//! initial value is only 32 bits wide).

use super::{fdinfo_field, fdinfo_text, sys};
use crate::{Error, Result};
use ferry_protocol::model::{FileKind, OpenFile};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// What fdinfo says of an eventfd: counter, and the semaphore mode if this
/// kernel shows it.
fn parse(text: &str) -> std::result::Result<(u64, Option<bool>), String> {
    let count = fdinfo_field(text, "eventfd-count:")
        .ok_or_else(|| format!("no eventfd-count: line in {text:?}"))?;
    let count =
        u64::from_str_radix(count, 16).map_err(|e| format!("eventfd-count {count:?}: {e}"))?;
    let semaphore = match fdinfo_field(text, "eventfd-semaphore:") {
        None => None,
        Some("0") => Some(false),
        Some("1") => Some(true),
        Some(other) => return Err(format!("eventfd-semaphore {other:?}")),
    };
    Ok((count, semaphore))
}

/// Capture eventfd `fd` of the frozen process `pid`.
pub fn capture(pid: i32, fd: i32) -> Result<FileKind> {
    let (path, text) = fdinfo_text(pid, fd)?;
    let (count, semaphore) = parse(&text).map_err(|d| Error::parse(path, d))?;
    let semaphore = match semaphore {
        Some(s) => s,
        None => {
            let what = |op: &str| format!("fd {fd} of process {pid} (an eventfd): {op}");
            let pidfd = sys::pidfd_open(pid).map_err(|e| Error::io(what("pidfd_open"), e))?;
            let copy = sys::pidfd_getfd(pidfd.as_fd(), fd)
                .map_err(|e| Error::io(what("pidfd_getfd"), e))?;
            detect_semaphore(copy.as_fd(), count)
                .map_err(|e| Error::io(what("finding its semaphore mode"), e))?
        }
    };
    Ok(FileKind::EventFd { count, semaphore })
}

/// Whether the eventfd `fd`, whose counter is `count`, is in semaphore
/// mode, for kernels whose fdinfo does not say: raise the counter to at
/// least 2, read once (a semaphore gives 1, otherwise the whole counter),
/// then bring the counter back to `count`. Reads and writes never block
/// (the counter is at least 2 when read, at most 2 when written to).
/// Everyone who could read it must be frozen.
pub(crate) fn detect_semaphore(fd: BorrowedFd<'_>, count: u64) -> io::Result<bool> {
    let added = 2u64.saturating_sub(count);
    if added > 0 {
        sys::write_u64(fd, added)?;
    }
    let got = sys::read_u64(fd)?;
    let raised = count + added;
    let left = raised
        .checked_sub(got)
        .ok_or_else(|| io::Error::other(format!("read {got} from an eventfd counting {raised}")))?;
    if left < count {
        sys::write_u64(fd, count - left)?;
    }
    for _ in count..left {
        // Only a semaphore leaves more than `count`, by at most 1.
        sys::read_u64(fd)?;
    }
    Ok(got == 1)
}

/// A new eventfd for `f`, counting `count`.
pub fn open(f: &OpenFile, count: u64, semaphore: bool, d: &str) -> Result<OwnedFd> {
    let mut flags = libc::EFD_CLOEXEC;
    if semaphore {
        flags |= libc::EFD_SEMAPHORE;
    }
    if f.flags & libc::O_NONBLOCK as u32 != 0 {
        flags |= libc::EFD_NONBLOCK;
    }
    let what = |op: &str| format!("restoring {d}: {op}");
    let fd = sys::eventfd(0, flags).map_err(|e| Error::io(what("eventfd"), e))?;
    if count > 0 {
        sys::write_u64(fd.as_fd(), count)
            .map_err(|e| Error::io(what(&format!("setting its counter to {count}")), e))?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo() {
        let t = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\n\
                 eventfd-count:              12c\neventfd-id: 1\neventfd-semaphore: 1\n";
        assert_eq!(parse(t), Ok((300, Some(true))));
        let old = "pos:\t0\nflags:\t02\neventfd-count: ffffffffffffffff\n";
        assert_eq!(parse(old), Ok((u64::MAX, None)));
        assert!(parse("pos:\t0\nflags:\t02\n").is_err());
        assert!(parse("eventfd-count: xyz\n").is_err());
        assert!(parse("eventfd-count: 1\neventfd-semaphore: 2\n").is_err());
    }

    /// The counter as fdinfo shows it.
    fn counter(fd: &OwnedFd) -> u64 {
        use std::os::fd::AsRawFd;
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
            .expect("fdinfo");
        parse(&text).expect("parse").0
    }

    #[test]
    fn detects_the_semaphore_mode_and_keeps_the_counter() {
        for semaphore in [false, true] {
            for count in [0u64, 1, 2, 5, 1 << 40] {
                let flags = libc::EFD_CLOEXEC | if semaphore { libc::EFD_SEMAPHORE } else { 0 };
                let fd = sys::eventfd(0, flags).expect("eventfd");
                if count > 0 {
                    sys::write_u64(fd.as_fd(), count).expect("write");
                }
                let found = detect_semaphore(fd.as_fd(), count).expect("detect");
                assert_eq!(found, semaphore, "count {count}");
                assert_eq!(counter(&fd), count, "semaphore {semaphore}");
            }
        }
    }
}
