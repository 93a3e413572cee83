//! The image model: everything ferry captures about a process tree,
//! independent of where it is stored (an image directory) or how it travels
//! (the wire).
//!
//! ```text
//!  TreeImage ─┬─ host: HostInfo
//!             ├─ tasks: [ProcessImage]  pid, ppid, pgid, sid, vmas, mm, threads,
//!             │                         fds: [FdEntry {fd, cloexec, file: FileId}]
//!             ├─ zombies: [Zombie]      pid, ppid, pgid, sid, wait status
//!             ├─ files: [OpenFile]      open file descriptions by id (offset, flags, kind)
//!             ├─ pipes: [PipeObject]    pipes by id (capacity, unread data)
//!             └─ shmem: [ShmemObject]   shared memory objects by id (kind, size);
//!                                       mapped by VmaKind::Shmem, opened by FileKind::Shmem
//! ```
//!
//! Tasks refer to shared objects by id, never by copy: two fds (in one
//! process or in two) with the same [`FileId`] share one open file
//! description (offset, status flags), two areas with the same [`ShmemId`]
//! share their memory. This is the shape of the reference tool's images
//! (`pstree`, `fdinfo` + file entries by id).
//!
//! Memory *contents* are not part of this model: they live in page stores
//! (see [`crate::pages`]), one per page space: a task's address space
//! (keyed by virtual address) or a shared memory object (keyed by offset).
//! This model describes the shape of the address spaces and all non-memory
//! state.

use serde::{Deserialize, Serialize};

/// Size of a page on every architecture ferry supports today (x86-64).
pub const PAGE_SIZE: u64 = 4096;

/// Id of an open file description ([`OpenFile`]) within one [`TreeImage`].
pub type FileId = u32;
/// Id of a pipe ([`PipeObject`]) within one [`TreeImage`].
pub type PipeId = u32;
/// Id of a shared memory object ([`ShmemObject`]) within one [`TreeImage`].
pub type ShmemId = u32;
/// Id of a deleted file ([`DeletedFile`]) within one [`TreeImage`].
pub type DeletedId = u32;

/// A checkpointed process tree: the root process and all its descendants,
/// over the objects they share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeImage {
    /// Where the image was taken.
    pub host: HostInfo,
    /// Live processes; the root comes first, every parent before its
    /// children.
    pub tasks: Vec<ProcessImage>,
    /// Dead children not yet reaped by their parent.
    pub zombies: Vec<Zombie>,
    /// Open file descriptions, by id.
    pub files: Vec<OpenFile>,
    /// Pipes (and their unread data), by id.
    pub pipes: Vec<PipeObject>,
    /// Shared memory objects, by id (their contents are in page stores).
    pub shmem: Vec<ShmemObject>,
    /// Regular files that were deleted while open, by id, with their
    /// contents.
    pub deleted: Vec<DeletedFile>,
    /// File locks held at the freeze (flock, POSIX, OFD), taken again by
    /// the same owner on restore.
    pub locks: Vec<FileLock>,
}

impl TreeImage {
    /// The root process of the tree.
    pub fn root(&self) -> Option<&ProcessImage> {
        self.tasks.first()
    }
    /// The PID of the root process (0 for an empty image, never valid).
    pub fn root_pid(&self) -> i32 {
        self.root().map_or(0, |t| t.pid)
    }
    /// Every PID and TID the tree needs, live tasks and zombies.
    pub fn all_ids(&self) -> Vec<i32> {
        let mut ids: Vec<i32> = Vec::new();
        for t in &self.tasks {
            ids.push(t.pid);
            ids.extend(
                t.threads
                    .iter()
                    .map(|th| th.tid)
                    .filter(|&tid| tid != t.pid),
            );
        }
        ids.extend(self.zombies.iter().map(|z| z.pid));
        ids
    }
    /// The task with PID `pid`.
    pub fn task(&self, pid: i32) -> Option<&ProcessImage> {
        self.tasks.iter().find(|t| t.pid == pid)
    }
    /// The open file description `id`.
    pub fn file(&self, id: FileId) -> Option<&OpenFile> {
        self.files.iter().find(|f| f.id == id)
    }
    /// The pipe `id`.
    pub fn pipe(&self, id: PipeId) -> Option<&PipeObject> {
        self.pipes.iter().find(|p| p.id == id)
    }
    /// The shared memory object `id`.
    pub fn shmem_object(&self, id: ShmemId) -> Option<&ShmemObject> {
        self.shmem.iter().find(|s| s.id == id)
    }
    /// The deleted file `id`.
    pub fn deleted_file(&self, id: DeletedId) -> Option<&DeletedFile> {
        self.deleted.iter().find(|d| d.id == id)
    }
}

