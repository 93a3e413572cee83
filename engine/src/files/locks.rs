//! File locks, both directions: `flock(2)` and OFD (`F_OFD_SETLK`) locks,
//! owned by an open file description, and POSIX record locks
//! (`F_SETLK`), owned by a process.
//!
//! Checkpoint: `/proc/locks` says which inodes are locked at all; for an
//! fd of such an inode, the `lock:` lines of its fdinfo list exactly the
//! locks taken through its description by their owner (the description
//! for flock and OFD locks, this process's fd table for POSIX ones).
//! Leases and delegations are refused.
//!
//! Restore: a flock or OFD lock is taken by the agent on its fd of the
//! description before the targets pull it (the lock goes with the
//! description); a POSIX lock must be taken by its owner, so it is an
//! injected `fcntl(F_SETLK)` in the target once its fds are installed.
//! Every lock is taken without waiting: a lock that someone else holds now
//! fails the restore with [`Error::Incompatible`] naming the file (on one
//! host, checkpoint, kill, restore: the original holder is dead and the
//! lock free).

use super::{remote, Opened};
use crate::{Error, Result};
use ferry_parasite::remote::Injector;
use ferry_protocol::model::{FdEntry, FileId, FileLock, LockOwner};
use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `F_OFD_GETLK`, `F_OFD_SETLK` (linux/fcntl.h): not in the libc crate.
#[cfg(test)]
pub(crate) const F_OFD_GETLK: libc::c_int = 36;
pub(crate) const F_OFD_SETLK: libc::c_int = 37;

/// Locks of the tree being checkpointed.
#[derive(Default)]
pub struct LockCollector {
    /// (dev, ino) of every locked inode of the host, read once.
    locked: Option<HashSet<(u64, u64)>>,
    locks: Vec<FileLock>,
}

impl LockCollector {
    /// Record the locks held through fd `fd` of `pid` (description `file`,
    /// inode `dev`/`ino`).
    pub fn fd(&mut self, pid: i32, fd: i32, file: FileId, dev: u64, ino: u64) -> Result<()> {
        if self.locked.is_none() {
            let text = std::fs::read_to_string("/proc/locks")
                .map_err(|e| Error::io("reading /proc/locks", e))?;
            self.locked = Some(parse_proc_locks(&text));
        }
        if !self
            .locked
            .as_ref()
            .is_some_and(|s| s.contains(&(dev, ino)))
        {
            return Ok(());
        }
        let path = format!("/proc/{pid}/fdinfo/{fd}");
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
        for line in text.lines() {
            let Some(l) = line.strip_prefix("lock:") else {
                continue;
            };
            let lock = match parse_lock(l.trim()) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(Parsed::Unsupported(what)) => {
                    return Err(Error::UnsupportedFd {
                        pid,
                        fd,
                        kind: format!("a file with {what} ({})", l.trim()),
                    })
                }
                Err(Parsed::Bad(why)) => return Err(Error::parse(&path, why)),
            };
            let owner = match lock.kind {
                Kind::Flock => LockOwner::Flock,
                Kind::Ofd => LockOwner::Ofd,
                Kind::Posix => LockOwner::Posix { pid },
            };
            let l = FileLock {
                file,
                owner,
                write: lock.write,
                start: lock.start,
                len: lock.len,
            };
            if !self.locks.contains(&l) {
                self.locks.push(l);
            }
        }
        Ok(())
    }

    /// The locks found.
    pub fn take(&mut self) -> Vec<FileLock> {
        std::mem::take(&mut self.locks)
    }
}

/// The kinds of lock we restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Flock,
    Ofd,
    Posix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Line {
    kind: Kind,
    write: bool,
    start: u64,
    len: u64,
}

#[derive(Debug)]
enum Parsed {
    /// A kind we do not restore (a lease, a delegation, a mandatory lock).
    Unsupported(String),
    Bad(String),
}

