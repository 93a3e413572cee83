//! One traced thread: seize, interrupt, wait, registers, detach.
//!
//! A [`Tracee`] is a thread we attached with `PTRACE_SEIZE`. All requests
//! for it must come from the thread that seized it (a ptrace rule), so
//! users of this module keep their tracing on one OS thread.

use crate::error::{Error, Result};
use libc::{c_long, c_void, pid_t, user_regs_struct};
use std::io;

/// `PTRACE_EVENT_STOP`: the stop reported after `PTRACE_INTERRUPT` or a group stop.
pub const PTRACE_EVENT_STOP: i32 = 128;
const PTRACE_GETSIGMASK: u32 = 0x420a;
const PTRACE_SETSIGMASK: u32 = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: u32 = 0x420f;
const PTRACE_PEEKSIGINFO: u32 = 0x4209;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
/// `NT_X86_XSTATE`: the XSAVE area register set.
pub const NT_X86_XSTATE: u32 = 0x202;

/// Options set at seize time.
pub const SEIZE_OPTIONS: c_long =
    (libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACESYSGOOD) as c_long;

/// Why a traced thread stopped (or that it is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A ptrace event stop: `(event, signal)`, e.g. `(PTRACE_EVENT_STOP, SIGTRAP)`.
    Event(i32, i32),
    /// A signal-delivery stop, holding the signal about to be delivered.
    Signal(i32),
    /// The thread exited with this status.
    Exited(i32),
    /// The thread was killed by this signal.
    Killed(i32),
}

/// The rseq registration of a thread (`struct ptrace_rseq_configuration`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RseqConfig {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}
const _: () = assert!(std::mem::size_of::<RseqConfig>() == 24);

#[repr(C)]
struct PeekSigInfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// Size of a `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;

/// A thread attached with `PTRACE_SEIZE`.
#[derive(Debug)]
pub struct Tracee {
    tid: pid_t,
    /// Signals that arrived while we drove the thread and were held back;
    /// re-sent when it is released.
    deferred: Vec<i32>,
    attached: bool,
}

/// Wait for a state change of `tid` (`__WALL`), retrying on EINTR.
pub fn wait_tid(tid: pid_t) -> Result<Stop> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only into `status`, a valid local.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Error::sys("waitpid", tid, e));
        }
        return Ok(decode_status(status));
    }
}

fn decode_status(status: i32) -> Stop {
    if libc::WIFEXITED(status) {
        Stop::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Stop::Killed(libc::WTERMSIG(status))
    } else {
        let sig = libc::WSTOPSIG(status) & 0x7f;
        let event = (status >> 16) & 0xff;
        if event != 0 {
            Stop::Event(event, sig)
        } else {
            Stop::Signal(sig)
        }
    }
}

/// Raw `ptrace(2)` call; returns the value or the OS error.
fn raw_ptrace(req: u32, tid: pid_t, addr: *mut c_void, data: *mut c_void) -> io::Result<c_long> {
    // SAFETY: every caller passes pointers valid for the request (or null/integers
    // cast to pointers where the request takes a value), as ptrace(2) documents.
    let r = unsafe { libc::ptrace(req as _, tid, addr, data) };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error().unwrap_or(0) != 0 {
            return Err(e);
        }
    }
    Ok(r)
}

