//! System calls executed inside a stopped thread of another process.
//!
//! The thread's registers are saved, pointed at a `syscall` instruction that
//! exists in the target (a gadget of ours, or one found in its vDSO), loaded
//! with the call number and arguments, and single-stepped over it; the result
//! is read from `rax` and the saved registers are put back. Nothing is
//! written into the target's memory by this module itself.

use crate::error::{Error, Result};
use crate::ptrace::{Stop, Tracee};
use std::io;

std::arch::global_asm!(
    ".pushsection .text.ferry_gadget,\"ax\",@progbits",
    ".globl ferry_syscall_gadget",
    ".type ferry_syscall_gadget,@function",
    "ferry_syscall_gadget:",
    "syscall",
    "int3",
    ".size ferry_syscall_gadget, . - ferry_syscall_gadget",
    ".popsection",
);

extern "C" {
    fn ferry_syscall_gadget();
}

/// The bytes of a trampoline: `syscall; int3`.
pub const TRAMPOLINE_CODE: [u8; 3] = [0x0f, 0x05, 0xcc];

/// Address of a `syscall; int3` gadget in this program's own text. A child
/// forked from us (a restore stub) has it at the same address.
pub fn local_gadget_addr() -> u64 {
    ferry_syscall_gadget as *const () as usize as u64
}

/// What happened while an injected system call ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallEvents {
    /// TID of a thread or process created by the call (`PTRACE_EVENT_CLONE`/`FORK`).
    pub new_child: Option<i32>,
}

/// Run system call `nr` with `args` inside the stopped thread `t`, using
/// the `syscall` instruction at `ip` in its address space. Returns the raw
/// return value (a negative errno on failure) and the events seen.
pub fn syscall_raw(t: &mut Tracee, ip: u64, nr: i64, args: &[u64]) -> Result<(i64, CallEvents)> {
    let saved = t.regs()?;
    let mut regs = saved;
    regs.rip = ip;
    regs.rax = nr as u64;
    regs.orig_rax = u64::MAX;
    let a = |i: usize| args.get(i).copied().unwrap_or(0);
    regs.rdi = a(0);
    regs.rsi = a(1);
    regs.rdx = a(2);
    regs.r10 = a(3);
    regs.r8 = a(4);
    regs.r9 = a(5);
    t.set_regs(&regs)?;
    let mut events = CallEvents::default();
    t.single_step()?;
    loop {
        match crate::ptrace::wait_tid(t.tid())? {
            Stop::Signal(libc::SIGTRAP) => break,
            Stop::Signal(sig) => {
                t.defer_signal(sig);
                t.single_step()?;
            }
            Stop::Event(ev, _) => {
                if ev == libc::PTRACE_EVENT_CLONE
                    || ev == libc::PTRACE_EVENT_FORK
                    || ev == libc::PTRACE_EVENT_VFORK
                {
                    events.new_child = Some(t.event_msg()? as i32);
                }
                t.single_step()?;
            }
            Stop::Exited(code) => {
                return Err(Error::Unexpected {
                    tid: t.tid(),
                    what: format!("exited with {code} during injected syscall {nr}"),
                })
            }
            Stop::Killed(sig) => {
                return Err(Error::Unexpected {
                    tid: t.tid(),
                    what: format!("killed by signal {sig} during injected syscall {nr}"),
                })
            }
        }
    }
    let after = t.regs()?;
    if after.rip != ip + 2 {
        return Err(Error::Unexpected {
            tid: t.tid(),
            what: format!(
                "injected syscall {nr} stopped at {:#x}, expected {:#x}",
                after.rip,
                ip + 2
            ),
        });
    }
    t.set_regs(&saved)?;
    Ok((after.rax as i64, events))
}

/// Like [`syscall_raw`], turning a negative return into [`Error::Remote`]
/// named `name`.
pub fn syscall(t: &mut Tracee, ip: u64, name: &'static str, nr: i64, args: &[u64]) -> Result<u64> {
    let (r, _) = syscall_raw(t, ip, nr, args)?;
    check(t.tid(), name, r)
}

