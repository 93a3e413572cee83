//! Epoll instances, both directions.
//!
//! ```text
//!  checkpoint  classify: [eventpoll] ──► FileKind::Epoll (targets later)
//!              resolve (in FileCollector::finish, every fd of the tree seen):
//!                 per `tfd:` line of its fdinfo (fd number, events, data,
//!                 target inode), the file registered is the one of the
//!                 tree's fds that kcmp(KCMP_EPOLL_TFD) says is it: the fd
//!                 it was registered under may have been closed or dup'd
//!  restore     open: epoll_create1 in the agent, status flags
//!              register_all, in the root's stub before its fds come:
//!                 per epoll instance, inner ones first, per registration:
//!                 the target file pulled in at the recorded fd number,
//!                 epoll_ctl(EPOLL_CTL_ADD, number, {events, data}), closed
//! ```
//!
//! An epoll registration is keyed by (open file, fd number): `EPOLL_CTL_MOD`
//! and `DEL` find it by the file the caller's fd number refers to and by
//! that number, whoever made it. So it can be made by any process that
//! holds the file at that number for the time of the `EPOLL_CTL_ADD`: the
//! root's stub, whose fd table is still empty, does them all, and the
//! tree's processes later get the epoll instance and the targets at their
//! own numbers. The epoll instance holds no reference to its targets: a
//! target is open because some fd of the tree (or, refused, outside it)
//! holds it.
//!
//! Events pending at the freeze come back by themselves: `EPOLL_CTL_ADD`
//! polls the file and queues it if it is ready, level- or edge-triggered
//! (an edge-triggered target that was ready, reported and not drained is
//! reported once more). A one-shot registration that fired keeps only its
//! flag bits in the kernel's mask and is restored disabled, but with the
//! `EPOLLERR|EPOLLHUP` that the kernel adds to every `EPOLL_CTL_ADD` (and
//! `MOD`): it reports an error or hang-up of its file once, where the
//! original would have stayed silent until re-armed.

use super::{remote, sys, Opened, Seen};
use crate::{Error, Result};
use ferry_parasite::remote::Injector;
use ferry_protocol::model::{EpollTarget, FileId, FileKind, OpenFile, TreeImage};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// Status flags of an epoll instance that can be set with `F_SETFL`.
const EPOLL_SETFL: i32 = libc::O_NONBLOCK;

/// One `tfd:` line of an epoll instance's fdinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Registration {
    /// The fd number it was registered under.
    pub tfd: i32,
    pub events: u32,
    pub data: u64,
    /// Inode of the file registered.
    pub ino: u64,
    /// How many lines before this one have the same `tfd` (the `toff` of
    /// `KCMP_EPOLL_TFD`).
    pub toff: u32,
}

/// The registrations listed in the fdinfo text of an epoll instance, e.g.
/// `tfd:        4 events: 4000001c data:                7  pos:0 ino:1afd sdev:f`.
pub(crate) fn parse(text: &str) -> std::result::Result<Vec<Registration>, String> {
    let mut out: Vec<Registration> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("tfd:")) {
        let mut fields: HashMap<&str, &str> = HashMap::new();
        let mut it = line.split_whitespace();
        while let Some(tok) = it.next() {
            match tok.split_once(':') {
                Some((k, "")) => {
                    let v = it
                        .next()
                        .ok_or_else(|| format!("no value of {k} in {line:?}"))?;
                    fields.insert(k, v);
                }
                Some((k, v)) => {
                    fields.insert(k, v);
                }
                None => return Err(format!("unexpected {tok:?} in {line:?}")),
            }
        }
        let get = |k: &str| {
            fields
                .get(k)
                .copied()
                .ok_or_else(|| format!("no {k}: in {line:?}"))
        };
        let hex = |k: &str| {
            get(k).and_then(|v| {
                u64::from_str_radix(v, 16).map_err(|e| format!("{k} {v:?} in {line:?}: {e}"))
            })
        };
        let tfd = get("tfd")?
            .parse::<i32>()
            .map_err(|e| format!("tfd in {line:?}: {e}"))?;
        let events = u32::try_from(hex("events")?).map_err(|e| format!("events: {e}"))?;
        let toff = out.iter().filter(|r| r.tfd == tfd).count() as u32;
        out.push(Registration {
            tfd,
            events,
            data: hex("data")?,
            ino: hex("ino")?,
            toff,
        });
    }
    Ok(out)
}

