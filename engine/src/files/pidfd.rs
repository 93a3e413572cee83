//! Pidfds, both directions.
//!
//! ```text
//!  checkpoint  classify: [pidfd] ──► FileKind::Pidfd { pid } from the
//!                 fdinfo's `Pid:` line; a reaped process (-1), one of
//!                 another pid namespace (0) or a thread that is not a
//!                 leader (PIDFD_THREAD) is refused
//!              check (in FileCollector::finish): the process must be one
//!                 of the tree, live or a zombie of one of its processes
//!  restore     open: pidfd_open(pid, PIDFD_NONBLOCK|PIDFD_THREAD as they
//!                 were) in the agent, once every process of the tree
//!                 exists with its PID (the stubs are forked before files
//!                 are opened), so it refers to the restored process
//! ```

use super::sys;
use crate::{Error, Result};
use ferry_protocol::model::{FileId, FileKind, OpenFile};
use std::collections::HashMap;
use std::os::fd::OwnedFd;

/// `PIDFD_THREAD` (`O_EXCL`, kernel 6.9+): a pidfd of one thread.
const PIDFD_THREAD: u32 = libc::O_EXCL as u32;
/// The flags of `pidfd_open` that show in the status flags.
const PIDFD_FLAGS: u32 = libc::O_NONBLOCK as u32 | PIDFD_THREAD;

/// What fd `fd` of `pid`, a pidfd with status flags `flags`, refers to.
pub(crate) fn classify(pid: i32, fd: i32, flags: u32) -> Result<FileKind> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    let target = parse(&text).map_err(|detail| Error::parse(path, detail))?;
    let refuse = |kind: String| Error::UnsupportedFd { pid, fd, kind };
    match target {
        -1 => {
            return Err(refuse(
                "a pidfd of a process that has exited and was reaped".into(),
            ))
        }
        0 => {
            return Err(refuse(
                "a pidfd of a process outside this pid namespace".into(),
            ))
        }
        _ => {}
    }
    if flags & PIDFD_THREAD != 0 && tgid(target) != Some(target) {
        return Err(refuse(format!(
            "a pidfd of thread {target} (PIDFD_THREAD), not of a process"
        )));
    }
    Ok(FileKind::Pidfd { pid: target })
}

/// The `Pid:` of a pidfd's fdinfo text.
pub(crate) fn parse(text: &str) -> std::result::Result<i32, String> {
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .ok_or_else(|| format!("no Pid: line in {text:?}"))?;
    v.trim()
        .parse::<i32>()
        .map_err(|e| format!("Pid {v:?}: {e}"))
}

/// The thread group of task `tid`, if it exists.
fn tgid(tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// Every pidfd of `files` must refer to one of `tasks` (the tree's live
/// processes) or to a zombie child of one of them; `users` names the fds
/// of each file for the error.
pub(crate) fn check(
    files: &[OpenFile],
    users: &HashMap<FileId, Vec<(i32, i32)>>,
    tasks: &[i32],
) -> Result<()> {
    for f in files {
        let FileKind::Pidfd { pid: target } = f.kind else {
            continue;
        };
        if tasks.contains(&target) || zombie_of(target, tasks) {
            continue;
        }
        let (pid, fd) = users
            .get(&f.id)
            .and_then(|u| u.first())
            .copied()
            .unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{target}/comm"))
            .map(|c| format!(" ({})", c.trim()))
            .unwrap_or_default();
        return Err(Error::UnsupportedFd {
            pid,
            fd,
            kind: format!("a pidfd of process {target}{comm}, which is outside the process tree"),
        });
    }
    Ok(())
}

/// Is `pid` a zombie whose parent is one of `tasks`?
fn zombie_of(pid: i32, tasks: &[i32]) -> bool {
    crate::procfs::stat(pid).is_ok_and(|s| {
        s.state() == 'Z' && s.field(4).is_ok_and(|ppid| tasks.contains(&(ppid as i32)))
    })
}

/// A pidfd in the agent of process `pid` (which must exist: the tree's
/// processes do by the time files are opened) with the flags of `f`.
pub(crate) fn open(pid: i32, f: &OpenFile, d: &str) -> Result<OwnedFd> {
    let flags = f.flags & PIDFD_FLAGS;
    sys::pidfd_open_flags(pid, flags).map_err(|e| {
        if e.raw_os_error() == Some(libc::ESRCH) {
            Error::Incompatible(format!(
                "{d}: process {pid} does not exist here, so no pidfd of it can be made"
            ))
        } else {
            Error::io(format!("restoring {d}: pidfd_open({pid}, {flags:#o})"), e)
        }
    })
}
