//! Checkpoint of process-wide state that is not memory, threads or fds:
//! credentials, signal dispositions, pending signals, cwd/root, umask,
//! resource limits and personality.
//!
//! Everything is read either from /proc, from the agent (`prlimit64`), or
//! with *report-only* system calls injected into the frozen main thread
//! (`rt_sigaction` queries). Nothing of the target's state is changed.

use crate::{Error, Result};
use ferry_parasite::remote::Injector;
use ferry_parasite::Tracee;
use ferry_protocol::model::{Credentials, PendingSignal, ProcessMisc, Rlimit, SigAction};
use std::io;

/// Number of signals on x86-64 Linux (`_NSIG`).
pub const NSIG: i32 = 64;
/// `RLIMIT_NLIMITS`: resources 0..16 exist.
pub const RLIMIT_NLIMITS: u32 = 16;
/// Size of the kernel's `struct sigaction` on x86-64: {handler, flags, restorer, mask}.
pub(crate) const KSIGACTION_SIZE: usize = 32;
/// Size of `sigset_t` as the kernel wants it (`sigsetsize` argument).
pub(crate) const KSIGSET_SIZE: u64 = 8;

/// Collect the process-wide state of the frozen process `pid`.
///
/// `inj` drives the main thread of `pid`; it must have been made with
/// [`Injector::on_stack`] (or own its scratch area) and only report-only
/// system calls are injected through it. The caller calls `finish()` on it.
pub fn collect(pid: i32, inj: &mut Injector) -> Result<ProcessMisc> {
    // Before anything is injected: a refusal costs nothing then.
    refuse_seccomp(pid)?;
    let status = read_status(pid)?;
    let creds = parse_creds(&status)?;
    let umask = parse_umask(&status)?;

    let sigactions = query_sigactions(inj)?;

    let shared_pending = to_pending(inj.tracee().pending_signals(true)?)?;

    let cwd = read_link_path(pid, "cwd")?;
    let root = read_link_path(pid, "root")?;
    let rlimits = read_rlimits(pid, inj)?;
    let personality = read_personality(pid)?;
    let pdeath_signal = query_pdeath_signal(inj)?;
    let dumpable = query_prctl(inj, "prctl(PR_GET_DUMPABLE)", PR_GET_DUMPABLE)?;
    let securebits = query_prctl(inj, "prctl(PR_GET_SECUREBITS)", PR_GET_SECUREBITS)?;

    Ok(ProcessMisc {
        creds,
        sigactions,
        shared_pending,
        cwd,
        root,
        umask,
        rlimits,
        personality,
        pdeath_signal,
        dumpable,
        securebits,
    })
}

const PR_GET_DUMPABLE: u64 = 3;
pub(crate) const PR_GET_SECUREBITS: u64 = 27;

/// A `prctl` query that returns its answer (a small non-negative number).
fn query_prctl(inj: &mut Injector, name: &'static str, option: u64) -> Result<u32> {
    let v = inj.call(name, libc::SYS_prctl, &[option])?;
    u32::try_from(v).map_err(|_| Error::parse(name, format!("{v:#x}")))
}

/// Refuse a process any thread of which runs under seccomp (strict mode or
/// a filter: systemd's `SystemCallFilter=`, container runtimes, browser
/// sandboxes). Its filters are not carried yet, and a sandboxed process
/// must never come back unsandboxed.
pub(crate) fn refuse_seccomp(pid: i32) -> Result<()> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|e| Error::io(format!("read {dir}"), e))?;
    for t in tasks.flatten() {
        let path = t.path().join("status");
        let Ok(status) = std::fs::read_to_string(&path) else {
            // The thread ended meanwhile.
            continue;
        };
        let mode = status_field(&status, "Seccomp")?;
        if mode != "0" {
            let what = if mode == "1" {
                "strict mode"
            } else {
                "a filter"
            };
            return Err(Error::Unsupported {
                pid,
                what: format!(
                    "seccomp ({what}, thread {}): its system call filter cannot be carried \
                     yet, and restoring the process without it would leave it unsandboxed",
                    t.file_name().to_string_lossy()
                ),
            });
        }
    }
    Ok(())
}