/// Fill in the registrations of every epoll instance of `files`: `users`
/// gives the fds that hold each file, `seen` one fd of every file of the
/// tree. The tree must still be frozen.
pub(super) fn resolve(
    files: &mut [OpenFile],
    users: &HashMap<FileId, Vec<(i32, i32)>>,
    seen: &[Seen],
) -> Result<()> {
    let kinds: HashMap<FileId, FileKind> = files.iter().map(|f| (f.id, f.kind.clone())).collect();
    for f in files.iter_mut() {
        if !matches!(f.kind, FileKind::Epoll { .. }) {
            continue;
        }
        let Some(&(pid, fd)) = users.get(&f.id).and_then(|u| u.first()) else {
            continue;
        };
        let path = format!("/proc/{pid}/fdinfo/{fd}");
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
        let regs = parse(&text).map_err(|detail| Error::parse(path, detail))?;
        let mut targets = Vec::with_capacity(regs.len());
        for r in regs {
            let refuse = |why: String| Error::UnsupportedFd {
                pid,
                fd,
                kind: format!("an epoll instance watching fd {} {why}", r.tfd),
            };
            let file = find_target(pid, fd, &r, seen)?.ok_or_else(|| {
                refuse(format!(
                    "(inode {}), an open file that no process of the tree holds",
                    r.ino
                ))
            })?;
            if let Some(FileKind::Outside { what }) = kinds.get(&file) {
                return Err(refuse(format!(
                    "({what}), which reaches outside the process tree"
                )));
            }
            targets.push(EpollTarget {
                fd: r.tfd,
                file,
                events: r.events,
                data: r.data,
            });
        }
        f.kind = FileKind::Epoll { targets };
    }
    Ok(())
}

/// The file of the tree that `r` of the epoll instance at fd `efd` of
/// `pid` registers: fds with its inode first, then every other one.
fn find_target(pid: i32, efd: i32, r: &Registration, seen: &[Seen]) -> Result<Option<FileId>> {
    let likely = seen.iter().filter(|s| s.ino == r.ino);
    let others = seen.iter().filter(|s| s.ino != r.ino);
    for s in likely.chain(others) {
        match sys::same_epoll_target(s.pid, s.fd, pid, efd, r.tfd, r.toff) {
            Ok(true) => return Ok(Some(s.file)),
            Ok(false) => {}
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "kcmp(KCMP_EPOLL_TFD) of fd {} of {} with fd {} registered in fd {efd} of {pid}",
                        s.fd, s.pid, r.tfd
                    ),
                    e,
                ))
            }
        }
    }
    Ok(None)
}

/// A new, empty epoll instance in the agent with the status flags of `f`
/// (`d` names it in errors).
pub(crate) fn open(f: &OpenFile, d: &str) -> Result<OwnedFd> {
    let io_err = |op: &str, err: io::Error| Error::io(format!("restoring {d}: {op}"), err);
    let ep = sys::epoll_create1(libc::EPOLL_CLOEXEC).map_err(|e| io_err("epoll_create1", e))?;
    let status = f.flags as i32 & EPOLL_SETFL;
    if status != 0 {
        let cur = sys::fcntl(ep.as_fd(), libc::F_GETFL, 0).map_err(|e| io_err("F_GETFL", e))?;
        sys::fcntl(ep.as_fd(), libc::F_SETFL, cur | status)
            .map_err(|e| io_err(&format!("F_SETFL {status:#o}"), e))?;
    }
    Ok(ep)
}

/// Make every registration of every epoll instance of `tree` (opened by
/// the agent in `opened`), inner epoll instances first, by injected
/// `epoll_ctl` calls in the process driven by `inj`: the root's stub,
/// which must hold no fds yet (each target comes in at the number it was
/// registered under and goes again; the agent's pidfd and the epoll
/// instance sit above every such number meanwhile).
pub fn register_all(inj: &mut Injector<'_>, tree: &TreeImage, opened: &Opened) -> Result<()> {
    let order = ferry_protocol::validate::epoll_order(&tree.files)
        .map_err(|e| Error::parse("image", e.to_string()))?;
    let epolls: Vec<(FileId, &[EpollTarget])> = order
        .iter()
        .filter_map(|&id| match tree.file(id).map(|f| &f.kind) {
            Some(FileKind::Epoll { targets }) if !targets.is_empty() => {
                Some((id, targets.as_slice()))
            }
            _ => None,
        })
        .collect();
    let Some(max_fd) = epolls
        .iter()
        .flat_map(|(_, t)| t.iter().map(|t| t.fd))
        .max()
    else {
        return Ok(());
    };
    let above = max_fd as u64 + 1;
    let agent = std::process::id() as u64;
    let raw = inj
        .call("pidfd_open(agent)", libc::SYS_pidfd_open, &[agent, 0])
        .map_err(|e| remote("registering epoll targets: a pidfd of the agent", e))?;
    let pidfd = move_above(inj, raw, above)
        .map_err(|e| remote("registering epoll targets: moving the agent's pidfd", e))?;
    let mut result = Ok(());
    for (id, targets) in epolls {
        result = register(inj, pidfd, above, id, targets, opened);
        if result.is_err() {
            break;
        }
    }
    let closed = inj.call("close(pidfd)", libc::SYS_close, &[pidfd]);
    result?;
    closed.map_err(|e| remote("closing the agent's pidfd in the target", e))?;
    Ok(())
}

