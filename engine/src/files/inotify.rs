//! inotify instances, both directions.
//!
//! Checkpoint: each `inotify wd:.. ino:.. sdev:.. mask:.. f_handle:..`
//! line of the instance's fdinfo is a watch; its path is found by opening
//! the file handle (`open_by_handle_at` on a mount of that device, from
//! `/proc/self/mountinfo`) and reading the link of that fd, then checked
//! with `stat` (same device and inode). A watch on an inode no path leads
//! to is refused. Events waiting at the freeze (`FIONREAD` on a
//! `pidfd_getfd` copy) are not carried: the image says they were there.
//!
//! Restore: a new instance in the agent; the watches are added in the
//! order of their descriptors, which the kernel hands out one after the
//! other (`idr_alloc_cyclic` from 1): a gap is skipped by adding and
//! removing the next watch until the wanted number comes. The `IN_IGNORED`
//! events those removals queue are read away before the targets take the
//! instance.
//!
//! Dropped events are never silent: if events were waiting at the freeze
//! (or arrived on the new instance during the restore and had to be read
//! away with the IN_IGNORED ones), the restored instance holds exactly one
//! `IN_Q_OVERFLOW` event, as if its queue had overflowed. It is made the
//! only way the kernel makes one: a temporary watch on an unnamed file of
//! ours takes alternating IN_MODIFY / IN_ACCESS events until the queue is
//! full and the kernel queues its overflow event; the temporary watch is
//! removed and its events are read away, which leaves the overflow event
//! alone at the head of the queue.

use super::sys;
use crate::{Error, Result};
use ferry_protocol::model::{FileKind, InotifyWatch, OpenFile};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// `IN_DONT_FOLLOW`: the recorded path is the watched inode itself.
const IN_DONT_FOLLOW: u32 = 0x0200_0000;
/// `IN_Q_OVERFLOW`.
pub const IN_Q_OVERFLOW: u32 = 0x4000;
/// Size of an event without a name (`struct inotify_event`).
const EVENT_LEN: usize = 16;
/// The largest queue we are ready to fill to report an overflow.
const MAX_QUEUE_TO_FILL: usize = 1 << 20;

/// One watch line of fdinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    wd: i32,
    ino: u64,
    /// The kernel's `s_dev` (major << 20 | minor).
    sdev: u64,
    mask: u32,
    /// A whole `struct file_handle`.
    handle: Vec<u8>,
}

/// What fd `fd` of `pid`, an inotify instance, watches.
pub fn classify(pid: i32, fd: i32) -> Result<FileKind> {
    let unsupported = |kind: String| Error::UnsupportedFd { pid, fd, kind };
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    let mut watches = Vec::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("inotify ") else {
            continue;
        };
        let line = parse_line(rest).map_err(|why| Error::parse(&path, why))?;
        let p = resolve(&line).map_err(|why| {
            unsupported(format!(
                "an inotify watch (wd {}) on inode {} that no path leads to ({why})",
                line.wd, line.ino
            ))
        })?;
        watches.push(InotifyWatch {
            wd: line.wd,
            path: p,
            mask: line.mask,
        });
    }
    watches.sort_by_key(|w| w.wd);
    let pidfd = sys::pidfd_open(pid).map_err(|e| Error::io(format!("pidfd_open of {pid}"), e))?;
    let copy = sys::pidfd_getfd(pidfd.as_fd(), fd)
        .map_err(|e| Error::io(format!("pidfd_getfd of fd {fd} of {pid}"), e))?;
    let queued = sys::fionread(copy.as_fd())
        .map_err(|e| Error::io(format!("FIONREAD on fd {fd} of {pid}"), e))?
        > 0;
    Ok(FileKind::Inotify { watches, queued })
}