/// Map a raw return value to a result.
pub fn check(tid: i32, name: &'static str, r: i64) -> Result<u64> {
    if (-4095..0).contains(&r) {
        Err(Error::Remote {
            name,
            tid,
            source: io::Error::from_raw_os_error(-r as i32),
        })
    } else {
        Ok(r as u64)
    }
}

/// Map `len` bytes of private anonymous memory with `prot` inside the
/// stopped thread's process: exactly at `addr` (never replacing anything)
/// when `addr` is non-zero, anywhere otherwise. Returns the address.
pub fn mmap_anon(t: &mut Tracee, ip: u64, addr: u64, len: u64, prot: i32) -> Result<u64> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if addr != 0 {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    let got = syscall(
        t,
        ip,
        "mmap(anonymous)",
        libc::SYS_mmap,
        &[addr, len, prot as u64, flags as u64, u64::MAX, 0],
    )?;
    if addr != 0 && got != addr {
        return Err(Error::Unexpected {
            tid: t.tid(),
            what: format!("mmap at {addr:#x} landed at {got:#x}"),
        });
    }
    Ok(got)
}

/// Find a `syscall` instruction (`0f 05`) in `[start, end)` of process `pid`,
/// typically its `[vdso]`.
pub fn find_syscall_insn(pid: i32, start: u64, end: u64) -> Result<Option<u64>> {
    let mut buf = vec![0u8; (end - start) as usize];
    crate::mem::read_forced(pid, start, &mut buf)?;
    Ok(buf
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|p| start + p as u64))
}

/// Runs system calls inside one stopped thread, with a small scratch area
/// of its memory for the calls' in/out structures.
pub struct Injector<'a> {
    tracee: &'a mut Tracee,
    ip: u64,
    scratch: u64,
    scratch_len: usize,
    /// Original bytes of a borrowed scratch area, put back by [`Injector::finish`].
    saved: Option<Vec<u8>>,
}

/// Size of the scratch area borrowed below a thread's stack pointer.
pub const STACK_SCRATCH_LEN: usize = 512;
/// Distance kept below the stack pointer (the red zone is 128 bytes).
const STACK_SCRATCH_GAP: u64 = 1024;

impl<'a> Injector<'a> {
    /// An injector using the `syscall` at `ip` and the writable scratch area
    /// `[scratch, scratch + len)` that belongs to us (e.g. a trampoline page).
    pub fn new(tracee: &'a mut Tracee, ip: u64, scratch: u64, scratch_len: usize) -> Self {
        Injector {
            tracee,
            ip,
            scratch,
            scratch_len,
            saved: None,
        }
    }

    /// An injector for a frozen thread we must leave unchanged: the scratch
    /// area is borrowed below its stack pointer and restored on [`finish`](Self::finish).
    pub fn on_stack(tracee: &'a mut Tracee, ip: u64) -> Result<Self> {
        let rsp = tracee.regs()?.rsp;
        let scratch = (rsp - STACK_SCRATCH_GAP - STACK_SCRATCH_LEN as u64) & !15;
        let mut saved = vec![0u8; STACK_SCRATCH_LEN];
        crate::mem::read(tracee.tid(), scratch, &mut saved)?;
        Ok(Injector {
            tracee,
            ip,
            scratch,
            scratch_len: STACK_SCRATCH_LEN,
            saved: Some(saved),
        })
    }

    /// The thread being driven.
    pub fn tracee(&mut self) -> &mut Tracee {
        self.tracee
    }

    /// TID of the thread being driven.
    pub fn tid(&self) -> i32 {
        self.tracee.tid()
    }

    /// Address of the `syscall` instruction used.
    pub fn ip(&self) -> u64 {
        self.ip
    }

    /// Address of the scratch area.
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// Size of the scratch area.
    pub fn scratch_len(&self) -> usize {
        self.scratch_len
    }

