//! Conversions between the kernel's register layout and the image model,
//! and the fix-up of system calls interrupted by the checkpoint.

use ferry_protocol::model::GpRegs;
use libc::user_regs_struct;

/// `-ERESTARTSYS`, `-ERESTARTNOINTR`, `-ERESTARTNOHAND`, `-ERESTART_RESTARTBLOCK`.
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

macro_rules! copy_regs {
    ($from:expr, $to:ident, $($f:ident),*) => { $to { $($f: $from.$f),* } };
}

/// Kernel layout → model.
pub fn to_model(r: &user_regs_struct) -> GpRegs {
    copy_regs!(
        r, GpRegs, r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi,
        orig_rax, rip, cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
    )
}

/// Model → kernel layout.
pub fn from_model(r: &GpRegs) -> user_regs_struct {
    let mut k = ferry_parasite::ptrace::zeroed_regs();
    macro_rules! set { ($($f:ident),*) => { $(k.$f = r.$f;)* } }
    set!(
        r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
        eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
    );
    k
}

/// Registers to resume a thread with, so that a system call interrupted by
/// the checkpoint runs again instead of failing with EINTR.
///
/// A thread frozen inside a system call shows the call in `orig_rax` and a
/// restart code in `rax`; the kernel's own restart logic is lost with the
/// old process, so we rewind to the `syscall` instruction. For
/// `ERESTART_RESTARTBLOCK` (sleeps with a remaining time) the original call
/// is executed again with its original arguments.
pub fn resume_regs(r: &GpRegs) -> GpRegs {
    let mut out = *r;
    if (r.orig_rax as i64) >= 0 {
        let rax = r.rax as i64;
        if matches!(
            rax,
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
        ) {
            out.rax = r.orig_rax;
            out.rip = r.rip.wrapping_sub(2);
        }
    }
    out.orig_rax = u64::MAX;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_restart() {
        let mut k = ferry_parasite::ptrace::zeroed_regs();
        k.rip = 0x1002;
        k.orig_rax = 34;
        k.rax = (-514i64) as u64;
        k.fs_base = 0x7f00;
        let m = to_model(&k);
        assert_eq!(from_model(&m).fs_base, 0x7f00);
        let r = resume_regs(&m);
        assert_eq!((r.rip, r.rax, r.orig_rax), (0x1000, 34, u64::MAX));
        // A thread not in a system call keeps its registers.
        let mut m2 = m;
        m2.orig_rax = u64::MAX;
        m2.rax = 7;
        let r2 = resume_regs(&m2);
        assert_eq!((r2.rip, r2.rax), (0x1002, 7));
        // A system call that already completed (rax = its result) is not rerun.
        let mut m3 = m;
        m3.rax = 0;
        assert_eq!(resume_regs(&m3).rip, 0x1002);
    }
}