/// The shape of a tree without its state: who is who, the areas of every
/// address space and the shared memory objects. Pre-copy sends it with
/// every pass; the destination builds the tree from it before the freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeLayout {
    /// Live processes, root first, each after its parent.
    pub tasks: Vec<TaskLayout>,
    pub zombies: Vec<Zombie>,
    pub shmem: Vec<ShmemObject>,
}

/// One process of a [`TreeLayout`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLayout {
    pub id: TaskIdentity,
    /// Its memory areas, sorted, non-overlapping.
    pub vmas: Vec<Vma>,
}

impl TreeLayout {
    /// The root's PID (0 for an empty layout, never valid).
    pub fn root_pid(&self) -> i32 {
        self.tasks.first().map_or(0, |t| t.id.pid)
    }
    /// The layout of process `pid`.
    pub fn task(&self, pid: i32) -> Option<&TaskLayout> {
        self.tasks.iter().find(|t| t.id.pid == pid)
    }
    /// The same processes, zombies and shared memory objects as `other`
    /// (areas may differ).
    pub fn same_members(&self, other: &TreeLayout) -> bool {
        self.zombies == other.zombies
            && self.shmem == other.shmem
            && self.tasks.len() == other.tasks.len()
            && self
                .tasks
                .iter()
                .zip(&other.tasks)
                .all(|(a, b)| a.id == b.id)
    }
}

impl TreeImage {
    /// The layout of this tree.
    pub fn layout(&self) -> TreeLayout {
        TreeLayout {
            tasks: self
                .tasks
                .iter()
                .map(|t| TaskLayout {
                    id: t.identity(),
                    vmas: t.vmas.clone(),
                })
                .collect(),
            zombies: self.zombies.clone(),
            shmem: self.shmem.clone(),
        }
    }
}

impl ProcessImage {
    /// PID, parent, group and session.
    pub fn identity(&self) -> TaskIdentity {
        TaskIdentity {
            pid: self.pid,
            ppid: self.ppid,
            pgid: self.pgid,
            sid: self.sid,
        }
    }
}

/// Identity of a process in the tree: its PID, parent, process group and
/// session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskIdentity {
    pub pid: i32,
    /// Parent PID at checkpoint time. For the root it names a process
    /// outside the tree (informational only).
    pub ppid: i32,
    /// Process group id.
    pub pgid: i32,
    /// Session id.
    pub sid: i32,
}

/// A child that has exited but was not reaped yet: restored as a zombie
/// with the same wait status, so that its parent's `waitpid` still sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zombie {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// The status `waitpid` reports (exit code << 8, or the signal number).
    pub wait_status: i32,
}

/// A checkpointed process (one thread group) of a [`TreeImage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessImage {
    /// Thread-group id (the PID the user sees).
    pub pid: i32,
    /// Parent PID at checkpoint time (see [`TaskIdentity::ppid`]).
    pub ppid: i32,
    /// Process group id.
    pub pgid: i32,
    /// Session id.
    pub sid: i32,
    /// Memory areas, sorted by start address, non-overlapping.
    pub vmas: Vec<Vma>,
    /// The mm fields set with `PR_SET_MM_MAP`.
    pub mm: MmFields,
    /// Every thread; the thread whose tid == pid comes first.
    pub threads: Vec<ThreadState>,
    /// Open file descriptors, sorted by number.
    pub fds: Vec<FdEntry>,
    /// Process-wide state: credentials, signals, limits, paths.
    pub misc: ProcessMisc,
}

/// Facts about the host an image was taken on, used for compatibility checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// `uname -m`, e.g. `x86_64`.
    pub arch: String,
    /// `uname -r`.
    pub kernel: String,
    /// Size in bytes of the XSAVE area (CPUID 0xD,0 EBX).
    pub xstate_size: u32,
    /// XCR0: the XSAVE features enabled by the kernel.
    pub xfeatures: u64,
}

/// What backs a memory area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// Private anonymous memory (heap, stacks, anonymous mmaps).
    Anonymous,
    /// A private mapping of a file, at `offset` into it.
    File(FileMapping),
    /// A shared mapping of a regular file: its contents live in the file.
    SharedFile(FileMapping),
    /// `[vdso]`, `[vvar]`, `[vvar_vclock]`, ... : kernel special areas that are
    /// moved into place, never written. `name` is as shown in /proc/PID/maps.
    Special { name: String },
    /// A shared mapping of a shared memory object of the tree
    /// (`MAP_SHARED|MAP_ANONYMOUS`, memfd, POSIX or SysV shared memory), at
    /// `offset` bytes into it. Its contents live in the object's page store.
    Shmem { id: ShmemId, offset: u64 },
}

