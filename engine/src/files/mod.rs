//! Open files of a process tree, both directions, one module per kind:
//! [`regular`] (files, directories, character devices), [`pipe`], [`stdio`]
//! (stdio that reaches outside the tree), [`eventfd`], [`timerfd`],
//! [`signalfd`], and memfds or `/dev/shm` files through [`crate::shmem`].
//!
//! ```text
//!  checkpoint  FileCollector::task(pid)  per fd: fdinfo, link, stat
//!                 same (dev, ino) as an fd seen before and kcmp(KCMP_FILE)
//!                 says equal ──► the same FileId (dup, fork, SCM_RIGHTS)
//!                 else classify ──► a new OpenFile
//!              FileCollector::finish    pipes: both ends in the tree ──► data
//!                 copied once; an end outside ──► Outside (fds 0–2) or refused
//!  restore     Opened::open_all(tree)    the agent opens every OpenFile once
//!              install(inj, fds, opened) the target pulls each with
//!                 pidfd_getfd: every fd of one FileId shares the agent's
//!                 description, so offsets and flags stay shared
//! ```
//!
//! Status flags and file positions live in the open file description,
//! which the agent and the targets share, so they are set on the agent's
//! side before the transfer.

pub mod deleted;
pub mod epoll;
#[cfg(test)]
mod event_tests;
pub mod eventfd;
pub mod fifo;
#[cfg(test)]
mod fs_tests;
pub mod inotify;
pub mod locks;
pub mod pidfd;
pub mod pipe;
pub mod regular;
pub mod signalfd;
pub mod socket;
pub mod stdio;
pub(crate) mod sys;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;
pub mod timerfd;

use crate::shmem::{ShmemCollector, ShmemHandles};
use crate::{Error, Result};
use ferry_parasite::remote::Injector;
use ferry_protocol::model::{
    DeletedFile, FdEntry, FileId, FileKind, OpenFile, PipeId, PipeObject, TreeImage,
};
use ferry_protocol::model::{FileLock, LockOwner};
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
pub use stdio::StdioPolicy;

/// `O_CLOEXEC` as it appears in the `flags:` line of fdinfo.
const FDINFO_CLOEXEC: u32 = libc::O_CLOEXEC as u32;

/// Kind string for a pipe that has an end outside the tree.
const PIPE_PEER_OUTSIDE: &str = "a pipe whose other end is outside the process tree";

/// One fd seen so far, to find fds that share its description.
struct Seen {
    pid: i32,
    fd: i32,
    dev: u64,
    ino: u64,
    file: FileId,
}

/// What the tree holds of one pipe.
struct PipeState {
    id: PipeId,
    /// A read end in the tree (to copy the data from).
    reader: Option<(i32, i32)>,
    writer: bool,
    /// A write-only end in the tree (to tell whether any reader is left).
    write_end: Option<(i32, i32)>,
}

/// Collects the open files of the tasks of a frozen tree.
#[derive(Default)]
pub struct FileCollector {
    files: Vec<OpenFile>,
    seen: Vec<Seen>,
    /// pipe inode -> state
    pipes: BTreeMap<u64, PipeState>,
    /// file -> every (pid, fd) that refers to it
    users: HashMap<FileId, Vec<(i32, i32)>>,
    /// Files deleted while open.
    deleted: deleted::DeletedCollector,
    /// Named pipes.
    fifos: fifo::FifoCollector,
    /// File locks.
    locks: locks::LockCollector,
    /// Every process seen, in order.
    tasks: Vec<i32>,
    /// Sockets put into repair mode (shared with the frozen tree).
    pub(crate) repair: socket::RepairSet,
    /// Unix sockets, to join their peers.
    unix: socket::unix::UnixCollector,
}

impl FileCollector {
    /// An empty collector (deleted files up to
    /// [`deleted::DEFAULT_MAX_BYTES`] of contents).
    pub fn new() -> Self {
        Self::with_deleted_limit(deleted::DEFAULT_MAX_BYTES)
    }

    /// An empty collector that saves at most `max_bytes` of the contents of
    /// files deleted while open.
    pub fn with_deleted_limit(max_bytes: u64) -> Self {
        FileCollector {
            deleted: deleted::DeletedCollector::new(max_bytes),
            ..Self::default()
        }
    }

