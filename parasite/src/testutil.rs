//! Test helpers: a paused child process that is killed and reaped on drop.

/// A child that does nothing but wait.
pub struct Child {
    pub pid: i32,
}

impl Child {
    /// Fork a child that loops in `pause()`.
    pub fn spawn_pause() -> Child {
        let pid = crate::stub::spawn_paused(None).expect("fork child");
        // Wait until it sits in pause(), so tests see a known state.
        for _ in 0..2000 {
            let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
            if sc.starts_with(&format!("{} ", libc::SYS_pause)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Child { pid }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid on our own child, by PID.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut st = 0;
            libc::waitpid(self.pid, &mut st, libc::__WALL);
        }
    }
}