/// A file mapped into memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMapping {
    /// Absolute path of the file.
    pub path: String,
    /// Offset into the file of the area's first byte.
    pub offset: u64,
    /// Device and inode at checkpoint time, to detect a replaced file.
    pub dev: u64,
    pub ino: u64,
    /// Size and modification time at checkpoint time.
    pub size: u64,
    pub mtime_ns: i128,
}

/// One memory area (a line of /proc/PID/maps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    /// First byte (page aligned).
    pub start: u64,
    /// One past the last byte (page aligned).
    pub end: u64,
    /// `PROT_*` bits.
    pub prot: u32,
    /// `MAP_*` bits that matter at restore: `MAP_PRIVATE`/`MAP_SHARED`,
    /// `MAP_GROWSDOWN`.
    pub flags: u32,
    /// What backs it.
    pub kind: VmaKind,
    /// The name shown in maps (`[heap]`, `[stack]`, `[anon:foo]`), if any.
    pub name: Option<String>,
}

impl Vma {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    /// True for an empty area (never in a valid image).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    /// True if `[addr, addr+len)` lies inside this area.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.start && addr.checked_add(len).is_some_and(|e| e <= self.end)
    }
}

/// The fields of `struct prctl_mm_map` (see `PR_SET_MM_MAP`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// Raw contents of /proc/PID/auxv (pairs of u64).
    pub auxv: Vec<u64>,
    /// Path of the executable (/proc/PID/exe).
    pub exe_path: String,
}

/// x86-64 `struct user_regs_struct`, field for field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

/// rseq registration of a thread (from `PTRACE_GET_RSEQ_CONFIGURATION`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub abi_pointer: u64,
    pub len: u32,
    pub flags: u32,
    pub signature: u32,
}

/// An alternate signal stack (`stack_t`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

/// A queued signal, as `siginfo_t` bytes (128 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSignal {
    pub signo: i32,
    pub siginfo: Vec<u8>,
}

/// Everything per thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadState {
    pub tid: i32,
    /// `/proc/PID/task/TID/comm`.
    pub comm: String,
    pub regs: GpRegs,
    /// XSAVE area (NT_X86_XSTATE), `HostInfo::xstate_size` bytes.
    pub xstate: Vec<u8>,
    /// Blocked signals.
    pub sigmask: u64,
    pub sigaltstack: SigAltStack,
    /// `set_tid_address` value (`PR_GET_TID_ADDRESS`).
    pub clear_child_tid: u64,
    /// Robust futex list head and length (`get_robust_list`).
    pub robust_list: u64,
    pub robust_list_len: u64,
    /// rseq registration, if the thread registered one.
    pub rseq: Option<Rseq>,
    /// Signals pending for this thread only.
    pub pending: Vec<PendingSignal>,
}

/// A signal disposition, in the kernel's `struct sigaction` layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// Credentials of the process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inheritable: u64,
    pub cap_permitted: u64,
    pub cap_effective: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub no_new_privs: bool,
}

/// A resource limit (`RLIMIT_*` number, soft, hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Process-wide state that is not memory, threads or fds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessMisc {
    pub creds: Credentials,
    /// Index i holds the action of signal i+1, for signals 1..=64.
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole thread group.
    pub shared_pending: Vec<PendingSignal>,
    pub cwd: String,
    pub root: String,
    pub umask: u32,
    pub rlimits: Vec<Rlimit>,
    pub personality: u32,
    /// The signal sent when the parent dies (`PR_SET_PDEATHSIG`), 0 for none.
    pub pdeath_signal: i32,
    /// `PR_GET_DUMPABLE`: 0 (not dumpable: no core, no ptrace by its
    /// user, /proc files owned by root), 1, or 2 (`suid_dumpable` mode).
    pub dumpable: u32,
    /// `PR_GET_SECUREBITS` of the main thread (`SECBIT_*`, locks included).
    pub securebits: u32,
}

/// One open file descriptor of a process: a number in its fd table that
/// refers to an open file description of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdEntry {
    /// The fd number.
    pub fd: i32,
    /// Close-on-exec (a property of the fd, not of the description).
    pub cloexec: bool,
    /// The open file description it refers to.
    pub file: FileId,
}