    /// Run a system call; a negative return becomes [`Error::Remote`].
    pub fn call(&mut self, name: &'static str, nr: i64, args: &[u64]) -> Result<u64> {
        syscall(self.tracee, self.ip, name, nr, args)
    }

    /// Run a system call and return the raw result and events.
    pub fn call_raw(&mut self, nr: i64, args: &[u64]) -> Result<(i64, CallEvents)> {
        syscall_raw(self.tracee, self.ip, nr, args)
    }

    /// Copy `data` into the scratch area at `offset`; returns its address in the target.
    pub fn put(&mut self, offset: usize, data: &[u8]) -> Result<u64> {
        if offset + data.len() > self.scratch_len {
            return Err(Error::Unexpected {
                tid: self.tid(),
                what: format!(
                    "scratch area too small: {} bytes at offset {offset}, area is {}",
                    data.len(),
                    self.scratch_len
                ),
            });
        }
        let addr = self.scratch + offset as u64;
        crate::mem::write(self.tracee.tid(), addr, data)?;
        Ok(addr)
    }

    /// Copy a NUL-terminated string into the scratch area at `offset`.
    pub fn put_cstr(&mut self, offset: usize, s: &str) -> Result<u64> {
        let mut b = Vec::with_capacity(s.len() + 1);
        b.extend_from_slice(s.as_bytes());
        b.push(0);
        self.put(offset, &b)
    }

    /// Read `len` bytes of the scratch area at `offset`.
    pub fn get(&mut self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        crate::mem::read(self.tracee.tid(), self.scratch + offset as u64, &mut buf)?;
        Ok(buf)
    }

    /// Put back a borrowed scratch area.
    pub fn finish(mut self) -> Result<()> {
        if let Some(saved) = self.saved.take() {
            crate::mem::write(self.tracee.tid(), self.scratch, &saved)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Child;

    #[test]
    fn getpid_and_mmap_in_child_via_local_gadget() {
        let child = Child::spawn_pause();
        let mut t = Tracee::seize(child.pid).expect("seize");
        t.interrupt().expect("interrupt");
        let before = t.regs().expect("regs");
        let ip = local_gadget_addr();
        let pid = syscall(&mut t, ip, "getpid", libc::SYS_getpid, &[]).expect("getpid");
        assert_eq!(pid as i32, child.pid);
        let addr =
            mmap_anon(&mut t, ip, 0, 4096, libc::PROT_READ | libc::PROT_WRITE).expect("mmap");
        crate::mem::write(child.pid, addr, b"hello").expect("write");
        let mut back = [0u8; 5];
        crate::mem::read(child.pid, addr, &mut back).expect("read");
        assert_eq!(&back, b"hello");
        let err = syscall(&mut t, ip, "close", libc::SYS_close, &[9999]).unwrap_err();
        assert!(err.to_string().contains("close"), "{err}");
        // Registers are as before the injections.
        let after = t.regs().expect("regs");
        assert_eq!((after.rip, after.rsp), (before.rip, before.rsp));
        t.detach().expect("detach");
    }

    #[test]
    fn syscall_found_in_vdso() {
        let child = Child::spawn_pause();
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.pid)).unwrap();
        let line = maps.lines().find(|l| l.ends_with("[vdso]")).expect("vdso");
        let range = line.split_whitespace().next().unwrap();
        let (s, e) = range.split_once('-').unwrap();
        let (s, e) = (
            u64::from_str_radix(s, 16).unwrap(),
            u64::from_str_radix(e, 16).unwrap(),
        );
        let ip = find_syscall_insn(child.pid, s, e)
            .expect("read vdso")
            .expect("found");
        let mut t = Tracee::seize(child.pid).expect("seize");
        t.interrupt().expect("interrupt");
        let pid = syscall(&mut t, ip, "getpid", libc::SYS_getpid, &[]).expect("getpid");
        assert_eq!(pid as i32, child.pid);
        t.detach().expect("detach");
    }
}
