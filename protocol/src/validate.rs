//! Semantic validation of a [`TreeImage`].
//!
//! Everything that comes from outside (an image file, the wire) goes through
//! [`TreeImage::validate`] before any of it is acted upon. The checks are
//! about *shape* and *bounds*: they make sure later stages can rely on sorted,
//! page-aligned VMAs, a sane thread list, bounded buffers, a consistent tree
//! (every parent, group and session names a process the tree has, parents
//! come before their children) and references by id that all resolve. They
//! do not check that the image is restorable on a given host (that is the
//! compatibility check's job).

use std::collections::HashSet;

use thiserror::Error;

use crate::model::{
    FileKind, HostInfo, PendingSignal, ProcessImage, ShmemKind, TaskIdentity, TreeImage,
    TreeLayout, Vma, VmaKind, Zombie, PAGE_SIZE,
};
use crate::model::{InotifyWatch, LockOwner};
use crate::model::{TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET, TIMERFD_CLOCKS};

/// One past the highest user-space address on x86-64 with 4-level paging.
pub const TASK_SIZE: u64 = 0x0000_8000_0000_0000;
/// Address of the legacy `[vsyscall]` page: never part of an image.
pub const VSYSCALL_ADDR: u64 = 0xffff_ffff_ff60_0000;
/// Highest PID/TID Linux can hand out (`PID_MAX_LIMIT` on 64-bit).
pub const PID_MAX_LIMIT: i32 = 4_194_304;
/// Upper bound for the XSAVE area size.
pub const MAX_XSTATE_SIZE: u32 = 1 << 20;
/// Upper bound for the unread contents of one pipe.
pub const MAX_PIPE_DATA: usize = 16 << 20;
/// Upper bound for a path, and for any other string in an image.
pub const MAX_PATH_LEN: usize = 4096;
/// Number of signals whose dispositions an image records (1..=64).
pub const NSIG: usize = 64;
/// Size of a `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;
/// Upper bound for the number of VMAs (far above `vm.max_map_count` defaults).
pub const MAX_VMAS: usize = 1 << 24;
/// Upper bound for the number of fds (the kernel's `NR_OPEN` limit).
pub const MAX_FDS: usize = 1 << 20;
/// Highest fd number the kernel allows (`sysctl_nr_open_max`).
pub const MAX_FD_NUMBER: i32 = 1_073_741_816;
/// Upper bound for the number of u64 words in the saved auxv.
pub const MAX_AUXV_WORDS: usize = 1024;
/// Upper bound for supplementary groups (`NGROUPS_MAX`).
pub const MAX_GROUPS: usize = 65_536;
/// Number of resource limits on Linux (`RLIM_NLIMITS`).
pub const RLIM_NLIMITS: u32 = 16;
/// Upper bound for pending signals per queue.
pub const MAX_PENDING: usize = 1 << 16;
/// Upper bound for the processes (live and zombie) of one tree.
pub const MAX_TASKS: usize = 1 << 15;
/// Upper bound for the open files, pipes or shared memory objects of a tree.
pub const MAX_OBJECTS: usize = 1 << 20;
/// Upper bound for the saved contents of all deleted files of a tree.
pub const MAX_DELETED_DATA: usize = 1 << 30;
/// Upper bound for the size of one shared memory object (1 TiB).
pub const MAX_SHMEM_SIZE: u64 = 1 << 40;

/// True if `x` is a multiple of [`PAGE_SIZE`].
pub fn is_page_aligned(x: u64) -> bool {
    x & (PAGE_SIZE - 1) == 0
}

