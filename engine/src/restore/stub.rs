//! The stub: a child of ours with the image's PID, stripped down to an
//! empty shell (only our trampoline and the vDSO areas left) under ptrace.

use crate::error::{Error, Result};
use crate::procfs;
use ferry_parasite::remote::{local_gadget_addr, mmap_anon, Injector, TRAMPOLINE_CODE};
use ferry_parasite::{stub::spawn_paused, Tracee};
use ferry_protocol::model::{Vma, PAGE_SIZE};

/// Pages of scratch memory after the trampoline's code page.
pub const SCRATCH_PAGES: u64 = 4;
const RSEQ_FLAG_UNREGISTER: u64 = 1;

/// A stub process being turned into the restored process.
pub struct Stub {
    /// Its PID (the image's PID).
    pub pid: i32,
    /// Its main thread, traced by us.
    pub main: Option<Tracee>,
    /// Its other threads once created, traced by us.
    pub others: Vec<Tracee>,
    /// Address of the trampoline code page (`syscall; int3`).
    pub tramp: u64,
    /// Whether it must be killed when dropped (cleared on success).
    armed: bool,
}

/// Areas of the stub that survive the tear-down.
fn kept(path: Option<&str>) -> bool {
    matches!(
        path,
        Some("[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]")
    )
}

/// Lowest page-aligned address ≥ `from` where `len` bytes fit between the
/// `busy` ranges.
pub fn find_hole(busy: &[(u64, u64)], len: u64, from: u64) -> Option<u64> {
    let mut b: Vec<(u64, u64)> = busy.to_vec();
    b.sort_unstable();
    let mut cand = from;
    for (s, e) in b {
        if e <= cand {
            continue;
        }
        if s >= cand.checked_add(len)? {
            break;
        }
        cand = e.max(cand);
    }
    (cand.checked_add(len)? <= crate::restore::TASK_SIZE).then_some(cand)
}

impl Stub {
    /// Fork the stub with PID `pid`, stop it, install the trampoline at an
    /// address free in both the stub and the image, and tear everything
    /// else down (fds, rseq, every mapping but the vDSO areas).
    pub fn create(pid: i32, image_vmas: &[Vma]) -> Result<Stub> {
        let stub_pid = spawn_paused(Some(pid)).map_err(|e| match e {
            ferry_parasite::Error::Unexpected { what, .. } => Error::Incompatible(what),
            other => other.into(),
        })?;
        let mut stub = Stub {
            pid: stub_pid,
            main: None,
            others: Vec::new(),
            tramp: 0,
            armed: true,
        };
        let mut t = Tracee::seize(stub_pid)?;
        t.interrupt()?;
        // Nothing is delivered while we build; the image's masks come last.
        t.set_sigmask(!0)?;
        let maps = procfs::maps(stub_pid)?;
        let mut busy: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
        busy.extend(image_vmas.iter().map(|v| (v.start, v.end)));
        let len = (1 + SCRATCH_PAGES) * PAGE_SIZE;
        let tramp = find_hole(&busy, len, 0x10_0000).ok_or_else(|| {
            Error::Incompatible("no free address range for the trampoline".into())
        })?;
        {
            let gadget = local_gadget_addr();
            mmap_anon(
                &mut t,
                gadget,
                tramp,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
            )?;
            let mut inj = Injector::new(&mut t, gadget, 0, 0);
            ferry_parasite::mem::write(stub_pid, tramp, &TRAMPOLINE_CODE)?;
            let rx = (libc::PROT_READ | libc::PROT_EXEC) as u64;
            inj.call(
                "mprotect(trampoline)",
                libc::SYS_mprotect,
                &[tramp, PAGE_SIZE, rx],
            )?;
        }
        stub.tramp = tramp;
        {
            let mut inj = Injector::new(
                &mut t,
                tramp,
                tramp + PAGE_SIZE,
                (SCRATCH_PAGES * PAGE_SIZE) as usize,
            );
            let rc = inj.tracee().rseq_config()?;
            if rc.rseq_abi_pointer != 0 {
                inj.call(
                    "rseq(unregister)",
                    libc::SYS_rseq,
                    &[
                        rc.rseq_abi_pointer,
                        rc.rseq_abi_size as u64,
                        RSEQ_FLAG_UNREGISTER,
                        rc.signature as u64,
                    ],
                )?;
            }
            inj.call(
                "close_range",
                libc::SYS_close_range,
                &[0, u32::MAX as u64, 0],
            )?;
            for m in maps.iter().filter(|m| !kept(m.path.as_deref())) {
                inj.call(
                    "munmap(stub)",
                    libc::SYS_munmap,
                    &[m.start, m.end - m.start],
                )?;
            }
        }
        stub.main = Some(t);
        Ok(stub)
    }

