//! Restore of open file descriptors into a stopped target.
//!
//! The agent (this process) opens every object itself: files by path
//! (checked against the dev/ino of the checkpoint), pipes created afresh and
//! refilled with their unread data. The target then pulls each one in with an
//! injected `pidfd_getfd` on a pidfd of the agent and moves it to its number
//! with `dup3`. Status flags and file positions live in the open file
//! description, which the agent and the target share, so they are set on the
//! agent's side before the transfer.

use crate::dump::fds::sys;
use crate::{Error, Result};
use ferry_parasite::remote::Injector;
use ferry_protocol::model::{FdEntry, FdKind};
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// Flags that only make sense when a file is created, never on a reopen.
const CREATE_FLAGS: i32 = libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL;
/// `__O_TMPFILE`: the bit that, with `O_DIRECTORY`, makes `O_TMPFILE`.
const O_TMPFILE_BIT: i32 = 0o20000000;
/// Status flags of a pipe end that can be set with `F_SETFL`.
const PIPE_SETFL: i32 = libc::O_NONBLOCK | libc::O_DIRECT;

/// Install `fds` into the target driven by `inj`, each at its number, with
/// its status flags, position and close-on-exec flag.
///
/// The target should have no open fds (any fd at a wanted number is
/// replaced). Every fd number must be below the target's `RLIMIT_NOFILE`.
/// Errors name the fd and its path; a file that is not the one seen at
/// checkpoint time gives [`Error::Incompatible`].
pub fn install(inj: &mut Injector<'_>, fds: &[FdEntry]) -> Result<()> {
    if fds.is_empty() {
        return Ok(());
    }
    let mut sorted: Vec<&FdEntry> = fds.iter().collect();
    sorted.sort_by_key(|e| e.fd);
    for w in sorted.windows(2) {
        if w[0].fd == w[1].fd {
            return Err(Error::parse(
                "fd list",
                format!("fd {} appears twice", w[0].fd),
            ));
        }
    }
    if let Some(e) = sorted.first().filter(|e| e.fd < 0) {
        return Err(Error::parse("fd list", format!("negative fd {}", e.fd)));
    }
    let max_fd = sorted.last().map_or(0, |e| e.fd);

    // 1. The agent opens every object; `local[i]` is its fd for sorted[i].
    let opened = open_all(&sorted)?;

    // 2. A pidfd of the agent in the target, above every wanted number.
    let agent = std::process::id() as u64;
    let raw = inj
        .call("pidfd_open(agent)", libc::SYS_pidfd_open, &[agent, 0])
        .map_err(|e| remote("opening a pidfd of the agent in the target", e))?;
    let pidfd = if raw > max_fd as u64 {
        raw
    } else {
        let moved = inj.call(
            "fcntl(F_DUPFD_CLOEXEC)",
            libc::SYS_fcntl,
            &[raw, libc::F_DUPFD_CLOEXEC as u64, max_fd as u64 + 1],
        );
        let closed = inj.call("close(pidfd)", libc::SYS_close, &[raw]);
        let moved = moved.map_err(|e| remote("moving the agent's pidfd in the target", e))?;
        closed.map_err(|e| remote("closing the agent's pidfd in the target", e))?;
        moved
    };

    // 3. Pull each fd in.
    let mut result = Ok(());
    for (e, &local) in sorted.iter().zip(&opened.local) {
        result = transfer(inj, pidfd, local, e);
        if result.is_err() {
            break;
        }
    }
    let closed = inj.call("close(pidfd)", libc::SYS_close, &[pidfd]);
    result?;
    closed.map_err(|e| remote("closing the agent's pidfd in the target", e))?;
    drop(opened);
    Ok(())
}

/// The agent's open objects: `store` owns them, `local[i]` is the fd for
/// the i-th sorted entry (several entries may share one).
struct Opened {
    store: Vec<OwnedFd>,
    local: Vec<RawFd>,
}

impl Opened {
    fn keep(&mut self, fd: OwnedFd) -> RawFd {
        let raw = fd.as_raw_fd();
        self.store.push(fd);
        raw
    }
}

