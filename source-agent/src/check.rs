//! `migrate check`: what this kernel offers ferry, found by real experiments.
//!
//! Every probe *does* the thing ferry needs (attach with ptrace, create a
//! process with a chosen PID, track written pages, ...) on a throw-away child
//! or on memory of this process, and turns the outcome into a [`ProbeRow`].
//! No probe panics or aborts the run; children are always killed and reaped.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use serde::Serialize;

use ferry_engine::track::pagemap_scan::{self, ScanRequest};
use ferry_engine::track::uffd_raw::{
    self, AnonMapping, Uffd, UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_MOVE, UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_UNPOPULATED,
};

/// One probe's outcome.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProbeRow {
    /// What was probed.
    pub feature: String,
    /// Whether the experiment succeeded.
    pub present: bool,
    /// Whether ferry cannot work without it.
    pub required: bool,
    /// Short evidence: what was seen, or the errno of the failing step.
    pub detail: String,
}

/// Everything `migrate check` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: String,
    /// CPU architecture this binary runs on.
    pub arch: String,
    /// XSAVE area size in bytes (CPUID 0xD.0 EBX), x86-64 only.
    pub xstate_size: Option<u32>,
    /// Enabled XSAVE features (XCR0), x86-64 with OSXSAVE only.
    pub xcr0: Option<u64>,
    /// Dirty-tracking backend ferry would pick here.
    pub dirty_tracking: String,
    /// All probes, in order.
    pub probes: Vec<ProbeRow>,
    /// True iff every required probe succeeded.
    pub required_ok: bool,
}

/// Outcome of one experiment: `Ok(detail)` = present, `Err(detail)` = absent.
type Outcome = Result<String, String>;

/// Short text for an I/O error: `"EPERM: Operation not permitted"`.
fn errtxt(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => Errno::from_raw(n).to_string(),
        None => e.to_string(),
    }
}

/// Prefixes an error with the step that failed.
fn step<T, E: Into<io::Error>>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {}", errtxt(&e.into())))
}

/// Runs `f` and turns panics into absent rows.
fn probe(feature: &str, required: bool, f: impl FnOnce() -> Outcome) -> ProbeRow {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err("probe panicked".to_string()));
    let (present, detail) = match outcome {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    ProbeRow {
        feature: feature.to_string(),
        present,
        required,
        detail,
    }
}

// ---------------------------------------------------------------------------
// Throw-away children
// ---------------------------------------------------------------------------

/// A forked child that sleeps in `pause()` until killed; killed with SIGKILL
/// and reaped on drop, traced or not.
struct PausingChild {
    pid: Pid,
}

/// Body of the forked child: only async-signal-safe system calls.
fn child_pause_forever() -> ! {
    // SAFETY: prctl and pause are raw, async-signal-safe system calls with
    // integer arguments; nothing here allocates or takes a lock.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        loop {
            libc::pause();
        }
    }
}

impl PausingChild {
    /// Forks the child.
    fn spawn() -> io::Result<Self> {
        // SAFETY: the child runs only `child_pause_forever`, which makes
        // async-signal-safe system calls and never returns, so no lock held
        // by another thread of ours at fork time is ever touched.
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Parent { child } => Ok(Self { pid: child }),
            ForkResult::Child => child_pause_forever(),
        }
    }
}