/// An open file description: what `open` (or `pipe`, `memfd_create`)
/// returned, shared by every fd `dup`'d or inherited from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFile {
    pub id: FileId,
    /// `O_*` status flags from /proc/PID/fdinfo (access mode, O_APPEND, ...),
    /// without `O_CLOEXEC`.
    pub flags: u32,
    /// The file position.
    pub pos: u64,
    /// What it refers to.
    pub kind: FileKind,
}

/// The kinds of open file ferry knows how to restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file, reopened by path.
    Regular { path: String, dev: u64, ino: u64 },
    /// A directory, reopened by path.
    Directory { path: String },
    /// A character device (/dev/null, a tty), reopened by path.
    CharDevice { path: String, rdev: u64 },
    /// One end of a pipe of the tree.
    Pipe { pipe: PipeId, write_end: bool },
    /// A shared memory object of the tree opened as a file (a memfd, a file
    /// in /dev/shm).
    Shmem { id: ShmemId },
    /// A regular file deleted while open: recreated, unnamed, from its saved
    /// contents.
    Deleted { id: DeletedId },
    /// Standard input, output or error that reached outside the tree (a
    /// pipe or socket of a shell, a supervisor or journald, a terminal).
    /// `what` says what it was (the fd's link text). On restore it follows
    /// the stdio policy: reads see end of file, writes go to a log file.
    Outside { what: String },
    /// An eventfd (`eventfd(2)`): its counter, recreated with the same
    /// value and mode; non-blocking is in the description's flags.
    EventFd {
        /// The counter (`eventfd-count:` of fdinfo), below `u64::MAX`.
        count: u64,
        /// `EFD_SEMAPHORE`: each read takes 1 from the counter.
        semaphore: bool,
    },
    /// A timerfd (`timerfd_create(2)`), armed or not, with the expirations
    /// not yet read.
    TimerFd(TimerFd),
    /// A signalfd (`signalfd(2)`). The signals it would read are the
    /// pending signals of the process and its threads, which travel with
    /// them ([`ProcessMisc::shared_pending`], [`ThreadState::pending`]).
    SignalFd {
        /// The signals it reads: signal n is bit n-1 (`sigmask:` of fdinfo).
        mask: u64,
    },
    /// A named pipe (FIFO) reopened by path (checked by dev/ino); its
    /// unread data is pipe `pipe` (shared by every description of it).
    Fifo {
        path: String,
        dev: u64,
        ino: u64,
        pipe: PipeId,
    },
    /// An inotify instance: its watches, recreated with the same watch
    /// descriptors. `queued`: events were waiting at the freeze; they are
    /// not carried, the restored instance reports `IN_Q_OVERFLOW` instead.
    Inotify {
        watches: Vec<InotifyWatch>,
        queued: bool,
    },
    /// An epoll instance, with every file registered in it (made again on
    /// restore, inner epoll instances before the ones they are registered
    /// in).
    Epoll { targets: Vec<EpollTarget> },
    /// A pidfd (`pidfd_open`, `clone(CLONE_PIDFD)`) of a process of the
    /// tree (live or zombie), which has the same PID after restore. Its
    /// `PIDFD_NONBLOCK`/`PIDFD_THREAD` flags are in the status flags.
    Pidfd { pid: i32 },
    /// A TCP socket (see [`crate::net`]).
    Tcp { socket: Box<crate::net::TcpSocket> },
    /// A UDP socket (see [`crate::net`]).
    Udp { socket: Box<crate::net::UdpSocket> },
    /// A unix domain socket (see [`crate::unix`]).
    Unix {
        socket: Box<crate::unix::UnixSocket>,
    },
}

/// One watch of an inotify instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    /// Its watch descriptor.
    pub wd: i32,
    /// The watched inode's path.
    pub path: String,
    /// Its event mask (`IN_*` bits, as fdinfo shows them).
    pub mask: u32,
}

/// Who owns a [`FileLock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockOwner {
    /// `flock(2)`: the open file description.
    Flock,
    /// `F_OFD_SETLK`: the open file description.
    Ofd,
    /// `F_SETLK` (POSIX record lock): the process `pid`.
    Posix { pid: i32 },
}

/// A lock held on an open file at the freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    /// The open file description it was taken through.
    pub file: FileId,
    pub owner: LockOwner,
    /// A write (exclusive) lock; otherwise a read (shared) one.
    pub write: bool,
    /// First byte (0 for flock).
    pub start: u64,
    /// Number of bytes, 0 for "to the end of the file" (and for flock).
    pub len: u64,
}

