//! Creating a child process with a chosen PID, to be turned into a restored
//! process by remote control.

use crate::error::{Error, Result};
use std::io;

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}
const _: () = assert!(std::mem::size_of::<CloneArgs>() == 88);

/// Fork a child of this process that only waits (`pause()` forever), with
/// PID `pid` when given (`clone3` with `set_tid`). The child shares nothing
/// with us but a copy of our address space, so our own `syscall` gadget is
/// at the same address in it.
pub fn spawn_paused(pid: Option<i32>) -> Result<i32> {
    let set_tid = [pid.unwrap_or(0)];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if pid.is_some() {
            set_tid.as_ptr() as u64
        } else {
            0
        },
        set_tid_size: u64::from(pid.is_some()),
        ..Default::default()
    };
    let r = clone3_fork(&args);
    if r < 0 {
        let e = io::Error::last_os_error();
        let want = pid.unwrap_or(0);
        return Err(match e.raw_os_error() {
            Some(libc::EEXIST) => Error::Unexpected {
                tid: want,
                what: format!("PID {want} is already in use on this host"),
            },
            _ => Error::sys("clone3 with set_tid", want, e),
        });
    }
    Ok(r as i32)
}

/// fork via raw clone3; the child never returns from here.
fn clone3_fork(args: &CloneArgs) -> i64 {
    // SAFETY: clone3 without CLONE_VM creates a copy-on-write child. The
    // child executes only raw system calls (pause) and never returns into
    // Rust code, so no lock or allocator state of ours is touched in it.
    unsafe {
        let r = libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        );
        if r == 0 {
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
        r
    }
}