impl Tracee {
    /// Attach to `tid` with `PTRACE_SEIZE` (does not stop it).
    pub fn seize(tid: pid_t) -> Result<Tracee> {
        raw_ptrace(
            libc::PTRACE_SEIZE,
            tid,
            std::ptr::null_mut(),
            SEIZE_OPTIONS as *mut c_void,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => Error::AlreadyTraced { tid },
            Some(libc::ESRCH) => Error::NoSuchThread { tid },
            _ => Error::sys("PTRACE_SEIZE", tid, e),
        })?;
        Ok(Tracee {
            tid,
            deferred: Vec::new(),
            attached: true,
        })
    }

    /// Also trace processes this thread forks (`PTRACE_O_TRACEFORK` on top
    /// of the seize options): a child it forks starts traced by us, in an
    /// event stop. Used on restore stubs, which fork the restored tree.
    pub fn trace_forks(&self) -> Result<()> {
        let opts = SEIZE_OPTIONS | libc::PTRACE_O_TRACEFORK as c_long;
        raw_ptrace(
            libc::PTRACE_SETOPTIONS,
            self.tid,
            std::ptr::null_mut(),
            opts as *mut c_void,
        )
        .map(drop)
        .map_err(|e| Error::sys("PTRACE_SETOPTIONS", self.tid, e))
    }

    /// Wrap a thread that the kernel auto-attached to us (a clone child).
    pub fn adopt(tid: pid_t) -> Tracee {
        Tracee {
            tid,
            deferred: Vec::new(),
            attached: true,
        }
    }

    /// The thread id.
    pub fn tid(&self) -> pid_t {
        self.tid
    }

    /// Stop the thread with `PTRACE_INTERRUPT` and wait until it is in an
    /// event stop. Signals that arrive first are held back and re-sent on
    /// release. Fails with [`Error::ThreadGone`] if the thread exited.
    pub fn interrupt(&mut self) -> Result<()> {
        raw_ptrace(
            libc::PTRACE_INTERRUPT,
            self.tid,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .map_err(|e| Error::sys("PTRACE_INTERRUPT", self.tid, e))?;
        self.wait_event_stop()
    }

    /// Wait until the thread reaches an event stop (after an interrupt, or
    /// the first stop of an auto-attached clone child).
    pub fn wait_event_stop(&mut self) -> Result<()> {
        loop {
            match wait_tid(self.tid)? {
                Stop::Event(_, _) => return Ok(()),
                Stop::Signal(sig) => {
                    // Hold the signal back; the pending interrupt will stop it next.
                    self.deferred.push(sig);
                    self.resume(0)?;
                }
                Stop::Exited(_) | Stop::Killed(_) => {
                    self.attached = false;
                    return Err(Error::ThreadGone { tid: self.tid });
                }
            }
        }
    }

    /// Continue the thread, delivering `sig` (0 for none).
    pub fn resume(&self, sig: i32) -> Result<()> {
        raw_ptrace(
            libc::PTRACE_CONT,
            self.tid,
            std::ptr::null_mut(),
            sig as usize as *mut c_void,
        )
        .map(drop)
        .map_err(|e| Error::sys("PTRACE_CONT", self.tid, e))
    }

    /// Execute one instruction.
    pub fn single_step(&self) -> Result<()> {
        raw_ptrace(
            libc::PTRACE_SINGLESTEP,
            self.tid,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .map(drop)
        .map_err(|e| Error::sys("PTRACE_SINGLESTEP", self.tid, e))
    }

    /// Record a signal to be re-sent on release.
    pub fn defer_signal(&mut self, sig: i32) {
        self.deferred.push(sig);
    }

    /// The message of the last ptrace event (e.g. the new TID after a clone).
    pub fn event_msg(&self) -> Result<u64> {
        let mut msg: libc::c_ulong = 0;
        raw_ptrace(
            libc::PTRACE_GETEVENTMSG,
            self.tid,
            std::ptr::null_mut(),
            &mut msg as *mut _ as *mut c_void,
        )
        .map_err(|e| Error::sys("PTRACE_GETEVENTMSG", self.tid, e))?;
        Ok(msg as u64)
    }

    /// General-purpose registers.
    pub fn regs(&self) -> Result<user_regs_struct> {
        let mut regs = zeroed_regs();
        raw_ptrace(
            libc::PTRACE_GETREGS,
            self.tid,
            std::ptr::null_mut(),
            &mut regs as *mut _ as *mut c_void,
        )
        .map_err(|e| Error::sys("PTRACE_GETREGS", self.tid, e))?;
        Ok(regs)
    }

    /// Set general-purpose registers (including fs_base/gs_base).
    pub fn set_regs(&self, regs: &user_regs_struct) -> Result<()> {
        raw_ptrace(
            libc::PTRACE_SETREGS,
            self.tid,
            std::ptr::null_mut(),
            regs as *const _ as *mut c_void,
        )
        .map(drop)
        .map_err(|e| Error::sys("PTRACE_SETREGS", self.tid, e))
    }

    /// The XSAVE area (`NT_X86_XSTATE`); `size` is the host's xstate size.
    pub fn xstate(&self, size: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; size];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut c_void,
            iov_len: buf.len(),
        };
        raw_ptrace(
            libc::PTRACE_GETREGSET,
            self.tid,
            NT_X86_XSTATE as usize as *mut c_void,
            &mut iov as *mut _ as *mut c_void,
        )
        .map_err(|e| Error::sys("PTRACE_GETREGSET(NT_X86_XSTATE)", self.tid, e))?;
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    /// Set the XSAVE area.
    pub fn set_xstate(&self, xstate: &[u8]) -> Result<()> {
        let mut iov = libc::iovec {
            iov_base: xstate.as_ptr() as *mut c_void,
            iov_len: xstate.len(),
        };
        raw_ptrace(
            libc::PTRACE_SETREGSET,
            self.tid,
            NT_X86_XSTATE as usize as *mut c_void,
            &mut iov as *mut _ as *mut c_void,
        )
        .map(drop)
        .map_err(|e| Error::sys("PTRACE_SETREGSET(NT_X86_XSTATE)", self.tid, e))
    }

    /// The blocked-signal mask.
    pub fn sigmask(&self) -> Result<u64> {
        let mut mask: u64 = 0;
        raw_ptrace(
            PTRACE_GETSIGMASK,
            self.tid,
            8usize as *mut c_void,
            &mut mask as *mut _ as *mut c_void,
        )
        .map_err(|e| Error::sys("PTRACE_GETSIGMASK", self.tid, e))?;
        Ok(mask)
    }

    /// Set the blocked-signal mask.
    pub fn set_sigmask(&self, mask: u64) -> Result<()> {
        let mut m = mask;
        raw_ptrace(
            PTRACE_SETSIGMASK,
            self.tid,
            8usize as *mut c_void,
            &mut m as *mut _ as *mut c_void,
        )
        .map(drop)
        .map_err(|e| Error::sys("PTRACE_SETSIGMASK", self.tid, e))
    }

    /// The thread's rseq registration (`rseq_abi_pointer == 0` if none).
    pub fn rseq_config(&self) -> Result<RseqConfig> {
        let mut conf = RseqConfig::default();
        raw_ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            self.tid,
            std::mem::size_of::<RseqConfig>() as *mut c_void,
            &mut conf as *mut _ as *mut c_void,
        )
        .map_err(|e| Error::sys("PTRACE_GET_RSEQ_CONFIGURATION", self.tid, e))?;
        Ok(conf)
    }

    /// Queued signals, as raw `siginfo_t` bytes: the thread's own queue, or
    /// the thread group's shared queue when `shared`. Does not dequeue.
    pub fn pending_signals(&self, shared: bool) -> Result<Vec<[u8; SIGINFO_SIZE]>> {
        let mut out = Vec::new();
        loop {
            let mut buf = [[0u8; SIGINFO_SIZE]; 16];
            let mut args = PeekSigInfoArgs {
                off: out.len() as u64,
                flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
                nr: buf.len() as i32,
            };
            let n = raw_ptrace(
                PTRACE_PEEKSIGINFO,
                self.tid,
                &mut args as *mut _ as *mut c_void,
                buf.as_mut_ptr() as *mut c_void,
            )
            .map_err(|e| Error::sys("PTRACE_PEEKSIGINFO", self.tid, e))?;
            let n = n.max(0) as usize;
            out.extend_from_slice(&buf[..n.min(buf.len())]);
            if n < buf.len() {
                return Ok(out);
            }
        }
    }

    /// Detach and let the thread run; re-sends held-back signals.
    pub fn detach(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        let r = raw_ptrace(
            libc::PTRACE_DETACH,
            self.tid,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        for sig in self.deferred.drain(..) {
            // SAFETY: plain tgkill system call with integer arguments.
            unsafe { libc::syscall(libc::SYS_tgkill, tgid_of(self.tid), self.tid, sig) };
        }
        r.map(drop)
            .map_err(|e| Error::sys("PTRACE_DETACH", self.tid, e))
    }

    /// Forget this tracee without detaching (it died, or was killed by us).
    pub fn forget(mut self) {
        self.attached = false;
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.attached {
            if let Err(e) = self.release() {
                tracing::debug!("detach of {} on drop failed: {e}", self.tid);
            }
        }
    }
}