    /// Capture every open fd of `pid`, sorted by number.
    ///
    /// All threads of `pid` must be frozen (the caller holds them in ptrace
    /// stops) so that nothing changes while the fds are read. Fails with
    /// [`Error::UnsupportedFd`] on the first fd of a kind ferry cannot
    /// restore (sockets, epoll, inotify, ...).
    pub fn task(&mut self, pid: i32, shmem: &mut ShmemCollector) -> Result<Vec<FdEntry>> {
        let numbers = list_fds(pid)?;
        self.tasks.push(pid);
        let mut out = Vec::with_capacity(numbers.len());
        for fd in numbers {
            let (raw_flags, pos) = read_fdinfo(pid, fd)?;
            let cloexec = raw_flags & FDINFO_CLOEXEC != 0;
            let flags = raw_flags & !FDINFO_CLOEXEC;
            let magic = format!("/proc/{pid}/fd/{fd}");
            let md =
                std::fs::metadata(&magic).map_err(|e| Error::io(format!("stat {magic}"), e))?;
            if let Some(file) = self.shared_with(pid, fd, &md)? {
                self.locks.fd(pid, fd, file, md.dev(), md.ino())?;
                self.users.entry(file).or_default().push((pid, fd));
                out.push(FdEntry { fd, cloexec, file });
                continue;
            }
            let link = read_link(pid, fd)?;
            let kind = self.classify(pid, fd, flags, &link, &md, shmem)?;
            let file = self.files.len() as FileId + 1;
            self.files.push(OpenFile {
                id: file,
                flags,
                pos,
                kind,
            });
            self.seen.push(Seen {
                pid,
                fd,
                dev: md.dev(),
                ino: md.ino(),
                file,
            });
            self.locks.fd(pid, fd, file, md.dev(), md.ino())?;
            self.users.entry(file).or_default().push((pid, fd));
            out.push(FdEntry { fd, cloexec, file });
        }
        Ok(out)
    }

    /// The file of an fd seen before that `fd` of `pid` shares its open
    /// file description with.
    fn shared_with(&self, pid: i32, fd: i32, md: &std::fs::Metadata) -> Result<Option<FileId>> {
        for s in &self.seen {
            if s.dev != md.dev() || s.ino != md.ino() {
                continue;
            }
            let same = sys::same_file(pid, fd, s.pid, s.fd).map_err(|e| {
                Error::io(
                    format!("kcmp of fd {fd} of {pid} with fd {} of {}", s.fd, s.pid),
                    e,
                )
            })?;
            if same {
                return Ok(Some(s.file));
            }
        }
        Ok(None)
    }