/// The parent-death signal of the thread driven by `inj`
/// (`prctl(PR_GET_PDEATHSIG, &sig)`).
pub(crate) fn query_pdeath_signal(inj: &mut Injector) -> Result<i32> {
    const PR_GET_PDEATHSIG: u64 = 2;
    let buf = inj.scratch();
    inj.call(
        "prctl(PR_GET_PDEATHSIG)",
        libc::SYS_prctl,
        &[PR_GET_PDEATHSIG, buf],
    )?;
    let raw = inj.get(0, 4)?;
    Ok(i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
}

/// Signals queued for one thread only (its private queue), without dequeuing them.
pub fn thread_pending(tracee: &Tracee) -> Result<Vec<PendingSignal>> {
    to_pending(tracee.pending_signals(false)?)
}

fn to_pending(raw: Vec<[u8; ferry_parasite::ptrace::SIGINFO_SIZE]>) -> Result<Vec<PendingSignal>> {
    raw.into_iter()
        .map(|b| {
            let signo = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if !(1..=NSIG).contains(&signo) {
                return Err(Error::parse(
                    "pending siginfo",
                    format!("signal number {signo} out of range"),
                ));
            }
            Ok(PendingSignal {
                signo,
                siginfo: b.to_vec(),
            })
        })
        .collect()
}

/// Query the disposition of every signal 1..=64 with injected
/// `rt_sigaction(sig, NULL, &old, 8)` calls. SIGKILL and SIGSTOP cannot be
/// changed by anyone and are stored as default (zeros).
fn query_sigactions(inj: &mut Injector) -> Result<Vec<SigAction>> {
    let mut out = Vec::with_capacity(NSIG as usize);
    for sig in 1..=NSIG {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            out.push(SigAction::default());
            continue;
        }
        let buf = inj.scratch();
        inj.call(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[sig as u64, 0, buf, KSIGSET_SIZE],
        )?;
        let raw = inj.get(0, KSIGACTION_SIZE)?;
        out.push(decode_sigaction(&raw));
    }
    Ok(out)
}

/// Decode a kernel `struct sigaction` (32 bytes, little endian).
pub(crate) fn decode_sigaction(raw: &[u8]) -> SigAction {
    let word = |i: usize| le_u64(raw, i);
    SigAction {
        handler: word(0),
        flags: word(1),
        restorer: word(2),
        mask: word(3),
    }
}

/// The `i`-th little-endian u64 of `raw` (0 past its end).
pub(crate) fn le_u64(raw: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = raw.get(i * 8..i * 8 + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

/// Encode a kernel `struct sigaction` (32 bytes, little endian).
pub(crate) fn encode_sigaction(a: &SigAction) -> [u8; KSIGACTION_SIZE] {
    let mut out = [0u8; KSIGACTION_SIZE];
    for (i, w) in [a.handler, a.flags, a.restorer, a.mask].iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Read /proc/`pid`/status.
pub(crate) fn read_status(pid: i32) -> Result<String> {
    read_status_path(&format!("/proc/{pid}/status"), pid)
}

/// Read a status file at `path` (belonging to `pid`).
pub(crate) fn read_status_path(path: &str, pid: i32) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::NoSuchProcess { pid }
        } else {
            Error::io(format!("read {path}"), e)
        }
    })
}

/// The value of `key:` in a status file, trimmed.
pub(crate) fn status_field<'a>(status: &'a str, key: &str) -> Result<&'a str> {
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(str::trim)
        })
        .ok_or_else(|| Error::parse("/proc/PID/status", format!("no {key}: line")))
}