/// Kills `pid` and waits until it is gone (`__WALL`, bounded).
fn kill_and_reap(pid: Pid) {
    let _ = kill(pid, Signal::SIGKILL);
    for _ in 0..16 {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

impl Drop for PausingChild {
    fn drop(&mut self) {
        kill_and_reap(self.pid);
    }
}

// ---------------------------------------------------------------------------
// ptrace
// ---------------------------------------------------------------------------

fn probe_ptrace() -> Outcome {
    let child = step("fork", PausingChild::spawn())?;
    let pid = child.pid;
    step(
        "PTRACE_SEIZE",
        ptrace::seize(pid, ptrace::Options::PTRACE_O_EXITKILL),
    )?;
    step("PTRACE_INTERRUPT", ptrace::interrupt(pid))?;
    match step("waitpid", waitpid(pid, Some(WaitPidFlag::__WALL)))? {
        WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => {}
        other => return Err(format!("expected PTRACE_EVENT_STOP, got {other:?}")),
    }
    let regs = step("PTRACE_GETREGS", ptrace::getregs(pid))?;
    Ok(format!(
        "seize+interrupt -> PTRACE_EVENT_STOP; GETREGS rip={:#x} orig_rax={}",
        regs.rip, regs.orig_rax as i64
    ))
}

// ---------------------------------------------------------------------------
// clone3 with set_tid
// ---------------------------------------------------------------------------

fn read_num(path: &str) -> Result<i64, String> {
    let s = step(path, fs::read_to_string(path))?;
    s.trim()
        .parse::<i64>()
        .map_err(|e| format!("{path}: cannot parse {s:?}: {e}"))
}

fn probe_clone3_set_tid() -> Outcome {
    let last = read_num("/proc/sys/kernel/ns_last_pid")?;
    let pid_max = read_num("/proc/sys/kernel/pid_max")?;
    let span = (pid_max - 301).max(1);
    let mut last_err = String::from("no free PID found");
    for i in 0..32i64 {
        let cand = 301 + (last - 301 + 200 + i * 37).rem_euclid(span);
        if Path::new(&format!("/proc/{cand}")).exists() {
            continue;
        }
        let Ok(want) = libc::pid_t::try_from(cand) else {
            continue;
        };
        // The same fork with set_tid that restore uses (the child pauses).
        match ferry_parasite::stub::spawn_paused(Some(want)) {
            Ok(got) => {
                kill_and_reap(Pid::from_raw(got));
                return if got == want {
                    Ok(format!("asked for PID {want}, got {got}"))
                } else {
                    Err(format!("asked for PID {want}, got {got}"))
                };
            }
            // Taken between our look and the clone: try another number.
            Err(ferry_parasite::Error::Unexpected { what, .. }) => last_err = what,
            Err(e) => return Err(format!("clone3 set_tid={want}: {e}")),
        }
    }
    Err(last_err)
}

// ---------------------------------------------------------------------------
// userfaultfd
// ---------------------------------------------------------------------------

fn probe_uffd_syscall() -> Outcome {
    let uffd = step("userfaultfd", Uffd::new())?;
    let info = step("UFFDIO_API", uffd.api(0))?;
    Ok(format!(
        "features {:#x}: {}",
        info.features,
        uffd_raw::feature_names(info.features).join(" ")
    ))
}

fn probe_uffd_feature(bit: u64, name: &str) -> Outcome {
    let offered = step("userfaultfd", uffd_raw::available_features())?;
    if offered & bit == 0 {
        return Err(format!("{name} not offered"));
    }
    // Offered is not enough: enable it on a fresh fd.
    let uffd = step("userfaultfd", Uffd::new())?;
    let info = step(&format!("UFFDIO_API({name})"), uffd.api(bit))?;
    if info.features & bit == bit {
        Ok(format!("{name} enabled on a fresh uffd"))
    } else {
        Err(format!("{name} offered but not enabled"))
    }
}

fn probe_dev_userfaultfd() -> Outcome {
    let uffd = step("/dev/userfaultfd", Uffd::from_dev())?;
    let info = step("UFFDIO_API", uffd.api(0))?;
    Ok(format!(
        "USERFAULTFD_IOC_NEW works, features {:#x}",
        info.features
    ))
}

// ---------------------------------------------------------------------------
// dirty tracking
// ---------------------------------------------------------------------------

fn probe_pagemap_scan() -> Outcome {
    let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    let map = step("mmap", AnonMapping::new(8))?;
    let uffd = step("userfaultfd", Uffd::new())?;
    step("UFFDIO_API(WP_ASYNC|WP_UNPOPULATED)", uffd.api(want))?;
    step(
        "UFFDIO_REGISTER(MODE_WP)",
        uffd.register(map.addr(), map.len(), UFFDIO_REGISTER_MODE_WP),
    )?;
    step(
        "UFFDIO_WRITEPROTECT",
        uffd.writeprotect(map.addr(), map.len(), true),
    )?;
    let pm = step("open /proc/self/pagemap", pagemap_scan::open_pagemap(None))?;
    let req = ScanRequest::written_and_reprotect(map.addr(), map.addr() + map.len());
    let pass = |label: &str| -> Result<Vec<u64>, String> {
        let mut out = Vec::new();
        step(
            &format!("PAGEMAP_SCAN ({label})"),
            pagemap_scan::scan(&pm, &req, &mut out),
        )?;
        Ok(pagemap_scan::page_indices(&out, map.addr()))
    };
    map.write_page(1, 0xa1);
    map.write_page(3, 0xa3);
    let first = pass("after writes")?;
    if first != [1, 3] {
        return Err(format!("wrote pages [1, 3], scan reported {first:?}"));
    }
    let second = pass("re-armed, no writes")?;
    if !second.is_empty() {
        return Err(format!(
            "no writes after re-protect, scan reported {second:?}"
        ));
    }
    Ok("wrote pages 1,3 of 8 -> exactly [1, 3]; re-armed pass -> []".to_string())
}

/// Reads the 64-bit pagemap entry of `addr` in this process.
fn pagemap_entry(addr: u64) -> io::Result<u64> {
    let page = uffd_raw::page_size() as u64;
    let f = File::open("/proc/self/pagemap")?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / page) * 8)?;
    Ok(u64::from_le_bytes(b))
}

