//! wl-tracer PID: attaches to PID with PTRACE_SEIZE (which does not stop
//! it), prints `tracing PID`, then sleeps until killed. Used to make a PID
//! "already traced by another tracer".
mod shared;

use shared::{die, say};

fn main() {
    let pid: libc::pid_t = shared::arg_num(1, "usage: wl-tracer PID");
    // SAFETY: PTRACE_SEIZE with no options; the tracee keeps running.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if r != 0 {
        die(&format!("PTRACE_SEIZE {pid}: errno {}", shared::errno()));
    }
    say(&format!("tracing {pid}"));
    loop {
        // SAFETY: pause just waits for a signal.
        unsafe { libc::pause() };
    }
}