/// `(dev, ino)` of each lock of `/proc/locks`
/// (`1: POSIX  ADVISORY  WRITE 4961 fe:00:10011157 0 EOF`).
fn parse_proc_locks(text: &str) -> HashSet<(u64, u64)> {
    let mut out = HashSet::new();
    for line in text.lines() {
        // Waiters ("1: -> POSIX ...") name the same inodes.
        if let Some(id) = line.split_whitespace().nth(5).and_then(parse_dev_ino) {
            out.insert(id);
        }
    }
    out
}

/// `MAJ:MIN:INO` (major and minor in hex) as `(dev, ino)`.
fn parse_dev_ino(s: &str) -> Option<(u64, u64)> {
    let mut it = s.split(':');
    let maj = u32::from_str_radix(it.next()?, 16).ok()?;
    let min = u32::from_str_radix(it.next()?, 16).ok()?;
    let ino = it.next()?.parse::<u64>().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((libc::makedev(maj, min), ino))
}

/// One `lock:` line of fdinfo, without the prefix
/// (`1: FLOCK  ADVISORY  WRITE 4961 fe:00:10011157 0 EOF`); `None` for a
/// waiter line.
fn parse_lock(s: &str) -> std::result::Result<Option<Line>, Parsed> {
    let f: Vec<&str> = s.split_whitespace().collect();
    if f.get(1) == Some(&"->") {
        return Ok(None);
    }
    if f.len() != 8 {
        return Err(Parsed::Bad(format!("lock line {s:?}")));
    }
    let kind = match f[1] {
        "FLOCK" => Kind::Flock,
        "OFDLCK" => Kind::Ofd,
        "POSIX" => Kind::Posix,
        "LEASE" | "BREAKING" | "DELEG" => return Err(Parsed::Unsupported("a file lease".into())),
        other => return Err(Parsed::Unsupported(format!("a {other} lock"))),
    };
    if f[2] != "ADVISORY" {
        return Err(Parsed::Unsupported(format!(
            "a {} lock",
            f[2].to_lowercase()
        )));
    }
    let write = match f[3] {
        "WRITE" => true,
        "READ" => false,
        other => return Err(Parsed::Bad(format!("lock type {other:?} in {s:?}"))),
    };
    let num = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| Parsed::Bad(format!("lock range {v:?} in {s:?}")))
    };
    let start = num(f[6])?;
    let len = match f[7] {
        "EOF" => 0,
        end => {
            let end = num(end)?;
            if end < start {
                return Err(Parsed::Bad(format!("lock range in {s:?}")));
            }
            end - start + 1
        }
    };
    let (start, len) = if kind == Kind::Flock {
        (0, 0)
    } else {
        (start, len)
    };
    Ok(Some(Line {
        kind,
        write,
        start,
        len,
    }))
}

/// What a lock is, for messages.
pub(crate) fn describe(l: &FileLock) -> String {
    let rw = if l.write { "write" } else { "read" };
    let range = if l.len == 0 {
        format!("bytes {}..end of file", l.start)
    } else {
        format!("bytes {}..{}", l.start, l.start + l.len)
    };
    match l.owner {
        LockOwner::Flock => format!("flock {rw} lock"),
        LockOwner::Ofd => format!("OFD {rw} lock on {range}"),
        LockOwner::Posix { pid } => format!("POSIX {rw} lock of process {pid} on {range}"),
    }
}

/// The error for a lock that cannot be taken again.
fn refused(l: &FileLock, d: &str, err: io::Error) -> Error {
    let held = matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES));
    if held {
        Error::Incompatible(format!(
            "{d}: its {} is held by another process here",
            describe(l)
        ))
    } else {
        Error::io(format!("restoring {d}: taking its {}", describe(l)), err)
    }
}

/// A `struct flock` for `l`, as the kernel reads it on x86-64.
fn flock_struct(l: &FileLock) -> libc::flock {
    let ty = if l.write {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    };
    libc::flock {
        l_type: ty as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: l.start as libc::off_t,
        l_len: l.len as libc::off_t,
        l_pid: 0,
    }
}