/// The registrations `targets` of epoll instance `id`.
fn register(
    inj: &mut Injector<'_>,
    pidfd: u64,
    above: u64,
    id: FileId,
    targets: &[EpollTarget],
    opened: &Opened,
) -> Result<()> {
    let d = format!("restoring the epoll instance (open file {id})");
    let ep = inj
        .call(
            "pidfd_getfd",
            libc::SYS_pidfd_getfd,
            &[pidfd, opened.local(id)? as u64, 0],
        )
        .and_then(|raw| move_above(inj, raw, above))
        .map_err(|e| remote(&format!("{d}: taking it into the root's stub"), e))?;
    let mut result = Ok(());
    for t in targets {
        result = add(inj, pidfd, ep, t, opened).map_err(|e| match e {
            Error::Io { what, source } => Error::io(format!("{d}: {what}"), source),
            other => other,
        });
        if result.is_err() {
            break;
        }
    }
    let closed = inj.call("close(epoll)", libc::SYS_close, &[ep]);
    result?;
    closed.map_err(|e| remote(&format!("{d}: closing it in the root's stub"), e))?;
    Ok(())
}

/// One registration: the target at its number, `EPOLL_CTL_ADD`, closed.
fn add(
    inj: &mut Injector<'_>,
    pidfd: u64,
    ep: u64,
    t: &EpollTarget,
    opened: &Opened,
) -> Result<()> {
    let what = |op: &str| {
        format!(
            "fd {} (open file {}, events {:#x}): {op}",
            t.fd, t.file, t.events
        )
    };
    let local = opened.local(t.file)?;
    let wanted = t.fd as u64;
    let tmp = inj
        .call(
            "pidfd_getfd",
            libc::SYS_pidfd_getfd,
            &[pidfd, local as u64, 0],
        )
        .map_err(|e| remote(&what("taking the target in"), e))?;
    if tmp != wanted {
        let duped = inj.call(
            "dup3",
            libc::SYS_dup3,
            &[tmp, wanted, libc::O_CLOEXEC as u64],
        );
        let closed = inj.call("close", libc::SYS_close, &[tmp]);
        duped.map_err(|e| remote(&what("dup3 to its number"), e))?;
        closed.map_err(|e| remote(&what("closing the temporary fd"), e))?;
    }
    // struct epoll_event is packed on x86-64: u32 events, u64 data.
    let mut ev = [0u8; 12];
    ev[..4].copy_from_slice(&t.events.to_le_bytes());
    ev[4..].copy_from_slice(&t.data.to_le_bytes());
    let added = inj.put(0, &ev).and_then(|p| {
        inj.call(
            "epoll_ctl(EPOLL_CTL_ADD)",
            libc::SYS_epoll_ctl,
            &[ep, libc::EPOLL_CTL_ADD as u64, wanted, p],
        )
    });
    let closed = inj.call("close", libc::SYS_close, &[wanted]);
    added.map_err(|e| remote(&what("registering it"), e))?;
    closed.map_err(|e| remote(&what("closing it again"), e))?;
    Ok(())
}

/// `raw` if it is at least `min`, else a close-on-exec copy at `min` or
/// above (and `raw` closed).
fn move_above(inj: &mut Injector<'_>, raw: u64, min: u64) -> ferry_parasite::Result<u64> {
    if raw >= min {
        return Ok(raw);
    }
    let moved = inj.call(
        "fcntl(F_DUPFD_CLOEXEC)",
        libc::SYS_fcntl,
        &[raw, libc::F_DUPFD_CLOEXEC as u64, min],
    );
    let closed = inj.call("close", libc::SYS_close, &[raw]);
    let moved = moved?;
    closed?;
    Ok(moved)
}

#[cfg(test)]
mod tests;