    /// Decide what fd `fd` (whose link reads `link`) is.
    fn classify(
        &mut self,
        pid: i32,
        fd: i32,
        flags: u32,
        link: &str,
        md: &std::fs::Metadata,
        shmem: &mut ShmemCollector,
    ) -> Result<FileKind> {
        let unsupported = |kind: String| Error::UnsupportedFd { pid, fd, kind };
        let stdio = (0..=2).contains(&fd);
        if let Some(rest) = link.strip_prefix("pipe:[") {
            let ino = rest
                .strip_suffix(']')
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| Error::parse(format!("link of fd {fd} of process {pid}"), link))?;
            let next = (self.pipes.len() + self.fifos.count()) as PipeId + 1;
            let p = self.pipes.entry(ino).or_insert(PipeState {
                id: next,
                reader: None,
                writer: false,
                write_end: None,
            });
            let acc = flags & libc::O_ACCMODE as u32;
            if acc != libc::O_WRONLY as u32 && p.reader.is_none() {
                p.reader = Some((pid, fd));
            }
            if acc == libc::O_WRONLY as u32 && p.write_end.is_none() {
                p.write_end = Some((pid, fd));
            }
            p.writer |= acc != libc::O_RDONLY as u32;
            return Ok(FileKind::Pipe {
                pipe: p.id,
                write_end: acc == libc::O_WRONLY as u32,
            });
        }
        if link.starts_with("socket:[") {
            if stdio {
                return Ok(FileKind::Outside { what: link.into() });
            }
            let next = self.files.len() as FileId + 1;
            if let Some(kind) = self.unix.classify(pid, fd, link, md, next)? {
                return Ok(kind);
            }
            return socket::classify(pid, fd, link, &self.repair);
        }
        if link == "anon_inode:inotify" {
            return inotify::classify(pid, fd);
        }
        if let Some(rest) = link.strip_prefix("anon_inode:") {
            match rest {
                "[eventfd]" => return eventfd::capture(pid, fd),
                "[timerfd]" => return timerfd::capture(pid, fd),
                "[signalfd]" => return signalfd::capture(pid, fd),
                "[eventpoll]" => {
                    return Ok(FileKind::Epoll {
                        targets: Vec::new(),
                    })
                }
                "[pidfd]" => return pidfd::classify(pid, fd, flags),
                _ => {}
            }
            let what = match rest {
                "[fanotify]" => "a fanotify instance".to_string(),
                "[userfaultfd]" => "a userfaultfd".to_string(),
                "[io_uring]" => "an io_uring instance".to_string(),
                "[perf_event]" => "a perf event fd (perf_event_open)".to_string(),
                "bpf-map" => "a BPF map".to_string(),
                "bpf-prog" => "a BPF program".to_string(),
                "bpf_link" => "a BPF link".to_string(),
                "bpf_iter" => "a BPF iterator".to_string(),
                other => format!("an anonymous-inode fd ({other})"),
            };
            return Err(unsupported(what));
        }
        if let Some(id) = shmem.fd_object(pid, fd, link, md)? {
            return Ok(FileKind::Shmem { id });
        }
        if !link.starts_with('/') {
            return Err(unsupported(format!(
                "an fd of an unsupported kind ({link})"
            )));
        }
        use std::os::unix::fs::FileTypeExt;
        if stdio && md.file_type().is_char_device() && regular::is_terminal(md.rdev()) {
            return Ok(FileKind::Outside { what: link.into() });
        }
        if md.file_type().is_fifo() {
            let next = (self.pipes.len() + self.fifos.count()) as PipeId + 1;
            return self.fifos.classify(pid, fd, flags, link, md, next);
        }
        if md.is_file() && md.nlink() == 0 {
            let id = self.deleted.add(pid, fd, link, md)?;
            return Ok(FileKind::Deleted { id });
        }
        regular::classify(pid, fd, link, md)
    }

    /// Finish: pipes with both ends in the tree get their unread data (read
    /// without consuming it); a pipe with an end outside the tree becomes
    /// [`FileKind::Outside`] if only fds 0–2 use it, and is refused
    /// otherwise. Returns the open files, pipes and deleted files of the
    /// tree.
    pub fn finish(mut self) -> Result<(Vec<OpenFile>, Vec<PipeObject>, Vec<DeletedFile>)> {
        let mut pipes = Vec::new();
        let mut pidfds: HashMap<i32, OwnedFd> = HashMap::new();
        /// A read end to copy from, if the tree also holds a write end.
        type Readable = Option<(i32, i32)>;
        /// The end the tree holds when it holds only one kind.
        type Lone = Option<(i32, i32)>;
        let found: Vec<(u64, PipeId, Readable, Lone)> = self
            .pipes
            .iter()
            .map(|(ino, p)| {
                let both = p.reader.filter(|_| p.writer);
                (*ino, p.id, both, p.reader.or(p.write_end))
            })
            .collect();
        for (ino, id, reader, lone) in found {
            match (reader, lone) {
                (Some((pid, fd)), _) => {
                    let pf = cached_pidfd(&mut pidfds, pid)?;
                    let (capacity, data) = pipe::capture(pid, fd, pf, ino)?;
                    pipes.push(PipeObject { id, capacity, data });
                }
                (None, Some((pid, fd))) => {
                    let pf = cached_pidfd(&mut pidfds, pid)?;
                    match pipe::capture_widowed(pid, fd, pf, ino)? {
                        Some((capacity, data)) => pipes.push(PipeObject { id, capacity, data }),
                        None => self.pipe_outside(id, ino)?,
                    }
                }
                (None, None) => self.pipe_outside(id, ino)?,
            }
        }
        pipes.extend(std::mem::take(&mut self.fifos).finish()?);
        self.unix.finish(&mut self.files)?;
        epoll::resolve(&mut self.files, &self.users, &self.seen)?;
        pidfd::check(&self.files, &self.users, &self.tasks)?;
        Ok((self.files, pipes, self.deleted.finish()))
    }

    /// The file locks held by the tasks collected so far (call before
    /// [`FileCollector::finish`]).
    pub fn locks(&mut self) -> Vec<FileLock> {
        self.locks.take()
    }

    /// Every description of pipe `id` becomes `Outside`, or the first fd
    /// above 2 that uses one is refused.
    fn pipe_outside(&mut self, id: PipeId, ino: u64) -> Result<()> {
        for f in &mut self.files {
            if !matches!(f.kind, FileKind::Pipe { pipe, .. } if pipe == id) {
                continue;
            }
            let users = self.users.get(&f.id).map(Vec::as_slice).unwrap_or(&[]);
            if let Some(&(pid, fd)) = users.iter().find(|(_, fd)| *fd > 2) {
                return Err(Error::UnsupportedFd {
                    pid,
                    fd,
                    kind: PIPE_PEER_OUTSIDE.to_string(),
                });
            }
            f.kind = FileKind::Outside {
                what: format!("pipe:[{ino}]"),
            };
        }
        Ok(())
    }
}