/// Open every entry in the agent.
fn open_all(sorted: &[&FdEntry]) -> Result<Opened> {
    let mut opened = Opened {
        store: Vec::new(),
        local: vec![-1; sorted.len()],
    };
    // Pipes first, grouped by id.
    let mut pipes: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, e) in sorted.iter().enumerate() {
        match &e.kind {
            FdKind::Pipe { id, .. } => pipes.entry(*id).or_default().push(i),
            _ => {
                let fd = open_one(e)?;
                opened.local[i] = opened.keep(fd);
            }
        }
    }
    for (id, idxs) in pipes {
        open_pipe(id, &idxs, sorted, &mut opened)?;
    }
    Ok(opened)
}

/// `"fd 3 (/path)"`, for messages.
fn describe(e: &FdEntry) -> String {
    match &e.kind {
        FdKind::Regular { path, .. }
        | FdKind::Directory { path }
        | FdKind::CharDevice { path, .. } => format!("fd {} ({path})", e.fd),
        FdKind::Pipe { id, .. } => format!("fd {} (pipe:[{id}])", e.fd),
    }
}

/// Open a file, directory or character device for entry `e` in the agent,
/// checked against the checkpoint and positioned.
fn open_one(e: &FdEntry) -> Result<OwnedFd> {
    let d = describe(e);
    let io_err = |op: &str, err: io::Error| Error::io(format!("restoring {d}: {op}"), err);
    let saved = e.flags as i32;
    let (path, flags) = match &e.kind {
        FdKind::Regular { path, .. } | FdKind::CharDevice { path, .. } => {
            let mut f = saved & !CREATE_FLAGS;
            if f & O_TMPFILE_BIT != 0 {
                f &= !(O_TMPFILE_BIT | libc::O_DIRECTORY);
            }
            (path, f)
        }
        FdKind::Directory { path } => (
            path,
            libc::O_DIRECTORY | libc::O_RDONLY | (saved & (libc::O_PATH | libc::O_NOATIME)),
        ),
        FdKind::Pipe { .. } => return Err(Error::parse("fd entry", format!("{d} is a pipe"))),
    };
    let cpath = CString::new(path.as_str())
        .map_err(|_| Error::parse("path", format!("{d}: NUL in path")))?;
    let fd = sys::open(&cpath, flags | libc::O_CLOEXEC | libc::O_NOCTTY)
        .map_err(|err| io_err("open", err))?;
    let st = sys::fstat(fd.as_fd()).map_err(|err| io_err("fstat", err))?;
    let fmt = st.st_mode & libc::S_IFMT;
    match &e.kind {
        FdKind::Regular { dev, ino, .. } => {
            if fmt != libc::S_IFREG || st.st_dev != *dev || st.st_ino != *ino {
                return Err(Error::Incompatible(format!(
                    "file {path} was replaced since the checkpoint (fd {})",
                    e.fd
                )));
            }
        }
        FdKind::Directory { .. } => {
            if fmt != libc::S_IFDIR {
                return Err(Error::Incompatible(format!(
                    "directory {path} was replaced since the checkpoint (fd {})",
                    e.fd
                )));
            }
        }
        FdKind::CharDevice { rdev, .. } => {
            if fmt != libc::S_IFCHR || st.st_rdev != *rdev {
                return Err(Error::Incompatible(format!(
                    "device {path} is not the device seen at the checkpoint (fd {})",
                    e.fd
                )));
            }
        }
        FdKind::Pipe { .. } => {}
    }
    if e.pos != 0 && flags & libc::O_PATH == 0 {
        match sys::seek_set(fd.as_fd(), e.pos) {
            Ok(()) => {}
            // Ttys and the like have no position.
            Err(err)
                if err.raw_os_error() == Some(libc::ESPIPE)
                    && matches!(e.kind, FdKind::CharDevice { .. }) => {}
            Err(err) => return Err(io_err(&format!("lseek to {}", e.pos), err)),
        }
    }
    Ok(fd)
}

/// Which side of a pipe an fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum End {
    Read,
    Write,
    Both,
}