fn probe_soft_dirty() -> Outcome {
    let map = step("mmap", AnonMapping::new(1))?;
    map.write_page(0, 1);
    let mut cr = step(
        "open /proc/self/clear_refs",
        OpenOptions::new().write(true).open("/proc/self/clear_refs"),
    )?;
    step("write 4 to clear_refs", cr.write_all(b"4"))?;
    let before = step("read pagemap", pagemap_entry(map.addr()))?;
    map.write_page(0, 2);
    let after = step("read pagemap", pagemap_entry(map.addr()))?;
    let bit = |e: u64| (e >> 55) & 1;
    if after >> 63 & 1 == 0 {
        return Err("page not present after write".to_string());
    }
    if bit(after) == 1 {
        Ok(format!(
            "bit 55: {} after clear_refs, 1 after write",
            bit(before)
        ))
    } else {
        Err("clear_refs accepted, but pagemap bit 55 stays 0 after a write".to_string())
    }
}

// ---------------------------------------------------------------------------
// sockets
// ---------------------------------------------------------------------------

/// `socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)`.
fn tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes integer arguments only.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setsockopt(fd, level, name, &value, sizeof(int))`.
fn set_int_opt(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `getsockopt(fd, level, name)` of an int option.
fn get_int_opt(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `value`/`len` are live and describe an int-sized buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut i32).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

fn probe_tcp_repair() -> Outcome {
    const TCP_REPAIR_QUEUE: i32 = 20;
    const TCP_RECV_QUEUE: i32 = 1;
    let s = step("socket", tcp_socket())?;
    step(
        "setsockopt(TCP_REPAIR, 1)",
        set_int_opt(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_REPAIR, 1),
    )?;
    let v = step(
        "getsockopt(TCP_REPAIR)",
        get_int_opt(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_REPAIR),
    )?;
    if v != 1 {
        return Err(format!("TCP_REPAIR reads back {v}"));
    }
    step(
        "setsockopt(TCP_REPAIR_QUEUE)",
        set_int_opt(
            s.as_fd(),
            libc::IPPROTO_TCP,
            TCP_REPAIR_QUEUE,
            TCP_RECV_QUEUE,
        ),
    )?;
    Ok("repair mode on, reads back 1; TCP_REPAIR_QUEUE accepted".to_string())
}

// ---------------------------------------------------------------------------
// pidfd, process_vm_readv, map_files, PR_SET_MM_MAP
// ---------------------------------------------------------------------------

/// `pidfd_open(pid, 0)`.
fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes integer arguments only.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    owned_fd(rc)
}

/// `pidfd_getfd(pidfd, targetfd, 0)`.
fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes integer arguments only.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    owned_fd(rc)
}

/// Syscall return value that is a new fd -> [`OwnedFd`].
fn owned_fd(rc: libc::c_long) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn probe_pidfd() -> Outcome {
    let (rd, wr) = step("pipe2", nix::unistd::pipe2(OFlag::O_CLOEXEC))?;
    let child = step("fork", PausingChild::spawn())?;
    let pidfd = step("pidfd_open", pidfd_open(child.pid))?;
    // The child inherited the pipe at the same fd number.
    let got = step("pidfd_getfd", pidfd_getfd(pidfd.as_fd(), rd.as_raw_fd()))?;
    drop(child);
    let mut w = File::from(wr);
    step("write pipe", w.write_all(b"ferry"))?;
    let mut r = File::from(got);
    let mut buf = [0u8; 5];
    step("read through stolen fd", r.read_exact(&mut buf))?;
    if &buf != b"ferry" {
        return Err(format!("stolen fd read {buf:?}"));
    }
    Ok(format!(
        "took fd {} from child; data flows through it",
        rd.as_raw_fd()
    ))
}

fn probe_process_vm_readv() -> Outcome {
    let mut mine = vec![0u8; 4096];
    for (i, b) in mine.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let addr = mine.as_ptr() as usize;
    let child = step("fork", PausingChild::spawn())?;
    // Our copy changes; the child's keeps the pattern.
    mine.fill(0);
    let mut got = vec![0u8; 4096];
    let n = step(
        "process_vm_readv",
        process_vm_readv(
            child.pid,
            &mut [IoSliceMut::new(&mut got)],
            &[RemoteIoVec {
                base: addr,
                len: 4096,
            }],
        ),
    )?;
    let ok = n == 4096 && got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8);
    drop(child);
    if ok {
        Ok("read 4096 bytes of a child's memory, pattern intact".to_string())
    } else {
        Err(format!("read {n} bytes, pattern mismatch"))
    }
}

fn probe_map_files() -> Outcome {
    let child = step("fork", PausingChild::spawn())?;
    let dir = format!("/proc/{}/map_files", child.pid);
    let entries = step(&dir, fs::read_dir(&dir))?;
    let mut count = 0usize;
    let mut linked = 0usize;
    for e in entries.flatten() {
        count += 1;
        if fs::read_link(e.path()).is_ok() {
            linked += 1;
        }
    }
    if count > 0 && linked > 0 {
        Ok(format!("{count} entries, {linked} readable links"))
    } else {
        Err(format!("{count} entries, {linked} readable links"))
    }
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE, &size)`: the kernel's
/// `struct prctl_mm_map` size.
fn prctl_mm_map_size() -> io::Result<u32> {
    const PR_SET_MM: i32 = 35;
    const PR_SET_MM_MAP_SIZE: libc::c_ulong = 15;
    let mut size: u32 = 0;
    // SAFETY: the kernel writes one unsigned int to `size`, which is live.
    let rc = unsafe {
        libc::prctl(
            PR_SET_MM,
            PR_SET_MM_MAP_SIZE,
            &mut size as *mut u32,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

fn probe_mm_map_size() -> Outcome {
    let size = step("prctl(PR_SET_MM_MAP_SIZE)", prctl_mm_map_size())?;
    if size == 104 {
        Ok("struct prctl_mm_map is 104 bytes".to_string())
    } else {
        Err(format!("kernel says {size} bytes, ferry expects 104"))
    }
}

// ---------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
fn cpuid(leaf: u32, sub: u32) -> core::arch::x86_64::CpuidResult {
    // SAFETY: CPUID exists on every x86-64 CPU (the intrinsic is safe on newer
    // toolchains, hence the allow).
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::__cpuid_count(leaf, sub)
    }
}

/// `xgetbv` with ECX = 0.
///
/// # Safety
/// The CPU must support XSAVE with OS support (CPUID.1:ECX.OSXSAVE).
#[cfg(target_arch = "x86_64")]
unsafe fn xgetbv0() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: the caller checked OSXSAVE, so xgetbv does not fault.
    unsafe {
        core::arch::asm!(
            "xgetbv",
            in("ecx") 0u32,
            out("eax") lo,
            out("edx") hi,
            options(nomem, nostack, preserves_flags)
        );
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

#[cfg(target_arch = "x86_64")]
fn xstate_info() -> (Option<u32>, Option<u64>) {
    let max_leaf = cpuid(0, 0).eax;
    let osxsave = cpuid(1, 0).ecx & (1 << 27) != 0;
    let size = (max_leaf >= 0xd).then(|| cpuid(0xd, 0).ebx);
    // SAFETY: OSXSAVE is set, so XGETBV is available.
    let xcr0 = osxsave.then(|| unsafe { xgetbv0() });
    (size, xcr0)
}

#[cfg(not(target_arch = "x86_64"))]
fn xstate_info() -> (Option<u32>, Option<u64>) {
    (None, None)
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

/// Runs every probe and collects the report (prints nothing).
pub fn collect() -> Report {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({})", errtxt(&e)));
    let (xstate_size, xcr0) = xstate_info();
    let probes = vec![
        probe("ptrace seize/interrupt/getregs", true, probe_ptrace),
        probe("clone3 with set_tid", true, probe_clone3_set_tid),
        probe("pidfd_open + pidfd_getfd", true, probe_pidfd),
        probe("process_vm_readv", true, probe_process_vm_readv),
        probe("/proc/PID/map_files", true, probe_map_files),
        probe("PR_SET_MM_MAP (size 104)", true, probe_mm_map_size),
        probe("userfaultfd(2)", false, probe_uffd_syscall),
        probe("/dev/userfaultfd", false, probe_dev_userfaultfd),
        probe("uffd WP_ASYNC", false, || {
            probe_uffd_feature(UFFD_FEATURE_WP_ASYNC, "WP_ASYNC")
        }),
        probe("uffd WP_UNPOPULATED", false, || {
            probe_uffd_feature(UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED")
        }),
        probe("uffd MOVE", false, || {
            probe_uffd_feature(UFFD_FEATURE_MOVE, "MOVE")
        }),
        probe("PAGEMAP_SCAN + uffd-wp dirty", false, probe_pagemap_scan),
        probe(
            "lazy pages (uffd missing + events)",
            false,
            ferry_engine::lazy::uffd::probe,
        ),
        probe("soft-dirty (pagemap bit 55)", false, probe_soft_dirty),
        probe("TCP_REPAIR", false, probe_tcp_repair),
    ];
    let has = |name: &str| probes.iter().any(|p| p.feature == name && p.present);
    let dirty_tracking = if has("PAGEMAP_SCAN + uffd-wp dirty") {
        "uffd-wp + PAGEMAP_SCAN"
    } else if has("soft-dirty (pagemap bit 55)") {
        "soft-dirty"
    } else {
        "none (stop-and-copy only)"
    }
    .to_string();
    let required_ok = probes.iter().all(|p| p.present || !p.required);
    Report {
        kernel,
        arch: std::env::consts::ARCH.to_string(),
        xstate_size,
        xcr0,
        dirty_tracking,
        probes,
        required_ok,
    }
}

/// Renders the report as a human-readable table.
pub fn render_table(r: &Report) -> String {
    let mut s = String::new();
    let opt = |v: Option<String>| v.unwrap_or_else(|| "n/a".to_string());
    s.push_str(&format!(
        "kernel {}  arch {}  xstate {}  XCR0 {}\n\n",
        r.kernel,
        r.arch,
        opt(r.xstate_size.map(|v| format!("{v} bytes"))),
        opt(r.xcr0.map(|v| format!("{v:#x}"))),
    ));
    let w = r
        .probes
        .iter()
        .map(|p| p.feature.len())
        .max()
        .unwrap_or(7)
        .max(7);
    s.push_str(&format!(
        "{:<w$}  {:<6}  {:<8}  DETAIL\n",
        "FEATURE", "STATUS", "NEED"
    ));
    for p in &r.probes {
        s.push_str(&format!(
            "{:<w$}  {:<6}  {:<8}  {}\n",
            p.feature,
            if p.present { "yes" } else { "no" },
            if p.required { "required" } else { "optional" },
            p.detail
        ));
    }
    s.push_str(&format!("\ndirty tracking backend: {}\n", r.dirty_tracking));
    if r.required_ok {
        s.push_str("result: all required features present\n");
    } else {
        let missing: Vec<&str> = r
            .probes
            .iter()
            .filter(|p| p.required && !p.present)
            .map(|p| p.feature.as_str())
            .collect();
        s.push_str(&format!(
            "result: MISSING required features: {}\n",
            missing.join(", ")
        ));
    }
    s
}

/// Entry point of `migrate check`: runs all probes, prints a table (or one
/// JSON object with `json`) to stdout and returns whether every required
/// feature is present.
pub fn run(json: bool) -> anyhow::Result<bool> {
    run_to(json, &mut io::stdout().lock())
}

/// Like [`run`], writing the table or JSON object to `out`.
pub fn run_to(json: bool, out: &mut impl Write) -> anyhow::Result<bool> {
    let report = collect();
    if json {
        serde_json::to_writer(&mut *out, &report)?;
        out.write_all(b"\n")?;
    } else {
        out.write_all(render_table(&report).as_bytes())?;
    }
    out.flush()?;
    Ok(report.required_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_returns_and_required_probes_pass() {
        let mut table = Vec::new();
        let ok = run_to(false, &mut table).expect("check::run_to");
        let table = String::from_utf8_lossy(&table);
        assert!(table.contains("FEATURE"), "{table}");
        assert!(ok, "required probes failed:\n{table}");
        let report = collect();
        let failed: Vec<&ProbeRow> = report
            .probes
            .iter()
            .filter(|p| p.required && !p.present)
            .collect();
        assert!(failed.is_empty(), "required probes failed: {failed:#?}");
        assert!(report.required_ok);
    }

    #[test]
    fn run_itself_returns_ok() {
        // Prints one JSON line to the real stdout.
        assert!(run(true).expect("check::run"));
    }

    #[test]
    fn json_output_is_one_object() {
        let mut buf = Vec::new();
        run_to(true, &mut buf).expect("check::run_to");
        let v: serde_json::Value = serde_json::from_slice(&buf).expect("one JSON object");
        let probes = v.get("probes").and_then(|p| p.as_array()).expect("probes");
        assert!(probes.len() >= 10);
        assert_eq!(v.get("required_ok"), Some(&serde_json::Value::Bool(true)));
    }

    #[test]
    fn pagemap_scan_probe_matches_kernel_features() {
        let offered = uffd_raw::available_features().unwrap_or(0);
        let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        if offered & want == want {
            assert_eq!(
                probe_pagemap_scan(),
                Ok("wrote pages 1,3 of 8 -> exactly [1, 3]; re-armed pass -> []".to_string())
            );
        }
    }

    #[test]
    fn failed_probe_is_a_row_not_a_panic() {
        let row = probe("boom", true, || panic!("inner"));
        assert!(!row.present);
        assert!(row.required);
        let row = probe("fail", false, || Err("EPERM".to_string()));
        assert_eq!(row.detail, "EPERM");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn xstate_header_values() {
        let (size, xcr0) = xstate_info();
        if let Some(x) = xcr0 {
            // x87 and SSE are always enabled when XSAVE is.
            assert_eq!(x & 3, 3);
            assert!(size.unwrap_or(0) >= 576);
        }
    }
}