/// Why a [`TreeImage`] was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    /// The thread-group id is outside `1..=PID_MAX_LIMIT`.
    #[error("pid {0} is out of range 1..={PID_MAX_LIMIT}")]
    BadPid(i32),
    /// More VMAs than [`MAX_VMAS`].
    #[error("too many VMAs: {found} (at most {max})")]
    TooManyVmas { found: usize, max: usize },
    /// A VMA's start or end is not page aligned.
    #[error("VMA #{index} {start:#x}-{end:#x} is not page aligned")]
    VmaNotAligned { index: usize, start: u64, end: u64 },
    /// A VMA with `end <= start`.
    #[error("VMA #{index} {start:#x}-{end:#x} is empty or inverted")]
    VmaEmpty { index: usize, start: u64, end: u64 },
    /// The legacy `[vsyscall]` page was captured; it must not be restored.
    #[error("VMA #{index} at {start:#x} is [vsyscall], which must not be in an image")]
    VmaVsyscall { index: usize, start: u64 },
    /// A VMA reaches beyond the user address space.
    #[error("VMA #{index} {start:#x}-{end:#x} ends above TASK_SIZE {TASK_SIZE:#x}")]
    VmaAboveTaskSize { index: usize, start: u64, end: u64 },
    /// A VMA starts before the previous one ends.
    #[error("VMA #{index} starting at {start:#x} overlaps or precedes the previous VMA ending at {prev_end:#x}")]
    VmaOverlap {
        index: usize,
        start: u64,
        prev_end: u64,
    },
    /// A file-backed VMA's offset is not page aligned or overflows.
    #[error("VMA #{index}: file offset {offset:#x} is not page aligned or overflows")]
    VmaBadOffset { index: usize, offset: u64 },
    /// The image has no threads.
    #[error("the image has no threads")]
    NoThreads,
    /// The first thread is not the thread-group leader.
    #[error("the first thread has tid {tid}, expected the pid {pid}")]
    FirstThreadNotLeader { tid: i32, pid: i32 },
    /// A tid outside `1..=PID_MAX_LIMIT`.
    #[error("thread #{index} has tid {tid}, out of range 1..={PID_MAX_LIMIT}")]
    BadTid { index: usize, tid: i32 },
    /// Two threads share a tid.
    #[error("tid {tid} appears more than once")]
    DuplicateTid { tid: i32 },
    /// The host's XSAVE size is above [`MAX_XSTATE_SIZE`].
    #[error("xstate size {found} is above the limit {max}")]
    XstateSizeTooLarge { found: u32, max: u32 },
    /// A thread's XSAVE area does not have the host's size.
    #[error("thread {tid}: xstate is {found} bytes, expected {expected}")]
    XstateLength {
        tid: i32,
        found: usize,
        expected: u32,
    },
    /// A pending signal with a bad number or siginfo size.
    #[error("{owner}: pending signal {signo} with {siginfo_len}-byte siginfo is invalid (signo 1..=64, siginfo {SIGINFO_SIZE} bytes)")]
    BadPendingSignal {
        owner: String,
        signo: i32,
        siginfo_len: usize,
    },
    /// Too many pending signals in one queue.
    #[error("{owner}: {found} pending signals (at most {max})")]
    TooManyPending {
        owner: String,
        found: usize,
        max: usize,
    },
    /// The sigaction table must be empty or have one entry per signal.
    #[error("{found} sigactions, expected 0 or {NSIG}")]
    SigactionCount { found: usize },
    /// Too many fds.
    #[error("too many fds: {found} (at most {max})")]
    TooManyFds { found: usize, max: usize },
    /// A negative or impossibly large fd number.
    #[error("fd number {fd} is out of range 0..={MAX_FD_NUMBER}")]
    BadFd { fd: i32 },
    /// Two entries for the same fd number.
    #[error("fd {fd} appears more than once")]
    DuplicateFd { fd: i32 },
    /// Pipe contents above [`MAX_PIPE_DATA`].
    #[error("pipe {id}: {found} bytes of pipe data (at most {max})")]
    PipeDataTooLarge { id: u32, found: usize, max: usize },
    /// Pipe capacity above [`MAX_PIPE_DATA`].
    #[error("pipe {id}: pipe capacity {found} is above {max}")]
    PipeCapacityTooLarge { id: u32, found: u32, max: usize },
    /// More than one fd of a pipe carries the pipe's contents.
    /// The tree has no process.
    #[error("the image holds no process")]
    NoTasks,
    /// Too many processes, files, pipes or shared memory objects.
    #[error("too many {what}: {found} (at most {max})")]
    TooMany {
        what: &'static str,
        found: usize,
        max: usize,
    },
    /// A PID or TID appears twice in the tree.
    #[error("PID/TID {0} appears twice in the tree")]
    DuplicateId(i32),
    /// A process's parent is not an earlier process of the tree.
    #[error("process {pid}: its parent {ppid} is not a process of the tree listed before it")]
    ParentMissing { pid: i32, ppid: i32 },
    /// A process group or session names no process of the tree.
    #[error("process {pid}: its {what} {id} names no process of the tree")]
    GroupMissing {
        pid: i32,
        what: &'static str,
        id: i32,
    },
    /// Two objects of one kind share an id.
    #[error("{what} id {id} is defined twice")]
    DuplicateObject { what: &'static str, id: u32 },
    /// A reference to an object the tree does not define.
    #[error("{user} refers to {what} {id}, which the image does not define")]
    UndefinedObject {
        user: String,
        what: &'static str,
        id: u32,
    },
    /// A stdio-only kind on another fd.
    #[error("process {pid} fd {fd}: only fds 0-2 may reach outside the tree")]
    OutsideNotStdio { pid: i32, fd: i32 },
    /// A shared memory object or a mapping of it with impossible bounds.
    #[error("shared memory object {id}: {why}")]
    BadShmem { id: u32, why: String },
    /// A string longer than [`MAX_PATH_LEN`] bytes.
    #[error("{field}: string of {found} bytes is longer than {max}")]
    StringTooLong {
        field: String,
        found: usize,
        max: usize,
    },
    /// A string containing a NUL byte (cannot be passed to the kernel).
    #[error("{field}: string contains a NUL byte")]
    StringHasNul { field: String },
    /// The saved auxv is too long or not made of pairs.
    #[error("auxv has {found} words (must be even and at most {MAX_AUXV_WORDS})")]
    BadAuxv { found: usize },
    /// Too many supplementary groups.
    #[error("{found} supplementary groups (at most {MAX_GROUPS})")]
    TooManyGroups { found: usize },
    /// An unknown resource limit or a duplicate one.
    #[error("rlimit #{index}: resource {resource} is unknown or repeated")]
    BadRlimit { index: usize, resource: u32 },
    /// An eventfd counter at `u64::MAX`, which no eventfd can hold.
    #[error("open file {id}: eventfd counter {count:#x} is above the maximum 0xfffffffffffffffe")]
    BadEventFd { id: u32, count: u64 },
    /// A timerfd with an unknown clock, unknown flags or an impossible time.
    #[error("open file {id}: timerfd {why}")]
    BadTimerFd { id: u32, why: String },
    /// A file lock that cannot be taken again as described.
    #[error("lock #{index} on open file {file}: {why}")]
    BadLock {
        index: usize,
        file: u32,
        why: String,
    },
    /// An inotify instance whose watches cannot be recreated.
    #[error("open file {file} (inotify): {why}")]
    BadInotify { file: u32, why: String },
    /// Epoll instances registered in each other in a loop (the kernel
    /// refuses to make one).
    #[error("open file {file}: an epoll instance that is registered, directly or through others, in itself")]
    EpollLoop { file: u32 },
    /// An epoll registration under an impossible fd number.
    #[error("open file {file}: an epoll registration under fd number {fd}, out of range 0..={MAX_FD_NUMBER}")]
    EpollBadFd { file: u32, fd: i32 },
    /// A pidfd whose process is not one of the tree.
    #[error("open file {file}: a pidfd of process {pid}, which is not a process of the tree")]
    PidfdOutsideTree { file: u32, pid: i32 },
    /// A socket record that cannot be rebuilt.
    #[error("open file {file} (a socket): {why}")]
    BadSocket { file: u32, why: String },
}

/// At most this many file locks in one image.
pub const MAX_LOCKS: usize = 1 << 16;
/// At most this many watches in one inotify instance.
pub const MAX_INOTIFY_WATCHES: usize = 1 << 16;

