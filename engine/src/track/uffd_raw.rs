//! Minimal raw userfaultfd helpers.
//!
//! The `userfaultfd` crate lacks `UFFD_FEATURE_WP_ASYNC`, `UFFDIO_MOVE` and
//! friends, and the machine's C headers are older than the kernel, so the UAPI
//! structures of `include/uapi/linux/userfaultfd.h` are defined here, with
//! their sizes and the ioctl numbers checked at compile time.
//!
//! This module covers what `migrate check` and the async write-protect dirty
//! tracker need: create a userfaultfd (syscall or `/dev/userfaultfd`), run the
//! `UFFDIO_API` handshake, register a range in write-protect mode and
//! (un)protect it. It also holds [`AnonMapping`], a private anonymous mapping
//! used by probes and tests.

use std::ffi::c_void;
use std::fs::OpenOptions;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags};

/// `UFFD_API`: the only API version the kernel knows.
pub const UFFD_API: u64 = 0xAA;

/// Kernel reports write-protect faults with `UFFD_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `fork()` of a registered process is reported as an event.
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `mremap()` of a registered range is reported as an event.
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `madvise(MADV_DONTNEED/REMOVE)` of a registered range is reported.
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Missing-page mode works on hugetlbfs.
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// Missing-page mode works on shmem / tmpfs.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `munmap()` of a registered range is reported as an event.
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Faults raise SIGBUS instead of being queued.
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
/// Fault messages carry the faulting thread id.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// Minor-fault mode works on hugetlbfs.
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// Minor-fault mode works on shmem.
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// Fault addresses are exact (not page-aligned).
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
/// Write-protect mode works on hugetlbfs and shmem.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Write protection also covers pages that are not populated yet.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFDIO_POISON` is available.
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
/// Asynchronous write protection: writes just clear the WP bit, no message
/// (the base of `PAGEMAP_SCAN` dirty tracking).
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_MOVE` is available.
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

/// Names of all feature bits known to this module, lowest bit first.
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
    (UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"),
    (UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"),
    (UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
    (UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    (UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    (UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
    (UFFD_FEATURE_SIGBUS, "SIGBUS"),
    (UFFD_FEATURE_THREAD_ID, "THREAD_ID"),
    (UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
    (UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    (UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
    (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    (UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
    (UFFD_FEATURE_POISON, "POISON"),
    (UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"),
    (UFFD_FEATURE_MOVE, "MOVE"),
];

/// `UFFDIO_REGISTER_MODE_MISSING`: report faults on missing pages.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`: report (or, with WP_ASYNC, track) writes.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_REGISTER_MODE_MINOR`: report minor faults.
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

/// `UFFDIO_WRITEPROTECT_MODE_WP`: set protection (clear it when absent).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`: do not wake blocked faulting threads.
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// `UFFD_USER_MODE_ONLY` flag of `userfaultfd(2)`: only user-mode faults.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// Linux `_IOC` encoding (x86-64 / generic layout).
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0xAA,
    0x3F,
    std::mem::size_of::<UffdioApi>(),
);
/// `UFFDIO_REGISTER = _IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0xAA,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
/// `UFFDIO_UNREGISTER = _IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u32 = ioc(IOC_READ, 0xAA, 0x01, std::mem::size_of::<UffdioRange>());
/// `UFFDIO_WRITEPROTECT = _IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0xAA,
    0x06,
    std::mem::size_of::<UffdioWriteprotect>(),
);
/// `USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u32 = ioc(IOC_NONE, 0xAA, 0x00, 0);

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);

/// Result of the `UFFDIO_API` handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiInfo {
    /// Feature bits the kernel offers (when asked with 0) or has enabled.
    pub features: u64,
    /// Bit mask of the ioctls (`1 << _UFFDIO_*`) available on the fd.
    pub ioctls: u64,
}

/// An owned userfaultfd file descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

/// Runs `ioctl(fd, req, arg)` with a pointer argument.
///
/// # Safety
/// `arg` must point to a live, properly initialised value of the exact type
/// the kernel expects for `req`.
unsafe fn ioctl_ptr<T>(fd: RawFd, req: u32, arg: *mut T) -> io::Result<i32> {
    // SAFETY: forwarded contract: `arg` is valid for the structure `req` reads/writes.
    let rc = unsafe { libc::ioctl(fd, req as libc::Ioctl, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Raw `userfaultfd(flags)` system call, returning an owned fd.
fn sys_userfaultfd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes one integer argument and touches no user memory.
    let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    fd_from_rc(rc)
}

/// `ioctl(dev, USERFAULTFD_IOC_NEW, flags)` on an open `/dev/userfaultfd`.
fn dev_ioc_new(dev: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value, no memory is accessed.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW as libc::Ioctl,
            flags as libc::c_long,
        )
    };
    fd_from_rc(rc as libc::c_long)
}