/// A pidfd of `pid`, opened once per collection.
fn cached_pidfd(pidfds: &mut HashMap<i32, OwnedFd>, pid: i32) -> Result<BorrowedFd<'_>> {
    let f: &OwnedFd = match pidfds.entry(pid) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(
            sys::pidfd_open(pid)
                .map_err(|e| Error::io(format!("pidfd_open of process {pid}"), e))?,
        ),
    };
    Ok(f.as_fd())
}

/// The agent's side of every open file of a tree being restored: one
/// agent fd per [`FileId`], pulled by each target that uses it.
pub struct Opened {
    fds: HashMap<FileId, OwnedFd>,
    /// Where stdio that reached outside went, if any did.
    pub stdio_log: Option<std::path::PathBuf>,
    /// POSIX locks, taken by their owners in [`install`].
    locks: Vec<FileLock>,
}

impl Opened {
    /// Open every file of `tree` in the agent: files by path (checked
    /// against the checkpoint), pipes created afresh and refilled, memfds and
    /// `/dev/shm` files from `shmem`, outside stdio by `stdio`. A file that is
    /// not the one seen at checkpoint time gives [`Error::Incompatible`].
    pub fn open_all(tree: &TreeImage, shmem: &ShmemHandles, stdio: &StdioPolicy) -> Result<Opened> {
        let mut first_user: HashMap<FileId, (i32, i32)> = HashMap::new();
        for t in &tree.tasks {
            for e in &t.fds {
                first_user.entry(e.file).or_insert((t.pid, e.fd));
            }
        }
        let describe = |f: &OpenFile| -> String {
            let who = first_user
                .get(&f.id)
                .map(|(pid, fd)| format!("fd {fd} of process {pid}"))
                .unwrap_or_else(|| format!("open file {}", f.id));
            match &f.kind {
                FileKind::Regular { path, .. }
                | FileKind::Directory { path }
                | FileKind::CharDevice { path, .. } => format!("{who} ({path})"),
                FileKind::Pipe { pipe, .. } => format!("{who} (pipe {pipe})"),
                FileKind::Shmem { id } => format!("{who} (shared memory object {id})"),
                FileKind::Deleted { id } => format!("{who} (deleted file {id})"),
                FileKind::Outside { what } => format!("{who} ({what}, outside the tree)"),
                FileKind::EventFd { .. } => format!("{who} (an eventfd)"),
                FileKind::TimerFd(_) => format!("{who} (a timerfd)"),
                FileKind::SignalFd { .. } => format!("{who} (a signalfd)"),
                FileKind::Fifo { path, .. } => format!("{who} (named pipe {path})"),
                FileKind::Inotify { .. } => format!("{who} (inotify instance)"),
                FileKind::Epoll { .. } => format!("{who} (epoll instance)"),
                FileKind::Pidfd { pid } => format!("{who} (pidfd of process {pid})"),
                FileKind::Tcp { .. } => format!("{who} (a TCP socket)"),
                FileKind::Udp { .. } => format!("{who} (a UDP socket)"),
                FileKind::Unix { .. } => format!("{who} (a unix socket)"),
            }
        };
        let mut opened = Opened {
            fds: HashMap::new(),
            stdio_log: None,
            locks: Vec::new(),
        };
        let mut by_fifo: BTreeMap<PipeId, Vec<&OpenFile>> = BTreeMap::new();
        let mut by_pipe: BTreeMap<PipeId, Vec<&OpenFile>> = BTreeMap::new();
        let mut inodes: HashMap<u32, OwnedFd> = HashMap::new();
        for d in &tree.deleted {
            inodes.insert(d.id, deleted::create(d)?);
        }
        let mut sockets = Vec::new();
        for f in &tree.files {
            let d = describe(f);
            let fd = match &f.kind {
                FileKind::Tcp { .. } | FileKind::Udp { .. } | FileKind::Unix { .. } => {
                    sockets.push(f);
                    continue;
                }
                FileKind::Pipe { pipe, .. } => {
                    by_pipe.entry(*pipe).or_default().push(f);
                    continue;
                }
                FileKind::Shmem { id } => shmem.reopen(*id, f, &d)?,
                FileKind::Deleted { id } => {
                    let inode = inodes.get(id).ok_or_else(|| {
                        Error::parse(
                            "image",
                            format!("deleted file {id} is used but not defined"),
                        )
                    })?;
                    deleted::reopen(inode, f, &d)?
                }
                FileKind::Fifo { pipe, .. } => {
                    by_fifo.entry(*pipe).or_default().push(f);
                    continue;
                }
                FileKind::Inotify { .. } => inotify::open(f, &d)?,
                FileKind::Outside { .. } => {
                    if !stdio::reads_only(f) {
                        opened.stdio_log = Some(stdio.log.clone());
                    }
                    stdio::open(f, stdio, &d)?
                }
                FileKind::EventFd { count, semaphore } => eventfd::open(f, *count, *semaphore, &d)?,
                FileKind::TimerFd(t) => timerfd::open(f, t, &d)?,
                FileKind::SignalFd { mask } => signalfd::open(f, *mask, &d)?,
                FileKind::Epoll { .. } => epoll::open(f, &d)?,
                FileKind::Pidfd { pid } => pidfd::open(*pid, f, &d)?,
                _ => regular::open(f, &d)?,
            };
            opened.fds.insert(f.id, fd);
        }
        for (id, users) in by_pipe {
            let p = tree.pipe(id).ok_or_else(|| {
                Error::parse("image", format!("pipe {id} is used but not defined"))
            })?;
            for (file, fd) in pipe::open(p, &users, &describe)? {
                opened.fds.insert(file, fd);
            }
        }
        opened.fds.extend(socket::open_all(&sockets, &describe)?);
        for (id, users) in by_fifo {
            let p = tree.pipe(id).ok_or_else(|| {
                Error::parse("image", format!("named pipe {id} is used but not defined"))
            })?;
            for (file, fd) in fifo::open(p, &users, &describe)? {
                opened.fds.insert(file, fd);
            }
        }
        for l in &tree.locks {
            let f = tree.file(l.file).ok_or_else(|| {
                Error::parse(
                    "image",
                    format!("a lock is on open file {}, which is not defined", l.file),
                )
            })?;
            if let LockOwner::Posix { .. } = l.owner {
                opened.locks.push(*l);
                continue;
            }
            let fd = opened.fds.get(&l.file).ok_or_else(|| {
                Error::parse("image", format!("open file {} was not opened", l.file))
            })?;
            locks::take_on_description(fd.as_fd(), l, &describe(f))?;
        }
        Ok(opened)
    }