/// Every lock names an open file of the image that can be locked, a POSIX
/// lock a process that holds an fd of it, and a range the kernel accepts.
fn check_locks(tree: &TreeImage) -> Result<(), ValidationError> {
    bound("file locks", tree.locks.len(), MAX_LOCKS)?;
    for (index, l) in tree.locks.iter().enumerate() {
        let bad = |why: String| ValidationError::BadLock {
            index,
            file: l.file,
            why,
        };
        let Some(f) = tree.file(l.file) else {
            return Err(ValidationError::UndefinedObject {
                user: format!("lock #{index}"),
                what: "open file",
                id: l.file,
            });
        };
        if let FileKind::Outside { .. } = f.kind {
            return Err(bad(
                "a lock on stdio that reached outside the tree cannot be taken again".into(),
            ));
        }
        let end = l.start.checked_add(l.len);
        if end.is_none_or(|e| e > i64::MAX as u64) {
            return Err(bad(format!(
                "range {}+{} is beyond the largest file offset",
                l.start, l.len
            )));
        }
        match l.owner {
            LockOwner::Flock if l.start != 0 || l.len != 0 => {
                return Err(bad("a flock lock covers the whole file".into()));
            }
            LockOwner::Posix { pid } => {
                let holds = tree
                    .task(pid)
                    .is_some_and(|t| t.fds.iter().any(|e| e.file == l.file));
                if !holds {
                    return Err(bad(format!(
                        "its owner, process {pid}, is not a process of the tree with an fd of it"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Watches with distinct positive descriptors and paths the kernel takes.
fn check_inotify(file: u32, watches: &[InotifyWatch]) -> Result<(), ValidationError> {
    let bad = |why: String| ValidationError::BadInotify { file, why };
    if watches.len() > MAX_INOTIFY_WATCHES {
        return Err(bad(format!(
            "{} watches (at most {MAX_INOTIFY_WATCHES})",
            watches.len()
        )));
    }
    let mut wds = HashSet::new();
    for w in watches {
        if w.wd < 1 || w.wd > MAX_INOTIFY_WATCHES as i32 * 4 {
            return Err(bad(format!("watch descriptor {} is out of range", w.wd)));
        }
        if !wds.insert(w.wd) {
            return Err(bad(format!("watch descriptor {} appears twice", w.wd)));
        }
        if w.mask == 0 {
            return Err(bad(format!("watch {} has an empty mask", w.wd)));
        }
        check_str(|| format!("open file {file} watch {} path", w.wd), &w.path)?;
    }
    Ok(())
}

fn check_str(field: impl FnOnce() -> String, s: &str) -> Result<(), ValidationError> {
    if s.len() > MAX_PATH_LEN {
        return Err(ValidationError::StringTooLong {
            field: field(),
            found: s.len(),
            max: MAX_PATH_LEN,
        });
    }
    if s.as_bytes().contains(&0) {
        return Err(ValidationError::StringHasNul { field: field() });
    }
    Ok(())
}

fn check_pending(
    owner: impl Fn() -> String,
    list: &[PendingSignal],
) -> Result<(), ValidationError> {
    if list.len() > MAX_PENDING {
        return Err(ValidationError::TooManyPending {
            owner: owner(),
            found: list.len(),
            max: MAX_PENDING,
        });
    }
    for p in list {
        if !(1..=NSIG as i32).contains(&p.signo) || p.siginfo.len() != SIGINFO_SIZE {
            return Err(ValidationError::BadPendingSignal {
                owner: owner(),
                signo: p.signo,
                siginfo_len: p.siginfo.len(),
            });
        }
    }
    Ok(())
}

impl ProcessImage {
    /// Checks the image's invariants and bounds (see the module
    /// [`crate::validate`]). Never panics, whatever the contents.
    /// The rules of one process, whose threads' XSAVE areas have the size
    /// of `host`'s. References to shared objects are checked by
    /// [`TreeImage::validate`].
    pub fn validate(&self, host: &HostInfo) -> Result<(), ValidationError> {
        if !(1..=PID_MAX_LIMIT).contains(&self.pid) {
            return Err(ValidationError::BadPid(self.pid));
        }
        self.validate_vmas()?;
        self.validate_threads(host.xstate_size)?;
        self.validate_fds()?;
        self.validate_misc()?;
        Ok(())
    }

    fn validate_vmas(&self) -> Result<(), ValidationError> {
        validate_vmas(&self.vmas)
    }

    fn validate_threads(&self, xs: u32) -> Result<(), ValidationError> {
        let first = self.threads.first().ok_or(ValidationError::NoThreads)?;
        if first.tid != self.pid {
            return Err(ValidationError::FirstThreadNotLeader {
                tid: first.tid,
                pid: self.pid,
            });
        }
        let mut seen = HashSet::with_capacity(self.threads.len().min(1 << 16));
        for (index, t) in self.threads.iter().enumerate() {
            if !(1..=PID_MAX_LIMIT).contains(&t.tid) {
                return Err(ValidationError::BadTid { index, tid: t.tid });
            }
            if !seen.insert(t.tid) {
                return Err(ValidationError::DuplicateTid { tid: t.tid });
            }
            if t.xstate.len() != xs as usize {
                return Err(ValidationError::XstateLength {
                    tid: t.tid,
                    found: t.xstate.len(),
                    expected: xs,
                });
            }
            check_str(|| format!("thread {} comm", t.tid), &t.comm)?;
            check_pending(|| format!("thread {}", t.tid), &t.pending)?;
        }
        Ok(())
    }

    fn validate_fds(&self) -> Result<(), ValidationError> {
        if self.fds.len() > MAX_FDS {
            return Err(ValidationError::TooManyFds {
                found: self.fds.len(),
                max: MAX_FDS,
            });
        }
        let mut seen = HashSet::with_capacity(self.fds.len());
        for e in &self.fds {
            let fd = e.fd;
            if !(0..=MAX_FD_NUMBER).contains(&fd) {
                return Err(ValidationError::BadFd { fd });
            }
            if !seen.insert(fd) {
                return Err(ValidationError::DuplicateFd { fd });
            }
        }
        Ok(())
    }

    fn validate_misc(&self) -> Result<(), ValidationError> {
        let m = &self.misc;
        if !m.sigactions.is_empty() && m.sigactions.len() != NSIG {
            return Err(ValidationError::SigactionCount {
                found: m.sigactions.len(),
            });
        }
        check_pending(|| "process".into(), &m.shared_pending)?;
        check_str(|| "cwd".into(), &m.cwd)?;
        check_str(|| "root".into(), &m.root)?;
        check_str(|| "exe_path".into(), &self.mm.exe_path)?;
        if m.creds.groups.len() > MAX_GROUPS {
            return Err(ValidationError::TooManyGroups {
                found: m.creds.groups.len(),
            });
        }
        let auxv = self.mm.auxv.len();
        if auxv > MAX_AUXV_WORDS || auxv & 1 != 0 {
            return Err(ValidationError::BadAuxv { found: auxv });
        }
        let mut seen = 0u32;
        for (index, r) in m.rlimits.iter().enumerate() {
            if r.resource >= RLIM_NLIMITS || seen & (1 << r.resource) != 0 {
                return Err(ValidationError::BadRlimit {
                    index,
                    resource: r.resource,
                });
            }
            seen |= 1 << r.resource;
        }
        Ok(())
    }
}

/// Checks a layout as declared in `PassStart`: at most [`MAX_VMAS`], each page
/// aligned, non-empty, below `TASK_SIZE`, not `[vsyscall]`, sorted and
/// non-overlapping, bounded strings (the same rules as
/// [`ProcessImage::validate`] applies to an image's VMAs).
pub fn validate_vmas(vmas: &[Vma]) -> Result<(), ValidationError> {
    if vmas.len() > MAX_VMAS {
        return Err(ValidationError::TooManyVmas {
            found: vmas.len(),
            max: MAX_VMAS,
        });
    }
    let mut prev_end = 0u64;
    for (index, v) in vmas.iter().enumerate() {
        let (start, end) = (v.start, v.end);
        let is_vsyscall = start == VSYSCALL_ADDR
            || v.name.as_deref() == Some("[vsyscall]")
            || matches!(&v.kind, VmaKind::Special { name } if name == "[vsyscall]");
        if is_vsyscall {
            return Err(ValidationError::VmaVsyscall { index, start });
        }
        if !is_page_aligned(start) || !is_page_aligned(end) {
            return Err(ValidationError::VmaNotAligned { index, start, end });
        }
        if end <= start {
            return Err(ValidationError::VmaEmpty { index, start, end });
        }
        if end > TASK_SIZE {
            return Err(ValidationError::VmaAboveTaskSize { index, start, end });
        }
        if index > 0 && start < prev_end {
            return Err(ValidationError::VmaOverlap {
                index,
                start,
                prev_end,
            });
        }
        prev_end = end;
        if let Some(name) = &v.name {
            check_str(|| format!("VMA #{index} name"), name)?;
        }
        match &v.kind {
            VmaKind::Anonymous => {}
            VmaKind::File(f) | VmaKind::SharedFile(f) => {
                check_str(|| format!("VMA #{index} path"), &f.path)?;
                if !is_page_aligned(f.offset) || f.offset.checked_add(end - start).is_none() {
                    return Err(ValidationError::VmaBadOffset {
                        index,
                        offset: f.offset,
                    });
                }
            }
            VmaKind::Special { name } => {
                check_str(|| format!("VMA #{index} special name"), name)?;
            }
            VmaKind::Shmem { .. } => {}
        }
    }
    Ok(())
}

impl TreeImage {
    /// Checks the tree's invariants and bounds (see the module
    /// [`crate::validate`]). Never panics, whatever the contents.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_str(|| "host.arch".into(), &self.host.arch)?;
        check_str(|| "host.kernel".into(), &self.host.kernel)?;
        if self.host.xstate_size > MAX_XSTATE_SIZE {
            return Err(ValidationError::XstateSizeTooLarge {
                found: self.host.xstate_size,
                max: MAX_XSTATE_SIZE,
            });
        }
        let n = self.tasks.len() + self.zombies.len();
        bound("processes", n, MAX_TASKS)?;
        bound("open files", self.files.len(), MAX_OBJECTS)?;
        bound("pipes", self.pipes.len(), MAX_OBJECTS)?;
        bound("shared memory objects", self.shmem.len(), MAX_OBJECTS)?;
        let root = self.tasks.first().ok_or(ValidationError::NoTasks)?;
        for t in &self.tasks {
            t.validate(&self.host)?;
        }
        self.validate_tree(root)?;
        self.validate_objects()
    }

    /// Parents before children, unique ids, groups and sessions that exist.
    fn validate_tree(&self, _root: &ProcessImage) -> Result<(), ValidationError> {
        let tasks: Vec<TaskIdentity> = self.tasks.iter().map(ProcessImage::identity).collect();
        validate_family(&tasks, &self.zombies, self.all_ids())
    }

    /// Objects defined once, bounded, and every reference resolves.
    fn validate_objects(&self) -> Result<(), ValidationError> {
        unique("open file", self.files.iter().map(|f| f.id))?;
        unique("pipe", self.pipes.iter().map(|p| p.id))?;
        unique("shared memory object", self.shmem.iter().map(|s| s.id))?;
        unique("deleted file", self.deleted.iter().map(|d| d.id))?;
        let mut deleted_bytes = 0usize;
        for d in &self.deleted {
            check_str(|| format!("deleted file {} path", d.id), &d.path)?;
            deleted_bytes = deleted_bytes.saturating_add(d.data.len());
        }
        bound("bytes of deleted files", deleted_bytes, MAX_DELETED_DATA)?;
        for p in &self.pipes {
            if p.capacity as usize > MAX_PIPE_DATA {
                return Err(ValidationError::PipeCapacityTooLarge {
                    id: p.id,
                    found: p.capacity,
                    max: MAX_PIPE_DATA,
                });
            }
            if p.data.len() > MAX_PIPE_DATA {
                return Err(ValidationError::PipeDataTooLarge {
                    id: p.id,
                    found: p.data.len(),
                    max: MAX_PIPE_DATA,
                });
            }
        }
        for s in &self.shmem {
            let bad = |why: &str| ValidationError::BadShmem {
                id: s.id,
                why: why.into(),
            };
            if s.size > MAX_SHMEM_SIZE {
                return Err(bad("larger than 1 TiB"));
            }
            match &s.kind {
                ShmemKind::Anonymous | ShmemKind::SysV { .. } if !is_page_aligned(s.size) => {
                    return Err(bad("size not page aligned"));
                }
                ShmemKind::Memfd { name: path, .. } | ShmemKind::Posix { path, .. } => {
                    check_str(|| format!("shared memory object {} name", s.id), path)?;
                }
                _ => {}
            }
        }
        let undefined = |user: String, what: &'static str, id: u32| {
            Err(ValidationError::UndefinedObject { user, what, id })
        };
        for f in &self.files {
            match &f.kind {
                FileKind::Regular { path, .. }
                | FileKind::Directory { path }
                | FileKind::CharDevice { path, .. } => {
                    check_str(|| format!("open file {} path", f.id), path)?;
                }
                FileKind::Outside { what } => {
                    check_str(|| format!("open file {} origin", f.id), what)?;
                }
                FileKind::Pipe { pipe, .. } => {
                    if self.pipe(*pipe).is_none() {
                        return undefined(format!("open file {}", f.id), "pipe", *pipe);
                    }
                }
                FileKind::Shmem { id } => {
                    if self.shmem_object(*id).is_none() {
                        return undefined(
                            format!("open file {}", f.id),
                            "shared memory object",
                            *id,
                        );
                    }
                }
                FileKind::Deleted { id } => {
                    if self.deleted_file(*id).is_none() {
                        return undefined(format!("open file {}", f.id), "deleted file", *id);
                    }
                }
                FileKind::EventFd { .. } | FileKind::TimerFd(_) | FileKind::SignalFd { .. } => {
                    check_event_file(f.id, &f.kind)?;
                }
                FileKind::Fifo { path, pipe, .. } => {
                    check_str(|| format!("open file {} path", f.id), path)?;
                    if self.pipe(*pipe).is_none() {
                        return undefined(format!("open file {}", f.id), "pipe", *pipe);
                    }
                }
                FileKind::Inotify { watches, .. } => check_inotify(f.id, watches)?,
                FileKind::Epoll { targets } => {
                    bound("epoll registrations", targets.len(), MAX_OBJECTS)?;
                    for t in targets {
                        if !(0..=MAX_FD_NUMBER).contains(&t.fd) {
                            return Err(ValidationError::EpollBadFd {
                                file: f.id,
                                fd: t.fd,
                            });
                        }
                        if self.file(t.file).is_none() {
                            return undefined(
                                format!(
                                    "epoll open file {} (its registration of fd {})",
                                    f.id, t.fd
                                ),
                                "open file",
                                t.file,
                            );
                        }
                    }
                }
                FileKind::Pidfd { pid } => {
                    let in_tree =
                        self.task(*pid).is_some() || self.zombies.iter().any(|z| z.pid == *pid);
                    if !in_tree {
                        return Err(ValidationError::PidfdOutsideTree {
                            file: f.id,
                            pid: *pid,
                        });
                    }
                }
                FileKind::Tcp { socket } => {
                    socket
                        .check()
                        .map_err(|why| ValidationError::BadSocket { file: f.id, why })?;
                }
                FileKind::Udp { socket } => {
                    socket
                        .check()
                        .map_err(|why| ValidationError::BadSocket { file: f.id, why })?;
                }
                FileKind::Unix { socket } => {
                    let is_unix = |id| {
                        self.file(id)
                            .is_some_and(|p| matches!(p.kind, FileKind::Unix { .. }))
                    };
                    socket
                        .check(is_unix)
                        .map_err(|why| ValidationError::BadSocket { file: f.id, why })?;
                }
            }
        }
        check_locks(self)?;
        for t in &self.tasks {
            for e in &t.fds {
                let Some(f) = self.file(e.file) else {
                    return undefined(
                        format!("process {} fd {}", t.pid, e.fd),
                        "open file",
                        e.file,
                    );
                };
                if matches!(f.kind, FileKind::Outside { .. }) && e.fd > 2 {
                    return Err(ValidationError::OutsideNotStdio {
                        pid: t.pid,
                        fd: e.fd,
                    });
                }
            }
            check_shmem_areas(t.pid, &t.vmas, &self.shmem)?;
        }
        epoll_order(&self.files)?;
        Ok(())
    }
}

/// The epoll instances of `files` in an order in which each comes after
/// every epoll instance registered in it (the order restore registers
/// them in); [`ValidationError::EpollLoop`] if they are registered in each
/// other in a loop. Registrations of files `files` does not hold are
/// ignored here.
pub fn epoll_order(files: &[crate::model::OpenFile]) -> Result<Vec<u32>, ValidationError> {
    use std::collections::{HashMap, VecDeque};
    let epolls: HashMap<u32, &[crate::model::EpollTarget]> = files
        .iter()
        .filter_map(|f| match &f.kind {
            FileKind::Epoll { targets } => Some((f.id, targets.as_slice())),
            _ => None,
        })
        .collect();
    // inner -> the epolls it is registered in (once per registration).
    let mut outers: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut waiting: HashMap<u32, usize> = HashMap::new();
    for f in files {
        let Some(targets) = epolls.get(&f.id) else {
            continue;
        };
        let inner = targets.iter().filter(|t| epolls.contains_key(&t.file));
        let mut n = 0;
        for t in inner {
            outers.entry(t.file).or_default().push(f.id);
            n += 1;
        }
        waiting.insert(f.id, n);
    }
    let mut ready: VecDeque<u32> = files
        .iter()
        .map(|f| f.id)
        .filter(|id| waiting.get(id) == Some(&0))
        .collect();
    let mut order = Vec::with_capacity(waiting.len());
    while let Some(id) = ready.pop_front() {
        order.push(id);
        for o in outers.get(&id).map(Vec::as_slice).unwrap_or_default() {
            if let Some(n) = waiting.get_mut(o) {
                *n -= 1;
                if *n == 0 {
                    ready.push_back(*o);
                }
            }
        }
    }
    if order.len() < waiting.len() {
        let stuck = files
            .iter()
            .map(|f| f.id)
            .find(|id| waiting.get(id).is_some_and(|&n| n > 0))
            .unwrap_or_default();
        return Err(ValidationError::EpollLoop { file: stuck });
    }
    Ok(order)
}

/// The rules of a tree's shape: unique PIDs and TIDs (`ids`), every parent
/// listed before its children, every zombie's parent live, groups and
/// sessions that name a process of the tree (or the root's, which may lie
/// outside it).
pub fn validate_family(
    tasks: &[TaskIdentity],
    zombies: &[Zombie],
    ids: Vec<i32>,
) -> Result<(), ValidationError> {
    let root = tasks.first().ok_or(ValidationError::NoTasks)?;
    let mut all: HashSet<i32> = HashSet::new();
    for id in ids {
        if !(1..=PID_MAX_LIMIT).contains(&id) {
            return Err(ValidationError::BadPid(id));
        }
        if !all.insert(id) {
            return Err(ValidationError::DuplicateId(id));
        }
    }
    let mut earlier: HashSet<i32> = HashSet::new();
    for (i, t) in tasks.iter().enumerate() {
        if i > 0 && !earlier.contains(&t.ppid) {
            return Err(ValidationError::ParentMissing {
                pid: t.pid,
                ppid: t.ppid,
            });
        }
        earlier.insert(t.pid);
    }
    let groups = tasks
        .iter()
        .map(|t| (t.pid, t.pgid, t.sid))
        .chain(zombies.iter().map(|z| (z.pid, z.pgid, z.sid)));
    for z in zombies {
        if !earlier.contains(&z.ppid) {
            return Err(ValidationError::ParentMissing {
                pid: z.pid,
                ppid: z.ppid,
            });
        }
    }
    for (pid, pgid, sid) in groups {
        if pgid != root.pgid && !all.contains(&pgid) {
            return Err(ValidationError::GroupMissing {
                pid,
                what: "process group",
                id: pgid,
            });
        }
        if sid != root.sid && !all.contains(&sid) {
            return Err(ValidationError::GroupMissing {
                pid,
                what: "session",
                id: sid,
            });
        }
    }
    Ok(())
}

impl TreeLayout {
    /// The rules of [`TreeImage::validate`] that a layout can break:
    /// bounds, the tree's shape, areas, shared memory objects and their
    /// mappings. Never panics.
    pub fn validate(&self) -> Result<(), ValidationError> {
        bound(
            "processes",
            self.tasks.len() + self.zombies.len(),
            MAX_TASKS,
        )?;
        bound("shared memory objects", self.shmem.len(), MAX_OBJECTS)?;
        let tasks: Vec<TaskIdentity> = self.tasks.iter().map(|t| t.id).collect();
        let ids = tasks
            .iter()
            .map(|t| t.pid)
            .chain(self.zombies.iter().map(|z| z.pid))
            .collect();
        validate_family(&tasks, &self.zombies, ids)?;
        unique("shared memory object", self.shmem.iter().map(|s| s.id))?;
        for t in &self.tasks {
            validate_vmas(&t.vmas)?;
            check_shmem_areas(t.id.pid, &t.vmas, &self.shmem)?;
        }
        Ok(())
    }
}

/// Every shared memory area of `vmas` maps an object of `shmem` within its
/// size.
fn check_shmem_areas(
    pid: i32,
    vmas: &[Vma],
    shmem: &[crate::model::ShmemObject],
) -> Result<(), ValidationError> {
    for (index, v) in vmas.iter().enumerate() {
        let VmaKind::Shmem { id, offset } = v.kind else {
            continue;
        };
        let Some(s) = shmem.iter().find(|s| s.id == id) else {
            return Err(ValidationError::UndefinedObject {
                user: format!("process {pid} VMA #{index}"),
                what: "shared memory object",
                id,
            });
        };
        let fits = offset
            .checked_add(v.len())
            .is_some_and(|end| end <= s.size.next_multiple_of(PAGE_SIZE));
        if !is_page_aligned(offset) || !fits {
            return Err(ValidationError::BadShmem {
                id,
                why: format!(
                    "process {pid} maps {:#x} bytes at offset {offset:#x} of an object of {:#x}",
                    v.len(),
                    s.size
                ),
            });
        }
    }
    Ok(())
}

/// The rules of an eventfd, a timerfd or a signalfd (open file `id`).
fn check_event_file(id: u32, kind: &FileKind) -> Result<(), ValidationError> {
    match kind {
        FileKind::EventFd { count, .. } if *count == u64::MAX => {
            Err(ValidationError::BadEventFd { id, count: *count })
        }
        FileKind::TimerFd(t) => {
            let bad = |why: String| Err(ValidationError::BadTimerFd { id, why });
            if !TIMERFD_CLOCKS.contains(&t.clock) {
                return bad(format!(
                    "clock {} is not one a timerfd can use ({TIMERFD_CLOCKS:?})",
                    t.clock
                ));
            }
            let known = TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET;
            if t.settime_flags & !known != 0 {
                return bad(format!("settime flags {:#o} are unknown", t.settime_flags));
            }
            for (what, ts) in [
                ("time to expiry", t.value),
                ("interval", t.interval),
                ("clock reading", t.now),
            ] {
                if ts.sec < 0 || !(0..1_000_000_000).contains(&ts.nsec) {
                    return bad(format!(
                        "{what} ({} s, {} ns) is not a valid non-negative time",
                        ts.sec, ts.nsec
                    ));
                }
            }
            check_str(|| format!("open file {id} boot id"), &t.boot_id)
        }
        _ => Ok(()),
    }
}

fn bound(what: &'static str, found: usize, max: usize) -> Result<(), ValidationError> {
    if found > max {
        return Err(ValidationError::TooMany { what, found, max });
    }
    Ok(())
}

fn unique(what: &'static str, ids: impl Iterator<Item = u32>) -> Result<(), ValidationError> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(ValidationError::DuplicateObject { what, id });
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::*;

    /// A small, valid image for tests.
    pub(crate) fn sample_image() -> TreeImage {
        let xstate_size = 1088;
        let thread = |tid: i32| ThreadState {
            tid,
            comm: "worker".into(),
            regs: GpRegs {
                rip: 0x40_1000,
                rsp: 0x7ffd_0000_1000,
                ..GpRegs::default()
            },
            xstate: (0..xstate_size).map(|i| i as u8).collect(),
            sigmask: 0,
            sigaltstack: SigAltStack::default(),
            clear_child_tid: 0,
            robust_list: 0,
            robust_list_len: 24,
            rseq: Some(Rseq {
                abi_pointer: 0x7f00_0000_0020,
                len: 32,
                flags: 0,
                signature: 0x5305_3053,
            }),
            pending: vec![],
        };
        let file = FileMapping {
            path: "/usr/bin/sleep".into(),
            offset: 0x1000,
            dev: 0x803,
            ino: 1234,
            size: 40_000,
            mtime_ns: 1_700_000_000_000_000_000,
        };
        let task = ProcessImage {
            pid: 4242,
            ppid: 1,
            pgid: 4242,
            sid: 100,
            vmas: vec![
                Vma {
                    start: 0x40_0000,
                    end: 0x40_5000,
                    prot: 5,
                    flags: 2,
                    kind: VmaKind::File(file),
                    name: None,
                },
                Vma {
                    start: 0x60_0000,
                    end: 0x62_1000,
                    prot: 3,
                    flags: 2,
                    kind: VmaKind::Anonymous,
                    name: Some("[heap]".into()),
                },
                Vma {
                    start: 0x7fff_f7fc_0000,
                    end: 0x7fff_f7fc_2000,
                    prot: 5,
                    flags: 2,
                    kind: VmaKind::Special {
                        name: "[vdso]".into(),
                    },
                    name: Some("[vdso]".into()),
                },
            ],
            mm: MmFields {
                start_code: 0x40_0000,
                end_code: 0x40_5000,
                auxv: vec![6, 4096, 0, 0],
                exe_path: "/usr/bin/sleep".into(),
                ..MmFields::default()
            },
            threads: vec![thread(4242), thread(4243)],
            fds: vec![
                FdEntry {
                    fd: 0,
                    cloexec: false,
                    file: 1,
                },
                FdEntry {
                    fd: 3,
                    cloexec: true,
                    file: 2,
                },
                FdEntry {
                    fd: 4,
                    cloexec: true,
                    file: 3,
                },
            ],
            misc: ProcessMisc {
                sigactions: vec![SigAction::default(); 64],
                cwd: "/".into(),
                root: "/".into(),
                umask: 0o022,
                rlimits: vec![Rlimit {
                    resource: 7,
                    soft: 1024,
                    hard: 4096,
                }],
                shared_pending: vec![PendingSignal {
                    signo: 10,
                    siginfo: vec![0; 128],
                }],
                ..ProcessMisc::default()
            },
        };
        TreeImage {
            host: HostInfo {
                arch: "x86_64".into(),
                kernel: "6.18.0".into(),
                xstate_size,
                xfeatures: 0x2e7,
            },
            tasks: vec![task],
            zombies: vec![],
            files: vec![
                OpenFile {
                    id: 1,
                    flags: 0,
                    pos: 0,
                    kind: FileKind::CharDevice {
                        path: "/dev/null".into(),
                        rdev: 0x103,
                    },
                },
                OpenFile {
                    id: 2,
                    flags: 0,
                    pos: 0,
                    kind: FileKind::Pipe {
                        pipe: 77,
                        write_end: false,
                    },
                },
                OpenFile {
                    id: 3,
                    flags: 1,
                    pos: 0,
                    kind: FileKind::Pipe {
                        pipe: 77,
                        write_end: true,
                    },
                },
            ],
            pipes: vec![PipeObject {
                id: 77,
                capacity: 65536,
                data: b"hello".to_vec(),
            }],
            shmem: vec![],
            deleted: vec![],
            locks: vec![],
        }
    }

    /// `sample_image` with a child, a grandchild in its own group, a zombie
    /// and an anonymous shared area mapped by the root and the child.
    pub(crate) fn sample_tree() -> TreeImage {
        let mut img = sample_image();
        let mut child = img.tasks[0].clone();
        child.pid = 5000;
        child.ppid = 4242;
        child.threads.truncate(1);
        child.threads[0].tid = 5000;
        let mut grandchild = child.clone();
        grandchild.pid = 5001;
        grandchild.ppid = 5000;
        grandchild.pgid = 5001;
        grandchild.threads[0].tid = 5001;
        img.tasks.push(child);
        img.tasks.push(grandchild);
        img.zombies.push(Zombie {
            pid: 5002,
            ppid: 4242,
            pgid: 4242,
            sid: 100,
            wait_status: 7 << 8,
        });
        img.shmem.push(ShmemObject {
            id: 1,
            size: 0x4000,
            kind: ShmemKind::Anonymous,
        });
        for t in [0, 1] {
            img.tasks[t].vmas.insert(
                2,
                Vma {
                    start: 0x7000_0000_0000,
                    end: 0x7000_0000_4000,
                    prot: 3,
                    flags: libc_map_shared(),
                    kind: VmaKind::Shmem { id: 1, offset: 0 },
                    name: None,
                },
            );
        }
        img
    }

    fn libc_map_shared() -> u32 {
        1
    }

    #[test]
    fn sample_is_valid() {
        assert_eq!(sample_image().validate(), Ok(()));
    }

    fn rejects(f: impl FnOnce(&mut TreeImage)) -> ValidationError {
        let mut img = sample_image();
        f(&mut img);
        match img.validate() {
            Err(e) => e,
            Ok(()) => panic!("image should have been rejected"),
        }
    }

    #[test]
    fn vma_rules() {
        assert!(matches!(
            rejects(|i| i.tasks[0].vmas[1].start += 1),
            ValidationError::VmaNotAligned { index: 1, .. }
        ));
        assert!(matches!(
            rejects(|i| i.tasks[0].vmas[1].end = i.tasks[0].vmas[1].start),
            ValidationError::VmaEmpty { index: 1, .. }
        ));
        assert!(matches!(
            rejects(|i| i.tasks[0].vmas[1].start = 0x40_4000),
            ValidationError::VmaOverlap {
                index: 1,
                start: 0x40_4000,
                prev_end: 0x40_5000
            }
        ));
        assert!(matches!(
            rejects(|i| i.tasks[0].vmas.swap(0, 1)),
            ValidationError::VmaOverlap { index: 1, .. }
        ));
        assert!(matches!(
            rejects(|i| i.tasks[0].vmas[2].end = TASK_SIZE + PAGE_SIZE),
            ValidationError::VmaAboveTaskSize { index: 2, .. }
        ));
        assert!(matches!(
            rejects(|i| i.tasks[0].vmas.push(Vma {
                start: VSYSCALL_ADDR,
                end: VSYSCALL_ADDR + PAGE_SIZE,
                prot: 4,
                flags: 2,
                kind: VmaKind::Special {
                    name: "[vsyscall]".into()
                },
                name: Some("[vsyscall]".into()),
            })),
            ValidationError::VmaVsyscall { index: 3, .. }
        ));
        assert!(matches!(
            rejects(|i| if let VmaKind::File(f) = &mut i.tasks[0].vmas[0].kind {
                f.offset = 12
            }),
            ValidationError::VmaBadOffset { index: 0, .. }
        ));
        // Touching VMAs are fine.
        let mut img = sample_image();
        img.tasks[0].vmas[1].start = 0x40_5000;
        assert_eq!(img.validate(), Ok(()));
    }

    #[test]
    fn thread_rules() {
        assert_eq!(
            rejects(|i| i.tasks[0].threads.clear()),
            ValidationError::NoThreads
        );
        assert_eq!(
            rejects(|i| i.tasks[0].threads.swap(0, 1)),
            ValidationError::FirstThreadNotLeader {
                tid: 4243,
                pid: 4242
            }
        );
        assert_eq!(
            rejects(|i| i.tasks[0].threads[1].tid = 4242),
            ValidationError::DuplicateTid { tid: 4242 }
        );
        assert_eq!(
            rejects(|i| i.tasks[0].threads[1].tid = PID_MAX_LIMIT + 1),
            ValidationError::BadTid {
                index: 1,
                tid: PID_MAX_LIMIT + 1
            }
        );
        assert_eq!(
            rejects(|i| {
                i.tasks[0].threads[1].xstate.pop();
            }),
            ValidationError::XstateLength {
                tid: 4243,
                found: 1087,
                expected: 1088
            }
        );
        assert!(matches!(
            rejects(|i| i.host.xstate_size = MAX_XSTATE_SIZE + 1),
            ValidationError::XstateSizeTooLarge { .. }
        ));
        assert!(matches!(
            rejects(|i| i.tasks[0].threads[1].pending.push(PendingSignal {
                signo: 65,
                siginfo: vec![0; 128]
            })),
            ValidationError::BadPendingSignal { signo: 65, .. }
        ));
        assert_eq!(rejects(|i| i.tasks[0].pid = 0), ValidationError::BadPid(0));
    }

    #[test]
    fn fd_and_misc_rules() {
        assert_eq!(
            rejects(|i| i.tasks[0].fds[2].fd = 3),
            ValidationError::DuplicateFd { fd: 3 }
        );
        assert_eq!(
            rejects(|i| i.tasks[0].fds[0].fd = -1),
            ValidationError::BadFd { fd: -1 }
        );
        assert!(matches!(
            rejects(|i| i.pipes[0].data = vec![0; MAX_PIPE_DATA + 1]),
            ValidationError::PipeDataTooLarge { id: 77, .. }
        ));
        assert_eq!(
            rejects(|i| i.tasks[0].misc.sigactions.truncate(63)),
            ValidationError::SigactionCount { found: 63 }
        );
        let mut img = sample_image();
        img.tasks[0].misc.sigactions.clear();
        assert_eq!(img.validate(), Ok(()));
        assert!(matches!(
            rejects(|i| i.tasks[0].misc.cwd = "/".repeat(MAX_PATH_LEN + 1)),
            ValidationError::StringTooLong { found: 4097, .. }
        ));
        assert!(matches!(
            rejects(
                |i| if let FileKind::CharDevice { path, .. } = &mut i.files[0].kind {
                    *path = "a".repeat(5000)
                }
            ),
            ValidationError::StringTooLong { found: 5000, .. }
        ));
        assert!(matches!(
            rejects(|i| i.tasks[0].mm.exe_path = "/bin/\0x".into()),
            ValidationError::StringHasNul { .. }
        ));
        assert_eq!(
            rejects(|i| i.tasks[0].mm.auxv.push(1)),
            ValidationError::BadAuxv { found: 5 }
        );
        assert_eq!(
            rejects(|i| {
                let r = i.tasks[0].misc.rlimits[0];
                i.tasks[0].misc.rlimits.push(r)
            }),
            ValidationError::BadRlimit {
                index: 1,
                resource: 7
            }
        );
    }

    #[test]
    fn tree_rules() {
        let tree = || sample_tree();
        assert_eq!(tree().validate(), Ok(()));
        let rejects_tree = |f: &dyn Fn(&mut TreeImage)| {
            let mut t = tree();
            f(&mut t);
            t.validate().expect_err("tree should have been rejected")
        };
        assert_eq!(
            rejects_tree(&|t| t.tasks[2].ppid = 9999),
            ValidationError::ParentMissing {
                pid: 5001,
                ppid: 9999
            }
        );
        // A child listed before its parent.
        assert_eq!(
            rejects_tree(&|t| t.tasks.swap(1, 2)),
            ValidationError::ParentMissing {
                pid: 5001,
                ppid: 5000
            }
        );
        assert_eq!(
            rejects_tree(&|t| t.zombies[0].ppid = 77),
            ValidationError::ParentMissing {
                pid: 5002,
                ppid: 77
            }
        );
        assert_eq!(
            rejects_tree(&|t| t.tasks[2].pgid = 6000),
            ValidationError::GroupMissing {
                pid: 5001,
                what: "process group",
                id: 6000
            }
        );
        assert_eq!(
            rejects_tree(&|t| t.zombies[0].sid = 6001),
            ValidationError::GroupMissing {
                pid: 5002,
                what: "session",
                id: 6001
            }
        );
        assert_eq!(
            rejects_tree(&|t| t.zombies[0].pid = 5001),
            ValidationError::DuplicateId(5001)
        );
        assert_eq!(
            rejects_tree(&|t| t.tasks[1].fds[0].file = 42),
            ValidationError::UndefinedObject {
                user: "process 5000 fd 0".into(),
                what: "open file",
                id: 42
            }
        );
        assert_eq!(
            rejects_tree(&|t| t.files[1].kind = FileKind::Pipe {
                pipe: 78,
                write_end: false
            }),
            ValidationError::UndefinedObject {
                user: "open file 2".into(),
                what: "pipe",
                id: 78
            }
        );
        assert_eq!(
            rejects_tree(&|t| t.shmem.clear()),
            ValidationError::UndefinedObject {
                user: "process 4242 VMA #2".into(),
                what: "shared memory object",
                id: 1
            }
        );
        assert!(matches!(
            rejects_tree(&|t| t.tasks[0].vmas[2].kind = VmaKind::Shmem {
                id: 1,
                offset: 0x1000
            }),
            ValidationError::BadShmem { id: 1, .. }
        ));
        assert_eq!(
            rejects_tree(&|t| t.files[2].id = 2),
            ValidationError::DuplicateObject {
                what: "open file",
                id: 2
            }
        );
        assert_eq!(
            rejects_tree(&|t| {
                t.files[1].kind = FileKind::Outside {
                    what: "pipe:[1]".into(),
                }
            }),
            ValidationError::OutsideNotStdio { pid: 4242, fd: 3 }
        );
        assert_eq!(rejects_tree(&|t| t.tasks.clear()), ValidationError::NoTasks);
    }

    #[test]
    fn event_file_rules() {
        use crate::model::{TimerFd, Timespec};
        let timer = || TimerFd {
            clock: 1,
            settime_flags: TFD_TIMER_ABSTIME,
            value: Timespec { sec: 1, nsec: 5 },
            interval: Timespec {
                sec: 0,
                nsec: 999_999_999,
            },
            ticks: 3,
            now: Timespec { sec: 100, nsec: 0 },
            boot_id: "b".into(),
        };
        let with = |kind: FileKind| {
            let mut img = sample_image();
            img.files[0].kind = kind;
            img.validate()
        };
        let id = sample_image().files[0].id;
        for ok in [
            FileKind::EventFd {
                count: u64::MAX - 1,
                semaphore: true,
            },
            FileKind::SignalFd { mask: u64::MAX },
            FileKind::TimerFd(timer()),
        ] {
            assert_eq!(with(ok.clone()), Ok(()), "{ok:?}");
        }
        assert_eq!(
            with(FileKind::EventFd {
                count: u64::MAX,
                semaphore: false
            }),
            Err(ValidationError::BadEventFd {
                id,
                count: u64::MAX
            })
        );
        let bad_timer = |f: &dyn Fn(&mut TimerFd), needle: &str| {
            let mut t = timer();
            f(&mut t);
            match with(FileKind::TimerFd(t)) {
                Err(e @ ValidationError::BadTimerFd { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
                }
                other => panic!("expected BadTimerFd ({needle}), got {other:?}"),
            }
        };
        bad_timer(&|t| t.clock = 2, "clock 2");
        bad_timer(&|t| t.clock = -1, "clock -1");
        bad_timer(&|t| t.settime_flags = 4, "settime flags");
        bad_timer(&|t| t.interval.nsec = 1_000_000_000, "interval");
        bad_timer(&|t| t.interval.nsec = -1, "interval");
        bad_timer(&|t| t.value.sec = -1, "time to expiry");
        bad_timer(&|t| t.now.nsec = 2_000_000_000, "clock reading");
        assert!(matches!(
            with(FileKind::TimerFd(TimerFd {
                boot_id: "x\0".into(),
                ..timer()
            })),
            Err(ValidationError::StringHasNul { .. })
        ));
    }

    /// `sample_image` with two epoll instances (4 registered in 5) and a
    /// pidfd of the root, each at an fd of the root.
    fn with_epolls() -> TreeImage {
        let mut img = sample_image();
        let target = |fd, file| EpollTarget {
            fd,
            file,
            events: 0x8000_0019,
            data: 0x1122_3344_5566_7788,
        };
        img.files.push(OpenFile {
            id: 4,
            flags: 2,
            pos: 0,
            kind: FileKind::Epoll {
                targets: vec![target(3, 2), target(9, 3)],
            },
        });
        img.files.push(OpenFile {
            id: 5,
            flags: 2,
            pos: 0,
            kind: FileKind::Epoll {
                targets: vec![target(5, 4)],
            },
        });
        img.files.push(OpenFile {
            id: 6,
            flags: 2,
            pos: 0,
            kind: FileKind::Pidfd { pid: 4242 },
        });
        for (fd, file) in [(5, 4), (6, 5), (7, 6)] {
            img.tasks[0].fds.push(FdEntry {
                fd,
                cloexec: false,
                file,
            });
        }
        img
    }

    fn epoll_targets(img: &mut TreeImage, id: u32) -> &mut Vec<EpollTarget> {
        match &mut img
            .files
            .iter_mut()
            .find(|f| f.id == id)
            .expect("file")
            .kind
        {
            FileKind::Epoll { targets } => targets,
            other => panic!("open file {id} is {other:?}"),
        }
    }

    #[test]
    fn epoll_and_pidfd_rules() {
        let img = with_epolls();
        assert_eq!(img.validate(), Ok(()));
        assert_eq!(epoll_order(&img.files), Ok(vec![4, 5]), "inner first");
        let rejects = |f: &dyn Fn(&mut TreeImage)| {
            let mut img = with_epolls();
            f(&mut img);
            img.validate().expect_err("image should have been rejected")
        };
        let e = rejects(&|i| epoll_targets(i, 4)[1].file = 99);
        assert_eq!(
            e,
            ValidationError::UndefinedObject {
                user: "epoll open file 4 (its registration of fd 9)".into(),
                what: "open file",
                id: 99
            }
        );
        assert!(
            e.to_string().contains("which the image does not define"),
            "{e}"
        );
        assert_eq!(
            rejects(&|i| epoll_targets(i, 4)[0].fd = -1),
            ValidationError::EpollBadFd { file: 4, fd: -1 }
        );
        // 5 in 4 as well as 4 in 5; an epoll in itself.
        let e = rejects(&|i| {
            epoll_targets(i, 4).push(EpollTarget {
                fd: 6,
                file: 5,
                events: 1,
                data: 0,
            })
        });
        assert!(
            matches!(e, ValidationError::EpollLoop { file: 4 | 5 }),
            "{e:?}"
        );
        let e = rejects(&|i| {
            epoll_targets(i, 5).push(EpollTarget {
                fd: 6,
                file: 5,
                events: 1,
                data: 0,
            })
        });
        assert_eq!(e, ValidationError::EpollLoop { file: 5 });
        let e = rejects(&|i| {
            i.files[5].kind = FileKind::Pidfd { pid: 1 };
        });
        assert_eq!(e, ValidationError::PidfdOutsideTree { file: 6, pid: 1 });
        assert!(e
            .to_string()
            .contains("process 1, which is not a process of the tree"));
        // A zombie of the tree is fine.
        let mut t = sample_tree();
        let z = t.zombies[0].pid;
        t.files.push(OpenFile {
            id: 9,
            flags: 2,
            pos: 0,
            kind: FileKind::Pidfd { pid: z },
        });
        t.tasks[0].fds.push(FdEntry {
            fd: 20,
            cloexec: true,
            file: 9,
        });
        assert_eq!(t.validate(), Ok(()));
    }
}

#[cfg(test)]
mod fs_kinds_tests {
    use super::tests::sample_image;
    use super::*;
    use crate::model::{FdEntry, FileLock, OpenFile};

    /// `sample_image` with a regular file (open file 9 at fd 9 of 4242), a
    /// FIFO on pipe 77 and an inotify instance, and a lock of each owner.
    fn image() -> TreeImage {
        let mut img = sample_image();
        let file = |id, kind| OpenFile {
            id,
            flags: 2,
            pos: 0,
            kind,
        };
        img.files.push(file(
            9,
            FileKind::Regular {
                path: "/tmp/x".into(),
                dev: 1,
                ino: 2,
            },
        ));
        img.files.push(file(
            10,
            FileKind::Fifo {
                path: "/tmp/ff".into(),
                dev: 1,
                ino: 3,
                pipe: 77,
            },
        ));
        img.files.push(file(
            11,
            FileKind::Inotify {
                watches: vec![InotifyWatch {
                    wd: 3,
                    path: "/tmp".into(),
                    mask: 0x100,
                }],
                queued: true,
            },
        ));
        for (fd, id) in [(9, 9), (10, 10), (11, 11)] {
            img.tasks[0].fds.push(FdEntry {
                fd,
                cloexec: false,
                file: id,
            });
        }
        let lock = |owner, start, len| FileLock {
            file: 9,
            owner,
            write: true,
            start,
            len,
        };
        img.locks = vec![
            lock(LockOwner::Flock, 0, 0),
            lock(LockOwner::Ofd, 10, 0),
            lock(LockOwner::Posix { pid: 4242 }, 0, 100),
        ];
        img
    }

    fn rejects(f: impl FnOnce(&mut TreeImage)) -> ValidationError {
        let mut img = image();
        f(&mut img);
        match img.validate() {
            Err(e) => e,
            Ok(()) => panic!("image should have been rejected"),
        }
    }

    #[test]
    fn fifos_inotify_and_locks_are_valid() {
        assert_eq!(image().validate(), Ok(()));
    }

    #[test]
    fn a_lock_on_an_undefined_file_is_refused() {
        let e = rejects(|i| i.locks[1].file = 99);
        assert_eq!(
            e,
            ValidationError::UndefinedObject {
                user: "lock #1".into(),
                what: "open file",
                id: 99
            }
        );
        assert!(e.to_string().contains("which the image does not define"));
    }

    #[test]
    fn bad_locks_are_refused() {
        let bad = |e: ValidationError| match e {
            ValidationError::BadLock { why, .. } => why,
            other => panic!("expected BadLock, got {other:?}"),
        };
        assert!(
            bad(rejects(|i| i.locks[2].owner = LockOwner::Posix { pid: 7 })).contains("process 7")
        );
        assert!(bad(rejects(|i| i.locks[0].start = 5)).contains("whole file"));
        assert!(bad(rejects(|i| i.locks[1].start = u64::MAX)).contains("beyond"));
        let outside = rejects(|i| {
            i.files[0].kind = FileKind::Outside {
                what: "pipe:[1]".into(),
            };
            i.locks[1].file = 1;
        });
        assert!(bad(outside).contains("outside the tree"));
    }

    #[test]
    fn bad_fifos_and_inotify_are_refused() {
        assert!(matches!(
            rejects(
                |i| if let FileKind::Fifo { pipe, .. } = &mut i.files[4].kind {
                    *pipe = 5
                }
            ),
            ValidationError::UndefinedObject {
                what: "pipe",
                id: 5,
                ..
            }
        ));
        let watches = |i: &mut TreeImage| match &mut i.files[5].kind {
            FileKind::Inotify { watches, .. } => watches.clone(),
            _ => unreachable!(),
        };
        let with = |w: Vec<InotifyWatch>| {
            rejects(move |i| {
                if let FileKind::Inotify { watches, .. } = &mut i.files[5].kind {
                    *watches = w;
                }
            })
        };
        let mut w = watches(&mut image());
        w.push(w[0].clone());
        assert!(
            matches!(with(w), ValidationError::BadInotify { file: 11, why } if why.contains("twice"))
        );
        let mut w = watches(&mut image());
        w[0].wd = 0;
        assert!(matches!(with(w), ValidationError::BadInotify { .. }));
        let mut w = watches(&mut image());
        w[0].mask = 0;
        assert!(matches!(with(w), ValidationError::BadInotify { .. }));
    }
}
