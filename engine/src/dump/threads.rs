//! Checkpoint of each thread: registers, FPU state, signal state, rseq,
//! robust futex list, `clear_child_tid`.

use crate::error::{Error, Result};
use crate::procfs;
use ferry_parasite::remote::Injector;
use ferry_parasite::Tracee;
use ferry_protocol::model::{Rseq, SigAltStack, ThreadState};

const PR_GET_TID_ADDRESS: u64 = 40;

/// Capture one frozen thread. `syscall_ip` is a `syscall` instruction in
/// the target (in its vDSO) used for report-only injected calls.
pub fn dump_thread(
    pid: i32,
    t: &mut Tracee,
    syscall_ip: u64,
    xstate_size: usize,
) -> Result<ThreadState> {
    let tid = t.tid();
    let regs = crate::regs::to_model(&t.regs()?);
    let xstate = t.xstate(xstate_size)?;
    if xstate.len() != xstate_size {
        return Err(Error::parse(
            "xstate size",
            format!(
                "thread {tid}: {} bytes, expected {xstate_size}",
                xstate.len()
            ),
        ));
    }
    let sigmask = t.sigmask()?;
    let rc = t.rseq_config()?;
    let rseq = (rc.rseq_abi_pointer != 0).then_some(Rseq {
        abi_pointer: rc.rseq_abi_pointer,
        len: rc.rseq_abi_size,
        flags: rc.flags,
        signature: rc.signature,
    });
    let comm = procfs::read(pid, &format!("task/{tid}/comm"))?
        .trim_end_matches('\n')
        .to_string();
    let (robust_list, robust_list_len) = robust_list(tid)?;
    let pending = crate::dump::misc::thread_pending(t)?;

    let mut inj = Injector::on_stack(t, syscall_ip)?;
    let addr = inj.scratch();
    inj.call(
        "prctl(PR_GET_TID_ADDRESS)",
        libc::SYS_prctl,
        &[PR_GET_TID_ADDRESS, addr],
    )?;
    let clear_child_tid = u64::from_le_bytes(to8(&inj.get(0, 8)?));
    inj.call("sigaltstack", libc::SYS_sigaltstack, &[0, addr])?;
    let ss = inj.get(0, 24)?;
    inj.finish()?;
    let sigaltstack = SigAltStack {
        sp: u64::from_le_bytes(to8(&ss[0..8])),
        flags: i32::from_le_bytes([ss[8], ss[9], ss[10], ss[11]]),
        size: u64::from_le_bytes(to8(&ss[16..24])),
    };
    Ok(ThreadState {
        tid,
        comm,
        regs,
        xstate,
        sigmask,
        sigaltstack,
        clear_child_tid,
        robust_list,
        robust_list_len,
        rseq,
        pending,
    })
}

fn to8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

fn robust_list(tid: i32) -> Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: get_robust_list writes one pointer and one size_t into our locals.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r != 0 {
        return Err(Error::io(
            format!("get_robust_list of thread {tid}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok((head, len as u64))
}