/// `wd:1 ino:2a1 sdev:fe00000 mask:100 ignored_mask:0 fhandle-bytes:8
/// fhandle-type:1 f_handle:a1020000...` (all numbers in hex).
fn parse_line(s: &str) -> std::result::Result<Line, String> {
    let mut wd = None;
    let mut ino = None;
    let mut sdev = None;
    let mut mask = None;
    let mut bytes = None;
    let mut ty = None;
    let mut handle = None;
    for kv in s.split_whitespace() {
        let Some((k, v)) = kv.split_once(':') else {
            return Err(format!("inotify line {s:?}"));
        };
        let hex = || u64::from_str_radix(v, 16).map_err(|_| format!("{k} {v:?} in {s:?}"));
        match k {
            "wd" => wd = Some(hex()?),
            "ino" => ino = Some(hex()?),
            "sdev" => sdev = Some(hex()?),
            "mask" => mask = Some(hex()?),
            "fhandle-bytes" => bytes = Some(hex()?),
            "fhandle-type" => ty = Some(hex()?),
            "f_handle" => {
                if v.len() % 2 != 0 {
                    return Err(format!("f_handle {v:?}"));
                }
                let mut b = Vec::with_capacity(v.len() / 2);
                for i in (0..v.len()).step_by(2) {
                    let byte = v
                        .get(i..i + 2)
                        .and_then(|x| u8::from_str_radix(x, 16).ok())
                        .ok_or_else(|| format!("f_handle {v:?}"))?;
                    b.push(byte);
                }
                handle = Some(b);
            }
            _ => {}
        }
    }
    let missing = |what: &str| format!("no {what} in inotify line {s:?}");
    let wd = wd.ok_or_else(|| missing("wd"))?;
    let bytes = bytes.ok_or_else(|| missing("fhandle-bytes"))?;
    let ty = ty.ok_or_else(|| missing("fhandle-type"))?;
    let f = handle.ok_or_else(|| missing("f_handle"))?;
    if f.len() as u64 != bytes {
        return Err(format!("f_handle of {} bytes, expected {bytes}", f.len()));
    }
    let mut h = Vec::with_capacity(8 + f.len());
    h.extend_from_slice(&(bytes as u32).to_ne_bytes());
    h.extend_from_slice(&(ty as i32).to_ne_bytes());
    h.extend_from_slice(&f);
    Ok(Line {
        wd: i32::try_from(wd).map_err(|_| format!("wd {wd:#x}"))?,
        ino: ino.ok_or_else(|| missing("ino"))?,
        sdev: sdev.ok_or_else(|| missing("sdev"))?,
        mask: u32::try_from(mask.ok_or_else(|| missing("mask"))?)
            .map_err(|_| format!("mask in {s:?}"))?,
        handle: h,
    })
}

/// The kernel's internal `s_dev` as a user-space `st_dev`.
fn user_dev(sdev: u64) -> u64 {
    libc::makedev((sdev >> 20) as u32, (sdev & 0xf_ffff) as u32)
}

/// The path of the watched inode of `l`.
fn resolve(l: &Line) -> std::result::Result<String, String> {
    let dev = user_dev(l.sdev);
    let mount = mount_of(dev)?;
    let fd = sys::open_by_handle_at(mount.as_fd(), &l.handle, libc::O_PATH)
        .map_err(|e| format!("open_by_handle_at: {e}"))?;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("readlink: {e}"))?;
    let path = link
        .into_os_string()
        .into_string()
        .map_err(|p| format!("non-UTF-8 path {p:?}"))?;
    let md = std::fs::symlink_metadata(&path).map_err(|e| format!("stat {path}: {e}"))?;
    if md.dev() != dev || md.ino() != l.ino {
        return Err(format!("{path} is another file now"));
    }
    Ok(path)
}

/// An fd of a mount of device `dev` (from our mountinfo).
fn mount_of(dev: u64) -> std::result::Result<OwnedFd, String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(mm), Some(point)) = (f.get(2), f.get(4)) else {
            continue;
        };
        let Some((maj, min)) = mm.split_once(':') else {
            continue;
        };
        let (Ok(maj), Ok(min)) = (maj.parse::<u32>(), min.parse::<u32>()) else {
            continue;
        };
        if libc::makedev(maj, min) != dev {
            continue;
        }
        // Mount points escape blanks as octal (\040); skip those.
        if point.contains('\\') {
            continue;
        }
        let Ok(c) = CString::new(*point) else {
            continue;
        };
        // Not O_PATH: open_by_handle_at wants a real fd (EBADF).
        if let Ok(fd) = sys::open(&c, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) {
            return Ok(fd);
        }
    }
    Err(format!("no mount of device {:x}", dev))
}

