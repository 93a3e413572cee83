//! Recreating threads with their TIDs, per-thread kernel state, and the
//! final registers.

use crate::error::{Error, Result};
use ferry_parasite::remote::Injector;
use ferry_parasite::Tracee;
use ferry_protocol::model::ThreadState;

const PR_SET_NAME: u64 = 15;
const SS_ONSTACK: i32 = 1;
const SS_DISABLE: i32 = 2;

/// Create a thread with TID `t.tid` in the process driven by `inj` (its
/// main thread), stopped and traced by us.
pub fn create(inj: &mut Injector, t: &ThreadState) -> Result<Tracee> {
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_SETTLS) as u64;
    let tid_addr = inj.put(1024, &(t.tid as u32).to_le_bytes())?;
    let args: [u64; 11] = [flags, 0, 0, 0, 0, 0, 0, t.regs.fs_base, tid_addr, 1, 0];
    let bytes: Vec<u8> = args.iter().flat_map(|w| w.to_le_bytes()).collect();
    let args_addr = inj.put(0, &bytes)?;
    let (r, ev) = inj.call_raw(libc::SYS_clone3, &[args_addr, bytes.len() as u64])?;
    let new = ferry_parasite::remote::check(inj.tid(), "clone3(thread)", r).map_err(|e| {
        if r == -(libc::EEXIST as i64) {
            Error::Incompatible(format!("TID {} is already in use on this host", t.tid))
        } else {
            e.into()
        }
    })? as i32;
    if new != t.tid || ev.new_child != Some(t.tid) {
        return Err(Error::Incompatible(format!(
            "thread created with TID {new} instead of {}",
            t.tid
        )));
    }
    let mut child = Tracee::adopt(new);
    child.wait_event_stop()?;
    Ok(child)
}

/// Restore the per-thread kernel state of the thread driven by `inj`:
/// name, alternate signal stack, clear_child_tid, robust list, rseq.
pub fn setup(inj: &mut Injector, t: &ThreadState) -> Result<()> {
    let mut name = t.comm.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    let p = inj.put(0, &name)?;
    inj.call("prctl(PR_SET_NAME)", libc::SYS_prctl, &[PR_SET_NAME, p])?;
    if t.sigaltstack.flags & SS_DISABLE == 0 && t.sigaltstack.sp != 0 {
        let mut ss = [0u8; 24];
        ss[0..8].copy_from_slice(&t.sigaltstack.sp.to_le_bytes());
        ss[8..12].copy_from_slice(&(t.sigaltstack.flags & !SS_ONSTACK).to_le_bytes());
        ss[16..24].copy_from_slice(&t.sigaltstack.size.to_le_bytes());
        let p = inj.put(64, &ss)?;
        inj.call("sigaltstack", libc::SYS_sigaltstack, &[p, 0])?;
    }
    inj.call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[t.clear_child_tid],
    )?;
    if t.robust_list != 0 {
        inj.call(
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[t.robust_list, t.robust_list_len],
        )?;
    }
    if let Some(r) = &t.rseq {
        inj.call(
            "rseq",
            libc::SYS_rseq,
            &[r.abi_pointer, r.len as u64, 0, r.signature as u64],
        )?;
    }
    Ok(())
}

/// Load the thread's final registers, FPU state and signal mask.
pub fn load_registers(tracee: &Tracee, t: &ThreadState) -> Result<()> {
    tracee.set_xstate(&t.xstate)?;
    let regs = crate::regs::resume_regs(&t.regs);
    tracee.set_regs(&crate::regs::from_model(&regs))?;
    tracee.set_sigmask(t.sigmask)?;
    Ok(())
}