    fn local(&self, file: FileId) -> Result<RawFd> {
        self.fds
            .get(&file)
            .map(|f| f.as_raw_fd())
            .ok_or_else(|| Error::parse("image", format!("open file {file} was not opened")))
    }
}

/// Install `fds` into the target driven by `inj`, each at its number and
/// with its close-on-exec flag, from the agent's `opened` files.
///
/// The target should have no open fds (any fd at a wanted number is
/// replaced). Every fd number must be below the target's `RLIMIT_NOFILE`.
pub fn install(inj: &mut Injector<'_>, fds: &[FdEntry], opened: &Opened) -> Result<()> {
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

    // A pidfd of the agent in the target, above every wanted number.
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

    let mut result = Ok(());
    for e in sorted {
        result = opened
            .local(e.file)
            .and_then(|local| transfer(inj, pidfd, local, e));
        if result.is_err() {
            break;
        }
    }
    let closed = inj.call("close(pidfd)", libc::SYS_close, &[pidfd]);
    result?;
    closed.map_err(|e| remote("closing the agent's pidfd in the target", e))?;
    let pid = inj.tid();
    locks::take_posix(inj, pid, fds, opened)
}

/// Pull the agent's `local` fd into the target at `e.fd`.
fn transfer(inj: &mut Injector<'_>, pidfd: u64, local: RawFd, e: &FdEntry) -> Result<()> {
    let d = format!("fd {} (open file {})", e.fd, e.file);
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
pub(crate) fn remote(what: &str, err: ferry_parasite::Error) -> Error {
    match err {
        ferry_parasite::Error::Remote { name, source, .. } => {
            Error::io(format!("{what}: injected {name}"), source)
        }
        other => Error::io(what.to_string(), io::Error::other(other)),
    }
}

/// The fd numbers of `pid`, sorted.
pub(crate) fn list_fds(pid: i32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => Error::NoSuchProcess { pid },
        _ => Error::io(format!("reading {dir}"), e),
    })?;
    let mut fds = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("reading {dir}"), e))?;
        let name = ent.file_name();
        let fd = name
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
            .ok_or_else(|| Error::parse(format!("entry of {dir}"), format!("{name:?}")))?;
        fds.push(fd);
    }
    fds.sort_unstable();
    Ok(fds)
}