/// One registration of an epoll instance (a `tfd:` line of its fdinfo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollTarget {
    /// The fd number it was registered under (`EPOLL_CTL_ADD`): with the
    /// file, the key that `EPOLL_CTL_MOD`/`DEL` look it up by. The file may
    /// have been closed or dup'd since; no process needs to hold it at this
    /// number.
    pub fd: i32,
    /// The open file description registered.
    pub file: FileId,
    /// Event mask (`EPOLLIN`, `EPOLLET`, `EPOLLONESHOT`, ...), as the
    /// kernel holds it (a fired one-shot registration keeps only its flag
    /// bits).
    pub events: u32,
    /// The user data returned with its events.
    pub data: u64,
}

/// A regular file that was deleted while the tree held it open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedFile {
    pub id: DeletedId,
    /// Where it was (without " (deleted)"): it is recreated, unnamed, in
    /// that directory if it exists.
    pub path: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Its whole contents.
    pub data: Vec<u8>,
}

/// A pipe whose ends are all inside the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeObject {
    pub id: PipeId,
    /// Pipe capacity (`F_GETPIPE_SZ`).
    pub capacity: u32,
    /// Unread contents.
    pub data: Vec<u8>,
}

/// A shared memory object of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmemObject {
    pub id: ShmemId,
    /// Size in bytes (page aligned for SysV and anonymous memory).
    pub size: u64,
    pub kind: ShmemKind,
}

/// What a shared memory object is, with what recreating it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShmemKind {
    /// `mmap(MAP_SHARED|MAP_ANONYMOUS)`, shared across fork (`/dev/zero
    /// (deleted)` in maps).
    Anonymous,
    /// `memfd_create(name)` with its seals (`F_GET_SEALS`).
    Memfd { name: String, seals: u32 },
    /// A file in `/dev/shm` (`shm_open`), which is local to each host: its
    /// contents travel with the tree.
    Posix {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
        /// The file was unlinked while still mapped or open (maps show
        /// `PATH (deleted)`; `path` is without that suffix): restored as
        /// an unlinked file too.
        deleted: bool,
    },
    /// A SysV segment (`shmget`), recreated with the same id and key.
    SysV {
        shmid: i32,
        key: i32,
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

/// A `struct timespec`: seconds and nanoseconds (`0..1_000_000_000`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: i64,
}

impl Timespec {
    /// Zero: a disarmed timer's value, a one-shot timer's interval.
    pub fn is_zero(&self) -> bool {
        self.sec == 0 && self.nsec == 0
    }
}

/// The state of a timerfd.
///
/// `value` is relative (time left until the next expiry when it was read),
/// so it means the same on any host. An absolute timer
/// (`TFD_TIMER_ABSTIME`) expires at `now + value` on its clock: restored
/// where that clock reads the same (`CLOCK_REALTIME`, or
/// `CLOCK_MONOTONIC`/`CLOCK_BOOTTIME` within the boot `boot_id`) it keeps
/// that absolute expiry; elsewhere it expires `value` after the restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerFd {
    /// `CLOCK_REALTIME`, `CLOCK_MONOTONIC`, `CLOCK_BOOTTIME`,
    /// `CLOCK_REALTIME_ALARM` or `CLOCK_BOOTTIME_ALARM`.
    pub clock: i32,
    /// `TFD_TIMER_ABSTIME` and `TFD_TIMER_CANCEL_ON_SET`, as last given to
    /// `timerfd_settime` (`settime flags:` of fdinfo).
    pub settime_flags: u32,
    /// Time left until the next expiry; zero: disarmed.
    pub value: Timespec,
    /// The period; zero: one-shot.
    pub interval: Timespec,
    /// Expirations not yet read (restored with `TFD_IOC_SET_TICKS`).
    pub ticks: u64,
    /// The reading of `clock` on the source when `value` was read.
    pub now: Timespec,
    /// The source's `/proc/sys/kernel/random/boot_id`: readings of
    /// `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` compare only within one boot.
    pub boot_id: String,
}

/// The clocks a timerfd can use: `CLOCK_REALTIME`, `CLOCK_MONOTONIC`,
/// `CLOCK_BOOTTIME`, `CLOCK_REALTIME_ALARM`, `CLOCK_BOOTTIME_ALARM`.
pub const TIMERFD_CLOCKS: [i32; 5] = [0, 1, 7, 8, 9];
/// `TFD_TIMER_ABSTIME`.
pub const TFD_TIMER_ABSTIME: u32 = 1;
/// `TFD_TIMER_CANCEL_ON_SET`.
pub const TFD_TIMER_CANCEL_ON_SET: u32 = 2;