/// Create pipe `id`, fill it with its saved data and give every fd of it
/// (`idxs` into `sorted`) an agent fd with the right end and status flags.
///
/// Fds of the same end with the same status flags share one open file
/// description (as after `dup`); same end with other flags get their own,
/// reopened through `/proc/self/fd`, so that their flags stay apart.
fn open_pipe(id: u64, idxs: &[usize], sorted: &[&FdEntry], opened: &mut Opened) -> Result<()> {
    let Some(&first) = idxs.first() else {
        return Ok(());
    };
    let d = describe(sorted[first]);
    let io_err = |op: &str, err: io::Error| Error::io(format!("restoring {d}: {op}"), err);
    let mut capacity = 0u32;
    let mut data: Option<&[u8]> = None;
    for &i in idxs {
        if let FdKind::Pipe {
            data: Some(bytes),
            capacity: c,
            ..
        } = &sorted[i].kind
        {
            if data.is_some() {
                return Err(Error::parse(
                    "fd list",
                    format!("pipe:[{id}] has data on more than one fd"),
                ));
            }
            data = Some(bytes);
            capacity = capacity.max(*c);
        } else if let FdKind::Pipe { capacity: c, .. } = &sorted[i].kind {
            capacity = capacity.max(*c);
        }
    }
    let data = data.unwrap_or(&[]);

    let (r, w) =
        sys::pipe2(libc::O_CLOEXEC | libc::O_NONBLOCK).map_err(|err| io_err("pipe2", err))?;
    let cur =
        sys::fcntl(w.as_fd(), libc::F_GETPIPE_SZ, 0).map_err(|err| io_err("F_GETPIPE_SZ", err))?;
    let mut actual = cur as u32;
    if capacity != 0 && capacity != actual {
        match i32::try_from(capacity)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
            .and_then(|c| sys::fcntl(w.as_fd(), libc::F_SETPIPE_SZ, c))
        {
            Ok(n) => actual = n as u32,
            Err(err) => tracing::warn!(
                "{d}: cannot set the pipe capacity to {capacity} bytes ({err}); it stays {actual}"
            ),
        }
    }
    if data.len() > actual as usize {
        return Err(Error::Incompatible(format!(
            "{d}: the pipe holds {} unread bytes but its capacity here is only {actual} bytes",
            data.len()
        )));
    }
    if !data.is_empty() {
        let mut f = std::fs::File::from(w.try_clone().map_err(|err| io_err("dup", err))?);
        f.write_all(data)
            .map_err(|err| io_err("writing the unread data", err))?;
    }
    let r_raw = r.as_raw_fd();
    let w_raw = w.as_raw_fd();
    let mut originals: HashMap<End, Option<OwnedFd>> = HashMap::new();
    originals.insert(End::Read, Some(r));
    originals.insert(End::Write, Some(w));
    let mut groups: HashMap<(End, i32), RawFd> = HashMap::new();
    for &i in idxs {
        let e = sorted[i];
        let FdKind::Pipe { write_end, .. } = &e.kind else {
            continue;
        };
        let acc = e.flags as i32 & libc::O_ACCMODE;
        let end = if acc == libc::O_RDWR {
            End::Both
        } else if *write_end {
            End::Write
        } else {
            End::Read
        };
        let status = e.flags as i32 & PIPE_SETFL;
        if let Some(&fd) = groups.get(&(end, status)) {
            opened.local[i] = fd;
            continue;
        }
        let fd = match originals.get_mut(&end).and_then(Option::take) {
            Some(orig) => orig,
            None => {
                // Another description of the same pipe.
                let (src, mode) = match end {
                    End::Read => (r_raw, libc::O_RDONLY),
                    End::Write => (w_raw, libc::O_WRONLY),
                    End::Both => (r_raw, libc::O_RDWR),
                };
                let p = CString::new(format!("/proc/self/fd/{src}"))
                    .map_err(|_| Error::parse("path", "NUL"))?;
                sys::open(&p, mode | libc::O_CLOEXEC | libc::O_NONBLOCK).map_err(|err| {
                    Error::io(
                        format!("restoring {}: reopening pipe:[{id}]", describe(e)),
                        err,
                    )
                })?
            }
        };
        set_status(fd.as_fd(), status).map_err(|err| {
            Error::io(
                format!("restoring {}: F_SETFL {status:#o}", describe(e)),
                err,
            )
        })?;
        let raw = opened.keep(fd);
        groups.insert((end, status), raw);
        opened.local[i] = raw;
    }
    // Unclaimed originals (kept alive until every reopen was done) close here.
    drop(originals);
    Ok(())
}