/// Take description-owned lock `l` (flock or OFD) on the agent's fd `fd`
/// of its description. `d` names the file in errors.
pub fn take_on_description(fd: BorrowedFd<'_>, l: &FileLock, d: &str) -> Result<()> {
    let r = match l.owner {
        LockOwner::Flock => {
            let op = if l.write {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            };
            // SAFETY: integer arguments only.
            unsafe { libc::flock(fd.as_raw_fd(), op | libc::LOCK_NB) }
        }
        LockOwner::Ofd => {
            let fl = flock_struct(l);
            // SAFETY: F_OFD_SETLK reads one `struct flock`, a valid local.
            unsafe { libc::fcntl(fd.as_raw_fd(), F_OFD_SETLK, &fl) }
        }
        LockOwner::Posix { .. } => return Ok(()),
    };
    if r < 0 {
        return Err(refused(l, d, io::Error::last_os_error()));
    }
    Ok(())
}

/// Take the POSIX locks of process `pid` (whose fds `fds` are installed)
/// in the target driven by `inj`.
pub fn take_posix(
    inj: &mut Injector<'_>,
    pid: i32,
    fds: &[FdEntry],
    opened: &Opened,
) -> Result<()> {
    for l in &opened.locks {
        if l.owner != (LockOwner::Posix { pid }) {
            continue;
        }
        let fd = fds.iter().find(|e| e.file == l.file).ok_or_else(|| {
            Error::parse(
                "image",
                format!(
                    "process {pid} has a lock on open file {} but no fd of it",
                    l.file
                ),
            )
        })?;
        let d = format!("fd {} of process {pid} (open file {})", fd.fd, l.file);
        let fl = flock_struct(l);
        // SAFETY: `libc::flock` is plain old data; we copy its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&fl as *const libc::flock).cast::<u8>(),
                std::mem::size_of::<libc::flock>(),
            )
        };
        let addr = inj
            .put(0, bytes)
            .map_err(|e| remote(&format!("restoring {d}: writing its lock"), e))?;
        match inj.call_raw(libc::SYS_fcntl, &[fd.fd as u64, libc::F_SETLK as u64, addr]) {
            Ok((r, _)) if r < 0 => {
                return Err(refused(l, &d, io::Error::from_raw_os_error(-r as i32)));
            }
            Ok(_) => {}
            Err(e) => return Err(remote(&format!("restoring {d}: fcntl(F_SETLK)"), e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_lines() {
        let l = parse_lock("1: FLOCK  ADVISORY  WRITE 4961 fe:00:10011157 0 EOF");
        assert_eq!(
            l.expect("ok"),
            Some(Line {
                kind: Kind::Flock,
                write: true,
                start: 0,
                len: 0
            })
        );
        let l = parse_lock("1: POSIX  ADVISORY  READ 4961 fe:00:10011157 5 14");
        assert_eq!(
            l.expect("ok"),
            Some(Line {
                kind: Kind::Posix,
                write: false,
                start: 5,
                len: 10
            })
        );
        let l = parse_lock("1: OFDLCK ADVISORY  WRITE -1 fe:00:10011157 100 EOF");
        assert_eq!(
            l.expect("ok").map(|l| (l.kind, l.len)),
            Some((Kind::Ofd, 0))
        );
        assert!(matches!(
            parse_lock("1: LEASE  ACTIVE    READ 12 fe:00:1 0 EOF"),
            Err(Parsed::Unsupported(w)) if w.contains("lease")
        ));
        assert!(matches!(
            parse_lock("1: POSIX  ADVISORY  WRITE 1 fe:00:1 9 3"),
            Err(Parsed::Bad(_))
        ));
        assert!(matches!(parse_lock("garbage"), Err(Parsed::Bad(_))));
        let set = parse_proc_locks(
            "1: OFDLCK ADVISORY  WRITE -1 fe:00:10011157 100 EOF\n1: -> POSIX ADVISORY WRITE 5 08:01:7 0 EOF\n",
        );
        assert!(set.contains(&(libc::makedev(0xfe, 0), 10011157)));
    }
}
