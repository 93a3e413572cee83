//! The lazy guard: a small separate process (`dest-agent lazy-guard PID`)
//! that stops a lazily restored process if the agent dies before every page
//! arrived.
//!
//! The agent holds the process's userfaultfds; if it dies (crash, SIGKILL,
//! a restart), the kernel closes them, which unregisters the missing ranges
//! and lets the process run on with zero pages where its memory should be.
//! The guard prevents that silent corruption: it takes a pidfd of the
//! process at once, then waits on a pipe from the agent. `done` on the pipe
//! means every page arrived: the guard exits. End of file without `done`
//! means the agent is gone: the guard kills the process and the children
//! it forked meanwhile.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, ChildStdin, Command, Stdio};

/// The word that releases the guard.
const DONE: &[u8] = b"done\n";

/// The agent's end of a running guard.
pub struct Guard {
    stdin: Option<ChildStdin>,
    child: Option<Child>,
}

impl Guard {
    /// Start a guard over `pid` (this executable, subcommand `lazy-guard`).
    pub fn start(pid: i32) -> std::io::Result<Guard> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("lazy-guard")
            .arg(pid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take();
        Ok(Guard {
            stdin,
            child: Some(child),
        })
    }

    /// Every page arrived (or the process is gone on its own): the guard
    /// leaves the process alone and exits.
    pub fn release(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(DONE);
        }
        self.reap();
    }

    /// Stop the guarded process through the guard (it kills, then exits).
    pub fn trip(mut self) {
        drop(self.stdin.take());
        self.reap();
    }

    fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The guard exits right after reading; reap it off this thread.
            std::thread::spawn(move || {
                let _ = c.wait();
            });
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Not released: closing the pipe makes the guard kill.
        drop(self.stdin.take());
        self.reap();
    }
}

/// `pidfd_open(pid, 0)`.
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd the kernel just returned; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// SIGKILL through a pidfd (never hits a reused PID).
fn pidfd_kill(fd: &OwnedFd) {
    // SAFETY: pidfd_send_signal takes a pidfd, a signal number, a null
    // siginfo and flags 0; no memory of ours is passed.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// `pid` and the processes below it (children of any of its threads).
pub fn with_descendants(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 4096 {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                    out.extend(c.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
                }
            }
        }
        i += 1;
    }
    out
}

/// The guard process itself (`dest-agent lazy-guard PID`): returns its
/// exit code.
pub fn run(pid: i32) -> i32 {
    let Ok(fd) = pidfd_open(pid) else {
        // Already gone: nothing to guard.
        return 0;
    };
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
        if got.ends_with(DONE) {
            return 0;
        }
    }
    // The agent is gone before every page arrived: the process and what
    // it forked cannot go on without their memory.
    let below = with_descendants(pid);
    pidfd_kill(&fd);
    for p in below.into_iter().skip(1) {
        if let Ok(f) = pidfd_open(p) {
            pidfd_kill(&f);
        }
    }
    eprintln!(
        "lazy-guard: the agent is gone before every page of process {pid} arrived; stopped it"
    );
    1
}