/// Set the `F_SETFL`-settable status flags of a pipe end to exactly `status`.
fn set_status(fd: BorrowedFd<'_>, status: i32) -> io::Result<()> {
    let cur = sys::fcntl(fd, libc::F_GETFL, 0)?;
    let new = (cur & !PIPE_SETFL) | status;
    if new != cur {
        sys::fcntl(fd, libc::F_SETFL, new)?;
    }
    Ok(())
}

/// Pull the agent's `local` fd into the target at `e.fd`.
fn transfer(inj: &mut Injector<'_>, pidfd: u64, local: RawFd, e: &FdEntry) -> Result<()> {
    let d = describe(e);
    let wanted = e.fd as u64;
    let tmp = inj
        .call(
            "pidfd_getfd",
            libc::SYS_pidfd_getfd,
            &[pidfd, local as u64, 0],
        )
        .map_err(|err| remote(&format!("restoring {d}: taking it into the target"), err))?;
    if tmp != wanted {
        let flags = if e.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        let duped = inj.call("dup3", libc::SYS_dup3, &[tmp, wanted, flags]);
        let closed = inj.call("close", libc::SYS_close, &[tmp]);
        duped.map_err(|err| remote(&format!("restoring {d}: dup3 to its number"), err))?;
        closed.map_err(|err| remote(&format!("restoring {d}: closing the temporary fd"), err))?;
    } else if !e.cloexec {
        inj.call(
            "fcntl(F_SETFD)",
            libc::SYS_fcntl,
            &[wanted, libc::F_SETFD as u64, 0],
        )
        .map_err(|err| remote(&format!("restoring {d}: clearing close-on-exec"), err))?;
    }
    Ok(())
}

