//! signalfds, both directions. A signalfd holds only its mask (fdinfo
//! `sigmask:`, in hex; the kernel never keeps SIGKILL or SIGSTOP in it):
//! the signals it reads are the pending signals of whichever thread reads
//! it and of that thread's process, which travel with the threads and the
//! process (`dump::misc`, `restore::misc`). Restore makes a signalfd with
//! the same mask in the agent (`signalfd4(-1, ...)`); since a signalfd
//! reads the signals of its reader, not of its creator, the target that
//! pulls it in reads its own signals.

use super::{fdinfo_field, fdinfo_text, sys};
use crate::{Error, Result};
use ferry_protocol::model::{FileKind, OpenFile};
use std::os::fd::OwnedFd;

/// `sigmask:` of a signalfd's fdinfo.
fn parse(text: &str) -> std::result::Result<u64, String> {
    let mask =
        fdinfo_field(text, "sigmask:").ok_or_else(|| format!("no sigmask: line in {text:?}"))?;
    u64::from_str_radix(mask, 16).map_err(|e| format!("sigmask {mask:?}: {e}"))
}

/// Capture signalfd `fd` of the frozen process `pid`.
pub fn capture(pid: i32, fd: i32) -> Result<FileKind> {
    let (path, text) = fdinfo_text(pid, fd)?;
    let mask = parse(&text).map_err(|d| Error::parse(path, d))?;
    Ok(FileKind::SignalFd { mask })
}

/// A new signalfd for `f`, reading the signals of `mask`.
pub fn open(f: &OpenFile, mask: u64, d: &str) -> Result<OwnedFd> {
    let mut flags = libc::SFD_CLOEXEC;
    if f.flags & libc::O_NONBLOCK as u32 != 0 {
        flags |= libc::SFD_NONBLOCK;
    }
    sys::signalfd(mask, flags)
        .map_err(|e| Error::io(format!("restoring {d}: signalfd(mask {mask:#x})"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo() {
        let t = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\nsigmask:\t0000000000000a00\n";
        assert_eq!(parse(t), Ok(0xa00));
        assert!(parse("pos:\t0\n").is_err());
        assert!(parse("sigmask:\tzz\n").is_err());
    }
}