/// `(flags, pos)` from `/proc/PID/fdinfo/FD`; flags still include `O_CLOEXEC`.
fn read_fdinfo(pid: i32, fd: i32) -> Result<(u32, u64)> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    parse_fdinfo(&text).map_err(|detail| Error::parse(path, detail))
}

/// Parse the `pos:` and `flags:` lines of an fdinfo file.
fn parse_fdinfo(text: &str) -> std::result::Result<(u32, u64), String> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = Some(
                v.trim()
                    .parse::<u64>()
                    .map_err(|e| format!("pos {v:?}: {e}"))?,
            );
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags =
                Some(u32::from_str_radix(v.trim(), 8).map_err(|e| format!("flags {v:?}: {e}"))?);
        }
    }
    match (flags, pos) {
        (Some(f), Some(p)) => Ok((f, p)),
        _ => Err(format!("no pos:/flags: lines in {text:?}")),
    }
}

/// The target of the magic link `/proc/PID/fd/FD`.
fn read_link(pid: i32, fd: i32) -> Result<String> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let target = std::fs::read_link(&path).map_err(|e| Error::io(format!("readlink {path}"), e))?;
    target
        .into_os_string()
        .into_string()
        .map_err(|s| Error::UnsupportedFd {
            pid,
            fd,
            kind: format!("a file with a non-UTF-8 path ({s:?})"),
        })
}

/// A `CString` of a path for the wrappers in [`sys`].
pub(crate) fn cpath(p: &str) -> Result<CString> {
    CString::new(p).map_err(|_| Error::parse("path", format!("NUL in {p:?}")))
}

/// `(path, text)` of `/proc/PID/fdinfo/FD`.
pub(crate) fn fdinfo_text(pid: i32, fd: i32) -> Result<(String, String)> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    Ok((path, text))
}

/// The value (trimmed) of the fdinfo line that starts with `key`.
pub(crate) fn fdinfo_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}