/// Give a failed injected call the context `what` (its fd and path).
fn remote(what: &str, err: ferry_parasite::Error) -> Error {
    match err {
        ferry_parasite::Error::Remote { name, source, .. } => {
            Error::io(format!("{what}: injected {name}"), source)
        }
        other => Error::io(what.to_string(), io::Error::other(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dump::fds::testkit::{pattern, scene, ScriptChild, TempDir};
    use crate::testutil::StubGuard;
    use ferry_parasite::Tracee;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    /// A stopped stub with a scratch page and no fds.
    fn with_stub<T>(f: impl FnOnce(i32, &mut Injector<'_>) -> T) -> (StubGuard, T) {
        crate::testutil::with_stub(true, f)
    }

    fn fd_list(pid: i32) -> Vec<i32> {
        let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .map(|e| {
                e.expect("entry")
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .expect("number")
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// (flags incl. O_CLOEXEC, pos) from fdinfo.
    fn fdinfo(pid: i32, fd: i32) -> (u32, u64) {
        let t = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
        let get = |k: &str| {
            t.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::trim)
                .expect("field")
                .to_string()
        };
        (
            u32::from_str_radix(&get("flags:"), 8).expect("flags"),
            get("pos:").parse().expect("pos"),
        )
    }

    fn link(pid: i32, fd: i32) -> String {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .expect("readlink")
            .to_string_lossy()
            .into_owned()
    }

    /// Read everything waiting in the pipe at `fd` of `pid`.
    fn drain_pipe(pid: i32, fd: i32) -> Vec<u8> {
        let pidfd = sys::pidfd_open(pid).expect("pidfd_open");
        let r = sys::pidfd_getfd(pidfd.as_fd(), fd).expect("pidfd_getfd");
        let n = sys::fionread(r.as_fd()).expect("FIONREAD");
        let mut buf = vec![0u8; n];
        std::fs::File::from(r).read_exact(&mut buf).expect("read");
        buf
    }

    const CLOEXEC: u32 = libc::O_CLOEXEC as u32;
    /// The kernel's `O_LARGEFILE` (libc says 0 on x86-64, fdinfo shows it).
    const LARGEFILE: u32 = 0o100000;
    const KEEP: u32 = !LARGEFILE;

    fn reg(dir: &TempDir, name: &str, fd: i32, flags: i32, pos: u64, cloexec: bool) -> FdEntry {
        let p = dir.file(name);
        let md = std::fs::metadata(&p).expect("stat");
        FdEntry {
            fd,
            flags: flags as u32,
            cloexec,
            pos,
            kind: FdKind::Regular {
                path: p,
                dev: md.dev(),
                ino: md.ino(),
            },
        }
    }

    #[test]
    fn install_files_devices_dirs_and_pipe() {
        let dir = TempDir::new("restore");
        std::fs::write(dir.file("a"), vec![b'x'; 5000]).expect("write a");
        std::fs::write(dir.file("b"), b"hello").expect("write b");
        let null_rdev = std::fs::metadata("/dev/null").expect("null").rdev();
        let data = pattern(1000);
        let fds = vec![
            FdEntry {
                fd: 0,
                flags: libc::O_RDWR as u32,
                cloexec: false,
                pos: 0,
                kind: FdKind::CharDevice {
                    path: "/dev/null".into(),
                    rdev: null_rdev,
                },
            },
            reg(&dir, "a", 3, libc::O_RDONLY, 1234, true),
            reg(&dir, "b", 4, libc::O_WRONLY | libc::O_APPEND, 0, false),
            FdEntry {
                fd: 6,
                flags: (libc::O_RDONLY | libc::O_DIRECTORY) as u32,
                cloexec: true,
                pos: 0,
                kind: FdKind::Directory {
                    path: dir.path.to_string_lossy().into_owned(),
                },
            },
            FdEntry {
                fd: 8,
                flags: libc::O_RDONLY as u32,
                cloexec: false,
                pos: 0,
                kind: FdKind::Pipe {
                    id: 42,
                    write_end: false,
                    data: Some(data.clone()),
                    capacity: 131072,
                },
            },
            FdEntry {
                fd: 12,
                flags: (libc::O_WRONLY | libc::O_NONBLOCK) as u32,
                cloexec: true,
                pos: 0,
                kind: FdKind::Pipe {
                    id: 42,
                    write_end: true,
                    data: None,
                    capacity: 131072,
                },
            },
        ];
        let (guard, r) = with_stub(|_, inj| install(inj, &fds));
        r.expect("install");
        let pid = guard.0;
        assert_eq!(fd_list(pid), vec![0, 3, 4, 6, 8, 12]);
        assert_eq!(link(pid, 0), "/dev/null");
        assert_eq!(link(pid, 3), dir.file("a"));
        assert_eq!(link(pid, 4), dir.file("b"));
        assert_eq!(link(pid, 6), dir.path.to_string_lossy());
        assert!(link(pid, 8).starts_with("pipe:["));
        assert_eq!(link(pid, 8), link(pid, 12));

        assert_eq!(fdinfo(pid, 0).0 & KEEP, libc::O_RDWR as u32);
        assert_eq!(fdinfo(pid, 3), (LARGEFILE | CLOEXEC, 1234));
        let (f4, p4) = fdinfo(pid, 4);
        assert_eq!(
            (f4 & KEEP, p4),
            ((libc::O_WRONLY | libc::O_APPEND) as u32, 0)
        );
        let f6 = fdinfo(pid, 6).0;
        assert_eq!(f6 & CLOEXEC, CLOEXEC);
        assert_ne!(f6 & libc::O_DIRECTORY as u32, 0);
        assert_eq!(fdinfo(pid, 8).0 & KEEP, libc::O_RDONLY as u32);
        assert_eq!(
            fdinfo(pid, 12).0 & KEEP,
            (libc::O_WRONLY | libc::O_NONBLOCK) as u32 | CLOEXEC
        );

        // Capacity and data arrived intact.
        let pidfd = sys::pidfd_open(pid).expect("pidfd_open");
        let r = sys::pidfd_getfd(pidfd.as_fd(), 8).expect("getfd");
        assert_eq!(
            sys::fcntl(r.as_fd(), libc::F_GETPIPE_SZ, 0).expect("size"),
            131072
        );
        drop(r);
        assert_eq!(drain_pipe(pid, 8), data);
        // The agent kept no copies: only the stub holds the pipe now,
        // so writing into it and reading back proves the ends are joined.
        let w = sys::pidfd_getfd(pidfd.as_fd(), 12).expect("getfd w");
        std::fs::File::from(w).write_all(b"more").expect("write");
        assert_eq!(drain_pipe(pid, 8), b"more");
    }

    #[test]
    fn replaced_file_is_incompatible() {
        let dir = TempDir::new("replaced");
        std::fs::write(dir.file("a"), b"x").expect("write");
        let e = reg(&dir, "a", 3, libc::O_RDONLY, 0, false);
        // A new inode takes its name (created first, so its number differs).
        std::fs::write(dir.file("a.new"), b"y").expect("write new");
        std::fs::rename(dir.file("a.new"), dir.file("a")).expect("rename");
        let (guard, r) = with_stub(|_, inj| install(inj, &[e]));
        match r {
            Err(Error::Incompatible(msg)) => {
                assert!(
                    msg.contains(&dir.file("a")) && msg.contains("fd 3"),
                    "{msg}"
                )
            }
            other => panic!("expected Incompatible, got {other:?}"),
        }
        // Nothing was left in the stub.
        assert_eq!(fd_list(guard.0), Vec::<i32>::new());
    }

    #[test]
    fn pipe_data_over_capacity_is_refused() {
        let e = FdEntry {
            fd: 3,
            flags: 0,
            cloexec: false,
            pos: 0,
            kind: FdKind::Pipe {
                id: 1,
                write_end: false,
                data: Some(vec![0u8; 5000]),
                capacity: 4096,
            },
        };
        let (_guard, r) = with_stub(|_, inj| install(inj, &[e]));
        let msg = r.expect_err("must fail").to_string();
        assert!(msg.contains("fd 3") && msg.contains("5000"), "{msg}");
    }

    #[test]
    fn round_trip_from_child_to_stub() {
        let dir = TempDir::new("roundtrip");
        let (acts, data) = scene(&dir);
        let child = ScriptChild::spawn(&acts);
        let mut t = Tracee::seize(child.pid).expect("seize");
        t.interrupt().expect("interrupt");
        let before = crate::dump::fds::collect(child.pid).expect("collect");
        t.detach().expect("detach");

        let (guard, after) = with_stub(|pid, inj| {
            install(inj, &before).expect("install");
            // Collect again from the (still stopped) stub.
            crate::dump::fds::collect(pid).expect("collect from stub")
        });
        let pid = guard.0;
        assert_eq!(fd_list(pid), fd_list(child.pid));
        for fd in fd_list(child.pid) {
            assert_eq!(fdinfo(pid, fd), fdinfo(child.pid, fd), "fdinfo of fd {fd}");
            let (l1, l2) = (link(child.pid, fd), link(pid, fd));
            if l1.starts_with("pipe:[") {
                assert!(l2.starts_with("pipe:["), "fd {fd}: {l2}");
            } else {
                assert_eq!(l1, l2, "fd {fd}");
            }
        }
        // The same image, except for the pipe's id (a new inode).
        let strip = |v: &[FdEntry]| -> Vec<FdEntry> {
            v.iter()
                .cloned()
                .map(|mut e| {
                    if let FdKind::Pipe { id, .. } = &mut e.kind {
                        *id = 0;
                    }
                    e
                })
                .collect()
        };
        assert_eq!(strip(&after), strip(&before));
        assert_eq!(drain_pipe(pid, 9), data);
    }
}