fn parse_ids(status: &str, key: &str) -> Result<[u32; 4]> {
    let v = status_field(status, key)?;
    let ids: Vec<u32> = v
        .split_whitespace()
        .map(|s| s.parse::<u32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::parse(format!("status {key}"), format!("{v:?}: {e}")))?;
    ids.try_into().map_err(|ids: Vec<u32>| {
        Error::parse(
            format!("status {key}"),
            format!("expected 4 values, got {}", ids.len()),
        )
    })
}

pub(crate) fn parse_hex(status: &str, key: &str) -> Result<u64> {
    let v = status_field(status, key)?;
    u64::from_str_radix(v, 16)
        .map_err(|e| Error::parse(format!("status {key}"), format!("{v:?}: {e}")))
}

/// Parse the credential lines of a status file.
pub(crate) fn parse_creds(status: &str) -> Result<Credentials> {
    let groups_line = status_field(status, "Groups")?;
    let groups = groups_line
        .split_whitespace()
        .map(|s| s.parse::<u32>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::parse("status Groups", format!("{groups_line:?}: {e}")))?;
    let nnp = status_field(status, "NoNewPrivs")?;
    let no_new_privs = match nnp {
        "0" => false,
        "1" => true,
        other => return Err(Error::parse("status NoNewPrivs", format!("{other:?}"))),
    };
    Ok(Credentials {
        uids: parse_ids(status, "Uid")?,
        gids: parse_ids(status, "Gid")?,
        groups,
        cap_inheritable: parse_hex(status, "CapInh")?,
        cap_permitted: parse_hex(status, "CapPrm")?,
        cap_effective: parse_hex(status, "CapEff")?,
        cap_bounding: parse_hex(status, "CapBnd")?,
        cap_ambient: parse_hex(status, "CapAmb")?,
        no_new_privs,
    })
}

/// Parse `Umask:` (octal) of a status file.
pub(crate) fn parse_umask(status: &str) -> Result<u32> {
    let v = status_field(status, "Umask")?;
    u32::from_str_radix(v, 8).map_err(|e| Error::parse("status Umask", format!("{v:?}: {e}")))
}

/// readlink /proc/`pid`/`which` as a UTF-8 path. A deleted directory cannot
/// be re-entered at restore and is refused here.
fn read_link_path(pid: i32, which: &str) -> Result<String> {
    let link = format!("/proc/{pid}/{which}");
    let target = std::fs::read_link(&link).map_err(|e| Error::io(format!("readlink {link}"), e))?;
    let s = target
        .into_os_string()
        .into_string()
        .map_err(|p| Error::Unsupported {
            pid,
            what: format!("{which} with a non-UTF-8 path {p:?}"),
        })?;
    if s.ends_with(" (deleted)") && !std::path::Path::new(&s).exists() {
        return Err(Error::Unsupported {
            pid,
            what: format!("deleted {which} directory {s:?}"),
        });
    }
    Ok(s)
}

/// Read /proc/`pid`/personality (hex).
fn read_personality(pid: i32) -> Result<u32> {
    let path = format!("/proc/{pid}/personality");
    let s = std::fs::read_to_string(&path).map_err(|e| Error::io(format!("read {path}"), e))?;
    let v = s.trim();
    u32::from_str_radix(v, 16).map_err(|e| Error::parse(path, format!("{v:?}: {e}")))
}

/// `struct rlimit64`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawRlimit {
    pub cur: u64,
    pub max: u64,
}

