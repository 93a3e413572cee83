//! Semantic validation of a [`ProcessImage`].
//!
//! Everything that comes from outside (an image file, the wire) goes through
//! [`ProcessImage::validate`] before any of it is acted upon. The checks are
//! about *shape* and *bounds*: they make sure later stages can rely on sorted,
//! page-aligned VMAs, a sane thread list, bounded buffers and so on. They do
//! not check that the image is restorable on a given host (that is the
//! compatibility check's job).

use std::collections::{HashMap, HashSet};

use thiserror::Error;

use crate::model::{FdKind, PendingSignal, ProcessImage, Vma, VmaKind, PAGE_SIZE};

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

/// True if `x` is a multiple of [`PAGE_SIZE`].
pub fn is_page_aligned(x: u64) -> bool {
    x & (PAGE_SIZE - 1) == 0
}

/// Why a [`ProcessImage`] was rejected.
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
    #[error("fd {fd}: {found} bytes of pipe data (at most {max})")]
    PipeDataTooLarge { fd: i32, found: usize, max: usize },
    /// Pipe capacity above [`MAX_PIPE_DATA`].
    #[error("fd {fd}: pipe capacity {found} is above {max}")]
    PipeCapacityTooLarge { fd: i32, found: u32, max: usize },
    /// More than one fd of a pipe carries the pipe's contents.
    #[error("pipe {id}: contents stored on more than one fd (fd {fd} is the second)")]
    PipeDataDuplicated { id: u64, fd: i32 },
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
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !(1..=PID_MAX_LIMIT).contains(&self.pid) {
            return Err(ValidationError::BadPid(self.pid));
        }
        check_str(|| "host.arch".into(), &self.host.arch)?;
        check_str(|| "host.kernel".into(), &self.host.kernel)?;
        self.validate_vmas()?;
        self.validate_threads()?;
        self.validate_fds()?;
        self.validate_misc()?;
        Ok(())
    }

    fn validate_vmas(&self) -> Result<(), ValidationError> {
        validate_vmas(&self.vmas)
    }

    fn validate_threads(&self) -> Result<(), ValidationError> {
        let first = self.threads.first().ok_or(ValidationError::NoThreads)?;
        if first.tid != self.pid {
            return Err(ValidationError::FirstThreadNotLeader {
                tid: first.tid,
                pid: self.pid,
            });
        }
        let xs = self.host.xstate_size;
        if xs > MAX_XSTATE_SIZE {
            return Err(ValidationError::XstateSizeTooLarge {
                found: xs,
                max: MAX_XSTATE_SIZE,
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
        let mut pipe_data: HashMap<u64, i32> = HashMap::new();
        for e in &self.fds {
            let fd = e.fd;
            if !(0..=MAX_FD_NUMBER).contains(&fd) {
                return Err(ValidationError::BadFd { fd });
            }
            if !seen.insert(fd) {
                return Err(ValidationError::DuplicateFd { fd });
            }
            match &e.kind {
                FdKind::Regular { path, .. }
                | FdKind::Directory { path }
                | FdKind::CharDevice { path, .. } => {
                    check_str(|| format!("fd {fd} path"), path)?;
                }
                FdKind::Pipe {
                    id, data, capacity, ..
                } => {
                    if *capacity as usize > MAX_PIPE_DATA {
                        return Err(ValidationError::PipeCapacityTooLarge {
                            fd,
                            found: *capacity,
                            max: MAX_PIPE_DATA,
                        });
                    }
                    if let Some(d) = data {
                        if d.len() > MAX_PIPE_DATA {
                            return Err(ValidationError::PipeDataTooLarge {
                                fd,
                                found: d.len(),
                                max: MAX_PIPE_DATA,
                            });
                        }
                        if pipe_data.insert(*id, fd).is_some() {
                            return Err(ValidationError::PipeDataDuplicated { id: *id, fd });
                        }
                    }
                }
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
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::*;

    /// A small, valid image for tests.
    pub(crate) fn sample_image() -> ProcessImage {
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
        ProcessImage {
            host: HostInfo {
                arch: "x86_64".into(),
                kernel: "6.18.0".into(),
                xstate_size,
                xfeatures: 0x2e7,
            },
            pid: 4242,
            ppid: 1,
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
                    flags: 0,
                    cloexec: false,
                    pos: 0,
                    kind: FdKind::CharDevice {
                        path: "/dev/null".into(),
                        rdev: 0x103,
                    },
                },
                FdEntry {
                    fd: 3,
                    flags: 0,
                    cloexec: true,
                    pos: 0,
                    kind: FdKind::Pipe {
                        id: 77,
                        write_end: false,
                        data: Some(b"hello".to_vec()),
                        capacity: 65536,
                    },
                },
                FdEntry {
                    fd: 4,
                    flags: 1,
                    cloexec: true,
                    pos: 0,
                    kind: FdKind::Pipe {
                        id: 77,
                        write_end: true,
                        data: None,
                        capacity: 65536,
                    },
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
        }
    }

    #[test]
    fn sample_is_valid() {
        assert_eq!(sample_image().validate(), Ok(()));
    }

    fn rejects(f: impl FnOnce(&mut ProcessImage)) -> ValidationError {
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
            rejects(|i| i.vmas[1].start += 1),
            ValidationError::VmaNotAligned { index: 1, .. }
        ));
        assert!(matches!(
            rejects(|i| i.vmas[1].end = i.vmas[1].start),
            ValidationError::VmaEmpty { index: 1, .. }
        ));
        assert!(matches!(
            rejects(|i| i.vmas[1].start = 0x40_4000),
            ValidationError::VmaOverlap {
                index: 1,
                start: 0x40_4000,
                prev_end: 0x40_5000
            }
        ));
        assert!(matches!(
            rejects(|i| i.vmas.swap(0, 1)),
            ValidationError::VmaOverlap { index: 1, .. }
        ));
        assert!(matches!(
            rejects(|i| i.vmas[2].end = TASK_SIZE + PAGE_SIZE),
            ValidationError::VmaAboveTaskSize { index: 2, .. }
        ));
        assert!(matches!(
            rejects(|i| i.vmas.push(Vma {
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
            rejects(|i| if let VmaKind::File(f) = &mut i.vmas[0].kind {
                f.offset = 12
            }),
            ValidationError::VmaBadOffset { index: 0, .. }
        ));
        // Touching VMAs are fine.
        let mut img = sample_image();
        img.vmas[1].start = 0x40_5000;
        assert_eq!(img.validate(), Ok(()));
    }

    #[test]
    fn thread_rules() {
        assert_eq!(rejects(|i| i.threads.clear()), ValidationError::NoThreads);
        assert_eq!(
            rejects(|i| i.threads.swap(0, 1)),
            ValidationError::FirstThreadNotLeader {
                tid: 4243,
                pid: 4242
            }
        );
        assert_eq!(
            rejects(|i| i.threads[1].tid = 4242),
            ValidationError::DuplicateTid { tid: 4242 }
        );
        assert_eq!(
            rejects(|i| i.threads[1].tid = PID_MAX_LIMIT + 1),
            ValidationError::BadTid {
                index: 1,
                tid: PID_MAX_LIMIT + 1
            }
        );
        assert_eq!(
            rejects(|i| {
                i.threads[1].xstate.pop();
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
            rejects(|i| i.threads[1].pending.push(PendingSignal {
                signo: 65,
                siginfo: vec![0; 128]
            })),
            ValidationError::BadPendingSignal { signo: 65, .. }
        ));
        assert_eq!(rejects(|i| i.pid = 0), ValidationError::BadPid(0));
    }

    #[test]
    fn fd_and_misc_rules() {
        assert_eq!(
            rejects(|i| i.fds[2].fd = 3),
            ValidationError::DuplicateFd { fd: 3 }
        );
        assert_eq!(
            rejects(|i| i.fds[0].fd = -1),
            ValidationError::BadFd { fd: -1 }
        );
        assert!(matches!(
            rejects(|i| if let FdKind::Pipe { data, .. } = &mut i.fds[1].kind {
                *data = Some(vec![0; MAX_PIPE_DATA + 1])
            }),
            ValidationError::PipeDataTooLarge { fd: 3, .. }
        ));
        assert_eq!(
            rejects(|i| if let FdKind::Pipe { data, .. } = &mut i.fds[2].kind {
                *data = Some(vec![])
            }),
            ValidationError::PipeDataDuplicated { id: 77, fd: 4 }
        );
        assert_eq!(
            rejects(|i| i.misc.sigactions.truncate(63)),
            ValidationError::SigactionCount { found: 63 }
        );
        let mut img = sample_image();
        img.misc.sigactions.clear();
        assert_eq!(img.validate(), Ok(()));
        assert!(matches!(
            rejects(|i| i.misc.cwd = "/".repeat(MAX_PATH_LEN + 1)),
            ValidationError::StringTooLong { found: 4097, .. }
        ));
        assert!(matches!(
            rejects(
                |i| if let FdKind::CharDevice { path, .. } = &mut i.fds[0].kind {
                    *path = "a".repeat(5000)
                }
            ),
            ValidationError::StringTooLong { found: 5000, .. }
        ));
        assert!(matches!(
            rejects(|i| i.mm.exe_path = "/bin/\0x".into()),
            ValidationError::StringHasNul { .. }
        ));
        assert_eq!(
            rejects(|i| i.mm.auxv.push(1)),
            ValidationError::BadAuxv { found: 5 }
        );
        assert_eq!(
            rejects(|i| i.misc.rlimits.push(i.misc.rlimits[0])),
            ValidationError::BadRlimit {
                index: 1,
                resource: 7
            }
        );
    }
}