fn tgid_of(tid: pid_t) -> pid_t {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
}

/// An all-zero register set.
pub fn zeroed_regs() -> user_regs_struct {
    // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Child;

    #[test]
    fn seize_interrupt_regs_detach() {
        let child = Child::spawn_pause();
        let mut t = Tracee::seize(child.pid).expect("seize");
        t.interrupt().expect("interrupt");
        let regs = t.regs().expect("regs");
        assert_ne!(regs.rip, 0);
        // A thread in pause() is in a system call: orig_rax holds its number.
        assert_eq!(regs.orig_rax, libc::SYS_pause as u64);
        let xs = t.xstate(crate::xsave::host_xstate_size()).expect("xstate");
        assert_eq!(xs.len(), crate::xsave::host_xstate_size());
        let mask = t.sigmask().expect("sigmask");
        t.set_sigmask(mask | (1 << (libc::SIGUSR2 - 1)))
            .expect("setmask");
        assert_eq!(
            t.sigmask().expect("sigmask"),
            mask | (1 << (libc::SIGUSR2 - 1))
        );
        t.set_sigmask(mask).expect("setmask");
        t.detach().expect("detach");
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid)).unwrap();
        assert!(status.contains("TracerPid:\t0"), "{status}");
    }

    #[test]
    fn second_tracer_is_refused() {
        let child = Child::spawn_pause();
        let _t = Tracee::seize(child.pid).expect("seize");
        // A second seize from the same tracer is EPERM as well.
        match Tracee::seize(child.pid) {
            Err(Error::AlreadyTraced { tid }) => assert_eq!(tid, child.pid),
            other => panic!("expected AlreadyTraced, got {other:?}"),
        }
    }
}