    /// Fork a child of this stub (which must be torn down already) with PID
    /// `pid`: a copy of the empty shell, trampoline included, stopped and
    /// traced by us. With `exit_signal` SIGCHLD, as `fork` does.
    pub fn fork_child(&mut self, pid: i32) -> Result<Stub> {
        let parent = self.pid;
        let mut inj = self.injector()?;
        inj.tracee().trace_forks()?;
        let pid_addr = inj.put(1024, &(pid as u32).to_le_bytes())?;
        // struct clone_args: flags, pidfd, child_tid, parent_tid,
        // exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup
        let args: [u64; 11] = [0, 0, 0, 0, libc::SIGCHLD as u64, 0, 0, 0, pid_addr, 1, 0];
        let bytes: Vec<u8> = args.iter().flat_map(|w| w.to_le_bytes()).collect();
        let args_addr = inj.put(0, &bytes)?;
        let (r, ev) = inj.call_raw(libc::SYS_clone3, &[args_addr, bytes.len() as u64])?;
        if r == -(libc::EEXIST as i64) {
            return Err(Error::Incompatible(format!(
                "PID {pid} is already in use on this host"
            )));
        }
        let new = ferry_parasite::remote::check(parent, "clone3(child)", r)? as i32;
        if new != pid || ev.new_child != Some(pid) {
            return Err(Error::Incompatible(format!(
                "child of {parent} created with PID {new} instead of {pid}"
            )));
        }
        let mut child = Stub {
            pid,
            main: None,
            others: Vec::new(),
            tramp: self.tramp,
            armed: true,
        };
        let mut t = Tracee::adopt(pid);
        t.wait_event_stop()?;
        child.main = Some(t);
        Ok(child)
    }

    /// Let the main thread go from `regs` (e.g. at the trampoline's
    /// `syscall` with an `exit_group`), untraced: the stub is no longer ours.
    pub fn release_at(mut self, regs: &libc::user_regs_struct) -> Result<()> {
        let t = self
            .main
            .take()
            .ok_or_else(|| Error::Incompatible("stub has no main thread".into()))?;
        self.armed = false;
        t.set_regs(regs)?;
        t.detach()?;
        Ok(())
    }

    /// The address range of the trampoline (code page and scratch pages).
    pub fn tramp_range(&self) -> (u64, u64) {
        (self.tramp, self.tramp + (1 + SCRATCH_PAGES) * PAGE_SIZE)
    }

    /// An injector on the main thread using the trampoline.
    pub fn injector(&mut self) -> Result<Injector<'_>> {
        let tramp = self.tramp;
        let t = self
            .main
            .as_mut()
            .ok_or_else(|| Error::Incompatible("stub has no main thread".into()))?;
        Ok(Injector::new(
            t,
            tramp,
            tramp + PAGE_SIZE,
            (SCRATCH_PAGES * PAGE_SIZE) as usize,
        ))
    }

    /// An injector on another thread of the stub, sharing the trampoline.
    pub fn injector_for<'a>(&self, t: &'a mut Tracee) -> Injector<'a> {
        Injector::new(
            t,
            self.tramp,
            self.tramp + PAGE_SIZE,
            (SCRATCH_PAGES * PAGE_SIZE) as usize,
        )
    }

    /// Let every thread run (other threads first, the main thread last)
    /// and stop tracing; the stub is the restored process now.
    pub fn resume(mut self) -> Result<()> {
        self.armed = false;
        let mut first: Option<Error> = None;
        for t in self.others.drain(..) {
            if let Err(e) = t.detach() {
                first.get_or_insert(e.into());
            }
        }
        if let Some(t) = self.main.take() {
            if let Err(e) = t.detach() {
                first.get_or_insert(e.into());
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(t) = self.main.take() {
            t.forget();
        }
        for t in self.others.drain(..) {
            t.forget();
        }
        // SAFETY: kill and reap our own child, by PID.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut st = 0;
            libc::waitpid(self.pid, &mut st, libc::__WALL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::find_hole;

    #[test]
    fn holes() {
        let busy = [(0x10_0000, 0x20_0000), (0x30_0000, 0x40_0000)];
        assert_eq!(find_hole(&busy, 0x1000, 0x10_0000), Some(0x20_0000));
        assert_eq!(find_hole(&busy, 0x10_0000, 0x10_0000), Some(0x20_0000));
        assert_eq!(find_hole(&busy, 0x10_0001, 0x10_0000), Some(0x40_0000));
        assert_eq!(find_hole(&[], 0x1000, 0x5000), Some(0x5000));
    }
}
