//! Stdio that reaches outside the tree: fds 0–2 on a pipe or socket of a
//! shell, a supervisor or journald, or on a terminal. Such a process is not
//! refused: its stdio cannot come along (the other end stays behind), so on
//! restore
//!
//! - an fd open for reading only (stdin) reads from `/dev/null`: end of file;
//! - an fd open for writing (stdout, stderr) appends to a log file that the
//!   restoring side names ([`StdioPolicy::log`]) and reports, created with
//!   mode 0600 if missing.
//!
//! Each such open file description stays one description: a stdout and a
//! stderr that shared one still share the log file's.

use super::sys;
use crate::{Error, Result};
use ferry_protocol::model::OpenFile;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Where stdio that reached outside the tree goes on restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioPolicy {
    /// The log file for output.
    pub log: PathBuf,
}

impl StdioPolicy {
    /// Output of the tree rooted at `pid` goes to `DIR/ferry-PID.log`.
    pub fn in_dir(dir: &Path, pid: i32) -> Self {
        StdioPolicy {
            log: dir.join(format!("ferry-{pid}.log")),
        }
    }
}

/// True if the process reads from this description only (it gets EOF).
pub fn reads_only(f: &OpenFile) -> bool {
    f.flags as i32 & libc::O_ACCMODE == libc::O_RDONLY
}

/// Open what takes the place of the outside description `f`.
pub fn open(f: &OpenFile, policy: &StdioPolicy, d: &str) -> Result<OwnedFd> {
    let keep = f.flags as i32 & libc::O_NONBLOCK;
    if reads_only(f) {
        let p = CString::new("/dev/null").map_err(|_| Error::parse("path", "NUL"))?;
        return sys::open(&p, libc::O_RDONLY | libc::O_CLOEXEC | keep)
            .map_err(|e| Error::io(format!("restoring {d}: opening /dev/null"), e));
    }
    if let Some(parent) = policy.log.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("restoring {d}: creating {}", parent.display()), e))?;
    }
    let p = CString::new(policy.log.to_string_lossy().as_bytes())
        .map_err(|_| Error::parse("path", "NUL in the stdio log path"))?;
    let acc = f.flags as i32 & libc::O_ACCMODE;
    sys::open_mode(
        &p,
        acc | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOCTTY | keep,
        0o600,
    )
    .map_err(|e| {
        Error::io(
            format!(
                "restoring {d}: opening the stdio log {}",
                policy.log.display()
            ),
            e,
        )
    })
}