/// Recreate inotify instance `f` in the agent; `d` names it in errors.
pub fn open(f: &OpenFile, d: &str) -> Result<OwnedFd> {
    let FileKind::Inotify { watches, queued } = &f.kind else {
        return Err(Error::parse(
            "open file",
            format!("{d} is not an inotify instance"),
        ));
    };
    let io_err = |op: String, err: io::Error| Error::io(format!("restoring {d}: {op}"), err);
    let flags = libc::IN_CLOEXEC | (f.flags as i32 & libc::O_NONBLOCK);
    let fd = sys::inotify_init1(flags).map_err(|e| io_err("inotify_init1".into(), e))?;
    let mut sorted: Vec<&InotifyWatch> = watches.iter().collect();
    sorted.sort_by_key(|w| w.wd);
    let mut gaps = false;
    for w in sorted {
        let path = CString::new(w.path.as_str())
            .map_err(|_| Error::parse("path", format!("{d}: NUL in watch path")))?;
        loop {
            let got = sys::inotify_add_watch(fd.as_fd(), &path, w.mask | IN_DONT_FOLLOW)
                .map_err(|e| io_err(format!("watching {} (wd {})", w.path, w.wd), e))?;
            if got == w.wd {
                break;
            }
            if got > w.wd {
                return Err(Error::Incompatible(format!(
                    "{d}: the watch of {} cannot get its descriptor {} back (the kernel gave {got})",
                    w.path, w.wd
                )));
            }
            gaps = true;
            sys::inotify_rm_watch(fd.as_fd(), got)
                .map_err(|e| io_err(format!("removing the gap watch {got}"), e))?;
        }
    }
    let mut lost = false;
    if gaps {
        lost = drain_except_ignored(fd.as_fd()).map_err(|e| io_err("draining".into(), e))?;
    }
    if *queued || lost {
        report_overflow(fd.as_fd()).map_err(|e| io_err("queueing IN_Q_OVERFLOW".into(), e))?;
    }
    Ok(fd)
}

/// Read away every queued event; true if one was not an `IN_IGNORED`
/// (a real event that is now lost).
fn drain_except_ignored(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut lost = false;
    let mut buf = vec![0u8; 64 * 1024];
    while sys::fionread(fd)? > 0 {
        let n = read(fd, &mut buf)?;
        let mut off = 0;
        while off + EVENT_LEN <= n {
            let mask = u32::from_ne_bytes([buf[off + 4], buf[off + 5], buf[off + 6], buf[off + 7]]);
            let len =
                u32::from_ne_bytes([buf[off + 12], buf[off + 13], buf[off + 14], buf[off + 15]])
                    as usize;
            lost |= mask & libc::IN_IGNORED == 0;
            off += EVENT_LEN + len;
        }
    }
    Ok(lost)
}

/// `read(fd, buf)`: bytes read.
fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    let mut f = std::fs::File::from(fd.try_clone_to_owned()?);
    f.read(buf)
}

/// Leave exactly one `IN_Q_OVERFLOW` event queued on instance `fd` (see
/// the module's documentation).
fn report_overflow(fd: BorrowedFd<'_>) -> io::Result<()> {
    let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")?
        .trim()
        .parse()
        .map_err(|_| io::Error::other("max_queued_events is not a number"))?;
    if max > MAX_QUEUE_TO_FILL {
        return Err(io::Error::other(format!(
            "max_queued_events is {max}: too many events to fill the queue with"
        )));
    }
    let dir = CString::new(std::env::temp_dir().to_string_lossy().into_owned())
        .map_err(|_| io::Error::other("NUL in the temp dir"))?;
    let tmp = sys::open_mode(
        &dir,
        libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
        0o600,
    )?;
    sys::touch_byte(tmp.as_fd(), true)?;
    let link = CString::new(format!("/proc/self/fd/{}", tmp.as_raw_fd()))
        .map_err(|_| io::Error::other("NUL"))?;
    let wd = sys::inotify_add_watch(fd, &link, libc::IN_MODIFY | libc::IN_ACCESS)?;
    // Alternate so that no event merges with the one before it; one more
    // than the queue holds makes the kernel queue its overflow event.
    for i in 0..=max {
        sys::touch_byte(tmp.as_fd(), i % 2 == 0)?;
    }
    sys::inotify_rm_watch(fd, wd)?;
    // Read away everything before the overflow event (at the tail).
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let queued = sys::fionread(fd)?;
        if queued <= EVENT_LEN {
            break;
        }
        let want = (queued - EVENT_LEN).min(buf.len());
        let want = want - want % EVENT_LEN;
        if want == 0 {
            return Err(io::Error::other("events with names on the temporary watch"));
        }
        read(fd, &mut buf[..want])?;
    }
    if sys::fionread(fd)? != EVENT_LEN {
        return Err(io::Error::other("the overflow event did not come"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_lines() {
        let l = parse_line(
            "wd:1a ino:2a1 sdev:fe00000 mask:100 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a102000001020304",
        )
        .expect("parse");
        assert_eq!(
            (l.wd, l.ino, l.sdev, l.mask),
            (0x1a, 0x2a1, 0xfe00000, 0x100)
        );
        assert_eq!(&l.handle[..8], &[8, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&l.handle[8..], &[0xa1, 0x02, 0, 0, 1, 2, 3, 4]);
        assert_eq!(user_dev(0xfe00000), libc::makedev(0xfe, 0));
        assert!(
            parse_line("wd:1 ino:2 sdev:3 mask:4 fhandle-bytes:4 fhandle-type:1 f_handle:01")
                .is_err()
        );
        assert!(parse_line("wd:zz").is_err());
    }
}