/// `prlimit64(pid, resource, new, old)` from the agent.
pub(crate) fn prlimit64(
    pid: i32,
    resource: u32,
    new: Option<&RawRlimit>,
    old: Option<&mut RawRlimit>,
) -> io::Result<()> {
    let new_ptr = new.map_or(std::ptr::null(), |n| n as *const RawRlimit);
    let old_ptr = old.map_or(std::ptr::null_mut(), |o| o as *mut RawRlimit);
    // SAFETY: prlimit64 reads at most one RawRlimit from `new_ptr` and writes
    // at most one into `old_ptr`; both are null or point to live values that
    // outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_prlimit64, pid, resource, new_ptr, old_ptr) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// All resource limits of `pid`. Read from the agent; if the kernel refuses
/// (another uid, and we lack CAP_SYS_RESOURCE), with a report-only
/// `prlimit64(0, r, NULL, &old)` injected into the target itself.
fn read_rlimits(pid: i32, inj: &mut Injector) -> Result<Vec<Rlimit>> {
    let mut out = Vec::with_capacity(RLIMIT_NLIMITS as usize);
    for resource in 0..RLIMIT_NLIMITS {
        let mut old = RawRlimit::default();
        match prlimit64(pid, resource, None, Some(&mut old)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                let buf = inj.scratch();
                inj.call(
                    "prlimit64",
                    libc::SYS_prlimit64,
                    &[0, resource as u64, 0, buf],
                )?;
                let raw = inj.get(0, 16)?;
                old = RawRlimit {
                    cur: le_u64(&raw, 0),
                    max: le_u64(&raw, 1),
                };
            }
            Err(e) => return Err(Error::io(format!("prlimit64({pid}, {resource})"), e)),
        }
        out.push(Rlimit {
            resource,
            soft: old.cur,
            hard: old.max,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_parasite::remote::{find_syscall_insn, STACK_SCRATCH_LEN};
    use std::ffi::CString;

    /// Kills and reaps a forked child by PID on drop.
    struct ChildGuard(i32);
    impl Drop for ChildGuard {
        fn drop(&mut self) {
            kill_and_reap(self.0);
        }
    }

    fn kill_and_reap(pid: i32) {
        // SAFETY: kill and waitpid of our own child, by PID, with a local status.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            let mut st = 0;
            libc::waitpid(pid, &mut st, libc::__WALL);
        }
    }

    use crate::testutil::TempDir;

    extern "C" fn usr1_handler(_sig: libc::c_int) {}

    const SA_RESTART: u64 = 0x1000_0000;
    const NOBODY: u32 = 65534;

    /// What the child should do before pausing.
    struct ChildPlan {
        dir: CString,
        nofile_soft: u64,
        nofile_hard: u64,
        drop_to_nobody: bool,
    }

    /// Set-up run in the forked child: raw system calls and
    /// async-signal-safe libc calls only; never returns.
    fn child_main(plan: &ChildPlan) -> ! {
        // SAFETY: we are the single-threaded child of a fork; everything here
        // is an async-signal-safe call on stack values prepared before the fork.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = usr1_handler as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaddset(&mut sa.sa_mask, libc::SIGUSR2);
            libc::sigaddset(&mut sa.sa_mask, libc::SIGHUP);
            if libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) != 0 {
                libc::_exit(10);
            }
            let mut ign: libc::sigaction = std::mem::zeroed();
            ign.sa_sigaction = libc::SIG_IGN;
            libc::sigaction(libc::SIGPIPE, &ign, std::ptr::null_mut());
            libc::sigaction(libc::SIGURG, &ign, std::ptr::null_mut());
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGHUP, &dfl, std::ptr::null_mut());
            libc::umask(0o027);
            if libc::chdir(plan.dir.as_ptr()) != 0 {
                libc::_exit(11);
            }
            let lim = libc::rlimit {
                rlim_cur: plan.nofile_soft,
                rlim_max: plan.nofile_hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                libc::_exit(12);
            }
            libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if plan.drop_to_nobody {
                let groups = [NOBODY, 100];
                if libc::setgroups(2, groups.as_ptr()) != 0
                    || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                    || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0
                {
                    libc::_exit(13);
                }
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                // The change of uid made it as dumpable as suid_dumpable says.
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
            } else {
                libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                // SECBIT_NOROOT.
                libc::prctl(libc::PR_SET_SECUREBITS, 1, 0, 0, 0);
            }
            let me = libc::getpid();
            // Shared queue: kill(); private queue: tgkill().
            libc::kill(me, libc::SIGUSR2);
            libc::syscall(libc::SYS_tgkill, me, me, libc::SIGTERM);
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
    }

    fn fork_child(plan: &ChildPlan) -> i32 {
        // SAFETY: fork(); the child runs only `child_main`, which uses
        // async-signal-safe calls and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            child_main(plan);
        }
        pid
    }

    fn wait_paused(pid: i32) {
        for _ in 0..5000 {
            let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
            if sc.starts_with(&format!("{} ", libc::SYS_pause)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("child {pid} never reached pause()");
    }

    fn vdso_range(pid: i32) -> (u64, u64) {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
        let line = maps.lines().find(|l| l.ends_with("[vdso]")).expect("vdso");
        let range = line.split_whitespace().next().expect("range");
        let (s, e) = range.split_once('-').expect("range");
        (
            u64::from_str_radix(s, 16).expect("hex"),
            u64::from_str_radix(e, 16).expect("hex"),
        )
    }

    fn own_nofile() -> (u64, u64) {
        let mut old = RawRlimit::default();
        prlimit64(0, libc::RLIMIT_NOFILE, None, Some(&mut old)).expect("prlimit64");
        (old.cur, old.max)
    }

    struct Collected {
        misc: ProcessMisc,
        private: Vec<PendingSignal>,
        pid: i32,
        dir: String,
        nofile: (u64, u64),
    }

    /// Fork a child per `drop_to_nobody`, freeze it and collect; checks
    /// the stack scratch is unchanged.
    fn run(drop_to_nobody: bool) -> Collected {
        let dir = TempDir::new("misc-dump");
        let (_, hard) = own_nofile();
        let plan = ChildPlan {
            dir: CString::new(dir.path.to_str().expect("utf8")).expect("cstr"),
            nofile_soft: 77,
            nofile_hard: hard,
            drop_to_nobody,
        };
        let pid = fork_child(&plan);
        let _guard = ChildGuard(pid);
        wait_paused(pid);
        let (s, e) = vdso_range(pid);
        let ip = find_syscall_insn(pid, s, e)
            .expect("read vdso")
            .expect("syscall in vdso");
        let mut t = Tracee::seize(pid).expect("seize");
        t.interrupt().expect("interrupt");
        let regs_before = t.regs().expect("regs");
        // The stack below rsp, including the area the injector borrows.
        let span = 2048 + STACK_SCRATCH_LEN as u64;
        let low = regs_before.rsp - span;
        let mut before = vec![0u8; span as usize];
        ferry_parasite::mem::read(pid, low, &mut before).expect("read stack");

        let mut inj = Injector::on_stack(&mut t, ip).expect("on_stack");
        assert!(inj.scratch() >= low, "scratch inside the checked span");
        let misc = collect(pid, &mut inj).expect("collect");
        inj.finish().expect("finish");
        let private = thread_pending(&t).expect("thread_pending");

        let mut after = vec![0u8; span as usize];
        ferry_parasite::mem::read(pid, low, &mut after).expect("read stack");
        assert!(before == after, "stack scratch bytes changed by collect");
        let regs_after = t.regs().expect("regs");
        assert_eq!(
            (
                regs_after.rip,
                regs_after.rsp,
                regs_after.rax,
                regs_after.orig_rax
            ),
            (
                regs_before.rip,
                regs_before.rsp,
                regs_before.rax,
                regs_before.orig_rax
            )
        );
        // Still pending afterwards: collect only peeks.
        let status = read_status(pid).expect("status");
        let shd = parse_hex(&status, "ShdPnd").expect("ShdPnd");
        assert_ne!(shd & (1 << (libc::SIGUSR2 - 1)), 0, "{status}");
        t.detach().expect("detach");
        Collected {
            misc,
            private,
            pid,
            dir: dir.path.to_str().expect("utf8").to_string(),
            nofile: (77, hard),
        }
    }

    fn check_common(c: &Collected) {
        let m = &c.misc;
        assert_eq!(m.sigactions.len(), 64);
        let usr1 = m.sigactions[libc::SIGUSR1 as usize - 1];
        assert_eq!(
            usr1.handler,
            usr1_handler as extern "C" fn(libc::c_int) as usize as u64
        );
        assert_ne!(usr1.flags & SA_RESTART, 0, "flags {:#x}", usr1.flags);
        assert_ne!(usr1.restorer, 0, "glibc sets SA_RESTORER");
        let want_mask = (1u64 << (libc::SIGUSR2 - 1)) | (1u64 << (libc::SIGHUP - 1));
        assert_eq!(usr1.mask, want_mask);
        assert_eq!(m.sigactions[libc::SIGPIPE as usize - 1].handler, 1);
        assert_eq!(m.sigactions[libc::SIGURG as usize - 1].handler, 1);
        // glibc's sigaction() adds SA_RESTORER even for SIG_DFL.
        assert_eq!(m.sigactions[libc::SIGHUP as usize - 1].handler, 0);
        assert_eq!(
            m.sigactions[libc::SIGKILL as usize - 1],
            SigAction::default()
        );
        assert_eq!(m.umask, 0o027);
        assert_eq!(m.cwd, c.dir);
        assert_eq!(m.root, "/");
        assert_eq!(m.personality, libc::ADDR_NO_RANDOMIZE as u32);
        assert_eq!(m.rlimits.len(), RLIMIT_NLIMITS as usize);
        let nofile = m.rlimits[libc::RLIMIT_NOFILE as usize];
        assert_eq!(nofile.resource, libc::RLIMIT_NOFILE);
        assert_eq!((nofile.soft, nofile.hard), c.nofile);
        let stack = m.rlimits[libc::RLIMIT_STACK as usize];
        let mut own = RawRlimit::default();
        prlimit64(0, libc::RLIMIT_STACK, None, Some(&mut own)).expect("prlimit64");
        assert_eq!((stack.soft, stack.hard), (own.cur, own.max));

        let usr2: Vec<_> = m
            .shared_pending
            .iter()
            .filter(|p| p.signo == libc::SIGUSR2)
            .collect();
        assert_eq!(usr2.len(), 1, "{:?}", m.shared_pending);
        let si = &usr2[0].siginfo;
        assert_eq!(si.len(), 128);
        let code = i32::from_le_bytes([si[8], si[9], si[10], si[11]]);
        let from = i32::from_le_bytes([si[16], si[17], si[18], si[19]]);
        assert_eq!((code, from), (0 /* SI_USER */, c.pid));
        assert!(!m.shared_pending.iter().any(|p| p.signo == libc::SIGTERM));
        let term: Vec<_> = c
            .private
            .iter()
            .filter(|p| p.signo == libc::SIGTERM)
            .collect();
        assert_eq!(term.len(), 1, "{:?}", c.private);
        let code = i32::from_le_bytes([
            term[0].siginfo[8],
            term[0].siginfo[9],
            term[0].siginfo[10],
            term[0].siginfo[11],
        ]);
        assert_eq!(code, libc::SI_TKILL);
    }

    /// Our own capabilities, from capget (independent of /proc parsing).
    fn own_caps() -> (u64, u64, u64) {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        let mut hdr = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [[0u32; 3]; 2];
        // SAFETY: capget writes two 12-byte data structs into `data`.
        let r =
            unsafe { libc::syscall(libc::SYS_capget, &mut hdr as *mut Header, data.as_mut_ptr()) };
        assert_eq!(r, 0, "capget: {}", io::Error::last_os_error());
        let join = |i: usize| u64::from(data[0][i]) | (u64::from(data[1][i]) << 32);
        (join(0), join(1), join(2))
    }

    #[test]
    fn misc_collect_root_child() {
        let c = run(false);
        check_common(&c);
        let m = &c.misc;
        let (eff, prm, inh) = own_caps();
        assert_eq!(
            (
                m.creds.cap_effective,
                m.creds.cap_permitted,
                m.creds.cap_inheritable
            ),
            (eff, prm, inh)
        );
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!(m.creds.uids, [uid; 4]);
        assert_eq!(m.creds.gids, [gid; 4]);
        assert!(!m.creds.no_new_privs);
        assert_eq!((m.dumpable, m.securebits), (0, 1));
    }

    #[test]
    fn misc_collect_unprivileged_child() {
        let c = run(true);
        check_common(&c);
        let cr = &c.misc.creds;
        assert_eq!(cr.uids, [NOBODY; 4]);
        assert_eq!(cr.gids, [NOBODY; 4]);
        assert_eq!(cr.groups, vec![100, NOBODY]);
        assert_eq!(
            (cr.cap_effective, cr.cap_permitted, cr.cap_ambient),
            (0, 0, 0)
        );
        assert_ne!(cr.cap_bounding, 0);
        assert!(cr.no_new_privs);
        assert_eq!((c.misc.dumpable, c.misc.securebits), (1, 0));
    }

    #[test]
    fn misc_status_parser_rejects_garbage() {
        let good = "Umask:\t0022\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t9 10 \n\
                    CapInh:\t0000000000000000\nCapPrm:\t00000000000000ff\nCapEff:\t0000000000000001\n\
                    CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        let c = parse_creds(good).expect("parse");
        assert_eq!(c.uids, [1, 2, 3, 4]);
        assert_eq!(c.gids, [5, 6, 7, 8]);
        assert_eq!(c.groups, vec![9, 10]);
        assert_eq!(
            (c.cap_permitted, c.cap_effective, c.cap_bounding),
            (0xff, 1, 0x1ff_ffff_ffff)
        );
        assert!(c.no_new_privs);
        assert_eq!(parse_umask(good).expect("umask"), 0o022);
        assert!(parse_creds(&good.replace("Uid:\t1\t2\t3\t4", "Uid:\t1\t2\t3")).is_err());
        assert!(parse_creds(&good.replace("CapEff:\t0000000000000001", "CapEff:\tzz")).is_err());
        assert!(parse_creds(&good.replace("NoNewPrivs:\t1", "")).is_err());
        assert!(parse_umask("Umask:\t0999\n").is_err());
    }

    /// A child under a seccomp filter (allow-all, with no_new_privs) is
    /// refused by a freeze, naming seccomp, and runs on afterwards.
    #[test]
    fn seccomp_is_refused_and_the_process_runs_on() {
        let allow = [libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        }];
        let prog = libc::sock_fprog {
            len: 1,
            filter: allow.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the child makes raw prctl calls on data prepared before
        // the fork (valid for the child's copy of our memory), then pauses.
        let pid = unsafe {
            let pid = libc::fork();
            if pid == 0 {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &prog as *const libc::sock_fprog,
                    ) != 0
                {
                    libc::_exit(3);
                }
                loop {
                    libc::syscall(libc::SYS_pause);
                }
            }
            pid
        };
        assert!(pid > 0, "fork");
        let _g = ChildGuard(pid);
        let filtered = || {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|s| s.lines().any(|l| l == "Seccomp:\t2"))
        };
        let start = std::time::Instant::now();
        while !filtered() {
            assert!(start.elapsed().as_secs() < 10, "child never got its filter");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        match crate::dump::Captured::freeze(pid) {
            Err(e @ Error::Unsupported { .. }) => {
                let m = e.to_string();
                assert!(m.contains("seccomp (a filter"), "{m}");
                assert!(m.contains("unsandboxed"), "{m}");
            }
            Err(other) => panic!("expected Unsupported, got {other}"),
            Ok(_) => panic!("a process under seccomp was captured"),
        }
        // Thawed: neither stopped nor traced.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        assert!(status.lines().any(|l| l == "TracerPid:\t0"), "{status}");
        let state = status
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or_default()
            .to_string();
        assert!(
            !state.contains("stopped") && !state.contains("tracing"),
            "{state}"
        );
    }
}