/// Turns a syscall return value that is a new fd into an [`OwnedFd`].
fn fd_from_rc(rc: libc::c_long) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Uffd {
    /// Creates a userfaultfd with the `userfaultfd(2)` system call
    /// (`O_CLOEXEC | O_NONBLOCK`). The handshake ([`Uffd::api`]) is still due.
    pub fn new() -> io::Result<Self> {
        Self::with_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
    }

    /// Creates a userfaultfd with explicit `userfaultfd(2)` flags
    /// (`O_CLOEXEC`, `O_NONBLOCK`, [`UFFD_USER_MODE_ONLY`]).
    pub fn with_flags(flags: i32) -> io::Result<Self> {
        Ok(Self {
            fd: sys_userfaultfd(flags)?,
        })
    }

    /// Creates a userfaultfd through `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`),
    /// the path that works when the syscall is restricted by
    /// `vm.unprivileged_userfaultfd`.
    pub fn from_dev() -> io::Result<Self> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        Ok(Self {
            fd: dev_ioc_new(dev.as_fd(), libc::O_CLOEXEC | libc::O_NONBLOCK)?,
        })
    }

    /// Wraps an existing userfaultfd, e.g. one taken from another process
    /// with `pidfd_getfd` (its ioctls then act on that process's memory).
    pub fn from_owned(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// The fd itself, e.g. to hand it to another userfaultfd library.
    pub fn into_owned(self) -> OwnedFd {
        self.fd
    }

    /// `UFFDIO_API` handshake requesting `features`. With `features == 0`
    /// the kernel reports every feature it offers. A userfaultfd accepts one
    /// handshake only; use [`available_features`] to query first.
    pub fn api(&self, features: u64) -> io::Result<ApiInfo> {
        let mut arg = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `arg` is a live `struct uffdio_api`, the type UFFDIO_API expects.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), UFFDIO_API, &mut arg) }?;
        Ok(ApiInfo {
            features: arg.features,
            ioctls: arg.ioctls,
        })
    }

    /// `UFFDIO_REGISTER` of `[start, start + len)` with `mode`
    /// (`UFFDIO_REGISTER_MODE_*`); returns the ioctl mask usable on the range.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<u64> {
        let mut arg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: `arg` is a live `struct uffdio_register`, as UFFDIO_REGISTER expects.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut arg) }?;
        Ok(arg.ioctls)
    }

    /// `UFFDIO_UNREGISTER` of `[start, start + len)`.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut arg = UffdioRange { start, len };
        // SAFETY: `arg` is a live `struct uffdio_range`, as UFFDIO_UNREGISTER expects.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut arg) }?;
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT`: write-protect (`protect == true`) or unprotect
    /// `[start, start + len)`, which must be registered with `MODE_WP`.
    pub fn writeprotect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mut arg = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: `arg` is a live `struct uffdio_writeprotect`, as UFFDIO_WRITEPROTECT expects.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut arg) }?;
        Ok(())
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Feature bits this kernel offers, from a handshake with `features = 0`
/// on a throw-away userfaultfd.
pub fn available_features() -> io::Result<u64> {
    Ok(Uffd::new()?.api(0)?.features)
}

/// Names of the known feature bits set in `bits`; unknown bits appear as
/// `bit<N>`.
pub fn feature_names(bits: u64) -> Vec<String> {
    let mut names = Vec::new();
    for bit in 0..64 {
        let mask = 1u64 << bit;
        if bits & mask == 0 {
            continue;
        }
        match FEATURE_NAMES.iter().find(|(m, _)| *m == mask) {
            Some((_, name)) => names.push((*name).to_string()),
            None => names.push(format!("bit{bit}")),
        }
    }
    names
}

/// Size of a base page in bytes.
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a configuration value.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(v).ok().filter(|&v| v > 0).unwrap_or(4096)
}

/// A private anonymous read-write mapping owned by this process, unmapped on
/// drop. Used by probes and tests as memory to track.
#[derive(Debug)]
pub struct AnonMapping {
    ptr: NonNull<c_void>,
    len: usize,
    page: usize,
}

/// `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS)`.
fn map_anon(len: NonZeroUsize) -> io::Result<NonNull<c_void>> {
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases no
    // existing Rust object.
    unsafe {
        nix::sys::mman::mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_ANONYMOUS,
        )
    }
    .map_err(io::Error::from)
}

/// `munmap(ptr, len)` of a mapping made by [`map_anon`].
fn unmap_anon(ptr: NonNull<c_void>, len: usize) {
    // SAFETY: `ptr/len` is exactly a mapping this module created and owns;
    // no references into it outlive the owning `AnonMapping`.
    let _ = unsafe { nix::sys::mman::munmap(ptr, len) };
}

/// Volatile one-byte store into an owned mapping.
///
/// # Safety
/// `p` must be valid for writes.
unsafe fn store_byte(p: *mut u8, value: u8) {
    // SAFETY: forwarded contract.
    unsafe { p.write_volatile(value) }
}

/// Volatile one-byte load from an owned mapping.
///
/// # Safety
/// `p` must be valid for reads.
unsafe fn load_byte(p: *const u8) -> u8 {
    // SAFETY: forwarded contract.
    unsafe { p.read_volatile() }
}

impl AnonMapping {
    /// Maps `pages` base pages, not yet populated.
    pub fn new(pages: usize) -> io::Result<Self> {
        let page = page_size();
        let len = pages
            .checked_mul(page)
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let ptr = map_anon(len)?;
        Ok(Self {
            ptr,
            len: len.get(),
            page,
        })
    }

    /// Start address of the mapping.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// True for an empty mapping (never: [`AnonMapping::new`] refuses 0 pages).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len / self.page
    }

    /// Address of page `index`.
    pub fn page_addr(&self, index: usize) -> u64 {
        self.addr() + (index * self.page) as u64
    }

    /// Writes `value` to the first byte of page `index` (a real store the
    /// MMU sees). Out-of-range indices are ignored and return `false`.
    pub fn write_page(&self, index: usize, value: u8) -> bool {
        if index >= self.pages() {
            return false;
        }
        let p = self
            .ptr
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(index * self.page);
        // SAFETY: `p` lies inside our live read-write mapping (index checked).
        unsafe { store_byte(p, value) };
        true
    }

    /// Reads the first byte of page `index` (None when out of range).
    pub fn read_page(&self, index: usize) -> Option<u8> {
        if index >= self.pages() {
            return None;
        }
        let p = self
            .ptr
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(index * self.page);
        // SAFETY: `p` lies inside our live read-write mapping (index checked).
        Some(unsafe { load_byte(p) })
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        unmap_anon(self.ptr, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_query_works() {
        let features = available_features().expect("userfaultfd feature query");
        // Every kernel with userfaultfd >= 4.11 offers at least EVENT_FORK.
        assert_ne!(features, 0);
        let names = feature_names(features);
        assert!(names.iter().any(|n| n == "EVENT_FORK"), "{names:?}");
    }

    #[test]
    fn second_handshake_on_fresh_fd_enables_requested_features() {
        let offered = available_features().expect("feature query");
        let want = offered & (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED);
        let uffd = Uffd::new().expect("userfaultfd");
        let info = uffd.api(want).expect("UFFDIO_API");
        assert_eq!(info.features & want, want);
    }

    #[test]
    fn register_wp_and_protect() {
        let offered = available_features().expect("feature query");
        if offered & UFFD_FEATURE_WP_ASYNC == 0 {
            return; // kernel without async WP: nothing to test
        }
        let map = AnonMapping::new(4).expect("mmap");
        let uffd = Uffd::new().expect("userfaultfd");
        uffd.api(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
            .expect("UFFDIO_API");
        uffd.register(map.addr(), map.len(), UFFDIO_REGISTER_MODE_WP)
            .expect("register");
        uffd.writeprotect(map.addr(), map.len(), true)
            .expect("writeprotect");
        // Async mode: the write must simply succeed.
        assert!(map.write_page(2, 7));
        assert_eq!(map.read_page(2), Some(7));
        uffd.unregister(map.addr(), map.len()).expect("unregister");
    }

    #[test]
    fn feature_names_unknown_bits() {
        assert_eq!(
            feature_names(UFFD_FEATURE_WP_ASYNC | (1 << 40)),
            vec!["WP_ASYNC".to_string(), "bit40".to_string()]
        );
    }
}
